//! Run networks. Every run has a bridge network to itself for as long as it runs: its job, services
//! and probes reach each other there, and no other run is on it.
//!
//! Creating and removing a bridge network is most of what a short run costs the engine (hundreds of
//! milliseconds each on some hosts, and removal holds locks the next container start waits for), so
//! the agent keeps up to `keep` idle networks and lends them to its next runs. A network goes back
//! to the idle set once the run's containers are removed, and is lent again only when the engine
//! reports nothing attached to it. Networks beyond `keep` that a burst of runs left idle stay for
//! `LINGER` and are removed then, so a busy agent does not make and remove a network per run. With `keep` at 0 every run gets a new
//! network labelled with the run, removed after it. Idle networks carry the agent's label: a
//! graceful stop removes them, and the start-up sweep removes those a killed agent left.
//!
//! A reusable network has a sandbox: a container of the agent's git image that only sleeps on the
//! network, started with it and removed with it. A run's job container joins the sandbox's network
//! namespace (`container:ID`) instead of getting an endpoint of its own, so the engine sets up no
//! interface, address or DNS resolver per run (on Docker 20.10 the resolver alone re-executes the
//! engine and runs `iptables` for every container on a user-defined network). The run's services
//! still join the network by name, with their aliases, and its readiness checks run in the
//! sandbox. What a run leaves in the namespace ends with its containers: every process of the run is
//! killed when they are removed, and a job has no capability to change the namespace itself. A
//! network whose run left a container behind, or whose sandbox stopped, is removed, not lent again.
//!
//! Networks are finite (the engine's default address pools allow about 31 bridges; a subnet pool
//! has as many /27 blocks as it spans). A run is admitted only with a network slot; once no network
//! could be made, the agent admits no more runs than it holds networks for, for a while, and a run
//! that meets the limit anyway waits for a network to come back instead of failing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::docker::{DockerClient, DockerError, RunLabels, Sandbox};
use crate::subnets::SubnetPool;
use crate::telemetry;
use sandbox_image::SandboxImage;

mod sandbox_image;

/// The network a run holds.
pub(crate) struct RunNetwork {
    pub name: String,
    reusable: bool,
    /// The container whose network namespace the run's job joins, when the network has one.
    pub sandbox: Option<Sandbox>,
}

pub(crate) struct Networks {
    docker: DockerClient,
    agent: String,
    keep: usize,
    /// Idle networks, the one given back last at the end, each with when it was given back.
    idle: Mutex<Vec<(RunNetwork, Instant)>>,
    /// How long an idle network beyond `keep` stays.
    linger: Duration,
    /// The image of reusable networks' sandboxes; `None`: runs get endpoints of their own.
    sandbox_image: Option<SandboxImage>,
    /// Where new networks get their subnets; the engine's default pools when `None`.
    subnets: Option<SubnetPool>,
    room: Mutex<Room>,
    /// A network came back, or a slot was given up.
    freed: Notify,
    /// How long a run waits for a network to come back before it fails.
    wait: Duration,
}

/// How many runs hold a network slot, and how many networks could be had when none more could be
/// made (until `since` is `LIMIT_FOR` old: the engine may have room again by then).
#[derive(Default)]
struct Room {
    admitted: usize,
    lent: usize,
    limit: Option<(usize, Instant)>,
}

/// How long an idle network beyond the kept ones stays for the next run before it is removed.
const LINGER: Duration = Duration::from_secs(30);
/// How long a learnt limit on networks holds before the agent tries for more.
const LIMIT_FOR: Duration = Duration::from_secs(60);
/// How often a run waiting for a network tries to make one anyway.
const RETRY_NETWORK: Duration = Duration::from_secs(5);
/// How long a run waits for a network to come back before it fails, unless told otherwise.
const WAIT_FOR_NETWORK: Duration = Duration::from_secs(120);

/// A run's right to a network, taken before the run is claimed and given up when it ends.
pub(crate) struct NetworkSlot(Arc<Networks>);

impl Drop for NetworkSlot {
    fn drop(&mut self) {
        self.0.room().admitted -= 1;
        self.0.freed.notify_waiters();
    }
}

impl Networks {
    pub fn new(docker: DockerClient, agent: String, keep: usize, subnets: Option<SubnetPool>) -> Self {
        let subnets = subnets.map(|pool| pool.starting_for(&agent));
        let room = Mutex::new(Room::default());
        let (idle, freed, wait) = (Mutex::new(Vec::new()), Notify::new(), WAIT_FOR_NETWORK);
        Self { docker, agent, keep, idle, linger: LINGER, sandbox_image: None, subnets, room, freed, wait }
    }

    /// Gives each reusable network a sandbox of `image` for its runs' job containers to join.
    pub fn with_sandboxes(mut self, image: String) -> Self {
        self.sandbox_image = Some(SandboxImage::new(image));
        self
    }

    /// Sets how long a new network waits for its sandbox's image.
    #[cfg(test)]
    pub fn waiting_for_sandbox_image_up_to(mut self, wait: Duration) -> Self {
        self.sandbox_image = self.sandbox_image.map(|image| image.waiting_up_to(wait));
        self
    }

    /// Sets how long idle networks beyond the kept ones stay.
    #[cfg(test)]
    pub fn lingering_for(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets how long a run waits for a network to come back when none can be made.
    #[cfg(test)]
    pub fn waiting_up_to(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    fn room(&self) -> std::sync::MutexGuard<'_, Room> {
        self.room.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for one more run, unless the networks this agent could make are all taken.
    pub fn admit(self: &Arc<Self>) -> Option<NetworkSlot> {
        let mut room = self.room();
        if let Some((limit, since)) = room.limit {
            if since.elapsed() < LIMIT_FOR && room.admitted >= limit {
                return None;
            }
            if since.elapsed() >= LIMIT_FOR {
                room.limit = None;
            }
        }
        room.admitted += 1;
        Some(NetworkSlot(self.clone()))
    }

    /// A slot, waiting for one while every network this agent can make is taken; `None` once
    /// `stop` is cancelled.
    pub async fn admit_waiting(self: &Arc<Self>, stop: &CancellationToken) -> Option<NetworkSlot> {
        let mut logged = false;
        loop {
            let freed = self.freed.notified();
            if let Some(slot) = self.admit() {
                return Some(slot);
            }
            if !logged {
                tracing::info!(limit = ?self.limit(), "every network this agent can make is taken; the next run waits for one");
                metrics::counter!(telemetry::NETWORK_WAITS).increment(1);
                logged = true;
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = freed => {}
                // The learnt limit runs out, or room appears in the engine.
                () = tokio::time::sleep(RETRY_NETWORK) => {}
            }
        }
    }

    /// Runs the agent can hold networks for, when a limit was met (for the agent's log).
    pub fn limit(&self) -> Option<usize> {
        self.room().limit.map(|(limit, _)| limit)
    }

    /// Creates a network (labelled with the run when `labels` is given, reusable otherwise), on the
    /// next free subnet of the pool when there is one.
    async fn create(&self, labels: Option<&RunLabels>) -> Result<String, DockerError> {
        let create = |subnet| async move {
            match labels {
                Some(labels) => self.docker.create_network(labels, subnet).await,
                None => self.docker.create_reusable_network(&self.agent, subnet).await,
            }
        };
        let Some(pool) = &self.subnets else { return create(None).await };
        for _ in 0..pool.blocks() {
            match create(Some(pool.next())).await {
                Err(DockerError::SubnetTaken(_)) => continue,
                created => return created,
            }
        }
        Err(DockerError::SubnetsExhausted(pool.blocks()))
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(RunNetwork, Instant)>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle network, or a new one; when none can be made, the next one given back (waiting up to
    /// `wait`).
    pub async fn take(&self, labels: &RunLabels) -> Result<RunNetwork, DockerError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut waited = false;
        loop {
            let freed = self.freed.notified();
            match self.take_now(labels).await {
                Ok(network) => {
                    self.room().lent += 1;
                    return Ok(network);
                }
                Err(err) if err.no_network_left() => {
                    let held = self.room().lent + self.idle().len();
                    self.room().limit = Some((held, Instant::now()));
                    metrics::counter!(telemetry::NETWORKS_EXHAUSTED).increment(1);
                    metrics::gauge!(telemetry::NETWORK_LIMIT).set(held as f64);
                    if tokio::time::Instant::now() >= deadline {
                        return Err(err);
                    }
                    tracing::warn!(networks = held, error = %err, "no network can be made; runs wait for one, and no more are admitted");
                    if !waited {
                        metrics::counter!(telemetry::NETWORK_WAITS).increment(1);
                        waited = true;
                    }
                    // Woken when one of this agent's networks comes back; the engine may free room
                    // of its own (another agent's network), so it looks again every few seconds too.
                    let look_again = tokio::time::Instant::now() + RETRY_NETWORK;
                    let _ = tokio::time::timeout_at(deadline.min(look_again), freed).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn take_now(&self, labels: &RunLabels) -> Result<RunNetwork, DockerError> {
        if self.keep == 0 {
            return Ok(RunNetwork { name: self.create(Some(labels)).await?, reusable: false, sandbox: None });
        }
        loop {
            let idle = self.idle().pop();
            let Some((network, _)) = idle else { break };
            if self.as_left(&network).await {
                return Ok(network);
            }
            self.discard(network).await;
        }
        let name = self.create(None).await?;
        let sandbox = self.start_sandbox(&name).await;
        Ok(RunNetwork { name, reusable: true, sandbox })
    }

    /// Whether an idle network is as its last run left it: nothing attached but its sandbox, which
    /// is attached only while it runs. A container whose removal failed keeps a network out, as does
    /// its removal, or its sandbox's, by someone else.
    async fn as_left(&self, network: &RunNetwork) -> bool {
        let Some(attached) = self.docker.attached(&network.name).await else {
            tracing::info!(network = network.name, "an idle network is gone; not lending it");
            return false;
        };
        attached.iter().eq(network.sandbox.iter().map(|sandbox| &sandbox.id))
    }

    /// The new network's sandbox; `None` (the runs get endpoints of their own) when sandboxes are
    /// off, their image cannot be had, or the sandbox cannot be started.
    async fn start_sandbox(&self, network: &str) -> Option<Sandbox> {
        let image = self.sandbox_image.as_ref()?;
        if !image.ready(&self.docker).await {
            return None;
        }
        self.docker
            .start_sandbox(&self.agent, network, &image.name)
            .await
            .inspect_err(|err| tracing::warn!(network, error = %err, "no sandbox: this network's runs get endpoints of their own"))
            .ok()
    }

    /// Removes a network and its sandbox.
    async fn discard(&self, network: RunNetwork) {
        if let Some(sandbox) = &network.sandbox {
            self.docker.remove_container(&sandbox.id).await;
        }
        self.docker.remove_network(&network.name).await;
    }

    /// Takes the network back once the run's containers are removed; `take` checks it before it is
    /// lent again. `clean`: every container of the run is gone (one that joined the sandbox does
    /// not show on the network, so only the run can tell).
    pub async fn give_back(self: &Arc<Self>, network: RunNetwork, clean: bool) {
        self.room().lent -= 1;
        if clean && network.reusable {
            let surplus = {
                let mut idle = self.idle();
                idle.push((network, Instant::now()));
                idle.len() > self.keep
            };
            if surplus {
                let networks = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(networks.linger).await;
                    networks.trim().await;
                });
            }
        } else {
            self.discard(network).await;
        }
        self.freed.notify_waiters();
    }

    /// Removes the idle networks beyond the kept ones that have been idle for `linger`, oldest
    /// first.
    async fn trim(&self) {
        let expired: Vec<RunNetwork> = {
            let mut idle = self.idle();
            let surplus = idle.len().saturating_sub(self.keep);
            let expired = idle.iter().take(surplus).take_while(|(_, since)| since.elapsed() >= self.linger).count();
            idle.drain(..expired).map(|(network, _)| network).collect()
        };
        for network in expired {
            self.discard(network).await;
        }
    }

    /// Removes the idle networks and their sandboxes (at shutdown).
    pub async fn clear(&self) {
        let idle = std::mem::take(&mut *self.idle());
        for (network, _) in idle {
            self.discard(network).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
