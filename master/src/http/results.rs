//! `/jobs/{name}/runs/{id}/results…`: the console log — live from Postgres while the attempt runs,
//! from S3 once it has ended — streamed without loading it into memory.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cimaster_common::results::{JunitSummary, KIND_ARTIFACT, KIND_JUNIT, KIND_SERVICE_LOG};
use cimaster_common::RunStatus;
use cimaster_store::attempts;
use cimaster_store::results::{self, ResultFile};
use cimaster_store::runs::{self, Progress};
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::jobs::job_name;
use super::query::ApiQuery;
use super::runs::{run_id, run_not_found};
use super::AppState;
use crate::http::Reader;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs/{name}/runs/{id}/results", get(list_results))
        .route("/jobs/{name}/runs/{id}/results/junit", get(junit))
        .route("/jobs/{name}/runs/{id}/results/artifacts/{*file}", get(artifact))
        .route("/jobs/{name}/runs/{id}/results/services/{service}", get(service_log))
}

/// One result a run has.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultEntry {
    /// `console`, `junit`, `artifact` or `service-log`.
    pub kind: String,
    /// File name; for `junit` and `artifact` its path relative to the workspace.
    pub name: String,
    pub attempt: i32,
    /// Bytes; absent while the attempt runs.
    pub size: Option<i64>,
    pub content_type: String,
    /// `live` while the attempt runs (served from Postgres), `stored` once in S3.
    pub state: &'static str,
    pub href: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ResultList {
    pub results: Vec<ResultEntry>,
}

/// What results the run has, per attempt; with `?attempt=N`, only that attempt's.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id"), AttemptQuery),
    responses((status = 200, body = ResultList),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn list_results(
    State(state): State<AppState>,
    _caller: Reader,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<AttemptQuery>,
) -> Result<axum::Json<ResultList>, ApiError> {
    let job = job_name(&name)?;
    let run = run_id(&id)?;
    let progress = runs::progress(&state.pool, &job, run).await?.ok_or_else(|| run_not_found(&job, run))?;
    let chosen = query.attempt.map(|requested| attempt_in_range(&id, &progress, Some(requested))).transpose()?;
    let mut results = all_results(&state, &job, run, progress).await?;
    if let Some(chosen) = chosen {
        results.retain(|entry| entry.attempt == chosen);
    }
    Ok(axum::Json(ResultList { results }))
}

/// Every result of every attempt of the run, newest attempt first.
pub(crate) async fn all_results(
    state: &AppState,
    job: &cimaster_common::JobName,
    run: cimaster_common::RunId,
    progress: Progress,
) -> Result<Vec<ResultEntry>, ApiError> {
    let (attempt, bytes, key) = (progress.attempt, progress.console_bytes, progress.console_key);
    let base = format!("/jobs/{job}/runs/{run}/results/console");
    let mut results = Vec::new();
    if progress.status != RunStatus::Queued || attempt > 1 {
        results.push(ResultEntry {
            kind: "console".into(),
            name: "console.log".into(),
            attempt,
            size: key.as_ref().and(bytes),
            content_type: "text/plain; charset=utf-8".into(),
            state: if key.is_some() { "stored" } else { "live" },
            href: base.clone(),
        });
    }
    // Earlier attempts keep their logs.
    for number in attempts::earlier(&state.pool, run.0, attempt).await? {
        results.push(ResultEntry {
            kind: "console".into(),
            name: "console.log".into(),
            attempt: number,
            size: None,
            content_type: "text/plain; charset=utf-8".into(),
            state: "stored",
            href: format!("{base}?attempt={number}"),
        });
    }
    let root = format!("/jobs/{job}/runs/{run}/results");
    for ResultFile { attempt: number, kind, name, bytes: size, content_type, .. } in
        results::list(&state.pool, run.0).await?
    {
        let href = match kind.as_str() {
            KIND_SERVICE_LOG => format!("{root}/services/{}", name.trim_end_matches(".log")),
            _ => format!("{root}/artifacts/{name}"),
        };
        results.push(ResultEntry {
            href: if number == attempt { href } else { format!("{href}?attempt={number}") },
            kind,
            name,
            attempt: number,
            size: Some(size),
            content_type,
            state: "stored",
        });
    }
    Ok(results)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AttemptQuery {
    /// Which attempt's results (default: the current one).
    attempt: Option<i32>,
}

/// The attempt a results request is about, after checking the run exists; and whether it is still
/// running.
pub(crate) async fn chosen_attempt(
    state: &AppState,
    name: &str,
    id: &str,
    requested: Option<i32>,
) -> Result<(Uuid, i32, bool), ApiError> {
    let job = job_name(name)?;
    let run = run_id(id)?;
    let progress = runs::progress(&state.pool, &job, run).await?.ok_or_else(|| run_not_found(&job, run))?;
    let attempt = attempt_in_range(id, &progress, requested)?;
    Ok((run.0, attempt, progress.is_live(attempt)))
}

/// The requested attempt (default: the current one), 404 unless the run has had it.
pub(crate) fn attempt_in_range(id: &str, progress: &Progress, requested: Option<i32>) -> Result<i32, ApiError> {
    let current = progress.attempt;
    let attempt = requested.unwrap_or(current);
    if attempt < 1 || attempt > current {
        return Err(ApiError::NotFound(format!("run {id} has attempts 1 to {current}, not {attempt}")));
    }
    Ok(attempt)
}

async fn stored_files(
    state: &AppState,
    run: Uuid,
    attempt: i32,
    kinds: &[&str],
    name: Option<&str>,
) -> Result<Vec<ResultFile>, sqlx::Error> {
    results::files(&state.pool, run, attempt, kinds, name).await
}

/// The JUnit summary of an attempt (`Accept: application/json`, the default).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JunitReport {
    pub attempt: i32,
    /// The report files the summary adds up.
    pub files: Vec<String>,
    #[serde(flatten)]
    pub summary: JunitSummary,
}

/// JUnit results of an attempt: the summary as JSON (totals, failed cases with their messages), or
/// with `Accept: application/zip` the report files themselves.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results/junit", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id"), AttemptQuery),
    responses((status = 200, body = JunitReport), (status = 200, description = "the report files", content_type = "application/zip"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn junit(
    State(state): State<AppState>,
    _caller: Reader,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<AttemptQuery>,
) -> Result<Response, ApiError> {
    let (run, attempt, live) = chosen_attempt(&state, &name, &id, query.attempt).await?;
    let files = stored_files(&state, run, attempt, &[KIND_JUNIT], None).await?;
    if files.is_empty() {
        return Err(ApiError::NotFound(if live {
            format!("run {id} has no JUnit results yet: they are collected when its script ends")
        } else {
            format!("attempt {attempt} of run {id} has no JUnit results (none matched `results.junit`)")
        }));
    }
    let accept = headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()).unwrap_or("");
    if accept.contains("application/zip") {
        let total: i64 = files.iter().map(|file| file.bytes).sum();
        if total > MAX_ZIP {
            return Err(ApiError::Unprocessable(format!(
                "the reports are {} MiB together, over the {} MiB a zip holds; fetch them one by one (see …/results)",
                total >> 20,
                MAX_ZIP >> 20
            )));
        }
        let zip = zip_files(&state, &files).await?;
        let disposition = attachment(&format!("junit-{run}-{attempt}.zip"));
        return Ok((
            [(header::CONTENT_TYPE, "application/zip".to_owned()), (header::CONTENT_DISPOSITION, disposition)],
            zip,
        )
            .into_response());
    }
    Ok(axum::Json(summed(attempt, &files)).into_response())
}

/// The attempt's JUnit reports added up, if it has any.
pub(crate) async fn junit_report(state: &AppState, run: Uuid, attempt: i32) -> Result<Option<JunitReport>, ApiError> {
    let files = stored_files(state, run, attempt, &[KIND_JUNIT], None).await?;
    Ok((!files.is_empty()).then(|| summed(attempt, &files)))
}

fn summed(attempt: i32, files: &[ResultFile]) -> JunitReport {
    let mut summary = JunitSummary::default();
    for file in files {
        if let Some(one) = &file.summary {
            summary.add(&one.0);
        }
    }
    JunitReport { attempt, files: files.iter().map(|file| file.name.clone()).collect(), summary }
}

/// The most report bytes zipped into one answer (built in memory).
const MAX_ZIP: i64 = 64 << 20;

async fn zip_files(state: &AppState, files: &[ResultFile]) -> Result<Vec<u8>, ApiError> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for file in files {
        let object = stored_object(state, &file.object_key).await?;
        let data = object.body.collect().await.map_err(|err| ApiError::Internal(err.into()))?.into_bytes();
        zip.start_file(file.name.as_str(), options).map_err(|err| ApiError::Internal(err.into()))?;
        zip.write_all(&data).map_err(|err| ApiError::Internal(err.into()))?;
    }
    let cursor = zip.finish().map_err(|err| ApiError::Internal(err.into()))?;
    Ok(cursor.into_inner())
}

/// One collected file (artifact or JUnit report), by its path in the workspace.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results/artifacts/{file}", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id"),
        ("file" = String, Path, description = "the file's path in the workspace, e.g. dist/app.tar.gz"), AttemptQuery),
    responses((status = 200, description = "the file", content_type = "application/octet-stream"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn artifact(
    State(state): State<AppState>,
    _caller: Reader,
    Path((name, id, file)): Path<(String, String, String)>,
    ApiQuery(query): ApiQuery<AttemptQuery>,
) -> Result<Response, ApiError> {
    let (run, attempt, _) = chosen_attempt(&state, &name, &id, query.attempt).await?;
    let found = stored_files(&state, run, attempt, &[KIND_ARTIFACT, KIND_JUNIT], Some(&file)).await?;
    let stored = found
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("attempt {attempt} of run {id} has no result file `{file}`")))?;
    download(&state, stored).await
}

/// The output of one of the run's sidecar services.
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results/services/{service}", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id"),
        ("service" = String, Path, description = "service name"), AttemptQuery),
    responses((status = 200, description = "the service's log", content_type = "text/plain"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn service_log(
    State(state): State<AppState>,
    _caller: Reader,
    Path((name, id, service)): Path<(String, String, String)>,
    ApiQuery(query): ApiQuery<AttemptQuery>,
) -> Result<Response, ApiError> {
    let (run, attempt, _) = chosen_attempt(&state, &name, &id, query.attempt).await?;
    let file = format!("{}.log", service.trim_end_matches(".log"));
    let found = stored_files(&state, run, attempt, &[KIND_SERVICE_LOG], Some(&file)).await?;
    let stored = found.into_iter().next().ok_or_else(|| {
        ApiError::NotFound(format!("attempt {attempt} of run {id} has no log of a service `{service}`"))
    })?;
    download(&state, stored).await
}

/// A stored result file's object; a missing one is a server fault, since the row says it was stored.
async fn stored_object(
    state: &AppState,
    key: &str,
) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, ApiError> {
    state.s3.get_object().bucket(&state.bucket).key(key).send().await.map_err(|err| {
        ApiError::Internal(anyhow::anyhow!("reading {key}: {}", aws_sdk_s3::error::DisplayErrorContext(err)))
    })
}

/// Streams a stored result file from S3.
async fn download(state: &AppState, file: ResultFile) -> Result<Response, ApiError> {
    let object = stored_object(state, &file.object_key).await?;
    let body = Body::from_stream(futures::stream::unfold(object.body, |mut body| async move {
        body.next().await.map(|chunk| (chunk.map_err(std::io::Error::other), body))
    }));
    let base = file.name.rsplit('/').next().unwrap_or(&file.name);
    Ok((
        [
            (header::CONTENT_TYPE, file.content_type),
            (header::CONTENT_LENGTH, file.bytes.to_string()),
            (header::CONTENT_DISPOSITION, attachment(base)),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            // Whatever a job wrote, a browser opening it runs no script with the API's origin.
            (header::CONTENT_SECURITY_POLICY, "sandbox".to_owned()),
        ],
        body,
    )
        .into_response())
}

/// `Content-Disposition` for a download (RFC 6266): an ASCII `filename` for old clients and the
/// exact name as `filename*` (RFC 8187), so no name can break out of the header.
fn attachment(name: &str) -> String {
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    let mut encoded = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_cannot_break_out_of_their_header() {
        assert_eq!(attachment("app.txt"), "attachment; filename=\"app.txt\"; filename*=UTF-8''app.txt");
        assert_eq!(
            attachment("r\u{e9}sum\u{e9} \"x\".txt"),
            "attachment; filename=\"r_sum_ _x_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22x%22.txt"
        );
        let evil = attachment("a\r\nSet-Cookie: x=1;.html");
        assert!(!evil.contains('\r') && !evil.contains('\n'), "{evil}");
        assert!(axum::http::HeaderValue::from_str(&evil).is_ok());
    }
}
