//! The live copy of an attempt's console in Postgres, which every master replica serves while the
//! run goes on. Written in the background, one chunk at a time: a slow or unreachable database never
//! holds up the job's output (the local file is the record). A chunk that could not be written is
//! sent again with the same sequence number (the insert is idempotent), so an outage leaves neither
//! gaps nor repeats; what piles up meanwhile is kept up to `MAX_PENDING`, past which the oldest
//! output is dropped from the live copy with a note saying so.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use cimaster_common::RunId;
use cimaster_store::console;

/// Live output kept for Postgres while it cannot be written.
const MAX_PENDING: usize = 8 << 20;
/// One insert's time limit.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between tries while Postgres cannot be written.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct LiveCopy {
    pool: PgPool,
    run: RunId,
    attempt: u32,
    seq: i64,
    /// The chunk being written (and sent again until it is), with its sequence number `seq`.
    sending: Option<Bytes>,
    writing: Option<JoinHandle<bool>>,
    pending: BytesMut,
    dropped: usize,
    /// After a failed write, the next try waits until then.
    retry_at: Option<tokio::time::Instant>,
}

impl LiveCopy {
    pub fn new(pool: PgPool, run: RunId, attempt: u32) -> Self {
        let pending = BytesMut::new();
        Self { pool, run, attempt, seq: 0, sending: None, writing: None, pending, dropped: 0, retry_at: None }
    }

    /// Queues output for the live copy; returns how much is waiting.
    pub fn push(&mut self, data: &[u8]) -> usize {
        if self.pending.len() + data.len() > MAX_PENDING {
            self.dropped += self.pending.len();
            self.pending.clear();
        }
        self.pending.extend_from_slice(data);
        self.pending.len()
    }

    pub fn is_sending(&self) -> bool {
        self.writing.is_some()
    }

    /// Starts writing the next chunk unless one is being written.
    pub fn send(&mut self) {
        if self.writing.is_some() || self.retry_at.is_some_and(|at| tokio::time::Instant::now() < at) {
            return;
        }
        if self.sending.is_none() {
            if self.pending.is_empty() {
                return;
            }
            let mut chunk = BytesMut::new();
            if self.dropped > 0 {
                let note = format!(
                    "[cimaster] {} bytes of live output were left out while Postgres could not be reached; \
                     the stored console has them\n",
                    self.dropped
                );
                chunk.extend_from_slice(note.as_bytes());
                self.dropped = 0;
            }
            chunk.extend_from_slice(&self.pending.split());
            self.sending = Some(chunk.freeze());
        }
        let Some(chunk) = self.sending.clone() else { return };
        let (pool, run, attempt, seq) = (self.pool.clone(), self.run, self.attempt, self.seq);
        self.writing = Some(tokio::spawn(async move {
            match tokio::time::timeout(WRITE_TIMEOUT, console::append(&pool, run, attempt, seq, &chunk)).await {
                Ok(Ok(())) => true,
                Ok(Err(err)) => {
                    tracing::warn!(run_id = %run, error = %err, "cannot store live console output yet");
                    false
                }
                Err(_) => {
                    tracing::warn!(run_id = %run, "storing live console output did not answer in time");
                    false
                }
            }
        }));
    }

    /// Resolves when the chunk being written is done (whether it was written); pending forever when
    /// none is.
    pub async fn written(&mut self) -> bool {
        match self.writing.as_mut() {
            Some(writing) => writing.await.unwrap_or(false),
            None => std::future::pending().await,
        }
    }

    /// Takes the outcome of `written`: the next chunk follows, or the same one is sent again later.
    pub fn settle(&mut self, written: bool) {
        self.writing = None;
        if written {
            self.sending = None;
            self.seq += 1;
            self.retry_at = None;
        } else {
            self.retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
        }
    }

    /// Writes what is left, giving up after `limit`.
    pub async fn drain(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Here the loop paces the tries, not the backoff of the live phase.
            self.retry_at = None;
            self.send();
            if self.writing.is_none() {
                return;
            }
            let written = tokio::select! {
                written = self.written() => written,
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some(writing) = self.writing.take() {
                        writing.abort();
                    }
                    tracing::warn!(run_id = %self.run, "the end of the live console was not stored");
                    return;
                }
            };
            self.settle(written);
            if !written {
                self.retry_at = None;
                tokio::time::sleep(RETRY_AFTER.min(deadline.saturating_duration_since(tokio::time::Instant::now())))
                    .await;
            }
        }
    }
}
