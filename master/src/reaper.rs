//! Finds attempts whose agent stopped renewing the lease (it died or lost its network) and queues
//! the run again as the next attempt, up to the limit, then marks it `error`. Safe in every replica:
//! expired rows are taken with `FOR UPDATE SKIP LOCKED`.

use cimaster_common::RunStatus;
use cimaster_store::attempts::{self, Reaped};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::ReaperConfig;
use crate::dispatch::{message_for, ConfirmLog};
use crate::ticker::Ticker;

pub async fn run_reaper(
    pool: PgPool,
    broker: Broker,
    confirms: ConfirmLog,
    config: ReaperConfig,
    cancel: CancellationToken,
) {
    let mut ticker = Ticker::new(config.interval, cancel);
    while ticker.tick().await {
        match reap_expired(&pool, config.max_attempts).await {
            Ok(reaped) => {
                for run in reaped.iter().filter(|run| run.status == RunStatus::Queued) {
                    publish(&broker, &confirms, run).await;
                }
            }
            Err(err) => tracing::warn!(error = %err, "reaper pass failed"),
        }
    }
}

async fn publish(broker: &Broker, confirms: &ConfirmLog, run: &Reaped) {
    let Some(message) = message_for(run.id, &run.job, &run.queue, run.attempt) else { return };
    match broker.publish(&message).await {
        Ok(()) => confirms.confirmed(message.run_id),
        // The dispatcher publishes it after its grace period.
        Err(err) => tracing::warn!(run_id = %run.id, error = %err, "cannot publish the retried run yet"),
    }
}

async fn reap_expired(pool: &PgPool, max_attempts: u32) -> Result<Vec<Reaped>, sqlx::Error> {
    let reaped = attempts::reap_expired(pool, max_attempts).await?;
    for run in &reaped {
        tracing::warn!(run_id = %run.id, status = %run.status, attempt = run.attempt, "run's agent was lost");
    }
    metrics::counter!("cimaster_runs_reaped_total").increment(reaped.len() as u64);
    Ok(reaped)
}
