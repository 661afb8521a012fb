//! The `runs` table as the API sees it: creating a run, reading, listing and aborting runs, and the
//! state the console and results endpoints read.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cimaster_common::{Cause, JobName, RunEvent, RunId, RunStatus};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

const COLUMNS: &str = "id, job, status, attempt, queue, commit_sha, branch_name, parameters, triggered_by, \
    agent, exit_code, message, abort_requested, created_at, published_at, started_at, finished_at, updated_at, config, rerun_of, \
    event, pull_request, sender, base_branch, base_sha, repository, from_fork";

/// A run as stored.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: Uuid,
    pub job: String,
    pub status: RunStatus,
    pub attempt: i32,
    pub queue: String,
    pub commit_sha: Option<String>,
    pub branch_name: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub triggered_by: String,
    pub agent: Option<String>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub abort_requested: bool,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub config: Option<serde_json::Value>,
    /// The run this one repeats.
    pub rerun_of: Option<Uuid>,
    pub cause: Cause,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: Uuid,
    job: String,
    #[sqlx(try_from = "String")]
    status: RunStatus,
    attempt: i32,
    queue: String,
    commit_sha: Option<String>,
    branch_name: Option<String>,
    parameters: Json<BTreeMap<String, String>>,
    triggered_by: String,
    agent: Option<String>,
    exit_code: Option<i32>,
    message: Option<String>,
    abort_requested: bool,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    config: Option<Json<serde_json::Value>>,
    rerun_of: Option<Uuid>,
    #[sqlx(flatten)]
    cause: CauseColumns,
}

/// A run's cause as its columns hold it (`event`, `pull_request`, `sender`, `base_branch`,
/// `base_sha`), for every row that carries one.
#[derive(sqlx::FromRow)]
pub(crate) struct CauseColumns {
    #[sqlx(try_from = "String")]
    event: RunEvent,
    pull_request: Option<i64>,
    sender: Option<String>,
    base_branch: Option<String>,
    base_sha: Option<String>,
    repository: Option<String>,
    from_fork: bool,
}

impl From<CauseColumns> for Cause {
    fn from(row: CauseColumns) -> Self {
        Cause {
            event: row.event,
            pull_request: row.pull_request,
            sender: row.sender,
            base_branch: row.base_branch,
            base_sha: row.base_sha,
            repository: row.repository,
            from_fork: row.from_fork,
        }
    }
}

impl From<RunRow> for Run {
    fn from(row: RunRow) -> Self {
        Run {
            id: row.id,
            job: row.job,
            status: row.status,
            attempt: row.attempt,
            queue: row.queue,
            commit_sha: row.commit_sha,
            branch_name: row.branch_name,
            parameters: row.parameters.0,
            triggered_by: row.triggered_by,
            agent: row.agent,
            exit_code: row.exit_code,
            message: row.message,
            abort_requested: row.abort_requested,
            created_at: row.created_at,
            published_at: row.published_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            updated_at: row.updated_at,
            config: row.config.map(|config| config.0),
            rerun_of: row.rerun_of,
            cause: row.cause.into(),
        }
    }
}

/// A run to insert, planned against one version of its job.
pub struct NewRun<'a> {
    pub job: &'a JobName,
    pub queue: &'a str,
    pub commit_sha: Option<&'a str>,
    pub branch_name: Option<&'a str>,
    pub parameters: &'a BTreeMap<String, String>,
    pub triggered_by: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: Option<&'a str>,
    /// Git runs: the job config file read at the commit.
    pub config: Option<serde_json::Value>,
    /// The job's `version` and `updated_at` the run was planned against.
    pub job_version: i64,
    pub job_updated_at: DateTime<Utc>,
    /// The run this one repeats.
    pub rerun_of: Option<RunId>,
    pub cause: &'a Cause,
    /// The branches whose tip the commit is (see `Claim::tip_of`).
    pub tip_of: &'a [String],
}

/// Inserts a queued run, in one statement: the job row is locked FOR SHARE while the run is
/// inserted, so a concurrent DELETE waits for it, and the version check makes sure the run was
/// planned against the job as it is now. `None`: the job changed or is gone, or a run with the same
/// idempotency key exists.
pub async fn insert(pool: &PgPool, run: &NewRun<'_>) -> Result<Option<Run>, sqlx::Error> {
    let row: Option<RunRow> = sqlx::query_as(&format!(
        "INSERT INTO runs (id, job, queue, commit_sha, branch_name, parameters, spec, triggered_by,
                           idempotency_key, request_hash, config, rerun_of,
                           event, pull_request, sender, base_branch, base_sha, repository, from_fork, tip_of)
         SELECT $1, name, $3, $4, $5, $6, spec, $7, $8, $9, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21
         FROM jobs
         WHERE name = $2 AND version = $10 AND updated_at = $11
         FOR SHARE
         ON CONFLICT (job, idempotency_key) DO NOTHING
         RETURNING {COLUMNS}"
    ))
    .bind(RunId::new().0)
    .bind(run.job.as_str())
    .bind(run.queue)
    .bind(run.commit_sha)
    .bind(run.branch_name)
    .bind(Json(run.parameters))
    .bind(run.triggered_by)
    .bind(run.idempotency_key)
    .bind(run.request_hash)
    .bind(run.job_version)
    .bind(run.job_updated_at)
    .bind(run.config.as_ref().map(Json))
    .bind(run.rerun_of.map(|id| id.0))
    .bind(run.cause.event.as_str())
    .bind(run.cause.pull_request)
    .bind(run.cause.sender.as_deref())
    .bind(run.cause.base_branch.as_deref())
    .bind(run.cause.base_sha.as_deref())
    .bind(run.cause.repository.as_deref())
    .bind(run.cause.from_fork)
    .bind(run.tip_of)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Run::from))
}

/// The run an earlier request with this idempotency key created, and the hash of that request.
pub async fn find_by_key(
    pool: &PgPool,
    job: &JobName,
    key: &str,
) -> Result<Option<(Run, Option<String>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Keyed {
        #[sqlx(flatten)]
        row: RunRow,
        request_hash: Option<String>,
    }
    let keyed: Option<Keyed> =
        sqlx::query_as(&format!("SELECT {COLUMNS}, request_hash FROM runs WHERE job = $1 AND idempotency_key = $2"))
            .bind(job.as_str())
            .bind(key)
            .fetch_optional(pool)
            .await?;
    Ok(keyed.map(|keyed| (keyed.row.into(), keyed.request_hash)))
}

pub async fn get(pool: &PgPool, job: &JobName, id: RunId) -> Result<Option<Run>, sqlx::Error> {
    let row: Option<RunRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM runs WHERE id = $1 AND job = $2"))
        .bind(id.0)
        .bind(job.as_str())
        .fetch_optional(pool)
        .await?;
    Ok(row.map(Run::from))
}

/// A run by its id alone (run ids are unique across jobs).
pub async fn find(pool: &PgPool, id: RunId) -> Result<Option<Run>, sqlx::Error> {
    let row: Option<RunRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM runs WHERE id = $1")).bind(id.0).fetch_optional(pool).await?;
    Ok(row.map(Run::from))
}

/// Which runs to list, newest first: one job's, or every job's.
#[derive(Debug, Default)]
pub struct Filter<'a> {
    pub job: Option<&'a JobName>,
    pub statuses: Option<&'a [RunStatus]>,
    pub branch_name: Option<&'a str>,
    pub commit_sha: Option<&'a str>,
    pub event: Option<RunEvent>,
    pub pull_request: Option<i64>,
    /// Only runs older than this one.
    pub before: Option<RunId>,
    pub limit: i64,
}

/// A page of runs, newest first. Only the filters given become conditions, so each query can use the
/// index that fits it (`runs_by_job_id`, `runs_by_status_id`, `runs_by_pull_request`, …) instead of
/// one generic plan for every combination.
pub async fn list(pool: &PgPool, filter: &Filter<'_>) -> Result<Vec<Run>, sqlx::Error> {
    let mut query = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM runs WHERE TRUE"));
    if let Some(job) = filter.job {
        query.push(" AND job = ").push_bind(job.as_str());
    }
    if let Some(statuses) = filter.statuses {
        let statuses: Vec<&str> = statuses.iter().map(|status| status.as_str()).collect();
        query.push(" AND status = ANY(").push_bind(statuses).push(")");
    }
    if let Some(branch) = filter.branch_name {
        query.push(" AND branch_name = ").push_bind(branch);
    }
    if let Some(commit) = filter.commit_sha {
        query.push(" AND commit_sha = ").push_bind(commit);
    }
    if let Some(before) = filter.before {
        query.push(" AND id < ").push_bind(before.0);
    }
    if let Some(event) = filter.event {
        query.push(" AND event = ").push_bind(event.as_str());
    }
    if let Some(number) = filter.pull_request {
        query.push(" AND pull_request = ").push_bind(number);
    }
    query.push(" ORDER BY id DESC LIMIT ").push_bind(filter.limit);
    let rows: Vec<RunRow> = query.build_query_as().fetch_all(pool).await?;
    Ok(rows.into_iter().map(Run::from).collect())
}

/// What an abort request did.
#[derive(Debug)]
pub enum Abort {
    /// The run was queued and is now aborted, or it runs and its agent has been told.
    Requested(Box<Run>),
    /// The run had already ended with this status.
    Ended(RunStatus),
    NotFound,
}

/// Aborts a queued run at once, or flags a running one and notifies its agent (agents LISTEN on
/// `cimaster_run_abort`; the notification is delivered when the transaction commits).
pub async fn abort(pool: &PgPool, job: &JobName, id: RunId, by: &str) -> Result<Abort, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<RunRow> = sqlx::query_as(&format!(
        "UPDATE runs SET
            abort_requested = TRUE,
            aborted_by = $3,
            status = CASE WHEN status = 'queued' THEN 'aborted' ELSE status END,
            finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
            message = CASE WHEN status = 'queued' THEN 'aborted by ' || $3 || ' before it started' ELSE message END,
            updated_at = now()
         WHERE id = $1 AND job = $2 AND status IN ('queued', 'running')
         RETURNING {COLUMNS}"
    ))
    .bind(id.0)
    .bind(job.as_str())
    .bind(by)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        let status = status_of(&mut tx, job, id).await?;
        return Ok(status.map_or(Abort::NotFound, Abort::Ended));
    };
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::channels::RUN_ABORT)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Abort::Requested(Box::new(row.into())))
}

async fn status_of(conn: &mut PgConnection, job: &JobName, id: RunId) -> Result<Option<RunStatus>, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1 AND job = $2")
        .bind(id.0)
        .bind(job.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    status.map(|status| status.parse().map_err(|err| sqlx::Error::Decode(Box::new(err)))).transpose()
}

/// Where a run's current attempt is: what the results endpoints need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Progress {
    pub attempt: i32,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// Set once the current attempt's console log is in S3.
    pub console_key: Option<String>,
    pub console_bytes: Option<i64>,
}

impl Progress {
    /// Whether `attempt` may still be written to (it is the current one and has not ended).
    pub fn is_live(&self, attempt: i32) -> bool {
        attempt == self.attempt && !self.status.is_terminal()
    }
}

/// The current attempt of one of a job's runs; `None` if the job has no such run.
pub async fn progress(pool: &PgPool, job: &JobName, id: RunId) -> Result<Option<Progress>, sqlx::Error> {
    sqlx::query_as("SELECT attempt, status, console_key, console_bytes FROM runs WHERE id = $1 AND job = $2")
        .bind(id.0)
        .bind(job.as_str())
        .fetch_optional(pool)
        .await
}

/// The current attempt of a run, by id alone (a followed console re-reads it while it streams).
pub async fn progress_by_id(pool: &PgPool, id: Uuid) -> Result<Option<Progress>, sqlx::Error> {
    sqlx::query_as("SELECT attempt, status, console_key, console_bytes FROM runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// How many of a job's runs are queued or running (in the caller's transaction).
pub async fn active_count(conn: &mut PgConnection, job: &JobName) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE job = $1 AND status IN ('queued', 'running')")
        .bind(job.as_str())
        .fetch_one(&mut *conn)
        .await
}

/// Lets go of the idempotency keys of a job's runs, so a job re-created under the same name does
/// not answer a retry with a run of the one deleted.
pub async fn forget_idempotency_keys(conn: &mut PgConnection, job: &JobName) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET idempotency_key = NULL, request_hash = NULL WHERE job = $1 AND idempotency_key IS NOT NULL",
    )
    .bind(job.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How a queued run's `message` starts while no agent consumes its queue (cleared when claimed).
pub const UNSERVED: &str = "no agent serves queue";

/// What a queued run says while no agent consumes its queue.
pub fn unserved_note(queue: &str) -> String {
    format!("{UNSERVED} `{queue}` now; the run waits until one does (agents take queues with CIMASTER_AGENT_QUEUES)")
}

/// The queues that have queued runs.
pub async fn waiting_queues(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT DISTINCT queue FROM runs WHERE status = 'queued'").fetch_all(pool).await
}

/// Queued runs of a queue no agent consumes say so in their `message` (those with no other message);
/// once an agent consumes it (`served`) they stop saying it.
pub async fn note_unserved(pool: &PgPool, queue: &str, served: bool) -> Result<u64, sqlx::Error> {
    let statement = if served {
        "UPDATE runs SET message = NULL, updated_at = now() WHERE status = 'queued' AND queue = $1 AND message = $2"
    } else {
        "UPDATE runs SET message = $2, updated_at = now() WHERE status = 'queued' AND queue = $1 AND message IS NULL"
    };
    Ok(sqlx::query(statement).bind(queue).bind(unserved_note(queue)).execute(pool).await?.rows_affected())
}

/// A pull request's queued and running runs of a job: (run id, commit).
pub async fn active_of_pull_request(
    pool: &PgPool,
    job: &JobName,
    pull_request: i64,
) -> Result<Vec<(Uuid, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, commit_sha FROM runs
         WHERE job = $1 AND pull_request = $2 AND status IN ('queued', 'running') ORDER BY created_at",
    )
    .bind(job.as_str())
    .bind(pull_request)
    .fetch_all(pool)
    .await
}

/// The status of the job's newest run at `commit`, if it has one.
pub async fn latest_at_commit(pool: &PgPool, job: &JobName, commit: &str) -> Result<Option<RunStatus>, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM runs WHERE job = $1 AND commit_sha = $2 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(job.as_str())
    .bind(commit)
    .fetch_optional(pool)
    .await?;
    status.map(|status| status.parse().map_err(|err| sqlx::Error::Decode(Box::new(err)))).transpose()
}
