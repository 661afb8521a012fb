//! Dispatch is at least once, execution exactly once. A run's message may reach the queue more than
//! once — the broker redelivers, a publisher's confirm is lost and the dispatcher publishes again, a
//! master dies between publishing and recording the confirm — and may never reach it, when a master
//! dies between committing the run and publishing it. The claim in Postgres decides: an attempt is
//! claimed once, a message for an attempt already claimed (or ended) is acked and dropped, and the
//! dispatcher publishes every committed run nobody confirmed. The jobs beat to a recorder; the
//! history checker fails on a second execution.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use cimaster_common::{JobName, QueueName, RunId, RunMessage};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sqlx::PgPool;
use support::history::{self, Recorder};
use support::{AgentOptions, Stack};

const BEATS: u32 = 16;

fn agent() -> AgentOptions {
    AgentOptions { open_egress: true, ..Default::default() }
}

fn default_queue() -> QueueName {
    QueueName::parse("default").unwrap()
}

async fn channel() -> lapin::Channel {
    let url = secrecy::SecretString::from(std::env::var("CIMASTER_AMQP_URL").unwrap());
    let connection = cimaster_amqp::connect(&url, "e2e-exactly-once").await.unwrap();
    connection.create_channel().await.unwrap()
}

/// Publishes `copies` of attempt `attempt`'s message for `run`, byte for byte what a master
/// publishes, and waits for the broker's confirms.
async fn publish_copies(stack: &Stack, run: &str, attempt: u32, copies: usize) {
    let channel = channel().await;
    channel.confirm_select(Default::default()).await.unwrap();
    let queue = cimaster_amqp::Topology::declare_run_queue(&channel, &stack.prefix, &default_queue()).await.unwrap();
    let message = RunMessage {
        run_id: RunId(run.parse().unwrap()),
        job: JobName::parse("beats").unwrap(),
        attempt,
        queue: default_queue(),
    };
    for _ in 0..copies {
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(run.into());
        let confirm = channel
            .basic_publish("", &queue, BasicPublishOptions::default(), &message.to_json(), properties)
            .await
            .unwrap();
        confirm.await.unwrap();
    }
}

/// Waits until the run queue holds no message: the agents took every copy (and dropped the extra).
async fn queue_drained(stack: &Stack) {
    let channel = channel().await;
    let queue = cimaster_common::queue_name(&stack.prefix, &default_queue());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel.queue_declare(&queue, passive, FieldTable::default()).await.unwrap();
        if declared.message_count() == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{} messages were never taken", declared.message_count());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every run ended once, in one attempt, with one execution.
async fn check_once(stack: &Stack, recorder: &Recorder, scenario: &str) {
    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(90)).await;
    queue_drained(stack).await;
    let verdict = history::check(&recorder.events(), &runs);
    println!("{}", verdict.summary(scenario));
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary(scenario));
    assert_eq!(verdict.retried, 0, "{verdict:#?}");
    assert!(runs.iter().all(|(_, status, attempt)| status == "succeeded" && *attempt == 1), "{runs:?}");
    for (run, _, _) in &runs {
        assert_eq!(recorder.started(run), 1, "run {run} executed more than once");
        let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM run_attempts WHERE run_id = $1::uuid")
            .bind(run)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
        assert_eq!(attempts, 1, "run {run} has more than one attempt");
    }
}

async fn published(stack: &Stack, run: &str) -> bool {
    sqlx::query_scalar("SELECT published_at IS NOT NULL FROM runs WHERE id = $1::uuid")
        .bind(run)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn duplicated_deliveries_never_start_a_second_execution(pool: PgPool) {
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    stack.add_agent(agent()).await;
    stack.add_agent(agent()).await;
    history::put_beats_job(&stack, &recorder, BEATS).await;
    let run = history::trigger_beats(&stack, 1).await.remove(0);
    // Copies beside the master's own message, while the run waits, runs and after it ended.
    publish_copies(&stack, &run, 1, 3).await;
    history::wait_started(&recorder, std::slice::from_ref(&run), Duration::from_secs(60)).await;
    publish_copies(&stack, &run, 1, 3).await;
    history::wait_all_ended(&stack.pool, Duration::from_secs(90)).await;
    publish_copies(&stack, &run, 1, 3).await;
    check_once(&stack, &recorder, "9 duplicate deliveries").await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_run_committed_by_a_master_that_died_before_publishing_it_runs_once(pool: PgPool) {
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start_without_broker(pool).await;
    stack.add_agent(agent()).await;
    history::put_beats_job(&stack, &recorder, BEATS).await;
    let runs = history::trigger_beats(&stack, 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!published(&stack, &runs[0]).await, "nothing could be published");

    stack.replace_master().await;
    check_once(&stack, &recorder, "master killed between commit and publish").await;
    assert!(published(&stack, &runs[0]).await);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_run_published_by_a_master_that_died_before_recording_the_confirm_runs_once(pool: PgPool) {
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start_without_broker(pool).await;
    history::put_beats_job(&stack, &recorder, BEATS).await;
    let runs = history::trigger_beats(&stack, 3).await;
    // What the dying master got out: each run's message, its confirm never recorded.
    for run in &runs {
        publish_copies(&stack, run, 1, 1).await;
    }
    stack.replace_master().await;
    // The new master publishes them again; only then does an agent come to take both copies.
    let deadline = Instant::now() + Duration::from_secs(30);
    for run in &runs {
        while !published(&stack, run).await {
            assert!(Instant::now() < deadline, "the dispatcher never published run {run} again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stack.add_agent(agent()).await;
    check_once(&stack, &recorder, "master killed between publish and recording the confirm").await;
}
