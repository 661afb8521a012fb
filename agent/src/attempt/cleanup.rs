//! The end of an attempt: its outcome, the console log stored, the final status written — fenced,
//! and retried while the lease still holds — and everything the attempt made removed.
//!
//! An attempt that lost a lease removes its containers first. One that lost the run's lease (taken
//! over, or cut off) writes no status: the run may be someone else's already. One that lost only its
//! test cluster's lease ends `error` with its run still its own.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::checkout::Workspace;
use super::{Attempt, Executor, Held, Stop};
use crate::console::ConsoleFile;
use crate::docker::DockerClient;
use crate::lease::Fence;
use crate::pending::Parcel;
use cimaster_store::attempts::{self, Claim, Outcome, StoredConsole};

/// Longest wait between tries to write the final status.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait for a job container still being started when the attempt ends.
const STARTING_AT_MOST: Duration = Duration::from_secs(60);

impl Attempt<'_> {
    /// Records how the attempt ended and removes what it made.
    pub(super) async fn end(mut self, stop: Stop, started: Instant, pump: JoinHandle<std::io::Result<ConsoleFile>>) {
        let lease_lost = matches!(&stop, Stop::LeaseLost(why) if why.run_is_lost());
        if matches!(stop, Stop::LeaseLost(_)) {
            let removed = self.held.remove_containers(&self.executor.docker).await;
            tracing::warn!(
                containers = removed,
                "removed the fenced attempt's containers; its volume and network follow"
            );
        }
        if let Stop::Failed(error) = &stop {
            self.console.note(&error.to_string()).await;
        }
        self.release_cluster().await;
        let outcome = stop.outcome(&self.executor.agent);
        self.console.note(&format!("run {} ({:.1}s)", outcome.status, started.elapsed().as_secs_f64())).await;

        let Attempt { executor, claim, console, held, interrupts, mut parcel, .. } = self;
        drop(console);
        let stored = executor.close_console(claim, pump, &mut parcel).await;
        if lease_lost {
            tracing::warn!(outcome = outcome.message.as_deref(), "leaving the run to its next attempt");
        } else {
            // The lease is still renewed while the status is written, so a short Postgres outage
            // here delays the status instead of losing it.
            executor.finish(claim, &outcome, stored.as_ref(), &interrupts.fence).await;
        }
        // What S3 could not take goes up later, once the status it belongs to is written.
        if let Err(err) = parcel.seal().await {
            tracing::error!(error = %err, "cannot keep the output that waits for S3");
        }
        // Removing the containers and volume and giving the network back do not hold up the run's
        // status. A crash here leaves labelled leftovers that the next start of this agent sweeps.
        held.clean_up(executor).await;
    }
}

impl Executor {
    /// Waits for the console to be written out and stores it in S3 — or, when S3 cannot take it
    /// now, in the parcel for later (the master serves the live copy meanwhile).
    async fn close_console(
        &self,
        claim: &Claim,
        pump: JoinHandle<std::io::Result<ConsoleFile>>,
        parcel: &mut Parcel,
    ) -> Option<StoredConsole> {
        match pump.await {
            Ok(Ok(file)) => {
                let stored = self.store_console(claim, &file.path, file.bytes).await;
                if stored.is_none() {
                    match parcel.console(&file.path, file.bytes).await {
                        Ok(()) => tracing::warn!("the console log waits for S3; it is stored when S3 is back"),
                        Err(err) => tracing::error!(error = %err, "cannot keep the console log for S3"),
                    }
                }
                remove_file(&file.path).await;
                stored
            }
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot write the console log");
                None
            }
            Err(err) => {
                tracing::error!(error = %err, "console task failed");
                None
            }
        }
    }

    /// Writes the final status, retrying while the run's lease holds.
    async fn finish(&self, claim: &Claim, outcome: &Outcome, console: Option<&StoredConsole>, fence: &Fence) {
        fence.ending();
        let mut backoff = Duration::from_millis(100);
        loop {
            let write = attempts::finish(&self.pool, claim, &self.agent, outcome, console);
            let error = match tokio::time::timeout(self.timing.renew_every(), write).await {
                Ok(Ok(true)) => {
                    return tracing::info!(status = %outcome.status, exit_code = ?outcome.exit_code, "attempt finished")
                }
                Ok(Ok(false)) => return tracing::warn!("the attempt was taken over; its final status was not written"),
                Ok(Err(err)) => err.to_string(),
                Err(_) => "Postgres did not answer in time".to_owned(),
            };
            tracing::warn!(error, retry_in = ?backoff, "cannot record the final status yet");
            tokio::select! {
                why = fence.tripped() => {
                    return tracing::error!(%why, "the final status was not recorded; the reaper retries the run");
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl Held {
    /// Removes the attempt's containers (stopped or not) at once; how many there were.
    pub(super) async fn remove_containers(&mut self, docker: &DockerClient) -> usize {
        for service in self.services.drain(..) {
            service.stop_collecting();
        }
        if let Some(starting) = self.starting.take() {
            // An attempt stopped before its job's gate opened: the job container is started, or soon.
            if let Ok(Some(id)) = tokio::time::timeout(STARTING_AT_MOST, starting.container()).await {
                self.containers.push(id);
            }
        }
        let count = self.containers.len();
        for id in self.containers.drain(..).rev() {
            self.left_behind |= !docker.remove_container(&id).await;
        }
        count
    }

    /// Removes the containers and the workspace, gives the network back and trims the mirrors.
    async fn clean_up(mut self, executor: &Executor) {
        self.remove_containers(&executor.docker).await;
        let used_mirror = self.workspace.is_some();
        if let Some(workspace) = self.workspace.take() {
            remove_workspace(&executor.docker, workspace).await;
        }
        tracing::debug!("the attempt's containers and workspace are removed");
        // A network whose job's allowed ranges could not be taken back is not lent again.
        let mut lend_again = !self.left_behind;
        if let Some((bridge, allow)) = self.allowed.take() {
            let (docker, agent, image) = (&executor.docker, &executor.agent, &executor.git_image);
            if let Err(err) = docker.allow_egress(agent, image, &bridge, &allow, false).await {
                tracing::warn!(error = %err, bridge, "cannot remove the job's egress exceptions; its network goes");
                lend_again = false;
            }
        }
        if let Some(network) = self.network.take() {
            executor.networks.give_back(network, lend_again).await;
        }
        // Counting the mirrors' sizes keeps the engine busy for a while, so it happens here, after
        // the run, rather than while a job starts.
        if used_mirror {
            let (mirrors, docker) = (executor.mirrors.clone(), executor.docker.clone());
            tokio::spawn(async move { mirrors.trim(&docker).await });
        }
    }
}

/// Removes the run's workspace in its git helper.
async fn remove_workspace(docker: &DockerClient, workspace: Workspace) {
    let remove = vec!["rm".to_owned(), "-rf".to_owned(), workspace.dir.clone()];
    match docker.exec(&workspace.helper, remove, Vec::new()).await {
        Ok(0) => {}
        Ok(code) => tracing::warn!(workspace = workspace.dir, code, "cannot remove the workspace"),
        Err(err) => tracing::warn!(workspace = workspace.dir, error = %err, "cannot remove the workspace"),
    }
}

async fn remove_file(path: &Path) {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove the local console log")
        }
    }
}
