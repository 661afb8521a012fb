//! Job specs as configured through `PUT /jobs/{name}`.
//!
//! Unknown fields are refused everywhere, defaults are filled in on parse, and the stored form is the
//! parsed form re-serialised, so applying the same body twice compares equal.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::allowed::ImagePattern;
use crate::egress::Egress;
use crate::id_token::IdTokenSpec;
use crate::ids::{BranchName, ConfigPath, EnvName, QueueName, RepositoryUrl};
use crate::results::Results;
use crate::schedule::Schedule;
use crate::subscription::GithubSubscription;

/// Timeout of a freestyle job that does not set `timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 3600;
const MAX_TIMEOUT_SECONDS: u32 = 7 * 24 * 3600;
const MAX_ENV_VALUE: usize = 32 * 1024;

/// What a job is. The `kind` field selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobSpec {
    /// Everything configured through the API: image, script, environment.
    Freestyle(FreestyleJob),
    /// The job's logic lives in a repository; the API holds where it is and the input parameters.
    Git(GitJob),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FreestyleJob {
    /// Container image the script runs in, e.g. `busybox:latest`.
    #[serde(deserialize_with = "image_ref")]
    pub image: String,
    /// One shell script, or a list of commands run in order (stopping at the first failure).
    #[cfg_attr(feature = "openapi", schema(value_type = Object, example = json!("echo hello")))]
    pub script: Script,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub env: BTreeMap<EnvName, String>,
    #[serde(default = "default_timeout", deserialize_with = "timeout")]
    pub timeout_seconds: u32,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub queue: QueueName,
    /// Input parameters and their default values; a trigger may override them.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub parameters: BTreeMap<EnvName, String>,
    /// Working directory inside the container; the image's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "working_dir")]
    pub working_dir: Option<String>,
    /// A test cluster from the pool, leased for the run and released when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterRequirement>,
    /// Names of the job's secrets (`PUT /jobs/{name}/secrets/{KEY}`) injected as env vars, one each.
    /// A run fails before it starts if one is not set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub secrets: Vec<EnvName>,
    /// Files to keep after the script (`{"junit": [globs], "artifacts": [globs]}`), relative to
    /// `workingDir`, which a job with results must set.
    #[serde(default, skip_serializing_if = "Results::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub results: Results,
    /// Runs on a schedule (cron), beside those triggered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Ranges the runs reach although the agent's egress policy denies them.
    #[serde(default, skip_serializing_if = "Egress::is_empty")]
    pub egress: Egress,
    /// The user the script runs as (`uid[:gid]`, or a name the image knows) instead of the image's
    /// (usually root).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "user")]
    pub user: Option<String>,
    /// An OIDC ID token for this audience in `CIMASTER_ID_TOKEN`, signed by the master, naming
    /// the run: a cloud or Vault that trusts the installation grants access without a stored key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<IdTokenSpec>,
}

/// Which kind of test cluster a job needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRequirement {
    /// e.g. `tess-ci`, `tnet-ci`.
    #[serde(deserialize_with = "pool_name")]
    pub purpose: String,
    /// Needed for purposes that match on the OS image (`tnet-ci`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osimage: Option<String>,
}

fn pool_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(value)
    } else {
        Err(de::Error::custom(format!(
            "cluster purpose `{value}` must be 1 to 128 characters of letters, digits, `-`, `_` and `.`"
        )))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitJob {
    pub repository: RepositoryUrl,
    /// Path of the job config file in the repository.
    #[serde(default = "default_config_path")]
    pub config_path: ConfigPath,
    /// The repository's main line, as webhooks and clients see it.
    #[serde(default = "default_branch")]
    pub default_branch: BranchName,
    /// Input parameters and their default values; a trigger may override them.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub parameters: BTreeMap<EnvName, String>,
    /// Resource class, chosen by the platform team rather than the repository (the config file's
    /// `queue` may pick another only among `allowedQueues`).
    #[serde(default)]
    pub queue: QueueName,
    /// Queues the config file's `queue:` may pick besides `queue`; a config naming any other fails
    /// the trigger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub allowed_queues: Vec<QueueName>,
    /// Image patterns (`*` matches anything: `busybox:*`, `registry.example/ci/*@sha256:*`) the
    /// config file's `image:` and services' images must match. When empty, any image for trusted
    /// changes, and only digest-pinned images (`name@sha256:…`) for pull requests from forks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub allowed_images: Vec<ImagePattern>,
    /// The job secrets the repository's config file may ask for (its `secrets`); a config asking
    /// for any other fails the trigger. The repository proposes, the job's owner allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub secrets: Vec<EnvName>,
    /// Name of a job secret holding an HTTPS token for a private repository (sent as basic auth
    /// `x-access-token:TOKEN`, as GitHub, GitLab and Gitea accept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub token_secret: Option<EnvName>,
    /// Name of a job secret holding an SSH deploy key (private key, OpenSSH format) for `ssh://` or
    /// `user@host:path` repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub ssh_key_secret: Option<EnvName>,
    /// `known_hosts` lines for the repository's SSH server. When set, the server's host key must match
    /// one of them; when absent, the key the server presents is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_known_hosts: Option<String>,
    /// Runs for pull requests and pushes on GitHub (`POST /hooks/github`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<GithubSubscription>,
    /// Runs on a schedule (cron), beside those triggered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Ranges the runs reach although the agent's egress policy denies them (the config file
    /// cannot widen this).
    #[serde(default, skip_serializing_if = "Egress::is_empty")]
    pub egress: Egress,
    /// An OIDC ID token for this audience in `CIMASTER_ID_TOKEN`, signed by the master, naming
    /// the run (repository, branch, commit, event); the config file's `idToken` takes its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<IdTokenSpec>,
}

impl GitJob {
    /// The secret names the checkout needs.
    pub fn credential_secrets(&self) -> impl Iterator<Item = &EnvName> {
        self.token_secret.iter().chain(self.ssh_key_secret.iter())
    }
}

impl JobSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Freestyle(_) => "freestyle",
            JobSpec::Git(_) => "git",
        }
    }

    pub fn queue(&self) -> &QueueName {
        match self {
            JobSpec::Freestyle(job) => &job.queue,
            JobSpec::Git(job) => &job.queue,
        }
    }

    pub fn parameters(&self) -> &BTreeMap<EnvName, String> {
        match self {
            JobSpec::Freestyle(job) => &job.parameters,
            JobSpec::Git(job) => &job.parameters,
        }
    }

    pub fn schedule(&self) -> Option<&Schedule> {
        match self {
            JobSpec::Freestyle(job) => job.schedule.as_ref(),
            JobSpec::Git(job) => job.schedule.as_ref(),
        }
    }

    /// The ranges the job's runs reach despite the agent's egress policy.
    pub fn egress(&self) -> &Egress {
        match self {
            JobSpec::Freestyle(job) => &job.egress,
            JobSpec::Git(job) => &job.egress,
        }
    }

    /// Checks that need more than one field. `max_timeout` is the installation's cap.
    pub fn check(&self, max_timeout_seconds: u32) -> Result<(), String> {
        if let Some(schedule) = self.schedule() {
            if schedule.branch.is_some() && matches!(self, JobSpec::Freestyle(_)) {
                return Err("schedule.branch is for git jobs; a freestyle job has no branch".into());
            }
            if let Some(name) = schedule.parameters.keys().find(|name| !self.parameters().contains_key(*name)) {
                return Err(format!("schedule.parameters names `{name}`, which is not among the job's parameters"));
            }
        }
        if let JobSpec::Git(GitJob { ssh_known_hosts: Some(lines), .. }) = self {
            if lines.trim().is_empty() || lines.len() > MAX_ENV_VALUE || lines.contains('\0') {
                return Err(format!("sshKnownHosts must be 1 to {MAX_ENV_VALUE} bytes of known_hosts lines"));
            }
        }
        if let JobSpec::Freestyle(job) = self {
            if job.timeout_seconds > max_timeout_seconds {
                return Err(format!(
                    "timeoutSeconds {} is above this installation's maximum of {max_timeout_seconds}",
                    job.timeout_seconds
                ));
            }
            for (name, value) in job.env.iter().chain(&job.parameters) {
                if value.len() > MAX_ENV_VALUE {
                    return Err(format!("value of `{name}` is longer than {MAX_ENV_VALUE} bytes"));
                }
            }
            if !job.results.is_empty() && job.working_dir.is_none() {
                return Err("`results` globs are relative to `workingDir`: set `workingDir` too".into());
            }
        }
        Ok(())
    }
}

pub(crate) fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_SECONDS
}

fn default_config_path() -> ConfigPath {
    ConfigPath::parse(".cimaster.yml").expect("valid default")
}

fn default_branch() -> BranchName {
    BranchName::parse("main").expect("valid default")
}

pub(crate) fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let value = u32::deserialize(d)?;
    if value == 0 || value > MAX_TIMEOUT_SECONDS {
        return Err(de::Error::custom(format!(
            "timeoutSeconds must be between 1 and {MAX_TIMEOUT_SECONDS}, got {value}"
        )));
    }
    Ok(value)
}

pub(crate) fn image_ref<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    if value.is_empty() || value.len() > 512 {
        return Err(de::Error::custom("image must be 1 to 512 characters"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) || value.starts_with('-') {
        return Err(de::Error::custom(format!("image `{value}` is not an image reference (e.g. `busybox:latest`)")));
    }
    if builds_own(&value) {
        return Err(de::Error::custom(format!(
            "image `{value}`: `{BUILT_IMAGES}` is where agents keep the images they build from repositories; \
             name an image of your own, or use `build:`"
        )));
    }
    Ok(value)
}

/// The repository agents tag the images they build with: no job or config file names it (a run
/// of one repository must not run another's build).
pub const BUILT_IMAGES: &str = "cimaster-build";

/// Whether `image` names an image in [`BUILT_IMAGES`], however it is spelled.
fn builds_own(image: &str) -> bool {
    let name = image.split(['@', ':']).next().unwrap_or(image);
    let name = ["docker.io/library/", "index.docker.io/library/", "library/"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    name.eq_ignore_ascii_case(BUILT_IMAGES)
}

/// `uid[:gid]` in digits, or a user (and group) name: letters, digits, `_`, `-`, `.`.
pub(crate) fn user<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    let part = |part: &str| {
        !part.is_empty()
            && part.len() <= 32
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let ok = match value.split_once(':') {
        Some((user, group)) => part(user) && part(group),
        None => part(&value),
    };
    if !ok {
        return Err(de::Error::custom(format!(
            "user `{value}` must be `uid`, `uid:gid` or a user name (e.g. `1000:1000`)"
        )));
    }
    Ok(Some(value))
}

fn working_dir<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    if !value.starts_with('/') || value.contains('\0') {
        return Err(de::Error::custom(format!("workingDir `{value}` must be an absolute path inside the container")));
    }
    Ok(Some(value))
}

/// A job's commands: one string (run by `sh -c`) or a list of commands run in order, stopping at the
/// first that fails.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    One(String),
    Many(Vec<String>),
}

impl Script {
    /// The commands as one shell program.
    pub fn to_shell(&self) -> String {
        match self {
            Script::One(script) => script.clone(),
            Script::Many(commands) => {
                let mut out = String::from("set -e\n");
                for command in commands {
                    out.push_str(command);
                    out.push('\n');
                }
                out
            }
        }
    }
}

impl Serialize for Script {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Script::One(script) => s.serialize_str(script),
            Script::Many(commands) => commands.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Script {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScriptVisitor;

        impl<'de> Visitor<'de> for ScriptVisitor {
            type Value = Script;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a script string or a list of command strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Script, E> {
                if v.trim().is_empty() {
                    return Err(E::custom("script must not be empty"));
                }
                Ok(Script::One(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Script, A::Error> {
                let mut commands = Vec::new();
                while let Some(command) = seq.next_element::<String>()? {
                    if command.trim().is_empty() {
                        return Err(de::Error::custom(format!("script command #{} is empty", commands.len() + 1)));
                    }
                    commands.push(command);
                }
                if commands.is_empty() {
                    return Err(de::Error::custom("script must list at least one command"));
                }
                Ok(Script::Many(commands))
            }
        }

        d.deserialize_any(ScriptVisitor)
    }
}

/// What a run may use: CPUs (fractions allowed) and memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpus", deserialize_with = "cpus")]
    pub cpus: f64,
    #[serde(default = "default_memory")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "512Mi"))]
    pub memory: Memory,
}

impl Default for Resources {
    fn default() -> Self {
        Self { cpus: default_cpus(), memory: default_memory() }
    }
}

fn default_cpus() -> f64 {
    1.0
}

fn default_memory() -> Memory {
    Memory::parse("512Mi").expect("valid default")
}

fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(d)?;
    if !(value.is_finite() && (0.01..=1024.0).contains(&value)) {
        return Err(de::Error::custom(format!("resources.cpus must be between 0.01 and 1024, got {value}")));
    }
    Ok(value)
}

/// An amount of memory written the Kubernetes way: `512Mi`, `2Gi`, `1G`, `500M`, or plain bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    text: String,
    bytes: u64,
}

impl Memory {
    const MIN: u64 = 6 * 1024 * 1024;

    pub fn parse(text: &str) -> Result<Self, String> {
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let multiplier: u64 = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "memory `{text}`: unknown unit `{unit}`; use Ki, Mi, Gi, Ti, K, M, G, T or plain bytes"
                ))
            }
        };
        let number: u64 =
            digits.parse().map_err(|_| format!("memory `{text}` must be a whole number with a unit, e.g. `512Mi`"))?;
        let bytes = number.checked_mul(multiplier).ok_or_else(|| format!("memory `{text}` is too large"))?;
        if bytes < Self::MIN {
            return Err(format!("memory `{text}` is below the minimum of 6Mi"));
        }
        Ok(Self { text: text.to_owned(), bytes })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Memory::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: serde_json::Value) -> Result<JobSpec, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    #[test]
    fn no_job_names_an_image_agents_built() {
        for image in [
            "cimaster-build:0123abcd",
            "cimaster-build",
            "docker.io/library/cimaster-build:x",
            "library/cimaster-build@sha256:00",
        ] {
            let err = parse(json!({"kind": "freestyle", "image": image, "script": "true"})).unwrap_err();
            assert!(err.contains("where agents keep the images they build"), "{image}: {err}");
        }
        assert!(parse(
            json!({"kind": "freestyle", "image": "registry.example:5000/cimaster-build:1", "script": "true"})
        )
        .is_ok());
        assert!(parse(json!({"kind": "freestyle", "image": "cimaster-builder:1", "script": "true"})).is_ok());
    }

    #[test]
    fn freestyle_job_from_the_product_brief() {
        let spec = parse(json!({"kind": "freestyle", "image": "busybox:latest", "script": "echo hello",
            "env": {"A": "1"}, "timeoutSeconds": 600, "resources": {"cpus": 1, "memory": "512Mi"},
            "queue": "default", "parameters": {"TARGET": "all"}}))
        .unwrap();
        let JobSpec::Freestyle(job) = &spec else { panic!("not freestyle") };
        assert_eq!(job.timeout_seconds, 600);
        assert_eq!(job.resources.memory.bytes(), 512 << 20);
        assert_eq!(spec.queue().as_str(), "default");
        assert_eq!(spec.parameters().len(), 1);
    }

    #[test]
    fn defaults_are_filled_so_equal_bodies_compare_equal() {
        let short = parse(json!({"kind": "freestyle", "image": "busybox", "script": ["true"]})).unwrap();
        let stored = serde_json::to_value(&short).unwrap();
        assert_eq!(stored["timeoutSeconds"], json!(DEFAULT_TIMEOUT_SECONDS));
        assert_eq!(stored["queue"], json!("default"));
        assert_eq!(stored["resources"], json!({"cpus": 1.0, "memory": "512Mi"}));
        assert_eq!(parse(stored).unwrap(), short);
    }

    #[test]
    fn git_job_from_the_product_brief() {
        let spec = parse(json!({"kind": "git", "repository": "https://git.example/org/repo.git",
            "configPath": ".cimaster.yml", "defaultBranch": "main"}))
        .unwrap();
        assert_eq!(spec.kind(), "git");
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let err = parse(json!({"kind": "freestyle", "image": "b", "script": "x", "imagee": "y"})).unwrap_err();
        assert!(err.contains("unknown field `imagee`"), "{err}");
        let err = parse(json!({"kind": "git", "repository": "https://h/r", "branch": "x"})).unwrap_err();
        assert!(err.contains("unknown field `branch`"), "{err}");
        let err = parse(json!({"kind": "pipeline"})).unwrap_err();
        assert!(err.contains("unknown variant `pipeline`"), "{err}");
        let err = parse(json!({"image": "b", "script": "x"})).unwrap_err();
        assert!(err.contains("missing field `kind`"), "{err}");
        let err = parse(json!({"kind": "freestyle", "image": "b", "script": "x",
            "resources": {"cpu": 1}}))
        .unwrap_err();
        assert!(err.contains("unknown field `cpu`"), "{err}");
    }

    #[test]
    fn bad_values_say_what_to_fix() {
        let cases = [
            (json!({"kind": "freestyle", "image": "b", "script": ""}), "script must not be empty"),
            (json!({"kind": "freestyle", "image": "b", "script": []}), "at least one command"),
            (json!({"kind": "freestyle", "image": "b", "script": ["ok", " "]}), "command #2 is empty"),
            (json!({"kind": "freestyle", "image": "", "script": "x"}), "image must be"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "timeoutSeconds": 0}), "between 1"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "resources": {"memory": "1Xi"}}), "unknown unit"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "resources": {"memory": "1Ki"}}), "minimum"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "resources": {"cpus": 0}}), "cpus"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "env": {"1A": "x"}}), "variable name"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "queue": "GPU"}), "queue name"),
            (json!({"kind": "freestyle", "image": "b", "script": "x", "workingDir": "rel"}), "absolute"),
            (json!({"kind": "git", "repository": "nope"}), "invalid repository"),
            (json!({"kind": "git", "repository": "https://h/r", "configPath": "../x"}), "config path"),
            (json!({"kind": "git", "repository": "https://h/r", "defaultBranch": "a..b"}), "branch name"),
        ];
        for (body, expected) in cases {
            let err = parse(body.clone()).unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn cluster_requirements() {
        let spec = parse(json!({"kind": "freestyle", "image": "b", "script": "x",
            "cluster": {"purpose": "tnet-ci", "osimage": "centos-7"}}))
        .unwrap();
        let JobSpec::Freestyle(job) = spec else { panic!() };
        assert_eq!(job.cluster.unwrap().purpose, "tnet-ci");
        let err = parse(json!({"kind": "freestyle", "image": "b", "script": "x", "cluster": {"purpose": "a b"}}))
            .unwrap_err();
        assert!(err.contains("cluster purpose"), "{err}");
        let err =
            parse(json!({"kind": "freestyle", "image": "b", "script": "x", "cluster": {"purpose": "p", "size": 3}}))
                .unwrap_err();
        assert!(err.contains("unknown field `size`"), "{err}");
    }

    #[test]
    fn installation_maximum_timeout() {
        let spec = parse(json!({"kind": "freestyle", "image": "b", "script": "x", "timeoutSeconds": 7200})).unwrap();
        assert!(spec.check(7200).is_ok());
        assert!(spec.check(3600).unwrap_err().contains("maximum of 3600"));
    }

    #[test]
    fn script_list_becomes_a_stop_on_error_program() {
        let script = Script::Many(vec!["make".into(), "make test".into()]);
        assert_eq!(script.to_shell(), "set -e\nmake\nmake test\n");
    }

    #[test]
    fn memory_units() {
        assert_eq!(Memory::parse("2Gi").unwrap().bytes(), 2 << 30);
        assert_eq!(Memory::parse("500M").unwrap().bytes(), 500_000_000);
        assert_eq!(Memory::parse("8388608").unwrap().bytes(), 8 << 20);
        assert!(Memory::parse("Mi").is_err());
        assert!(Memory::parse("99999999999999999999Gi").is_err());
    }
}
