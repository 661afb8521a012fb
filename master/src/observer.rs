//! The fleet as the master's metrics show it: every `CIMASTER_OBSERVE_INTERVAL` a replica counts the
//! runs that started or ended since into `cimaster_dispatch_seconds` (trigger → container started,
//! by queue) and `cimaster_run_seconds` (trigger → ended, by queue and final status), and forgets
//! agents gone for `CIMASTER_AGENT_FORGET_AFTER`. Runs are claimed in the database, so each is
//! counted by exactly one replica: sum the series over replicas.

use cimaster_store::{agents, observations};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::AgentsConfig;
use crate::ticker::Ticker;

/// Runs counted per claim; a pass claims until none is left.
const BATCH: i64 = 500;

pub async fn run_observer(pool: PgPool, config: AgentsConfig, cancel: CancellationToken) {
    let mut ticker = Ticker::new(config.observe_interval, cancel);
    while ticker.tick().await {
        if let Err(err) = observe_runs(&pool).await {
            tracing::warn!(error = %err, "counting runs into the histograms failed");
        }
        match agents::forget(&pool, config.forget_after).await {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(forgotten, "forgot agents not seen for a long time"),
            Err(err) => tracing::warn!(error = %err, "forgetting old agents failed"),
        }
    }
}

/// Counts every run with something uncounted, in batches.
pub async fn observe_runs(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut total = 0;
    loop {
        let batch = observations::claim(pool, BATCH).await?;
        for run in &batch {
            record(run);
        }
        total += batch.len();
        if batch.len() < BATCH as usize {
            return Ok(total);
        }
    }
}

fn record(run: &observations::Observation) {
    if let Some(seconds) = run.dispatch_seconds {
        metrics::histogram!("cimaster_dispatch_seconds", "queue" => run.queue.clone()).record(seconds.max(0.0));
    }
    if let Some(seconds) = run.run_seconds {
        metrics::histogram!("cimaster_run_seconds", "queue" => run.queue.clone(), "status" => run.status.as_str())
            .record(seconds.max(0.0));
    }
}
