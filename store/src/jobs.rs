//! The `jobs` table: job specs, applied idempotently, with a version that runs are planned against.

use chrono::{DateTime, Utc};
use cimaster_common::{JobName, JobSpec};
use sqlx::types::Json;
use sqlx::PgPool;

use crate::{runs, schedules};

/// A job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub spec: JobSpec,
    /// Goes up by one whenever the spec changes.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    name: String,
    spec: Json<JobSpec>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<JobRow> for Job {
    fn from(row: JobRow) -> Self {
        Job {
            name: row.name,
            spec: row.spec.0,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// Creates or updates a job; an unchanged spec keeps its version (and its schedule's next slot).
/// A new or changed spec sets the schedule's next slot to `next_slot`, in the same transaction.
/// `None`: the job was unchanged and deleted before it could be read back.
pub async fn apply(
    pool: &PgPool,
    name: &JobName,
    spec: &JobSpec,
    next_slot: Option<DateTime<Utc>>,
) -> Result<Option<(Job, Applied)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Written {
        #[sqlx(flatten)]
        row: JobRow,
        inserted: bool,
    }
    let mut tx = pool.begin().await?;
    let written: Option<Written> = sqlx::query_as(
        "INSERT INTO jobs (name, kind, spec) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE
            SET kind = EXCLUDED.kind, spec = EXCLUDED.spec, version = jobs.version + 1, updated_at = now()
            WHERE jobs.spec IS DISTINCT FROM EXCLUDED.spec
         RETURNING name, spec, version, created_at, updated_at, (xmax = 0) AS inserted",
    )
    .bind(name.as_str())
    .bind(spec.kind())
    .bind(Json(spec))
    .fetch_optional(&mut *tx)
    .await?;
    if written.is_some() {
        schedules::set(&mut tx, name, next_slot).await?;
    }
    tx.commit().await?;
    match written {
        Some(Written { row, inserted: true }) => Ok(Some((row.into(), Applied::Created))),
        Some(Written { row, inserted: false }) => Ok(Some((row.into(), Applied::Updated))),
        None => Ok(get(pool, name).await?.map(|job| (job, Applied::Unchanged))),
    }
}

pub async fn get(pool: &PgPool, name: &JobName) -> Result<Option<Job>, sqlx::Error> {
    let row: Option<JobRow> =
        sqlx::query_as("SELECT name, spec, version, created_at, updated_at FROM jobs WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(pool)
            .await?;
    Ok(row.map(Job::from))
}

pub async fn list(pool: &PgPool) -> Result<Vec<Job>, sqlx::Error> {
    let rows: Vec<JobRow> =
        sqlx::query_as("SELECT name, spec, version, created_at, updated_at FROM jobs ORDER BY name")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(Job::from).collect())
}

/// Every job's name, in order.
pub async fn names(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM jobs ORDER BY name").fetch_all(pool).await
}

pub async fn exists(pool: &PgPool, name: &JobName) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE name = $1)").bind(name.as_str()).fetch_one(pool).await
}

/// What [`delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    /// Refused: this many runs are queued or running.
    Active(i64),
}

/// Deletes a job unless it has queued or running runs; finished runs stay readable by id, its
/// secrets go with it (a foreign key) and its runs' idempotency keys are let go. Locking
/// the job row waits for triggers in flight (they hold it FOR SHARE) and keeps new ones out.
pub async fn delete(pool: &PgPool, name: &JobName) -> Result<Deleted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM jobs WHERE name = $1 FOR UPDATE")
        .bind(name.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Ok(Deleted::NotFound);
    }
    let active = runs::active_count(&mut tx, name).await?;
    if active > 0 {
        return Ok(Deleted::Active(active));
    }
    runs::forget_idempotency_keys(&mut tx, name).await?;
    sqlx::query("DELETE FROM jobs WHERE name = $1").bind(name.as_str()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Deleted::Deleted)
}

/// Every repository some git job subscribes to on GitHub.
pub async fn subscribed_repositories(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT ON (lower(spec->'github'->>'repository')) spec->'github'->>'repository' FROM jobs
         WHERE kind = 'git' AND spec->'github'->>'repository' IS NOT NULL
         ORDER BY lower(spec->'github'->>'repository')",
    )
    .fetch_all(pool)
    .await
}

/// The git jobs whose `github.repository` is `repository` (`owner/name`, any case).
pub async fn subscribed(pool: &PgPool, repository: &str) -> Result<Vec<Job>, sqlx::Error> {
    let rows: Vec<JobRow> = sqlx::query_as(
        "SELECT name, spec, version, created_at, updated_at FROM jobs
         WHERE kind = 'git' AND lower(spec->'github'->>'repository') = lower($1) ORDER BY name",
    )
    .bind(repository)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Job::from).collect())
}
