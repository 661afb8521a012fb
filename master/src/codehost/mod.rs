//! What CIMaster does with a code host, whichever it is: the events it acts on (a pull request
//! updated or closed, a push, a comment with commands), and the small interface it needs back
//! (post a commit status, read a pull request, list the open ones, a token to read the
//! repository). GitHub is one implementation (`crate::github`); GitLab or Gitea would be siblings.
//!
//! `handle` turns recorded deliveries into runs, `report` posts the runs' states as commit
//! statuses, and `resync` catches pull requests whose webhook never arrived.

pub mod handle;
mod integration;
pub mod report;
pub mod resync;

use std::time::Duration;

pub use integration::Integration;

use cimaster_common::{CommitSha, JobName};
use futures::future::BoxFuture;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The commit status context of a job: stable, as branch protection rules name it.
pub fn context(job: &JobName) -> String {
    format!("cimaster/{job}")
}

/// A delivery as CIMaster acts on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A pull request opened, reopened, pushed to (`synchronize`) or marked ready for review.
    PullRequestUpdated(PullRequest),
    /// A pull request closed or turned back into a draft: its runs are aborted.
    PullRequestClosed(PullRequest),
    Push(Push),
    /// A comment on an open pull request with commands in it.
    Comment(Comment),
}

impl Event {
    pub fn repository(&self) -> &str {
        match self {
            Event::PullRequestUpdated(pull) | Event::PullRequestClosed(pull) => &pull.repository,
            Event::Push(push) => &push.repository,
            Event::Comment(comment) => &comment.repository,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    pub repository: String,
    pub action: String,
    pub number: i64,
    pub draft: bool,
    /// `open` or `closed`.
    #[serde(default = "open")]
    pub state: String,
    pub head_sha: CommitSha,
    /// `owner/name` of the head's repository: another than `repository` for a fork.
    pub head_repository: String,
    pub base_branch: String,
    pub base_sha: String,
    pub author: String,
    /// The code host's word for the author's standing: GitHub's `author_association` (`OWNER`,
    /// `MEMBER`, `COLLABORATOR`, `CONTRIBUTOR`, `NONE`, …).
    pub association: String,
    pub sender: String,
}

fn open() -> String {
    "open".to_owned()
}

impl PullRequest {
    pub fn from_fork(&self) -> bool {
        !self.head_repository.eq_ignore_ascii_case(&self.repository)
    }

    /// The ref the base repository keeps the head commit under (forks included).
    pub fn head_ref(&self) -> String {
        format!("refs/pull/{}/head", self.number)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    pub repository: String,
    pub branch: String,
    pub after: CommitSha,
    pub sender: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comment {
    pub repository: String,
    pub pull_request: i64,
    pub commenter: String,
    pub association: String,
    pub commands: Vec<Command>,
}

/// A command in a pull request's comment, one per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", content = "job", rename_all = "snake_case")]
pub enum Command {
    /// `/test <job>`
    Test(String),
    /// `/test all`
    TestAll,
    /// `/retest`: the jobs whose last run at the head failed, timed out or errored.
    Retest,
    /// `/ok-to-test`: a trusted user vouches for a stranger's pull request at its head commit, if
    /// that head was heard of before the comment arrived.
    OkToTest,
    /// `/ok-to-test <sha>`: the same for the head the comment names (hex digits, a prefix of at
    /// least `MIN_APPROVED_PREFIX`), and only if it still is the head.
    OkToTestAt(String),
}

/// The fewest hex digits of a commit `/ok-to-test <sha>` must name: a 7-digit prefix can be
/// matched by a commit made for the purpose in minutes.
pub const MIN_APPROVED_PREFIX: usize = 12;

impl Command {
    /// The commands in a comment's text: lines that start with one (leading spaces allowed).
    pub fn parse_all(text: &str) -> Vec<Command> {
        let mut commands = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let command = match (words.next(), words.next()) {
                (Some("/retest"), _) => Command::Retest,
                (Some("/ok-to-test"), Some(sha)) if sha.len() <= 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Command::OkToTestAt(sha.to_ascii_lowercase())
                }
                (Some("/ok-to-test"), _) => Command::OkToTest,
                (Some("/test"), Some("all")) => Command::TestAll,
                (Some("/test"), Some(job)) if cimaster_common::JobName::parse(job).is_ok() => {
                    Command::Test(job.to_owned())
                }
                _ => continue,
            };
            if !commands.contains(&command) {
                commands.push(command);
            }
        }
        commands
    }
}

/// The states a commit status can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusState {
    Pending,
    Success,
    Failure,
    Error,
}

impl StatusState {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusState::Pending => "pending",
            StatusState::Success => "success",
            StatusState::Failure => "failure",
            StatusState::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [StatusState::Pending, StatusState::Success, StatusState::Failure, StatusState::Error]
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

/// A status to show on a commit.
#[derive(Debug, Clone)]
pub struct CommitStatus {
    pub repository: String,
    pub sha: String,
    /// `cimaster/<job>`: branch protection rules name it.
    pub context: String,
    pub state: StatusState,
    /// At most 140 characters.
    pub description: String,
    pub target_url: Option<String>,
}

/// Why the code host did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Worth trying again: a 5xx, a timeout, a rate limit. `wait` is what the host asked for.
    #[error("{why}")]
    Retry { wait: Option<Duration>, why: String },
    /// The host will not take it, however often asked (no such commit, too many statuses).
    #[error("{why}")]
    Refused { why: String },
    /// The request could not be understood (an answer without the fields we need).
    #[error("{0}")]
    Unreadable(String),
}

/// What CIMaster needs from a code host's API.
pub trait CodeHost: Send + Sync {
    fn post_status<'a>(&'a self, status: &'a CommitStatus) -> BoxFuture<'a, Result<(), HostError>>;
    /// A pull request as it is now.
    fn pull_request<'a>(&'a self, repository: &'a str, number: i64) -> BoxFuture<'a, Result<PullRequest, HostError>>;
    /// The repository's open pull requests.
    fn open_pull_requests<'a>(&'a self, repository: &'a str) -> BoxFuture<'a, Result<Vec<PullRequest>, HostError>>;
    /// A token that reads the repository and nothing else, when the host grants one (a GitHub App's
    /// installation token for that one repository, `contents: read`); `None` when jobs bring their own.
    fn repository_token<'a>(&'a self, repository: &'a str)
        -> BoxFuture<'a, Result<Option<RepositoryToken>, HostError>>;
}

/// A token that reads a repository, and until when.
#[derive(Clone)]
pub struct RepositoryToken {
    pub value: SecretString,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_read_line_by_line() {
        let text = "Looks good.\n/ok-to-test\n  /test unit\n/test all\n/retest please\n/test ../etc\n/tests x\n/retest";
        assert_eq!(
            Command::parse_all(text),
            vec![Command::OkToTest, Command::Test("unit".into()), Command::TestAll, Command::Retest]
        );
        assert!(Command::parse_all("I will /retest later").is_empty());
        assert_eq!(
            Command::parse_all("/ok-to-test 0123456789ABcdef"),
            vec![Command::OkToTestAt("0123456789abcdef".into())]
        );
        assert_eq!(Command::parse_all("/ok-to-test thanks!"), vec![Command::OkToTest]);
    }
}
