//! The master's link to RabbitMQ: one connection kept alive in the background and a confirming
//! publisher over it.
//!
//! Every publish is `mandatory`, persistent and waits for the broker's confirm; a nack, a return or a
//! timeout is an error, and the run then stays unpublished in Postgres for the dispatcher.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cimaster_common::{queue_name, QueueName, RunMessage};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use secrecy::SecretString;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    Disconnected,
    #[error("declaring queue {queue} failed: {source}")]
    Declare { queue: String, source: lapin::Error },
    #[error("publishing failed: {0}")]
    Publish(#[source] lapin::Error),
    #[error("RabbitMQ did not confirm the publish within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ returned the message as unroutable")]
    Returned,
}

pub use cimaster_amqp::{connect, field_table, Topology};

struct Link {
    connection: Connection,
    channel: Channel,
}

struct Inner {
    url: SecretString,
    prefix: String,
    publish_timeout: Duration,
    link: RwLock<Option<Arc<Link>>>,
    declared: Mutex<HashSet<String>>,
    broken: Notify,
    connected: watch::Sender<u64>,
}

/// A cheap-to-clone handle on the RabbitMQ link.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    pub fn new(url: SecretString, prefix: String, publish_timeout: Duration) -> Self {
        let (connected, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                url,
                prefix,
                publish_timeout,
                link: RwLock::new(None),
                declared: Mutex::new(HashSet::new()),
                broken: Notify::new(),
                connected,
            }),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|link| link.channel.status().connected())
    }

    /// Changes (to a new generation number) each time a connection is established.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.inner.connected.subscribe()
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.inner.link.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn set_link(&self, link: Option<Arc<Link>>) {
        *self.inner.link.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = link;
    }

    /// Keeps a connection open until `cancel`, reconnecting with backoff after every loss.
    pub async fn maintain(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut generation = 0u64;
        loop {
            match self.open().await {
                Ok((link, lost)) => {
                    generation += 1;
                    backoff = Duration::from_millis(100);
                    self.inner.declared.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    self.set_link(Some(Arc::new(link)));
                    self.inner.connected.send_replace(generation);
                    tracing::info!(generation, "connected to RabbitMQ");
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            if let Some(link) = self.current() {
                                let _ = link.channel.close(200, "shutting down").await;
                            }
                            self.set_link(None);
                            return;
                        }
                        _ = lost => tracing::warn!("RabbitMQ connection lost; reconnecting"),
                        _ = self.inner.broken.notified() => tracing::warn!("RabbitMQ channel broken; reconnecting"),
                    }
                    self.set_link(None);
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?backoff, "cannot connect to RabbitMQ");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn open(&self) -> Result<(Link, tokio::sync::oneshot::Receiver<()>), lapin::Error> {
        let connection = connect(&self.inner.url, "cimaster-master").await?;
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        let lost_tx = Mutex::new(Some(lost_tx));
        connection.on_error(move |err| {
            tracing::warn!(error = %err, "RabbitMQ connection error");
            if let Some(tx) = lost_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(());
            }
        });
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Topology::declare_dead_letters(&channel, &self.inner.prefix).await?;
        Ok((Link { connection, channel }, lost_rx))
    }

    /// How many consumers (agents) the runs queue of this resource class has now; `None` when
    /// RabbitMQ cannot say (not connected, or the queue is not declared yet). Asked on a channel of
    /// its own: a passive declare of a missing queue closes the channel it is sent on.
    pub async fn consumers(&self, queue: &QueueName) -> Option<u32> {
        let link = self.current()?;
        let channel = link.connection.create_channel().await.ok()?;
        let name = queue_name(&self.inner.prefix, queue);
        let declared = channel
            .queue_declare(&name, QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await;
        let _ = channel.close(200, "consumer count read").await;
        declared.ok().map(|queue| queue.consumer_count())
    }

    /// Publishes one run attempt and waits for RabbitMQ's confirm.
    pub async fn publish(&self, message: &RunMessage) -> Result<(), PublishError> {
        let link = self.current().ok_or(PublishError::Disconnected)?;
        let result = self.publish_on(&link.channel, message).await;
        if result.is_err() && !link.channel.status().connected() {
            self.inner.broken.notify_one();
        }
        result
    }

    async fn publish_on(&self, channel: &Channel, message: &RunMessage) -> Result<(), PublishError> {
        let queue = queue_name(&self.inner.prefix, &message.queue);
        let known = self.inner.declared.lock().unwrap_or_else(|p| p.into_inner()).contains(&queue);
        if !known {
            Topology::declare_run_queue(channel, &self.inner.prefix, &message.queue)
                .await
                .map_err(|source| PublishError::Declare { queue: queue.clone(), source })?;
            self.inner.declared.lock().unwrap_or_else(|p| p.into_inner()).insert(queue.clone());
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.run_id.to_string().into());
        let confirm = channel
            .basic_publish(
                "",
                &queue,
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &message.to_json(),
                properties,
            )
            .await
            .map_err(PublishError::Publish)?;
        let timeout = self.inner.publish_timeout;
        match tokio::time::timeout(timeout, confirm).await {
            Err(_) => Err(PublishError::Timeout(timeout)),
            Ok(Err(err)) => Err(PublishError::Publish(err)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Returned),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        }
    }
}
