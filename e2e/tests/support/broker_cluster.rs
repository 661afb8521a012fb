//! A three-node RabbitMQ cluster of the test's own: containers of `cimaster-rabbitmq:bookworm`
//! (`scripts/images`) on a Docker network of their own, each node's AMQP port published on a fixed
//! loopback port (a restarted node keeps it). Masters and agents get every node's URL. Everything is
//! removed when the value is dropped.

use std::time::{Duration, Instant};

use super::{docker, free_port};

pub struct BrokerCluster {
    network: String,
    /// Container names, by node index.
    nodes: Vec<String>,
    /// Host names, which are the nodes' Erlang names (`rabbit@<host>`).
    hosts: Vec<String>,
    ports: Vec<u16>,
}

impl BrokerCluster {
    /// Starts three nodes and waits until they form one cluster.
    pub async fn start() -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let network = format!("cimaster-e2e-rmq-{id}");
        docker(&["network", "create", &network]);
        let hosts: Vec<String> = (1..=3).map(|n| format!("rmq{n}-{id}")).collect();
        let mut cluster = Self { network, nodes: Vec::new(), hosts: hosts.clone(), ports: Vec::new() };
        for host in &hosts {
            let port = free_port();
            docker(&[
                "run",
                "-d",
                "--name",
                host,
                "--hostname",
                host,
                "--network",
                &cluster.network,
                "-p",
                &format!("127.0.0.1:{port}:5672"),
                "-e",
                &format!("NODES={}", hosts.join(" ")),
                "-e",
                &format!("COOKIE=cimaster-e2e-cookie-{id}"),
                "cimaster-rabbitmq:bookworm",
            ]);
            cluster.nodes.push(host.clone());
            cluster.ports.push(port);
        }
        cluster.wait_running(3, Duration::from_secs(120)).await;
        cluster
    }

    /// Every node's URL, comma-separated, as `CIMASTER_AMQP_URL` takes them.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("amqp://cimaster:cimaster@127.0.0.1:{port}/%2f"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `rabbitmqctl` on a node that is up (without holding up the test's other work).
    async fn ctl(&self, on: usize, args: &[&str]) -> String {
        let mut command = vec!["exec", self.nodes[on].as_str(), "timeout", "30", "rabbitmqctl", "-q"];
        command.extend_from_slice(args);
        let output = tokio::process::Command::new("docker").args(&command).output().await.unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A docker command on a node, bounded.
    async fn node_command(&self, verb: &str, node: usize) {
        let run = tokio::process::Command::new("docker").args([verb, &self.nodes[node]]).status();
        let status =
            tokio::time::timeout(Duration::from_secs(60), run).await.expect("docker answered in time").unwrap();
        assert!(status.success(), "docker {verb} {}", self.nodes[node]);
    }

    /// How many nodes the cluster reports running, asked on node `on`.
    async fn running(&self, on: usize) -> usize {
        let status = self.ctl(on, &["cluster_status", "--formatter", "json"]).await;
        serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|status| status["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Waits until `count` nodes are running, as the first node that answers sees it.
    pub async fn wait_running(&self, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            for on in 0..self.nodes.len() {
                if self.running(on).await == count {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the cluster never had {count} nodes running");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The index of the node that leads `queue` (a quorum queue), asked on node `on`.
    pub async fn leader_of(&self, queue: &str, on: usize) -> Option<usize> {
        let listed = self.ctl(on, &["list_queues", "name", "leader", "--formatter", "json"]).await;
        let queues: Vec<serde_json::Value> = serde_json::from_str(&listed).ok()?;
        let leader = queues.iter().find(|q| q["name"] == queue)?["leader"].as_str()?.to_owned();
        self.hosts.iter().position(|host| leader == format!("rabbit@{host}"))
    }

    /// Stops a node (SIGTERM: RabbitMQ shuts down in order).
    pub async fn stop(&self, node: usize) {
        self.node_command("stop", node).await;
    }

    /// Starts a stopped node again.
    pub async fn start_node(&self, node: usize) {
        self.node_command("start", node).await;
    }
}

impl Drop for BrokerCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = std::process::Command::new("docker").args(["rm", "-f", node]).output();
        }
        let _ = std::process::Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}
