//! The test-cluster pool over HTTP: the original CIMaster endpoints (`/getvacant`, `/finishtest`, …;
//! plain text, or JSON with `Accept: application/json`) and a REST API under `/pool`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cimaster_common::{BranchName, EnvName, JobSpec, TriggerRequest};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, Problem};
use super::jobs::job_name;
use super::json::{ApiJson, OptionalJson};
use super::query::ApiQuery;
use super::runs::RunView;
use super::AppState;
use crate::auth::{Caller, Role};
use crate::pool::store::{
    self, AcquireRequest, ClusterView, Event, Lease, NewCluster, PoolError, Release, ReleaseOutcome,
};
use crate::trigger::{Created, Trigger};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/getvacant", get(getvacant).post(getvacant))
        .route("/finishtest", get(finishtest).post(finishtest))
        .route("/holdcluster", get(holdcluster).post(holdcluster))
        .route("/releasecluster", get(releasecluster).post(releasecluster))
        .route("/addcluster", get(addcluster).post(addcluster))
        .route("/deletecluster", get(deletecluster).post(deletecluster))
        .route("/disablecluster", get(disablecluster).post(disablecluster))
        .route("/enablecluster", get(enablecluster).post(enablecluster))
        .route("/createcluster", get(createcluster).post(createcluster))
        .route("/pool/clusters", get(list_clusters))
        .route("/pool/clusters/{name}", get(get_cluster).put(put_cluster).delete(delete_cluster))
        .route("/pool/leases", post(acquire))
        .route("/pool/leases/{token}/heartbeat", post(heartbeat))
        .route("/pool/leases/{token}/release", post(release))
        .route("/pool/events", get(list_events))
        .route("/pool/report", get(usage_report))
        .route("/pool/waiters", get(list_waiters))
}

impl From<PoolError> for ApiError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::NotFound(_) => ApiError::NotFound(err.to_string()),
            PoolError::Exists(_) | PoolError::Conflict(_) => ApiError::Conflict(err.to_string()),
            PoolError::Invalid(message) => ApiError::Unprocessable(message),
            PoolError::Database(err) => err.into(),
        }
    }
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

/// Plain text for the original clients, JSON when asked for.
fn answer<T: Serialize>(headers: &HeaderMap, text: String, json: T) -> Response {
    if wants_json(headers) {
        Json(json).into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{text}\n")).into_response()
    }
}

type Params = ApiQuery<BTreeMap<String, String>>;

fn param<'a>(params: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, ApiError> {
    params
        .get(name)
        .map(String::as_str)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| ApiError::BadRequest(format!("query parameter `{name}` is required")))
}

fn optional<'a>(params: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    params.get(name).map(String::as_str).filter(|value| !value.is_empty())
}

fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
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

/// `GET /getvacant?build=&job=&email=[&purpose=&osimage=&wait=]`: lease a vacant cluster; answers its name.
async fn getvacant(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Trigger)?;
    let request = AcquireRequest {
        purpose: optional(&params, "purpose").unwrap_or("tess-ci").to_owned(),
        osimage: optional(&params, "osimage").map(str::to_owned),
        job: param(&params, "job")?.to_owned(),
        build: param(&params, "build")?.to_owned(),
        holder: optional(&params, "email").map_or_else(|| caller.subject.clone(), str::to_owned),
        run: None,
        ttl: state.pool_config.lease_ttl,
        waited: Duration::ZERO,
        priority: match optional(&params, "priority") {
            Some(priority) => {
                priority.parse().map_err(|_| ApiError::BadRequest("`priority` is a whole number".into()))?
            }
            None => 0,
        },
        waiter: None,
    };
    let wait = match optional(&params, "wait") {
        Some(seconds) => Duration::from_secs(
            seconds.parse::<u64>().map_err(|_| ApiError::BadRequest("`wait` is a number of seconds".into()))?.min(300),
        ),
        None => Duration::ZERO,
    };
    let lease = acquire_waiting(&state, &request, wait).await?;
    let cluster = store::get(&state.pool, &lease.cluster).await?;
    Ok(answer(&headers, lease.cluster.clone(), cluster))
}

/// Tries to lease; while nothing is vacant, takes a place in the waiting queue (priority, then
/// first come, first served) and waits, up to `wait`, woken whenever a cluster frees.
async fn acquire_waiting(state: &AppState, request: &AcquireRequest, wait: Duration) -> Result<Lease, ApiError> {
    let started = std::time::Instant::now();
    let mut request = request.clone();
    if let Some(lease) = store::acquire(&state.pool, &request).await? {
        record_wait(&request, started);
        return Ok(lease);
    }
    if wait.is_zero() {
        return Err(no_vacancy(&request));
    }
    let mut listener = sqlx::postgres::PgListener::connect_with(&state.pool).await?;
    listener.listen("cimaster_cluster_freed").await?;
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
        // Woken when a cluster frees or a waiter leaves; a slow tick covers a missed notification.
        let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(2));
        let _ = tokio::time::timeout_at(wake, listener.recv()).await;
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
async fn list_waiters(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<WaiterFilter>,
) -> Result<Json<WaiterList>, ApiError> {
    caller.require(Role::Read)?;
    Ok(Json(WaiterList { waiters: store::waiters(&state.pool, filter.purpose.as_deref()).await? }))
}

/// `GET /finishtest?cluster=[&result=infra_failure]`: return a leased cluster to the pool.
async fn finishtest(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Trigger)?;
    let name = param(&params, "cluster")?;
    let outcome = release_outcome(optional(&params, "result"))?;
    let view = store::release(
        &state.pool,
        Release::Cluster(name),
        outcome,
        &caller.subject,
        state.pool_config.auto_disable_after,
    )
    .await?;
    Ok(answer(&headers, format!("cluster {name} finished"), view))
}

fn release_outcome(value: Option<&str>) -> Result<ReleaseOutcome, ApiError> {
    match value {
        None | Some("ok") => Ok(ReleaseOutcome::Ok),
        Some("infra_failure") => Ok(ReleaseOutcome::InfraFailure),
        Some(other) => Err(ApiError::BadRequest(format!("result `{other}`: use `ok` or `infra_failure`"))),
    }
}

/// `GET /holdcluster?cluster=&name=&desc=[&hours=]`: hold a cluster for debugging (6 h by default).
async fn holdcluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Trigger)?;
    let name = param(&params, "cluster")?;
    let reason = param(&params, "desc")?;
    let duration = match optional(&params, "hours") {
        Some(hours) => {
            let hours: f64 = hours.parse().map_err(|_| ApiError::BadRequest("`hours` is a number".into()))?;
            if !hours.is_finite() || hours <= 0.0 {
                return Err(ApiError::BadRequest("`hours` must be a positive number".into()));
            }
            // Compared in hours first: a huge value (`1e300`) is no duration at all.
            if hours * 3600.0 > state.pool_config.max_hold.as_secs_f64() {
                return Err(max_hold(&state));
            }
            Duration::from_secs_f64(hours * 3600.0)
        }
        None => state.pool_config.hold,
    };
    if duration > state.pool_config.max_hold {
        return Err(max_hold(&state));
    }
    // `name=` is the seed's claimed user; it is recorded, the token says who it really is.
    let reason = match optional(&params, "name") {
        Some(claimed) if claimed != caller.subject => format!("{reason} (name={claimed})"),
        _ => reason.to_owned(),
    };
    let view = store::hold(&state.pool, name, &caller.subject, &reason, duration).await?;
    metrics::counter!("cimaster_pool_holds_total").increment(1);
    let until = view.hold.as_ref().map(|hold| hold.until.to_rfc3339()).unwrap_or_default();
    Ok(answer(&headers, format!("cluster {name} held by {} until {until}", caller.subject), view))
}

fn max_hold(state: &AppState) -> ApiError {
    ApiError::Unprocessable(format!("holds last at most {}h here", state.pool_config.max_hold.as_secs() / 3600))
}

/// `GET /releasecluster?cluster=&name=`: end a hold.
async fn releasecluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Trigger)?;
    let name = param(&params, "cluster")?;
    let view = store::unhold(&state.pool, name, &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} released"), view))
}

/// `GET /addcluster?cluster=&region=&name=[&purpose=&osimage=]` (admin).
async fn addcluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let name = param(&params, "cluster")?;
    check_name("cluster", name)?;
    let region = param(&params, "region")?;
    check_name("region", region)?;
    let purpose = optional(&params, "purpose").unwrap_or("tess-ci");
    check_name("purpose", purpose)?;
    let osimage = optional(&params, "osimage");
    if store::OSIMAGE_PURPOSES.contains(&purpose) && osimage.is_none() {
        return Err(ApiError::BadRequest(format!("purpose `{purpose}` needs `osimage`")));
    }
    let cluster = NewCluster {
        name: name.to_owned(),
        region: region.to_owned(),
        purpose: purpose.to_owned(),
        osimage: osimage.map(str::to_owned),
        labels: BTreeMap::new(),
    };
    let view = store::add(&state.pool, cluster, &caller.subject).await?;
    Ok((StatusCode::CREATED, answer(&headers, format!("cluster {name} added"), view)).into_response())
}

/// `GET /deletecluster?cluster=&name=` (admin).
async fn deletecluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let name = param(&params, "cluster")?;
    store::delete(&state.pool, name, &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} deleted"), serde_json::json!({"deleted": name})))
}

/// `GET /disablecluster?cluster=&name=[&reason=]` (admin).
async fn disablecluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let name = param(&params, "cluster")?;
    let reason = optional(&params, "reason").map_or_else(|| format!("disabled by {}", caller.subject), str::to_owned);
    let view = store::set_disabled(&state.pool, name, Some(&reason), &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} disabled"), view))
}

/// `GET /enablecluster?cluster=&name=` (admin).
async fn enablecluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let name = param(&params, "cluster")?;
    let view = store::set_disabled(&state.pool, name, None, &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} enabled"), view))
}

/// `GET /createcluster?user=&branch=&job=`: run the provisioning job (ours, not Prow's), the user
/// passed as its `AUTHOR` parameter; answers the run's link.
async fn createcluster(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Trigger)?;
    let user = param(&params, "user")?;
    let job = job_name(optional(&params, "job").unwrap_or(&state.pool_config.provision_job))?;
    let spec = cimaster_store::jobs::get(&state.pool, &job)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("provisioning job `{job}` does not exist; create it with PUT /jobs/{job}"))
        })?
        .spec;
    let author = EnvName::parse("AUTHOR").expect("valid name");
    if !spec.parameters().contains_key(&author) {
        return Err(ApiError::Unprocessable(format!(
            "provisioning job `{job}` must declare the parameter `AUTHOR`, which receives the user"
        )));
    }
    let branch = match (&spec, optional(&params, "branch")) {
        (JobSpec::Git(git), branch) => Some(match branch {
            Some(branch) => BranchName::parse(branch).map_err(|err| ApiError::BadRequest(err.to_string()))?,
            None => git.default_branch.clone(),
        }),
        (JobSpec::Freestyle(_), Some(_)) => {
            return Err(ApiError::BadRequest(format!("`{job}` is a freestyle job: leave out `branch`")))
        }
        (JobSpec::Freestyle(_), None) => None,
    };
    let request = TriggerRequest {
        commit_sha: None,
        branch_name: branch,
        parameters: BTreeMap::from([(author, user.to_owned())]),
    };
    let trigger = Trigger { job: &job, request: &request, by: &caller.subject, idempotency_key: None };
    let run = match state.triggers.create(&trigger).await? {
        Created::New(run) | Created::Replayed(run) => RunView::from(run),
    };
    Ok((StatusCode::CREATED, answer(&headers, format!("cluster creation triggered: {}", run.links.this), run))
        .into_response())
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
async fn list_clusters(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<ClusterFilter>,
) -> Result<Json<ClusterList>, ApiError> {
    caller.require(Role::Read)?;
    Ok(Json(ClusterList { clusters: store::list(&state.pool, filter.purpose.as_deref()).await? }))
}

#[utoipa::path(get, path = "/pool/clusters/{name}", tag = "pool", params(("name" = String, Path)),
    responses((status = 200, body = ClusterView), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_cluster(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    caller.require(Role::Read)?;
    Ok(Json(store::get(&state.pool, &name).await?))
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
    "tess-ci".to_owned()
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
async fn put_cluster(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<ClusterBody>,
) -> Result<(StatusCode, Json<AppliedCluster>), ApiError> {
    caller.require(Role::Admin)?;
    check_name("cluster", &name)?;
    check_name("region", &body.region)?;
    check_name("purpose", &body.purpose)?;
    if store::OSIMAGE_PURPOSES.contains(&body.purpose.as_str()) && body.osimage.is_none() {
        return Err(ApiError::Unprocessable(format!("purpose `{}` needs `osimage`", body.purpose)));
    }
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
async fn delete_cluster(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    store::delete(&state.pool, &name, &caller.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcquireBody {
    pub purpose: String,
    pub osimage: Option<String>,
    /// With `build`, identifies the lease: the same pair gets the same lease back.
    pub job: String,
    pub build: String,
    pub run: Option<uuid::Uuid>,
    /// Lease length; the pool's default when absent.
    pub ttl_seconds: Option<u64>,
    /// Wait up to this long (max 300) for a cluster to free.
    #[serde(default)]
    pub wait_seconds: u64,
    /// Among waiters, higher is served first (default 0); equal priorities are first come, first served.
    #[serde(default)]
    pub priority: i32,
}

/// Lease a cluster (optionally waiting for one).
#[utoipa::path(post, path = "/pool/leases", tag = "pool", request_body = AcquireBody,
    responses((status = 201, body = Lease), (status = 503, description = "nothing vacant", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn acquire(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<AcquireBody>,
) -> Result<(StatusCode, Json<Lease>), ApiError> {
    caller.require(Role::Trigger)?;
    let ttl = body.ttl_seconds.map_or(state.pool_config.lease_ttl, Duration::from_secs);
    if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(ApiError::Unprocessable("ttlSeconds must be between 1 and 604800".into()));
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
    };
    let lease = acquire_waiting(&state, &request, Duration::from_secs(body.wait_seconds.min(300))).await?;
    Ok((StatusCode::CREATED, Json(lease)))
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
async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path(token): Path<String>,
    OptionalJson(body): OptionalJson<HeartbeatBody>,
) -> Result<Json<Lease>, ApiError> {
    caller.require(Role::Trigger)?;
    let token = lease_token(&token)?;
    let ttl = body.ttl_seconds.map_or(state.pool_config.lease_ttl, Duration::from_secs);
    Ok(Json(store::heartbeat(&state.pool, token, ttl).await?))
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
async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path(token): Path<String>,
    OptionalJson(body): OptionalJson<ReleaseBody>,
) -> Result<Json<ClusterView>, ApiError> {
    caller.require(Role::Trigger)?;
    let token = lease_token(&token)?;
    let outcome = release_outcome(body.result.as_deref())?;
    Ok(Json(
        store::release(
            &state.pool,
            Release::Token(token),
            outcome,
            &caller.subject,
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
async fn list_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<EventFilter>,
) -> Result<Json<EventPage>, ApiError> {
    caller.require(Role::Read)?;
    let limit = filter.limit.unwrap_or(500).clamp(1, 10_000);
    let events = store::events(&state.pool, filter.cluster.as_deref(), filter.after.unwrap_or(0), limit).await?;
    Ok(Json(EventPage { events }))
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
async fn usage_report(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ReportQuery>,
) -> Result<Json<store::UsageReport>, ApiError> {
    caller.require(Role::Read)?;
    let window = match query.window.as_deref() {
        Some(text) => humantime::parse_duration(text)
            .map_err(|err| ApiError::BadRequest(format!("window `{text}`: {err}; e.g. 24h or 7d")))?,
        None => Duration::from_secs(24 * 3600),
    };
    let since = chrono::Utc::now()
        - chrono::Duration::from_std(window).map_err(|_| ApiError::BadRequest("window is too long".into()))?;
    Ok(Json(store::report(&state.pool, since).await?))
}
