//! Scheduled jobs: validated on PUT, shown with their next slots, and fired once per slot by any
//! number of replicas, across restarts.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use support::{freestyle, TestApp};

fn scheduled(schedule: Value) -> Value {
    let mut job = freestyle("default");
    job["schedule"] = schedule;
    job
}

/// Makes the job's next slot due `ago` in the past, as if the masters had been down since.
async fn make_due(pool: &PgPool, job: &str, ago: Duration) {
    sqlx::query("UPDATE job_schedules SET next_fire_at = now() - make_interval(secs => $2) WHERE job = $1")
        .bind(job)
        .bind(ago.as_secs_f64())
        .execute(pool)
        .await
        .unwrap();
}

async fn scheduled_runs(pool: &PgPool, job: &str) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT triggered_by, event, coalesce(idempotency_key, '') FROM runs WHERE job = $1 ORDER BY created_at",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Waits until the slot has moved on from the past (fired or skipped).
async fn wait_moved_on(pool: &PgPool, job: &str) -> (DateTime<Utc>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (next, outcome): (DateTime<Utc>, Option<String>) =
            sqlx::query_as("SELECT next_fire_at, last_outcome FROM job_schedules WHERE job = $1")
                .bind(job)
                .fetch_one(pool)
                .await
                .unwrap();
        if next > Utc::now() {
            return (next, outcome);
        }
        assert!(Instant::now() < deadline, "the due slot of {job} never fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_schedule_is_checked_on_put_and_shows_its_next_slots(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let put = api.put("/jobs/nightly", scheduled(json!({"cron": "0 3 * * *", "timezone": "Europe/Berlin"}))).await;
    assert_eq!(put.status, 201, "{}", put.body);
    let job = api.get("/jobs/nightly").await.body;
    assert_eq!(job["schedule"]["overlap"], "skip", "{job}");
    let next: Vec<DateTime<Utc>> = serde_json::from_value(job["scheduleState"]["nextRuns"].clone()).unwrap();
    assert_eq!(next.len(), 3, "{job}");
    // 03:00 in Berlin: 01:00 or 02:00 UTC, a day apart.
    assert!(next.iter().all(|slot| [1, 2].contains(&slot.hour()) && slot.minute() == 0), "{next:?}");
    assert!(next[0] > Utc::now());
    assert!(api.get("/jobs").await.body["jobs"][0]["scheduleState"]["nextRuns"].is_array());

    let refused = [
        (json!({"cron": "0 3 * *"}), "needs five"),
        (json!({"cron": "0 25 * * *"}), "cron `0 25 * * *`"),
        (json!({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}), "unknown time zone `Mars/Olympus`"),
        (json!({"cron": "0 3 * * *", "branch": "main"}), "schedule.branch is for git jobs"),
        (json!({"cron": "0 3 * * *", "parameters": {"OTHER": "x"}}), "`OTHER`, which is not among"),
        (json!({"cron": "0 3 * * *", "overlap": "queue"}), "unknown variant `queue`"),
    ];
    for (schedule, says) in refused {
        api.put("/jobs/bad", scheduled(schedule)).await.expect_problem(422, says);
    }
    assert_eq!(api.get("/jobs/bad").await.status, 404, "nothing half-written");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_due_slot_starts_one_run_with_two_replicas_and_overlap_skips(pool: PgPool) {
    let first = TestApp::spawn(pool.clone()).await;
    let second = TestApp::spawn(pool.clone()).await;
    let schedule = json!({"cron": "*/5 * * * *", "parameters": {"TARGET": "nightly"}});
    assert_eq!(first.admin().put("/jobs/every5", scheduled(schedule)).await.status, 201);

    make_due(&pool, "every5", Duration::from_secs(1)).await;
    let (next, outcome) = wait_moved_on(&pool, "every5").await;
    assert_eq!(outcome.as_deref(), Some("started"));
    assert_eq!(next.minute() % 5, 0);
    let runs = scheduled_runs(&pool, "every5").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!((runs[0].0.as_str(), runs[0].1.as_str()), ("schedule", "schedule"));
    assert!(runs[0].2.starts_with("schedule:"), "{runs:?}");
    let listed = second.admin().get("/runs?job=every5&event=schedule").await.body;
    assert_eq!(listed["runs"][0]["parameters"]["TARGET"], "nightly", "{listed}");

    // No agent here: the first run is still queued, so the next slot is skipped.
    make_due(&pool, "every5", Duration::from_secs(1)).await;
    let (_, outcome) = wait_moved_on(&pool, "every5").await;
    assert!(outcome.as_deref().unwrap_or_default().starts_with("skipped: run "), "{outcome:?}");
    assert_eq!(scheduled_runs(&pool, "every5").await.len(), 1);
    let job = second.admin().get("/jobs/every5").await.body;
    assert!(job["scheduleState"]["lastOutcome"].as_str().unwrap().starts_with("skipped"), "{job}");

    // overlap: allow starts another.
    let allow = json!({"cron": "*/5 * * * *", "overlap": "allow"});
    assert_eq!(first.admin().put("/jobs/every5", scheduled(allow)).await.status, 200);
    make_due(&pool, "every5", Duration::from_secs(1)).await;
    wait_moved_on(&pool, "every5").await;
    assert_eq!(scheduled_runs(&pool, "every5").await.len(), 2);
    first.stop().await;
    second.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn slots_missed_while_every_master_was_down_fire_once(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    assert_eq!(app.admin().put("/jobs/minutely", scheduled(json!({"cron": "* * * * *"}))).await.status, 201);
    app.stop().await;

    // Down for ten slots; two replicas come back.
    make_due(&pool, "minutely", Duration::from_secs(600)).await;
    let (first, second) = tokio::join!(TestApp::spawn(pool.clone()), TestApp::spawn(pool.clone()));
    let (next, _) = wait_moved_on(&pool, "minutely").await;
    assert!(next <= Utc::now() + chrono::Duration::seconds(61), "the next slot is the next minute: {next}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(scheduled_runs(&pool, "minutely").await.len(), 1, "ten missed slots fire once");
    first.stop().await;
    second.stop().await;
}
