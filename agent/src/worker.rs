//! Taking work: one consumer per configured queue, prefetch 1, so a run that does not fit yet
//! waits here (unacked, visible to RabbitMQ) instead of bouncing between agents. A run is claimed in
//! Postgres before its message is acked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cimaster_common::{QueueName, RunId, RunMessage};
use futures::stream::{select_all, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use secrecy::SecretString;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use cimaster_amqp::Topology;
use cimaster_store::attempts;

use crate::admission::Admission;
use crate::attempt::Executor;

/// Abort signals of the runs this agent executes, by run id.
#[derive(Clone, Default)]
pub struct AbortRegistry {
    inner: Arc<Mutex<HashMap<RunId, CancellationToken>>>,
}

impl AbortRegistry {
    pub fn register(&self, run: RunId) -> CancellationToken {
        let abort = CancellationToken::new();
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).insert(run, abort.clone());
        abort
    }

    pub fn remove(&self, run: RunId) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).remove(&run);
    }

    pub fn signal(&self, run: RunId) -> bool {
        match self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(&run) {
            Some(abort) => {
                abort.cancel();
                true
            }
            None => false,
        }
    }
}

/// Listens for `NOTIFY cimaster_run_abort` and signals the matching run at once.
pub async fn listen_for_aborts(pool: sqlx::PgPool, registry: AbortRegistry, cancel: CancellationToken) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "cannot LISTEN for aborts; retrying");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        if let Err(err) = listener.listen(cimaster_store::channels::RUN_ABORT).await {
            tracing::warn!(error = %err, "cannot LISTEN for aborts; retrying");
            continue;
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                notification = listener.recv() => match notification {
                    Ok(notification) => {
                        if let Ok(run) = notification.payload().parse::<RunId>() {
                            if registry.signal(run) {
                                tracing::info!(run_id = %run, "abort received");
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "abort listener lost its connection");
                        break;
                    }
                }
            }
        }
    }
}

pub struct Worker {
    pub amqp_url: SecretString,
    pub prefix: String,
    pub queues: Vec<QueueName>,
    pub admission: Admission,
    pub executor: Executor,
    pub aborts: AbortRegistry,
}

impl Worker {
    /// Consumes until `stop_taking` (reconnecting after broker failures), while running attempts
    /// go on in `running`. `hard_stop` makes running attempts stop their containers.
    pub async fn run(&self, running: &mut JoinSet<()>, stop_taking: CancellationToken, hard_stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !stop_taking.is_cancelled() {
            match self.consume(running, &stop_taking, &hard_stop).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => tracing::warn!(error = %err, retry_in = ?backoff, "consumer failed; reconnecting"),
            }
            tokio::select! {
                _ = stop_taking.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn consume(
        &self,
        running: &mut JoinSet<()>,
        stop_taking: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let connection =
            cimaster_amqp::connect(&self.amqp_url, &format!("cimaster-agent {}", self.executor.agent)).await?;
        let mut consumers = Vec::new();
        for queue in &self.queues {
            let channel = connection.create_channel().await?;
            channel.basic_qos(1, BasicQosOptions::default()).await?;
            let name = Topology::declare_run_queue(&channel, &self.prefix, queue).await?;
            let consumer = channel
                .basic_consume(&name, &self.executor.agent, BasicConsumeOptions::default(), FieldTable::default())
                .await?;
            consumers.push(consumer);
        }
        tracing::info!(queues = ?self.queues, "consuming");
        let mut deliveries = select_all(consumers);
        loop {
            let delivery = tokio::select! {
                _ = stop_taking.cancelled() => {
                    // Unacked messages return to their queue when the connection closes.
                    let _ = connection.close(200, "agent draining").await;
                    return Ok(());
                }
                // Reap finished attempts as we go.
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                delivery = deliveries.next() => delivery,
            };
            match delivery {
                Some(Ok(delivery)) => self.take(delivery, running, stop_taking, hard_stop).await,
                Some(Err(err)) => return Err(err.into()),
                None => anyhow::bail!("the broker closed the consumer"),
            }
        }
    }

    async fn take(
        &self,
        delivery: Delivery,
        running: &mut JoinSet<()>,
        stop_taking: &CancellationToken,
        hard_stop: &CancellationToken,
    ) {
        let message = match RunMessage::from_json(&delivery.data) {
            Ok(message) => message,
            Err(err) => {
                tracing::error!(error = %err, "unreadable message; dead-lettering it");
                let _ = delivery.nack(BasicNackOptions { requeue: false, ..Default::default() }).await;
                return;
            }
        };
        let pool = &self.executor.pool;
        // The job's resources and its services': what the run takes of this agent.
        let (cpus, memory) = match attempts::queued_resources(pool, message.run_id, message.attempt).await {
            Ok(Some(demand)) => demand,
            Ok(None) => {
                tracing::debug!(run_id = %message.run_id, attempt = message.attempt, "nothing to claim; dropping message");
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the run; returning the message");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            }
        };
        let reservation = match self.admission.reserve(cpus, memory, stop_taking).await {
            Ok(Some(reservation)) => reservation,
            Ok(None) => {
                let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            }
            Err(reason) => {
                // It can never run here; give other agents a chance, slowly, without a hot loop.
                tracing::warn!(run_id = %message.run_id, reason, "run does not fit this agent");
                tokio::time::sleep(Duration::from_secs(5)).await;
                let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            }
        };
        // Like CPUs and memory, a network: the run waits here (unacked) until this agent can give it
        // one, so it is neither lost to the queue's delivery limit nor claimed without one.
        let Some(network) = self.executor.networks.admit_waiting(stop_taking).await else {
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            return;
        };
        let claim = match attempts::claim(
            pool,
            message.run_id,
            message.attempt,
            &self.executor.agent,
            self.executor.timing.lease(),
        )
        .await
        {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot claim the run; returning the message");
                let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            }
        };
        // Claimed and committed: the message has done its job.
        if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %err, "ack failed after the claim; a redelivery will find nothing to claim");
        }
        let abort = self.aborts.register(claim.run);
        let executor = self.executor.clone();
        let aborts = self.aborts.clone();
        let hard_stop = hard_stop.clone();
        let in_progress = crate::telemetry::InProgress::begin();
        running.spawn(async move {
            let run = claim.run;
            executor.execute(claim, abort, hard_stop).await;
            aborts.remove(run);
            drop(network);
            drop(reservation);
            drop(in_progress);
        });
    }
}
