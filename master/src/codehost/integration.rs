//! What the code-host loops share: run creation, and through it the host's API when one is
//! configured; and how they show a job's state on a commit.

use std::sync::Arc;

use cimaster_common::{Cause, JobName};
use cimaster_store::statuses;
use sqlx::PgPool;
use uuid::Uuid;

use super::{CodeHost, PullRequest, StatusState};
use crate::trigger::Triggers;

#[derive(Clone)]
pub struct Integration {
    pub triggers: Triggers,
}

impl Integration {
    pub fn pool(&self) -> &PgPool {
        &self.triggers.pool
    }

    /// The host's API; `None` without API credentials: webhooks still start runs, but no status is
    /// posted and comment commands cannot read their pull request.
    pub fn host(&self) -> Option<&Arc<dyn CodeHost>> {
        self.triggers.host.as_ref()
    }
}

impl Integration {
    /// Shows a fixed state on the pull request's head for the job (when statuses are posted).
    pub(super) async fn show(
        &self,
        job: &JobName,
        pull: &PullRequest,
        state: StatusState,
        description: &str,
    ) -> Result<(), sqlx::Error> {
        if self.host().is_none() {
            return Ok(());
        }
        self.show_at(job, &pull.repository, pull.head_sha.as_str(), state, description).await
    }

    /// Shows a fixed state on a commit for the job (when statuses are posted), cut to what the
    /// host keeps.
    pub(super) async fn show_at(
        &self,
        job: &JobName,
        repository: &str,
        sha: &str,
        state: StatusState,
        description: &str,
    ) -> Result<(), sqlx::Error> {
        if self.host().is_none() {
            return Ok(());
        }
        let context = super::context(job);
        let target = statuses::Target { repository, sha, context: &context };
        statuses::show(self.pool(), &target, state.as_str(), &super::report::clip(description)).await
    }

    /// Has the run's state shown on its commit (when statuses are posted).
    pub(super) async fn follow(&self, job: &JobName, cause: &Cause, sha: &str, run: Uuid) -> Result<(), sqlx::Error> {
        let (Some(_), Some(repository)) = (self.host(), &cause.repository) else { return Ok(()) };
        let context = super::context(job);
        let target = statuses::Target { repository, sha, context: &context };
        statuses::follow_run(self.pool(), &target, run).await
    }
}
