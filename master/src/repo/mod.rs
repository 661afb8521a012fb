//! Reading a git job's repository at trigger time: a branch resolved to its commit with
//! `git ls-remote`, and the one config file read from the replica's partial clone of the repository
//! (`clones`: one commit deep, blobs fetched only as read; never a full clone). A branch on a
//! `git://` or smart HTTP server is asked in git's wire protocol directly (`refs`); the `git`
//! program does the rest of the talking, so every transport git knows works.

mod clones;
mod refs;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use tokio::process::Command;
use tokio::sync::Semaphore;

use crate::config::GitConfig;

/// Credentials for a private repository.
#[derive(Default)]
pub struct Credentials {
    /// HTTPS token, sent as basic auth `x-access-token:TOKEN`.
    pub token: Option<SecretString>,
    /// SSH private key (OpenSSH format).
    pub ssh_key: Option<SecretString>,
    /// `known_hosts` lines the SSH server's key must match; any key is accepted without them.
    pub known_hosts: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("branch `{0}` does not exist in the repository")]
    NoSuchBranch(String),
    #[error("commit {0} is not in the repository")]
    NoSuchCommit(String),
    #[error("cannot read the repository: {0}")]
    Unreadable(String),
    #[error("the config file is {0} bytes; at most 262144 are read")]
    TooLarge(usize),
    #[error("`{0}://` repositories are not read by this server (CIMASTER_ALLOW_FILE_REPOSITORIES)")]
    SchemeRefused(&'static str),
}

/// Reads repositories for the trigger path; config files are cached by (repository, commit, path),
/// which never change. At most `max_reads` reads run at once, each bounded by `timeout`.
pub struct RepoReader {
    timeout: Duration,
    allow_file: bool,
    slots: Semaphore,
    files: Mutex<HashMap<(String, String, String), Option<String>>>,
    clones: clones::Clones,
    /// Kept connections to smart HTTP servers, for branch tips.
    http: reqwest::Client,
}

/// Whether a depth-1 fetch brought `commit` into the clone: it is then one of its shallow commits.
fn fetched(clone: &Path, commit: &str) -> bool {
    std::fs::read_to_string(clone.join("shallow")).is_ok_and(|list| list.lines().any(|line| line.trim() == commit))
}

/// git run in one clone, with the read's credentials and scratch directory.
struct InClone<'a> {
    reader: &'a RepoReader,
    scratch: &'a Path,
    git_dir: &'a str,
    creds: &'a Credentials,
}

impl InClone<'_> {
    async fn run(&self, args: &[&str]) -> Result<String, RepoError> {
        let mut all = vec!["--git-dir", self.git_dir];
        all.extend_from_slice(args);
        self.reader.git(self.scratch, self.creds, &all).await
    }
}

/// What one config-file read asks for.
struct Read<'a> {
    url: &'a str,
    commit: &'a str,
    /// Where to look when the commit is not given by its id (a pull request's ref).
    also_at: Option<&'a str>,
    path: &'a str,
    creds: &'a Credentials,
}

const CACHED_FILES: usize = 512;
/// The largest config file kept in the cache (and accepted at all).
pub const MAX_CONFIG_FILE: usize = 256 * 1024;

impl RepoReader {
    pub fn new(config: &GitConfig) -> Self {
        Self {
            timeout: config.timeout,
            allow_file: config.allow_file,
            slots: Semaphore::new(config.max_reads.max(1)),
            files: Mutex::new(HashMap::new()),
            clones: clones::Clones::open(config),
            http: reqwest::Client::builder()
                .user_agent(concat!("git/cimaster-", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Refuses a repository this server does not read: `file://` unless allowed.
    pub fn check_scheme(&self, url: &str) -> Result<(), RepoError> {
        if !self.allow_file && url.starts_with("file://") {
            return Err(RepoError::SchemeRefused("file"));
        }
        Ok(())
    }

    /// The transports git may use (`GIT_ALLOW_PROTOCOL`): this covers redirects and submodules too.
    fn protocols(&self) -> &'static str {
        if self.allow_file {
            "https:http:ssh:git:file"
        } else {
            "https:http:ssh:git"
        }
    }

    /// The commit a branch points at now.
    pub async fn resolve_branch(&self, url: &str, branch: &str, creds: &Credentials) -> Result<String, RepoError> {
        self.check_scheme(url)?;
        let _slot = self.slot().await?;
        let reference = format!("refs/heads/{branch}");
        match refs::tip(&self.http, url, &reference, creds.token.as_ref(), self.timeout).await {
            Ok(Some(commit)) => return Ok(commit),
            Ok(None) => return Err(RepoError::NoSuchBranch(branch.to_owned())),
            Err(refs::NotAsked(why)) => tracing::debug!(url, why, "asking git ls-remote for the branch"),
        }
        let dir = tempdir()?;
        let out = self.git(dir.path(), creds, &["ls-remote", "--", url, &reference]).await?;
        out.lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(_, name)| *name == reference)
            .map(|(sha, _)| sha.to_owned())
            .ok_or_else(|| RepoError::NoSuchBranch(branch.to_owned()))
    }

    /// The branches whose tip is `commit` now.
    pub async fn branches_at(&self, url: &str, commit: &str, creds: &Credentials) -> Result<Vec<String>, RepoError> {
        self.check_scheme(url)?;
        let _slot = self.slot().await?;
        let dir = tempdir()?;
        let out = self.git(dir.path(), creds, &["ls-remote", "--heads", "--", url]).await?;
        Ok(out
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(sha, _)| sha.eq_ignore_ascii_case(commit))
            .filter_map(|(_, name)| name.strip_prefix("refs/heads/"))
            .map(str::to_owned)
            .collect())
    }

    /// The text of `path` at `commit`; `None` when the commit has no such file. A commit the
    /// repository does not give by its id is looked for at `also_at` (a pull request's ref).
    pub async fn read_file(
        &self,
        url: &str,
        commit: &str,
        also_at: Option<&str>,
        path: &str,
        creds: &Credentials,
    ) -> Result<Option<String>, RepoError> {
        let key = (url.to_owned(), commit.to_owned(), path.to_owned());
        if let Some(hit) = self.files.lock().expect("cache lock").get(&key) {
            return Ok(hit.clone());
        }
        self.check_scheme(url)?;
        let _slot = self.slot().await?;
        let clone = self.clones.path(url, creds);
        let _turn = self.clones.turn(&clone).await;
        let at = Read { url, commit, also_at, path, creds };
        let text = match self.read_in(&clone, &at).await {
            // A clone git cannot use (damaged, or half made by a read that was cut short) is made again.
            Err(RepoError::Unreadable(message)) if clone.exists() => {
                tracing::warn!(clone = %clone.display(), error = %message, "making a git clone again");
                std::fs::remove_dir_all(&clone)
                    .map_err(|err| RepoError::Unreadable(format!("cannot remove a damaged clone: {err}")))?;
                self.read_in(&clone, &at).await
            }
            other => other,
        };
        self.clones.used(&clone);
        let text = text?;
        let mut files = self.files.lock().expect("cache lock");
        if files.len() >= CACHED_FILES {
            files.clear();
        }
        files.insert(key, text.clone());
        Ok(text)
    }

    /// Reads the file from the clone, fetching the commit into it first unless it has it.
    async fn read_in(&self, clone: &Path, at: &Read<'_>) -> Result<Option<String>, RepoError> {
        // Credentials' files and git's HOME live in a scratch directory, removed after the read.
        let scratch = tempdir()?;
        let git_dir = clone.display().to_string();
        let git = InClone { reader: self, scratch: scratch.path(), git_dir: &git_dir, creds: at.creds };
        if !clone.join("HEAD").exists() {
            self.git(scratch.path(), at.creds, &["init", "--quiet", "--bare", &git_dir]).await?;
            for (key, value) in [
                ("remote.origin.url", at.url),
                ("remote.origin.promisor", "true"),
                ("remote.origin.partialclonefilter", "blob:none"),
                ("core.repositoryformatversion", "1"),
                ("extensions.partialclone", "origin"),
            ] {
                git.run(&["config", key, value]).await?;
            }
        }
        // Whether the clone has the commit is read from its list of shallow commits (every commit is
        // fetched one deep): asking git would make a partial clone fetch the commit's whole history.
        if !fetched(clone, at.commit) {
            let fetch = git
                .run(&["fetch", "--quiet", "--depth=1", "--filter=blob:none", "--no-tags", "origin", at.commit])
                .await;
            let missing =
                |message: &str| message.contains("not our ref") || message.contains("couldn't find remote ref");
            match (fetch, at.also_at) {
                (Ok(_), _) => {}
                (Err(RepoError::Unreadable(message)), Some(reference)) if missing(&message) => {
                    git.run(&["fetch", "--quiet", "--depth=1", "--filter=blob:none", "--no-tags", "origin", reference])
                        .await?;
                    if !fetched(clone, at.commit) {
                        return Err(RepoError::NoSuchCommit(at.commit.to_owned()));
                    }
                }
                (Err(RepoError::Unreadable(message)), None) if missing(&message) => {
                    return Err(RepoError::NoSuchCommit(at.commit.to_owned()));
                }
                (Err(err), _) => return Err(err),
            }
        }
        let object = format!("{}:{}", at.commit, at.path);
        // Whether the commit has the file at all, from its trees (which the clone has): a line
        // `<mode> blob <id>\t<path>`.
        let listed = git.run(&["ls-tree", at.commit, "--", at.path]).await?;
        if !listed.lines().any(|line| line.split_whitespace().nth(1) == Some("blob")) {
            return Ok(None);
        }
        // Reading the size fetches the blob, if the clone has it not yet.
        let size = git.run(&["cat-file", "-s", &object]).await?.trim().parse::<usize>().unwrap_or(usize::MAX);
        if size > MAX_CONFIG_FILE {
            return Err(RepoError::TooLarge(size));
        }
        git.run(&["cat-file", "blob", &object]).await.map(Some)
    }

    /// A slot to read in, waited for no longer than one read may take.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, RepoError> {
        match tokio::time::timeout(self.timeout, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(RepoError::Unreadable(format!(
                "too many repository reads at once; none was free for {:?}",
                self.timeout
            ))),
        }
    }

    /// Runs git in `dir` and returns its stdout; stderr becomes the error, with credentials kept out of
    /// the command line (they travel in the environment).
    async fn git(&self, dir: &Path, creds: &Credentials, args: &[&str]) -> Result<String, RepoError> {
        let mut command = Command::new("git");
        command
            .args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_ALLOW_PROTOCOL", self.protocols())
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut config = Vec::new();
        if let Some(token) = &creds.token {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{}", token.expose_secret()));
            config.push(("http.extraHeader".to_owned(), format!("Authorization: Basic {basic}")));
        }
        if creds.ssh_key.is_some() || creds.known_hosts.is_some() {
            // One scratch directory serves several git commands; the files are written once.
            let mut ssh = String::from("ssh -o BatchMode=yes");
            if let Some(key) = &creds.ssh_key {
                let file = dir.join(".cimaster-deploy-key");
                if !file.exists() {
                    write_private(&file, key.expose_secret())?;
                }
                ssh.push_str(&format!(" -i {} -o IdentitiesOnly=yes", file.display()));
            }
            match &creds.known_hosts {
                Some(lines) => {
                    let file = dir.join(".cimaster-known-hosts");
                    if !file.exists() {
                        write_private(&file, lines)?;
                    }
                    ssh.push_str(&format!(" -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}", file.display()));
                }
                None => ssh.push_str(" -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/dev/null"),
            }
            command.env("GIT_SSH_COMMAND", ssh);
        }
        command.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (key, value)) in config.iter().enumerate() {
            command.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        let output = tokio::time::timeout(self.timeout, command.output())
            .await
            .map_err(|_| RepoError::Unreadable(format!("git {} took longer than {:?}", args[0], self.timeout)))?
            .map_err(|err| RepoError::Unreadable(format!("cannot run git: {err}")))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr.lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("; ");
            Err(RepoError::Unreadable(if message.is_empty() { format!("git {} failed", args[0]) } else { message }))
        }
    }
}

fn tempdir() -> Result<tempfile::TempDir, RepoError> {
    tempfile::Builder::new()
        .prefix("cimaster-git-")
        .tempdir()
        .map_err(|err| RepoError::Unreadable(format!("cannot create a scratch directory: {err}")))
}

fn write_private(path: &Path, text: &str) -> Result<(), RepoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| RepoError::Unreadable(format!("cannot write {}: {err}", path.display())))?;
    let mut text = text.to_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    file.write_all(text.as_bytes())
        .map_err(|err| RepoError::Unreadable(format!("cannot write {}: {err}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) -> String {
        let out = std::process::Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A reader with clones of its own, in a directory the test keeps.
    fn git_config(allow_file: bool) -> GitConfig {
        let dir = std::env::temp_dir().join(format!("cimaster-test-clones-{}", uuid::Uuid::new_v4().simple()));
        GitConfig {
            allow_file,
            timeout: Duration::from_secs(20),
            max_reads: 2,
            cache_dir: Some(dir),
            cache_max_mib: 64,
        }
    }

    fn clones_of(config: &GitConfig) -> Vec<std::path::PathBuf> {
        let dir = config.cache_dir.as_ref().unwrap();
        std::fs::read_dir(dir).map(|entries| entries.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }

    #[tokio::test]
    async fn config_files_are_read_from_a_partial_clone_kept_per_repository_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        // A repository that allows filters, with a large file beside the config file.
        sh(
            dir.path(),
            "git init -q -b main repo && cd repo && git config user.email t@e && git config user.name t \
             && git config uploadpack.allowFilter true && git config uploadpack.allowAnySHA1InWant true \
             && printf 'zero\\n' > .cimaster.yml && git add . && git commit -qm zero \
             && printf 'one\\n' > .cimaster.yml && head -c 2000000 /dev/urandom > big.bin && git add . && git commit -qm one \
             && printf 'two\\n' > .cimaster.yml && git commit -qam two",
        );
        let repo = dir.path().join("repo");
        let url = format!("file://{}", repo.display());
        let (second, first) = (sh(&repo, "git rev-parse main"), sh(&repo, "git rev-parse main~1"));
        let big = sh(&repo, "git rev-parse main:big.bin");
        let config = git_config(true);
        let reader = RepoReader::new(&config);
        let creds = Credentials::default();
        assert_eq!(
            reader.read_file(&url, &first, None, ".cimaster.yml", &creds).await.unwrap().as_deref(),
            Some("one\n")
        );
        assert_eq!(
            reader.read_file(&url, &second, None, ".cimaster.yml", &creds).await.unwrap().as_deref(),
            Some("two\n")
        );
        let clones = clones_of(&config);
        assert_eq!(clones.len(), 1, "one clone for the repository: {clones:?}");
        let clone = &clones[0];
        let has = |object: &str| {
            std::process::Command::new("git")
                .args(["--git-dir", &clone.display().to_string(), "cat-file", "-e", object])
                .env("GIT_NO_LAZY_FETCH", "1")
                .status()
                .unwrap()
                .success()
        };
        assert!(has(&first) && has(&second), "both commits were fetched into the same clone");
        let zero = sh(&repo, "git rev-parse main~2");
        assert!(!has(&zero), "only the commits read are fetched, not their history");
        assert!(!has(&big), "the clone holds no blob it did not read");
        let size = clones::tests_size(clone);
        assert!(size < 1_000_000, "the clone is small: {size} bytes");

        // Other credentials, another clone.
        let other = Credentials { token: Some("a-token".into()), ..Credentials::default() };
        reader.read_file(&url, &second, None, "missing.yml", &other).await.unwrap();
        assert_eq!(clones_of(&config).len(), 2);

        // A damaged clone is made again, and the read succeeds.
        std::fs::write(clone.join("config"), "not a git config [").unwrap();
        sh(&repo, "printf 'three\\n' > .cimaster.yml && git commit -qam three");
        let third = sh(&repo, "git rev-parse main");
        assert_eq!(
            reader.read_file(&url, &third, None, ".cimaster.yml", &creds).await.unwrap().as_deref(),
            Some("three\n")
        );
        std::fs::remove_dir_all(config.cache_dir.unwrap()).unwrap();
    }

    #[tokio::test]
    async fn resolves_branches_and_reads_one_file_at_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        sh(
            dir.path(),
            "git init -q -b main repo && cd repo && git config user.email t@e && git config user.name t \
             && printf 'one\\n' > .cimaster.yml && git add . && git commit -qm one \
             && git checkout -qb feature && printf 'two\\n' > .cimaster.yml && git commit -qam two",
        );
        let repo = dir.path().join("repo");
        let url = format!("file://{}", repo.display());
        let main = sh(&repo, "git rev-parse main");
        let config = git_config(true);
        let reader = RepoReader::new(&config);
        let creds = Credentials::default();
        assert_eq!(reader.resolve_branch(&url, "main", &creds).await.unwrap(), main);
        let feature = reader.resolve_branch(&url, "feature", &creds).await.unwrap();
        assert_ne!(feature, main);
        assert!(matches!(reader.resolve_branch(&url, "nope", &creds).await, Err(RepoError::NoSuchBranch(_))));
        assert_eq!(
            reader.read_file(&url, &main, None, ".cimaster.yml", &creds).await.unwrap().as_deref(),
            Some("one\n")
        );
        assert_eq!(
            reader.read_file(&url, &feature, None, ".cimaster.yml", &creds).await.unwrap().as_deref(),
            Some("two\n")
        );
        assert_eq!(reader.read_file(&url, &main, None, "missing.yml", &creds).await.unwrap(), None);
        let err = reader.read_file(&url, &"0".repeat(40), None, ".cimaster.yml", &creds).await.unwrap_err();
        assert!(matches!(err, RepoError::NoSuchCommit(_)), "{err}");
        let err = reader.resolve_branch("file:///nowhere/at/all", "main", &creds).await.unwrap_err();
        assert!(matches!(err, RepoError::Unreadable(_)), "{err}");

        sh(
            &repo,
            "git checkout -q main && head -c 300000 /dev/zero | tr '\\0' x > .cimaster.yml && git commit -qam big",
        );
        let big = sh(&repo, "git rev-parse main");
        let err = reader.read_file(&url, &big, None, ".cimaster.yml", &creds).await.unwrap_err();
        assert!(matches!(err, RepoError::TooLarge(300000)), "{err}");
        let _ = std::fs::remove_dir_all(config.cache_dir.unwrap());
    }

    #[tokio::test]
    async fn file_repositories_are_read_only_when_allowed() {
        let strict = RepoReader::new(&git_config(false));
        let err = strict.resolve_branch("file:///tmp/x", "main", &Credentials::default()).await.unwrap_err();
        assert!(matches!(err, RepoError::SchemeRefused("file")), "{err}");
        assert!(strict.check_scheme("https://git.example/r.git").is_ok());
        // git itself refuses the transport too, whatever a URL or a redirect says.
        assert_eq!(strict.protocols(), "https:http:ssh:git");
    }
}
