//! What is GitHub's own: the webhook signature, the payloads as CIMaster reads them, its REST API
//! (`api`: commit statuses, pull requests) and App authentication (`app`). A delivery becomes a
//! [`codehost::Event`](crate::codehost::Event) here, once, when it is received; the rest of the
//! master sees only events and the [`CodeHost`](crate::codehost::CodeHost) interface. GitLab or
//! Gitea would be a sibling module making the same events.

pub mod api;
pub mod app;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;

use crate::codehost::{Command, Comment, Event, PullRequest, Push};

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
        "issue_comment" => read_comment(payload),
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
    let repository = text(payload, "/repository/full_name")?;
    let sender = text(payload, "/sender/login")?;
    let pull = pull_request(&payload["pull_request"], repository, action, sender)
        .map_err(|field| format!("the payload has no `pull_request.{field}`"))?;
    Ok(Reading::Act(Box::new(if updated { Event::PullRequestUpdated(pull) } else { Event::PullRequestClosed(pull) })))
}

/// A pull request object as GitHub's webhooks and its REST API both show it; `Err` names the field
/// it lacks.
pub(crate) fn pull_request(
    pull: &Value,
    repository: String,
    action: String,
    sender: String,
) -> Result<PullRequest, String> {
    let field = |pointer: &str| {
        pull.pointer(pointer).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| pointer[1..].replace('/', "."))
    };
    Ok(PullRequest {
        number: pull.pointer("/number").and_then(Value::as_i64).ok_or("number")?,
        draft: pull.pointer("/draft").and_then(Value::as_bool).unwrap_or(false),
        state: field("/state").unwrap_or_else(|_| "open".to_owned()),
        head_sha: field("/head/sha")?.parse().map_err(|_| "head.sha (a commit SHA)".to_owned())?,
        // A fork that was deleted has no repository; its head is still fetched from ours.
        head_repository: field("/head/repo/full_name").unwrap_or_else(|_| "(deleted fork)".to_owned()),
        base_branch: field("/base/ref")?,
        base_sha: field("/base/sha")?
            .parse::<cimaster_common::CommitSha>()
            .map_err(|_| "base.sha (a commit SHA)".to_owned())?
            .as_str()
            .to_owned(),
        author: field("/user/login")?,
        association: field("/author_association")?,
        repository,
        action,
        sender,
    })
}

fn read_comment(payload: &Value) -> Result<Reading, String> {
    let action = text(payload, "/action")?;
    if action != "created" {
        return Ok(Reading::Ignored(format!("comment action `{action}` starts nothing")));
    }
    if payload.pointer("/issue/pull_request").is_none() {
        return Ok(Reading::Ignored("a comment on an issue, not a pull request, starts nothing".to_owned()));
    }
    if payload.pointer("/issue/state").and_then(Value::as_str) == Some("closed") {
        return Ok(Reading::Ignored("a comment on a closed pull request starts nothing".to_owned()));
    }
    let commands = Command::parse_all(&text(payload, "/comment/body")?);
    if commands.is_empty() {
        return Ok(Reading::Ignored("the comment has no command (/test, /retest, /ok-to-test)".to_owned()));
    }
    Ok(Reading::Act(Box::new(Event::Comment(Comment {
        repository: text(payload, "/repository/full_name")?,
        pull_request: payload
            .pointer("/issue/number")
            .and_then(Value::as_i64)
            .ok_or("the payload has no `issue.number`")?,
        commenter: text(payload, "/comment/user/login")?,
        association: text(payload, "/comment/author_association")?,
        commands,
    }))))
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
