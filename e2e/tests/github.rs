//! GitHub end to end: signed webhooks into real masters, runs on a real agent, and commit statuses
//! posted to a fake of GitHub's API that records them (and fails for a while, and plays a GitHub
//! App that hands out expiring installation tokens).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use cimaster_e2e::fake_github::{self, AppCheck, FakeGithub, Posted};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use support::{AgentOptions, Api, GitServer, Reply, Stack};

const REPO: &str = "octo-org/hello";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret";
const PUBLIC_URL: &str = "https://ci.example.test";

fn settings(fake: &FakeGithub, auth: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CIMASTER_GITHUB_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ("CIMASTER_GITHUB_API_URL", fake.url.clone()),
        ("CIMASTER_PUBLIC_URL", PUBLIC_URL.to_owned()),
        ("CIMASTER_GITHUB_HANDLE_INTERVAL", "100ms".to_owned()),
        ("CIMASTER_GITHUB_REPORT_INTERVAL", "100ms".to_owned()),
    ];
    env.extend(auth);
    env
}

/// Sends a delivery as GitHub does, signed, without a bearer token.
async fn deliver(api: &Api, event: &str, id: &str, payload: &Value) -> Reply {
    let body = serde_json::to_vec(payload).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let response = api
        .http
        .post(api.url("/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    Reply { status, body: response.json().await.unwrap() }
}

/// Waits until the delivery is handled; its outcome and runs.
async fn handled(api: &Api, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = api.get("/hooks/github/deliveries").await;
        assert_eq!(list.status, 200, "{}", list.body);
        let found = list.body["deliveries"].as_array().unwrap().iter().find(|d| d["id"] == id).cloned();
        if let Some(delivery) = found.filter(|d| d["state"] == "done") {
            return delivery;
        }
        assert!(Instant::now() < deadline, "delivery {id} never handled: {}", list.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pull_event(action: &str, pull: &Value) -> Value {
    json!({"action": action, "number": pull["number"], "pull_request": pull,
           "repository": {"full_name": REPO}, "sender": {"login": pull["user"]["login"]}})
}

fn comment(number: i64, body: &str, login: &str, association: &str) -> Value {
    json!({
        "action": "created",
        "issue": {"number": number, "state": "open",
                  "pull_request": {"url": format!("https://api.github.com/repos/{REPO}/pulls/{number}")}},
        "comment": {"body": body, "user": {"login": login}, "author_association": association},
        "repository": {"full_name": REPO}, "sender": {"login": login}
    })
}

/// Waits until the commit's status in `context` satisfies `done`; everything posted there.
async fn wait_status(fake: &FakeGithub, sha: &str, context: &str, done: impl Fn(&Posted) -> bool) -> Vec<Posted> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let posted = fake.statuses_of(sha, context);
        if posted.last().is_some_and(&done) {
            return posted;
        }
        assert!(Instant::now() < deadline, "{context} on {sha} never got there: {posted:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn runs_of(pool: &PgPool) -> Vec<(String, String, String, String)> {
    sqlx::query_as("SELECT id::text, job, status, event FROM runs ORDER BY created_at").fetch_all(pool).await.unwrap()
}

fn git_job(url: &str, config: &str) -> Value {
    json!({"kind": "git", "repository": url, "configPath": config,
           "github": {"repository": REPO, "pullRequests": {"branches": ["main"]}}})
}

#[sqlx::test(migrations = "../migrations")]
async fn a_members_pull_request_gets_its_statuses_in_order_through_github_errors_and_two_replicas(pool: PgPool) {
    let fake = FakeGithub::start(None).await.unwrap();
    let mut stack =
        Stack::start_with(pool.clone(), settings(&fake, vec![("CIMASTER_GITHUB_TOKEN", fake_github::TOKEN.into())]))
            .await;
    let replica = stack.add_master().await;
    stack.add_agent(AgentOptions::default()).await;
    let git = GitServer::start();
    let url = git.repo("hello");
    let main = git.commit("hello", "main", &[(".cimaster.yml", "image: busybox:latest\nscript: echo ok\n")]);
    let head = git.commit("hello", "feature", &[("change.txt", "1")]);
    let mut job = git_job(&url, ".cimaster.yml");
    job["github"]["push"] = json!({"branches": ["main"]});
    stack.put_job("unit", job).await;

    // GitHub delivers to whichever replica; the same delivery at both creates one run.
    let pull = fake_github::pull_request(REPO, 7, &head, "mona", "MEMBER", None);
    let event = pull_event("opened", &pull);
    let (first, second) = tokio::join!(
        deliver(&stack.api, "pull_request", "d-open", &event),
        deliver(&replica.api, "pull_request", "d-open", &event)
    );
    let mut answers = [(first.status, first.body["outcome"].clone()), (second.status, second.body["outcome"].clone())];
    answers.sort_by_key(|answer| answer.0);
    assert_eq!(answers, [(200, json!("already received")), (202, json!("accepted"))]);

    let posted = wait_status(&fake, &head, "cimaster/unit", |s| s.state != "pending").await;
    let last = posted.last().unwrap();
    assert_eq!(last.state, "success", "{posted:#?}");
    assert!(last.description.starts_with("passed in "), "{}", last.description);
    assert!(posted[..posted.len() - 1].iter().all(|s| s.state == "pending"), "pending, then the result: {posted:#?}");
    assert!(posted.iter().any(|s| s.description.starts_with("running on ")), "{posted:#?}");
    let runs = runs_of(&pool).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run_url = format!("{PUBLIC_URL}/ui/jobs/unit/runs/{}", runs[0].0);
    assert!(posted.iter().all(|s| s.target_url.as_deref() == Some(run_url.as_str())), "{posted:#?}");
    assert!(posted.iter().all(|s| s.authorization == format!("Bearer {}", fake_github::TOKEN)));
    assert_eq!(posted.iter().filter(|s| s.repository == REPO).count(), posted.len());

    // A status is posted when the state changes, not again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.statuses_of(&head, "cimaster/unit").len(), posted.len());
    let listed = stack.api.get(&format!("/hooks/github/statuses?sha={head}")).await;
    assert_eq!(listed.body["statuses"][0]["outcome"], "posted", "{}", listed.body);

    // GitHub answers 502 for a while: the push's status still arrives, its final state last.
    fake.fail_statuses(3);
    let push = json!({"ref": "refs/heads/main", "before": "0".repeat(40), "after": main, "deleted": false,
                      "repository": {"full_name": REPO}, "sender": {"login": "mona"}});
    deliver(&replica.api, "push", "d-push", &push).await;
    let posted = wait_status(&fake, &main, "cimaster/unit", |s| s.state != "pending").await;
    assert_eq!(posted.last().unwrap().state, "success", "{posted:#?}");
    assert_eq!(fake.failed(), 3, "the 502s were retried");
    let listed = stack.api.get(&format!("/hooks/github/statuses?sha={main}")).await;
    assert!(
        listed.body["statuses"][0]["attempts"] == 0 && listed.body["statuses"][0]["settled"] == true,
        "{}",
        listed.body
    );

    // The rate limit runs out: nothing is posted before it resets.
    fake.rate_limit_statuses(1);
    let limited_sha = git.commit("hello", "main", &[("change.txt", "2")]);
    let push = json!({"ref": "refs/heads/main", "before": main, "after": limited_sha, "deleted": false,
                      "repository": {"full_name": REPO}, "sender": {"login": "mona"}});
    deliver(&stack.api, "push", "d-push-limited", &push).await;
    let posted = wait_status(&fake, &limited_sha, "cimaster/unit", |s| s.state == "success").await;
    let limited_at = fake.limited();
    assert_eq!(limited_at.len(), 1);
    assert!(posted[0].at.duration_since(limited_at[0]) >= Duration::from_millis(900), "waited for the reset");

    // GitHub refuses a commit's statuses for good: recorded and dropped, not retried.
    let refused_sha = git.commit("hello", "main", &[("change.txt", "3")]);
    fake.refuse_statuses_of(&refused_sha);
    let push = json!({"ref": "refs/heads/main", "before": limited_sha, "after": refused_sha, "deleted": false,
                      "repository": {"full_name": REPO}, "sender": {"login": "mona"}});
    deliver(&stack.api, "push", "d-push-refused", &push).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dropped = loop {
        let listed = stack.api.get(&format!("/hooks/github/statuses?sha={refused_sha}")).await.body;
        if listed["statuses"][0]["settled"] == true {
            break listed["statuses"][0].clone();
        }
        assert!(Instant::now() < deadline, "never dropped: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(dropped["outcome"].as_str().unwrap().contains("maximum number of statuses"), "{dropped}");
    let refusals = fake.refusals();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.refusals(), refusals, "a refused status is not retried");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_strangers_fork_waits_for_ok_to_test_runs_without_secrets_and_retest_reruns_what_failed(pool: PgPool) {
    let fake = FakeGithub::start(None).await.unwrap();
    let mut stack =
        Stack::start_with(pool.clone(), settings(&fake, vec![("CIMASTER_GITHUB_TOKEN", fake_github::TOKEN.into())]))
            .await;
    stack.add_agent(AgentOptions::default()).await;
    let git = GitServer::start();
    let url = git.repo("hello");
    git.commit(
        "hello",
        "main",
        &[
            (
                ".cimaster.yml",
                "image: busybox:latest\nsecrets: [API_TOKEN]\nscript: echo \"secret=${API_TOKEN:-withheld}\"\n",
            ),
            (".lint.yml", "image: busybox:latest\nscript: exit 1\n"),
        ],
    );
    let head = git.commit("hello", "feature", &[("change.txt", "from a fork")]);
    let mut unit = git_job(&url, ".cimaster.yml");
    unit["secrets"] = json!(["API_TOKEN"]);
    // A fork's config names only images the job allows (or pinned by digest).
    unit["allowedImages"] = json!(["busybox:*"]);
    stack.put_job("unit", unit).await;
    let mut lint = git_job(&url, ".lint.yml");
    lint["allowedImages"] = json!(["busybox:*"]);
    stack.put_job("lint", lint).await;
    assert_eq!(stack.api.put("/jobs/unit/secrets/API_TOKEN", json!({"value": "s3cr3t-value"})).await.status, 201);

    let pull = fake_github::pull_request(REPO, 9, &head, "stranger", "NONE", Some("stranger/hello"));
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-open", &pull_event("opened", &pull)).await;
    let delivery = handled(&stack.api, "d-open").await;
    assert!(delivery["outcome"].as_str().unwrap().contains("waiting for /ok-to-test"), "{delivery}");
    for context in ["cimaster/unit", "cimaster/lint"] {
        let waiting = wait_status(&fake, &head, context, |s| s.state == "pending").await;
        assert!(waiting[0].description.starts_with("waiting for /ok-to-test"), "{waiting:#?}");
    }

    deliver(&stack.api, "issue_comment", "d-self", &comment(9, "/ok-to-test", "stranger", "NONE")).await;
    let refused = handled(&stack.api, "d-self").await;
    assert!(refused["outcome"].as_str().unwrap().contains("stranger is not trusted"), "{refused}");
    assert!(runs_of(&pool).await.is_empty(), "a stranger cannot approve themselves");

    deliver(&stack.api, "issue_comment", "d-ok", &comment(9, "Thanks!\n/ok-to-test", "mona", "MEMBER")).await;
    let approved = handled(&stack.api, "d-ok").await;
    assert_eq!(approved["runs"].as_array().unwrap().len(), 2, "{approved}");
    let unit_status = wait_status(&fake, &head, "cimaster/unit", |s| s.state != "pending").await;
    assert_eq!(unit_status.last().unwrap().state, "success");
    let lint_status = wait_status(&fake, &head, "cimaster/lint", |s| s.state != "pending").await;
    let failed = lint_status.last().unwrap();
    assert_eq!((failed.state.as_str(), failed.description.starts_with("failed with exit code 1")), ("failure", true));

    let runs = runs_of(&pool).await;
    let unit_run = runs.iter().find(|run| run.1 == "unit").unwrap();
    let path = format!("/jobs/unit/runs/{}", unit_run.0);
    let run = stack.api.get(&path).await.body;
    assert_eq!(
        (run["event"].as_str(), run["fromFork"].as_bool(), run["pullRequest"].as_i64()),
        (Some("comment"), Some(true), Some(9))
    );
    let console = stack.console(&path).await;
    assert!(
        console.contains("secret=withheld") && !console.contains("s3cr3t"),
        "a fork's run gets no secrets: {console}"
    );
    assert!(console.contains("secrets API_TOKEN withheld: the pull request comes from a fork"), "{console}");

    deliver(&stack.api, "issue_comment", "d-retest", &comment(9, "/retest", "mona", "MEMBER")).await;
    let retest = handled(&stack.api, "d-retest").await;
    let rerun: Vec<_> = retest["runs"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_owned()).collect();
    assert_eq!(rerun.len(), 1, "{retest}");
    let runs = runs_of(&pool).await;
    assert_eq!(runs.iter().find(|run| run.0 == rerun[0]).unwrap().1, "lint", "only the failed job runs again");

    // `/test <job>` runs that job, `/test all` every job the pull request's base subscribes.
    deliver(&stack.api, "issue_comment", "d-test-unit", &comment(9, "/test unit", "mona", "MEMBER")).await;
    let one = handled(&stack.api, "d-test-unit").await;
    assert_eq!(one["runs"].as_array().unwrap().len(), 1, "{one}");
    assert!(one["outcome"].as_str().unwrap().starts_with("unit: run "), "{one}");
    deliver(&stack.api, "issue_comment", "d-test-all", &comment(9, "/test all", "mona", "MEMBER")).await;
    let all = handled(&stack.api, "d-test-all").await;
    assert_eq!(all["runs"].as_array().unwrap().len(), 2, "{all}");

    // The stranger pushes again: the approval was for the old head, the new one waits.
    let newer = git.commit("hello", "feature", &[("change.txt", "more from the fork")]);
    let mut pull = pull;
    pull["head"]["sha"] = json!(newer);
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-sync", &pull_event("synchronize", &pull)).await;
    let waiting = handled(&stack.api, "d-sync").await;
    assert!(waiting["outcome"].as_str().unwrap().contains("waiting for /ok-to-test"), "{waiting}");
    assert!(waiting["runs"].as_array().unwrap().is_empty(), "{waiting}");
}

/// Waits until the delivery is handled; its outcome, and that it made no run.
async fn handled_without_runs(api: &Api, id: &str) -> String {
    let delivery = handled(api, id).await;
    assert!(delivery["runs"].as_array().unwrap().is_empty(), "{delivery}");
    delivery["outcome"].as_str().unwrap().to_owned()
}

#[sqlx::test(migrations = "../migrations")]
async fn an_approval_holds_for_the_head_the_approver_saw_and_a_later_push_waits_again(pool: PgPool) {
    let fake = FakeGithub::start(None).await.unwrap();
    let stack =
        Stack::start_with(pool.clone(), settings(&fake, vec![("CIMASTER_GITHUB_TOKEN", fake_github::TOKEN.into())]))
            .await;
    let git = GitServer::start();
    let url = git.repo("hello");
    git.commit("hello", "main", &[(".cimaster.yml", "image: busybox:latest\nscript: echo hello\n")]);
    let reviewed = git.commit("hello", "feature", &[("change.txt", "what the maintainer read")]);
    let mut unit = git_job(&url, ".cimaster.yml");
    unit["allowedImages"] = json!(["busybox:*"]);
    stack.put_job("unit", unit).await;

    let mut pull = fake_github::pull_request(REPO, 12, &reviewed, "stranger", "NONE", Some("stranger/hello"));
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-open", &pull_event("opened", &pull)).await;
    assert!(handled_without_runs(&stack.api, "d-open").await.contains("waiting for /ok-to-test"));

    // The maintainer comments on what they read while the stranger pushes: the comment arrives
    // before the push's webhook, and is handled when the pull request's head is the new one.
    let pushed = git.commit("hello", "feature", &[("change.txt", "pushed after the review")]);
    pull["head"]["sha"] = json!(pushed);
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "issue_comment", "d-ok", &comment(12, "LGTM\n/ok-to-test", "mona", "MEMBER")).await;
    deliver(&stack.api, "pull_request", "d-push", &pull_event("synchronize", &pull)).await;
    let outcome = handled_without_runs(&stack.api, "d-ok").await;
    assert!(
        outcome.contains(&format!(
            "unit: /ok-to-test approves nothing: the head {pushed} arrived after the comment; review it and comment \
             `/ok-to-test {pushed}`"
        )),
        "{outcome}"
    );
    assert!(handled_without_runs(&stack.api, "d-push").await.contains("waiting for /ok-to-test"));
    let waiting = wait_status(&fake, &pushed, "cimaster/unit", |s| s.state == "pending").await;
    assert!(waiting.last().unwrap().description.starts_with("waiting for /ok-to-test"), "{waiting:#?}");

    // Naming the reviewed commit approves nothing either: it is not the head any more. A short
    // prefix is not enough, and `/test` does not run an unapproved head.
    let old = comment(12, &format!("/ok-to-test {reviewed}"), "mona", "MEMBER");
    deliver(&stack.api, "issue_comment", "d-ok-old", &old).await;
    let outcome = handled_without_runs(&stack.api, "d-ok-old").await;
    assert!(outcome.contains(&format!("the head is now {pushed}; review it and approve it by its SHA")), "{outcome}");
    let short = comment(12, &format!("/ok-to-test {}", &pushed[..7]), "mona", "MEMBER");
    deliver(&stack.api, "issue_comment", "d-ok-short", &short).await;
    assert!(handled_without_runs(&stack.api, "d-ok-short").await.contains("name at least 12 hex digits"));
    deliver(&stack.api, "issue_comment", "d-test", &comment(12, "/test unit", "mona", "MEMBER")).await;
    let outcome = handled_without_runs(&stack.api, "d-test").await;
    assert!(outcome.contains(&format!("unit: waiting for /ok-to-test: head {pushed} is not approved")), "{outcome}");
    assert!(runs_of(&pool).await.is_empty());

    // Approved by its SHA, the new head runs.
    let named = comment(12, &format!("/ok-to-test {}", &pushed[..12]), "mona", "MEMBER");
    deliver(&stack.api, "issue_comment", "d-ok-new", &named).await;
    let approved = handled(&stack.api, "d-ok-new").await;
    assert_eq!(approved["runs"].as_array().unwrap().len(), 1, "{approved}");
    let commit: String = sqlx::query_scalar("SELECT commit_sha FROM runs").fetch_one(&pool).await.unwrap();
    assert_eq!(commit, pushed);

    // A push after the approval waits for a new one.
    let later = git.commit("hello", "feature", &[("change.txt", "pushed after the approval")]);
    pull["head"]["sha"] = json!(later);
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-push-later", &pull_event("synchronize", &pull)).await;
    assert!(handled_without_runs(&stack.api, "d-push-later").await.contains("waiting for /ok-to-test"));
    let waiting = wait_status(&fake, &later, "cimaster/unit", |s| s.state == "pending").await;
    assert!(waiting.last().unwrap().description.starts_with("waiting for /ok-to-test"), "{waiting:#?}");
    assert_eq!(runs_of(&pool).await.len(), 1, "only the approved head ran");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_app_renews_its_token_pushes_supersede_closing_aborts_and_resync_finds_missed_pulls(pool: PgPool) {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../master/tests/keys");
    let app = AppCheck {
        id: 1234,
        public_key_pem: std::fs::read(format!("{keys}/rsa-test.pub.pem")).unwrap(),
        // Renewed ten minutes before it expires: good for a second here.
        token_lifetime: Duration::from_secs(10 * 60 + 1),
        fixed_token: None,
    };
    let fake = FakeGithub::start(Some(app)).await.unwrap();
    let auth = vec![
        ("CIMASTER_GITHUB_APP_ID", "1234".to_owned()),
        ("CIMASTER_GITHUB_APP_PRIVATE_KEY_FILE", format!("{keys}/rsa-test.pem")),
        ("CIMASTER_GITHUB_RESYNC_INTERVAL", "1s".to_owned()),
    ];
    let mut stack = Stack::start_with(pool.clone(), settings(&fake, auth)).await;
    stack.add_agent(AgentOptions::default()).await;
    let git = GitServer::start();
    let url = git.repo("hello");
    git.commit("hello", "main", &[(".cimaster.yml", "image: busybox:latest\nscript: sleep 60\n")]);
    let first = git.commit("hello", "feature", &[("change.txt", "1")]);
    stack.put_job("slow", git_job(&url, ".cimaster.yml")).await;

    let mut pull = fake_github::pull_request(REPO, 5, &first, "mona", "MEMBER", None);
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-open", &pull_event("opened", &pull)).await;
    wait_status(&fake, &first, "cimaster/slow", |s| s.description.starts_with("running on ")).await;

    let second = git.commit("hello", "feature", &[("change.txt", "2")]);
    pull["head"]["sha"] = json!(second);
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-sync", &pull_event("synchronize", &pull)).await;
    let superseded = wait_status(&fake, &first, "cimaster/slow", |s| s.state != "pending").await;
    let last = superseded.last().unwrap();
    assert_eq!((last.state.as_str(), last.description.as_str()), ("error", "superseded by a newer push"));
    wait_status(&fake, &second, "cimaster/slow", |s| s.description.starts_with("running on ")).await;

    pull["state"] = json!("closed");
    fake.set_pull(REPO, pull.clone());
    deliver(&stack.api, "pull_request", "d-close", &pull_event("closed", &pull)).await;
    let closed = wait_status(&fake, &second, "cimaster/slow", |s| s.state != "pending").await;
    let last = closed.last().unwrap();
    assert_eq!(last.state, "error");
    assert!(last.description.contains("pull request closed"), "{}", last.description);

    // A pull request whose webhook never came: the resync finds it and runs it.
    let third = git.commit("hello", "other", &[("change.txt", "3")]);
    fake.set_pull(REPO, fake_github::pull_request(REPO, 6, &third, "mona", "MEMBER", None));
    wait_status(&fake, &third, "cimaster/slow", |s| s.state == "pending").await;
    let runs = runs_of(&pool).await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(runs[2].3, "pull_request");

    // The token has less than ten minutes left by now: the next call gets a new one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let path = format!("/jobs/slow/runs/{}", runs[2].0);
    assert_eq!(stack.api.post(&format!("{path}/abort"), json!({})).await.status, 202);
    let aborted = wait_status(&fake, &third, "cimaster/slow", |s| s.state != "pending").await;
    assert_eq!(aborted.last().unwrap().description, "aborted by e2e");
    assert!(fake.tokens_issued() >= 2, "the installation token was renewed: {}", fake.tokens_issued());
    assert_eq!(fake.unauthorized(), 0, "every call carried a valid JWT or a token allowed to make it");
    assert!(fake.statuses().iter().all(|s| s.authorization.starts_with("Bearer ghs_installation_")));
    // The runs read the repository with tokens for it alone, which cannot post a status.
    let scopes = fake.token_scopes();
    let read_only = json!({"repositories": ["hello"], "permissions": {"contents": "read"}});
    assert!(scopes.contains(&Some(read_only)), "{scopes:?}");
    assert!(scopes.contains(&None), "the master's own calls have a token of their own: {scopes:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_apps_installation_token_reads_and_clones_a_private_repository(pool: PgPool) {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../master/tests/keys");
    let git = GitServer::start();
    git.repo("private");
    git.commit(
        "private",
        "main",
        &[(".cimaster.yml", "image: busybox:latest\nscript: cat README\n"), ("README", "from a private repository")],
    );
    let (base, _server) = git.http("ghs_the_installation_token");
    let app = AppCheck {
        id: 77,
        public_key_pem: std::fs::read(format!("{keys}/rsa-test.pub.pem")).unwrap(),
        token_lifetime: Duration::from_secs(3600),
        fixed_token: Some("ghs_the_installation_token".to_owned()),
    };
    let fake = FakeGithub::start(Some(app)).await.unwrap();
    let auth = vec![
        ("CIMASTER_GITHUB_APP_ID", "77".to_owned()),
        ("CIMASTER_GITHUB_APP_PRIVATE_KEY_FILE", format!("{keys}/rsa-test.pem")),
    ];
    let mut stack = Stack::start_with(pool.clone(), settings(&fake, auth)).await;
    stack.add_agent(AgentOptions::default()).await;
    // No tokenSecret: the App's installation token reads the file and clones.
    let job = json!({"kind": "git", "repository": format!("{base}/private"), "github": {"repository": REPO}});
    stack.put_job("private", job).await;
    let reply = stack.api.post("/jobs/private/runs", json!({"branchName": "main"})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let path = reply.body["links"]["self"].as_str().unwrap().to_owned();
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&path).await;
    assert!(console.contains("from a private repository"), "{console}");
    assert!(!console.contains("ghs_the_installation_token"), "{console}");
    assert_eq!(fake.tokens_issued(), 1, "one token, cached");
    // Asked for the one repository, to read it: a job that leaks it can read that repository alone
    // and cannot post a commit status.
    let read_only = json!({"repositories": ["hello"], "permissions": {"contents": "read"}});
    assert_eq!(fake.token_scopes(), vec![Some(read_only)]);
}
