//! Agents end to end: an agent killed mid-run, one drained by SIGTERM, what an agent serves about
//! itself, and the master's counts of dispatch and run times across replicas.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;
use support::{busybox_job as job, free_port, leftovers, metric, run_id, AgentOptions, Stack};

#[sqlx::test(migrations = "../migrations")]
async fn a_killed_agent_s_container_goes_with_it_and_its_run_is_retried_elsewhere(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let first = stack.add_agent(AgentOptions::default()).await;
    stack.put_job("survivor", job("echo attempt $CIMASTER_ATTEMPT; sleep 4; echo done")).await;
    let path = stack.trigger("survivor").await;
    let run = stack.wait_for(&path, Duration::from_secs(60), |s| s == "running").await;
    let first_id = stack.agents[first].id.clone();
    assert_eq!(run["agent"], first_id.as_str());
    // The job itself has started (its first line is in the console) before the agent dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stack.console(&path).await.contains("attempt 1") {
        assert!(Instant::now() < deadline, "attempt 1 never printed its first line");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.kill_agent(first);
    // The agent's warden kills the orphan at once: the engine ended its stdin with the agent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::run_containers_of_agent(&first_id) > 0 {
        assert!(Instant::now() < deadline, "the killed agent's job container outlived it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stack.add_agent(AgentOptions::default()).await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2);
    assert_ne!(run["agent"], first_id.as_str());
    assert!(stack.console(&path).await.contains("attempt 2"));
    // Both attempts' consoles are listed; `?attempt=1` lists the first one's alone.
    let attempts_listed = |body: &serde_json::Value| -> Vec<i64> {
        body["results"].as_array().unwrap().iter().map(|r| r["attempt"].as_i64().unwrap()).collect()
    };
    let all = stack.api.get(&format!("{path}/results")).await;
    assert_eq!(attempts_listed(&all.body), [2, 1], "{}", all.body);
    let first_only = stack.api.get(&format!("{path}/results?attempt=1")).await;
    assert_eq!(attempts_listed(&first_only.body), [1], "{}", first_only.body);
    let attempts: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT attempt, agent, outcome FROM run_attempts WHERE run_id = $1::uuid ORDER BY attempt")
            .bind(run_id(&path))
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0], (1, first_id.clone(), Some("lost".to_owned())));
    assert_eq!(attempts[1].2.as_deref(), Some("succeeded"));

    // What the warden leaves (the run's network) goes when the first agent comes back under the
    // same id and sweeps.
    assert!(!support::networks_of_agent(&first_id).is_empty(), "the killed agent's network is left");
    stack.start_agent(&first_id, AgentOptions::default()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while support::run_containers_of_agent(&first_id) > 0 || !support::networks_of_agent(&first_id).is_empty() {
        assert!(Instant::now() < deadline, "the restarted agent did not sweep its leftovers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn sigterm_drains_the_agent_and_a_second_one_aborts(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let agent = stack.add_agent(AgentOptions::default()).await;
    stack.put_job("short", job("echo started; sleep 3; echo finished")).await;
    let first = stack.trigger("short").await;
    stack.wait_for(&first, Duration::from_secs(60), |s| s == "running").await;

    stack.signal_agent(agent, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: the running job goes on, new work is not taken.
    let second = stack.trigger("short").await;
    let run = stack.wait_finished(&first, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(stack.console(&first).await.contains("finished"));
    assert!(stack.agent_exit(agent, Duration::from_secs(30)).await, "the agent exits cleanly after draining");
    let networks = support::networks_of_agent(&stack.agents[agent].id);
    assert!(networks.is_empty(), "a stopped agent keeps no networks: {networks:?}");
    assert_eq!(stack.api.get(&second).await.body["status"], "queued");

    // A new agent takes the waiting run; two SIGTERMs abort it and mark it.
    stack.put_job("forever", job("echo started; sleep 120")).await;
    let next = stack.add_agent(AgentOptions::default()).await;
    let run = stack.wait_finished(&second, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded");
    let third = stack.trigger("forever").await;
    stack.wait_for(&third, Duration::from_secs(60), |s| s == "running").await;
    stack.signal_agent(next, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.signal_agent(next, "TERM");
    let run = stack.wait_finished(&third, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "aborted", "{run}");
    assert!(run["message"].as_str().unwrap().contains("shut down"), "{run}");
    assert!(stack.agent_exit(next, Duration::from_secs(30)).await);
    assert_eq!(leftovers(&run_id(&third)).await, (0, 0));
}

/// The agent serves `/healthz` (which says when it drains) and `/metrics`: runs in progress, Docker
/// operation durations, console bytes and S3 uploads.
#[sqlx::test(migrations = "../migrations")]
async fn the_agent_serves_its_health_and_metrics(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let env = vec![("CIMASTER_AGENT_LISTEN", listen.clone())];
    let agent = stack.add_agent(AgentOptions { env, ..AgentOptions::default() }).await;
    let get = |path: &str| {
        let url = format!("http://{listen}{path}");
        async move {
            // The agent listens once it has started.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match reqwest::get(&url).await {
                    Ok(answer) => return answer.text().await.unwrap(),
                    Err(err) if Instant::now() < deadline && err.is_connect() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(err) => panic!("{url}: {err}"),
                }
            }
        }
    };
    let health: serde_json::Value = serde_json::from_str(&get("/healthz").await).unwrap();
    assert_eq!(health["status"], "ok");
    // The registry knows it.
    let (id, registry) = (stack.agents[agent].id.clone(), stack.api.clone());
    let registered = |state: &'static str| {
        let (api, id) = (registry.clone(), id.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let agents = api.get("/agents").await.body;
                let found = agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == id.as_str()).cloned();
                if found.as_ref().map(|a| a["state"].as_str().unwrap_or_default()) == Some(state)
                    || (state == "gone" && found.is_none())
                {
                    return found;
                }
                assert!(Instant::now() < deadline, "agent {id} never became {state}: {agents}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let active = registered("active").await.unwrap();
    assert_eq!(active["queues"], json!(["default"]));

    stack.put_job("talks", job("echo some output; echo more output")).await;
    let done = stack.trigger("talks").await;
    assert_eq!(stack.wait_finished(&done, Duration::from_secs(60)).await["status"], "succeeded");
    stack.put_job("stays", job("echo staying; sleep 60")).await;
    let staying = stack.trigger("stays").await;
    stack.wait_for(&staying, Duration::from_secs(60), |status| status == "running").await;

    // Once the second run's container has started (running is set at the claim, before it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = get("/metrics").await;
        if metric(&metrics, "cimaster_agent_docker_seconds_count", "operation=\"start_container\"") >= 2.0 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(metric(&metrics, "cimaster_agent_runs_in_progress", ""), 1.0, "{metrics}");
    assert!(metric(&metrics, "cimaster_agent_console_bytes_total", "") > 20.0, "{metrics}");
    assert!(metric(&metrics, "cimaster_agent_s3_upload_seconds_count", "") >= 1.0, "{metrics}");
    assert!(metric(&metrics, "cimaster_agent_admission_wait_seconds_count", "") >= 2.0, "{metrics}");

    // SIGTERM: the agent drains (its run goes on) and says so.
    stack.signal_agent(agent, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health: serde_json::Value = serde_json::from_str(&get("/healthz").await).unwrap();
        if health["status"] == "draining" {
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let draining = registered("draining").await.unwrap();
    assert_eq!(draining["runs"], 1, "{draining}");
    let queues = stack.api.get("/queues").await.body;
    assert_eq!(queues["queues"][0]["running"], 1, "{queues}");
    assert_eq!(queues["queues"][0]["agents"], 0, "a draining agent takes nothing: {queues}");
    stack.api.post(&format!("{staying}/abort"), json!({})).await;
    assert!(stack.agent_exit(agent, Duration::from_secs(30)).await, "the drained agent did not exit");
    registered("gone").await;
}

/// `cimaster_dispatch_seconds` and `cimaster_run_seconds` count each run once, whichever replica
/// counts it: summed over two replicas, the counts are the runs' own.
#[sqlx::test(migrations = "../migrations")]
async fn dispatch_and_run_times_are_counted_once_across_replicas(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let second = stack.add_master().await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("passes", job("true")).await;
    stack.put_job("fails", job("exit 3")).await;
    let mut runs = Vec::new();
    for name in ["passes", "passes", "fails"] {
        runs.push(stack.trigger(name).await);
    }
    for path in &runs {
        stack.wait_finished(path, Duration::from_secs(60)).await;
    }

    let summed = |name: &'static str, labels: &'static str| {
        let apis = [stack.api.clone(), second.api.clone()];
        async move {
            let mut total = 0.0;
            for api in apis {
                let text = api.get("/metrics").await.body.as_str().unwrap_or_default().to_owned();
                total += metric(&text, name, labels);
            }
            total
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = (
            summed("cimaster_dispatch_seconds_count", "queue=\"default\"").await,
            summed("cimaster_run_seconds_count", "queue=\"default\",status=\"succeeded\"").await,
            summed("cimaster_run_seconds_count", "queue=\"default\",status=\"failed\"").await,
        );
        if counts == (3.0, 2.0, 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "counts (dispatch, succeeded, failed) summed over replicas: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Counted once: a later pass adds nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(summed("cimaster_dispatch_seconds_count", "queue=\"default\"").await, 3.0);
    // The run histogram has buckets for runs of hours.
    let text = stack.api.get("/metrics").await.body.as_str().unwrap_or_default().to_owned()
        + second.api.get("/metrics").await.body.as_str().unwrap_or_default();
    assert!(text.contains("cimaster_run_seconds_bucket{queue=\"default\",status=\"succeeded\",le=\"7200\"}"), "{text}");
}
