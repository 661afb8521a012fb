//! GitHub's REST API as CIMaster uses it (github.com, or GitHub Enterprise at `https://HOST/api/v3`):
//! commit statuses, one pull request, the open pull requests, and installation tokens for a GitHub
//! App. Every answer GitHub may give is sorted into done, try again (5xx, timeouts, rate limits,
//! honouring `Retry-After` and `X-RateLimit-Reset`) or refused for good.

use std::time::Duration;

use cimaster_common::RepoFullName;
use futures::future::BoxFuture;
use futures::FutureExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::app::App;
use crate::codehost::{CodeHost, CommitStatus, HostError, PullRequest, RepositoryToken};
use crate::config::GithubConfig;

/// A request to GitHub gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The open pull requests are read 100 to a page, at most this many pages.
const MAX_PAGES: u32 = 20;

pub struct GithubApi {
    http: reqwest::Client,
    base: String,
    auth: Auth,
}

enum Auth {
    Token(SecretString),
    App(App),
}

impl GithubApi {
    /// The API client the configuration asks for: an App, a token, or none (no statuses are posted,
    /// and comment commands cannot read their pull request).
    pub fn from_config(config: &GithubConfig) -> anyhow::Result<Option<GithubApi>> {
        let auth = match (&config.app_id, &config.app_private_key_file, &config.token) {
            (Some(id), Some(key), _) => Auth::App(App::load(*id, key)?),
            (Some(_), None, _) | (None, Some(_), _) => {
                anyhow::bail!("a GitHub App needs both CIMASTER_GITHUB_APP_ID and CIMASTER_GITHUB_APP_PRIVATE_KEY_FILE")
            }
            (None, None, Some(token)) => Auth::Token(token.clone()),
            (None, None, None) => return Ok(None),
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("cimaster/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(GithubApi { http, base: config.api_url.trim_end_matches('/').to_owned(), auth }))
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
    }

    /// A request authenticated as the App itself (installation lookups and tokens).
    pub(super) async fn as_app<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        jwt: &str,
        body: Option<&Value>,
    ) -> Result<T, HostError> {
        let mut request = self.request(method, path).bearer_auth(jwt);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = send(request).await?;
        read_json(response).await
    }

    /// A request on a repository's behalf, with the token or the App's installation token.
    async fn as_repository(&self, method: Method, repository: &str, path: &str) -> Result<RequestBuilder, HostError> {
        check_repository(repository)?;
        let token = match &self.auth {
            Auth::Token(token) => token.clone(),
            Auth::App(app) => app.token(self, repository).await?.value,
        };
        Ok(self.request(method, &format!("/repos/{repository}{path}")).bearer_auth(token.expose_secret()))
    }

    async fn call(
        &self,
        method: Method,
        repository: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, HostError> {
        let mut request = self.as_repository(method, repository, path).await?;
        if let Some(body) = body {
            request = request.json(body);
        }
        let result = send(request).await;
        if let (Err(HostError::Retry { why, .. }), Auth::App(app)) = (&result, &self.auth) {
            if why.starts_with("401") {
                app.forget(repository);
            }
        }
        result
    }

    async fn post_status_now(&self, status: &CommitStatus) -> Result<(), HostError> {
        let mut body = json!({
            "state": status.state.as_str(),
            "description": status.description,
            "context": status.context,
        });
        if let Some(url) = &status.target_url {
            body["target_url"] = json!(url);
        }
        self.call(Method::POST, &status.repository, &format!("/statuses/{}", status.sha), Some(&body)).await?;
        Ok(())
    }

    async fn pull_request_now(&self, repository: &str, number: i64) -> Result<PullRequest, HostError> {
        let response = self.call(Method::GET, repository, &format!("/pulls/{number}"), None).await?;
        let pull: Value = read_json(response).await?;
        read_pull(&pull, repository)
    }

    async fn open_pull_requests_now(&self, repository: &str) -> Result<Vec<PullRequest>, HostError> {
        let mut pulls = Vec::new();
        for page in 1..=MAX_PAGES {
            let path = format!("/pulls?state=open&per_page=100&page={page}");
            let response = self.call(Method::GET, repository, &path, None).await?;
            let listed: Vec<Value> = read_json(response).await?;
            let last = listed.len() < 100;
            for pull in &listed {
                pulls.push(read_pull(pull, repository)?);
            }
            if last {
                break;
            }
        }
        Ok(pulls)
    }
}

impl CodeHost for GithubApi {
    fn post_status<'a>(&'a self, status: &'a CommitStatus) -> BoxFuture<'a, Result<(), HostError>> {
        self.post_status_now(status).boxed()
    }

    fn pull_request<'a>(&'a self, repository: &'a str, number: i64) -> BoxFuture<'a, Result<PullRequest, HostError>> {
        self.pull_request_now(repository, number).boxed()
    }

    fn open_pull_requests<'a>(&'a self, repository: &'a str) -> BoxFuture<'a, Result<Vec<PullRequest>, HostError>> {
        self.open_pull_requests_now(repository).boxed()
    }

    fn repository_token<'a>(
        &'a self,
        repository: &'a str,
    ) -> BoxFuture<'a, Result<Option<RepositoryToken>, HostError>> {
        async move {
            match &self.auth {
                Auth::App(app) => Ok(Some(app.read_token(self, repository).await?)),
                Auth::Token(_) => Ok(None),
            }
        }
        .boxed()
    }
}

fn read_pull(pull: &Value, repository: &str) -> Result<PullRequest, HostError> {
    let author = pull.pointer("/user/login").and_then(Value::as_str).unwrap_or_default().to_owned();
    super::pull_request(pull, repository.to_owned(), "listed".to_owned(), author)
        .map_err(|field| HostError::Unreadable(format!("GitHub's pull request has no `{field}`")))
}

/// `owner/name` with nothing in it that could change the URL's path.
fn check_repository(repository: &str) -> Result<(), HostError> {
    RepoFullName::parse(repository).map(drop).map_err(|why| HostError::Refused { why })
}

/// Sends a request and sorts GitHub's answer: a success, something to retry, or a refusal.
async fn send(request: RequestBuilder) -> Result<Response, HostError> {
    let response = request
        .send()
        .await
        .map_err(|err| HostError::Retry { wait: None, why: format!("GitHub unreachable: {err}") })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let message = response
        .json::<Value>()
        .await
        .ok()
        .and_then(|body| body["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let why = format!("{} {message}", status.as_u16()).trim_end().to_owned();
    let retry_after = header("retry-after").and_then(|secs| secs.parse::<u64>().ok()).map(Duration::from_secs);
    let limited = header("x-ratelimit-remaining").as_deref() == Some("0");
    let reset = header("x-ratelimit-reset")
        .and_then(|at| at.parse::<i64>().ok())
        .map(|at| Duration::from_secs(u64::try_from(at - chrono::Utc::now().timestamp()).unwrap_or(0).clamp(1, 3600)));
    match status {
        StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS if retry_after.is_some() || limited => {
            Err(HostError::Retry { wait: retry_after.or(reset).or(Some(Duration::from_secs(60))), why })
        }
        StatusCode::UNAUTHORIZED | StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
            Err(HostError::Retry { wait: retry_after, why })
        }
        status if status.is_server_error() => Err(HostError::Retry { wait: retry_after, why }),
        _ => Err(HostError::Refused { why }),
    }
}

async fn read_json<T: DeserializeOwned>(response: Response) -> Result<T, HostError> {
    response
        .json()
        .await
        .map_err(|err| HostError::Unreadable(format!("GitHub's answer is not what was expected: {err}")))
}
