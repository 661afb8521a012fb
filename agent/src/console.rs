//! An attempt's console: lines go to a local file (the full log) and, every 200 ms, to Postgres so
//! every master replica can serve them live (`live`). When the attempt ends, the file is uploaded to
//! S3 (`storage`).

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cimaster_common::secrets::Masker;
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
/// stdout and stderr keep separate partial lines, so their lines never mix. A line longer than
/// 64 KiB is cut in pieces, never through a secret (each piece is masked on its own).
#[derive(Default)]
pub struct Timestamper {
    partial: [Vec<u8>; 2],
    secrets: Masker,
}

impl Timestamper {
    const MAX_LINE: usize = 64 * 1024;

    /// A stamper whose long-line cuts keep these secrets whole.
    pub fn keeping_whole(secrets: Masker) -> Self {
        Self { partial: Default::default(), secrets }
    }

    /// `stream`: 0 for stdout, 1 for stderr.
    pub fn push(&mut self, stream: usize, data: &[u8], out: &mut BytesMut) {
        let now = timestamp();
        let partial = &mut self.partial[stream];
        for piece in data.split_inclusive(|b| *b == b'\n') {
            partial.extend_from_slice(piece);
            if partial.ends_with(b"\n") {
                stamp(&now, partial, out);
                partial.clear();
            } else if partial.len() >= Self::MAX_LINE {
                let cut = long_line_cut(&self.secrets, partial);
                stamp(&now, &partial[..cut], out);
                partial.drain(..cut);
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

/// Writes one stamped line (`line` with or without its newline).
fn stamp(now: &str, line: &[u8], out: &mut BytesMut) {
    out.extend_from_slice(now.as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(line);
    if !line.ends_with(b"\n") {
        out.extend_from_slice(b"\n");
    }
}

/// Where a line too long to wait for its end is cut: what could be the start of a secret still
/// arriving is held back, and the cut moves before any secret it would split (at the end when a
/// secret is as long as the line itself).
fn long_line_cut(secrets: &Masker, partial: &[u8]) -> usize {
    let hold = secrets.longest().saturating_sub(1);
    match secrets.safe_cut(partial, partial.len().saturating_sub(hold)) {
        0 => partial.len(),
        cut => cut,
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

    #[test]
    fn a_long_line_is_never_cut_through_a_secret() {
        let secret = "hunter2-very-secret-value";
        let masker = Masker::new([secret]);
        // The secret straddles the 64 KiB cut, and arrives in two writes.
        for before in [Timestamper::MAX_LINE - 10, Timestamper::MAX_LINE - 1, Timestamper::MAX_LINE - 24] {
            let mut stamper = Timestamper::keeping_whole(masker.clone());
            let mut out = BytesMut::new();
            stamper.push(0, "x".repeat(before).as_bytes(), &mut out);
            stamper.push(0, &secret.as_bytes()[..5], &mut out);
            stamper.push(0, &secret.as_bytes()[5..], &mut out);
            stamper.push(0, "y".repeat(100).as_bytes(), &mut out);
            stamper.push(0, b" tail\n", &mut out);
            let masked = String::from_utf8(masker.mask(&out)).unwrap();
            assert_eq!(masked.lines().count(), 2, "cut once");
            for piece in secret.as_bytes().windows(5) {
                assert!(!masked.contains(std::str::from_utf8(piece).unwrap()), "part of the secret left at {before}");
            }
            assert!(masked.contains("***yyy"), "the secret is masked whole");
            assert!(masked.lines().all(|line| line.len() <= Timestamper::MAX_LINE + 40));
        }
    }
}
