//! `cimaster-bench-github`: GitHub webhooks against a release master on a database of its own, with
//! a fake GitHub API on loopback. Measures
//! 1. deliveries accepted per second (signature check, reading, recording) by `--clients` senders,
//!    with the answer time's percentiles, against a baseline measured in the same run: the same
//!    number of single-row inserts into Postgres at the same concurrency;
//! 2. for `--pulls` pull requests opened one after another: delivery → run queued, and delivery →
//!    `pending` status posted on GitHub, at the default handle and report intervals.
//!
//! Needs the release binaries next to this one and CIMASTER_DATABASE_URL and CIMASTER_AMQP_URL
//! (`scripts/bench github` sets everything up).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cimaster_e2e::fake_github::{self, FakeGithub};
use cimaster_e2e::processes::{self, Scratch, Services};
use cimaster_master::auth::{Role, Signer};
use clap::Parser;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

const REPO: &str = "bench-org/hello";
const SECRET: &str = "bench-webhook-secret";

#[derive(Parser)]
struct Args {
    /// Deliveries sent for the acceptance rate.
    #[arg(long, default_value_t = 2000)]
    deliveries: usize,
    /// Senders at once.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Pull requests opened one after another for the latencies.
    #[arg(long, default_value_t = 100)]
    pulls: usize,
    /// Pause between two pull requests.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    gap: Duration,
    #[command(flatten)]
    services: Services,
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
    let repo = Repository::create(args.pulls)?;
    let fake = FakeGithub::start(None).await?;
    let dir = processes::binaries()?;
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("CIMASTER_GITHUB_WEBHOOK_SECRET", SECRET.to_owned()),
        ("CIMASTER_GITHUB_API_URL", fake.url.clone()),
        ("CIMASTER_GITHUB_TOKEN", fake_github::TOKEN.to_owned()),
        ("CIMASTER_ALLOW_FILE_REPOSITORIES", "true".to_owned()),
    ];
    let (master, base) = processes::start_master(&dir, url, prefix, &secret, &env).await?;
    let token = Signer::hs256(&secret)?.mint("bench", &[Role::Admin], Duration::from_secs(3600));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(64).build()?;
    let job = json!({"kind": "git", "repository": repo.url, "github": {"repository": REPO, "pullRequests": {"branches": ["main"]}}});
    let put = http.put(format!("{base}/jobs/unit")).bearer_auth(&token).json(&job).send().await?;
    if !put.status().is_success() {
        bail!("PUT /jobs/unit: {}", put.text().await?);
    }
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(args.clients as u32).connect(url).await?;

    println!(
        "webhooks: {} deliveries by {} senders; {} pull requests {:?} apart",
        args.deliveries, args.clients, args.pulls, args.gap
    );
    let began = Instant::now();
    let accepted = accept(&http, &base, args).await?;
    let drained = drain(&pool).await?;
    let handled = args.deliveries as f64 / (drained - began).as_secs_f64();
    let baseline = insert_baseline(&pool, args).await?;
    println!(
        "accepted: {:.0}/s, answer p50 {:.2} ms, p99 {:.2} ms; baseline (one-row INSERT, {} connections): {:.0}/s; ratio {:.2}",
        accepted.rate, accepted.p50, accepted.p99, args.clients, baseline, accepted.rate / baseline
    );
    println!("handled (claimed, read, settled by one replica): {handled:.0}/s");
    latencies(&http, &base, &pool, &fake, &repo, args).await?;
    processes::stop(master, Duration::from_secs(10)).await;
    Ok(())
}

struct Accepted {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(http: &reqwest::Client, base: &str, event: &str, id: &str, body: Vec<u8>) -> anyhow::Result<u16> {
    let response = http
        .post(format!("{base}/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .header("x-hub-signature-256", sign(&body))
        .body(body)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// Pushes to a branch no job runs for: each is checked, read, recorded and later settled.
async fn accept(http: &reqwest::Client, base: &str, args: &Args) -> anyhow::Result<Accepted> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..args.clients {
        let (http, base, next, total) = (http.clone(), base.to_owned(), next.clone(), args.deliveries);
        senders.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= total {
                    return Ok::<_, anyhow::Error>(times);
                }
                let body = serde_json::to_vec(&json!({
                    "ref": format!("refs/heads/bench-{index}"), "before": "0".repeat(40), "after": "a".repeat(40),
                    "deleted": false, "repository": {"full_name": REPO}, "sender": {"login": "bench"}
                }))?;
                let sent = Instant::now();
                let status = deliver(&http, &base, "push", &format!("bench-{index}"), body).await?;
                if status != 202 {
                    bail!("delivery {index} answered {status}");
                }
                times.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut times = Vec::new();
    for sender in senders {
        times.extend(sender.await??);
    }
    let rate = args.deliveries as f64 / began.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    Ok(Accepted { rate, p50: percentile(&times, 0.5), p99: percentile(&times, 0.99) })
}

/// Waits until every recorded delivery was handled; when that was.
async fn drain(pool: &sqlx::PgPool) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM github_deliveries WHERE state = 'pending'")
            .fetch_one(pool)
            .await?;
        if pending == 0 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{pending} deliveries still pending after five minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The database's own pace for one-row inserts at the same concurrency.
async fn insert_baseline(pool: &sqlx::PgPool, args: &Args) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE bench_baseline (id text PRIMARY KEY, payload jsonb)").execute(pool).await?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.clients {
        let (pool, next, total) = (pool.clone(), next.clone(), args.deliveries);
        workers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= total {
                    return Ok::<_, sqlx::Error>(());
                }
                sqlx::query("INSERT INTO bench_baseline VALUES ($1, $2)")
                    .bind(format!("bench-{index}"))
                    .bind(json!({"ref": format!("refs/heads/bench-{index}")}))
                    .execute(&pool)
                    .await?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(args.deliveries as f64 / began.elapsed().as_secs_f64())
}

/// Pull requests opened one by one: delivery → run queued, and → `pending` status on GitHub.
async fn latencies(
    http: &reqwest::Client,
    base: &str,
    pool: &sqlx::PgPool,
    fake: &FakeGithub,
    repo: &Repository,
    args: &Args,
) -> anyhow::Result<()> {
    let mut sent = Vec::new();
    for (number, head) in repo.heads.iter().enumerate() {
        let number = number as i64 + 1;
        let pull = fake_github::pull_request(REPO, number, head, "mona", "MEMBER", None);
        let body = serde_json::to_vec(&json!({"action": "opened", "number": number, "pull_request": pull,
                                              "repository": {"full_name": REPO}, "sender": {"login": "mona"}}))?;
        sent.push((head.clone(), Instant::now(), chrono::Utc::now()));
        let status = deliver(http, base, "pull_request", &format!("pull-{number}"), body).await?;
        if status != 202 {
            bail!("pull request {number} answered {status}");
        }
        tokio::time::sleep(args.gap).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut queued, mut posted) = (Vec::new(), Vec::new());
    for (head, at, wall) in &sent {
        let created = loop {
            let created: Option<chrono::DateTime<chrono::Utc>> =
                sqlx::query_scalar("SELECT created_at FROM runs WHERE commit_sha = $1")
                    .bind(head)
                    .fetch_optional(pool)
                    .await?;
            if let Some(created) = created {
                break created;
            }
            if Instant::now() > deadline {
                bail!("no run for {head}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        queued.push((created - *wall).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        let status = loop {
            if let Some(status) = fake.statuses_of(head, "cimaster/unit").first().cloned() {
                break status;
            }
            if Instant::now() > deadline {
                bail!("no status for {head}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        posted.push(status.at.duration_since(*at).as_secs_f64() * 1000.0);
    }
    for (label, times) in [("delivery → run queued", &mut queued), ("delivery → pending status", &mut posted)] {
        times.sort_by(f64::total_cmp);
        println!(
            "{label}: p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} pull requests)",
            percentile(times, 0.5),
            percentile(times, 0.95),
            percentile(times, 0.99),
            times.last().copied().unwrap_or_default(),
            times.len()
        );
    }
    Ok(())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A repository on disk with a job config on main and one commit per pull request.
struct Repository {
    dir: std::path::PathBuf,
    url: String,
    heads: Vec<String>,
}

impl Repository {
    fn create(pulls: usize) -> anyhow::Result<Repository> {
        let dir = std::env::temp_dir().join(format!("cimaster-bench-github-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let git = |args: &[&str]| -> anyhow::Result<String> {
            let out = std::process::Command::new("git")
                .args(["-c", "user.email=bench@cimaster.test", "-c", "user.name=bench"])
                .args(args)
                .current_dir(&dir)
                .output()
                .context("running git")?;
            if !out.status.success() {
                bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        git(&["init", "-q", "-b", "main"])?;
        std::fs::write(dir.join(".cimaster.yml"), "image: busybox:latest\nscript: echo ok\n")?;
        git(&["add", "-A"])?;
        git(&["commit", "-q", "-m", "config"])?;
        let mut heads = Vec::new();
        for number in 1..=pulls {
            git(&["commit", "-q", "--allow-empty", "-m", &format!("pull request {number}")])?;
            heads.push(git(&["rev-parse", "HEAD"])?);
        }
        let url = format!("file://{}", dir.display());
        Ok(Repository { dir, url, heads })
    }
}

impl Drop for Repository {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
