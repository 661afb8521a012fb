//! The status reporter: every replica looks for commits whose status should change (a followed
//! run moved on, or a fixed state was set) and posts the current state, so a status is as durable
//! as the run's state it shows. Each (commit, context) is claimed by one replica at a time and
//! always gets the newest state, so it never goes back; failures are retried with backoff,
//! honouring what the host asks for, and refusals (no such commit, too many statuses) are recorded
//! and dropped.

use std::sync::Arc;
use std::time::Duration;

use cimaster_common::results::{JunitSummary, KIND_JUNIT};
use cimaster_common::{RunId, RunStatus};
use cimaster_store::results;
use cimaster_store::runs::{self, Run};
use cimaster_store::statuses::{self, Due};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CodeHost, CommitStatus, HostError, StatusState};
use crate::ticker::Ticker;

/// How long a claimed row is this replica's: longer than a request to the host may take.
const HOLD: Duration = Duration::from_secs(60);
/// Rows claimed per pass.
const BATCH: i64 = 50;
/// A status that keeps failing is given up after this many tries (about a day of backoff).
const MAX_ATTEMPTS: i32 = 300;
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// GitHub's limit for a status description.
const MAX_DESCRIPTION: usize = 140;

pub struct Reporter {
    pub pool: PgPool,
    pub host: Arc<dyn CodeHost>,
    /// The base of `target_url` links (`CIMASTER_PUBLIC_URL`), which open the run's page in the web UI.
    pub public_url: Option<String>,
}

pub async fn run_reporter(
    reporter: Reporter,
    interval: Duration,
    wake: tokio::sync::watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let mut ticker = Ticker::new(interval, cancel).woken_by(wake);
    // A rate limit pauses every post of this replica until the host says it is over.
    let mut paused_until: Option<Instant> = None;
    while ticker.tick().await {
        if paused_until.is_some_and(|until| Instant::now() < until) {
            continue;
        }
        let due = match statuses::claim_due(&reporter.pool, HOLD, BATCH).await {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(error = %err, "looking for commit statuses to post failed");
                continue;
            }
        };
        for row in due {
            if paused_until.is_some_and(|until| Instant::now() < until) {
                let _ = statuses::release(&reporter.pool, row.id).await;
                continue;
            }
            if let Err(err) = reporter.report(&row, &mut paused_until).await {
                tracing::warn!(status = row.id, error = %err, "a commit status could not be recorded");
            }
        }
    }
}

impl Reporter {
    /// Posts what the row's target should show now, and records how that went.
    async fn report(&self, row: &Due, paused_until: &mut Option<Instant>) -> Result<(), sqlx::Error> {
        let Some(shown) = self.current(row).await? else {
            return statuses::drop(&self.pool, row.id, "its run no longer exists").await;
        };
        let status = CommitStatus {
            repository: row.repository.clone(),
            sha: row.sha.clone(),
            context: row.context.clone(),
            state: shown.state,
            description: shown.description,
            target_url: shown.target_url,
        };
        match self.host.post_status(&status).await {
            Ok(()) => {
                metrics::counter!("cimaster_github_statuses_posted_total", "state" => status.state.as_str())
                    .increment(1);
                tracing::debug!(sha = %row.sha, context = %row.context, state = status.state.as_str(), "commit status posted");
                statuses::posted(&self.pool, row.id, &shown.key, shown.last).await
            }
            Err(HostError::Retry { wait, why }) => {
                metrics::counter!("cimaster_github_status_retries_total").increment(1);
                if row.attempts + 1 >= MAX_ATTEMPTS {
                    let why = format!("gave up after {MAX_ATTEMPTS} tries: {why}");
                    return statuses::drop(&self.pool, row.id, &why).await;
                }
                if let Some(wait) = wait {
                    *paused_until = Some(Instant::now() + wait);
                }
                let wait = wait.unwrap_or_else(|| backoff(row.attempts));
                tracing::info!(sha = %row.sha, context = %row.context, error = %why, ?wait, "commit status will be retried");
                statuses::retry_after(&self.pool, row.id, wait, &why).await
            }
            Err(HostError::Refused { why } | HostError::Unreadable(why)) => {
                metrics::counter!("cimaster_github_statuses_dropped_total").increment(1);
                tracing::warn!(sha = %row.sha, context = %row.context, error = %why, "commit status dropped");
                statuses::drop(&self.pool, row.id, &why).await
            }
        }
    }

    /// What the row's target should show now; `None` when its run is gone.
    async fn current(&self, row: &Due) -> Result<Option<Shown>, sqlx::Error> {
        let Some(run_id) = row.run_id else {
            let state = row.state.as_deref().and_then(StatusState::parse).unwrap_or(StatusState::Pending);
            let description = row.description.clone().unwrap_or_default();
            return Ok(Some(Shown { state, description, target_url: None, key: row.key.clone(), last: true }));
        };
        let Some(run) = runs::find(&self.pool, RunId(run_id)).await? else { return Ok(None) };
        let junit = if run.status.is_terminal() { junit_summary(&self.pool, &run).await? } else { None };
        let (state, description) = describe(&run, junit.as_ref());
        let target_url = self
            .public_url
            .as_ref()
            .map(|base| format!("{}/ui/jobs/{}/runs/{}", base.trim_end_matches('/'), run.job, run.id));
        let key = format!("{}:{}", run.status.as_str(), run.agent.as_deref().unwrap_or_default());
        Ok(Some(Shown { state, description: clip(&description), target_url, key, last: run.status.is_terminal() }))
    }
}

/// What a status shows, and the key that says it was posted.
struct Shown {
    state: StatusState,
    description: String,
    target_url: Option<String>,
    key: String,
    /// Nothing will follow it.
    last: bool,
}

fn backoff(attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF)
}

/// The run's JUnit totals over its last attempt's reports, if it kept any.
async fn junit_summary(pool: &PgPool, run: &Run) -> Result<Option<JunitSummary>, sqlx::Error> {
    let files = results::files(pool, run.id, run.attempt, &[KIND_JUNIT], None).await?;
    let mut total: Option<JunitSummary> = None;
    for file in &files {
        if let Some(summary) = &file.summary {
            total.get_or_insert_with(JunitSummary::default).add(&summary.0);
        }
    }
    Ok(total)
}

/// The state and a description that says something useful: where it runs, how many tests failed
/// and the first of them, why it stopped.
pub fn describe(run: &Run, junit: Option<&JunitSummary>) -> (StatusState, String) {
    let took = match (run.started_at, run.finished_at) {
        (Some(started), Some(finished)) => format!(" in {}", duration((finished - started).num_seconds())),
        _ => String::new(),
    };
    let message = run.message.as_deref().unwrap_or_default();
    match run.status {
        RunStatus::Queued if message.is_empty() => (StatusState::Pending, "queued".to_owned()),
        RunStatus::Queued => (StatusState::Pending, format!("queued: {message}")),
        RunStatus::Running => {
            (StatusState::Pending, format!("running on {}", run.agent.as_deref().unwrap_or("an agent")))
        }
        RunStatus::Succeeded => match junit.filter(|junit| junit.tests > 0) {
            Some(junit) => (StatusState::Success, format!("{} tests passed{took}", junit.tests)),
            None => (StatusState::Success, format!("passed{took}")),
        },
        RunStatus::Failed => match junit.filter(|junit| junit.failures + junit.errors > 0) {
            Some(junit) => {
                let first = junit.failed.first().map(|case| {
                    let name = if case.classname.is_empty() {
                        case.name.clone()
                    } else {
                        format!("{}.{}", case.classname, case.name)
                    };
                    format!(": {name}")
                });
                let failed = junit.failures + junit.errors;
                (StatusState::Failure, format!("{failed} of {} tests failed{}", junit.tests, first.unwrap_or_default()))
            }
            None => match run.exit_code {
                Some(code) => (StatusState::Failure, format!("failed with exit code {code}{took}")),
                None => (StatusState::Failure, format!("failed{took}")),
            },
        },
        RunStatus::TimedOut => {
            (StatusState::Failure, if message.is_empty() { "timed out".to_owned() } else { message.to_owned() })
        }
        RunStatus::Error => {
            (StatusState::Error, if message.is_empty() { "error".to_owned() } else { format!("error: {message}") })
        }
        RunStatus::Aborted if message.contains("superseded") => {
            (StatusState::Error, "superseded by a newer push".to_owned())
        }
        RunStatus::Aborted => {
            (StatusState::Error, if message.is_empty() { "aborted".to_owned() } else { message.to_owned() })
        }
    }
}

fn duration(seconds: i64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

/// At most 140 characters, cut with an ellipsis.
pub(super) fn clip(text: &str) -> String {
    if text.chars().count() <= MAX_DESCRIPTION {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(MAX_DESCRIPTION - 1).collect();
    clipped.push('…');
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use cimaster_common::results::FailedCase;

    fn run(status: RunStatus, message: Option<&str>) -> Run {
        let now = chrono::Utc::now();
        Run {
            id: uuid::Uuid::nil(),
            job: "unit".into(),
            status,
            attempt: 1,
            queue: "default".into(),
            commit_sha: None,
            branch_name: None,
            parameters: Default::default(),
            triggered_by: "github:mona".into(),
            agent: Some("agent-1".into()),
            exit_code: Some(1),
            message: message.map(str::to_owned),
            abort_requested: false,
            created_at: now,
            published_at: None,
            started_at: Some(now - chrono::Duration::seconds(72)),
            finished_at: Some(now),
            updated_at: now,
            config: None,
            rerun_of: None,
            cause: Default::default(),
        }
    }

    #[test]
    fn descriptions_say_what_happened() {
        let case = |classname: &str, name: &str| FailedCase {
            suite: "calc".into(),
            classname: classname.into(),
            name: name.into(),
            kind: "failure".into(),
            message: "expected 10".into(),
            ..FailedCase::default()
        };
        let junit = JunitSummary {
            tests: 341,
            failures: 2,
            failed: vec![case("calc", "Add carries"), case("calc", "Sub borrows")],
            ..JunitSummary::default()
        };
        let failed = run(RunStatus::Failed, None);
        assert_eq!(
            describe(&failed, Some(&junit)),
            (StatusState::Failure, "2 of 341 tests failed: calc.Add carries".into())
        );
        assert_eq!(describe(&failed, None), (StatusState::Failure, "failed with exit code 1 in 1m 12s".into()));
        let passed = JunitSummary { tests: 341, ..JunitSummary::default() };
        let succeeded = run(RunStatus::Succeeded, None);
        assert_eq!(describe(&succeeded, Some(&passed)), (StatusState::Success, "341 tests passed in 1m 12s".into()));
        let running = run(RunStatus::Running, None);
        assert_eq!(describe(&running, None), (StatusState::Pending, "running on agent-1".into()));
        let superseded = run(RunStatus::Aborted, Some("aborted by github (superseded by a newer push)"));
        assert_eq!(describe(&superseded, None), (StatusState::Error, "superseded by a newer push".into()));
        let aborted = run(RunStatus::Aborted, Some("aborted by alice"));
        assert_eq!(describe(&aborted, None), (StatusState::Error, "aborted by alice".into()));
        let error = run(RunStatus::Error, Some("image busybox:nope not found"));
        assert_eq!(describe(&error, None).0, StatusState::Error);
        assert_eq!(describe(&run(RunStatus::TimedOut, None), None), (StatusState::Failure, "timed out".into()));
    }

    #[test]
    fn descriptions_fit_and_backoff_grows() {
        assert_eq!(clip(&"x".repeat(200)).chars().count(), 140);
        assert_eq!(clip("short"), "short");
        assert_eq!(duration(72), "1m 12s");
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
