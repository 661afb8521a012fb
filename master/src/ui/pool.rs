//! The test-cluster pool (`/ui/pool`): clusters by state, who leases or holds what until when, the
//! waiting queue, a week's usage with a chart, and for admins hold, release, disable and enable.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use cimaster_store::pool::{self as store, ClusterView, UsageReport, Waiter};

use super::charts;
use super::error::UiError;
use super::format;
use super::page::{render, Chrome, Nav};
use super::session::{Posted, Viewer};
use crate::auth::Role;
use crate::http::pool::{actor, hold_duration};
use crate::http::{ApiError, AppState};

pub struct ClusterRow {
    pub cluster: ClusterView,
    /// `leased by ci-bot for e2e #42 until 13:00 (in 5 min)`, `held by …`, `disabled: …`.
    pub detail: String,
}

#[derive(askama::Template)]
#[template(path = "ui/pool.html")]
struct PoolPage {
    page: Chrome,
    /// Counts per status, for the summary line.
    counts: Vec<(String, usize)>,
    clusters: Vec<ClusterRow>,
    waiters: Vec<(Waiter, String)>,
    report: UsageReport,
    chart: String,
}

pub async fn show(State(state): State<AppState>, viewer: Viewer) -> Result<Response, UiError> {
    let clusters = store::list(&state.pool, None).await?;
    let mut counts: Vec<(String, usize)> = Vec::new();
    for cluster in &clusters {
        match counts.iter_mut().find(|(status, _)| status == cluster.status) {
            Some((_, count)) => *count += 1,
            None => counts.push((cluster.status.to_owned(), 1)),
        }
    }
    let now = Utc::now();
    let waiters = store::waiters(&state.pool, None)
        .await?
        .into_iter()
        .map(|waiter| {
            let since = format::relative(waiter.since, now);
            (waiter, since)
        })
        .collect();
    let report = store::report(&state.pool, now - chrono::Duration::days(7)).await?;
    let chart = charts::shares(
        &report.purposes.iter().map(|usage| (usage.purpose.clone(), usage.utilisation)).collect::<Vec<_>>(),
    );
    let page = PoolPage {
        page: Chrome::new("Pool", Nav::Pool, &viewer),
        counts,
        clusters: clusters.into_iter().map(|cluster| ClusterRow { detail: detail(&cluster, now), cluster }).collect(),
        waiters,
        report,
        chart,
    };
    render(&page)
}

fn detail(cluster: &ClusterView, now: chrono::DateTime<Utc>) -> String {
    let until = |at| format!("{} ({})", format::readable(at), format::relative(at, now));
    let mut parts = Vec::new();
    if let Some(lease) = &cluster.lease {
        let what = [lease.job.as_deref(), lease.build.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(" #");
        parts.push(format!("leased by {} for {what} until {}", lease.holder, until(lease.expires)));
    }
    if let Some(hold) = &cluster.hold {
        parts.push(format!("held by {} ({}) until {}", hold.by, hold.reason, until(hold.until)));
    }
    if let Some(disabled) = &cluster.disabled {
        parts.push(format!("disabled: {}", disabled.reason));
    }
    parts.join("; ")
}

/// `hold`, `release`, `disable` or `enable` a cluster (admins).
pub async fn act(
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    posted: Posted,
) -> Result<Response, UiError> {
    posted.viewer.require(Role::Admin)?;
    let caller = &posted.viewer.caller;
    let reason = posted.field("reason").map(str::trim).filter(|reason| !reason.is_empty());
    match action.as_str() {
        "hold" => {
            let reason = reason.ok_or_else(|| UiError::BadRequest("say why the cluster is held".into()))?;
            let duration = hold_duration(&state, posted.field("hours").filter(|hours| !hours.trim().is_empty()))?;
            store::hold(&state.pool, &name, actor(caller), reason, duration).await?;
        }
        "release" => {
            store::unhold(&state.pool, &name, actor(caller)).await?;
        }
        "disable" => {
            let reason = reason.ok_or_else(|| UiError::BadRequest("say why the cluster is disabled".into()))?;
            store::set_disabled(&state.pool, &name, Some(reason), &caller.subject).await?;
        }
        "enable" => {
            store::set_disabled(&state.pool, &name, None, &caller.subject).await?;
        }
        other => return Err(ApiError::NotFound(format!("no cluster action `{other}`")).into()),
    }
    tracing::info!(cluster = %name, action = %action, by = %caller.subject, "pool action from the web UI");
    Ok(Redirect::to("/ui/pool").into_response())
}
