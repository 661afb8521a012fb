//! Finds attempts whose agent stopped renewing the lease (it died or lost its network) and queues
//! the run again as the next attempt, up to the limit, then marks it `error`. Safe in every replica:
//! expired rows are taken with `FOR UPDATE SKIP LOCKED`.

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::ReaperConfig;
use crate::dispatch::{message_for, ConfirmLog};

#[derive(sqlx::FromRow)]
struct Reaped {
    id: Uuid,
    job: String,
    queue: String,
    attempt: i32,
    status: String,
}

pub async fn run_reaper(
    pool: PgPool,
    broker: Broker,
    confirms: ConfirmLog,
    config: ReaperConfig,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match reap_expired(&pool, config.max_attempts).await {
            Ok(reaped) => {
                for run in reaped.iter().filter(|run| run.status == "queued") {
                    publish(&broker, &confirms, run).await;
                }
            }
            Err(err) => tracing::warn!(error = %err, "reaper pass failed"),
        }
    }
}

async fn publish(broker: &Broker, confirms: &ConfirmLog, run: &Reaped) {
    let Some(message) = message_for(run.id, &run.job, &run.queue, run.attempt) else { return };
    match broker.publish(&message).await {
        Ok(()) => confirms.confirmed(message.run_id),
        // The dispatcher publishes it after its grace period.
        Err(err) => tracing::warn!(run_id = %run.id, error = %err, "cannot publish the retried run yet"),
    }
}

async fn reap_expired(pool: &PgPool, max_attempts: u32) -> Result<Vec<Reaped>, sqlx::Error> {
    let reaped: Vec<Reaped> = sqlx::query_as(
        "WITH expired AS (
             SELECT id, attempt, agent, abort_requested FROM runs
             WHERE status = 'running' AND lease_expires_at < now()
             ORDER BY lease_expires_at
             LIMIT 100
             FOR UPDATE SKIP LOCKED
         ), lost AS (
             UPDATE run_attempts a
             SET ended_at = now(), outcome = 'lost',
                 message = 'agent ' || e.agent || ' stopped renewing its lease'
             FROM expired e
             WHERE a.run_id = e.id AND a.attempt = e.attempt AND a.outcome IS NULL
         )
         UPDATE runs r SET
             status = CASE WHEN e.abort_requested THEN 'aborted'
                           WHEN r.attempt < $1 THEN 'queued' ELSE 'error' END,
             attempt = CASE WHEN NOT e.abort_requested AND r.attempt < $1 THEN r.attempt + 1 ELSE r.attempt END,
             message = CASE WHEN e.abort_requested THEN 'aborted; its agent ' || e.agent || ' was lost'
                            WHEN r.attempt < $1 THEN 'attempt ' || r.attempt || ' lost (agent ' || e.agent
                                 || ' stopped renewing its lease); retried as attempt ' || (r.attempt + 1)
                            ELSE 'gave up after ' || r.attempt || ' attempts: agent ' || e.agent
                                 || ' stopped renewing its lease' END,
             finished_at = CASE WHEN NOT e.abort_requested AND r.attempt < $1 THEN NULL ELSE now() END,
             agent = CASE WHEN NOT e.abort_requested AND r.attempt < $1 THEN NULL ELSE r.agent END,
             lease_expires_at = NULL,
             published_at = NULL,
             queued_at = now(),
             exit_code = NULL,
             console_key = NULL,
             console_bytes = NULL,
             updated_at = now()
         FROM expired e
         WHERE r.id = e.id
         RETURNING r.id, r.job, r.queue, r.attempt, r.status",
    )
    .bind(max_attempts as i32)
    .fetch_all(pool)
    .await?;
    for run in &reaped {
        tracing::warn!(run_id = %run.id, status = run.status, attempt = run.attempt, "run's agent was lost");
    }
    metrics::counter!("cimaster_runs_reaped_total").increment(reaped.len() as u64);
    Ok(reaped)
}
