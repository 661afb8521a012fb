//! Git's side of the engine: mirror volumes, the workspaces volume, and the git helper containers
//! that check runs out of a mirror by `exec`.

use std::collections::HashMap;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum, VolumeCreateOptions};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, RemoveVolumeOptions};
use futures::StreamExt;

use super::{chunks, confined, DockerClient, DockerError, Output, LABEL_AGENT, LABEL_GIT_HELPER, LABEL_MIRROR};
use crate::telemetry::Timer;

/// Where the git helper (read-write) and the run's containers (read-only) see the mirror.
pub const MIRROR_PATH: &str = "/cimaster/mirror";
/// Where the git helpers see the agent's workspaces volume; a run's workspace is a directory in it.
pub const WORKSPACES_PATH: &str = "/workspaces";

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

impl DockerClient {
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
            mounts: Some(vec![volume(helper.mirror, MIRROR_PATH), volume(helper.workspaces, WORKSPACES_PATH)]),
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
        self.start_sleeper(helper.name, body).await.map_err(DockerError::GitHelper)
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
}
