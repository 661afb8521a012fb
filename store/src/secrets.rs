//! The `job_secrets` table: each job's secrets, sealed (the master encrypts, the agent decrypts),
//! with the branches and events each is limited to.

use chrono::{DateTime, Utc};
use cimaster_common::secrets::{SecretBox, SecretError};
use cimaster_common::{BranchGlob, JobName, RunEvent, SecretScope};
use secrecy::SecretString;
use sqlx::PgPool;

/// Why a job's secrets could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read the job's secrets: {0}")]
    Database(#[from] sqlx::Error),
    #[error("secret `{name}` is not set for job `{job}`; set it with PUT /jobs/{job}/secrets/{name}")]
    NotSet { name: String, job: String },
    #[error("secret `{name}` of job `{job}`: {source}")]
    Unreadable { name: String, job: String, source: SecretError },
}

/// Reads and decrypts the job's secrets `names`, in that order, each with its scope; every one must
/// be set.
pub async fn open(
    pool: &PgPool,
    key: &SecretBox,
    job: &str,
    names: &[String],
) -> Result<Vec<(String, SecretString, SecretScope)>, OpenError> {
    let sealed = sealed(pool, job, names).await?;
    names
        .iter()
        .map(|name| {
            let secret = sealed
                .iter()
                .find(|secret| secret.name == *name)
                .ok_or_else(|| OpenError::NotSet { name: name.clone(), job: job.to_owned() })?;
            let value = key
                .open(&format!("{job}/{name}"), &secret.nonce, &secret.ciphertext)
                .map_err(|source| OpenError::Unreadable { name: name.clone(), job: job.to_owned(), source })?;
            Ok((name.clone(), value, secret.scope.scope()))
        })
        .collect()
}

/// A secret as encrypted at rest, and its scope.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Sealed {
    pub name: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    #[sqlx(flatten)]
    pub scope: ScopeColumns,
}

/// A secret's scope as stored: NULL is no limit.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ScopeColumns {
    pub branches: Option<Vec<String>>,
    pub events: Option<Vec<String>>,
}

impl From<&SecretScope> for ScopeColumns {
    fn from(scope: &SecretScope) -> Self {
        ScopeColumns {
            branches: scope.branches.as_ref().map(|globs| globs.iter().map(|glob| glob.as_str().to_owned()).collect()),
            events: scope.events.as_ref().map(|events| events.iter().map(|event| event.as_str().to_owned()).collect()),
        }
    }
}

impl ScopeColumns {
    /// The scope; a stored value that no longer reads (never written by this code) limits the
    /// secret to nothing rather than to everything.
    pub fn scope(&self) -> SecretScope {
        SecretScope {
            branches: self
                .branches
                .as_ref()
                .map(|globs| globs.iter().filter_map(|glob| BranchGlob::parse(glob).ok()).collect()),
            events: self
                .events
                .as_ref()
                .map(|events| events.iter().filter_map(|event| event.parse::<RunEvent>().ok()).collect()),
        }
    }
}

/// A secret as listed: never its value.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SecretInfo {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
    #[sqlx(flatten)]
    pub scope: ScopeColumns,
}

/// The sealed secrets of a job among `names` (those that are set).
async fn sealed(pool: &PgPool, job: &str, names: &[String]) -> Result<Vec<Sealed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, nonce, ciphertext, branches, events FROM job_secrets WHERE job = $1 AND name = ANY($2)",
    )
    .bind(job)
    .bind(names)
    .fetch_all(pool)
    .await
}

/// Whether any of the job's secrets is limited to branches: only then does a run by commit alone
/// need to know which branches' tip its commit is.
pub async fn any_limited_to_branches(pool: &PgPool, job: &JobName) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM job_secrets WHERE job = $1 AND branches IS NOT NULL)")
        .bind(job.as_str())
        .fetch_one(pool)
        .await
}

/// Sets a secret; `true` if it is new. `None` when the job does not exist (the job row is held
/// FOR SHARE, so a concurrent delete of the job waits and then deletes the secret with it).
pub async fn put(
    pool: &PgPool,
    job: &JobName,
    secret: &Sealed,
    by: &str,
) -> Result<Option<(SecretInfo, bool)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Written {
        #[sqlx(flatten)]
        info: SecretInfo,
        inserted: bool,
    }
    let written: Option<Written> = sqlx::query_as(
        "INSERT INTO job_secrets (job, name, nonce, ciphertext, updated_by, branches, events)
         SELECT name, $2, $3, $4, $5, $6, $7 FROM jobs WHERE name = $1 FOR SHARE
         ON CONFLICT (job, name) DO UPDATE SET nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
             updated_at = now(), updated_by = EXCLUDED.updated_by, branches = EXCLUDED.branches,
             events = EXCLUDED.events
         RETURNING name, created_at, updated_at, updated_by, branches, events, (xmax = 0) AS inserted",
    )
    .bind(job.as_str())
    .bind(&secret.name)
    .bind(&secret.nonce)
    .bind(&secret.ciphertext)
    .bind(by)
    .bind(&secret.scope.branches)
    .bind(&secret.scope.events)
    .fetch_optional(pool)
    .await?;
    Ok(written.map(|written| (written.info, written.inserted)))
}

pub async fn list(pool: &PgPool, job: &JobName) -> Result<Vec<SecretInfo>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, created_at, updated_at, updated_by, branches, events FROM job_secrets WHERE job = $1
         ORDER BY name",
    )
    .bind(job.as_str())
    .fetch_all(pool)
    .await
}

/// Deletes a secret; `false` if the job had no such secret.
pub async fn delete(pool: &PgPool, job: &JobName, name: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM job_secrets WHERE job = $1 AND name = $2")
        .bind(job.as_str())
        .bind(name)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}
