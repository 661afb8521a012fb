//! Id and name newtypes. Each one validates on construction, so a value of the type is always valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a value was refused, phrased for the person who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {reason}")]
pub struct InvalidValue {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl InvalidValue {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        let mut value = value.to_owned();
        if value.len() > 80 {
            let mut cut = 80;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self { what, value, reason }
    }
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $validate:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, InvalidValue> {
                $validate(value).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(value: &str) -> Result<Self, InvalidValue> {
                Self::parse(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A job's name: 1–63 characters of `a-z`, `0-9`, `-`, `_` and `.`, starting with a letter or digit.
    /// It appears in URLs, container labels and queue messages, so it is kept to that safe alphabet.
    JobName,
    validate_job_name
);

string_newtype!(
    /// A resource class: the RabbitMQ queue a job's runs go to (`default` unless the job says otherwise).
    QueueName,
    validate_queue_name
);

string_newtype!(
    /// A full git commit id: 40 hex digits (SHA-1) or 64 (SHA-256), stored in lower case.
    CommitSha,
    validate_commit_sha
);

string_newtype!(
    /// A git branch name, following `git check-ref-format --branch` rules.
    BranchName,
    validate_branch_name
);

string_newtype!(
    /// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 characters, not `CIMASTER_*`
    /// (that prefix is reserved for what CIMaster injects into every run).
    EnvName,
    validate_env_name
);

string_newtype!(
    /// Where a git job's repository lives: `https://`, `http://`, `ssh://`, `git://` or `file://` URL, or
    /// scp-like `user@host:path`.
    RepositoryUrl,
    validate_repository_url
);

string_newtype!(
    /// The path of a git job's config file inside its repository: relative, without `..`.
    ConfigPath,
    validate_config_path
);

impl QueueName {
    pub fn default_queue() -> Self {
        Self("default".to_owned())
    }
}

impl Default for QueueName {
    fn default() -> Self {
        Self::default_queue()
    }
}

fn validate_slug(what: &'static str, value: &str) -> Result<String, InvalidValue> {
    if value.is_empty() {
        return Err(InvalidValue::new(what, value, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(InvalidValue::new(what, value, "must be at most 63 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(InvalidValue::new(what, value, "use only lower-case letters, digits, `-`, `_` and `.`"));
    }
    if !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(InvalidValue::new(what, value, "must start with a letter or digit"));
    }
    Ok(value.to_owned())
}

fn validate_job_name(value: &str) -> Result<String, InvalidValue> {
    validate_slug("job name", value)
}

fn validate_queue_name(value: &str) -> Result<String, InvalidValue> {
    validate_slug("queue name", value)
}

fn validate_commit_sha(value: &str) -> Result<String, InvalidValue> {
    const WHAT: &str = "commit SHA";
    if value.len() != 40 && value.len() != 64 {
        return Err(InvalidValue::new(
            WHAT,
            value,
            "give the full commit id: 40 hex digits (or 64 for SHA-256 repositories)",
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InvalidValue::new(WHAT, value, "must contain only hex digits 0-9 and a-f"));
    }
    Ok(value.to_ascii_lowercase())
}

fn validate_branch_name(value: &str) -> Result<String, InvalidValue> {
    const WHAT: &str = "branch name";
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > 255 {
        Some("must be at most 255 characters")
    } else if value.starts_with('-') {
        Some("must not start with `-`")
    } else if value.starts_with('/') || value.ends_with('/') || value.contains("//") {
        Some("must not start or end with `/` or contain `//`")
    } else if value.ends_with('.') || value.ends_with(".lock") {
        Some("must not end with `.` or `.lock`")
    } else if value.contains("..") || value.contains("@{") || value == "@" {
        Some("must not contain `..` or `@{` or be `@`")
    } else if value.split('/').any(|part| part.starts_with('.')) {
        Some("no path component may start with `.`")
    } else if value.chars().any(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')) {
        Some("must not contain spaces, control characters or any of ~ ^ : ? * [ \\")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidValue::new(WHAT, value, reason)),
        None => Ok(value.to_owned()),
    }
}

fn validate_env_name(value: &str) -> Result<String, InvalidValue> {
    const WHAT: &str = "variable name";
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 128 {
        return Err(InvalidValue::new(WHAT, value, "must be 1 to 128 characters"));
    }
    if !(bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        || !bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        return Err(InvalidValue::new(WHAT, value, "use letters, digits and `_`, not starting with a digit"));
    }
    if value.to_ascii_uppercase().starts_with("CIMASTER_") {
        return Err(InvalidValue::new(WHAT, value, "the `CIMASTER_` prefix is reserved"));
    }
    Ok(value.to_owned())
}

fn validate_repository_url(value: &str) -> Result<String, InvalidValue> {
    const WHAT: &str = "repository";
    if value.is_empty() || value.len() > 2048 {
        return Err(InvalidValue::new(WHAT, value, "must be 1 to 2048 characters"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidValue::new(WHAT, value, "must not contain whitespace"));
    }
    let url_like = ["https://", "http://", "ssh://", "git://", "file://"]
        .iter()
        .any(|scheme| value.len() > scheme.len() && value.starts_with(scheme));
    let scp_like = match value.split_once(':') {
        Some((host, path)) => !host.is_empty() && !host.contains('/') && !path.is_empty() && !path.starts_with("//"),
        None => false,
    };
    if !(url_like || scp_like) {
        return Err(InvalidValue::new(
            WHAT,
            value,
            "use an https://, http://, ssh://, git:// or file:// URL, or user@host:path",
        ));
    }
    if let Some(reason) = credentials_in_url(value) {
        // Never echo the value: it holds a credential.
        return Err(InvalidValue { what: WHAT, value: "(redacted)".into(), reason });
    }
    Ok(value.to_owned())
}

/// Why a repository URL carries a credential, if it does: any user in an http(s) or git URL (a
/// token, often), a password in any URL. Credentials belong in the job's `tokenSecret` or
/// `sshKeySecret`, which are encrypted and never shown.
fn credentials_in_url(value: &str) -> Option<&'static str> {
    let (scheme, rest) = value.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, _) = authority.rsplit_once('@')?;
    if userinfo.contains(':') {
        Some("must not hold a password (`user:password@`); put a token in the job's `tokenSecret` instead")
    } else if scheme != "ssh" {
        Some("must not hold a user or token (`token@`); put the token in the job's `tokenSecret` instead")
    } else {
        None
    }
}

fn validate_config_path(value: &str) -> Result<String, InvalidValue> {
    const WHAT: &str = "config path";
    if value.is_empty() || value.len() > 1024 {
        return Err(InvalidValue::new(WHAT, value, "must be 1 to 1024 characters"));
    }
    if value.starts_with('/') || value.split('/').any(|part| part == ".." || part.is_empty()) {
        return Err(InvalidValue::new(
            WHAT,
            value,
            "must be a relative path inside the repository, without `..` or empty components",
        ));
    }
    if value.chars().any(|c| c.is_control() || c == '\\') {
        return Err(InvalidValue::new(WHAT, value, "must not contain control characters or `\\`"));
    }
    Ok(value.to_owned())
}

/// A run's id. Version 7 UUIDs, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct RunId(pub Uuid);

impl RunId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RunId {
    type Err = InvalidValue;
    fn from_str(value: &str) -> Result<Self, InvalidValue> {
        Uuid::parse_str(value).map(Self).map_err(|_| InvalidValue::new("run id", value, "must be a UUID"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names() {
        for ok in ["unit-test", "e2e", "a", "build_1.2", "0day"] {
            assert!(JobName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Unit", "-x", ".x", "a b", "a/b", "ünit", &"x".repeat(64)] {
            let err = JobName::parse(bad).unwrap_err();
            assert_eq!(err.what, "job name", "{bad}");
        }
    }

    #[test]
    fn commit_shas_are_full_and_lower_case() {
        let sha = CommitSha::parse("ABCDEF0123456789abcdef0123456789ABCDEF01").unwrap();
        assert_eq!(sha.as_str(), "abcdef0123456789abcdef0123456789abcdef01");
        assert!(CommitSha::parse(&"a".repeat(64)).is_ok());
        assert!(CommitSha::parse("abc123").unwrap_err().reason.contains("40 hex"));
        assert!(CommitSha::parse(&"g".repeat(40)).unwrap_err().reason.contains("hex"));
    }

    #[test]
    fn branch_names_follow_git_rules() {
        for ok in ["master", "feature/x-1", "release-1.2", "user@host"] {
            assert!(BranchName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-x", "/x", "x/", "a//b", "a..b", "x.lock", "x.", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
            "@", "a@{1}", ".hidden", "a/.b",
        ] {
            assert!(BranchName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repositories_and_config_paths() {
        for ok in ["https://git.example/org/repo.git", "git@github.com:org/repo.git", "git://h/r"] {
            assert!(RepositoryUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "repo", "https://", "ftp://x/y", "https://a b"] {
            assert!(RepositoryUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(RepositoryUrl::parse("ssh://git@git.example/org/repo.git").is_ok());
        for leaky in [
            "https://alice:hunter2@git.example/org/repo.git",
            "https://ghp_token123@git.example/org/repo.git",
            "http://x-access-token:ghp_token123@git.example/r",
            "ssh://git:hunter2@git.example/r",
            "git://u:hunter2@h/r",
        ] {
            let err = RepositoryUrl::parse(leaky).unwrap_err().to_string();
            assert!(!err.contains("hunter2") && !err.contains("ghp_token123"), "{err}");
            assert!(err.contains("tokenSecret"), "{err}");
        }
        assert!(ConfigPath::parse(".cimaster.yml").is_ok());
        assert!(ConfigPath::parse("ci/job.yml").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a//b", "a/../../b"] {
            assert!(ConfigPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_names() {
        assert!(EnvName::parse("TARGET").is_ok());
        assert!(EnvName::parse("_x1").is_ok());
        assert!(EnvName::parse("1X").is_err());
        assert!(EnvName::parse("A-B").is_err());
        assert!(EnvName::parse("CIMASTER_RUN_ID").unwrap_err().reason.contains("reserved"));
        assert!(EnvName::parse("cimaster_x").is_err());
    }

    #[test]
    fn newtypes_deserialize_through_validation() {
        let err = serde_json::from_str::<JobName>("\"Bad Name\"").unwrap_err();
        assert!(err.to_string().contains("invalid job name `Bad Name`"), "{err}");
        let ok: QueueName = serde_json::from_str("\"gpu\"").unwrap();
        assert_eq!(ok.as_str(), "gpu");
    }

    #[test]
    fn run_ids_parse_and_sort_by_time() {
        let a = RunId::new();
        let b = RunId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<RunId>().unwrap(), a);
        assert!("12345".parse::<RunId>().is_err());
    }
}
