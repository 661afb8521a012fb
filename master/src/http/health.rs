//! Liveness, readiness and Prometheus metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics))
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Postgres and RabbitMQ are both reachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"), (status = 503, description = "a dependency is down")))]
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = tokio::time::timeout(Duration::from_secs(2), cimaster_store::ping(&state.pool))
        .await
        .is_ok_and(|result| result.is_ok());
    let rabbitmq = state.broker.is_connected();
    let status = if postgres && rabbitmq { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not ready" },
            "postgres": word(postgres),
            "rabbitmq": word(rabbitmq),
        })),
    )
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus metrics")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Queue depths and agents as the registry has them now (skipped while Postgres is away).
    let _ = tokio::time::timeout(Duration::from_secs(2), super::agents::refresh_gauges(&state)).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
