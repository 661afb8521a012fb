//! The job config file a git job keeps in its repository (`.cimaster.yml` by default).
//!
//! The master reads it at the run's commit when the run is triggered and stores the parsed form on
//! the run; the agent executes that. Unknown keys are errors, like everywhere else.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::ids::{EnvName, QueueName};
use crate::job::{default_timeout, image_ref, timeout, ClusterRequirement, Resources, Script};
use crate::results::Results;

/// A parsed job config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepoConfig {
    /// The image the script runs in; exactly one of `image` and `build`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_image")]
    pub image: Option<String>,
    /// Build the image from the repository's own Dockerfile instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    pub script: Script,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    #[serde(default)]
    pub env: BTreeMap<EnvName, String>,
    /// Names of the job's secrets injected as env vars, one each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<EnvName>,
    #[serde(default = "default_timeout", deserialize_with = "timeout")]
    pub timeout_seconds: u32,
    #[serde(default)]
    pub resources: Resources,
    /// Overrides the job's queue when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueName>,
    #[serde(default, skip_serializing_if = "Results::is_empty")]
    pub results: Results,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterRequirement>,
    /// How the workspace is checked out.
    #[serde(default, skip_serializing_if = "CheckoutSpec::is_default")]
    pub checkout: CheckoutSpec,
    /// An OIDC ID token for this audience in `CIMASTER_ID_TOKEN` (instead of the job's `idToken`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<crate::id_token::IdTokenSpec>,
    /// The user the script runs as (`uid[:gid]` or a name) instead of the image's.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::job::user")]
    pub user: Option<String>,
}

/// `checkout:` — how much of the repository the workspace gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckoutSpec {
    /// Only this many commits of history (`git clone --depth`); the whole history by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Check out the repository's submodules too (recursively).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub submodules: bool,
    /// Git LFS files: not fetched (only `false` is accepted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lfs: bool,
}

impl CheckoutSpec {
    fn is_default(&self) -> bool {
        *self == CheckoutSpec::default()
    }

    fn check(&self) -> Result<(), String> {
        if self.depth == Some(0) {
            return Err("checkout.depth must be at least 1 (leave it out for the whole history)".into());
        }
        if self.lfs {
            return Err("checkout.lfs: Git LFS is not supported; set it to false or leave it out".into());
        }
        Ok(())
    }
}

/// `build:` — a Dockerfile and its context, both relative to the repository root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuildSpec {
    #[serde(default = "default_dockerfile", deserialize_with = "repo_path")]
    pub dockerfile: String,
    #[serde(default = "default_context", deserialize_with = "repo_path")]
    pub context: String,
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}

fn default_context() -> String {
    ".".into()
}

/// A sidecar service, reachable from the job by its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(deserialize_with = "image_ref")]
    pub image: String,
    /// Command (run by `sh -c`) instead of the image's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<EnvName, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Readiness>,
    /// The service container's limits, counted in what the run needs of an agent.
    #[serde(default = "service_resources")]
    pub resources: Resources,
}

/// What a service gets unless it says: half a CPU and 256 MiB.
fn service_resources() -> Resources {
    Resources { cpus: 0.5, memory: crate::job::Memory::parse("256Mi").expect("a valid default") }
}

/// When a service counts as ready: one of `command`, `tcp` and `http`, polled until `timeoutSeconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Readiness {
    /// Run inside the service container; ready when it exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Ready when the port accepts a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    /// Ready when `GET path` on the port answers 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    #[serde(default = "default_ready_timeout")]
    pub timeout_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    pub port: u16,
    #[serde(default = "default_http_path")]
    pub path: String,
}

fn default_ready_timeout() -> u32 {
    60
}

fn default_http_path() -> String {
    "/".into()
}

/// A sidecar's name: its DNS alias on the run's network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        let ok = !value.is_empty()
            && value.len() <= 63
            && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with('-')
            && !value.ends_with('-');
        if ok {
            Ok(Self(value))
        } else {
            Err(de::Error::custom(format!(
                "service name `{value}` must be a DNS label: 1 to 63 lowercase letters, digits and `-`"
            )))
        }
    }
}

fn some_image<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    image_ref(d).map(Some)
}

/// A relative path inside the repository, without `..`.
fn repo_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    if value.is_empty() || value.starts_with('/') || value.split('/').any(|part| part == "..") || value.contains('\0') {
        return Err(de::Error::custom(format!("`{value}` must be a path inside the repository (relative, no `..`)")));
    }
    Ok(value)
}

/// Why a config file was refused, with the line when the parser knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl RepoConfig {
    /// Parses and checks a config file's text.
    #[cfg(feature = "repo")]
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: RepoConfig = serde_yaml::from_str(text).map_err(|err| {
            let line = err.location().map(|at| at.line());
            // serde_yaml appends " at line L column C"; the line is reported separately.
            let mut message = err.to_string();
            if let Some(cut) = message.find(" at line ") {
                message.truncate(cut);
            }
            ConfigError { line, message }
        })?;
        config.check().map_err(|message| ConfigError { line: None, message })?;
        Ok(config)
    }

    /// What a run of this config takes of an agent: the job's resources and every service's.
    pub fn demand(&self) -> (f64, u64) {
        self.services.values().fold((self.resources.cpus, self.resources.memory.bytes()), |(cpus, memory), service| {
            (cpus + service.resources.cpus, memory.saturating_add(service.resources.memory.bytes()))
        })
    }

    /// Checks that need more than one field.
    pub fn check(&self) -> Result<(), String> {
        match (&self.image, &self.build) {
            (Some(_), Some(_)) => return Err("set either `image` or `build`, not both".into()),
            (None, None) => return Err("set `image` (e.g. `busybox:latest`) or `build` (a Dockerfile)".into()),
            _ => {}
        }
        self.checkout.check()?;
        for (name, service) in &self.services {
            if let Some(ready) = &service.ready {
                let checks = usize::from(ready.command.is_some())
                    + usize::from(ready.tcp.is_some())
                    + usize::from(ready.http.is_some());
                if checks != 1 {
                    return Err(format!("service `{name}`: `ready` needs exactly one of `command`, `tcp` and `http`"));
                }
                if ready.timeout_seconds == 0 || ready.timeout_seconds > 3600 {
                    return Err(format!("service `{name}`: ready.timeoutSeconds must be between 1 and 3600"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "repo"))]
mod tests {
    use super::*;

    const FULL: &str = r#"
image: busybox:latest
script:
  - make
  - make test
services:
  db:
    image: postgres:16
    env: {POSTGRES_PASSWORD: test}
    ready: {tcp: 5432, timeoutSeconds: 30}
  web:
    image: busybox:latest
    command: httpd -f -p 8080
    ready: {http: {port: 8080, path: /health}}
env: {RUST_LOG: debug}
secrets: [NPM_TOKEN]
timeoutSeconds: 900
resources: {cpus: 2, memory: 1Gi}
queue: large
results:
  junit: ["target/junit/*.xml"]
  artifacts: ["dist/**"]
cluster: {purpose: tess-ci}
"#;

    #[test]
    fn every_key_of_the_documented_format() {
        let config = RepoConfig::parse(FULL).unwrap();
        assert_eq!(config.image.as_deref(), Some("busybox:latest"));
        assert_eq!(config.services.len(), 2);
        // Each service counts in what the run needs: its own resources, or the small default.
        let (cpus, memory) = config.demand();
        assert!(cpus > config.resources.cpus, "{cpus}");
        assert!(memory > config.resources.memory.bytes(), "{memory}");
        let db = &config.services.values().next().unwrap();
        assert_eq!(db.ready.as_ref().unwrap().tcp, Some(5432));
        assert_eq!(config.timeout_seconds, 900);
        assert_eq!(config.queue.as_ref().unwrap().as_str(), "large");
        assert_eq!(config.results.junit, vec!["target/junit/*.xml"]);
        assert_eq!(config.cluster.unwrap().purpose, "tess-ci");
        // The stored (JSON) form reads back the same.
        let config = RepoConfig::parse(FULL).unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(serde_json::from_value::<RepoConfig>(json).unwrap(), config);
    }

    #[test]
    fn build_defaults() {
        let config = RepoConfig::parse("build: {}\nscript: make test\n").unwrap();
        let build = config.build.unwrap();
        assert_eq!((build.dockerfile.as_str(), build.context.as_str()), ("Dockerfile", "."));
    }

    #[test]
    fn errors_name_the_problem_and_the_line() {
        let err = RepoConfig::parse("image: busybox\nscirpt: make\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("unknown field `scirpt`"), "{err}");
        let err = RepoConfig::parse("image: busybox\nscript: make\nservices:\n  DB:\n    image: x\n").unwrap_err();
        assert!(err.message.contains("service name `DB`"), "{err}");
        assert_eq!(err.line, Some(4), "{err}");
        let err = RepoConfig::parse("script: make\n").unwrap_err();
        assert!(err.message.contains("set `image`"), "{err}");
        let err = RepoConfig::parse("image: a\nbuild: {}\nscript: make\n").unwrap_err();
        assert!(err.message.contains("not both"), "{err}");
        let err = RepoConfig::parse("image: a\nscript: x\nservices:\n  s: {image: b, ready: {timeoutSeconds: 3}}\n")
            .unwrap_err();
        assert!(err.message.contains("exactly one of"), "{err}");
        let err = RepoConfig::parse("image: a\nscript: x\nresults: {junit: [/etc/passwd]}\n").unwrap_err();
        assert!(err.message.contains("relative to the workspace"), "{err}");
        let err = RepoConfig::parse("image: a\nscript: x\nbuild: {context: ../up}\n").unwrap_err();
        assert!(err.message.contains("inside the repository"), "{err}");
        let err = RepoConfig::parse("image: [a\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn a_config_file_asks_for_an_id_token() {
        let config =
            RepoConfig::parse("image: busybox:latest\nscript: deploy\nidToken: {audience: sts.amazonaws.com}\n");
        assert_eq!(config.unwrap().id_token.unwrap().audience, "sts.amazonaws.com");
        let err = RepoConfig::parse("image: busybox:latest\nscript: deploy\nidToken: {audience: sts, lifetime: 60}\n");
        assert!(err.unwrap_err().message.contains("lifetime"));
    }
}
