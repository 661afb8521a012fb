//! Two master processes share one database and one broker: any replica serves any request.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use support::{database_url, freestyle, unique_prefix, Client, SECRET};
use tokio::process::{Child, Command};

struct Replica {
    child: Child,
    client: Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_replica(database: &str, prefix: &str) -> Replica {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cimaster"))
        .arg("serve")
        .env("CIMASTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CIMASTER_DATABASE_URL", database)
        .env("CIMASTER_AMQP_URL", support::amqp_url())
        .env("CIMASTER_QUEUE_PREFIX", prefix)
        .env("CIMASTER_JWT_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = Client {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap(),
        token: Some(support::token(cimaster_master::auth::Role::Admin)),
    };
    for _ in 0..200 {
        if client.http.get(format!("{}/readyz", client.base)).send().await.is_ok_and(|r| r.status() == 200) {
            return Replica { child, client };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replica on port {port} never became ready");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_run_created_on_one_replica_is_read_and_aborted_on_another(pool: PgPool) {
    let database = database_url(&pool);
    let prefix = unique_prefix();
    let (mut a, b) = tokio::join!(start_replica(&database, &prefix), start_replica(&database, &prefix));
    assert_ne!(a.client.base, b.client.base);

    assert_eq!(a.client.put("/jobs/unit-test", freestyle("default")).await.status, 201);
    assert_eq!(b.client.put("/jobs/unit-test", freestyle("default")).await.body["change"], "unchanged");
    let run = a.client.post("/jobs/unit-test/runs", json!({})).await;
    assert_eq!(run.status, 201);
    let path = run.body["links"]["self"].as_str().unwrap().to_owned();

    let read = b.client.get(&path).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["id"], run.body["id"]);
    assert_eq!(read.body["status"], "queued");

    let aborted = b.client.post_empty(&format!("{path}/abort")).await;
    assert_eq!(aborted.status, 200);
    assert_eq!(a.client.get(&path).await.body["status"], "aborted");

    // A replica that has seen a job never triggers against a stale copy of it: B changes the job's
    // queue, then deletes and re-creates it, and A's next runs follow each change.
    assert_eq!(b.client.put("/jobs/unit-test", freestyle("gpu")).await.body["change"], "updated");
    let moved = a.client.post("/jobs/unit-test/runs", json!({})).await;
    assert_eq!(moved.status, 201);
    assert_eq!(moved.body["queue"], "gpu");
    let moved_path = moved.body["links"]["self"].as_str().unwrap().to_owned();
    assert_eq!(b.client.post_empty(&format!("{moved_path}/abort")).await.status, 200);
    assert_eq!(b.client.delete("/jobs/unit-test").await.status, 204);
    a.client.post("/jobs/unit-test/runs", json!({})).await.expect_problem(404, "does not exist");
    let mut recreated = freestyle("default");
    recreated["parameters"] = json!({"OTHER": "x"});
    assert_eq!(b.client.put("/jobs/unit-test", recreated).await.body["version"], 1);
    let fresh = a.client.post("/jobs/unit-test/runs", json!({"parameters": {"OTHER": "y"}})).await;
    assert_eq!(fresh.status, 201, "{}", fresh.body);
    assert_eq!(fresh.body["queue"], "default");

    // Graceful shutdown: SIGTERM ends the process cleanly and the other replica keeps serving.
    let pid = a.child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), a.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "master exited with {status}");
    assert_eq!(b.client.get(&path).await.status, 200);
    support::delete_queues(&prefix, &["default", "gpu"]).await;
}
