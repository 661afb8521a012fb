//! `cimaster-bench-scale`: the scaling scenario (`cimaster_e2e::scale`) at full size, on a database
//! and queue prefix of its own. Prints the agents over time, `lost:`, `double:` and `efficiency:`
//! lines, and exits 1 when a run was lost or ran twice.
//!
//! Needs the release binaries next to this one and CIMASTER_DATABASE_URL, CIMASTER_AMQP_URL and the
//! CIMASTER_S3_* variables (`scripts/bench scale` sets everything up).

use std::time::Duration;

use cimaster_e2e::processes::{self, Scratch, Services};
use cimaster_e2e::scale::{self, Environment, Scenario};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    min_agents: usize,
    #[arg(long, default_value_t = 4)]
    max_agents: usize,
    #[arg(long, default_value_t = 4)]
    runs_per_agent: usize,
    #[arg(long, default_value_t = 5)]
    max_seconds: u32,
    #[arg(long, default_value_t = 5)]
    bursts: usize,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    burst_every: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    cooldown: Duration,
    /// SIGKILL one agent and restart RabbitMQ once half the runs were triggered.
    #[arg(long)]
    chaos: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Leave out the `docker run` baseline.
    #[arg(long)]
    no_baseline: bool,
    #[command(flatten)]
    services: Services,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = Scratch::create(&args.services).await?;
    let environment = Environment {
        binaries: processes::binaries()?,
        database_url: scratch.database.url.clone(),
        prefix: scratch.prefix.clone(),
        dev_script: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev"),
    };
    let scenario = Scenario {
        runs: args.runs,
        min_agents: args.min_agents,
        max_agents: args.max_agents,
        runs_per_agent: args.runs_per_agent,
        max_seconds: args.max_seconds,
        bursts: args.bursts,
        burst_every: args.burst_every,
        cooldown: args.cooldown,
        chaos: args.chaos,
        lease: Duration::from_secs(10),
        seed: args.seed,
        deadline: args.deadline,
        baseline: !args.no_baseline,
    };
    let outcome = scale::run(&scenario, &environment).await;
    scratch.remove(&args.services).await?;
    let outcome = outcome?;
    outcome.print(&scenario);
    if outcome.lost > 0 || outcome.double > 0 {
        std::process::exit(1);
    }
    Ok(())
}
