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
        super::runs::trigger, super::runs::get_run, super::runs::list_runs, super::runs::abort_run, super::runs::rerun,
        super::runs::list_all_runs, super::runs::find_run,
        super::console::console, super::results::list_results, super::results::junit, super::results::artifact,
        super::results::service_log,
        super::secrets::put_secret, super::secrets::list_secrets, super::secrets::delete_secret,
        super::pool::rest::list_clusters, super::pool::rest::get_cluster, super::pool::rest::put_cluster, super::pool::rest::delete_cluster, super::pool::rest::acquire, super::pool::rest::heartbeat,
        super::pool::rest::release, super::pool::rest::list_events, super::pool::rest::usage_report, super::pool::rest::list_waiters,
        super::pool::cimaster::getvacant, super::pool::cimaster::finishtest, super::pool::cimaster::holdcluster,
        super::pool::cimaster::releasecluster, super::pool::cimaster::addcluster, super::pool::cimaster::deletecluster,
        super::pool::cimaster::disablecluster, super::pool::cimaster::enablecluster, super::pool::cimaster::createcluster,
        super::agents::list_agents, super::agents::list_queues,
        super::hooks::receive, super::hooks::list_deliveries, super::hooks::list_statuses,
        super::health::healthz, super::health::readyz, super::health::metrics,
        super::oidc::discovery, super::oidc::jwks,
    ),
    components(schemas(
        cimaster_common::JobSpec, cimaster_common::FreestyleJob, cimaster_common::GitJob,
        cimaster_common::Resources, cimaster_common::RunStatus, cimaster_common::TriggerRequest,
        cimaster_common::Schedule, cimaster_common::Overlap, cimaster_common::IdTokenSpec,
        super::error::Problem,
    )),
    modifiers(&BearerAuth, &CommonAnswers, &KindTaggedJobs, &DistinctOperationIds),
)]
pub struct ApiDoc;

/// The answers any operation can give besides its own, documented on every one: a malformed path
/// or query (400, e.g. a NUL), an unavailable database or a request past its timeout (503), a
/// missing or bad token (401) and a missing role (403) where a token is needed, nothing by the name
/// in the path (404) where the path names something, and a body that is not JSON (400, 415), too
/// large (413) or does not fit (422) where a body is taken.
struct CommonAnswers;

impl Modify for CommonAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let names_something = path.contains('{');
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete];
            for operation in operations.into_iter().flatten() {
                let mut statuses = vec![("400", "malformed path, query or body"), ("503", "unavailable; try again")];
                if names_something {
                    statuses.push(("404", "no such job, run, attempt, file, secret, cluster or lease"));
                }
                if operation.security.is_some() {
                    statuses.push(("401", "no valid bearer token"));
                    statuses.push(("403", "the token lacks the role this needs"));
                }
                if operation.request_body.is_some() {
                    statuses.push(("413", "the body is over 1 MiB"));
                    statuses.push(("415", "the body is not JSON"));
                    statuses.push(("422", "the body does not fit"));
                }
                for (status, description) in statuses {
                    operation.responses.responses.entry(status.to_owned()).or_insert_with(|| problem(description));
                }
            }
        }
    }
}

/// The job spec as the API reads it: `kind` beside the variant's own fields, in one closed object
/// per kind (serde's internally tagged enum). The derived `allOf` of a closed variant and `kind`
/// can be met by no value; this states it as it is. `script` is a string or a list of strings.
struct KindTaggedJobs;

impl Modify for KindTaggedJobs {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
        use utoipa::openapi::RefOr;
        let Some(components) = openapi.components.as_mut() else { return };
        let mut variants = Vec::new();
        for (name, kind) in [("FreestyleJob", "freestyle"), ("GitJob", "git")] {
            let Some(RefOr::T(Schema::Object(object))) = components.schemas.get(name) else { continue };
            let mut object = object.clone();
            object.properties.insert(
                "kind".to_owned(),
                ObjectBuilder::new().schema_type(Type::String).enum_values(Some([kind])).into(),
            );
            object.required.insert(0, "kind".to_owned());
            if let Some(script) = object.properties.get_mut("script") {
                let one = ObjectBuilder::new().schema_type(Type::String);
                let many = ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String));
                *script = OneOfBuilder::new()
                    .item(one)
                    .item(many)
                    .description(Some(
                        "One shell script, or a list of commands run in order (stopping at the first failure).",
                    ))
                    .into();
            }
            variants.push(Schema::Object(object));
        }
        if variants.len() != 2 {
            return;
        }
        // A job as the API answers it: the spec's fields beside its own (`name`, `version`, …), in
        // one closed object per kind too (the derived `allOf` of a closed spec and more fields can
        // be met by no answer).
        let own = match components.schemas.get("JobView") {
            Some(RefOr::T(Schema::AllOf(all_of))) => all_of.items.iter().find_map(|item| match item {
                RefOr::T(Schema::Object(object)) => Some(object.clone()),
                _ => None,
            }),
            _ => None,
        };
        if let Some(own) = own {
            let mut views = OneOfBuilder::new();
            for variant in &variants {
                let Schema::Object(variant) = variant else { continue };
                let mut view = variant.clone();
                view.properties.extend(own.properties.clone());
                view.required.extend(own.required.iter().cloned());
                views = views.item(Schema::Object(view));
            }
            components.schemas.insert("JobView".to_owned(), views.into());
        }
        let mut one_of = OneOfBuilder::new();
        for variant in variants {
            one_of = one_of.item(variant);
        }
        components.schemas.insert("JobSpec".to_owned(), one_of.into());
    }
}

/// The original CIMaster endpoints answer `GET` and `POST` alike, documented once per method: the
/// `POST`'s operation id gets a `_post` suffix so every id stays unique.
struct DistinctOperationIds;

impl Modify for DistinctOperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let (Some(get), Some(post)) = (&item.get, &mut item.post) else { continue };
            if get.operation_id.is_some() && post.operation_id == get.operation_id {
                post.operation_id = post.operation_id.take().map(|id| format!("{id}_post"));
            }
        }
    }
}

/// A problem+json answer.
fn problem(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    let schema = utoipa::openapi::Ref::from_schema_name("Problem");
    utoipa::openapi::ResponseBuilder::new()
        .description(description)
        .content("application/problem+json", utoipa::openapi::Content::new(Some(schema)))
        .build()
        .into()
}

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
