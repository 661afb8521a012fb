//! Hosts cut off, not killed: an agent in a network namespace of its own loses its link to one
//! service while its runs go on, and a history that the jobs themselves report is checked for runs
//! executed twice at once, runs lost, and successes whose job never finished. Changes the
//! machine's network namespaces and iptables rules (its own only), so `scripts/test` runs it with
//! the fault tests, alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use support::history::{self, Event, Recorder};
use support::partition::{self, Host, Link};
use support::{AgentOptions, GitServer, Stack};

/// Runs in flight when the link is cut (`CIMASTER_FAULTS_RUNS`, 12 by default; `scripts/bench
/// faults` runs 50).
fn runs() -> usize {
    setting("CIMASTER_FAULTS_RUNS", 12) as usize
}

/// How long each job beats, in quarter seconds (`CIMASTER_FAULTS_BEATS`): long enough for every run
/// to be in flight at the cut.
fn beats() -> u32 {
    setting("CIMASTER_FAULTS_BEATS", 60) as u32
}
/// The agents' lease in these tests (`AgentOptions`' default).
const LEASE: Duration = Duration::from_secs(5);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} (scripts/test sets it)"))
}

/// An agent on a host of its own, and its links to Postgres, RabbitMQ and S3.
struct CutOff {
    host: Host,
    database: Link,
    amqp: Link,
    s3: Link,
    agent: String,
    options: AgentOptions,
}

impl CutOff {
    /// Starts an agent in a new namespace; `amqp_query` is appended to its AMQP URL.
    async fn start(stack: &mut Stack, amqp_query: &str) -> Self {
        let mut host = Host::create();
        let amqp_url = env("CIMASTER_AMQP_URL");
        let database = host.expose(partition::target_of(&stack.database_url)).await;
        let amqp = host.expose(partition::target_of(&amqp_url)).await;
        let s3 = host.expose(partition::target_of(&env("CIMASTER_S3_ENDPOINT"))).await;
        let options = AgentOptions {
            cpus: Some(cpus()),
            netns: Some(host.namespace.clone()),
            env: vec![
                ("CIMASTER_DATABASE_URL", partition::through(&stack.database_url, database)),
                ("CIMASTER_AMQP_URL", format!("{}{amqp_query}", partition::through(&amqp_url, amqp))),
                ("CIMASTER_S3_ENDPOINT", partition::through(&env("CIMASTER_S3_ENDPOINT"), s3)),
            ],
            open_egress: true,
            ..Default::default()
        };
        let index = stack.add_agent(options.clone()).await;
        let agent = stack.agents[index].id.clone();
        Self { host, database, amqp, s3, agent, options }
    }

    /// Kills the agent (SIGKILL) and starts it again with the same id, in the same namespace.
    async fn restart(&self, stack: &mut Stack) {
        let index = stack.agents.iter().position(|agent| agent.id == self.agent).unwrap();
        stack.kill_agent(index);
        stack.agent_exit(index, Duration::from_secs(10)).await;
        stack.start_agent(&self.agent, self.options.clone()).await;
    }

    async fn running(&self, pool: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'running' AND agent = $1")
            .bind(&self.agent)
            .fetch_one(pool)
            .await
            .unwrap()
    }
}

/// Room for every run at once (0.1 CPU each).
fn cpus() -> f64 {
    runs() as f64 * 0.1 + 0.45
}

#[sqlx::test(migrations = "../migrations")]
async fn no_run_executes_twice_when_its_agent_is_cut_off_from_postgres(pool: PgPool) {
    let runs_in_flight = runs();
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    let cut_off = CutOff::start(&mut stack, "").await;
    history::put_beats_job(&stack, &recorder, beats()).await;
    let ids = history::trigger_beats(&stack, runs_in_flight).await;
    history::wait_started(&recorder, &ids, Duration::from_secs(60 + 3 * runs_in_flight as u64)).await;
    assert_eq!(
        cut_off.running(&stack.pool).await,
        runs_in_flight as i64,
        "all runs in flight on the agent when it is cut off"
    );
    // A healthy agent to take the retries.
    stack.add_agent(AgentOptions { cpus: Some(cpus()), open_egress: true, ..Default::default() }).await;

    cut_off.host.cut(cut_off.database);
    let cut_at = Instant::now();
    tokio::time::sleep(LEASE * 3).await;
    cut_off.host.heal(cut_off.database);

    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(120 + 3 * runs_in_flight as u64)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    history::report("agent <-> Postgres cut", &verdict, &events, cut_at);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("agent <-> Postgres cut"));
    assert_eq!(verdict.retried, runs_in_flight, "every run was cut off mid-flight and finished as a retry");
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
    // The cut-off attempt's console is kept, and says what happened to it.
    let current = stack.console(&format!("/jobs/beats/runs/{}", ids[0])).await;
    assert!(current.contains("runs attempt 2"), "the current attempt's console: {current}");
    let response = stack
        .api
        .request(reqwest::Method::GET, &format!("/jobs/beats/runs/{}/results/console?attempt=1", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let old = response.text().await.unwrap();
    assert!(old.contains("could not renew the run lease") && old.contains("sending SIGTERM"), "{old}");
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_go_on_and_the_agent_consumes_again_when_it_is_cut_off_from_rabbitmq(pool: PgPool) {
    let runs_in_flight = runs() / 2 * 2;
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    // Heartbeats every 2 s, so the broker gives up on the connection during the cut.
    let cut_off = CutOff::start(&mut stack, "?heartbeat=2").await;
    history::put_beats_job(&stack, &recorder, beats()).await;
    let before = history::trigger_beats(&stack, runs_in_flight / 2).await;
    history::wait_started(&recorder, &before, Duration::from_secs(60 + 3 * runs_in_flight as u64)).await;

    cut_off.host.cut(cut_off.amqp);
    let cut_at = Instant::now();
    // Triggered while the only agent cannot hear the broker: they wait, then run on it once healed.
    let during = history::trigger_beats(&stack, runs_in_flight / 2).await;
    tokio::time::sleep(Duration::from_secs(setting("CIMASTER_FAULTS_AMQP_CUT_SECONDS", 15))).await;
    cut_off.host.heal(cut_off.amqp);

    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(120 + 3 * runs_in_flight as u64)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    history::report("agent <-> RabbitMQ cut", &verdict, &events, cut_at);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("agent <-> RabbitMQ cut"));
    assert_eq!(verdict.retried, 0, "no run needed a second attempt: {runs:?}");
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
    assert!(during.iter().all(|id| recorder.started(id) == 1));
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM run_attempts WHERE agent = $1")
        .bind(&cut_off.agent)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(attempts, runs_in_flight as i64, "the cut-off agent ran every run, once");
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_end_and_their_output_follows_when_the_agent_is_cut_off_from_s3(pool: PgPool) {
    const RUNS: usize = 6;
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    let cut_off = CutOff::start(&mut stack, "").await;
    history::put_beats_job(&stack, &recorder, 8).await;

    cut_off.host.cut(cut_off.s3);
    let cut_at = Instant::now();
    let ids = history::trigger_beats(&stack, RUNS).await;
    // The runs end and say so, though their console cannot be stored.
    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(180)).await;
    assert!(runs.iter().all(|(_, status, attempt)| status == "succeeded" && *attempt == 1), "{runs:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE console_key IS NOT NULL")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "no console reached S3 during the cut");
    for id in &ids {
        let console = stack.console(&format!("/jobs/beats/runs/{id}")).await;
        assert!(console.contains("[cimaster] run succeeded"), "the live copy is served meanwhile: {console}");
    }
    // The output waits on the agent's disk, also across a restart of the agent.
    cut_off.restart(&mut stack).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the new process finds S3 still cut off
    cut_off.host.heal(cut_off.s3);

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE console_key IS NOT NULL")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
        if stored == RUNS as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {stored} of {RUNS} consoles reached S3 after the heal");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM run_console").fetch_one(&stack.pool).await.unwrap();
    assert_eq!(live, 0, "the live copies are dropped once the logs are stored");
    for id in &ids {
        let console = stack.console(&format!("/jobs/beats/runs/{id}")).await;
        assert!(console.contains("[cimaster] run succeeded"), "{console}");
        assert!(console.contains("runs attempt 1 in busybox:latest"), "{console}");
    }
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    history::report("agent <-> S3 cut", &verdict, &events, cut_at);
    assert!(verdict.is_clean(), "{verdict:#?}");
}

const RESULTS: &str = r#"image: busybox:latest
script: |
  mkdir -p reports dist
  echo '<testsuite name="calc"><testcase classname="calc.Add" name="adds"/></testsuite>' > reports/junit.xml
  echo "artifact body" > dist/app.txt
results:
  junit: ["reports/*.xml"]
  artifacts: ["dist/**"]
"#;

#[sqlx::test(migrations = "../migrations")]
async fn result_files_wait_for_s3_and_are_listed_once_stored(pool: PgPool) {
    let git = GitServer::start();
    let url = git.repo("tests");
    git.commit("tests", "main", &[(".cimaster.yml", RESULTS)]);
    let mut stack = Stack::start(pool).await;
    let cut_off = CutOff::start(&mut stack, "").await;
    stack.put_job("tests", serde_json::json!({"kind": "git", "repository": url})).await;

    cut_off.host.cut(cut_off.s3);
    let reply = stack.api.post("/jobs/tests/runs", serde_json::json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
    let run = stack.wait_finished(&path, Duration::from_secs(180)).await;
    assert_eq!(run["status"], "succeeded", "the status does not wait for S3: {run}");
    assert!(stack.listed_results(&path).await.is_empty(), "nothing reached S3 during the cut");
    let console = stack.console(&path).await;
    assert!(console.contains("dist/app.txt waits for S3"), "{console}");
    cut_off.host.heal(cut_off.s3);

    let expected =
        vec![("artifact".to_owned(), "dist/app.txt".to_owned()), ("junit".to_owned(), "reports/junit.xml".to_owned())];
    let deadline = Instant::now() + Duration::from_secs(90);
    while stack.listed_results(&path).await != expected {
        assert!(Instant::now() < deadline, "results after the heal: {:?}", stack.listed_results(&path).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let artifact = stack
        .api
        .request(reqwest::Method::GET, &format!("{path}/results/artifacts/dist/app.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(artifact.status(), 200);
    assert_eq!(artifact.text().await.unwrap(), "artifact body\n");
    let junit = stack.api.get(&format!("{path}/results/junit")).await.body;
    assert_eq!(junit["tests"], 1, "the summary read before the cut is kept: {junit}");
}

/// A setting from the environment (`scripts/bench faults` raises them), or its short default.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// A small, seeded generator: the same seed cuts the same links for the same times.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_soak_of_random_cuts_loses_no_run_and_runs_none_twice(pool: PgPool) {
    let seconds = setting("CIMASTER_SOAK_SECONDS", 40);
    let mut random = Seeded(setting("CIMASTER_SOAK_SEED", 7));
    let recorder = Recorder::start().await.unwrap();
    let mut stack = Stack::start(pool).await;
    let cut_off = CutOff::start(&mut stack, "?heartbeat=2").await;
    stack.add_agent(AgentOptions { cpus: Some(cpus()), open_egress: true, ..Default::default() }).await;
    history::put_beats_job(&stack, &recorder, 24).await;

    let started = Instant::now();
    let mut faults = Vec::new();
    let mut order: Vec<(&str, Link)> = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        history::trigger_beats(&stack, 4).await;
        // Every link in turn, in a random order each time round.
        if order.is_empty() {
            order = vec![("Postgres", cut_off.database), ("RabbitMQ", cut_off.amqp), ("S3", cut_off.s3)];
            for i in (1..order.len()).rev() {
                order.swap(i, random.below(i as u64 + 1) as usize);
            }
        }
        let (name, link) = order.pop().unwrap();
        let hold = Duration::from_millis(2000 + random.below(13_000));
        cut_off.host.cut(link);
        tokio::time::sleep(hold).await;
        cut_off.host.heal(link);
        faults.push(format!("{name} {:.1}s", hold.as_secs_f64()));
        tokio::time::sleep(Duration::from_millis(500 + random.below(2500))).await;
    }

    let runs = history::wait_all_ended(&stack.pool, Duration::from_secs(180)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    println!("soak: {} cuts: {}", faults.len(), faults.join(", "));
    history::report("soak", &verdict, &events, started);
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("soak"));
    assert!(runs.iter().all(|(_, status, _)| status == "succeeded"), "{runs:?}");
    // Nothing of the runs' output is lost either: every console reaches S3.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE console_key IS NULL")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
        if waiting == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{waiting} consoles never reached S3");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
