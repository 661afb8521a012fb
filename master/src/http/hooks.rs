//! `POST /hooks/github`: GitHub's webhooks, authenticated by their signature, recorded by delivery
//! id and answered at once; the work (config reads, run creation) follows in any replica
//! (`codehost::handle`). `GET /hooks/github/deliveries`: what each delivery did;
//! `GET /hooks/github/statuses`: the commit statuses posted, waiting or given up.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cimaster_store::approvals::{self, Approval};
use cimaster_store::deliveries::{self, DeliveryView, Received};
use cimaster_store::jobs;
use cimaster_store::statuses::{self, StatusView};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::{Admin, AppState};
use crate::auth::AuthError;
use crate::codehost::Event;
use crate::github::{self, Reading};

/// GitHub sends payloads of up to 25 MB.
pub const HOOK_BODY_LIMIT: usize = 25 << 20;

/// How many webhook bodies are read at once. A body is read before its signature can be checked,
/// so this (times [`HOOK_BODY_LIMIT`]) bounds the memory anyone without a secret can make a
/// replica spend. A delivery refused for want of a permit is answered 503 with `Retry-After`.
pub const HOOK_READERS: usize = 16;

/// The permits to read a webhook body, one per body being read.
#[derive(Clone)]
pub(super) struct Readers(Arc<Semaphore>);

pub fn router() -> Router<AppState> {
    let readers = Readers(Arc::new(Semaphore::new(HOOK_READERS)));
    Router::new()
        .route("/hooks/github", post(receive).layer(Extension(readers)))
        .route("/hooks/github/deliveries", get(list_deliveries))
        .route("/hooks/github/statuses", get(list_statuses))
}

/// What became of a delivery at once.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub delivery: String,
    /// `pong`, `accepted` (handled shortly), `already received`, or why it starts nothing.
    pub outcome: String,
}

/// A GitHub webhook delivery. No bearer token: `X-Hub-Signature-256` (HMAC-SHA256 of the body with
/// one of `CIMASTER_GITHUB_WEBHOOK_SECRET`) authenticates it. `ping` answers 200; a delivery to act
/// on, or one that starts nothing, answers 202 with its outcome; a delivery id seen before answers
/// 200 and does nothing again.
#[utoipa::path(post, path = "/hooks/github", tag = "github", request_body = Object,
    params(
        ("X-GitHub-Event" = String, Header, description = "the event, e.g. `pull_request`"),
        ("X-GitHub-Delivery" = String, Header, description = "the delivery's unique id"),
        ("X-Hub-Signature-256" = String, Header, description = "`sha256=<hex>`")),
    responses(
        (status = 200, description = "ping, or a delivery already received", body = Accepted),
        (status = 202, description = "recorded: to be handled, or why it starts nothing", body = Accepted),
        (status = 400, body = super::Problem, content_type = "application/problem+json"),
        (status = 401, body = super::Problem, content_type = "application/problem+json"),
        (status = 413, body = super::Problem, content_type = "application/problem+json"),
        (status = 503, description = "webhooks are not configured, or too many deliveries are being received",
            body = super::Problem, content_type = "application/problem+json")))]
pub(super) async fn receive(
    State(state): State<AppState>,
    Extension(readers): Extension<Readers>,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let body = read_signed(&state, &readers, &headers, body).await?;
    let event = header(&headers, "x-github-event")?;
    let delivery = header(&headers, "x-github-delivery")?;
    let payload: serde_json::Value =
        serde_json::from_slice(&body).map_err(|err| ApiError::BadRequest(format!("the body is not JSON: {err}")))?;
    let summary = github::summary(&payload);
    let received = Received {
        id: &delivery,
        event: &event,
        action: summary.action,
        repository: summary.repository,
        sender: summary.sender,
    };
    let reading = github::read(&event, &payload).map_err(ApiError::BadRequest)?;
    let (status, outcome, to_handle) = match reading {
        Reading::Ping => (StatusCode::OK, "pong".to_owned(), None),
        Reading::Ignored(why) => (StatusCode::ACCEPTED, why, None),
        Reading::Act(event) => match unsubscribed(&state, &event).await? {
            Some(why) => (StatusCode::ACCEPTED, why, None),
            None => (StatusCode::ACCEPTED, "accepted".to_owned(), Some(event)),
        },
    };
    if let Some(Event::PullRequestUpdated(pull)) = to_handle.as_deref() {
        // Before the delivery is recorded: a comment received after it sees the head as heard of.
        let head = Approval { repository: &pull.repository, pull_request: pull.number, sha: pull.head_sha.as_str() };
        approvals::heard_of(&state.pool, &head).await?;
    }
    let stored = match &to_handle {
        Some(event) => {
            let payload = serde_json::to_value(event).map_err(|err| ApiError::Internal(err.into()))?;
            deliveries::record(&state.pool, &received, Some(&payload), None).await?
        }
        None => deliveries::record(&state.pool, &received, None, Some(&outcome)).await?,
    };
    tracing::info!(delivery = %delivery, event = %event, stored, outcome = %outcome, "webhook received");
    if !stored {
        return Ok((StatusCode::OK, Json(Accepted { delivery, outcome: "already received".to_owned() })));
    }
    Ok((status, Json(Accepted { delivery, outcome })))
}

/// The body of a delivery whose signature matched it, read only as far as it has to be: 503 when
/// no secret is configured and 401 for a missing or malformed signature, both before a byte is
/// read; 413 at once for a `Content-Length` over the limit, or as soon as a body grows past it;
/// 503 while [`HOOK_READERS`] other bodies are being read; 401 when the signature does not match.
/// The HMACs follow the body as it arrives, and nothing of it is parsed before it is authentic.
async fn read_signed(state: &AppState, readers: &Readers, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let secrets = &state.github.webhook_secrets;
    if secrets.is_empty() {
        return Err(ApiError::Unavailable(
            "GitHub webhooks are not configured: set CIMASTER_GITHUB_WEBHOOK_SECRET".to_owned(),
        ));
    }
    let signature = headers
        .get("x-hub-signature-256")
        .ok_or_else(|| AuthError::Signature("no X-Hub-Signature-256 header".to_owned()))?;
    let digest = github::parse_signature(signature.as_bytes()).ok_or_else(|| {
        AuthError::Signature("X-Hub-Signature-256 must be `sha256=` and 64 hexadecimal digits".to_owned())
    })?;
    let declared =
        headers.get(axum::http::header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > HOOK_BODY_LIMIT as u64) {
        return Err(ApiError::PayloadTooLarge { limit: HOOK_BODY_LIMIT });
    }
    let _reading = readers.0.clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable(format!("{HOOK_READERS} webhook deliveries are being received already; retry shortly"))
    })?;
    let mut signer = github::Signer::new(secrets);
    // Memory follows what arrives, not what the sender declares.
    let mut received = Vec::with_capacity(declared.map_or(0, |length| length as usize).min(1 << 20));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|err| ApiError::BadRequest(format!("cannot read the request body: {err}")))?;
        if received.len() + chunk.len() > HOOK_BODY_LIMIT {
            return Err(ApiError::PayloadTooLarge { limit: HOOK_BODY_LIMIT });
        }
        signer.update(&chunk);
        received.extend_from_slice(&chunk);
    }
    if !signer.verify(&digest) {
        return Err(AuthError::Signature(
            "X-Hub-Signature-256 does not match the body under any configured webhook secret".to_owned(),
        )
        .into());
    }
    Ok(Bytes::from(received))
}

/// A header GitHub always sends: 1 to 200 visible ASCII characters.
fn header(headers: &HeaderMap, name: &str) -> Result<String, ApiError> {
    let value = headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default();
    if value.is_empty() || value.len() > 200 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(format!("the `{name}` header must be 1 to 200 visible ASCII characters")));
    }
    Ok(value.to_owned())
}

/// Why nothing subscribes to the event's repository, if nothing does.
async fn unsubscribed(state: &AppState, event: &Event) -> Result<Option<String>, ApiError> {
    let repository = event.repository();
    if jobs::subscribed(&state.pool, repository).await?.is_empty() {
        Ok(Some(format!("no job subscribes to {repository}")))
    } else {
        Ok(None)
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryFilter {
    /// Only deliveries of this repository (`owner/name`).
    repository: Option<String>,
    /// At most this many, newest first (1–500, 50 by default).
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
}

/// Recent webhook deliveries, newest first, with what came of each — where to look first when
/// "CI didn't run".
#[utoipa::path(get, path = "/hooks/github/deliveries", tag = "github", params(DeliveryFilter),
    responses((status = 200, body = DeliveryList)), security(("bearer" = [])))]
pub(super) async fn list_deliveries(
    State(state): State<AppState>,
    _caller: Admin,
    super::query::ApiQuery(filter): super::query::ApiQuery<DeliveryFilter>,
) -> Result<Json<DeliveryList>, ApiError> {
    let limit = page_limit(filter.limit)?;
    let deliveries = deliveries::list(&state.pool, filter.repository.as_deref(), limit).await?;
    Ok(Json(DeliveryList { deliveries }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatusFilter {
    /// Only statuses of this commit.
    sha: Option<String>,
    /// At most this many, newest first (1–500, 50 by default).
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct StatusList {
    pub statuses: Vec<StatusView>,
}

/// Commit statuses, newest first: what was posted to GitHub, what waits for a retry and why, and
/// what GitHub refused.
#[utoipa::path(get, path = "/hooks/github/statuses", tag = "github", params(StatusFilter),
    responses((status = 200, body = StatusList)), security(("bearer" = [])))]
pub(super) async fn list_statuses(
    State(state): State<AppState>,
    _caller: Admin,
    super::query::ApiQuery(filter): super::query::ApiQuery<StatusFilter>,
) -> Result<Json<StatusList>, ApiError> {
    let limit = page_limit(filter.limit)?;
    let statuses = statuses::list(&state.pool, filter.sha.as_deref(), limit).await?;
    Ok(Json(StatusList { statuses }))
}

/// A listing's `limit`: 1 to 500, 50 by default.
fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be 1 to 500, not {limit}")));
    }
    Ok(limit)
}
