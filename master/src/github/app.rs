//! GitHub App authentication: an RS256 JWT signed with the App's private key proves the App; it is
//! traded for installation tokens, cached, and renewed a few minutes before their hour runs out. Two
//! kinds: the master's own, for its calls across the installation (commit statuses, pull requests),
//! and a read token per repository (`contents: read` on that one repository), the only kind that
//! leaves the master: config reads and the agents' checkouts use it, so a job that leaks it can read
//! one repository and write nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::codehost::{HostError, RepositoryToken};

/// An installation token is renewed when less than this is left of it: more than the resync
/// interval, so that the token agents clone with (refreshed by the resync) stays good.
const RENEW_BEFORE: Duration = Duration::from_secs(10 * 60);

pub struct App {
    id: u64,
    key: EncodingKey,
    /// Installation id by repository (lower-case `owner/name`).
    installations: Mutex<HashMap<String, u64>>,
    tokens: Mutex<HashMap<(u64, Use), RepositoryToken>>,
}

/// What an installation token is for.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Use {
    /// The master's own calls, across the installation.
    Master,
    /// Reading one repository (lower-case name, without its owner).
    Read(String),
}

#[derive(Serialize)]
struct Claims {
    iat: i64,
    exp: i64,
    iss: String,
}

#[derive(Deserialize)]
struct Installation {
    id: u64,
}

#[derive(Deserialize)]
struct AccessToken {
    token: String,
    expires_at: DateTime<Utc>,
}

impl App {
    pub fn load(id: u64, key_file: &Path) -> anyhow::Result<App> {
        let pem = std::fs::read(key_file)
            .map_err(|err| anyhow::anyhow!("reading the GitHub App key {}: {err}", key_file.display()))?;
        let key = EncodingKey::from_rsa_pem(&pem)
            .map_err(|err| anyhow::anyhow!("the GitHub App key {} is not an RSA PEM key: {err}", key_file.display()))?;
        Ok(App { id, key, installations: Mutex::default(), tokens: Mutex::default() })
    }

    /// The App's own JWT: valid from a minute ago (clock drift) for nine minutes.
    pub fn jwt(&self) -> Result<String, HostError> {
        let now = Utc::now().timestamp();
        let claims = Claims { iat: now - 60, exp: now + 9 * 60, iss: self.id.to_string() };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|err| HostError::Unreadable(format!("cannot sign the GitHub App JWT: {err}")))
    }

    /// The master's own installation token for the repository's installation: the cached one while
    /// it has more than a few minutes left, else a new one.
    pub async fn token(&self, api: &super::api::GithubApi, repository: &str) -> Result<RepositoryToken, HostError> {
        self.issued(api, repository, Use::Master).await
    }

    /// A token that reads this repository's contents and nothing else, for config reads and
    /// checkouts.
    pub async fn read_token(
        &self,
        api: &super::api::GithubApi,
        repository: &str,
    ) -> Result<RepositoryToken, HostError> {
        let name = repository.rsplit('/').next().unwrap_or(repository).to_lowercase();
        self.issued(api, repository, Use::Read(name)).await
    }

    async fn issued(
        &self,
        api: &super::api::GithubApi,
        repository: &str,
        wanted: Use,
    ) -> Result<RepositoryToken, HostError> {
        let installation = self.installation(api, repository).await?;
        let key = (installation, wanted);
        let cached = self.tokens.lock().expect("token cache").get(&key).cloned();
        if let Some(token) = cached {
            let left = (token.expires_at - Utc::now()).to_std().unwrap_or_default();
            if left > RENEW_BEFORE {
                return Ok(token);
            }
        }
        let path = format!("/app/installations/{installation}/access_tokens");
        let scope = match &key.1 {
            Use::Master => None,
            Use::Read(name) => Some(json!({"repositories": [name], "permissions": {"contents": "read"}})),
        };
        let fresh: AccessToken = api.as_app(reqwest::Method::POST, &path, &self.jwt()?, scope.as_ref()).await?;
        tracing::info!(installation, token_use = ?key.1, expires_at = %fresh.expires_at, "GitHub App installation token issued");
        let token = RepositoryToken { value: SecretString::from(fresh.token), expires_at: fresh.expires_at };
        self.tokens.lock().expect("token cache").insert(key, token.clone());
        Ok(token)
    }

    /// Forgets the tokens of the repository's installation (GitHub refused one: revoked, or the
    /// clocks disagree).
    pub fn forget(&self, repository: &str) {
        let installation =
            self.installations.lock().expect("installation cache").get(&repository.to_lowercase()).copied();
        if let Some(installation) = installation {
            self.tokens.lock().expect("token cache").retain(|(of, _), _| *of != installation);
        }
    }

    async fn installation(&self, api: &super::api::GithubApi, repository: &str) -> Result<u64, HostError> {
        let key = repository.to_lowercase();
        if let Some(id) = self.installations.lock().expect("installation cache").get(&key) {
            return Ok(*id);
        }
        let path = format!("/repos/{repository}/installation");
        let found: Installation = api.as_app(reqwest::Method::GET, &path, &self.jwt()?, None).await?;
        self.installations.lock().expect("installation cache").insert(key, found.id);
        Ok(found.id)
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App({})", self.id)
    }
}
