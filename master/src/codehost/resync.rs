//! A missed webhook is not the end: at start and every `CIMASTER_GITHUB_RESYNC_INTERVAL`, the open
//! pull requests of every subscribed repository are listed, and a head commit a job has no run for
//! gets one (or waits for `/ok-to-test`, as a webhook would have had it). Replicas doing this at
//! once, or with the webhook, create one run: the idempotency key names the pull request and its
//! head.

use std::time::Duration;

use cimaster_store::{jobs, runs};
use tokio_util::sync::CancellationToken;

use super::handle::{head_key, pull_request_updated, subscribers, HandleError, Report};
use super::Integration;
use crate::ticker::Ticker;

pub async fn run_resync(integration: Integration, interval: Duration, cancel: CancellationToken) {
    let mut ticker = Ticker::new(interval, cancel);
    while ticker.tick().await {
        if let Err(err) = resync(&integration).await {
            tracing::warn!(error = %err, "resyncing open pull requests failed");
        }
    }
}

/// One pass over every subscribed repository; the runs it started.
pub async fn resync(integration: &Integration) -> Result<Report, HandleError> {
    let mut report = Report::default();
    let Some(host) = integration.host() else { return Ok(report) };
    for repository in jobs::subscribed_repositories(integration.pool()).await? {
        // Keeps the token agents clone with fresh.
        if let Err(err) = integration.triggers.repository_token(&repository).await {
            tracing::warn!(repository = %repository, error = %err, "cannot renew the repository's token");
        }
        let pulls = match host.open_pull_requests(&repository).await {
            Ok(pulls) => pulls,
            Err(err) => {
                tracing::warn!(repository = %repository, error = %err, "cannot list open pull requests");
                continue;
            }
        };
        let jobs = subscribers(integration.pool(), &repository).await?;
        for mut pull in pulls {
            pull.action = "resync".to_owned();
            for job in &jobs {
                if runs::latest_at_commit(integration.pool(), &job.name, pull.head_sha.as_str()).await?.is_some() {
                    continue;
                }
                pull_request_updated(integration, &head_key(&pull), job, &pull, &mut report).await?;
            }
        }
    }
    if !report.runs.is_empty() {
        tracing::info!(runs = report.runs.len(), outcome = %report.outcome(), "missed pull requests found");
    }
    Ok(report)
}
