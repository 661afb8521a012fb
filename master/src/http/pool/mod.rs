//! The test-cluster pool over HTTP: the original CIMaster endpoints (`cimaster.rs`: `/getvacant`,
//! `/finishtest`, …; plain text, or JSON with `Accept: application/json`) and a REST API under
//! `/pool` (`rest.rs`). Both lease through the same waiting queue.

pub(super) mod cimaster;
pub(super) mod rest;

use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;

use super::error::ApiError;
use super::AppState;
use crate::auth::{Caller, Role};
use crate::pool::store::{self, AcquireRequest, Lease, PoolError, ReleaseOutcome};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/getvacant", get(cimaster::getvacant).post(cimaster::getvacant))
        .route("/finishtest", get(cimaster::finishtest).post(cimaster::finishtest))
        .route("/holdcluster", get(cimaster::holdcluster).post(cimaster::holdcluster))
        .route("/releasecluster", get(cimaster::releasecluster).post(cimaster::releasecluster))
        .route("/addcluster", get(cimaster::addcluster).post(cimaster::addcluster))
        .route("/deletecluster", get(cimaster::deletecluster).post(cimaster::deletecluster))
        .route("/disablecluster", get(cimaster::disablecluster).post(cimaster::disablecluster))
        .route("/enablecluster", get(cimaster::enablecluster).post(cimaster::enablecluster))
        .route("/createcluster", get(cimaster::createcluster).post(cimaster::createcluster))
        .route("/pool/clusters", get(rest::list_clusters))
        .route("/pool/clusters/{name}", get(rest::get_cluster).put(rest::put_cluster).delete(rest::delete_cluster))
        .route("/pool/leases", post(rest::acquire))
        .route("/pool/leases/{token}/heartbeat", post(rest::heartbeat))
        .route("/pool/leases/{token}/release", post(rest::release))
        .route("/pool/events", get(rest::list_events))
        .route("/pool/report", get(rest::usage_report))
        .route("/pool/waiters", get(rest::list_waiters))
}

impl From<PoolError> for ApiError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::NotFound(_) => ApiError::NotFound(err.to_string()),
            PoolError::Exists(_) | PoolError::Conflict(_) => ApiError::Conflict(err.to_string()),
            PoolError::Invalid(message) => ApiError::Unprocessable(message),
            PoolError::NotYours(message) => ApiError::Forbidden(message),
            PoolError::Database(err) => err.into(),
        }
    }
}

/// Tries to lease; while nothing is vacant, takes a place in the waiting queue (priority, then
/// first come, first served) and waits, up to `wait` (at most the pool's longest wait), woken
/// whenever a cluster frees.
async fn acquire_waiting(state: &AppState, request: &AcquireRequest, wait: Duration) -> Result<Lease, ApiError> {
    let wait = wait.min(state.pool_config.max_wait);
    let started = std::time::Instant::now();
    let mut request = request.clone();
    // Subscribed before the first try, so a cluster freed in between is not missed.
    let mut freed = state.wakeups.clusters();
    if let Some(lease) = store::acquire(&state.pool, &request).await? {
        record_wait(&request, started);
        return Ok(lease);
    }
    if wait.is_zero() {
        return Err(no_vacancy(&request));
    }
    let waiter = WaiterGuard {
        pool: state.pool.clone(),
        id: store::enqueue(&state.pool, &request, wait + Duration::from_secs(5)).await?,
    };
    request.waiter = Some(waiter.id);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        request.waited = started.elapsed();
        if let Some(lease) = store::acquire(&state.pool, &request).await? {
            record_wait(&request, started);
            return Ok(lease);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(no_vacancy(&request));
        }
        // Woken when a cluster frees or a waiter leaves (the replica's one listener, so waiting
        // holds no database connection); a slow tick covers a missed notification.
        let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(2));
        let _ = tokio::time::timeout_at(wake, freed.changed()).await;
    }
}

/// Leaves the waiting queue however the wait ends (also when the client goes away).
struct WaiterGuard {
    pool: sqlx::PgPool,
    id: i64,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let (pool, id) = (self.pool.clone(), self.id);
        tokio::spawn(async move {
            if let Err(err) = store::dequeue(&pool, id).await {
                tracing::warn!(error = %err, waiter = id, "cannot leave the waiting queue; the entry expires");
            }
        });
    }
}

fn record_wait(request: &AcquireRequest, started: std::time::Instant) {
    metrics::histogram!("cimaster_pool_acquire_wait_seconds", "purpose" => request.purpose.clone())
        .record(started.elapsed().as_secs_f64());
}

fn no_vacancy(request: &AcquireRequest) -> ApiError {
    ApiError::Unavailable(format!(
        "no vacant cluster with purpose `{}`{}; retry, or pass wait=<seconds>",
        request.purpose,
        request.osimage.as_deref().map(|image| format!(" and osimage `{image}`")).unwrap_or_default()
    ))
}

/// How long a hold lasts: `hours` (a positive number) or the pool's default, at most its maximum.
pub(crate) fn hold_duration(state: &AppState, hours: Option<&str>) -> Result<Duration, ApiError> {
    let max_hold =
        || ApiError::Unprocessable(format!("holds last at most {}h here", state.pool_config.max_hold.as_secs() / 3600));
    let duration = match hours {
        Some(hours) => {
            let hours: f64 = hours.trim().parse().map_err(|_| ApiError::BadRequest("`hours` is a number".into()))?;
            if !hours.is_finite() || hours <= 0.0 {
                return Err(ApiError::BadRequest("`hours` must be a positive number".into()));
            }
            // Compared in hours first: a huge value (`1e300`) is no duration at all.
            if hours * 3600.0 > state.pool_config.max_hold.as_secs_f64() {
                return Err(max_hold());
            }
            Duration::from_secs_f64(hours * 3600.0)
        }
        None => state.pool_config.hold,
    };
    if duration > state.pool_config.max_hold {
        return Err(max_hold());
    }
    Ok(duration)
}

/// The caller, acting on a lease or hold: an admin may act on anyone's, recorded as an override.
pub(crate) fn actor(caller: &Caller) -> store::Actor<'_> {
    store::Actor { name: &caller.subject, may_override: caller.has(Role::Admin) }
}

/// A lease's job, build or osimage: 1 to 256 printable characters.
pub(super) fn check_label(what: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable(format!("`{what}` must be 1 to 256 printable characters")));
    }
    Ok(())
}

/// A lease's `job` as a caller names it: a label, and not a run's own (`run:…`), which only the
/// agent running the run takes.
pub(super) fn check_job(job: &str) -> Result<(), ApiError> {
    check_label("job", job)?;
    if job.starts_with(store::RUN_JOB_PREFIX) {
        return Err(ApiError::Unprocessable(format!(
            "`job` must not start with `{}`: those leases are reserved for the clusters of runs, \
             which their agents take; name your own job",
            store::RUN_JOB_PREFIX
        )));
    }
    Ok(())
}

/// Cluster, region and purpose names: what the original CIMaster accepted.
pub(super) fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} `{value}` must be 1 to 128 characters of letters, digits, `-`, `_` and `.`"
        )))
    }
}

pub(super) fn release_outcome(value: Option<&str>) -> Result<ReleaseOutcome, ApiError> {
    match value {
        None | Some("ok") => Ok(ReleaseOutcome::Ok),
        Some("infra_failure") => Ok(ReleaseOutcome::InfraFailure),
        Some(other) => Err(ApiError::BadRequest(format!("result `{other}`: use `ok` or `infra_failure`"))),
    }
}
