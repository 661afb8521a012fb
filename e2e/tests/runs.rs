//! Runs end to end: master and agent processes, real Postgres, RabbitMQ, s3s-fs and Docker, with the
//! locally built `busybox:latest` image (scripts/images).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use support::{busybox_job as job, leftovers, run_id, AgentOptions, Stack};

/// A freestyle job keeps files like a git job does, relative to its working directory.
#[sqlx::test(migrations = "../migrations")]
async fn a_freestyle_job_keeps_its_results(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let junit = r#"<testsuite name="s"><testcase classname="c" name="ok"/><testcase classname="c" name="bad"><failure message="boom"/></testcase></testsuite>"#;
    let mut with_results = job(&format!(
        "mkdir -p out && echo '{junit}' > out/junit.xml && echo built > out/app.txt && echo stray > other.txt"
    ));
    with_results["workingDir"] = json!("/build");
    with_results["results"] = json!({"junit": ["out/*.xml"], "artifacts": ["out/*.txt"]});
    stack.put_job("keeps", with_results.clone()).await;
    let path = stack.trigger("keeps").await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let files = stack.listed_results(&path).await;
    assert_eq!(files, [("artifact".into(), "out/app.txt".into()), ("junit".into(), "out/junit.xml".into())]);
    let summary = stack.api.get(run["links"]["junit"].as_str().unwrap()).await;
    assert_eq!(summary.status, 200, "{}", summary.body);
    assert_eq!((summary.body["tests"].as_u64(), summary.body["failures"].as_u64()), (Some(2), Some(1)));

    // Results need a working directory to be relative to.
    with_results.as_object_mut().unwrap().remove("workingDir");
    let refused = stack.api.put("/jobs/keeps", with_results).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(refused.body["detail"].as_str().unwrap().contains("workingDir"), "{}", refused.body);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_succeeds_or_fails_with_its_exit_code_and_leaves_nothing_behind(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    // The script's stdin is at its end (the job container's gate is closed behind it): `cat` ends.
    let mut ok = job("cat; echo stdin ended; echo hello from $CIMASTER_JOB run $CIMASTER_RUN_ID attempt $CIMASTER_ATTEMPT; echo to stderr >&2; echo TARGET=$TARGET");
    ok["parameters"] = json!({"TARGET": "all"});
    stack.put_job("ok", ok).await;
    stack.put_job("bad", job("echo about to fail; exit 3")).await;

    let good = stack.trigger("ok").await;
    let bad = stack.trigger("bad").await;
    let run = stack.wait_finished(&good, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["exitCode"], 0);
    assert!(run["agent"].as_str().unwrap().ends_with("-agent-1"));
    assert!(run["startedAt"].is_string() && run["finishedAt"].is_string());
    let console = stack.console(&good).await;
    let id = run_id(&good);
    assert!(console.contains(&format!("hello from ok run {id} attempt 1")), "{console}");
    assert!(console.contains("to stderr"), "{console}");
    assert!(console.contains("TARGET=all"), "{console}");
    assert!(console.contains("stdin ended"), "{console}");
    // Every line carries a timestamp.
    for line in console.lines() {
        assert!(line.starts_with("20") && line.as_bytes().get(10) == Some(&b'T'), "untimestamped line {line:?}");
    }

    let run = stack.wait_finished(&bad, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 3);
    assert!(stack.console(&bad).await.contains("about to fail"));

    // The stored log comes from S3 once the run has ended, and the live chunks are gone.
    let stored: Option<String> = sqlx::query_scalar("SELECT console_key FROM runs WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(stored.unwrap(), format!("runs/{id}/1/console.log"));
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM run_console").fetch_one(&stack.pool).await.unwrap();
    assert_eq!(live, 0);

    for path in [&good, &bad] {
        assert_eq!(leftovers(&run_id(path)).await, (0, 0), "containers or networks left for {path}");
    }
    // The networks the agent keeps for its next runs (at most 2 by default) have nothing on them
    // but their sandboxes.
    let networks = support::networks_of_agent(&stack.agents[0].id);
    assert!(!networks.is_empty() && networks.len() <= 2, "{networks:?}");
    assert!(networks.iter().all(|(_, attached)| *attached == 1), "{networks:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn consecutive_runs_join_one_sandbox_and_nothing_of_a_run_outlives_it(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    // One kept network: every run borrows the same one.
    let options = AgentOptions { env: vec![("CIMASTER_AGENT_IDLE_NETWORKS", "1".to_owned())], ..Default::default() };
    let agent = stack.add_agent(options).await;
    let mac = "echo mac $(cat /sys/class/net/eth0/address)";
    // The first run leaves a listener behind in the background, and tries to change the namespace
    // and the names and resolver the next run would find.
    let leave = format!(
        "nc -ll -p 7000 -e cat & sleep 0.3; echo ping | nc -w 1 127.0.0.1 7000 && echo port 7000 answers; \
         ip link set lo down 2>/dev/null && echo changed the namespace || echo the namespace stays as it is; \
         (echo '6.6.6.6 cimaster.invalid' >> /etc/hosts) 2>/dev/null || echo /etc/hosts is read-only; \
         (echo 'nameserver 6.6.6.6' > /etc/resolv.conf) 2>/dev/null || echo /etc/resolv.conf is read-only; \
         {mac}; sleep 2"
    );
    stack.put_job("leave", job(&leave)).await;
    let look = format!(
        "echo ping | nc -w 1 127.0.0.1 7000 && echo a listener survived || echo nothing listens on 7000; \
         grep -q 6.6.6.6 /etc/hosts /etc/resolv.conf && echo a name survived || echo no name of the last run; {mac}"
    );
    stack.put_job("look", job(&look)).await;

    let first = stack.trigger("leave").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stack.console(&first).await.contains("mac ") {
        assert!(Instant::now() < deadline, "the first run never printed its namespace");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The job joined the network's sandbox instead of getting an endpoint of its own.
    let container = format!("cimaster-{}-1", run_id(&first));
    let mode = support::docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &container]);
    let networks = support::networks_of_agent(&stack.agents[agent].id);
    assert_eq!(networks.len(), 1, "{networks:?}");
    assert_eq!(networks[0].1, 1, "only the sandbox is on the network while the job runs: {networks:?}");
    let agent_label = format!("label=cimaster.agent={}", stack.agents[agent].id);
    let sandbox =
        support::docker(&["ps", "-q", "--no-trunc", "--filter", &agent_label, "--filter", "label=cimaster.sandbox"]);
    assert!(sandbox.lines().any(|id| mode.trim() == format!("container:{id}")), "{mode} is not a sandbox's");
    let run = stack.wait_finished(&first, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let said = stack.console(&first).await;
    assert!(said.contains("port 7000 answers"), "{said}");
    assert!(said.contains("the namespace stays as it is"), "{said}");
    assert!(said.contains("/etc/hosts is read-only") && said.contains("/etc/resolv.conf is read-only"), "{said}");

    let second = stack.trigger("look").await;
    let run = stack.wait_finished(&second, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let seen = stack.console(&second).await;
    let mac_of =
        |console: &str| console.lines().find_map(|line| line.split_once("mac ").map(|(_, mac)| mac.to_owned()));
    assert_eq!(mac_of(&said), mac_of(&seen), "the second run is in another namespace:\n{said}\n{seen}");
    assert!(seen.contains("nothing listens on 7000") && !seen.contains("a listener survived"), "{seen}");
    assert!(seen.contains("no name of the last run") && !seen.contains("a name survived"), "{seen}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_past_its_timeout_is_stopped(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let mut slow = job("echo started; sleep 60");
    slow["timeoutSeconds"] = json!(2);
    stack.put_job("slow", slow).await;
    let path = stack.trigger("slow").await;
    let started = Instant::now();
    let run = stack.wait_finished(&path, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(run["message"], "timed out after 2s");
    assert!(started.elapsed() < Duration::from_secs(20));
    let console = stack.console(&path).await;
    assert!(console.contains("started") && console.contains("timed out after 2s: sending SIGTERM"), "{console}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn aborting_a_running_job_stops_it(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("long", job("echo started; sleep 120")).await;
    let path = stack.trigger("long").await;
    stack.wait_for(&path, Duration::from_secs(60), |s| s == "running").await;
    // Wait for the job's own output, so the container is surely up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stack.console(&path).await.contains("started") {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = stack.api.post(&format!("{path}/abort"), json!({})).await;
    assert_eq!(reply.status, 202);
    let asked = Instant::now();
    // The agent hears the abort at once (NOTIFY); the container gets SIGTERM and, 1 s later, SIGKILL.
    let run = stack.wait_finished(&path, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "aborted", "{run}");
    assert!(asked.elapsed() < Duration::from_secs(5), "abort took {:?}", asked.elapsed());
    assert!(stack.console(&path).await.contains("abort requested: sending SIGTERM"));
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_console_can_be_followed_live(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("ticker", job("for i in 1 2 3 4 5; do echo tick $i; sleep 1; done")).await;
    let path = stack.trigger("ticker").await;
    let response =
        stack.api.request(reqwest::Method::GET, &format!("{path}/results/console?follow=true")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut seen_at = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        for i in seen_at.len() + 1..=5 {
            if text.contains(&format!("tick {i}\n")) {
                seen_at.push(Instant::now());
            }
        }
    }
    assert_eq!(seen_at.len(), 5, "{text}");
    // The lines arrived as they were printed, about a second apart, not all at the end.
    let spread = seen_at[4].duration_since(seen_at[0]);
    assert!(spread >= Duration::from_millis(2500), "lines arrived within {spread:?} of each other");
    // The stream ended with the run, including the agent's closing line.
    assert!(text.contains("[cimaster] run succeeded"), "{text}");
    let run = stack.api.get(&path).await.body;
    assert_eq!(run["status"], "succeeded");
    // Following an ended run returns the whole stored log.
    let replay = stack.console(&path).await;
    assert_eq!(replay, text);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_20_mb_log_is_stored_and_served_whole(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    // 400,000 lines of 50 bytes: 20 MB of output.
    let line = "x".repeat(49);
    stack.put_job("chatty", job(&format!("yes {line} | head -n 400000; echo end-of-log"))).await;
    let path = stack.trigger("chatty").await;
    let run = stack.wait_finished(&path, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&path).await;
    assert!(console.len() >= 20_000_000, "only {} bytes", console.len());
    assert_eq!(console.lines().filter(|l| l.ends_with(&line)).count(), 400_000);
    assert!(console.contains("end-of-log"));
    let bytes: Option<i64> = sqlx::query_scalar("SELECT console_bytes FROM runs WHERE id = $1::uuid")
        .bind(run_id(&path))
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(bytes.unwrap() as usize, console.len());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_missing_image_is_an_error_that_says_so(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let mut missing = job("true");
    missing["image"] = json!("cimaster-test/does-not-exist:1");
    stack.put_job("missing", missing).await;
    let path = stack.trigger("missing").await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "error", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.contains("image `cimaster-test/does-not-exist:1` is not present and pulling it failed"),
        "{message}"
    );
    assert!(stack.console(&path).await.contains("pulling it failed"));
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_that_do_not_fit_together_run_one_after_the_other(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions { cpus: Some(1.0), ..Default::default() }).await;
    let mut heavy = job("sleep 2");
    heavy["resources"] = json!({"cpus": 1, "memory": "64Mi"});
    stack.put_job("heavy", heavy).await;
    let first = stack.trigger("heavy").await;
    let second = stack.trigger("heavy").await;

    // While the first runs, the second waits as queued.
    stack.wait_for(&first, Duration::from_secs(60), |s| s == "running").await;
    assert_eq!(stack.api.get(&second).await.body["status"], "queued");
    let a = stack.wait_finished(&first, Duration::from_secs(60)).await;
    let b = stack.wait_finished(&second, Duration::from_secs(60)).await;
    assert_eq!(a["status"], "succeeded");
    assert_eq!(b["status"], "succeeded");
    let finished_first: chrono_like::Instant = a["finishedAt"].as_str().unwrap().into();
    let started_second: chrono_like::Instant = b["startedAt"].as_str().unwrap().into();
    assert!(
        started_second >= finished_first,
        "the second started at {started_second:?}, before the first ended at {finished_first:?}"
    );
}

/// RFC 3339 timestamps from the API compare correctly as strings once normalised to one length.
mod chrono_like {
    #[derive(Debug, PartialEq, PartialOrd)]
    pub struct Instant(String);

    impl From<&str> for Instant {
        fn from(value: &str) -> Self {
            // 2026-11-22T08:53:58.120813Z: pad the fraction to 9 digits.
            let (seconds, rest) = value.split_once('.').unwrap_or((value.trim_end_matches('Z'), "Z"));
            let fraction = rest.trim_end_matches('Z');
            Instant(format!("{seconds}.{fraction:0<9}Z"))
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_with_a_cluster_gets_one_and_gives_it_back(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let added = stack.api.get("/addcluster?cluster=e2e-cluster-1&region=us-west&name=admin").await;
    assert_eq!(added.status, 201, "{}", added.body);
    let mut with_cluster = job("echo testing on $CIMASTER_CLUSTER in $CIMASTER_CLUSTER_REGION; sleep 2");
    with_cluster["cluster"] = json!({"purpose": "tess-ci"});
    stack.put_job("on-cluster", with_cluster).await;

    let first = stack.trigger("on-cluster").await;
    stack.wait_for(&first, Duration::from_secs(60), |s| s == "running").await;
    // The only cluster is taken: the second run waits for it, and says so.
    let second = stack.trigger("on-cluster").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = stack.api.get(&second).await.body;
        if run["message"].as_str().is_some_and(|m| m.contains("waiting for a test cluster")) {
            assert_eq!(run["status"], "running");
            assert_eq!(run["message"], "waiting for a test cluster with purpose `tess-ci`");
            break;
        }
        assert!(Instant::now() < deadline, "the waiting run never said so: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cluster = stack.api.get("/pool/clusters/e2e-cluster-1").await.body;
    assert_eq!(cluster["status"], "leased");
    assert_eq!(cluster["lease"]["run"], run_id(&first).as_str());

    let run = stack.wait_finished(&first, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&first).await;
    assert!(console.contains("testing on e2e-cluster-1 in us-west"), "{console}");
    assert!(console.contains("released cluster e2e-cluster-1"), "{console}");
    let run = stack.wait_finished(&second, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["message"].is_null(), "the waiting note is cleared once the cluster is leased: {run}");
    let second_console = stack.console(&second).await;
    assert!(second_console.contains("waiting for a test cluster with purpose `tess-ci`"), "{second_console}");

    // Aborted mid-run: the cluster is vacant again.
    let mut long = job("echo on $CIMASTER_CLUSTER; sleep 120");
    long["cluster"] = json!({"purpose": "tess-ci"});
    stack.put_job("long-on-cluster", long).await;
    let third = stack.trigger("long-on-cluster").await;
    stack.wait_for(&third, Duration::from_secs(60), |s| s == "running").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.api.get("/pool/clusters/e2e-cluster-1").await.body["status"] != "leased" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stack.api.post(&format!("{third}/abort"), json!({})).await.status, 202);
    let run = stack.wait_finished(&third, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "aborted");
    let cluster = stack.api.get("/pool/clusters/e2e-cluster-1").await.body;
    assert_eq!(cluster["status"], "vacant", "{cluster}");
    let kinds: Vec<String> = stack.api.get("/pool/events?cluster=e2e-cluster-1").await.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["added", "leased", "released", "leased", "released", "leased", "released"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn secrets_reach_the_job_and_never_its_log(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let value = "hunter2-very-secret-value";
    let mut with_secret = job(concat!(
        "echo whole=$DB_PASSWORD; ",
        "printf 'split=%s' \"$(echo $DB_PASSWORD | cut -c1-8)\"; sleep 0.5; ",
        "printf '%s\\n' \"$(echo $DB_PASSWORD | cut -c9-)\"; ",
        "printf 'b64=%s\\n' \"$(printf %s \"$DB_PASSWORD\" | base64)\"; ",
        // A line longer than the console's 64 KiB cut, with the secret where the cut falls.
        "head -c 65530 /dev/zero | tr '\\0' x; printf %s \"$DB_PASSWORD\"; head -c 100 /dev/zero | tr '\\0' y; echo; ",
        "test ${#DB_PASSWORD} -eq 25 && echo length-ok; ",
        // A test report quoting the secret in a failure.
        "printf '<testsuite name=\"s\"><testcase classname=\"c\" name=\"t\"><failure message=\"bad password %s\"/></testcase></testsuite>' \"$DB_PASSWORD\" > junit.xml"
    ));
    with_secret["secrets"] = json!(["DB_PASSWORD"]);
    with_secret["workingDir"] = json!("/work");
    with_secret["results"] = json!({"junit": ["junit.xml"]});
    stack.put_job("uses-secret", with_secret).await;
    let set = stack.api.put("/jobs/uses-secret/secrets/DB_PASSWORD", json!({"value": value})).await;
    assert_eq!(set.status, 201, "{}", set.body);

    let path = stack.trigger("uses-secret").await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&path).await;
    assert!(console.contains("length-ok"), "the job saw the secret: {console}");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value);
    for piece in value.as_bytes().windows(6).chain(b64.trim_end_matches('=').as_bytes().windows(8)) {
        let piece = std::str::from_utf8(piece).unwrap();
        assert!(!console.contains(piece), "`{piece}` of the secret is in the console");
    }
    assert!(console.contains("***yyy"), "the secret across the long line's cut is masked whole");
    assert!(console.contains("whole=***"), "{console}");
    assert!(console.contains("split=***"), "{console}");
    assert!(console.contains("b64=***"), "{console}");
    let junit = stack.api.get(run["links"]["junit"].as_str().unwrap()).await;
    assert_eq!(junit.status, 200, "{}", junit.body);
    assert_eq!(junit.body["failed"][0]["message"], "bad password ***", "{}", junit.body);
    assert!(!junit.body.to_string().contains("hunter2"), "{}", junit.body);

    // A secret the job names but nobody set: the run fails before it starts, saying which.
    let mut missing = job("echo never");
    missing["secrets"] = json!(["API_TOKEN"]);
    stack.put_job("missing-secret", missing).await;
    let path = stack.trigger("missing-secret").await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "error", "{run}");
    assert!(
        run["message"].as_str().unwrap().contains("secret `API_TOKEN` is not set for job `missing-secret`"),
        "{run}"
    );
    assert!(!stack.console(&path).await.contains("never"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_run_lists_its_results(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let queued_only = {
        stack.put_job("listed", job("echo listed")).await;
        stack.trigger("listed").await
    };
    // Queued, no agent yet: nothing to list.
    let listing = stack.api.get(&format!("{queued_only}/results")).await;
    assert_eq!(listing.status, 200);
    assert_eq!(listing.body["results"], json!([]));
    stack.add_agent(AgentOptions::default()).await;
    let run = stack.wait_finished(&queued_only, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded");
    let listing = stack.api.get(&format!("{queued_only}/results")).await;
    let results = listing.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{}", listing.body);
    assert_eq!(results[0]["kind"], "console");
    assert_eq!(results[0]["state"], "stored");
    let console = stack.console(&queued_only).await;
    assert_eq!(results[0]["size"].as_u64().unwrap() as usize, console.len());
    let junit = stack.api.get(&format!("{queued_only}/results/junit")).await;
    assert_eq!(junit.status, 404);
    assert!(junit.body["detail"].as_str().unwrap().contains("no JUnit results"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_cluster_lease_is_taken_away_is_stopped_and_ends_in_error(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let added = stack.api.get("/addcluster?cluster=e2e-cluster-1&region=us-west&name=admin").await;
    assert_eq!(added.status, 201, "{}", added.body);
    let mut with_cluster = job("echo using $CIMASTER_CLUSTER; sleep 60");
    with_cluster["cluster"] = json!({"purpose": "tess-ci"});
    stack.put_job("on-cluster", with_cluster).await;
    let path = stack.trigger("on-cluster").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stack.console(&path).await.contains("using e2e-cluster-1") {
        assert!(Instant::now() < deadline, "the job never started on its cluster");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The cluster's lease ends under the job (an admin ends it; an expiry would do the same): the
    // job must not go on using a cluster the pool may hand to someone else.
    let ended = stack.api.get("/finishtest?cluster=e2e-cluster-1&name=admin").await;
    assert_eq!(ended.status, 200, "{}", ended.body);
    let run = stack.wait_finished(&path, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "error", "{run}");
    assert_eq!(run["attempt"], 1, "the run itself was never lost: {run}");
    assert!(run["message"].as_str().unwrap().contains("cluster lease"), "{run}");
    let console = stack.console(&path).await;
    assert!(console.contains("lost the cluster lease: sending SIGTERM"), "{console}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}
