//! `cimaster-bench trigger`: drives `POST /jobs/{name}/runs` on a real master process with N
//! concurrent clients, then measures a raw baseline in the same run — one Postgres insert plus one
//! confirmed RabbitMQ publish per run, no HTTP — and prints both with their ratio and the master's RSS.
//!
//! Needs CIMASTER_DATABASE_URL and CIMASTER_AMQP_URL (`scripts/bench` sets them from `scripts/dev`).

mod pool;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cimaster_common::{JobName, QueueName, RunId, RunMessage};
use cimaster_master::auth::{Role, Signer};
use cimaster_master::broker::{connect, Topology};
use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::BasicProperties;
use secrecy::SecretString;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Semaphore;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// `POST /jobs/{name}/runs` against one insert plus one confirmed publish.
    Trigger,
    /// Pool acquire+release over HTTP against the same operations called directly.
    Pool,
}

#[derive(Parser)]
#[command(about = "Benchmarks of the master, each beside a baseline measured in the same run")]
struct Args {
    #[arg(value_enum, default_value = "trigger")]
    mode: Mode,
    /// Pool mode: clusters in the pool.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Pool mode: acquire+release cycles per measurement.
    #[arg(long, default_value_t = 5000)]
    cycles: usize,
    /// Pool mode, held leases: how long each client keeps its cluster before releasing it.
    #[arg(long, default_value_t = 1000)]
    hold_ms: u64,
    /// Pool mode, held leases: acquire/hold/release rounds per client.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Pool mode, held leases: consecutive measurements, each reported, and their spread.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Runs per measurement.
    #[arg(long, default_value_t = 5000)]
    runs: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Connections in the master's pool and in the baseline's pool.
    #[arg(long, default_value_t = 16)]
    pool: u32,
    #[arg(long, env = "CIMASTER_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "CIMASTER_AMQP_URL")]
    amqp_url: String,
}

struct Figures {
    runs_per_second: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn figures(mut latencies: Vec<Duration>, elapsed: Duration) -> Figures {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figures {
        runs_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        max: latencies.last().copied().unwrap_or_default(),
    }
}

/// Runs `total` operations with `clients` in flight, returning each latency and the wall time.
async fn drive<F, Fut>(total: usize, clients: usize, op: F) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let permits = Arc::new(Semaphore::new(clients));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let permit = permits.clone().acquire_owned().await?;
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let result = op(i).await;
            drop(permit);
            result.map(|()| begun.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok((latencies, started.elapsed()))
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let database = format!("cimaster_bench_{suffix}");
    let prefix = format!("bench-{suffix}");
    let (server_url, _) = args.database_url.rsplit_once('/').context("database URL has no database name")?;
    let bench_url = format!("{server_url}/{database}");

    let mut admin = PgConnection::connect(&args.database_url).await?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&mut admin).await?;
    let result = run(&args, &bench_url, &prefix).await;
    let pool_closed =
        sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&mut admin).await;
    let amqp_url = SecretString::from(args.amqp_url.clone());
    if let Err(err) = cimaster_amqp::delete_prefix(&amqp_url, &prefix, &["default", "baseline"]).await {
        eprintln!("cannot delete the benchmark's queues: {err}");
    }
    pool_closed?;
    result
}

async fn run(args: &Args, database_url: &str, prefix: &str) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new().max_connections(args.pool).connect(database_url).await?;
    cimaster_master::db::migrate(&pool).await?;
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.clients).build()?;
    let (mut master, base) = start_master(args, database_url, prefix, &secret, &http).await?;
    let pid = master.id().context("master pid")?;
    let (_, idle_hwm) = rss_kib(pid);
    let token = Signer::hs256(&secret)?.mint("bench", &[Role::Admin], Duration::from_secs(3600));
    if args.mode == Mode::Pool {
        let result = pool::bench_pool(args, &pool, &http, &base, &token).await;
        let _ = master.kill().await;
        return result;
    }
    let api = bench_triggers(args, &http, &base, &token).await?;
    let (rss, hwm) = rss_kib(pid);
    let _ = master.kill().await;
    let raw = bench_baseline(args, &pool, prefix).await?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("trigger benchmark: {} runs, {} concurrent clients, pool of {}", args.runs, args.clients, args.pool);
    println!("{:<34} {:>10} {:>10} {:>10}", "", "runs/s", "p50 ms", "p99 ms");
    println!(
        "{:<34} {:>10.0} {:>10.2} {:>10.2}",
        "POST /jobs/{name}/runs (master)",
        api.runs_per_second,
        ms(api.p50),
        ms(api.p99)
    );
    println!(
        "{:<34} {:>10.0} {:>10.2} {:>10.2}",
        "raw insert + confirmed publish",
        raw.runs_per_second,
        ms(raw.p50),
        ms(raw.p99)
    );
    println!("ratio master/raw throughput: {:.2} (target >= 0.50)", api.runs_per_second / raw.runs_per_second);
    println!(
        "master throughput target >= 1000 runs/s: {}",
        if api.runs_per_second >= 1000.0 { "met" } else { "NOT met" }
    );
    println!(
        "master RSS: {:.1} MiB now, {:.1} MiB peak, {:.1} MiB peak when idle (target <= 100 MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        idle_hwm as f64 / 1024.0
    );
    pool.close().await;
    Ok(())
}

/// The master, as a separate process so its memory can be read; returns it once ready, and its
/// base URL.
async fn start_master(
    args: &Args,
    database_url: &str,
    prefix: &str,
    secret: &str,
    http: &reqwest::Client,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?.with_file_name("cimaster");
    let master = tokio::process::Command::new(&exe)
        .arg("serve")
        .env("CIMASTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CIMASTER_DATABASE_URL", database_url)
        .env("CIMASTER_DATABASE_MAX_CONNECTIONS", args.pool.to_string())
        .env("CIMASTER_AMQP_URL", &args.amqp_url)
        .env("CIMASTER_QUEUE_PREFIX", prefix)
        .env("CIMASTER_JWT_SECRET", secret)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            return Ok((master, base));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("master did not become ready")
}

/// `POST /jobs/bench/runs` from `args.clients` clients, after a warm-up.
async fn bench_triggers(args: &Args, http: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<Figures> {
    let put = http
        .put(format!("{base}/jobs/bench"))
        .bearer_auth(token)
        .json(&json!({"kind": "freestyle", "image": "busybox:latest", "script": "true"}))
        .send()
        .await?;
    if !put.status().is_success() {
        bail!("PUT /jobs/bench answered {}", put.status());
    }
    let trigger = {
        let (http, url, token) = (http.clone(), format!("{base}/jobs/bench/runs"), token.to_owned());
        move |_| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                let response = http.post(&url).bearer_auth(&token).send().await?;
                if response.status() != 201 {
                    bail!("trigger answered {}", response.status());
                }
                Ok(())
            }
        }
    };
    drive(args.runs / 10, args.clients, trigger.clone()).await?; // warm-up
    let (latencies, elapsed) = drive(args.runs, args.clients, trigger).await?;
    Ok(figures(latencies, elapsed))
}

/// Baseline: what one run costs the backing services alone (an insert and a confirmed publish).
async fn bench_baseline(args: &Args, pool: &PgPool, prefix: &str) -> anyhow::Result<Figures> {
    let connection = connect(&SecretString::from(args.amqp_url.clone()), "cimaster-bench").await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Topology::declare_dead_letters(&channel, prefix).await?;
    let queue = Topology::declare_run_queue(&channel, prefix, &QueueName::parse("baseline")?).await?;
    let baseline_op = {
        let pool = pool.clone();
        move |_| raw_insert_and_publish(pool.clone(), channel.clone(), queue.clone())
    };
    drive(args.runs / 10, args.clients, baseline_op.clone()).await?;
    let (latencies, elapsed) = drive(args.runs, args.clients, baseline_op).await?;
    Ok(figures(latencies, elapsed))
}

async fn raw_insert_and_publish(pool: PgPool, channel: lapin::Channel, queue: String) -> anyhow::Result<()> {
    let id = RunId::new();
    sqlx::query(
        "INSERT INTO runs (id, job, queue, parameters, spec, triggered_by) VALUES ($1, 'bench', 'baseline', '{}', '{}', 'bench')",
    )
    .bind(id.0)
    .execute(&pool)
    .await?;
    let message =
        RunMessage { run_id: id, job: JobName::parse("bench")?, attempt: 1, queue: QueueName::parse("baseline")? };
    let confirm = channel
        .basic_publish(
            "",
            &queue,
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &message.to_json(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("publish not confirmed: {other:?}"),
    }
}
