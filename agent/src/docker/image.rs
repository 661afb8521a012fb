//! Images: the job's own, pulled with the registries' credentials, or built from the repository.

use std::collections::HashMap;

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use bytes::Bytes;
use futures::StreamExt;

use super::{DockerClient, DockerError};
use crate::telemetry::Timer;

/// What a build may use: the run's CPUs and memory, on the run's network.
pub struct BuildLimits {
    pub cpus: f64,
    pub memory: u64,
    pub network: String,
}

impl DockerClient {
    /// Uses the image if present, pulls it otherwise.
    pub async fn ensure_image(&self, image: &str) -> Result<(), DockerError> {
        let _timer = Timer::docker("ensure_image");
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let options = CreateImageOptions { from_image: Some(image.to_owned()), ..Default::default() };
        let mut pull = self.docker.create_image(Some(options), None, self.registries.for_image(image));
        while let Some(progress) = pull.next().await {
            progress.map_err(|source| DockerError::Pull { image: image.to_owned(), source })?;
        }
        Ok(())
    }

    pub async fn image_exists(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    /// Builds `tag` from a tar of the build context, passing each line of build output to `line`.
    pub async fn build_image(
        &self,
        context: Bytes,
        dockerfile: &str,
        tag: &str,
        labels: HashMap<String, String>,
        limits: BuildLimits,
        mut line: impl FnMut(String),
    ) -> Result<(), DockerError> {
        let _timer = Timer::docker("build_image");
        let memory = i32::try_from(limits.memory).unwrap_or(i32::MAX);
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(tag.to_owned()),
            rm: true,
            forcerm: true,
            labels: Some(labels),
            memory: Some(memory),
            memswap: Some(memory),
            cpuperiod: Some(100_000),
            cpuquota: Some((limits.cpus * 100_000.0) as i32),
            networkmode: Some(limits.network),
            ..Default::default()
        };
        let mut build =
            self.docker.build_image(options, self.registries.for_build(), Some(bollard::body_full(context)));
        while let Some(info) = build.next().await {
            let info = info.map_err(|err| DockerError::Build(err.to_string()))?;
            if let Some(error) = info.error {
                return Err(DockerError::Build(error));
            }
            if let Some(text) = info.stream.or(info.status) {
                for part in text.lines().filter(|part| !part.trim().is_empty()) {
                    line(part.to_owned());
                }
            }
        }
        if self.image_exists(tag).await {
            Ok(())
        } else {
            Err(DockerError::Build(format!("the engine ended the build without an image tagged {tag}")))
        }
    }
}
