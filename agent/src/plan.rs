//! What an attempt executes, whichever kind of job it came from: a freestyle job's spec as
//! configured through the API, or a git job's config file read from its repository at the run's
//! commit.

use std::collections::BTreeMap;

use cimaster_common::{
    BuildSpec, CheckoutSpec, ClusterRequirement, EnvName, IdTokenSpec, JobSpec, RepositoryUrl, Resources, Results,
    ServiceName, ServiceSpec,
};

use cimaster_store::attempts::Claim;

/// Where the workspace of a git run is mounted in its containers.
pub const WORKSPACE: &str = "/workspace";

pub enum ImageSource {
    Image(String),
    Build(BuildSpec),
}

/// The repository and commit a git run checks out.
pub struct Checkout {
    pub repository: RepositoryUrl,
    pub commit: String,
    pub token_secret: Option<EnvName>,
    pub ssh_key_secret: Option<EnvName>,
    pub ssh_known_hosts: Option<String>,
    /// The code host's `owner/name` whose token (a GitHub App's, kept by the master) clones the
    /// repository when the job brings no token of its own.
    pub host_repository: Option<String>,
    /// Where the base repository keeps a pull request's head (`refs/pull/<n>/head`), forks
    /// included: fetched when the commit is on no branch.
    pub pull_ref: Option<String>,
    /// Depth and submodules, from the config file's `checkout:`.
    pub spec: CheckoutSpec,
}

impl Checkout {
    /// Whose credentials read the repository: runs with different ones never share a mirror.
    pub fn credential_scope(&self, job: &str) -> String {
        match (&self.token_secret, &self.ssh_key_secret, &self.host_repository) {
            (Some(token), _, _) => format!("token:{job}:{token}"),
            (None, Some(key), _) => format!("ssh:{job}:{key}"),
            (None, None, Some(repository)) => format!("app:{}", repository.to_lowercase()),
            (None, None, None) => "anonymous".to_owned(),
        }
    }
}

pub struct Plan {
    pub image: ImageSource,
    pub script: String,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<EnvName>,
    /// Secrets the config asks for that this run does not get (a pull request from a fork).
    pub withheld: Vec<EnvName>,
    pub timeout_seconds: u32,
    pub resources: Resources,
    pub working_dir: Option<String>,
    /// The user the script runs as, when not the image's.
    pub user: Option<String>,
    pub cluster: Option<ClusterRequirement>,
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    pub results: Results,
    pub checkout: Option<Checkout>,
    /// The ID token the run gets (`idToken`), if any.
    pub id_token: Option<IdTokenSpec>,
    /// The config asks for an ID token this run does not get (a pull request from a fork).
    pub id_token_withheld: bool,
}

impl Plan {
    pub fn of(claim: &Claim) -> Result<Plan, String> {
        match &claim.spec {
            JobSpec::Freestyle(job) => Ok(Plan {
                image: ImageSource::Image(job.image.clone()),
                script: job.script.to_shell(),
                env: job.env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                secrets: job.secrets.clone(),
                withheld: Vec::new(),
                timeout_seconds: job.timeout_seconds,
                resources: job.resources.clone(),
                working_dir: job.working_dir.clone(),
                user: job.user.clone(),
                cluster: job.cluster.clone(),
                services: BTreeMap::new(),
                results: job.results.clone(),
                checkout: None,
                id_token: job.id_token.clone(),
                id_token_withheld: false,
            }),
            JobSpec::Git(git) => {
                let (Some(commit), Some(config)) = (&claim.commit, &claim.config) else {
                    return Err("the git run has no resolved commit and config file; trigger it again".into());
                };
                let image = match (&config.image, &config.build) {
                    (Some(image), _) => ImageSource::Image(image.clone()),
                    (None, Some(build)) => ImageSource::Build(build.clone()),
                    (None, None) => return Err("the job config file names neither `image` nor `build`".into()),
                };
                // The config file's `idToken` says what its script needs; the job's stands in
                // for a config file without one. A fork's code gets neither secrets nor a token.
                let id_token = config.id_token.clone().or_else(|| git.id_token.clone());
                let id_token_withheld = id_token.is_some() && withholds_secrets(claim, git);
                let (secrets, withheld) = if withholds_secrets(claim, git) {
                    (Vec::new(), config.secrets.clone())
                } else {
                    (config.secrets.clone(), Vec::new())
                };
                Ok(Plan {
                    image,
                    script: config.script.to_shell(),
                    env: config.env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                    secrets,
                    withheld,
                    timeout_seconds: config.timeout_seconds,
                    resources: config.resources.clone(),
                    working_dir: Some(WORKSPACE.to_owned()),
                    user: config.user.clone(),
                    cluster: config.cluster.clone(),
                    services: config.services.clone(),
                    results: config.results.clone(),
                    checkout: Some(Checkout {
                        repository: git.repository.clone(),
                        commit: commit.clone(),
                        token_secret: git.token_secret.clone(),
                        ssh_key_secret: git.ssh_key_secret.clone(),
                        ssh_known_hosts: git.ssh_known_hosts.clone(),
                        pull_ref: claim.cause.pull_request.map(|number| format!("refs/pull/{number}/head")),
                        host_repository: match (&git.token_secret, &git.ssh_key_secret, &git.github) {
                            (None, None, Some(github)) => Some(github.repository.as_str().to_owned()),
                            _ => None,
                        },
                        spec: config.checkout.clone(),
                    }),
                    id_token: if id_token_withheld { None } else { id_token },
                    id_token_withheld,
                })
            }
        }
    }
}

/// A pull request from a fork runs without the job's secrets unless the job opts in
/// (`github.secretsForForks`): its code is whatever the fork's author wrote.
pub fn withholds_secrets(claim: &Claim, git: &cimaster_common::GitJob) -> bool {
    claim.cause.from_fork && !git.github.as_ref().is_some_and(|github| github.secrets_for_forks)
}

/// Ends a checkout's process group, named by the file the checkout wrote (`$1`), if it still runs.
pub const END_CHECKOUT_SCRIPT: &str = r#"test -f "$1" && kill -TERM "-$(cat "$1")" 2>/dev/null || true"#;

/// The git helper's checkout script: the repository's mirror updated with what the run's commit needs
/// (a damaged mirror is rebuilt), then the run's workspace made from it at that commit, detached.
/// The repository, commit and credentials arrive in the environment, never on the command line.
/// The script leads its own process group (an exec is a session of its own) and writes the group's
/// id to `CIMASTER_CHECKOUT_PID`, so a stopped attempt can end it whole; ended, it leaves no keys.
pub const CHECKOUT_SCRIPT: &str = r#"set -eu
umask 077
private=$(mktemp -d)
echo $$ > "$CIMASTER_CHECKOUT_PID"
trap 'rm -rf "$private" "$CIMASTER_CHECKOUT_PID"' EXIT
trap 'exit 143' TERM INT
ssh="ssh -o BatchMode=yes"
if [ -n "${CIMASTER_GIT_SSH_KEY:-}" ]; then
  printf '%s\n' "$CIMASTER_GIT_SSH_KEY" > "$private/deploy-key"
  ssh="$ssh -i $private/deploy-key -o IdentitiesOnly=yes"
fi
if [ -n "${CIMASTER_GIT_KNOWN_HOSTS:-}" ]; then
  printf '%s\n' "$CIMASTER_GIT_KNOWN_HOSTS" > "$private/known-hosts"
  ssh="$ssh -o StrictHostKeyChecking=yes -o UserKnownHostsFile=$private/known-hosts"
else
  ssh="$ssh -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/dev/null"
fi
export GIT_SSH_COMMAND="$ssh"
umask 022
mirror="$CIMASTER_MIRROR"
workspace="$CIMASTER_WORKSPACE"
repo="$CIMASTER_GIT_REPOSITORY"
commit="$CIMASTER_GIT_COMMIT"
# Settings for this checkout only, in the environment, where they outrank any repository's own
# config: the helper's config is never written. Hooks and the fsmonitor are off (nothing a
# repository holds runs here); only the protocols a checkout needs are allowed, and a local path
# only where the checkout names it (never a submodule's URL).
n=0
config() { export "GIT_CONFIG_KEY_$n=$1" "GIT_CONFIG_VALUE_$n=$2"; n=$((n + 1)); export GIT_CONFIG_COUNT=$n; }
config safe.directory '*'
config core.hooksPath /dev/null
config core.fsmonitor false
config protocol.allow never
config protocol.https.allow always
config protocol.http.allow always
config protocol.ssh.allow always
config protocol.git.allow always
config protocol.file.allow user
# The token goes to the repository's own URL only: a submodule elsewhere, even on the same host,
# is fetched without it.
if [ -n "${CIMASTER_GIT_TOKEN:-}" ]; then
  config "http.$repo.extraHeader" "Authorization: Basic $(printf 'x-access-token:%s' "$CIMASTER_GIT_TOKEN" | base64 -w0)"
fi
export GIT_TERMINAL_PROMPT=0
began=$(date +%s%N)
objects() { git -C "$mirror" count-objects -v | awk '/^(count|in-pack):/ { n += $2 } END { print n + 0 }'; }
has_commit() { git -C "$mirror" cat-file -e "$commit^{commit}" 2>/dev/null; }
update_mirror() {
  if [ ! -f "$mirror/HEAD" ]; then
    git init --quiet --bare "$mirror" || return 1
    git -C "$mirror" config gc.auto 0 || return 1
    echo "mirror: new"
  fi
  if has_commit; then
    echo "mirror: has $commit, nothing fetched"
    return 0
  fi
  before=$(objects)
  git -C "$mirror" fetch --quiet --prune --tags "$repo" '+refs/heads/*:refs/heads/*' || return 1
  has_commit || git -C "$mirror" fetch --quiet "$repo" "$commit" 2>/dev/null || true
  if ! has_commit && [ -n "${CIMASTER_GIT_PULL_REF:-}" ]; then
    git -C "$mirror" fetch --quiet "$repo" "+$CIMASTER_GIT_PULL_REF:refs/cimaster/pull-head" || true
  fi
  echo "mirror: fetched $(( $(objects) - before )) new objects"
}
# A workspace left by an earlier try of this checkout is emptied first.
make_workspace() {
  mkdir -p "$workspace" && cd / && find "$workspace" -mindepth 1 -delete || return 1
  if [ -n "${CIMASTER_GIT_DEPTH:-}" ]; then
    git init --quiet "$workspace" && cd "$workspace" || return 1
    git fetch --quiet --depth "$CIMASTER_GIT_DEPTH" "file://$mirror" "$commit" || return 1
    git remote add origin "$repo" || return 1
  else
    git clone --quiet --shared --no-checkout "$mirror" "$workspace" && cd "$workspace" || return 1
    git remote set-url origin "$repo" || return 1
  fi
  git -c advice.detachedHead=false checkout --quiet --detach "$commit" || return 1
  if [ "${CIMASTER_GIT_SUBMODULES:-}" = true ]; then
    git submodule update --quiet --init --recursive || return 1
  fi
}
rebuild() {
  echo "mirror: damaged; rebuilding it"
  find "$mirror" -mindepth 1 -delete
  update_mirror
}
echo "fetching $repo"
if ! update_mirror; then
  # A fetch that fails from a sound mirror is the repository's problem, not the mirror's.
  if git -C "$mirror" fsck --connectivity-only >/dev/null 2>&1; then exit 1; fi
  rebuild
fi
has_commit || { echo "commit $commit is not in $repo"; exit 1; }
if ! make_workspace; then
  rebuild
  make_workspace
fi
git -C "$workspace" log -1 --format='checked out %H (%s)'
chmod -R a+rwX "$workspace"
echo "checkout took $(( ($(date +%s%N) - began) / 1000000 )) ms"
"#;
