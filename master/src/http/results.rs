//! `/jobs/{name}/runs/{id}/results…`: the console log — live from Postgres while the attempt runs,
//! from S3 once it has ended — streamed without loading it into memory.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use cimaster_common::storage::console_key;
use cimaster_common::RunStatus;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::jobs::job_name;
use super::runs::run_id;
use super::AppState;
use crate::auth::{Caller, Role};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs/{name}/runs/{id}/results", get(list_results))
        .route("/jobs/{name}/runs/{id}/results/console", get(console))
        .route("/jobs/{name}/runs/{id}/results/junit", get(junit))
}

/// One result a run has.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultEntry {
    /// `console` (more kinds, such as `junit` and `artifact`, come with result collection).
    pub kind: &'static str,
    pub name: String,
    pub attempt: i32,
    /// Bytes; absent while the attempt runs.
    pub size: Option<i64>,
    pub content_type: &'static str,
    /// `live` while the attempt runs (served from Postgres), `stored` once in S3.
    pub state: &'static str,
    pub href: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ResultList {
    pub results: Vec<ResultEntry>,
}

async fn run_attempts(
    state: &AppState,
    job: &str,
    run: Uuid,
) -> Result<Option<(i32, String, Option<i64>, Option<String>)>, sqlx::Error> {
    sqlx::query_as("SELECT attempt, status, console_bytes, console_key FROM runs WHERE id = $1 AND job = $2")
        .bind(run)
        .bind(job)
        .fetch_optional(&state.pool)
        .await
}

/// What results the run has, per attempt.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id")),
    responses((status = 200, body = ResultList), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn list_results(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<axum::Json<ResultList>, ApiError> {
    caller.require(Role::Read)?;
    let job = job_name(&name)?;
    let run: Uuid = run_id(&id)?.0;
    let (attempt, status, bytes, key) = run_attempts(&state, job.as_str(), run)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job `{job}` has no run {id}")))?;
    let base = format!("/jobs/{job}/runs/{run}/results/console");
    let mut results = Vec::new();
    if status != "queued" || attempt > 1 {
        results.push(ResultEntry {
            kind: "console",
            name: "console.log".into(),
            attempt,
            size: key.as_ref().and(bytes),
            content_type: "text/plain; charset=utf-8",
            state: if key.is_some() { "stored" } else { "live" },
            href: base.clone(),
        });
    }
    // Earlier attempts keep their logs.
    let earlier: Vec<(i32,)> =
        sqlx::query_as("SELECT attempt FROM run_attempts WHERE run_id = $1 AND attempt < $2 ORDER BY attempt")
            .bind(run)
            .bind(attempt)
            .fetch_all(&state.pool)
            .await?;
    for (number,) in earlier {
        results.push(ResultEntry {
            kind: "console",
            name: "console.log".into(),
            attempt: number,
            size: None,
            content_type: "text/plain; charset=utf-8",
            state: "stored",
            href: format!("{base}?attempt={number}"),
        });
    }
    Ok(axum::Json(ResultList { results }))
}

/// JUnit results. Collecting result files from runs is not available yet, so every run answers 404.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results/junit", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id")),
    responses((status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn junit(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let job = job_name(&name)?;
    let run: Uuid = run_id(&id)?.0;
    if run_attempts(&state, job.as_str(), run).await?.is_none() {
        return Err(ApiError::NotFound(format!("job `{job}` has no run {id}")));
    }
    Err(ApiError::NotFound(format!(
        "run {id} has no JUnit results: result files are not collected from runs yet (see GET /jobs/{job}/runs/{id}/results)"
    )))
}

const POLL: Duration = Duration::from_millis(250);

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Keep the response open and stream new output until the attempt ends.
    #[serde(default)]
    follow: bool,
    /// Which attempt's log (default: the current one).
    attempt: Option<i32>,
}

#[derive(sqlx::FromRow, Clone)]
struct RunState {
    status: String,
    attempt: i32,
    console_key: Option<String>,
}

async fn state_of(pool: &PgPool, run: Uuid) -> Result<Option<RunState>, sqlx::Error> {
    sqlx::query_as("SELECT status, attempt, console_key FROM runs WHERE id = $1").bind(run).fetch_optional(pool).await
}

/// The run's console log (stdout and stderr in order, each line prefixed with its timestamp).
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results/console", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id"), ConsoleQuery),
    responses((status = 200, description = "the log so far, or streamed with follow=true", content_type = "text/plain"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn console(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    query: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let job = job_name(&name)?;
    let run: Uuid = run_id(&id)?.0;
    let Query(query) = query.map_err(|err| ApiError::BadRequest(err.body_text()))?;
    let current: Option<(i32,)> = sqlx::query_as("SELECT attempt FROM runs WHERE id = $1 AND job = $2")
        .bind(run)
        .bind(job.as_str())
        .fetch_optional(&state.pool)
        .await?;
    let Some((current,)) = current else {
        return Err(ApiError::NotFound(format!("job `{job}` has no run {id}")));
    };
    let attempt = query.attempt.unwrap_or(current);
    if attempt < 1 || attempt > current {
        return Err(ApiError::NotFound(format!("run {id} has attempts 1 to {current}, not {attempt}")));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let pool = state.pool.clone();
    let s3 = state.s3.clone();
    let bucket = state.bucket.clone();
    tokio::spawn(async move {
        if let Err(err) = pump(&pool, &s3, &bucket, run, attempt, query.follow, &tx).await {
            tracing::warn!(run_id = %run, error = %err, "console stream failed");
            let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
        }
    });
    let body =
        Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response())
}

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Sends the log: Postgres chunks while the attempt is live, then the rest from S3 once stored.
async fn pump(
    pool: &PgPool,
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    run: Uuid,
    attempt: i32,
    follow: bool,
    tx: &Tx,
) -> anyhow::Result<()> {
    let mut sent: u64 = 0;
    let mut next_seq: i64 = 0;
    loop {
        let state = state_of(pool, run).await?.ok_or_else(|| anyhow::anyhow!("run vanished"))?;
        let stored = stored_key(&state, run, attempt);
        if let Some(key) = stored {
            if stream_s3(s3, bucket, &key, sent, tx).await? {
                return Ok(());
            }
        }
        // Read the state before the chunks: if it says "ended", every chunk is already written.
        let ended = state.attempt != attempt || state.status.parse::<RunStatus>().is_ok_and(RunStatus::is_terminal);
        loop {
            let chunks: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT seq, data FROM run_console WHERE run_id = $1 AND attempt = $2 AND seq >= $3 ORDER BY seq LIMIT 64",
            )
            .bind(run)
            .bind(attempt)
            .bind(next_seq)
            .fetch_all(pool)
            .await?;
            if chunks.is_empty() {
                break;
            }
            for (seq, data) in chunks {
                next_seq = seq + 1;
                sent += data.len() as u64;
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
        }
        // An ended attempt whose log is not in S3 (the upload failed, or its agent died) is whole
        // in Postgres, and has just been sent.
        if !follow || ended {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The S3 key of this attempt's stored log, if it has been stored.
fn stored_key(state: &RunState, run: Uuid, attempt: i32) -> Option<String> {
    if state.attempt == attempt {
        state.console_key.clone()
    } else {
        // Earlier attempts keep their log under the conventional key, if their agent stored it.
        u32::try_from(attempt).ok().map(|attempt| console_key(cimaster_common::RunId(run), attempt))
    }
}

/// Streams the stored log from byte `skip` on. `false` when the object does not exist.
async fn stream_s3(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, skip: u64, tx: &Tx) -> anyhow::Result<bool> {
    let mut request = s3.get_object().bucket(bucket).key(key);
    if skip > 0 {
        request = request.range(format!("bytes={skip}-"));
    }
    let object = match request.send().await {
        Ok(object) => object,
        Err(err) => {
            let service = err.as_service_error();
            if service.is_some_and(|e| e.is_no_such_key()) {
                return Ok(false);
            }
            // A range starting at the end of the object: nothing left to send.
            if err.raw_response().is_some_and(|r| r.status().as_u16() == 416) {
                return Ok(true);
            }
            return Err(err.into());
        }
    };
    let mut body = object.body;
    while let Some(chunk) = body.next().await {
        if tx.send(Ok(chunk?)).await.is_err() {
            break;
        }
    }
    Ok(true)
}
