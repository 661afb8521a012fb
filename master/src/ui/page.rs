//! What every page shares: the frame around it (title, navigation, who is signed in, the logout
//! form), rendering with the headers every page carries, and the stylesheet and script served from
//! the binary.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::UiError;
use super::session::Viewer;
use crate::auth::Role;

/// Which section of the navigation a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    None,
    Runs,
    Jobs,
    Pool,
    Agents,
}

/// The frame of a page.
pub struct Chrome {
    pub title: String,
    pub nav: Nav,
    /// Who is signed in, if anyone.
    pub subject: Option<String>,
    pub csrf: String,
    pub may_trigger: bool,
    pub may_admin: bool,
    pub css: &'static str,
    pub js: &'static str,
}

impl Chrome {
    pub fn new(title: impl Into<String>, nav: Nav, viewer: &Viewer) -> Self {
        Self {
            title: title.into(),
            nav,
            subject: Some(viewer.caller.subject.clone()),
            csrf: viewer.csrf.clone(),
            may_trigger: viewer.may(Role::Trigger),
            may_admin: viewer.may(Role::Admin),
            css: &CSS.href,
            js: &JS.href,
        }
    }

    /// The frame of the login and error pages.
    pub fn anonymous(title: impl Into<String>, nav: Nav) -> Self {
        Self {
            title: title.into(),
            nav,
            subject: None,
            csrf: String::new(),
            may_trigger: false,
            may_admin: false,
            css: &CSS.href,
            js: &JS.href,
        }
    }

    /// `aria-current` for a navigation link.
    pub fn current(&self, nav: &str) -> &'static str {
        let here = match self.nav {
            Nav::None => "",
            Nav::Runs => "runs",
            Nav::Jobs => "jobs",
            Nav::Pool => "pool",
            Nav::Agents => "agents",
        };
        if here == nav {
            "page"
        } else {
            "false"
        }
    }
}

/// What every page answers with besides its HTML: scripts and styles of this origin only, no
/// framing, no sniffing, no caching of what a session showed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn render(template: &impl askama::Template) -> Result<Response, UiError> {
    let html = template.render()?;
    let mut response = Html(html).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// A file served from the binary under a name that changes with its content, so browsers may keep
/// it for a year.
pub struct Asset {
    pub href: String,
    name: String,
    body: &'static str,
    content_type: &'static str,
}

impl Asset {
    fn new(stem: &str, extension: &str, body: &'static str, content_type: &'static str) -> Self {
        let digest = hex::encode(&Sha256::digest(body.as_bytes())[..6]);
        let name = format!("{stem}.{digest}.{extension}");
        Self { href: format!("/ui/assets/{name}"), name, body, content_type }
    }
}

static CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("ui", "css", include_str!("../../assets/ui.css"), "text/css; charset=utf-8"));
static JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("ui", "js", include_str!("../../assets/ui.js"), "text/javascript; charset=utf-8"));

pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(asset) = [&*CSS, &*JS].into_iter().find(|asset| asset.name == name) else {
        return UiError::Api(crate::http::ApiError::NotFound(format!("no asset `{name}`"))).into_response();
    };
    let etag = format!("\"{}\"", asset.name);
    if headers.get(header::IF_NONE_MATCH).is_some_and(|sent| sent.as_bytes() == etag.as_bytes()) {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, asset.content_type.to_owned()),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable".to_owned()),
            (header::ETAG, etag),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        asset.body,
    )
        .into_response()
}
