//! The `repository_tokens` table: a token that reads a repository (a GitHub App's installation
//! token), sealed with the secrets key. The master stores each one it gets; an agent clones with
//! it when the job brings no token of its own.

use chrono::{DateTime, Utc};
use cimaster_common::secrets::SecretBox;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

fn context(repository: &str) -> String {
    format!("repository-token/{}", repository.to_lowercase())
}

pub async fn store(
    pool: &PgPool,
    key: &SecretBox,
    repository: &str,
    token: &SecretString,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let (nonce, ciphertext) = key.seal(&context(repository), token.expose_secret());
    sqlx::query(
        "INSERT INTO repository_tokens (repository, nonce, ciphertext, expires_at) VALUES (lower($1), $2, $3, $4)
         ON CONFLICT (repository) DO UPDATE
         SET nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, expires_at = EXCLUDED.expires_at,
             updated_at = now()
         WHERE repository_tokens.expires_at <= EXCLUDED.expires_at",
    )
    .bind(repository)
    .bind(nonce)
    .bind(ciphertext)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// The repository's token while it is still good; `None` without one (or one that cannot be opened).
pub async fn open(pool: &PgPool, key: &SecretBox, repository: &str) -> Result<Option<SecretString>, sqlx::Error> {
    let sealed: Option<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT nonce, ciphertext FROM repository_tokens WHERE repository = lower($1) AND expires_at > now()",
    )
    .bind(repository)
    .fetch_optional(pool)
    .await?;
    Ok(sealed.and_then(|(nonce, ciphertext)| key.open(&context(repository), &nonce, &ciphertext).ok()))
}
