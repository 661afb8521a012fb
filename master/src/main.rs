//! `cimaster`: the master server, its migrations and token minting.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cimaster_common::logging::LogArgs;
use cimaster_master::auth::{Role, Signer};
use cimaster_master::config::{Config, DatabaseConfig, JwtAlgorithm};
use cimaster_master::{db, shutdown_signal, Application};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cimaster", version, about = "CIMaster master: the REST API of the CI runner")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (configuration from CIMASTER_* variables).
    Serve(Box<Config>),
    /// Apply database migrations and exit.
    Migrate(DatabaseConfig),
    /// Mint an API token.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Who the token is for.
    #[arg(long)]
    sub: String,
    /// Role(s) to grant; repeat for several.
    #[arg(long, value_enum, required = true)]
    role: Vec<Role>,
    /// Lifetime, e.g. `24h`, `30d`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// HS256 shared secret (the master's CIMASTER_JWT_SECRET).
    #[arg(long, env = "CIMASTER_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// PEM private key for RS256 or EdDSA, instead of the secret.
    #[arg(long)]
    private_key: Option<PathBuf>,
    #[arg(long, value_enum, env = "CIMASTER_JWT_ALGORITHM")]
    algorithm: Option<JwtAlgorithm>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            cli.log.init();
            let app = Application::build(*config).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate(database) => {
            cli.log.init();
            let pool = db::pool(&database)?;
            db::migrate(&pool).await.context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Token(args) => {
            let signer = match (&args.private_key, args.algorithm, &args.secret) {
                (Some(path), Some(algorithm), _) => Signer::from_private_key(path, algorithm)?,
                (Some(_), None, _) => anyhow::bail!("--private-key needs --algorithm RS256 or EdDSA"),
                (None, _, Some(secret)) => Signer::hs256(secret)?,
                (None, _, None) => anyhow::bail!("give --secret (or CIMASTER_JWT_SECRET) or --private-key"),
            };
            println!("{}", signer.mint(&args.sub, &args.role, args.ttl));
            Ok(())
        }
    }
}
