//! An attempt's containers: the job itself, its sidecars and their probes.

use std::collections::HashMap;
use std::pin::Pin;

use bollard::models::{ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountTypeEnum, NetworkingConfig};
use bollard::query_parameters::{AttachContainerOptions, CreateContainerOptions};

use super::{chunks, confined, DockerClient, DockerError, Output, RunLabels, Sandbox};
use crate::telemetry::Timer;

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
    /// The user the script runs as; the image's when `None`.
    pub user: Option<String>,
    pub nano_cpus: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub network: String,
    /// The network's sandbox, whose namespace the container joins instead of the network.
    pub sandbox: Option<Sandbox>,
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

impl DockerClient {
    /// Creates and starts the job container: unprivileged, no mounts, no published ports, limited.
    /// Its output is attached before it starts, so nothing is missed, and goes only to the agent
    /// (the engine keeps no log file that could rotate lines away).
    pub async fn start_job(&self, labels: &RunLabels, spec: JobContainer) -> Result<Started, DockerError> {
        let _timer = Timer::docker("start_container");
        let gated = spec.gated;
        let mounts: Vec<Mount> = spec
            .mirror
            .map(|volume| Mount {
                target: Some(super::MIRROR_PATH.to_owned()),
                source: Some(volume),
                typ: Some(MountTypeEnum::VOLUME),
                read_only: Some(true),
                ..Default::default()
            })
            .into_iter()
            .collect();
        // The engine makes the workspace's directory if the checkout has not yet.
        let workspace = spec.workspace.map(|dir| format!("{dir}:{}", crate::plan::WORKSPACE));
        let sandbox_files = spec.sandbox.iter().flat_map(Sandbox::binds);
        let binds: Vec<String> = workspace.into_iter().chain(sandbox_files).collect();
        let host_config = HostConfig {
            mounts: (!mounts.is_empty()).then_some(mounts),
            binds: (!binds.is_empty()).then_some(binds),
            network_mode: Some(spec.sandbox.as_ref().map_or_else(|| spec.network.clone(), Sandbox::network_mode)),
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
            user: spec.user,
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
}
