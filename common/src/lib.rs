//! Types shared by the CIMaster master and agent.
//!
//! Everything here is plain data with validation: job specs as stored by the API, the run state
//! machine, the message an agent takes from the queue, and the id newtypes. No web, queue or
//! container library is linked from here.

mod allowed;
mod cause;
mod egress;
pub mod id_token;
mod ids;
mod job;
#[cfg(feature = "logging")]
pub mod logging;
mod queue;
mod repo;
pub mod results;
mod run;
mod schedule;
mod secret_scope;
#[cfg(feature = "secrets")]
pub mod secrets;
#[cfg(feature = "storage")]
pub mod storage;
mod subscription;

pub use allowed::{pinned_by_digest, ImagePattern};
pub use cause::{Cause, RunEvent, UnknownEvent};
pub use egress::{Cidr, Egress};
pub use id_token::{IdTokenClaims, IdTokenSpec};
pub use ids::{BranchName, CommitSha, ConfigPath, EnvName, InvalidValue, JobName, QueueName, RepositoryUrl, RunId};
pub use job::{
    ClusterRequirement, FreestyleJob, GitJob, JobSpec, Memory, Resources, Script, BUILT_IMAGES, DEFAULT_TIMEOUT_SECONDS,
};
pub use queue::{dead_letter_exchange, dead_letter_queue, queue_name, run_queue_arguments, QueueArgument, RunMessage};
pub use repo::{BuildSpec, CheckoutSpec, ConfigError, HttpCheck, Readiness, RepoConfig, ServiceName, ServiceSpec};
pub use results::Results;
pub use run::{RunStatus, TriggerRequest, UnknownStatus};
pub use schedule::{CronExpr, Overlap, Schedule, TimeZone};
pub use secret_scope::SecretScope;
pub use subscription::{BranchFilter, BranchGlob, GithubSubscription, RepoFullName};
