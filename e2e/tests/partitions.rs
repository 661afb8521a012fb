//! Hosts cut off, not killed: an agent in a network namespace of its own loses its link to one
//! service while its runs go on, and a history that the jobs themselves report is checked for runs
//! executed twice at once, runs lost, and successes whose job never finished. Changes the
//! machine's network namespaces and iptables rules (its own only), so `scripts/test` runs it with
//! the fault tests, alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;
use support::history::{self, Event, Recorder};
use support::partition::{self, Host};
use support::{AgentOptions, Stack};

/// Runs in flight when the link is cut. Each needs a bridge network of its own, on both agents at
/// the turn-over, and Docker's default address pools hold about 31 (see the README's Failure model).
const RUNS: usize = 12;
/// Each job beats for about this many quarter seconds (some 16 s in all).
const BEATS: u32 = 60;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} (scripts/test sets it)"))
}

async fn open_runs(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')").fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn no_run_executes_twice_when_its_agent_is_cut_off_from_postgres(pool: PgPool) {
    let recorder = Recorder::start().await;
    let mut host = Host::create();
    let mut stack = Stack::start(pool).await;
    let lease = Duration::from_secs(5);

    // Agent 1 lives in the namespace and reaches every service through the veth pair.
    let database = host.expose(partition::target_of(&stack.database_url)).await;
    let amqp = host.expose(partition::target_of(&env("CIMASTER_AMQP_URL"))).await;
    let s3 = host.expose(partition::target_of(&env("CIMASTER_S3_ENDPOINT"))).await;
    let cut_off = stack
        .add_agent(AgentOptions {
            cpus: Some(RUNS as f64 * 0.1 + 0.05),
            netns: Some(host.namespace.clone()),
            env: vec![
                ("CIMASTER_DATABASE_URL", partition::through(&stack.database_url, database)),
                ("CIMASTER_AMQP_URL", partition::through(&env("CIMASTER_AMQP_URL"), amqp)),
                ("CIMASTER_S3_ENDPOINT", partition::through(&env("CIMASTER_S3_ENDPOINT"), s3)),
            ],
            ..Default::default()
        })
        .await;
    let cut_off_id = stack.agents[cut_off].id.clone();
    stack
        .put_job(
            "beats",
            json!({"kind": "freestyle", "image": "busybox:latest", "script": recorder.script(BEATS),
                   "resources": {"cpus": 0.1, "memory": "16Mi"}}),
        )
        .await;
    let paths: Vec<String> = futures::future::join_all((0..RUNS).map(|_| stack.trigger("beats"))).await;
    let ids: Vec<String> = paths.iter().map(|path| support::run_id(path)).collect();

    // Every run executes on the namespaced agent before the cut.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ids.iter().all(|id| recorder.started(id) == 1) {
        let started: Vec<usize> = ids.iter().map(|id| recorder.started(id)).collect();
        assert!(Instant::now() < deadline, "the runs did not all start on agent 1 (attempts reported: {started:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_cut_off: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'running' AND agent = $1")
        .bind(&cut_off_id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(on_cut_off, RUNS as i64, "all runs in flight on agent 1 when the link is cut");
    // A healthy agent to take the retries.
    stack.add_agent(AgentOptions { cpus: Some(RUNS as f64 * 0.1 + 0.05), ..Default::default() }).await;

    host.cut(database);
    let cut_at = Instant::now();
    tokio::time::sleep(lease * 3).await;
    host.heal(database);

    let deadline = Instant::now() + Duration::from_secs(120);
    while open_runs(&stack.pool).await > 0 {
        assert!(Instant::now() < deadline, "runs still open: {}", open_runs(&stack.pool).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let runs: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT id::text, status, attempt FROM runs ORDER BY id").fetch_all(&stack.pool).await.unwrap();
    let runs: Vec<(String, String, u32)> = runs.into_iter().map(|(id, status, n)| (id, status, n as u32)).collect();
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    report("agent <-> Postgres cut", &verdict, &events, cut_at);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("agent <-> Postgres cut"));
    assert_eq!(verdict.retried, RUNS, "every run was cut off mid-flight and finished as a retry");
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
}

/// Prints the scenario's figures: runs, retried, lost, double, and how long after the cut the old
/// executions stopped and the runs finished elsewhere.
fn report(scenario: &str, verdict: &history::Verdict, events: &[Event], cut_at: Instant) {
    let old_stopped = verdict
        .executions
        .values()
        .filter_map(|executions| executions.first())
        .filter(|first| first.attempt == 1 && !first.ended)
        .map(|first| first.last.saturating_duration_since(cut_at))
        .max()
        .unwrap_or_default();
    let finished_elsewhere = events
        .iter()
        .filter(|e| e.what == "end" && e.attempt > 1)
        .map(|e| e.at.saturating_duration_since(cut_at))
        .max()
        .unwrap_or_default();
    println!(
        "{}; cut -> old executions stopped {:.1}s; cut -> last run finished elsewhere {:.1}s",
        verdict.summary(scenario),
        old_stopped.as_secs_f64(),
        finished_elsewhere.as_secs_f64()
    );
}
#[test]
fn the_history_checker_sees_overlaps_losses_and_unfinished_successes() {
    let t = Instant::now();
    let at = |ms: u64| t + Duration::from_millis(ms);
    let event = |run: &str, attempt: u32, what: &str, ms: u64| Event {
        run: run.to_owned(),
        attempt,
        what: what.to_owned(),
        at: at(ms),
    };
    let events = vec![
        // a: attempt 1 cut off and stopped, attempt 2 after it: clean.
        event("a", 1, "start", 0),
        event("a", 1, "beat", 100),
        event("a", 2, "start", 200),
        event("a", 2, "end", 300),
        // b: attempt 2 started while attempt 1 still beat.
        event("b", 1, "start", 0),
        event("b", 2, "start", 100),
        event("b", 1, "beat", 200),
        event("b", 2, "end", 300),
        // c: succeeded, but its job never reported the end.
        event("c", 1, "start", 0),
    ];
    let runs = vec![
        ("a".to_owned(), "succeeded".to_owned(), 2),
        ("b".to_owned(), "succeeded".to_owned(), 2),
        ("c".to_owned(), "succeeded".to_owned(), 1),
        ("d".to_owned(), "running".to_owned(), 1),
    ];
    let verdict = history::check(&events, &runs);
    assert_eq!(verdict.double, ["b"]);
    assert_eq!(verdict.unfinished_successes, ["c"]);
    assert_eq!(verdict.lost, ["d"]);
    assert_eq!(verdict.retried, 2);
    assert!(!verdict.is_clean());
}
