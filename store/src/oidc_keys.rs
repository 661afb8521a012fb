//! The `oidc_keys` table: the keys that sign runs' ID tokens. The master makes a key and retires
//! the one before it in one transaction ([`rotate`]); an agent reads the key that signs now
//! ([`signing`]); the JWKS lists what [`published`] returns. The private key is sealed with the
//! installation's secrets key, as job secrets are, and bound to its `kid`.

use std::time::Duration;

use cimaster_common::secrets::{SecretBox, SecretError};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

fn context(kid: &str) -> String {
    format!("oidc-key/{kid}")
}

/// A key as made by the master, before it is sealed.
pub struct NewKey {
    pub kid: String,
    pub issuer: String,
    /// Modulus and exponent, base64url without padding (a JWK's `n` and `e`).
    pub n: String,
    pub e: String,
    /// PKCS#1 PEM.
    pub private_pem: SecretString,
}

/// A key's public part, as the JWKS lists it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PublicKey {
    pub kid: String,
    pub n: String,
    pub e: String,
}

/// The key that signs now, opened.
pub struct SigningKey {
    pub kid: String,
    pub issuer: String,
    pub private_pem: SecretString,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("cannot read the ID token signing key: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the ID token signing key {kid} cannot be opened: {source}")]
    Unreadable { kid: String, source: SecretError },
}

/// When the signing key must be replaced: there is none, it signs for another issuer, or it is
/// `every` old.
pub async fn due(pool: &PgPool, issuer: &str, every: Duration) -> Result<bool, sqlx::Error> {
    due_in(pool, issuer, every).await
}

async fn due_in<'e>(db: impl sqlx::PgExecutor<'e>, issuer: &str, every: Duration) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM oidc_keys WHERE retired_at IS NULL AND issuer = $1
                                AND created_at > now() - make_interval(secs => $2))",
    )
    .bind(issuer)
    .bind(every.as_secs_f64())
    .fetch_one(db)
    .await
}

/// Makes `key` the signing key if one is still [`due`] — checked again under a lock, so that of
/// replicas rotating at once one key wins and the others' are dropped. The key it replaces stays
/// published for `keep_published`. Returns whether `key` was installed.
pub async fn rotate(
    pool: &PgPool,
    secrets: &SecretBox,
    key: &NewKey,
    every: Duration,
    keep_published: Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cimaster oidc keys'))").execute(&mut *tx).await?;
    if !due_in(&mut *tx, &key.issuer, every).await? {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE oidc_keys SET retired_at = now(), published_until = now() + make_interval(secs => $1)
         WHERE retired_at IS NULL",
    )
    .bind(keep_published.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    let (nonce, sealed) = secrets.seal(&context(&key.kid), key.private_pem.expose_secret());
    sqlx::query("INSERT INTO oidc_keys (kid, issuer, n, e, nonce, sealed_key) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&key.kid)
        .bind(&key.issuer)
        .bind(&key.n)
        .bind(&key.e)
        .bind(nonce)
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// The keys a verifier may meet: the one that signs, then those retired less than their
/// `published_until` ago, newest first.
pub async fn published(pool: &PgPool) -> Result<Vec<PublicKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kid, n, e FROM oidc_keys WHERE retired_at IS NULL OR published_until > now()
         ORDER BY created_at DESC",
    )
    .fetch_all(pool)
    .await
}

/// The key that signs now, opened; `None` while the master has made none (no
/// `CIMASTER_PUBLIC_URL`, or no master has run since it was set).
pub async fn signing(pool: &PgPool, secrets: &SecretBox) -> Result<Option<SigningKey>, SigningKeyError> {
    let row: Option<(String, String, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT kid, issuer, nonce, sealed_key FROM oidc_keys WHERE retired_at IS NULL")
            .fetch_optional(pool)
            .await?;
    let Some((kid, issuer, nonce, sealed)) = row else { return Ok(None) };
    let private_pem = secrets
        .open(&context(&kid), &nonce, &sealed)
        .map_err(|source| SigningKeyError::Unreadable { kid: kid.clone(), source })?;
    Ok(Some(SigningKey { kid, issuer, private_pem }))
}
