//! `--abort`: how long an abort takes to end a run whose script ignores nothing and traps nothing
//! (`while true; do sleep 1; done`), from the abort request to the run recorded as ended, beside a
//! baseline measured in the same run: `docker stop` of the same loop with Docker's init (what an
//! abort can at best be) and without it (a shell as PID 1, which ignores SIGTERM: the whole grace).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{RemoveContainerOptions, StopContainerOptions};
use bollard::Docker;
use serde_json::json;

use super::pct;

const LOOP: &str = "echo started; while true; do sleep 1; done";

/// Aborts `runs` running runs one after the other; abort request → run ended, each.
pub async fn measure_ours(
    runs: usize,
    http: &reqwest::Client,
    base: &str,
    token: &str,
    pool: &sqlx::PgPool,
    image: &str,
) -> anyhow::Result<Vec<Duration>> {
    let job =
        json!({"kind": "freestyle", "image": image, "script": LOOP, "resources": {"cpus": 0.1, "memory": "16Mi"}});
    let put = http.put(format!("{base}/jobs/loop")).bearer_auth(token).json(&job).send().await?;
    if !put.status().is_success() {
        bail!("PUT /jobs/loop answered {}", put.status());
    }
    let mut samples = Vec::new();
    for _ in 0..runs {
        let response = http.post(format!("{base}/jobs/loop/runs")).bearer_auth(token).send().await?;
        let body: serde_json::Value = response.json().await?;
        let id: uuid::Uuid = body["id"].as_str().context("run id")?.parse()?;
        wait_until(pool, id, "a.container_started_at IS NOT NULL").await?;
        // The script is in its loop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        let abort = http.post(format!("{base}/jobs/loop/runs/{id}/abort")).bearer_auth(token).send().await?;
        if abort.status() != 202 {
            bail!("abort answered {}", abort.status());
        }
        wait_until(pool, id, "r.status = 'aborted' AND r.finished_at IS NOT NULL").await?;
        samples.push(asked.elapsed());
    }
    Ok(samples)
}

async fn wait_until(pool: &sqlx::PgPool, id: uuid::Uuid, condition: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = format!(
        "SELECT EXISTS (SELECT 1 FROM runs r LEFT JOIN run_attempts a ON a.run_id = r.id AND a.attempt = r.attempt
         WHERE r.id = $1 AND {condition})"
    );
    while !sqlx::query_scalar::<_, bool>(&query).bind(id).fetch_one(pool).await? {
        if Instant::now() > deadline {
            bail!("run {id}: `{condition}` not reached in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// `docker stop` (10 s grace) of the loop, with or without Docker's init; stop request → stopped.
pub async fn measure_baseline(runs: usize, image: &str, init: bool) -> anyhow::Result<Vec<Duration>> {
    let docker = Docker::connect_with_local_defaults()?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["sh".into(), "-c".into(), LOOP.into()]),
            host_config: Some(HostConfig { init: Some(init), ..Default::default() }),
            ..Default::default()
        };
        let created = docker.create_container(None::<bollard::query_parameters::CreateContainerOptions>, body).await?;
        docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        docker.stop_container(&created.id, Some(StopContainerOptions { t: Some(10), signal: None })).await?;
        samples.push(asked.elapsed());
        docker
            .remove_container(&created.id, Some(RemoveContainerOptions { force: true, ..Default::default() }))
            .await?;
    }
    Ok(samples)
}

/// Prints the three rows and the ratio to the best a stop can be.
pub fn report(ours: &mut [Duration], with_init: &mut [Duration], without_init: &mut [Duration]) {
    println!("abort benchmark: {} aborts of a running `{LOOP}`", ours.len());
    println!("{:<38} {:>9} {:>9}", "(ms from the abort / stop request)", "p50", "p95");
    for (name, samples) in [
        ("CIMaster abort → run ended", &mut *ours),
        ("docker stop, with init", &mut *with_init),
        ("docker stop, without init", &mut *without_init),
    ] {
        println!("{name:<38} {:>9.1} {:>9.1}", pct(samples, 0.50), pct(samples, 0.95));
    }
    println!(
        "abort → run ended p95 is {:.2}x docker stop with init (target p95 <= 1000 ms)",
        pct(ours, 0.95) / pct(with_init, 0.95)
    );
}
