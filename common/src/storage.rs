//! Where run output lives in S3, and how to reach it. Shared so the agent writes exactly where the
//! master reads.

use std::time::Duration;

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use secrecy::{ExposeSecret, SecretString};

use crate::RunId;

#[derive(Debug, Clone, clap::Args)]
pub struct S3Config {
    /// S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO or s3s-fs; AWS's when unset.
    #[arg(id = "s3_endpoint", long = "s3-endpoint", env = "CIMASTER_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    #[arg(id = "s3_bucket", long = "s3-bucket", env = "CIMASTER_S3_BUCKET", default_value = "cimaster")]
    pub bucket: String,
    #[arg(id = "s3_region", long = "s3-region", env = "CIMASTER_S3_REGION", default_value = "us-east-1")]
    pub region: String,
    #[arg(id = "s3_access_key", long = "s3-access-key", env = "CIMASTER_S3_ACCESS_KEY")]
    pub access_key: String,
    #[arg(id = "s3_secret_key", long = "s3-secret-key", env = "CIMASTER_S3_SECRET_KEY", hide_env_values = true)]
    pub secret_key: SecretString,
    /// Path-style URLs (`endpoint/bucket/key`), as MinIO and s3s-fs need.
    #[arg(id = "s3_path_style", long = "s3-path-style", env = "CIMASTER_S3_PATH_STYLE", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub path_style: bool,
}

impl S3Config {
    pub fn client(&self) -> aws_sdk_s3::Client {
        let credentials =
            Credentials::new(&self.access_key, self.secret_key.expose_secret(), None, None, "cimaster-config");
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(self.path_style)
            // An unreachable S3 (packets dropped) fails a request instead of hanging it; the caller
            // decides what waits.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_s3::Client::from_conf(builder.build())
    }
}

/// The console log of one attempt.
pub fn console_key(run: RunId, attempt: u32) -> String {
    format!("runs/{run}/{attempt}/console.log")
}

/// Where a collected result file of an attempt is stored.
pub fn result_key(run: RunId, attempt: u32, kind: &str, name: &str) -> String {
    format!("runs/{run}/{attempt}/results/{kind}/{name}")
}
