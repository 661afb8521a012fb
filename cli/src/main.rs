//! `cim`: the CIMaster command-line client. Talks to the master's REST API only.

mod client;
mod commands;
mod config;
mod error;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::client::Api;
use crate::commands::{jobs, pool, runs, secrets, session};
use crate::error::{failed, Result};

#[derive(Parser)]
#[command(name = "cim", version, about = "The CIMaster command-line client", max_term_width = 100)]
struct Cli {
    /// The master's URL (else CIMASTER_URL, else the current context).
    #[arg(long, global = true, env = "CIMASTER_URL", hide_env_values = true)]
    url: Option<String>,
    /// A bearer token (else CIMASTER_TOKEN, else the current context). Prefer the variable or
    /// `cim login`: a flag shows in the process list.
    #[arg(long, global = true, env = "CIMASTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The context to use instead of the current one.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trigger a run of a job, and optionally follow its log or wait for it.
    Run(runs::RunArgs),
    /// Run again: the same commit, branch and parameters as an earlier run.
    Rerun(runs::RerunArgs),
    /// Print a run's console log (`-f` follows it live).
    Logs(runs::LogsArgs),
    /// Abort a queued or running run.
    Abort(runs::RunRef),
    /// List and show runs.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// A run's result files, or its failed tests (`results junit RUN`).
    Results(runs::ResultsArgs),
    /// Download a run's artifact.
    #[command(subcommand)]
    Artifacts(runs::ArtifactsCommand),
    /// Apply, list, show and delete job definitions.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// A job's secrets (values are read from stdin and never printed).
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// The test-cluster pool: list, lease, release, hold, report, import.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Save a master's URL and a token (read from stdin or a prompt) as a named context.
    Login(session::LoginArgs),
    /// List the saved contexts or choose the current one.
    #[command(subcommand)]
    Context(session::ContextCommand),
    /// Who the token says you are: subject, roles and expiry.
    Whoami(session::WhoamiArgs),
    /// Print a shell completion script: `cim completion bash > /etc/bash_completion.d/cim`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cim: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cim: {err}");
            err.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let connect = Connect { url: cli.url, token: cli.token, context: cli.context };
    match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "cim", &mut std::io::stdout());
            Ok(())
        }
        Command::Login(args) => session::login(connect.url.as_deref(), args).await,
        Command::Context(command) => session::context(command),
        Command::Whoami(args) => session::whoami(&connect.token()?, &args),
        Command::Run(args) => runs::run(&connect.api()?, args).await,
        Command::Rerun(args) => runs::rerun(&connect.api()?, args).await,
        Command::Logs(args) => runs::logs(&connect.api()?, args).await,
        Command::Abort(run) => runs::abort(&connect.api()?, run).await,
        Command::Runs(command) => runs::runs(&connect.api()?, command).await,
        Command::Results(args) => runs::results(&connect.api()?, args).await,
        Command::Artifacts(command) => runs::artifacts(&connect.api()?, command).await,
        Command::Jobs(command) => jobs::jobs(&connect.api()?, command).await,
        Command::Secrets(command) => secrets::secrets(&connect.api()?, command).await,
        Command::Pool(command) => pool::pool(&connect.api()?, command).await,
    }
}

/// Where to connect: flags, else the environment (both through clap), else the saved context.
struct Connect {
    url: Option<String>,
    token: Option<String>,
    context: Option<String>,
}

impl Connect {
    fn api(&self) -> Result<Api> {
        // Flags or the environment name both: no need for the file.
        if let (Some(url), Some(token), None) = (&self.url, &self.token, &self.context) {
            return Api::new(url, Some(token.clone()));
        }
        let saved = config::ConfigFile::load()?;
        let context = saved.context(self.context.as_deref());
        if let (Some(name), None) = (&self.context, context) {
            return Err(failed(format!("no context `{name}`: `cim context ls` lists them")));
        }
        let url = match (&self.url, context) {
            (Some(url), _) => url.clone(),
            (None, Some((_, context))) => context.url.clone(),
            (None, None) => {
                return Err(failed(
                    "no master given: pass --url, set CIMASTER_URL, or save one with `cim login --url URL`",
                ))
            }
        };
        let token = self.token.clone().or_else(|| context.map(|(_, context)| context.token.clone()));
        Api::new(&url, token)
    }

    fn token(&self) -> Result<String> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let saved = config::ConfigFile::load()?;
        saved
            .context(self.context.as_deref())
            .map(|(_, context)| context.token.clone())
            .ok_or_else(|| failed("no token: set CIMASTER_TOKEN or run `cim login --url URL`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_are_well_formed() {
        Cli::command().debug_assert();
    }
}
