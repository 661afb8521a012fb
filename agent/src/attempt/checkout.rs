//! A git run's workspace: a directory of its own in the agent's workspaces volume, which the
//! mirror's git helper (`crate::mirrors`) fills with one `docker exec`, after updating the mirror.
//! Credentials reach the helper's exec only, in its environment, and the repository's token is sent
//! to the repository's own URL only; the job sees the checked-out files at `/workspace`, and nothing
//! of other runs. The job's container starts after the checkout ends, and git runs nothing the
//! repository holds (hooks, fsmonitor, a submodule's local path).

use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::output::pump_to_console;
use super::{Attempt, AttemptError, Stop};
use crate::docker::{DockerClient, MIRROR_PATH, WORKSPACES_PATH};
use crate::mirrors::MirrorUse;
use crate::plan::{Checkout, CHECKOUT_SCRIPT, END_CHECKOUT_SCRIPT};

/// How long a stopped attempt's checkout may go on holding its mirror, should ending it fail.
const ABANDONED_CHECKOUT: Duration = Duration::from_secs(3600);
/// How long ending a stopped attempt's checkout may take.
const END_CHECKOUT: Duration = Duration::from_secs(10);

/// A run's workspace and the mirror it is made from.
pub(super) struct Workspace {
    /// The directory as the git helper sees it.
    pub dir: String,
    /// The same directory on the engine's host, bind-mounted into the run's containers.
    pub host: String,
    /// The mirror volume.
    pub mirror: String,
    /// The mirror's git helper, which makes the workspace and removes it.
    pub helper: String,
    /// Whether the run's containers mount the mirror: a full-history workspace borrows its objects.
    pub shares_mirror: bool,
    _use: MirrorUse,
}

impl Attempt<'_> {
    /// Names the run's workspace and makes sure its mirror volume exists.
    async fn prepare_workspace(&mut self, checkout: &Checkout) -> Result<(), Stop> {
        let (docker, mirrors) = (&self.executor.docker, &self.executor.mirrors);
        let mirror = mirrors.volume(checkout.repository.as_str(), &checkout.credential_scope(&self.claim.job));
        self.interrupts.step(docker.mirror_volume(&self.executor.agent, &mirror)).await??;
        let (_, host_root) = self.interrupts.step(mirrors.workspaces(docker)).await??;
        let name = self.labels.name();
        self.held.workspace = Some(Workspace {
            dir: format!("{WORKSPACES_PATH}/{name}"),
            host: format!("{host_root}/{name}"),
            helper: mirrors.helper(&mirror),
            shares_mirror: checkout.spec.depth.is_none(),
            _use: mirrors.borrow(&mirror),
            mirror,
        });
        Ok(())
    }

    /// Updates the mirror and makes the workspace, in the mirror's git helper, before any container
    /// of the run exists: nothing of the run writes to the workspace while git works in it.
    pub(super) async fn check_out(
        &mut self,
        checkout: &Checkout,
        secrets: &HashMap<String, SecretString>,
    ) -> Result<(), Stop> {
        self.prepare_workspace(checkout).await?;
        let (docker, mirrors) = (&self.executor.docker, &self.executor.mirrors);
        let workspace = self.held.workspace.as_ref().expect("the workspace is prepared first");
        let (dir, mirror) = (workspace.dir.clone(), workspace.mirror.clone());
        // One checkout of a mirror at a time: the second run of a repository finds it up to date.
        let held_mirror = self.interrupts.step(mirrors.lock(&mirror)).await?;
        self.console.note(&format!("checking out {} at {}", checkout.repository, checkout.commit)).await;
        let image = &self.executor.git_image;
        self.interrupts.step(docker.ensure_image(image)).await?.map_err(AttemptError::CheckoutImage)?;
        let helper = self.interrupts.step(mirrors.start_helper(docker, &mirror, image)).await??;
        let command = vec!["sh".to_owned(), "-c".to_owned(), CHECKOUT_SCRIPT.to_owned()];
        let pid_file = format!("/tmp/{}.checkout-pid", self.labels.name());
        let env = checkout_env(checkout, secrets, &dir, &pid_file);
        let (exec, output) = self.interrupts.step(docker.exec_attached(&helper, command, env)).await??;
        // The exec's output ends when the checkout does.
        let mut pump = pump_to_console(output, self.masker.clone(), self.console.clone());
        if let Err(stop) = self.interrupts.step(&mut pump).await {
            end_checkout(docker, &helper, pid_file).await;
            // The mirror stays locked until the checkout's output ends.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(ABANDONED_CHECKOUT, pump).await;
                drop(held_mirror);
            });
            return Err(stop);
        }
        let exit = self.interrupts.step(docker.exec_exit(&exec)).await?;
        mirrors.touch(&mirror);
        drop(held_mirror);
        match exit? {
            0 => Ok(()),
            code => Err(AttemptError::Checkout { commit: checkout.commit.clone(), code }.into()),
        }
    }
}

/// Ends a stopped attempt's checkout from inside its helper (the engine cannot stop an exec): the
/// checkout's whole process group, named in `pid_file`.
async fn end_checkout(docker: &DockerClient, helper: &str, pid_file: String) {
    let end = vec!["sh".to_owned(), "-c".to_owned(), END_CHECKOUT_SCRIPT.to_owned(), "sh".to_owned(), pid_file];
    let ended = tokio::time::timeout(END_CHECKOUT, docker.exec(helper, end, Vec::new())).await;
    if !matches!(ended, Ok(Ok(_))) {
        tracing::warn!(?ended, "a stopped checkout was not ended; its mirror stays locked until it ends");
    }
}

/// What the helper is told: where, which commit, and the credentials it needs.
fn checkout_env(
    checkout: &Checkout,
    secrets: &HashMap<String, SecretString>,
    dir: &str,
    pid_file: &str,
) -> Vec<String> {
    let mut env = vec![
        format!("CIMASTER_GIT_REPOSITORY={}", checkout.repository),
        format!("CIMASTER_GIT_COMMIT={}", checkout.commit),
        format!("CIMASTER_WORKSPACE={dir}"),
        format!("CIMASTER_MIRROR={MIRROR_PATH}"),
        format!("CIMASTER_CHECKOUT_PID={pid_file}"),
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
