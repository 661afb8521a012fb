//! A whole CIMaster installation for one test: a master process and agent processes over the test's
//! own database and queue prefix, on the shared Postgres, RabbitMQ, S3 server and Docker engine.
#![allow(dead_code, clippy::unwrap_used)]

pub mod broker_cluster;
pub mod history;
pub mod partition;
pub mod recorder;
pub mod scaling;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cimaster_master::auth::{Role, Signer};
use serde_json::Value;
use sqlx::PgPool;
use tokio::process::{Child, Command};

pub const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-e2e";
pub const SECRETS_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; the workspace's binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(path.exists(), "{} is not built; run the tests with `cargo nextest run --workspace`", path.display());
    path
}

/// `scripts/dev`, which stops and starts the shared services for fault tests.
pub const DEV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dev");

/// `scripts/dev` with `args`, blocking (for drop guards that bring a service back).
pub fn dev(args: &[&str]) {
    let status = std::process::Command::new(DEV).args(args).status().unwrap();
    assert!(status.success(), "scripts/dev {args:?} failed");
}

/// `scripts/dev` without holding up the test's runtime, where the recorder answers the jobs.
pub async fn dev_async(args: &[&str]) {
    let status = tokio::process::Command::new(DEV).args(args).status().await.unwrap();
    assert!(status.success(), "scripts/dev {args:?} failed");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL (scripts/test sets it)");
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{database}")
}

pub struct Stack {
    pub pool: PgPool,
    pub database_url: String,
    pub prefix: String,
    pub api: Api,
    master: Child,
    pub agents: Vec<Agent>,
    /// More settings for every master of the stack.
    master_env: Vec<(&'static str, String)>,
}

pub struct Agent {
    pub id: String,
    pub child: Child,
}

/// A master replica beside the stack's own.
pub struct Replica {
    pub child: Child,
    pub api: Api,
}

/// Deletes the queues and the exchange the stack's prefix declared, so that a day of test runs leaves
/// nothing in the broker. Runs on a thread of its own: drops happen inside the test's runtime.
pub fn delete_topology(prefix: &str) {
    let Ok(url) = std::env::var("CIMASTER_AMQP_URL") else { return };
    let prefix = prefix.to_owned();
    let cleanup = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let url = secrecy::SecretString::from(url);
            let delete = cimaster_amqp::delete_prefix(&url, &prefix, &["default", "large", "gpu"]);
            let _ = tokio::time::timeout(Duration::from_secs(10), delete).await;
        });
    });
    let _ = cleanup.join();
}

/// Starts a master process and waits until it is ready.
async fn spawn_master(database_url: &str, prefix: &str, env: &[(&'static str, String)]) -> (Child, Api) {
    spawn_master_until(database_url, prefix, env, "/readyz").await
}

/// Starts a master process and waits until `probe` answers 200 (`/healthz` for one that cannot be
/// ready).
async fn spawn_master_until(
    database_url: &str,
    prefix: &str,
    env: &[(&'static str, String)],
    probe: &str,
) -> (Child, Api) {
    let port = free_port();
    let master = Command::new(binary("cimaster"))
        .arg("serve")
        .env("CIMASTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CIMASTER_DATABASE_URL", database_url)
        .env("CIMASTER_QUEUE_PREFIX", prefix)
        .env("CIMASTER_JWT_SECRET", SECRET)
        .env("CIMASTER_SECRETS_KEY", SECRETS_KEY)
        .env("CIMASTER_DISPATCH_INTERVAL", "200ms")
        .env("CIMASTER_DISPATCH_GRACE", "500ms")
        .env("CIMASTER_LEASE_CHECK_INTERVAL", "200ms")
        .env("CIMASTER_OBSERVE_INTERVAL", "200ms")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let token = Signer::hs256(SECRET).unwrap().mint("e2e", &[Role::Admin], Duration::from_secs(3600));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let api = Api { base: format!("http://127.0.0.1:{port}"), http, token };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !api.http.get(api.url(probe)).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "master never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (master, api)
}

/// Agent settings a test may change.
#[derive(Clone)]
pub struct AgentOptions {
    pub cpus: Option<f64>,
    pub lease: &'static str,
    pub stop_grace: &'static str,
    /// How long before its lease could expire a cut-off agent has stopped the run.
    pub lease_margin: &'static str,
    /// Runs the agent inside this network namespace (`partition::Host`).
    pub netns: Option<String>,
    /// More (or overriding) environment, e.g. service URLs as seen from a namespace.
    pub env: Vec<(&'static str, String)>,
    /// Host CPU use above which the agent takes no new run.
    pub max_cpu: Option<f64>,
    /// Runs without the egress policy (`CIMASTER_AGENT_EGRESS=false`): its jobs reach this host,
    /// where the history recorder listens.
    pub open_egress: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            cpus: None,
            lease: "5s",
            stop_grace: "1s",
            lease_margin: "1s",
            max_cpu: None,
            netns: None,
            env: Vec::new(),
            open_egress: false,
        }
    }
}

impl Stack {
    pub async fn start(pool: PgPool) -> Self {
        Self::start_with(pool, Vec::new()).await
    }

    /// A stack whose masters get more settings.
    pub async fn start_with(pool: PgPool, master_env: Vec<(&'static str, String)>) -> Self {
        let database_url = database_url(&pool);
        let prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let (master, api) = spawn_master(&database_url, &prefix, &master_env).await;
        Self { pool, database_url, prefix, api, master, agents: Vec::new(), master_env }
    }

    /// A stack whose master cannot reach RabbitMQ: its triggers commit runs it cannot publish.
    pub async fn start_without_broker(pool: PgPool) -> Self {
        let database_url = database_url(&pool);
        let prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let unreachable =
            vec![("CIMASTER_AMQP_URL", format!("amqp://cimaster:cimaster@127.0.0.1:{}/%2f", free_port()))];
        let (master, api) = spawn_master_until(&database_url, &prefix, &unreachable, "/healthz").await;
        Self { pool, database_url, prefix, api, master, agents: Vec::new(), master_env: Vec::new() }
    }

    /// Kills the stack's master (SIGKILL) and starts a healthy one in its place over the same
    /// database and queues.
    pub async fn replace_master(&mut self) {
        let _ = self.master.start_kill();
        let _ = self.master.wait().await;
        let (master, api) = spawn_master(&self.database_url, &self.prefix, &self.master_env).await;
        self.master = master;
        self.api = api;
    }

    /// Another master replica over the same database and queues; it stops when dropped.
    pub async fn add_master(&self) -> Replica {
        let (child, api) = spawn_master(&self.database_url, &self.prefix, &self.master_env).await;
        Replica { child, api }
    }

    /// Starts an agent with a fresh id.
    pub async fn add_agent(&mut self, options: AgentOptions) -> usize {
        let id = format!("{}-agent-{}", self.prefix, self.agents.len() + 1);
        self.start_agent(&id, options).await
    }

    /// Starts an agent with the given id (a restart of an earlier one when the id repeats).
    pub async fn start_agent(&mut self, id: &str, options: AgentOptions) -> usize {
        let mut command = match &options.netns {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(binary("cimaster-agent"));
                command
            }
            None => Command::new(binary("cimaster-agent")),
        };
        command
            .env("CIMASTER_AGENT_ID", id)
            .env("CIMASTER_DATABASE_URL", &self.database_url)
            .env("CIMASTER_QUEUE_PREFIX", &self.prefix)
            .env("CIMASTER_LEASE_TTL", options.lease)
            .env("CIMASTER_STOP_GRACE", options.stop_grace)
            .env("CIMASTER_LEASE_MARGIN", options.lease_margin)
            // Run networks from a range of their own, not the engine's ~31 default ones.
            .env("CIMASTER_AGENT_NETWORK_POOL", "10.240.0.0/16")
            .env("CIMASTER_SECRETS_KEY", SECRETS_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if let Some(cpus) = options.cpus {
            command.env("CIMASTER_AGENT_CPUS", cpus.to_string());
        }
        if let Some(max_cpu) = options.max_cpu {
            command.env("CIMASTER_AGENT_MAX_CPU", max_cpu.to_string());
        }
        if options.open_egress {
            command.env("CIMASTER_AGENT_EGRESS", "false");
        }
        for (name, value) in &options.env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        self.agents.push(Agent { id: id.to_owned(), child });
        self.agents.len() - 1
    }

    pub fn kill_agent(&mut self, index: usize) {
        self.signal_agent(index, "KILL");
    }

    pub fn signal_agent(&mut self, index: usize, signal: &str) {
        let pid = self.agents[index].child.id().unwrap();
        let status =
            std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for an agent process to exit; returns whether it exited cleanly.
    pub async fn agent_exit(&mut self, index: usize, timeout: Duration) -> bool {
        let status = tokio::time::timeout(timeout, self.agents[index].child.wait())
            .await
            .expect("the agent did not exit in time")
            .unwrap();
        status.success()
    }

    pub async fn put_job(&self, name: &str, body: Value) {
        let reply = self.api.put(&format!("/jobs/{name}"), body).await;
        assert!(reply.status == 200 || reply.status == 201, "PUT job: {}", reply.body);
    }

    /// Triggers a run and returns its path.
    pub async fn trigger(&self, job: &str) -> String {
        let reply = self.api.post(&format!("/jobs/{job}/runs"), serde_json::json!({})).await;
        assert_eq!(reply.status, 201, "trigger: {}", reply.body);
        reply.body["links"]["self"].as_str().unwrap().to_owned()
    }

    /// Polls the run until its status satisfies `done`.
    pub async fn wait_for(&self, path: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.api.get(path).await;
            assert_eq!(reply.status, 200, "reading {path}: {}", reply.body);
            let run = reply.body;
            let status = run["status"].as_str().unwrap_or_else(|| panic!("a run without a status: {run}"));
            if done(status) {
                return run;
            }
            assert!(Instant::now() < deadline, "run did not get there within {timeout:?}: {run}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_finished(&self, path: &str, timeout: Duration) -> Value {
        self.wait_for(path, timeout, |status| !matches!(status, "queued" | "running")).await
    }

    /// The result files (kind, name) a run lists, the console aside, sorted.
    pub async fn listed_results(&self, path: &str) -> Vec<(String, String)> {
        let listed = self.api.get(&format!("{path}/results")).await.body;
        let mut files: Vec<(String, String)> = listed["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] != "console")
            .map(|r| (r["kind"].as_str().unwrap().to_owned(), r["name"].as_str().unwrap().to_owned()))
            .collect();
        files.sort();
        files
    }

    pub async fn console(&self, path: &str) -> String {
        let response = self.api.request(reqwest::Method::GET, &format!("{path}/results/console")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.child.start_kill();
        }
        let _ = self.master.start_kill();
        // Gone before the test's database is dropped (their connections would keep it).
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in self.agents.iter_mut().map(|agent| &mut agent.child).chain([&mut self.master]) {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        delete_topology(&self.prefix);
        // Whatever an agent of this stack left behind (a killed agent cannot clean up).
        for agent in &self.agents {
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "f=label=cimaster.agent={}; docker ps -aq --filter $f | xargs -r docker rm -f; \
                     docker volume ls -q --filter $f | xargs -r docker volume rm -f; \
                     docker network ls -q --filter $f | xargs -r docker network rm",
                    agent.id
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(&self.token)
    }

    /// The same API, called with a token of `role` for `subject`.
    pub fn as_role(&self, subject: &str, role: Role) -> Api {
        let token = Signer::hs256(SECRET).unwrap().mint(subject, &[role], Duration::from_secs(3600));
        Api { token, ..self.clone() }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        Reply { status, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(reqwest::Method::PUT, path).json(&body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(reqwest::Method::POST, path).json(&body)).await
    }
}

/// Containers and networks still labelled with the run, once the agent has had 10 s to remove them
/// (removal follows the final status).
/// Containers, and networks plus volumes, of a run still present.
pub async fn leftovers(run_id: &str) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = leftovers_now(run_id);
        if found == (0, 0) || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a `docker` command that must succeed (a failing one must not read as "nothing found") and
/// returns its output.
pub fn docker(args: &[&str]) -> String {
    let output = std::process::Command::new("docker").args(args).output().expect("docker runs");
    assert!(output.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn leftovers_now(run_id: &str) -> (usize, usize) {
    let count = |args: &[&str]| docker(args).lines().filter(|l| !l.trim().is_empty()).count();
    let filter = format!("label=cimaster.run={run_id}");
    (
        count(&["ps", "-aq", "--filter", &filter]),
        count(&["network", "ls", "-q", "--filter", &filter]) + count(&["volume", "ls", "-q", "--filter", &filter]),
    )
}

/// Every container of the agent: its runs', its networks' sandboxes and its git helpers.
pub fn containers_of_agent(agent: &str) -> usize {
    count_containers(&[&format!("label=cimaster.agent={agent}")])
}

/// The agent's containers that belong to a run.
pub fn run_containers_of_agent(agent: &str) -> usize {
    count_containers(&[&format!("label=cimaster.agent={agent}"), "label=cimaster.run"])
}

/// The agent's containers that belong to a run and still run.
pub fn running_run_containers_of_agent(agent: &str) -> usize {
    count_containers(&[&format!("label=cimaster.agent={agent}"), "label=cimaster.run", "status=running"])
}

/// The containers, running or not, that match every filter.
fn count_containers(filters: &[&str]) -> usize {
    let mut args = vec!["ps", "-aq"];
    for filter in filters {
        args.extend(["--filter", filter]);
    }
    docker(&args).lines().filter(|l| !l.trim().is_empty()).count()
}

/// The agent's networks, each with the number of containers attached to it.
pub fn networks_of_agent(agent: &str) -> Vec<(String, usize)> {
    docker(&["network", "ls", "-q", "--filter", &format!("label=cimaster.agent={agent}")])
        .split_whitespace()
        .map(|id| {
            let attached = docker(&["network", "inspect", id, "-f", "{{len .Containers}}"]);
            (id.to_owned(), attached.trim().parse().unwrap_or(usize::MAX))
        })
        .collect()
}

pub fn run_id(path: &str) -> String {
    path.rsplit('/').next().unwrap().to_owned()
}

/// This host's address on the Docker bridge (its gateway, the first address of its subnet): where
/// the agent's git helpers and the test's own servers meet.
pub fn bridge_gateway() -> String {
    let subnet = docker(&["network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Subnet}}"]).trim().to_owned();
    let network: std::net::Ipv4Addr =
        subnet.split('/').next().unwrap().parse().unwrap_or_else(|_| panic!("bridge subnet `{subnet}`"));
    std::net::Ipv4Addr::from(u32::from(network) + 1).to_string()
}

/// A git repository served over `git daemon` on the Docker bridge's gateway address, which both the
/// master (on this host) and the agent's containers (on their run networks) reach.
pub struct GitServer {
    pub dir: tempfile::TempDir,
    pub host: String,
    pub port: u16,
    daemon: std::process::Child,
}

impl GitServer {
    pub fn start() -> Self {
        let host = bridge_gateway();
        let port = std::net::TcpListener::bind((host.as_str(), 0)).unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        // `git-daemon` itself, not `git daemon`: `git` would run it as a child, which a kill of
        // `git` leaves behind.
        let exec_path = std::process::Command::new("git").arg("--exec-path").output().unwrap();
        let exec_path = String::from_utf8(exec_path.stdout).unwrap();
        let daemon = std::process::Command::new(format!("{}/git-daemon", exec_path.trim()))
            .args(["--reuseaddr", "--export-all", "--informative-errors"])
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(format!("--listen={host}"))
            .arg(format!("--port={port}"))
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((host.as_str(), port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { dir, host, port, daemon }
    }

    /// Creates repository `name` (a working copy, served as is) and returns its URL.
    pub fn repo(&self, name: &str) -> String {
        self.git(name, &["init", "-q", "-b", "main"]);
        self.git(name, &["config", "user.email", "e2e@cimaster.test"]);
        self.git(name, &["config", "user.name", "e2e"]);
        format!("git://{}:{}/{name}", self.host, self.port)
    }

    /// Writes files on `branch` (created from the current one if new) and commits; the commit's SHA.
    pub fn commit(&self, name: &str, branch: &str, files: &[(&str, &str)]) -> String {
        let path = self.dir.path().join(name);
        if !self.has_ref(name, branch) {
            let has_commits = self.has_ref(name, "HEAD");
            if has_commits {
                self.git(name, &["checkout", "-q", "-b", branch]);
            }
        } else {
            self.git(name, &["checkout", "-q", branch]);
        }
        for (file, text) in files {
            let target = path.join(file);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(target, text).unwrap();
        }
        self.git(name, &["add", "-A"]);
        self.git(name, &["commit", "-q", "-m", &format!("change on {branch}")]);
        self.git(name, &["rev-parse", "HEAD"])
    }

    /// Serves the repositories over smart HTTP too, only to `x-access-token:TOKEN`; the base URL and
    /// the server process (killed on drop).
    pub fn http(&self, token: &str) -> (String, tokio::process::Child) {
        let port = std::net::TcpListener::bind((self.host.as_str(), 0)).unwrap().local_addr().unwrap().port();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/git_http.py");
        let child = Command::new("python3")
            .arg(script)
            .args([self.host.as_str(), &port.to_string(), &self.dir.path().display().to_string(), token])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.host.as_str(), port)).is_err() {
            assert!(Instant::now() < deadline, "the git HTTP server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (format!("http://{}:{port}", self.host), child)
    }

    /// Serves the repositories over SSH: an sshd of the test's own (on the bridge address, key
    /// only) that lets in a fresh deploy key. The repositories' ssh:// base URL, the deploy key's
    /// private half, and what keeps the server alive.
    pub fn ssh(&self) -> (String, String, SshServer) {
        let dir = tempfile::tempdir().unwrap();
        let keygen = |file: &str| {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(file))
                .status()
                .unwrap();
            assert!(status.success(), "ssh-keygen");
        };
        keygen("host_key");
        keygen("deploy_key");
        std::fs::copy(dir.path().join("deploy_key.pub"), dir.path().join("authorized_keys")).unwrap();
        let port = std::net::TcpListener::bind((self.host.as_str(), 0)).unwrap().local_addr().unwrap().port();
        let config = format!(
            "Port {port}\nListenAddress {host}\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n",
            host = self.host,
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("sshd_config"), config).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.host.as_str(), port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let user = std::process::Command::new("id").arg("-un").output().unwrap();
        let user = String::from_utf8_lossy(&user.stdout).trim().to_owned();
        let key = std::fs::read_to_string(dir.path().join("deploy_key")).unwrap();
        let base = format!("ssh://{user}@{}:{port}{}", self.host, self.dir.path().display());
        let line = |file: &str| {
            let public = std::fs::read_to_string(dir.path().join(file)).unwrap();
            format!("[{}]:{port} {}", self.host, public.trim())
        };
        // Another key under the server's name: what a man in the middle would present.
        let (known_hosts, wrong_known_hosts) = (line("host_key.pub"), line("deploy_key.pub"));
        (base, key, SshServer { known_hosts, wrong_known_hosts, _dir: dir, _child: child })
    }

    /// Whether the repository has this branch (or `HEAD` has a commit).
    fn has_ref(&self, name: &str, reference: &str) -> bool {
        let path = self.dir.path().join(name);
        let status = std::process::Command::new("git")
            .args(["rev-parse", "--verify", "-q", reference])
            .current_dir(&path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        status.success()
    }

    /// Runs a git command that must succeed; its output.
    pub fn git(&self, name: &str, args: &[&str]) -> String {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        let output = std::process::Command::new("git").args(args).current_dir(&path).output().unwrap();
        assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// A test's own sshd, stopped on drop.
pub struct SshServer {
    /// The server's real host key, as a known_hosts line.
    pub known_hosts: String,
    /// A different key under the server's name.
    pub wrong_known_hosts: String,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

/// A freestyle job of `script` in the locally built `busybox:latest`, small enough that several fit.
pub fn busybox_job(script: &str) -> Value {
    serde_json::json!({"kind": "freestyle", "image": "busybox:latest", "script": script,
                       "resources": {"cpus": 0.5, "memory": "64Mi"}})
}

/// A counter's or gauge's value in a Prometheus text exposition (summed over its label sets that
/// contain `labels`), 0 when absent.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && line.contains(labels)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
