//! Containers' output: split into timestamped lines, secrets masked, then sent to the console (the
//! job, the checkout) or collected in memory (sidecars).

use bytes::{Bytes, BytesMut};
use cimaster_common::secrets::Masker;
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::console::{ConsoleTx, Timestamper};
use crate::docker::{Chunk, Output};

/// Largest service log kept; later output is dropped with a note.
const MAX_SERVICE_LOG: usize = 16 << 20;

/// Turns a container's output chunks into timestamped, masked lines. Lines are complete when they
/// come out, so a secret written in pieces is whole again before masking.
struct MaskedLines {
    output: Output,
    masker: Masker,
    stamper: Timestamper,
    lines: BytesMut,
    ended: bool,
}

impl MaskedLines {
    fn new(output: Output, masker: Masker) -> Self {
        let stamper = Timestamper::keeping_whole(masker.clone());
        Self { output, masker, stamper, lines: BytesMut::new(), ended: false }
    }

    /// The next complete lines; `Err` once if the stream broke (the lines so far follow it); `None`
    /// at the end.
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            if !self.lines.is_empty() {
                let lines = self.lines.split();
                return Some(Ok(if self.masker.is_empty() { lines.freeze() } else { self.masker.mask(&lines).into() }));
            }
            if self.ended {
                return None;
            }
            match self.output.next().await {
                Some(Ok(Chunk::Stdout(data))) => self.stamper.push(0, &data, &mut self.lines),
                Some(Ok(Chunk::Stderr(data))) => self.stamper.push(1, &data, &mut self.lines),
                Some(Err(err)) => {
                    self.ended = true;
                    self.stamper.finish(&mut self.lines);
                    return Some(Err(err.to_string()));
                }
                None => {
                    self.ended = true;
                    self.stamper.finish(&mut self.lines);
                }
            }
        }
    }
}

/// Streams a container's output into the console.
pub(super) fn pump_to_console(output: Output, masker: Masker, console: ConsoleTx) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = MaskedLines::new(output, masker);
        while let Some(next) = lines.next().await {
            match next {
                Ok(data) => console.send(data).await,
                Err(err) => console.note(&format!("console stream interrupted: {err}")).await,
            }
        }
    })
}

/// Collects a sidecar's output until it stops.
pub(super) fn pump_to_memory(output: Output, masker: Masker) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut lines = MaskedLines::new(output, masker);
        let mut log = Vec::new();
        while let Some(next) = lines.next().await {
            let Ok(data) = next else { continue };
            if log.len() <= MAX_SERVICE_LOG {
                log.extend_from_slice(&data);
                if log.len() > MAX_SERVICE_LOG {
                    log.extend_from_slice(b"\n[cimaster] the service log was cut at 16 MiB\n");
                }
            }
        }
        log
    })
}
