//! Why an attempt could not run its job: each message says what to fix, and ends up in the run's
//! `message` and its console.

use crate::docker::DockerError;

#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The claimed spec cannot be executed as it is.
    #[error("{0}")]
    Plan(String),
    #[error("the job uses secrets, but this agent has no CIMASTER_SECRETS_KEY")]
    NoSecretsKey,
    #[error(transparent)]
    Secrets(#[from] cimaster_store::secrets::OpenError),
    #[error("{0}")]
    IdToken(String),
    #[error("{0}")]
    Cluster(String),
    #[error("cluster {0} lost its lease at once")]
    ClusterLeaseGone(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("no container was started: {0}")]
    Warden(String),
    #[error("starting the job container failed: {0}")]
    JobStart(#[source] tokio::task::JoinError),
    #[error("the checkout image is missing: {0}")]
    CheckoutImage(#[source] DockerError),
    #[error("the checkout of {commit} failed (git exited with {code})")]
    Checkout { commit: String, code: i64 },
    #[error("{0}")]
    Build(String),
    #[error("service `{name}`: {source}")]
    Service { name: String, source: DockerError },
    #[error("the probe image for readiness checks is missing: {0}")]
    ProbeImage(#[source] DockerError),
    #[error("cannot start the readiness probe: {0}")]
    Probe(#[source] DockerError),
    #[error("service `{name}` exited with code {code} before it was ready")]
    ServiceExited { name: String, code: i64 },
    #[error("service `{name}` was not ready after {seconds}s (last check: {last})")]
    NotReady { name: String, seconds: u64, last: String },
}
