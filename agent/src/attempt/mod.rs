//! One claimed attempt, from its secrets to its fenced final status. Each phase has a file:
//!
//! - `secrets`: the job's secrets, decrypted, and the masker that hides them in all output;
//! - `cluster`: a test cluster leased for the run and kept while it runs;
//! - `id_token`: the run's OIDC ID token, signed when the attempt's own time starts, for a job that
//!   asks for one;
//! - `checkout`: a git run's workspace, made from the agent's mirror by the mirror's git helper;
//! - `image`: the job's image, present or built from the repository's Dockerfile;
//! - `services`: sidecars on the run's network, their readiness checks and their logs;
//! - `job`: the job container itself, started once the checkout is done and its image is there, and
//!   held at its gate while the services get ready, until it exits or is stopped;
//! - `results`: result files and the console log, stored in S3 and recorded;
//! - `cleanup`: the final status and removal of everything the attempt made.
//!
//! Every phase that waits goes through [`Interrupts::step`], so abort, timeout, a lost lease and
//! the agent's shutdown stop it the same way; [`Stop`] says how the attempt ended and maps to the
//! run's outcome in one place.

mod checkout;
mod cleanup;
mod cluster;
mod error;
mod id_token;
mod image;
mod job;
mod output;
mod results;
mod secrets;
mod services;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cimaster_common::secrets::{Masker, SecretBox};
use cimaster_common::RunStatus;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::console::{self, ConsoleTx};
use crate::docker::{DockerClient, RunLabels};
use crate::lease::{self, Fence, LeaseEnd, LeaseTiming, Renewal};
use crate::live::LiveCopy;
use crate::networks::{Networks, RunNetwork};
use crate::pending::{Parcel, Pending};
use crate::plan::{ImageSource, Plan};
use cimaster_store::attempts::{self, Claim, Lease, Outcome};

pub use error::AttemptError;

/// What every attempt on this agent shares.
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
    /// How much of a console is kept, and copied live.
    pub console_limits: crate::console::ConsoleLimits,
    pub work_dir: PathBuf,
    /// Image with git that checks out git runs (and probes services' readiness).
    pub git_image: String,
    /// Whether the agent set the egress rules on its engine: a job's `egress.allow` is then added
    /// for its runs.
    pub egress_rules: bool,
    /// Kills the attempts' containers if this agent cannot (see `crate::warden`).
    pub warden: Arc<crate::warden::Warden>,
    /// Git mirrors of the repositories this agent checked out.
    pub(crate) mirrors: Arc<crate::mirrors::Mirrors>,
    pub secrets: Option<SecretBox>,
    /// Output waiting for S3.
    pub pending: Pending,
}

/// Why an attempt ended.
#[derive(Debug)]
pub(crate) enum Stop {
    Exited(i64),
    TimedOut(Duration),
    Aborted,
    LeaseLost(LeaseEnd),
    Shutdown,
    Failed(AttemptError),
}

impl From<AttemptError> for Stop {
    fn from(error: AttemptError) -> Self {
        Stop::Failed(error)
    }
}

impl From<crate::docker::DockerError> for Stop {
    fn from(error: crate::docker::DockerError) -> Self {
        Stop::Failed(AttemptError::Docker(error))
    }
}

impl Stop {
    /// What the run records for this ending.
    fn outcome(&self, agent: &str) -> Outcome {
        let (status, exit_code, message) = match self {
            Stop::Exited(0) => (RunStatus::Succeeded, Some(0), None),
            Stop::Exited(code) => (RunStatus::Failed, Some(*code), Some(format!("the script exited with code {code}"))),
            Stop::TimedOut(limit) => (RunStatus::TimedOut, None, Some(format!("timed out after {}s", limit.as_secs()))),
            Stop::Aborted => (RunStatus::Aborted, None, Some("aborted".to_owned())),
            Stop::Shutdown => {
                (RunStatus::Aborted, None, Some(format!("aborted: agent {agent} shut down before the run finished")))
            }
            Stop::LeaseLost(why) => (RunStatus::Error, None, Some(why.to_string())),
            Stop::Failed(error) => (RunStatus::Error, None, Some(error.to_string())),
        };
        Outcome { status, exit_code, message }
    }

    /// Why a running container is being stopped, for the console.
    fn reason(&self) -> String {
        match self {
            Stop::TimedOut(limit) => format!("timed out after {}s", limit.as_secs()),
            Stop::Aborted => "abort requested".to_owned(),
            Stop::LeaseLost(why) => why.to_string(),
            Stop::Shutdown => "agent shutting down".to_owned(),
            Stop::Exited(_) | Stop::Failed(_) => "stopping".to_owned(),
        }
    }
}

/// Everything that can stop an attempt before its job ends on its own.
pub(crate) struct Interrupts {
    abort: CancellationToken,
    shutdown: CancellationToken,
    /// Trips when the run's lease is lost or cannot be renewed.
    fence: Fence,
    /// Trips when the test cluster's lease is lost or cannot be renewed.
    cluster: Fence,
    /// Set once the attempt's own time starts (after any wait for a test cluster).
    deadline: Option<(tokio::time::Instant, Duration)>,
}

impl Interrupts {
    /// Resolves with the first reason to stop.
    async fn stopped(&self) -> Stop {
        let timeout = async {
            match self.deadline {
                Some((at, limit)) => {
                    tokio::time::sleep_until(at).await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.abort.cancelled() => Stop::Aborted,
            why = self.fence.tripped() => Stop::LeaseLost(why),
            why = self.cluster.tripped() => Stop::LeaseLost(why),
            _ = self.shutdown.cancelled() => Stop::Shutdown,
            limit = timeout => Stop::TimedOut(limit),
        }
    }

    /// Awaits a step of the attempt unless the attempt is stopped first.
    async fn step<T>(&self, step: impl Future<Output = T>) -> Result<T, Stop> {
        tokio::select! {
            biased;
            stop = self.stopped() => Err(stop),
            value = step => Ok(value),
        }
    }
}

/// What an attempt holds and gives back at its end.
#[derive(Default)]
pub(crate) struct Held {
    /// Every container of the attempt: services, probe, the job.
    containers: Vec<String>,
    /// The job container while it is being created and started.
    starting: Option<job::Starting>,
    services: Vec<services::Running>,
    /// A container could not be removed: the network is not lent again.
    left_behind: bool,
    network: Option<RunNetwork>,
    /// The network's bridge and the ranges its job may reach, while the rules for them stand.
    allowed: Option<(String, Vec<cimaster_common::Cidr>)>,
    /// A git run's workspace; the mirror it is made from stays.
    workspace: Option<checkout::Workspace>,
    cluster: Option<cluster::Leased>,
}

/// One attempt in progress: what it was given and what it holds.
pub(crate) struct Attempt<'a> {
    executor: &'a Executor,
    claim: &'a Claim,
    labels: RunLabels,
    console: ConsoleTx,
    interrupts: Interrupts,
    /// Output of every container passes through it.
    masker: Masker,
    /// The job's environment, completed phase by phase.
    env: Vec<String>,
    held: Held,
    /// Output S3 could not take, kept for later.
    parcel: Parcel,
}

impl Executor {
    /// Runs the attempt to its end. `abort` is cancelled when the run's abort is requested;
    /// `shutdown` is the agent's own hard stop.
    pub async fn execute(&self, claim: Claim, abort: CancellationToken, shutdown: CancellationToken) {
        let span = tracing::info_span!("run", run_id = %claim.run, job = %claim.job, attempt = claim.attempt);
        self.execute_inner(claim, abort, shutdown).instrument(span).await
    }

    async fn execute_inner(&self, claim: Claim, abort: CancellationToken, shutdown: CancellationToken) {
        let started = Instant::now();
        tracing::info!("attempt started");
        let log_path = self.work_dir.join(format!("{}-{}.log", claim.run, claim.attempt));
        let live = LiveCopy::new(self.pool.clone(), claim.run, claim.attempt);
        let (console, pump) = console::start(live, log_path, self.console_limits);
        // Renewed for as long as the attempt runs; losing it, or failing to renew it for the fence
        // window, stops the attempt.
        let fence = Fence::default();
        fence.renewed_at(claim.granted);
        let cluster = Fence::default();
        let heartbeat = tokio::spawn(heartbeat(
            self.leases.clone(),
            claim.clone(),
            self.agent.clone(),
            self.timing,
            abort.clone(),
            fence.clone(),
        ));

        let mut attempt = Attempt {
            executor: self,
            claim: &claim,
            labels: RunLabels {
                agent: self.agent.clone(),
                job: claim.job.clone(),
                run: claim.run.to_string(),
                attempt: claim.attempt,
            },
            console,
            interrupts: Interrupts { abort, shutdown, fence: fence.clone(), cluster: cluster.clone(), deadline: None },
            masker: Masker::default(),
            env: Vec::new(),
            held: Held::default(),
            parcel: self.pending.parcel(claim.run, claim.attempt, &self.agent),
        };
        // No container of the attempt exists before the warden bounds its life by the leases.
        let watch = self.warden.watch(claim.run.to_string(), claim.attempt, vec![fence, cluster]).await;
        let stop = match &watch {
            Err(err) => Stop::Failed(AttemptError::Warden(err.to_string())),
            Ok(_) => match attempt.run().await {
                Ok(stop) | Err(stop) => stop,
            },
        };
        attempt.end(stop, started, pump).await;
        drop(watch);
        heartbeat.abort();
    }
}

impl Attempt<'_> {
    /// The attempt's phases in order; `Err` is how an earlier phase stopped it.
    async fn run(&mut self) -> Result<Stop, Stop> {
        let plan = Plan::of(self.claim).map_err(AttemptError::Plan)?;
        let secrets = self.open_secrets(&plan).await?;
        if let Some(requirement) = &plan.cluster {
            self.lease_cluster(requirement).await?;
        }
        // The timeout covers the checkout, the image, the services and the script.
        let timeout = Duration::from_secs(u64::from(plan.timeout_seconds)).min(self.executor.max_timeout);
        self.interrupts.deadline = Some((tokio::time::Instant::now() + timeout, timeout));
        self.issue_id_token(&plan, &secrets, timeout).await?;
        self.take_network().await?;
        // The checkout ends before any container of the run exists: no code of the run's image runs
        // beside git in the workspace. The engine then starts the job container while the services
        // get ready; its script waits at the gate until they are.
        if let Some(checkout) = &plan.checkout {
            self.check_out(checkout, &secrets).await?;
        }
        let image = match &plan.image {
            ImageSource::Image(image) => {
                self.ready_made_image(image).await?;
                image.clone()
            }
            ImageSource::Build(build) => {
                let origin = plan
                    .checkout
                    .as_ref()
                    .map(|checkout| format!("{}\n{}", checkout.repository, checkout.credential_scope(&self.claim.job)));
                self.build(build, origin.as_deref().unwrap_or_default(), &plan.resources).await?
            }
        };
        self.start_job(&plan, image);
        self.start_services(&plan.services).await?;
        let (id, stop) = self.run_job().await?;
        if !matches!(stop, Stop::LeaseLost(_)) {
            if !plan.results.is_empty() {
                let root = plan.working_dir.as_deref().unwrap_or(crate::plan::WORKSPACE);
                self.collect_results(&id, root, &plan.results).await;
            }
            self.keep_service_logs().await;
        }
        Ok(stop)
    }

    /// The run's network, and the ranges its job may reach despite the egress policy.
    async fn take_network(&mut self) -> Result<(), Stop> {
        let network = self.interrupts.step(self.executor.networks.take(&self.labels)).await?;
        let network = network.map_err(AttemptError::Docker)?;
        let allow = &self.claim.spec.egress().allow;
        let bridge = crate::egress::bridge_name(&network.name);
        self.held.network = Some(network);
        if self.executor.egress_rules && !allow.is_empty() {
            let (docker, agent, image) = (&self.executor.docker, &self.executor.agent, &self.executor.git_image);
            let added = self.interrupts.step(docker.allow_egress(agent, image, &bridge, allow, true)).await?;
            self.held.allowed = Some((bridge, allow.clone()));
            added.map_err(AttemptError::Docker)?;
            let ranges: Vec<String> = allow.iter().map(ToString::to_string).collect();
            self.console.note(&format!("the job's runs reach {} (egress.allow)", ranges.join(", "))).await;
        }
        Ok(())
    }

    /// The run's network, taken before any container of the run is made.
    fn network(&self) -> &RunNetwork {
        self.held.network.as_ref().expect("the network is taken first")
    }
}

/// Keeps the run's lease (see `lease`) and passes on an abort requested meanwhile.
async fn heartbeat(
    pool: PgPool,
    claim: Claim,
    agent: String,
    timing: LeaseTiming,
    abort: CancellationToken,
    fence: Fence,
) {
    let granted = claim.granted;
    let renew = move || {
        let (pool, claim, agent, abort) = (pool.clone(), claim.clone(), agent.clone(), abort.clone());
        async move {
            Ok::<_, sqlx::Error>(match attempts::renew(&pool, &claim, &agent, timing.lease()).await? {
                Lease::Held { abort_requested } => {
                    if abort_requested {
                        abort.cancel();
                    }
                    Renewal::Held
                }
                Lease::Lost => Renewal::Lost,
            })
        }
    };
    lease::keep("run", timing, granted, renew, fence).await
}
