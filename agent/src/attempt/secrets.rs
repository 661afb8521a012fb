//! The job's secrets: read sealed from Postgres, opened with the agent's key, handed to the job one
//! env var each. A missing one fails the run before anything starts. The masker hides every value
//! (and its base64 form) in all output of the attempt.

use std::collections::HashMap;

use cimaster_common::secrets::Masker;
use cimaster_common::EnvName;
use secrecy::{ExposeSecret, SecretString};

use super::{Attempt, AttemptError, Stop};
use crate::plan::Plan;
use cimaster_store::secrets;

impl Attempt<'_> {
    /// Opens the job's secrets and the checkout's credentials; the job's go into its environment,
    /// all are returned for the checkout to pick its credentials from.
    pub(super) async fn open_secrets(&mut self, plan: &Plan) -> Result<HashMap<String, SecretString>, Stop> {
        let mut names = plan.secrets.clone();
        if let Some(checkout) = &plan.checkout {
            names.extend(checkout.token_secret.iter().chain(&checkout.ssh_key_secret).cloned());
        }
        let values = self.interrupts.step(self.decrypt(&names)).await??;
        self.masker = Masker::new(values.values().map(|value| value.expose_secret()));
        self.env = plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for name in &plan.secrets {
            if let Some(value) = values.get(name.as_str()) {
                self.env.push(format!("{name}={}", value.expose_secret()));
            }
        }
        Ok(values)
    }

    async fn decrypt(&self, names: &[EnvName]) -> Result<HashMap<String, SecretString>, AttemptError> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let job = &self.claim.job;
        let key = self.executor.secrets.as_ref().ok_or(AttemptError::NoSecretsKey)?;
        let wanted: Vec<String> = names.iter().map(ToString::to_string).collect();
        let values = secrets::open(&self.executor.pool, key, job, &wanted).await?;
        Ok(values.into_iter().collect())
    }
}
