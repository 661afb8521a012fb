//! Where a job's secret may go: the branches (globs) and the events it is limited to, like a
//! protected environment. A run outside the scope starts without the secret, and its console says
//! which were withheld and why. A secret without a scope reaches every run of its job, as it
//! always did (forks aside).
//!
//! A branch limit is judged against the branches whose tip the run's commit was when the master
//! created the run (or the branch a signed push moved), never against a name the trigger merely
//! claims: a trigger token that runs an arbitrary commit, or a pull request from a branch named
//! `main`, gets no branch-limited secret.

use serde::{Deserialize, Serialize};

use crate::{BranchGlob, RunEvent};

/// The limits of one secret; `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SecretScope {
    /// Branch globs (`*` matches any run of characters): the run's commit must be the tip of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<String>>, example = json!(["main", "release-*"])))]
    pub branches: Option<Vec<BranchGlob>>,
    /// Events whose runs get the secret: `api`, `push`, `pull_request` (a comment's run counts as
    /// one), `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<RunEvent>>,
}

impl SecretScope {
    /// The scope as the API takes it: a list given must name something, and `comment` is not an
    /// event of its own here.
    pub fn check(&self) -> Result<(), String> {
        if self.branches.as_ref().is_some_and(Vec::is_empty) || self.events.as_ref().is_some_and(Vec::is_empty) {
            return Err("an empty `branches` or `events` would withhold the secret from every run; leave the \
                        field out for no limit"
                .to_owned());
        }
        if self.events.as_ref().is_some_and(|events| events.contains(&RunEvent::Comment)) {
            return Err(
                "`comment` is not an event of a secret's scope: a comment's run is a `pull_request` run".to_owned()
            );
        }
        Ok(())
    }

    /// `Ok` when a run of `event` whose commit is the tip of `tip_of` gets the secret; else why not.
    pub fn admits(&self, event: RunEvent, tip_of: &[String]) -> Result<(), String> {
        let judged = if event == RunEvent::Comment { RunEvent::PullRequest } else { event };
        if let Some(events) = &self.events {
            if !events.contains(&judged) {
                let names: Vec<&str> = events.iter().map(|event| event.as_str()).collect();
                return Err(format!("limited to events {}, and this run's is {event}", names.join(", ")));
            }
        }
        if let Some(branches) = &self.branches {
            if !tip_of.iter().any(|branch| branches.iter().any(|glob| glob.matches(branch))) {
                let globs: Vec<&str> = branches.iter().map(BranchGlob::as_str).collect();
                let at = if tip_of.is_empty() {
                    "the run's commit was no branch's tip when it was triggered".to_owned()
                } else {
                    format!("the run's commit is the tip of {}", tip_of.join(", "))
                };
                return Err(format!("limited to branches {}, and {at}", globs.join(", ")));
            }
        }
        Ok(())
    }

    pub fn limits_branches(&self) -> bool {
        self.branches.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(branches: Option<&[&str]>, events: Option<&[RunEvent]>) -> SecretScope {
        SecretScope {
            branches: branches.map(|globs| globs.iter().map(|glob| BranchGlob::parse(glob).unwrap()).collect()),
            events: events.map(<[RunEvent]>::to_vec),
        }
    }

    #[test]
    fn no_scope_admits_every_run() {
        assert!(SecretScope::default().admits(RunEvent::PullRequest, &[]).is_ok());
    }

    #[test]
    fn a_branch_limit_needs_the_commit_to_be_a_matching_tip() {
        let deploy = scope(Some(&["main", "release-*"]), None);
        assert!(deploy.admits(RunEvent::Api, &["main".into()]).is_ok());
        assert!(deploy.admits(RunEvent::Push, &["feature".into(), "release-2".into()]).is_ok());
        let why = deploy.admits(RunEvent::Api, &["attack".into()]).unwrap_err();
        assert!(why.contains("main, release-*") && why.contains("tip of attack"), "{why}");
        let why = deploy.admits(RunEvent::Api, &[]).unwrap_err();
        assert!(why.contains("no branch's tip"), "{why}");
    }

    #[test]
    fn an_event_limit_counts_comments_as_pull_requests() {
        let pulls = scope(None, Some(&[RunEvent::PullRequest]));
        assert!(pulls.admits(RunEvent::Comment, &[]).is_ok());
        let why = pulls.admits(RunEvent::Api, &["main".into()]).unwrap_err();
        assert!(why.contains("events pull_request") && why.contains("this run's is api"), "{why}");
        let both = scope(Some(&["main"]), Some(&[RunEvent::Push, RunEvent::Schedule]));
        assert!(both.admits(RunEvent::Schedule, &["main".into()]).is_ok());
        assert!(both.admits(RunEvent::Api, &["main".into()]).is_err());
        assert!(both.admits(RunEvent::Push, &["dev".into()]).is_err());
    }

    #[test]
    fn empty_lists_and_comment_events_are_refused() {
        assert!(scope(Some(&[]), None).check().unwrap_err().contains("leave the field out"));
        assert!(scope(None, Some(&[])).check().is_err());
        assert!(scope(None, Some(&[RunEvent::Comment])).check().unwrap_err().contains("pull_request"));
        assert!(scope(Some(&["main"]), Some(&[RunEvent::Push])).check().is_ok());
    }
}
