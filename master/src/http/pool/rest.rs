//! The pool's REST API under `/pool`: clusters, leases, waiters, events and the usage report.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{acquire_waiting, actor, check_job, check_label, check_name, release_outcome};
use crate::auth::{Caller, Role};
use crate::http::error::{ApiError, Problem};
use crate::http::json::{ApiJson, OptionalJson};
use crate::http::query::ApiQuery;
use crate::http::AppState;
use crate::http::{Admin, Reader, Triggerer};
use crate::pool::store::{self, AcquireRequest, ClusterView, Event, Lease, NewCluster, Release};

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaiterFilter {
    purpose: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WaiterList {
    pub waiters: Vec<store::Waiter>,
}

/// Acquires waiting for a cluster, with their position in their queue.
#[utoipa::path(get, path = "/pool/waiters", tag = "pool", params(WaiterFilter),
    responses((status = 200, body = WaiterList)), security(("bearer" = [])))]
pub(super) async fn list_waiters(
    State(state): State<AppState>,
    _caller: Reader,
    ApiQuery(filter): ApiQuery<WaiterFilter>,
) -> Result<Json<WaiterList>, ApiError> {
    Ok(Json(WaiterList { waiters: store::waiters(&state.pool, filter.purpose.as_deref()).await? }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ClusterList {
    pub clusters: Vec<ClusterView>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClusterFilter {
    purpose: Option<String>,
}

/// Every cluster with its lease, hold and health.
#[utoipa::path(get, path = "/pool/clusters", tag = "pool", params(ClusterFilter),
    responses((status = 200, body = ClusterList)), security(("bearer" = [])))]
pub(super) async fn list_clusters(
    State(state): State<AppState>,
    caller: Reader,
    ApiQuery(filter): ApiQuery<ClusterFilter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    for_caller(&caller, ClusterList { clusters: store::list(&state.pool, filter.purpose.as_deref()).await? })
}

#[utoipa::path(get, path = "/pool/clusters/{name}", tag = "pool", params(("name" = String, Path)),
    responses((status = 200, body = ClusterView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn get_cluster(
    State(state): State<AppState>,
    caller: Reader,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    for_caller(&caller, store::get(&state.pool, &name).await?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterBody {
    pub region: String,
    #[serde(default = "default_purpose")]
    pub purpose: String,
    pub osimage: Option<String>,
    /// Passed to jobs as `CIMASTER_CLUSTER_LABELS`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_purpose() -> String {
    store::DEFAULT_PURPOSE.to_owned()
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AppliedCluster {
    #[serde(flatten)]
    pub cluster: ClusterView,
    /// `created`, `updated` or `unchanged`.
    pub change: &'static str,
}

/// Create or update a cluster's inventory entry (idempotent; admin).
#[utoipa::path(put, path = "/pool/clusters/{name}", tag = "pool", request_body = ClusterBody, params(("name" = String, Path)),
    responses((status = 201, body = AppliedCluster), (status = 200, body = AppliedCluster),
        (status = 400, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn put_cluster(
    State(state): State<AppState>,
    caller: Admin,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<ClusterBody>,
) -> Result<(StatusCode, Json<AppliedCluster>), ApiError> {
    check_name("cluster", &name)?;
    check_name("region", &body.region)?;
    check_name("purpose", &body.purpose)?;
    let cluster =
        NewCluster { name, region: body.region, purpose: body.purpose, osimage: body.osimage, labels: body.labels };
    let (cluster, change) = store::apply(&state.pool, cluster, &caller.subject).await?;
    let status = if change == "created" { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(AppliedCluster { cluster, change })))
}

/// Remove a cluster from the pool (admin); refused while it is leased.
#[utoipa::path(delete, path = "/pool/clusters/{name}", tag = "pool", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn delete_cluster(
    State(state): State<AppState>,
    caller: Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    store::delete(&state.pool, &name, &caller.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcquireBody {
    pub purpose: String,
    pub osimage: Option<String>,
    /// With `build`, identifies the lease: the same pair asked by the same holder gets the same lease
    /// back. Not `run:…`, which is reserved for the clusters of runs.
    pub job: String,
    pub build: String,
    pub run: Option<uuid::Uuid>,
    /// Lease length; the pool's default when absent.
    pub ttl_seconds: Option<u64>,
    /// Wait up to this long for a cluster to free (at most the pool's `CIMASTER_POOL_MAX_WAIT`, 300 by default).
    #[serde(default)]
    pub wait_seconds: u64,
    /// Among waiters, higher is served first (default 0); equal priorities are first come, first served.
    #[serde(default)]
    pub priority: i32,
    /// Lease this cluster only (e.g. carrying a lease over from another inventory): at once or not
    /// at all, so `waitSeconds` must be 0.
    pub cluster: Option<String>,
}

/// Lease a cluster (optionally waiting for one).
#[utoipa::path(post, path = "/pool/leases", tag = "pool", request_body = AcquireBody,
    responses((status = 201, body = Lease), (status = 503, description = "nothing vacant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the lease kept changing, or the job and build are leased by another holder", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid, e.g. a `job` reserved for runs (`run:…`)", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn acquire(
    State(state): State<AppState>,
    caller: Triggerer,
    ApiJson(body): ApiJson<AcquireBody>,
) -> Result<(StatusCode, Json<Lease>), ApiError> {
    let ttl = lease_ttl(&state, body.ttl_seconds)?;
    check_name("purpose", &body.purpose)?;
    if let Some(osimage) = &body.osimage {
        check_label("osimage", osimage)?;
    }
    check_job(&body.job)?;
    check_label("build", &body.build)?;
    if let Some(cluster) = &body.cluster {
        check_name("cluster", cluster)?;
        if body.wait_seconds > 0 {
            return Err(ApiError::Unprocessable(
                "a named cluster is leased at once or not at all: leave out `waitSeconds`".into(),
            ));
        }
    }
    let request = AcquireRequest {
        purpose: body.purpose,
        osimage: body.osimage,
        job: body.job,
        build: body.build,
        holder: caller.subject.clone(),
        run: body.run,
        ttl,
        waited: Duration::ZERO,
        priority: body.priority,
        waiter: None,
        cluster: body.cluster,
    };
    let lease = acquire_waiting(&state, &request, Duration::from_secs(body.wait_seconds)).await?;
    Ok((StatusCode::CREATED, Json(lease)))
}

/// The answer as the caller may see it: fencing tokens (which release and extend a lease) only for
/// callers who may lease.
fn for_caller(caller: &Caller, answer: impl Serialize) -> Result<Json<serde_json::Value>, ApiError> {
    let mut value = serde_json::to_value(answer).map_err(|err| ApiError::Internal(err.into()))?;
    if !caller.has(Role::Trigger) {
        drop_tokens(&mut value);
    }
    Ok(Json(value))
}

fn drop_tokens(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            fields.remove("token");
            fields.values_mut().for_each(drop_tokens);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_tokens),
        _ => {}
    }
}

/// A lease's length: the pool's default, or 1 s to 7 days.
fn lease_ttl(state: &AppState, seconds: Option<u64>) -> Result<Duration, ApiError> {
    let ttl = seconds.map_or(state.pool_config.lease_ttl, Duration::from_secs);
    if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(ApiError::Unprocessable("ttlSeconds must be between 1 and 604800".into()));
    }
    Ok(ttl)
}

fn lease_token(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| ApiError::BadRequest(format!("lease token `{raw}` must be a number")))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeartbeatBody {
    pub ttl_seconds: Option<u64>,
}

/// Extend a lease. 409 when the token is not current.
#[utoipa::path(post, path = "/pool/leases/{token}/heartbeat", tag = "pool", params(("token" = i64, Path)),
    responses((status = 200, body = Lease), (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn heartbeat(
    State(state): State<AppState>,
    caller: Triggerer,
    Path(token): Path<String>,
    OptionalJson(body): OptionalJson<HeartbeatBody>,
) -> Result<Json<Lease>, ApiError> {
    let token = lease_token(&token)?;
    let ttl = lease_ttl(&state, body.ttl_seconds)?;
    Ok(Json(store::heartbeat(&state.pool, token, ttl, actor(&caller)).await?))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseBody {
    /// `ok` (default) or `infra_failure`; infrastructure failures in a row disable the cluster.
    pub result: Option<String>,
}

/// Release a lease. 409 when the token is not current.
#[utoipa::path(post, path = "/pool/leases/{token}/release", tag = "pool", params(("token" = i64, Path)),
    responses((status = 200, body = ClusterView), (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn release(
    State(state): State<AppState>,
    caller: Triggerer,
    Path(token): Path<String>,
    OptionalJson(body): OptionalJson<ReleaseBody>,
) -> Result<Json<ClusterView>, ApiError> {
    let token = lease_token(&token)?;
    let outcome = release_outcome(body.result.as_deref())?;
    Ok(Json(
        store::release(
            &state.pool,
            Release::Token(token),
            outcome,
            actor(&caller),
            state.pool_config.auto_disable_after,
        )
        .await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventFilter {
    cluster: Option<String>,
    /// Events after this id.
    after: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
}

/// The pool's history, oldest first.
#[utoipa::path(get, path = "/pool/events", tag = "pool", params(EventFilter),
    responses((status = 200, body = EventPage)), security(("bearer" = [])))]
pub(super) async fn list_events(
    State(state): State<AppState>,
    caller: Reader,
    ApiQuery(filter): ApiQuery<EventFilter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = filter.limit.unwrap_or(500).clamp(1, 10_000);
    let events = store::events(&state.pool, filter.cluster.as_deref(), filter.after.unwrap_or(0), limit).await?;
    for_caller(&caller, EventPage { events })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// Window length back from now, e.g. `24h`, `7d` (default `24h`).
    window: Option<String>,
}

/// Utilisation and acquire wait times per purpose, hold hours per person.
#[utoipa::path(get, path = "/pool/report", tag = "pool", params(ReportQuery),
    responses((status = 200, body = store::UsageReport)), security(("bearer" = [])))]
pub(super) async fn usage_report(
    State(state): State<AppState>,
    _caller: Reader,
    ApiQuery(query): ApiQuery<ReportQuery>,
) -> Result<Json<store::UsageReport>, ApiError> {
    let window = match query.window.as_deref() {
        Some(text) => humantime::parse_duration(text)
            .map_err(|err| ApiError::BadRequest(format!("window `{text}`: {err}; e.g. 24h or 7d")))?,
        None => Duration::from_secs(24 * 3600),
    };
    let since = chrono::Duration::from_std(window)
        .ok()
        .and_then(|window| chrono::Utc::now().checked_sub_signed(window))
        .ok_or_else(|| ApiError::BadRequest(format!("window `{window:?}` reaches before any date; e.g. 24h or 7d")))?;
    Ok(Json(store::report(&state.pool, since).await?))
}
