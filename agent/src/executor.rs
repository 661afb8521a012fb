//! Executes one claimed attempt: network, container, console, timeout, abort, lease, cleanup, and
//! the fenced final status.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cimaster_common::pool::{self, AcquireRequest, ClusterView, PoolError, ReleaseOutcome};
use cimaster_common::results::{JunitSummary, KIND_JUNIT, KIND_SERVICE_LOG};
use cimaster_common::secrets::{Masker, SecretBox};
use cimaster_common::storage::{console_key, result_key};
use cimaster_common::{BuildSpec, ClusterRequirement, EnvName, Readiness, Results, RunStatus};
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::archive;
use crate::console::{self, ConsoleTx, Timestamper};
use crate::docker::{Chunk, DockerClient, JobContainer, Output, RunLabels};
use crate::lease::{self, Fence, LeaseEnd, LeaseTiming, Renewal};
use crate::networks::{Networks, RunNetwork};
use crate::plan::{ImageSource, Plan, CHECKOUT_SCRIPT, WORKSPACE};
use crate::storage;
use crate::store::{self, Claim, Lease, Outcome, StoredConsole, StoredResult};

/// What every execution shares.
#[derive(Clone)]
pub struct Executor {
    pub pool: PgPool,
    /// For lease renewals only.
    pub leases: PgPool,
    pub(crate) docker: DockerClient,
    pub(crate) networks: Arc<Networks>,
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    pub agent: String,
    /// Lease, stop grace and when to fence (see `lease`).
    pub timing: LeaseTiming,
    pub max_timeout: Duration,
    pub work_dir: PathBuf,
    /// Image with git that checks out git runs.
    pub git_image: String,
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
    /// Every container of the attempt: checkout helper, services, the job.
    containers: Vec<String>,
    /// The finished checkout helper, whose workspace a `build` reads.
    checkout: Option<String>,
    /// Running sidecars: name, container and the task collecting their output.
    services: Vec<(String, String, tokio::task::JoinHandle<Vec<u8>>)>,
    network: Option<RunNetwork>,
    volume: Option<String>,
    /// The cluster lease's token and the task renewing it.
    cluster: Option<(i64, tokio::task::JoinHandle<()>)>,
}

/// Why the container was stopped before it ended on its own.
enum Stop {
    Exited(i64),
    TimedOut(Duration),
    Aborted,
    LeaseLost(LeaseEnd),
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

        // The lease is renewed for as long as the attempt runs; losing it, or failing to renew it
        // for the fence window, stops the container.
        let fence = Fence::default();
        let heartbeat = tokio::spawn(heartbeat(
            self.leases.clone(),
            claim.clone(),
            self.agent.clone(),
            self.timing,
            abort.clone(),
            fence.clone(),
        ));

        let mut held = Held::default();
        let stop = self.run_container(&claim, &labels, &console, &abort, &hard_stop, &fence, &mut held).await;
        let lease_lost = matches!(stop, Stop::LeaseLost(_));
        if lease_lost {
            // The run may be someone else's already: nothing of this attempt may go on.
            self.remove_containers(&mut held).await;
        }
        self.release_cluster(&mut held, &console).await;
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
            Stop::LeaseLost(why) => {
                Outcome { status: RunStatus::Error, exit_code: None, message: Some(why.to_string()) }
            }
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

        if lease_lost {
            tracing::warn!(outcome = outcome.message.as_deref(), "leaving the run to its next attempt");
        } else {
            // The lease is still renewed while the status is written, so a short Postgres outage here
            // delays the status instead of losing it.
            self.finish(&claim, &outcome, stored.as_ref(), &fence).await;
        }
        heartbeat.abort();
        // The container has stopped and the result is recorded; removing the containers and volume
        // and giving the network back do not hold up the run's status. A crash here leaves labelled
        // leftovers that the next start of this agent sweeps.
        self.remove_containers(&mut held).await;
        if let Some(volume) = &held.volume {
            self.docker.remove_volume(volume).await;
        }
        if let Some(network) = held.network.take() {
            self.networks.give_back(network).await;
        }
    }

    /// Writes the final status, retrying while the run's lease holds (a fenced attempt writes nothing).
    async fn finish(&self, claim: &Claim, outcome: &Outcome, console: Option<&StoredConsole>, fence: &Fence) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = tokio::time::timeout(
                self.timing.renew_every(),
                store::finish(&self.pool, claim, &self.agent, outcome, console),
            );
            let error = match attempt.await {
                Ok(Ok(true)) => {
                    return tracing::info!(status = %outcome.status, exit_code = ?outcome.exit_code, "attempt finished")
                }
                Ok(Ok(false)) => return tracing::warn!("the attempt was taken over; its final status was not written"),
                Ok(Err(err)) => err.to_string(),
                Err(_) => "Postgres did not answer in time".to_owned(),
            };
            tracing::warn!(error, retry_in = ?backoff, "cannot record the final status yet");
            tokio::select! {
                why = fence.tripped() => {
                    return tracing::error!(%why, "the final status was not recorded; the reaper retries the run");
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Removes the attempt's containers (stopped or not) at once.
    async fn remove_containers(&self, held: &mut Held) {
        for (_, _, pump) in held.services.drain(..) {
            pump.abort();
        }
        for id in held.containers.drain(..).rev() {
            self.docker.remove_container(&id).await;
        }
    }

    /// Decrypts the named secrets; a missing one fails the run before it starts. The masker hides
    /// every value (and its base64 form) in all output of the attempt.
    async fn open_secrets(
        &self,
        claim: &Claim,
        names: &[EnvName],
    ) -> Result<(Masker, HashMap<String, SecretString>), String> {
        if names.is_empty() {
            return Ok((Masker::default(), HashMap::new()));
        }
        let secrets = self
            .secrets
            .as_ref()
            .ok_or_else(|| "the job uses secrets, but this agent has no CIMASTER_SECRETS_KEY".to_owned())?;
        let wanted: Vec<String> = names.iter().map(ToString::to_string).collect();
        let sealed = store::sealed_secrets(&self.pool, &claim.job, &wanted)
            .await
            .map_err(|err| format!("cannot read the job's secrets: {err}"))?;
        let mut values = HashMap::new();
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
            values.insert(name.clone(), value);
        }
        let masker = Masker::new(values.values().map(|value| value.expose_secret()));
        Ok((masker, values))
    }

    /// Leases a test cluster for the attempt, waiting while none is vacant (the run's message says
    /// so). `Err` ends the attempt with that stop.
    async fn lease_cluster(
        &self,
        claim: &Claim,
        requirement: &ClusterRequirement,
        console: &ConsoleTx,
        interrupted: &mut (impl std::future::Future<Output = Stop> + Unpin),
    ) -> Result<(ClusterView, tokio::time::Instant), Stop> {
        let started = std::time::Instant::now();
        let mut request = AcquireRequest {
            purpose: requirement.purpose.clone(),
            osimage: requirement.osimage.clone(),
            job: format!("run:{}", claim.run),
            build: claim.attempt.to_string(),
            holder: self.agent.clone(),
            run: Some(claim.run.0),
            ttl: self.timing.lease(),
            waited: Duration::ZERO,
            priority: 0,
            waiter: None,
        };
        let mut waiting = false;
        loop {
            request.waited = started.elapsed();
            let granted = tokio::time::Instant::now();
            match pool::acquire(&self.pool, &request).await {
                Ok(Some(lease)) => {
                    if let Some(waiter) = request.waiter {
                        let _ = pool::dequeue(&self.pool, waiter).await;
                    }
                    if waiting {
                        let _ = store::set_message(&self.pool, claim, None).await;
                    }
                    let cluster =
                        pool::get(&self.pool, &lease.cluster).await.map_err(|err| Stop::Failed(err.to_string()))?;
                    return Ok((cluster, granted));
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
                            let _ = pool::touch(&self.pool, waiter, self.timing.lease()).await;
                        }
                        None => request.waiter = pool::enqueue(&self.pool, &request, self.timing.lease()).await.ok(),
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
        let release = pool::release(&self.pool, pool::Release::Token(token), ReleaseOutcome::Ok, &self.agent, 3);
        match tokio::time::timeout(self.timing.renew_every(), release).await {
            Ok(Ok(cluster)) => console.note(&format!("released cluster {}", cluster.name)).await,
            Ok(Err(err)) => tracing::warn!(error = %err, "cannot release the cluster; its lease will expire"),
            Err(_) => tracing::warn!("releasing the cluster did not answer in time; its lease will expire"),
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
        fence: &Fence,
        held: &mut Held,
    ) -> Stop {
        let plan = match Plan::of(claim) {
            Ok(plan) => plan,
            Err(message) => {
                console.note(&message).await;
                return Stop::Failed(message);
            }
        };
        // The timeout covers the whole attempt: checkout, image build, services and the script.
        let timeout = Duration::from_secs(u64::from(plan.timeout_seconds)).min(self.max_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let aborted = abort.notified();
        tokio::pin!(aborted);
        // Awaits a preparation step unless the attempt is stopped first.
        macro_rules! interruptible {
            ($step:expr) => {
                tokio::select! {
                    value = $step => value,
                    _ = &mut aborted => return Stop::Aborted,
                    why = fence.tripped() => return Stop::LeaseLost(why),
                    _ = hard_stop.cancelled() => return Stop::Shutdown,
                    _ = tokio::time::sleep_until(deadline) => return Stop::TimedOut(timeout),
                }
            };
        }
        // Ends the attempt with an error the console shows too.
        macro_rules! fail {
            ($message:expr) => {{
                let message: String = $message;
                console.note(&message).await;
                return Stop::Failed(message);
            }};
        }

        let mut env: Vec<String> = plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut names = plan.secrets.clone();
        if let Some(checkout) = &plan.checkout {
            names.extend(checkout.token_secret.iter().chain(&checkout.ssh_key_secret).cloned());
        }
        let (masker, mut values) = match self.open_secrets(claim, &names).await {
            Ok(opened) => opened,
            Err(message) => fail!(message),
        };
        for name in &plan.secrets {
            if let Some(value) = values.get(name.as_str()) {
                env.push(format!("{name}={}", value.expose_secret()));
            }
        }
        if let Some(requirement) = &plan.cluster {
            let mut interrupted = Box::pin(async {
                tokio::select! {
                    _ = &mut aborted => Stop::Aborted,
                    why = fence.tripped() => Stop::LeaseLost(why),
                    _ = hard_stop.cancelled() => Stop::Shutdown,
                }
            });
            let (cluster, granted) = match self.lease_cluster(claim, requirement, console, &mut interrupted).await {
                Ok(leased) => leased,
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
            // A cluster whose lease cannot be renewed stops the attempt before the pool can hand it on.
            let heartbeat = {
                let (pool, timing, token) = (self.leases.clone(), self.timing, lease.token);
                let renew = move || {
                    let pool = pool.clone();
                    async move {
                        match pool::heartbeat(&pool, token, timing.lease()).await {
                            Ok(_) => Ok(Renewal::Held),
                            Err(PoolError::Conflict(_) | PoolError::NotFound(_)) => Ok(Renewal::Lost),
                            Err(err) => Err(err),
                        }
                    }
                };
                tokio::spawn(lease::keep("cluster", timing, granted, renew, fence.clone()))
            };
            held.cluster = Some((lease.token, heartbeat));
        }

        let network = match interruptible!(self.networks.take(labels)) {
            Ok(network) => held.network.insert(network).name.clone(),
            Err(err) => fail!(err.to_string()),
        };

        // A git run's workspace: the repository at the run's commit, cloned by the helper image.
        if let Some(checkout) = &plan.checkout {
            let volume = match interruptible!(self.docker.create_volume(labels)) {
                Ok(volume) => volume,
                Err(err) => fail!(err.to_string()),
            };
            held.volume = Some(volume.clone());
            console.note(&format!("checking out {} at {}", checkout.repository, checkout.commit)).await;
            if let Err(err) = interruptible!(self.docker.ensure_image(&self.git_image)) {
                fail!(format!("the checkout image is missing: {err}"));
            }
            let mut checkout_env = vec![
                format!("CIMASTER_GIT_REPOSITORY={}", checkout.repository),
                format!("CIMASTER_GIT_COMMIT={}", checkout.commit),
            ];
            if let Some(token) = checkout.token_secret.as_ref().and_then(|name| values.remove(name.as_str())) {
                checkout_env.push(format!("CIMASTER_GIT_TOKEN={}", token.expose_secret()));
            }
            if let Some(key) = checkout.ssh_key_secret.as_ref().and_then(|name| values.remove(name.as_str())) {
                checkout_env.push(format!("CIMASTER_GIT_SSH_KEY={}", key.expose_secret()));
            }
            if let Some(lines) = &checkout.ssh_known_hosts {
                checkout_env.push(format!("CIMASTER_GIT_KNOWN_HOSTS={lines}"));
            }
            let helper = JobContainer {
                role: "checkout".into(),
                image: self.git_image.clone(),
                script: Some(CHECKOUT_SCRIPT.to_owned()),
                env: checkout_env,
                network: network.clone(),
                workspace: Some(volume),
                ..Default::default()
            };
            let (id, output) = match interruptible!(self.docker.start_job(labels, helper)) {
                Ok(started) => started,
                Err(err) => fail!(err.to_string()),
            };
            held.containers.push(id.clone());
            let pump = pump_to_console(output, masker.clone(), console.clone());
            let exit = interruptible!(self.docker.wait(&id));
            let _ = tokio::time::timeout(Duration::from_secs(10), pump).await;
            match exit {
                Ok(0) => {}
                Ok(code) => fail!(format!("the checkout of {} failed (git exited with {code})", checkout.commit)),
                Err(err) => fail!(err.to_string()),
            }
            held.checkout = Some(id);
        }

        let image = match &plan.image {
            ImageSource::Image(image) => {
                if let Err(err) = interruptible!(self.docker.ensure_image(image)) {
                    fail!(err.to_string());
                }
                image.clone()
            }
            ImageSource::Build(build) => match interruptible!(self.build_image(claim, build, held, console)) {
                Ok(tag) => tag,
                Err(message) => fail!(message),
            },
        };

        for (name, service) in &plan.services {
            console.note(&format!("starting service {name} ({})", service.image)).await;
            if let Err(err) = interruptible!(self.docker.ensure_image(&service.image)) {
                fail!(format!("service `{name}`: {err}"));
            }
            let spec = JobContainer {
                role: format!("svc-{name}"),
                image: service.image.clone(),
                script: service.command.clone(),
                env: service.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                network: network.clone(),
                aliases: vec![name.to_string()],
                ..Default::default()
            };
            let (id, output) = match interruptible!(self.docker.start_job(labels, spec)) {
                Ok(started) => started,
                Err(err) => fail!(format!("service `{name}`: {err}")),
            };
            held.containers.push(id.clone());
            held.services.push((name.to_string(), id, pump_to_memory(output, masker.clone())));
        }
        // TCP and HTTP checks run from a probe container on the run's network, the way the job will
        // reach the services, wherever the agent itself runs.
        let needs_probe =
            plan.services.values().filter_map(|s| s.ready.as_ref()).any(|r| r.tcp.is_some() || r.http.is_some());
        let probe = if needs_probe {
            let spec = JobContainer {
                role: "probe".into(),
                image: self.git_image.clone(),
                script: Some("exec sleep infinity".into()),
                network: network.clone(),
                ..Default::default()
            };
            if let Err(err) = interruptible!(self.docker.ensure_image(&self.git_image)) {
                fail!(format!("the probe image for readiness checks is missing: {err}"));
            }
            match interruptible!(self.docker.start_job(labels, spec)) {
                Ok((id, _)) => {
                    held.containers.push(id.clone());
                    Some(id)
                }
                Err(err) => fail!(format!("cannot start the readiness probe: {err}")),
            }
        } else {
            None
        };
        for (name, service) in &plan.services {
            let Some(ready) = &service.ready else { continue };
            let id = held.services.iter().find(|(n, _, _)| n == name.as_str()).map(|(_, id, _)| id.clone());
            let Some(id) = id else { continue };
            match interruptible!(self.wait_ready(name.as_str(), &id, probe.as_deref(), ready)) {
                Ok(waited) => console.note(&format!("service {name} is ready ({:.1}s)", waited.as_secs_f64())).await,
                Err(message) => fail!(message),
            }
        }

        console.note(&format!("agent {} runs attempt {} in {image}", self.agent, claim.attempt)).await;
        env.extend(claim.parameters.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("CIMASTER_RUN_ID={}", claim.run));
        env.push(format!("CIMASTER_JOB={}", claim.job));
        env.push(format!("CIMASTER_ATTEMPT={}", claim.attempt));
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
            network: network.clone(),
            aliases: Vec::new(),
            workspace: held.volume.clone(),
        };
        let (id, output) = match self.docker.start_job(labels, spec).await {
            Ok(started) => started,
            Err(err) => return Stop::Failed(err.to_string()),
        };
        held.containers.push(id.clone());
        {
            let (pool, claim) = (self.pool.clone(), claim.clone());
            tokio::spawn(async move {
                if let Err(err) = store::container_started(&pool, &claim).await {
                    tracing::warn!(error = %err, "cannot record the container start");
                }
            });
        }
        let mut logs = pump_to_console(output, masker.clone(), console.clone());

        let stop = tokio::select! {
            exit = self.docker.wait(&id) => match exit {
                Ok(code) => Stop::Exited(code),
                Err(err) => Stop::Failed(err.to_string()),
            },
            _ = tokio::time::sleep_until(deadline) => Stop::TimedOut(timeout),
            _ = &mut aborted => Stop::Aborted,
            why = fence.tripped() => Stop::LeaseLost(why),
            _ = hard_stop.cancelled() => Stop::Shutdown,
        };
        if !matches!(stop, Stop::Exited(_)) {
            let why = match &stop {
                Stop::TimedOut(limit) => format!("timed out after {}s", limit.as_secs()),
                Stop::Aborted => "abort requested".into(),
                Stop::LeaseLost(why) => why.to_string(),
                Stop::Shutdown => "agent shutting down".into(),
                _ => "stopping".into(),
            };
            let grace = self.timing.stop_grace();
            // Stopped first, told after: the note must not delay the stop (the fence counts on it).
            let stopped = self.docker.stop(&id, grace).await;
            console.note(&format!("{why}: sent SIGTERM, SIGKILL after {}s", grace.as_secs_f64())).await;
            if let Err(err) = stopped {
                tracing::warn!(error = %err, "cannot stop the job container");
            }
        }
        // The output stream ends when the container stops; bound the wait in case the engine hangs.
        if tokio::time::timeout(Duration::from_secs(30), &mut logs).await.is_err() {
            logs.abort();
            console.note("the container's output did not end with it; the log may be incomplete").await;
        }
        if !matches!(stop, Stop::LeaseLost(_)) {
            if !plan.results.is_empty() {
                self.collect_results(claim, &id, &plan.results, console).await;
            }
            self.keep_service_logs(claim, held, console).await;
        }
        stop
    }

    /// Builds the run's image from the repository's Dockerfile, or reuses the image an earlier run
    /// built from the same Dockerfile and context (tagged with the context's digest).
    async fn build_image(
        &self,
        claim: &Claim,
        build: &BuildSpec,
        held: &Held,
        console: &ConsoleTx,
    ) -> Result<String, String> {
        let Some(helper) = &held.checkout else { return Err("`build` needs the repository's checkout".into()) };
        let archive = self.docker.download(helper, WORKSPACE);
        let reader = tokio_util::io::StreamReader::new(archive.map(|chunk| chunk.map_err(std::io::Error::other)));
        let (context, dockerfile) = (build.context.clone(), build.dockerfile.clone());
        let built = tokio::task::spawn_blocking(move || {
            archive::build_context(tokio_util::io::SyncIoBridge::new(reader), &context, &dockerfile)
        })
        .await
        .map_err(|err| format!("reading the build context failed: {err}"))??;
        let tag = format!("cimaster-build:{}", &built.digest[..32]);
        if self.docker.image_exists(&tag).await {
            console.note(&format!("reusing image {tag}: the Dockerfile and its context are unchanged")).await;
            return Ok(tag);
        }
        console.note(&format!("building {} (context `{}`) as {tag}", build.dockerfile, build.context)).await;
        let labels = std::collections::HashMap::from([
            ("cimaster.job".to_owned(), claim.job.clone()),
            ("cimaster.context-digest".to_owned(), built.digest.clone()),
        ]);
        let (lines, mut printed) = tokio::sync::mpsc::unbounded_channel::<String>();
        let printer = {
            let console = console.clone();
            tokio::spawn(async move {
                while let Some(line) = printed.recv().await {
                    console.note(&line).await;
                }
            })
        };
        let result = self
            .docker
            .build_image(bytes::Bytes::from(built.tar), &built.dockerfile, &tag, labels, |line| {
                let _ = lines.send(line);
            })
            .await;
        drop(lines);
        let _ = printer.await;
        result.map(|()| tag).map_err(|err| err.to_string())
    }

    /// Polls a service's readiness check until it passes, the service exits, or the check's timeout.
    async fn wait_ready(
        &self,
        name: &str,
        id: &str,
        probe: Option<&str>,
        ready: &Readiness,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let limit = Duration::from_secs(u64::from(ready.timeout_seconds));
        loop {
            if let Some(code) = self.docker.exited(id).await {
                return Err(format!("service `{name}` exited with code {code} before it was ready"));
            }
            let (container, cmd, env, what) = match (&ready.command, &ready.tcp, &ready.http, probe) {
                (Some(command), _, _, _) => {
                    (id, vec!["sh".into(), "-c".into(), command.clone()], Vec::new(), format!("`{command}`"))
                }
                (None, Some(port), _, Some(probe)) => (
                    probe,
                    bash(PROBE_TCP),
                    vec![format!("PROBE_HOST={name}"), format!("PROBE_PORT={port}")],
                    format!("tcp {name}:{port}"),
                ),
                (None, None, Some(http), Some(probe)) => (
                    probe,
                    bash(PROBE_HTTP),
                    vec![
                        format!("PROBE_HOST={name}"),
                        format!("PROBE_PORT={}", http.port),
                        format!("PROBE_PATH={}", http.path),
                    ],
                    format!("GET http://{name}:{}{}", http.port, http.path),
                ),
                _ => return Ok(started.elapsed()),
            };
            let outcome = match self.docker.exec(container, cmd, env).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("{what} failed (exit {code})")),
                Err(err) => Err(format!("{what}: {err}")),
            };
            let last = match outcome {
                Ok(()) => return Ok(started.elapsed()),
                Err(why) => why,
            };
            if started.elapsed() >= limit {
                return Err(format!("service `{name}` was not ready after {}s (last check: {last})", limit.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Copies the result files out of the (stopped) job container into S3 and records them.
    async fn collect_results(&self, claim: &Claim, container: &str, results: &Results, console: &ConsoleTx) {
        let (junit, artifacts) = match (archive::globs(&results.junit), archive::globs(&results.artifacts)) {
            (Ok(junit), Ok(artifacts)) => (junit, artifacts),
            (Err(err), _) | (_, Err(err)) => return console.note(&err).await,
        };
        let dir = self.work_dir.join(format!("{}-{}-results", claim.run, claim.attempt));
        if let Err(err) = tokio::fs::create_dir_all(&dir).await {
            return console.note(&format!("cannot collect results: {err}")).await;
        }
        let archive = self.docker.download(container, WORKSPACE);
        let reader = tokio_util::io::StreamReader::new(archive.map(|chunk| chunk.map_err(std::io::Error::other)));
        let selected = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                let mut skipped = Vec::new();
                let bridge = tokio_util::io::SyncIoBridge::new(reader);
                archive::select_results(bridge, &junit, &artifacts, &dir, &mut skipped).map(|found| (found, skipped))
            })
            .await
        };
        self.store_results(claim, selected, console).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }

    async fn store_results(
        &self,
        claim: &Claim,
        selected: Result<Result<Selected, String>, tokio::task::JoinError>,
        console: &ConsoleTx,
    ) {
        let (found, skipped) = match selected {
            Ok(Ok(selected)) => selected,
            Ok(Err(message)) => return console.note(&format!("cannot collect results: {message}")).await,
            Err(err) => return console.note(&format!("cannot collect results: {err}")).await,
        };
        for why in skipped {
            console.note(&format!("result skipped: {why}")).await;
        }
        let mut stored = Vec::new();
        for file in found {
            let summary = if file.kind == KIND_JUNIT {
                let read = match tokio::fs::read(&file.path).await {
                    Ok(xml) => JunitSummary::parse(&xml),
                    Err(err) => Err(err.to_string()),
                };
                match read {
                    Ok(summary) => serde_json::to_value(summary).ok(),
                    Err(why) => {
                        console.note(&format!("{} is not a readable JUnit report: {why}", file.name)).await;
                        None
                    }
                }
            } else {
                None
            };
            let content_type = archive::content_type(&file.name);
            match self
                .put_result(claim, file.kind, &file.name, content_type, ResultBody::File(&file.path, file.size))
                .await
            {
                Ok(mut result) => {
                    result.summary = summary;
                    stored.push(result);
                }
                Err(err) => console.note(&format!("cannot store result {}: {err}", file.name)).await,
            }
        }
        let names: Vec<String> = stored.iter().map(|r| format!("{} ({})", r.name, r.kind)).collect();
        console
            .note(&if names.is_empty() {
                "no result files matched the `results` patterns".to_owned()
            } else {
                format!("collected results: {}", names.join(", "))
            })
            .await;
        if let Err(err) = store::record_results(&self.pool, claim, &self.agent, &stored).await {
            tracing::error!(error = %err, "cannot record the run's results");
        }
    }

    /// Stops the sidecars (at once: their work is done) and keeps each one's (masked) output as a
    /// result.
    async fn keep_service_logs(&self, claim: &Claim, held: &mut Held, console: &ConsoleTx) {
        let services: Vec<_> = held.services.drain(..).collect();
        futures::future::join_all(services.iter().map(|(name, id, _)| async move {
            if let Err(err) = self.docker.stop(id, Duration::ZERO).await {
                tracing::warn!(error = %err, service = name, "cannot stop the service");
            }
        }))
        .await;
        let mut stored = Vec::new();
        for (name, _, pump) in services {
            let log = match tokio::time::timeout(Duration::from_secs(10), pump).await {
                Ok(Ok(log)) => log,
                _ => continue,
            };
            match self
                .put_result(
                    claim,
                    KIND_SERVICE_LOG,
                    &format!("{name}.log"),
                    "text/plain; charset=utf-8",
                    ResultBody::Bytes(log),
                )
                .await
            {
                Ok(result) => stored.push(result),
                Err(err) => console.note(&format!("cannot store the log of service {name}: {err}")).await,
            }
        }
        if let Err(err) = store::record_results(&self.pool, claim, &self.agent, &stored).await {
            tracing::error!(error = %err, "cannot record the service logs");
        }
    }

    async fn put_result(
        &self,
        claim: &Claim,
        kind: &'static str,
        name: &str,
        content_type: &str,
        body: ResultBody<'_>,
    ) -> Result<StoredResult, String> {
        let key = result_key(claim.run, claim.attempt, kind, name);
        let bytes = match body {
            ResultBody::Bytes(data) => {
                let bytes = data.len() as i64;
                self.s3
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .content_type(content_type)
                    .body(data.into())
                    .send()
                    .await
                    .map_err(|err| format!("{}", aws_sdk_s3::error::DisplayErrorContext(err)))?;
                bytes
            }
            ResultBody::File(path, size) => {
                storage::upload(&self.s3, &self.bucket, &key, path, content_type)
                    .await
                    .map_err(|err| format!("{err:#}"))?;
                size as i64
            }
        };
        Ok(StoredResult {
            kind,
            name: name.to_owned(),
            bytes,
            content_type: content_type.to_owned(),
            key,
            summary: None,
        })
    }

    async fn store_console(&self, claim: &Claim, path: &std::path::Path, bytes: u64) -> Option<StoredConsole> {
        let key = console_key(claim.run, claim.attempt);
        match storage::upload(&self.s3, &self.bucket, &key, path, "text/plain; charset=utf-8").await {
            Ok(()) => Some(StoredConsole { key, bytes: bytes as i64 }),
            Err(err) => {
                tracing::error!(error = ?err, "cannot upload the console log; it stays readable from Postgres");
                None
            }
        }
    }
}

/// Keeps the run's lease (see `lease`) and passes on an abort requested meanwhile.
async fn heartbeat(pool: PgPool, claim: Claim, agent: String, timing: LeaseTiming, abort: Arc<Notify>, fence: Fence) {
    let granted = claim.granted;
    let renew = move || {
        let (pool, claim, agent, abort) = (pool.clone(), claim.clone(), agent.clone(), abort.clone());
        async move {
            Ok::<_, sqlx::Error>(match store::renew(&pool, &claim, &agent, timing.lease()).await? {
                Lease::Held { abort_requested } => {
                    if abort_requested {
                        abort.notify_one();
                    }
                    Renewal::Held
                }
                Lease::Lost => Renewal::Lost,
            })
        }
    };
    lease::keep("run", timing, granted, renew, fence).await
}

/// Result files picked from the workspace, and why others were skipped.
type Selected = (Vec<archive::Found>, Vec<String>);

/// A result file's content: small ones in memory, collected files on disk.
enum ResultBody<'a> {
    Bytes(Vec<u8>),
    File(&'a std::path::Path, u64),
}

/// Streams a container's output into the console: timestamped lines, secrets masked.
/// Turns a container's output chunks into timestamped, masked lines. Lines are complete when they
/// come out, so a secret written in pieces is whole again before masking.
struct MaskedLines {
    output: Output,
    masker: Masker,
    stamper: Timestamper,
    lines: BytesMut,
    ended: bool,
}

impl MaskedLines {
    fn new(output: Output, masker: Masker) -> Self {
        Self { output, masker, stamper: Timestamper::default(), lines: BytesMut::new(), ended: false }
    }

    /// The next complete lines; `Err` once if the stream broke (the lines so far follow it); `None`
    /// at the end.
    async fn next(&mut self) -> Option<Result<bytes::Bytes, String>> {
        loop {
            if !self.lines.is_empty() {
                return Some(Ok(masked(&self.masker, self.lines.split())));
            }
            if self.ended {
                return None;
            }
            match self.output.next().await {
                Some(Ok(Chunk::Stdout(data))) => self.stamper.push(0, &data, &mut self.lines),
                Some(Ok(Chunk::Stderr(data))) => self.stamper.push(1, &data, &mut self.lines),
                Some(Err(err)) => {
                    self.ended = true;
                    self.stamper.finish(&mut self.lines);
                    return Some(Err(err.to_string()));
                }
                None => {
                    self.ended = true;
                    self.stamper.finish(&mut self.lines);
                }
            }
        }
    }
}

/// Streams a container's output into the console.
fn pump_to_console(output: Output, masker: Masker, console: ConsoleTx) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = MaskedLines::new(output, masker);
        while let Some(next) = lines.next().await {
            match next {
                Ok(data) => console.send(data).await,
                Err(err) => console.note(&format!("console stream interrupted: {err}")).await,
            }
        }
    })
}

/// Largest service log kept; later output is dropped with a note.
const MAX_SERVICE_LOG: usize = 16 << 20;

/// Collects a sidecar's output (timestamped, masked) until it stops.
fn pump_to_memory(output: Output, masker: Masker) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut lines = MaskedLines::new(output, masker);
        let mut log = Vec::new();
        while let Some(next) = lines.next().await {
            let Ok(data) = next else { continue };
            if log.len() <= MAX_SERVICE_LOG {
                log.extend_from_slice(&data);
                if log.len() > MAX_SERVICE_LOG {
                    log.extend_from_slice(b"\n[cimaster] the service log was cut at 16 MiB\n");
                }
            }
        }
        log
    })
}

/// Readiness checks run by bash in the probe container: a TCP connect, and an HTTP GET answered
/// 2xx or 3xx, each within 2 s. Host, port and path arrive in the environment.
const PROBE_TCP: &str = r#"exec 3<>"/dev/tcp/$PROBE_HOST/$PROBE_PORT""#;
const PROBE_HTTP: &str = r#"exec 3<>"/dev/tcp/$PROBE_HOST/$PROBE_PORT" || exit 1
printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$PROBE_PATH" "$PROBE_HOST" >&3
read -r _ code _ <&3
[ "$code" -ge 200 ] 2>/dev/null && [ "$code" -lt 400 ]"#;

fn bash(script: &str) -> Vec<String> {
    ["timeout", "2", "bash", "-c", script].iter().map(|part| (*part).to_owned()).collect()
}
