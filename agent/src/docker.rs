//! The agent's only door to Docker. Everything it creates is labelled as CIMaster's (agent, job,
//! run, attempt) and removed explicitly.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, HostConfigLogConfig, Ipam, IpamConfig, Mount, MountTypeEnum,
    NetworkCreateRequest, NetworkingConfig, VolumeCreateOptions,
};
use bollard::query_parameters::{
    AttachContainerOptions, BuildImageOptions, CreateContainerOptions, CreateImageOptions,
    DownloadFromContainerOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions,
    ListNetworksOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
    WaitContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures::{Stream, StreamExt};

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

/// What a build may use: the run's CPUs and memory, on the run's network.
pub struct BuildLimits {
    pub cpus: f64,
    pub memory: u64,
    pub network: String,
}

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
    #[error("starting the script failed: {0}")]
    Gate(#[source] std::io::Error),
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

/// A container of an attempt to create: the job itself, a sidecar service or a readiness probe.
#[derive(Default)]
pub struct JobContainer {
    /// Suffix of the container's name after the attempt's (`cimaster-RUN-ATTEMPT`); empty for the job.
    pub role: String,
    pub image: String,
    /// Script run by `sh -c`; the image's own command when absent.
    pub script: Option<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub nano_cpus: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub network: String,
    /// DNS names of the container on the run's network.
    pub aliases: Vec<String>,
    /// The run's workspace: a directory on the engine's host (in the agent's workspaces volume),
    /// mounted at /workspace.
    pub workspace: Option<String>,
    /// The repository's mirror volume, mounted read-only at `MIRROR_PATH`.
    pub mirror: Option<String>,
    /// Whether the script waits for [`Gate::open`] before it starts.
    pub gated: bool,
}

/// A started job container's script waits behind this: its stdin, which gets one line and then
/// its end when the run is ready for the script.
pub struct Gate(Pin<Box<dyn tokio::io::AsyncWrite + Send>>);

impl Gate {
    /// The script that waits for the gate, then runs `script` as `sh -c` would.
    fn wrap(script: String) -> Vec<String> {
        ["sh", "-c", r#"read -r _ || :; exec sh -c "$1""#, "sh"]
            .into_iter()
            .map(str::to_owned)
            .chain([script])
            .collect()
    }

    /// Lets the script start; it finds its stdin at its end.
    pub async fn open(mut self) -> Result<(), DockerError> {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(b"\n").await.map_err(DockerError::Gate)?;
        self.0.shutdown().await.map_err(DockerError::Gate)
    }
}

/// A container started, its output, and its gate when it has one.
pub struct Started {
    pub id: String,
    pub output: Output,
    pub gate: Option<Gate>,
}

/// A mirror's git helper to keep running: the mirror writable at `MIRROR_PATH`, the agent's
/// workspaces at `WORKSPACES_PATH`.
pub struct GitHelper<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub mirror: &'a str,
    pub workspaces: &'a str,
    pub cpus: f64,
    pub memory: u64,
}

#[derive(Clone)]
pub(crate) struct DockerClient {
    docker: Docker,
    registries: RegistryAuths,
}

impl DockerClient {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket). Pulls and builds carry
    /// `registries`' credentials, each to its own registry.
    pub async fn connect(registries: RegistryAuths) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults().map_err(DockerError::Connect)?;
        docker.ping().await.map_err(DockerError::Connect)?;
        Ok(Self { docker, registries })
    }

    /// Uses the image if present, pulls it otherwise.
    pub async fn ensure_image(&self, image: &str) -> Result<(), DockerError> {
        let _timer = Timer::docker("ensure_image");
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let options = CreateImageOptions { from_image: Some(image.to_owned()), ..Default::default() };
        let mut pull = self.docker.create_image(Some(options), None, self.registries.for_image(image));
        while let Some(progress) = pull.next().await {
            progress.map_err(|source| DockerError::Pull { image: image.to_owned(), source })?;
        }
        Ok(())
    }

    /// A network for this attempt only, labelled with the run; on `subnet` when given.
    pub async fn create_network(&self, labels: &RunLabels, subnet: Option<String>) -> Result<String, DockerError> {
        let _timer = Timer::docker("create_network");
        self.create_bridge(labels.name(), labels.map(), subnet).await
    }

    /// A bridge network any run of `agent` may borrow (one run at a time): labelled with the agent,
    /// not with a run.
    pub async fn create_reusable_network(&self, agent: &str, subnet: Option<String>) -> Result<String, DockerError> {
        let name = format!("cimaster-net-{}", uuid::Uuid::new_v4().simple());
        let labels =
            HashMap::from([(LABEL_AGENT.to_owned(), agent.to_owned()), (LABEL_REUSABLE.to_owned(), "true".to_owned())]);
        self.create_bridge(name, labels, subnet).await
    }

    async fn create_bridge(
        &self,
        name: String,
        labels: HashMap<String, String>,
        subnet: Option<String>,
    ) -> Result<String, DockerError> {
        let ipam = subnet.clone().map(|subnet| Ipam {
            config: Some(vec![IpamConfig { subnet: Some(subnet), ..Default::default() }]),
            ..Default::default()
        });
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(labels),
            ipam,
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(name),
            // The engine's answer when the subnet overlaps a network it already has.
            Err(BollardError::DockerResponseServerError { status_code: 403, message })
                if message.contains("overlaps") && subnet.is_some() =>
            {
                Err(DockerError::SubnetTaken(subnet.unwrap_or_default()))
            }
            // The engine's answer when its default address pools are used up.
            Err(BollardError::DockerResponseServerError { message, .. })
                if message.contains("non-overlapping IPv4 address pool") =>
            {
                Err(DockerError::AddressPoolsExhausted)
            }
            Err(source) => Err(DockerError::CreateNetwork { name, source }),
        }
    }

    /// How many containers are attached to the network; `None` when it cannot be inspected.
    pub async fn network_endpoints(&self, name: &str) -> Option<usize> {
        let network = self.docker.inspect_network(name, None::<InspectNetworkOptions>).await.ok()?;
        Some(network.containers.map_or(0, |containers| containers.len()))
    }

    /// Creates and starts the job container: unprivileged, no mounts, no published ports, limited.
    /// Its output is attached before it starts, so nothing is missed, and goes only to the agent
    /// (the engine keeps no log file that could rotate lines away).
    pub async fn start_job(&self, labels: &RunLabels, spec: JobContainer) -> Result<Started, DockerError> {
        let _timer = Timer::docker("start_container");
        let gated = spec.gated;
        let mounts: Vec<Mount> = spec
            .mirror
            .map(|volume| Mount {
                target: Some(crate::mirrors::MIRROR_PATH.to_owned()),
                source: Some(volume),
                typ: Some(MountTypeEnum::VOLUME),
                read_only: Some(true),
                ..Default::default()
            })
            .into_iter()
            .collect();
        let host_config = HostConfig {
            mounts: (!mounts.is_empty()).then_some(mounts),
            // The engine makes the directory if the checkout has not yet.
            binds: spec.workspace.map(|dir| vec![format!("{dir}:{}", crate::plan::WORKSPACE)]),
            network_mode: Some(spec.network.clone()),
            ..confined(spec.nano_cpus, spec.memory_bytes)
        };
        let networking_config = (!spec.aliases.is_empty()).then(|| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                spec.network.clone(),
                EndpointSettings { aliases: Some(spec.aliases.clone()), ..Default::default() },
            )])),
        });
        let cmd = match spec.script {
            Some(script) if gated => Some(Gate::wrap(script)),
            Some(script) => Some(vec!["sh".to_owned(), "-c".to_owned(), script]),
            None => None,
        };
        let body = ContainerCreateBody {
            image: Some(spec.image),
            cmd,
            env: Some(spec.env),
            working_dir: spec.working_dir,
            labels: Some(labels.map()),
            host_config: Some(host_config),
            networking_config,
            open_stdin: gated.then_some(true),
            stdin_once: gated.then_some(true),
            attach_stdin: gated.then_some(true),
            ..Default::default()
        };
        let name = if spec.role.is_empty() { labels.name() } else { format!("{}-{}", labels.name(), spec.role) };
        let options = CreateContainerOptions { name: Some(name), ..Default::default() };
        let created = self.docker.create_container(Some(options), body).await.map_err(DockerError::CreateContainer)?;
        let attach =
            AttachContainerOptions { stream: true, stdin: gated, stdout: true, stderr: true, ..Default::default() };
        let attached = match self.docker.attach_container(&created.id, Some(attach)).await {
            Ok(attached) => attached,
            Err(err) => {
                self.remove_container(&created.id).await;
                return Err(DockerError::Attach(err));
            }
        };
        if let Err(err) =
            self.docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await
        {
            self.remove_container(&created.id).await;
            return Err(DockerError::StartContainer(err));
        }
        Ok(Started { id: created.id, output: chunks(attached.output), gate: gated.then(|| Gate(attached.input)) })
    }

    /// The mirror's git helper, started if it is not running: its container id.
    pub async fn git_helper(&self, agent: &str, helper: GitHelper<'_>) -> Result<String, DockerError> {
        let inspected = self.docker.inspect_container(helper.name, None::<InspectContainerOptions>).await;
        if let Ok(container) = &inspected {
            if container.state.as_ref().and_then(|state| state.running) == Some(true) {
                return Ok(container.id.clone().unwrap_or_else(|| helper.name.to_owned()));
            }
            self.remove_container(helper.name).await;
        }
        let _timer = Timer::docker("start_container");
        let volume = |source: &str, target: &str| Mount {
            target: Some(target.to_owned()),
            source: Some(source.to_owned()),
            typ: Some(MountTypeEnum::VOLUME),
            ..Default::default()
        };
        let host_config = HostConfig {
            mounts: Some(vec![
                volume(helper.mirror, crate::mirrors::MIRROR_PATH),
                volume(helper.workspaces, crate::mirrors::WORKSPACES_PATH),
            ]),
            ..confined(Some((helper.cpus * 1e9) as i64), Some(i64::try_from(helper.memory).unwrap_or(i64::MAX)))
        };
        let labels = HashMap::from([
            (LABEL_AGENT.to_owned(), agent.to_owned()),
            (LABEL_GIT_HELPER.to_owned(), helper.mirror.to_owned()),
        ]);
        let body = ContainerCreateBody {
            image: Some(helper.image.to_owned()),
            cmd: Some(vec!["sleep".to_owned(), "infinity".to_owned()]),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(helper.name.to_owned()), ..Default::default() };
        let created = self.docker.create_container(Some(options), body).await.map_err(DockerError::GitHelper)?;
        if let Err(err) =
            self.docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await
        {
            self.remove_container(&created.id).await;
            return Err(DockerError::GitHelper(err));
        }
        Ok(created.id)
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
    /// complete at the next sweep.
    pub async fn remove_container(&self, id: &str) {
        let _timer = Timer::docker("remove_container");
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        if let Err(err) = self.docker.remove_container(id, Some(options)).await {
            tracing::warn!(container = id, error = %err, "cannot remove container");
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

    /// A repository's mirror volume of this agent: created the first time, the same one after.
    pub async fn mirror_volume(&self, agent: &str, name: &str) -> Result<String, DockerError> {
        let _timer = Timer::docker("create_volume");
        let labels =
            HashMap::from([(LABEL_AGENT.to_owned(), agent.to_owned()), (LABEL_MIRROR.to_owned(), "true".to_owned())]);
        let request = VolumeCreateOptions { name: Some(name.to_owned()), labels: Some(labels), ..Default::default() };
        let volume = self.docker.create_volume(request).await.map_err(DockerError::Volume)?;
        Ok(volume.name)
    }

    /// This agent's mirror volumes: name, bytes on disk, and when each was created (seconds since
    /// the epoch; now when the engine does not say).
    pub async fn mirror_volumes(&self, agent: &str) -> Result<Vec<(String, u64, i64)>, DockerError> {
        let mut tries = 0;
        let usage = loop {
            match self.docker.df(None).await {
                Ok(usage) => break usage,
                // The engine counts disk usage for one caller at a time (another agent, `docker system df`).
                Err(err) if tries < 40 && err.to_string().contains("already running") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(err) => return Err(DockerError::List(err)),
            }
        };
        let now = chrono::Utc::now().timestamp();
        Ok(usage
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter(|volume| {
                volume.labels.get(LABEL_AGENT).map(String::as_str) == Some(agent)
                    && volume.labels.contains_key(LABEL_MIRROR)
            })
            .map(|volume| {
                let size = volume.usage_data.map_or(0, |usage| u64::try_from(usage.size).unwrap_or(0));
                (volume.name, size, now)
            })
            .collect())
    }

    /// Removes a volume no container uses; `false` when it is in use or cannot be removed.
    pub async fn remove_volume_if_unused(&self, name: &str) -> bool {
        let _timer = Timer::docker("remove_volume");
        self.docker.remove_volume(name, Some(RemoveVolumeOptions { force: false })).await.is_ok()
    }

    pub async fn image_exists(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    /// Builds `tag` from a tar of the build context, passing each line of build output to `line`.
    pub async fn build_image(
        &self,
        context: Bytes,
        dockerfile: &str,
        tag: &str,
        labels: HashMap<String, String>,
        limits: BuildLimits,
        mut line: impl FnMut(String),
    ) -> Result<(), DockerError> {
        let _timer = Timer::docker("build_image");
        let memory = i32::try_from(limits.memory).unwrap_or(i32::MAX);
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(tag.to_owned()),
            rm: true,
            forcerm: true,
            labels: Some(labels),
            memory: Some(memory),
            memswap: Some(memory),
            cpuperiod: Some(100_000),
            cpuquota: Some((limits.cpus * 100_000.0) as i32),
            networkmode: Some(limits.network),
            ..Default::default()
        };
        let mut build =
            self.docker.build_image(options, self.registries.for_build(), Some(bollard::body_full(context)));
        while let Some(info) = build.next().await {
            let info = info.map_err(|err| DockerError::Build(err.to_string()))?;
            if let Some(error) = info.error {
                return Err(DockerError::Build(error));
            }
            if let Some(text) = info.stream.or(info.status) {
                for part in text.lines().filter(|part| !part.trim().is_empty()) {
                    line(part.to_owned());
                }
            }
        }
        if self.image_exists(tag).await {
            Ok(())
        } else {
            Err(DockerError::Build(format!("the engine ended the build without an image tagged {tag}")))
        }
    }

    /// A tar stream of `path` in a container (running or stopped), as `docker cp` gives it.
    pub fn download(&self, id: &str, path: &str) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        self.docker
            .download_from_container(id, Some(DownloadFromContainerOptions { path: path.to_owned() }))
            .map(|chunk| chunk.map_err(std::io::Error::other))
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

    /// Runs `cmd` inside a running container; its exit code.
    pub async fn exec(&self, id: &str, cmd: Vec<String>, env: Vec<String>) -> Result<i64, DockerError> {
        let (exec, mut output) = self.exec_attached(id, cmd, env).await?;
        while output.next().await.is_some() {}
        self.exec_exit(&exec).await
    }

    /// Starts `cmd` inside a running container: the exec's id (for [`Self::exec_exit`]) and its
    /// output, which ends when the command does.
    pub async fn exec_attached(
        &self,
        id: &str,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<(String, Output), DockerError> {
        let options = CreateExecOptions {
            cmd: Some(cmd),
            env: Some(env),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec = self.docker.create_exec(id, options).await.map_err(DockerError::Exec)?;
        match self.docker.start_exec(&exec.id, None).await.map_err(DockerError::Exec)? {
            StartExecResults::Attached { output, .. } => Ok((exec.id, chunks(output))),
            StartExecResults::Detached => Ok((exec.id, Box::pin(futures::stream::empty()))),
        }
    }

    /// The exit code of an exec whose output has ended.
    pub async fn exec_exit(&self, exec: &str) -> Result<i64, DockerError> {
        let inspected = self.docker.inspect_exec(exec).await.map_err(DockerError::Exec)?;
        Ok(inspected.exit_code.unwrap_or(-1))
    }

    /// The agent's volume of run workspaces (made the first time): its name and its directory on
    /// the engine's host, under which each run's workspace is bind-mounted into its containers.
    pub async fn workspaces_volume(&self, agent: &str) -> Result<(String, String), DockerError> {
        let _timer = Timer::docker("create_volume");
        let request = VolumeCreateOptions {
            name: Some(format!("cimaster-workspaces-{agent}")),
            labels: Some(HashMap::from([(LABEL_AGENT.to_owned(), agent.to_owned())])),
            ..Default::default()
        };
        let volume = self.docker.create_volume(request).await.map_err(DockerError::Volume)?;
        Ok((volume.name, volume.mountpoint))
    }

    /// This agent's git helper containers.
    pub async fn git_helpers(&self, agent: &str) -> Result<Vec<String>, DockerError> {
        let labels = vec![format!("{LABEL_AGENT}={agent}"), LABEL_GIT_HELPER.to_owned()];
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let containers = self.docker.list_containers(Some(options)).await.map_err(DockerError::List)?;
        Ok(containers.into_iter().filter_map(|container| container.id).collect())
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

/// What every container the agent starts gets: CPU, memory (no swap) and pids limits, no privileges,
/// dropped capabilities, no engine log file (output is attached), and Docker's init as PID 1: it
/// passes SIGTERM on to the script (a shell as PID 1 ignores it) and reaps orphans, so a stop takes
/// as long as the script needs, not the grace.
fn confined(nano_cpus: Option<i64>, memory: Option<i64>) -> HostConfig {
    HostConfig {
        nano_cpus,
        memory,
        memory_swap: memory,
        pids_limit: Some(4096),
        init: Some(true),
        privileged: Some(false),
        cap_drop: Some(vec!["NET_RAW".to_owned(), "MKNOD".to_owned(), "SYS_CHROOT".to_owned()]),
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
