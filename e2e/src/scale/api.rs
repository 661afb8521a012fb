//! The master's API as the scaling scenario uses it: the job, the triggers, and what the
//! autoscaler and the chaos read.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;

use super::JOB;
use crate::history::Recorder;

/// The master's API as the scenario uses it.
#[derive(Clone)]
pub(super) struct Api {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: String,
}

impl Api {
    /// The job every run runs: it reports to the recorder, sleeps `PAUSE` seconds, reports its end.
    pub(super) async fn put_job(&self, recorder: &Recorder, runs_per_agent: usize) -> anyhow::Result<()> {
        let body = json!({"kind": "freestyle", "image": "busybox:latest",
                          "script": recorder.sleeping_script("PAUSE"), "parameters": {"PAUSE": "0"},
                          "resources": {"cpus": 1.0 / runs_per_agent as f64, "memory": "16Mi"}});
        let answer =
            self.http.put(format!("{}/jobs/{JOB}", self.base)).bearer_auth(&self.token).json(&body).send().await?;
        if !answer.status().is_success() {
            bail!("PUT /jobs/{JOB} answered {}: {}", answer.status(), answer.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// Triggers one run per pause, 16 at a time.
    pub(super) async fn trigger_all(&self, pauses: &[u32]) -> anyhow::Result<()> {
        for chunk in pauses.chunks(16) {
            for answer in futures::future::join_all(chunk.iter().map(|pause| self.trigger(*pause))).await {
                answer?;
            }
        }
        Ok(())
    }

    /// One trigger, retried on a broken connection or a 503 as a client does, under one
    /// idempotency key so that a retry never makes a second run.
    pub(super) async fn trigger(&self, pause: u32) -> anyhow::Result<()> {
        let key = uuid::Uuid::new_v4().to_string();
        let mut last = String::new();
        for _ in 0..10 {
            let sent = self
                .http
                .post(format!("{}/jobs/{JOB}/runs", self.base))
                .bearer_auth(&self.token)
                .header("idempotency-key", &key)
                .json(&json!({"parameters": {"PAUSE": pause.to_string()}}))
                .send()
                .await;
            match sent {
                Ok(answer) if answer.status() == 201 || answer.status() == 200 => return Ok(()),
                Ok(answer) if answer.status() != 503 => bail!("a trigger answered {}", answer.status()),
                Ok(answer) => last = format!("answered {}", answer.status()),
                Err(err) => last = format!("{err:#}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("a trigger failed ten times: {last}")
    }

    /// Waiting + running runs of the default queue, as `GET /queues` says.
    pub(super) async fn demand(&self) -> anyhow::Result<usize> {
        let queues: serde_json::Value =
            self.http.get(format!("{}/queues", self.base)).bearer_auth(&self.token).send().await?.json().await?;
        let default = queues["queues"].as_array().and_then(|list| list.iter().find(|q| q["queue"] == "default"));
        Ok(default.and_then(|queue| queue["demand"].as_u64()).unwrap_or(0) as usize)
    }

    /// An agent that runs something now, as `GET /agents` says.
    pub(super) async fn busy_agent(&self) -> anyhow::Result<Option<String>> {
        let agents: serde_json::Value =
            self.http.get(format!("{}/agents", self.base)).bearer_auth(&self.token).send().await?.json().await?;
        let list = agents["agents"].as_array().cloned().unwrap_or_default();
        let busy: BTreeMap<String, i64> = list
            .iter()
            .filter(|agent| agent["state"] == "active")
            .filter_map(|agent| Some((agent["id"].as_str()?.to_owned(), agent["runs"].as_i64()?)))
            .filter(|(_, runs)| *runs > 0)
            .collect();
        Ok(busy.into_iter().max_by_key(|(_, runs)| *runs).map(|(id, _)| id))
    }
}
