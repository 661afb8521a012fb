//! Why an attempt could not run its job: each message says what to fix, and ends up in the run's
//! `message` and its console.

use cimaster_common::secrets::SecretError;

use crate::docker::DockerError;

#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The claimed spec cannot be executed as it is.
    #[error("{0}")]
    Plan(String),
    #[error("the job uses secrets, but this agent has no CIMASTER_SECRETS_KEY")]
    NoSecretsKey,
    #[error("cannot read the job's secrets: {0}")]
    ReadSecrets(#[source] sqlx::Error),
    #[error("secret `{name}` is not set for job `{job}`; set it with PUT /jobs/{job}/secrets/{name}")]
    SecretNotSet { name: String, job: String },
    #[error("secret `{name}`: {source}")]
    SecretUnreadable { name: String, source: SecretError },
    #[error("{0}")]
    Cluster(String),
    #[error("cluster {0} lost its lease at once")]
    ClusterLeaseGone(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
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
