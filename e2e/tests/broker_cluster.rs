//! A broker that is a cluster: three RabbitMQ nodes of the test's own (quorum queues replicated on
//! all three), a master and two agents given every node's URL. Runs are triggered all through a
//! fault — the node leading the run queue stopped, or every node restarted in turn — and each job
//! beats to a recorder: no run may be lost, none may execute twice. Runs with the fault tests,
//! alone: three Erlang nodes take most of this machine while they start.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use support::broker_cluster::BrokerCluster;
use support::history::{self, Recorder};
use support::{AgentOptions, Stack};

/// Quarter-second beats of each job.
const BEATS: u32 = 8;
/// Runs triggered at least, one every `EVERY`, and on for as long as the fault lasts.
const RUNS: usize = 30;
const EVERY: Duration = Duration::from_millis(400);

async fn cluster_stack(pool: PgPool, cluster: &BrokerCluster, recorder: &Recorder) -> Stack {
    let mut stack = Stack::start_with(pool, vec![("CIMASTER_AMQP_URL", cluster.urls())]).await;
    for _ in 0..2 {
        let env = vec![("CIMASTER_AMQP_URL", cluster.urls())];
        stack.add_agent(AgentOptions { open_egress: true, env, ..Default::default() }).await;
    }
    history::put_beats_job(&stack, recorder, BEATS).await;
    stack
}

/// Triggers runs every `EVERY` until `fault` has ended and at least `RUNS` were triggered; each
/// run's id and when it was triggered.
async fn trigger_through(stack: &Stack, fault: impl std::future::Future<Output = ()>) -> HashMap<String, Instant> {
    let done = AtomicBool::new(false);
    let triggering = async {
        let mut triggered = HashMap::new();
        while (!done.load(Ordering::SeqCst) || triggered.len() < RUNS) && triggered.len() < 400 {
            let at = Instant::now();
            triggered.insert(support::run_id(&stack.trigger("beats").await), at);
            tokio::time::sleep(EVERY).await;
        }
        triggered
    };
    let faulting = async {
        fault.await;
        done.store(true, Ordering::SeqCst);
    };
    tokio::join!(triggering, faulting).0
}

/// Checks the history: every run ended once and succeeded, none twice at once; prints the figures.
async fn check(stack: &Stack, recorder: &Recorder, triggered: &HashMap<String, Instant>, scenario: &str) {
    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(240)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    let longest_wait = triggered
        .iter()
        .filter_map(|(run, at)| events.iter().filter(|e| &e.run == run).map(|e| e.at).min().map(|first| first - *at))
        .max()
        .unwrap_or_default();
    println!(
        "{}; longest wait from trigger to the job's start {:.1}s",
        verdict.summary(scenario),
        longest_wait.as_secs_f64()
    );
    assert_eq!(runs.len(), triggered.len(), "every triggered run is in Postgres");
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary(scenario));
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn stopping_the_node_that_leads_the_run_queue_loses_no_run_and_runs_none_twice(pool: PgPool) {
    let cluster = BrokerCluster::start().await;
    let recorder = Recorder::start().await.unwrap();
    let stack = cluster_stack(pool, &cluster, &recorder).await;
    let queue = cimaster_common::queue_name(&stack.prefix, &cimaster_common::QueueName::parse("default").unwrap());
    let fault = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let leader = match cluster.leader_of(&queue, 0).await {
            Some(leader) => leader,
            None => cluster.leader_of(&queue, 1).await.expect("the queue's leader"),
        };
        cluster.stop(leader).await;
        println!("stopped node {} (the leader of {queue})", leader + 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
    };
    let triggered = trigger_through(&stack, fault).await;
    check(&stack, &recorder, &triggered, "the run queue's leader stopped").await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_rolling_restart_of_every_node_loses_no_run_and_runs_none_twice(pool: PgPool) {
    let cluster = BrokerCluster::start().await;
    let recorder = Recorder::start().await.unwrap();
    let stack = cluster_stack(pool, &cluster, &recorder).await;
    let fault = async {
        for node in 0..3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster.stop(node).await;
            cluster.start_node(node).await;
            // The next node goes only once this one is back in the cluster.
            cluster.wait_running(3, Duration::from_secs(120)).await;
            println!("node {} restarted", node + 1);
        }
    };
    let triggered = trigger_through(&stack, fault).await;
    check(&stack, &recorder, &triggered, "every node restarted in turn").await;
}
