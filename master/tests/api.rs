//! The master's API against real Postgres and RabbitMQ.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use base64::Engine;
use cimaster_master::auth::Role;
use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;
use support::{drain_queue, eventually, freestyle, git_job, LocalRepo, TestApp, SECRET};

#[sqlx::test(migrations = "../migrations")]
async fn jobs_are_created_replaced_and_deleted(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();

    let created = api.put("/jobs/unit-test", freestyle("default")).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["change"], "created");
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.body["image"], "busybox:latest");

    let again = api.put("/jobs/unit-test", freestyle("default")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["change"], "unchanged");
    assert_eq!(again.body["version"], 1);
    assert_eq!(again.body["updatedAt"], created.body["updatedAt"]);

    let mut changed = freestyle("default");
    changed["script"] = json!(["make", "make test"]);
    let updated = api.put("/jobs/unit-test", changed).await;
    assert_eq!(updated.status, 200);
    assert_eq!(updated.body["change"], "updated");
    assert_eq!(updated.body["version"], 2);
    assert_eq!(updated.body["script"], json!(["make", "make test"]));

    // Replacing a freestyle job by a git job of the same name is a replace too.
    let repo = LocalRepo::new(&[]);
    assert_eq!(api.put("/jobs/e2e", git_job(&repo)).await.status, 201);
    let fetched = api.get("/jobs/e2e").await;
    assert_eq!(fetched.body["kind"], "git");
    assert_eq!(fetched.body["configPath"], ".cimaster.yml");

    let list = api.get("/jobs").await;
    let names: Vec<_> = list.body["jobs"].as_array().unwrap().iter().map(|j| j["name"].clone()).collect();
    assert_eq!(names, vec![json!("e2e"), json!("unit-test")]);

    // A job with a queued run cannot be deleted; once the run is aborted it can.
    let run = api.post_empty("/jobs/unit-test/runs").await;
    assert_eq!(run.status, 201);
    api.delete("/jobs/unit-test").await.expect_problem(409, "1 queued or running run");
    let abort = api.post_empty(&format!("/jobs/unit-test/runs/{}/abort", run.body["id"].as_str().unwrap())).await;
    assert_eq!(abort.status, 200);
    assert_eq!(api.delete("/jobs/unit-test").await.status, 204);
    api.get("/jobs/unit-test").await.expect_problem(404, "does not exist");
    api.delete("/jobs/unit-test").await.expect_problem(404, "does not exist");
    // The finished run stays readable.
    assert_eq!(api.get(run.body["links"]["self"].as_str().unwrap()).await.status, 200);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn freestyle_runs_reach_their_queue(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/build", freestyle("gpu")).await.status, 201);

    let run = api.post("/jobs/build/runs", json!({"parameters": {"TARGET": "lib"}})).await;
    assert_eq!(run.status, 201, "{}", run.body);
    let id = run.body["id"].as_str().unwrap().to_owned();
    assert_eq!(run.headers["location"], format!("/jobs/build/runs/{id}"));
    assert_eq!(run.body["status"], "queued");
    assert_eq!(run.body["attempt"], 1);
    assert_eq!(run.body["queue"], "gpu");
    assert_eq!(run.body["parameters"], json!({"TARGET": "lib"}));
    assert_eq!(run.body["triggeredBy"], "tester");
    assert!(run.body["createdAt"].is_string());

    // The confirm is recorded, and the message is on the job's queue, not the default one.
    let read = eventually(Duration::from_secs(5), || async {
        let read = api.get(&format!("/jobs/build/runs/{id}")).await;
        read.body["dispatchedAt"].is_string().then_some(read)
    })
    .await;
    assert_eq!(read.body["status"], "queued");
    assert_eq!(drain_queue(&app.prefix, "gpu").await, vec![id]);
    assert!(drain_queue(&app.prefix, "default").await.is_empty());
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn git_runs_take_exactly_one_of_commit_and_branch(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let repo = LocalRepo::new(&["master"]);
    assert_eq!(api.put("/jobs/e2e", git_job(&repo)).await.status, 201);
    let sha = repo.sha("master");

    let by_branch = api.post("/jobs/e2e/runs", json!({"branchName": "master"})).await;
    assert_eq!(by_branch.status, 201, "{}", by_branch.body);
    assert_eq!(by_branch.body["branchName"], "master");
    assert_eq!(by_branch.body["commitSha"], sha, "the branch is resolved at trigger time");
    let by_commit = api.post("/jobs/e2e/runs", json!({"commitSha": sha.to_uppercase()})).await;
    assert_eq!(by_commit.status, 201, "{}", by_commit.body);
    assert_eq!(by_commit.body["commitSha"], sha);

    api.post("/jobs/e2e/runs", json!({"commitSha": sha, "branchName": "main"})).await.expect_problem(422, "not both");
    api.post("/jobs/e2e/runs", json!({})).await.expect_problem(422, "needs `commitSha`");
    api.post_empty("/jobs/e2e/runs").await.expect_problem(422, "needs `commitSha`");
    api.post("/jobs/e2e/runs", json!({"commitSha": "abc123"})).await.expect_problem(422, "40 hex digits");
    api.post("/jobs/e2e/runs", json!({"commitSha": "z".repeat(40)})).await.expect_problem(422, "hex digits");
    api.post("/jobs/e2e/runs", json!({"branchName": "a..b"})).await.expect_problem(422, "invalid branch name");

    let queued = eventually(Duration::from_secs(5), || async {
        let ids = drain_queue(&app.prefix, "default").await;
        (!ids.is_empty()).then_some(ids)
    })
    .await;
    let mut all = queued;
    all.extend(drain_queue(&app.prefix, "default").await);
    all.sort();
    let mut expected =
        vec![by_branch.body["id"].as_str().unwrap().to_owned(), by_commit.body["id"].as_str().unwrap().to_owned()];
    expected.sort();
    assert_eq!(all, expected, "only the two accepted runs are queued");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn the_job_bounds_what_the_repository_may_ask_for(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let api = app.admin();
    let mut repo = LocalRepo::new(&[]);
    let greedy = repo.commit_config("greedy", "image: busybox:latest\nscript: env\nsecrets: [DEPLOY_KEY, NPM_TOKEN]\n");
    let modest = repo.commit_config("modest", "image: busybox:latest\nscript: env\nsecrets: [NPM_TOKEN]\n");
    let mut job = git_job(&repo);
    job["secrets"] = json!(["NPM_TOKEN"]);
    assert_eq!(api.put("/jobs/e2e", job).await.status, 201);

    // Any commit the caller names is read, but the job's `secrets` is the ceiling.
    for trigger in [json!({"branchName": "greedy"}), json!({"commitSha": greedy})] {
        api.post("/jobs/e2e/runs", trigger)
            .await
            .expect_problem(422, "asks for secret `DEPLOY_KEY`, which job `e2e` does not allow");
    }
    let ok = api.post("/jobs/e2e/runs", json!({"commitSha": modest})).await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&pool).await.unwrap();
    assert_eq!(runs, 1, "a refused trigger leaves nothing behind");

    // Repository URLs never carry credentials, and the refusal does not repeat them.
    let mut leaky = git_job(&repo);
    leaky["repository"] = json!("https://ci:hunter2-pass@git.example/org/repo.git");
    let refused = api.put("/jobs/leaky", leaky).await;
    refused.expect_problem(422, "tokenSecret");
    assert!(!refused.body.to_string().contains("hunter2-pass"), "{}", refused.body);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn idempotency_key_returns_the_same_run(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);

    let send = |key: &'static str, body: serde_json::Value| {
        let api = api.clone();
        async move {
            api.send(api.request(Method::POST, "/jobs/unit-test/runs").header("Idempotency-Key", key).json(&body)).await
        }
    };
    let first = send("deploy-42", json!({})).await;
    assert_eq!(first.status, 201);
    let second = send("deploy-42", json!({})).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(second.headers["location"], first.headers["location"]);
    send("deploy-42", json!({"parameters": {"TARGET": "x"}})).await.expect_problem(422, "different body");

    // Racing requests with one fresh key all get one run.
    let racers = (0..8).map(|_| send("race", json!({})));
    let replies = futures::future::join_all(racers).await;
    let ids: std::collections::HashSet<_> = replies.iter().map(|r| r.body["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(replies.iter().filter(|r| r.status == 201).count(), 1);

    let bad = api.send(api.request(Method::POST, "/jobs/unit-test/runs").header("Idempotency-Key", "")).await;
    bad.expect_problem(400, "Idempotency-Key");

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&app.pool).await.unwrap();
    assert_eq!(count, 2);
    let queued = eventually(Duration::from_secs(5), || async {
        let all: Vec<bool> =
            sqlx::query_scalar("SELECT published_at IS NOT NULL FROM runs").fetch_all(&app.pool).await.unwrap();
        all.iter().all(|p| *p).then_some(())
    });
    queued.await;
    assert_eq!(drain_queue(&app.prefix, "default").await.len(), 2, "one message per run");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_input_gets_problem_answers(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();

    api.put("/jobs/Bad%20Name", freestyle("default")).await.expect_problem(400, "invalid job name `Bad Name`");
    api.put("/jobs/-x", freestyle("default")).await.expect_problem(400, "start with a letter or digit");
    let mut unknown = freestyle("default");
    unknown["imagee"] = json!("x");
    api.put("/jobs/unit-test", unknown).await.expect_problem(422, "unknown field `imagee`");
    api.put("/jobs/unit-test", json!({"kind": "freestyle", "image": "b"}))
        .await
        .expect_problem(422, "missing field `script`");
    api.put("/jobs/unit-test", json!({"kind": "cron"})).await.expect_problem(422, "unknown variant `cron`");
    let mut too_long = freestyle("default");
    too_long["timeoutSeconds"] = json!(100_000);
    api.put("/jobs/unit-test", too_long).await.expect_problem(422, "above this installation's maximum");

    // Not JSON, no content type, too big.
    let broken =
        api.request(Method::PUT, "/jobs/unit-test").header("content-type", "application/json").body("{\"kind\":");
    api.send(broken).await.expect_problem(400, "not valid JSON");
    let plain = api.request(Method::PUT, "/jobs/unit-test").body(freestyle("default").to_string());
    api.send(plain).await.expect_problem(415, "Content-Type: application/json");
    let huge = json!({"kind": "freestyle", "image": "b", "script": "x".repeat(1024 * 1024 + 1)});
    api.put("/jobs/unit-test", huge).await.expect_problem(413, "larger than the limit");
    api.get("/jobs").await.body["jobs"].as_array().unwrap().is_empty().then_some(()).expect("nothing was half-written");

    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    api.post("/jobs/nope/runs", json!({})).await.expect_problem(404, "job `nope` does not exist");
    api.post("/jobs/unit-test/runs", json!({"branch": "main"})).await.expect_problem(422, "unknown field `branch`");
    api.post("/jobs/unit-test/runs", json!({"branchName": "main"})).await.expect_problem(422, "freestyle job");
    api.post("/jobs/unit-test/runs", json!({"parameters": {"TARGT": "x"}}))
        .await
        .expect_problem(422, "no parameter `TARGT`");
    api.get("/jobs/unit-test/runs/12345").await.expect_problem(400, "must be a UUID");
    api.get(&format!("/jobs/unit-test/runs/{}", uuid::Uuid::now_v7())).await.expect_problem(404, "has no run");
    api.get("/jobs/unit-test/runs?status=done").await.expect_problem(400, "unknown run status `done`");
    api.get("/jobs/unit-test/runs?limit=0").await.expect_problem(400, "limit must be between");
    api.get("/jobs/unit-test/runs?colour=red").await.expect_problem(400, "colour");
    api.get("/nothing/here").await.expect_problem(404, "no such endpoint");
    api.send(api.request(Method::PATCH, "/jobs/unit-test")).await.expect_problem(405, "PATCH is not allowed");

    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&app.pool).await.unwrap();
    assert_eq!(runs, 0, "refused triggers leave no run behind");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn tokens_are_checked(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    assert_eq!(app.admin().put("/jobs/unit-test", freestyle("default")).await.status, 201);

    let missing = app.anonymous().get("/jobs").await;
    missing.expect_problem(401, "no bearer token");
    assert!(missing.headers["www-authenticate"].to_str().unwrap().starts_with("Bearer realm=\"cimaster\""));

    let with = |token: String| support::Client { token: Some(token), ..app.anonymous() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let sign = |claims: serde_json::Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let claims = |exp: u64, aud: &str| json!({"sub": "eve", "aud": aud, "exp": exp, "iat": now, "roles": ["admin"]});

    let expired = with(sign(claims(now - 3600, "cimaster"), SECRET)).get("/jobs").await;
    expired.expect_problem(401, "expired");
    assert!(expired.headers.contains_key("www-authenticate"));
    with(sign(claims(now + 600, "cimaster"), "some-other-secret-some-other-secret"))
        .get("/jobs")
        .await
        .expect_problem(401, "bad signature");
    with(sign(claims(now + 600, "elsewhere"), SECRET)).get("/jobs").await.expect_problem(401, "audience");
    with(sign(json!({"sub": "eve", "aud": "cimaster", "roles": ["admin"]}), SECRET))
        .get("/jobs")
        .await
        .expect_problem(401, "exp");
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(claims(now + 600, "cimaster")));
    with(unsigned).get("/jobs").await.expect_problem(401, "not valid");
    with("garbage".into()).get("/jobs").await.expect_problem(401, "not valid");

    let reader = app.as_role(Role::Read);
    assert_eq!(reader.get("/jobs").await.status, 200);
    reader.put("/jobs/x", freestyle("default")).await.expect_problem(403, "needs the `admin` role");
    reader.post_empty("/jobs/unit-test/runs").await.expect_problem(403, "needs the `trigger` role");
    let trigger = app.as_role(Role::Trigger);
    let run = trigger.post_empty("/jobs/unit-test/runs").await;
    assert_eq!(run.status, 201);
    trigger.delete("/jobs/unit-test").await.expect_problem(403, "admin");
    let abort = trigger.post_empty(&format!("{}/abort", run.body["links"]["self"].as_str().unwrap())).await;
    assert_eq!(abort.status, 200);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn runs_are_listed_with_filters_and_pages(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let repo = LocalRepo::new(&["feature/x"]);
    assert_eq!(api.put("/jobs/e2e", git_job(&repo)).await.status, 201);
    let mut ids = Vec::new();
    for i in 0..5 {
        let branch = if i % 2 == 0 { "main" } else { "feature/x" };
        let run = api.post("/jobs/e2e/runs", json!({"branchName": branch})).await;
        assert_eq!(run.status, 201);
        ids.push(run.body["id"].as_str().unwrap().to_owned());
    }
    api.post_empty(&format!("/jobs/e2e/runs/{}/abort", ids[4])).await;

    let page = api.get("/jobs/e2e/runs?limit=2").await;
    let got: Vec<_> =
        page.body["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, vec![ids[4].clone(), ids[3].clone()], "newest first");
    let next = page.body["next"].as_str().unwrap().to_owned();
    let page2 = api.get(&next).await;
    assert_eq!(page2.body["runs"][0]["id"], ids[2].as_str());
    let last = api.get(page2.body["next"].as_str().unwrap()).await;
    assert_eq!(last.body["runs"].as_array().unwrap().len(), 1);
    assert!(last.body.get("next").is_none());

    let main = api.get("/jobs/e2e/runs?branchName=main").await;
    assert_eq!(main.body["runs"].as_array().unwrap().len(), 3);
    let aborted = api.get("/jobs/e2e/runs?status=aborted").await;
    assert_eq!(aborted.body["runs"].as_array().unwrap().len(), 1);
    let queued = api.get("/jobs/e2e/runs?status=queued,running").await;
    assert_eq!(queued.body["runs"].as_array().unwrap().len(), 4);
    let feature = api.get("/jobs/e2e/runs?branchName=feature%2Fx&limit=1").await;
    assert!(feature.body["next"].as_str().unwrap().contains("branchName=feature/x"));
    api.get("/jobs/missing/runs").await.expect_problem(404, "does not exist");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn every_jobs_runs_are_listed_and_found_by_id(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let repo = LocalRepo::new(&[]);
    assert_eq!(api.put("/jobs/build", git_job(&repo)).await.status, 201);
    assert_eq!(api.put("/jobs/lint", git_job(&repo)).await.status, 201);
    let mut ids = Vec::new();
    for job in ["build", "lint", "build"] {
        let run = api.post(&format!("/jobs/{job}/runs"), json!({"branchName": "main"})).await;
        assert_eq!(run.status, 201);
        ids.push(run.body["id"].as_str().unwrap().to_owned());
    }
    let all = api.get("/runs?limit=2").await;
    let got: Vec<_> = all.body["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()], "every job's runs, newest first");
    let older = api.get(all.body["next"].as_str().unwrap()).await;
    assert_eq!(older.body["runs"][0]["id"], ids[0].as_str());
    let build = api.get("/runs?job=build").await;
    assert_eq!(build.body["runs"].as_array().unwrap().len(), 2);
    let paged = api.get("/runs?job=build&limit=1").await;
    let rest = api.get(paged.body["next"].as_str().unwrap()).await;
    assert_eq!(rest.body["runs"][0]["id"], ids[0].as_str(), "the next page keeps to the job");
    let lint = api.get("/runs?status=queued&limit=1").await;
    assert!(lint.body["next"].as_str().unwrap().starts_with("/runs?"), "{}", lint.body);

    let found = api.get(&format!("/runs/{}", ids[1])).await;
    assert_eq!((found.status, found.body["job"].as_str()), (200, Some("lint")));
    api.get("/runs/0190e6a4-0000-7000-8000-000000000000").await.expect_problem(404, "no run");
    api.get("/runs/nope").await.expect_problem(400, "");
    api.get("/jobs/build/runs?job=lint").await.expect_problem(400, "the path names the job");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_rerun_repeats_the_commit_and_parameters_and_names_the_run(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let mut repo = LocalRepo::new(&[]);
    let mut job = git_job(&repo);
    job["parameters"] = json!({"TARGET": "all"});
    assert_eq!(api.put("/jobs/e2e", job).await.status, 201);
    let first = api.post("/jobs/e2e/runs", json!({"branchName": "main", "parameters": {"TARGET": "unit"}})).await;
    assert_eq!(first.status, 201);
    let id = first.body["id"].as_str().unwrap();
    // A new commit on the branch does not change what a rerun runs.
    let later = repo.commit_config("main", "image: busybox:latest\nscript: echo later\n");
    assert_ne!(first.body["commitSha"], later.as_str());

    let rerun = api
        .request(Method::POST, &format!("/jobs/e2e/runs/{id}/rerun"))
        .header("Idempotency-Key", "again-1")
        .send()
        .await
        .unwrap();
    assert_eq!(rerun.status(), 201);
    let rerun: serde_json::Value = rerun.json().await.unwrap();
    assert_ne!(rerun["id"], first.body["id"]);
    assert_eq!(rerun["rerunOf"], first.body["id"]);
    assert_eq!(rerun["commitSha"], first.body["commitSha"]);
    assert_eq!(rerun["branchName"], "main");
    assert_eq!(rerun["parameters"], json!({"TARGET": "unit"}));
    assert_eq!(rerun["status"], "queued");
    assert!(first.body.get("rerunOf").is_none());
    // The same key returns the same rerun.
    let again = api
        .request(Method::POST, &format!("/jobs/e2e/runs/{id}/rerun"))
        .header("Idempotency-Key", "again-1")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<serde_json::Value>().await.unwrap()["id"], rerun["id"]);

    assert_eq!(rerun["event"], "api");
    // A rerun keeps the cause: a pull request's run, rerun, is that pull request's run.
    sqlx::query("UPDATE runs SET event = 'pull_request', pull_request = 7, sender = 'octocat' WHERE id = $1::uuid")
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
    let of_pr = api.post_empty(&format!("/jobs/e2e/runs/{id}/rerun")).await;
    assert_eq!(of_pr.status, 201);
    assert_eq!((of_pr.body["event"].as_str(), of_pr.body["pullRequest"].as_i64()), (Some("pull_request"), Some(7)));
    assert_eq!(of_pr.body["sender"], "octocat");
    let by_pr = api.get("/runs?event=pull_request&pullRequest=7").await;
    let ids: Vec<_> = by_pr.body["runs"].as_array().unwrap().iter().map(|run| run["id"].clone()).collect();
    assert_eq!(ids, vec![of_pr.body["id"].clone(), json!(id)]);
    assert_eq!(api.get("/runs?event=push").await.body["runs"], json!([]));
    api.get("/runs?event=merge").await.expect_problem(400, "unknown event");

    api.post_empty("/jobs/e2e/runs/0190e6a4-0000-7000-8000-000000000000/rerun").await.expect_problem(404, "has no run");
    let reader = app.as_role(Role::Read);
    reader.post_empty(&format!("/jobs/e2e/runs/{id}/rerun")).await.expect_problem(403, "");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn abort_stops_queued_runs_and_signals_running_ones(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);

    let queued = api.post_empty("/jobs/unit-test/runs").await;
    let aborted = api.post_empty(&format!("{}/abort", queued.body["links"]["self"].as_str().unwrap())).await;
    assert_eq!(aborted.status, 200);
    assert_eq!(aborted.body["status"], "aborted");
    assert!(aborted.body["finishedAt"].is_string());
    api.post_empty(&format!("{}/abort", queued.body["links"]["self"].as_str().unwrap()))
        .await
        .expect_problem(409, "already ended with status `aborted`");

    // A running run (as an agent would have claimed it) is signalled through NOTIFY.
    let running = api.post_empty("/jobs/unit-test/runs").await;
    let id = running.body["id"].as_str().unwrap().to_owned();
    support::claim_as_agent(&pool, &id).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen("cimaster_run_abort").await.unwrap();
    let signalled = api.post_empty(&format!("/jobs/unit-test/runs/{id}/abort")).await;
    assert_eq!(signalled.status, 202);
    assert_eq!(signalled.body["status"], "running");
    assert_eq!(signalled.body["abortRequested"], true);
    let notification = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await.unwrap().unwrap();
    assert_eq!(notification.payload(), id);
    app.admin().post_empty("/jobs/unit-test/runs/not-a-uuid/abort").await.expect_problem(400, "UUID");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn health_metrics_and_openapi(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.anonymous();
    assert_eq!(api.get("/healthz").await.status, 200);
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body, json!({"status": "ready", "postgres": "ok", "rabbitmq": "ok"}));
    // On a fresh replica the event counters already exist, at 0.
    let fresh = api.get("/metrics").await;
    let text = fresh.body.as_str().unwrap();
    for series in [
        "cimaster_runs_dispatched_total",
        "cimaster_publish_failures_total",
        "cimaster_pool_lease_expiries_total",
        "cimaster_pool_hold_expiries_total",
    ] {
        assert!(text.lines().any(|line| line == format!("{series} 0")), "{series} is not at 0: {text}");
    }

    assert_eq!(app.admin().put("/jobs/unit-test", freestyle("default")).await.status, 201);
    assert_eq!(app.admin().post_empty("/jobs/unit-test/runs").await.status, 201);
    let metrics = api.get("/metrics").await;
    let text = metrics.body.as_str().unwrap();
    assert!(text.contains("cimaster_runs_created_total"), "{text}");
    assert!(
        text.contains("cimaster_http_requests_total{method=\"POST\",route=\"/jobs/{name}/runs\",status=\"201\"}"),
        "{text}"
    );

    let spec = api.get("/openapi.json").await;
    assert_eq!(spec.status, 200);
    for path in
        ["/jobs/{name}", "/jobs/{name}/runs", "/jobs/{name}/runs/{id}", "/jobs/{name}/runs/{id}/abort", "/readyz"]
    {
        assert!(spec.body["paths"].get(path).is_some(), "missing {path}");
    }
    assert!(spec.body["components"]["schemas"].get("JobSpec").is_some());
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn secrets_are_write_only_and_encrypted_at_rest(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    let set = api.put("/jobs/unit-test/secrets/DB_PASSWORD", json!({"value": "p4ssw0rd-value"})).await;
    assert_eq!(set.status, 201, "{}", set.body);
    assert_eq!(set.body["name"], "DB_PASSWORD");
    assert!(set.body.get("value").is_none());
    assert_eq!(api.put("/jobs/unit-test/secrets/DB_PASSWORD", json!({"value": "rotated-value"})).await.status, 200);

    let list = api.get("/jobs/unit-test/secrets").await;
    assert_eq!(list.status, 200);
    let text = list.body.to_string();
    assert!(text.contains("DB_PASSWORD") && !text.contains("rotated-value"), "{text}");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT ciphertext FROM job_secrets").fetch_one(&pool).await.unwrap();
    assert!(!stored.windows(13).any(|w| w == b"rotated-value"), "stored in the clear");

    api.put("/jobs/unit-test/secrets/1BAD", json!({"value": "x"})).await.expect_problem(400, "variable name");
    api.put("/jobs/unit-test/secrets/OK", json!({"value": ""})).await.expect_problem(422, "1 to");
    api.put("/jobs/unit-test/secrets/OK", json!({"val": "x"})).await.expect_problem(422, "unknown field `val`");
    api.put("/jobs/nope/secrets/OK", json!({"value": "x"})).await.expect_problem(404, "does not exist");
    app.as_role(Role::Trigger)
        .put("/jobs/unit-test/secrets/OK", json!({"value": "x"}))
        .await
        .expect_problem(403, "admin");
    assert_eq!(api.delete("/jobs/unit-test/secrets/DB_PASSWORD").await.status, 204);
    api.delete("/jobs/unit-test/secrets/DB_PASSWORD").await.expect_problem(404, "has no secret");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_recreated_under_its_name_inherits_no_secrets_and_no_idempotency_keys(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    assert_eq!(api.put("/jobs/unit-test/secrets/DB_PASSWORD", json!({"value": "old-owner-value"})).await.status, 201);
    let keyed = || api.request(Method::POST, "/jobs/unit-test/runs").header("Idempotency-Key", "deploy-4711");
    let old = api.send(keyed()).await;
    assert_eq!(old.status, 201);
    assert_eq!(api.post_empty(&format!("{}/abort", old.body["links"]["self"].as_str().unwrap())).await.status, 200);
    assert_eq!(api.delete("/jobs/unit-test").await.status, 204);

    let secrets: i64 = sqlx::query_scalar("SELECT count(*) FROM job_secrets").fetch_one(&pool).await.unwrap();
    assert_eq!(secrets, 0, "the secrets went with the job");
    assert_eq!(api.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    assert_eq!(api.get("/jobs/unit-test/secrets").await.body["secrets"], json!([]));
    let new = api.send(keyed()).await;
    assert_eq!(new.status, 201, "{}", new.body);
    assert_ne!(new.body["id"], old.body["id"], "a retry must not answer with the deleted job's run");
    assert_eq!(new.body["status"], "queued");
    // The old run stays readable by id.
    assert_eq!(api.get(old.body["links"]["self"].as_str().unwrap()).await.body["status"], "aborted");
    app.stop().await;
}
