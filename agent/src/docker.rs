//! The agent's only door to Docker. Everything it creates is labelled as CIMaster's (agent, job,
//! run, attempt) and removed explicitly.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, ListContainersOptions, ListNetworksOptions,
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures::{Stream, StreamExt};

pub const LABEL_AGENT: &str = "cimaster.agent";
pub const LABEL_JOB: &str = "cimaster.job";
pub const LABEL_RUN: &str = "cimaster.run";
pub const LABEL_ATTEMPT: &str = "cimaster.attempt";

/// Output of the job container, as the engine delivers it.
pub enum Chunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

pub type Output = Pin<Box<dyn Stream<Item = Result<Chunk, BollardError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine: {0}")]
    Connect(#[source] BollardError),
    #[error("image `{image}` is not present and pulling it failed: {source}")]
    Pull { image: String, source: BollardError },
    #[error("creating network {name} failed: {source}")]
    CreateNetwork { name: String, source: BollardError },
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
    #[error("listing leftovers failed: {0}")]
    List(#[source] BollardError),
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

/// A job container to create.
pub struct JobContainer {
    pub image: String,
    pub script: String,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub nano_cpus: i64,
    pub memory_bytes: i64,
    pub network: String,
}

#[derive(Clone)]
pub(crate) struct DockerClient {
    docker: Docker,
    credentials: Option<DockerCredentials>,
}

impl DockerClient {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket). `credentials` are used
    /// for pulls.
    pub async fn connect(credentials: Option<(String, String)>) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults().map_err(DockerError::Connect)?;
        docker.ping().await.map_err(DockerError::Connect)?;
        let credentials = credentials.map(|(username, password)| DockerCredentials {
            username: Some(username),
            password: Some(password),
            ..Default::default()
        });
        Ok(Self { docker, credentials })
    }

    /// Uses the image if present, pulls it otherwise.
    pub async fn ensure_image(&self, image: &str) -> Result<(), DockerError> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let options = CreateImageOptions { from_image: Some(image.to_owned()), ..Default::default() };
        let mut pull = self.docker.create_image(Some(options), None, self.credentials.clone());
        while let Some(progress) = pull.next().await {
            progress.map_err(|source| DockerError::Pull { image: image.to_owned(), source })?;
        }
        Ok(())
    }

    pub async fn create_network(&self, labels: &RunLabels) -> Result<String, DockerError> {
        let name = labels.name();
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(labels.map()),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map_err(|source| DockerError::CreateNetwork { name: name.clone(), source })?;
        Ok(name)
    }

    /// Creates and starts the job container: unprivileged, no mounts, no published ports, limited.
    /// Its output is attached before it starts, so nothing is missed, and goes only to the agent
    /// (the engine keeps no log file that could rotate lines away).
    pub async fn start_job(&self, labels: &RunLabels, spec: JobContainer) -> Result<(String, Output), DockerError> {
        let host_config = HostConfig {
            nano_cpus: Some(spec.nano_cpus),
            memory: Some(spec.memory_bytes),
            memory_swap: Some(spec.memory_bytes),
            pids_limit: Some(4096),
            privileged: Some(false),
            network_mode: Some(spec.network.clone()),
            cap_drop: Some(vec!["NET_RAW".to_owned(), "MKNOD".to_owned(), "SYS_CHROOT".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            log_config: Some(HostConfigLogConfig { typ: Some("none".to_owned()), config: None }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image),
            cmd: Some(vec!["sh".to_owned(), "-c".to_owned(), spec.script]),
            env: Some(spec.env),
            working_dir: spec.working_dir,
            labels: Some(labels.map()),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(labels.name()), ..Default::default() };
        let created = self.docker.create_container(Some(options), body).await.map_err(DockerError::CreateContainer)?;
        let attach = AttachContainerOptions { stream: true, stdout: true, stderr: true, ..Default::default() };
        let attached = match self.docker.attach_container(&created.id, Some(attach)).await {
            Ok(attached) => attached,
            Err(err) => {
                self.remove(Some(&created.id), None).await;
                return Err(DockerError::Attach(err));
            }
        };
        if let Err(err) =
            self.docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await
        {
            self.remove(Some(&created.id), None).await;
            return Err(DockerError::StartContainer(err));
        }
        let output: Output = Box::pin(attached.output.map(|item| {
            item.map(|output| match output {
                LogOutput::StdErr { message } => Chunk::Stderr(message),
                LogOutput::StdOut { message } | LogOutput::Console { message } | LogOutput::StdIn { message } => {
                    Chunk::Stdout(message)
                }
            })
        }));
        Ok((created.id, output))
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
        let options = StopContainerOptions { t: Some(grace.as_secs() as i32), signal: None };
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(source) => Err(DockerError::Stop { id: id.to_owned(), source }),
        }
    }

    /// Removes a container and a network, logging (not failing) on errors: cleanup is best effort
    /// here and complete at the next sweep.
    pub async fn remove(&self, container: Option<&str>, network: Option<&str>) {
        if let Some(id) = container {
            let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
            if let Err(err) = self.docker.remove_container(id, Some(options)).await {
                tracing::warn!(container = id, error = %err, "cannot remove container");
            }
        }
        if let Some(name) = network {
            if let Err(err) = self.docker.remove_network(name).await {
                tracing::warn!(network = name, error = %err, "cannot remove network");
            }
        }
    }

    /// Removes every container and network labelled with this agent id (left by an earlier crash),
    /// or with one run when `run` is given. Returns how many containers it removed.
    pub async fn sweep(&self, agent: &str, run: Option<&str>) -> Result<usize, DockerError> {
        let mut label = vec![format!("{LABEL_AGENT}={agent}")];
        if let Some(run) = run {
            label.push(format!("{LABEL_RUN}={run}"));
        }
        let filters = HashMap::from([("label".to_owned(), label)]);
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .map_err(DockerError::List)?;
        for container in &containers {
            self.remove(container.id.as_deref(), None).await;
        }
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
            .await
            .map_err(DockerError::List)?;
        for network in networks {
            self.remove(None, network.name.as_deref()).await;
        }
        Ok(containers.len())
    }
}
