//! `POST /hooks/github`: GitHub's webhooks, authenticated by their signature, recorded by delivery
//! id and answered at once; the work (config reads, run creation) follows in any replica
//! (`codehost::handle`). `GET /hooks/github/deliveries`: what each delivery did;
//! `GET /hooks/github/statuses`: the commit statuses posted, waiting or given up.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use cimaster_store::approvals::{self, Approval};
use cimaster_store::deliveries::{self, DeliveryView, Received};
use cimaster_store::jobs;
use cimaster_store::statuses::{self, StatusView};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::{Admin, AppState};
use crate::auth::AuthError;
use crate::codehost::Event;
use crate::github::{self, Reading};

/// GitHub sends payloads of up to 25 MB.
pub const HOOK_BODY_LIMIT: usize = 25 << 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/hooks/github", post(receive).layer(DefaultBodyLimit::max(HOOK_BODY_LIMIT)))
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
        (status = 413, body = super::Problem, content_type = "application/problem+json")))]
pub(super) async fn receive(State(state): State<AppState>, request: Request) -> Result<impl IntoResponse, ApiError> {
    let headers = request.headers().clone();
    let body = Bytes::from_request(request, &state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: HOOK_BODY_LIMIT }
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {}", rejection.body_text()))
        }
    })?;
    verify(&state, &headers, &body)?;
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

/// 401 unless the body carries a valid signature; 503 when no secret is configured.
fn verify(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    if state.github.webhook_secrets.is_empty() {
        return Err(ApiError::Unavailable(
            "GitHub webhooks are not configured: set CIMASTER_GITHUB_WEBHOOK_SECRET".to_owned(),
        ));
    }
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| AuthError::Signature("no X-Hub-Signature-256 header".to_owned()))?;
    if !github::signature_valid(&state.github.webhook_secrets, body, signature) {
        return Err(AuthError::Signature(
            "X-Hub-Signature-256 does not match the body under any configured webhook secret".to_owned(),
        )
        .into());
    }
    Ok(())
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
