//! Git runs: resolving the trigger's branch to a commit and reading the job config file there, with
//! the job's repository credentials. Every problem with the repository or the file is the trigger's.

use cimaster_common::secrets::SecretBox;
use cimaster_common::{Cause, EnvName, GitJob, JobName, RepoConfig, RunEvent, TriggerRequest};
use cimaster_store::repository_tokens;
use cimaster_store::secrets::{self, OpenError};
use secrecy::SecretString;
use sqlx::PgPool;

use super::{TriggerError, Triggers};
use crate::repo::{Credentials, RepoError};

/// The commit a git run builds, the job config file read there, and the branches whose tip the
/// commit is (what branch-limited secrets are judged against).
pub struct Resolved {
    pub commit: String,
    pub config: RepoConfig,
    pub tip_of: Vec<String>,
}

impl Triggers {
    pub(super) async fn resolve(&self, trigger: &super::Trigger<'_>, git: &GitJob) -> Result<Resolved, TriggerError> {
        let (job, request, cause) = (trigger.job, trigger.request, trigger.cause);
        let mut creds = credentials(&self.pool, self.secrets.as_ref(), job, git).await?;
        if let (None, Some(github)) = (&creds.token, &git.github) {
            creds.token = self.repository_token(github.repository.as_str()).await?;
        }
        let url = git.repository.as_str();
        let invalid = |err: RepoError| TriggerError::Invalid(format!("repository {url}: {err}"));
        let commit = match (&request.commit_sha, &request.branch_name) {
            (Some(sha), _) => sha.as_str().to_owned(),
            (None, Some(branch)) => self.repos.resolve_branch(url, branch.as_str(), &creds).await.map_err(invalid)?,
            (None, None) => return Err(TriggerError::Invalid(format!("git job `{job}` needs a commit or a branch"))),
        };
        let path = git.config_path.as_str();
        // A pull request's head (a fork's too) is kept by the base repository under this ref.
        let pull_ref = cause.pull_request.map(|number| format!("refs/pull/{number}/head"));
        let text =
            self.repos.read_file(url, &commit, pull_ref.as_deref(), path, &creds).await.map_err(invalid)?.ok_or_else(
                || TriggerError::Invalid(format!("job config file `{path}` does not exist at commit {commit}")),
            )?;
        let config = RepoConfig::parse(&text)
            .map_err(|err| TriggerError::Invalid(format!("job config file `{path}` at commit {commit}, {err}")))?;
        if config.timeout_seconds > self.max_timeout_seconds {
            return Err(TriggerError::Invalid(format!(
                "job config file `{path}` at commit {commit}: timeoutSeconds {} is above this installation's maximum of {}",
                config.timeout_seconds, self.max_timeout_seconds
            )));
        }
        if let Some(name) = config.secrets.iter().find(|name| !git.secrets.contains(name)) {
            return Err(TriggerError::Invalid(format!(
                "job config file `{path}` at commit {commit} asks for secret `{name}`, which job `{job}` does not \
                 allow: list it in the job's `secrets`"
            )));
        }
        git.admits(job.as_str(), &config, cause.from_fork)
            .map_err(|why| TriggerError::Invalid(format!("job config file `{path}` at commit {commit}: {why}")))?;
        let tip_of = match trigger.pushed_branch {
            Some(branch) => vec![branch.to_owned()],
            None => self.tip_of(job, url, &commit, request, cause, &creds).await.map_err(invalid)?,
        };
        Ok(Resolved { commit, config, tip_of })
    }

    /// The branches whose tip the run's commit is, as far as it matters (a signed push's branch
    /// aside): a branch the trigger named and resolved now, or whose tip is the commit asked for. A
    /// pull request's run is on no branch (its head's name is the author's to choose). A commit
    /// asked for alone is looked up among the branches only when some secret of the job is limited
    /// to branches.
    async fn tip_of(
        &self,
        job: &JobName,
        url: &str,
        commit: &str,
        request: &TriggerRequest,
        cause: &Cause,
        creds: &Credentials,
    ) -> Result<Vec<String>, RepoError> {
        if matches!(cause.event, RunEvent::PullRequest | RunEvent::Comment) {
            return Ok(Vec::new());
        }
        match (&request.commit_sha, &request.branch_name) {
            (None, Some(branch)) => Ok(vec![branch.as_str().to_owned()]),
            (Some(_), Some(branch)) => {
                let tip = self.repos.resolve_branch(url, branch.as_str(), creds).await;
                Ok(if tip.is_ok_and(|tip| tip.eq_ignore_ascii_case(commit)) {
                    vec![branch.as_str().to_owned()]
                } else {
                    Vec::new()
                })
            }
            (Some(_), None) if secrets::any_limited_to_branches(&self.pool, job).await.unwrap_or(true) => {
                self.repos.branches_at(url, commit, creds).await
            }
            _ => Ok(Vec::new()),
        }
    }
}

impl Triggers {
    /// The code host's token for a subscribed repository (a GitHub App's installation token), kept
    /// sealed in the database too, for agents to clone with.
    pub async fn repository_token(&self, repository: &str) -> Result<Option<SecretString>, TriggerError> {
        let Some(host) = &self.host else { return Ok(None) };
        let token = host
            .repository_token(repository)
            .await
            .map_err(|err| TriggerError::Invalid(format!("GitHub gives no token for {repository}: {err}")))?;
        let Some(token) = token else { return Ok(None) };
        if let Some(key) = &self.secrets {
            repository_tokens::store(&self.pool, key, repository, &token.value, token.expires_at).await?;
        }
        Ok(Some(token.value))
    }
}

/// The job's repository credentials, decrypted from its secrets.
async fn credentials(
    pool: &PgPool,
    secret_box: Option<&SecretBox>,
    job: &JobName,
    git: &GitJob,
) -> Result<Credentials, TriggerError> {
    let mut creds = Credentials { known_hosts: git.ssh_known_hosts.clone(), ..Credentials::default() };
    let names: Vec<String> = git.credential_secrets().map(ToString::to_string).collect();
    if names.is_empty() {
        return Ok(creds);
    }
    let secret_box = secret_box.ok_or_else(|| {
        TriggerError::Invalid(format!(
            "job `{job}` reads its repository with secrets, but this server has no CIMASTER_SECRETS_KEY"
        ))
    })?;
    let opened = secrets::open(pool, secret_box, job.as_str(), &names).await.map_err(|err| match err {
        OpenError::Database(err) => TriggerError::Database(err),
        OpenError::NotSet { .. } => TriggerError::Invalid(err.to_string()),
        OpenError::Unreadable { .. } => TriggerError::Internal(err.into()),
    })?;
    let value =
        |name: &EnvName| opened.iter().find(|(stored, ..)| stored == name.as_str()).map(|(_, value, _)| value.clone());
    creds.token = git.token_secret.as_ref().and_then(value);
    creds.ssh_key = git.ssh_key_secret.as_ref().and_then(value);
    Ok(creds)
}
