//! Signing in to the web UI: the login form takes a token (the same JWT the API takes) and keeps it
//! in an HttpOnly, SameSite=Strict cookie for as long as the token is valid. Every page checks it
//! as the API checks a bearer token, and every form that changes something carries a CSRF token
//! derived from it, which a page of another origin cannot know.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::error::UiError;
use super::page::{Chrome, Nav};
use crate::auth::{Caller, Role};
use crate::http::{ApiError, AppState};

pub const COOKIE: &str = "cimaster_session";
/// The largest form the UI takes (the trigger form with its parameters is the largest).
const FORM_LIMIT: usize = 64 << 10;
/// The largest login form: a token and the page to go to next. It is read before anyone is known,
/// so it is kept small.
pub const LOGIN_LIMIT: usize = 8 << 10;

/// Someone signed in: who, with which roles, and the CSRF token their forms carry.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub caller: Caller,
    pub csrf: String,
    /// The session's token, for asking the API on the viewer's behalf.
    pub token: String,
}

impl Viewer {
    pub fn may(&self, role: Role) -> bool {
        self.caller.has(role)
    }

    /// 403 page unless the viewer holds `role`.
    pub fn require(&self, role: Role) -> Result<(), UiError> {
        Ok(self.caller.require(role)?)
    }
}

/// The CSRF token of a session: a digest of its token, so it is as secret as the cookie and needs
/// no storage; it changes with every sign-in.
fn csrf_of(token: &str) -> String {
    let digest = Sha256::new().chain_update(b"cimaster-ui-csrf\0").chain_update(token.as_bytes()).finalize();
    hex::encode(&digest[..16])
}

fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    /// A page asked without a valid session is sent to the login form, which comes back to it.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let checked = session_token(&parts.headers).map(|token| {
            let caller = state.verifier.verify_header(Some(&format!("Bearer {token}")));
            caller.map(|caller| Viewer { caller, csrf: csrf_of(token), token: token.to_owned() })
        });
        match checked {
            Some(Ok(viewer)) => Ok(viewer),
            _ if parts.method == Method::GET => {
                let next = parts.uri.path_and_query().map_or("/ui/runs", |path| path.as_str());
                Err(Redirect::to(&format!("/ui/login?next={}", super::format::urlencode(next))).into_response())
            }
            Some(Err(err)) => Err(UiError::from(crate::http::ApiError::from(err)).into_response()),
            None => Err(UiError::Unauthorized.into_response()),
        }
    }
}

/// A form posted by a signed-in viewer whose CSRF token matched: its fields, in order.
pub struct Posted {
    pub viewer: Viewer,
    pub fields: Vec<(String, String)>,
}

impl Posted {
    /// The first value of a field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

impl FromRequest<AppState> for Posted {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let viewer = Viewer::from_request_parts(&mut parts, state).await?;
        let bytes = read_form(&parts.headers, body, FORM_LIMIT).await.map_err(IntoResponse::into_response)?;
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
            .map_err(|_| UiError::BadRequest("the form is not URL-encoded".into()).into_response())?;
        let sent = fields.iter().find(|(key, _)| key == "csrf").map(|(_, value)| value.as_str()).unwrap_or("");
        if !constant_time_eq(sent.as_bytes(), viewer.csrf.as_bytes()) {
            return Err(UiError::Csrf.into_response());
        }
        Ok(Posted { viewer, fields })
    }
}

/// A form's body, at most `limit` bytes: 413 at once for a longer `Content-Length`, or as soon as
/// the body grows past it.
async fn read_form(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, UiError> {
    let too_large = || UiError::Api(ApiError::PayloadTooLarge { limit });
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        if std::error::Error::source(&err).is_some_and(|source| source.is::<http_body_util::LengthLimitError>()) {
            too_large()
        } else {
            UiError::BadRequest(format!("cannot read the form: {err}"))
        }
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    error: Option<String>,
}

#[derive(askama::Template)]
#[template(path = "ui/login.html")]
struct LoginPage {
    page: Chrome,
    next: String,
    error: Option<String>,
}

/// Where a login may send the browser afterwards: a page of the UI, nowhere else.
fn next_page(next: Option<&str>) -> String {
    next.filter(|next| next.starts_with("/ui/") && !next.starts_with("//") && !next.contains('\\'))
        .unwrap_or("/ui/runs")
        .to_owned()
}

pub async fn login_form(axum::extract::Query(query): axum::extract::Query<LoginQuery>) -> Result<Response, UiError> {
    let page = LoginPage {
        page: Chrome::anonymous("Sign in", Nav::None),
        next: next_page(query.next.as_deref()),
        error: query.error,
    };
    super::page::render(&page)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Checks the token and sets the session cookie; a refused token shows the form again with why.
/// A form longer than [`LOGIN_LIMIT`] is refused (413) before more of it is read.
pub async fn login(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let form = match read_form(&headers, body, LOGIN_LIMIT).await.and_then(|bytes| {
        serde_urlencoded::from_bytes::<LoginForm>(&bytes)
            .map_err(|_| UiError::BadRequest("the form is URL-encoded, with a `token`".into()))
    }) {
        Ok(form) => form,
        Err(err) => return err.into_response(),
    };
    let token = form.token.trim();
    let next = next_page(form.next.as_deref());
    let caller = match state.verifier.verify_header(Some(&format!("Bearer {token}"))) {
        Ok(caller) => caller,
        Err(err) => {
            let page = LoginPage { page: Chrome::anonymous("Sign in", Nav::None), next, error: Some(err.to_string()) };
            return match super::page::render(&page) {
                Ok(mut response) => {
                    *response.status_mut() = StatusCode::UNAUTHORIZED;
                    response
                }
                Err(err) => err.into_response(),
            };
        }
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let max_age = caller.expires.saturating_sub(now);
    let secure = if is_https(&state, &headers) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    tracing::info!(subject = %caller.subject, "signed in to the web UI");
    with_cookie(Redirect::to(&next).into_response(), &cookie)
}

/// Ends the session (the token itself stays valid until it expires: it is the caller's).
pub async fn logout(State(state): State<AppState>, headers: HeaderMap, _posted: Posted) -> Response {
    let secure = if is_https(&state, &headers) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    with_cookie(Redirect::to("/ui/login").into_response(), &cookie)
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Whether the browser reached the master over https: its public URL says so, or the proxy in
/// front of it does.
fn is_https(state: &AppState, headers: &HeaderMap) -> bool {
    state.github.public_url.as_deref().is_some_and(|url| url.starts_with("https://"))
        || headers.get("x-forwarded-proto").is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_of_the_ui_are_next() {
        assert_eq!(next_page(Some("/ui/jobs/a")), "/ui/jobs/a");
        for evil in ["https://evil.example/ui/", "//evil.example", "/ui\\..\\x", "/jobs/a"] {
            assert_eq!(next_page(Some(evil)), "/ui/runs", "{evil}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; cimaster_session=tok.en.x; b=2"));
        assert_eq!(session_token(&headers), Some("tok.en.x"));
        assert_ne!(csrf_of("one"), csrf_of("two"));
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"a", b"ab")
        );
    }
}
