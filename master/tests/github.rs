//! GitHub webhooks: signed deliveries, shaped like GitHub's documentation shows them, become runs of
//! the subscribed git jobs — once per delivery, superseded and aborted as the pull request moves.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use support::{git_job, LocalRepo, Reply, TestApp, WEBHOOK_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REPO: &str = "octo-org/hello";

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends a delivery as GitHub does; `signature` overrides the right one.
async fn deliver(app: &TestApp, event: &str, id: &str, payload: &Value, signature: Option<&str>) -> Reply {
    let body = serde_json::to_vec(payload).unwrap();
    let mut request = app
        .anonymous()
        .request(reqwest::Method::POST, "/hooks/github")
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .header("user-agent", "GitHub-Hookshot/test");
    let signature = signature.map_or_else(|| sign(&body), str::to_owned);
    if !signature.is_empty() {
        request = request.header("x-hub-signature-256", signature);
    }
    app.anonymous().send(request.body(body)).await
}

fn pull_request(action: &str, number: i64, head: &str, author: &str, association: &str) -> Value {
    json!({
        "action": action,
        "number": number,
        "pull_request": {
            "number": number, "state": "open", "draft": false, "author_association": association,
            "user": {"login": author, "type": "User"},
            "head": {"ref": "feature", "sha": head, "repo": {"full_name": REPO}},
            "base": {"ref": "main", "sha": "1111111111111111111111111111111111111111", "repo": {"full_name": REPO}}
        },
        "repository": {"full_name": REPO, "name": "hello", "owner": {"login": "octo-org"}},
        "sender": {"login": author}
    })
}

fn push(branch: &str, after: &str) -> Value {
    json!({
        "ref": format!("refs/heads/{branch}"), "before": "0000000000000000000000000000000000000000",
        "after": after, "created": false, "deleted": false, "forced": false,
        "repository": {"full_name": REPO}, "pusher": {"name": "mona"}, "sender": {"login": "mona"}
    })
}

/// A git job over `repo` subscribed to pull requests into main and pushes to main.
async fn subscribe(app: &TestApp, repo: &LocalRepo, name: &str) {
    let mut job = git_job(repo);
    job["github"] = json!({"repository": "Octo-Org/Hello", "pullRequests": {"branches": ["main"]},
                           "push": {"branches": ["main", "release-*"]}});
    let put = app.admin().put(&format!("/jobs/{name}"), job).await;
    assert_eq!(put.status, 201, "{}", put.body);
}

/// Waits until the delivery is handled; its outcome and runs.
async fn handled(app: &TestApp, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = app.admin().get("/hooks/github/deliveries").await;
        assert_eq!(list.status, 200, "{}", list.body);
        let found = list.body["deliveries"].as_array().unwrap().iter().find(|d| d["id"] == id).cloned();
        if let Some(delivery) = found.filter(|d| d["state"] == "done") {
            return delivery;
        }
        assert!(Instant::now() < deadline, "delivery {id} never handled: {}", list.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn runs_of(pool: &PgPool) -> Vec<(String, String, Option<String>, Option<i64>, String)> {
    sqlx::query_as("SELECT id::text, status, commit_sha, pull_request, event FROM runs ORDER BY created_at")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn deliveries_are_authenticated_by_their_signature_and_checked(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let ping = json!({"zen": "Design for failure.", "hook_id": 1, "repository": {"full_name": REPO}});
    deliver(&app, "ping", "d-unsigned", &ping, Some("")).await.expect_problem(401, "no X-Hub-Signature-256");
    deliver(&app, "ping", "d-forged", &ping, Some(&sign(b"something else")))
        .await
        .expect_problem(401, "does not match");
    // GitHub caps payloads at 25 MB; a larger body is refused before anything is read from it.
    let huge = json!({"zen": "x".repeat(26 << 20)});
    let too_big = deliver(&app, "ping", "d-huge", &huge, None).await;
    too_big.expect_problem(413, "larger than the limit of 26214400 bytes");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM github_deliveries").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 0, "nothing is stored for a delivery that is not authentic");

    let pong = deliver(&app, "ping", "d-ping", &ping, None).await;
    assert_eq!((pong.status, pong.body["outcome"].as_str()), (200, Some("pong")), "{}", pong.body);
    let ignored = deliver(&app, "star", "d-star", &json!({"action": "created"}), None).await;
    assert_eq!(ignored.status, 202);
    assert_eq!(ignored.body["outcome"], "the `star` event starts nothing");
    let broken = deliver(&app, "pull_request", "d-broken", &json!({"action": "opened"}), None).await;
    broken.expect_problem(400, "the payload has no `repository.full_name`");
    let nobody = deliver(&app, "push", "d-nobody", &push("main", &"a".repeat(40)), None).await;
    assert_eq!((nobody.status, nobody.body["outcome"].as_str()), (202, Some("no job subscribes to octo-org/hello")));
    let deleted = json!({"ref": "refs/heads/old", "after": "0".repeat(40), "deleted": true,
                         "repository": {"full_name": REPO}, "sender": {"login": "mona"}});
    let gone = deliver(&app, "push", "d-deleted", &deleted, None).await;
    assert_eq!(gone.body["outcome"], "branch `old` was deleted: nothing to run");

    let listed = app.admin().get("/hooks/github/deliveries?repository=OCTO-ORG/hello").await;
    let ids: Vec<&str> =
        listed.body["deliveries"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"d-nobody") && ids.contains(&"d-ping"), "{ids:?}");
    app.as_role(cimaster_master::auth::Role::Read).get("/hooks/github/deliveries").await.expect_problem(403, "");
    app.stop().await;
}

/// A delivery sent by hand over its own connection: its head, declaring a body of `length` bytes
/// (chunked when `None`), and the first `sent` bytes of that body; the rest is never sent.
async fn start_delivery(app: &TestApp, signature: Option<&str>, length: Option<usize>, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let mut head = format!(
        "POST /hooks/github HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-github-event: ping\r\n\
         x-github-delivery: d-by-hand\r\n",
        app.addr
    );
    match length {
        Some(length) => head += &format!("content-length: {length}\r\n"),
        None => head += "transfer-encoding: chunked\r\n",
    }
    if let Some(signature) = signature {
        head += &format!("x-hub-signature-256: {signature}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; sent]).await.unwrap();
    stream
}

/// The head of the answer read from `stream`, if it arrives within `within`.
async fn answer_within(stream: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Option<String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

fn status_of(head: Option<&str>) -> Option<u16> {
    head?.split(' ').nth(1)?.parse().ok()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_delivery_is_refused_before_its_body_is_read_when_it_cannot_be_authentic(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let full = 25 << 20;
    // 64 KiB of a 25 MB body is sent and no more: the answer comes while the sender still holds
    // the rest, so the master read at most those 64 KiB.
    for (signature, detail) in [
        (None, "no X-Hub-Signature-256 header"),
        (Some("sha256=zz"), "must be `sha256=` and 64 hexadecimal digits"),
        (Some("sha1=0123456789abcdef0123456789abcdef01234567"), "must be `sha256=`"),
    ] {
        let mut stream = start_delivery(&app, signature, Some(full), 64 << 10).await;
        let head = answer_within(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(status_of(head.as_deref()), Some(401), "{signature:?}: answered before the body: {head:?}");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest)).await;
        let answer = head.unwrap() + &String::from_utf8_lossy(&rest);
        assert!(answer.contains(detail), "{signature:?}: {answer}");
    }
    // A declared length over GitHub's 25 MB is refused at once, whatever the signature.
    let mut stream = start_delivery(&app, Some(&sign(b"forged")), Some(26 << 20), 64 << 10).await;
    let head = answer_within(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(head.as_deref()), Some(413), "{head:?}");
    // An undeclared length (chunked) is read only up to the limit, then refused: 413, not a 5xx.
    let stream = start_delivery(&app, Some(&sign(b"forged")), None, 0).await;
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..26 {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if writer.write_all(&framed).await.is_err() {
                return;
            }
        }
        let _ = writer.write_all(b"0\r\n\r\n").await;
    });
    let head = answer_within(&mut reader, Duration::from_secs(20)).await;
    assert_eq!(status_of(head.as_deref()), Some(413), "{head:?}");
    sending.abort();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM github_deliveries").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 0);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn only_a_few_unauthenticated_bodies_are_read_at_once(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    // Bodies whose signature is well formed are read (to be checked): these never finish.
    let mut reading = Vec::new();
    let forged = format!("sha256={}", "0".repeat(64));
    let refused = loop {
        let mut stream = start_delivery(&app, Some(&forged), Some(1 << 20), 1).await;
        match answer_within(&mut stream, Duration::from_millis(300)).await {
            None => reading.push(stream),
            Some(head) => break head,
        }
        assert!(reading.len() <= 30, "30 bodies read at once");
    };
    assert_eq!(reading.len(), 16, "{refused}");
    assert_eq!(status_of(Some(&refused)), Some(503), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: "), "{refused}");
    assert!(refused.contains("application/problem+json"), "{refused}");
    // A sender that goes away gives its place back.
    drop(reading.pop());
    let ping = json!({"zen": "Design for failure.", "hook_id": 1, "repository": {"full_name": REPO}});
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = deliver(&app, "ping", "d-after", &ping, None).await;
        if pong.status == 200 {
            break;
        }
        assert_eq!(pong.status, 503, "{}", pong.body);
        assert!(Instant::now() < deadline, "the place never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_members_pull_request_runs_at_its_head_and_moves_with_it(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let mut repo = LocalRepo::new(&["feature"]);
    subscribe(&app, &repo, "unit").await;
    let first = repo.sha("feature").to_owned();

    let opened = deliver(&app, "pull_request", "d-1", &pull_request("opened", 7, &first, "mona", "MEMBER"), None).await;
    assert_eq!((opened.status, opened.body["outcome"].as_str()), (202, Some("accepted")), "{}", opened.body);
    let delivery = handled(&app, "d-1").await;
    assert_eq!(delivery["runs"].as_array().unwrap().len(), 1, "{delivery}");
    let runs = runs_of(&pool).await;
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].2.as_deref(), runs[0].3, runs[0].4.as_str()), (Some(first.as_str()), Some(7), "pull_request"));
    let run = app.admin().get(&format!("/runs/{}", runs[0].0)).await.body;
    assert_eq!((run["sender"].as_str(), run["baseBranch"].as_str()), (Some("mona"), Some("main")), "{run}");

    // GitHub redelivers the same delivery: nothing new.
    let again = deliver(&app, "pull_request", "d-1", &pull_request("opened", 7, &first, "mona", "MEMBER"), None).await;
    assert_eq!((again.status, again.body["outcome"].as_str()), (200, Some("already received")));

    // A new push to the pull request: the old run is superseded, a new one starts.
    let second = repo.commit_config("feature", "image: busybox:latest\nscript: echo second\n");
    deliver(&app, "pull_request", "d-2", &pull_request("synchronize", 7, &second, "mona", "MEMBER"), None).await;
    let delivery = handled(&app, "d-2").await;
    assert!(delivery["outcome"].as_str().unwrap().contains("superseded"), "{delivery}");
    let runs = runs_of(&pool).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!((runs[0].1.as_str(), runs[1].1.as_str()), ("aborted", "queued"));
    assert_eq!(runs[1].2.as_deref(), Some(second.as_str()));

    // Closed: its runs are aborted.
    deliver(&app, "pull_request", "d-3", &pull_request("closed", 7, &second, "mona", "MEMBER"), None).await;
    handled(&app, "d-3").await;
    let statuses: Vec<String> = runs_of(&pool).await.into_iter().map(|run| run.1).collect();
    assert_eq!(statuses, ["aborted", "aborted"]);
    let listed = app.admin().get("/runs?pullRequest=7&event=pull_request").await.body;
    assert_eq!(listed["runs"].as_array().unwrap().len(), 2, "{listed}");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn strangers_drafts_and_other_branches_start_nothing_and_pushes_run(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let repo = LocalRepo::new(&["feature"]);
    subscribe(&app, &repo, "unit").await;
    // Forks name images the job allows.
    let mut job = git_job(&repo);
    job["github"] = json!({"repository": "Octo-Org/Hello", "pullRequests": {"branches": ["main"]},
                           "push": {"branches": ["main", "release-*"]}});
    job["allowedImages"] = json!(["busybox:*"]);
    assert_eq!(app.admin().put("/jobs/unit", job).await.status, 200);
    let head = repo.sha("feature").to_owned();

    let stranger = pull_request("opened", 8, &head, "stranger", "FIRST_TIME_CONTRIBUTOR");
    deliver(&app, "pull_request", "d-stranger", &stranger, None).await;
    let delivery = handled(&app, "d-stranger").await;
    assert_eq!(delivery["outcome"], "unit: waiting for /ok-to-test: stranger is not trusted");
    let mut draft = pull_request("opened", 9, &head, "mona", "OWNER");
    draft["pull_request"]["draft"] = json!(true);
    deliver(&app, "pull_request", "d-draft", &draft, None).await;
    assert!(handled(&app, "d-draft").await["outcome"].as_str().unwrap().contains("draft"));
    let mut fork = pull_request("opened", 10, &head, "mona", "MEMBER");
    fork["pull_request"]["head"]["repo"]["full_name"] = json!("mona/hello");
    deliver(&app, "pull_request", "d-fork", &fork, None).await;
    // A member's pull request from a fork runs, marked as from a fork (its run gets no secrets).
    let forked = handled(&app, "d-fork").await;
    let fork_run = forked["runs"][0].as_str().unwrap().to_owned();
    let run = app.admin().get(&format!("/runs/{fork_run}")).await.body;
    assert_eq!((run["fromFork"].as_bool(), run["repository"].as_str()), (Some(true), Some(REPO)), "{run}");
    let mut other_base = pull_request("opened", 11, &head, "mona", "MEMBER");
    other_base["pull_request"]["base"]["ref"] = json!("develop");
    deliver(&app, "pull_request", "d-develop", &other_base, None).await;
    assert_eq!(handled(&app, "d-develop").await["outcome"], "no job subscribes to octo-org/hello for this event");
    deliver(&app, "push", "d-push-feature", &push("feature", &head), None).await;
    handled(&app, "d-push-feature").await;
    assert_eq!(runs_of(&pool).await.len(), 1, "only the fork's pull request ran");

    let main = repo.sha("main").to_owned();
    deliver(&app, "push", "d-push-main", &push("main", &main), None).await;
    let delivery = handled(&app, "d-push-main").await;
    let runs = runs_of(&pool).await;
    assert_eq!(runs.len(), 2, "{delivery}");
    assert_eq!((runs[1].2.as_deref(), runs[1].4.as_str()), (Some(main.as_str()), "push"));
    app.stop().await;
}

/// A pull request from a fork, by a member.
fn from_fork(number: i64, head: &str) -> Value {
    let mut pull = pull_request("opened", number, head, "mona", "MEMBER");
    pull["pull_request"]["head"]["repo"]["full_name"] = json!("mona/hello");
    pull
}

/// Whether the broker has the prefix's run queue `queue` (a passive declare on a channel of its own).
async fn queue_exists(prefix: &str, queue: &str) -> bool {
    let (_connection, channel) = support::amqp_channel().await;
    let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(&format!("{prefix}.runs.{queue}"), options, Default::default()).await.is_ok()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_config_file_picks_only_queues_and_images_its_job_allows(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let mut repo = LocalRepo::new(&[]);
    let gpu = repo.commit_config("gpu", "image: busybox:latest\nqueue: gpu\nscript: echo gpu\n");
    let private = repo.commit_config("private", "image: registry.internal/team/app:1\nscript: echo private\n");
    let latest = repo.commit_config("latest", "image: busybox:latest\nscript: echo latest\n");
    subscribe(&app, &repo, "unit").await;

    // A fork's config names a queue the job does not list: refused, with what to change.
    deliver(&app, "pull_request", "d-gpu", &from_fork(21, &gpu), None).await;
    let refused = handled(&app, "d-gpu").await;
    let outcome = refused["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with(&format!(
            "unit: refused: job config file `.cimaster.yml` at commit {gpu}: queue `gpu` is not in job `unit`'s \
             allowedQueues (it may use `default`): remove `queue:` from the config file, or have the job's owner add \
             `gpu` to the job's `allowedQueues`"
        )),
        "{refused}"
    );
    assert!(refused["runs"].as_array().unwrap().is_empty(), "{refused}");
    // The repository proposes, the job's owner allows: a trusted trigger is refused the same way.
    let api = app.admin().post("/jobs/unit/runs", json!({"branchName": "gpu"})).await;
    api.expect_problem(422, "queue `gpu` is not in job `unit`'s allowedQueues");
    assert!(!queue_exists(&app.prefix, "gpu").await, "a queue no job declares is never made on the broker");

    // Without an image allowlist a fork may only name images pinned by digest.
    deliver(&app, "pull_request", "d-private", &from_fork(22, &private), None).await;
    let outcome = handled(&app, "d-private").await["outcome"].as_str().unwrap().to_owned();
    assert!(
        outcome.contains(
            "image `registry.internal/team/app:1` of a pull request from a fork must be pinned by digest \
             (`name@sha256:<64 hex digits>`), or match a pattern in job `unit`'s `allowedImages`"
        ),
        "{outcome}"
    );
    deliver(&app, "pull_request", "d-latest", &from_fork(23, &latest), None).await;
    assert!(handled(&app, "d-latest").await["outcome"].as_str().unwrap().contains("must be pinned by digest"));
    assert!(runs_of(&pool).await.is_empty());

    // The job's owner allows the queue and busybox images: the fork's run is made, on that queue;
    // an image outside the list is still refused.
    let mut job = git_job(&repo);
    job["github"] = json!({"repository": REPO, "pullRequests": {"branches": ["main"]}});
    job["allowedQueues"] = json!(["gpu"]);
    job["allowedImages"] = json!(["busybox:*"]);
    assert_eq!(app.admin().put("/jobs/unit", job).await.status, 200);
    deliver(&app, "pull_request", "d-gpu-allowed", &from_fork(21, &gpu), None).await;
    let allowed = handled(&app, "d-gpu-allowed").await;
    assert_eq!(allowed["runs"].as_array().unwrap().len(), 1, "{allowed}");
    let queue: String = sqlx::query_scalar("SELECT queue FROM runs").fetch_one(&pool).await.unwrap();
    assert_eq!(queue, "gpu");
    deliver(&app, "pull_request", "d-private-listed", &from_fork(22, &private), None).await;
    let outcome = handled(&app, "d-private-listed").await["outcome"].as_str().unwrap().to_owned();
    assert!(
        outcome
            .contains("image `registry.internal/team/app:1` matches none of job `unit`'s allowedImages (`busybox:*`)"),
        "{outcome}"
    );
    app.stop().await;
}
