//! The CIMaster agent: takes runs from RabbitMQ when it has headroom, executes them in Docker,
//! writes status and console straight to Postgres and stores logs in S3.

pub mod admission;
mod archive;
pub mod attempt;
pub mod config;
pub mod console;
mod docker;
pub mod egress;
pub mod lease;
mod live;
mod mirrors;
mod networks;
pub mod pending;
pub mod plan;
pub mod presence;
pub mod registry;
pub mod storage;
pub mod subnets;
pub mod telemetry;
pub mod warden;
mod workdir;
pub mod worker;

use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;
use docker::DockerClient;
use registry::RegistryAuths;

/// Signals that drive the agent's shutdown.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking work; let running jobs finish (up to the drain grace).
    pub drain: CancellationToken,
    /// Stop running jobs now.
    pub abort: CancellationToken,
}

/// Runs the agent until `shutdown.drain` and the drain that follows.
pub async fn run(config: AgentConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let agent = config.agent_id();
    telemetry::metrics();
    // Served from the start, so probes see the agent while it connects and sweeps.
    let stop_serving = CancellationToken::new();
    let health = telemetry::Health { agent: agent.clone(), draining: shutdown.drain.clone() };
    let served = config.listen.map(|listen| tokio::spawn(telemetry::serve(listen, health, stop_serving.clone())));
    let timing = lease::LeaseTiming::new(config.lease, config.stop_grace, config.lease_margin)?;
    let (pool, leases) = databases(&config, &timing)?;
    let docker = docker(&config, &agent).await?;
    let userns_remap = docker.userns_remap().await;
    if !userns_remap {
        tracing::warn!("the engine does not remap user namespaces: root in a job is root on the engine's host if it escapes its container; userns-remap is recommended");
    }
    if config.egress {
        let loaded = docker.load_egress_rules(&agent, &config.git_image, &config.deny_cidrs).await;
        let loaded =
            loaded.context("setting the egress rules on the engine (CIMASTER_AGENT_EGRESS=false runs without)")?;
        tracing::info!(deny = ?config.deny_cidrs.0.iter().map(ToString::to_string).collect::<Vec<_>>(), "{loaded}");
    } else {
        tracing::warn!("CIMASTER_AGENT_EGRESS=false: runs reach the engine's host and every network around it");
    }
    let warden =
        warden::Warden::start(docker.clone(), agent.clone(), config.git_image.clone(), config.engine_socket(), timing)
            .await
            .context(
                "starting the warden that stops this agent's runs if the agent dies (CIMASTER_AGENT_ENGINE_SOCKET)",
            )?;
    let s3 = config.s3.client();
    check_bucket_in_background(s3.clone(), config.s3.bucket.clone());
    let admission = admission(&config);
    let background = CancellationToken::new();
    let stop_warden = CancellationToken::new();
    let warden_beats = tokio::spawn(warden.clone().keep(stop_warden.clone()));
    let sampler = admission.spawn_cpu_sampler(background.clone());
    let work_dir =
        config.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("cimaster-agent-{agent}")));
    let work_dir = workdir::prepare(&work_dir)?;
    let pending = pending::Pending::new(&work_dir, pool.clone(), s3.clone(), config.s3.bucket.clone());
    pending.discard_unsealed().await.context("the agent's work directory")?;
    let uploader = tokio::spawn(pending.clone().run(background.clone()));
    let mirrors = std::sync::Arc::new(mirrors::Mirrors::new(
        &agent,
        &work_dir,
        mirrors::Limits {
            max_bytes: config.mirrors_max_size.bytes(),
            max_age: config.mirror_max_age,
            helper_cpus: admission.cpus(),
            helper_memory: admission.memory(),
        },
    ));
    let networks =
        networks::Networks::new(docker.clone(), agent.clone(), config.idle_networks, config.network_pool.clone());
    let networks = std::sync::Arc::new(match config.network_sandboxes {
        true => networks.with_sandboxes(config.git_image.clone()),
        false => networks,
    });
    let executor = attempt::Executor {
        pool: pool.clone(),
        leases,
        docker: docker.clone(),
        networks: networks.clone(),
        s3,
        bucket: config.s3.bucket.clone(),
        agent: agent.clone(),
        timing,
        max_timeout: config.max_timeout,
        console_limits: console::ConsoleLimits {
            kept: config.console_limit.bytes(),
            live: config.live_console_limit.bytes().min(config.console_limit.bytes()),
        },
        mirrors: mirrors.clone(),
        work_dir,
        pending,
        git_image: config.git_image.clone(),
        warden: warden.clone(),
        egress_rules: config.egress,
        secrets: config
            .secrets_key
            .as_ref()
            .map(cimaster_common::secrets::SecretBox::from_base64)
            .transpose()
            .context("CIMASTER_SECRETS_KEY")?,
    };
    let aborts = worker::AbortRegistry::default();
    let listener = tokio::spawn(worker::listen_for_aborts(pool.clone(), aborts.clone(), background.clone()));
    tracing::info!(agent, cpus = admission.cpus(), memory_mib = admission.memory() >> 20, "agent started");
    let presence = presence::Presence {
        pool: pool.clone(),
        agent: agent.clone(),
        queues: config.queues.iter().map(ToString::to_string).collect(),
        admission: admission.clone(),
        draining: shutdown.drain.clone(),
        every: config.report_interval,
        userns_remap,
        egress_rules: config.egress,
    };
    let reporter = tokio::spawn(presence.run(background.clone()));
    let worker = worker::Worker {
        amqp_url: config.amqp_url.clone(),
        prefix: config.queue_prefix.clone(),
        queues: config.queues.clone(),
        admission,
        executor,
        aborts,
    };

    let mut running = JoinSet::new();
    worker.run(&mut running, shutdown.drain.clone(), shutdown.abort.clone()).await;
    drain(&mut running, config.drain_grace, &shutdown).await;
    networks.clear().await;
    mirrors.stop_helpers(&docker).await;
    // Nothing of this agent runs any more: the warden's stdin ends and it exits.
    stop_warden.cancel();
    let _ = warden_beats.await;
    background.cancel();
    let _ = sampler.await;
    let _ = uploader.await;
    let _ = listener.await;
    let _ = reporter.await;
    stop_serving.cancel();
    if let Some(served) = served {
        if let Ok(Err(err)) = served.await {
            tracing::warn!(error = %err, "the /metrics and /healthz listener failed");
        }
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// The agent's Postgres pools. Lease renewals have connections of their own, so a busy agent's
/// console and result writes cannot starve them into fencing its runs.
fn databases(config: &AgentConfig, timing: &lease::LeaseTiming) -> anyhow::Result<(PgPool, PgPool)> {
    let options = PgConnectOptions::from_str_secret(&config.database_url)?.application_name("cimaster-agent");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.clone());
    let leases = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(timing.renew_every())
        .connect_lazy_with(options.application_name("cimaster-agent-leases"));
    Ok((pool, leases))
}

/// Connects to Docker and removes what an earlier run of this agent left behind.
async fn docker(config: &AgentConfig, agent: &str) -> anyhow::Result<DockerClient> {
    let auths = match &config.registry_auth_file {
        Some(path) => RegistryAuths::load(path)?,
        None => RegistryAuths::default(),
    };
    tracing::info!(registries = ?auths.registries().collect::<Vec<_>>(), "registry credentials");
    let docker = DockerClient::connect(auths).await.context("Docker")?.with_egress_bridges(config.egress);
    let swept = docker.sweep(agent).await.context("sweeping leftovers")?;
    if swept > 0 {
        tracing::info!(containers = swept, "removed leftovers of an earlier run of this agent");
    }
    Ok(docker)
}

/// Without S3 the agent still runs jobs (their output waits on disk until S3 is back), so the
/// bucket is checked beside the start, not before it.
fn check_bucket_in_background(s3: aws_sdk_s3::Client, bucket: String) {
    tokio::spawn(async move {
        if let Err(err) = storage::ensure_bucket(&s3, &bucket).await {
            tracing::warn!(error = format!("{err:#}"), "cannot reach the S3 bucket; output waits on disk until it can");
        }
    });
}

/// What the agent hands out: the configured CPUs and memory, else the host's.
fn admission(config: &AgentConfig) -> admission::Admission {
    let cpus = config.cpus.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as f64);
    let memory = match &config.memory {
        Some(memory) => memory.bytes(),
        None => {
            let mut system = sysinfo::System::new();
            system.refresh_memory();
            system.total_memory()
        }
    };
    admission::Admission::new(cpus, memory, config.max_cpu)
}

/// The agent's private work directory, stable across restarts with the same id (output waiting
/// for S3 is kept here).
/// Lets running jobs finish, up to `grace`; then (or on a second signal) aborts them.
async fn drain(running: &mut JoinSet<()>, grace: Duration, shutdown: &Shutdown) {
    if running.is_empty() {
        return;
    }
    tracing::info!(runs = running.len(), ?grace, "draining running jobs");
    let drained = async { while running.join_next().await.is_some() {} };
    tokio::select! {
        _ = drained => {}
        _ = tokio::time::sleep(grace) => shutdown.abort.cancel(),
        _ = shutdown.abort.cancelled() => {}
    }
    while running.join_next().await.is_some() {}
}

trait FromSecret: Sized {
    fn from_str_secret(secret: &secrecy::SecretString) -> Result<Self, sqlx::Error>;
}

impl FromSecret for PgConnectOptions {
    fn from_str_secret(secret: &secrecy::SecretString) -> Result<Self, sqlx::Error> {
        secret.expose_secret().parse()
    }
}
