//! The `run_results` table: the files an attempt kept (JUnit reports, artifacts, service logs),
//! stored in S3 and recorded here. The agent's writes are fenced like every other write of the
//! attempt.

use cimaster_common::results::JunitSummary;
use cimaster_common::RunId;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::attempts::Claim;

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

/// A recorded result file, as the API lists and serves it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResultFile {
    pub attempt: i32,
    pub kind: String,
    pub name: String,
    pub bytes: i64,
    pub content_type: String,
    pub object_key: String,
    /// JUnit reports: the counts and failures read from the file.
    pub summary: Option<Json<JunitSummary>>,
}

const FILE_COLUMNS: &str = "attempt, kind, name, bytes, content_type, object_key, summary";

/// Every result file of a run, newest attempt first.
pub async fn list(pool: &PgPool, run: Uuid) -> Result<Vec<ResultFile>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {FILE_COLUMNS} FROM run_results WHERE run_id = $1 ORDER BY attempt DESC, kind, name"
    ))
    .bind(run)
    .fetch_all(pool)
    .await
}

/// An attempt's result files of the given kinds, optionally only the one named `name`.
pub async fn files(
    pool: &PgPool,
    run: Uuid,
    attempt: i32,
    kinds: &[&str],
    name: Option<&str>,
) -> Result<Vec<ResultFile>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {FILE_COLUMNS} FROM run_results
         WHERE run_id = $1 AND attempt = $2 AND kind = ANY($3) AND ($4::text IS NULL OR name = $4)
         ORDER BY name"
    ))
    .bind(run)
    .bind(attempt)
    .bind(kinds.iter().map(|kind| kind.to_string()).collect::<Vec<_>>())
    .bind(name)
    .fetch_all(pool)
    .await
}
