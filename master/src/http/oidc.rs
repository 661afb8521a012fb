//! `GET /.well-known/openid-configuration` and `GET /.well-known/jwks.json`: what a cloud or Vault
//! reads to trust the runs' ID tokens (see `crate::oidc`). Both are public, as OIDC discovery
//! requires; neither says more than the issuer and the public keys.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use cimaster_store::oidc_keys;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, RSAKeyParameters, RSAKeyType,
};
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::oidc::{DISCOVERY_PATH, JWKS_PATH};

pub fn router() -> Router<AppState> {
    Router::new().route(DISCOVERY_PATH, get(discovery)).route(JWKS_PATH, get(jwks))
}

/// Verifiers cache both documents this long; one that meets an unknown `kid` fetches the keys again.
const CACHE: &str = "public, max-age=300";

/// The claims a run's ID token carries.
const CLAIMS: [&str; 16] = [
    "iss",
    "sub",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "repository",
    "ref",
    "commit",
    "job",
    "run_id",
    "attempt",
    "event",
    "triggered_by",
    "from_fork",
];

/// The OpenID Provider metadata of the runs' ID tokens (OpenID Connect Discovery 1.0).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Discovery {
    /// `CIMASTER_PUBLIC_URL`: every token's `iss`.
    pub issuer: String,
    pub jwks_uri: String,
    pub response_types_supported: Vec<&'static str>,
    pub subject_types_supported: Vec<&'static str>,
    pub id_token_signing_alg_values_supported: Vec<&'static str>,
    pub scopes_supported: Vec<&'static str>,
    pub claims_supported: Vec<&'static str>,
}

/// The issuer, when this installation issues ID tokens.
fn issuer(state: &AppState) -> Result<String, ApiError> {
    match (&state.github.public_url, &state.secrets) {
        (Some(url), Some(_)) => Ok(crate::oidc::issuer(url)),
        _ => Err(ApiError::NotFound(
            "this installation issues no ID tokens: the master needs CIMASTER_PUBLIC_URL and CIMASTER_SECRETS_KEY"
                .into(),
        )),
    }
}

/// Where the runs' ID tokens come from and where their keys are (no token needed).
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "oidc",
    responses((status = 200, body = Discovery), (status = 404, description = "this installation issues no ID tokens")))]
pub(super) async fn discovery(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let issuer = issuer(&state)?;
    let document = Discovery {
        jwks_uri: format!("{issuer}{JWKS_PATH}"),
        issuer,
        response_types_supported: vec!["id_token"],
        subject_types_supported: vec!["public"],
        id_token_signing_alg_values_supported: vec!["RS256"],
        scopes_supported: vec!["openid"],
        claims_supported: CLAIMS.to_vec(),
    };
    Ok(([(header::CACHE_CONTROL, CACHE)], Json(document)))
}

/// The public keys that verify the runs' ID tokens: the one that signs now and those retired
/// within the last day (no token needed).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "oidc",
    responses((status = 200, description = "a JWK Set (RFC 7517)", body = Object),
              (status = 404, description = "this installation issues no ID tokens")))]
pub(super) async fn jwks(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    issuer(&state)?;
    let keys = oidc_keys::published(&state.pool).await?;
    let set = JwkSet { keys: keys.into_iter().map(jwk).collect() };
    Ok(([(header::CACHE_CONTROL, CACHE)], Json(set)))
}

fn jwk(key: oidc_keys::PublicKey) -> Jwk {
    Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(KeyAlgorithm::RS256),
            key_id: Some(key.kid),
            ..Default::default()
        },
        algorithm: AlgorithmParameters::RSA(RSAKeyParameters { key_type: RSAKeyType::RSA, n: key.n, e: key.e }),
    }
}
