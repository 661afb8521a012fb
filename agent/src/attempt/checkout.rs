//! A git run's workspace: a volume of the attempt's own, which the helper image fills from the
//! agent's mirror of the repository (`crate::mirrors`), updated over the run's network first. Credentials reach the helper only, in its
//! environment; the job sees the checked-out files at `/workspace`.

use std::collections::HashMap;
use std::time::Duration;

use cimaster_common::Resources;
use secrecy::{ExposeSecret, SecretString};

use super::output::pump_to_console;
use super::{Attempt, AttemptError, Stop};
use crate::docker::{JobContainer, MirrorMount};
use crate::plan::{Checkout, CHECKOUT_SCRIPT};

impl Attempt<'_> {
    pub(super) async fn check_out(
        &mut self,
        checkout: &Checkout,
        secrets: &HashMap<String, SecretString>,
        network: &str,
        resources: &Resources,
    ) -> Result<(), Stop> {
        let docker = &self.executor.docker;
        let mirrors = &self.executor.mirrors;
        let volume = self.interrupts.step(docker.create_volume(&self.labels)).await??;
        self.held.volume = Some(volume.clone());
        let mirror = mirrors.volume(checkout.repository.as_str(), &checkout.credential_scope(&self.claim.job));
        self.interrupts.step(docker.mirror_volume(&self.executor.agent, &mirror)).await??;
        // One checkout of a mirror at a time: the second run of a repository finds it up to date.
        let held_mirror = self.interrupts.step(mirrors.lock(&mirror)).await?;
        self.console.note(&format!("checking out {} at {}", checkout.repository, checkout.commit)).await;
        self.interrupts
            .step(docker.ensure_image(&self.executor.git_image))
            .await?
            .map_err(AttemptError::CheckoutImage)?;
        let helper = JobContainer {
            role: "checkout".into(),
            image: self.executor.git_image.clone(),
            script: Some(CHECKOUT_SCRIPT.to_owned()),
            env: checkout_env(checkout, secrets),
            // Within what the run was admitted for: the job has not started yet.
            nano_cpus: Some((resources.cpus * 1e9) as i64),
            memory_bytes: Some(i64::try_from(resources.memory.bytes()).unwrap_or(i64::MAX)),
            network: network.to_owned(),
            workspace: Some(volume),
            mirror: Some(MirrorMount { volume: mirror.clone(), writable: true }),
            ..Default::default()
        };
        let (id, output) = self.interrupts.step(docker.start_job(&self.labels, helper)).await??;
        self.held.containers.push(id.clone());
        let pump = pump_to_console(output, self.masker.clone(), self.console.clone());
        let exit = self.interrupts.step(docker.wait(&id)).await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), pump).await;
        mirrors.touch(&mirror);
        drop(held_mirror);
        let (trim_mirrors, trim_docker) = (mirrors.clone(), docker.clone());
        tokio::spawn(async move { trim_mirrors.trim(&trim_docker).await });
        match exit? {
            0 => {
                self.held.checkout = Some(id);
                // A full-history workspace borrows the mirror's objects: its containers see it too.
                if checkout.spec.depth.is_none() {
                    self.held.mirror = Some(mirror);
                }
                Ok(())
            }
            code => Err(AttemptError::Checkout { commit: checkout.commit.clone(), code }.into()),
        }
    }
}

/// What the helper is told: where, which commit, and the credentials it needs.
fn checkout_env(checkout: &Checkout, secrets: &HashMap<String, SecretString>) -> Vec<String> {
    let mut env = vec![
        format!("CIMASTER_GIT_REPOSITORY={}", checkout.repository),
        format!("CIMASTER_GIT_COMMIT={}", checkout.commit),
    ];
    let secret = |name: &Option<cimaster_common::EnvName>| name.as_ref().and_then(|name| secrets.get(name.as_str()));
    let token = secret(&checkout.token_secret).or_else(|| secrets.get(super::secrets::REPOSITORY_TOKEN));
    if let Some(token) = token {
        env.push(format!("CIMASTER_GIT_TOKEN={}", token.expose_secret()));
    }
    if let Some(key) = secret(&checkout.ssh_key_secret) {
        env.push(format!("CIMASTER_GIT_SSH_KEY={}", key.expose_secret()));
    }
    if let Some(depth) = checkout.spec.depth {
        env.push(format!("CIMASTER_GIT_DEPTH={depth}"));
    }
    if checkout.spec.submodules {
        env.push("CIMASTER_GIT_SUBMODULES=true".to_owned());
    }
    if let Some(reference) = &checkout.pull_ref {
        env.push(format!("CIMASTER_GIT_PULL_REF={reference}"));
    }
    if let Some(lines) = &checkout.ssh_known_hosts {
        env.push(format!("CIMASTER_GIT_KNOWN_HOSTS={lines}"));
    }
    env
}
