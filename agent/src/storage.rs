//! The agent's objects in S3: console logs and result files, streamed from disk.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::io::AsyncReadExt;

const PART_BYTES: usize = 8 * 1024 * 1024;

/// Uploads a file to S3 without loading it into memory: one request, or a multipart upload above one
/// part's size.
pub async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    content_type: &str,
) -> anyhow::Result<()> {
    let _timer = crate::telemetry::Timer::s3_upload();
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

/// Stores a small object from memory.
pub async fn put(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    data: Vec<u8>,
    content_type: &str,
) -> anyhow::Result<()> {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .body(data.into())
        .send()
        .await
        .map_err(|err| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(err)))?;
    Ok(())
}
