//! A randomized fault soak: runs longer than the lease are triggered all along while, in a seeded
//! random order, an agent is SIGKILLed and not restarted, an agent is SIGKILLed and restarted only
//! after twice the lease, an agent is cut off from Postgres, a RabbitMQ node stops, Postgres
//! restarts and a master replica is SIGKILLed. The jobs beat to a recorder; the history checker
//! fails on a run lost, a run executed twice at once, and a kill that caused no retry. Prints, per
//! fault kind: injected, runs affected, retried, lost, double, and the longest time from the fault
//! to an affected run's end. `CIMASTER_SOAK_SEED` and `CIMASTER_SOAK_MINUTES` set its seed and
//! length (`scripts/bench faults --seed N --minutes M`); the suite runs each kind once. Changes
//! the shared Postgres and the machine's namespaces: runs with the fault tests, alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use support::broker_cluster::BrokerCluster;
use support::history::{self, Recorder};
use support::partition::{self, Host, Link};
use support::{dev_async, AgentOptions, Replica, Stack};

/// The agents' lease; every job runs longer (beats of a quarter second).
const LEASE: Duration = Duration::from_secs(5);
const BEATS: u32 = 28;

fn setting(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    AgentKilled,
    AgentKilledBackAfterTwiceTheLease,
    AgentCutFromPostgres,
    BrokerNodeStopped,
    PostgresRestarted,
    MasterReplicaKilled,
}

const KINDS: [Fault; 6] = [
    Fault::AgentKilled,
    Fault::AgentKilledBackAfterTwiceTheLease,
    Fault::AgentCutFromPostgres,
    Fault::BrokerNodeStopped,
    Fault::PostgresRestarted,
    Fault::MasterReplicaKilled,
];

/// A small, seeded generator: the same seed injects the same faults in the same order.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One fault as injected: when, and the runs it could touch.
struct Injected {
    kind: Fault,
    at: Instant,
    affected: Vec<String>,
}

/// Starts Postgres again if the test ends while it is stopped.
struct PostgresBack;

impl Drop for PostgresBack {
    fn drop(&mut self) {
        let _ = std::process::Command::new(support::DEV).args(["start-service", "postgres"]).status();
    }
}

/// The installation under test: three broker nodes, two masters, an agent on a host of its own
/// (whose Postgres link can be cut) and two plain agents.
struct Fleet {
    cluster: BrokerCluster,
    stack: Stack,
    replica: Replica,
    host: Host,
    database: Link,
    namespaced: String,
    /// The plain agents' indexes in the stack.
    plain: Vec<usize>,
}

impl Fleet {
    async fn start(pool: PgPool, recorder: &Recorder) -> Self {
        let cluster = BrokerCluster::start().await;
        // A run may meet several faults in a long soak: more attempts than the default three.
        let masters = vec![("CIMASTER_AMQP_URL", cluster.urls()), ("CIMASTER_MAX_ATTEMPTS", "10".to_owned())];
        let mut stack = Stack::start_with(pool, masters).await;
        let replica = stack.add_master().await;
        let mut host = Host::create();
        let database = host.expose(partition::target_of(&stack.database_url)).await;
        let s3_url = std::env::var("CIMASTER_S3_ENDPOINT").unwrap();
        let s3 = host.expose(partition::target_of(&s3_url)).await;
        let mut nodes = Vec::new();
        for url in cluster.urls().split(',') {
            let link = host.expose(partition::target_of(url)).await;
            nodes.push(partition::through(url, link));
        }
        let options = AgentOptions {
            netns: Some(host.namespace.clone()),
            env: vec![
                ("CIMASTER_DATABASE_URL", partition::through(&stack.database_url, database)),
                ("CIMASTER_AMQP_URL", nodes.join(",")),
                ("CIMASTER_S3_ENDPOINT", partition::through(&s3_url, s3)),
            ],
            ..plain_agent(&cluster)
        };
        let index = stack.add_agent(options).await;
        let namespaced = stack.agents[index].id.clone();
        let mut plain = Vec::new();
        for _ in 0..2 {
            plain.push(stack.add_agent(plain_agent(&cluster)).await);
        }
        history::put_beats_job(&stack, recorder, BEATS).await;
        Self { cluster, stack, replica, host, database, namespaced, plain }
    }

    async fn running_on(&self, agent: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT id::text FROM runs WHERE status = 'running' AND agent = $1")
            .bind(agent)
            .fetch_all(&self.stack.pool)
            .await
            .unwrap()
    }

    async fn open_runs(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT id::text FROM runs WHERE status IN ('queued', 'running')")
            .fetch_all(&self.stack.pool)
            .await
            .unwrap()
    }

    /// Injects one fault and ends it; the runs it could touch.
    async fn inject(&mut self, kind: Fault, random: &mut Seeded) -> Vec<String> {
        match kind {
            Fault::AgentKilled | Fault::AgentKilledBackAfterTwiceTheLease => {
                let slot = random.below(self.plain.len() as u64) as usize;
                let index = self.plain[slot];
                let id = self.stack.agents[index].id.clone();
                let affected = self.running_on(&id).await;
                self.stack.kill_agent(index);
                self.stack.agent_exit(index, Duration::from_secs(10)).await;
                let options = plain_agent(&self.cluster);
                self.plain[slot] = if kind == Fault::AgentKilled {
                    self.stack.add_agent(options).await
                } else {
                    tokio::time::sleep(LEASE * 2).await;
                    self.stack.start_agent(&id, options).await
                };
                affected
            }
            Fault::AgentCutFromPostgres => {
                let affected = self.running_on(&self.namespaced).await;
                self.host.cut(self.database);
                tokio::time::sleep(Duration::from_millis(3000 + random.below(9000))).await;
                self.host.heal(self.database);
                affected
            }
            Fault::BrokerNodeStopped => {
                let affected = self.open_runs().await;
                let node = random.below(3) as usize;
                self.cluster.stop(node).await;
                tokio::time::sleep(Duration::from_millis(2000 + random.below(6000))).await;
                self.cluster.start_node(node).await;
                self.cluster.wait_running(3, Duration::from_secs(120)).await;
                affected
            }
            Fault::PostgresRestarted => {
                let affected = self.open_runs().await;
                let back = PostgresBack;
                dev_async(&["stop-service", "postgres"]).await;
                tokio::time::sleep(Duration::from_millis(1000 + random.below(3000))).await;
                dev_async(&["start-service", "postgres"]).await;
                std::mem::forget(back);
                let deadline = Instant::now() + Duration::from_secs(60);
                while self.stack.api.get("/readyz").await.status != 200 {
                    assert!(Instant::now() < deadline, "the master never saw Postgres back");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                affected
            }
            Fault::MasterReplicaKilled => {
                let affected = self.open_runs().await;
                let _ = self.replica.child.start_kill();
                let _ = self.replica.child.wait().await;
                self.replica = self.stack.add_master().await;
                affected
            }
        }
    }
}

fn plain_agent(cluster: &BrokerCluster) -> AgentOptions {
    AgentOptions {
        cpus: Some(2.0),
        open_egress: true,
        env: vec![("CIMASTER_AMQP_URL", cluster.urls())],
        ..Default::default()
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_randomized_mix_of_faults_loses_no_run_and_runs_none_twice(pool: PgPool) {
    let seed = setting("CIMASTER_SOAK_SEED", 7.0) as u64;
    // The suite's short form: each kind once, whatever the length.
    let length = Duration::from_secs_f64(setting("CIMASTER_SOAK_MINUTES", 0.0) * 60.0);
    let mut random = Seeded(seed);
    let recorder = Recorder::start().await.unwrap();
    let mut fleet = Fleet::start(pool, &recorder).await;

    let started = Instant::now();
    let mut injected = Vec::new();
    let mut order = Vec::new();
    while started.elapsed() < length || injected.len() < KINDS.len() {
        history::trigger_beats(&fleet.stack, 5).await;
        // Runs in flight before the fault.
        tokio::time::sleep(Duration::from_millis(2000 + random.below(2000))).await;
        if order.is_empty() {
            order = KINDS.to_vec();
            for i in (1..order.len()).rev() {
                order.swap(i, random.below(i as u64 + 1) as usize);
            }
        }
        let kind = order.pop().unwrap();
        let at = Instant::now();
        let affected = fleet.inject(kind, &mut random).await;
        injected.push(Injected { kind, at, affected });
        assert!(injected.len() < 1000, "a bounded soak");
    }

    let runs = history::wait_all_ended(&fleet.stack.pool, Duration::from_secs(300)).await;
    let events = recorder.events();
    let verdict = history::check(&events, &runs);
    let attempts: BTreeMap<&str, u32> = runs.iter().map(|(run, _, attempt)| (run.as_str(), *attempt)).collect();
    println!(
        "faults soak, seed {seed}, {:.1} min: {} faults, {}",
        started.elapsed().as_secs_f64() / 60.0,
        injected.len(),
        verdict.summary("all runs")
    );
    let mut kills_without_retry = Vec::new();
    for kind in KINDS {
        let of_kind: Vec<&Injected> = injected.iter().filter(|fault| fault.kind == kind).collect();
        let affected: HashSet<&str> =
            of_kind.iter().flat_map(|fault| fault.affected.iter().map(String::as_str)).collect();
        let retried = affected.iter().filter(|run| attempts.get(*run).is_some_and(|a| *a > 1)).count();
        let lost = verdict.lost.iter().filter(|run| affected.contains(run.as_str())).count();
        let double = verdict.double.iter().filter(|run| affected.contains(run.as_str())).count();
        let longest = of_kind
            .iter()
            .flat_map(|fault| {
                fault.affected.iter().filter_map(|run| {
                    let end = events.iter().filter(|e| &e.run == run && e.what == "end").map(|e| e.at).max()?;
                    Some(end.saturating_duration_since(fault.at))
                })
            })
            .max();
        println!(
            "  {kind:?}: injected {}, runs affected {}, retried {retried}, lost {lost}, double {double}, longest fault -> run ended {}",
            of_kind.len(),
            affected.len(),
            longest.map_or("-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
        );
        // A kill of an agent with runs on it must have caused their retries: the fault bit.
        if matches!(kind, Fault::AgentKilled | Fault::AgentKilledBackAfterTwiceTheLease) && retried < affected.len() {
            kills_without_retry.push(format!("{kind:?}: {retried} of {} retried", affected.len()));
        }
    }
    assert!(verdict.is_clean(), "{}: {verdict:#?}", verdict.summary("soak"));
    let unsuccessful: Vec<(String, String, i32, Option<String>)> =
        sqlx::query_as("SELECT id::text, status::text, attempt, message FROM runs WHERE status <> 'succeeded'")
            .fetch_all(&fleet.stack.pool)
            .await
            .unwrap();
    assert!(unsuccessful.is_empty(), "{unsuccessful:?}");
    assert!(kills_without_retry.is_empty(), "{kills_without_retry:?}");
    assert!(verdict.retried > 0, "no fault caused a retry");
}
