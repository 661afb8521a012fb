//! Git jobs end to end: a real repository served by `git daemon`, the job config file read at the
//! triggered commit, checkout in the mirror's git helper, images built from the repository's
//! Dockerfile, sidecar services, secrets and collected results.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use support::{leftovers, run_id, AgentOptions, GitServer, Stack};

const WAIT: Duration = Duration::from_secs(120);

fn git_job(url: &str) -> Value {
    json!({"kind": "git", "repository": url, "parameters": {"GREETING": "hello"}, "secrets": ["API_TOKEN"]})
}

async fn trigger_with(stack: &Stack, job: &str, body: Value) -> support::Reply {
    stack.api.post(&format!("/jobs/{job}/runs"), body).await
}

async fn started(stack: &Stack, job: &str, body: Value) -> String {
    let reply = trigger_with(stack, job, body).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.body["links"]["self"].as_str().unwrap().to_owned()
}

const CONFIG: &str = "image: busybox:latest
script:
  - echo \"version $(cat VERSION) at $CIMASTER_COMMIT\"
  - echo \"greeting=$GREETING colour=$COLOUR\"
  - echo \"token=$API_TOKEN\"
env: {COLOUR: blue}
secrets: [API_TOKEN]
resources: {cpus: 0.5, memory: 64Mi}
";

#[sqlx::test(migrations = "../migrations")]
async fn branch_and_commit_triggers_run_the_config_at_that_commit(pool: PgPool) {
    let git = GitServer::start();
    let url = git.repo("app");
    let main = git.commit("app", "main", &[(".cimaster.yml", CONFIG), ("VERSION", "one")]);
    let feature = git.commit("app", "feature", &[("VERSION", "two")]);
    git.commit("app", "broken", &[(".cimaster.yml", "image: busybox:latest\nscript: make\nscirpt: typo\n")]);
    git.commit("app", "unbuildable", &[(".cimaster.yml", "script: make\n")]);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("app", git_job(&url)).await;

    // The config names a secret nobody set yet: the run fails before it starts, saying which.
    let path = started(&stack, "app", json!({"branchName": "main"})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "error", "{run}");
    assert!(run["message"].as_str().unwrap().contains("secret `API_TOKEN` is not set for job `app`"), "{run}");
    assert_eq!(run["commitSha"], main.as_str());

    let token = "tok-5ecret-value-123";
    let set = stack.api.put("/jobs/app/secrets/API_TOKEN", json!({"value": token})).await;
    assert_eq!(set.status, 201, "{}", set.body);

    // A branch resolves to its commit at trigger time, and the run records both.
    let path = started(&stack, "app", json!({"branchName": "main", "parameters": {"GREETING": "hi"}})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["commitSha"], main.as_str());
    assert_eq!(run["branchName"], "main");
    assert_eq!(run["config"]["env"]["COLOUR"], "blue", "the run shows the config it executed: {run}");
    let console = stack.console(&path).await;
    assert!(console.contains(&format!("version one at {main}")), "{console}");
    assert!(console.contains("greeting=hi colour=blue"), "parameters and env reach the job: {console}");
    assert!(console.contains("token=***") && !console.contains(token), "{console}");
    assert!(console.contains(&format!("checked out {main}")), "{console}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));

    // A commit trigger runs exactly that commit.
    let path = started(&stack, "app", json!({"commitSha": feature})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&path).await;
    assert!(console.contains(&format!("version two at {feature}")), "{console}");
    assert!(console.contains("greeting=hello"), "the default parameter: {console}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));

    // Bad config files, branches and commits are the trigger's 422, and no run is created.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&stack.pool).await.unwrap();
    let reply = trigger_with(&stack, "app", json!({"branchName": "broken"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains("line 3") && detail.contains("unknown field `scirpt`"), "{detail}");
    let reply = trigger_with(&stack, "app", json!({"branchName": "unbuildable"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body["detail"].as_str().unwrap().contains("set `image`"), "{}", reply.body);
    let reply = trigger_with(&stack, "app", json!({"branchName": "nope"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body["detail"].as_str().unwrap().contains("branch `nope` does not exist"), "{}", reply.body);
    let reply = trigger_with(&stack, "app", json!({"commitSha": "0123456789012345678901234567890123456789"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    stack.put_job("other-path", json!({"kind": "git", "repository": url, "configPath": "ci/missing.yml"})).await;
    let reply = trigger_with(&stack, "other-path", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body["detail"].as_str().unwrap().contains("`ci/missing.yml` does not exist"), "{}", reply.body);
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&stack.pool).await.unwrap();
    assert_eq!(before, after);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_image_built_from_the_repository_is_reused_while_unchanged(pool: PgPool) {
    let git = GitServer::start();
    let url = git.repo("built");
    // Unique content, so the first build is a real build whatever ran on this engine before.
    let nonce = uuid::Uuid::new_v4().to_string();
    git.commit(
        "built",
        "main",
        &[
            (".cimaster.yml", "build: {dockerfile: docker/Dockerfile, context: docker}\nscript: cat /baked.txt\n"),
            ("docker/Dockerfile", "FROM busybox:latest\nCOPY baked.txt /baked.txt\nRUN echo built-in-step\n"),
            ("docker/baked.txt", &format!("baked {nonce}\n")),
        ],
    );
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("built", json!({"kind": "git", "repository": url})).await;

    let first = started(&stack, "built", json!({"branchName": "main"})).await;
    let run = stack.wait_finished(&first, WAIT).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&first).await;
    assert!(console.contains(&format!("baked {nonce}")), "{console}");
    assert!(console.contains("building docker/Dockerfile"), "{console}");
    assert!(console.contains("built-in-step"), "build output is in the console: {console}");
    let tag = console
        .split_whitespace()
        .find(|word| word.starts_with("cimaster-build:"))
        .unwrap()
        .trim_end_matches(':')
        .to_owned();

    // A change outside the context does not touch the image.
    git.commit("built", "main", &[("README", "docs only")]);
    let second = started(&stack, "built", json!({"branchName": "main"})).await;
    let run = stack.wait_finished(&second, WAIT).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&second).await;
    assert!(console.contains(&format!("reusing image {tag}")), "{console}");
    assert!(!console.contains("built-in-step"), "{console}");
    assert!(console.contains(&format!("baked {nonce}")), "{console}");
    for path in [&first, &second] {
        assert_eq!(leftovers(&run_id(path)).await, (0, 0));
    }
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag]).output();
}

/// A web service (busybox httpd) and a "database" (a TCP listener), reached by name.
const SIDECARS: &str = r#"image: busybox:latest
script: |
  printf 'GET /ping HTTP/1.0\r\n\r\n' | nc web 8080 | tail -n 1
  echo "db says: $(nc db 5432 </dev/null)"
services:
  web:
    image: busybox:latest
    command: "echo web starting; mkdir -p /www; echo pong > /www/ping; sleep 1; exec httpd -f -v -p 8080 -h /www"
    ready: {http: {port: 8080, path: /ping}, timeoutSeconds: 30}
    resources: {cpus: 0.25, memory: 32Mi}
  db:
    image: busybox:latest
    command: "sleep 1; while true; do echo db-ok | nc -l -p 5432; done"
    env: {ROLE: database}
    ready: {tcp: 5432, timeoutSeconds: 30}
    resources: {cpus: 0.25, memory: 32Mi}
  queue:
    image: busybox:latest
    command: "sleep 2; touch /tmp/up; exec sleep 600"
    ready: {command: "test -f /tmp/up", timeoutSeconds: 30}
    resources: {cpus: 0.25, memory: 32Mi}
resources: {cpus: 0.25, memory: 64Mi}
"#;

#[sqlx::test(migrations = "../migrations")]
async fn sidecars_are_reached_by_name_once_ready_and_runs_do_not_collide(pool: PgPool) {
    let git = GitServer::start();
    let url = git.repo("svc");
    git.commit("svc", "main", &[(".cimaster.yml", SIDECARS)]);
    let never = "image: busybox:latest\nscript: echo never\nservices:\n  db:\n    image: busybox:latest\n    \
                 command: sleep 60\n    ready: {tcp: 5432, timeoutSeconds: 2}\n";
    git.commit("svc", "never-ready", &[(".cimaster.yml", never)]);
    let mut stack = Stack::start(pool).await;
    // Host CPU use must not hold back the second run: this test wants both at once. Each run takes
    // 1 CPU of the agent's 2: the job's 0.25 and its three services' 0.25 each.
    stack.add_agent(AgentOptions { cpus: Some(2.0), max_cpu: Some(1.0), ..AgentOptions::default() }).await;
    stack.put_job("svc", json!({"kind": "git", "repository": url})).await;

    // Two runs of the same job at once on one agent, with the same service names.
    let one = started(&stack, "svc", json!({"branchName": "main"})).await;
    let two = started(&stack, "svc", json!({"branchName": "main"})).await;
    for path in [&one, &two] {
        let run = stack.wait_finished(path, WAIT).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let console = stack.console(path).await;
        assert!(console.contains("pong"), "{console}");
        assert!(console.contains("db says: db-ok"), "{console}");
        for service in ["web", "db", "queue"] {
            assert!(console.contains(&format!("service {service} is ready")), "{console}");
        }
        // The services' output is kept as results.
        let results = stack.api.get(&format!("{path}/results")).await.body;
        let logs: Vec<&str> = results["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "service-log")
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(logs, ["db.log", "queue.log", "web.log"], "{results}");
        let web =
            stack.api.request(reqwest::Method::GET, &format!("{path}/results/services/web")).send().await.unwrap();
        assert_eq!(web.status(), 200);
        assert!(web.text().await.unwrap().contains("web starting"));
        assert_eq!(leftovers(&run_id(path)).await, (0, 0));
    }
    // They ran at the same time, each with its own `web`, `db` and `queue`.
    let (a, b) = (stack.api.get(&one).await.body, stack.api.get(&two).await.body);
    let at = |run: &Value, field: &str| run[field].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert!(at(&a, "startedAt") < at(&b, "finishedAt") && at(&b, "startedAt") < at(&a, "finishedAt"), "{a}\n{b}");

    // A service that never becomes ready fails the run clearly, and the script never starts.
    let path = started(&stack, "svc", json!({"branchName": "never-ready"})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "error", "{run}");
    assert!(run["message"].as_str().unwrap().contains("service `db` was not ready after 2s"), "{run}");
    assert!(!stack.console(&path).await.contains("never\n"));
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

const TESTS: &str = r#"image: busybox:latest
script: |
  mkdir -p reports dist
  cat > reports/junit.xml <<'XML'
  <testsuites>
    <testsuite name="calc">
      <testcase classname="calc.Add" name="adds" time="0.5"/>
      <testcase classname="calc.Add" name="carries" time="0.25"><failure message="expected 10, got 0">trace</failure></testcase>
      <testcase classname="calc.Div" name="later"><skipped/></testcase>
    </testsuite>
  </testsuites>
  XML
  echo "artifact body" > dist/app.txt
  echo tests failed; exit 1
results:
  junit: ["reports/*.xml"]
  artifacts: ["dist/**"]
"#;

#[sqlx::test(migrations = "../migrations")]
async fn results_of_a_failing_run_are_collected_and_summarised(pool: PgPool) {
    let git = GitServer::start();
    let url = git.repo("tests");
    git.commit("tests", "main", &[(".cimaster.yml", TESTS)]);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("tests", json!({"kind": "git", "repository": url})).await;
    let path = started(&stack, "tests", json!({"branchName": "main"})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 1);

    let listed = stack.api.get(&format!("{path}/results")).await.body;
    let kinds: Vec<(String, String, i64)> = listed["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] != "console")
        .map(|r| (r["kind"].as_str().unwrap().into(), r["name"].as_str().unwrap().into(), r["size"].as_i64().unwrap()))
        .collect();
    assert_eq!(kinds.len(), 2, "{listed}");
    assert!(kinds.contains(&("artifact".into(), "dist/app.txt".into(), 14)), "{listed}");
    assert!(kinds.iter().any(|(kind, name, _)| kind == "junit" && name == "reports/junit.xml"), "{listed}");

    let summary = stack.api.get(&format!("{path}/results/junit")).await;
    assert_eq!(summary.status, 200, "{}", summary.body);
    let body = summary.body;
    assert_eq!(
        (body["tests"].as_u64(), body["failures"].as_u64(), body["skipped"].as_u64()),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(body["failed"][0]["name"], "carries");
    assert_eq!(body["failed"][0]["message"], "expected 10, got 0");
    assert_eq!(body["files"], json!(["reports/junit.xml"]));

    let zip = stack
        .api
        .request(reqwest::Method::GET, &format!("{path}/results/junit"))
        .header("accept", "application/zip")
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), 200);
    assert_eq!(zip.headers()["content-type"], "application/zip");
    let bytes = zip.bytes().await.unwrap();
    assert!(bytes.starts_with(b"PK"), "not a zip");
    assert!(bytes.windows(17).any(|w| w == b"reports/junit.xml"), "the zip names the report");

    let artifact = stack
        .api
        .request(reqwest::Method::GET, &format!("{path}/results/artifacts/dist/app.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(artifact.status(), 200);
    // A file a job wrote is never run as a page of the API's origin.
    assert_eq!(artifact.headers()["x-content-type-options"], "nosniff");
    assert_eq!(artifact.headers()["content-security-policy"], "sandbox");
    assert_eq!(artifact.headers()["content-disposition"], "attachment; filename=\"app.txt\"; filename*=UTF-8''app.txt");
    assert_eq!(artifact.text().await.unwrap(), "artifact body\n");
    let missing = stack.api.get(&format!("{path}/results/artifacts/dist/nope.txt")).await;
    assert_eq!(missing.status, 404);
    assert!(missing.body["detail"].as_str().unwrap().contains("no result file `dist/nope.txt`"), "{}", missing.body);
    let later = stack.api.get(&format!("{path}/results/junit?attempt=2")).await;
    assert_eq!(later.status, 404, "{}", later.body);
    assert!(later.body["detail"].as_str().unwrap().contains("attempts 1 to 1"), "{}", later.body);
    let earlier = stack.api.get(&format!("{path}/results/artifacts/dist/app.txt?attempt=1")).await;
    assert_eq!(earlier.status, 200);
    assert_eq!(stack.api.get(&format!("{path}/results/junit?attempt=one")).await.status, 400);
    // The listing takes `attempt` like every results endpoint.
    let first = stack.api.get(&format!("{path}/results?attempt=1")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["results"], listed["results"], "one attempt: the same listing");
    let beyond = stack.api.get(&format!("{path}/results?attempt=99")).await;
    assert_eq!(beyond.status, 404, "{}", beyond.body);
    assert!(beyond.body["detail"].as_str().unwrap().contains("attempts 1 to 1"), "{}", beyond.body);
    assert_eq!(stack.api.get(&format!("{path}/results?attempt=abc")).await.status, 400);
    assert_eq!(stack.api.get(&format!("{path}/results/services/db")).await.status, 404);
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_private_repository_is_read_and_cloned_with_the_jobs_token(pool: PgPool) {
    let git = GitServer::start();
    git.repo("private");
    let head = git.commit(
        "private",
        "main",
        &[
            (".cimaster.yml", "image: busybox:latest\nscript: cat secret-sauce\n"),
            ("secret-sauce", "only for the token holder\n"),
        ],
    );
    let token = "ghp_private-token-0123456789";
    let (base, _server) = git.http(token);
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let url = format!("{base}/private/.git");
    stack.put_job("private", json!({"kind": "git", "repository": url, "tokenSecret": "GIT_TOKEN"})).await;

    let reply = trigger_with(&stack, "private", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body["detail"].as_str().unwrap().contains("secret `GIT_TOKEN` is not set"), "{}", reply.body);

    stack.api.put("/jobs/private/secrets/GIT_TOKEN", json!({"value": "wrong-token"})).await;
    let reply = trigger_with(&stack, "private", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains("cannot read the repository") && !detail.contains("wrong-token"), "{detail}");

    stack.api.put("/jobs/private/secrets/GIT_TOKEN", json!({"value": token})).await;
    let path = started(&stack, "private", json!({"branchName": "main"})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["commitSha"], head.as_str());
    let console = stack.console(&path).await;
    assert!(console.contains("only for the token holder"), "{console}");
    assert!(!console.contains(token), "{console}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_private_repository_is_read_and_cloned_over_ssh_with_a_deploy_key(pool: PgPool) {
    let git = GitServer::start();
    git.repo("deploy");
    let head = git.commit(
        "deploy",
        "main",
        &[(".cimaster.yml", "image: busybox:latest\nscript: cat ssh-only\n"), ("ssh-only", "fetched over ssh\n")],
    );
    let (base, key, sshd) = git.ssh();
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    let url = format!("{base}/deploy");
    stack.put_job("deploy", json!({"kind": "git", "repository": url, "sshKeySecret": "DEPLOY_KEY"})).await;

    // Without the key the repository cannot be read.
    let reply = trigger_with(&stack, "deploy", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body["detail"].as_str().unwrap().contains("secret `DEPLOY_KEY` is not set"), "{}", reply.body);

    stack.api.put("/jobs/deploy/secrets/DEPLOY_KEY", json!({"value": key})).await;
    // A pinned host key that does not match: the server is not trusted.
    let pinned =
        |known: &str| json!({"kind": "git", "repository": url, "sshKeySecret": "DEPLOY_KEY", "sshKnownHosts": known});
    stack.put_job("deploy", pinned(&sshd.wrong_known_hosts)).await;
    let reply = trigger_with(&stack, "deploy", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body["detail"].as_str().unwrap().contains("Host key verification failed"), "{}", reply.body);

    stack.put_job("deploy", pinned(&sshd.known_hosts)).await;
    let path = started(&stack, "deploy", json!({"branchName": "main"})).await;
    let run = stack.wait_finished(&path, WAIT).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["commitSha"], head.as_str());
    let console = stack.console(&path).await;
    assert!(console.contains("fetched over ssh"), "{console}");
    assert!(!console.contains("PRIVATE KEY"), "{console}");
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));
}
