//! Faults of real services: RabbitMQ and Postgres are stopped and started again under a running
//! master. These stop shared services, so `scripts/test` runs this file alone, one test at a time.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use support::{drain_queue, eventually, freestyle, TestApp};

/// Stops a service for the life of the guard; starts it again even if the test fails.
struct Outage(&'static str);

fn dev(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dev");
    let status = std::process::Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "scripts/dev {args:?} failed");
}

impl Outage {
    fn start(service: &'static str) -> Self {
        dev(&["stop-service", service]);
        Outage(service)
    }

    fn end(self) {
        // Drop does the work.
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        dev(&["start-service", self.0]);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_triggered_while_rabbitmq_is_down_are_queued_exactly_once_after_it_returns(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    // One run before the outage, so the queue exists and is known to work.
    let before = api.post_empty("/jobs/unit-test/runs").await;
    assert_eq!(before.status, 201);

    let outage = Outage::start("rabbitmq");
    eventually(Duration::from_secs(20), || async {
        let ready = app.anonymous().get("/readyz").await;
        (ready.status == 503 && ready.body["rabbitmq"] == "unavailable").then_some(())
    })
    .await;

    let mut created = vec![before.body["id"].as_str().unwrap().to_owned()];
    for i in 0..30 {
        let run = api.post("/jobs/unit-test/runs", json!({"parameters": {"TARGET": format!("t{i}")}})).await;
        assert_eq!(run.status, 201, "trigger during the outage: {}", run.body);
        created.push(run.body["id"].as_str().unwrap().to_owned());
    }
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE published_at IS NULL").fetch_one(&app.pool).await.unwrap();
    assert_eq!(unpublished, 30, "runs are recorded as not yet published");
    let metrics = app.anonymous().get("/metrics").await;
    assert!(metrics.body.as_str().unwrap().contains("cimaster_publish_failures_total"));

    outage.end();
    eventually(Duration::from_secs(60), || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE published_at IS NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;

    let mut queued = drain_queue(&app.prefix, "default").await;
    let distinct: HashSet<_> = queued.iter().cloned().collect();
    assert_eq!(distinct.len(), queued.len(), "a run was published twice");
    queued.sort();
    created.sort();
    assert_eq!(queued, created, "every run reaches the queue exactly once");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn database_outage_answers_503_and_the_master_recovers(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);

    let outage = Outage::start("postgres");
    let down = api.post_empty("/jobs/unit-test/runs").await;
    down.expect_problem(503, "database");
    assert_eq!(down.headers["retry-after"], "5");
    let ready = app.anonymous().get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["postgres"], "unavailable");

    outage.end();
    let run = eventually(Duration::from_secs(30), || async {
        let run = api.post_empty("/jobs/unit-test/runs").await;
        (run.status == 201).then_some(run)
    })
    .await;
    assert_eq!(api.get(run.body["links"]["self"].as_str().unwrap()).await.status, 200);
    app.stop().await;
}
