//! The API's one error type, answered as RFC 9457 `application/problem+json`.
//!
//! Client errors say what to fix. Server errors are logged with their cause chain and answered
//! without internals; a database or broker that cannot be reached is a 503 with `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::Unavailable("the database is unavailable; retry shortly".into())
            }
            sqlx::Error::Database(db)
                if db.code().is_some_and(|code| code.starts_with("57P") || code.starts_with("08")) =>
            {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::Unavailable("the database is restarting; retry shortly".into())
            }
            _ => ApiError::Database(err),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::Internal(err)
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Database(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed(_) => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Unprocessable(_) => "invalid-input",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Database(_) | ApiError::Internal(_) => "internal",
        }
    }
}

impl ApiError {
    /// What the caller is told: the error itself, or for a server fault that one happened (its
    /// cause is logged here).
    pub(crate) fn public_detail(self) -> String {
        match self {
            err @ (ApiError::Database(_) | ApiError::Internal(_)) => {
                tracing::error!(error = ?anyhow::Error::from(err), "request failed");
                "an internal error occurred; it has been logged".to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let kind = format!("urn:cimaster:problem:{}", self.slug());
        let mut extra = Vec::new();
        match &self {
            ApiError::Unauthorized(err) => {
                let challenge = format!(
                    "Bearer realm=\"cimaster\", error=\"invalid_token\", error_description=\"{}\"",
                    err.to_string().replace('"', "'")
                );
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    extra.push((header::WWW_AUTHENTICATE, value));
                }
            }
            ApiError::Unavailable(_) => extra.push((header::RETRY_AFTER, HeaderValue::from_static("5"))),
            _ => {}
        }
        let detail = self.public_detail();
        let problem =
            Problem { kind, title: status.canonical_reason().unwrap_or("Error"), status: status.as_u16(), detail };
        let body = serde_json::to_vec(&problem).expect("a problem always serialises");
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        for (name, value) in extra {
            headers.insert(name, value);
        }
        response
    }
}
