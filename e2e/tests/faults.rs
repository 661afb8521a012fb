//! RabbitMQ and Postgres restarted under load. Stops shared services, so `scripts/test` runs these
//! alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;

use serde_json::json;
use sqlx::PgPool;
use support::history::{self, Recorder};
use support::{dev, dev_async, AgentOptions, Stack};

struct Outage;

impl Drop for Outage {
    fn drop(&mut self) {
        dev(&["start-service", "rabbitmq"]);
    }
}

/// 200 runs of about a second are queued or running when RabbitMQ stops; 40 more are triggered
/// while it is down. Every one runs exactly once.
#[sqlx::test(migrations = "../migrations")]
async fn every_run_ends_exactly_once_when_rabbitmq_restarts_mid_flight(pool: PgPool) {
    const IN_FLIGHT: usize = 200;
    const DURING: usize = 40;
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions { cpus: Some(2.0), open_egress: true, ..Default::default() }).await;
    // Jobs of 6 s, longer than the lease, beating to the recorder.
    history::put_beats_job(&stack, &recorder, 24).await;

    let mut paths = Vec::new();
    for _ in 0..IN_FLIGHT / 20 {
        let triggers = (0..20).map(|_| stack.trigger("beats"));
        paths.extend(futures::future::join_all(triggers).await);
    }
    let (queued, running) = open_runs(&stack).await;
    assert!(running > 0, "nothing running when the broker stops");
    assert!(queued + running >= IN_FLIGHT as i64 * 3 / 4, "only {queued} queued and {running} running at the stop");

    dev_async(&["stop-service", "rabbitmq"]).await;
    let outage = Outage;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.api.get("/readyz").await.body["rabbitmq"] != "unavailable" {
        assert!(Instant::now() < deadline, "the master never noticed the broker was gone");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let triggers = (0..DURING).map(|_| stack.trigger("beats"));
    paths.extend(futures::future::join_all(triggers).await);
    dev_async(&["start-service", "rabbitmq"]).await;
    std::mem::forget(outage);
    let total = IN_FLIGHT + DURING;
    assert_eq!(paths.len(), total);

    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (queued, running) = open_runs(&stack).await;
        if queued + running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{queued} runs still queued and {running} running");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM runs GROUP BY status").fetch_all(&stack.pool).await.unwrap();
    assert_eq!(statuses, vec![("succeeded".to_owned(), total as i64)]);
    // Exactly once: one attempt per run, none executed twice.
    let (attempts, runs): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT run_id) FROM run_attempts")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!((attempts, runs), (total as i64, total as i64));
    let runs = history::runs(&stack.pool).await.unwrap();
    let verdict = history::check(&recorder.events(), &runs);
    println!("{}", verdict.summary("RabbitMQ restart"));
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("RabbitMQ restart"));
}

/// How many runs are queued and how many running.
async fn open_runs(stack: &Stack) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running') FROM runs",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

struct PostgresOutage;

impl Drop for PostgresOutage {
    fn drop(&mut self) {
        dev(&["start-service", "postgres"]);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_in_flight_ride_out_a_postgres_restart_and_end_exactly_once(pool: PgPool) {
    const RUNS: usize = 12;
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    // A lease long enough to ride out the restart: the agent fences only after 12 s without renewal.
    let options = AgentOptions {
        cpus: Some(RUNS as f64 * 0.1 + 0.45),
        lease: "15s",
        lease_margin: "2s",
        open_egress: true,
        ..Default::default()
    };
    stack.add_agent(options).await;
    // Jobs of 17 s, longer than the lease.
    history::put_beats_job(&stack, &recorder, 68).await;
    let ids = history::trigger_beats(&stack, RUNS).await;
    history::wait_started(&recorder, &ids, Duration::from_secs(90)).await;

    dev_async(&["stop-service", "postgres"]).await;
    let outage = PostgresOutage;
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    dev_async(&["start-service", "postgres"]).await;
    std::mem::forget(outage);

    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(120)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    history::report("Postgres restart", &verdict, &events, stopped_at);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("Postgres restart"));
    assert_eq!(verdict.retried, 0, "every run ended in its first attempt: {runs:?}");
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
}

/// Reads a console stream into `received` until it ends or `enough` says so.
async fn read_stream(response: reqwest::Response, received: &mut Vec<u8>, enough: impl Fn(&[u8]) -> bool) {
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("stream stalled")
    {
        let Ok(chunk) = chunk else { break };
        received.extend_from_slice(&chunk);
        if enough(received) {
            break;
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_console_followed_through_a_killed_replica_resumes_on_another_without_gaps_or_repeats(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let mut first = stack.add_master().await;
    let second = stack.add_master().await;
    stack
        .put_job(
            "counter",
            json!({"kind": "freestyle", "image": "busybox:latest",
                   "script": "i=0; while [ $i -lt 60 ]; do echo line $i; i=$((i + 1)); sleep 0.1; done"}),
        )
        .await;
    let path = stack.trigger("counter").await;
    let follow = |api: &support::Api, after: usize| {
        api.request(reqwest::Method::GET, &format!("{path}/results/console?follow=true&after={after}")).send()
    };

    // Half way through the run, the replica serving the stream is killed.
    let mut received = Vec::new();
    let halfway = |received: &[u8]| String::from_utf8_lossy(received).contains("line 20\n");
    read_stream(follow(&first.api, 0).await.unwrap(), &mut received, halfway).await;
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();

    // The client resumes from the bytes it has, on another replica, until the run ends.
    read_stream(follow(&second.api, received.len()).await.unwrap(), &mut received, |_| false).await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let whole = stack.console(&path).await;
    assert_eq!(String::from_utf8_lossy(&received), whole, "the resumed stream is the log, byte for byte");
    let lines: Vec<&str> = whole.lines().filter_map(|line| line.split_once(' ').map(|(_, text)| text)).collect();
    let counted: Vec<String> = (0..60).map(|i| format!("line {i}")).collect();
    assert_eq!(lines.iter().filter(|l| l.starts_with("line ")).copied().collect::<Vec<_>>(), counted);
}

/// The scaling scenario with one agent SIGKILLed (and restarted under its id, as Kubernetes
/// restarts a crashed container) and RabbitMQ restarted mid-way: every run still ends once.
#[sqlx::test(migrations = "../migrations")]
async fn scaling_rides_out_a_killed_agent_and_a_rabbitmq_restart(pool: PgPool) {
    let scenario = support::scaling::small(true);
    let outcome = support::scaling::run_scenario(&pool, &scenario).await;
    assert_eq!((outcome.lost, outcome.double), (0, 0), "{outcome:#?}");
    assert_eq!(outcome.succeeded, scenario.runs, "{outcome:#?}");
    assert_eq!(outcome.agents_killed, 1, "{outcome:#?}");
    assert!(outcome.retried >= 1, "the kill of a busy agent caused no retry: {outcome:#?}");
}
