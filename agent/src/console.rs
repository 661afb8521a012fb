//! An attempt's console: lines go to a local file (the full log) and, every 200 ms, to Postgres so
//! every master replica can serve them live (`live`). When the attempt ends, the file is uploaded to
//! S3 (`storage`).

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cimaster_common::secrets::Masker;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::live::LiveCopy;

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 256 * 1024;
/// How long the end of an attempt waits for the last live output to reach Postgres.
const LAST_FLUSH: Duration = Duration::from_secs(5);

/// What the console is sent: the job's output (kept up to the limit) or the agent's own notes
/// (always kept; they are few and short).
enum Piece {
    Output(Bytes),
    Note(Bytes),
}

/// Where to send console output.
#[derive(Clone)]
pub struct ConsoleTx(mpsc::Sender<Piece>);

impl ConsoleTx {
    /// Output of the job (whole, masked lines).
    pub async fn send(&self, data: Bytes) {
        let _ = self.0.send(Piece::Output(data)).await;
    }

    /// A line from the agent itself, marked so it stands out from the job's output.
    pub async fn note(&self, text: &str) {
        let _ = self.0.send(Piece::Note(note_line(text))).await;
    }

    /// A line the agent prints on the job's behalf (a build's output): marked like a note, but
    /// counted against the limit like output.
    pub async fn output_note(&self, text: &str) {
        let _ = self.0.send(Piece::Output(note_line(text))).await;
    }
}

fn note_line(text: &str) -> Bytes {
    Bytes::from(format!("{} [cimaster] {text}\n", timestamp()))
}

/// How much of an attempt's console is kept.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleLimits {
    /// In the log file (and S3).
    pub kept: u64,
    /// In the live copy in Postgres: always a prefix of the file.
    pub live: u64,
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

/// Starts the pump, writing the console to `path` and to its live copy; drop every `ConsoleTx` to
/// finish it.
pub fn start(
    live: LiveCopy,
    path: PathBuf,
    limits: ConsoleLimits,
) -> (ConsoleTx, tokio::task::JoinHandle<std::io::Result<ConsoleFile>>) {
    let (tx, rx) = mpsc::channel(256);
    (ConsoleTx(tx), tokio::spawn(pump(live, path, limits, rx)))
}

async fn pump(
    live: LiveCopy,
    path: PathBuf,
    limits: ConsoleLimits,
    mut rx: mpsc::Receiver<Piece>,
) -> std::io::Result<ConsoleFile> {
    let file = tokio::io::BufWriter::new(tokio::fs::File::create(&path).await?);
    let mut log = Log { file, live, limits, written: 0, live_written: 0, live_open: true, dropped: 0 };
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            piece = rx.recv() => match piece {
                Some(Piece::Output(chunk)) => log.output(chunk).await?,
                Some(Piece::Note(chunk)) => log.write(&chunk).await?,
                None => break,
            },
            written = log.live.written(), if log.live.is_sending() => log.live.settle(written),
            _ = tick.tick() => log.live.send(),
        }
    }
    log.finish(path).await
}

/// The log being written: the file, and the live copy while it is within its limit.
struct Log {
    file: tokio::io::BufWriter<tokio::fs::File>,
    live: LiveCopy,
    limits: ConsoleLimits,
    written: u64,
    live_written: u64,
    live_open: bool,
    /// Output not kept, past the limit.
    dropped: u64,
}

impl Log {
    /// Keeps whole chunks (whole masked lines) while they fit; past the limit, counts them.
    async fn output(&mut self, chunk: Bytes) -> std::io::Result<()> {
        let fits = self.written + chunk.len() as u64 <= self.limits.kept;
        if self.dropped == 0 && fits {
            return self.write(&chunk).await;
        }
        if self.dropped == 0 {
            let note = format!(
                "the log is cut here at {} MiB (CIMASTER_AGENT_CONSOLE_LIMIT); later output is counted, not kept",
                self.limits.kept >> 20
            );
            self.write(&note_line(&note)).await?;
        }
        self.dropped += chunk.len() as u64;
        Ok(())
    }

    /// Writes to the file and, up to its own limit, to the live copy, which stays a prefix of the
    /// file: where it stops, a note in both says so.
    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        if self.live_open && self.live_written + chunk.len() as u64 > self.limits.live {
            self.live_open = false;
            let note = note_line(&format!(
                "the live copy of this log ends here at {} MiB (CIMASTER_AGENT_LIVE_CONSOLE_LIMIT); the whole log is \
                 served once the attempt ends",
                self.limits.live >> 20
            ));
            self.file.write_all(&note).await?;
            self.written += note.len() as u64;
            self.live.push(&note);
            self.live.send();
        }
        self.file.write_all(chunk).await?;
        self.written += chunk.len() as u64;
        metrics::counter!(crate::telemetry::CONSOLE_BYTES).increment(chunk.len() as u64);
        if self.live_open {
            self.live_written += chunk.len() as u64;
            if self.live.push(chunk) >= FLUSH_BYTES {
                self.live.send();
            }
        }
        Ok(())
    }

    async fn finish(mut self, path: PathBuf) -> std::io::Result<ConsoleFile> {
        if self.dropped > 0 {
            let note = format!("{} bytes of output past the cut were not kept", self.dropped);
            self.write(&note_line(&note)).await?;
        }
        self.file.flush().await?;
        self.live.drain(LAST_FLUSH).await;
        Ok(ConsoleFile { path, bytes: self.written })
    }
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
