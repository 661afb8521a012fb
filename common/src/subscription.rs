//! A git job's subscription to its repository's events on GitHub: which repository webhooks are
//! matched on, which pull requests and pushes start the job, and whom it trusts.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GithubSubscription {
    /// `owner/name` as GitHub's webhooks name it (the clone URL may be a mirror).
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "octo-org/hello"))]
    pub repository: RepoFullName,
    /// Pull requests into these base branches run the job at their head commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_requests: Option<BranchFilter>,
    /// Pushes to these branches run the job at the pushed commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<BranchFilter>,
    /// GitHub logins whose pull requests run without approval, besides the repository's owners,
    /// members and collaborators.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_users: Vec<String>,
    /// Runs of pull requests from forks get the job's secrets too. Off by default: a fork's code
    /// is whatever its author wrote.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secrets_for_forks: bool,
    /// Pull requests from forks may build their own image (`build:`). Off by default: the fork's
    /// Dockerfile pulls its `FROM` with the agents' registry credentials.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub builds_for_forks: bool,
}

impl GithubSubscription {
    /// Whether `login`, with GitHub's `author_association`, is trusted to run the job.
    pub fn trusts(&self, login: &str, association: &str) -> bool {
        matches!(association, "OWNER" | "MEMBER" | "COLLABORATOR")
            || self.trusted_users.iter().any(|user| user.eq_ignore_ascii_case(login))
    }
}

/// Branch globs: `*` matches any run of characters, `/` included (`release-*`, `feature/*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BranchFilter {
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>, example = json!(["main", "release-*"])))]
    pub branches: Vec<BranchGlob>,
}

impl BranchFilter {
    pub fn matches(&self, branch: &str) -> bool {
        self.branches.iter().any(|glob| glob.matches(branch))
    }
}

#[derive(Clone, PartialEq)]
pub struct BranchGlob(String);

impl BranchGlob {
    /// 1 to 255 characters of letters, digits, `-`, `_`, `.`, `/` and at most four `*`.
    pub fn parse(glob: &str) -> Result<Self, String> {
        let ok = !glob.is_empty()
            && glob.len() <= 255
            && glob.matches('*').count() <= 4
            && glob.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b'*'));
        if ok {
            Ok(BranchGlob(glob.to_owned()))
        } else {
            Err(format!(
                "branch pattern `{glob}` must be 1 to 255 characters of letters, digits, `-`, `_`, `.`, `/` and at most four `*`"
            ))
        }
    }

    pub fn matches(&self, branch: &str) -> bool {
        glob_matches(self.0.as_bytes(), branch.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `*` matches any run of bytes; everything else matches itself.
pub(crate) fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_matches(rest, &text[skip..])),
        Some((byte, rest)) => text.first() == Some(byte) && glob_matches(rest, &text[1..]),
    }
}

impl fmt::Debug for BranchGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for BranchGlob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BranchGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let glob = String::deserialize(d)?;
        BranchGlob::parse(&glob).map_err(de::Error::custom)
    }
}

/// A repository as GitHub names it, `owner/name`; compared without regard to case, as GitHub does.
#[derive(Clone)]
pub struct RepoFullName(String);

impl RepoFullName {
    /// `owner/name`: each part 1 to 100 letters, digits, `-`, `_` or `.`, and not `.` or `..`
    /// (nothing that could change a URL's path).
    pub fn parse(name: &str) -> Result<Self, String> {
        let part = |part: &str| {
            !part.is_empty()
                && part.len() <= 100
                && part != "."
                && part != ".."
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        match name.split_once('/') {
            Some((owner, repo)) if part(owner) && part(repo) => Ok(RepoFullName(name.to_owned())),
            _ => Err(format!("repository `{name}` must be `owner/name` as GitHub names it")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

impl PartialEq for RepoFullName {
    fn eq(&self, other: &Self) -> bool {
        self.is(&other.0)
    }
}

impl fmt::Debug for RepoFullName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for RepoFullName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RepoFullName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RepoFullName::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_branches() {
        let filter: BranchFilter = serde_json::from_str(r#"{"branches": ["main", "release-*", "team/*/ci"]}"#).unwrap();
        assert!(filter.matches("main"));
        assert!(filter.matches("release-1.2"));
        assert!(filter.matches("team/a/b/ci"));
        assert!(!filter.matches("mainline"));
        assert!(!filter.matches("release"));
        let bad = serde_json::from_str::<BranchFilter>(r#"{"branches": ["ma in"]}"#).unwrap_err();
        assert!(bad.to_string().contains("branch pattern `ma in`"), "{bad}");
    }

    #[test]
    fn repositories_and_trust() {
        let sub: GithubSubscription =
            serde_json::from_str(r#"{"repository": "Octo-Org/hello", "trustedUsers": ["Bot"]}"#).unwrap();
        assert!(sub.repository.is("octo-org/HELLO"));
        assert!(sub.trusts("someone", "MEMBER"));
        assert!(sub.trusts("bot", "NONE"));
        assert!(!sub.trusts("stranger", "CONTRIBUTOR"));
        let bad = serde_json::from_str::<GithubSubscription>(r#"{"repository": "https://github.com/a/b"}"#);
        assert!(bad.unwrap_err().to_string().contains("must be `owner/name`"));
    }
}
