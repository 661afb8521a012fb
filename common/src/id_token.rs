//! OIDC ID tokens for runs: what a job asks for (`idToken: {audience: …}`) and the claims of the
//! token its run gets in `CIMASTER_ID_TOKEN`.
//!
//! The token says which run holds it — repository, branch, commit, job, run, attempt, event, who
//! triggered it and whether its code came from a fork — signed by the installation's current key
//! (published at `/.well-known/jwks.json`). A cloud or Vault trusts the installation as an identity
//! provider and grants a role to the claims it names, so no long-lived key is stored in CI.

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::cause::RunEvent;

/// The variable a run's token reaches the job in.
pub const ID_TOKEN_ENV: &str = "CIMASTER_ID_TOKEN";

/// The longest a token is valid: it is made when the attempt starts and lives for the attempt's
/// timeout, but no longer than this — a leaked token is worth an hour at most.
pub const MAX_LIFETIME_SECONDS: u64 = 3600;

const MAX_AUDIENCE: usize = 256;

/// `idToken`: the run gets an ID token for this audience.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdTokenSpec {
    /// The token's `aud`: whom the job shows it to, e.g. `sts.amazonaws.com` or a Vault address.
    #[serde(deserialize_with = "audience")]
    pub audience: String,
}

fn audience<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    if value.is_empty() || value.len() > MAX_AUDIENCE || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(de::Error::custom(format!(
            "idToken.audience must be 1 to {MAX_AUDIENCE} characters without spaces (e.g. `sts.amazonaws.com`)"
        )));
    }
    Ok(value)
}

/// The claims of a run's ID token. The standard ones (`iss` … `jti`), then the run's own, named as
/// JWT claims usually are (snake case).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdTokenClaims {
    /// The installation's public URL (`CIMASTER_PUBLIC_URL`), where its discovery document is.
    pub iss: String,
    /// `repo:<repository>:ref:<branch>:job:<job>` for a git run on a branch,
    /// `repo:<repository>:job:<job>` for one on no branch, `job:<job>` for a freestyle run.
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Unique per token: `<run>:<attempt>`.
    pub jti: String,
    /// The code host's `owner/name` when the run came from it, else the git job's repository URL;
    /// none for a freestyle run.
    pub repository: Option<String>,
    /// The branch whose tip the commit was when the run was created (the first, if several); none
    /// for a pull request's run or a commit that is no branch's tip.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The commit a git run checked out.
    pub commit: Option<String>,
    pub job: String,
    pub run_id: String,
    pub attempt: u32,
    pub event: RunEvent,
    /// Who triggered the run: a token's subject, `schedule`, or the code host's sender.
    pub triggered_by: String,
    /// The run's code is a fork's pull request: not the repository's own.
    pub from_fork: bool,
}

impl IdTokenClaims {
    /// The `sub` of a run of `job`: the repository and branch first, so that a trust policy can
    /// match on their prefix.
    pub fn subject(repository: Option<&str>, git_ref: Option<&str>, job: &str) -> String {
        match (repository, git_ref) {
            (Some(repository), Some(git_ref)) => format!("repo:{repository}:ref:{git_ref}:job:{job}"),
            (Some(repository), None) => format!("repo:{repository}:job:{job}"),
            (None, _) => format!("job:{job}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audience_is_one_word() {
        let spec: IdTokenSpec = serde_json::from_str(r#"{"audience": "sts.amazonaws.com"}"#).unwrap();
        assert_eq!(spec.audience, "sts.amazonaws.com");
        for bad in [r#"{"audience": ""}"#, r#"{"audience": "a b"}"#, r#"{"audience": "x", "scope": "y"}"#, "{}"] {
            assert!(serde_json::from_str::<IdTokenSpec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_subject_names_repository_branch_and_job() {
        assert_eq!(IdTokenClaims::subject(Some("org/app"), Some("main"), "deploy"), "repo:org/app:ref:main:job:deploy");
        assert_eq!(IdTokenClaims::subject(Some("org/app"), None, "deploy"), "repo:org/app:job:deploy");
        assert_eq!(IdTokenClaims::subject(None, None, "unit"), "job:unit");
    }
}
