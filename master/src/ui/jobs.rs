//! Jobs (`/ui/jobs`) and a job's page (`/ui/jobs/{name}`): its spec, its recent runs as a
//! pass/fail strip and a duration chart, its schedule, and the form that triggers it.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use cimaster_common::{BranchName, Cause, CommitSha, EnvName, JobSpec, TriggerRequest};
use cimaster_store::{jobs, runs};

use super::charts::{self, Bar};
use super::error::UiError;
use super::format;
use super::page::{render, Chrome, Nav};
use super::runs::RunRow;
use super::session::{Posted, Viewer};
use crate::auth::Role;
use crate::http::jobs::{job_name, job_view};
use crate::http::AppState;
use crate::trigger::{Created, Trigger};

pub struct JobRow {
    pub name: String,
    pub kind: &'static str,
    pub queue: String,
    pub next_run: Option<String>,
}

#[derive(askama::Template)]
#[template(path = "ui/jobs.html")]
struct JobsPage {
    page: Chrome,
    jobs: Vec<JobRow>,
}

pub async fn list(State(state): State<AppState>, viewer: Viewer) -> Result<Response, UiError> {
    let now = Utc::now();
    let jobs = jobs::list(&state.pool)
        .await?
        .into_iter()
        .map(|job| JobRow {
            kind: job.spec.kind(),
            queue: job.spec.queue().to_string(),
            next_run: job
                .spec
                .schedule()
                .and_then(|schedule| schedule.upcoming(now, 1).into_iter().next())
                .map(|at| format::relative(at, now)),
            name: job.name,
        })
        .collect();
    render(&JobsPage { page: Chrome::new("Jobs", Nav::Jobs, &viewer), jobs })
}

#[derive(askama::Template)]
#[template(path = "ui/job.html")]
struct JobPage {
    page: Chrome,
    name: String,
    kind: &'static str,
    version: i64,
    spec: String,
    secrets: Vec<String>,
    runs: Vec<RunRow>,
    chart: String,
    schedule: Vec<String>,
    last_outcome: Option<String>,
    git: bool,
    default_branch: String,
    parameters: Vec<(String, String)>,
    idempotency_key: String,
}

/// How many recent runs the strip and the chart show.
const RECENT: i64 = 40;

pub async fn show(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(name): Path<String>,
) -> Result<Response, UiError> {
    let name = job_name(&name)?;
    let view = job_view(&state, &name).await?;
    let filter = runs::Filter {
        job: Some(&name),
        statuses: None,
        branch_name: None,
        commit_sha: None,
        event: None,
        pull_request: None,
        before: None,
        limit: RECENT,
    };
    let recent = runs::list(&state.pool, &filter).await?;
    let chart = duration_chart(&recent);
    let (git, default_branch) = match &view.spec {
        JobSpec::Git(git) => (true, git.default_branch.to_string()),
        JobSpec::Freestyle(_) => (false, String::new()),
    };
    let secrets: Vec<String> = match &view.spec {
        JobSpec::Git(git) => {
            git.secrets.iter().chain(&git.token_secret).chain(&git.ssh_key_secret).map(ToString::to_string).collect()
        }
        JobSpec::Freestyle(job) => job.secrets.iter().map(ToString::to_string).collect(),
    };
    let schedule = view.schedule_state.as_ref();
    let page = JobPage {
        page: Chrome::new(name.as_str(), Nav::Jobs, &viewer),
        kind: view.spec.kind(),
        version: view.version,
        spec: serde_json::to_string_pretty(&view.spec).unwrap_or_default(),
        secrets,
        runs: recent.iter().map(RunRow::new).collect(),
        chart,
        schedule: schedule
            .map(|state| {
                state
                    .next_runs
                    .iter()
                    .map(|at| format!("{} ({})", format::readable(*at), format::relative(*at, Utc::now())))
                    .collect()
            })
            .unwrap_or_default(),
        last_outcome: schedule.and_then(|state| state.last_outcome.clone()),
        git,
        default_branch,
        parameters: view.spec.parameters().iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        idempotency_key: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
    };
    render(&page)
}

/// Recent runs' durations, oldest left; a run without one (queued, never started) shows a sliver.
fn duration_chart(recent: &[runs::Run]) -> String {
    let bars: Vec<Bar> = recent
        .iter()
        .rev()
        .map(|run| {
            let seconds = match (run.started_at, run.finished_at) {
                (Some(started), Some(finished)) => (finished - started).num_milliseconds() as f64 / 1000.0,
                (Some(started), None) => (Utc::now() - started).num_milliseconds() as f64 / 1000.0,
                _ => 0.0,
            };
            let status = format::status(run.status);
            Bar {
                value: seconds,
                class: status.class,
                title: format!("{} {}: {}", format::short_id(&run.id), status.word, format::duration(seconds)),
                href: Some(format!("/ui/jobs/{}/runs/{}", run.job, run.id)),
            }
        })
        .collect();
    let longest = bars.iter().map(|bar| bar.value).fold(0.0, f64::max);
    charts::columns(&bars, &format!("duration of the last {} runs; longest {}", bars.len(), format::duration(longest)))
}

/// Triggers the job with the form's branch, commit and parameters; then shows the new run.
pub async fn trigger(
    State(state): State<AppState>,
    Path(name): Path<String>,
    posted: Posted,
) -> Result<Response, UiError> {
    posted.viewer.require(Role::Trigger)?;
    let name = job_name(&name)?;
    let request = trigger_request(&posted)?;
    let key = posted.field("idempotencyKey").filter(|key| !key.is_empty());
    let trigger = Trigger {
        job: &name,
        request: &request,
        by: &posted.viewer.caller.subject,
        idempotency_key: key,
        rerun_of: None,
        cause: &Cause::default(),
        pushed_branch: None,
    };
    let run = match state.triggers.create(&trigger).await.map_err(crate::http::ApiError::from)? {
        Created::New(run) | Created::Replayed(run) => run,
    };
    Ok(Redirect::to(&format!("/ui/jobs/{name}/runs/{}", run.id)).into_response())
}

/// The trigger form's fields as a trigger request: `branchName`, `commitSha` and `param.NAME`.
fn trigger_request(posted: &Posted) -> Result<TriggerRequest, UiError> {
    let bad = |err: cimaster_common::InvalidValue| UiError::BadRequest(err.to_string());
    let filled = |name: &str| posted.field(name).map(str::trim).filter(|value| !value.is_empty());
    let mut parameters = BTreeMap::new();
    for (field, value) in &posted.fields {
        if let Some(parameter) = field.strip_prefix("param.") {
            parameters.insert(EnvName::parse(parameter).map_err(bad)?, value.clone());
        }
    }
    Ok(TriggerRequest {
        commit_sha: filled("commitSha").map(CommitSha::parse).transpose().map_err(bad)?,
        branch_name: filled("branchName").map(BranchName::parse).transpose().map_err(bad)?,
        parameters,
    })
}
