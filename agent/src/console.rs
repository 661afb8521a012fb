//! An attempt's console: lines go to a local file (the full log) and, every 200 ms, to Postgres so
//! every master replica can serve them live. When the attempt ends, the file is uploaded to S3.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::store::{self, Claim};

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 256 * 1024;
const PART_BYTES: usize = 8 * 1024 * 1024;

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
    let mut pending = BytesMut::new();
    let mut seq = 0i64;
    let mut total = 0u64;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let more = tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(chunk) => {
                    file.write_all(&chunk).await?;
                    total += chunk.len() as u64;
                    pending.extend_from_slice(&chunk);
                    pending.len() >= FLUSH_BYTES
                }
                None => break,
            },
            _ = tick.tick() => !pending.is_empty(),
        };
        if more {
            flush(&pool, &claim, &mut seq, &mut pending).await;
        }
    }
    flush(&pool, &claim, &mut seq, &mut pending).await;
    file.flush().await?;
    Ok(ConsoleFile { path, bytes: total })
}

async fn flush(pool: &PgPool, claim: &Claim, seq: &mut i64, pending: &mut BytesMut) {
    if pending.is_empty() {
        return;
    }
    let chunk = pending.split().freeze();
    // Live output is a convenience; the file is the record. A failed insert is retried a few times,
    // then the live view has a gap until the stored log replaces it.
    for delay in [50, 200, 1000] {
        match store::append_console(pool, claim, *seq, &chunk).await {
            Ok(()) => break,
            Err(err) => {
                tracing::warn!(run_id = %claim.run, error = %err, "cannot store live console output");
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
    }
    *seq += 1;
}

/// Uploads a file to S3 without loading it into memory: one PUT when small, multipart when large.
/// Uploads a file to S3 without loading it into memory: one request, or a multipart upload above one
/// part's size.
pub async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    content_type: &str,
) -> anyhow::Result<()> {
    let size = tokio::fs::metadata(path).await?.len();
    if size <= PART_BYTES as u64 {
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from_path(path).await?)
            .send()
            .await?;
        return Ok(());
    }
    let upload = s3.create_multipart_upload().bucket(bucket).key(key).content_type(content_type).send().await?;
    let upload_id = upload.upload_id().ok_or_else(|| anyhow::anyhow!("S3 returned no upload id"))?.to_owned();
    let result = async {
        let mut file = tokio::fs::File::open(path).await?;
        let mut parts = Vec::new();
        let mut number = 1;
        loop {
            let mut buffer = Vec::with_capacity(PART_BYTES);
            (&mut file).take(PART_BYTES as u64).read_to_end(&mut buffer).await?;
            if buffer.is_empty() {
                break;
            }
            let part = s3
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(buffer))
                .send()
                .await?;
            parts.push(CompletedPart::builder().set_e_tag(part.e_tag().map(str::to_owned)).part_number(number).build());
            number += 1;
        }
        s3.complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await?;
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        let _ = s3.abort_multipart_upload().bucket(bucket).key(key).upload_id(&upload_id).send().await;
    }
    result
}

/// Creates the bucket if it does not exist yet.
pub async fn ensure_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> anyhow::Result<()> {
    if s3.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(());
    }
    match s3.create_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(err) if s3.head_bucket().bucket(bucket).send().await.is_ok() => {
            tracing::debug!(error = %err, "bucket created concurrently");
            Ok(())
        }
        Err(err) => Err(err.into()),
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
}
