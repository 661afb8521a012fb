//! The job container: the script in the job's image, with the environment the phases before it put
//! together, the run's limits and network, until it exits or the attempt is stopped.

use std::time::Duration;

use super::output::pump_to_console;
use super::{Attempt, Stop};
use crate::docker::JobContainer;
use crate::plan::Plan;
use cimaster_store::attempts;

/// How long the container's output may go on after it stopped, in case the engine hangs.
const OUTPUT_AFTER_STOP: Duration = Duration::from_secs(30);

impl Attempt<'_> {
    /// Runs the job to its end; returns its container and how it ended.
    pub(super) async fn run_job(
        &mut self,
        plan: &Plan,
        image: String,
        network: String,
    ) -> Result<(String, Stop), Stop> {
        let (executor, claim) = (self.executor, self.claim);
        self.console.note(&format!("agent {} runs attempt {} in {image}", executor.agent, claim.attempt)).await;
        let mut env = std::mem::take(&mut self.env);
        env.extend(claim.parameters.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("CIMASTER_RUN_ID={}", claim.run));
        env.push(format!("CIMASTER_JOB={}", claim.job));
        env.push(format!("CIMASTER_ATTEMPT={}", claim.attempt));
        env.extend(claim.cause.env());
        if let Some(checkout) = &plan.checkout {
            env.push(format!("CIMASTER_COMMIT={}", checkout.commit));
        }
        let spec = JobContainer {
            role: String::new(),
            image,
            script: Some(plan.script.clone()),
            env,
            working_dir: plan.working_dir.clone(),
            nano_cpus: Some((plan.resources.cpus * 1e9) as i64),
            memory_bytes: Some(i64::try_from(plan.resources.memory.bytes()).unwrap_or(i64::MAX)),
            network,
            aliases: Vec::new(),
            workspace: self.held.volume.clone(),
            mirror: self.held.mirror.clone().map(|volume| crate::docker::MirrorMount { volume, writable: false }),
        };
        let (id, output) = executor.docker.start_job(&self.labels, spec).await?;
        self.held.containers.push(id.clone());
        {
            let (pool, claim) = (executor.pool.clone(), claim.clone());
            tokio::spawn(async move {
                if let Err(err) = attempts::container_started(&pool, &claim).await {
                    tracing::warn!(error = %err, "cannot record the container start");
                }
            });
        }
        let mut logs = pump_to_console(output, self.masker.clone(), self.console.clone());
        let stop = match self.interrupts.step(executor.docker.wait(&id)).await {
            Ok(Ok(code)) => Stop::Exited(code),
            Ok(Err(err)) => Stop::from(err),
            Err(stop) => stop,
        };
        if !matches!(stop, Stop::Exited(_)) {
            self.stop_container(&id, &stop).await;
        }
        if tokio::time::timeout(OUTPUT_AFTER_STOP, &mut logs).await.is_err() {
            logs.abort();
            self.console.note("the container's output did not end with it; the log may be incomplete").await;
        }
        Ok((id, stop))
    }

    /// SIGTERM, then SIGKILL after the stop grace.
    async fn stop_container(&self, id: &str, why: &Stop) {
        let grace = self.executor.timing.stop_grace();
        let note = format!("{}: sending SIGTERM, SIGKILL after {}s", why.reason(), grace.as_secs());
        self.console.note(&note).await;
        if let Err(err) = self.executor.docker.stop(id, grace).await {
            tracing::warn!(error = %err, "cannot stop the job container");
        }
    }
}
