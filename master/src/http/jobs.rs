//! `/jobs`: job configuration, applied idempotently with `PUT`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cimaster_common::{JobName, JobSpec};
use serde::Serialize;
use sqlx::types::Json as SqlJson;

use super::error::ApiError;
use super::json::ApiJson;
use super::AppState;
use crate::auth::{Caller, Role};

pub fn router() -> Router<AppState> {
    Router::new().route("/jobs", get(list_jobs)).route("/jobs/{name}", get(get_job).put(put_job).delete(delete_job))
}

/// What a `PUT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub name: String,
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Incremented by every `PUT` that changes the job.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set on `PUT` answers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    name: String,
    spec: SqlJson<JobSpec>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<JobRow> for JobView {
    fn from(row: JobRow) -> Self {
        JobView {
            name: row.name,
            spec: row.spec.0,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
            change: None,
        }
    }
}

/// A job's spec as last read by this replica. Only a hint: triggers verify version and `updated_at`
/// in the statement that inserts the run, and re-read the job when it changed.
#[derive(Clone)]
pub struct CachedJob {
    pub spec: Arc<JobSpec>,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// Per-replica cache of job specs, bounded in size.
#[derive(Clone, Default)]
pub struct JobCache {
    entries: Arc<Mutex<HashMap<String, CachedJob>>>,
}

impl JobCache {
    const MAX_ENTRIES: usize = 10_000;

    pub fn get(&self, name: &JobName) -> Option<CachedJob> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(name.as_str()).cloned()
    }

    pub fn put(&self, name: &JobName, job: CachedJob) -> CachedJob {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= Self::MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(name.to_string(), job.clone());
        job
    }

    pub fn forget(&self, name: &JobName) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(name.as_str());
    }
}

/// Parses a job name from a path, answering 400 with the rule it broke.
pub fn job_name(raw: &str) -> Result<JobName, ApiError> {
    JobName::parse(raw).map_err(|err| ApiError::BadRequest(err.to_string()))
}

pub fn job_not_found(name: &JobName) -> ApiError {
    ApiError::NotFound(format!("job `{name}` does not exist; create it with PUT /jobs/{name}"))
}

/// Create or replace a job. The same body twice changes nothing and answers `"change": "unchanged"`.
#[utoipa::path(put, path = "/jobs/{name}", tag = "jobs", request_body = JobSpec,
    params(("name" = String, Path, description = "job name")),
    responses(
        (status = 201, description = "created", body = JobView),
        (status = 200, description = "updated or unchanged", body = JobView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn put_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<JobSpec>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Admin)?;
    let name = job_name(&name)?;
    spec.check(state.max_timeout_seconds).map_err(ApiError::Unprocessable)?;
    let written: Option<(JobRow, bool)> =
        sqlx::query_as::<_, (String, SqlJson<JobSpec>, i64, DateTime<Utc>, DateTime<Utc>, bool)>(
            "INSERT INTO jobs (name, kind, spec) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE
            SET kind = EXCLUDED.kind, spec = EXCLUDED.spec, version = jobs.version + 1, updated_at = now()
            WHERE jobs.spec IS DISTINCT FROM EXCLUDED.spec
         RETURNING name, spec, version, created_at, updated_at, (xmax = 0) AS inserted",
        )
        .bind(name.as_str())
        .bind(spec.kind())
        .bind(SqlJson(&spec))
        .fetch_optional(&state.pool)
        .await?
        .map(|(name, spec, version, created_at, updated_at, inserted)| {
            (JobRow { name, spec, version, created_at, updated_at }, inserted)
        });
    let (row, change) = match written {
        Some((row, true)) => (row, Change::Created),
        Some((row, false)) => (row, Change::Updated),
        None => (fetch_job(&state, &name).await?.ok_or_else(|| job_not_found(&name))?, Change::Unchanged),
    };
    state.jobs.forget(&name);
    tracing::info!(job = %name, ?change, by = %caller.subject, "job applied");
    let status = if change == Change::Created { StatusCode::CREATED } else { StatusCode::OK };
    let mut view = JobView::from(row);
    view.change = Some(change);
    Ok((status, [(axum::http::header::LOCATION, format!("/jobs/{name}"))], Json(view)))
}

async fn fetch_job(state: &AppState, name: &JobName) -> Result<Option<JobRow>, ApiError> {
    Ok(sqlx::query_as("SELECT name, spec, version, created_at, updated_at FROM jobs WHERE name = $1")
        .bind(name.as_str())
        .fetch_optional(&state.pool)
        .await?)
}

/// One job.
#[utoipa::path(get, path = "/jobs/{name}", tag = "jobs",
    params(("name" = String, Path, description = "job name")),
    responses((status = 200, body = JobView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    caller.require(Role::Read)?;
    let name = job_name(&name)?;
    let row = fetch_job(&state, &name).await?.ok_or_else(|| job_not_found(&name))?;
    Ok(Json(row.into()))
}

/// All jobs, by name.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = JobList)), security(("bearer" = [])))]
async fn list_jobs(State(state): State<AppState>, caller: Caller) -> Result<Json<JobList>, ApiError> {
    caller.require(Role::Read)?;
    let rows: Vec<JobRow> =
        sqlx::query_as("SELECT name, spec, version, created_at, updated_at FROM jobs ORDER BY name")
            .fetch_all(&state.pool)
            .await?;
    Ok(Json(JobList { jobs: rows.into_iter().map(JobView::from).collect() }))
}

/// Delete a job. Refused while it has queued or running runs; finished runs stay readable by id.
#[utoipa::path(delete, path = "/jobs/{name}", tag = "jobs",
    params(("name" = String, Path, description = "job name")),
    responses((status = 204, description = "deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn delete_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let name = job_name(&name)?;
    let mut tx = state.pool.begin().await?;
    // Locking the job row waits for triggers in flight (they hold it FOR SHARE) and keeps new ones out.
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM jobs WHERE name = $1 FOR UPDATE")
        .bind(name.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(job_not_found(&name));
    }
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE job = $1 AND status IN ('queued', 'running')")
            .bind(name.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if active > 0 {
        return Err(ApiError::Conflict(format!(
            "job `{name}` has {active} queued or running run(s); abort them or let them finish first"
        )));
    }
    sqlx::query("DELETE FROM jobs WHERE name = $1").bind(name.as_str()).execute(&mut *tx).await?;
    tx.commit().await?;
    state.jobs.forget(&name);
    tracing::info!(job = %name, by = %caller.subject, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}

use super::error::Problem;
