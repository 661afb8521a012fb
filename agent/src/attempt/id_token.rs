//! The run's OIDC ID token, for a job that asks for one (`idToken: {audience: …}`): signed here,
//! when the attempt's own time starts, with the key that signs now (the master makes and rotates
//! the keys; the private key is sealed with the secrets key this agent already holds for job
//! secrets, so signing here widens nothing an agent holds). The claims name the run — repository,
//! branch, commit, job, run, attempt, event, who triggered it and whether its code is a fork's —
//! and the issuer stored with the key, so the agent needs no URL of its own. The token lives for
//! the attempt's timeout, at most [`MAX_LIFETIME_SECONDS`]; it reaches the job as
//! `CIMASTER_ID_TOKEN` and the masker hides it like a secret. A fork's pull request gets none
//! unless the job's secrets reach forks (`secretsForForks`).

use std::collections::HashMap;
use std::time::Duration;

use cimaster_common::id_token::{IdTokenClaims, ID_TOKEN_ENV, MAX_LIFETIME_SECONDS};
use cimaster_common::secrets::Masker;
use cimaster_common::{IdTokenSpec, JobSpec};
use cimaster_store::attempts::Claim;
use cimaster_store::oidc_keys::{self, SigningKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};

use super::{Attempt, AttemptError, Stop};
use crate::plan::Plan;

impl Attempt<'_> {
    /// Signs the run's token, if its job asks for one, and hands it to the job; `secrets` are the
    /// values masked so far, masked with it.
    pub(super) async fn issue_id_token(
        &mut self,
        plan: &Plan,
        secrets: &HashMap<String, SecretString>,
        lifetime: Duration,
    ) -> Result<(), Stop> {
        if plan.id_token_withheld {
            self.console
                .note("ID token withheld: the pull request comes from a fork (the job's github.secretsForForks is off)")
                .await;
        }
        let Some(spec) = &plan.id_token else { return Ok(()) };
        let box_ = self.executor.secrets.as_ref().ok_or(AttemptError::IdToken(NO_KEY.into()))?;
        let key = self.interrupts.step(oidc_keys::signing(&self.executor.pool, box_)).await?;
        let key = key.map_err(|err| AttemptError::IdToken(err.to_string()))?;
        let key = key.ok_or(AttemptError::IdToken(NO_KEY.into()))?;
        let lifetime = lifetime.min(Duration::from_secs(MAX_LIFETIME_SECONDS));
        let claims = claims(self.claim, spec, &key.issuer, chrono::Utc::now().timestamp(), lifetime);
        let token = sign(&key, &claims).map_err(AttemptError::IdToken)?;
        self.masker = Masker::new(secrets.values().map(|value| value.expose_secret()).chain([token.as_str()]));
        self.env.push(format!("{ID_TOKEN_ENV}={token}"));
        let note = format!(
            "ID token for audience {} in {ID_TOKEN_ENV}: subject {}, valid for {}s (key {})",
            claims.aud,
            claims.sub,
            lifetime.as_secs(),
            key.kid
        );
        self.console.note(&note).await;
        Ok(())
    }
}

const NO_KEY: &str = "the job asks for an ID token, but this installation issues none: the master needs \
                      CIMASTER_PUBLIC_URL and CIMASTER_SECRETS_KEY, and the agent CIMASTER_SECRETS_KEY";

/// The claims of the token for the claimed attempt, issued at `now` (seconds since the epoch).
fn claims(claim: &Claim, spec: &IdTokenSpec, issuer: &str, now: i64, lifetime: Duration) -> IdTokenClaims {
    let repository = match &claim.spec {
        JobSpec::Freestyle(_) => None,
        JobSpec::Git(git) => Some(claim.cause.repository.clone().unwrap_or_else(|| git.repository.to_string())),
    };
    let git_ref = repository.as_ref().and_then(|_| claim.tip_of.first().cloned());
    IdTokenClaims {
        iss: issuer.to_owned(),
        sub: IdTokenClaims::subject(repository.as_deref(), git_ref.as_deref(), &claim.job),
        aud: spec.audience.clone(),
        iat: now,
        nbf: now,
        exp: now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
        jti: format!("{}:{}", claim.run, claim.attempt),
        repository,
        git_ref,
        commit: claim.commit.clone(),
        job: claim.job.clone(),
        run_id: claim.run.to_string(),
        attempt: claim.attempt,
        event: claim.cause.event,
        triggered_by: claim.triggered_by.clone(),
        from_fork: claim.cause.from_fork,
    }
}

fn sign(key: &SigningKey, claims: &IdTokenClaims) -> Result<String, String> {
    let pem = EncodingKey::from_rsa_pem(key.private_pem.expose_secret().as_bytes())
        .map_err(|err| format!("the ID token signing key {} is not an RSA key: {err}", key.kid))?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &pem).map_err(|err| format!("signing the ID token failed: {err}"))
}

#[cfg(test)]
mod tests {
    use cimaster_common::{Cause, RunEvent, RunId};

    use super::*;

    fn claim(spec: serde_json::Value, cause: Cause, tip_of: &[&str]) -> Claim {
        Claim {
            run: RunId(uuid::Uuid::nil()),
            job: "deploy".to_owned(),
            attempt: 2,
            spec: serde_json::from_value(spec).unwrap(),
            parameters: Default::default(),
            commit: Some("a".repeat(40)),
            config: None,
            cause,
            tip_of: tip_of.iter().map(|branch| (*branch).to_owned()).collect(),
            triggered_by: "alice".to_owned(),
            granted: tokio::time::Instant::now(),
        }
    }

    fn audience() -> IdTokenSpec {
        IdTokenSpec { audience: "sts.amazonaws.com".to_owned() }
    }

    #[test]
    fn a_git_run_on_a_branch_names_its_repository_and_branch() {
        let git = serde_json::json!({"kind": "git", "repository": "https://git.example/org/app.git"});
        let cause = Cause { event: RunEvent::Push, repository: Some("org/app".to_owned()), ..Default::default() };
        let claims =
            claims(&claim(git, cause, &["main", "release"]), &audience(), "https://ci", 1000, Duration::from_secs(600));
        assert_eq!(claims.sub, "repo:org/app:ref:main:job:deploy");
        assert_eq!((claims.iat, claims.nbf, claims.exp), (1000, 1000, 1600));
        assert_eq!(claims.jti, format!("{}:2", uuid::Uuid::nil()));
        assert_eq!((claims.aud.as_str(), claims.iss.as_str()), ("sts.amazonaws.com", "https://ci"));
        assert_eq!((claims.event, claims.triggered_by.as_str(), claims.from_fork), (RunEvent::Push, "alice", false));
        assert_eq!(claims.commit.as_deref(), Some("a".repeat(40).as_str()));
    }

    #[test]
    fn a_fork_pull_request_is_on_no_branch_and_says_so() {
        let git = serde_json::json!({"kind": "git", "repository": "https://git.example/org/app.git"});
        let cause = Cause { event: RunEvent::PullRequest, from_fork: true, ..Default::default() };
        let claims = claims(&claim(git, cause, &[]), &audience(), "https://ci", 0, Duration::from_secs(60));
        assert_eq!(claims.sub, "repo:https://git.example/org/app.git:job:deploy");
        assert_eq!(claims.git_ref, None);
        assert!(claims.from_fork);
    }

    #[test]
    fn a_freestyle_run_names_its_job_only() {
        let freestyle = serde_json::json!({"kind": "freestyle", "image": "busybox:latest", "script": "true"});
        let claims = claims(
            &claim(freestyle, Cause::default(), &["main"]),
            &audience(),
            "https://ci",
            0,
            Duration::from_secs(60),
        );
        assert_eq!(claims.sub, "job:deploy");
        assert_eq!((claims.repository, claims.git_ref), (None, None));
    }
}
