//! The HTTP API: one `router()` per resource, merged here, and the layers every request passes;
//! `crate::routes` puts it together with the web UI.

pub(crate) mod agents;
pub(crate) mod console;
mod error;
mod health;
mod hooks;
pub(crate) mod jobs;
mod json;
mod oidc;
mod openapi;
pub(crate) mod pool;
mod query;
pub(crate) mod results;
pub(crate) mod runs;
mod secrets;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use error::{ApiError, Problem};
pub use openapi::ApiDoc;

use crate::auth::{Caller, Role, Verifier};
use crate::broker::Broker;
use crate::dispatch::ConfirmLog;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub broker: Broker,
    pub verifier: Arc<Verifier>,
    pub confirms: ConfirmLog,
    pub metrics: PrometheusHandle,
    pub max_timeout_seconds: u32,
    /// The replica's job cache, shared with `triggers`; a changed job is forgotten.
    pub jobs: crate::trigger::JobCache,
    /// Run creation.
    pub triggers: crate::trigger::Triggers,
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    pub pool_config: crate::config::PoolConfig,
    /// When an agent counts as lost, and when it is forgotten.
    pub agents: crate::config::AgentsConfig,
    pub secrets: Option<cimaster_common::secrets::SecretBox>,
    /// How long a request may take to be answered (waiting acquires have their own bound).
    pub request_timeout: std::time::Duration,
    /// How long one console follow stays open.
    pub follow_limit: std::time::Duration,
    /// The replica's one LISTEN connection: waiting acquires and console follows wait on it.
    pub wakeups: crate::wakeups::Wakeups,
    /// Webhook secrets.
    pub github: crate::config::GithubConfig,
}

/// The API's routes, each resource's merged.
pub(crate) fn routes() -> Router<AppState> {
    Router::<AppState>::new()
        .merge(agents::router())
        .merge(hooks::router())
        .merge(jobs::router())
        .merge(runs::router())
        .merge(results::router())
        .merge(console::router())
        .merge(pool::router())
        .merge(secrets::router())
        .merge(health::router())
        .merge(oidc::router())
        .merge(openapi::router())
}

/// What every request passes, the API's and the web UI's: the fallbacks for unknown paths and
/// methods, the body limit, the deadline, the refusal of NUL, metrics, tracing and panic catching.
pub(crate) fn layered(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), answer_in_time))
        .layer(middleware::from_fn(refuse_nul_in_uri))
        .layer(middleware::from_fn(record_metrics))
        // A 5xx is a warning here: a database or broker fault is logged with its cause where it is
        // answered, and a 503 from `/readyz` while a dependency is down is the answer asked for.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)))
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {method} {}; see /openapi.json", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}; see /openapi.json", uri.path()))
}

/// A NUL (`%00`) anywhere in the path or query is refused before any handler sees it: Postgres text
/// cannot hold one, and no name, filter or value needs one.
async fn refuse_nul_in_uri(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let holds_nul = |text: &str| text.as_bytes().windows(3).any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0');
    if holds_nul(uri.path()) || uri.query().is_some_and(holds_nul) {
        return ApiError::BadRequest("the path and query must not contain NUL characters (`%00`)".into())
            .into_response();
    }
    next.run(request).await
}

/// Routes whose requests may wait on purpose (for a free cluster), bounded by their own `wait`.
const WAITING_ROUTES: [&str; 2] = ["/getvacant", "/pool/leases"];

/// Answers 503 when a handler takes longer than the request timeout. Only the answer's head is
/// timed: a streamed body (a console follow) goes on after it.
async fn answer_in_time(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let waits = request.extensions().get::<MatchedPath>().is_some_and(|path| WAITING_ROUTES.contains(&path.as_str()));
    if waits {
        return next.run(request).await;
    }
    match tokio::time::timeout(state.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!("the request took longer than {:?}; try again", state.request_timeout))
            .into_response(),
    }
}

/// The methods metrics name; any other is counted as `other`, so made-up methods add no series.
const KNOWN_METHODS: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];

async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = if KNOWN_METHODS.contains(request.method()) { request.method().as_str() } else { "other" }.to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("cimaster_http_requests_total", &labels).increment(1);
    metrics::histogram!("cimaster_http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    response
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION).map(|value| value.to_str().unwrap_or(""));
        Ok(state.verifier.verify_header(header)?)
    }
}

/// Callers holding a role, checked while the request's head is read: a caller without it gets 403
/// before any body is looked at.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        pub struct $name(pub Caller);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
                let caller = Caller::from_request_parts(parts, state).await?;
                caller.require($role)?;
                Ok(Self(caller))
            }
        }

        impl std::ops::Deref for $name {
            type Target = Caller;

            fn deref(&self) -> &Caller {
                &self.0
            }
        }
    };
}

role_extractor!(
    /// A caller with `read` (or more).
    Reader,
    Role::Read
);
role_extractor!(
    /// A caller with `trigger` (or more).
    Triggerer,
    Role::Trigger
);
role_extractor!(
    /// A caller with `admin`.
    Admin,
    Role::Admin
);

impl Caller {
    /// 403 unless the caller holds `role` (or a role above it).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.has(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this needs the `{}` role; `{}` has {}",
                role.as_str(),
                self.subject,
                if self.roles.is_empty() {
                    "none".to_owned()
                } else {
                    self.roles.iter().map(|r| format!("`{}`", r.as_str())).collect::<Vec<_>>().join(", ")
                }
            )))
        }
    }
}
