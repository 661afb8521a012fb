//! Runs: triggering, reading, listing, aborting and rerunning (`/jobs/{name}/runs`), and every
//! job's runs at once (`/runs`).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cimaster_common::{Cause, JobName, RunEvent, RunId, RunStatus, TriggerRequest};
use cimaster_store::runs::{self, Abort, Run};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::jobs::{job_name, require_job};
use super::json::OptionalJson;
use super::query::ApiQuery;
use super::AppState;
use crate::http::{Reader, Triggerer};
use crate::trigger::{Created, Repeats, Trigger, TriggerError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs/{name}/runs", post(trigger).get(list_runs))
        .route("/jobs/{name}/runs/{id}", get(get_run))
        .route("/jobs/{name}/runs/{id}/abort", post(abort_run))
        .route("/jobs/{name}/runs/{id}/rerun", post(rerun))
        .route("/runs", get(list_all_runs))
        .route("/runs/{id}", get(find_run))
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub id: Uuid,
    pub job: String,
    pub status: RunStatus,
    /// 1 for the first attempt; a run whose agent died is queued again as the next attempt.
    pub attempt: i32,
    pub queue: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch_name: Option<String>,
    /// The job's parameter defaults merged with the trigger's overrides.
    pub parameters: BTreeMap<String, String>,
    pub triggered_by: String,
    /// The agent executing (or that executed) the current attempt.
    pub agent: Option<String>,
    pub exit_code: Option<i32>,
    /// Why the run ended the way it did, when there is more to say than the status.
    pub message: Option<String>,
    pub abort_requested: bool,
    pub created_at: DateTime<Utc>,
    /// When RabbitMQ confirmed the current attempt.
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Git runs: the job config file as read from the repository at `commitSha` when triggered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Value>,
    /// The run this one repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<Uuid>,
    /// Why the run exists: `event`, and for code-host events `pullRequest`, `sender`, `baseBranch`,
    /// `baseSha`.
    #[serde(flatten)]
    pub cause: Cause,
    pub links: RunLinks,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RunLinks {
    #[serde(rename = "self")]
    pub this: String,
    pub abort: String,
    pub results: String,
    pub console: String,
    pub junit: String,
    pub rerun: String,
}

impl From<Run> for RunView {
    fn from(run: Run) -> Self {
        let base = format!("/jobs/{}/runs/{}", run.job, run.id);
        RunView {
            id: run.id,
            job: run.job,
            status: run.status,
            attempt: run.attempt,
            queue: run.queue,
            commit_sha: run.commit_sha,
            branch_name: run.branch_name,
            parameters: run.parameters,
            triggered_by: run.triggered_by,
            agent: run.agent,
            exit_code: run.exit_code,
            message: run.message,
            abort_requested: run.abort_requested,
            created_at: run.created_at,
            dispatched_at: run.published_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
            updated_at: run.updated_at,
            config: run.config,
            rerun_of: run.rerun_of,
            cause: run.cause,
            links: RunLinks {
                abort: format!("{base}/abort"),
                results: format!("{base}/results"),
                console: format!("{base}/results/console"),
                junit: format!("{base}/results/junit"),
                rerun: format!("{base}/rerun"),
                this: base,
            },
        }
    }
}

pub(crate) fn run_id(raw: &str) -> Result<RunId, ApiError> {
    raw.parse::<RunId>().map_err(|err| ApiError::BadRequest(err.to_string()))
}

impl From<TriggerError> for ApiError {
    fn from(err: TriggerError) -> Self {
        match err {
            TriggerError::JobNotFound(_) => ApiError::NotFound(err.to_string()),
            TriggerError::Invalid(_) | TriggerError::KeyReused(_) => ApiError::Unprocessable(err.to_string()),
            TriggerError::JobChanging(_) => ApiError::Conflict(err.to_string()),
            TriggerError::Database(err) => err.into(),
            TriggerError::Internal(err) => ApiError::Internal(err),
        }
    }
}

pub(crate) fn run_not_found(job: &JobName, id: RunId) -> ApiError {
    ApiError::NotFound(format!("job `{job}` has no run {id}"))
}

/// Reads and checks the `Idempotency-Key` header.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|key| !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into()))?;
    Ok(Some(key.to_owned()))
}

/// Trigger a run. The run is committed before the answer; publishing to RabbitMQ follows, and a run
/// the broker could not take is published later by the dispatcher.
#[utoipa::path(post, path = "/jobs/{name}/runs", tag = "runs", request_body = TriggerRequest,
    params(("name" = String, Path, description = "job name"),
        ("Idempotency-Key" = Option<String>, Header, description = "the same key returns the same run")),
    responses(
        (status = 201, description = "run created", body = RunView, headers(("Location" = String))),
        (status = 200, description = "the run an earlier request with this Idempotency-Key created", body = RunView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn trigger(
    State(state): State<AppState>,
    caller: Triggerer,
    Path(name): Path<String>,
    headers: HeaderMap,
    OptionalJson(request): OptionalJson<TriggerRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let job = job_name(&name)?;
    let key = idempotency_key(&headers)?;
    let trigger = Trigger {
        job: &job,
        request: &request,
        by: &caller.subject,
        idempotency_key: key.as_deref(),
        rerun_of: None,
        cause: &Cause::default(),
        pushed_branch: None,
    };
    create(&state, &trigger).await
}

/// Creates the run and answers 201, or 200 with the run an earlier request with the same key made.
async fn create(state: &AppState, trigger: &Trigger<'_>) -> Result<Response, ApiError> {
    let (status, run) = match state.triggers.create(trigger).await? {
        Created::New(run) => (StatusCode::CREATED, run),
        Created::Replayed(run) => (StatusCode::OK, run),
    };
    Ok(respond(status, RunView::from(run)))
}

/// Run again: a new run of the job at the same commit and branch with the same parameters, which
/// names the run it repeats (`rerunOf`).
#[utoipa::path(post, path = "/jobs/{name}/runs/{id}/rerun", tag = "runs",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "the run to repeat"),
        ("Idempotency-Key" = Option<String>, Header, description = "the same key returns the same run")),
    responses(
        (status = 201, description = "run created", body = RunView, headers(("Location" = String))),
        (status = 200, description = "the run an earlier request with this Idempotency-Key created", body = RunView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the job no longer takes the run's parameters", body = Problem,
            content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn rerun(
    State(state): State<AppState>,
    caller: Triggerer,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = job_name(&name)?;
    let id = run_id(&id)?;
    let key = idempotency_key(&headers)?;
    let (status, run) = match repeat(&state, &job, id, &caller.subject, key.as_deref()).await? {
        Created::New(run) => (StatusCode::CREATED, run),
        Created::Replayed(run) => (StatusCode::OK, run),
    };
    Ok(respond(status, RunView::from(run)))
}

/// Creates a run repeating run `id` of `job`: the same commit, parameters and cause.
pub(crate) async fn repeat(
    state: &AppState,
    job: &JobName,
    id: RunId,
    by: &str,
    key: Option<&str>,
) -> Result<Created, ApiError> {
    let original = runs::get(&state.pool, job, id).await?.ok_or_else(|| run_not_found(job, id))?;
    let request = TriggerRequest {
        commit_sha: original
            .commit_sha
            .as_deref()
            .map(cimaster_common::CommitSha::parse)
            .transpose()
            .map_err(|err| ApiError::Internal(err.into()))?,
        // The commit itself, not the branch's newest.
        branch_name: None,
        parameters: original
            .parameters
            .iter()
            .map(|(name, value)| Ok((cimaster_common::EnvName::parse(name)?, value.clone())))
            .collect::<Result<_, cimaster_common::InvalidValue>>()
            .map_err(|err| ApiError::Internal(err.into()))?,
    };
    let trigger = Trigger {
        job,
        request: &request,
        by,
        idempotency_key: key,
        rerun_of: Some(Repeats { run: id, branch_name: original.branch_name.as_deref() }),
        // The same cause: a rerun of a pull request's run is that pull request's run.
        cause: &original.cause,
        pushed_branch: None,
    };
    Ok(state.triggers.create(&trigger).await?)
}

fn respond(status: StatusCode, view: RunView) -> Response {
    (status, [(header::LOCATION, view.links.this.clone())], Json(view)).into_response()
}

/// One run: status, attempt, timestamps, agent, exit code and links to its results.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}", tag = "runs",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id")),
    responses((status = 200, body = RunView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_run(
    State(state): State<AppState>,
    _caller: Reader,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<RunView>, ApiError> {
    let job = job_name(&name)?;
    let id = run_id(&id)?;
    let run = runs::get(&state.pool, &job, id).await?.ok_or_else(|| run_not_found(&job, id))?;
    Ok(Json(run.into()))
}

/// One run by its id alone, whatever its job.
#[utoipa::path(get, path = "/runs/{id}", tag = "runs",
    params(("id" = Uuid, Path, description = "run id")),
    responses((status = 200, body = RunView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn find_run(
    State(state): State<AppState>,
    _caller: Reader,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let id = run_id(&id)?;
    let run = runs::find(&state.pool, id).await?.ok_or_else(|| ApiError::NotFound(format!("no run {id}")))?;
    Ok(Json(run.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    /// `/runs` only: one job's runs.
    job: Option<String>,
    /// Comma-separated statuses, e.g. `queued,running`.
    status: Option<String>,
    branch_name: Option<String>,
    commit_sha: Option<String>,
    /// `api`, `pull_request`, `push`, `comment` or `schedule`.
    event: Option<String>,
    /// Runs of this pull request.
    pull_request: Option<i64>,
    /// Page size, 1 to 200 (default 50).
    limit: Option<i64>,
    /// Return runs older than this run id (the `next` link carries it).
    before: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RunPage {
    pub runs: Vec<RunView>,
    /// Link to the next (older) page, absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A job's runs, newest first, with filters and pagination.
#[utoipa::path(get, path = "/jobs/{name}/runs", tag = "runs",
    params(("name" = String, Path, description = "job name"), RunFilter),
    responses((status = 200, body = RunPage), (status = 400, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn list_runs(
    State(state): State<AppState>,
    _caller: Reader,
    Path(name): Path<String>,
    ApiQuery(filter): ApiQuery<RunFilter>,
) -> Result<Json<RunPage>, ApiError> {
    let job = job_name(&name)?;
    if filter.job.is_some() {
        return Err(ApiError::BadRequest(format!("the path names the job; leave out `job` (or use /runs?job={job})")));
    }
    require_job(&state, &job).await?;
    page(&state, Some(&job), &filter).await.map(Json)
}

/// Every job's runs, newest first, with filters (`job` among them) and pagination.
#[utoipa::path(get, path = "/runs", tag = "runs", params(RunFilter),
    responses((status = 200, body = RunPage)),
    security(("bearer" = [])))]
async fn list_all_runs(
    State(state): State<AppState>,
    _caller: Reader,
    ApiQuery(filter): ApiQuery<RunFilter>,
) -> Result<Json<RunPage>, ApiError> {
    let job = filter.job.as_deref().map(job_name).transpose()?;
    page(&state, job.as_ref(), &filter).await.map(Json)
}

/// One page of runs, and the link to the next (older) one.
async fn page(state: &AppState, job: Option<&JobName>, filter: &RunFilter) -> Result<RunPage, ApiError> {
    let statuses: Option<Vec<RunStatus>> = filter
        .status
        .as_deref()
        .map(|list| list.split(',').map(|status| status.trim().parse::<RunStatus>()).collect::<Result<_, _>>())
        .transpose()
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let limit = filter.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be between 1 and 200, got {limit}")));
    }
    let before = filter.before.as_deref().map(run_id).transpose()?;
    let commit = filter
        .commit_sha
        .as_deref()
        .map(|sha| cimaster_common::CommitSha::parse(sha).map_err(|err| ApiError::BadRequest(err.to_string())))
        .transpose()?;

    let event = filter
        .event
        .as_deref()
        .map(str::parse::<RunEvent>)
        .transpose()
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let query = runs::Filter {
        job,
        event,
        pull_request: filter.pull_request,
        statuses: statuses.as_deref(),
        branch_name: filter.branch_name.as_deref(),
        commit_sha: commit.as_ref().map(|commit| commit.as_str()),
        before,
        limit: limit + 1,
    };
    let rows = runs::list(&state.pool, &query).await?;
    let has_more = rows.len() as i64 > limit;
    let runs: Vec<RunView> = rows.into_iter().take(limit as usize).map(RunView::from).collect();
    let next = match (has_more, runs.last()) {
        (true, Some(last)) => {
            let mut link = match job {
                Some(job) => format!("/jobs/{job}/runs?limit={limit}&before={}", last.id),
                None => format!("/runs?limit={limit}&before={}", last.id),
            };
            if let Some(status) = &statuses {
                let status: Vec<&str> = status.iter().map(|status| status.as_str()).collect();
                link.push_str(&format!("&status={}", status.join(",")));
            }
            if let Some(branch) = &filter.branch_name {
                link.push_str(&format!("&branchName={}", urlencode(branch)));
            }
            if let Some(commit) = &commit {
                link.push_str(&format!("&commitSha={commit}"));
            }
            if let Some(event) = event {
                link.push_str(&format!("&event={event}"));
            }
            if let Some(number) = filter.pull_request {
                link.push_str(&format!("&pullRequest={number}"));
            }
            Some(link)
        }
        _ => None,
    };
    Ok(RunPage { runs, next })
}

/// Percent-encodes a query value.
pub(crate) fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Abort a run. A queued run is aborted at once (200); a running one is signalled to its agent (202).
#[utoipa::path(post, path = "/jobs/{name}/runs/{id}/abort", tag = "runs",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id")),
    responses((status = 200, description = "aborted", body = RunView),
        (status = 202, description = "abort sent to the agent", body = RunView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the run has already ended", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn abort_run(
    State(state): State<AppState>,
    caller: Triggerer,
    Path((name, id)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let job = job_name(&name)?;
    let id = run_id(&id)?;
    let view = RunView::from(request_abort(&state, &job, id, &caller.subject).await?);
    tracing::info!(run_id = %id, job = %job, by = %caller.subject, status = %view.status, "abort requested");
    let status = if view.status == RunStatus::Aborted { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, Json(view)))
}

/// Aborts run `id` of `job` for `by`: the run as it is now, 409 if it has already ended.
pub(crate) async fn request_abort(state: &AppState, job: &JobName, id: RunId, by: &str) -> Result<Run, ApiError> {
    match runs::abort(&state.pool, job, id, by).await? {
        Abort::Requested(run) => Ok(*run),
        Abort::Ended(status) => Err(ApiError::Conflict(format!("run {id} has already ended with status `{status}`"))),
        Abort::NotFound => Err(run_not_found(job, id)),
    }
}
