//! The job container: the script in the job's image, with the environment the phases before it put
//! together, the run's limits and network, until it exits or the attempt is stopped. It is created
//! and started once the checkout is done and its image is there (no code of the image runs while
//! git works in the workspace), while the services are made ready, and its script waits at its
//! gate (a line on its stdin) until they are: the engine's seconds of starting a container overlap
//! the services' start.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::output::pump_to_console;
use super::{Attempt, AttemptError, Stop};
use crate::docker::{DockerError, JobContainer, Started};
use crate::plan::Plan;
use cimaster_store::attempts;

/// How long the container's output may go on after it stopped, in case the engine hangs.
const OUTPUT_AFTER_STOP: Duration = Duration::from_secs(30);

/// The job container being created and started in the background.
pub(super) struct Starting {
    image: String,
    task: JoinHandle<Result<Started, DockerError>>,
}

impl Starting {
    /// The container once it is started, if it was; for removal.
    pub(super) async fn container(self) -> Option<String> {
        Some(self.task.await.ok()?.ok()?.id)
    }
}

impl Attempt<'_> {
    /// Creates and starts the job container in the background; its script waits at the gate
    /// until [`Self::run_job`].
    pub(super) fn start_job(&mut self, plan: &Plan, image: String) {
        let claim = self.claim;
        let mut env = self.env.clone();
        env.extend(claim.parameters.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("CIMASTER_RUN_ID={}", claim.run));
        env.push(format!("CIMASTER_JOB={}", claim.job));
        env.push(format!("CIMASTER_ATTEMPT={}", claim.attempt));
        env.extend(claim.cause.env());
        if let Some(checkout) = &plan.checkout {
            env.push(format!("CIMASTER_COMMIT={}", checkout.commit));
        }
        let workspace = self.held.workspace.as_ref();
        let spec = JobContainer {
            role: String::new(),
            image: image.clone(),
            script: Some(plan.script.clone()),
            env,
            working_dir: plan.working_dir.clone(),
            user: plan.user.clone(),
            nano_cpus: Some((plan.resources.cpus * 1e9) as i64),
            memory_bytes: Some(i64::try_from(plan.resources.memory.bytes()).unwrap_or(i64::MAX)),
            network: self.network().name.clone(),
            sandbox: self.network().sandbox.clone(),
            aliases: Vec::new(),
            workspace: workspace.map(|workspace| workspace.host.clone()),
            mirror: workspace.filter(|workspace| workspace.shares_mirror).map(|workspace| workspace.mirror.clone()),
            gated: true,
        };
        let (docker, labels) = (self.executor.docker.clone(), self.labels.clone());
        let task = tokio::spawn(async move { docker.start_job(&labels, spec).await });
        self.held.starting = Some(Starting { image, task });
    }

    /// Opens the started job's gate and runs it to its end; returns its container and how it ended.
    pub(super) async fn run_job(&mut self) -> Result<(String, Stop), Stop> {
        let (executor, claim) = (self.executor, self.claim);
        let mut starting = self.held.starting.take().expect("the job container is started first");
        let started = match self.interrupts.step(&mut starting.task).await {
            Ok(started) => started,
            Err(stop) => {
                self.held.starting = Some(starting);
                return Err(stop);
            }
        };
        let Started { id, output, gate } = started.map_err(AttemptError::JobStart)??;
        self.held.containers.push(id.clone());
        let image = starting.image;
        self.console.note(&format!("agent {} runs attempt {} in {image}", executor.agent, claim.attempt)).await;
        let mut logs = pump_to_console(output, self.masker.clone(), self.console.clone());
        if let Some(gate) = gate {
            gate.open().await?;
        }
        {
            let (pool, claim) = (executor.pool.clone(), claim.clone());
            tokio::spawn(async move {
                if let Err(err) = attempts::container_started(&pool, &claim).await {
                    tracing::warn!(error = %err, "cannot record the container start");
                }
            });
        }
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
