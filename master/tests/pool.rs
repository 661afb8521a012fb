//! The test-cluster pool against real Postgres: the original CIMaster endpoints and flows, matching,
//! holds, fencing, health, provisioning, waiting, and contention.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cimaster_master::auth::Role;
use cimaster_master::pool::store::{self, AcquireRequest, Release, ReleaseOutcome};
use reqwest::Method;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use support::{eventually, Client, TestApp};

async fn text(api: &Client, path: &str) -> (u16, String) {
    let response = api.request(Method::GET, path).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap().trim().to_owned())
}

/// Waits until `count` acquires are in the pool's waiting queue.
async fn waiting(api: &Client, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiters = api.get("/pool/waiters").await.body["waiters"].as_array().map_or(0, Vec::len);
        if waiters == count {
            return;
        }
        assert!(Instant::now() < deadline, "{waiters} waiters, expected {count}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn add(api: &Client, query: &str) {
    let (status, body) = text(api, &format!("/addcluster?{query}&name=admin")).await;
    assert_eq!(status, 201, "{body}");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_original_curl_flow_works(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=cluster-01&region=us-west").await;
    add(&api, "cluster=cluster-02&region=eu-central").await;

    // CLUSTER=$(curl -s "…/getvacant?build=123&job=e2e-test&email=ci-bot@example.com")
    let (status, cluster) = text(&api, "/getvacant?build=123&job=e2e-test&email=ci-bot@example.com").await;
    assert_eq!(status, 200);
    assert!(cluster == "cluster-01" || cluster == "cluster-02", "{cluster}");
    // A retried request for the same build gets the same cluster.
    assert_eq!(text(&api, "/getvacant?build=123&job=e2e-test&email=ci-bot@example.com").await.1, cluster);
    let other = text(&api, "/getvacant?build=124&job=e2e-test").await.1;
    assert_ne!(other, cluster);
    // Nothing left: 503 with Retry-After, saying so.
    let none = api.get("/getvacant?build=125&job=e2e-test").await;
    none.expect_problem(503, "no vacant cluster with purpose `tess-ci`");
    assert!(none.headers.contains_key("retry-after"));

    let json = api.send(api.request(Method::GET, &format!("/pool/clusters/{cluster}"))).await;
    assert_eq!(json.body["status"], "leased");
    assert_eq!(json.body["lastBuild"], "123");
    assert_eq!(json.body["lastJob"], "e2e-test");
    assert_eq!(json.body["lease"]["holder"], "ci-bot@example.com");

    // curl "…/finishtest?cluster=$CLUSTER"
    assert_eq!(
        text(&api, &format!("/finishtest?cluster={cluster}")).await,
        (200, format!("cluster {cluster} finished"))
    );
    api.get(&format!("/finishtest?cluster={cluster}")).await.expect_problem(409, "is not leased");
    // JSON with Accept: application/json.
    let leased = api
        .send(api.request(Method::GET, "/getvacant?build=126&job=e2e-test").header("accept", "application/json"))
        .await;
    assert_eq!(leased.status, 200);
    assert_eq!(leased.body["name"], cluster.as_str());
    assert_eq!(leased.body["status"], "leased");

    let events = api.get(&format!("/pool/events?cluster={cluster}")).await;
    let kinds: Vec<_> = events.body["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["added", "leased", "released", "leased"]);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn purpose_and_osimage_select_the_cluster(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=tnet-a&region=r&purpose=tnet-ci&osimage=centos-7").await;
    add(&api, "cluster=tnet-b&region=r&purpose=tnet-ci&osimage=ubuntu-22").await;
    add(&api, "cluster=tess-a&region=r&purpose=tess-ci&osimage=centos-7").await;
    assert_eq!(text(&api, "/getvacant?build=1&job=j&purpose=tnet-ci&osimage=ubuntu-22").await.1, "tnet-b");
    assert_eq!(text(&api, "/getvacant?build=2&job=j&purpose=tnet-ci&osimage=centos-7").await.1, "tnet-a");
    api.get("/getvacant?build=3&job=j&purpose=tnet-ci&osimage=centos-7")
        .await
        .expect_problem(503, "osimage `centos-7`");
    api.get("/getvacant?build=4&job=j&purpose=tnet-ci").await.expect_problem(422, "needs `osimage`");
    // tess-ci ignores the image, as the original did.
    assert_eq!(text(&api, "/getvacant?build=5&job=j&purpose=tess-ci&osimage=other").await.1, "tess-a");
    // The same rule, and the same answer, whichever way a cluster is added.
    api.get("/addcluster?cluster=x&region=r&purpose=tnet-ci").await.expect_problem(422, "needs `osimage`");
    api.put("/pool/clusters/x", json!({"region": "r", "purpose": "tnet-ci"}))
        .await
        .expect_problem(422, "needs `osimage`");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn holds_keep_a_cluster_out_of_the_pool_until_released_or_expired(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let dev = app.as_role(Role::Trigger);
    add(&api, "cluster=c1&region=r").await;

    let (status, body) = text(&dev, "/holdcluster?cluster=c1&name=alice&desc=debugging+network+issue").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("cluster c1 held by tester until"), "{body}");
    let held = api.get("/pool/clusters/c1").await;
    assert_eq!(held.body["hold"]["reason"], "debugging network issue (name=alice)");
    assert_eq!(held.body["status"], "held");
    dev.get("/getvacant?build=1&job=j").await.expect_problem(503, "no vacant cluster");
    assert_eq!(text(&dev, "/releasecluster?cluster=c1&name=alice").await.0, 200);
    assert_eq!(text(&dev, "/getvacant?build=1&job=j").await.1, "c1");

    // Holding a leased cluster: the lease goes on; when it ends the cluster stays held.
    assert_eq!(text(&dev, "/holdcluster?cluster=c1&desc=after+this+run").await.0, 200);
    assert_eq!(api.get("/pool/clusters/c1").await.body["status"], "leased");
    assert_eq!(text(&dev, "/finishtest?cluster=c1").await.0, 200);
    assert_eq!(api.get("/pool/clusters/c1").await.body["status"], "held");
    dev.get("/getvacant?build=2&job=j").await.expect_problem(503, "no vacant cluster");

    // Holds expire by themselves (here after about a second).
    assert_eq!(text(&dev, "/holdcluster?cluster=c1&desc=short&hours=0.0003").await.0, 200);
    eventually(Duration::from_secs(10), || async {
        let events = api.get("/pool/events?cluster=c1").await;
        events.body["events"].as_array().unwrap().iter().any(|e| e["kind"] == "hold_expired").then_some(())
    })
    .await;
    let expired = api.get("/pool/clusters/c1").await;
    assert!(expired.body["hold"].is_null());
    assert_eq!(expired.body["status"], "vacant");
    assert_eq!(text(&dev, "/getvacant?build=2&job=j").await.1, "c1");

    dev.get("/holdcluster?cluster=c1&desc=forever&hours=1000").await.expect_problem(422, "at most 72h");
    dev.get("/holdcluster?cluster=nope&desc=x").await.expect_problem(404, "does not exist");
    dev.get("/holdcluster?cluster=c1").await.expect_problem(400, "`desc` is required");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn stale_tokens_are_refused_and_expired_leases_return(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    let body = json!({"purpose": "tess-ci", "job": "e2e", "build": "7", "ttlSeconds": 1});
    let first = api.post("/pool/leases", body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let token = first.body["token"].as_i64().unwrap();
    let beat = api.post(&format!("/pool/leases/{token}/heartbeat"), json!({"ttlSeconds": 1})).await;
    assert_eq!(beat.status, 200);

    // The lease expires; the cluster goes back; someone else leases it with a newer token.
    eventually(Duration::from_secs(10), || async {
        (api.get("/pool/clusters/c1").await.body["status"] == "vacant").then_some(())
    })
    .await;
    let second = api.post("/pool/leases", json!({"purpose": "tess-ci", "job": "e2e", "build": "8"})).await;
    let newer = second.body["token"].as_i64().unwrap();
    assert!(newer > token);
    api.post(&format!("/pool/leases/{token}/heartbeat"), json!({})).await.expect_problem(409, "not current");
    api.post(&format!("/pool/leases/{token}/release"), json!({})).await.expect_problem(409, "not current");
    assert_eq!(api.get("/pool/clusters/c1").await.body["lease"]["token"], newer);
    assert_eq!(api.post(&format!("/pool/leases/{newer}/release"), json!({})).await.status, 200);
    api.post("/pool/leases/abc/release", json!({})).await.expect_problem(400, "must be a number");
    api.post("/pool/leases", json!({"purpose": "tess-ci", "job": "e2e"}))
        .await
        .expect_problem(422, "missing field `build`");
    let kinds: Vec<String> = api.get("/pool/events?cluster=c1").await.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["added", "leased", "lease_expired", "leased", "released"]);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn admin_operations_need_the_admin_role(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let dev = app.as_role(Role::Trigger);
    dev.get("/addcluster?cluster=c1&region=r&name=admin").await.expect_problem(403, "needs the `admin` role");
    add(&api, "cluster=c1&region=r").await;
    api.get("/addcluster?cluster=c1&region=r").await.expect_problem(409, "already exists");
    api.get("/addcluster?cluster=bad%20name&region=r").await.expect_problem(400, "must be 1 to 128");
    api.get("/addcluster?cluster=c2").await.expect_problem(400, "`region` is required");
    dev.get("/disablecluster?cluster=c1").await.expect_problem(403, "admin");
    dev.get("/deletecluster?cluster=c1").await.expect_problem(403, "admin");
    dev.get("/enablecluster?cluster=c1").await.expect_problem(403, "admin");

    assert_eq!(text(&api, "/disablecluster?cluster=c1&reason=broken+disk").await.0, 200);
    assert_eq!(api.get("/pool/clusters/c1").await.body["disabled"]["reason"], "broken disk");
    dev.get("/getvacant?build=1&job=j").await.expect_problem(503, "no vacant");
    assert_eq!(text(&api, "/enablecluster?cluster=c1").await.0, 200);
    assert_eq!(text(&dev, "/getvacant?build=1&job=j").await.1, "c1");
    api.get("/deletecluster?cluster=c1").await.expect_problem(409, "is leased by tester");
    assert_eq!(text(&dev, "/finishtest?cluster=c1").await.0, 200);
    assert_eq!(text(&api, "/deletecluster?cluster=c1").await, (200, "cluster c1 deleted".to_owned()));
    api.get("/deletecluster?cluster=c1").await.expect_problem(404, "does not exist");
    app.anonymous().get("/getvacant?build=1&job=j").await.expect_problem(401, "bearer");
    app.as_role(Role::Read).get("/getvacant?build=1&job=j").await.expect_problem(403, "trigger");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn repeated_infrastructure_failures_disable_a_cluster(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    for build in 1..=3 {
        assert_eq!(text(&api, &format!("/getvacant?build={build}&job=j")).await.1, "c1");
        if build == 1 {
            // A success in between resets the count.
            assert_eq!(text(&api, "/finishtest?cluster=c1").await.0, 200);
            assert_eq!(text(&api, "/getvacant?build=1b&job=j").await.1, "c1");
        }
        assert_eq!(text(&api, "/finishtest?cluster=c1&result=infra_failure").await.0, 200);
    }
    let cluster = api.get("/pool/clusters/c1").await;
    assert_eq!(cluster.body["infraFailures"], 3);
    assert_eq!(cluster.body["disabled"]["reason"], "disabled automatically after 3 infrastructure failures in a row");
    assert_eq!(cluster.body["status"], "disabled");
    api.get("/getvacant?build=9&job=j").await.expect_problem(503, "no vacant");
    let events = api.get("/pool/events?cluster=c1").await;
    assert!(events.body["events"].as_array().unwrap().iter().any(|e| e["kind"] == "auto_disabled"));
    api.get("/finishtest?cluster=c1&result=meh").await.expect_problem(400, "use `ok` or `infra_failure`");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn createcluster_runs_the_provisioning_job(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    api.get("/createcluster?user=john").await.expect_problem(404, "provisioning job `create-cluster` does not exist");
    let job = json!({"kind": "freestyle", "image": "busybox:latest", "script": "echo provisioning for $AUTHOR",
                     "parameters": {"AUTHOR": ""}});
    assert_eq!(api.put("/jobs/create-cluster", job).await.status, 201);
    let (status, body) = text(&api, "/createcluster?user=john").await;
    assert_eq!(status, 201, "{body}");
    let link = body.strip_prefix("cluster creation triggered: ").unwrap().to_owned();
    let run = api.get(&link).await;
    assert_eq!(run.body["parameters"]["AUTHOR"], "john");
    assert_eq!(run.body["status"], "queued");

    let repo = support::LocalRepo::new(&["release-1"]);
    assert_eq!(api.put("/jobs/e2e-k8s", support::git_job(&repo)).await.status, 201);
    let made = api
        .send(
            api.request(Method::GET, "/createcluster?user=ann&branch=release-1&job=e2e-k8s")
                .header("accept", "application/json"),
        )
        .await;
    assert_eq!(made.status, 201);
    assert_eq!(made.body["branchName"], "release-1");
    assert_eq!(made.body["parameters"]["AUTHOR"], "ann");
    assert_eq!(api.put("/jobs/no-author", json!({"kind": "freestyle", "image": "b", "script": "x"})).await.status, 201);
    api.get("/createcluster?user=x&job=no-author").await.expect_problem(422, "must declare the parameter `AUTHOR`");
    api.get("/createcluster?job=e2e-k8s").await.expect_problem(400, "`user` is required");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_waiting_acquire_is_woken_when_a_cluster_frees(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    assert_eq!(text(&api, "/getvacant?build=1&job=j").await.1, "c1");
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let got = text(&api, "/getvacant?build=2&job=j&wait=30").await;
            (got, started.elapsed())
        })
    };
    waiting(&api, 1).await;
    let freed = Instant::now();
    assert_eq!(text(&api, "/finishtest?cluster=c1").await.0, 200);
    let ((status, cluster), waited) = waiter.await.unwrap();
    assert_eq!((status, cluster.as_str()), (200, "c1"));
    assert!(waited < Duration::from_secs(5));
    assert!(freed.elapsed() < Duration::from_millis(1500), "the waiter was not woken promptly");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_wait_longer_than_the_pools_longest_is_cut_to_it(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.pool.max_wait = Duration::from_secs(1)).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    assert_eq!(text(&api, "/getvacant?build=1&job=j").await.1, "c1");

    let started = Instant::now();
    api.get("/getvacant?build=2&job=j&wait=300").await.expect_problem(503, "no vacant cluster");
    let body = json!({"purpose": "tess-ci", "job": "j", "build": "3", "waitSeconds": 300});
    api.post("/pool/leases", body).await.expect_problem(503, "no vacant cluster");
    // Two waits of 1 s each, not of 300 s; both left the waiting queue.
    assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
    waiting(&api, 0).await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_named_cluster_is_leased_at_once_or_not_at_all(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    add(&api, "cluster=c2&region=r").await;
    let lease = |build: &str, extra: serde_json::Value| {
        let mut body = json!({"purpose": "tess-ci", "job": "j", "build": build, "cluster": "c2"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let got = api.post("/pool/leases", lease("1", json!({}))).await;
    assert_eq!((got.status, got.body["cluster"].as_str()), (201, Some("c2")));
    // Taken: no other cluster instead, and no waiting for it.
    api.post("/pool/leases", lease("2", json!({}))).await.expect_problem(503, "no vacant cluster");
    api.post("/pool/leases", lease("3", json!({"waitSeconds": 5}))).await.expect_problem(422, "at once or not at all");
    api.post("/pool/leases", lease("4", json!({"cluster": "no such/name"}))).await.expect_problem(400, "cluster");
    assert_eq!(api.get("/pool/clusters/c1").await.body["status"], "vacant");
    app.stop().await;
}

/// 200 acquirers race for 20 clusters until 10,000 leases have been held. Each holder marks its
/// cluster in a shared record that is independent of the pool's own history (asserting nobody held
/// it), keeps it a few random milliseconds, unmarks it and releases it. 50 connections let 50
/// statements race in Postgres at once (the server's limit is shared with the other tests).
#[sqlx::test(migrations = "../migrations")]
async fn contention_never_gives_one_cluster_to_two_holders(_: PgPoolOptions, connect: PgConnectOptions) {
    const WORKERS: usize = 200;
    const CYCLES: usize = 10_000;
    // A pool of its own: the test harness caps the pools it hands out.
    let pool = PgPoolOptions::new().max_connections(50).connect_with(connect).await.unwrap();
    for i in 0..20 {
        sqlx::query("INSERT INTO clusters (name, region, purpose) VALUES ($1, 'r', 'tess-ci')")
            .bind(format!("c{i:02}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let holders: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let completed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks = (0..WORKERS).map(|worker| {
        let (pool, holders, completed) = (pool.clone(), holders.clone(), completed.clone());
        tokio::spawn(async move {
            let mut random = 0x9E37_79B9_7F4A_7C15_u64 ^ (worker as u64 + 1);
            let mut mine = 0usize;
            while completed.load(Ordering::SeqCst) < CYCLES {
                let request = AcquireRequest {
                    purpose: "tess-ci".into(),
                    osimage: None,
                    job: format!("w{worker}"),
                    build: mine.to_string(),
                    holder: format!("w{worker}"),
                    run: None,
                    ttl: Duration::from_secs(60),
                    waited: Duration::ZERO,
                    priority: 0,
                    waiter: None,
                    cluster: None,
                };
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let Some(lease) = store::acquire(&pool, &request).await.unwrap() else {
                    tokio::time::sleep(Duration::from_millis(1 + random % 3)).await;
                    continue;
                };
                let before = holders.lock().unwrap().insert(lease.cluster.clone(), worker);
                assert_eq!(before, None, "{} given to worker {worker} while worker {before:?} held it", lease.cluster);
                tokio::time::sleep(Duration::from_millis(random % 4)).await;
                assert_eq!(holders.lock().unwrap().remove(&lease.cluster), Some(worker));
                store::release(
                    &pool,
                    Release::Token(lease.token),
                    ReleaseOutcome::Ok,
                    store::Actor::holder(&request.holder),
                    3,
                )
                .await
                .unwrap();
                completed.fetch_add(1, Ordering::SeqCst);
                mine += 1;
            }
            mine
        })
    });
    let shares: Vec<usize> = tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(tasks))
        .await
        .expect("10,000 cycles within five minutes")
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let elapsed = started.elapsed();
    let total: usize = shares.iter().sum();
    assert!(total >= CYCLES, "{total} cycles");
    // Nobody starved: every worker got at least a tenth of an even share.
    let (fewest, most) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
    let even = CYCLES / WORKERS;
    assert!(fewest >= even / 10, "a worker got only {fewest} leases (even share {even}, most {most})");

    // The pool's own history agrees: per cluster, leases and releases strictly alternate.
    let events: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT cluster, kind, token FROM cluster_events ORDER BY id").fetch_all(&pool).await.unwrap();
    let mut open: HashMap<String, i64> = HashMap::new();
    let mut leases = 0;
    for (cluster, kind, token) in events {
        match kind.as_str() {
            "leased" => {
                leases += 1;
                assert!(open.insert(cluster.clone(), token.unwrap()).is_none(), "{cluster} leased twice at once");
            }
            "released" => assert_eq!(open.remove(&cluster), token, "{cluster} released by a stale token"),
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(leases, total);
    assert!(open.is_empty());
    println!("{total} cycles by {WORKERS} workers over 20 clusters in {elapsed:?}; leases per worker {fewest}..{most}");
    pool.close().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn usage_is_reported_from_the_history(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    add(&api, "cluster=c2&region=r").await;
    add(&api, "cluster=n1&region=r&purpose=tnet-ci&osimage=img").await;
    assert_eq!(text(&api, "/getvacant?build=1&job=j").await.0, 200);
    assert_eq!(text(&api, "/getvacant?build=2&job=j").await.0, 200);
    // The third waits until one is finished.
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move { text(&api, "/getvacant?build=3&job=j&wait=10").await })
    };
    waiting(&api, 1).await;
    // The scenario: it waits at least half a second, which the report's wait times show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = api.get("/pool/clusters/c1").await;
    let freed = if first.body["lease"]["build"] == "1" { "c1" } else { "c2" };
    assert_eq!(text(&api, &format!("/finishtest?cluster={freed}")).await.0, 200);
    assert_eq!(waiter.await.unwrap().0, 200);
    assert_eq!(text(&api, "/holdcluster?cluster=n1&desc=look").await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(text(&api, "/releasecluster?cluster=n1").await.0, 200);

    let report = api.get("/pool/report?window=1h").await;
    assert_eq!(report.status, 200, "{}", report.body);
    let purposes = report.body["purposes"].as_array().unwrap();
    let tess = purposes.iter().find(|p| p["purpose"] == "tess-ci").unwrap();
    assert_eq!(tess["clusters"], 2);
    assert_eq!(tess["leases"], 3);
    assert!(tess["utilisation"].as_f64().unwrap() > 0.0);
    assert!(tess["waitP99Ms"].as_f64().unwrap() >= 400.0, "{tess}");
    assert_eq!(tess["waitP50Ms"].as_f64().unwrap(), 0.0);
    let tnet = purposes.iter().find(|p| p["purpose"] == "tnet-ci").unwrap();
    assert_eq!(tnet["leases"], 0);
    let holds = report.body["holds"].as_array().unwrap();
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0]["person"], "tester");
    assert!(holds[0]["hours"].as_f64().unwrap() > 0.0);
    api.get("/pool/report?window=soon").await.expect_problem(400, "window `soon`");

    let metrics = eventually(Duration::from_secs(5), || async {
        let text = app.anonymous().get("/metrics").await.body.as_str().unwrap().to_owned();
        text.contains("cimaster_pool_clusters{purpose=\"tess-ci\",state=\"leased\"} 2").then_some(text)
    })
    .await;
    assert!(metrics.contains("cimaster_pool_acquire_wait_seconds"), "{metrics}");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn waiters_are_served_by_priority_then_in_order(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    add(&api, "cluster=c1&region=r").await;
    assert_eq!(text(&api, "/getvacant?build=0&job=j").await.1, "c1");

    let wait = |build: &'static str, priority: i32| {
        let api = api.clone();
        tokio::spawn(async move {
            let got = text(&api, &format!("/getvacant?build={build}&job=j&wait=60&priority={priority}")).await;
            assert_eq!(got.0, 200, "{}", got.1);
            build
        })
    };
    let positions = |expected: usize| {
        let api = api.clone();
        async move {
            eventually(Duration::from_secs(10), || async {
                let waiters =
                    api.get("/pool/waiters?purpose=tess-ci").await.body["waiters"].as_array().unwrap().clone();
                (waiters.len() == expected).then_some(waiters)
            })
            .await
        }
    };
    let a = wait("a", 0);
    positions(1).await;
    let b = wait("b", 0);
    positions(2).await;
    let c = wait("c", 5);
    let queue = positions(3).await;
    let order: Vec<(String, i64)> =
        queue.iter().map(|w| (w["build"].as_str().unwrap().to_owned(), w["position"].as_i64().unwrap())).collect();
    assert_eq!(order, [("c".to_owned(), 1), ("a".to_owned(), 2), ("b".to_owned(), 3)]);
    // A newcomer without waiting does not jump the queue.
    api.get("/getvacant?build=z&job=j").await.expect_problem(503, "no vacant");

    let mut served = Vec::new();
    for waiter in [c, a, b] {
        assert_eq!(text(&api, "/finishtest?cluster=c1").await.0, 200);
        served.push(tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap());
    }
    assert_eq!(served, ["c", "a", "b"]);
    positions(0).await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn clusters_are_configured_idempotently_over_rest(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    let body = json!({"region": "us-west", "purpose": "tess-ci", "labels": {"k8s": "1.32"}});
    let created = api.put("/pool/clusters/c1", body.clone()).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["change"], "created");
    assert_eq!(created.body["labels"], json!({"k8s": "1.32"}));
    let again = api.put("/pool/clusters/c1", body).await;
    assert_eq!((again.status, again.body["change"].as_str()), (200, Some("unchanged")));
    let moved = api.put("/pool/clusters/c1", json!({"region": "eu-central"})).await;
    assert_eq!(moved.body["change"], "updated");
    assert_eq!(moved.body["region"], "eu-central");
    assert_eq!(moved.body["labels"], json!({}));
    api.put("/pool/clusters/c2", json!({"region": "r", "purpose": "tnet-ci"}))
        .await
        .expect_problem(422, "needs `osimage`");
    api.put("/pool/clusters/c2", json!({"region": "r", "size": 3})).await.expect_problem(422, "unknown field `size`");
    app.as_role(Role::Trigger).put("/pool/clusters/c2", json!({"region": "r"})).await.expect_problem(403, "admin");
    assert_eq!(text(&api, "/getvacant?build=1&job=j").await.1, "c1");
    api.delete("/pool/clusters/c1").await.expect_problem(409, "is leased");
    assert_eq!(text(&api, "/finishtest?cluster=c1").await.0, 200);
    assert_eq!(api.delete("/pool/clusters/c1").await.status, 204);
    api.get("/pool/clusters/c1").await.expect_problem(404, "does not exist");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn malformed_query_strings_get_problem_json_like_every_other_error(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let api = app.admin();
    api.get("/pool/events?limit=lots").await.expect_problem(400, "limit");
    api.get("/pool/events?colour=blue").await.expect_problem(400, "colour");
    api.get("/jobs/x/runs?limit=lots").await.expect_problem(400, "limit");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn leases_and_holds_belong_to_their_caller(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let admin = app.admin();
    let alice = app.as_user("alice", Role::Trigger);
    let bob = app.as_user("bob", Role::Trigger);
    let reader = app.as_user("carol", Role::Read);
    add(&admin, "cluster=c1&region=r").await;

    let lease = alice.post("/pool/leases", json!({"purpose": "tess-ci", "job": "e2e", "build": "1"})).await;
    assert_eq!(lease.status, 201, "{}", lease.body);
    let token = lease.body["token"].as_i64().unwrap();

    // Someone else's lease is not bob's to extend, end, or report as broken.
    bob.post(&format!("/pool/leases/{token}/heartbeat"), json!({})).await.expect_problem(403, "belongs to `alice`");
    bob.post(&format!("/pool/leases/{token}/release"), json!({"result": "infra_failure"}))
        .await
        .expect_problem(403, "belongs to `alice`");
    let (status, body) = text(&bob, "/finishtest?cluster=c1&result=infra_failure").await;
    assert_eq!(status, 403, "{body}");
    // Nor may he lease in her name.
    let (status, body) = text(&bob, "/getvacant?job=j&build=2&email=alice").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("only an admin"), "{body}");

    // A reader sees who holds what, but not the token that would let them act on it.
    let seen = reader.get("/pool/clusters/c1").await;
    assert_eq!(seen.body["lease"]["holder"], "alice");
    assert!(!seen.body.to_string().contains("token"), "{}", seen.body);
    assert!(!reader.get("/pool/events?cluster=c1").await.body.to_string().contains("token"));
    assert_eq!(alice.get("/pool/clusters/c1").await.body["lease"]["token"], token);
    let heartbeat = alice.post(&format!("/pool/leases/{token}/heartbeat"), json!({"ttlSeconds": 0})).await;
    heartbeat.expect_problem(422, "ttlSeconds");
    assert_eq!(alice.post(&format!("/pool/leases/{token}/release"), json!({})).await.status, 200);

    // Holds, likewise: alice's hold is hers; an admin may end it, and the history says so.
    let (status, body) = text(&alice, "/holdcluster?cluster=c1&name=alice&desc=debugging").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = text(&bob, "/holdcluster?cluster=c1&name=bob&desc=mine-now").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = text(&bob, "/releasecluster?cluster=c1").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(reader.get("/pool/clusters/c1").await.body["hold"]["by"], "alice");
    let (status, body) = text(&admin, "/releasecluster?cluster=c1").await;
    assert_eq!(status, 200, "{body}");
    let events = admin.get("/pool/events?cluster=c1").await;
    let unheld = events.body["events"].as_array().unwrap().iter().find(|e| e["kind"] == "unheld").unwrap().clone();
    assert_eq!(unheld["actor"], "tester (admin, overriding alice)", "{unheld}");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_lease_identity_is_its_holders_and_a_runs_is_reserved_for_its_agent(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let admin = app.admin();
    let alice = app.as_user("alice", Role::Trigger);
    let bob = app.as_user("bob", Role::Trigger);
    for cluster in ["c1", "c2", "c3"] {
        add(&admin, &format!("cluster={cluster}&region=r")).await;
    }
    let run = uuid::Uuid::parse_str("0190e6a4-0000-7000-8000-000000000000").unwrap();
    let runs = store::run_job(run);

    // A queued run's identity cannot be squatted over HTTP, by a triggerer or an admin.
    for api in [&alice, &admin] {
        let squat = api.post("/pool/leases", json!({"purpose": "tess-ci", "job": runs, "build": "1"})).await;
        squat.expect_problem(422, "reserved for the clusters of runs");
    }
    let (status, body) = text(&alice, &format!("/getvacant?job={runs}&build=1")).await;
    assert_eq!(status, 422, "{body}");
    // The agent running the attempt takes it through the store, and gets the same lease when it
    // asks again; another agent does not get it.
    let request = AcquireRequest {
        purpose: "tess-ci".into(),
        osimage: None,
        job: runs.clone(),
        build: "1".into(),
        holder: "agent-1".into(),
        run: Some(run),
        ttl: Duration::from_secs(60),
        waited: Duration::ZERO,
        priority: 0,
        waiter: None,
        cluster: None,
    };
    let first = store::acquire(&pool, &request).await.unwrap().unwrap();
    assert_eq!(store::acquire(&pool, &request).await.unwrap().unwrap().token, first.token);
    let other = AcquireRequest { holder: "agent-2".into(), ..request.clone() };
    let refused = store::acquire(&pool, &other).await.unwrap_err();
    assert!(matches!(refused, store::PoolError::Conflict(_)), "{refused}");

    // Alice's (job, build) is hers: asked again she gets her lease back, bob gets a 409 and not
    // her token — with a cluster vacant (the identity's constraint refuses him) and without.
    let mine = json!({"purpose": "tess-ci", "job": "e2e", "build": "7"});
    let lease = alice.post("/pool/leases", mine.clone()).await;
    assert_eq!(lease.status, 201, "{}", lease.body);
    let token = lease.body["token"].as_i64().unwrap();
    assert_eq!(alice.post("/pool/leases", mine.clone()).await.body["token"], token);
    let twin = bob.post("/pool/leases", mine.clone()).await;
    twin.expect_problem(409, "leased by another holder");
    assert!(twin.body.get("token").is_none() && twin.body.get("cluster").is_none(), "{}", twin.body);
    let (status, body) = text(&admin, "/holdcluster?cluster=c3&desc=keeping-it-busy").await;
    assert_eq!(status, 200, "{body}");
    let twin = bob.post("/pool/leases", mine).await;
    twin.expect_problem(409, "leased by another holder");
    let (status, body) = text(&bob, "/getvacant?job=e2e&build=7").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("leased by another holder"), "{body}");
    app.stop().await;
}
