//! The agents the scaling scenario's autoscaler starts, stops and kills, as processes.

use std::path::PathBuf;
use std::time::Instant;

use tokio::process::Child;

use super::{Environment, Scenario};
use crate::processes;

/// The agents the autoscaler runs: those taking work, and those draining after a SIGTERM.
pub(super) struct Fleet {
    binaries: PathBuf,
    database_url: String,
    prefix: String,
    env: Vec<(&'static str, String)>,
    pub(super) active: Vec<(String, Child)>,
    draining: Vec<Child>,
    next_id: usize,
    pub(super) peak: usize,
    pub(super) started: usize,
    pub(super) stopped: usize,
    pub(super) killed: usize,
    /// Agents that exited without being told to.
    pub(super) exited: usize,
    pub(super) timeline: Vec<(f64, usize)>,
}

impl Fleet {
    pub(super) fn new(scenario: &Scenario, environment: &Environment) -> Self {
        let env = vec![
            ("CIMASTER_AGENT_CPUS", "1".to_owned()),
            // An idle network for each run it takes at once: no network is made per run.
            ("CIMASTER_AGENT_IDLE_NETWORKS", scenario.runs_per_agent.to_string()),
            ("CIMASTER_AGENT_REPORT_INTERVAL", "1s".to_owned()),
            // The jobs report to the history recorder on this host, which the egress policy closes
            // to runs.
            ("CIMASTER_AGENT_EGRESS", "false".to_owned()),
            // A short lease hands a killed agent's runs on soon; the stop grace and margin fit in it.
            ("CIMASTER_LEASE_TTL", format!("{}s", scenario.lease.as_secs().max(5))),
            ("CIMASTER_STOP_GRACE", "2s".to_owned()),
            ("CIMASTER_LEASE_MARGIN", "1s".to_owned()),
        ];
        Fleet {
            binaries: environment.binaries.clone(),
            database_url: environment.database_url.clone(),
            prefix: environment.prefix.clone(),
            env,
            active: Vec::new(),
            draining: Vec::new(),
            next_id: 1,
            peak: 0,
            started: 0,
            stopped: 0,
            killed: 0,
            exited: 0,
            timeline: Vec::new(),
        }
    }

    pub(super) fn spawn(&self, id: &str) -> anyhow::Result<Child> {
        processes::start_agent(&self.binaries, id, &self.database_url, &self.prefix, &self.env)
    }

    /// Starts or SIGTERMs agents until `target` take work; reaps drained ones.
    pub(super) fn scale_to(&mut self, target: usize, began: Instant) -> anyhow::Result<()> {
        self.draining.retain_mut(|child| child.try_wait().map_or(true, |status| status.is_none()));
        let before = self.active.len();
        self.active.retain_mut(|(id, child)| match child.try_wait() {
            Ok(None) => true,
            exited => {
                eprintln!("autoscaler: agent {id} exited on its own: {exited:?}");
                false
            }
        });
        self.exited += before - self.active.len();
        while self.active.len() < target {
            let id = format!("{}-agent-{}", self.prefix, self.next_id);
            self.next_id += 1;
            let child = self.spawn(&id)?;
            self.active.push((id, child));
            self.started += 1;
        }
        while self.active.len() > target {
            let Some((_, child)) = self.active.pop() else { break };
            processes::signal(&child, "TERM")?;
            self.draining.push(child);
            self.stopped += 1;
        }
        self.peak = self.peak.max(self.active.len());
        if self.active.len() != before || self.timeline.is_empty() {
            self.timeline.push((began.elapsed().as_secs_f64(), self.active.len()));
        }
        Ok(())
    }

    /// SIGKILLs the agent `id` and starts it again; false if the autoscaler already stopped it.
    pub(super) fn kill_and_restart(&mut self, id: &str) -> anyhow::Result<bool> {
        let Some(index) = self.active.iter().position(|(active, _)| active == id) else { return Ok(false) };
        processes::signal(&self.active[index].1, "KILL")?;
        self.killed += 1;
        self.active[index].1 = self.spawn(id)?;
        Ok(true)
    }

    /// At the minimum, with every stopped agent gone.
    pub(super) fn settled(&mut self, min: usize) -> bool {
        self.draining.retain_mut(|child| child.try_wait().map_or(true, |status| status.is_none()));
        self.active.len() == min && self.draining.is_empty()
    }

    pub(super) fn take_all(&mut self) -> Vec<Child> {
        self.active.drain(..).map(|(_, child)| child).chain(self.draining.drain(..)).collect()
    }
}
