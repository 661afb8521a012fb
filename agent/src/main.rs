//! `cimaster-agent`: executes runs. SIGTERM drains (running jobs finish, up to the drain grace);
//! a second SIGTERM aborts them.

use cimaster_agent::{AgentConfig, Shutdown};
use cimaster_common::logging::LogArgs;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(name = "cimaster-agent", version, about = "CIMaster agent: runs jobs in Docker")]
struct Cli {
    #[command(flatten)]
    config: AgentConfig,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init();
    let shutdown = Shutdown::default();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let Ok(mut terminate) = signal(SignalKind::terminate()) else { return };
        let Ok(mut interrupt) = signal(SignalKind::interrupt()) else { return };
        tokio::select! { _ = terminate.recv() => {}, _ = interrupt.recv() => {} }
        tracing::info!("draining: no new runs; a second signal aborts running ones");
        signals.drain.cancel();
        tokio::select! { _ = terminate.recv() => {}, _ = interrupt.recv() => {} }
        tracing::info!("aborting running jobs");
        signals.abort.cancel();
    });
    cimaster_agent::run(cli.config, shutdown).await
}
