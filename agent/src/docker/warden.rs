//! The warden's container (see `crate::warden`): the agent's git image running the warden script,
//! with the engine's API socket and nothing else — no network, no workspace, outside every run's
//! namespaces — its stdin attached to the agent.

use std::collections::HashMap;
use std::pin::Pin;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{AttachContainerOptions, CreateContainerOptions, StartContainerOptions};

use super::{chunks, DockerClient, DockerError, Output, LABEL_AGENT};

/// Marks an agent's warden.
const LABEL_WARDEN: &str = "cimaster.warden";
/// Where the engine's API socket is mounted in the warden.
const SOCKET_IN_WARDEN: &str = "/engine.sock";
const SCRIPT: &str = include_str!("../warden.sh");

/// A started warden: its container, its output, and its stdin.
pub struct StartedWarden {
    pub id: String,
    pub output: Output,
    pub input: Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

impl DockerClient {
    /// Creates and starts the agent's warden. `socket` is the engine's API socket as a path on the
    /// engine's host.
    pub async fn start_warden(&self, agent: &str, image: &str, socket: &str) -> Result<StartedWarden, DockerError> {
        self.ensure_image(image).await?;
        let labels =
            HashMap::from([(LABEL_AGENT.to_owned(), agent.to_owned()), (LABEL_WARDEN.to_owned(), "1".to_owned())]);
        let host_config = HostConfig {
            binds: Some(vec![format!("{socket}:{SOCKET_IN_WARDEN}")]),
            network_mode: Some("none".to_owned()),
            // The socket belongs to the engine host's root: a remapped root could not open it.
            userns_mode: Some("host".to_owned()),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            readonly_rootfs: Some(true),
            memory: Some(64 << 20),
            pids_limit: Some(64),
            auto_remove: Some(true),
            log_config: Some(HostConfigLogConfig { typ: Some("none".to_owned()), config: None }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            entrypoint: Some(vec!["bash".to_owned()]),
            // Root, whatever the image says: the socket is root's. Nothing of the image's shell setup.
            user: Some("0:0".to_owned()),
            env: Some(vec!["BASH_ENV=".to_owned(), "ENV=".to_owned()]),
            cmd: Some(vec!["-c".to_owned(), SCRIPT.to_owned(), "warden".to_owned(), agent.to_owned()]),
            labels: Some(labels),
            host_config: Some(host_config),
            open_stdin: Some(true),
            stdin_once: Some(true),
            attach_stdin: Some(true),
            ..Default::default()
        };
        let name = format!("cimaster-warden-{agent}");
        let options = CreateContainerOptions { name: Some(name), ..Default::default() };
        let created = self.docker.create_container(Some(options), body).await.map_err(DockerError::Warden)?;
        let attach =
            AttachContainerOptions { stream: true, stdin: true, stdout: true, stderr: true, ..Default::default() };
        let attached = match self.docker.attach_container(&created.id, Some(attach)).await {
            Ok(attached) => attached,
            Err(err) => {
                self.remove_container(&created.id).await;
                return Err(DockerError::Warden(err));
            }
        };
        if let Err(err) = self.docker.start_container(&created.id, None::<StartContainerOptions>).await {
            self.remove_container(&created.id).await;
            return Err(DockerError::Warden(err));
        }
        Ok(StartedWarden { id: created.id, output: chunks(attached.output), input: attached.input })
    }
}
