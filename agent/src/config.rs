//! The agent's typed configuration, from `CIMASTER_*` variables.

use std::path::PathBuf;
use std::time::Duration;

use cimaster_common::storage::S3Config;
use cimaster_common::{Memory, QueueName};

use crate::subnets::SubnetPool;
use clap::Args;
use secrecy::SecretString;

#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// This agent's id: containers it starts are labelled with it, and its start-up sweep removes
    /// whatever an earlier process with the same id left behind. Defaults to the host name.
    #[arg(long = "agent-id", env = "CIMASTER_AGENT_ID")]
    pub id: Option<String>,

    #[arg(long = "database-url", env = "CIMASTER_DATABASE_URL")]
    pub database_url: SecretString,

    /// RabbitMQ URL; for a cluster, each node's, comma-separated (connections go round them).
    #[arg(long = "amqp-url", env = "CIMASTER_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: SecretString,

    #[arg(long = "queue-prefix", env = "CIMASTER_QUEUE_PREFIX", default_value = "cimaster")]
    pub queue_prefix: String,

    /// Comma-separated queues (resource classes) this agent serves.
    #[arg(long = "queues", env = "CIMASTER_AGENT_QUEUES", default_value = "default", value_delimiter = ',')]
    pub queues: Vec<QueueName>,

    /// CPUs this agent may hand out to runs; the host's count by default.
    #[arg(long = "cpus", env = "CIMASTER_AGENT_CPUS")]
    pub cpus: Option<f64>,

    /// Memory this agent may hand out to runs (e.g. `16Gi`); the host's total by default.
    #[arg(long = "memory", env = "CIMASTER_AGENT_MEMORY", value_parser = parse_memory)]
    pub memory: Option<Memory>,

    /// Take no new run while host CPU use is above this fraction.
    #[arg(long = "max-cpu", env = "CIMASTER_AGENT_MAX_CPU", default_value_t = 0.85)]
    pub max_cpu: f64,

    /// Cap on any run's timeout.
    #[arg(long = "max-timeout", env = "CIMASTER_MAX_TIMEOUT", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_timeout: Duration,

    /// How long a claim (and a test cluster's lease) holds without a renewal. The agent renews it
    /// five times per fence window (`lease - stop grace - margin`).
    #[arg(long = "lease", env = "CIMASTER_LEASE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,

    /// How long before its lease could expire a run cut off from Postgres has been stopped: the
    /// agent stops it after `lease - stop grace - margin` without a successful renewal (see `lease`).
    #[arg(long = "lease-margin", env = "CIMASTER_LEASE_MARGIN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_margin: Duration,

    /// Between SIGTERM and SIGKILL when a run is stopped (timeout, abort, drain, lost lease).
    #[arg(long = "stop-grace", env = "CIMASTER_STOP_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace: Duration,

    /// On SIGTERM, how long running jobs may go on before they are aborted.
    #[arg(long = "drain-grace", env = "CIMASTER_AGENT_DRAIN_GRACE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,

    /// Idle networks kept for the agent's next runs (each lent to one run at a time, and only once
    /// nothing is attached to it). 0: every run gets a new network, removed after it.
    #[arg(long = "idle-networks", env = "CIMASTER_AGENT_IDLE_NETWORKS", default_value_t = 2)]
    pub idle_networks: usize,

    /// Whether each kept network has a sandbox (a sleeping container of the git image) whose network
    /// namespace its runs' job containers join, instead of each job getting an endpoint, an address
    /// and a DNS resolver of its own on the network. Only with `--idle-networks` above 0.
    #[arg(long = "network-sandboxes", env = "CIMASTER_AGENT_NETWORK_SANDBOXES", default_value_t = true, action = clap::ArgAction::Set)]
    pub network_sandboxes: bool,

    /// A range of IPv4 addresses (e.g. `10.240.0.0/16`) that run networks take their /27 subnets
    /// from, instead of the engine's default address pools (about 31 networks per engine).
    #[arg(long = "network-pool", env = "CIMASTER_AGENT_NETWORK_POOL")]
    pub network_pool: Option<SubnetPool>,

    /// The most of one attempt's console kept (in the file uploaded to S3); later output is counted
    /// and dropped, with a note where the log was cut.
    #[arg(long = "console-limit", env = "CIMASTER_AGENT_CONSOLE_LIMIT", default_value = "64Mi", value_parser = parse_memory)]
    pub console_limit: Memory,

    /// The most of one attempt's console copied live into Postgres (what followers see while the run
    /// runs); the rest is served from S3 once the attempt ends.
    #[arg(long = "live-console-limit", env = "CIMASTER_AGENT_LIVE_CONSOLE_LIMIT", default_value = "16Mi",
        value_parser = parse_memory)]
    pub live_console_limit: Memory,

    /// How often the agent reports itself to the registry (`GET /agents`, `GET /queues`).
    #[arg(long = "report-interval", env = "CIMASTER_AGENT_REPORT_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub report_interval: Duration,

    /// Where to serve `/metrics` (Prometheus) and `/healthz`, e.g. `0.0.0.0:9090`; not served when
    /// unset.
    #[arg(long = "listen", env = "CIMASTER_AGENT_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,

    /// The agent's private directory (logs being written, result parcels, uploads still pending,
    /// which survive restarts). Default: `cimaster-agent-<id>` in the system's temp directory.
    /// Made 0700; a symlink or another user's directory there is refused.
    #[arg(long = "work-dir", env = "CIMASTER_AGENT_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Registry credentials for pulling images that are not present locally: a Docker
    /// `config.json` (what `docker login` writes). Each registry's entry is sent to that registry
    /// only.
    #[arg(long = "registry-auth-file", env = "CIMASTER_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,

    /// Whether the agent sets the egress rules on its engine (see `crate::egress`); an agent that
    /// cannot set them does not start. `false` leaves the network around the runs open to them.
    #[arg(long = "egress", env = "CIMASTER_AGENT_EGRESS", default_value_t = true, action = clap::ArgAction::Set)]
    pub egress: bool,

    /// IPv4 ranges no run reaches unless its job's `egress.allow` lists them (comma-separated, or
    /// `none`); the engine's host itself is never reachable.
    #[arg(long = "deny-cidrs", env = "CIMASTER_AGENT_DENY_CIDRS", default_value = crate::egress::DEFAULT_DENY,
          value_parser = crate::egress::parse_deny)]
    pub deny_cidrs: crate::egress::DenyList,

    /// Image with git (and ssh) that checks out git jobs' repositories into the run's workspace.
    #[arg(long = "git-image", env = "CIMASTER_AGENT_GIT_IMAGE", default_value = "cimaster-git:bookworm")]
    pub git_image: String,

    /// The engine's API socket as a path on the engine's host, mounted into the agent's warden (the
    /// container that kills the agent's runs when the agent cannot). Default: the path of a
    /// `unix://` DOCKER_HOST, else `/var/run/docker.sock`.
    #[arg(long = "engine-socket", env = "CIMASTER_AGENT_ENGINE_SOCKET")]
    pub engine_socket: Option<String>,

    /// The most all git mirrors of this agent may take on disk; the least recently used beyond it
    /// are removed after a checkout.
    #[arg(long = "mirrors-max-size", env = "CIMASTER_AGENT_MIRRORS_MAX_SIZE", default_value = "20Gi",
          value_parser = parse_memory)]
    pub mirrors_max_size: Memory,

    /// A git mirror unused for this long is removed.
    #[arg(long = "mirror-max-age", env = "CIMASTER_AGENT_MIRROR_MAX_AGE", default_value = "7d",
          value_parser = humantime::parse_duration)]
    pub mirror_max_age: std::time::Duration,

    /// Key for job secrets (the master's CIMASTER_SECRETS_KEY).
    #[arg(long = "secrets-key", env = "CIMASTER_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<SecretString>,

    #[command(flatten)]
    pub s3: S3Config,
}

fn parse_memory(value: &str) -> Result<Memory, String> {
    Memory::parse(value)
}

impl AgentConfig {
    /// The engine's API socket on the engine's host (see `engine_socket`).
    pub fn engine_socket(&self) -> String {
        self.engine_socket.clone().unwrap_or_else(|| {
            std::env::var("DOCKER_HOST")
                .ok()
                .and_then(|host| host.strip_prefix("unix://").map(str::to_owned))
                .unwrap_or_else(|| "/var/run/docker.sock".to_owned())
        })
    }

    pub fn agent_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|name| name.trim().to_owned())
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "cimaster-agent".to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command};

    #[test]
    fn arguments_are_well_formed() {
        super::AgentConfig::augment_args(Command::new("agent")).debug_assert();
    }
}
