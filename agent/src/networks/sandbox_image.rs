//! The image of the networks' sandboxes. It is pulled when a new network first needs it, for no
//! longer than `wait`: a sandbox only saves work, so a run never waits long on it. When the image
//! cannot be had, new networks go without sandboxes (their runs get endpoints of their own) for
//! `RETRY_AFTER` before it is asked for again, rather than each new network trying once more.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::docker::DockerClient;

/// How long new networks go without sandboxes after their image could not be had.
const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long a new network waits for its sandbox's image, unless told otherwise.
const WAIT: Duration = Duration::from_secs(30);

pub(super) struct SandboxImage {
    pub name: String,
    wait: Duration,
    /// When the image last could not be had.
    missed: Mutex<Option<Instant>>,
}

impl SandboxImage {
    pub fn new(name: String) -> Self {
        Self { name, wait: WAIT, missed: Mutex::new(None) }
    }

    #[cfg(test)]
    pub fn waiting_up_to(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Whether the image is here, pulled if need be.
    pub async fn ready(&self, docker: &DockerClient) -> bool {
        if self.missed().is_some_and(|at| at.elapsed() < RETRY_AFTER) {
            return false;
        }
        let error = match tokio::time::timeout(self.wait, docker.ensure_image(&self.name)).await {
            Ok(Ok(())) => return true,
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("not pulled within {} s", self.wait.as_secs()),
        };
        tracing::warn!(
            image = self.name,
            error,
            "no sandbox image: new networks' runs get endpoints of their own for {} s",
            RETRY_AFTER.as_secs()
        );
        *self.missed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
        false
    }

    fn missed(&self) -> Option<Instant> {
        *self.missed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
