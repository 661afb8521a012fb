//! The job's secrets: read sealed from Postgres, opened with the agent's key, handed to the job one
//! env var each — those whose scope (branches, events) admits the run; the console says which were
//! withheld and why. A missing one fails the run before anything starts. The masker hides every
//! value (and its encoded forms) in all output of the attempt.

use std::collections::HashMap;

use cimaster_common::secrets::Masker;
use cimaster_common::{EnvName, SecretScope};
use secrecy::{ExposeSecret, SecretString};

use super::{Attempt, AttemptError, Stop};
use crate::plan::Plan;
use cimaster_store::{repository_tokens, secrets};

type Values = HashMap<String, SecretString>;

/// Where the code host's repository token sits among the opened secrets: not a name a secret can
/// have.
pub(super) const REPOSITORY_TOKEN: &str = "cimaster:repository-token";

impl Attempt<'_> {
    /// Opens the job's secrets and the checkout's credentials; the job's go into its environment,
    /// all are returned for the checkout to pick its credentials from.
    pub(super) async fn open_secrets(&mut self, plan: &Plan) -> Result<HashMap<String, SecretString>, Stop> {
        if !plan.withheld.is_empty() {
            let names: Vec<String> = plan.withheld.iter().map(ToString::to_string).collect();
            let note = format!(
                "secrets {} withheld: the pull request comes from a fork (the job's github.secretsForForks is off)",
                names.join(", ")
            );
            self.console.note(&note).await;
        }
        let mut names = plan.secrets.clone();
        if let Some(checkout) = &plan.checkout {
            names.extend(checkout.token_secret.iter().chain(&checkout.ssh_key_secret).cloned());
        }
        let (mut values, scopes) = self.interrupts.step(self.decrypt(&names)).await??;
        if let Some(repository) = plan.checkout.as_ref().and_then(|checkout| checkout.host_repository.as_ref()) {
            if let Some(token) = self.interrupts.step(self.repository_token(repository)).await?? {
                values.insert(REPOSITORY_TOKEN.to_owned(), token);
            }
        }
        self.masker = Masker::new(values.values().map(|value| value.expose_secret()));
        self.env = plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for name in &plan.secrets {
            let scope = scopes.get(name.as_str()).cloned().unwrap_or_default();
            if let Err(why) = scope.admits(self.claim.cause.event, &self.claim.tip_of) {
                self.console.note(&format!("secret {name} withheld: {why}")).await;
                continue;
            }
            if let Some(value) = values.get(name.as_str()) {
                self.env.push(format!("{name}={}", value.expose_secret()));
            }
        }
        Ok(values)
    }

    /// The code host's token for the repository, as the master keeps it.
    async fn repository_token(&self, repository: &str) -> Result<Option<SecretString>, AttemptError> {
        let Some(key) = self.executor.secrets.as_ref() else { return Ok(None) };
        let token = repository_tokens::open(&self.executor.pool, key, repository).await;
        Ok(token.map_err(secrets::OpenError::from)?)
    }

    /// The secrets' values, and their scopes.
    async fn decrypt(&self, names: &[EnvName]) -> Result<(Values, HashMap<String, SecretScope>), AttemptError> {
        if names.is_empty() {
            return Ok(Default::default());
        }
        let job = &self.claim.job;
        let key = self.executor.secrets.as_ref().ok_or(AttemptError::NoSecretsKey)?;
        let wanted: Vec<String> = names.iter().map(ToString::to_string).collect();
        let opened = secrets::open(&self.executor.pool, key, job, &wanted).await?;
        let mut values = HashMap::new();
        let mut scopes = HashMap::new();
        for (name, value, scope) in opened {
            values.insert(name.clone(), value);
            scopes.insert(name, scope);
        }
        Ok((values, scopes))
    }
}
