//! The OpenAPI document, generated from the handlers and types.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "CIMaster", description = "Queue-driven CI runner: jobs, runs and results."),
    paths(
        super::jobs::put_job, super::jobs::get_job, super::jobs::list_jobs, super::jobs::delete_job,
        super::runs::trigger, super::runs::get_run, super::runs::list_runs, super::runs::abort_run,
        super::results::console, super::results::list_results, super::results::junit, super::results::artifact,
        super::results::service_log,
        super::secrets::put_secret, super::secrets::list_secrets, super::secrets::delete_secret,
        super::pool::rest::list_clusters, super::pool::rest::get_cluster, super::pool::rest::put_cluster, super::pool::rest::delete_cluster, super::pool::rest::acquire, super::pool::rest::heartbeat,
        super::pool::rest::release, super::pool::rest::list_events, super::pool::rest::usage_report, super::pool::rest::list_waiters,
        super::health::healthz, super::health::readyz, super::health::metrics,
    ),
    components(schemas(
        cimaster_common::JobSpec, cimaster_common::FreestyleJob, cimaster_common::GitJob,
        cimaster_common::Resources, cimaster_common::RunStatus, cimaster_common::TriggerRequest,
        super::error::Problem,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
}
