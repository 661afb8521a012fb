//! The replica's partial clones: one bare repository per (repository URL, credentials), fetched
//! one commit deep and without blobs (`--filter=blob:none`, where the server allows filters), so a
//! config file read at a new commit fetches only that commit's trees and the one file, and a commit
//! read before fetches nothing. Bounded in size: the least recently used clones are removed first.
//! Reads of one clone take turns; a clone git cannot use is made again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::Credentials;
use crate::config::GitConfig;

/// The directory name prefix of the clones' root when no `CIMASTER_GIT_CACHE_DIR` is set.
const DEFAULT_PREFIX: &str = "cimaster-git-clones-";
/// Touched whenever a clone is read: the order of removal.
const USED: &str = "cimaster-used";

pub struct Clones {
    root: PathBuf,
    max_bytes: u64,
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Clones {
    pub fn open(config: &GitConfig) -> Self {
        let root = match &config.cache_dir {
            Some(dir) => dir.clone(),
            None => {
                sweep_dead_processes();
                std::env::temp_dir().join(format!("{DEFAULT_PREFIX}{}", std::process::id()))
            }
        };
        if let Err(err) = std::fs::create_dir_all(&root) {
            tracing::warn!(dir = %root.display(), error = %err, "cannot make the directory of the git clones");
        }
        Self { root, max_bytes: config.cache_max_mib.saturating_mul(1 << 20), turns: Mutex::default() }
    }

    /// The clone for this repository and these credentials: jobs that read a repository with
    /// different credentials never share one.
    pub fn path(&self, url: &str, creds: &Credentials) -> PathBuf {
        let mut digest = Sha256::new();
        digest.update(url.as_bytes());
        for secret in [&creds.token, &creds.ssh_key] {
            digest.update(b"\0");
            if let Some(secret) = secret {
                digest.update(secret.expose_secret().as_bytes());
            }
        }
        self.root.join(hex::encode(&digest.finalize()[..12]))
    }

    /// Waits for this clone's turn: git in one clone at a time.
    pub async fn turn(&self, clone: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let key = clone.display().to_string();
        let lock = self.turns.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone();
        lock.lock_owned().await
    }

    /// Marks the clone used now, and removes the least recently used others while all of them
    /// together take more than the bound.
    pub fn used(&self, clone: &Path) {
        let _ = std::fs::write(clone.join(USED), b"");
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        let mut clones: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_dir())
            .map(|path| {
                let at = std::fs::metadata(path.join(USED)).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                (at, size_of(&path), path)
            })
            .collect();
        let mut total: u64 = clones.iter().map(|(_, size, _)| size).sum();
        clones.sort();
        for (_, size, path) in clones {
            if total <= self.max_bytes {
                break;
            }
            if path == clone {
                continue;
            }
            if std::fs::remove_dir_all(&path).is_ok() {
                tracing::info!(clone = %path.display(), bytes = size, "removed the least recently used git clone");
                total -= size;
            }
        }
    }
}

fn size_of(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => size_of(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Removes the default clone directories of master processes that no longer run.
fn sweep_dead_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(DEFAULT_PREFIX).and_then(|pid| pid.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The bytes a clone takes (for tests).
#[cfg(test)]
pub fn tests_size(clone: &Path) -> u64 {
    size_of(clone)
}
