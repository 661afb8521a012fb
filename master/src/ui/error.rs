//! What the UI answers when something goes wrong: the API's error, or one of its own, as a page
//! with the same status code and the same words.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::page::{Chrome, Nav};
use crate::http::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    BadRequest(String),
    #[error("sign in first")]
    Unauthorized,
    #[error("the form's CSRF token is missing or wrong: reload the page and try again")]
    Csrf,
    #[error("the page could not be rendered")]
    Render(#[from] askama::Error),
}

impl From<crate::auth::AuthError> for UiError {
    fn from(err: crate::auth::AuthError) -> Self {
        UiError::Api(err.into())
    }
}

impl From<sqlx::Error> for UiError {
    fn from(err: sqlx::Error) -> Self {
        UiError::Api(err.into())
    }
}

impl From<cimaster_store::pool::PoolError> for UiError {
    fn from(err: cimaster_store::pool::PoolError) -> Self {
        UiError::Api(err.into())
    }
}

#[derive(askama::Template)]
#[template(path = "ui/error.html")]
struct ErrorPage {
    page: Chrome,
    status: u16,
    reason: &'static str,
    detail: String,
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, detail) = match self {
            UiError::Api(err) => (err.status(), err.public_detail()),
            UiError::BadRequest(detail) => (StatusCode::BAD_REQUEST, detail),
            err @ UiError::Unauthorized => (StatusCode::UNAUTHORIZED, err.to_string()),
            err @ UiError::Csrf => (StatusCode::FORBIDDEN, err.to_string()),
            UiError::Render(err) => {
                tracing::error!(error = %err, "a page failed to render");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered; it has been logged".into())
            }
        };
        let reason = status.canonical_reason().unwrap_or("Error");
        let page = ErrorPage { page: Chrome::anonymous(reason, Nav::None), status: status.as_u16(), reason, detail };
        match super::page::render(&page) {
            Ok(mut response) => {
                *response.status_mut() = status;
                response
            }
            Err(_) => (status, reason).into_response(),
        }
    }
}
