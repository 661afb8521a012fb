//! An attempt's life in `runs` and `run_attempts`: the agent claims it, renews its lease, reports
//! progress and writes how it ended; the reaper takes over attempts whose lease expired. Every write
//! after the claim is fenced by (run, attempt, agent), so an agent whose lease was taken over cannot
//! touch the next attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use cimaster_common::{Cause, JobSpec, RepoConfig, Resources, RunId, RunStatus};
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

/// What an agent needs to execute a claimed attempt.
#[derive(Debug, Clone)]
pub struct Claim {
    pub run: RunId,
    pub job: String,
    pub attempt: u32,
    pub spec: JobSpec,
    pub parameters: BTreeMap<String, String>,
    /// Git runs: the commit and the job config file read there at trigger time.
    pub commit: Option<String>,
    pub config: Option<RepoConfig>,
    /// Why the run exists (the job's `CIMASTER_EVENT`, `CIMASTER_PR`, …).
    pub cause: Cause,
    /// The branches whose tip the commit was when the run was created: what branch-limited
    /// secrets are judged against.
    pub tip_of: Vec<String>,
    /// Who triggered the run (a token's subject, `schedule`, the code host's sender).
    pub triggered_by: String,
    /// When the claim that granted the lease was sent: the fence window starts here.
    pub granted: tokio::time::Instant,
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    job: String,
    spec: Json<JobSpec>,
    parameters: Json<BTreeMap<String, String>>,
    commit_sha: Option<String>,
    config: Option<Json<RepoConfig>>,
    #[sqlx(flatten)]
    cause: crate::runs::CauseColumns,
    tip_of: Vec<String>,
    triggered_by: String,
}

/// What a queued run needs of an agent (CPUs, memory bytes): the job and its services, read before
/// deciding whether it fits.
pub async fn queued_resources(pool: &PgPool, run: RunId, attempt: u32) -> Result<Option<(f64, u64)>, sqlx::Error> {
    let row: Option<(Json<JobSpec>, Option<Json<RepoConfig>>)> =
        sqlx::query_as("SELECT spec, config FROM runs WHERE id = $1 AND attempt = $2 AND status = 'queued'")
            .bind(run.0)
            .bind(attempt as i32)
            .fetch_optional(pool)
            .await?;
    let plain = |resources: Resources| (resources.cpus, resources.memory.bytes());
    Ok(row.map(|(spec, config)| match (spec.0, config) {
        (_, Some(config)) => config.0.demand(),
        (JobSpec::Freestyle(job), None) => plain(job.resources),
        (JobSpec::Git(_), None) => plain(Resources::default()),
    }))
}

/// Queued → running for exactly this attempt, in one statement. `None`: nothing to claim (stale or
/// duplicate message, aborted, or another agent was first).
pub async fn claim<'e>(
    db: impl sqlx::PgExecutor<'e>,
    run: RunId,
    attempt: u32,
    agent: &str,
    lease: Duration,
) -> Result<Option<Claim>, sqlx::Error> {
    let granted = tokio::time::Instant::now();
    let row: Option<ClaimRow> = sqlx::query_as(
        "WITH claimed AS (
             UPDATE runs SET status = 'running', agent = $3, started_at = now(), updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => $4),
                             message = CASE WHEN starts_with(message, $5) THEN NULL ELSE message END
             WHERE id = $1 AND attempt = $2 AND status = 'queued' AND NOT abort_requested
             RETURNING id, attempt, job, spec, parameters, commit_sha, config,
                       event, pull_request, sender, base_branch, base_sha, repository, from_fork, tip_of, triggered_by
         ), attempt AS (
             INSERT INTO run_attempts (run_id, attempt, agent) SELECT id, attempt, $3 FROM claimed
         )
         SELECT job, spec, parameters, commit_sha, config, event, pull_request, sender, base_branch, base_sha,
                repository, from_fork, tip_of, triggered_by
         FROM claimed",
    )
    .bind(run.0)
    .bind(attempt as i32)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .bind(crate::runs::UNSERVED)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| Claim {
        run,
        job: row.job,
        attempt,
        spec: row.spec.0,
        parameters: row.parameters.0,
        commit: row.commit_sha,
        config: row.config.map(|config| config.0),
        cause: row.cause.into(),
        tip_of: row.tip_of,
        triggered_by: row.triggered_by,
        granted,
    }))
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held {
        abort_requested: bool,
    },
    /// The attempt is no longer ours (reaped after a missed lease, or ended elsewhere).
    Lost,
}

pub async fn renew(pool: &PgPool, claim: &Claim, agent: &str, lease: Duration) -> Result<Lease, sqlx::Error> {
    let abort: Option<bool> = sqlx::query_scalar(
        "UPDATE runs SET lease_expires_at = now() + make_interval(secs => $4)
         WHERE id = $1 AND attempt = $2 AND agent = $3 AND status = 'running'
         RETURNING abort_requested",
    )
    .bind(claim.run.0)
    .bind(claim.attempt as i32)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(match abort {
        Some(abort_requested) => Lease::Held { abort_requested },
        None => Lease::Lost,
    })
}

/// Shows what the running attempt waits for (or clears it).
pub async fn set_message(pool: &PgPool, claim: &Claim, message: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET message = $3, updated_at = now() WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(claim.run.0)
    .bind(claim.attempt as i32)
    .bind(message)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn container_started(pool: &PgPool, claim: &Claim) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE run_attempts SET container_started_at = now() WHERE run_id = $1 AND attempt = $2")
        .bind(claim.run.0)
        .bind(claim.attempt as i32)
        .execute(pool)
        .await?;
    Ok(())
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: RunStatus,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
}

/// Where the attempt's console log ended up.
#[derive(Debug, Clone)]
pub struct StoredConsole {
    pub key: String,
    pub bytes: i64,
}

/// Writes the final status if the attempt is still ours. Returns whether it was.
pub async fn finish(
    pool: &PgPool,
    claim: &Claim,
    agent: &str,
    outcome: &Outcome,
    console: Option<&StoredConsole>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let exit_code = outcome.exit_code.map(|code| code.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
    let updated = sqlx::query(
        "UPDATE runs SET status = $4, exit_code = $5, finished_at = now(), updated_at = now(),
                         message = CASE WHEN $4 = 'aborted' AND aborted_by IS NOT NULL
                                        THEN 'aborted by ' || aborted_by ELSE $6 END,
                         lease_expires_at = NULL, console_key = $7, console_bytes = $8
         WHERE id = $1 AND attempt = $2 AND agent = $3 AND status = 'running'",
    )
    .bind(claim.run.0)
    .bind(claim.attempt as i32)
    .bind(agent)
    .bind(outcome.status.as_str())
    .bind(exit_code)
    .bind(&outcome.message)
    .bind(console.map(|c| c.key.as_str()))
    .bind(console.map(|c| c.bytes))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "UPDATE run_attempts SET ended_at = now(), outcome = $3, exit_code = $4, message = $5
         WHERE run_id = $1 AND attempt = $2",
    )
    .bind(claim.run.0)
    .bind(claim.attempt as i32)
    .bind(outcome.status.as_str())
    .bind(exit_code)
    .bind(&outcome.message)
    .execute(&mut *tx)
    .await?;
    if console.is_some() {
        crate::console::drop_live(&mut tx, claim.run, claim.attempt).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// A run whose agent stopped renewing its lease, as the reaper left it: queued again as the next
/// attempt, or ended (`error` past the attempt limit, `aborted` if an abort was pending).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Reaped {
    pub id: Uuid,
    pub job: String,
    pub queue: String,
    pub attempt: i32,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
}

const REAP: &str = "WITH expired AS (
         SELECT id, attempt, agent, abort_requested FROM runs
         WHERE status = 'running' AND lease_expires_at < now()
         ORDER BY lease_expires_at
         LIMIT 100
         FOR UPDATE SKIP LOCKED
     ), lost AS (
         UPDATE run_attempts a
         SET ended_at = now(), outcome = 'lost',
             message = 'agent ' || e.agent || ' stopped renewing its lease'
         FROM expired e
         WHERE a.run_id = e.id AND a.attempt = e.attempt AND a.outcome IS NULL
     )
     UPDATE runs r SET
         status = CASE WHEN e.abort_requested THEN 'aborted'
                       WHEN r.attempt < $1 THEN 'queued' ELSE 'error' END,
         attempt = CASE WHEN NOT e.abort_requested AND r.attempt < $1 THEN r.attempt + 1 ELSE r.attempt END,
         message = CASE WHEN e.abort_requested THEN 'aborted; its agent ' || e.agent || ' was lost'
                        WHEN r.attempt < $1 THEN 'attempt ' || r.attempt || ' lost (agent ' || e.agent
                             || ' stopped renewing its lease); retried as attempt ' || (r.attempt + 1)
                        ELSE 'gave up after ' || r.attempt || ' attempts: agent ' || e.agent
                             || ' stopped renewing its lease' END,
         finished_at = CASE WHEN NOT e.abort_requested AND r.attempt < $1 THEN NULL ELSE now() END,
         agent = CASE WHEN NOT e.abort_requested AND r.attempt < $1 THEN NULL ELSE r.agent END,
         lease_expires_at = NULL,
         published_at = NULL,
         queued_at = now(),
         exit_code = NULL,
         console_key = NULL,
         console_bytes = NULL,
         updated_at = now()
     FROM expired e
     WHERE r.id = e.id
     RETURNING r.id, r.job, r.queue, r.attempt, r.status";

/// Takes over up to 100 attempts whose lease expired. Safe in every replica: expired rows are taken
/// with `FOR UPDATE SKIP LOCKED`.
pub async fn reap_expired(pool: &PgPool, max_attempts: u32) -> Result<Vec<Reaped>, sqlx::Error> {
    sqlx::query_as(REAP).bind(max_attempts as i32).fetch_all(pool).await
}

/// The attempts before `current` that a run has had.
pub async fn earlier(pool: &PgPool, run: Uuid, current: i32) -> Result<Vec<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT attempt FROM run_attempts WHERE run_id = $1 AND attempt < $2 ORDER BY attempt")
        .bind(run)
        .bind(current)
        .fetch_all(pool)
        .await
}

/// One attempt of a run as its page shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub agent: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub container_started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub ended_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `succeeded`, `failed`, `aborted`, `timed_out`, `error` or `lost`; none while it runs.
    pub outcome: Option<String>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
}

/// Every attempt a run has had, first first.
pub async fn history(pool: &PgPool, run: Uuid) -> Result<Vec<AttemptRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT attempt, agent, started_at, container_started_at, ended_at, outcome, exit_code, message
         FROM run_attempts WHERE run_id = $1 ORDER BY attempt",
    )
    .bind(run)
    .fetch_all(pool)
    .await
}
