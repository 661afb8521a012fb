//! What one job must not be able to do to others or to the agent: take another registry's
//! credentials, outlast an abort by ignoring SIGTERM. Master and agent processes, real Postgres,
//! RabbitMQ, s3s-fs and Docker.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use sqlx::PgPool;
use support::recorder::Recorder;
use support::{free_port, leftovers, metric, run_id, AgentOptions, Stack};

/// What a registry that wants a login answers, to every request. Docker speaks plain HTTP to
/// registries on 127.0.0.0/8.
const REGISTRY_REPLY: &str = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
    Docker-Distribution-API-Version: registry/2.0\r\nWWW-Authenticate: Basic realm=\"fake\"\r\n\
    Content-Length: 72\r\nConnection: close\r\n\r\n\
    {\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}";

fn job(image: &str, script: &str) -> serde_json::Value {
    json!({"kind": "freestyle", "image": image, "script": script, "resources": {"cpus": 0.5, "memory": "64Mi"}})
}

/// A job naming another registry gets nothing of the agent's credentials; the registry they are
/// for gets its own.
#[sqlx::test(migrations = "../migrations")]
async fn registry_credentials_reach_their_own_registry_only(pool: PgPool) {
    let curious = Recorder::start("127.0.0.1", REGISTRY_REPLY);
    let own = Recorder::start("127.0.0.1", REGISTRY_REPLY);
    let basic = |credentials: &str| base64::engine::general_purpose::STANDARD.encode(credentials);
    let auths = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        auths.path(),
        json!({"auths": {
            own.address(): {"auth": basic("own-user:own-pass")},
            "registry.example:5000": {"auth": basic("ci:agent-registry-password")},
            "https://index.docker.io/v1/": {"username": "hub", "password": "hub-password"},
        }})
        .to_string(),
    )
    .unwrap();
    let mut stack = Stack::start(pool).await;
    let env = vec![("CIMASTER_REGISTRY_AUTH_FILE", auths.path().display().to_string())];
    stack.add_agent(AgentOptions { env, ..AgentOptions::default() }).await;

    for (name, registry) in [("curious", &curious), ("own", &own)] {
        stack.put_job(name, job(&format!("{}/probe/{name}:1", registry.address()), "true")).await;
        let path = stack.trigger(name).await;
        let run = stack.wait_finished(&path, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "error", "the fake registry has no image: {run}");
        assert!(run["message"].as_str().unwrap().contains("pulling it failed"), "{run}");
        assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
    }

    let curious_saw = curious.requests();
    assert!(!curious_saw.is_empty(), "the engine asked the registry the job named");
    assert!(
        curious_saw.iter().all(|request| !request.contains("| ")),
        "another registry's credentials were sent: {curious_saw:?}"
    );
    let own_saw = own.requests();
    let expected = format!("Basic {}", basic("own-user:own-pass"));
    assert!(own_saw.iter().any(|request| request.ends_with(&expected)), "{own_saw:?}");
}

/// The job's shell is not PID 1: SIGTERM reaches a script that does not trap it, so an abort ends
/// the run without waiting out the stop grace.
#[sqlx::test(migrations = "../migrations")]
async fn an_abort_reaches_a_script_that_does_not_trap_sigterm(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    // A grace long enough that a run waiting it out is unmistakable.
    stack.add_agent(AgentOptions { stop_grace: "30s", lease: "45s", ..AgentOptions::default() }).await;
    stack.put_job("loop", job("busybox:latest", "echo started; while true; do sleep 1; done")).await;
    let path = stack.trigger("loop").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stack.console(&path).await.contains("started") {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stack.api.post(&format!("{path}/abort"), json!({})).await.status, 202);
    // Without an init the shell ignores SIGTERM and the run ends only at SIGKILL, 30 s on.
    let run = stack.wait_finished(&path, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "aborted", "{run}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

/// A job printing more than the console limit cannot fill the database or the bucket: the live
/// copy in Postgres stops at its limit, the stored log at its own, and both say where.
#[sqlx::test(migrations = "../migrations")]
async fn a_flood_of_output_is_cut_at_the_console_limits(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let env = vec![
        ("CIMASTER_AGENT_CONSOLE_LIMIT", "8Mi".to_owned()),
        ("CIMASTER_AGENT_LIVE_CONSOLE_LIMIT", "6Mi".to_owned()),
    ];
    stack.add_agent(AgentOptions { env, ..AgentOptions::default() }).await;
    // 240,000 lines of 50 bytes: 12 MB, then a pause to look at the live copy.
    let line = "x".repeat(49);
    let script = format!("yes {line} | head -n 240000; echo printed; sleep 5; echo after-the-cut");
    stack.put_job("flood", job("busybox:latest", &script)).await;
    let path = stack.trigger("flood").await;
    let id = run_id(&path);

    let live_bytes = || async {
        let (bytes, noted): (Option<i64>, Option<bool>) = sqlx::query_as(
            "SELECT sum(length(data))::bigint, bool_or(position('live copy of this log ends here' in convert_from(data, 'UTF8')) > 0)
             FROM run_console WHERE run_id = $1::uuid",
        )
        .bind(&id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        (bytes.unwrap_or(0), noted.unwrap_or(false))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let live = loop {
        let (bytes, noted) = live_bytes().await;
        if noted {
            break bytes;
        }
        assert!(Instant::now() < deadline, "the live copy never said where it stops ({bytes} bytes)");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(live <= (6 << 20) + 4096, "the live copy holds {live} bytes");

    let run = stack.wait_finished(&path, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&path).await;
    assert!(console.len() <= (8 << 20) + 8192, "the stored log holds {} bytes", console.len());
    assert!(console.contains("the log is cut here at 8 MiB"), "{}", &console[console.len() - 2000..]);
    assert!(console.contains("bytes of output past the cut were not kept"));
    assert!(!console.contains("after-the-cut"), "output past the cut is not kept");
    let kept = console.lines().filter(|l| l.ends_with(&line)).count();
    // A kept line is 50 bytes and its timestamp: about 80 bytes, so some 100,000 of them fit.
    assert!((95_000..110_000).contains(&kept), "{kept} lines kept");
    assert_eq!(leftovers(&id).await, (0, 0));
}

/// An agent with room for more runs than networks admits no more runs than it can give networks,
/// and none fails for the lack of one: here its subnet pool spans two networks, and four runs that
/// all fit its CPUs come in at once.
#[sqlx::test(migrations = "../migrations")]
async fn runs_wait_for_a_network_instead_of_failing_when_none_can_be_made(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let env = vec![
        // Two /27 blocks, and no idle networks kept: a network per run, removed after it.
        (
            "CIMASTER_AGENT_NETWORK_POOL",
            format!(
                "10.242.{}.{}/26",
                uuid::Uuid::new_v4().as_bytes()[0],
                64 * (uuid::Uuid::new_v4().as_bytes()[1] % 4)
            ),
        ),
        ("CIMASTER_AGENT_IDLE_NETWORKS", "0".to_owned()),
        ("CIMASTER_AGENT_LISTEN", format!("127.0.0.1:{}", free_port())),
    ];
    let metrics_url = format!("http://{}/metrics", env[2].1);
    stack.add_agent(AgentOptions { cpus: Some(4.0), max_cpu: Some(1.0), env, ..AgentOptions::default() }).await;
    stack.put_job("netted", job("busybox:latest", "sleep 2; echo done")).await;
    let mut paths = Vec::new();
    for _ in 0..4 {
        paths.push(stack.trigger("netted").await);
    }
    let mut spans = Vec::new();
    for path in &paths {
        let run = stack.wait_finished(path, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        // From its container's start (a claimed run may wait for a network before it) to its end.
        let started: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT container_started_at FROM run_attempts WHERE run_id = $1::uuid")
                .bind(run_id(path))
                .fetch_one(&stack.pool)
                .await
                .unwrap();
        // Its container sleeps 2 s, holding the run's network all along.
        spans.push((started, started + chrono::Duration::milliseconds(1900)));
        assert_eq!(leftovers(&run_id(path)).await, (0, 0));
    }
    // Never more than two at once: the networks there were.
    for (start, _) in &spans {
        let running = spans.iter().filter(|(s, f)| s <= start && start < f).count();
        assert!(running <= 2, "{running} runs at once with two networks: {spans:?}");
    }
    // The agent says so in its metrics, too.
    let metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "cimaster_agent_address_pools_exhausted_total", "") >= 1.0, "{metrics}");
    assert!(metric(&metrics, "cimaster_agent_network_waits_total", "") >= 1.0, "{metrics}");
    assert!(metrics.contains("cimaster_agent_network_limit "), "{metrics}");
}
