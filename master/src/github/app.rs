//! GitHub App authentication: an RS256 JWT signed with the App's private key proves the App; it is
//! traded for an installation token per installation (the account the App is installed on),
//! cached, and renewed a few minutes before its hour runs out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::codehost::{HostError, RepositoryToken};

/// An installation token is renewed when less than this is left of it: more than the resync
/// interval, so that the token agents clone with (refreshed by the resync) stays good.
const RENEW_BEFORE: Duration = Duration::from_secs(10 * 60);

pub struct App {
    id: u64,
    key: EncodingKey,
    /// Installation id by repository (lower-case `owner/name`).
    installations: Mutex<HashMap<String, u64>>,
    tokens: Mutex<HashMap<u64, RepositoryToken>>,
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

    /// An installation token for the repository's installation: the cached one while it has more
    /// than a few minutes left, else a new one.
    pub async fn token(&self, api: &super::api::GithubApi, repository: &str) -> Result<RepositoryToken, HostError> {
        let installation = self.installation(api, repository).await?;
        let cached = self.tokens.lock().expect("token cache").get(&installation).cloned();
        if let Some(token) = cached {
            let left = (token.expires_at - Utc::now()).to_std().unwrap_or_default();
            if left > RENEW_BEFORE {
                return Ok(token);
            }
        }
        let path = format!("/app/installations/{installation}/access_tokens");
        let fresh: AccessToken = api.as_app(reqwest::Method::POST, &path, &self.jwt()?).await?;
        tracing::info!(installation, expires_at = %fresh.expires_at, "GitHub App installation token issued");
        let token = RepositoryToken { value: SecretString::from(fresh.token), expires_at: fresh.expires_at };
        self.tokens.lock().expect("token cache").insert(installation, token.clone());
        Ok(token)
    }

    /// Forgets the repository's token (GitHub refused it: revoked, or the clocks disagree).
    pub fn forget(&self, repository: &str) {
        let installation =
            self.installations.lock().expect("installation cache").get(&repository.to_lowercase()).copied();
        if let Some(installation) = installation {
            self.tokens.lock().expect("token cache").remove(&installation);
        }
    }

    async fn installation(&self, api: &super::api::GithubApi, repository: &str) -> Result<u64, HostError> {
        let key = repository.to_lowercase();
        if let Some(id) = self.installations.lock().expect("installation cache").get(&key) {
            return Ok(*id);
        }
        let found: Installation =
            api.as_app(reqwest::Method::GET, &format!("/repos/{repository}/installation"), &self.jwt()?).await?;
        self.installations.lock().expect("installation cache").insert(key, found.id);
        Ok(found.id)
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App({})", self.id)
    }
}
