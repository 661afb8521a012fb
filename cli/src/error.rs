//! What can go wrong, and the exit code each ending gives: scripts branch on them.

use std::process::ExitCode;

/// An ending other than success.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The CLI or the API refused or failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The master could not be reached (exit 1).
    #[error("cannot reach {url}: {reason}. Is the master running? Check --url, CIMASTER_URL or `cim context ls`")]
    Unreachable { url: String, reason: String },
    /// `--timeout` passed before the run ended (exit 3).
    #[error("{0}")]
    TimedOut(String),
    /// 401 or 403 (exit 4).
    #[error("{0}")]
    NotAuthorised(String),
    /// The run failed, errored or timed out (exit 5).
    #[error("{0}")]
    RunFailed(String),
    /// The run was aborted (exit 6).
    #[error("{0}")]
    RunAborted(String),
    /// Ctrl-C while following: the run goes on (exit 130, as for any program stopped by SIGINT).
    #[error("{0}")]
    Interrupted(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Failed(_) | CliError::Unreachable { .. } => 1,
            CliError::TimedOut(_) => 3,
            CliError::NotAuthorised(_) => 4,
            CliError::RunFailed(_) => 5,
            CliError::RunAborted(_) => 6,
            CliError::Interrupted(_) => 130,
        })
    }
}

pub fn failed(message: impl Into<String>) -> CliError {
    CliError::Failed(message.into())
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
