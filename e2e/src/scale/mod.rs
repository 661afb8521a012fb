//! The scaling scenario: runs of mixed length arrive in bursts while an autoscaler inside the
//! harness does what KEDA does with `deploy/autoscaling.yaml` — every second it reads `GET /queues`,
//! wants `ceil(demand / runs per agent)` agents between a minimum and a maximum, starts agents, and
//! sends SIGTERM to surplus ones (newest first) once the lower want has held for the cool-down,
//! as the HPA's scale-down stabilisation does. A SIGTERM'd agent drains: it finishes what it runs.
//!
//! Every job reports its start and end to a [`Recorder`] outside CIMaster, so "lost" and "run
//! twice" are read from what the jobs did, not from CIMaster's own records. With `chaos`, one agent
//! is SIGKILLed mid-way (and restarted with its id, as Kubernetes restarts a crashed container) and
//! RabbitMQ is restarted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

mod api;
mod fleet;

use api::Api;
use fleet::Fleet;

use crate::history::{self, Recorder};
use crate::processes;

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub runs: usize,
    pub min_agents: usize,
    pub max_agents: usize,
    /// Runs one agent takes at once (its CPUs ÷ a run's CPUs).
    pub runs_per_agent: usize,
    /// Each run sleeps a whole number of seconds from 0 to this.
    pub max_seconds: u32,
    pub bursts: usize,
    pub burst_every: Duration,
    /// How long a lower want must hold before agents are stopped.
    pub cooldown: Duration,
    /// SIGKILL one agent and restart RabbitMQ once half the runs were triggered.
    pub chaos: bool,
    /// The agents' lease: how soon a killed agent's runs are given to another.
    pub lease: Duration,
    pub seed: u64,
    /// The most the runs may take to end, and the agents to come back to the minimum after.
    pub deadline: Duration,
    /// Also measure the `docker run` baseline.
    pub baseline: bool,
}

/// Where to run it.
pub struct Environment {
    /// The master's and agent's executables.
    pub binaries: PathBuf,
    /// A database of the scenario's own.
    pub database_url: String,
    /// The queue prefix of the scenario's own.
    pub prefix: String,
    /// `scripts/dev`, to restart RabbitMQ for `chaos`.
    pub dev_script: PathBuf,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Outcome {
    pub runs: usize,
    pub succeeded: usize,
    /// Runs that did not end, ended other than `succeeded`, or succeeded without their job's end.
    pub lost: usize,
    /// Runs whose job ran twice at once.
    pub double: usize,
    /// Runs that needed more than one attempt.
    pub retried: usize,
    pub aborted: usize,
    pub peak_agents: usize,
    pub final_agents: usize,
    pub agents_started: usize,
    pub agents_stopped: usize,
    pub agents_killed: usize,
    /// Agents that exited without being told to (a crash, a refused setting).
    pub agents_exited: usize,
    /// First trigger → last run ended.
    pub drain: Duration,
    /// Total work ÷ the maximum agents' capacity (and no less than the last burst's arrival).
    pub ideal: Duration,
    /// The same runs, arriving the same way, as `docker run` of the same image and script at the
    /// maximum capacity's concurrency, measured in the same run: what this machine can do.
    pub baseline: Option<Duration>,
    pub work_seconds: u64,
    /// (seconds since the first trigger, agents taking work) whenever the count changed.
    pub timeline: Vec<(f64, usize)>,
}

impl Outcome {
    pub fn efficiency(&self) -> f64 {
        self.ideal.as_secs_f64() / self.drain.as_secs_f64().max(f64::EPSILON)
    }

    /// The figures, one per line; `lost:`, `double:` and `efficiency:` are for scripts to read.
    pub fn print(&self, scenario: &Scenario) {
        println!(
            "scale: {} runs of 0-{} s in {} bursts {} s apart; agents {}..{} x {} runs; cool-down {} s{}",
            scenario.runs,
            scenario.max_seconds,
            scenario.bursts,
            scenario.burst_every.as_secs(),
            scenario.min_agents,
            scenario.max_agents,
            scenario.runs_per_agent,
            scenario.cooldown.as_secs(),
            if scenario.chaos { "; one agent SIGKILLed and RabbitMQ restarted mid-way" } else { "" }
        );
        let timeline: Vec<String> = self.timeline.iter().map(|(at, agents)| format!("{agents}@{at:.0}s")).collect();
        println!("agents over time: {}", timeline.join(" "));
        println!(
            "agents: peak {}, final {}, started {}, stopped by SIGTERM {}, killed {}, exited on their own {}",
            self.peak_agents,
            self.final_agents,
            self.agents_started,
            self.agents_stopped,
            self.agents_killed,
            self.agents_exited
        );
        println!(
            "runs: {} of {} succeeded, aborted {}, retried {}",
            self.succeeded, self.runs, self.aborted, self.retried
        );
        println!("lost: {}", self.lost);
        println!("double: {}", self.double);
        println!(
            "drain: {:.1} s; ideal {:.1} s (the larger of {} s of work / {} slots and the last burst's arrival)",
            self.drain.as_secs_f64(),
            self.ideal.as_secs_f64(),
            self.work_seconds,
            scenario.max_agents * scenario.runs_per_agent
        );
        println!("efficiency: {:.2}", self.efficiency());
        if let Some(baseline) = self.baseline {
            println!(
                "baseline: the same runs by `docker run` at {} at once drained in {:.1} s; CIMaster took {:.2}x that",
                scenario.max_agents * scenario.runs_per_agent,
                baseline.as_secs_f64(),
                self.drain.as_secs_f64() / baseline.as_secs_f64().max(f64::EPSILON)
            );
        }
    }
}

const JOB: &str = "scaled";

pub async fn run(scenario: &Scenario, environment: &Environment) -> anyhow::Result<Outcome> {
    let recorder = Recorder::start().await.context("starting the recorder")?;
    let secret = format!("scale-{}", uuid::Uuid::new_v4().simple());
    let (master, base) = processes::start_master(
        &environment.binaries,
        &environment.database_url,
        &environment.prefix,
        &secret,
        &[("CIMASTER_LEASE_CHECK_INTERVAL", "500ms".to_owned()), ("CIMASTER_DISPATCH_INTERVAL", "500ms".to_owned())],
    )
    .await?;
    let token = cimaster_master::auth::Signer::hs256(&secret)?.mint(
        "scale",
        &[cimaster_master::auth::Role::Admin],
        Duration::from_secs(4 * 3600),
    );
    let api = Api { http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?, base, token };
    api.put_job(&recorder, scenario.runs_per_agent).await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&environment.database_url).await?;

    let fleet = Arc::new(Mutex::new(Fleet::new(scenario, environment)));
    let stop = CancellationToken::new();
    let began = Instant::now();
    let scaler = tokio::spawn(autoscale(api.clone(), fleet.clone(), scenario.clone(), began, stop.clone()));

    let result = drive(scenario, environment, &api, &pool, &fleet, began).await;
    stop.cancel();
    let _ = scaler.await;
    let final_agents = fleet.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).active.len();
    let agents = fleet.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take_all();
    for agent in agents {
        processes::stop(agent, Duration::from_secs(30)).await;
    }
    processes::stop(master, Duration::from_secs(10)).await;
    let (work_seconds, arrivals) = result?;
    let baseline = match scenario.baseline {
        true => Some(baseline(scenario, &arrivals, &recorder).await?),
        false => None,
    };

    let runs = history::runs(&pool).await?;
    let verdict = history::check(&recorder.events(), &runs);
    let drain: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM runs")
            .fetch_one(&pool)
            .await?;
    let fleet = fleet.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // The work at full capacity, but never before the last burst has arrived.
    let slots = (scenario.max_agents * scenario.runs_per_agent) as f64;
    let last_burst = scenario.burst_every.as_secs_f64() * scenario.bursts.saturating_sub(1) as f64;
    let ideal = (work_seconds as f64 / slots).max(last_burst);
    Ok(Outcome {
        runs: runs.len(),
        succeeded: runs.iter().filter(|(_, status, _)| status == "succeeded").count(),
        lost: runs
            .iter()
            .filter(|(id, status, _)| status != "succeeded" || verdict.unfinished_successes.contains(id))
            .count()
            + scenario.runs.saturating_sub(runs.len()),
        double: verdict.double.len(),
        retried: verdict.retried,
        aborted: runs.iter().filter(|(_, status, _)| status == "aborted").count(),
        peak_agents: fleet.peak,
        final_agents,
        agents_started: fleet.started,
        agents_stopped: fleet.stopped,
        agents_killed: fleet.killed,
        agents_exited: fleet.exited,
        drain: Duration::from_secs_f64(drain.max(0.0)),
        ideal: Duration::from_secs_f64(ideal),
        baseline,
        work_seconds,
        timeline: fleet.timeline.clone(),
    })
}

/// Triggers the bursts (with the chaos mid-way), waits for every run to end and for the agents to
/// come back to the minimum; returns the seconds of work triggered and each burst's pauses.
async fn drive(
    scenario: &Scenario,
    environment: &Environment,
    api: &Api,
    pool: &PgPool,
    fleet: &Arc<Mutex<Fleet>>,
    began: Instant,
) -> anyhow::Result<(u64, Vec<Vec<u32>>)> {
    let deadline = began + scenario.deadline;
    let mut arrivals = Vec::new();
    let mut random = XorShift(scenario.seed.max(1));
    let mut work = 0;
    let mut triggered = 0;
    let mut chaos_done = !scenario.chaos;
    for burst in 0..scenario.bursts {
        tokio::time::sleep_until((began + scenario.burst_every * burst as u32).into()).await;
        let size = scenario.runs / scenario.bursts + usize::from(burst < scenario.runs % scenario.bursts);
        let pauses: Vec<u32> = (0..size).map(|_| random.below(scenario.max_seconds + 1)).collect();
        work += pauses.iter().map(|&pause| u64::from(pause)).sum::<u64>();
        api.trigger_all(&pauses).await?;
        arrivals.push(pauses);
        triggered += size;
        if !chaos_done && triggered * 2 >= scenario.runs {
            chaos(api, fleet, &environment.dev_script, deadline).await?;
            chaos_done = true;
        }
    }
    while history::open_runs(pool).await? > 0 {
        if Instant::now() > deadline {
            bail!("{} runs still open at the deadline", history::open_runs(pool).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settle = Instant::now() + scenario.cooldown + Duration::from_secs(30);
    while !fleet.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).settled(scenario.min_agents) {
        if Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok((work, arrivals))
}

/// The same bursts of the same pauses through `docker run --rm` of the job's image and script, at most the
/// maximum capacity at once; how long until the last ended.
async fn baseline(scenario: &Scenario, arrivals: &[Vec<u32>], recorder: &Recorder) -> anyhow::Result<Duration> {
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{RemoveContainerOptions, WaitContainerOptions};
    use futures::StreamExt;

    let docker = bollard::Docker::connect_with_local_defaults()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(scenario.max_agents * scenario.runs_per_agent));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for (burst, pauses) in arrivals.iter().enumerate() {
        tokio::time::sleep_until((began + scenario.burst_every * burst as u32).into()).await;
        for &pause in pauses {
            let (docker, slots) = (docker.clone(), slots.clone());
            // The job's own script, beats to the recorder included: the same work as a run's.
            let script = recorder.sleeping_script("PAUSE");
            let env =
                vec![format!("PAUSE={pause}"), "CIMASTER_RUN_ID=baseline".to_owned(), "CIMASTER_ATTEMPT=1".to_owned()];
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire_owned().await?;
                let body = ContainerCreateBody {
                    image: Some("busybox:latest".to_owned()),
                    cmd: Some(vec!["sh".into(), "-c".into(), script]),
                    env: Some(env),
                    host_config: Some(HostConfig { init: Some(true), ..Default::default() }),
                    ..Default::default()
                };
                let created =
                    docker.create_container(None::<bollard::query_parameters::CreateContainerOptions>, body).await?;
                docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await?;
                let mut wait =
                    docker.wait_container(&created.id, Some(WaitContainerOptions { condition: "not-running".into() }));
                let _ = wait.next().await;
                let remove = RemoveContainerOptions { force: true, ..Default::default() };
                docker.remove_container(&created.id, Some(remove)).await?;
                anyhow::Ok(())
            }));
        }
    }
    for task in tasks {
        task.await??;
    }
    Ok(began.elapsed())
}

/// Waits until an agent runs something, SIGKILLs it and starts it again under its id; then stops
/// RabbitMQ for a few seconds.
async fn chaos(
    api: &Api,
    fleet: &Arc<Mutex<Fleet>>,
    dev_script: &std::path::Path,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let busy = api.busy_agent().await?;
        if let Some(id) = busy {
            let mut fleet = fleet.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if fleet.kill_and_restart(&id)? {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("no agent ever ran anything to kill");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dev = |what: &str| {
        let status = std::process::Command::new(dev_script).args([what, "rabbitmq"]).status()?;
        anyhow::ensure!(status.success(), "scripts/dev {what} rabbitmq failed");
        anyhow::Ok(())
    };
    dev("stop-service")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    dev("start-service")
}

/// The autoscaler: every second, the queue's demand → the agents wanted → start or stop agents.
async fn autoscale(api: Api, fleet: Arc<Mutex<Fleet>>, scenario: Scenario, began: Instant, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut wants: Vec<(Instant, usize)> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(demand) = api.demand().await else { continue };
        let want = demand.div_ceil(scenario.runs_per_agent).clamp(scenario.min_agents, scenario.max_agents);
        let now = Instant::now();
        wants.push((now, want));
        wants.retain(|(at, _)| now.duration_since(*at) <= scenario.cooldown);
        // Up at once; down only to the highest want of the cool-down window.
        let target = wants.iter().map(|(_, want)| *want).max().unwrap_or(want);
        let mut fleet = fleet.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(err) = fleet.scale_to(target, began) {
            eprintln!("autoscaler: {err:#}");
        }
    }
}

/// A small seeded generator: the same seed, the same run lengths.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, bound: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(bound.max(1))) as u32
    }
}
