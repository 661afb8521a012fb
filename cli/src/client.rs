//! The API over HTTP: one client, answers as JSON, and every error turned into one readable line.

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::error::{failed, CliError, Result};

/// Where the master is and who we are to it.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub base: String,
    token: Option<String>,
}

impl Api {
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(failed(format!("`{base}` is not a URL: give the master as http(s)://host:port")));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("cim/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|err| failed(err.to_string()))?;
        Ok(Self { http, base, token })
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends and checks the status: a problem answer becomes the error it describes.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        self.checked(request.send().await).await
    }

    /// Checks a sent request's outcome.
    pub async fn checked(&self, sent: reqwest::Result<Response>) -> Result<Response> {
        let response = sent.map_err(|err| self.unreachable(&err))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(problem(response).await)
        }
    }

    /// Sends and reads the JSON answer.
    pub async fn json(&self, request: RequestBuilder) -> Result<Value> {
        read_json(self.send(request).await?).await
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    pub fn unreachable(&self, err: &reqwest::Error) -> CliError {
        if err.is_connect() || err.is_timeout() {
            let reason = if err.is_timeout() { "timed out" } else { "connection refused" };
            CliError::Unreachable { url: self.base.clone(), reason: reason.to_owned() }
        } else {
            failed(format!("{}: {}", self.base, root_cause(err)))
        }
    }
}

pub async fn read_json(response: Response) -> Result<Value> {
    response.json().await.map_err(|err| failed(format!("the master's answer is not JSON: {err}")))
}

/// The innermost reason of an error, which is the one a person can act on.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The problem+json `detail` (or the body) as one line, with what to do for 401 and 403.
async fn problem(response: Response) -> CliError {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|problem| {
            let detail = problem.get("detail").and_then(Value::as_str).map(str::to_owned);
            detail.or_else(|| problem.get("title").and_then(Value::as_str).map(str::to_owned))
        })
        .unwrap_or_else(|| body.trim().to_owned());
    let detail = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    match status {
        StatusCode::UNAUTHORIZED => CliError::NotAuthorised(format!(
            "not signed in (401: {detail}): run `cim login --url URL`, or set CIMASTER_TOKEN to a valid token"
        )),
        StatusCode::FORBIDDEN => CliError::NotAuthorised(format!(
            "not allowed (403: {detail}): this needs a token with a stronger role; `cim whoami` shows yours"
        )),
        _ => failed(format!("{} {}: {detail}", status.as_u16(), status.canonical_reason().unwrap_or("error"))),
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
