//! Claims and final writes against real Postgres: one claim per attempt, and an agent whose attempt
//! was taken over cannot write its final status.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cimaster_common::{RunId, RunStatus};
use cimaster_store::attempts::{self as store, Lease, Outcome};
use sqlx::PgPool;

async fn queued_run(pool: &PgPool) -> RunId {
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

#[sqlx::test(migrations = "../migrations")]
async fn racing_agents_claim_an_attempt_once(pool: PgPool) {
    let run = queued_run(&pool).await;
    let claims = (0..16).map(|i| {
        let pool = pool.clone();
        async move { store::claim(&pool, run, 1, &format!("agent-{i}"), Duration::from_secs(30)).await.unwrap() }
    });
    let won: Vec<_> = futures::future::join_all(claims).await.into_iter().flatten().collect();
    assert_eq!(won.len(), 1, "exactly one agent claims the attempt");
    // A stale message for another attempt finds nothing.
    assert!(store::claim(&pool, run, 2, "late", Duration::from_secs(30)).await.unwrap().is_none());
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM run_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_taken_over_attempt_cannot_write_its_status(pool: PgPool) {
    let run = queued_run(&pool).await;
    let first = store::claim(&pool, run, 1, "agent-a", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(
        store::renew(&pool, &first, "agent-a", Duration::from_secs(30)).await.unwrap(),
        Lease::Held { abort_requested: false }
    );

    // The reaper gave the run to attempt 2, which agent-b claimed.
    sqlx::query("UPDATE runs SET status = 'queued', attempt = 2, agent = NULL WHERE id = $1")
        .bind(run.0)
        .execute(&pool)
        .await
        .unwrap();
    let second = store::claim(&pool, run, 2, "agent-b", Duration::from_secs(30)).await.unwrap().unwrap();

    assert_eq!(store::renew(&pool, &first, "agent-a", Duration::from_secs(30)).await.unwrap(), Lease::Lost);
    let failed = Outcome { status: RunStatus::Failed, exit_code: Some(1), message: None };
    assert!(!store::finish(&pool, &first, "agent-a", &failed, None).await.unwrap(), "the stale agent is fenced off");
    let status: String =
        sqlx::query_scalar("SELECT status FROM runs WHERE id = $1").bind(run.0).fetch_one(&pool).await.unwrap();
    assert_eq!(status, "running");

    let ok = Outcome { status: RunStatus::Succeeded, exit_code: Some(0), message: None };
    assert!(store::finish(&pool, &second, "agent-b", &ok, None).await.unwrap());
    let (status, attempt): (String, i32) =
        sqlx::query_as("SELECT status, attempt FROM runs WHERE id = $1").bind(run.0).fetch_one(&pool).await.unwrap();
    assert_eq!((status.as_str(), attempt), ("succeeded", 2));
}
