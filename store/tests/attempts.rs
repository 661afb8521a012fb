//! Claims and final writes against real Postgres: one claim per attempt, and an agent whose attempt
//! was taken over by the reaper cannot write its final status.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cimaster_common::RunStatus;
use cimaster_store::attempts::{self as store, Lease, Outcome};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use support::queued_run;
use tokio::sync::Barrier;

/// 16 claimants, each on a connection of its own, released together by a barrier.
#[sqlx::test(migrations = "../migrations")]
async fn racing_agents_claim_an_attempt_once(_: PgPoolOptions, connect: PgConnectOptions) {
    const CLAIMANTS: usize = 16;
    // A pool of its own: the test harness caps the pools it hands out.
    let pool = PgPoolOptions::new().max_connections(CLAIMANTS as u32 + 1).connect_with(connect).await.unwrap();
    let run = queued_run(&pool).await;
    let barrier = Arc::new(Barrier::new(CLAIMANTS));
    let claims = (0..CLAIMANTS).map(|i| {
        let (pool, barrier) = (pool.clone(), barrier.clone());
        tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            barrier.wait().await;
            store::claim(&mut *conn, run, 1, &format!("agent-{i}"), Duration::from_secs(30)).await.unwrap()
        })
    });
    let claims = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(claims)).await.unwrap();
    let won: Vec<_> = claims.into_iter().filter_map(Result::unwrap).collect();
    assert_eq!(won.len(), 1, "exactly one agent claims the attempt");
    // A stale message for another attempt finds nothing.
    assert!(store::claim(&pool, run, 2, "late", Duration::from_secs(30)).await.unwrap().is_none());
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM run_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 1);
    pool.close().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_taken_over_attempt_cannot_write_its_status(pool: PgPool) {
    let run = queued_run(&pool).await;
    let lease = Duration::from_millis(200);
    let first = store::claim(&pool, run, 1, "agent-a", lease).await.unwrap().unwrap();
    assert_eq!(store::renew(&pool, &first, "agent-a", lease).await.unwrap(), Lease::Held { abort_requested: false });

    // agent-a stops renewing; once its lease has expired the reaper queues attempt 2, which agent-b
    // claims.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reaped = loop {
        let reaped = store::reap_expired(&pool, 3).await.unwrap();
        if !reaped.is_empty() {
            break reaped;
        }
        assert!(Instant::now() < deadline, "the reaper never took over the expired attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((reaped[0].id, reaped[0].attempt, reaped[0].status), (run.0, 2, RunStatus::Queued));
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
