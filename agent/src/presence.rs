//! The agent's entry in the registry (`GET /agents`, `GET /queues`): what it hands out and uses,
//! what it runs, whether it drains. Reported at start and every few seconds; removed when the agent
//! stops after draining, so an agent that is gone without a word shows as lost.

use std::time::Duration;

use cimaster_store::agents::{self, Report};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::telemetry::InProgress;

pub struct Presence {
    pub pool: PgPool,
    pub agent: String,
    pub queues: Vec<String>,
    pub admission: Admission,
    /// Cancelled on SIGTERM: the agent drains.
    pub draining: CancellationToken,
    pub every: Duration,
    /// How the engine isolates runs: user namespaces remapped, egress rules set.
    pub userns_remap: bool,
    pub egress_rules: bool,
}

impl Presence {
    /// Reports until `stop`, then leaves the registry.
    pub async fn run(self, stop: CancellationToken) {
        let mut first = true;
        loop {
            if let Err(err) = self.report(first).await {
                tracing::warn!(error = %err, "cannot report to the agent registry");
            } else {
                first = false;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.draining.cancelled(), if !self.draining.is_cancelled() => {}
                () = tokio::time::sleep(self.every) => {}
            }
        }
        if let Err(err) = agents::leave(&self.pool, &self.agent).await {
            tracing::warn!(error = %err, "cannot leave the agent registry; the entry shows as lost");
        }
    }

    async fn report(&self, started: bool) -> Result<(), sqlx::Error> {
        let (cpus_used, memory_used) = self.admission.in_use();
        let report = Report {
            id: &self.agent,
            version: env!("CARGO_PKG_VERSION"),
            queues: &self.queues,
            cpus: self.admission.cpus(),
            memory: self.admission.memory(),
            cpus_used,
            memory_used,
            runs: InProgress::count(),
            host_cpu: self.admission.host_cpu(),
            draining: self.draining.is_cancelled(),
            userns_remap: self.userns_remap,
            egress_rules: self.egress_rules,
        };
        agents::report(&self.pool, &report, started).await
    }
}
