//! Runs counted into the master's histograms: each run's dispatch time once its container started,
//! and its whole time once it ended. A replica claims what it counts (`FOR UPDATE SKIP LOCKED`), so
//! with any number of replicas every run is counted exactly once and the sum over replicas is right.

use cimaster_common::RunStatus;
use sqlx::PgPool;

/// One run's figures to count. `dispatch_seconds` is set the first time the run is claimed after
/// its container started; `finished` once it has ended.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Observation {
    pub queue: String,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// Trigger → the first container start, when that is to be counted now.
    pub dispatch_seconds: Option<f64>,
    /// Trigger → finished, when the run ended and that is to be counted now.
    pub run_seconds: Option<f64>,
}

/// Claims up to `limit` runs with something not yet counted: a container start, an end, or both.
/// A run that ended without a container start counts only its end.
pub async fn claim(pool: &PgPool, limit: i64) -> Result<Vec<Observation>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT r.id, NOT r.dispatch_observed AS dispatch_due, r.finished_at IS NOT NULL AS finish_due
             FROM runs r
             WHERE NOT r.finish_observed
               AND (r.finished_at IS NOT NULL
                    OR (NOT r.dispatch_observed AND r.started_at IS NOT NULL
                        AND EXISTS (SELECT 1 FROM run_attempts a
                                    WHERE a.run_id = r.id AND a.container_started_at IS NOT NULL)))
             ORDER BY r.created_at
             LIMIT $1
             FOR UPDATE OF r SKIP LOCKED
         ), counted AS (
             UPDATE runs r SET dispatch_observed = TRUE, finish_observed = due.finish_due
             FROM due WHERE r.id = due.id
             RETURNING r.id, r.queue, r.status, r.created_at, r.finished_at, due.dispatch_due, due.finish_due
         )
         SELECT c.queue, c.status,
                CASE WHEN c.dispatch_due THEN
                    extract(epoch FROM (SELECT min(a.container_started_at) FROM run_attempts a
                                        WHERE a.run_id = c.id) - c.created_at)::float8
                END AS dispatch_seconds,
                CASE WHEN c.finish_due THEN extract(epoch FROM c.finished_at - c.created_at)::float8 END
                    AS run_seconds
         FROM counted c",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}
