//! Registry credentials, each bound to its registry. They are read from a Docker `config.json`
//! (`{"auths": {"registry.example:5000": {"auth": "<base64 user:password>"}}}`, what `docker login`
//! writes), and an image pull carries only the credentials of the registry that image names: a job
//! naming `some-host:5000/x` gets nothing of another registry's password.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use bollard::auth::DockerCredentials;
use serde::Deserialize;

/// Docker Hub's name, whatever a `config.json` key or an image reference calls it.
const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, thiserror::Error)]
pub enum RegistryAuthError {
    #[error("cannot read registry credentials {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("registry credentials {path} are not a Docker config.json: {source}")]
    Format { path: String, source: serde_json::Error },
    #[error("registry credentials for `{0}`: `auth` must be base64 of `user:password`")]
    BadAuth(String),
    #[error("registry credentials for `{0}` hold neither `auth`, `username`/`password` nor `identitytoken`")]
    Empty(String),
}

/// Credentials per registry host.
#[derive(Clone, Default)]
pub struct RegistryAuths {
    /// (registry host, the key as the file spells it, credentials).
    entries: Vec<(String, String, DockerCredentials)>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl RegistryAuths {
    pub fn load(path: &Path) -> Result<Self, RegistryAuthError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| RegistryAuthError::Read { path: shown.clone(), source })?;
        let file: ConfigFile =
            serde_json::from_str(&text).map_err(|source| RegistryAuthError::Format { path: shown, source })?;
        let mut entries = Vec::new();
        for (key, entry) in file.auths {
            let host = registry_host(&key);
            let credentials = credentials(&key, &host, entry)?;
            entries.push((host, key, credentials));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { entries })
    }

    /// The registries credentials are held for.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(host, _, _)| host.as_str())
    }

    /// The credentials for the registry `image` is pulled from, if any.
    pub fn for_image(&self, image: &str) -> Option<DockerCredentials> {
        let registry = image_registry(image);
        self.entries.iter().find(|(host, _, _)| *host == registry).map(|(_, _, credentials)| credentials.clone())
    }

    /// Every registry's credentials for a build, keyed as Docker's `X-Registry-Config` expects: the
    /// engine picks each `FROM` image's own registry from them.
    pub fn for_build(&self) -> Option<HashMap<String, DockerCredentials>> {
        if self.entries.is_empty() {
            return None;
        }
        Some(self.entries.iter().map(|(_, key, credentials)| (key.clone(), credentials.clone())).collect())
    }
}

fn credentials(key: &str, host: &str, entry: Entry) -> Result<DockerCredentials, RegistryAuthError> {
    let (username, password) = match (entry.auth, entry.username, entry.password) {
        (Some(auth), _, _) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| RegistryAuthError::BadAuth(key.to_owned()))?;
            let (user, password) = decoded.split_once(':').ok_or_else(|| RegistryAuthError::BadAuth(key.to_owned()))?;
            (Some(user.to_owned()), Some(password.to_owned()))
        }
        (None, username, password) => (username, password),
    };
    if username.is_none() && entry.identitytoken.is_none() {
        return Err(RegistryAuthError::Empty(key.to_owned()));
    }
    Ok(DockerCredentials {
        username,
        password,
        identitytoken: entry.identitytoken,
        serveraddress: Some(if host == DOCKER_HUB {
            "https://index.docker.io/v1/".to_owned()
        } else {
            host.to_owned()
        }),
        ..Default::default()
    })
}

/// The registry host a `config.json` key names: `https://index.docker.io/v1/` → `docker.io`,
/// `https://registry.example:5000/v2/` → `registry.example:5000`.
fn registry_host(key: &str) -> String {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = without_scheme.split('/').next().unwrap_or_default().to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.to_owned(),
        _ => host,
    }
}

/// The registry an image reference pulls from, by Docker's rule: the first path component when it
/// has a `.` or `:` or is `localhost`, Docker Hub otherwise.
pub fn image_registry(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => registry_host(first),
        _ => DOCKER_HUB.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auths(json: &str) -> RegistryAuths {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), json).unwrap();
        RegistryAuths::load(file.path()).unwrap()
    }

    #[test]
    fn images_name_their_registry_as_docker_does() {
        assert_eq!(image_registry("busybox:latest"), "docker.io");
        assert_eq!(image_registry("library/busybox"), "docker.io");
        assert_eq!(image_registry("org/app:1"), "docker.io");
        assert_eq!(image_registry("docker.io/org/app"), "docker.io");
        assert_eq!(image_registry("registry.example/org/app"), "registry.example");
        assert_eq!(image_registry("some-host:5000/x:y"), "some-host:5000");
        assert_eq!(image_registry("localhost/x"), "localhost");
        assert_eq!(image_registry("127.0.0.1:5000/x@sha256:abc"), "127.0.0.1:5000");
    }

    #[test]
    fn credentials_go_to_their_registry_only() {
        let basic = base64::engine::general_purpose::STANDARD.encode("ci:s3cret");
        let auths = auths(&format!(
            r#"{{"auths": {{"registry.example:5000": {{"auth": "{basic}"}},
                "https://index.docker.io/v1/": {{"username": "hub-user", "password": "hub-pass"}}}}}}"#
        ));
        let private = auths.for_image("registry.example:5000/team/app:1").unwrap();
        assert_eq!(private.username.as_deref(), Some("ci"));
        assert_eq!(private.password.as_deref(), Some("s3cret"));
        assert_eq!(private.serveraddress.as_deref(), Some("registry.example:5000"));
        let hub = auths.for_image("rust:1.95").unwrap();
        assert_eq!(hub.username.as_deref(), Some("hub-user"));
        assert!(auths.for_image("some-host:5000/x:y").is_none());
        assert!(auths.for_image("registry.example/team/app").is_none(), "another port is another registry");
        assert_eq!(auths.registries().collect::<Vec<_>>(), ["docker.io", "registry.example:5000"]);
        let build = auths.for_build().unwrap();
        assert!(build.contains_key("registry.example:5000") && build.contains_key("https://index.docker.io/v1/"));
    }

    #[test]
    fn unusable_files_are_refused_at_start() {
        let file = tempfile::NamedTempFile::new().unwrap();
        for bad in [
            r#"{"auths": {"r.example": {"auth": "not base64!"}}}"#,
            r#"{"auths": {"r.example": {}}}"#,
            r#"{"auths": "x"}"#,
        ] {
            std::fs::write(file.path(), bad).unwrap();
            assert!(RegistryAuths::load(file.path()).is_err(), "{bad}");
        }
    }
}
