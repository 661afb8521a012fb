//! A host of its own for an agent: a network namespace joined to this machine by a veth pair, with
//! Postgres, RabbitMQ and the S3 server reachable through TCP forwarders on the host's end of the
//! pair (the services listen on loopback only). A link is cut inside the namespace with iptables
//! (packets dropped both ways, as on a real partition: established connections hang, new ones time
//! out) and healed by removing the rules. Everything is removed when the value is dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// One service of this machine as the namespace reaches it.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Where the namespace connects (host end of the veth pair).
    pub exposed: SocketAddr,
    /// The service on loopback.
    pub target: SocketAddr,
}

pub struct Host {
    pub namespace: String,
    host_veth: String,
    pub host_ip: Ipv4Addr,
    forwarders: Vec<JoinHandle<()>>,
    /// Every forwarded connection, closed with the host.
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

fn run(args: &[&str]) {
    let output =
        Command::new(args[0]).args(&args[1..]).output().expect("iproute2 and iptables (scripts/dev installs them)");
    assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

impl Host {
    /// Creates the namespace and its link to this machine (needs root, as `scripts/test` runs).
    pub fn create() -> Self {
        sweep();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let namespace = format!("cim-{id}");
        let (host_veth, ns_veth) = (format!("cim{id}h"), format!("cim{id}n"));
        // A /30 of its own in 10.213.0.0/16.
        let n = u16::from_str_radix(&id[..4], 16).unwrap() & 0x3fff;
        let (third, fourth) = ((n >> 6) as u8, ((n & 0x3f) as u8) * 4);
        let host_ip = Ipv4Addr::new(10, 213, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(10, 213, third, fourth + 2);
        run(&["ip", "netns", "add", &namespace]);
        let host = Self {
            namespace: namespace.clone(),
            host_veth: host_veth.clone(),
            host_ip,
            forwarders: Vec::new(),
            connections: Arc::default(),
        };
        run(&["ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth]);
        run(&["ip", "link", "set", &ns_veth, "netns", &namespace]);
        run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_veth]);
        run(&["ip", "link", "set", &host_veth, "up"]);
        host.exec(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_veth]);
        host.exec(&["ip", "link", "set", &ns_veth, "up"]);
        host.exec(&["ip", "link", "set", "lo", "up"]);
        host
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.namespace];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Makes `target` (a loopback address of this machine) reachable from the namespace.
    pub async fn expose(&mut self, target: SocketAddr) -> Link {
        let listener = TcpListener::bind((self.host_ip, 0)).await.unwrap();
        let exposed = listener.local_addr().unwrap();
        let connections = self.connections.clone();
        self.forwarders.push(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                connections.lock().unwrap().push(connection.abort_handle());
            }
        }));
        Link { exposed, target }
    }

    fn rules(&self, link: Link, action: &str) {
        let (ip, port) = (link.exposed.ip().to_string(), link.exposed.port().to_string());
        self.exec(&["iptables", action, "OUTPUT", "-d", &ip, "-p", "tcp", "--dport", &port, "-j", "DROP"]);
        self.exec(&["iptables", action, "INPUT", "-s", &ip, "-p", "tcp", "--sport", &port, "-j", "DROP"]);
    }

    /// Drops every packet between the namespace and the service, both ways.
    pub fn cut(&self, link: Link) {
        self.rules(link, "-A");
    }

    pub fn heal(&self, link: Link) {
        self.rules(link, "-D");
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for forwarder in &self.forwarders {
            forwarder.abort();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.namespace]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_veth]).output();
    }
}

/// Removes namespaces of earlier test processes that died before dropping their `Host` (none of
/// their processes is left in them).
fn sweep() {
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let Some(name) = line.split_whitespace().next().filter(|name| name.starts_with("cim-")) else { continue };
        let pids = Command::new("ip").args(["netns", "pids", name]).output().unwrap();
        if pids.stdout.is_empty() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            let _ = Command::new("ip").args(["link", "del", &format!("cim{}h", &name[4..])]).output();
        }
    }
}

/// `url` with its loopback service address replaced by where the namespace reaches it.
pub fn through(url: &str, link: Link) -> String {
    let from = link.target.to_string();
    assert!(url.contains(&from), "{url} does not name {from}");
    url.replace(&from, &link.exposed.to_string())
}

/// The loopback address a service URL names (`scheme://[user@]127.0.0.1:port/...`).
pub fn target_of(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let authority = rest.split('/').next().unwrap();
    let address = authority.rsplit('@').next().unwrap();
    address.parse().unwrap_or_else(|_| panic!("{url}: the service must be on a loopback address"))
}
