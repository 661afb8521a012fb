//! JSON request bodies whose every failure is a problem+json answer.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// `Json` that answers malformed bodies with problem+json: 415 without a JSON content type,
/// 400 for broken JSON, 422 for JSON that does not fit (unknown fields, bad values), 413 when too big.
pub struct ApiJson<T>(pub T);

/// Like [`ApiJson`], but an empty body means `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (headers, bytes) = read(req, state).await?;
        if bytes.is_empty() {
            return Err(ApiError::BadRequest("the request body is empty; send a JSON object".into()));
        }
        check_content_type(&headers)?;
        parse(&bytes).map(ApiJson)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (headers, bytes) = read(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        check_content_type(&headers)?;
        parse(&bytes).map(OptionalJson)
    }
}

async fn read<S: Send + Sync>(req: Request, state: &S) -> Result<(HeaderMap, Bytes), ApiError> {
    let headers = req.headers().clone();
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: BODY_LIMIT }
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {}", rejection.body_text()))
        }
    })?;
    Ok((headers, bytes))
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
    let is_json = content_type.is_some_and(|value| {
        let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
    });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "send the body as JSON with `Content-Type: application/json` (got {})",
            content_type.map_or_else(|| "no Content-Type".to_owned(), |value| format!("`{value}`"))
        )))
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if has_nul(bytes) {
        // Postgres text cannot hold NUL, and no name, script or value needs one.
        return Err(ApiError::Unprocessable("strings must not contain NUL characters (`\\u0000`)".into()));
    }
    serde_json::from_slice(bytes).map_err(|err| {
        use serde_json::error::Category;
        match err.classify() {
            Category::Data => ApiError::Unprocessable(err.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::BadRequest(format!("the body is not valid JSON: {err}"))
            }
        }
    })
}

/// Whether a JSON text holds an escaped NUL (`\u0000`) in any string. Backslashes occur only inside
/// strings in JSON, so every `\` starts an escape; a raw NUL byte is not valid JSON at all.
fn has_nul(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6).is_some_and(|hex| hex == b"0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::has_nul;

    #[test]
    fn escaped_nuls_are_found_and_escaped_backslashes_are_not() {
        assert!(has_nul(br#"{"script": "echo \u0000"}"#));
        assert!(has_nul(br#"{"a\u0000": 1}"#));
        assert!(!has_nul(br#"{"script": "echo \\u0000"}"#), "a backslash, then the text u0000");
        assert!(has_nul(br#"{"script": "\\\u0000"}"#));
        assert!(!has_nul(br#"{"script": "\u0001"}"#));
        assert!(!has_nul(b"{}"));
    }
}
