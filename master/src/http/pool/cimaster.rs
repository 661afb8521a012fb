//! The original CIMaster endpoints, kept so existing scripts work: `GET` or `POST` with query
//! parameters, answered in plain text, or JSON with `Accept: application/json`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cimaster_common::{BranchName, Cause, EnvName, JobSpec, TriggerRequest};
use serde::Serialize;

use super::{acquire_waiting, actor, check_job, check_name, release_outcome};
use crate::auth::{Caller, Role};
use crate::http::error::{ApiError, Problem};
use crate::http::jobs::job_name;
use crate::http::query::ApiQuery;
use crate::http::runs::RunView;
use crate::http::AppState;
use crate::http::{Admin, Triggerer};
use crate::pool::store::{self, AcquireRequest, ClusterView, NewCluster, Release};
use crate::trigger::{Created, Trigger};

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

/// `GET /getvacant?build=&job=&email=[&purpose=&osimage=&wait=]`: lease a vacant cluster; answers its name.
#[utoipa::path(method(get, post), path = "/getvacant", tag = "cimaster", operation_id = "getvacant",
    params(
        ("build" = String, Query, description = "with `job`, identifies the lease: the same pair asked by the same holder gets the same cluster back"),
        ("job" = String, Query),
        ("email" = Option<String>, Query, description = "whom the lease is recorded for: the token's subject; only an admin may name another"),
        ("purpose" = Option<String>, Query, description = "default `tess-ci`"),
        ("osimage" = Option<String>, Query),
        ("wait" = Option<u64>, Query, description = "seconds to wait for a vacant cluster (at most the pool's longest wait)"),
        ("priority" = Option<i32>, Query, description = "among waiters, higher is served first"),
    ),
    responses((status = 200, description = "the leased cluster's name, or the cluster with `Accept: application/json`",
        content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 409, description = "the lease kept changing, or the job and build are leased by another holder", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`job` is reserved for runs (`run:…`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "nothing vacant", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn getvacant(
    State(state): State<AppState>,
    caller: Triggerer,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let job = param(&params, "job")?;
    check_job(job)?;
    let request = AcquireRequest {
        purpose: optional(&params, "purpose").unwrap_or(store::DEFAULT_PURPOSE).to_owned(),
        osimage: optional(&params, "osimage").map(str::to_owned),
        job: job.to_owned(),
        build: param(&params, "build")?.to_owned(),
        holder: holder(&caller, optional(&params, "email"))?,
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
        cluster: None,
    };
    let wait = match optional(&params, "wait") {
        Some(seconds) => Duration::from_secs(
            seconds.parse::<u64>().map_err(|_| ApiError::BadRequest("`wait` is a number of seconds".into()))?,
        ),
        None => Duration::ZERO,
    };
    let lease = acquire_waiting(&state, &request, wait).await?;
    let cluster = store::get(&state.pool, &lease.cluster).await?;
    Ok(answer(&headers, lease.cluster.clone(), cluster))
}

/// Who a lease is recorded for: the caller. `email=` may name someone else only for an admin.
fn holder(caller: &Caller, email: Option<&str>) -> Result<String, ApiError> {
    match email {
        Some(email) if email != caller.subject && !caller.has(Role::Admin) => Err(ApiError::Forbidden(format!(
            "`email={email}` would record the lease for someone else; leases are recorded for the token's \
             subject (`{}`), and only an admin may name another",
            caller.subject
        ))),
        Some(email) => Ok(email.to_owned()),
        None => Ok(caller.subject.clone()),
    }
}

/// `GET /finishtest?cluster=[&result=infra_failure]`: return a leased cluster to the pool.
#[utoipa::path(method(get, post), path = "/finishtest", tag = "cimaster", operation_id = "finishtest",
    params(("cluster" = String, Query), ("result" = Option<String>, Query, description = "`ok` (default) or `infra_failure`")),
    responses((status = 200, description = "the cluster is back in the pool", content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the cluster is not leased", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn finishtest(
    State(state): State<AppState>,
    caller: Triggerer,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    let outcome = release_outcome(optional(&params, "result"))?;
    let view = store::release(
        &state.pool,
        Release::Cluster(name),
        outcome,
        actor(&caller),
        state.pool_config.auto_disable_after,
    )
    .await?;
    Ok(answer(&headers, format!("cluster {name} finished"), view))
}

/// `GET /holdcluster?cluster=&name=&desc=[&hours=]`: hold a cluster for debugging (6 h by default).
#[utoipa::path(method(get, post), path = "/holdcluster", tag = "cimaster", operation_id = "holdcluster",
    params(("cluster" = String, Query), ("desc" = String, Query, description = "why it is held"),
        ("name" = Option<String>, Query, description = "who asks; recorded beside the token's subject"),
        ("hours" = Option<f64>, Query, description = "how long (default 6, at most the pool's longest hold)")),
    responses((status = 200, description = "the cluster, held", content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn holdcluster(
    State(state): State<AppState>,
    caller: Triggerer,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    let reason = param(&params, "desc")?;
    let duration = super::hold_duration(&state, optional(&params, "hours"))?;
    // `name=` is the seed's claimed user; it is recorded, the token says who it really is.
    let reason = match optional(&params, "name") {
        Some(claimed) if claimed != caller.subject => format!("{reason} (name={claimed})"),
        _ => reason.to_owned(),
    };
    let view = store::hold(&state.pool, name, actor(&caller), &reason, duration).await?;
    metrics::counter!("cimaster_pool_holds_total").increment(1);
    let until = view.hold.as_ref().map(|hold| hold.until.to_rfc3339()).unwrap_or_default();
    Ok(answer(&headers, format!("cluster {name} held by {} until {until}", caller.subject), view))
}

/// `GET /releasecluster?cluster=&name=`: end a hold.
#[utoipa::path(method(get, post), path = "/releasecluster", tag = "cimaster", operation_id = "releasecluster",
    params(("cluster" = String, Query), ("name" = Option<String>, Query, description = "who asks (the token says who it is)")),
    responses((status = 200, description = "the cluster, no longer held", content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn releasecluster(
    State(state): State<AppState>,
    caller: Triggerer,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    let view = store::unhold(&state.pool, name, actor(&caller)).await?;
    Ok(answer(&headers, format!("cluster {name} released"), view))
}

/// `GET /addcluster?cluster=&region=&name=[&purpose=&osimage=]` (admin).
#[utoipa::path(method(get, post), path = "/addcluster", tag = "cimaster", operation_id = "addcluster",
    params(("cluster" = String, Query), ("region" = String, Query),
        ("name" = Option<String>, Query, description = "who asks (the token says who it is)"),
        ("purpose" = Option<String>, Query, description = "default `tess-ci`"), ("osimage" = Option<String>, Query)),
    responses((status = 201, description = "the cluster, added", content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn addcluster(
    State(state): State<AppState>,
    caller: Admin,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    check_name("cluster", name)?;
    let region = param(&params, "region")?;
    check_name("region", region)?;
    let purpose = optional(&params, "purpose").unwrap_or(store::DEFAULT_PURPOSE);
    check_name("purpose", purpose)?;
    let osimage = optional(&params, "osimage");
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
#[utoipa::path(method(get, post), path = "/deletecluster", tag = "cimaster", operation_id = "deletecluster",
    params(("cluster" = String, Query), ("name" = Option<String>, Query, description = "who asks (the token says who it is)")),
    responses((status = 200, description = "the cluster is gone", content((String = "text/plain"), (Deleted = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn deletecluster(
    State(state): State<AppState>,
    caller: Admin,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    store::delete(&state.pool, name, &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} deleted"), Deleted { deleted: name.to_owned() }))
}

/// `/deletecluster`'s JSON answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Deleted {
    /// The cluster's name.
    pub deleted: String,
}

/// `GET /disablecluster?cluster=&name=[&reason=]` (admin).
#[utoipa::path(method(get, post), path = "/disablecluster", tag = "cimaster", operation_id = "disablecluster",
    params(("cluster" = String, Query), ("name" = Option<String>, Query, description = "who asks (the token says who it is)"),
        ("reason" = Option<String>, Query)),
    responses((status = 200, description = "the cluster, disabled", content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn disablecluster(
    State(state): State<AppState>,
    caller: Admin,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    let reason = optional(&params, "reason").map_or_else(|| format!("disabled by {}", caller.subject), str::to_owned);
    let view = store::set_disabled(&state.pool, name, Some(&reason), &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} disabled"), view))
}

/// `GET /enablecluster?cluster=&name=` (admin).
#[utoipa::path(method(get, post), path = "/enablecluster", tag = "cimaster", operation_id = "enablecluster",
    params(("cluster" = String, Query), ("name" = Option<String>, Query, description = "who asks (the token says who it is)")),
    responses((status = 200, description = "the cluster, enabled", content((String = "text/plain"), (ClusterView = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn enablecluster(
    State(state): State<AppState>,
    caller: Admin,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
    let name = param(&params, "cluster")?;
    let view = store::set_disabled(&state.pool, name, None, &caller.subject).await?;
    Ok(answer(&headers, format!("cluster {name} enabled"), view))
}

/// `GET /createcluster?user=&branch=&job=`: run the provisioning job (ours, not Prow's), the user
/// passed as its `AUTHOR` parameter; answers the run's link.
#[utoipa::path(method(get, post), path = "/createcluster", tag = "cimaster", operation_id = "createcluster",
    params(("user" = String, Query, description = "passed to the job as its `AUTHOR` parameter"),
        ("branch" = Option<String>, Query, description = "for a git job: the branch (default: the job's)"),
        ("job" = Option<String>, Query, description = "the provisioning job (default: the pool's)")),
    responses((status = 201, description = "the run, triggered", content((String = "text/plain"), (RunView = "application/json"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(super) async fn createcluster(
    State(state): State<AppState>,
    caller: Triggerer,
    headers: HeaderMap,
    ApiQuery(params): Params,
) -> Result<Response, ApiError> {
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
    let trigger = Trigger {
        job: &job,
        request: &request,
        by: &caller.subject,
        idempotency_key: None,
        rerun_of: None,
        cause: &Cause::default(),
        pushed_branch: None,
    };
    let run = match state.triggers.create(&trigger).await? {
        Created::New(run) | Created::Replayed(run) => RunView::from(run),
    };
    Ok((StatusCode::CREATED, answer(&headers, format!("cluster creation triggered: {}", run.links.this), run))
        .into_response())
}
