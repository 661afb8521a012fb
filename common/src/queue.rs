//! The message the master publishes for each run attempt and agents consume.

use serde::{Deserialize, Serialize};

use crate::ids::{JobName, QueueName, RunId};

/// One attempt of one run, waiting for an agent. The message only names the run: the agent reads
/// the rest from Postgres when it claims it, so a stale or duplicate message finds nothing to claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunMessage {
    pub run_id: RunId,
    pub job: JobName,
    pub attempt: u32,
    pub queue: QueueName,
}

impl RunMessage {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a run message always serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A queue argument, as plain data so master and agent declare queues identically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueArgument {
    Text(String),
    Int(i32),
}

/// Arguments of every run queue: quorum, dead-lettering into `<prefix>.dlx` after 20 deliveries.
pub fn run_queue_arguments(prefix: &str) -> Vec<(&'static str, QueueArgument)> {
    vec![
        ("x-queue-type", QueueArgument::Text("quorum".to_owned())),
        ("x-dead-letter-exchange", QueueArgument::Text(dead_letter_exchange(prefix))),
        ("x-delivery-limit", QueueArgument::Int(20)),
    ]
}

pub fn dead_letter_exchange(prefix: &str) -> String {
    format!("{prefix}.dlx")
}

pub fn dead_letter_queue(prefix: &str) -> String {
    format!("{prefix}.dead")
}

/// The RabbitMQ queue that holds runs of one resource class, e.g. `cimaster.runs.default`.
/// `prefix` separates installations (and test suites) sharing one broker.
pub fn queue_name(prefix: &str, queue: &QueueName) -> String {
    format!("{prefix}.runs.{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let message = RunMessage {
            run_id: RunId::new(),
            job: JobName::parse("unit-test").unwrap(),
            attempt: 2,
            queue: QueueName::default(),
        };
        let json: serde_json::Value = serde_json::from_slice(&message.to_json()).unwrap();
        assert_eq!(json["job"], "unit-test");
        assert_eq!(json["attempt"], 2);
        assert_eq!(RunMessage::from_json(&message.to_json()).unwrap(), message);
        assert_eq!(queue_name("cimaster", &message.queue), "cimaster.runs.default");
    }
}
