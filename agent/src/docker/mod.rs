//! The agent's only door to Docker. Everything it creates is labelled as CIMaster's (agent, job,
//! run, attempt) and removed explicitly.

mod egress;
mod git;
mod image;
mod job;
mod network;
mod warden;

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    CreateContainerOptions, DownloadFromContainerOptions, InspectContainerOptions, ListContainersOptions,
    ListNetworksOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions, StartContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures::{Stream, StreamExt};

pub use git::{GitHelper, MIRROR_PATH, WORKSPACES_PATH};
pub use image::BuildLimits;
pub use job::{JobContainer, Started};
pub use network::Sandbox;
pub use warden::StartedWarden;

use crate::registry::RegistryAuths;
use crate::telemetry::Timer;

pub const LABEL_AGENT: &str = "cimaster.agent";
/// A git mirror volume: kept by the start-up sweep.
pub const LABEL_MIRROR: &str = "cimaster.mirror";
/// A mirror's git helper: the container, kept running, that checks out runs from it.
pub const LABEL_GIT_HELPER: &str = "cimaster.git-helper";
pub const LABEL_JOB: &str = "cimaster.job";
pub const LABEL_RUN: &str = "cimaster.run";
pub const LABEL_ATTEMPT: &str = "cimaster.attempt";
/// Marks a network this agent lends to its runs one at a time (see `networks`).
pub const LABEL_REUSABLE: &str = "cimaster.reusable";
/// A reusable network's sandbox: the container that holds the network namespace its runs join.
pub const LABEL_SANDBOX: &str = "cimaster.sandbox";

/// Output of the job container, as the engine delivers it.
pub enum Chunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

pub type Output = Pin<Box<dyn Stream<Item = Result<Chunk, DockerError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine: {0}")]
    Connect(#[source] BollardError),
    #[error("image `{image}` is not present and pulling it failed: {source}")]
    Pull { image: String, source: BollardError },
    #[error("creating network {name} failed: {source}")]
    CreateNetwork { name: String, source: BollardError },
    #[error("subnet {0} is taken by another network")]
    SubnetTaken(String),
    #[error("no free subnet is left in CIMASTER_AGENT_NETWORK_POOL ({0} tried)")]
    SubnetsExhausted(u32),
    #[error(
        "the Docker engine has no address pool left for another network (its default-address-pools allow about \
         31 bridge networks): set CIMASTER_AGENT_NETWORK_POOL, or widen default-address-pools in daemon.json"
    )]
    AddressPoolsExhausted,
    #[error("creating the job container failed: {0}")]
    CreateContainer(#[source] BollardError),
    #[error("attaching to the job container failed: {0}")]
    Attach(#[source] BollardError),
    #[error("starting the job container failed: {0}")]
    StartContainer(#[source] BollardError),
    #[error("waiting for the job container failed: {0}")]
    Wait(#[source] BollardError),
    #[error("stopping container {id} failed: {source}")]
    Stop { id: String, source: BollardError },
    #[error("creating the workspace volume failed: {0}")]
    Volume(#[source] BollardError),
    #[error("building the image failed: {0}")]
    Build(String),
    #[error("listing leftovers failed: {0}")]
    List(#[source] BollardError),
    #[error("the container's output broke off: {0}")]
    Output(#[source] BollardError),
    #[error("running a command in the container failed: {0}")]
    Exec(#[source] BollardError),
    #[error("starting the mirror's git helper failed: {0}")]
    GitHelper(#[source] BollardError),
    #[error("starting a network's sandbox failed: {0}")]
    Sandbox(#[source] BollardError),
    #[error("starting the script failed: {0}")]
    Gate(#[source] std::io::Error),
    #[error("starting a helper in the engine host's network namespace failed: {0}")]
    HostHelper(#[source] BollardError),
    #[error("starting the agent's warden failed: {0}")]
    Warden(#[source] BollardError),
    #[error("the egress rules could not be set (exit {code}): {output}")]
    Egress { code: i64, output: String },
}

impl DockerError {
    /// Whether no more networks can be made now (the agent's subnet pool or the engine's pools).
    pub fn no_network_left(&self) -> bool {
        matches!(self, DockerError::SubnetsExhausted(_) | DockerError::AddressPoolsExhausted)
    }
}

/// Labels of one attempt's resources.
#[derive(Debug, Clone)]
pub struct RunLabels {
    pub agent: String,
    pub job: String,
    pub run: String,
    pub attempt: u32,
}

impl RunLabels {
    fn map(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_AGENT.to_owned(), self.agent.clone()),
            (LABEL_JOB.to_owned(), self.job.clone()),
            (LABEL_RUN.to_owned(), self.run.clone()),
            (LABEL_ATTEMPT.to_owned(), self.attempt.to_string()),
        ])
    }

    pub fn name(&self) -> String {
        format!("cimaster-{}-{}", self.run, self.attempt)
    }
}

#[derive(Clone)]
pub(crate) struct DockerClient {
    docker: Docker,
    registries: RegistryAuths,
    /// Whether the bridges it makes are named for the egress rules (`cimbr…`); an agent that runs
    /// without them makes bridges the rules do not know.
    egress_bridges: bool,
}

impl DockerClient {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket). Pulls and builds carry
    /// `registries`' credentials, each to its own registry.
    pub async fn connect(registries: RegistryAuths) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults().map_err(DockerError::Connect)?;
        docker.ping().await.map_err(DockerError::Connect)?;
        Ok(Self { docker, registries, egress_bridges: true })
    }

    /// Whether the bridges it makes fall under the engine's egress rules (see `crate::egress`).
    pub fn with_egress_bridges(mut self, on: bool) -> Self {
        self.egress_bridges = on;
        self
    }

    /// Whether the engine remaps user namespaces (`userns-remap` in its security options).
    pub async fn userns_remap(&self) -> bool {
        match self.docker.info().await {
            Ok(info) => info.security_options.unwrap_or_default().iter().any(|option| option.contains("name=userns")),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the engine's security options");
                false
            }
        }
    }

    /// The container's exit code once it stops.
    pub async fn wait(&self, id: &str) -> Result<i64, DockerError> {
        let mut wait = self.docker.wait_container(id, Some(WaitContainerOptions { condition: "not-running".into() }));
        match wait.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(err)) => Err(DockerError::Wait(err)),
            None => Err(DockerError::Wait(BollardError::DockerStreamError { error: "wait ended early".into() })),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let _timer = Timer::docker("stop_container");
        let options = StopContainerOptions { t: Some(grace.as_secs() as i32), signal: None };
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(source) => Err(DockerError::Stop { id: id.to_owned(), source }),
        }
    }

    /// Removes a container, logging (not failing) on errors: cleanup is best effort here and
    /// complete at the next sweep. Whether the container is gone.
    pub async fn remove_container(&self, id: &str) -> bool {
        let _timer = Timer::docker("remove_container");
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => true,
            Err(err) => {
                tracing::warn!(container = id, error = %err, "cannot remove container");
                false
            }
        }
    }

    pub async fn remove_network(&self, name: &str) {
        let _timer = Timer::docker("remove_network");
        if let Err(err) = self.docker.remove_network(name).await {
            tracing::warn!(network = name, error = %err, "cannot remove network");
        }
    }

    pub async fn remove_volume(&self, name: &str) {
        let _timer = Timer::docker("remove_volume");
        if let Err(err) = self.docker.remove_volume(name, Some(RemoveVolumeOptions { force: true })).await {
            tracing::warn!(volume = name, error = %err, "cannot remove volume");
        }
    }

    /// A tar stream of `path` in a container (running or stopped), as `docker cp` gives it.
    pub fn download(&self, id: &str, path: &str) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        self.docker
            .download_from_container(id, Some(DownloadFromContainerOptions { path: path.to_owned() }))
            .map(|chunk| chunk.map_err(std::io::Error::other))
    }

    /// Creates and starts a container that only waits (a git helper, a network's sandbox) under
    /// `name`; removes it again when it cannot be started. Its id.
    async fn start_sleeper(&self, name: &str, body: ContainerCreateBody) -> Result<String, BollardError> {
        let options = CreateContainerOptions { name: Some(name.to_owned()), ..Default::default() };
        let created = self.docker.create_container(Some(options), body).await?;
        if let Err(err) = self.docker.start_container(&created.id, None::<StartContainerOptions>).await {
            self.remove_container(&created.id).await;
            return Err(err);
        }
        Ok(created.id)
    }

    /// Whether the container still runs, and its exit code when it does not.
    pub async fn exited(&self, id: &str) -> Option<i64> {
        let inspected = self.docker.inspect_container(id, None::<InspectContainerOptions>).await.ok()?;
        let state = inspected.state?;
        if state.running == Some(true) {
            None
        } else {
            Some(state.exit_code.unwrap_or(-1))
        }
    }

    /// Removes every container, volume and network labelled with this agent id (left by an earlier
    /// crash). Returns how many containers it removed.
    pub async fn sweep(&self, agent: &str) -> Result<usize, DockerError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_AGENT}={agent}")])]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .map_err(DockerError::List)?;
        for id in containers.iter().filter_map(|container| container.id.as_deref()) {
            self.remove_container(id).await;
        }
        let volumes = self
            .docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(filters.clone()) }))
            .await
            .map_err(DockerError::List)?;
        // Git mirrors stay: they are what makes the next checkout of their repository fast.
        for volume in volumes.volumes.unwrap_or_default().into_iter().filter(|v| !v.labels.contains_key(LABEL_MIRROR)) {
            self.remove_volume(&volume.name).await;
        }
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
            .await
            .map_err(DockerError::List)?;
        for name in networks.iter().filter_map(|network| network.name.as_deref()) {
            self.remove_network(name).await;
        }
        Ok(containers.len())
    }
}

/// The capabilities a container keeps: what a build as root needs (own and chown files, switch
/// user, signal its processes, bind a port below 1024). Docker's default set adds raw sockets,
/// device nodes, chroot, file capabilities, capability changes and audit writes, which no build
/// needs.
pub const CAPABILITIES: [&str; 8] =
    ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"];

/// What every container the agent starts gets: CPU, memory (no swap) and pids limits, no privileges,
/// no capability but [`CAPABILITIES`] and no way to gain one, no engine log file (output is
/// attached), and Docker's init as PID 1: it passes SIGTERM on to the script (a shell as PID 1
/// ignores it) and reaps orphans, so a stop takes as long as the script needs, not the grace.
fn confined(nano_cpus: Option<i64>, memory: Option<i64>) -> HostConfig {
    HostConfig {
        nano_cpus,
        memory,
        memory_swap: memory,
        pids_limit: Some(4096),
        init: Some(true),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(CAPABILITIES.iter().map(|cap| (*cap).to_owned()).collect()),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        log_config: Some(HostConfigLogConfig { typ: Some("none".to_owned()), config: None }),
        ..Default::default()
    }
}

/// The engine's output frames as the agent's chunks.
fn chunks(output: impl Stream<Item = Result<LogOutput, BollardError>> + Send + 'static) -> Output {
    Box::pin(output.map(|item| {
        item.map_err(DockerError::Output).map(|output| match output {
            LogOutput::StdErr { message } => Chunk::Stderr(message),
            LogOutput::StdOut { message } | LogOutput::Console { message } | LogOutput::StdIn { message } => {
                Chunk::Stdout(message)
            }
        })
    }))
}
