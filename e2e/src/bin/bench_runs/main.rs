//! `cimaster-bench-runs`: N trivial runs (`true` in busybox) end to end through a master and one or
//! more agent processes (`--agents`), beside a baseline measured in the same run: the same number of `docker run --rm` of the
//! same image through the Docker API, at the same concurrency. Prints trigger→container-start and
//! trigger→finished p50/p95, runs/s, their ratio to the baseline, and the first agent's RSS.
//!
//! With `--abort`, it measures aborts instead (`abort`).
//!
//! Needs the release binaries next to this one and CIMASTER_DATABASE_URL, CIMASTER_AMQP_URL and the
//! CIMASTER_S3_* variables (`scripts/bench runs` sets everything up).

mod abort;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{RemoveContainerOptions, WaitContainerOptions};
use bollard::Docker;
use chrono::{DateTime, Utc};
use cimaster_e2e::cpu;
use cimaster_e2e::processes::{self, Scratch, Services};
use cimaster_master::auth::{Role, Signer};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{oneshot, Semaphore};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Agent processes taking the runs.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    #[arg(long, default_value = "busybox:latest")]
    image: String,
    #[command(flatten)]
    services: Services,
    /// Measure aborts of running runs (`--runs` of them, one at a time) instead.
    #[arg(long)]
    abort: bool,
}

struct Sample {
    start: Duration,
    finish: Duration,
}

fn pct(values: &mut [Duration], q: f64) -> f64 {
    values.sort();
    values[((values.len() as f64 * q).ceil() as usize).saturating_sub(1).min(values.len() - 1)].as_secs_f64() * 1000.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = Scratch::create(&args.services).await?;
    let result = run(&args, &scratch.database.url, &scratch.prefix).await;
    scratch.remove(&args.services).await?;
    result
}

async fn run(args: &Args, url: &str, prefix: &str) -> anyhow::Result<()> {
    let dir = processes::binaries()?;
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let (master, base) = processes::start_master(&dir, url, prefix, &secret, &[]).await?;
    let token = Signer::hs256(&secret)?.mint("bench", &[Role::Admin], Duration::from_secs(3600));
    put_noop_job(&http, &base, &token, &args.image).await?;
    let mut agents = Vec::new();
    for index in 1..=args.agents.max(1) {
        agents.push(processes::start_agent(&dir, &format!("{prefix}-agent-{index}"), url, prefix, &[])?);
    }
    let agent_pid = agents[0].id().context("agent pid")?;

    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(url).await?;
    // Warm up: the agents connect and declare their queue; one run end to end.
    let warm = trigger(&http, &base, &token).await?;
    Endings::watch(pool.clone()).ended(warm.0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_mib(agent_pid);

    if args.abort {
        let mut ours = abort::measure_ours(args.runs, &http, &base, &token, &pool, &args.image).await;
        stop(agents, master).await;
        let mut with_init = abort::measure_baseline(args.runs, &args.image, true).await?;
        let mut without_init = abort::measure_baseline(args.runs.min(5), &args.image, false).await?;
        abort::report(ours.as_mut().map_err(|err| anyhow::anyhow!("{err:#}"))?, &mut with_init, &mut without_init);
        return Ok(());
    }
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let ours_pids: Vec<u32> = std::iter::once(&master).chain(&agents).filter_map(|child| child.id()).collect();
    let before = cpu::Reading::now(&ours_pids);
    let (ours, ours_elapsed) = measure_ours(args.runs, &permits, &http, &base, &token, &pool).await?;
    let ours_cpu = cpu::Reading::now(&ours_pids).since(&before);
    let busy_rss = rss_mib(agent_pid);
    stop(agents, master).await;
    let before = cpu::Reading::now(&[]);
    let (baseline, base_elapsed) = measure_baseline(args.runs, &permits, &args.image).await?;
    let base_cpu = cpu::Reading::now(&[]).since(&before);

    println!(
        "end-to-end benchmark: {} runs of `true` in {}, concurrency {}, {} agent(s)",
        args.runs,
        args.image,
        args.concurrency,
        args.agents.max(1)
    );
    println!("{:<26} {:>9} {:>9} {:>9} {:>9} {:>8}", "", "start p50", "start p95", "end p50", "end p95", "runs/s");
    println!("{:<26} {:>9} {:>9} {:>9} {:>9} {:>8}", "(ms from trigger/request)", "", "", "", "", "");
    let (our_start95, our_end50, our_rate) = report("CIMaster (201 → …)", &ours, ours_elapsed);
    let (base_start95, base_end50, base_rate) = report("docker run --rm (API)", &baseline, base_elapsed);
    println!(
        "per-run overhead: trigger→finished p50 is {:.2}x the baseline's run time (target <= 1.3)",
        our_end50 / base_end50
    );
    println!("throughput: {:.2}x the baseline's runs/s", our_rate / base_rate);
    println!(
        "dispatch: trigger→container started p95 {:.1} ms vs the container's own create+start p95 {:.1} ms: {:.1} ms added (target <= 50)",
        our_start95,
        base_start95,
        our_start95 - base_start95
    );
    let per_run = |spent: Duration| spent.as_secs_f64() * 1000.0 / args.runs as f64;
    let (master_cpu, agents_cpu) =
        ours_cpu.processes.split_first().map_or((Duration::ZERO, Duration::ZERO), |(m, a)| (*m, a.iter().sum()));
    println!(
        "host CPU per run: {:.0} ms (the master {:.0}, the agents {:.0}, the rest the engine, the services and the bench) vs {:.0} ms for the baseline's",
        per_run(ours_cpu.host),
        per_run(master_cpu),
        per_run(agents_cpu),
        per_run(base_cpu.host)
    );
    println!("agent RSS: {idle_rss:.1} MiB idle (target <= 40), {busy_rss:.1} MiB after the runs");
    Ok(())
}

/// Stops the agents (SIGTERM: each removes its idle networks before it exits) and the master.
async fn stop(agents: Vec<tokio::process::Child>, mut master: tokio::process::Child) {
    futures::future::join_all(agents.into_iter().map(|agent| processes::stop(agent, Duration::from_secs(30)))).await;
    let _ = master.kill().await;
}

async fn put_noop_job(http: &reqwest::Client, base: &str, token: &str, image: &str) -> anyhow::Result<()> {
    let put = http
        .put(format!("{base}/jobs/noop"))
        .bearer_auth(token)
        .json(&json!({"kind": "freestyle", "image": image, "script": "true",
                      "resources": {"cpus": 0.1, "memory": "16Mi"}}))
        .send()
        .await?;
    if !put.status().is_success() {
        bail!("PUT /jobs/noop answered {}", put.status());
    }
    Ok(())
}

/// CIMaster: trigger → container started / finished, from the run's own records.
async fn measure_ours(
    runs: usize,
    permits: &Arc<Semaphore>,
    http: &reqwest::Client,
    base: &str,
    token: &str,
    pool: &sqlx::PgPool,
) -> anyhow::Result<(Vec<Sample>, Duration)> {
    let watch = Endings::watch(pool.clone());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..runs {
        let permit = permits.clone().acquire_owned().await?;
        let (http, base, token, watch) = (http.clone(), base.to_owned(), token.to_owned(), watch.clone());
        tasks.push(tokio::spawn(async move {
            let (id, at) = trigger(&http, &base, &token).await?;
            let sample = watch.ended(id).await.map(|(container, finished)| Sample {
                start: (container - at).to_std().unwrap_or_default(),
                finish: (finished - at).to_std().unwrap_or_default(),
            });
            drop(permit);
            sample
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await??);
    }
    Ok((samples, started.elapsed()))
}

/// Baseline: `docker run --rm` through the engine's API, at the same concurrency.
async fn measure_baseline(
    runs: usize,
    permits: &Arc<Semaphore>,
    image: &str,
) -> anyhow::Result<(Vec<Sample>, Duration)> {
    let docker = Docker::connect_with_local_defaults()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..runs {
        let permit = permits.clone().acquire_owned().await?;
        let (docker, image) = (docker.clone(), image.to_owned());
        tasks.push(tokio::spawn(async move {
            let sample = docker_run(&docker, &image).await;
            drop(permit);
            sample
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await??);
    }
    Ok((samples, started.elapsed()))
}

/// Prints one row of the table; returns (start p95, end p50, runs/s).
fn report(name: &str, samples: &[Sample], elapsed: Duration) -> (f64, f64, f64) {
    let mut start: Vec<Duration> = samples.iter().map(|s| s.start).collect();
    let mut finish: Vec<Duration> = samples.iter().map(|s| s.finish).collect();
    let rate = samples.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<26} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2}",
        pct(&mut start, 0.50),
        pct(&mut start, 0.95),
        pct(&mut finish, 0.50),
        pct(&mut finish, 0.95),
        rate
    );
    (pct(&mut start, 0.95), pct(&mut finish, 0.50), rate)
}

async fn trigger(http: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<(uuid::Uuid, DateTime<Utc>)> {
    let at = Utc::now();
    let response = http.post(format!("{base}/jobs/noop/runs")).bearer_auth(token).send().await?;
    if response.status() != 201 {
        bail!("trigger answered {}", response.status());
    }
    let body: serde_json::Value = response.json().await?;
    let id = body["id"].as_str().context("run id")?.parse()?;
    Ok((id, at))
}

/// A run's id, status, when its container started and when it finished.
type Ending = (uuid::Uuid, String, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
type Waiters = HashMap<uuid::Uuid, oneshot::Sender<Ending>>;

/// One poller for every run in flight, so that watching eight runs costs the database what
/// watching one does, and the benchmark does not take the CPU the runs need.
#[derive(Clone)]
struct Endings {
    waiters: Arc<Mutex<Waiters>>,
}

impl Endings {
    const EVERY: Duration = Duration::from_millis(10);

    fn watch(pool: sqlx::PgPool) -> Self {
        let waiters = Arc::new(Mutex::new(Waiters::new()));
        let weak = Arc::downgrade(&waiters);
        tokio::spawn(async move {
            while let Some(waiters) = weak.upgrade() {
                let ids: Vec<uuid::Uuid> = waiters.lock().expect("waiters").keys().copied().collect();
                if !ids.is_empty() {
                    if let Ok(ended) = ended_runs(&pool, &ids).await {
                        let mut waiters = waiters.lock().expect("waiters");
                        for ending in ended {
                            if let Some(waiter) = waiters.remove(&ending.0) {
                                let _ = waiter.send(ending);
                            }
                        }
                    }
                }
                drop(waiters);
                tokio::time::sleep(Self::EVERY).await;
            }
        });
        Self { waiters }
    }

    /// When the run's container started and when the run finished; an error unless it succeeded.
    async fn ended(&self, id: uuid::Uuid) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(id, tx);
        let ending = tokio::time::timeout(Duration::from_secs(120), rx).await;
        let Ok(Ok((_, status, container, Some(finished)))) = ending else {
            self.waiters.lock().expect("waiters").remove(&id);
            bail!("run {id} did not finish in 120 s");
        };
        match (status.as_str(), container) {
            ("succeeded", Some(container)) => Ok((container, finished)),
            _ => bail!("run {id} ended {status}"),
        }
    }
}

async fn ended_runs(pool: &sqlx::PgPool, ids: &[uuid::Uuid]) -> sqlx::Result<Vec<Ending>> {
    sqlx::query_as(
        "SELECT r.id, r.status, a.container_started_at, r.finished_at FROM runs r
         LEFT JOIN run_attempts a ON a.run_id = r.id AND a.attempt = r.attempt
         WHERE r.id = ANY($1) AND r.finished_at IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}

async fn docker_run(docker: &Docker, image: &str) -> anyhow::Result<Sample> {
    let at = Instant::now();
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(vec!["true".to_owned()]),
        host_config: Some(HostConfig { nano_cpus: Some(100_000_000), memory: Some(16 << 20), ..Default::default() }),
        ..Default::default()
    };
    let created = docker.create_container(None::<bollard::query_parameters::CreateContainerOptions>, body).await?;
    docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await?;
    let start = at.elapsed();
    let mut wait = docker.wait_container(&created.id, Some(WaitContainerOptions { condition: "not-running".into() }));
    let _ = wait.next().await;
    docker.remove_container(&created.id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await?;
    Ok(Sample { start, finish: at.elapsed() })
}
