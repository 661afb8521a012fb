//! What the store's tests share: a queued run to claim, report on and write results for.
#![allow(clippy::unwrap_used)]

use cimaster_common::RunId;
use sqlx::PgPool;

/// A queued freestyle run of job `job`.
pub async fn queued_run(pool: &PgPool) -> RunId {
    let id = RunId::new();
    let spec = serde_json::json!({"kind": "freestyle", "image": "busybox:latest", "script": "true",
        "env": {}, "timeoutSeconds": 60, "resources": {"cpus": 1.0, "memory": "64Mi"}, "queue": "default",
        "parameters": {}});
    sqlx::query("INSERT INTO runs (id, job, queue, spec, triggered_by) VALUES ($1, 'job', 'default', $2, 'test')")
        .bind(id.0)
        .bind(spec)
        .execute(pool)
        .await
        .unwrap();
    id
}
