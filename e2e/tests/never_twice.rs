//! Agents that die or freeze mid-run: the run's job must be gone before its next attempt starts,
//! however long the agent stays away. The jobs beat to a recorder of the test's own while they run
//! and run longer than the lease; the history checker fails on two attempts of a run beating in
//! overlapping windows, on a run that did not end exactly once, and on a fault that caused no retry.
//! Runs with the fault tests, alone: an agent frozen on a busy machine is a matter of timing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use support::history::{self, Recorder};
use support::{AgentOptions, Stack};

/// Quarter-second beats of each job: 16 s, longer than the leases below.
const BEATS: u32 = 64;

/// An agent whose jobs reach the recorder on this host.
fn agent(lease: &'static str, margin: &'static str) -> AgentOptions {
    AgentOptions { lease, stop_grace: "1s", lease_margin: margin, open_egress: true, ..Default::default() }
}

/// Starts one run on a first agent and waits for its job's first beat; the agent's index and the
/// run's id.
async fn one_run_in_flight(stack: &mut Stack, recorder: &Recorder, options: AgentOptions) -> (usize, String) {
    let first = stack.add_agent(options).await;
    history::put_beats_job(stack, recorder, BEATS).await;
    let ids = history::trigger_beats(stack, 1).await;
    history::wait_started(recorder, &ids, Duration::from_secs(60)).await;
    (first, ids[0].clone())
}

/// Waits for the run to end; checks the history: no overlap, one end, one retry.
async fn check_retried_once(stack: &Stack, recorder: &Recorder, scenario: &str, fault_at: Instant) {
    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(120)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    history::report(scenario, &verdict, &events, fault_at);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary(scenario));
    assert_eq!(verdict.retried, 1, "the fault bit: the run needed a second attempt: {verdict:#?}");
    assert_eq!(runs[0].1, "succeeded", "{runs:?}");
}

/// Waits until no run container of the agent runs any more; how long that took, if it was within
/// `within`. (The history check comes first: an old execution that outlived its agent shows there as
/// an overlap.)
async fn containers_gone(agent: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while support::running_run_containers_of_agent(agent) > 0 {
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(start.elapsed())
}

/// One run in flight on a first agent, a second agent beside it, and the first SIGKILLed: its id,
/// when it was killed, and how soon its job container stopped running (within 4 s).
async fn kill_one_of_two(stack: &mut Stack, recorder: &Recorder) -> (String, Instant, Option<Duration>) {
    let (first, _run) = one_run_in_flight(stack, recorder, agent("5s", "1s")).await;
    let first_id = stack.agents[first].id.clone();
    stack.add_agent(agent("5s", "1s")).await;
    stack.kill_agent(first);
    let killed_at = Instant::now();
    let gone = containers_gone(&first_id, Duration::from_secs(4)).await;
    (first_id, killed_at, gone)
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_is_gone_before_its_retry_when_its_agent_is_killed_and_not_restarted(pool: PgPool) {
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    let (first_id, killed_at, gone) = kill_one_of_two(&mut stack, &recorder).await;
    check_retried_once(&stack, &recorder, "agent SIGKILLed, not restarted", killed_at).await;
    let gone = gone.expect("the killed agent's job container was still running 4 s after the kill");
    println!("the killed agent's job container was gone {:.2}s after the kill", gone.as_secs_f64());
    // The warden removed every container of the dead agent (the network's sandbox too), then itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::containers_of_agent(&first_id) > 0 {
        assert!(Instant::now() < deadline, "the dead agent's containers were not all removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_is_gone_before_its_retry_when_its_agent_comes_back_after_twice_the_lease(pool: PgPool) {
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    let (first_id, killed_at, gone) = kill_one_of_two(&mut stack, &recorder).await;
    // The retry starts on the other agent once the lease expires; the killed one comes back (and
    // would sweep what it left) only after twice the lease.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stack.start_agent(&first_id, agent("5s", "1s")).await;
    check_retried_once(&stack, &recorder, "agent SIGKILLed, back after twice the lease", killed_at).await;
    assert!(gone.is_some(), "the killed agent's job container was still running 4 s after the kill");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_frozen_agent_s_job_is_killed_before_its_lease_can_expire(pool: PgPool) {
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    // A frozen agent keeps its connection to the engine open: only the deadline it last gave its
    // warden stops its job (renewed + fence_after + stop_grace = renewed + 5 s, 3 s before expiry).
    // Room for one job: a second run waits at the frozen agent, unacked, so the broker hands the
    // retry of the first to the other agent while this one is frozen.
    let options = AgentOptions { cpus: Some(0.15), ..agent("8s", "3s") };
    let (first, run) = one_run_in_flight(&mut stack, &recorder, options).await;
    let first_id = stack.agents[first].id.clone();
    history::trigger_beats(&stack, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stack.signal_agent(first, "STOP");
    let frozen_at = Instant::now();
    stack.add_agent(agent("8s", "3s")).await;
    let gone = containers_gone(&first_id, Duration::from_secs(8)).await;
    // The frozen agent wakes only once the retry runs elsewhere: it finds the lease gone, writes
    // nothing of attempt 1, and runs the run that waited for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while recorder.started(&run) < 2 {
        assert!(Instant::now() < deadline, "attempt 2 never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.signal_agent(first, "CONT");
    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(120)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    let scenario = "agent frozen (SIGSTOP)";
    history::report(scenario, &verdict, &events, frozen_at);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary(scenario));
    assert_eq!(verdict.retried, 1, "the frozen agent's run needed a second attempt: {verdict:#?}");
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
    let gone = gone.expect("the frozen agent's job container was still running 8 s after the freeze");
    println!("the frozen agent's job container was gone {:.2}s after the freeze", gone.as_secs_f64());
}
