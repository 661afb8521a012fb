//! Test harness: a real master (in-process or as a child process) over the test's own Postgres
//! database and its own RabbitMQ queue prefix.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use cimaster_common::storage::S3Config;
use cimaster_master::auth::{Role, Signer};
use cimaster_master::config::{
    AgentsConfig, AuthConfig, BrokerConfig, Config, DatabaseConfig, DispatchConfig, GitConfig, GithubConfig,
    HttpConfig, OidcConfig, PoolConfig, ReaperConfig,
};
use cimaster_master::Application;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// 32 bytes, base64.
pub const SECRETS_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
pub const SECRET: &str = "test-secret-test-secret-test-secret!";
/// The secret test webhooks are signed with.
pub const WEBHOOK_SECRET: &str = "webhook-secret";

pub fn amqp_url() -> String {
    std::env::var("CIMASTER_AMQP_URL").unwrap_or_else(|_| "amqp://cimaster:cimaster@127.0.0.1:5672/%2f".into())
}

/// The URL of the database `#[sqlx::test]` made for this test.
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL (scripts/test sets it)");
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let (scheme_and_auth, _) = base.rsplit_once('/').unwrap();
    format!("{scheme_and_auth}/{database}")
}

pub fn unique_prefix() -> String {
    format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub fn config(database_url: &str, prefix: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: DatabaseConfig {
            url: SecretString::from(database_url.to_owned()),
            max_connections: 8,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(2),
        },
        broker: BrokerConfig {
            url: SecretString::from(amqp_url()),
            prefix: prefix.to_owned(),
            publish_timeout: Duration::from_secs(2),
        },
        auth: AuthConfig {
            jwt_secret: Some(SecretString::from(SECRET)),
            jwt_public_key_file: None,
            jwt_algorithm: None,
        },
        dispatch: DispatchConfig { interval: Duration::from_millis(200), grace: Duration::from_millis(500) },
        reaper: ReaperConfig { interval: Duration::from_millis(200), max_attempts: 3 },
        s3: s3_config(),
        pool: PoolConfig {
            lease_ttl: Duration::from_secs(3600),
            hold: Duration::from_secs(6 * 3600),
            max_hold: Duration::from_secs(72 * 3600),
            max_wait: Duration::from_secs(300),
            auto_disable_after: 3,
            provision_job: "create-cluster".to_owned(),
            expiry_interval: Duration::from_millis(200),
        },
        git: GitConfig {
            allow_file: true,
            timeout: Duration::from_secs(20),
            max_reads: 8,
            cache_dir: None,
            cache_max_mib: 256,
        },
        http: HttpConfig {
            header_timeout: Duration::from_secs(2),
            max_connections: 256,
            request_timeout: Duration::from_secs(30),
            follow_limit: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(2),
        },
        agents: AgentsConfig {
            lost_after: Duration::from_secs(30),
            forget_after: Duration::from_secs(3600),
            queues: vec!["default".to_owned(), "idle".to_owned()],
            observe_interval: Duration::from_millis(200),
        },
        github: GithubConfig {
            webhook_secrets: vec![SecretString::from(WEBHOOK_SECRET)],
            handle_interval: Duration::from_millis(100),
            api_url: "http://127.0.0.1:9".to_owned(),
            token: None,
            app_id: None,
            app_private_key_file: None,
            public_url: None,
            report_interval: Duration::from_millis(100),
            resync_interval: Duration::from_secs(3600),
        },
        oidc: OidcConfig { key_rotation: Duration::from_secs(30 * 24 * 3600) },
        schedule_interval: Duration::from_millis(200),
        max_timeout: Duration::from_secs(24 * 3600),
        migrate_on_start: false,
        secrets_key: Some(SecretString::from(SECRETS_KEY)),
    }
}

pub fn s3_config() -> S3Config {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    S3Config {
        endpoint: Some(var("CIMASTER_S3_ENDPOINT", "http://127.0.0.1:9000")),
        bucket: var("CIMASTER_S3_BUCKET", "cimaster"),
        region: "us-east-1".to_owned(),
        access_key: var("CIMASTER_S3_ACCESS_KEY", "cimaster"),
        secret_key: SecretString::from(var("CIMASTER_S3_SECRET_KEY", "cimaster-dev-secret")),
        path_style: true,
    }
}

pub fn token(role: Role) -> String {
    Signer::hs256(SECRET).unwrap().mint("tester", &[role], Duration::from_secs(600))
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub prefix: String,
    pub pool: PgPool,
    pub http: reqwest::Client,
    cancel: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(pool: PgPool) -> Self {
        Self::spawn_with(pool, |_| {}).await
    }

    pub async fn spawn_with(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Self {
        let prefix = unique_prefix();
        let mut config = config(&database_url(&pool), &prefix);
        tweak(&mut config);
        let app = Application::build(config).await.unwrap();
        let addr = app.local_addr();
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let server = tokio::spawn(app.run_until(async move { stop.cancelled().await }));
        let test = Self {
            addr,
            prefix,
            pool,
            http: reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap(),
            cancel,
            server: Some(server),
        };
        test.wait_ready().await;
        test
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(response) = self.http.get(self.url("/readyz")).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("master at {} never became ready", self.addr);
    }

    pub fn as_role(&self, role: Role) -> Client {
        Client { base: format!("http://{}", self.addr), http: self.http.clone(), token: Some(token(role)) }
    }

    /// A client whose token names `subject`, holding `role`.
    pub fn as_user(&self, subject: &str, role: Role) -> Client {
        let token = Signer::hs256(SECRET).unwrap().mint(subject, &[role], Duration::from_secs(600));
        Client { base: format!("http://{}", self.addr), http: self.http.clone(), token: Some(token) }
    }

    pub fn admin(&self) -> Client {
        self.as_role(Role::Admin)
    }

    pub fn anonymous(&self) -> Client {
        Client { base: format!("http://{}", self.addr), http: self.http.clone(), token: None }
    }

    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        delete_queues(&self.prefix, &["default", "gpu", "large"]).await;
    }
}

/// A small API client.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub content_type: String,
}

impl Reply {
    pub fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or("")
    }

    #[track_caller]
    pub fn expect_problem(&self, status: u16, detail_contains: &str) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.content_type, "application/problem+json", "body: {}", self.body);
        assert_eq!(self.body["status"], status);
        assert!(
            self.detail().contains(detail_contains),
            "detail {:?} should contain {:?}",
            self.detail(),
            detail_contains
        );
    }
}

impl Client {
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let content_type = headers.get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, headers, body, content_type }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(reqwest::Method::PUT, path).json(&body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(reqwest::Method::POST, path).json(&body)).await
    }

    pub async fn post_empty(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::POST, path)).await
    }
}

pub fn freestyle(queue: &str) -> Value {
    json!({"kind": "freestyle", "image": "busybox:latest", "script": "echo hello", "env": {"A": "1"},
           "timeoutSeconds": 600, "resources": {"cpus": 1, "memory": "512Mi"}, "queue": queue,
           "parameters": {"TARGET": "all"}})
}

/// A git job over `repo`, whose branches hold a valid `.cimaster.yml`.
pub fn git_job(repo: &LocalRepo) -> Value {
    json!({"kind": "git", "repository": repo.url, "configPath": ".cimaster.yml", "defaultBranch": "main",
           "parameters": {"AUTHOR": ""}})
}

/// A repository on disk (`file://`) with one commit per branch, each holding a job config file.
pub struct LocalRepo {
    dir: tempfile::TempDir,
    pub url: String,
    shas: std::collections::HashMap<String, String>,
}

impl LocalRepo {
    pub fn new(branches: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let mut repo = Self { dir, url, shas: std::collections::HashMap::new() };
        repo.git(&["init", "-q", "-b", "main"]);
        repo.git(&["config", "user.email", "test@cimaster.test"]);
        repo.git(&["config", "user.name", "test"]);
        for branch in ["main"].iter().chain(branches.iter().filter(|b| **b != "main")) {
            repo.commit_config(branch, &format!("image: busybox:latest\nscript: echo {branch}\n"));
        }
        repo
    }

    /// Commits `config` as `.cimaster.yml` on `branch` (a new orphan branch unless it is `main` or
    /// already made).
    pub fn commit_config(&mut self, branch: &str, config: &str) -> String {
        if self.shas.contains_key(branch) {
            self.git(&["checkout", "-q", branch]);
        } else if branch != "main" {
            self.git(&["checkout", "-q", "--orphan", branch]);
        }
        std::fs::write(self.dir.path().join(".cimaster.yml"), config).unwrap();
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", branch]);
        let sha = self.git(&["rev-parse", "HEAD"]);
        self.shas.insert(branch.to_owned(), sha.clone());
        sha
    }

    fn git(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("git").args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn sha(&self, branch: &str) -> &str {
        &self.shas[branch]
    }
}

/// Marks a queued run running, as an agent that claimed it would.
pub async fn claim_as_agent(pool: &PgPool, id: &str) {
    sqlx::query("UPDATE runs SET status = 'running', agent = 'agent-1', started_at = now() WHERE id = $1::uuid")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

pub async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let connection = cimaster_master::broker::connect(&SecretString::from(amqp_url()), "cimaster-test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Takes every message currently in one of the prefix's run queues, returning the run ids.
pub async fn drain_queue(prefix: &str, queue: &str) -> Vec<String> {
    let (_connection, channel) = amqp_channel().await;
    let name = format!("{prefix}.runs.{queue}");
    let mut ids = Vec::new();
    loop {
        match channel.basic_get(&name, BasicGetOptions::default()).await {
            Ok(Some(message)) => {
                let body: Value = serde_json::from_slice(&message.delivery.data).unwrap();
                assert_eq!(body["queue"], queue);
                ids.push(body["runId"].as_str().unwrap().to_owned());
                message.delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            Ok(None) => return ids,
            // Never declared: nothing was ever published there.
            Err(err) if err.to_string().contains("NOT_FOUND") => return ids,
            Err(err) => panic!("cannot read queue {name}: {err}"),
        }
    }
}

pub async fn delete_queues(prefix: &str, queues: &[&str]) {
    let url = SecretString::from(amqp_url());
    let _ = tokio::time::timeout(Duration::from_secs(10), cimaster_amqp::delete_prefix(&url, prefix, queues)).await;
}

/// Polls `check` until it returns `Some`, for up to `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
