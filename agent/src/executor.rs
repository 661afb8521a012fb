//! Executes one claimed attempt: network, container, console, timeout, abort, lease, cleanup, and
//! the fenced final status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cimaster_common::pool::{self, AcquireRequest, ClusterView, PoolError, ReleaseOutcome};
use cimaster_common::secrets::{Masker, SecretBox};
use cimaster_common::storage::console_key;
use cimaster_common::{ClusterRequirement, EnvName, JobSpec, RunStatus};
use futures::StreamExt;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::console::{self, ConsoleTx, Timestamper};
use crate::docker::{Chunk, DockerClient, JobContainer, RunLabels};
use crate::store::{self, Claim, Lease, Outcome, StoredConsole};

/// What every execution shares.
#[derive(Clone)]
pub struct Executor {
    pub pool: PgPool,
    pub(crate) docker: DockerClient,
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    pub agent: String,
    pub lease: Duration,
    pub stop_grace: Duration,
    pub max_timeout: Duration,
    pub work_dir: PathBuf,
    pub secrets: Option<SecretBox>,
}

fn masked(masker: &Masker, lines: BytesMut) -> bytes::Bytes {
    if masker.is_empty() {
        lines.freeze()
    } else {
        bytes::Bytes::from(masker.mask(&lines))
    }
}

/// What an attempt holds and gives back at its end.
#[derive(Default)]
struct Held {
    container: Option<String>,
    network: Option<String>,
    /// The cluster lease's token and the task renewing it.
    cluster: Option<(i64, tokio::task::JoinHandle<()>)>,
}

/// Why the container was stopped before it ended on its own.
enum Stop {
    Exited(i64),
    TimedOut(Duration),
    Aborted,
    LeaseLost,
    Shutdown,
    Failed(String),
}

impl Executor {
    /// Runs the attempt to its end. `abort` is notified when the run's abort is requested; `hard_stop`
    /// is the agent's own shutdown.
    pub async fn execute(&self, claim: Claim, abort: Arc<Notify>, hard_stop: CancellationToken) {
        let span = tracing::info_span!("run", run_id = %claim.run, job = %claim.job, attempt = claim.attempt);
        self.execute_inner(claim, abort, hard_stop).instrument(span).await
    }

    async fn execute_inner(&self, claim: Claim, abort: Arc<Notify>, hard_stop: CancellationToken) {
        let started = Instant::now();
        tracing::info!("attempt started");
        let labels = RunLabels {
            agent: self.agent.clone(),
            job: claim.job.clone(),
            run: claim.run.to_string(),
            attempt: claim.attempt,
        };
        let log_path = self.work_dir.join(format!("{}-{}.log", claim.run, claim.attempt));
        let (console, pump) = console::start(self.pool.clone(), claim.clone(), log_path.clone());

        // The lease is renewed for as long as the attempt runs; losing it stops the container.
        let lost = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(
            self.pool.clone(),
            claim.clone(),
            self.agent.clone(),
            self.lease,
            abort.clone(),
            lost.clone(),
        ));

        let mut held = Held::default();
        let stop = self.run_container(&claim, &labels, &console, &abort, &hard_stop, &lost, &mut held).await;
        self.release_cluster(&mut held, &console).await;
        let lease_lost = matches!(stop, Stop::LeaseLost);
        let outcome = match stop {
            Stop::Exited(0) => Outcome { status: RunStatus::Succeeded, exit_code: Some(0), message: None },
            Stop::Exited(code) => Outcome {
                status: RunStatus::Failed,
                exit_code: Some(code),
                message: Some(format!("the script exited with code {code}")),
            },
            Stop::TimedOut(limit) => Outcome {
                status: RunStatus::TimedOut,
                exit_code: None,
                message: Some(format!("timed out after {}s", limit.as_secs())),
            },
            Stop::Aborted => Outcome { status: RunStatus::Aborted, exit_code: None, message: Some("aborted".into()) },
            Stop::Shutdown => Outcome {
                status: RunStatus::Aborted,
                exit_code: None,
                message: Some(format!("aborted: agent {} shut down before the run finished", self.agent)),
            },
            Stop::LeaseLost => Outcome {
                status: RunStatus::Error,
                exit_code: None,
                message: Some("this agent lost the run's lease".into()),
            },
            Stop::Failed(message) => Outcome { status: RunStatus::Error, exit_code: None, message: Some(message) },
        };
        console.note(&format!("run {} ({:.1}s)", outcome.status, started.elapsed().as_secs_f64())).await;
        drop(console);

        let stored = match pump.await {
            Ok(Ok(file)) => self.store_console(&claim, &file.path, file.bytes).await,
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot write the console log");
                None
            }
            Err(err) => {
                tracing::error!(error = %err, "console task failed");
                None
            }
        };
        let _ = tokio::fs::remove_file(&log_path).await;
        heartbeat.abort();

        if lease_lost {
            tracing::warn!("lease lost; leaving the run to its next attempt");
        } else {
            match store::finish(&self.pool, &claim, &self.agent, &outcome, stored.as_ref()).await {
                Ok(true) => {
                    tracing::info!(status = %outcome.status, exit_code = ?outcome.exit_code, "attempt finished")
                }
                Ok(false) => tracing::warn!("the attempt was taken over; its final status was not written"),
                Err(err) => {
                    tracing::error!(error = %err, "cannot record the final status; the reaper will retry the run")
                }
            }
        }
        // The container has stopped and the result is recorded; removing the container and network
        // (a few hundred ms of engine work) does not hold up the run's status. A crash here leaves
        // labelled leftovers that the next start of this agent sweeps.
        self.docker.remove(held.container.as_deref(), held.network.as_deref()).await;
    }

    /// Decrypts the secrets the job names into `env`; a missing one fails the run before it starts.
    async fn open_secrets(&self, claim: &Claim, names: &[EnvName], env: &mut Vec<String>) -> Result<Masker, String> {
        if names.is_empty() {
            return Ok(Masker::default());
        }
        let secrets = self
            .secrets
            .as_ref()
            .ok_or_else(|| "the job uses secrets, but this agent has no CIMASTER_SECRETS_KEY".to_owned())?;
        let wanted: Vec<String> = names.iter().map(ToString::to_string).collect();
        let sealed = store::sealed_secrets(&self.pool, &claim.job, &wanted)
            .await
            .map_err(|err| format!("cannot read the job's secrets: {err}"))?;
        let mut values = Vec::new();
        for name in &wanted {
            let (_, nonce, ciphertext) = sealed.iter().find(|(stored, _, _)| stored == name).ok_or_else(|| {
                format!(
                    "secret `{name}` is not set for job `{job}`; set it with PUT /jobs/{job}/secrets/{name}",
                    job = claim.job
                )
            })?;
            let value = secrets
                .open(&format!("{}/{name}", claim.job), nonce, ciphertext)
                .map_err(|err| format!("secret `{name}`: {err}"))?;
            env.push(format!("{name}={}", value.expose_secret()));
            values.push(value);
        }
        Ok(Masker::new(values.iter().map(|value| value.expose_secret())))
    }

    /// Leases a test cluster for the attempt, waiting while none is vacant (the run's message says
    /// so). `Err` ends the attempt with that stop.
    async fn lease_cluster(
        &self,
        claim: &Claim,
        requirement: &ClusterRequirement,
        console: &ConsoleTx,
        interrupted: &mut (impl std::future::Future<Output = Stop> + Unpin),
    ) -> Result<ClusterView, Stop> {
        let started = std::time::Instant::now();
        let mut request = AcquireRequest {
            purpose: requirement.purpose.clone(),
            osimage: requirement.osimage.clone(),
            job: format!("run:{}", claim.run),
            build: claim.attempt.to_string(),
            holder: self.agent.clone(),
            run: Some(claim.run.0),
            ttl: self.lease,
            waited: Duration::ZERO,
            priority: 0,
            waiter: None,
        };
        let mut waiting = false;
        loop {
            request.waited = started.elapsed();
            match pool::acquire(&self.pool, &request).await {
                Ok(Some(lease)) => {
                    if let Some(waiter) = request.waiter {
                        let _ = pool::dequeue(&self.pool, waiter).await;
                    }
                    if waiting {
                        let _ = store::set_message(&self.pool, claim, None).await;
                    }
                    return pool::get(&self.pool, &lease.cluster).await.map_err(|err| Stop::Failed(err.to_string()));
                }
                Ok(None) => {
                    if !waiting {
                        waiting = true;
                        let note = format!("waiting for a test cluster with purpose `{}`", requirement.purpose);
                        console.note(&note).await;
                        let _ = store::set_message(&self.pool, claim, Some(&note)).await;
                    }
                    // Keep (or take) this attempt's place in the queue.
                    match request.waiter {
                        Some(waiter) => {
                            let _ = pool::touch(&self.pool, waiter, self.lease).await;
                        }
                        None => request.waiter = pool::enqueue(&self.pool, &request, self.lease).await.ok(),
                    }
                }
                Err(PoolError::Invalid(message)) => return Err(Stop::Failed(message)),
                Err(err) => tracing::warn!(error = %err, "cannot lease a cluster yet"),
            }
            tokio::select! {
                stop = &mut *interrupted => {
                    if let Some(waiter) = request.waiter {
                        let _ = pool::dequeue(&self.pool, waiter).await;
                    }
                    return Err(stop);
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Gives the attempt's cluster back to the pool (its lease would expire anyway if this agent died).
    async fn release_cluster(&self, held: &mut Held, console: &ConsoleTx) {
        let Some((token, heartbeat)) = held.cluster.take() else { return };
        heartbeat.abort();
        match pool::release(&self.pool, pool::Release::Token(token), ReleaseOutcome::Ok, &self.agent, 3).await {
            Ok(cluster) => console.note(&format!("released cluster {}", cluster.name)).await,
            Err(err) => tracing::warn!(error = %err, "cannot release the cluster; its lease will expire"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        claim: &Claim,
        labels: &RunLabels,
        console: &ConsoleTx,
        abort: &Notify,
        hard_stop: &CancellationToken,
        lost: &CancellationToken,
        held: &mut Held,
    ) -> Stop {
        let JobSpec::Freestyle(job) = &claim.spec else {
            return Stop::Failed(
                "git jobs need the repository checkout, which this agent version does not perform".into(),
            );
        };
        let timeout = Duration::from_secs(u64::from(job.timeout_seconds)).min(self.max_timeout);
        let aborted = abort.notified();
        tokio::pin!(aborted);

        let mut env: Vec<String> = job.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let masker = match self.open_secrets(claim, &job.secrets, &mut env).await {
            Ok(masker) => masker,
            Err(message) => {
                console.note(&message).await;
                return Stop::Failed(message);
            }
        };
        if let Some(requirement) = &job.cluster {
            let mut interrupted = Box::pin(async {
                tokio::select! {
                    _ = &mut aborted => Stop::Aborted,
                    _ = lost.cancelled() => Stop::LeaseLost,
                    _ = hard_stop.cancelled() => Stop::Shutdown,
                }
            });
            let cluster = match self.lease_cluster(claim, requirement, console, &mut interrupted).await {
                Ok(cluster) => cluster,
                Err(stop) => return stop,
            };
            drop(interrupted);
            let Some(lease) = cluster.lease.clone() else {
                return Stop::Failed(format!("cluster {} lost its lease at once", cluster.name));
            };
            console.note(&format!("leased cluster {} ({}) for this run", cluster.name, cluster.region)).await;
            env.push(format!("CIMASTER_CLUSTER={}", cluster.name));
            env.push(format!("CIMASTER_CLUSTER_REGION={}", cluster.region));
            env.push(format!("CIMASTER_CLUSTER_LABELS={}", serde_json::to_string(&cluster.labels).unwrap_or_default()));
            let heartbeat = {
                let (pool, ttl) = (self.pool.clone(), self.lease);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        if let Err(err) = pool::heartbeat(&pool, lease.token, ttl).await {
                            tracing::warn!(error = %err, "cannot renew the cluster lease");
                        }
                    }
                })
            };
            held.cluster = Some((lease.token, heartbeat));
        }

        console.note(&format!("agent {} runs attempt {} in {}", self.agent, claim.attempt, job.image)).await;
        if let Err(err) = self.docker.ensure_image(&job.image).await {
            console.note(&err.to_string()).await;
            return Stop::Failed(err.to_string());
        }
        match self.docker.create_network(labels).await {
            Ok(name) => held.network = Some(name),
            Err(err) => return Stop::Failed(err.to_string()),
        }
        env.extend(claim.parameters.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("CIMASTER_RUN_ID={}", claim.run));
        env.push(format!("CIMASTER_JOB={}", claim.job));
        env.push(format!("CIMASTER_ATTEMPT={}", claim.attempt));
        let spec = JobContainer {
            image: job.image.clone(),
            script: job.script.to_shell(),
            env,
            working_dir: job.working_dir.clone(),
            nano_cpus: (job.resources.cpus * 1e9) as i64,
            memory_bytes: i64::try_from(job.resources.memory.bytes()).unwrap_or(i64::MAX),
            network: held.network.clone().unwrap_or_default(),
        };
        let (id, mut output) = match self.docker.start_job(labels, spec).await {
            Ok(started) => started,
            Err(err) => return Stop::Failed(err.to_string()),
        };
        held.container = Some(id.clone());
        {
            let (pool, claim) = (self.pool.clone(), claim.clone());
            tokio::spawn(async move {
                if let Err(err) = store::container_started(&pool, &claim).await {
                    tracing::warn!(error = %err, "cannot record the container start");
                }
            });
        }
        let mut logs = {
            let console = console.clone();
            tokio::spawn(async move {
                let mut stamper = Timestamper::default();
                let mut lines = BytesMut::new();
                while let Some(chunk) = output.next().await {
                    match chunk {
                        Ok(Chunk::Stdout(data)) => stamper.push(0, &data, &mut lines),
                        Ok(Chunk::Stderr(data)) => stamper.push(1, &data, &mut lines),
                        Err(err) => {
                            console.note(&format!("console stream interrupted: {err}")).await;
                            break;
                        }
                    }
                    // Lines are complete here, so a secret written in pieces is whole again.
                    if !lines.is_empty() {
                        console.send(masked(&masker, lines.split())).await;
                    }
                }
                stamper.finish(&mut lines);
                if !lines.is_empty() {
                    console.send(masked(&masker, lines)).await;
                }
            })
        };

        let stop = tokio::select! {
            exit = self.docker.wait(&id) => match exit {
                Ok(code) => Stop::Exited(code),
                Err(err) => Stop::Failed(err.to_string()),
            },
            _ = tokio::time::sleep(timeout) => Stop::TimedOut(timeout),
            _ = &mut aborted => Stop::Aborted,
            _ = lost.cancelled() => Stop::LeaseLost,
            _ = hard_stop.cancelled() => Stop::Shutdown,
        };
        if !matches!(stop, Stop::Exited(_)) {
            let why = match &stop {
                Stop::TimedOut(limit) => format!("timed out after {}s", limit.as_secs()),
                Stop::Aborted => "abort requested".into(),
                Stop::LeaseLost => "lease lost".into(),
                Stop::Shutdown => "agent shutting down".into(),
                _ => "stopping".into(),
            };
            console.note(&format!("{why}: sending SIGTERM, SIGKILL after {}s", self.stop_grace.as_secs())).await;
            if let Err(err) = self.docker.stop(&id, self.stop_grace).await {
                tracing::warn!(error = %err, "cannot stop the job container");
            }
        }
        // The output stream ends when the container stops; bound the wait in case the engine hangs.
        if tokio::time::timeout(Duration::from_secs(30), &mut logs).await.is_err() {
            logs.abort();
            console.note("the container's output did not end with it; the log may be incomplete").await;
        }
        stop
    }

    async fn store_console(&self, claim: &Claim, path: &std::path::Path, bytes: u64) -> Option<StoredConsole> {
        let key = console_key(claim.run, claim.attempt);
        match console::upload(&self.s3, &self.bucket, &key, path).await {
            Ok(()) => Some(StoredConsole { key, bytes: bytes as i64 }),
            Err(err) => {
                tracing::error!(error = ?err, "cannot upload the console log; it stays readable from Postgres");
                None
            }
        }
    }
}

async fn heartbeat(
    pool: PgPool,
    claim: Claim,
    agent: String,
    lease: Duration,
    abort: Arc<Notify>,
    lost: CancellationToken,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        match store::renew(&pool, &claim, &agent, lease).await {
            Ok(Lease::Held { abort_requested: true }) => abort.notify_one(),
            Ok(Lease::Held { abort_requested: false }) => {}
            Ok(Lease::Lost) => {
                lost.cancel();
                return;
            }
            Err(err) => tracing::warn!(error = %err, "cannot renew the lease"),
        }
    }
}
