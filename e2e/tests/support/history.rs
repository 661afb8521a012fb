//! The test stack's side of the execution history (`cimaster_e2e::history`): the job that reports
//! to the recorder, triggering it, and waiting for the runs.

pub use cimaster_e2e::history::*;

use std::time::{Duration, Instant};

/// The job every scenario runs: it reports to `recorder` for about `beats` quarter seconds.
pub async fn put_beats_job(stack: &super::Stack, recorder: &Recorder, beats: u32) {
    stack
        .put_job(
            "beats",
            serde_json::json!({"kind": "freestyle", "image": "busybox:latest", "script": recorder.script(beats),
                               "resources": {"cpus": 0.1, "memory": "16Mi"}}),
        )
        .await;
}

/// Triggers `count` runs of the beats job; their ids.
pub async fn trigger_beats(stack: &super::Stack, count: usize) -> Vec<String> {
    let paths: Vec<String> = futures::future::join_all((0..count).map(|_| stack.trigger("beats"))).await;
    paths.iter().map(|path| super::run_id(path)).collect()
}

/// Waits until each run's first attempt has reported its start.
pub async fn wait_started(recorder: &Recorder, ids: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !ids.iter().all(|id| recorder.started(id) == 1) {
        let started: Vec<usize> = ids.iter().map(|id| recorder.started(id)).collect();
        assert!(Instant::now() < deadline, "the runs did not all start (attempts reported: {started:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no run is queued or running; then every run's (id, status, attempt).
pub async fn wait_all_ended(pool: &sqlx::PgPool, timeout: Duration) -> Vec<(String, String, u32)> {
    let deadline = Instant::now() + timeout;
    loop {
        let open = open_runs(pool).await.unwrap();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} runs still queued or running");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    runs(pool).await.unwrap()
}

/// Prints the scenario's figures: runs, retried, lost, double, and how long after `cut_at` the
/// cut-off executions stopped and the runs finished.
pub fn report(scenario: &str, verdict: &Verdict, events: &[Event], cut_at: Instant) {
    let old_stopped = verdict
        .executions
        .values()
        .filter(|executions| executions.len() > 1)
        .map(|executions| executions[0].last.saturating_duration_since(cut_at))
        .max();
    let finished = events.iter().filter(|e| e.what == "end").map(|e| e.at.saturating_duration_since(cut_at)).max();
    let seconds = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
    println!(
        "{}; fault -> cut-off executions stopped {}; fault -> last run finished {}",
        verdict.summary(scenario),
        seconds(old_stopped),
        seconds(finished)
    );
}
