//! The `run_results` table: the files an attempt kept (JUnit reports, artifacts, service logs),
//! stored in S3 and recorded here. The agent's writes are fenced like every other write of the
//! attempt.

use cimaster_common::results::{JunitSummary, MAX_LISTED_BYTES_IN_ALL, MAX_LISTED_FAILURES_IN_ALL};
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

/// The result files `filter` selects, in `order`, with their summaries bounded as they are read:
/// the failed cases listed by all the selected files together are at most
/// [`MAX_LISTED_FAILURES_IN_ALL`] of at most [`MAX_LISTED_BYTES_IN_ALL`] bytes (as JSON), the rest
/// counted as not listed, and of a summary only its own fields are read. The agent bounds what it
/// writes alike; this holds for rows written before it did, or by a misbehaving agent, so no run's
/// results can make the master load more. `$cases` and `$bytes` are the two bounds' parameters.
fn select_bounded(filter: &str, order: &str, cases: &str, bytes: &str) -> String {
    let fits = format!("nth <= {cases} AND bytes_so_far <= {bytes}");
    format!(
        "WITH chosen AS (
             SELECT attempt, kind, name, bytes, content_type, object_key, summary,
                    row_number() OVER (ORDER BY {order}) AS place
             FROM run_results WHERE {filter}
         ), cases AS (
             SELECT chosen.place, listed.failed, listed.ord,
                    row_number() OVER in_order AS nth,
                    sum(octet_length(listed.failed::text)) OVER in_order AS bytes_so_far
             FROM chosen,
                  jsonb_array_elements(CASE WHEN jsonb_typeof(summary -> 'failed') = 'array'
                                            THEN summary -> 'failed' ELSE '[]' END)
                      WITH ORDINALITY AS listed (failed, ord)
             WINDOW in_order AS (ORDER BY chosen.place, listed.ord)
         ), kept AS (
             SELECT place, jsonb_agg(failed ORDER BY ord) FILTER (WHERE {fits}) AS failed,
                    count(*) FILTER (WHERE NOT ({fits})) AS dropped
             FROM cases GROUP BY place
         )
         SELECT attempt, kind, name, bytes, content_type, object_key,
                CASE WHEN summary IS NOT NULL THEN jsonb_build_object(
                    'tests', summary -> 'tests', 'failures', summary -> 'failures',
                    'errors', summary -> 'errors', 'skipped', summary -> 'skipped',
                    'timeSeconds', summary -> 'timeSeconds',
                    'failed', coalesce(kept.failed, '[]'),
                    'failedNotListed', coalesce(kept.dropped, 0)
                        + CASE WHEN jsonb_typeof(summary -> 'failedNotListed') = 'number'
                               THEN (summary ->> 'failedNotListed')::numeric ELSE 0 END)
                END AS summary
         FROM chosen LEFT JOIN kept USING (place)
         ORDER BY place"
    )
}

/// Every result file of a run, newest attempt first.
pub async fn list(pool: &PgPool, run: Uuid) -> Result<Vec<ResultFile>, sqlx::Error> {
    sqlx::query_as(&select_bounded("run_id = $1", "attempt DESC, kind, name", "$2", "$3"))
        .bind(run)
        .bind(MAX_LISTED_FAILURES_IN_ALL as i64)
        .bind(MAX_LISTED_BYTES_IN_ALL as i64)
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
    sqlx::query_as(&select_bounded(
        "run_id = $1 AND attempt = $2 AND kind = ANY($3) AND ($4::text IS NULL OR name = $4)",
        "name",
        "$5",
        "$6",
    ))
    .bind(run)
    .bind(attempt)
    .bind(kinds.iter().map(|kind| kind.to_string()).collect::<Vec<_>>())
    .bind(name)
    .bind(MAX_LISTED_FAILURES_IN_ALL as i64)
    .bind(MAX_LISTED_BYTES_IN_ALL as i64)
    .fetch_all(pool)
    .await
}
