//! Git mirrors: one bare mirror per repository (and credential scope) in a Docker volume this agent
//! owns, kept across runs and restarts. Each mirror has a git helper: a container of the git image,
//! kept running, with the mirror and the agent's workspaces volume mounted. A run's checkout is one
//! `docker exec` in it, under a lock per mirror (two runs of one repository do not fetch at once):
//! one fetch of what the mirror lacks, then the run's private workspace, a directory of the
//! workspaces volume, made from it: a `--shared` clone (the mirror is mounted read-only into the
//! run's containers for its objects) or a shallow fetch of the run's commit. The run's containers
//! get only their own workspace, bind-mounted from the volume's directory on the engine's host.
//!
//! Mirrors are bounded in total size and in age: after a git run the least recently used ones
//! that no run uses are removed beyond the limits, with their helpers. The start-up sweep keeps the
//! mirrors and removes the helpers and the workspaces.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::OwnedMutexGuard;

use crate::docker::{DockerClient, DockerError, GitHelper};

/// What the mirrors may take: in all on disk, in age, and each git helper of the host.
pub struct Limits {
    pub max_bytes: u64,
    pub max_age: Duration,
    /// The CPUs and memory the agent hands out: a git helper uses no more.
    pub helper_cpus: f64,
    pub helper_memory: u64,
}

pub struct Mirrors {
    agent: String,
    limits: Limits,
    /// When each mirror was last used (seconds since the epoch), kept in the work directory.
    index: PathBuf,
    used: Mutex<HashMap<String, i64>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// How many runs' workspaces borrow from each mirror now.
    users: Arc<Mutex<HashMap<String, usize>>>,
    /// The workspaces volume: its name and its directory on the engine's host.
    workspaces: tokio::sync::OnceCell<(String, String)>,
    trimming: tokio::sync::Mutex<()>,
}

/// A run's use of a mirror, from its checkout to its cleanup: the mirror is not trimmed meanwhile.
pub struct MirrorUse {
    volume: String,
    users: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for MirrorUse {
    fn drop(&mut self) {
        let mut users = self.users.lock().expect("mirror users");
        if let Some(count) = users.get_mut(&self.volume) {
            *count -= 1;
            if *count == 0 {
                users.remove(&self.volume);
            }
        }
    }
}

impl Mirrors {
    pub fn new(agent: &str, work_dir: &std::path::Path, limits: Limits) -> Self {
        let index = work_dir.join("mirrors.json");
        let used = std::fs::read(&index).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        Mirrors {
            agent: agent.to_owned(),
            limits,
            index,
            used: Mutex::new(used),
            locks: Mutex::default(),
            users: Arc::default(),
            workspaces: tokio::sync::OnceCell::new(),
            trimming: tokio::sync::Mutex::new(()),
        }
    }

    /// The mirror volume of `repository` for runs with these credentials: jobs whose credentials
    /// differ never share one.
    pub fn volume(&self, repository: &str, scope: &str) -> String {
        let digest = Sha256::digest(format!("{repository}\n{scope}").as_bytes());
        format!("cimaster-mirror-{}-{}", self.agent, &hex::encode(digest)[..16])
    }

    /// The name of the mirror's git helper container.
    pub fn helper(&self, volume: &str) -> String {
        format!("{volume}-git")
    }

    /// The mirror's git helper, started if it is not running: its container id.
    pub async fn start_helper(&self, docker: &DockerClient, volume: &str, image: &str) -> Result<String, DockerError> {
        let name = self.helper(volume);
        let (workspaces, _) = self.workspaces(docker).await?;
        let helper = GitHelper {
            name: &name,
            image,
            mirror: volume,
            workspaces,
            cpus: self.limits.helper_cpus,
            memory: self.limits.helper_memory,
        };
        docker.git_helper(&self.agent, helper).await
    }

    /// The workspaces volume (made the first time): its name and its directory on the engine's host.
    pub async fn workspaces(&self, docker: &DockerClient) -> Result<&(String, String), DockerError> {
        self.workspaces.get_or_try_init(|| docker.workspaces_volume(&self.agent)).await
    }

    /// Removes the git helpers when the agent stops; the mirrors stay for its next start.
    pub async fn stop_helpers(&self, docker: &DockerClient) {
        match docker.git_helpers(&self.agent).await {
            Ok(helpers) => {
                for id in helpers {
                    docker.remove_container(&id).await;
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot list the git helpers"),
        }
    }

    /// Marks the mirror as used by a run until the guard is dropped.
    pub fn borrow(&self, volume: &str) -> MirrorUse {
        *self.users.lock().expect("mirror users").entry(volume.to_owned()).or_default() += 1;
        MirrorUse { volume: volume.to_owned(), users: self.users.clone() }
    }

    /// Holds the mirror for one checkout; another run of the same mirror waits.
    pub async fn lock(&self, volume: &str) -> OwnedMutexGuard<()> {
        let lock = self.locks.lock().expect("mirror locks").entry(volume.to_owned()).or_default().clone();
        lock.lock_owned().await
    }

    /// Records a use of the mirror now.
    pub fn touch(&self, volume: &str) {
        let snapshot = {
            let mut used = self.used.lock().expect("mirror index");
            used.insert(volume.to_owned(), chrono::Utc::now().timestamp());
            serde_json::to_vec(&*used).unwrap_or_default()
        };
        if let Err(err) = std::fs::write(&self.index, snapshot) {
            tracing::warn!(error = %err, "cannot write the mirror index");
        }
    }

    /// Removes the least recently used mirrors while they are too many bytes in all, and every
    /// mirror unused for longer than the age limit; a mirror in use, and the one used last, are
    /// left alone.
    pub async fn trim(&self, docker: &DockerClient) {
        let Ok(_one_at_a_time) = self.trimming.try_lock() else { return };
        let volumes = match docker.mirror_volumes(&self.agent).await {
            Ok(volumes) => volumes,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the mirrors");
                return;
            }
        };
        let now = chrono::Utc::now().timestamp();
        let mut by_use: Vec<(i64, String, u64)> = {
            let used = self.used.lock().expect("mirror index");
            volumes
                .into_iter()
                .map(|(name, size, created)| (used.get(&name).copied().unwrap_or(created), name, size))
                .collect()
        };
        by_use.sort();
        let mut total: u64 = by_use.iter().map(|(_, _, size)| size).sum();
        // The mirror used last stays.
        by_use.pop();
        for (last_used, name, size) in by_use {
            let old = now - last_used > i64::try_from(self.limits.max_age.as_secs()).unwrap_or(i64::MAX);
            if total <= self.limits.max_bytes && !old {
                continue;
            }
            let lock = self.locks.lock().expect("mirror locks").entry(name.clone()).or_default().clone();
            let Ok(_held) = lock.try_lock() else { continue };
            if self.users.lock().expect("mirror users").contains_key(&name) {
                continue;
            }
            docker.remove_container(&self.helper(&name)).await;
            if docker.remove_volume_if_unused(&name).await {
                tracing::info!(mirror = %name, bytes = size, old, "mirror removed");
                total = total.saturating_sub(size);
                self.used.lock().expect("mirror index").remove(&name);
            }
        }
    }
}
