//! `cim`, the built binary, against a real master (and an agent where runs must run): exit codes
//! for each ending, the followed log, JSON equal to the API's, idempotent `jobs apply`, secrets
//! that never show, and clear refusals.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use cimaster_master::auth::{Role, Signer};
use serde_json::{json, Value};
use sqlx::PgPool;
use support::{binary, AgentOptions, Stack, SECRET};

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `cim` with the stack's URL and token in its environment (unless `env` overrides them), a
/// config file of its own, and `stdin` piped in.
fn cim_with(config: &std::path::Path, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Ran {
    let mut command = Command::new(binary("cim"));
    command
        .args(args)
        .env_remove("CIMASTER_URL")
        .env_remove("CIMASTER_TOKEN")
        .env("CIMASTER_CONFIG", config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let output = wait_bounded(child, Duration::from_secs(60));
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn wait_bounded(child: std::process::Child, limit: Duration) -> std::process::Output {
    let id = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match waited.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
            panic!("cim ran past {limit:?}");
        }
    }
}

struct Cli {
    config: tempfile::TempDir,
    url: String,
    token: String,
}

impl Cli {
    fn new(stack: &Stack) -> Self {
        Self { config: tempfile::tempdir().unwrap(), url: stack.api.base.clone(), token: stack.api.token.clone() }
    }

    fn config_file(&self) -> std::path::PathBuf {
        self.config.path().join("config.toml")
    }

    fn run(&self, args: &[&str]) -> Ran {
        self.run_with_stdin(args, "")
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Ran {
        let env = [("CIMASTER_URL", self.url.as_str()), ("CIMASTER_TOKEN", self.token.as_str())];
        cim_with(&self.config_file(), &env, args, stdin)
    }
}

const JOBS: &str = r#"
name: greet
kind: freestyle
image: busybox:latest
script:
  - echo first line
  - echo "second line for $TARGET"
  - echo third line
  - echo "started by $CIMASTER_EVENT"
parameters:
  TARGET: everyone
resources: {cpus: 0.5, memory: 64Mi}
---
- name: breaks
  kind: freestyle
  image: busybox:latest
  script: echo going down; exit 3
  resources: {cpus: 0.5, memory: 64Mi}
- name: lingers
  kind: freestyle
  image: busybox:latest
  script: echo waiting; sleep 60
  resources: {cpus: 0.5, memory: 64Mi}
"#;

#[sqlx::test(migrations = "../migrations")]
async fn cim_runs_jobs_and_its_exit_code_says_how_they_ended(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let cli = Cli::new(&stack);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.yaml");
    std::fs::write(&file, JOBS).unwrap();
    let file = file.to_str().unwrap();

    // Applied twice: the second time changes nothing.
    let applied = cli.run(&["jobs", "apply", "-f", file]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert_eq!(applied.stdout, "job greet: created\njob breaks: created\njob lingers: created\n");
    let again = cli.run(&["jobs", "apply", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(again.stdout, "job greet: unchanged\njob breaks: unchanged\njob lingers: unchanged\n");
    // A dry run shows the difference and changes nothing.
    std::fs::write(dir.path().join("jobs.yaml"), JOBS.replace("echo third line", "echo 3rd line")).unwrap();
    let preview = cli.run(&["jobs", "apply", "-f", file, "--dry-run"]);
    assert_eq!(preview.code, 0, "{}", preview.stderr);
    assert!(preview.stdout.contains("job greet: would be updated"), "{}", preview.stdout);
    assert!(preview.stdout.contains("- - echo third line\n+ - echo 3rd line"), "{}", preview.stdout);
    assert_eq!(stack.api.get("/jobs/greet").await.body["version"], 1, "the dry run changed the job");

    // Followed: the job's lines in order, then the outcome; exit 0.
    let followed = cli.run(&["run", "greet", "-p", "TARGET=cim", "--follow"]);
    assert_eq!(followed.code, 0, "{}", followed.stderr);
    let lines: Vec<&str> = ["first line", "second line for cim", "third line"]
        .into_iter()
        .map(|line| followed.stdout.find(line).map(|_| line).unwrap_or("missing"))
        .collect();
    assert_eq!(lines, ["first line", "second line for cim", "third line"], "{}", followed.stdout);
    let positions: Vec<usize> =
        ["first line", "second line", "third line"].iter().map(|line| followed.stdout.find(line).unwrap()).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "out of order: {}", followed.stdout);
    assert!(followed.stderr.contains("succeeded"), "{}", followed.stderr);
    assert!(followed.stdout.contains("started by api"), "the job knows its cause: {}", followed.stdout);

    // Failed: exit 5.
    let broke = cli.run(&["run", "breaks", "--follow"]);
    assert_eq!(broke.code, 5, "{}", broke.stderr);
    assert!(broke.stdout.contains("going down"));
    assert!(broke.stderr.contains("exit code 3"), "{}", broke.stderr);

    // Still running when --timeout passes: exit 3, and the run goes on.
    let slow = cli.run(&["run", "lingers", "--wait", "--timeout", "2s", "-o", "json"]);
    assert_eq!(slow.code, 3, "{}", slow.stderr);
    let slow_run: Value = serde_json::from_str(&slow.stdout).unwrap();
    let slow_ref = format!("lingers/{}", slow_run["id"].as_str().unwrap());
    assert!(slow.stderr.contains(&format!("cim abort {slow_ref}")), "{}", slow.stderr);

    // Aborted while someone waits on it: exit 6 for the waiter.
    let waiter = {
        let (url, token, config) = (cli.url.clone(), cli.token.clone(), cli.config_file());
        let run = slow_ref.clone();
        std::thread::spawn(move || {
            let env = [("CIMASTER_URL", url.as_str()), ("CIMASTER_TOKEN", token.as_str())];
            cim_with(&config, &env, &["logs", &run, "-f"], "");
            cim_with(&config, &env, &["rerun", &run, "--wait", "--timeout", "50s"], "")
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let aborted = cli.run(&["abort", &slow_ref]);
    assert_eq!(aborted.code, 0, "{}", aborted.stderr);
    // The rerun (of a `sleep 60`) is aborted through the API once it exists.
    let rerun_id = loop {
        let runs = stack.api.get("/runs?job=lingers&status=queued,running").await.body;
        if let Some(run) = runs["runs"].as_array().unwrap().iter().find(|run| run["rerunOf"].is_string()) {
            break run["id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stack.api.post(&format!("/jobs/lingers/runs/{rerun_id}/abort"), json!({})).await;
    let waited = tokio::task::spawn_blocking(move || waiter.join().unwrap()).await.unwrap();
    assert_eq!(waited.code, 6, "{}", waited.stderr);

    // -o json is the API's answer as it is.
    let id = slow_run["id"].as_str().unwrap();
    let shown = cli.run(&["runs", "show", id, "-o", "json"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let api = stack.api.get(&format!("/jobs/lingers/runs/{id}")).await.body;
    assert_eq!(serde_json::from_str::<Value>(&shown.stdout).unwrap(), api);
    let listed = cli.run(&["runs", "ls", "--job", "greet", "-o", "json"]);
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed, stack.api.get("/runs?limit=20&job=greet").await.body);
    let table = cli.run(&["runs", "ls"]);
    assert!(table.stdout.starts_with("RUN"), "{}", table.stdout);
    assert!(table.stdout.contains("succeeded") && table.stdout.contains("failed") && table.stdout.contains("aborted"));
    drop(stack);
}

#[sqlx::test(migrations = "../migrations")]
async fn cim_keeps_secrets_out_of_sight_and_refuses_clearly(pool: PgPool) {
    let stack = Stack::start(pool).await;
    let cli = Cli::new(&stack);
    stack
        .put_job(
            "deploy",
            json!({"kind": "freestyle", "image": "busybox:latest", "script": "true", "secrets": ["API_KEY"]}),
        )
        .await;

    // A secret's value comes from stdin and is never printed.
    let value = "s3cr3t-value-that-must-not-show";
    let set = cli.run_with_stdin(&["secrets", "set", "deploy", "API_KEY"], &format!("{value}\n"));
    assert_eq!(set.code, 0, "{}", set.stderr);
    let listed = cli.run(&["secrets", "ls", "deploy", "-o", "json"]);
    for output in [&set.stdout, &set.stderr, &listed.stdout, &listed.stderr] {
        assert!(!output.contains(value), "the value showed: {output}");
    }
    assert_eq!(serde_json::from_str::<Value>(&listed.stdout).unwrap()["secrets"][0]["name"], "API_KEY");

    // Usage errors: exit 2 with clap's message.
    let bad = cli.run(&["run", "deploy", "--frobnicate"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("unexpected argument '--frobnicate'"), "{}", bad.stderr);
    // Nothing listens: one line, exit 1.
    let config = cli.config_file();
    let nowhere =
        cim_with(&config, &[("CIMASTER_URL", "http://127.0.0.1:9"), ("CIMASTER_TOKEN", "x")], &["jobs", "ls"], "");
    assert_eq!(nowhere.code, 1);
    assert_eq!(nowhere.stderr.lines().count(), 1, "{}", nowhere.stderr);
    assert!(nowhere.stderr.contains("cannot reach http://127.0.0.1:9"), "{}", nowhere.stderr);
    // A bad token: exit 4, saying what to do; a read-only token that triggers: 4 as well.
    let stranger =
        cim_with(&config, &[("CIMASTER_URL", &cli.url), ("CIMASTER_TOKEN", "not-a-token")], &["jobs", "ls"], "");
    assert_eq!(stranger.code, 4, "{}", stranger.stderr);
    assert!(stranger.stderr.contains("cim login"), "{}", stranger.stderr);
    let reader = Signer::hs256(SECRET).unwrap().mint("reader", &[Role::Read], Duration::from_secs(600));
    let refused = cim_with(&config, &[("CIMASTER_URL", &cli.url), ("CIMASTER_TOKEN", &reader)], &["run", "deploy"], "");
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    // An API refusal: its detail on one line, exit 1.
    let missing = cli.run(&["run", "no-such-job"]);
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("404") && missing.stderr.contains("no-such-job"), "{}", missing.stderr);

    // Login saves a context (token from stdin, file 0600) that later commands use on their own.
    let login = cim_with(&config, &[], &["login", "--url", &cli.url, "--name", "local"], &cli.token);
    assert_eq!(login.code, 0, "{}", login.stderr);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let from_context = cim_with(&config, &[], &["jobs", "ls"], "");
    assert_eq!(from_context.code, 0, "{}", from_context.stderr);
    assert!(from_context.stdout.contains("deploy"));
    let contexts = cim_with(&config, &[], &["context", "ls"], "");
    assert!(contexts.stdout.contains("*  local"), "{}", contexts.stdout);
    let whoami = cim_with(&config, &[], &["whoami", "-o", "json"], "");
    let whoami: Value = serde_json::from_str(&whoami.stdout).unwrap();
    assert_eq!(whoami["roles"], json!(["admin"]));
    let completion = cim_with(&config, &[], &["completion", "bash"], "");
    assert_eq!(completion.code, 0);
    assert!(completion.stdout.contains("_cim()"), "{}", &completion.stdout[..200.min(completion.stdout.len())]);
    drop(stack);
}

const INVENTORY: &str = r#"[
  {"name": "cluster-01", "region": "us-west", "status": "testing", "lastJob": "e2e-conformance",
   "lastBuild": "12345", "lastTriggerName": "john", "hold": false, "disabled": false,
   "purpose": "tess-ci", "osimage": "centos-atomic-7.6.1810-qcow2"},
  {"name": "cluster-02", "region": "eu-central", "status": "vacant", "lastTriggerName": "mary", "hold": true,
   "disabled": false, "purpose": "tess-ci"},
  {"name": "cluster-03", "region": "eu-central", "status": "vacant", "hold": false, "disabled": true,
   "purpose": "tnet-ci", "osimage": "ubuntu-22.04", "somethingNew": 1}
]"#;

#[sqlx::test(migrations = "../migrations")]
async fn cim_imports_the_original_inventory_idempotently(pool: PgPool) {
    let stack = Stack::start(pool).await;
    let cli = Cli::new(&stack);

    let dry = cli.run_with_stdin(&["pool", "import", "-", "--dry-run"], INVENTORY);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry.stdout.contains("cluster-02: would be created (held)"), "{}", dry.stdout);
    assert_eq!(stack.api.get("/pool/clusters").await.body["clusters"], json!([]), "the dry run changed the pool");

    let imported = cli.run_with_stdin(&["pool", "import", "-"], INVENTORY);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    assert_eq!(
        imported.stdout,
        "cluster cluster-01: created\ncluster cluster-02: created (held)\ncluster cluster-03: created (disabled)\n"
    );
    let again = cli.run_with_stdin(&["pool", "import", "-"], INVENTORY);
    assert_eq!(
        again.stdout,
        "cluster cluster-01: unchanged\ncluster cluster-02: unchanged\ncluster cluster-03: unchanged\n"
    );
    let cluster = |name: &str| {
        let api = stack.api.clone();
        let name = name.to_owned();
        async move { api.get(&format!("/pool/clusters/{name}")).await.body }
    };
    // `testing` there comes in vacant; holds and disabled flags are kept.
    assert_eq!(cluster("cluster-01").await["status"], "vacant");
    assert_eq!(cluster("cluster-01").await["osimage"], "centos-atomic-7.6.1810-qcow2");
    assert_eq!(cluster("cluster-02").await["status"], "held");
    assert_eq!(cluster("cluster-03").await["status"], "disabled");
    assert_eq!(cluster("cluster-03").await["purpose"], "tnet-ci");

    // With --keep-leases, the cluster under test is leased again for its job and build.
    let kept = cli.run_with_stdin(&["pool", "import", "-", "--keep-leases"], INVENTORY);
    assert!(kept.stdout.contains("cluster-01: updated (leased)"), "{}", kept.stdout);
    let leased = cluster("cluster-01").await;
    assert_eq!((leased["status"].as_str(), leased["lease"]["build"].as_str()), (Some("leased"), Some("12345")));

    // The listing shows it all.
    let listed = cli.run(&["pool", "ls"]);
    assert!(listed.stdout.contains("cluster-02  held"), "{}", listed.stdout);
    let broken = cli.run_with_stdin(&["pool", "import", "-"], "{\"not\": \"an array\"}");
    assert_eq!(broken.code, 1);
    assert!(broken.stderr.contains("cluster.json"), "{}", broken.stderr);
    drop(stack);
}

#[sqlx::test(migrations = "../migrations")]
async fn ctrl_c_while_following_detaches_or_aborts(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let cli = Cli::new(&stack);
    stack
        .put_job(
            "lingers",
            json!({"kind": "freestyle", "image": "busybox:latest", "script": "echo started; sleep 60",
                                   "resources": {"cpus": 0.5, "memory": "64Mi"}}),
        )
        .await;
    for (flags, code, status) in [(&[][..], 130, "running"), (&["--abort-on-interrupt"][..], 6, "aborted")] {
        let mut args = vec!["run", "lingers", "--follow", "-o", "json"];
        args.extend_from_slice(flags);
        let mut child = Command::new(binary("cim"))
            .args(&args)
            .env("CIMASTER_URL", &cli.url)
            .env("CIMASTER_TOKEN", &cli.token)
            .env("CIMASTER_CONFIG", cli.config_file())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Interrupted once the run's first line has been streamed.
        let stdout = child.stdout.take().unwrap();
        let (seen, started) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            while let Some(Ok(line)) = lines.next() {
                if line.ends_with("started") {
                    let _ = seen.send(());
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        started.recv_timeout(Duration::from_secs(60)).expect("the run's first line");
        Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        let output = wait_bounded(child, Duration::from_secs(30));
        let stdout = reader.join().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{stderr}");
        // The run as JSON (pretty, up to its closing brace), then the log.
        let json = &stdout[..stdout.find("\n}\n").unwrap() + 2];
        let run: Value = serde_json::from_str(json).unwrap();
        let path = format!("/jobs/lingers/runs/{}", run["id"].as_str().unwrap());
        if status == "running" {
            assert!(stderr.contains("cim abort lingers/"), "{stderr}");
            assert_eq!(stack.api.get(&path).await.body["status"], "running");
            stack.api.post(&format!("{path}/abort"), json!({})).await;
        } else {
            stack.wait_finished(&path, Duration::from_secs(30)).await;
            assert_eq!(stack.api.get(&path).await.body["status"], "aborted");
        }
    }
    drop(stack);
}

#[sqlx::test(migrations = "../migrations")]
async fn cim_reads_results_and_leases_clusters(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let cli = Cli::new(&stack);
    let junit = r#"<testsuite name="calc"><testcase classname="calc" name="adds"/><testcase classname="calc" name="carries"><failure message="expected 10, got 0">trace</failure></testcase></testsuite>"#;
    let script = format!("mkdir -p out && echo '{junit}' > out/junit.xml && echo built-binary > out/app.txt");
    let job = json!({"kind": "freestyle", "image": "busybox:latest", "script": script, "workingDir": "/build",
                     "results": {"junit": ["out/*.xml"], "artifacts": ["out/*.txt"]},
                     "resources": {"cpus": 0.5, "memory": "64Mi"}});
    stack.put_job("tested", job).await;

    // The same idempotency key twice: one run.
    let first = cli.run(&["run", "tested", "--idempotency-key", "build-77", "--follow", "-o", "json"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(first.stderr.contains("tests: 2 run, 1 failed"), "{}", first.stderr);
    assert!(first.stderr.contains("calc.carries: expected 10, got 0"), "{}", first.stderr);
    let again = cli.run(&["run", "tested", "--idempotency-key", "build-77", "-o", "json"]);
    let (a, b): (Value, Value) = (
        serde_json::from_str(&first.stdout[..first.stdout.find("\n}\n").unwrap() + 2]).unwrap(),
        serde_json::from_str(&again.stdout).unwrap(),
    );
    assert_eq!(a["id"], b["id"], "a retried command started a second run");
    let run = format!("tested/{}", a["id"].as_str().unwrap());

    let listed = cli.run(&["results", &run]);
    assert!(listed.stdout.contains("out/app.txt") && listed.stdout.contains("out/junit.xml"), "{}", listed.stdout);
    let failed = cli.run(&["results", "junit", &run]);
    assert_eq!(failed.code, 5, "failed tests are a failure to scripts: {}", failed.stderr);
    assert!(failed.stdout.contains("calc.carries: expected 10, got 0"), "{}", failed.stdout);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.txt");
    let got = cli.run(&["artifacts", "get", &run, "out/app.txt", "-o", file.to_str().unwrap()]);
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "built-binary\n");
    let logs = cli.run(&["logs", a["id"].as_str().unwrap(), "--attempt", "1"]);
    assert!(logs.stdout.contains("runs attempt 1"), "{}", logs.stdout);

    // The pool: lease, hold, release.
    for name in ["c1", "c2"] {
        let added = stack.api.put(&format!("/pool/clusters/{name}"), json!({"region": "r"})).await;
        assert_eq!(added.status, 201, "{}", added.body);
    }
    let lease = cli.run(&["pool", "lease", "--purpose", "tess-ci", "-o", "json"]);
    assert_eq!(lease.code, 0, "{}", lease.stderr);
    let lease: Value = serde_json::from_str(&lease.stdout).unwrap();
    let held = cli.run(&["pool", "hold", "c2", "--hours", "1", "--desc", "debugging"]);
    assert_eq!(held.code, 0, "{}", held.stderr);
    let busy = cli.run(&["pool", "lease"]);
    assert_eq!(busy.code, 1, "nothing vacant: {}", busy.stderr);
    assert!(busy.stderr.contains("no vacant cluster"), "{}", busy.stderr);
    let released = cli.run(&["pool", "release", &lease["token"].to_string()]);
    assert_eq!(released.code, 0, "{}", released.stderr);
    assert_eq!(cli.run(&["pool", "unhold", "c2"]).code, 0);
    let listed = cli.run(&["pool", "ls", "-o", "json"]);
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    let states: Vec<&str> =
        listed["clusters"].as_array().unwrap().iter().map(|c| c["status"].as_str().unwrap()).collect();
    assert_eq!(states, ["vacant", "vacant"]);
    drop(stack);
}
