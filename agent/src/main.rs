//! `cimaster-agent`: connects to RabbitMQ and checks the run queues it is configured for.
//! Executing runs is not part of this binary yet; it does not consume, so it never takes work it
//! cannot do.

use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let url = std::env::var("CIMASTER_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = std::env::var("CIMASTER_QUEUE_PREFIX").unwrap_or_else(|_| "cimaster".into());
    let queues = std::env::var("CIMASTER_AGENT_QUEUES").unwrap_or_else(|_| "default".into());
    let queues = queues
        .split(',')
        .map(|queue| cimaster_common::QueueName::parse(queue.trim()))
        .collect::<Result<Vec<_>, _>>()
        .context("CIMASTER_AGENT_QUEUES")?;

    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name("cimaster-agent".into());
    let connection = Connection::connect(&url, properties).await.context("connecting to RabbitMQ")?;
    for queue in &queues {
        let name = cimaster_common::queue_name(&prefix, queue);
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(&name, QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await;
        match declared {
            Ok(queue) => tracing::info!(queue = %name, waiting = queue.message_count(), "queue present"),
            Err(_) => tracing::info!(queue = %name, "queue not declared yet; the master declares it on first run"),
        }
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    connection.close(200, "shutting down").await?;
    Ok(())
}
