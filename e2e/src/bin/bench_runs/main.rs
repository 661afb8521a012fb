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

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{RemoveContainerOptions, WaitContainerOptions};
use bollard::Docker;
use chrono::{DateTime, Utc};
use cimaster_e2e::processes::{self, Scratch, Services};
use cimaster_master::auth::{Role, Signer};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;

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
    wait_finished(&pool, warm.0).await?;
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
    let (ours, ours_elapsed) = measure_ours(args.runs, &permits, &http, &base, &token, &pool).await?;
    let busy_rss = rss_mib(agent_pid);
    stop(agents, master).await;
    let (baseline, base_elapsed) = measure_baseline(args.runs, &permits, &args.image).await?;

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
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..runs {
        let permit = permits.clone().acquire_owned().await?;
        let (http, base, token, pool) = (http.clone(), base.to_owned(), token.to_owned(), pool.clone());
        tasks.push(tokio::spawn(async move {
            let (id, at) = trigger(&http, &base, &token).await?;
            let sample = wait_finished(&pool, id).await.map(|(container, finished)| Sample {
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

/// A run's status, when its container started and when it finished.
type Timeline = (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

async fn wait_finished(pool: &sqlx::PgPool, id: uuid::Uuid) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let row: Option<Timeline> = sqlx::query_as(
            "SELECT r.status, a.container_started_at, r.finished_at FROM runs r
             LEFT JOIN run_attempts a ON a.run_id = r.id AND a.attempt = r.attempt WHERE r.id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        if let Some((status, Some(container), Some(finished))) = row.clone() {
            if status != "succeeded" {
                bail!("run {id} ended {status}");
            }
            return Ok((container, finished));
        }
        if Instant::now() > deadline {
            bail!("run {id} did not finish: {row:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
