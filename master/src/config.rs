//! Typed configuration, read once from `CIMASTER_*` environment variables (or the matching flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use secrecy::SecretString;

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP API listens on. Port 0 picks a free port.
    #[arg(long, env = "CIMASTER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub broker: BrokerConfig,

    #[command(flatten)]
    pub auth: AuthConfig,

    #[command(flatten)]
    pub dispatch: DispatchConfig,

    #[command(flatten)]
    pub reaper: ReaperConfig,

    #[command(flatten)]
    pub s3: cimaster_common::storage::S3Config,

    #[command(flatten)]
    pub pool: PoolConfig,

    #[command(flatten)]
    pub git: GitConfig,

    #[command(flatten)]
    pub http: HttpConfig,

    #[command(flatten)]
    pub agents: AgentsConfig,

    #[command(flatten)]
    pub github: GithubConfig,

    #[command(flatten)]
    pub oidc: OidcConfig,

    /// Key for job secrets at rest: 32 bytes, base64 (`openssl rand -base64 32`). Without it the
    /// secrets API is unavailable.
    #[arg(long = "secrets-key", env = "CIMASTER_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<SecretString>,

    /// How often each replica looks for scheduled jobs whose slot is due.
    #[arg(long, env = "CIMASTER_SCHEDULE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub schedule_interval: Duration,

    /// Upper bound for any job's `timeoutSeconds`.
    #[arg(long, env = "CIMASTER_MAX_TIMEOUT", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_timeout: Duration,

    /// Apply database migrations when the server starts (safe with several replicas).
    #[arg(long, env = "CIMASTER_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
}

/// Runs' OIDC ID tokens (issued when `CIMASTER_PUBLIC_URL` and `CIMASTER_SECRETS_KEY` are set).
#[derive(Debug, Clone, Args)]
pub struct OidcConfig {
    /// How long one signing key signs before the next takes over; a retired key stays published
    /// for a day more, so tokens it signed still verify.
    #[arg(long = "oidc-key-rotation", env = "CIMASTER_OIDC_KEY_ROTATION", default_value = "30d",
          value_parser = humantime::parse_duration)]
    pub key_rotation: Duration,
}

/// How the master reads the agent registry.
#[derive(Debug, Clone, Args)]
pub struct AgentsConfig {
    /// An agent not heard from for this long is shown as lost (agents report every 5 s by default).
    #[arg(long = "agent-lost-after", env = "CIMASTER_AGENT_LOST_AFTER", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub lost_after: Duration,

    /// An agent not heard from for this long is forgotten.
    #[arg(long = "agent-forget-after", env = "CIMASTER_AGENT_FORGET_AFTER", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub forget_after: Duration,

    /// Queues `GET /queues` lists even when they are idle and no agent serves them, so that an
    /// autoscaler scaling to zero still reads a value for them.
    #[arg(long = "queues", env = "CIMASTER_QUEUES", default_value = "default", value_delimiter = ',')]
    pub queues: Vec<String>,

    /// How often each replica counts newly started and ended runs into `cimaster_dispatch_seconds`
    /// and `cimaster_run_seconds`, and forgets agents gone for `CIMASTER_AGENT_FORGET_AFTER`.
    #[arg(long = "observe-interval", env = "CIMASTER_OBSERVE_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub observe_interval: Duration,
}

/// Limits of the HTTP server.
#[derive(Debug, Clone, Args)]
pub struct HttpConfig {
    /// A request's head must arrive within this; an idle kept-alive connection is closed after it.
    #[arg(long = "http-header-timeout", env = "CIMASTER_HTTP_HEADER_TIMEOUT", default_value = "10s",
        value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Connections served at once; more wait in the listen backlog.
    #[arg(
        id = "http_max_connections",
        long = "http-max-connections",
        env = "CIMASTER_HTTP_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_connections: usize,

    /// How long a request may take to be answered (waiting acquires excepted: they have their own
    /// bound); past it the answer is 503.
    #[arg(long = "http-request-timeout", env = "CIMASTER_HTTP_REQUEST_TIMEOUT", default_value = "60s",
        value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long one `?follow=true` console stream stays open; the client resumes with `after=`.
    #[arg(long = "console-follow-limit", env = "CIMASTER_CONSOLE_FOLLOW_LIMIT", default_value = "1h",
        value_parser = humantime::parse_duration)]
    pub follow_limit: Duration,

    /// How long shutdown waits for open requests (follows, waiting acquires) before cutting them.
    #[arg(long = "http-shutdown-grace", env = "CIMASTER_HTTP_SHUTDOWN_GRACE", default_value = "10s",
        value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// How the master reads git jobs' repositories when they are triggered.
#[derive(Debug, Clone, Args)]
pub struct GitConfig {
    /// Accept `file://` repositories, read from the master's own disk (tests, single-host setups).
    /// Off by default: only https, http, ssh and git are spoken.
    #[arg(id = "git_allow_file", long = "allow-file-repositories", env = "CIMASTER_ALLOW_FILE_REPOSITORIES", default_value_t = false,
        action = clap::ArgAction::Set)]
    pub allow_file: bool,

    /// How long one repository read (resolving a branch, reading the config file) may take,
    /// waiting for a free slot included; well under any HTTP client's timeout.
    #[arg(id = "git_timeout", long = "git-timeout", env = "CIMASTER_GIT_TIMEOUT", default_value = "20s",
        value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Repository reads run at once; more wait for a slot.
    #[arg(id = "git_max_reads", long = "git-max-reads", env = "CIMASTER_GIT_MAX_READS", default_value_t = 8)]
    pub max_reads: usize,

    /// Where this replica keeps its partial clones of the repositories it reads config files from
    /// (one per replica; default: a directory of this process's own in the temporary directory).
    #[arg(id = "git_cache_dir", long = "git-cache-dir", env = "CIMASTER_GIT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// The most the partial clones may take together, in MiB; the least recently used go first.
    #[arg(
        id = "git_cache_max_mib",
        long = "git-cache-max-mib",
        env = "CIMASTER_GIT_CACHE_MAX_MIB",
        default_value_t = 1024
    )]
    pub cache_max_mib: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Postgres URL, e.g. `postgres://cimaster:secret@127.0.0.1:5432/cimaster`.
    #[arg(id = "database_url", long = "database-url", env = "CIMASTER_DATABASE_URL")]
    pub url: SecretString,

    #[arg(long = "database-max-connections", env = "CIMASTER_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,

    /// Connections opened at start and kept open when idle, so the first requests of a burst do
    /// not wait for a connection to be made.
    #[arg(long = "database-min-connections", env = "CIMASTER_DATABASE_MIN_CONNECTIONS", default_value_t = 4)]
    pub min_connections: u32,

    /// How long a request waits for a database connection before answering 503.
    #[arg(long = "database-acquire-timeout", env = "CIMASTER_DATABASE_ACQUIRE_TIMEOUT", default_value = "3s",
          value_parser = humantime::parse_duration)]
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct BrokerConfig {
    /// RabbitMQ URL, e.g. `amqp://cimaster:secret@127.0.0.1:5672/%2f`; for a cluster, each node's,
    /// comma-separated (connections go round them).
    #[arg(
        id = "amqp_url",
        long = "amqp-url",
        env = "CIMASTER_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: SecretString,

    /// Prefix of every queue and exchange name, so installations can share one broker.
    #[arg(long = "queue-prefix", env = "CIMASTER_QUEUE_PREFIX", default_value = "cimaster")]
    pub prefix: String,

    /// How long a trigger waits for RabbitMQ's publisher confirm before leaving the run to the dispatcher.
    #[arg(long = "publish-timeout", env = "CIMASTER_PUBLISH_TIMEOUT", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "EdDSA")]
    EdDsa,
}

#[derive(Debug, Clone, Args)]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens.
    #[arg(long = "jwt-secret", env = "CIMASTER_JWT_SECRET")]
    pub jwt_secret: Option<SecretString>,

    /// PEM public key file for RS256 or EdDSA tokens (used instead of the shared secret).
    #[arg(long = "jwt-public-key-file", env = "CIMASTER_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// The one algorithm accepted. Defaults to HS256 with a secret; required with a public key.
    #[arg(long = "jwt-algorithm", env = "CIMASTER_JWT_ALGORITHM", value_enum)]
    pub jwt_algorithm: Option<JwtAlgorithm>,
}

#[derive(Debug, Clone, Args)]
pub struct PoolConfig {
    /// Lease length when the client does not ask for one (`/getvacant` never does).
    #[arg(long = "pool-lease-ttl", env = "CIMASTER_POOL_LEASE_TTL", default_value = "4h",
          value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,

    /// How long a hold lasts unless the request says otherwise.
    #[arg(long = "pool-hold", env = "CIMASTER_POOL_HOLD", default_value = "6h", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// The longest hold anyone may ask for.
    #[arg(long = "pool-max-hold", env = "CIMASTER_POOL_MAX_HOLD", default_value = "72h",
          value_parser = humantime::parse_duration)]
    pub max_hold: Duration,

    /// The longest a lease request may wait for a vacant cluster (`/getvacant?wait=`,
    /// `POST /pool/leases {waitSeconds}`); longer asks are cut to this.
    #[arg(long = "pool-max-wait", env = "CIMASTER_POOL_MAX_WAIT", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// Infrastructure failures in a row after which a cluster is disabled automatically.
    #[arg(long = "pool-auto-disable-after", env = "CIMASTER_POOL_AUTO_DISABLE_AFTER", default_value_t = 3)]
    pub auto_disable_after: i32,

    /// The job `/createcluster` runs when the request names none.
    #[arg(long = "pool-provision-job", env = "CIMASTER_POOL_PROVISION_JOB", default_value = "create-cluster")]
    pub provision_job: String,

    /// How often each replica ends expired leases and holds.
    #[arg(long = "pool-expiry-interval", env = "CIMASTER_POOL_EXPIRY_INTERVAL", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub expiry_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ReaperConfig {
    /// How often each replica looks for runs whose agent stopped renewing the lease.
    #[arg(id = "lease_check_interval", long = "lease-check-interval", env = "CIMASTER_LEASE_CHECK_INTERVAL", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Attempts a run gets when agents are lost, before it is marked `error`.
    #[arg(long = "max-attempts", env = "CIMASTER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Args)]
pub struct DispatchConfig {
    /// How often each replica looks for queued runs that RabbitMQ has not confirmed.
    #[arg(long = "dispatch-interval", env = "CIMASTER_DISPATCH_INTERVAL", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Age a run must reach before the dispatcher publishes it, leaving the trigger's own publish time
    /// to finish. Keep it above the publish timeout.
    #[arg(long = "dispatch-grace", env = "CIMASTER_DISPATCH_GRACE", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command};

    #[test]
    fn arguments_are_well_formed() {
        super::Config::augment_args(Command::new("serve")).debug_assert();
    }
}

/// GitHub: webhooks in, commit statuses and pull request reads out.
#[derive(Debug, Clone, Args)]
pub struct GithubConfig {
    /// Secrets GitHub signs webhook deliveries with, comma-separated so one can be rotated;
    /// `POST /hooks/github` answers 503 without one.
    #[arg(
        long = "github-webhook-secret",
        env = "CIMASTER_GITHUB_WEBHOOK_SECRET",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub webhook_secrets: Vec<SecretString>,

    /// How often each replica looks for recorded deliveries to handle.
    #[arg(long = "github-handle-interval", env = "CIMASTER_GITHUB_HANDLE_INTERVAL", default_value = "500ms",
          value_parser = humantime::parse_duration)]
    pub handle_interval: Duration,

    /// GitHub's REST API (GitHub Enterprise: `https://HOST/api/v3`).
    #[arg(long = "github-api-url", env = "CIMASTER_GITHUB_API_URL", default_value = "https://api.github.com")]
    pub api_url: String,

    /// A token for GitHub's API (commit statuses, pull requests); or use a GitHub App.
    #[arg(long = "github-token", env = "CIMASTER_GITHUB_TOKEN", hide_env_values = true)]
    pub token: Option<SecretString>,

    /// A GitHub App's id; with its private key, the App's installation tokens are used for the API
    /// and to read and clone the repositories it is installed on.
    #[arg(long = "github-app-id", env = "CIMASTER_GITHUB_APP_ID")]
    pub app_id: Option<u64>,

    /// The GitHub App's private key (PEM), as GitHub hands it out.
    #[arg(long = "github-app-private-key-file", env = "CIMASTER_GITHUB_APP_PRIVATE_KEY_FILE")]
    pub app_private_key_file: Option<std::path::PathBuf>,

    /// The base of links shown on GitHub (a status's `target_url`), e.g. `https://ci.example.com`.
    #[arg(long = "public-url", env = "CIMASTER_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// How often each replica looks for commit statuses to post.
    #[arg(long = "github-report-interval", env = "CIMASTER_GITHUB_REPORT_INTERVAL", default_value = "500ms",
          value_parser = humantime::parse_duration)]
    pub report_interval: Duration,

    /// How often the open pull requests of subscribed repositories are listed, to run any whose
    /// webhook was missed (also once at start).
    #[arg(long = "github-resync-interval", env = "CIMASTER_GITHUB_RESYNC_INTERVAL", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
}
