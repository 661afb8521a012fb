//! The HTTP server's own limits, against real Postgres and RabbitMQ: what a slow, idle or vanished
//! client, and many waiting ones, may cost.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use support::{freestyle, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; what it sent. Bounded by `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut received)).await;
    read.ok().map(|_| String::from_utf8_lossy(&received).into_owned())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_half_sent_request_or_an_idle_connection_is_closed(pool: PgPool) {
    // The test configuration's header timeout is 2 s.
    let app = TestApp::spawn(pool).await;

    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: cimaster\r\n").await.unwrap(); // never finished
    let closed = read_until_closed(&mut slow, Duration::from_secs(20)).await;
    assert!(closed.is_some(), "a request head that never ends keeps its connection open");

    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: cimaster\r\n\r\n").await.unwrap();
    let answered = read_until_closed(&mut idle, Duration::from_secs(20)).await;
    let answered = answered.expect("an idle kept-alive connection stays open");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // Meanwhile the server serves everyone else.
    assert_eq!(app.anonymous().get("/healthz").await.status, 200);
    app.stop().await;
}

/// Writes a chunk of attempt 1's live console, as the run's agent would.
async fn print(pool: &PgPool, id: &str, seq: i64, data: &[u8]) {
    sqlx::query("INSERT INTO run_console (run_id, attempt, seq, data) VALUES ($1::uuid, 1, $2, $3)")
        .bind(id)
        .bind(seq)
        .bind(data)
        .execute(pool)
        .await
        .unwrap();
}

/// Console follows open on the replica, from its metrics.
async fn follows(app: &TestApp) -> u64 {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|line| line.starts_with("cimaster_console_follows ")).expect(&text);
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() as u64
}

/// The database's committed transactions so far, in this test's database.
async fn transactions(pool: &PgPool) -> i64 {
    // Statistics reach the view when a backend reports them (at most once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn followers_cost_the_database_nothing_while_a_run_is_silent_and_stop_when_they_go(pool: PgPool) {
    // Background work ticks slowly here, so the followers' own queries stand out.
    let app = TestApp::spawn_with(pool.clone(), |config| {
        config.dispatch.interval = Duration::from_secs(5);
        config.reaper.interval = Duration::from_secs(5);
        config.pool.expiry_interval = Duration::from_secs(5);
    })
    .await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/quiet", freestyle("default")).await.status, 201);
    let run = api.post_empty("/jobs/quiet/runs").await;
    let id = run.body["id"].as_str().unwrap().to_owned();
    let console = format!("{}/results/console?follow=true", run.body["links"]["self"].as_str().unwrap());
    // As an agent would have claimed it: running, and silent.
    support::claim_as_agent(&pool, &id).await;

    let before = transactions(&pool).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let baseline = transactions(&pool).await - before;

    // Twenty clients follow the silent run.
    let mut followers = Vec::new();
    for _ in 0..20 {
        let response = api.request(reqwest::Method::GET, &console).send().await.unwrap();
        assert_eq!(response.status(), 200);
        followers.push(response);
    }
    let before = transactions(&pool).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let silent = transactions(&pool).await - before - baseline;
    // Polling every 250 ms is 20 × 2 queries × 4 a second: about 880 in these 5.5 s. Woken only
    // by news (with a 5 s fallback tick), they make about 45.
    assert!(silent < 300, "20 silent followers made {silent} transactions in 5.5 s");

    // A line printed reaches a follower at once.
    print(&pool, &id, 0, b"2026-12-02T00:00:00Z hello\n").await;
    let mut first = followers.pop().unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(1), first.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&chunk).contains("hello"));

    assert_eq!(follows(&app).await, 20);

    // The clients go away; their streams stop (and with them their queries).
    drop(first);
    drop(followers);
    let stopped = support::eventually(Duration::from_secs(10), || async { (follows(&app).await == 0).then_some(()) });
    stopped.await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn waiting_acquires_hold_no_database_connection(pool: PgPool) {
    // Eight database connections for the whole replica, and 32 callers waiting for a cluster.
    let app = TestApp::spawn_with(pool, |config| config.database.max_connections = 8).await;
    let api = app.admin();
    let added =
        api.request(reqwest::Method::GET, "/addcluster?cluster=only&region=r1&name=admin").send().await.unwrap();
    assert_eq!(added.status(), 201);
    let holder = api.post("/pool/leases", json!({"purpose": "tess-ci", "job": "j", "build": "holder"})).await;
    assert_eq!(holder.status, 201, "{}", holder.body);
    let token = holder.body["token"].as_i64().unwrap();

    let waiters: Vec<_> = (0..32)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                api.post(
                    "/pool/leases",
                    json!({"purpose": "tess-ci", "job": "j", "build": format!("w{i}"), "waitSeconds": 60}),
                )
                .await
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = api.get("/pool/waiters").await;
        if list.body["waiters"].as_array().map_or(0, Vec::len) == 32 {
            break;
        }
        if std::time::Instant::now() > deadline || waiters.iter().any(|waiter| waiter.is_finished()) {
            let done: Vec<_> = futures::future::join_all(waiters.into_iter().filter(|w| w.is_finished())).await;
            let first = done.into_iter().next().map(|reply| reply.unwrap().body);
            panic!("not 32 waiters: {} (a waiter ended: {first:?})", list.body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Everyone else is served as usual while they wait.
    for _ in 0..20 {
        let jobs = api.get("/jobs").await;
        assert_eq!(jobs.status, 200, "{}", jobs.body);
        assert_eq!(api.get("/pool/clusters").await.status, 200);
    }

    // Each release hands the cluster to the next waiter.
    let mut token = token;
    let mut served = 0;
    let mut waiters = waiters;
    while !waiters.is_empty() {
        let released = api.post(&format!("/pool/leases/{token}/release"), json!({})).await;
        assert_eq!(released.status, 200, "{}", released.body);
        let (lease, _, rest) = tokio::time::timeout(Duration::from_secs(30), futures::future::select_all(waiters))
            .await
            .expect("a waiter got the freed cluster");
        let lease = lease.unwrap();
        assert_eq!(lease.status, 201, "{}", lease.body);
        token = lease.body["token"].as_i64().unwrap();
        served += 1;
        waiters = rest;
    }
    assert_eq!(served, 32);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_follow_ends_at_its_limit_and_resumes_where_it_was(pool: PgPool) {
    let app = TestApp::spawn_with(pool.clone(), |config| config.http.follow_limit = Duration::from_secs(1)).await;
    let api = app.admin();
    assert_eq!(api.put("/jobs/long", freestyle("default")).await.status, 201);
    let run = api.post_empty("/jobs/long/runs").await;
    let id = run.body["id"].as_str().unwrap().to_owned();
    support::claim_as_agent(&pool, &id).await;
    print(&pool, &id, 0, b"first\n").await;
    let console = format!("{}/results/console", run.body["links"]["self"].as_str().unwrap());
    let response = api.request(reqwest::Method::GET, &format!("{console}?follow=true")).send().await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(15), response.text()).await.expect("the follow ended");
    assert_eq!(body.unwrap(), "first\n", "the run is still running; the follow ended at its limit");
    print(&pool, &id, 1, b"second\n").await;
    let resumed = api.request(reqwest::Method::GET, &format!("{console}?follow=true&after=6")).send().await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(15), resumed.text()).await.expect("the follow ended");
    assert_eq!(rest.unwrap(), "second\n");
    app.stop().await;
}
