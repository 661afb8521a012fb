//! What a git job's config file may choose, and what the job's owner allows: the repository
//! proposes, the job's owner allows (as with `secrets`).
//!
//! - **Queues.** `queue:` in the config file picks a resource class, which may be a pool of agents
//!   with more privilege or capacity. It must be the job's own `queue` or one of its
//!   `allowedQueues`, so every queue a run lands on is one a job's spec names: a config file never
//!   makes the broker declare a queue of its own choosing.
//! - **Images.** `image:` and each service's `image:` must match one of the job's `allowedImages`
//!   patterns when the job lists any. When it lists none, runs of trusted changes may name any
//!   image, and runs of pull requests from forks only images pinned by digest
//!   (`name@sha256:<64 hex>`), whose content cannot change after review.
//! - **Builds.** A fork's pull request may not build its own image (`build:`) unless the job sets
//!   `github.buildsForForks`: the Dockerfile's `FROM` is pulled with the agents' registry
//!   credentials, and the Dockerfile is the fork author's.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::job::GitJob;
use crate::repo::RepoConfig;
use crate::subscription::glob_matches;

/// An image pattern in a job's `allowedImages`: `*` matches any run of characters (`/`, `:` and
/// `@` included), everything else itself: `busybox:*`, `registry.example/ci/*@sha256:*`.
#[derive(Clone, PartialEq, Eq)]
pub struct ImagePattern(String);

impl ImagePattern {
    /// 1 to 512 characters without whitespace, with at most four `*`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let ok = !pattern.is_empty()
            && pattern.len() <= 512
            && pattern.matches('*').count() <= 4
            && !pattern.chars().any(|c| c.is_whitespace() || c.is_control());
        if ok {
            Ok(Self(pattern.to_owned()))
        } else {
            Err(format!("image pattern `{pattern}` must be 1 to 512 characters without spaces, with at most four `*`"))
        }
    }

    pub fn matches(&self, image: &str) -> bool {
        glob_matches(self.0.as_bytes(), image.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ImagePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for ImagePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ImagePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pattern = String::deserialize(d)?;
        ImagePattern::parse(&pattern).map_err(de::Error::custom)
    }
}

/// Whether the image is named by its content: `…@sha256:` and 64 lowercase hex digits.
pub fn pinned_by_digest(image: &str) -> bool {
    image.rsplit_once("@sha256:").is_some_and(|(name, digest)| {
        !name.is_empty()
            && digest.len() == 64
            && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl GitJob {
    /// Whether the job allows what `config` chooses: its queue, its images and a build. `job` names
    /// the job in the answer; `from_fork`: the run is a pull request's from a fork. The error says
    /// what to change.
    pub fn admits(&self, job: &str, config: &RepoConfig, from_fork: bool) -> Result<(), String> {
        if let Some(queue) = &config.queue {
            if *queue != self.queue && !self.allowed_queues.contains(queue) {
                let allowed: Vec<String> =
                    std::iter::once(&self.queue).chain(&self.allowed_queues).map(|q| format!("`{q}`")).collect();
                return Err(format!(
                    "queue `{queue}` is not in job `{job}`'s allowedQueues (it may use {}): remove `queue:` from \
                     the config file, or have the job's owner add `{queue}` to the job's `allowedQueues`",
                    allowed.join(", ")
                ));
            }
        }
        if config.build.is_some() && from_fork && !self.github.as_ref().is_some_and(|github| github.builds_for_forks) {
            return Err(format!(
                "a pull request from a fork cannot build its own image (`build:`) in job `{job}`: its Dockerfile would \
                 pull with the agents' registry credentials; use an `image:` the job allows, or have the job's owner \
                 set `github.buildsForForks`"
            ));
        }
        let images = config
            .image
            .iter()
            .map(|image| ("image", image.as_str()))
            .chain(config.services.iter().map(|(name, service)| (name.as_str(), service.image.as_str())));
        for (what, image) in images {
            let what = if what == "image" { "image".to_owned() } else { format!("service `{what}`'s image") };
            if !self.allowed_images.is_empty() {
                if !self.allowed_images.iter().any(|pattern| pattern.matches(image)) {
                    let allowed: Vec<String> =
                        self.allowed_images.iter().map(|pattern| format!("`{}`", pattern.as_str())).collect();
                    return Err(format!(
                        "{what} `{image}` matches none of job `{job}`'s allowedImages ({}): use an image they allow, \
                         or have the job's owner add a pattern for it",
                        allowed.join(", ")
                    ));
                }
            } else if from_fork && !pinned_by_digest(image) {
                return Err(format!(
                    "{what} `{image}` of a pull request from a fork must be pinned by digest (`name@sha256:<64 hex \
                     digits>`), or match a pattern in job `{job}`'s `allowedImages`"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "repo"))]
mod tests {
    use super::*;
    use crate::job::JobSpec;
    use serde_json::json;

    fn job(extra: serde_json::Value) -> GitJob {
        let mut body = json!({"kind": "git", "repository": "https://git.example/org/repo.git"});
        body.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
        match serde_json::from_value(body).expect("a valid job") {
            JobSpec::Git(git) => git,
            JobSpec::Freestyle(_) => unreachable!(),
        }
    }

    fn config(text: &str) -> RepoConfig {
        RepoConfig::parse(text).expect("a valid config")
    }

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_config_picks_only_the_queues_the_job_allows() {
        let plain = job(json!({}));
        assert!(plain.admits("unit", &config("image: a\nscript: x\n"), false).is_ok());
        assert!(plain.admits("unit", &config("image: a\nscript: x\nqueue: default\n"), false).is_ok());
        let err = plain.admits("unit", &config("image: a\nscript: x\nqueue: gpu\n"), false).unwrap_err();
        assert!(err.starts_with("queue `gpu` is not in job `unit`'s allowedQueues (it may use `default`)"), "{err}");
        let wider = job(json!({"allowedQueues": ["gpu"]}));
        assert!(wider.admits("unit", &config("image: a\nscript: x\nqueue: gpu\n"), false).is_ok());
        assert!(wider.admits("unit", &config("image: a\nscript: x\nqueue: large\n"), false).is_err());
    }

    #[test]
    fn forks_name_images_by_digest_or_from_the_allowlist() {
        let plain = job(json!({}));
        assert!(plain.admits("unit", &config("image: busybox:latest\nscript: x\n"), false).is_ok());
        let err = plain.admits("unit", &config("image: busybox:latest\nscript: x\n"), true).unwrap_err();
        assert!(err.contains("image `busybox:latest` of a pull request from a fork must be pinned by digest"), "{err}");
        let pinned = format!("image: busybox@sha256:{DIGEST}\nscript: x\n");
        assert!(plain.admits("unit", &config(&pinned), true).is_ok());
        let service = format!("image: a@sha256:{DIGEST}\nscript: x\nservices:\n  db: {{image: postgres:16}}\n");
        let err = plain.admits("unit", &config(&service), true).unwrap_err();
        assert!(err.starts_with("service `db`'s image `postgres:16`"), "{err}");

        let listed = job(json!({"allowedImages": ["busybox:*", "registry.example/ci/*@sha256:*"]}));
        assert!(listed.admits("unit", &config("image: busybox:1.36\nscript: x\n"), true).is_ok());
        let ci = format!("image: registry.example/ci/rust@sha256:{DIGEST}\nscript: x\n");
        assert!(listed.admits("unit", &config(&ci), true).is_ok());
        // The list holds for every run once it is set, trusted or not.
        let err = listed.admits("unit", &config("image: registry.internal/secret:1\nscript: x\n"), false).unwrap_err();
        assert!(err.contains("matches none of job `unit`'s allowedImages (`busybox:*`"), "{err}");
        assert!(listed.admits("unit", &config("image: registry.example/ci/rust:1\nscript: x\n"), true).is_err());
    }

    #[test]
    fn forks_build_only_when_the_job_says_so() {
        let plain = job(json!({}));
        assert!(plain.admits("unit", &config("build: {}\nscript: x\n"), false).is_ok());
        let err = plain.admits("unit", &config("build: {}\nscript: x\n"), true).unwrap_err();
        assert!(err.contains("cannot build its own image"), "{err}");
        let builds = job(json!({"github": {"repository": "o/r", "buildsForForks": true}}));
        assert!(builds.admits("unit", &config("build: {}\nscript: x\n"), true).is_ok());
    }

    #[test]
    fn digests_and_patterns() {
        assert!(pinned_by_digest(&format!("busybox@sha256:{DIGEST}")));
        assert!(!pinned_by_digest(&format!("@sha256:{DIGEST}")));
        assert!(!pinned_by_digest("busybox@sha256:0123"));
        assert!(!pinned_by_digest(&format!("busybox@sha256:{}", DIGEST.to_uppercase())));
        assert!(ImagePattern::parse("a b").is_err());
        assert!(ImagePattern::parse("*****").is_err());
        let json = json!({"allowedImages": ["bad pattern"]});
        let err = serde_json::from_value::<JobSpec>(json!({"kind": "git", "repository": "https://h/r",
            "allowedImages": json["allowedImages"]}))
        .unwrap_err();
        assert!(err.to_string().contains("image pattern `bad pattern`"), "{err}");
    }
}
