//! Run creation: the one way a run comes to be, whoever asks (the API, the test-cluster pool's
//! `createcluster`, and webhooks and schedules). A run is committed to Postgres before the caller
//! hears of it; publishing to RabbitMQ follows, and a run the broker could not take is published
//! later by the dispatcher.

mod cache;
mod plan;
mod repo_config;

use std::sync::Arc;

use cimaster_common::secrets::SecretBox;
use cimaster_common::{Cause, JobName, JobSpec, QueueName, RunId, RunMessage, TriggerRequest};
use cimaster_store::jobs;
use cimaster_store::runs::{self, NewRun, Run};
use sqlx::PgPool;
use tracing::Instrument;

pub use cache::{CachedJob, JobCache};

use crate::broker::Broker;
use crate::dispatch::ConfirmLog;
use crate::repo::RepoReader;

/// Why a run was not created.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("job `{0}` does not exist; create it with PUT /jobs/{0}")]
    JobNotFound(JobName),
    /// The trigger does not fit the job, or the job's repository or config file is not usable.
    #[error("{0}")]
    Invalid(String),
    #[error("Idempotency-Key was already used for run {0} with a different body; use a new key")]
    KeyReused(uuid::Uuid),
    #[error("job `{0}` kept changing while the run was created; retry")]
    JobChanging(JobName),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// What to run, for whom.
pub struct Trigger<'a> {
    pub job: &'a JobName,
    pub request: &'a TriggerRequest,
    /// Who or what asked (a token's subject, `github`, `schedule`).
    pub by: &'a str,
    /// The same key returns the run it created first.
    pub idempotency_key: Option<&'a str>,
    /// The run this one repeats (`POST …/rerun`).
    pub rerun_of: Option<Repeats<'a>>,
    /// Why: the API, a webhook's event, a schedule.
    pub cause: &'a Cause,
    /// The branch a signed push moved to the commit asked for: the run is on that branch.
    pub pushed_branch: Option<&'a str>,
}

/// The run a rerun repeats: its id, and the branch its commit came from (the rerun asks for the
/// commit itself, and keeps the branch's name beside it).
#[derive(Clone, Copy)]
pub struct Repeats<'a> {
    pub run: RunId,
    pub branch_name: Option<&'a str>,
}

/// A new run, or the one an earlier trigger with the same idempotency key created.
pub enum Created {
    New(Run),
    Replayed(Run),
}

/// Creates runs. Cheap to clone; one per replica.
#[derive(Clone)]
pub struct Triggers {
    pub pool: PgPool,
    pub broker: Broker,
    pub confirms: ConfirmLog,
    /// Shared with the API, which forgets a job when it changes.
    pub jobs: JobCache,
    pub repos: Arc<RepoReader>,
    pub secrets: Option<SecretBox>,
    pub max_timeout_seconds: u32,
    /// The code host's API: a GitHub App's installation token reads subscribed repositories.
    pub host: Option<Arc<dyn crate::codehost::CodeHost>>,
}

impl Triggers {
    /// Creates a run (or finds the one an earlier trigger with the same idempotency key created)
    /// and publishes it.
    pub async fn create(&self, trigger: &Trigger<'_>) -> Result<Created, TriggerError> {
        let hash = trigger.idempotency_key.map(|_| plan::request_hash(trigger.request));
        for _ in 0..3 {
            let job = self.current_job(trigger.job).await?;
            if let Some(existing) = self.replayed(trigger, hash.as_deref()).await? {
                return Ok(Created::Replayed(existing));
            }
            if let Some(run) = self.insert(trigger, &job, hash.as_deref()).await? {
                self.publish(trigger, &run).await?;
                return Ok(Created::New(run));
            }
            // Either a trigger with the same key won the race, or the job changed or was deleted
            // between reading it and the insert.
            if let Some(existing) = self.replayed(trigger, hash.as_deref()).await? {
                return Ok(Created::Replayed(existing));
            }
            self.jobs.forget(trigger.job);
        }
        Err(TriggerError::JobChanging(trigger.job.clone()))
    }

    /// The job as it is now. Git jobs are always read afresh: their repository is read before the
    /// insert verifies the version, and reading it with another replica's stale settings would
    /// refuse the trigger.
    async fn current_job(&self, name: &JobName) -> Result<CachedJob, TriggerError> {
        match self.jobs.get(name) {
            Some(cached) if !matches!(*cached.spec, JobSpec::Git(_)) => Ok(cached),
            _ => {
                let job = jobs::get(&self.pool, name).await?.ok_or_else(|| TriggerError::JobNotFound(name.clone()))?;
                let cached = CachedJob { spec: Arc::new(job.spec), version: job.version, updated_at: job.updated_at };
                Ok(self.jobs.put(name, cached))
            }
        }
    }

    /// Plans the run against this version of the job and inserts it; `None` if the job changed
    /// meanwhile or the idempotency key is taken.
    async fn insert(
        &self,
        trigger: &Trigger<'_>,
        job: &CachedJob,
        hash: Option<&str>,
    ) -> Result<Option<Run>, TriggerError> {
        let parameters = plan::parameters(trigger.job, &job.spec, trigger.request)?;
        let resolved = match job.spec.as_ref() {
            JobSpec::Git(git) => Some(self.resolve(trigger, git).await?),
            JobSpec::Freestyle(_) => None,
        };
        let queue = resolved.as_ref().and_then(|resolved| resolved.config.queue.as_ref()).unwrap_or(job.spec.queue());
        let commit_sha = match &resolved {
            Some(resolved) => Some(resolved.commit.as_str()),
            None => trigger.request.commit_sha.as_ref().map(|sha| sha.as_str()),
        };
        let config = resolved
            .as_ref()
            .map(|resolved| serde_json::to_value(&resolved.config))
            .transpose()
            .map_err(|err| TriggerError::Internal(err.into()))?;
        let new = NewRun {
            job: trigger.job,
            queue: queue.as_str(),
            commit_sha,
            branch_name: trigger
                .request
                .branch_name
                .as_ref()
                .map(|branch| branch.as_str())
                .or(trigger.pushed_branch)
                .or(trigger.rerun_of.and_then(|repeats| repeats.branch_name)),
            parameters: &parameters,
            triggered_by: trigger.by,
            idempotency_key: trigger.idempotency_key,
            request_hash: hash,
            config,
            job_version: job.version,
            job_updated_at: job.updated_at,
            rerun_of: trigger.rerun_of.map(|repeats| repeats.run),
            cause: trigger.cause,
            tip_of: resolved.as_ref().map_or(&[], |resolved| resolved.tip_of.as_slice()),
        };
        Ok(runs::insert(&self.pool, &new).await?)
    }

    /// The run an earlier trigger with this key created, if the body was the same.
    async fn replayed(&self, trigger: &Trigger<'_>, hash: Option<&str>) -> Result<Option<Run>, TriggerError> {
        let (Some(key), Some(hash)) = (trigger.idempotency_key, hash) else { return Ok(None) };
        match runs::find_by_key(&self.pool, trigger.job, key).await? {
            Some((run, stored)) if stored.as_deref() == Some(hash) => Ok(Some(run)),
            Some((run, _)) => Err(TriggerError::KeyReused(run.id)),
            None => Ok(None),
        }
    }

    /// Publishes the new run; one the broker does not confirm stays for the dispatcher.
    async fn publish(&self, trigger: &Trigger<'_>, run: &Run) -> Result<(), TriggerError> {
        let id = RunId(run.id);
        let span = tracing::info_span!("trigger", run_id = %id, job = %trigger.job);
        let queue: QueueName =
            run.queue.parse().map_err(|err| TriggerError::Internal(anyhow::anyhow!("run {id}: {err}")))?;
        metrics::counter!("cimaster_runs_created_total", "queue" => queue.to_string()).increment(1);
        let message = RunMessage { run_id: id, job: trigger.job.clone(), attempt: 1, queue };
        match self.broker.publish(&message).instrument(span.clone()).await {
            Ok(()) => self.confirms.confirmed(id),
            Err(err) => {
                metrics::counter!("cimaster_publish_failures_total").increment(1);
                span.in_scope(|| tracing::warn!(error = %err, "run recorded; the dispatcher will publish it"));
            }
        }
        span.in_scope(|| tracing::info!(by = %trigger.by, "run triggered"));
        Ok(())
    }
}
