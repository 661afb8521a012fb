//! The product's own executables as the benchmarks start them: a database of the benchmark's own,
//! a master on a free port, agents with their ids, and stopping them as Kubernetes would.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

/// A database made for one benchmark run and dropped by [`ScratchDatabase::drop_now`].
pub struct ScratchDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `cimaster_bench_<suffix>` on the server of `admin_url`.
    pub async fn create(admin_url: &str, suffix: &str) -> anyhow::Result<Self> {
        let name = format!("cimaster_bench_{suffix}");
        let (server, _) = admin_url.rsplit_once('/').context("database URL has no database name")?;
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
        Ok(Self { admin_url: admin_url.to_owned(), url: format!("{server}/{name}"), name })
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut admin).await?;
        Ok(())
    }
}

/// The directory of the running executable: the product's binaries are built next to it.
pub fn binaries() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.parent().context("binary directory")?.to_owned())
}

/// Starts a master on a free port (more settings in `env`) and waits until it is ready; returns it
/// and its base URL.
pub async fn start_master(
    dir: &Path,
    database_url: &str,
    prefix: &str,
    secret: &str,
    env: &[(&str, String)],
) -> anyhow::Result<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let master = Command::new(dir.join("cimaster"))
        .arg("serve")
        .env("CIMASTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CIMASTER_DATABASE_URL", database_url)
        .env("CIMASTER_QUEUE_PREFIX", prefix)
        .env("CIMASTER_JWT_SECRET", secret)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the master")?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            return Ok((master, base));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the master did not become ready")
}

/// Starts an agent with this id (more settings in `env`).
pub fn start_agent(
    dir: &Path,
    id: &str,
    database_url: &str,
    prefix: &str,
    env: &[(&str, String)],
) -> anyhow::Result<Child> {
    Command::new(dir.join("cimaster-agent"))
        .env("CIMASTER_AGENT_ID", id)
        .env("CIMASTER_DATABASE_URL", database_url)
        .env("CIMASTER_QUEUE_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting an agent")
}

/// Sends `signal` (`TERM`, `KILL`) to a child process.
pub fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the process has exited")?;
    let status = std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status()?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
pub async fn stop(mut child: Child, grace: Duration) {
    if signal(&child, "TERM").is_ok() && tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return;
    }
    let _ = child.kill().await;
}

/// Where the benchmarks' services are (from the environment `scripts/bench` sets).
#[derive(clap::Args)]
pub struct Services {
    #[arg(long, env = "CIMASTER_DATABASE_URL")]
    pub database_url: String,
    #[arg(long, env = "CIMASTER_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
}

/// A benchmark's own database and queue prefix, removed with everything in them at the end.
pub struct Scratch {
    pub database: ScratchDatabase,
    pub prefix: String,
}

impl Scratch {
    pub async fn create(services: &Services) -> anyhow::Result<Scratch> {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let database = ScratchDatabase::create(&services.database_url, suffix).await?;
        Ok(Scratch { database, prefix: format!("bench-{suffix}") })
    }

    /// Drops the database and deletes the queues the prefix declared.
    pub async fn remove(self, services: &Services) -> anyhow::Result<()> {
        self.database.drop_now().await.context("dropping the benchmark's database")?;
        let amqp_url = secrecy::SecretString::from(services.amqp_url.clone());
        if let Err(err) = cimaster_amqp::delete_prefix(&amqp_url, &self.prefix, &["default"]).await {
            eprintln!("cannot delete the benchmark's queues: {err}");
        }
        Ok(())
    }
}
