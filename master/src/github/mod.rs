//! What is GitHub's own: the webhook signature, and the payloads as CIMaster reads them. A
//! delivery becomes an [`Event`] here, once, when it is received; the rest of the master sees only
//! events (`handle` turns them into runs and aborts). GitLab or Gitea would be a sibling module
//! making the same events.

pub mod handle;

use cimaster_common::CommitSha;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

/// Whether `signature` (`X-Hub-Signature-256: sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// one of `secrets` (several, so a secret can be rotated). Compared in constant time.
pub fn signature_valid(secrets: &[SecretString], body: &[u8], signature: &str) -> bool {
    let Some(hex_digest) = signature.strip_prefix("sha256=") else { return false };
    let Ok(digest) = hex::decode(hex_digest) else { return false };
    secrets.iter().any(|secret| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) else { return false };
        mac.update(body);
        mac.verify_slice(&digest).is_ok()
    })
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    pub repository: String,
    pub action: String,
    pub number: i64,
    pub draft: bool,
    pub head_sha: CommitSha,
    /// `owner/name` of the head's repository: another than `repository` for a fork.
    pub head_repository: String,
    pub base_branch: String,
    pub base_sha: String,
    pub author: String,
    /// GitHub's `author_association`: `OWNER`, `MEMBER`, `COLLABORATOR`, `CONTRIBUTOR`, `NONE`, …
    pub association: String,
    pub sender: String,
}

impl PullRequest {
    pub fn from_fork(&self) -> bool {
        !self.head_repository.eq_ignore_ascii_case(&self.repository)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    pub repository: String,
    pub branch: String,
    pub after: CommitSha,
    pub sender: String,
}

/// What a delivery is, read from its `X-GitHub-Event` and payload.
#[derive(Debug)]
pub enum Reading {
    Ping,
    Act(Box<Event>),
    /// Nothing to do, and why.
    Ignored(String),
}

/// The fields every delivery is recorded with.
pub struct Summary<'a> {
    pub action: Option<&'a str>,
    pub repository: Option<&'a str>,
    pub sender: Option<&'a str>,
}

pub fn summary(payload: &Value) -> Summary<'_> {
    Summary {
        action: payload["action"].as_str(),
        repository: payload["repository"]["full_name"].as_str(),
        sender: payload["sender"]["login"].as_str(),
    }
}

/// Reads a delivery; `Err` names the field a payload lacks.
pub fn read(event: &str, payload: &Value) -> Result<Reading, String> {
    match event {
        "ping" => Ok(Reading::Ping),
        "pull_request" => read_pull_request(payload),
        "push" => read_push(payload),
        other => Ok(Reading::Ignored(format!("the `{other}` event starts nothing"))),
    }
}

fn read_pull_request(payload: &Value) -> Result<Reading, String> {
    let action = text(payload, "/action")?;
    let updated = matches!(action.as_str(), "opened" | "reopened" | "synchronize" | "ready_for_review");
    let closed = matches!(action.as_str(), "closed" | "converted_to_draft");
    if !updated && !closed {
        return Ok(Reading::Ignored(format!("pull request action `{action}` starts nothing")));
    }
    let pull = PullRequest {
        repository: text(payload, "/repository/full_name")?,
        number: payload.pointer("/pull_request/number").and_then(Value::as_i64).ok_or("no `pull_request.number`")?,
        draft: payload.pointer("/pull_request/draft").and_then(Value::as_bool).unwrap_or(false),
        head_sha: text(payload, "/pull_request/head/sha")?
            .parse()
            .map_err(|_| "`pull_request.head.sha` is not a commit SHA".to_owned())?,
        head_repository: text(payload, "/pull_request/head/repo/full_name")?,
        base_branch: text(payload, "/pull_request/base/ref")?,
        base_sha: text(payload, "/pull_request/base/sha")?,
        author: text(payload, "/pull_request/user/login")?,
        association: text(payload, "/pull_request/author_association")?,
        sender: text(payload, "/sender/login")?,
        action,
    };
    Ok(Reading::Act(Box::new(if updated { Event::PullRequestUpdated(pull) } else { Event::PullRequestClosed(pull) })))
}

fn read_push(payload: &Value) -> Result<Reading, String> {
    let reference = text(payload, "/ref")?;
    let Some(branch) = reference.strip_prefix("refs/heads/") else {
        return Ok(Reading::Ignored(format!("a push to `{reference}` (not a branch) starts nothing")));
    };
    if payload["deleted"].as_bool() == Some(true) {
        return Ok(Reading::Ignored(format!("branch `{branch}` was deleted: nothing to run")));
    }
    Ok(Reading::Act(Box::new(Event::Push(Push {
        repository: text(payload, "/repository/full_name")?,
        branch: branch.to_owned(),
        after: text(payload, "/after")?.parse().map_err(|_| "`after` is not a commit SHA".to_owned())?,
        sender: text(payload, "/sender/login")?,
    }))))
}

fn text(payload: &Value, pointer: &str) -> Result<String, String> {
    payload
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("the payload has no `{}`", pointer.trim_start_matches('/').replace('/', ".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_against_every_secret() {
        let secrets = [SecretString::from("old"), SecretString::from("new")];
        let body = br#"{"zen": "Keep it logically awesome."}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"new").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(signature_valid(&secrets, body, &good));
        assert!(!signature_valid(&secrets, b"{}", &good));
        assert!(!signature_valid(&secrets[..1], body, &good));
        assert!(!signature_valid(&secrets, body, "sha1=abc"));
        assert!(!signature_valid(&secrets, body, "sha256=zz"));
    }
}
