//! The runs list (`/ui/runs`) and a run's page (`/ui/jobs/{name}/runs/{id}`): its status, timings,
//! attempts, cause, JUnit failures, results and the console, followed live over server-sent
//! events; and the abort and rerun buttons.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use cimaster_common::results::FailedCase;
use cimaster_common::{RunEvent, RunId, RunStatus};
use cimaster_store::runs::{self, Run};
use cimaster_store::{attempts, jobs};
use futures::Stream;
use serde::Deserialize;
use tower::ServiceExt;

use super::ansi;
use super::error::UiError;
use super::format::{self, Status};
use super::page::{render, Chrome, Nav};
use super::session::{Posted, Viewer};
use crate::auth::Role;
use crate::http::jobs::job_name;
use crate::http::runs::{run_id, run_not_found};
use crate::http::AppState;
use crate::trigger::Created;

/// A run as one row of a list.
pub struct RunRow {
    pub href: String,
    pub short: String,
    pub job: String,
    pub status: Status,
    pub event: &'static str,
    pub branch: Option<String>,
    pub pull_request: Option<i64>,
    pub sha: Option<String>,
    pub by: String,
    pub duration: String,
    pub created_iso: String,
    pub created_readable: String,
    pub created_ago: String,
}

impl RunRow {
    pub fn new(run: &Run) -> Self {
        let now = Utc::now();
        let duration = match (run.started_at, run.finished_at) {
            (Some(started), Some(finished)) => format::between(started, finished),
            (Some(started), None) => format!("{} so far", format::between(started, now)),
            (None, _) => String::new(),
        };
        Self {
            href: format!("/ui/jobs/{}/runs/{}", run.job, run.id),
            short: format::short_id(&run.id),
            job: run.job.clone(),
            status: format::status(run.status),
            event: run.cause.event.as_str(),
            branch: run.branch_name.clone(),
            pull_request: run.cause.pull_request,
            sha: run.commit_sha.as_deref().map(format::short_sha),
            by: run.triggered_by.clone(),
            duration,
            created_iso: format::iso(run.created_at),
            created_readable: format::readable(run.created_at),
            created_ago: format::relative(run.created_at, now),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RunsQuery {
    job: String,
    status: String,
    event: String,
    branch: String,
    pr: String,
    before: String,
}

/// The filters as the form shows them again.
pub struct Filters {
    pub branch: String,
    pub pr: String,
    pub jobs: Vec<Choice>,
    pub statuses: Vec<Choice>,
    pub events: Vec<Choice>,
}

/// One option of a select, and whether it is the chosen one.
pub struct Choice {
    pub value: String,
    pub selected: bool,
}

fn choices(values: impl IntoIterator<Item = String>, chosen: &str) -> Vec<Choice> {
    values.into_iter().map(|value| Choice { selected: value == chosen, value }).collect()
}

#[derive(askama::Template)]
#[template(path = "ui/runs.html")]
struct RunsPage {
    page: Chrome,
    filters: Filters,
    runs: Vec<RunRow>,
    older: Option<String>,
    newest: Option<String>,
    active: bool,
}

const PAGE_SIZE: i64 = 50;

/// Every job's runs, newest first, filtered, a keyset page at a time.
pub async fn list(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(query): Query<RunsQuery>,
) -> Result<Response, UiError> {
    let job = some(&query.job).map(job_name).transpose()?;
    let statuses = some(&query.status)
        .map(|status| status.parse::<RunStatus>().map(|status| vec![status]))
        .transpose()
        .map_err(|err| UiError::BadRequest(err.to_string()))?;
    let event = some(&query.event)
        .map(str::parse::<RunEvent>)
        .transpose()
        .map_err(|err| UiError::BadRequest(err.to_string()))?;
    let pull_request = some(&query.pr)
        .map(|pr| pr.trim_start_matches('#').parse::<i64>())
        .transpose()
        .map_err(|_| UiError::BadRequest(format!("`{}` is not a pull request number", query.pr)))?;
    let before = some(&query.before).map(run_id).transpose()?;
    let filter = runs::Filter {
        job: job.as_ref(),
        statuses: statuses.as_deref(),
        branch_name: some(&query.branch),
        commit_sha: None,
        event,
        pull_request,
        before,
        limit: PAGE_SIZE + 1,
    };
    let mut found = runs::list(&state.pool, &filter).await?;
    let has_more = found.len() as i64 > PAGE_SIZE;
    found.truncate(PAGE_SIZE as usize);
    let rows: Vec<RunRow> = found.iter().map(RunRow::new).collect();
    let filters_query = filters_query(&query);
    let older =
        (has_more).then(|| found.last().map(|last| format!("/ui/runs?{filters_query}before={}", last.id))).flatten();
    let newest = before.is_some().then(|| format!("/ui/runs?{filters_query}"));
    let page = RunsPage {
        page: Chrome::new("Runs", Nav::Runs, &viewer),
        active: rows.iter().any(|row| row.status.active),
        filters: Filters {
            branch: query.branch.clone(),
            pr: query.pr.clone(),
            jobs: choices(jobs::names(&state.pool).await?, query.job.trim()),
            statuses: choices(RunStatus::ALL.iter().map(|status| status.as_str().to_owned()), query.status.trim()),
            events: choices(RunEvent::ALL.iter().map(|event| event.as_str().to_owned()), query.event.trim()),
        },
        runs: rows,
        older,
        newest,
    };
    render(&page)
}

fn some(value: &str) -> Option<&str> {
    Some(value.trim()).filter(|value| !value.is_empty())
}

/// The filters of a list as query parameters, each followed by `&`.
fn filters_query(query: &RunsQuery) -> String {
    let mut out = String::new();
    for (name, value) in [
        ("job", &query.job),
        ("status", &query.status),
        ("event", &query.event),
        ("branch", &query.branch),
        ("pr", &query.pr),
    ] {
        if let Some(value) = some(value) {
            out.push_str(&format!("{name}={}&", format::urlencode(value)));
        }
    }
    out
}

/// A failed case as the run page shows it.
pub struct FailedView {
    pub case: FailedCase,
    pub place: Option<String>,
    pub time: Option<String>,
}

pub struct JunitView {
    pub tests: u64,
    pub failures: u64,
    pub errors: u64,
    pub skipped: u64,
    pub passed: u64,
    pub time: String,
    pub failed: Vec<FailedView>,
    pub not_listed: u64,
}

pub struct AttemptView {
    pub number: i32,
    pub agent: String,
    pub started: String,
    pub took: String,
    pub outcome: String,
    pub message: String,
    pub current: bool,
}

pub struct ResultView {
    pub kind: String,
    pub name: String,
    pub size: String,
    pub href: String,
}

#[derive(askama::Template)]
#[template(path = "ui/run.html")]
struct RunPage {
    page: Chrome,
    run: Run,
    row: RunRow,
    timings: Vec<(&'static str, String, String)>,
    attempts: Vec<AttemptView>,
    attempt: i32,
    parameters: Vec<(String, String)>,
    junit: Option<JunitView>,
    results: Vec<ResultView>,
    config: Option<String>,
    console_stream: String,
    console_raw: String,
}

#[derive(Deserialize, Default)]
pub struct AttemptQuery {
    attempt: Option<i32>,
}

/// One run: everything about it, and its console.
pub async fn show(
    State(state): State<AppState>,
    viewer: Viewer,
    Path((name, raw_id)): Path<(String, String)>,
    Query(query): Query<AttemptQuery>,
) -> Result<Response, UiError> {
    let (job, id) = (job_name(&name)?, run_id(&raw_id)?);
    let run = runs::get(&state.pool, &job, id).await?.ok_or_else(|| run_not_found(&job, id))?;
    let progress = runs::progress(&state.pool, &job, id).await?.ok_or_else(|| run_not_found(&job, id))?;
    let attempt = crate::http::results::attempt_in_range(&raw_id, &progress, query.attempt)?;
    let base = format!("/ui/jobs/{job}/runs/{id}");
    let attempts = attempts::history(&state.pool, id.0).await?;
    let junit =
        crate::http::results::junit_report(&state, id.0, attempt).await?.map(|report| junit_view(report.summary));
    let results = crate::http::results::all_results(&state, &job, id, progress)
        .await?
        .into_iter()
        .filter(|entry| entry.attempt == attempt && entry.kind != "console")
        .map(|entry| ResultView {
            kind: entry.kind,
            name: entry.name,
            size: entry.size.map(format::bytes).unwrap_or_default(),
            href: format!("/ui{}", entry.href),
        })
        .collect();
    let page = RunPage {
        page: Chrome::new(format!("{job} · run {}", format::short_id(&id.0)), Nav::Runs, &viewer),
        row: RunRow::new(&run),
        timings: timings(&run),
        attempts: attempts.into_iter().map(|record| attempt_view(record, attempt)).collect(),
        attempt,
        parameters: run.parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        junit,
        results,
        config: run.config.as_ref().and_then(|config| serde_json::to_string_pretty(config).ok()),
        console_stream: format!("{base}/console?attempt={attempt}"),
        console_raw: format!("{base}/results/console?attempt={attempt}"),
        run,
    };
    render(&page)
}

fn timings(run: &Run) -> Vec<(&'static str, String, String)> {
    let mut shown = vec![("queued", format::readable(run.created_at), String::new())];
    if let Some(started) = run.started_at {
        shown.push((
            "started",
            format::readable(started),
            format!("waited {}", format::between(run.created_at, started)),
        ));
    }
    if let Some(finished) = run.finished_at {
        let took = match run.started_at {
            Some(started) => format!("ran {}", format::between(started, finished)),
            None => format!("after {}", format::between(run.created_at, finished)),
        };
        shown.push(("finished", format::readable(finished), took));
    }
    shown
}

fn attempt_view(record: attempts::AttemptRecord, shown: i32) -> AttemptView {
    let took = match record.ended_at {
        Some(ended) => format::between(record.started_at, ended),
        None => format!("{} so far", format::between(record.started_at, Utc::now())),
    };
    let outcome = match (record.outcome, record.exit_code) {
        (Some(outcome), Some(code)) => format!("{outcome} (exit {code})"),
        (Some(outcome), None) => outcome,
        (None, _) => "running".into(),
    };
    AttemptView {
        number: record.attempt,
        agent: record.agent,
        started: format::readable(record.started_at),
        took,
        outcome,
        message: record.message.unwrap_or_default(),
        current: record.attempt == shown,
    }
}

fn junit_view(summary: cimaster_common::results::JunitSummary) -> JunitView {
    let failed = summary
        .failed
        .into_iter()
        .map(|case| FailedView {
            place: case.file.as_ref().map(|file| match case.line {
                Some(line) => format!("{file}:{line}"),
                None => file.clone(),
            }),
            time: case.time_seconds.map(format::duration),
            case,
        })
        .collect();
    JunitView {
        tests: summary.tests,
        failures: summary.failures,
        errors: summary.errors,
        skipped: summary.skipped,
        passed: summary.tests.saturating_sub(summary.failures + summary.errors + summary.skipped),
        time: format::duration(summary.time_seconds),
        failed,
        not_listed: summary.failed_not_listed,
    }
}

/// Abort: a queued run ends at once, a running one is signalled to its agent.
pub async fn abort(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    posted: Posted,
) -> Result<Response, UiError> {
    posted.viewer.require(Role::Trigger)?;
    let (job, id) = (job_name(&name)?, run_id(&id)?);
    crate::http::runs::request_abort(&state, &job, id, &posted.viewer.caller.subject).await?;
    tracing::info!(run_id = %id, job = %job, by = %posted.viewer.caller.subject, "abort requested from the web UI");
    Ok(Redirect::to(&format!("/ui/jobs/{job}/runs/{id}")).into_response())
}

/// Rerun: a new run repeating this one, then its page.
pub async fn rerun(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    posted: Posted,
) -> Result<Response, UiError> {
    posted.viewer.require(Role::Trigger)?;
    let (job, id) = (job_name(&name)?, run_id(&id)?);
    let key = posted.field("idempotencyKey").filter(|key| !key.is_empty()).map(str::to_owned);
    let run = match crate::http::runs::repeat(&state, &job, id, &posted.viewer.caller.subject, key.as_deref()).await? {
        Created::New(run) | Created::Replayed(run) => run,
    };
    Ok(Redirect::to(&format!("/ui/jobs/{job}/runs/{}", run.id)).into_response())
}

/// Where a console stream resumes: bytes of the log already shown, and lines numbered so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Resume {
    bytes: u64,
    lines: u64,
}

impl Resume {
    /// From `Last-Event-ID` (`<bytes>.<lines>`), which a browser sends when it reconnects.
    fn from_headers(headers: &HeaderMap) -> Self {
        let id = headers.get("last-event-id").and_then(|value| value.to_str().ok()).unwrap_or("");
        let mut parts = id.split('.').map(str::parse::<u64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(bytes)), Some(Ok(lines))) => Resume { bytes, lines },
            _ => Resume::default(),
        }
    }

    fn id(&self) -> String {
        format!("{}.{}", self.bytes, self.lines)
    }
}

/// The console as server-sent events: `lines` events carry whole lines as HTML, each with the
/// position to resume from as its id; `end` says the attempt has ended. The log is streamed as it
/// is read, never held whole.
pub async fn console(
    State(state): State<AppState>,
    _viewer: Viewer,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<AttemptQuery>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let (run, attempt, _) = crate::http::results::chosen_attempt(&state, &name, &id, query.attempt).await?;
    let from = Resume::from_headers(&headers);
    let chunks = crate::http::console::open(&state, run, attempt, from.bytes, true);
    let events = line_events(state.pool.clone(), RunId(run), attempt, from, chunks);
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies must not buffer the stream.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The most HTML one event carries; a burst of output is sent as several.
const EVENT_BYTES: usize = 256 << 10;

fn line_events(
    pool: sqlx::PgPool,
    run: RunId,
    attempt: i32,
    from: Resume,
    mut chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        let mut at = from;
        let mut partial = BytesMut::new();
        while let Some(Ok(chunk)) = chunks.recv().await {
            partial.extend_from_slice(&chunk);
            let mut html = String::new();
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line = partial.split_to(end + 1);
                at.bytes += line.len() as u64;
                at.lines += 1;
                html.push_str(&ansi::console_line(at.lines, &String::from_utf8_lossy(&line[..end])));
                if html.len() >= EVENT_BYTES {
                    let event = Event::default().event("lines").id(at.id()).data(std::mem::take(&mut html));
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
            if !html.is_empty() && tx.send(Event::default().event("lines").id(at.id()).data(html)).await.is_err() {
                return;
            }
        }
        // The stream ended: the attempt has, or this follow reached its limit (the browser then
        // reconnects from the last id).
        let ended = runs::progress_by_id(&pool, run.0).await.ok().flatten().is_none_or(|state| !state.is_live(attempt));
        if ended {
            if !partial.is_empty() {
                at.bytes += partial.len() as u64;
                at.lines += 1;
                let html = ansi::console_line(at.lines, &String::from_utf8_lossy(&partial));
                let _ = tx.send(Event::default().event("lines").id(at.id()).data(html)).await;
            }
            let _ = tx.send(Event::default().event("end").id(at.id()).data("ended")).await;
        }
    })
}

/// A stream fed by a task: the task gets a sender, the stream ends when the task does.
fn async_stream<F, Fut>(task: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(4);
    tokio::spawn(task(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (Ok(event), rx)) })
}

/// The API as a service the UI can ask on a viewer's behalf.
#[derive(Clone)]
pub struct Api(pub axum::Router);

/// A result file (the raw console, an artifact, a service log, the JUnit reports) downloaded from
/// a page: the API's own answer, asked with the session's token.
pub async fn download(axum::Extension(api): axum::Extension<Api>, viewer: Viewer, request: Request) -> Response {
    let path = request.uri().path().strip_prefix("/ui").unwrap_or("/").to_owned();
    let query = request.uri().query().map(|query| format!("?{query}")).unwrap_or_default();
    let mut forwarded = Request::builder().method("GET").uri(format!("{path}{query}"));
    if let Some(accept) = request.headers().get(header::ACCEPT) {
        forwarded = forwarded.header(header::ACCEPT, accept);
    }
    let forwarded =
        forwarded.header(header::AUTHORIZATION, format!("Bearer {}", viewer.token)).body(axum::body::Body::empty());
    let Ok(forwarded) = forwarded else {
        return UiError::BadRequest("not a download this page offers".into()).into_response();
    };
    match api.0.oneshot(forwarded).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnect_resumes_where_it_was() {
        let mut headers = HeaderMap::new();
        assert_eq!(Resume::from_headers(&headers), Resume::default());
        headers.insert("last-event-id", HeaderValue::from_static("1200.31"));
        let resume = Resume::from_headers(&headers);
        assert_eq!(resume, Resume { bytes: 1200, lines: 31 });
        assert_eq!(resume.id(), "1200.31");
        headers.insert("last-event-id", HeaderValue::from_static("junk"));
        assert_eq!(Resume::from_headers(&headers), Resume::default());
    }
}
