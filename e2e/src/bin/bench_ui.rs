//! `cimaster-bench-ui`: the web UI of a release master on a database of its own. Measures
//! 1. the runs page (`/ui/runs`, newest 50 of every job, and filtered) with `--runs` runs in the
//!    database, `--requests` times each: p50/p95/p99, against a baseline asked in the same run:
//!    the same page of the JSON API (`GET /runs?limit=50`);
//! 2. a run whose console is `--console-mib` MiB (printed by a real job on a real agent, stored in
//!    S3): the run page, the first console event after the stream opens, the whole log streamed,
//!    and the master's resident memory before and at its peak, against the raw log downloaded.
//!
//! Needs the release binaries next to this one and the CIMASTER_DATABASE_URL, CIMASTER_AMQP_URL
//! and CIMASTER_S3_* variables (`scripts/bench ui` sets everything up).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cimaster_e2e::processes::{self, Scratch, Services};
use cimaster_master::auth::{Role, Signer};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Runs in the database.
    #[arg(long, default_value_t = 100_000)]
    runs: usize,
    /// Requests per measured page.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Size of the large console log.
    #[arg(long, default_value_t = 20)]
    console_mib: usize,
    #[command(flatten)]
    services: Services,
}

const JOBS: usize = 20;

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
    let (master, base) = processes::start_master(&dir, url, prefix, &secret, &[]).await?;
    let token = Signer::hs256(&secret)?.mint("bench", &[Role::Admin], Duration::from_secs(3600));
    let cookie = format!("cimaster_session={token}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    for index in 0..JOBS {
        let job = json!({"kind": "freestyle", "image": "busybox:latest", "script": "true"});
        let put = http.put(format!("{base}/jobs/job-{index}")).bearer_auth(&token).json(&job).send().await?;
        if !put.status().is_success() {
            bail!("PUT /jobs/job-{index}: {}", put.text().await?);
        }
    }
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(url).await?;
    let began = Instant::now();
    seed_runs(&pool, args.runs).await?;
    println!("ui: {} runs of {JOBS} jobs written in {:.1} s", args.runs, began.elapsed().as_secs_f64());

    let middle: (uuid::Uuid,) = sqlx::query_as("SELECT id FROM runs ORDER BY id DESC OFFSET $1 LIMIT 1")
        .bind((args.runs / 2) as i64)
        .fetch_one(&pool)
        .await?;
    println!("runs page, {} requests each (p50 / p95 / p99):", args.requests);
    let baseline = timed(&http, &format!("{base}/runs?limit=50"), None, Some(&token), args.requests).await?;
    report("  baseline: GET /runs?limit=50 (JSON API)", &baseline, None);
    for (what, path) in [
        ("/ui/runs", "/ui/runs".to_owned()),
        ("/ui/runs?job=job-7", "/ui/runs?job=job-7".to_owned()),
        ("/ui/runs?status=failed", "/ui/runs?status=failed".to_owned()),
        ("/ui/runs?job=job-7&status=failed", "/ui/runs?job=job-7&status=failed".to_owned()),
        ("/ui/runs?before=<middle>", format!("/ui/runs?before={}", middle.0)),
        ("/ui/runs?job=job-7&status=queued (matches none)", "/ui/runs?job=job-7&status=queued".to_owned()),
        ("/ui/runs?branch=branch-3&event=push", "/ui/runs?branch=branch-3&event=push".to_owned()),
    ] {
        let spent = timed(&http, &format!("{base}{path}"), Some(&cookie), None, args.requests).await?;
        report(&format!("  {what}"), &spent, Some(&baseline));
    }

    console(args, &dir, url, prefix, &base, &token, &cookie, &master).await?;
    processes::stop(master, Duration::from_secs(5)).await;
    Ok(())
}

/// Writes `count` finished runs spread over the jobs, a day apart in all, with mixed statuses,
/// events and branches, as the store would have them.
async fn seed_runs(pool: &sqlx::PgPool, count: usize) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO runs (id, job, status, attempt, queue, branch_name, parameters, spec, triggered_by,
                           created_at, queued_at, published_at, started_at, finished_at, updated_at, message, exit_code, event)
         SELECT (lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7'
                 || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid,
                'job-' || (i % $2), s, 1, 'default', 'branch-' || (i % 37), '{}', '{}', 'bench',
                at, at, at, at + interval '1 second', at + make_interval(secs => 2 + i % 300), at, 'seeded',
                CASE WHEN s = 'succeeded' THEN 0 ELSE 1 END,
                (ARRAY['api', 'push', 'pull_request', 'schedule'])[1 + i % 4]
         FROM generate_series(1, $1) AS i,
              LATERAL (SELECT now() - make_interval(secs => ($1 - i) * 86400.0 / $1) AS at,
                              (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'succeeded',
                                     'aborted', 'succeeded', 'timed_out', 'succeeded', 'error'])[1 + (i / $2) % 10] AS s) AS r",
    )
    .bind(count as i64)
    .bind(JOBS as i64)
    .execute(pool)
    .await
    .context("seeding runs")?;
    sqlx::query("ANALYZE runs").execute(pool).await?;
    Ok(())
}

/// Milliseconds each of `count` sequential GETs took to the end of its body.
async fn timed(
    http: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    bearer: Option<&str>,
    count: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut spent = Vec::with_capacity(count);
    for _ in 0..count {
        let mut request = http.get(url);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let began = Instant::now();
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        spent.push(began.elapsed().as_secs_f64() * 1000.0);
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body));
        }
    }
    spent.sort_by(f64::total_cmp);
    Ok(spent)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn report(what: &str, spent: &[f64], baseline: Option<&[f64]>) {
    let (p50, p95, p99) = (percentile(spent, 0.5), percentile(spent, 0.95), percentile(spent, 0.99));
    let ratio =
        baseline.map(|base| format!("  ({:.2}x the baseline's p95)", p95 / percentile(base, 0.95))).unwrap_or_default();
    println!("{what}: {p50:.1} / {p95:.1} / {p99:.1} ms{ratio}");
}

/// The master's resident memory now and at its peak, in MiB.
fn memory(master: &tokio::process::Child) -> anyhow::Result<(f64, f64)> {
    let pid = master.id().context("the master has exited")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

#[allow(clippy::too_many_arguments)]
async fn console(
    args: &Args,
    dir: &std::path::Path,
    url: &str,
    prefix: &str,
    base: &str,
    token: &str,
    cookie: &str,
    master: &tokio::process::Child,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build()?;
    let agent = processes::start_agent(dir, &format!("{prefix}-agent"), url, prefix, &[])?;
    // Lines of 100 bytes with a colour code in each, as a chatty build prints them.
    let lines = args.console_mib * 1024 * 1024 / 100;
    let script = format!(
        "i=0; while [ $i -lt {lines} ]; do printf '\\033[32mok\\033[0m line %08d of a long build log, padded to about a hundred bytes ......\\n' $i; i=$((i+1)); done"
    );
    let job = json!({"kind": "freestyle", "image": "busybox:latest", "script": script, "timeoutSeconds": 1800});
    http.put(format!("{base}/jobs/big")).bearer_auth(token).json(&job).send().await?.error_for_status()?;
    let run: serde_json::Value = http
        .post(format!("{base}/jobs/big/runs"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let path = run["links"]["self"].as_str().context("run link")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let run: serde_json::Value = http.get(format!("{base}{path}")).bearer_auth(token).send().await?.json().await?;
        let done = run["status"] != "queued" && run["status"] != "running";
        let listed: serde_json::Value =
            http.get(format!("{base}{path}/results")).bearer_auth(token).send().await?.json().await?;
        let stored = listed["results"]
            .as_array()
            .is_some_and(|all| all.iter().any(|r| r["kind"] == "console" && r["state"] == "stored"));
        if done && stored {
            break;
        }
        if Instant::now() > deadline {
            bail!("the large-console run did not end in time: {run}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    processes::stop(agent, Duration::from_secs(10)).await;

    let (rss_before, _) = memory(master)?;
    let began = Instant::now();
    let raw = http.get(format!("{base}{path}/results/console")).bearer_auth(token).send().await?.bytes().await?;
    let raw_seconds = began.elapsed().as_secs_f64();
    println!(
        "console of {:.1} MiB ({} lines), stored in S3:",
        raw.len() as f64 / (1 << 20) as f64,
        raw.iter().filter(|b| **b == b'\n').count()
    );
    println!("  baseline: raw log downloaded (GET …/results/console): {:.2} s", raw_seconds);

    let page = timed(&http, &format!("{base}/ui{path}"), Some(cookie), None, 20).await?;
    println!("  run page: {:.1} ms p50, {:.1} ms p95", percentile(&page, 0.5), percentile(&page, 0.95));

    let began = Instant::now();
    let mut response =
        http.get(format!("{base}/ui{path}/console")).header("cookie", cookie).send().await?.error_for_status()?;
    let (mut first, mut bytes, mut events, mut peak_rss) = (None, 0usize, 0usize, rss_before);
    while let Some(chunk) = response.chunk().await? {
        if first.is_none() && chunk.windows(11).any(|w| w == b"event: line") {
            first = Some(began.elapsed());
        }
        events += chunk.windows(12).filter(|w| *w == b"event: lines").count();
        bytes += chunk.len();
        if events % 16 == 0 {
            peak_rss = peak_rss.max(memory(master)?.0);
        }
    }
    let whole = began.elapsed().as_secs_f64();
    let (rss_after, _) = memory(master)?;
    let first = first.context("no console event came")?;
    println!("  first console event after the stream opened: {:.1} ms", first.as_secs_f64() * 1000.0);
    println!(
        "  whole log as events: {:.2} s, {events} events, {:.1} MiB of HTML ({:.2}x the raw download's time)",
        whole,
        bytes as f64 / (1 << 20) as f64,
        whole / raw_seconds
    );
    println!(
        "  master resident memory: {rss_before:.0} MiB before, {peak_rss:.0} MiB at most while streaming, {rss_after:.0} MiB after (the log is {:.0} MiB)",
        raw.len() as f64 / (1 << 20) as f64
    );
    Ok(())
}
