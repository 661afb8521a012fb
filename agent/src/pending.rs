//! Output that could not reach S3 when its attempt ended. The run's final status does not wait for
//! S3: the console and result files that failed to upload are moved to the agent's disk
//! (`<work dir>/pending/<run>-<attempt>/`, with a manifest) and uploaded by a background task with
//! backoff — also after the agent restarts with the same id and work directory. Until then the
//! master serves the console from its live copy in Postgres; a result appears in the run's results
//! once it is stored. Recording what was uploaded is fenced by (run, attempt, agent) like every
//! other write of the attempt.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cimaster_common::storage::console_key;
use cimaster_common::RunId;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage;
use cimaster_store::console;
use cimaster_store::results::{self, StoredResult};

const MANIFEST: &str = "manifest.json";
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What one attempt left to upload.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub run: RunId,
    pub attempt: u32,
    pub agent: String,
    /// The console log, when it was not stored; its file is `console.log`.
    pub console: Option<u64>,
    pub results: Vec<PendingResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PendingResult {
    pub kind: String,
    pub name: String,
    pub content_type: String,
    pub key: String,
    pub bytes: i64,
    pub summary: Option<serde_json::Value>,
    /// The file's name in the attempt's pending directory.
    pub file: String,
}

/// The agent's pending uploads, and what it needs to finish them.
#[derive(Clone)]
pub struct Pending {
    /// Sealed parcels, which the uploader owns.
    dir: PathBuf,
    /// Parcels of attempts still ending.
    staging: PathBuf,
    pool: PgPool,
    s3: aws_sdk_s3::Client,
    bucket: String,
    /// Wakes the uploader when a parcel is sealed.
    wake: Arc<Notify>,
}

/// One attempt's pending output, gathered while the attempt ends.
pub struct Parcel {
    dir: PathBuf,
    sealed: PathBuf,
    manifest: Manifest,
    wake: Arc<Notify>,
}

impl Pending {
    pub fn new(work_dir: &Path, pool: PgPool, s3: aws_sdk_s3::Client, bucket: String) -> Self {
        Self {
            dir: work_dir.join("pending"),
            staging: work_dir.join("parcels"),
            pool,
            s3,
            bucket,
            wake: Arc::default(),
        }
    }

    /// Drops parcels an earlier process of this agent left unsealed: it stopped while their attempt
    /// ended, so the attempt never finished either and is retried.
    pub async fn discard_unsealed(&self) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(&self.staging).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// Starts gathering an attempt's pending output.
    pub fn parcel(&self, run: RunId, attempt: u32, agent: &str) -> Parcel {
        let manifest = Manifest { run, attempt, agent: agent.to_owned(), ..Default::default() };
        let name = format!("{run}-{attempt}");
        Parcel { dir: self.staging.join(&name), sealed: self.dir.join(name), manifest, wake: self.wake.clone() }
    }

    /// Uploads what is pending until `cancel`, trying again with backoff while S3 is away.
    pub async fn run(self, cancel: CancellationToken) {
        let mut wait = FIRST_RETRY;
        loop {
            let idle = match self.upload_all().await {
                Ok(0) => true,
                Ok(left) => {
                    tracing::info!(attempts = left, retry_in = ?wait, "output still waits for S3");
                    false
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the pending uploads");
                    false
                }
            };
            if idle {
                wait = FIRST_RETRY;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait), if !idle => {}
            }
            if !idle {
                wait = (wait * 2).min(MAX_RETRY);
            }
        }
    }

    /// Tries every pending attempt once; returns how many still wait.
    async fn upload_all(&self) -> std::io::Result<usize> {
        let mut entries = match tokio::fs::read_dir(&self.dir).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let mut parcels = Vec::new();
        while let Some(entry) = entries.next_entry().await? {
            parcels.push(entry.path());
        }
        if parcels.is_empty() {
            return Ok(0);
        }
        // One check for the whole pass: while S3 is away, every parcel waits without a try of its own.
        if let Err(err) = storage::ensure_bucket(&self.s3, &self.bucket).await {
            tracing::debug!(error = format!("{err:#}"), "S3 is not reachable yet");
            return Ok(parcels.len());
        }
        let mut left = 0;
        for dir in parcels {
            match self.upload(&dir).await {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "stored output that waited for S3");
                    tokio::fs::remove_dir_all(&dir).await?;
                }
                Err(err) => {
                    tracing::debug!(dir = %dir.display(), error = %err, "pending output not stored yet");
                    left += 1;
                }
            }
        }
        Ok(left)
    }

    /// Uploads one attempt's output and records it; a part already done is not repeated.
    async fn upload(&self, dir: &Path) -> anyhow::Result<()> {
        let mut manifest: Manifest = serde_json::from_slice(&tokio::fs::read(dir.join(MANIFEST)).await?)?;
        while let Some(result) = manifest.results.first() {
            let path = dir.join(&result.file);
            storage::upload(&self.s3, &self.bucket, &result.key, &path, &result.content_type).await?;
            let stored = StoredResult {
                kind: result.kind.clone(),
                name: result.name.clone(),
                bytes: result.bytes,
                content_type: result.content_type.clone(),
                key: result.key.clone(),
                summary: result.summary.clone(),
            };
            results::record_late_results(&self.pool, manifest.run, manifest.attempt, &manifest.agent, &[stored])
                .await?;
            manifest.results.remove(0);
            write_manifest(dir, &manifest).await?;
        }
        if let Some(bytes) = manifest.console {
            let key = console_key(manifest.run, manifest.attempt);
            let path = dir.join("console.log");
            storage::upload(&self.s3, &self.bucket, &key, &path, "text/plain; charset=utf-8").await?;
            console::record_late_console(
                &self.pool,
                manifest.run,
                manifest.attempt,
                &manifest.agent,
                &key,
                bytes as i64,
            )
            .await?;
        }
        Ok(())
    }
}

impl Parcel {
    /// Keeps the console log for a later upload.
    pub async fn console(&mut self, file: &Path, bytes: u64) -> std::io::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await?;
        move_file(file, &self.dir.join("console.log")).await?;
        self.manifest.console = Some(bytes);
        Ok(())
    }

    /// Keeps a result file (moved from `file`) for a later upload.
    pub async fn result(&mut self, result: StoredResult, file: &Path) -> std::io::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let name = format!("result-{}", self.manifest.results.len());
        move_file(file, &self.dir.join(&name)).await?;
        self.manifest.results.push(PendingResult {
            kind: result.kind,
            name: result.name,
            content_type: result.content_type,
            key: result.key,
            bytes: result.bytes,
            summary: result.summary,
            file: name,
        });
        Ok(())
    }

    /// Keeps a result held in memory.
    pub async fn result_bytes(&mut self, result: StoredResult, data: &[u8]) -> std::io::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let scratch = self.dir.join("incoming");
        tokio::fs::write(&scratch, data).await?;
        self.result(result, &scratch).await
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.console.is_none() && self.manifest.results.is_empty()
    }

    /// Writes the manifest and hands the parcel to the uploader (one rename, so the uploader never
    /// sees half a parcel).
    pub async fn seal(self) -> std::io::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        write_manifest(&self.dir, &self.manifest).await?;
        if let Some(parent) = self.sealed.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&self.dir, &self.sealed).await?;
        self.wake.notify_one();
        Ok(())
    }
}

async fn write_manifest(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let scratch = dir.join(format!("{MANIFEST}.new"));
    tokio::fs::write(&scratch, serde_json::to_vec(manifest)?).await?;
    tokio::fs::rename(&scratch, dir.join(MANIFEST)).await
}

/// Renames, or copies when the file is on another file system.
async fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    if tokio::fs::rename(from, to).await.is_ok() {
        return Ok(());
    }
    tokio::fs::copy(from, to).await?;
    tokio::fs::remove_file(from).await
}
