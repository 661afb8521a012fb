//! The master's view of its agents against real Postgres and RabbitMQ: the registry, queue depths, a
//! queue nobody serves, and runs whose agent is lost.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use cimaster_master::auth::Role;
use sqlx::PgPool;
use support::{drain_queue, eventually, freestyle, TestApp};

/// A run waiting on a queue that no agent consumes says so, and stops saying so once one does.
#[sqlx::test(migrations = "../migrations")]
async fn a_run_on_a_queue_no_agent_serves_says_so(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/big", freestyle("large")).await.status, 201);
    let run = api.post_empty("/jobs/big/runs").await;
    let path = run.body["links"]["self"].as_str().unwrap().to_owned();
    let note = "no agent serves queue `large` now; the run waits until one does";
    let waiting = eventually(Duration::from_secs(10), || async {
        let read = api.get(&path).await;
        read.body["message"].as_str().is_some_and(|message| message.starts_with(note)).then_some(read)
    })
    .await;
    assert_eq!(waiting.body["status"], "queued");

    // An agent (here: a consumer) comes for the queue: the note goes.
    let (_connection, channel) = support::amqp_channel().await;
    let _consumer = channel
        .basic_consume(
            &format!("{}.runs.large", app.prefix),
            "test-agent",
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async { api.get(&path).await.body["message"].is_null().then_some(()) })
        .await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn agents_and_queue_depths_are_listed(pool: PgPool) {
    use cimaster_store::agents::{report, Report};
    let app = TestApp::spawn(pool.clone()).await;
    let api = app.admin();
    let queues = ["default".to_owned(), "large".to_owned()];
    let base = Report {
        id: "agent-a",
        version: "test",
        queues: &queues,
        cpus: 4.0,
        memory: 8 << 30,
        cpus_used: 1.0,
        memory_used: 1 << 30,
        runs: 1,
        host_cpu: 0.25,
        draining: false,
        userns_remap: false,
        egress_rules: true,
    };
    report(&pool, &base, true).await.unwrap();
    report(&pool, &Report { id: "agent-b", queues: &queues[..1], draining: true, ..base.clone() }, true).await.unwrap();
    report(&pool, &Report { id: "agent-c", queues: &queues[..1], ..base.clone() }, true).await.unwrap();
    sqlx::query("UPDATE agents SET last_seen = now() - interval '5 minutes' WHERE id = 'agent-c'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO agents (id, version, queues, cpus, memory, last_seen) VALUES ('ancient', 't', '{default}', 1, 1, now() - interval '2 hours')")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    for _ in 0..3 {
        assert_eq!(api.post_empty("/jobs/unit-test/runs").await.status, 201);
    }

    // The ancient one is forgotten by the replica's next observer pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (agents, states) = loop {
        let agents = api.get("/agents").await;
        assert_eq!(agents.status, 200, "{}", agents.body);
        let states: Vec<(String, String)> = agents.body["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|agent| (agent["id"].as_str().unwrap().to_owned(), agent["state"].as_str().unwrap().to_owned()))
            .collect();
        if states.len() == 3 || std::time::Instant::now() > deadline {
            break (agents, states);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let states: Vec<(&str, &str)> = states.iter().map(|(id, state)| (id.as_str(), state.as_str())).collect();
    assert_eq!(states, [("agent-a", "active"), ("agent-b", "draining"), ("agent-c", "lost")]);
    assert_eq!(agents.body["agents"][0]["cpusUsed"], 1.0);
    assert_eq!(agents.body["agents"][0]["egressRules"], true);
    assert_eq!(agents.body["agents"][0]["usernsRemap"], false);

    let queues = api.get("/queues").await;
    let default = queues.body["queues"].as_array().unwrap().iter().find(|q| q["queue"] == "default").unwrap().clone();
    // Only the active agent serves: the draining one takes nothing, the lost one may be gone.
    assert_eq!(
        (default["waiting"].as_i64(), default["running"].as_i64(), default["agents"].as_i64()),
        (Some(3), Some(0), Some(1))
    );
    assert_eq!(default["freeCpus"], 3.0);
    assert_eq!(default["demand"], 3, "waiting + running");
    assert!(default["oldestWaitingSeconds"].as_f64().unwrap() >= 0.0);
    let large = queues.body["queues"].as_array().unwrap().iter().find(|q| q["queue"] == "large").unwrap().clone();
    assert_eq!((large["waiting"].as_i64(), large["agents"].as_i64()), (Some(0), Some(1)));
    // A queue named in CIMASTER_QUEUES is listed while idle and unserved: scale-to-zero reads it.
    let idle = queues.body["queues"].as_array().unwrap().iter().find(|q| q["queue"] == "idle").unwrap().clone();
    assert_eq!((idle["demand"].as_i64(), idle["agents"].as_i64()), (Some(0), Some(0)), "{idle}");

    let metrics = api.get("/metrics").await.body.as_str().unwrap_or_default().to_owned();
    assert!(metrics.contains(r#"cimaster_queue_runs{queue="default",state="waiting"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"cimaster_agents{state="lost"} 1"#), "{metrics}");
    assert!(metrics.contains("cimaster_queue_oldest_waiting_seconds{queue=\"default\"}"), "{metrics}");
    app.as_role(Role::Read).get("/queues").await.body["queues"].as_array().unwrap();
    app.anonymous().get("/agents").await.expect_problem(401, "");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_whose_agent_is_lost_are_retried_then_given_up(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    let run = api.post_empty("/jobs/unit-test/runs").await;
    let path = run.body["links"]["self"].as_str().unwrap().to_owned();
    let id = run.body["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(5), || async {
        (drain_queue(&app.prefix, "default").await.len() == 1).then_some(())
    })
    .await;

    // An agent claimed attempt 1 and then stopped renewing its lease.
    let lose = |attempt: i32| {
        let (pool, id) = (pool.clone(), id.clone());
        async move {
            // The attempt row first, as a claim writes both at once: the reaper may run in between.
            sqlx::query("INSERT INTO run_attempts (run_id, attempt, agent) VALUES ($1::uuid, $2, 'agent-x')")
                .bind(&id)
                .bind(attempt)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(
                "UPDATE runs SET status = 'running', agent = 'agent-x', started_at = now(),
                        lease_expires_at = now() - interval '1 second' WHERE id = $1::uuid AND attempt = $2",
            )
            .bind(&id)
            .bind(attempt)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    lose(1).await;
    let retried = eventually(Duration::from_secs(5), || async {
        let run = api.get(&path).await;
        (run.body["attempt"] == 2).then_some(run)
    })
    .await;
    assert_eq!(retried.body["status"], "queued");
    assert!(retried.body["message"].as_str().unwrap().contains("attempt 1 lost"), "{}", retried.body);
    // The new attempt is published at once, with its attempt number.
    let queued = eventually(Duration::from_secs(5), || async {
        let (_connection, channel) = support::amqp_channel().await;
        let got = channel
            .basic_get(&format!("{}.runs.default", app.prefix), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        got.map(|message| serde_json::from_slice::<serde_json::Value>(&message.delivery.data).unwrap())
    })
    .await;
    assert_eq!(queued["runId"], id.as_str());
    assert_eq!(queued["attempt"], 2);
    let outcome: String =
        sqlx::query_scalar("SELECT outcome FROM run_attempts WHERE run_id = $1::uuid AND attempt = 1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(outcome, "lost");

    // The last allowed attempt lost as well: the run ends in `error`.
    sqlx::query("UPDATE runs SET attempt = 3 WHERE id = $1::uuid").bind(&id).execute(&pool).await.unwrap();
    lose(3).await;
    let failed = eventually(Duration::from_secs(5), || async {
        let run = api.get(&path).await;
        (run.body["status"] == "error").then_some(run)
    })
    .await;
    assert_eq!(failed.body["attempt"], 3);
    assert!(failed.body["message"].as_str().unwrap().contains("gave up after 3 attempts"), "{}", failed.body);
    assert!(failed.body["finishedAt"].is_string());
    app.stop().await;
}
