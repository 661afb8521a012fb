//! The run state machine and the trigger request.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{BranchName, CommitSha, EnvName};

/// Where a run is in its life.
///
/// ```text
/// queued ──▶ running ──▶ succeeded | failed | timed_out | aborted | error
///   │           │
///   │           └──▶ queued (agent lost: a new attempt)
///   └──▶ aborted | error
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Aborted,
    TimedOut,
    Error,
}

impl RunStatus {
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Aborted,
        RunStatus::TimedOut,
        RunStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Aborted => "aborted",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Error => "error",
        }
    }

    /// A terminal run never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    pub fn can_become(self, next: RunStatus) -> bool {
        use RunStatus::*;
        match self {
            Queued => matches!(next, Running | Aborted | Error),
            Running => matches!(next, Queued | Succeeded | Failed | Aborted | TimedOut | Error),
            Succeeded | Failed | Aborted | TimedOut | Error => false,
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown run status `{0}`; use one of queued, running, succeeded, failed, aborted, timed_out, error")]
pub struct UnknownStatus(pub String);

impl FromStr for RunStatus {
    type Err = UnknownStatus;
    fn from_str(value: &str) -> Result<Self, UnknownStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == value)
            .ok_or_else(|| UnknownStatus(value.to_owned()))
    }
}

impl TryFrom<String> for RunStatus {
    type Error = UnknownStatus;
    fn try_from(value: String) -> Result<Self, UnknownStatus> {
        value.parse()
    }
}

/// Body of `POST /jobs/{name}/runs`. Git jobs need exactly one of `commitSha` and `branchName`;
/// freestyle jobs take neither.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<CommitSha>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_name: Option<BranchName>,
    /// Overrides of the job's parameter defaults; every name must be a parameter the job declares.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub parameters: BTreeMap<EnvName, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), status);
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert!("done".parse::<RunStatus>().unwrap_err().to_string().contains("timed_out"));
    }

    #[test]
    fn transitions() {
        use RunStatus::*;
        assert!(Queued.can_become(Running));
        assert!(Queued.can_become(Aborted));
        assert!(!Queued.can_become(Succeeded));
        assert!(Running.can_become(TimedOut));
        assert!(Running.can_become(Queued), "a lost attempt is queued again");
        for terminal in [Succeeded, Failed, Aborted, TimedOut, Error] {
            assert!(terminal.is_terminal());
            assert!(RunStatus::ALL.iter().all(|next| !terminal.can_become(*next)));
        }
        assert!(!Queued.is_terminal() && !Running.is_terminal());
    }

    #[test]
    fn trigger_request_is_strict() {
        let ok: TriggerRequest = serde_json::from_str(r#"{"branchName": "master"}"#).unwrap();
        assert_eq!(ok.branch_name.unwrap().as_str(), "master");
        let err = serde_json::from_str::<TriggerRequest>(r#"{"branch": "master"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `branch`"));
        let err = serde_json::from_str::<TriggerRequest>(r#"{"commitSha": "abc"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid commit SHA"));
    }
}
