//! `/jobs/{name}/runs`: triggering, reading, listing and aborting runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cimaster_common::{
    EnvName, GitJob, JobName, JobSpec, QueueName, RepoConfig, RunId, RunMessage, RunStatus, TriggerRequest,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::types::Json as SqlJson;
use tracing::Instrument;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::jobs::{job_name, job_not_found, CachedJob};
use super::json::OptionalJson;
use super::query::ApiQuery;
use super::AppState;
use crate::auth::{Caller, Role};
use crate::repo::{Credentials, RepoError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs/{name}/runs", post(trigger).get(list_runs))
        .route("/jobs/{name}/runs/{id}", get(get_run))
        .route("/jobs/{name}/runs/{id}/abort", post(abort_run))
}

const RUN_COLUMNS: &str = "id, job, status, attempt, queue, commit_sha, branch_name, parameters, triggered_by, \
    agent, exit_code, message, abort_requested, created_at, published_at, started_at, finished_at, updated_at, config";

#[derive(sqlx::FromRow)]
struct RunRow {
    id: Uuid,
    job: String,
    status: String,
    attempt: i32,
    queue: String,
    commit_sha: Option<String>,
    branch_name: Option<String>,
    parameters: SqlJson<BTreeMap<String, String>>,
    triggered_by: String,
    agent: Option<String>,
    exit_code: Option<i32>,
    message: Option<String>,
    abort_requested: bool,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    config: Option<SqlJson<serde_json::Value>>,
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
}

impl TryFrom<RunRow> for RunView {
    type Error = ApiError;

    fn try_from(row: RunRow) -> Result<Self, ApiError> {
        let status = row
            .status
            .parse::<RunStatus>()
            .map_err(|err| ApiError::Internal(anyhow::anyhow!("run {}: {err}", row.id)))?;
        let base = format!("/jobs/{}/runs/{}", row.job, row.id);
        Ok(RunView {
            id: row.id,
            job: row.job,
            status,
            attempt: row.attempt,
            queue: row.queue,
            commit_sha: row.commit_sha,
            branch_name: row.branch_name,
            parameters: row.parameters.0,
            triggered_by: row.triggered_by,
            agent: row.agent,
            exit_code: row.exit_code,
            message: row.message,
            abort_requested: row.abort_requested,
            created_at: row.created_at,
            dispatched_at: row.published_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            updated_at: row.updated_at,
            config: row.config.map(|config| config.0),
            links: RunLinks {
                abort: format!("{base}/abort"),
                results: format!("{base}/results"),
                console: format!("{base}/results/console"),
                junit: format!("{base}/results/junit"),
                this: base,
            },
        })
    }
}

pub(super) fn run_id(raw: &str) -> Result<RunId, ApiError> {
    raw.parse::<RunId>().map_err(|err| ApiError::BadRequest(err.to_string()))
}

fn run_not_found(job: &JobName, id: RunId) -> ApiError {
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

/// Checks the trigger against the job and merges parameters.
fn plan_run(job: &JobName, spec: &JobSpec, request: &TriggerRequest) -> Result<BTreeMap<String, String>, ApiError> {
    match spec {
        JobSpec::Git(_) => match (&request.commit_sha, &request.branch_name) {
            (Some(_), Some(_)) => {
                return Err(ApiError::Unprocessable(format!(
                    "git job `{job}` takes either `commitSha` or `branchName`, not both"
                )))
            }
            (None, None) => {
                return Err(ApiError::Unprocessable(format!(
                    "git job `{job}` needs `commitSha` (40 hex digits) or `branchName` in the body"
                )))
            }
            _ => {}
        },
        JobSpec::Freestyle(_) => {
            if request.commit_sha.is_some() || request.branch_name.is_some() {
                return Err(ApiError::Unprocessable(format!(
                    "freestyle job `{job}` has no repository: leave out `commitSha` and `branchName`"
                )));
            }
        }
    }
    let declared = spec.parameters();
    let mut parameters: BTreeMap<String, String> =
        declared.iter().map(|(name, value)| (name.to_string(), value.clone())).collect();
    for (name, value) in &request.parameters {
        if !declared.contains_key(name) {
            let known = declared.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>();
            return Err(ApiError::Unprocessable(format!(
                "job `{job}` has no parameter `{name}`; it declares {}",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        parameters.insert(name.to_string(), value.clone());
    }
    Ok(parameters)
}

fn request_hash(request: &TriggerRequest) -> String {
    let canonical = serde_json::to_vec(request).expect("a trigger request always serialises");
    hex::encode(Sha256::digest(canonical))
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
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    OptionalJson(request): OptionalJson<TriggerRequest>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Trigger)?;
    let job = job_name(&name)?;
    let key = idempotency_key(&headers)?;
    let (status, view) = create_run(&state, &caller, &job, &request, key).await?;
    Ok(respond(status, view))
}

/// Creates a run (or finds the one an earlier request with the same idempotency key created:
/// `200` instead of `201`) and publishes it.
pub(crate) async fn create_run(
    state: &AppState,
    caller: &Caller,
    job: &JobName,
    request: &TriggerRequest,
    key: Option<String>,
) -> Result<(StatusCode, RunView), ApiError> {
    let job = job.clone();
    let hash = key.as_ref().map(|_| request_hash(request));

    let mut tries = 0;
    let row = loop {
        tries += 1;
        // Git jobs are always read afresh: their repository is read before the insert verifies the
        // version, and reading it with another replica's stale settings would refuse the trigger.
        let cached = match state.jobs.get(&job) {
            Some(cached) if !matches!(*cached.spec, JobSpec::Git(_)) => cached,
            _ => {
                let row: (SqlJson<JobSpec>, i64, DateTime<Utc>) =
                    sqlx::query_as("SELECT spec, version, updated_at FROM jobs WHERE name = $1")
                        .bind(job.as_str())
                        .fetch_optional(&state.pool)
                        .await?
                        .ok_or_else(|| job_not_found(&job))?;
                state.jobs.put(&job, CachedJob { spec: Arc::new(row.0 .0), version: row.1, updated_at: row.2 })
            }
        };
        let spec = cached.spec.clone();
        if let Some(existing) = replayed(state, &job, &key, &hash).await? {
            return Ok((StatusCode::OK, existing));
        }
        let parameters = plan_run(&job, &spec, request)?;
        let resolved = match spec.as_ref() {
            JobSpec::Git(git) => Some(read_repo_config(state, &job, git, request).await?),
            JobSpec::Freestyle(_) => None,
        };
        let queue = match &resolved {
            Some((_, config)) => config.queue.as_ref().unwrap_or(spec.queue()),
            None => spec.queue(),
        };
        let commit_sha = match &resolved {
            Some((sha, _)) => Some(sha.as_str()),
            None => request.commit_sha.as_ref().map(|sha| sha.as_str()),
        };
        // One statement: the job row is locked FOR SHARE while the run is inserted, so a concurrent
        // DELETE waits for it, and the version check makes sure the run was planned against the job
        // as it is now — the cached spec is only a hint that this statement verifies.
        let inserted: Option<RunRow> = sqlx::query_as(&format!(
            "INSERT INTO runs (id, job, queue, commit_sha, branch_name, parameters, spec, triggered_by,
                               idempotency_key, request_hash, config)
             SELECT $1, name, $3, $4, $5, $6, spec, $7, $8, $9, $12 FROM jobs
             WHERE name = $2 AND version = $10 AND updated_at = $11
             FOR SHARE
             ON CONFLICT (job, idempotency_key) DO NOTHING
             RETURNING {RUN_COLUMNS}"
        ))
        .bind(RunId::new().0)
        .bind(job.as_str())
        .bind(queue.as_str())
        .bind(commit_sha)
        .bind(request.branch_name.as_ref().map(|branch| branch.as_str()))
        .bind(SqlJson(&parameters))
        .bind(&caller.subject)
        .bind(key.as_deref())
        .bind(hash.as_deref())
        .bind(cached.version)
        .bind(cached.updated_at)
        .bind(resolved.as_ref().map(|(_, config)| SqlJson(config)))
        .fetch_optional(&state.pool)
        .await?;
        if let Some(row) = inserted {
            break row;
        }
        // Either a request with the same Idempotency-Key won the race, or the job changed or was
        // deleted between the two statements.
        if let Some(existing) = replayed(state, &job, &key, &hash).await? {
            return Ok((StatusCode::OK, existing));
        }
        state.jobs.forget(&job);
        if tries >= 3 {
            return Err(ApiError::Conflict(format!("job `{job}` kept changing while the run was created; retry")));
        }
    };
    let id = RunId(row.id);
    let span = tracing::info_span!("trigger", run_id = %id, job = %job);
    let queue: QueueName = row.queue.parse().map_err(|err| ApiError::Internal(anyhow::anyhow!("run {id}: {err}")))?;
    metrics::counter!("cimaster_runs_created_total", "queue" => queue.to_string()).increment(1);

    let message = RunMessage { run_id: id, job: job.clone(), attempt: 1, queue };
    match state.broker.publish(&message).instrument(span.clone()).await {
        Ok(()) => state.confirms.confirmed(id),
        Err(err) => {
            metrics::counter!("cimaster_publish_failures_total").increment(1);
            span.in_scope(|| tracing::warn!(error = %err, "run recorded; the dispatcher will publish it"));
        }
    }
    span.in_scope(|| tracing::info!(by = %caller.subject, "run triggered"));
    Ok((StatusCode::CREATED, RunView::try_from(row)?))
}

/// Resolves the trigger's branch to a commit and reads the job config file there. Every problem
/// with the repository or the file is the trigger's 422.
async fn read_repo_config(
    state: &AppState,
    job: &JobName,
    git: &GitJob,
    request: &TriggerRequest,
) -> Result<(String, RepoConfig), ApiError> {
    let creds = repo_credentials(state, job, git).await?;
    let url = git.repository.as_str();
    let unprocessable = |err: RepoError| ApiError::Unprocessable(format!("repository {url}: {err}"));
    let sha = match (&request.commit_sha, &request.branch_name) {
        (Some(sha), _) => sha.as_str().to_owned(),
        (None, Some(branch)) => {
            state.repos.resolve_branch(url, branch.as_str(), &creds).await.map_err(unprocessable)?
        }
        (None, None) => unreachable!("plan_run asks for a commit or a branch"),
    };
    let path = git.config_path.as_str();
    let text =
        state.repos.read_file(url, &sha, path, &creds).await.map_err(unprocessable)?.ok_or_else(|| {
            ApiError::Unprocessable(format!("job config file `{path}` does not exist at commit {sha}"))
        })?;
    let config = RepoConfig::parse(&text)
        .map_err(|err| ApiError::Unprocessable(format!("job config file `{path}` at commit {sha}, {err}")))?;
    if config.timeout_seconds > state.max_timeout_seconds {
        return Err(ApiError::Unprocessable(format!(
            "job config file `{path}` at commit {sha}: timeoutSeconds {} is above this installation's maximum of {}",
            config.timeout_seconds, state.max_timeout_seconds
        )));
    }
    Ok((sha, config))
}

/// The job's repository credentials, decrypted from its secrets.
async fn repo_credentials(state: &AppState, job: &JobName, git: &GitJob) -> Result<Credentials, ApiError> {
    let mut creds = Credentials { known_hosts: git.ssh_known_hosts.clone(), ..Credentials::default() };
    let names: Vec<String> = git.credential_secrets().map(ToString::to_string).collect();
    if names.is_empty() {
        return Ok(creds);
    }
    let secrets = state.secrets.as_ref().ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "job `{job}` reads its repository with secrets, but this server has no CIMASTER_SECRETS_KEY"
        ))
    })?;
    let sealed: Vec<(String, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT name, nonce, ciphertext FROM job_secrets WHERE job = $1 AND name = ANY($2)")
            .bind(job.as_str())
            .bind(&names)
            .fetch_all(&state.pool)
            .await?;
    let open = |name: &EnvName| -> Result<secrecy::SecretString, ApiError> {
        let (_, nonce, ciphertext) = sealed.iter().find(|(stored, _, _)| stored == name.as_str()).ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "secret `{name}` is not set for job `{job}`; set it with PUT /jobs/{job}/secrets/{name}"
            ))
        })?;
        secrets
            .open(&format!("{job}/{name}"), nonce, ciphertext)
            .map_err(|err| ApiError::Internal(anyhow::anyhow!("secret `{name}` of job `{job}`: {err}")))
    };
    creds.token = git.token_secret.as_ref().map(&open).transpose()?;
    creds.ssh_key = git.ssh_key_secret.as_ref().map(&open).transpose()?;
    Ok(creds)
}

fn respond(status: StatusCode, view: RunView) -> Response {
    (status, [(header::LOCATION, view.links.this.clone())], Json(view)).into_response()
}

/// The earlier run created with this Idempotency-Key.
async fn replayed(
    state: &AppState,
    job: &JobName,
    key: &Option<String>,
    hash: &Option<String>,
) -> Result<Option<RunView>, ApiError> {
    let (Some(key), Some(hash)) = (key, hash) else { return Ok(None) };
    let mut conn = state.pool.acquire().await?;
    match find_by_key(&mut conn, job, key).await? {
        Some(existing) => Ok(Some(replay(existing, hash)?)),
        None => Ok(None),
    }
}

#[derive(sqlx::FromRow)]
struct KeyedRun {
    #[sqlx(flatten)]
    row: RunRow,
    request_hash: Option<String>,
}

async fn find_by_key(conn: &mut sqlx::PgConnection, job: &JobName, key: &str) -> Result<Option<KeyedRun>, ApiError> {
    Ok(sqlx::query_as(&format!("SELECT {RUN_COLUMNS}, request_hash FROM runs WHERE job = $1 AND idempotency_key = $2"))
        .bind(job.as_str())
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?)
}

fn replay(KeyedRun { row, request_hash }: KeyedRun, hash: &str) -> Result<RunView, ApiError> {
    if request_hash.as_deref() != Some(hash) {
        return Err(ApiError::Unprocessable(format!(
            "Idempotency-Key was already used for run {} with a different body; use a new key",
            row.id
        )));
    }
    RunView::try_from(row)
}

/// One run: status, attempt, timestamps, agent, exit code and links to its results.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}", tag = "runs",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id")),
    responses((status = 200, body = RunView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<RunView>, ApiError> {
    caller.require(Role::Read)?;
    let job = job_name(&name)?;
    let id = run_id(&id)?;
    let row: RunRow = sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND job = $2"))
        .bind(id.0)
        .bind(job.as_str())
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| run_not_found(&job, id))?;
    Ok(Json(row.try_into()?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    /// Comma-separated statuses, e.g. `queued,running`.
    status: Option<String>,
    branch_name: Option<String>,
    commit_sha: Option<String>,
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
    caller: Caller,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<RunFilter>,
) -> Result<Json<RunPage>, ApiError> {
    caller.require(Role::Read)?;
    let job = job_name(&name)?;
    let filter = query;
    let statuses: Option<Vec<String>> = match &filter.status {
        Some(list) => Some(
            list.split(',')
                .map(|status| status.trim().parse::<RunStatus>().map(|s| s.as_str().to_owned()))
                .collect::<Result<_, _>>()
                .map_err(|err| ApiError::BadRequest(err.to_string()))?,
        ),
        None => None,
    };
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

    let job_exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE name = $1)")
        .bind(job.as_str())
        .fetch_one(&state.pool)
        .await?;
    if !job_exists {
        return Err(job_not_found(&job));
    }
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM runs
         WHERE job = $1
           AND ($2::text[] IS NULL OR status = ANY($2))
           AND ($3::text IS NULL OR branch_name = $3)
           AND ($4::text IS NULL OR commit_sha = $4)
           AND ($5::uuid IS NULL OR id < $5)
         ORDER BY id DESC
         LIMIT $6"
    ))
    .bind(job.as_str())
    .bind(&statuses)
    .bind(&filter.branch_name)
    .bind(commit.as_ref().map(|c| c.as_str()))
    .bind(before.map(|id| id.0))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let has_more = rows.len() as i64 > limit;
    let runs: Vec<RunView> = rows.into_iter().take(limit as usize).map(RunView::try_from).collect::<Result<_, _>>()?;
    let next = match (has_more, runs.last()) {
        (true, Some(last)) => {
            let mut link = format!("/jobs/{job}/runs?limit={limit}&before={}", last.id);
            if let Some(status) = &statuses {
                link.push_str(&format!("&status={}", status.join(",")));
            }
            if let Some(branch) = &filter.branch_name {
                link.push_str(&format!("&branchName={}", urlencode(branch)));
            }
            if let Some(commit) = &commit {
                link.push_str(&format!("&commitSha={commit}"));
            }
            Some(link)
        }
        _ => None,
    };
    Ok(Json(RunPage { runs, next }))
}

fn urlencode(value: &str) -> String {
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
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Trigger)?;
    let job = job_name(&name)?;
    let id = run_id(&id)?;
    let mut tx = state.pool.begin().await?;
    let row: Option<RunRow> = sqlx::query_as(&format!(
        "UPDATE runs SET
            abort_requested = TRUE,
            status = CASE WHEN status = 'queued' THEN 'aborted' ELSE status END,
            finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
            message = CASE WHEN status = 'queued' THEN 'aborted by ' || $3 || ' before it started' ELSE message END,
            updated_at = now()
         WHERE id = $1 AND job = $2 AND status IN ('queued', 'running')
         RETURNING {RUN_COLUMNS}"
    ))
    .bind(id.0)
    .bind(job.as_str())
    .bind(&caller.subject)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1 AND job = $2")
            .bind(id.0)
            .bind(job.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        return Err(match status {
            None => run_not_found(&job, id),
            Some(status) => ApiError::Conflict(format!("run {id} has already ended with status `{status}`")),
        });
    };
    // Agents LISTEN on this channel; the notification is delivered when the transaction commits.
    sqlx::query("SELECT pg_notify('cimaster_run_abort', $1)").bind(id.to_string()).execute(&mut *tx).await?;
    tx.commit().await?;
    let view = RunView::try_from(row)?;
    tracing::info!(run_id = %id, job = %job, by = %caller.subject, status = %view.status, "abort requested");
    let status = if view.status == RunStatus::Aborted { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, Json(view)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> JobSpec {
        serde_json::from_value(value).unwrap()
    }

    fn request(value: serde_json::Value) -> TriggerRequest {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn git_jobs_need_exactly_one_ref() {
        let job = JobName::parse("e2e").unwrap();
        let git = spec(json!({"kind": "git", "repository": "https://h/r"}));
        let sha = "0".repeat(40);
        assert!(plan_run(&job, &git, &request(json!({"branchName": "main"}))).is_ok());
        assert!(plan_run(&job, &git, &request(json!({"commitSha": sha}))).is_ok());
        let both = plan_run(&job, &git, &request(json!({"commitSha": sha, "branchName": "main"})));
        assert!(both.unwrap_err().to_string().contains("not both"));
        assert!(plan_run(&job, &git, &request(json!({}))).unwrap_err().to_string().contains("needs"));
    }

    #[test]
    fn parameters_override_defaults_and_unknown_ones_are_refused() {
        let job = JobName::parse("unit").unwrap();
        let free =
            spec(json!({"kind": "freestyle", "image": "b", "script": "x", "parameters": {"TARGET": "all", "N": "1"}}));
        let merged = plan_run(&job, &free, &request(json!({"parameters": {"TARGET": "lib"}}))).unwrap();
        assert_eq!(merged["TARGET"], "lib");
        assert_eq!(merged["N"], "1");
        let err = plan_run(&job, &free, &request(json!({"parameters": {"TARGT": "x"}}))).unwrap_err();
        assert!(err.to_string().contains("no parameter `TARGT`; it declares `N`, `TARGET`"), "{err}");
        let err = plan_run(&job, &free, &request(json!({"branchName": "main"}))).unwrap_err();
        assert!(err.to_string().contains("leave out"));
    }
}
