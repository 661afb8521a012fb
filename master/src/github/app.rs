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
    /// Held while a token is asked for, so that callers racing on an empty cache get one token
    /// between them instead of one each.
    minting: tokio::sync::Mutex<()>,
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
        Ok(App { id, key, installations: Mutex::default(), tokens: Mutex::default(), minting: Default::default() })
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
        if let Some(token) = self.fresh_in_cache(&key) {
            return Ok(token);
        }
        let _minting = self.minting.lock().await;
        if let Some(token) = self.fresh_in_cache(&key) {
            return Ok(token);
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

    /// The cached token for this use, while it has more than a few minutes left.
    fn fresh_in_cache(&self, key: &(u64, Use)) -> Option<RepositoryToken> {
        let cached = self.tokens.lock().expect("token cache").get(key).cloned()?;
        let left = (cached.expires_at - Utc::now()).to_std().unwrap_or_default();
        (left > RENEW_BEFORE).then_some(cached)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::routing::{get, post};
    use axum::Json;
    use serde_json::{json, Value};

    use crate::codehost::CodeHost;
    use crate::config::GithubConfig;
    use crate::github::api::GithubApi;

    /// GitHub's two App endpoints, answering slowly enough that callers overlap, counting the
    /// tokens they hand out.
    async fn slow_github(issued: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new()
            .route("/repos/{owner}/{name}/installation", get(|| async { Json(json!({"id": 5})) }))
            .route(
                "/app/installations/{id}/access_tokens",
                post(move || async move {
                    let n = issued.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let expires_at = chrono::Utc::now() + chrono::Duration::hours(1);
                    Json(json!({"token": format!("ghs_{n}"), "expires_at": expires_at}))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn callers_racing_on_an_empty_cache_share_one_token() {
        let issued = Arc::new(AtomicUsize::new(0));
        let config = GithubConfig {
            webhook_secrets: Vec::new(),
            handle_interval: std::time::Duration::from_millis(500),
            api_url: slow_github(issued.clone()).await,
            token: None,
            app_id: Some(77),
            app_private_key_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa-test.pem").into()),
            public_url: None,
            report_interval: std::time::Duration::from_millis(500),
            resync_interval: std::time::Duration::from_secs(300),
        };
        let api = GithubApi::from_config(&config).unwrap().expect("an App");
        let asks = (0..6).map(|_| api.repository_token("octo/hello"));
        let tokens: Vec<Value> = futures::future::join_all(asks)
            .await
            .into_iter()
            .map(|token| {
                use secrecy::ExposeSecret;
                json!(token.unwrap().expect("a token").value.expose_secret())
            })
            .collect();
        assert_eq!(issued.load(Ordering::SeqCst), 1, "six callers at once, one token: {tokens:?}");
        assert!(tokens.iter().all(|token| token == &tokens[0]), "{tokens:?}");
    }
}
