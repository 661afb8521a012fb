//! `/jobs`: job configuration, applied idempotently with `PUT`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cimaster_common::{JobName, JobSpec};
use cimaster_store::jobs::{self, Applied, Deleted, Job};
use cimaster_store::schedules;
use serde::Serialize;

use super::error::ApiError;
use super::json::ApiJson;
use super::AppState;
use crate::http::{Admin, Reader};

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
    /// Jobs with a `schedule`: when it fires next and what its last slot did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_state: Option<ScheduleState>,
}

/// A schedule's next slots and its last one.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleState {
    /// The next three slots.
    pub next_runs: Vec<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_slot: Option<DateTime<Utc>>,
    /// The run the last slot started, or the one it found still running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<uuid::Uuid>,
    /// `started`, `skipped: …` (the previous run still ran) or `refused: …` (the trigger was not
    /// accepted, e.g. the branch is gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

impl From<Job> for JobView {
    fn from(row: Job) -> Self {
        JobView {
            name: row.name,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
            change: None,
            schedule_state: row.spec.schedule().map(|schedule| ScheduleState {
                next_runs: schedule.upcoming(Utc::now(), 3),
                last_slot: None,
                last_run: None,
                last_outcome: None,
            }),
            spec: row.spec,
        }
    }
}

/// Parses a job name from a path, answering 400 with the rule it broke.
pub fn job_name(raw: &str) -> Result<JobName, ApiError> {
    JobName::parse(raw).map_err(|err| ApiError::BadRequest(err.to_string()))
}

pub fn job_not_found(name: &JobName) -> ApiError {
    ApiError::NotFound(format!("job `{name}` does not exist; create it with PUT /jobs/{name}"))
}

/// 404 unless the job exists.
pub async fn require_job(state: &AppState, name: &JobName) -> Result<(), ApiError> {
    if jobs::exists(&state.pool, name).await? {
        Ok(())
    } else {
        Err(job_not_found(name))
    }
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
    caller: Admin,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<JobSpec>,
) -> Result<impl IntoResponse, ApiError> {
    let name = job_name(&name)?;
    spec.check(state.max_timeout_seconds).map_err(ApiError::Unprocessable)?;
    if let JobSpec::Git(git) = &spec {
        state
            .triggers
            .repos
            .check_scheme(git.repository.as_str())
            .map_err(|err| ApiError::Unprocessable(err.to_string()))?;
    }
    let next_slot = spec.schedule().and_then(|schedule| schedule.next_after(Utc::now()));
    let (job, applied) =
        jobs::apply(&state.pool, &name, &spec, next_slot).await?.ok_or_else(|| job_not_found(&name))?;
    let change = match applied {
        Applied::Created => Change::Created,
        Applied::Updated => Change::Updated,
        Applied::Unchanged => Change::Unchanged,
    };
    state.jobs.forget(&name);
    tracing::info!(job = %name, ?change, by = %caller.subject, "job applied");
    let status = if change == Change::Created { StatusCode::CREATED } else { StatusCode::OK };
    let mut view = JobView::from(job);
    view.change = Some(change);
    Ok((status, [(axum::http::header::LOCATION, format!("/jobs/{name}"))], Json(view)))
}

/// One job.
#[utoipa::path(get, path = "/jobs/{name}", tag = "jobs",
    params(("name" = String, Path, description = "job name")),
    responses((status = 200, body = JobView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_job(
    State(state): State<AppState>,
    _caller: Reader,
    Path(name): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let name = job_name(&name)?;
    job_view(&state, &name).await.map(Json)
}

/// The job as `GET /jobs/{name}` shows it, with its schedule's state.
pub(crate) async fn job_view(state: &AppState, name: &JobName) -> Result<JobView, ApiError> {
    let job = jobs::get(&state.pool, name).await?.ok_or_else(|| job_not_found(name))?;
    let mut view = JobView::from(job);
    if let (Some(shown), Some(stored)) = (view.schedule_state.as_mut(), schedules::state(&state.pool, name).await?) {
        shown.last_slot = stored.last_slot;
        shown.last_run = stored.last_run;
        shown.last_outcome = stored.last_outcome;
    }
    Ok(view)
}

/// All jobs, by name.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = JobList)), security(("bearer" = [])))]
async fn list_jobs(State(state): State<AppState>, _caller: Reader) -> Result<Json<JobList>, ApiError> {
    let jobs = jobs::list(&state.pool).await?;
    Ok(Json(JobList { jobs: jobs.into_iter().map(JobView::from).collect() }))
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
    caller: Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = job_name(&name)?;
    match jobs::delete(&state.pool, &name).await? {
        Deleted::Deleted => {}
        Deleted::NotFound => return Err(job_not_found(&name)),
        Deleted::Active(active) => {
            return Err(ApiError::Conflict(format!(
                "job `{name}` has {active} queued or running run(s); abort them or let them finish first"
            )))
        }
    }
    state.jobs.forget(&name);
    tracing::info!(job = %name, by = %caller.subject, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}

use super::error::Problem;
