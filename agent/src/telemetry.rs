//! What the agent tells about itself: Prometheus metrics (runs in progress, admission and network
//! waits, Docker operation durations, console bytes, S3 upload durations) and a health answer,
//! served on `CIMASTER_AGENT_LISTEN` (`/metrics`, `/healthz`) when it is set.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

pub const RUNS_IN_PROGRESS: &str = "cimaster_agent_runs_in_progress";
pub const ADMISSION_WAIT: &str = "cimaster_agent_admission_wait_seconds";
pub const NETWORK_WAITS: &str = "cimaster_agent_network_waits_total";
pub const NETWORKS_EXHAUSTED: &str = "cimaster_agent_address_pools_exhausted_total";
pub const NETWORK_LIMIT: &str = "cimaster_agent_network_limit";
pub const DOCKER_SECONDS: &str = "cimaster_agent_docker_seconds";
pub const CONSOLE_BYTES: &str = "cimaster_agent_console_bytes_total";
pub const S3_UPLOAD_SECONDS: &str = "cimaster_agent_s3_upload_seconds";

/// The process-wide recorder; installed once (metrics recorded before it are lost).
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
                )
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            for name in [NETWORK_WAITS, NETWORKS_EXHAUSTED, CONSOLE_BYTES] {
                metrics::counter!(name).absolute(0);
            }
            metrics::gauge!(RUNS_IN_PROGRESS).set(0.0);
            handle
        })
        .clone()
}

/// Times what it guards into a histogram: a Docker operation into
/// `cimaster_agent_docker_seconds{operation}`, an S3 upload into `cimaster_agent_s3_upload_seconds`.
pub struct Timer {
    metric: &'static str,
    operation: Option<&'static str>,
    started: Instant,
}

impl Timer {
    pub fn docker(operation: &'static str) -> Self {
        Self { metric: DOCKER_SECONDS, operation: Some(operation), started: Instant::now() }
    }

    pub fn s3_upload() -> Self {
        Self { metric: S3_UPLOAD_SECONDS, operation: None, started: Instant::now() }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        match self.operation {
            Some(operation) => metrics::histogram!(self.metric, "operation" => operation).record(seconds),
            None => metrics::histogram!(self.metric).record(seconds),
        }
    }
}

static IN_PROGRESS: AtomicU32 = AtomicU32::new(0);

/// A run counted in `cimaster_agent_runs_in_progress` (and the registry's `runs`) while it lives.
pub struct InProgress;

impl InProgress {
    pub fn begin() -> Self {
        IN_PROGRESS.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(RUNS_IN_PROGRESS).increment(1.0);
        Self
    }

    /// Runs in progress now.
    pub fn count() -> u32 {
        IN_PROGRESS.load(Ordering::Relaxed)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        IN_PROGRESS.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(RUNS_IN_PROGRESS).decrement(1.0);
    }
}

/// What `/healthz` reports.
#[derive(Clone)]
pub struct Health {
    pub agent: String,
    /// Set once the agent got SIGTERM: it takes no more work.
    pub draining: CancellationToken,
}

#[derive(serde::Serialize)]
struct HealthView<'a> {
    agent: &'a str,
    status: &'static str,
}

/// Serves `/metrics` and `/healthz` until `stop`.
pub async fn serve(listen: SocketAddr, health: Health, stop: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics and /healthz");
    let handle = metrics();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()) }
            }),
        )
        .route("/healthz", get(healthz))
        .with_state(health);
    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await?;
    Ok(())
}

/// 200 while the agent works or drains (it is alive either way); `status` says which.
async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    let status = if health.draining.is_cancelled() { "draining" } else { "ok" };
    (StatusCode::OK, Json(HealthView { agent: &health.agent, status })).into_response()
}
