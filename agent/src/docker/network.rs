//! Bridge networks: one per run, or one of the agent's that runs borrow one at a time, with the
//! sandbox that holds a borrowed network's namespace for the runs' job containers.

use std::collections::HashMap;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{InspectContainerOptions, InspectNetworkOptions};

use super::{confined, DockerClient, DockerError, RunLabels, LABEL_AGENT, LABEL_REUSABLE, LABEL_SANDBOX};
use crate::telemetry::Timer;

/// A reusable network's sandbox: the container whose network namespace the runs' job containers
/// join, and the files the engine keeps for that namespace on its host (`/etc/hosts`,
/// `/etc/resolv.conf`, `/etc/hostname`). A job that joins gets them read-only: they outlive the run,
/// and a run must not leave a name or a resolver behind for the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: String,
    /// Each file's path on the engine's host and where it is in a container.
    pub files: Vec<(String, &'static str)>,
}

impl Sandbox {
    /// The network mode of a container that joins the sandbox.
    pub fn network_mode(&self) -> String {
        format!("container:{}", self.id)
    }

    /// Read-only binds of the namespace's files.
    pub fn binds(&self) -> impl Iterator<Item = String> + '_ {
        self.files.iter().map(|(source, target)| format!("{source}:{target}:ro"))
    }
}

impl DockerClient {
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
        // The bridge's name is how the egress rules know the network as the agent's.
        let options = self
            .egress_bridges
            .then(|| HashMap::from([("com.docker.network.bridge.name".to_owned(), crate::egress::bridge_name(&name))]));
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(labels),
            ipam,
            options,
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

    /// The ids of the containers attached to the network (a stopped one is not); `None` when it
    /// cannot be inspected.
    pub async fn attached(&self, name: &str) -> Option<Vec<String>> {
        let network = self.docker.inspect_network(name, None::<InspectNetworkOptions>).await.ok()?;
        Some(network.containers.map(|containers| containers.into_keys().collect()).unwrap_or_default())
    }

    /// Starts the sandbox of a reusable network: a container of `image` that only sleeps, on the
    /// network, whose network namespace the runs' job containers join (`container:ID`) instead of
    /// each getting an endpoint of its own.
    pub async fn start_sandbox(&self, agent: &str, network: &str, image: &str) -> Result<Sandbox, DockerError> {
        let _timer = Timer::docker("start_container");
        let labels =
            HashMap::from([(LABEL_AGENT.to_owned(), agent.to_owned()), (LABEL_SANDBOX.to_owned(), network.to_owned())]);
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["sleep".to_owned(), "infinity".to_owned()]),
            labels: Some(labels),
            // It only sleeps, and answers the readiness checks' connections: a sliver of a CPU.
            host_config: Some(HostConfig {
                network_mode: Some(network.to_owned()),
                ..confined(Some(250_000_000), Some(64 << 20))
            }),
            ..Default::default()
        };
        let id = self.start_sleeper(&format!("{network}-sandbox"), body).await.map_err(DockerError::Sandbox)?;
        let inspected = match self.docker.inspect_container(&id, None::<InspectContainerOptions>).await {
            Ok(inspected) => inspected,
            Err(err) => {
                self.remove_container(&id).await;
                return Err(DockerError::Sandbox(err));
            }
        };
        let files = [
            (inspected.hosts_path, "/etc/hosts"),
            (inspected.resolv_conf_path, "/etc/resolv.conf"),
            (inspected.hostname_path, "/etc/hostname"),
        ];
        let files = files.into_iter().filter_map(|(source, target)| Some((source?, target))).collect();
        Ok(Sandbox { id, files })
    }
}
