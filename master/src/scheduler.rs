//! Scheduled jobs: every `CIMASTER_SCHEDULE_INTERVAL` each replica claims due slots in the
//! database (no leader) and fires them through the one run-creation service, with the slot as the
//! run's idempotency key — so a slot makes one run whatever the number of replicas, and a replica
//! that dies between creating the run and moving the slot on leaves it for another to find the
//! same run. The slot then moves to the first one after now: slots missed while every master was
//! down fire once, not once each.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cimaster_common::{Cause, JobName, JobSpec, Overlap, RunEvent, Schedule, TriggerRequest};
use cimaster_store::jobs;
use cimaster_store::schedules::{self, Due};
use tokio_util::sync::CancellationToken;

use crate::ticker::Ticker;
use crate::trigger::{Created, Trigger, TriggerError, Triggers};

/// How long a claimed slot is this replica's to fire; a replica that dies holding it delays the
/// slot by this much.
const CLAIM: Duration = Duration::from_secs(30);

/// Who scheduled runs are triggered by.
pub const BY: &str = "schedule";

pub async fn run_scheduler(triggers: Triggers, interval: Duration, cancel: CancellationToken) {
    let mut ticker = Ticker::new(interval, cancel);
    while ticker.tick().await {
        loop {
            match schedules::claim_due(&triggers.pool, CLAIM).await {
                Ok(Some(due)) => fire(&triggers, due).await,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "looking for due schedules failed");
                    break;
                }
            }
        }
    }
}

/// What one slot did.
enum Outcome {
    Started(uuid::Uuid),
    /// The previous scheduled run still runs (`overlap: skip`).
    Skipped(uuid::Uuid),
    /// The trigger was refused (a branch gone, a parameter no longer declared): the slot is spent.
    Refused(String),
}

async fn fire(triggers: &Triggers, due: Due) {
    let Ok(name) = JobName::parse(&due.job) else { return };
    let schedule = match jobs::get(&triggers.pool, &name).await {
        Ok(Some(job)) => job.spec.schedule().cloned().map(|schedule| (schedule, job.spec)),
        Ok(None) => return,
        Err(err) => {
            tracing::warn!(job = %name, error = %err, "cannot read a scheduled job; the slot waits");
            return;
        }
    };
    let Some((schedule, spec)) = schedule else {
        // The schedule was removed after the slot was claimed.
        let _ = schedules::advance(&triggers.pool, &due.job, due.slot, None, None, "").await;
        return;
    };
    let outcome = match (schedule.overlap, due.last_run) {
        (Overlap::Skip, Some(last)) if due.last_run_active => Outcome::Skipped(last),
        _ => match start(triggers, &name, &spec, &schedule, due.slot).await {
            Ok(outcome) => outcome,
            Err(err) => {
                // Database or broker trouble: the claim lapses and a replica tries the slot again.
                tracing::warn!(job = %name, slot = %due.slot, error = %err, "a scheduled run could not be created yet");
                return;
            }
        },
    };
    let next = schedule.next_after(Utc::now().max(due.slot));
    let (run, note) = match &outcome {
        Outcome::Started(run) => (Some(*run), "started".to_owned()),
        Outcome::Skipped(run) => (Some(*run), format!("skipped: run {run} of the previous slot still runs")),
        Outcome::Refused(why) => (None, format!("refused: {why}")),
    };
    let kind = match outcome {
        Outcome::Started(_) => "started",
        Outcome::Skipped(_) => "skipped",
        Outcome::Refused(_) => "refused",
    };
    metrics::counter!("cimaster_schedule_slots_total", "outcome" => kind).increment(1);
    tracing::info!(job = %name, slot = %due.slot, ?next, outcome = %note, "schedule slot fired");
    if let Err(err) = schedules::advance(&triggers.pool, &due.job, due.slot, next, run, &note).await {
        tracing::warn!(job = %name, error = %err, "cannot move the schedule on; the claim lapses and the slot finds its run");
    }
}

/// Creates the slot's run (or finds the one an earlier attempt at the slot created).
async fn start(
    triggers: &Triggers,
    name: &JobName,
    spec: &JobSpec,
    schedule: &Schedule,
    slot: DateTime<Utc>,
) -> Result<Outcome, TriggerError> {
    let branch_name = match spec {
        JobSpec::Git(git) => Some(schedule.branch.clone().unwrap_or_else(|| git.default_branch.clone())),
        JobSpec::Freestyle(_) => None,
    };
    let request = TriggerRequest { commit_sha: None, branch_name, parameters: schedule.parameters.clone() };
    let key = format!("schedule:{}", slot.to_rfc3339());
    let cause = Cause { event: RunEvent::Schedule, ..Cause::default() };
    let trigger = Trigger {
        job: name,
        request: &request,
        by: BY,
        idempotency_key: Some(&key),
        rerun_of: None,
        cause: &cause,
        pushed_branch: None,
    };
    match triggers.create(&trigger).await {
        Ok(Created::New(run) | Created::Replayed(run)) => Ok(Outcome::Started(run.id)),
        // The slot already made a run, with the schedule as it was then.
        Err(TriggerError::KeyReused(run)) => Ok(Outcome::Started(run)),
        Err(TriggerError::Invalid(why)) => Ok(Outcome::Refused(why)),
        Err(TriggerError::JobNotFound(_)) => Ok(Outcome::Refused("the job was deleted".to_owned())),
        Err(err) => Err(err),
    }
}
