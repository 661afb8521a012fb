//! A fake of GitHub's REST API, for tests and benchmarks: an HTTP server on loopback that answers
//! the calls CIMaster makes the way GitHub's documentation shows them, and records what it was
//! sent. It can fail status posts for a while (502), and play a GitHub App: it checks the App's
//! RS256 JWT and hands out installation tokens that expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The token the fake takes when no App is configured.
pub const TOKEN: &str = "ghp_fake_token";

/// A status as the fake received it.
#[derive(Debug, Clone)]
pub struct Posted {
    pub repository: String,
    pub sha: String,
    pub context: String,
    pub state: String,
    pub description: String,
    pub target_url: Option<String>,
    pub authorization: String,
    pub at: std::time::Instant,
}

/// A GitHub App the fake plays: its id, the public key its JWTs verify with, and how long the
/// installation tokens it hands out live.
pub struct AppCheck {
    pub id: u64,
    pub public_key_pem: Vec<u8>,
    pub token_lifetime: Duration,
    /// Hand out this token every time (a git server in the test takes only it), not fresh ones.
    pub fixed_token: Option<String>,
}

#[derive(Default)]
struct Inner {
    statuses: Vec<Posted>,
    pulls: HashMap<(String, i64), Value>,
    /// Status posts still to answer 502.
    failing: u32,
    failed: u32,
    /// Status posts still to answer as rate-limited (403, `X-RateLimit-Remaining: 0`), and when
    /// each such answer was given.
    limiting: u32,
    limited: Vec<std::time::Instant>,
    /// Commits whose statuses GitHub refuses (422: too many statuses), and how often it did.
    refused_shas: Vec<String>,
    refusals: u32,
    app: Option<AppCheck>,
    /// Installation tokens handed out, until when each is good, and the scope asked for (the
    /// request's body: `repositories` and `permissions`), if any.
    tokens: Vec<(String, chrono::DateTime<chrono::Utc>, Option<Value>)>,
    /// Requests refused for their authorization.
    unauthorized: u32,
}

#[derive(Clone)]
pub struct FakeGithub {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeGithub {
    pub async fn start(app: Option<AppCheck>) -> anyhow::Result<FakeGithub> {
        let inner = Arc::new(Mutex::new(Inner { app, ..Inner::default() }));
        let router = Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(post_status))
            .route("/repos/{owner}/{repo}/pulls/{number}", get(get_pull))
            .route("/repos/{owner}/{repo}/pulls", get(list_pulls))
            .route("/repos/{owner}/{repo}/installation", get(installation))
            .route("/app/installations/{id}/access_tokens", post(access_token))
            .with_state(inner.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeGithub { url, inner })
    }

    /// GitHub's view of a pull request (what `GET /repos/{repo}/pulls/{n}` answers, and listed as
    /// open while its `state` is `open`).
    pub fn set_pull(&self, repository: &str, pull: Value) {
        let number = pull["number"].as_i64().expect("a pull request has a number");
        self.inner.lock().expect("fake").pulls.insert((repository.to_lowercase(), number), pull);
    }

    /// The next `count` status posts answer 502.
    pub fn fail_statuses(&self, count: u32) {
        self.inner.lock().expect("fake").failing = count;
    }

    /// The next `count` status posts are refused by the rate limit, which resets in two seconds.
    pub fn rate_limit_statuses(&self, count: u32) {
        self.inner.lock().expect("fake").limiting = count;
    }

    /// When status posts were refused by the rate limit.
    pub fn limited(&self) -> Vec<std::time::Instant> {
        self.inner.lock().expect("fake").limited.clone()
    }

    /// Statuses for `sha` are refused as GitHub refuses the 1001st status of a commit and context.
    pub fn refuse_statuses_of(&self, sha: &str) {
        self.inner.lock().expect("fake").refused_shas.push(sha.to_owned());
    }

    /// How many status posts were refused for good.
    pub fn refusals(&self) -> u32 {
        self.inner.lock().expect("fake").refusals
    }

    /// How many status posts were answered 502.
    pub fn failed(&self) -> u32 {
        self.inner.lock().expect("fake").failed
    }

    pub fn statuses(&self) -> Vec<Posted> {
        self.inner.lock().expect("fake").statuses.clone()
    }

    /// The statuses posted for one commit and context, in the order they arrived.
    pub fn statuses_of(&self, sha: &str, context: &str) -> Vec<Posted> {
        self.statuses().into_iter().filter(|s| s.sha == sha && s.context == context).collect()
    }

    /// Installation tokens handed out so far.
    pub fn tokens_issued(&self) -> usize {
        self.inner.lock().expect("fake").tokens.len()
    }

    /// The scope each installation token was asked for (`None`: the whole installation).
    pub fn token_scopes(&self) -> Vec<Option<Value>> {
        self.inner.lock().expect("fake").tokens.iter().map(|(_, _, scope)| scope.clone()).collect()
    }

    pub fn unauthorized(&self) -> u32 {
        self.inner.lock().expect("fake").unauthorized
    }
}

/// A pull request object shaped as GitHub's REST API and webhooks show it.
pub fn pull_request(
    repository: &str,
    number: i64,
    head: &str,
    author: &str,
    association: &str,
    fork: Option<&str>,
) -> Value {
    json!({
        "number": number, "state": "open", "draft": false, "author_association": association,
        "user": {"login": author, "type": "User"},
        "head": {"ref": "feature", "sha": head, "repo": {"full_name": fork.unwrap_or(repository)}},
        "base": {"ref": "main", "sha": "1111111111111111111111111111111111111111", "repo": {"full_name": repository}}
    })
}

type Shared = State<Arc<Mutex<Inner>>>;

fn problem(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"message": message, "documentation_url": "https://docs.github.com/rest"}))).into_response()
}

/// Whether a token the fake gave out may do this on repository `repo` (name without owner), as
/// GitHub judges a scoped installation token: 403 when its `repositories` or `permissions` do not
/// cover it. A refusal counts as unauthorized.
fn permitted(inner: &mut Inner, authorization: &str, repo: &str, permission: &str, level: &str) -> bool {
    let token = authorization.trim_start_matches("Bearer ").trim_start_matches("token ");
    let scope =
        inner.tokens.iter().rev().find(|(issued, _, _)| issued == token).and_then(|(_, _, scope)| scope.clone());
    let Some(scope) = scope else { return true };
    let repositories_ok = scope["repositories"]
        .as_array()
        .is_none_or(|names| names.iter().any(|name| name.as_str().is_some_and(|name| name.eq_ignore_ascii_case(repo))));
    let granted = scope["permissions"][permission].as_str();
    let permission_ok = scope["permissions"].is_null() || granted == Some("write") || granted == Some(level);
    if repositories_ok && permission_ok {
        true
    } else {
        inner.unauthorized += 1;
        false
    }
}

/// Whether the request carries a token the fake gave out (or the fixed one without an App).
fn authorized(inner: &mut Inner, headers: &HeaderMap) -> Option<String> {
    let authorization = headers.get("authorization")?.to_str().ok()?.to_owned();
    let token = authorization.strip_prefix("Bearer ").or_else(|| authorization.strip_prefix("token "))?;
    let now = chrono::Utc::now();
    let good = match &inner.app {
        None => token == TOKEN,
        Some(_) => inner.tokens.iter().any(|(issued, until, _)| issued == token && *until > now),
    };
    if good {
        Some(authorization)
    } else {
        inner.unauthorized += 1;
        None
    }
}

async fn post_status(
    State(inner): Shared,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut inner = inner.lock().expect("fake");
    let Some(authorization) = authorized(&mut inner, &headers) else {
        return problem(StatusCode::UNAUTHORIZED, "Bad credentials");
    };
    if !permitted(&mut inner, &authorization, &repo, "statuses", "write") {
        return problem(StatusCode::FORBIDDEN, "Resource not accessible by integration");
    }
    if inner.refused_shas.contains(&sha) {
        inner.refusals += 1;
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "This SHA and context has reached the maximum number of statuses.",
        );
    }
    if inner.limiting > 0 {
        inner.limiting -= 1;
        inner.limited.push(std::time::Instant::now());
        let reset = (chrono::Utc::now().timestamp() + 2).to_string();
        let mut response = problem(StatusCode::FORBIDDEN, "API rate limit exceeded for installation.");
        let headers = response.headers_mut();
        headers.insert("x-ratelimit-limit", "5000".parse().expect("header"));
        headers.insert("x-ratelimit-remaining", "0".parse().expect("header"));
        headers.insert("x-ratelimit-reset", reset.parse().expect("header"));
        return response;
    }
    if inner.failing > 0 {
        inner.failing -= 1;
        inner.failed += 1;
        return problem(StatusCode::BAD_GATEWAY, "Server Error");
    }
    let text = |name: &str| body[name].as_str().map(str::to_owned);
    let (Some(state), Some(context)) = (text("state"), text("context")) else {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed");
    };
    if !matches!(state.as_str(), "pending" | "success" | "failure" | "error")
        || text("description").is_some_and(|d| d.chars().count() > 140)
    {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed");
    }
    inner.statuses.push(Posted {
        repository: format!("{owner}/{repo}"),
        sha: sha.clone(),
        context: context.clone(),
        state: state.clone(),
        description: text("description").unwrap_or_default(),
        target_url: text("target_url"),
        authorization,
        at: std::time::Instant::now(),
    });
    let id = inner.statuses.len();
    (StatusCode::CREATED, Json(json!({"id": id, "state": state, "context": context, "sha": sha}))).into_response()
}

async fn get_pull(
    State(inner): Shared,
    Path((owner, repo, number)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    let mut inner = inner.lock().expect("fake");
    let Some(authorization) = authorized(&mut inner, &headers) else {
        return problem(StatusCode::UNAUTHORIZED, "Bad credentials");
    };
    if !permitted(&mut inner, &authorization, &repo, "pull_requests", "read") {
        return problem(StatusCode::FORBIDDEN, "Resource not accessible by integration");
    }
    match inner.pulls.get(&(format!("{owner}/{repo}").to_lowercase(), number)) {
        Some(pull) => Json(pull.clone()).into_response(),
        None => problem(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn list_pulls(
    State(inner): Shared,
    Path((owner, repo)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut inner = inner.lock().expect("fake");
    let Some(authorization) = authorized(&mut inner, &headers) else {
        return problem(StatusCode::UNAUTHORIZED, "Bad credentials");
    };
    if !permitted(&mut inner, &authorization, &repo, "pull_requests", "read") {
        return problem(StatusCode::FORBIDDEN, "Resource not accessible by integration");
    }
    if query.get("page").is_some_and(|page| page != "1") {
        return Json(json!([])).into_response();
    }
    let repository = format!("{owner}/{repo}").to_lowercase();
    let open: Vec<Value> = inner
        .pulls
        .iter()
        .filter(|((repo, _), pull)| *repo == repository && pull["state"] == "open")
        .map(|(_, pull)| pull.clone())
        .collect();
    Json(Value::Array(open)).into_response()
}

/// Checks the App's JWT: RS256 under its public key, issued by its id, not expired.
fn app_jwt_valid(inner: &Inner, headers: &HeaderMap) -> bool {
    let Some(app) = &inner.app else { return false };
    let Some(token) =
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_key_pem) else { return false };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_issuer(&[app.id.to_string()]);
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).is_ok()
}

async fn installation(State(inner): Shared, headers: HeaderMap) -> Response {
    let mut inner = inner.lock().expect("fake");
    if !app_jwt_valid(&inner, &headers) {
        inner.unauthorized += 1;
        return problem(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded");
    }
    Json(json!({"id": 4242, "app_id": inner.app.as_ref().map(|app| app.id)})).into_response()
}

async fn access_token(
    State(inner): Shared,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mut inner = inner.lock().expect("fake");
    if !app_jwt_valid(&inner, &headers) || id != 4242 {
        inner.unauthorized += 1;
        return problem(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded");
    }
    let lifetime = inner.app.as_ref().map_or(Duration::from_secs(3600), |app| app.token_lifetime);
    let expires_at = chrono::Utc::now() + chrono::Duration::from_std(lifetime).unwrap_or_default();
    let fixed = inner.app.as_ref().and_then(|app| app.fixed_token.clone());
    let token = fixed.unwrap_or_else(|| format!("ghs_installation_{}", inner.tokens.len() + 1));
    let scope = (!body.is_empty()).then(|| serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null));
    let permissions = scope.as_ref().map_or_else(
        || json!({"statuses": "write", "contents": "read", "pull_requests": "read"}),
        |scope| scope["permissions"].clone(),
    );
    inner.tokens.push((token.clone(), expires_at, scope));
    let expires = expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    (StatusCode::CREATED, Json(json!({"token": token, "expires_at": expires, "permissions": permissions})))
        .into_response()
}
