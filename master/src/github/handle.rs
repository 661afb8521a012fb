//! Handling deliveries after they were recorded: each replica claims pending ones in Postgres and
//! turns their event into runs (through the one run-creation service) and aborts. A run is created
//! with the delivery's id in its idempotency key, so a replica that dies mid-way leaves a delivery
//! that the next one finishes without doubling a run.

use std::time::Duration;

use cimaster_common::{Cause, GithubSubscription, JobName, JobSpec, RunEvent, RunId, TriggerRequest};
use cimaster_store::{deliveries, jobs, runs};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Event, PullRequest, Push};
use crate::ticker::Ticker;
use crate::trigger::{Created, Trigger, TriggerError, Triggers};

/// How long a claimed delivery is this replica's.
const CLAIM: Duration = Duration::from_secs(60);

pub async fn run_handler(triggers: Triggers, interval: Duration, cancel: CancellationToken) {
    let mut ticker = Ticker::new(interval, cancel);
    while ticker.tick().await {
        loop {
            match deliveries::claim(&triggers.pool, CLAIM).await {
                Ok(Some(pending)) => handle_one(&triggers, pending).await,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "looking for webhook deliveries failed");
                    break;
                }
            }
        }
    }
}

async fn handle_one(triggers: &Triggers, pending: deliveries::Pending) {
    let event: Event = match serde_json::from_value(pending.payload.0) {
        Ok(event) => event,
        Err(err) => {
            let _ = deliveries::settle(&triggers.pool, &pending.id, &format!("unreadable: {err}"), &[]).await;
            return;
        }
    };
    match handle(triggers, &pending.id, &event).await {
        Ok(report) => {
            tracing::info!(delivery = %pending.id, event = %pending.event, outcome = %report.outcome(), "webhook handled");
            if let Err(err) = deliveries::settle(&triggers.pool, &pending.id, &report.outcome(), &report.runs).await {
                tracing::warn!(delivery = %pending.id, error = %err, "cannot settle a delivery; it will be handled again");
            }
        }
        // The claim lapses and a replica handles the delivery again; runs it made are found again.
        Err(err) => tracing::warn!(delivery = %pending.id, error = %err, "a webhook could not be handled yet"),
    }
}

/// What handling a delivery did, job by job.
#[derive(Default)]
struct Report {
    runs: Vec<Uuid>,
    notes: Vec<String>,
}

impl Report {
    fn outcome(&self) -> String {
        if self.notes.is_empty() {
            "nothing to do".to_owned()
        } else {
            self.notes.join("; ")
        }
    }
}

async fn handle(triggers: &Triggers, delivery: &str, event: &Event) -> Result<Report, TriggerError> {
    let repository = match event {
        Event::PullRequestUpdated(pull) | Event::PullRequestClosed(pull) => &pull.repository,
        Event::Push(push) => &push.repository,
    };
    let mut report = Report::default();
    let subscribed = jobs::subscribed(&triggers.pool, repository).await?;
    for job in subscribed {
        let JobSpec::Git(git) = &job.spec else { continue };
        let (Some(subscription), Ok(name)) = (&git.github, JobName::parse(&job.name)) else { continue };
        match event {
            Event::PullRequestUpdated(pull) => {
                pull_request_updated(triggers, delivery, &name, subscription, pull, &mut report).await?
            }
            Event::PullRequestClosed(pull) => pull_request_closed(&triggers.pool, &name, pull, &mut report).await?,
            Event::Push(push) => pushed(triggers, delivery, &name, subscription, push, &mut report).await?,
        }
    }
    if report.notes.is_empty() {
        report.notes.push(format!("no job subscribes to {repository} for this event"));
    }
    Ok(report)
}

async fn pull_request_updated(
    triggers: &Triggers,
    delivery: &str,
    job: &JobName,
    subscription: &GithubSubscription,
    pull: &PullRequest,
    report: &mut Report,
) -> Result<(), TriggerError> {
    if !subscription.pull_requests.as_ref().is_some_and(|filter| filter.matches(&pull.base_branch)) {
        return Ok(());
    }
    let skip = if pull.draft {
        Some("draft: runs start when it is marked ready for review".to_owned())
    } else if pull.from_fork() {
        Some(format!("pull request from the fork {}: forks do not run", pull.head_repository))
    } else if !subscription.trusts(&pull.author, &pull.association) {
        Some(format!("waiting for /ok-to-test: {} is not trusted", pull.author))
    } else {
        None
    };
    if let Some(why) = skip {
        report.notes.push(format!("{job}: {why}"));
        return Ok(());
    }
    if pull.action == "synchronize" {
        supersede(&triggers.pool, job, pull, report).await?;
    }
    let cause = Cause {
        event: RunEvent::PullRequest,
        pull_request: Some(pull.number),
        sender: Some(pull.sender.clone()),
        base_branch: Some(pull.base_branch.clone()),
        base_sha: Some(pull.base_sha.clone()),
    };
    let request = TriggerRequest { commit_sha: Some(pull.head_sha.clone()), ..TriggerRequest::default() };
    start(triggers, delivery, job, &request, &pull.sender, &cause, report).await
}

/// Aborts the pull request's runs of the job at older commits.
async fn supersede(pool: &PgPool, job: &JobName, pull: &PullRequest, report: &mut Report) -> Result<(), sqlx::Error> {
    for (run, commit) in runs::active_of_pull_request(pool, job, pull.number).await? {
        if commit.as_deref() != Some(pull.head_sha.as_str()) {
            runs::abort(pool, job, RunId(run), "github: superseded by a newer push").await?;
            report.notes.push(format!("{job}: run {run} superseded"));
        }
    }
    Ok(())
}

async fn pull_request_closed(
    pool: &PgPool,
    job: &JobName,
    pull: &PullRequest,
    report: &mut Report,
) -> Result<(), sqlx::Error> {
    let why = if pull.action == "closed" { "pull request closed" } else { "pull request turned into a draft" };
    for (run, _) in runs::active_of_pull_request(pool, job, pull.number).await? {
        runs::abort(pool, job, RunId(run), &format!("github: {why}")).await?;
        report.notes.push(format!("{job}: run {run} aborted ({why})"));
    }
    Ok(())
}

async fn pushed(
    triggers: &Triggers,
    delivery: &str,
    job: &JobName,
    subscription: &GithubSubscription,
    push: &Push,
    report: &mut Report,
) -> Result<(), TriggerError> {
    if !subscription.push.as_ref().is_some_and(|filter| filter.matches(&push.branch)) {
        return Ok(());
    }
    let cause = Cause { event: RunEvent::Push, sender: Some(push.sender.clone()), ..Cause::default() };
    let request = TriggerRequest { commit_sha: Some(push.after.clone()), ..TriggerRequest::default() };
    start(triggers, delivery, job, &request, &push.sender, &cause, report).await
}

/// Creates the job's run for this delivery (or finds the one an earlier attempt created).
async fn start(
    triggers: &Triggers,
    delivery: &str,
    job: &JobName,
    request: &TriggerRequest,
    sender: &str,
    cause: &Cause,
    report: &mut Report,
) -> Result<(), TriggerError> {
    let key = format!("github:{delivery}");
    let by = format!("github:{sender}");
    let trigger = Trigger { job, request, by: &by, idempotency_key: Some(&key), rerun_of: None, cause };
    match triggers.create(&trigger).await {
        Ok(Created::New(run) | Created::Replayed(run)) => {
            report.runs.push(run.id);
            report.notes.push(format!("{job}: run {} started", run.id));
            Ok(())
        }
        Err(TriggerError::Invalid(why)) => {
            report.notes.push(format!("{job}: refused: {why}"));
            Ok(())
        }
        Err(TriggerError::JobNotFound(_)) => Ok(()),
        Err(err) => Err(err),
    }
}
