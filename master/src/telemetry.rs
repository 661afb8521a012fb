//! Metrics set-up.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder. Installed once; later callers share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                )
                .expect("valid buckets")
                .set_buckets_for_metric(
                    Matcher::Full("cimaster_dispatch_seconds".to_owned()),
                    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0],
                )
                .expect("valid buckets")
                .set_buckets_for_metric(
                    Matcher::Full("cimaster_run_seconds".to_owned()),
                    &[
                        1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
                        86400.0,
                    ],
                )
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            register_series();
            handle
        })
        .clone()
}

/// Counters without labels exist from the start, at 0, so alerts and dashboards work on a fresh
/// install (Prometheus practice) instead of seeing no series until the first event.
fn register_series() {
    for name in [
        "cimaster_runs_dispatched_total",
        "cimaster_publish_failures_total",
        "cimaster_runs_reaped_total",
        "cimaster_pool_lease_expiries_total",
        "cimaster_pool_hold_expiries_total",
        "cimaster_pool_holds_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::gauge!("cimaster_outbox_backlog").set(0.0);
    metrics::gauge!(CONSOLE_FOLLOWS).set(0.0);
}

/// Console follows open on this replica.
pub const CONSOLE_FOLLOWS: &str = "cimaster_console_follows";
