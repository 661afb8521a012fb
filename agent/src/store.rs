//! The agent's writes to Postgres: claiming an attempt, renewing its lease, console chunks and the
//! final status. Every write after the claim is fenced by (run, attempt, agent), so an agent whose
//! lease was taken over cannot touch the next attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use cimaster_common::{JobSpec, RepoConfig, Resources, RunId, RunStatus};
use sqlx::types::Json;
use sqlx::PgPool;

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
}

/// The declared needs of a queued run, read before deciding whether it fits.
pub async fn queued_resources(pool: &PgPool, run: RunId, attempt: u32) -> Result<Option<Resources>, sqlx::Error> {
    let row: Option<(Json<JobSpec>, Option<Json<RepoConfig>>)> =
        sqlx::query_as("SELECT spec, config FROM runs WHERE id = $1 AND attempt = $2 AND status = 'queued'")
            .bind(run.0)
            .bind(attempt as i32)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(spec, config)| match (spec.0, config) {
        (_, Some(config)) => config.0.resources,
        (JobSpec::Freestyle(job), None) => job.resources,
        (JobSpec::Git(_), None) => Resources::default(),
    }))
}

/// Queued → running for exactly this attempt, in one statement. `None`: nothing to claim (stale or
/// duplicate message, aborted, or another agent was first).
pub async fn claim(
    pool: &PgPool,
    run: RunId,
    attempt: u32,
    agent: &str,
    lease: Duration,
) -> Result<Option<Claim>, sqlx::Error> {
    let granted = tokio::time::Instant::now();
    let row: Option<ClaimRow> = sqlx::query_as(
        "WITH claimed AS (
             UPDATE runs SET status = 'running', agent = $3, started_at = now(), updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => $4)
             WHERE id = $1 AND attempt = $2 AND status = 'queued' AND NOT abort_requested
             RETURNING id, attempt, job, spec, parameters, commit_sha, config
         ), attempt AS (
             INSERT INTO run_attempts (run_id, attempt, agent) SELECT id, attempt, $3 FROM claimed
         )
         SELECT job, spec, parameters, commit_sha, config FROM claimed",
    )
    .bind(run.0)
    .bind(attempt as i32)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| Claim {
        run,
        job: row.job,
        attempt,
        spec: row.spec.0,
        parameters: row.parameters.0,
        commit: row.commit_sha,
        config: row.config.map(|config| config.0),
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

/// The encrypted secrets of a job among `names`: (name, nonce, ciphertext).
pub async fn sealed_secrets(
    pool: &PgPool,
    job: &str,
    names: &[String],
) -> Result<Vec<(String, Vec<u8>, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as("SELECT name, nonce, ciphertext FROM job_secrets WHERE job = $1 AND name = ANY($2)")
        .bind(job)
        .bind(names)
        .fetch_all(pool)
        .await
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

pub async fn append_console(pool: &PgPool, claim: &Claim, seq: i64, data: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO run_console (run_id, attempt, seq, data) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .bind(claim.run.0)
        .bind(claim.attempt as i32)
        .bind(seq)
        .bind(data)
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
        "UPDATE runs SET status = $4, exit_code = $5, message = $6, finished_at = now(), updated_at = now(),
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
        sqlx::query("DELETE FROM run_console WHERE run_id = $1 AND attempt = $2")
            .bind(claim.run.0)
            .bind(claim.attempt as i32)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("SELECT pg_notify('cimaster_run_finished', $1)").bind(claim.run.to_string()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(true)
}

/// One collected result file, stored in S3.
pub struct StoredResult {
    pub kind: String,
    pub name: String,
    pub bytes: i64,
    pub content_type: String,
    pub key: String,
    pub summary: Option<serde_json::Value>,
}

/// Records collected result files, fenced like every other write of the attempt.
pub async fn record_results(
    pool: &PgPool,
    claim: &Claim,
    agent: &str,
    results: &[StoredResult],
) -> Result<(), sqlx::Error> {
    let fence = "FROM runs WHERE id = $1 AND attempt = $2 AND agent = $3 AND status = 'running'";
    insert_results(pool, fence, claim.run, claim.attempt, agent, results).await
}

/// Records result files stored after the attempt ended (they waited for S3): fenced by (run,
/// attempt, agent), whatever the run's status now.
pub async fn record_late_results(
    pool: &PgPool,
    run: RunId,
    attempt: u32,
    agent: &str,
    results: &[StoredResult],
) -> Result<(), sqlx::Error> {
    let fence = "FROM run_attempts WHERE run_id = $1 AND attempt = $2 AND agent = $3";
    insert_results(pool, fence, run, attempt, agent, results).await
}

/// Inserts (or replaces) result rows, each only if a row matches `fence` (a `FROM … WHERE …`
/// clause over $1 run, $2 attempt and $3 agent).
async fn insert_results(
    pool: &PgPool,
    fence: &str,
    run: RunId,
    attempt: u32,
    agent: &str,
    results: &[StoredResult],
) -> Result<(), sqlx::Error> {
    let statement = format!(
        "INSERT INTO run_results (run_id, attempt, kind, name, bytes, content_type, object_key, summary)
         SELECT $1, $2, $4, $5, $6, $7, $8, $9 {fence}
         ON CONFLICT (run_id, attempt, kind, name) DO UPDATE
         SET bytes = EXCLUDED.bytes, content_type = EXCLUDED.content_type, object_key = EXCLUDED.object_key,
             summary = EXCLUDED.summary"
    );
    for result in results {
        sqlx::query(&statement)
            .bind(run.0)
            .bind(attempt as i32)
            .bind(agent)
            .bind(&result.kind)
            .bind(&result.name)
            .bind(result.bytes)
            .bind(&result.content_type)
            .bind(&result.key)
            .bind(result.summary.as_ref().map(Json))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Points an ended attempt at its console log stored after it ended, and drops the live copy the
/// master served meanwhile. Only this agent's attempt, and only while it is the run's current one.
pub async fn record_late_console(
    pool: &PgPool,
    run: RunId,
    attempt: u32,
    agent: &str,
    key: &str,
    bytes: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE runs SET console_key = $4, console_bytes = $5, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND agent = $3 AND console_key IS NULL AND finished_at IS NOT NULL",
    )
    .bind(run.0)
    .bind(attempt as i32)
    .bind(agent)
    .bind(key)
    .bind(bytes)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated > 0 {
        sqlx::query("DELETE FROM run_console WHERE run_id = $1 AND attempt = $2")
            .bind(run.0)
            .bind(attempt as i32)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}
