//! An attempt's console: lines go to a local file (the full log) and, every 200 ms, to Postgres so
//! every master replica can serve them live (`live`). When the attempt ends, the file is uploaded to
//! S3 (`storage`).

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::live::LiveCopy;
use cimaster_store::attempts::Claim;

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 256 * 1024;
/// How long the end of an attempt waits for the last live output to reach Postgres.
const LAST_FLUSH: Duration = Duration::from_secs(5);

/// Where to send console output.
#[derive(Clone)]
pub struct ConsoleTx(mpsc::Sender<Bytes>);

impl ConsoleTx {
    pub async fn send(&self, data: Bytes) {
        let _ = self.0.send(data).await;
    }

    /// A line from the agent itself, marked so it stands out from the job's output.
    pub async fn note(&self, text: &str) {
        self.send(Bytes::from(format!("{} [cimaster] {text}\n", timestamp()))).await;
    }
}

/// Splits raw output into lines and prefixes each with the time it arrived (RFC 3339, UTC).
/// stdout and stderr keep separate partial lines, so their lines never mix.
#[derive(Default)]
pub struct Timestamper {
    partial: [Vec<u8>; 2],
}

impl Timestamper {
    const MAX_LINE: usize = 64 * 1024;

    /// `stream`: 0 for stdout, 1 for stderr.
    pub fn push(&mut self, stream: usize, data: &[u8], out: &mut BytesMut) {
        let now = timestamp();
        let partial = &mut self.partial[stream];
        for piece in data.split_inclusive(|b| *b == b'\n') {
            partial.extend_from_slice(piece);
            if partial.ends_with(b"\n") || partial.len() >= Self::MAX_LINE {
                out.extend_from_slice(now.as_bytes());
                out.extend_from_slice(b" ");
                out.extend_from_slice(partial);
                if !partial.ends_with(b"\n") {
                    out.extend_from_slice(b"\n");
                }
                partial.clear();
            }
        }
    }

    /// Emits unterminated last lines.
    pub fn finish(&mut self, out: &mut BytesMut) {
        let now = timestamp();
        for partial in &mut self.partial {
            if !partial.is_empty() {
                out.extend_from_slice(now.as_bytes());
                out.extend_from_slice(b" ");
                out.extend_from_slice(partial);
                out.extend_from_slice(b"\n");
                partial.clear();
            }
        }
    }
}

fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The finished local log.
pub struct ConsoleFile {
    pub path: PathBuf,
    pub bytes: u64,
}

/// Starts the pump; drop every `ConsoleTx` to finish it.
pub fn start(
    pool: PgPool,
    claim: Claim,
    path: PathBuf,
) -> (ConsoleTx, tokio::task::JoinHandle<std::io::Result<ConsoleFile>>) {
    let (tx, rx) = mpsc::channel(256);
    (ConsoleTx(tx), tokio::spawn(pump(pool, claim, path, rx)))
}

async fn pump(
    pool: PgPool,
    claim: Claim,
    path: PathBuf,
    mut rx: mpsc::Receiver<Bytes>,
) -> std::io::Result<ConsoleFile> {
    let mut file = tokio::io::BufWriter::new(tokio::fs::File::create(&path).await?);
    let mut live = LiveCopy::new(pool, claim);
    let mut total = 0u64;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(chunk) => {
                    file.write_all(&chunk).await?;
                    total += chunk.len() as u64;
                    if live.push(&chunk) >= FLUSH_BYTES {
                        live.send();
                    }
                }
                None => break,
            },
            written = live.written(), if live.is_sending() => live.settle(written),
            _ = tick.tick() => live.send(),
        }
    }
    file.flush().await?;
    live.drain(LAST_FLUSH).await;
    Ok(ConsoleFile { path, bytes: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_timestamped_and_partial_lines_wait_for_their_end() {
        let mut stamper = Timestamper::default();
        let mut out = BytesMut::new();
        stamper.push(0, b"hel", &mut out);
        assert!(out.is_empty());
        stamper.push(1, b"oops\n", &mut out);
        stamper.push(0, b"lo\nwor", &mut out);
        stamper.finish(&mut out);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, ["oops", "hello", "wor"]);
        assert!(text.lines().all(|l| l.starts_with("20") && l.as_bytes()[10] == b'T'));
    }
}
