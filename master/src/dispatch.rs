//! Durable dispatch. A run is committed to Postgres before the API answers 201 and is published to
//! RabbitMQ afterwards; `published_at` records the broker's confirm. Every replica runs a dispatcher
//! that publishes queued runs nobody has confirmed yet — after a broker outage, a timed-out confirm,
//! or a master that died between commit and publish. Rows are locked with `SKIP LOCKED` while they are
//! published, so replicas never publish the same run at the same time.

use std::time::Duration;

use cimaster_common::{JobName, QueueName, RunId, RunMessage};
use cimaster_store::outbox;
use futures::future::join_all;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::DispatchConfig;
use crate::ticker::Ticker;

const BATCH: i64 = 200;

/// Records publisher confirms in batches, off the request path.
#[derive(Clone)]
pub struct ConfirmLog {
    tx: mpsc::UnboundedSender<Uuid>,
}

impl ConfirmLog {
    pub fn spawn(pool: PgPool, cancel: CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Uuid>();
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(512);
            loop {
                let first = tokio::select! {
                    id = rx.recv() => id,
                    _ = cancel.cancelled() => { rx.close(); rx.recv().await }
                };
                let Some(first) = first else { return };
                batch.push(first);
                while batch.len() < 1000 {
                    match rx.try_recv() {
                        Ok(id) => batch.push(id),
                        Err(_) => break,
                    }
                }
                let result = match pool.acquire().await {
                    Ok(mut conn) => outbox::mark_published(&mut conn, &batch).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = result {
                    // The runs stay unmarked; the dispatcher publishes them again and agents drop the
                    // duplicate when they find nothing to claim.
                    tracing::warn!(error = %err, runs = batch.len(), "cannot record publisher confirms");
                }
                batch.clear();
            }
        });
        (Self { tx }, task)
    }

    pub fn confirmed(&self, run: RunId) {
        let _ = self.tx.send(run.0);
    }
}

/// The queue message for a run row's current attempt; `None` (logged) if the row is not valid.
pub fn message_for(id: Uuid, job: &str, queue: &str, attempt: i32) -> Option<RunMessage> {
    match (JobName::parse(job), QueueName::parse(queue), u32::try_from(attempt)) {
        (Ok(job), Ok(queue), Ok(attempt)) => Some(RunMessage { run_id: RunId(id), job, attempt, queue }),
        _ => {
            tracing::error!(run_id = %id, "run row has an invalid job, queue or attempt");
            None
        }
    }
}

/// Publishes queued, unconfirmed runs older than the grace period, until `cancel`.
pub async fn run_dispatcher(pool: PgPool, broker: Broker, config: DispatchConfig, cancel: CancellationToken) {
    let mut connections = broker.connections();
    let mut ticker = Ticker::new(config.interval, cancel);
    loop {
        // A pass on every tick, and at once when the broker (re)connects.
        tokio::select! {
            alive = ticker.tick() => if !alive { return },
            changed = connections.changed() => if changed.is_err() { return },
        }
        if let Err(err) = dispatch_pending(&pool, &broker, config.grace).await {
            tracing::warn!(error = %err, "dispatcher pass failed");
        }
        if let Err(err) = note_unserved_queues(&pool, &broker).await {
            tracing::debug!(error = %err, "cannot tell queued runs whether an agent serves their queue");
        }
        match outbox::backlog(&pool).await {
            Ok(count) => metrics::gauge!("cimaster_outbox_backlog").set(count as f64),
            Err(err) => tracing::debug!(error = %err, "cannot count the outbox backlog"),
        }
    }
}

/// One pass: publish every eligible run, in batches. Returns how many were confirmed.
pub async fn dispatch_pending(pool: &PgPool, broker: &Broker, grace: Duration) -> Result<usize, sqlx::Error> {
    let mut total = 0;
    while broker.is_connected() {
        let mut tx = pool.begin().await?;
        let pending = outbox::lock_pending(&mut tx, grace, BATCH).await?;
        if pending.is_empty() {
            tx.commit().await?;
            break;
        }
        let publishes = pending.iter().map(|run| async move {
            let message = message_for(run.id, &run.job, &run.queue, run.attempt)?;
            match broker.publish(&message).await {
                Ok(()) => Some(run.id),
                Err(err) => {
                    metrics::counter!("cimaster_publish_failures_total").increment(1);
                    tracing::warn!(run_id = %run.id, error = %err, "dispatcher could not publish run");
                    None
                }
            }
        });
        let confirmed: Vec<Uuid> = join_all(publishes).await.into_iter().flatten().collect();
        outbox::mark_published(&mut tx, &confirmed).await?;
        tx.commit().await?;
        total += confirmed.len();
        metrics::counter!("cimaster_runs_dispatched_total").increment(confirmed.len() as u64);
        if confirmed.len() < pending.len() {
            break;
        }
    }
    if total > 0 {
        tracing::info!(runs = total, "dispatcher published queued runs");
    }
    Ok(total)
}

/// Queued runs whose queue no agent consumes say so in their `message`, and stop saying it once
/// an agent does.
async fn note_unserved_queues(pool: &PgPool, broker: &Broker) -> Result<(), sqlx::Error> {
    for queue in cimaster_store::runs::waiting_queues(pool).await? {
        let Ok(name) = QueueName::parse(&queue) else { continue };
        let Some(consumers) = broker.consumers(&name).await else { continue };
        cimaster_store::runs::note_unserved(pool, &queue, consumers > 0).await?;
    }
    Ok(())
}
