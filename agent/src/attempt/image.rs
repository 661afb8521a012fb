//! The job's image: one that is present (or pulled), or one built from the repository's
//! Dockerfile — reused when an earlier run built the same Dockerfile and context (the image is
//! tagged with the context's digest).

use std::collections::HashMap;

use cimaster_common::{BuildSpec, Resources};

use crate::docker::BuildLimits;

use super::{Attempt, AttemptError, Stop};
use crate::archive;

impl Attempt<'_> {
    /// A ready-made image, pulled unless present.
    pub(super) async fn ready_made_image(&self, image: &str) -> Result<(), Stop> {
        Ok(self.interrupts.step(self.executor.docker.ensure_image(image)).await??)
    }

    /// The image built from the repository's Dockerfile; the build is held to the run's resources
    /// and network. `origin` names the repository and whose credentials read it.
    pub(super) async fn build(&self, build: &BuildSpec, origin: &str, resources: &Resources) -> Result<String, Stop> {
        Ok(self.interrupts.step(self.build_inner(build, origin, resources)).await??)
    }

    async fn build_inner(
        &self,
        build: &BuildSpec,
        origin: &str,
        resources: &Resources,
    ) -> Result<String, AttemptError> {
        let docker = &self.executor.docker;
        let Some(workspace) = &self.held.workspace else {
            return Err(AttemptError::Build("`build` needs the repository's checkout".into()));
        };
        let reader = tokio_util::io::StreamReader::new(docker.download(&workspace.helper, &workspace.dir));
        let (context, dockerfile) = (build.context.clone(), build.dockerfile.clone());
        let built = tokio::task::spawn_blocking(move || {
            archive::build_context(tokio_util::io::SyncIoBridge::new(reader), &context, &dockerfile)
        })
        .await
        .map_err(|err| AttemptError::Build(format!("reading the build context failed: {err}")))?
        .map_err(AttemptError::Build)?;
        // The tag names the repository (and whose credentials read it) beside the context: a run
        // reuses only its own repository's builds, never one another repository made of the same
        // files (a build is not a pure function of its context).
        let tag = build_tag(origin, &built.digest);
        if docker.image_exists(&tag).await {
            self.console.note(&format!("reusing image {tag}: the Dockerfile and its context are unchanged")).await;
            return Ok(tag);
        }
        self.console.note(&format!("building {} (context `{}`) as {tag}", build.dockerfile, build.context)).await;
        let labels = HashMap::from([
            ("cimaster.job".to_owned(), self.claim.job.clone()),
            ("cimaster.context-digest".to_owned(), built.digest.clone()),
        ]);
        let network = self.network().name.clone();
        let limits = BuildLimits { cpus: resources.cpus, memory: resources.memory.bytes(), network };
        // Build output goes to the console as it comes, without holding up the build.
        let (lines, mut printed) = tokio::sync::mpsc::unbounded_channel::<String>();
        let printer = {
            let console = self.console.clone();
            tokio::spawn(async move {
                while let Some(line) = printed.recv().await {
                    console.output_note(&line).await;
                }
            })
        };
        let result = docker
            .build_image(bytes::Bytes::from(built.tar), &built.dockerfile, &tag, labels, limits, |line| {
                let _ = lines.send(line);
            })
            .await;
        drop(lines);
        let _ = printer.await;
        result.map_err(|err| AttemptError::Build(err.to_string()))?;
        Ok(tag)
    }
}

/// The tag of an image built from `origin`'s context with this digest.
fn build_tag(origin: &str, context_digest: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(format!("{origin}\n{context_digest}").as_bytes()));
    format!("{}:{}", cimaster_common::BUILT_IMAGES, &digest[..32])
}

#[cfg(test)]
mod tests {
    use super::build_tag;

    #[test]
    fn a_build_tag_is_its_repositorys_own() {
        let ours = build_tag("https://git.example/org/app.git\ntoken:app:GIT_TOKEN", "abc");
        assert!(ours.starts_with("cimaster-build:"), "{ours}");
        assert_eq!(ours, build_tag("https://git.example/org/app.git\ntoken:app:GIT_TOKEN", "abc"));
        assert_ne!(ours, build_tag("https://git.example/evil/app.git\nanonymous", "abc"));
        assert_ne!(ours, build_tag("https://git.example/org/app.git\ntoken:app:GIT_TOKEN", "abd"));
    }
}
