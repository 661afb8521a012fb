//! `/jobs/{name}/secrets`: write-only job secrets, encrypted at rest, each optionally limited to
//! branches and events (`cimaster_common::SecretScope`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cimaster_common::{BranchGlob, EnvName, RunEvent, SecretScope};
use cimaster_store::secrets as store;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, Problem};
use super::jobs::{job_name, job_not_found, require_job};
use super::json::ApiJson;
use super::AppState;
use crate::http::{Admin, Reader};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs/{name}/secrets", get(list_secrets))
        .route("/jobs/{name}/secrets/{key}", put(put_secret).delete(delete_secret))
}

const MAX_SECRET: usize = 64 * 1024;

/// A secret's value and, optionally, the branches and events it is limited to (left out: every
/// run of the job gets it, as before). Setting a secret again replaces its scope too.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct SecretBody {
    pub value: String,
    /// Branch globs (`*` matches any run of characters): the run's commit must be the tip of one.
    #[schema(value_type = Option<Vec<String>>, example = json!(["main", "release-*"]))]
    pub branches: Option<Vec<BranchGlob>>,
    /// Events whose runs get the secret: `api`, `push`, `pull_request`, `schedule`.
    pub events: Option<Vec<RunEvent>>,
}

/// A secret as listed: never its value.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretInfo {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
    #[serde(flatten)]
    pub scope: SecretScope,
}

impl From<store::SecretInfo> for SecretInfo {
    fn from(info: store::SecretInfo) -> Self {
        SecretInfo {
            name: info.name,
            created_at: info.created_at,
            updated_at: info.updated_at,
            updated_by: info.updated_by,
            scope: info.scope.scope(),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretInfo>,
}

fn secret_name(raw: &str) -> Result<EnvName, ApiError> {
    EnvName::parse(raw).map_err(|err| ApiError::BadRequest(err.to_string()))
}

/// Set a secret (admin). Stored encrypted; reaches runs as the env var of the same name — only runs
/// in its scope when `branches` or `events` limit it: a run whose commit is the tip of a matching
/// branch (never a pull request's), of a listed event.
#[utoipa::path(put, path = "/jobs/{name}/secrets/{key}", tag = "secrets", request_body = SecretBody,
    params(("name" = String, Path), ("key" = String, Path)),
    responses((status = 201, body = SecretInfo), (status = 200, body = SecretInfo),
        (status = 503, description = "no secrets key configured", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn put_secret(
    State(state): State<AppState>,
    caller: Admin,
    Path((name, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<SecretBody>,
) -> Result<(StatusCode, Json<SecretInfo>), ApiError> {
    let job = job_name(&name)?;
    let key = secret_name(&key)?;
    let secrets = state
        .secrets
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("secrets are not configured here: set CIMASTER_SECRETS_KEY".into()))?;
    if body.value.is_empty() || body.value.len() > MAX_SECRET {
        return Err(ApiError::Unprocessable(format!("a secret value is 1 to {MAX_SECRET} bytes")));
    }
    let scope = SecretScope { branches: body.branches, events: body.events };
    scope.check().map_err(ApiError::Unprocessable)?;
    let (nonce, ciphertext) = secrets.seal(&format!("{job}/{key}"), &body.value);
    let sealed = store::Sealed { name: key.to_string(), nonce, ciphertext, scope: (&scope).into() };
    let (info, inserted) =
        store::put(&state.pool, &job, &sealed, &caller.subject).await?.ok_or_else(|| job_not_found(&job))?;
    let info = SecretInfo::from(info);
    tracing::info!(job = %job, secret = %key, by = %caller.subject, "secret set");
    Ok((if inserted { StatusCode::CREATED } else { StatusCode::OK }, Json(info)))
}

/// The job's secrets: names and dates only.
#[utoipa::path(get, path = "/jobs/{name}/secrets", tag = "secrets", params(("name" = String, Path)),
    responses((status = 200, body = SecretList)), security(("bearer" = [])))]
async fn list_secrets(
    State(state): State<AppState>,
    _caller: Reader,
    Path(name): Path<String>,
) -> Result<Json<SecretList>, ApiError> {
    let job = job_name(&name)?;
    require_job(&state, &job).await?;
    let secrets = store::list(&state.pool, &job).await?.into_iter().map(SecretInfo::from).collect();
    Ok(Json(SecretList { secrets }))
}

/// Delete a secret (admin).
#[utoipa::path(delete, path = "/jobs/{name}/secrets/{key}", tag = "secrets",
    params(("name" = String, Path), ("key" = String, Path)),
    responses((status = 204), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn delete_secret(
    State(state): State<AppState>,
    _caller: Admin,
    Path((name, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let job = job_name(&name)?;
    let key = secret_name(&key)?;
    if !store::delete(&state.pool, &job, key.as_str()).await? {
        return Err(ApiError::NotFound(format!("job `{job}` has no secret `{key}`")));
    }
    Ok(StatusCode::NO_CONTENT)
}
