//! `cimaster-bench-git`: git runs on a repository of realistic size. Builds one locally (by default
//! 20,000 commits and about 200 MB of history, written with `git fast-import`), serves it with
//! `git daemon`, and measures for a first run and later runs (`--repeats`, each after a new commit)
//! of a git job on one agent: the checkout (as the git helper's checkout reports it) and trigger →
//! the job's first line, medians and ranges; a first and a second
//! image build (after a change to the source tree); then the master's trigger latency once the
//! config file was read, with the agent stopped. Baselines in the same run: `git clone` and
//! `git clone --depth 1` of the same repository, and `docker run --rm` of the job's image, the
//! latter two as many times as the later runs.
//!
//! Needs the release binaries next to this one, a Docker engine and CIMASTER_DATABASE_URL,
//! CIMASTER_AMQP_URL and the CIMASTER_S3_* variables (`scripts/bench git` sets everything up).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cimaster_e2e::processes::{self, Scratch, Services};
use cimaster_master::auth::{Role, Signer};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20_000)]
    commits: usize,
    /// Bytes of new, incompressible content per commit (20,000 × 10 KiB ≈ 200 MB of history).
    #[arg(long, default_value_t = 10 * 1024)]
    bytes_per_commit: usize,
    /// Triggers timed for the master's latency.
    #[arg(long, default_value_t = 50)]
    triggers: usize,
    /// Later runs on the same agent (each after a new commit), and samples of each baseline.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value = "busybox:latest")]
    image: String,
    #[command(flatten)]
    services: Services,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = Scratch::create(&args.services).await?;
    let prefix = scratch.prefix.clone();
    let work = std::env::temp_dir().join(format!("cimaster-{prefix}"));
    std::fs::create_dir_all(&work)?;
    let result = run(&args, &work, &scratch.database.url, &prefix).await;
    scratch.remove(&args.services).await?;
    let _ = std::fs::remove_dir_all(&work);
    // The agent's mirror of the benchmark's repository, its git helper if the agent did not stop.
    let filter = format!("label=cimaster.agent={prefix}-agent");
    let _ = Command::new("sh")
        .args([
            "-c",
            &format!(
                "docker ps -aq --filter {filter} | xargs -r docker rm -f >/dev/null; \
                 docker volume ls -q --filter {filter} | xargs -r docker volume rm -f >/dev/null"
            ),
        ])
        .status();
    result
}

async fn run(args: &Args, work: &Path, url: &str, prefix: &str) -> anyhow::Result<()> {
    let began = Instant::now();
    let repo = build_repository(args, &work.join("repos/big"))?;
    let size = du(&repo.join(".git"))?;
    println!(
        "repository: {} commits, {:.0} MB of history, built in {:.1} s",
        args.commits,
        size as f64 / 1e6,
        began.elapsed().as_secs_f64()
    );
    let host = bridge_gateway()?;
    let (mut daemon, repo_url) = serve(&work.join("repos"), &host)?;

    let clone = timed(|| git(work, &["clone", "--quiet", "--mirror", &repo_url, "clone-full"]))?;
    let mut shallow = Samples::default();
    let mut docker_run = Samples::default();
    for sample in 0..args.repeats.max(1) {
        let into = format!("clone-shallow-{sample}");
        shallow.push(timed(|| git(work, &["clone", "--quiet", "--depth", "1", &repo_url, &into]))?.as_secs_f64());
        docker_run.push(timed(|| sh(&format!("docker run --rm {} echo hello >/dev/null", args.image)))?.as_secs_f64());
    }
    println!(
        "baselines: git clone {:.2} s, git clone --depth 1 {}, docker run --rm {}",
        clone.as_secs_f64(),
        shallow.summary(),
        docker_run.summary()
    );

    let dir = processes::binaries()?;
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let env = [("CIMASTER_SECRETS_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_owned())];
    let (master, base) = processes::start_master(&dir, url, prefix, &secret, &env).await?;
    let agent = processes::start_agent(&dir, &format!("{prefix}-agent"), url, prefix, &env)?;
    let token = Signer::hs256(&secret)?.mint("bench", &[Role::Admin], Duration::from_secs(3600));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let job = json!({"kind": "git", "repository": repo_url});
    let put = http.put(format!("{base}/jobs/big")).bearer_auth(&token).json(&job).send().await?;
    if !put.status().is_success() {
        bail!("PUT /jobs/big: {}", put.text().await?);
    }

    let (checkout, first_line) = one_run(&http, &base, &token).await?;
    println!("first run: checkout {checkout:.2} s, trigger → first job line {first_line:.2} s");
    let (mut checkouts, mut first_lines) = (Samples::default(), Samples::default());
    for later in 0..args.repeats.max(1) {
        // A new commit since the run before: the mirror fetches only it.
        commit(&repo, "later.txt", &format!("change {later} after the first run"))?;
        let (checkout, first_line) = one_run(&http, &base, &token).await?;
        checkouts.push(checkout);
        first_lines.push(first_line);
    }
    println!(
        "later runs ({}, each after a new commit): checkout {}, trigger → first job line {}",
        args.repeats.max(1),
        checkouts.summary(),
        first_lines.summary()
    );
    let floor = shallow.median() + docker_run.median();
    println!(
        "later runs against `git clone --depth 1` + `docker run` (medians): {:.2} s vs {:.2} s, ratio {:.2}",
        first_lines.median(),
        floor,
        first_lines.median() / floor
    );

    image_builds(&http, &base, &token, &repo, &repo_url).await?;

    // The master's own work: with the agent stopped, the triggered runs wait in the queue instead
    // of taking the two cores the master runs on.
    processes::stop(agent, Duration::from_secs(5)).await;
    let mut latencies = Vec::new();
    for _ in 0..args.triggers {
        let sent = Instant::now();
        let reply = http
            .post(format!("{base}/jobs/big/runs"))
            .bearer_auth(&token)
            .json(&json!({"branchName": "main"}))
            .send()
            .await?;
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        if reply.status() != 201 {
            bail!("trigger answered {}", reply.status());
        }
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "trigger latency after the first read: p50 {:.1} ms, p95 {:.1} ms ({} triggers, agent stopped)",
        at(0.5),
        at(0.95),
        args.triggers
    );

    processes::stop(master, Duration::from_secs(5)).await;
    let _ = daemon.kill();
    let _ = daemon.wait();
    Ok(())
}

/// A job that builds its image from the repository's Dockerfile: the first build, then a second
/// one of the same Dockerfile after a change to the source tree, which the engine's layer cache
/// shortens to the steps after the change.
async fn image_builds(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    repo: &Path,
    repo_url: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(repo.join("docker"))?;
    // A step of this benchmark's own, so no earlier run's layers stand in for the first build.
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let dockerfile = format!("FROM busybox:latest\nRUN sleep 3 && echo {nonce} > /dependencies\nCOPY . /src\n");
    commit(repo, "docker/ci.Dockerfile", &dockerfile)?;
    commit(repo, ".image.yml", "build: {dockerfile: docker/ci.Dockerfile}\nscript: echo job-started\n")?;
    let job = json!({"kind": "git", "repository": repo_url, "configPath": ".image.yml"});
    let name = format!("image-{}", &nonce[..8]);
    let put = http.put(format!("{base}/jobs/{name}")).bearer_auth(token).json(&job).send().await?;
    if !put.status().is_success() {
        bail!("PUT /jobs/{name}: {}", put.text().await?);
    }
    let mut builds = Vec::new();
    for round in 0..2 {
        if round == 1 {
            commit(repo, "data/file0.txt", "a change to the source tree")?;
        }
        let console = finished_console(http, base, token, &name).await?;
        let at = |needle: &str| {
            console
                .lines()
                .find(|line| line.contains(needle))
                .and_then(|line| line.split(' ').next()?.parse::<chrono::DateTime<chrono::Utc>>().ok())
        };
        let (Some(began), Some(ended)) = (at("] building "), at(" runs attempt ")) else {
            bail!("no build in the console:\n{console}");
        };
        builds.push(((ended - began).num_milliseconds() as f64 / 1000.0, console.contains("Using cache")));
    }
    println!(
        "image build: first {:.2} s, second with a changed source tree {:.2} s (layer cache used: {})",
        builds[0].0, builds[1].0, builds[1].1
    );
    let _ = sh(&format!("docker images -q --filter label=cimaster.job={name} | xargs -r docker rmi -f >/dev/null"));
    Ok(())
}

/// Seconds measured several times.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, seconds: f64) {
        self.0.push(seconds);
        self.0.sort_by(f64::total_cmp);
    }

    fn median(&self) -> f64 {
        let n = self.0.len();
        if n % 2 == 1 {
            self.0[n / 2]
        } else {
            (self.0[n / 2 - 1] + self.0[n / 2]) / 2.0
        }
    }

    /// `0.42 s (0.40–0.51)`: the median and the range.
    fn summary(&self) -> String {
        format!("{:.2} s ({:.2}–{:.2})", self.median(), self.0[0], self.0[self.0.len() - 1])
    }
}

/// Triggers a run of the job's main, waits for its success and returns its console.
async fn finished_console(http: &reqwest::Client, base: &str, token: &str, job: &str) -> anyhow::Result<String> {
    let reply: Value = http
        .post(format!("{base}/jobs/{job}/runs"))
        .bearer_auth(token)
        .json(&json!({"branchName": "main"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let path = reply["links"]["self"].as_str().context("a run link")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let run: Value = http.get(format!("{base}{path}")).bearer_auth(token).send().await?.json().await?;
        match run["status"].as_str() {
            Some("succeeded") => break,
            Some("queued" | "running") => {}
            other => bail!("the run ended {other:?}: {run}"),
        }
        if Instant::now() > deadline {
            bail!("the run did not end within ten minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(http.get(format!("{base}{path}/results/console")).bearer_auth(token).send().await?.text().await?)
}

/// Triggers a run of main and waits for its end: the checkout's own time and trigger → the job's
/// first line (the time the agent read it).
async fn one_run(http: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<(f64, f64)> {
    let sent_at = chrono::Utc::now();
    let console = finished_console(http, base, token, "big").await?;
    let checkout_ms: f64 = console
        .lines()
        .find_map(|line| line.split("checkout took ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .with_context(|| format!("no checkout time in the console:\n{console}"))?;
    // Console lines carry the time the agent read them.
    let started: chrono::DateTime<chrono::Utc> = console
        .lines()
        .find_map(|line| line.strip_suffix(" job-started"))
        .and_then(|at| at.parse().ok())
        .with_context(|| format!("no job line in the console:\n{console}"))?;
    let first_line = (started - sent_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
    Ok((checkout_ms / 1000.0, first_line))
}

/// A repository of `commits` commits, each adding incompressible bytes to one of 100 files, with
/// the job config on main.
fn build_repository(args: &Args, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "--quiet", "-b", "main"])?;
    let mut import = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .context("git fast-import")?;
    let mut input = std::io::BufWriter::new(import.stdin.take().context("stdin")?);
    let config = "image: busybox:latest\nscript: echo job-started\n";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut content = vec![0u8; args.bytes_per_commit];
    for number in 0..args.commits {
        for byte in content.iter_mut() {
            // xorshift: cheap bytes that do not compress.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = (state & 0x3f) as u8 + b'0';
        }
        writeln!(input, "commit refs/heads/main")?;
        writeln!(input, "committer bench <bench@cimaster.test> {} +0000", 1_700_000_000 + number)?;
        let message = format!("commit {number}");
        writeln!(input, "data {}\n{message}", message.len())?;
        if number == 0 {
            writeln!(input, "M 100644 inline .cimaster.yml\ndata {}\n{config}", config.len())?;
        }
        writeln!(input, "M 100644 inline data/file{}.txt\ndata {}", number % 100, content.len())?;
        input.write_all(&content)?;
        writeln!(input)?;
    }
    input.flush()?;
    drop(input);
    if !import.wait()?.success() {
        bail!("git fast-import failed");
    }
    git(dir, &["checkout", "--quiet", "main"])?;
    git(dir, &["repack", "-a", "-d", "--quiet"])?;
    Ok(dir.to_owned())
}

fn commit(repo: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    std::fs::write(repo.join(file), text)?;
    git(repo, &["add", file])?;
    git(repo, &["-c", "user.email=bench@cimaster.test", "-c", "user.name=bench", "commit", "--quiet", "-m", "change"])?;
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("git").args(args).current_dir(dir).status().context("git")?;
    if !status.success() {
        bail!("git {args:?} failed");
    }
    Ok(())
}

fn sh(script: &str) -> anyhow::Result<()> {
    if !Command::new("sh").args(["-c", script]).status()?.success() {
        bail!("`{script}` failed");
    }
    Ok(())
}

fn timed(step: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let began = Instant::now();
    step()?;
    Ok(began.elapsed())
}

fn du(path: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").args(["-sb"]).arg(path).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("0").parse().unwrap_or(0))
}

/// This host's address on Docker's default bridge, which the git helper reaches.
fn bridge_gateway() -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(["network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Subnet}}"])
        .output()?;
    let subnet = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let network: std::net::Ipv4Addr = subnet.split('/').next().unwrap_or_default().parse().context("bridge subnet")?;
    Ok(std::net::Ipv4Addr::from(u32::from(network) + 1).to_string())
}

fn serve(base: &Path, host: &str) -> anyhow::Result<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind((host, 0))?.local_addr()?.port();
    let daemon = Command::new("git")
        .args(["daemon", "--reuseaddr", "--export-all"])
        .arg(format!("--base-path={}", base.display()))
        .arg(format!("--listen={host}"))
        .arg(format!("--port={port}"))
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect((host, port)).is_err() {
        if Instant::now() > deadline {
            bail!("git daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((daemon, format!("git://{host}:{port}/big")))
}
