//! RabbitMQ as the master and the agent both see it: how to connect (on the tokio runtime) and the
//! topology every CIMaster process relies on — a quorum queue per resource class, dead-lettering
//! into `<prefix>.dead`. The names and arguments themselves are plain data in `cimaster-common`;
//! this crate turns them into lapin's types, so `common` stays free of lapin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cimaster_common::{queue_name, QueueArgument, QueueName};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};

/// Each try to reach one node gives up after this long (a node that accepts and then hangs).
const NODE_TRY: Duration = Duration::from_secs(10);
/// Where the next connection of this process starts in the node list: reconnects go round the
/// nodes, so a node that went down is tried last next time.
static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);

/// Connects to RabbitMQ with the tokio runtime; `name` shows in the broker's connection list.
/// `urls` is one AMQP URL, or the nodes of a cluster as several, comma-separated: each is tried in
/// turn, starting one further along the list at every call.
pub async fn connect(urls: &SecretString, name: &str) -> Result<Connection, lapin::Error> {
    let nodes = nodes(urls.expose_secret());
    let first = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
    let mut last_error = lapin::Error::IOError(Arc::new(std::io::Error::other("no RabbitMQ URL is configured")));
    for step in 0..nodes.len() {
        let url = nodes[(first + step) % nodes.len()];
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name(name.into());
        match tokio::time::timeout(NODE_TRY, Connection::connect(url, properties)).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(err)) => last_error = err,
            Err(_) => {
                let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "the node did not answer in time");
                last_error = lapin::Error::IOError(Arc::new(timed_out));
            }
        }
    }
    Err(last_error)
}

/// The node URLs of a comma-separated list.
fn nodes(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
}

/// Declares the queues and the exchange runs travel through; every declaration is idempotent.
pub struct Topology;

impl Topology {
    pub fn dead_letter_exchange(prefix: &str) -> String {
        cimaster_common::dead_letter_exchange(prefix)
    }

    pub fn dead_letter_queue(prefix: &str) -> String {
        cimaster_common::dead_letter_queue(prefix)
    }

    /// The fanout exchange runs are dead-lettered to, and the quorum queue behind it.
    pub async fn declare_dead_letters(channel: &Channel, prefix: &str) -> Result<(), lapin::Error> {
        let exchange = Self::dead_letter_exchange(prefix);
        let queue = Self::dead_letter_queue(prefix);
        channel
            .exchange_declare(
                &exchange,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions { durable: true, ..Default::default() },
                field_table(&[("x-queue-type", QueueArgument::Text("quorum".to_owned()))]),
            )
            .await?;
        channel.queue_bind(&queue, &exchange, "", QueueBindOptions::default(), FieldTable::default()).await
    }

    /// The runs queue of one resource class; returns its name.
    pub async fn declare_run_queue(channel: &Channel, prefix: &str, queue: &QueueName) -> Result<String, lapin::Error> {
        let name = queue_name(prefix, queue);
        channel
            .queue_declare(
                &name,
                QueueDeclareOptions { durable: true, ..Default::default() },
                field_table(&cimaster_common::run_queue_arguments(prefix)),
            )
            .await?;
        Ok(name)
    }
}

/// Deletes what a prefix of its own declared (a test's or a benchmark's): the runs queues of these
/// resource classes, the dead letters and their exchange. Each on a channel of its own, since
/// deleting a queue that does not exist closes the channel it is sent on.
pub async fn delete_prefix(url: &SecretString, prefix: &str, queues: &[&str]) -> Result<(), lapin::Error> {
    let connection = connect(url, "cimaster-cleanup").await?;
    let names = queues.iter().map(|queue| format!("{prefix}.runs.{queue}"));
    for name in names.chain([Topology::dead_letter_queue(prefix)]) {
        let channel = connection.create_channel().await?;
        let _ = channel.queue_delete(&name, QueueDeleteOptions::default()).await;
    }
    let channel = connection.create_channel().await?;
    let _ = channel.exchange_delete(&Topology::dead_letter_exchange(prefix), ExchangeDeleteOptions::default()).await;
    connection.close(200, "cleaned up").await
}

/// Turns plain queue arguments into AMQP's field table.
pub fn field_table(arguments: &[(&'static str, QueueArgument)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        let value = match value {
            QueueArgument::Text(text) => AMQPValue::LongString(text.as_str().into()),
            QueueArgument::Int(number) => AMQPValue::LongInt(*number),
        };
        table.insert(ShortString::from(*name), value);
    }
    table
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_node_list_is_split_on_commas() {
        assert_eq!(super::nodes("amqp://a:5672/%2f"), ["amqp://a:5672/%2f"]);
        assert_eq!(
            super::nodes("amqp://a/%2f, amqp://b/%2f,,amqp://c/%2f "),
            ["amqp://a/%2f", "amqp://b/%2f", "amqp://c/%2f"]
        );
        assert!(super::nodes("").is_empty());
    }
}
