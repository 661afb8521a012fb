//! The egress rules on the engine's host (see `crate::egress`): set by a short-lived helper in the
//! host's network namespace, with `NET_ADMIN` (and `NET_RAW`, which legacy iptables needs) and no
//! other capability.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig};
use futures::StreamExt;

use super::{confined, Chunk, DockerClient, DockerError, LABEL_AGENT};
use crate::egress::{self, Cidr};

impl DockerClient {
    /// Loads the egress rules that deny `deny` to every `cimbr` bridge of this engine.
    pub async fn load_egress_rules(&self, agent: &str, image: &str, deny: &[Cidr]) -> Result<String, DockerError> {
        let env = vec![
            format!("CIMASTER_EGRESS_RULES={}", egress::rules(deny)),
            format!("CIMASTER_BRIDGES={}", egress::BRIDGE_PREFIX),
        ];
        self.on_host(agent, image, egress::LOAD_SCRIPT, Vec::new(), env).await
    }

    /// Adds (or removes) the rules that let `bridge` reach `allow` despite the denied ranges.
    pub async fn allow_egress(
        &self,
        agent: &str,
        image: &str,
        bridge: &str,
        allow: &[Cidr],
        add: bool,
    ) -> Result<String, DockerError> {
        let ranges: Vec<String> = allow.iter().map(ToString::to_string).collect();
        let env = vec![format!("CIMASTER_BRIDGE={bridge}"), format!("CIMASTER_ALLOW={}", ranges.join(" "))];
        let verb = if add { "add" } else { "remove" };
        self.on_host(agent, image, egress::ALLOW_SCRIPT, vec![verb.to_owned()], env).await
    }

    /// Runs `script` (with `args`) in a helper in the engine host's network namespace; its output,
    /// or why it failed. The helper is removed after it.
    async fn on_host(
        &self,
        agent: &str,
        image: &str,
        script: &str,
        args: Vec<String>,
        env: Vec<String>,
    ) -> Result<String, DockerError> {
        self.ensure_image(image).await?;
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["sleep".to_owned(), "60".to_owned()]),
            labels: Some(HashMap::from([(LABEL_AGENT.to_owned(), agent.to_owned())])),
            host_config: Some(HostConfig {
                network_mode: Some("host".to_owned()),
                cap_add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                ..confined(Some(250_000_000), Some(64 << 20))
            }),
            ..Default::default()
        };
        let name = format!("cimaster-host-{agent}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let id = self.start_sleeper(&name, body).await.map_err(DockerError::HostHelper)?;
        let ran = async {
            let command = ["sh", "-c", script, "sh"].into_iter().map(str::to_owned).chain(args).collect();
            let (exec, mut output) = self.exec_attached(&id, command, env).await?;
            let mut text = Vec::new();
            while let Some(chunk) = output.next().await {
                if let Ok(Chunk::Stdout(bytes) | Chunk::Stderr(bytes)) = chunk {
                    text.extend_from_slice(&bytes);
                }
            }
            let output = String::from_utf8_lossy(&text).trim().to_owned();
            match self.exec_exit(&exec).await? {
                0 => Ok(output),
                code => Err(DockerError::Egress { code, output }),
            }
        }
        .await;
        self.remove_container(&id).await;
        ran
    }
}
