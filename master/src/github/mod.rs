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

/// The digest an `X-Hub-Signature-256` header names: `sha256=` and 64 hexadecimal digits.
pub fn parse_signature(header: &[u8]) -> Option<[u8; 32]> {
    let hex_digest = header.strip_prefix(b"sha256=")?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut digest).ok()?;
    Some(digest)
}

/// The HMAC-SHA256 of a body under each webhook secret (several, so a secret can be rotated),
/// updated as the body arrives.
pub struct Signer(Vec<Hmac<Sha256>>);

impl Signer {
    pub fn new(secrets: &[SecretString]) -> Self {
        Signer(
            secrets
                .iter()
                .filter_map(|secret| Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()).ok())
                .collect(),
        )
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.0.iter_mut().for_each(|mac| mac.update(chunk));
    }

    /// Whether the body so far is signed with `digest` under one of the secrets. Compared in
    /// constant time.
    pub fn verify(self, digest: &[u8; 32]) -> bool {
        self.0.into_iter().any(|mac| mac.verify_slice(digest).is_ok())
    }
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
        let signed = |secrets: &[SecretString], chunks: &[&[u8]], signature: &str| {
            let Some(digest) = parse_signature(signature.as_bytes()) else { return false };
            let mut signer = Signer::new(secrets);
            chunks.iter().for_each(|chunk| signer.update(chunk));
            signer.verify(&digest)
        };
        assert!(signed(&secrets, &[body], &good));
        assert!(signed(&secrets, &[&body[..5], &body[5..]], &good), "a body read in chunks");
        assert!(!signed(&secrets, &[b"{}"], &good));
        assert!(!signed(&secrets[..1], &[body], &good));
        assert!(!signed(&secrets, &[body], "sha1=abc"));
        assert!(!signed(&secrets, &[body], "sha256=zz"));
        assert!(!signed(&secrets, &[body], &good[..good.len() - 2]), "a digest too short");
        assert!(parse_signature(format!("{good}00").as_bytes()).is_none(), "a digest too long");
    }
}
