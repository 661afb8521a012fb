//! Handling deliveries after they were recorded: each replica claims pending ones in Postgres and
//! turns their event into runs (through the one run-creation service), aborts and approvals. A run
//! is created with the delivery's id in its idempotency key, so a replica that dies mid-way leaves a
//! delivery that the next one finishes without doubling a run.

use std::time::Duration;

use cimaster_common::{Cause, GithubSubscription, JobName, JobSpec, RunEvent, RunId, RunStatus, TriggerRequest};
use cimaster_store::approvals::{self, Approval};
use cimaster_store::{deliveries, jobs, runs};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Command, Comment, Event, HostError, Integration, PullRequest, Push, StatusState};
use crate::ticker::Ticker;
use crate::trigger::{Created, Trigger, TriggerError};

/// How long a claimed delivery is this replica's.
const CLAIM: Duration = Duration::from_secs(60);

/// What a pull request by someone untrusted shows until a trusted user comments `/ok-to-test`.
pub const WAITING_FOR_APPROVAL: &str = "waiting for /ok-to-test by a maintainer";

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Trigger(#[from] TriggerError),
    #[error("GitHub: {0}")]
    Host(#[from] HostError),
}

impl From<sqlx::Error> for HandleError {
    fn from(err: sqlx::Error) -> Self {
        HandleError::Trigger(err.into())
    }
}

pub async fn run_handler(
    integration: Integration,
    interval: Duration,
    wake: tokio::sync::watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let mut ticker = Ticker::new(interval, cancel).woken_by(wake);
    while ticker.tick().await {
        loop {
            match deliveries::claim(integration.pool(), CLAIM).await {
                Ok(Some(pending)) => handle_one(&integration, pending).await,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "looking for webhook deliveries failed");
                    break;
                }
            }
        }
    }
}

async fn handle_one(integration: &Integration, pending: deliveries::Pending) {
    let pool = integration.pool();
    let event: Event = match serde_json::from_value(pending.payload.0) {
        Ok(event) => event,
        Err(err) => {
            let _ = deliveries::settle(pool, &pending.id, &format!("unreadable: {err}"), &[]).await;
            return;
        }
    };
    match handle(integration, &pending.id, &event).await {
        Ok(report) => {
            tracing::info!(delivery = %pending.id, event = %pending.event, outcome = %report.outcome(), "webhook handled");
            if let Err(err) = deliveries::settle(pool, &pending.id, &report.outcome(), &report.runs).await {
                tracing::warn!(delivery = %pending.id, error = %err, "cannot settle a delivery; it will be handled again");
            }
        }
        Err(HandleError::Host(HostError::Refused { why } | HostError::Unreadable(why))) => {
            let outcome = format!("GitHub refused what the delivery needed: {why}");
            let _ = deliveries::settle(pool, &pending.id, &outcome, &[]).await;
        }
        // The claim lapses and a replica handles the delivery again; runs it made are found again.
        Err(err) => tracing::warn!(delivery = %pending.id, error = %err, "a webhook could not be handled yet"),
    }
}

/// What handling a delivery did, job by job.
#[derive(Default)]
pub struct Report {
    pub runs: Vec<Uuid>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn outcome(&self) -> String {
        if self.notes.is_empty() {
            "nothing to do".to_owned()
        } else {
            self.notes.join("; ")
        }
    }
}

/// A subscribed job, ready to act on.
pub(super) struct Subscriber {
    pub name: JobName,
    pub subscription: GithubSubscription,
}

pub(super) async fn subscribers(pool: &PgPool, repository: &str) -> Result<Vec<Subscriber>, sqlx::Error> {
    let found = jobs::subscribed(pool, repository).await?;
    Ok(found
        .into_iter()
        .filter_map(|job| {
            let JobSpec::Git(git) = job.spec else { return None };
            Some(Subscriber { name: JobName::parse(&job.name).ok()?, subscription: git.github? })
        })
        .collect())
}

async fn handle(integration: &Integration, delivery: &str, event: &Event) -> Result<Report, HandleError> {
    let repository = event.repository();
    let mut report = Report::default();
    let jobs = subscribers(integration.pool(), repository).await?;
    match event {
        Event::PullRequestUpdated(pull) => {
            // One run per pull request head, whether the webhook or the resync sees it first; a
            // reopened pull request runs again.
            let key = if pull.action == "reopened" { format!("github:{delivery}") } else { head_key(pull) };
            for job in &jobs {
                pull_request_updated(integration, &key, job, pull, &mut report).await?;
            }
        }
        Event::PullRequestClosed(pull) => {
            for job in &jobs {
                pull_request_closed(integration.pool(), &job.name, pull, &mut report).await?;
            }
        }
        Event::Push(push) => {
            for job in &jobs {
                pushed(integration, delivery, job, push, &mut report).await?;
            }
        }
        Event::Comment(comment) => commented(integration, delivery, &jobs, comment, &mut report).await?,
    }
    if report.notes.is_empty() {
        report.notes.push(format!("no job subscribes to {repository} for this event"));
    }
    Ok(report)
}

/// The idempotency key of a pull request's run at its head.
pub(super) fn head_key(pull: &PullRequest) -> String {
    format!("pull:{}:{}", pull.number, pull.head_sha)
}

/// A pull request opened, pushed to or ready: a run at its head, if its author is trusted or the
/// head was approved; else it waits for `/ok-to-test`. Also what the resync does for a missed one.
pub(super) async fn pull_request_updated(
    integration: &Integration,
    key: &str,
    job: &Subscriber,
    pull: &PullRequest,
    report: &mut Report,
) -> Result<(), HandleError> {
    let name = &job.name;
    if !job.subscription.pull_requests.as_ref().is_some_and(|filter| filter.matches(&pull.base_branch)) {
        return Ok(());
    }
    if pull.draft {
        report.notes.push(format!("{name}: draft: runs start when it is marked ready for review"));
        return Ok(());
    }
    if !trusted(integration.pool(), &job.subscription, pull).await? {
        integration.show(name, pull, StatusState::Pending, WAITING_FOR_APPROVAL).await?;
        report.notes.push(format!("{name}: waiting for /ok-to-test: {} is not trusted", pull.author));
        return Ok(());
    }
    if pull.action == "synchronize" {
        supersede(integration.pool(), name, pull, report).await?;
    }
    let cause = pull_cause(RunEvent::PullRequest, pull, &pull.sender);
    start(integration, key, name, (&pull.head_sha, None), &pull.sender, &cause, report).await
}

/// Whether the pull request runs without (more) approval: a trusted author, or a head a trusted
/// user approved with `/ok-to-test`.
async fn trusted(pool: &PgPool, subscription: &GithubSubscription, pull: &PullRequest) -> Result<bool, sqlx::Error> {
    if subscription.trusts(&pull.author, &pull.association) {
        return Ok(true);
    }
    approvals::approved(pool, &approval(pull)).await
}

fn approval(pull: &PullRequest) -> Approval<'_> {
    Approval { repository: &pull.repository, pull_request: pull.number, sha: pull.head_sha.as_str() }
}

fn pull_cause(event: RunEvent, pull: &PullRequest, sender: &str) -> Cause {
    Cause {
        event,
        pull_request: Some(pull.number),
        sender: Some(sender.to_owned()),
        base_branch: Some(pull.base_branch.clone()),
        base_sha: Some(pull.base_sha.clone()),
        repository: Some(pull.repository.clone()),
        from_fork: pull.from_fork(),
    }
}

/// Aborts the pull request's runs of the job at older commits.
async fn supersede(pool: &PgPool, job: &JobName, pull: &PullRequest, report: &mut Report) -> Result<(), sqlx::Error> {
    for (run, commit) in runs::active_of_pull_request(pool, job, pull.number).await? {
        if commit.as_deref() != Some(pull.head_sha.as_str()) {
            runs::abort(pool, job, RunId(run), "github (superseded by a newer push)").await?;
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
        runs::abort(pool, job, RunId(run), &format!("github ({why})")).await?;
        report.notes.push(format!("{job}: run {run} aborted ({why})"));
    }
    Ok(())
}

async fn pushed(
    integration: &Integration,
    delivery: &str,
    job: &Subscriber,
    push: &Push,
    report: &mut Report,
) -> Result<(), HandleError> {
    if !job.subscription.push.as_ref().is_some_and(|filter| filter.matches(&push.branch)) {
        return Ok(());
    }
    let cause = Cause {
        event: RunEvent::Push,
        sender: Some(push.sender.clone()),
        repository: Some(push.repository.clone()),
        ..Cause::default()
    };
    let key = format!("github:{delivery}");
    // The signed push names the branch it moved: the run is on that branch.
    let branch = cimaster_common::BranchName::parse(&push.branch).ok();
    start(integration, &key, &job.name, (&push.after, branch), &push.sender, &cause, report).await
}

/// `/test`, `/retest` and `/ok-to-test` in a comment, by someone the job trusts; the pull request
/// is read from GitHub (a comment's payload does not carry its head).
async fn commented(
    integration: &Integration,
    delivery: &str,
    jobs: &[Subscriber],
    comment: &Comment,
    report: &mut Report,
) -> Result<(), HandleError> {
    let Some(host) = integration.host() else {
        report.notes.push("comment commands need GitHub API access: set CIMASTER_GITHUB_TOKEN or a GitHub App".into());
        return Ok(());
    };
    let pull = host.pull_request(&comment.repository, comment.pull_request).await?;
    if pull.state != "open" {
        report.notes.push(format!("pull request #{} is {}: commands do nothing", pull.number, pull.state));
        return Ok(());
    }
    let key = format!("github:{delivery}");
    let approves = approves(integration.pool(), delivery, &pull, &comment.commands).await?;
    for job in jobs {
        let name = &job.name;
        if !job.subscription.pull_requests.as_ref().is_some_and(|filter| filter.matches(&pull.base_branch)) {
            continue;
        }
        if !job.subscription.trusts(&comment.commenter, &comment.association) {
            report.notes.push(format!("{name}: {} is not trusted: commands ignored", comment.commenter));
            continue;
        }
        match &approves {
            Some(Ok(())) => approvals::approve(integration.pool(), &approval(&pull), &comment.commenter).await?,
            Some(Err(why)) => report.notes.push(format!("{name}: {why}")),
            None => {}
        }
        // `/test` and `/retest` too run a stranger's head only once it is approved.
        if !trusted(integration.pool(), &job.subscription, &pull).await? {
            integration.show(name, &pull, StatusState::Pending, WAITING_FOR_APPROVAL).await?;
            report.notes.push(format!("{name}: waiting for /ok-to-test: head {} is not approved", pull.head_sha));
            continue;
        }
        if wanted(integration.pool(), name, &pull, &comment.commands).await? {
            let cause = pull_cause(RunEvent::Comment, &pull, &comment.commenter);
            start(integration, &key, name, (&pull.head_sha, None), &comment.commenter, &cause, report).await?;
        }
    }
    Ok(())
}

/// Whether an `/ok-to-test` in the comment approves the pull request's head as read now: the
/// head the comment names, or for a bare `/ok-to-test` the head a webhook brought before the
/// comment arrived (a push after the comment needs a new approval). `None`: no `/ok-to-test`;
/// `Err`: why the head is not approved, for the person who commented.
async fn approves(
    pool: &PgPool,
    delivery: &str,
    pull: &PullRequest,
    commands: &[Command],
) -> Result<Option<Result<(), String>>, sqlx::Error> {
    let head = pull.head_sha.as_str();
    let named = commands.iter().find_map(|command| match command {
        Command::OkToTestAt(sha) => Some(sha.as_str()),
        _ => None,
    });
    if let Some(sha) = named {
        return Ok(Some(if sha.len() < super::MIN_APPROVED_PREFIX {
            Err(format!(
                "/ok-to-test {sha} approves nothing: name at least {} hex digits of the head commit",
                super::MIN_APPROVED_PREFIX
            ))
        } else if !head.starts_with(sha) {
            Err(format!(
                "/ok-to-test {sha} approves nothing: the head is now {head}; review it and approve it by its SHA"
            ))
        } else {
            Ok(())
        }));
    }
    if !commands.contains(&Command::OkToTest) {
        return Ok(None);
    }
    Ok(Some(if approvals::heard_of_before(pool, &approval(pull), delivery).await? {
        Ok(())
    } else {
        Err(format!(
            "/ok-to-test approves nothing: the head {head} arrived after the comment; review it and comment \
             `/ok-to-test {head}`"
        ))
    }))
}

/// Whether the commands ask for a run of `job` at the pull request's head.
async fn wanted(pool: &PgPool, job: &JobName, pull: &PullRequest, commands: &[Command]) -> Result<bool, sqlx::Error> {
    let last = runs::latest_at_commit(pool, job, pull.head_sha.as_str()).await?;
    Ok(commands.iter().any(|command| match command {
        Command::Test(name) => name == job.as_str(),
        Command::TestAll => true,
        Command::Retest => matches!(last, Some(RunStatus::Failed | RunStatus::TimedOut | RunStatus::Error)),
        // Approval runs what has not run at this head yet.
        Command::OkToTest | Command::OkToTestAt(_) => last.is_none(),
    }))
}

/// Creates the job's run for this delivery (or finds the one an earlier attempt created), and
/// has its state shown on the commit. `at`: the commit, and the branch a push moved.
async fn start(
    integration: &Integration,
    key: &str,
    job: &JobName,
    at: (&cimaster_common::CommitSha, Option<cimaster_common::BranchName>),
    sender: &str,
    cause: &Cause,
    report: &mut Report,
) -> Result<(), HandleError> {
    let (commit, pushed) = at;
    let by = format!("github:{sender}");
    let request = TriggerRequest { commit_sha: Some(commit.clone()), ..TriggerRequest::default() };
    let trigger = Trigger {
        job,
        request: &request,
        by: &by,
        idempotency_key: Some(key),
        rerun_of: None,
        cause,
        pushed_branch: pushed.as_ref().map(|branch| branch.as_str()),
    };
    match integration.triggers.create(&trigger).await {
        Ok(Created::New(run) | Created::Replayed(run)) => {
            integration.follow(job, cause, commit.as_str(), run.id).await?;
            report.runs.push(run.id);
            report.notes.push(format!("{job}: run {} started", run.id));
            Ok(())
        }
        Err(TriggerError::Invalid(why)) => {
            // The author sees why on the commit; the delivery keeps the whole message.
            if let Some(repository) = &cause.repository {
                let description = format!(
                    "refused: {}",
                    why.split_once("` at commit ")
                        .map_or(why.as_str(), |cut| { cut.1.split_once(": ").map_or(why.as_str(), |(_, rest)| rest) })
                );
                integration.show_at(job, repository, commit.as_str(), StatusState::Error, &description).await?;
            }
            report.notes.push(format!("{job}: refused: {why}"));
            Ok(())
        }
        Err(TriggerError::JobNotFound(_)) => Ok(()),
        Err(err) => Err(err.into()),
    }
}
