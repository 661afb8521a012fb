//! Agents' git mirrors: a second run of a repository fetches only what is new, runs of one
//! repository at once share its mirror without fetching twice, depth and submodules are honoured, a
//! damaged mirror is rebuilt, jobs with their own credentials get mirrors of their own, and a run
//! stopped in its checkout ends the checkout and frees the mirror.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use support::{docker, AgentOptions, GitServer, Stack};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(120);
const GIT_IMAGE: &str = "cimaster-git:bookworm";

async fn run(stack: &Stack, job: &str) -> (Value, String) {
    let reply = stack.api.post(&format!("/jobs/{job}/runs"), json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
    finished(stack, &path).await
}

async fn finished(stack: &Stack, path: &str) -> (Value, String) {
    let run = stack.wait_finished(path, WAIT).await;
    let console = stack.console(path).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{console}");
    (run, console)
}

/// The objects the run's checkout fetched into the mirror; `None` when it fetched nothing.
fn fetched(console: &str) -> Option<u64> {
    if console.contains("nothing fetched") {
        return None;
    }
    let line = console.lines().find(|line| line.contains("mirror: fetched")).unwrap_or_else(|| panic!("{console}"));
    line.split("fetched ").nth(1).unwrap().split(' ').next().unwrap().parse().ok()
}

fn mirrors_of(agent: &str) -> Vec<String> {
    let agent_label = format!("label=cimaster.agent={agent}");
    docker(&["volume", "ls", "-q", "--filter", "label=cimaster.mirror", "--filter", &agent_label])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_second_run_fetches_only_what_is_new_and_concurrent_runs_fetch_once(pool: PgPool) {
    let git = GitServer::start();
    let url = git.repo("app");
    // A run sees its own workspace, and no other run's.
    let config =
        format!("image: {GIT_IMAGE}\nscript: cat VERSION; test ! -e /workspaces && echo no other workspaces\n");
    let files: Vec<(String, String)> =
        (0..40).map(|i| (format!("src/file{i}.txt"), format!("content {i}\n"))).collect();
    let mut all: Vec<(&str, &str)> = files.iter().map(|(path, text)| (path.as_str(), text.as_str())).collect();
    all.extend([(".cimaster.yml", config.as_str()), ("VERSION", "one")]);
    git.commit("app", "main", &all);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("app", json!({"kind": "git", "repository": url})).await;

    let (_, first) = run(&stack, "app").await;
    assert!(first.contains("mirror: new"), "{first}");
    assert!(fetched(&first).unwrap() >= 40, "the first run fetches the repository: {first}");

    git.commit("app", "main", &[("VERSION", "two")]);
    let (_, second) = run(&stack, "app").await;
    assert!(second.contains("two"), "{second}");
    let new = fetched(&second).unwrap();
    assert!((1..=4).contains(&new), "a commit, its tree and a blob, not the repository again: {new}\n{second}");

    // Two runs of a new commit at once: one fetches, the other finds it in the mirror.
    git.commit("app", "main", &[("VERSION", "three")]);
    let (a, b) = tokio::join!(
        stack.api.post("/jobs/app/runs", json!({"branchName": "main"})),
        stack.api.post("/jobs/app/runs", json!({"branchName": "main"}))
    );
    let paths: Vec<String> = [a, b].iter().map(|r| r.body["links"]["self"].as_str().unwrap().to_owned()).collect();
    let (_, one) = finished(&stack, &paths[0]).await;
    let (_, other) = finished(&stack, &paths[1]).await;
    assert!(one.contains("three") && other.contains("three"));
    let fetches = [fetched(&one), fetched(&other)];
    assert_eq!(fetches.iter().filter(|f| f.is_some()).count(), 1, "one fetch between them: {fetches:?}");
    assert!(one.contains("no other workspaces"), "{one}");
    let mirrors = mirrors_of(&stack.agents[0].id);
    assert_eq!(mirrors.len(), 1);

    // The mirror's git helper stays running; each run's workspace is removed after it.
    let helper = format!("{}-git", mirrors[0]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = docker(&["exec", &helper, "ls", "-A", "/workspaces"]);
        if left.trim().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "workspaces left behind: {left}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn depth_and_submodules_are_honoured_and_a_damaged_mirror_is_rebuilt(pool: PgPool) {
    let git = GitServer::start();
    let sub_url = git.repo("lib");
    git.commit("lib", "main", &[("lib.txt", "from the submodule")]);
    let url = git.repo("top");
    let script =
        "script:\n  - echo \"commits=$(git rev-list --count HEAD)\"\n  - cat lib/lib.txt || echo no-submodule\n";
    git.commit(
        "top",
        "main",
        &[
            (".shallow.yml", &format!("image: {GIT_IMAGE}\ncheckout: {{depth: 1, submodules: true}}\n{script}")),
            (".full.yml", &format!("image: {GIT_IMAGE}\n{script}")),
        ],
    );
    git.git("top", &["-c", "protocol.allow=always", "submodule", "add", "-q", &sub_url, "lib"]);
    git.git("top", &["commit", "-q", "-m", "submodule"]);
    git.commit("top", "main", &[("third.txt", "3")]);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("shallow", json!({"kind": "git", "repository": url, "configPath": ".shallow.yml"})).await;
    stack.put_job("full", json!({"kind": "git", "repository": url, "configPath": ".full.yml"})).await;

    let (_, shallow) = run(&stack, "shallow").await;
    assert!(shallow.contains("commits=1") && shallow.contains("from the submodule"), "{shallow}");
    let (_, full) = run(&stack, "full").await;
    assert!(full.contains("commits=3") && full.contains("no-submodule"), "{full}");

    // Damage the mirror: every object file overwritten.
    let mirrors = mirrors_of(&stack.agents[0].id);
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    let mount = format!("{}:/m", mirrors[0]);
    docker(&[
        "run",
        "--rm",
        "-v",
        &mount,
        "busybox:latest",
        "sh",
        "-c",
        "find /m/objects -type f ! -name '*.idx' -path '*/objects/*' -exec sh -c 'echo junk > \"$1\"' _ {} \\;",
    ]);
    let (_, rebuilt) = run(&stack, "full").await;
    assert!(rebuilt.contains("mirror: damaged; rebuilding it") && rebuilt.contains("commits=3"), "{rebuilt}");
}

#[sqlx::test(migrations = "../migrations")]
async fn jobs_with_their_own_credentials_do_not_share_a_mirror(pool: PgPool) {
    let git = GitServer::start();
    git.repo("private");
    git.commit(
        "private",
        "main",
        &[(".cimaster.yml", "image: busybox:latest\nscript: cat README\n"), ("README", "private")],
    );
    let (base, _server) = git.http("tok-mirror");
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    for job in ["one", "two"] {
        let body = json!({"kind": "git", "repository": format!("{base}/private"), "tokenSecret": "GIT_TOKEN"});
        stack.put_job(job, body).await;
        let set = stack.api.put(&format!("/jobs/{job}/secrets/GIT_TOKEN"), json!({"value": "tok-mirror"})).await;
        assert_eq!(set.status, 201, "{}", set.body);
        let (_, console) = run(&stack, job).await;
        assert!(console.contains("mirror: new"), "{console}");
    }
    assert_eq!(mirrors_of(&stack.agents[0].id).len(), 2, "one mirror per job's credentials");
}

#[sqlx::test(migrations = "../migrations")]
async fn mirrors_beyond_the_size_limit_go_least_recently_used_first_with_their_helpers(pool: PgPool) {
    let git = GitServer::start();
    // Each mirror takes about 4.5 MB of the 6 MiB allowed (the least the setting takes): 6 MB of
    // bytes that compress little.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: String = (0..6_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'0' + (state & 0x3f) as u8)
        })
        .collect();
    let urls: Vec<String> = ["a", "b"]
        .into_iter()
        .map(|repo| {
            let url = git.repo(repo);
            let config = ".cimaster.yml";
            git.commit(repo, "main", &[(config, "image: busybox:latest\nscript: echo hi\n"), ("noise", &noise)]);
            url
        })
        .collect();
    let mut stack = Stack::start(pool).await;
    let options =
        AgentOptions { env: vec![("CIMASTER_AGENT_MIRRORS_MAX_SIZE", "6Mi".to_owned())], ..Default::default() };
    stack.add_agent(options).await;
    let agent = stack.agents[0].id.clone();
    stack.put_job("a", json!({"kind": "git", "repository": urls[0]})).await;
    stack.put_job("b", json!({"kind": "git", "repository": urls[1]})).await;

    // Over the limit from the start, but a mirror a run uses is never removed under it.
    run(&stack, "a").await;
    let first = mirrors_of(&agent);
    assert_eq!(first.len(), 1, "{first:?}");
    // The end of the next run trims: the least recently used mirror goes, with its git helper.
    run(&stack, "b").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = mirrors_of(&agent);
        let helpers = docker(&["ps", "-aq", "--filter", &format!("name={}-git", first[0])]);
        if now.len() == 1 && now[0] != first[0] && helpers.trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mirrors {now:?} (first {first:?}), helpers of the first: {helpers}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `git://` front for a git server whose first connection from a container is accepted and never
/// answered, while every other connection passes through: a fetch that stalls once.
struct StallingFront {
    base: String,
    /// Told when the stalled connection's client closes it.
    closed: oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingFront {
    async fn start(git: &GitServer) -> Self {
        let listener = TcpListener::bind((git.host.as_str(), 0)).await.unwrap();
        let base = format!("git://{}:{}", git.host, listener.local_addr().unwrap().port());
        let upstream = (git.host.clone(), git.port);
        let (tell, closed) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tell = Some(tell);
            while let Ok((mut client, peer)) = listener.accept().await {
                // The master (an address of this host's own) passes; a container's first
                // connection stalls.
                let from_this_host = std::net::UdpSocket::bind((peer.ip(), 0)).is_ok();
                let stall = if from_this_host { None } else { tell.take() };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Some(tell) = stall {
                        let mut buffer = [0_u8; 4096];
                        while matches!(client.read(&mut buffer).await, Ok(read) if read > 0) {}
                        let _ = tell.send(());
                    } else if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { base, closed, task }
    }
}

impl Drop for StallingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A run aborted while its checkout's fetch stalls ends the checkout (the engine cannot stop an
/// exec): the fetch's connection closes, the next run of the repository gets the mirror at once
/// rather than when the stalled fetch would have ended, and the helper keeps nothing of it.
#[sqlx::test(migrations = "../migrations")]
async fn a_run_aborted_in_its_checkout_ends_the_checkout_and_frees_the_mirror(pool: PgPool) {
    let git = GitServer::start();
    git.repo("stalls");
    git.commit("stalls", "main", &[(".cimaster.yml", "image: busybox:latest\nscript: echo built\n")]);
    let mut front = StallingFront::start(&git).await;
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("stalls", json!({"kind": "git", "repository": format!("{}/stalls", front.base)})).await;
    let reply = stack.api.post("/jobs/stalls/runs", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + WAIT;
    while !stack.console(&path).await.contains("fetching") {
        assert!(std::time::Instant::now() < deadline, "the checkout never began fetching");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let abort = stack.api.post(&format!("{path}/abort"), json!({})).await;
    assert_eq!(abort.status, 202, "{}\n{}", stack.api.get(&path).await.body, stack.console(&path).await);
    let closed = tokio::time::timeout(Duration::from_secs(30), &mut front.closed).await;
    assert!(matches!(closed, Ok(Ok(()))), "the stalled fetch was not ended");
    assert_eq!(stack.wait_finished(&path, WAIT).await["status"], "aborted");

    let (_, console) = run(&stack, "stalls").await;
    assert!(console.contains("built"), "{console}");
    let mirrors = mirrors_of(&stack.agents[0].id);
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    let left = docker(&["exec", &format!("{}-git", mirrors[0]), "ls", "-A", "/tmp"]);
    assert_eq!(left.trim(), "", "the helper keeps a checkout's files");
}
