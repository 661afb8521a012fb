//! The `job_schedules` table: each scheduled job's next slot, claimed by one master replica at a
//! time, and what its last slot did.

use chrono::{DateTime, Utc};
use cimaster_common::JobName;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Sets a job's next slot (`None`: the job has no schedule any more). Written with the job.
pub async fn set(conn: &mut PgConnection, job: &JobName, next: Option<DateTime<Utc>>) -> Result<(), sqlx::Error> {
    match next {
        Some(next) => {
            sqlx::query(
                "INSERT INTO job_schedules (job, next_fire_at) VALUES ($1, $2)
                 ON CONFLICT (job) DO UPDATE SET next_fire_at = EXCLUDED.next_fire_at, claimed_until = NULL",
            )
            .bind(job.as_str())
            .bind(next)
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM job_schedules WHERE job = $1").bind(job.as_str()).execute(conn).await?;
        }
    }
    Ok(())
}

/// A slot this replica claimed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub job: String,
    pub slot: DateTime<Utc>,
    /// The run the previous slot started.
    pub last_run: Option<Uuid>,
    /// Whether that run is still queued or running.
    pub last_run_active: bool,
}

/// Claims the most overdue slot no other replica holds, for `hold`; `None` when nothing is due.
pub async fn claim_due(pool: &PgPool, hold: std::time::Duration) -> Result<Option<Due>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT job FROM job_schedules
             WHERE next_fire_at <= now() AND (claimed_until IS NULL OR claimed_until < now())
             ORDER BY next_fire_at LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE job_schedules s SET claimed_until = now() + make_interval(secs => $1)
         FROM due WHERE s.job = due.job
         RETURNING s.job, s.next_fire_at AS slot, s.last_run,
                   EXISTS (SELECT 1 FROM runs r WHERE r.id = s.last_run AND r.status IN ('queued', 'running'))
                       AS last_run_active",
    )
    .bind(hold.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Moves a fired (or skipped) slot on to `next`, unless the job's schedule was changed meanwhile.
pub async fn advance(
    pool: &PgPool,
    job: &str,
    slot: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
    run: Option<Uuid>,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    match next {
        Some(next) => {
            sqlx::query(
                "UPDATE job_schedules SET next_fire_at = $3, claimed_until = NULL, last_slot = $2,
                        last_run = coalesce($4, last_run), last_outcome = $5
                 WHERE job = $1 AND next_fire_at = $2",
            )
            .bind(job)
            .bind(slot)
            .bind(next)
            .bind(run)
            .bind(outcome)
            .execute(pool)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM job_schedules WHERE job = $1 AND next_fire_at = $2")
                .bind(job)
                .bind(slot)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// What a job's schedule last did, for `GET /jobs/{name}`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct State {
    pub next_fire_at: DateTime<Utc>,
    pub last_slot: Option<DateTime<Utc>>,
    pub last_run: Option<Uuid>,
    pub last_outcome: Option<String>,
}

pub async fn state(pool: &PgPool, job: &JobName) -> Result<Option<State>, sqlx::Error> {
    sqlx::query_as("SELECT next_fire_at, last_slot, last_run, last_outcome FROM job_schedules WHERE job = $1")
        .bind(job.as_str())
        .fetch_optional(pool)
        .await
}
