//! Why a run exists: the event that started it (the API, a pull request, a push, a comment, a
//! schedule) and, for code-host events, which change and who. Jobs get it as `CIMASTER_EVENT`,
//! `CIMASTER_PR`, `CIMASTER_SENDER`, `CIMASTER_BASE_BRANCH` and `CIMASTER_BASE_SHA`; `GET /runs`
//! filters on the event and the pull request.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kind of event that started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunEvent {
    /// `POST /jobs/{name}/runs` (and the pool's `createcluster`).
    #[default]
    Api,
    PullRequest,
    Push,
    /// A command in a pull request's comment (`/test`, `/retest`).
    Comment,
    Schedule,
}

impl RunEvent {
    pub const ALL: [RunEvent; 5] =
        [RunEvent::Api, RunEvent::PullRequest, RunEvent::Push, RunEvent::Comment, RunEvent::Schedule];

    pub fn as_str(self) -> &'static str {
        match self {
            RunEvent::Api => "api",
            RunEvent::PullRequest => "pull_request",
            RunEvent::Push => "push",
            RunEvent::Comment => "comment",
            RunEvent::Schedule => "schedule",
        }
    }
}

impl fmt::Display for RunEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event `{0}`; use one of api, pull_request, push, comment, schedule")]
pub struct UnknownEvent(pub String);

impl FromStr for RunEvent {
    type Err = UnknownEvent;
    fn from_str(value: &str) -> Result<Self, UnknownEvent> {
        RunEvent::ALL.into_iter().find(|event| event.as_str() == value).ok_or_else(|| UnknownEvent(value.to_owned()))
    }
}

impl TryFrom<String> for RunEvent {
    type Error = UnknownEvent;
    fn try_from(value: String) -> Result<Self, UnknownEvent> {
        value.parse()
    }
}

/// Why a run exists, and for which change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Cause {
    pub event: RunEvent,
    /// The pull request's number, for pull request and comment events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<i64>,
    /// The code host's login of whoever caused the run (the author, the pusher, the commenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// A pull request's base branch and the commit it pointed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha: Option<String>,
    /// The code host's repository (`owner/name`) the event came from; its commit gets the run's
    /// status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The pull request's head is in a fork: the run gets no job secrets unless the job opts in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_fork: bool,
}

impl Cause {
    /// The job's environment variables for it.
    pub fn env(&self) -> Vec<String> {
        let mut env = vec![format!("CIMASTER_EVENT={}", self.event)];
        if let Some(number) = self.pull_request {
            env.push(format!("CIMASTER_PR={number}"));
        }
        for (name, value) in [
            ("CIMASTER_SENDER", &self.sender),
            ("CIMASTER_BASE_BRANCH", &self.base_branch),
            ("CIMASTER_BASE_SHA", &self.base_sha),
            ("CIMASTER_REPOSITORY", &self.repository),
        ] {
            if let Some(value) = value {
                env.push(format!("{name}={value}"));
            }
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        for event in RunEvent::ALL {
            assert_eq!(event.as_str().parse::<RunEvent>(), Ok(event));
        }
        assert!("merge".parse::<RunEvent>().is_err());
    }

    #[test]
    fn the_job_gets_what_is_known() {
        assert_eq!(Cause::default().env(), vec!["CIMASTER_EVENT=api"]);
        let cause = Cause {
            event: RunEvent::PullRequest,
            pull_request: Some(42),
            sender: Some("octocat".into()),
            base_branch: Some("main".into()),
            base_sha: None,
            ..Cause::default()
        };
        assert_eq!(
            cause.env(),
            vec![
                "CIMASTER_EVENT=pull_request",
                "CIMASTER_PR=42",
                "CIMASTER_SENDER=octocat",
                "CIMASTER_BASE_BRANCH=main"
            ]
        );
    }
}
