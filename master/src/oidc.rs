//! The installation as an OIDC identity provider for its runs: the keys that sign their ID tokens,
//! made and rotated here, and published at `/.well-known/jwks.json` (see `http::oidc`).
//!
//! Why it is built this way:
//! - **Keys live in Postgres** (`oidc_keys`), the private part sealed with `CIMASTER_SECRETS_KEY` as
//!   job secrets are. Every replica serves the same JWKS and needs no key file; agents, which already
//!   hold the secrets key to open job secrets, sign each attempt's token when it starts — the master
//!   is not asked per run, so a run needs no route from the agent to the master.
//! - **The issuer is stored with the key**: the agent signs with the key's `issuer` and needs no
//!   `CIMASTER_PUBLIC_URL` of its own. When the master's URL changes, its key is due at once and
//!   the next one carries the new issuer.
//! - **Rotation without a leader**: every replica checks every minute whether the signing key is
//!   `CIMASTER_OIDC_KEY_ROTATION` old (or missing, or for another issuer), makes a key if so, and
//!   installs it in one transaction under an advisory lock that checks again — of replicas that
//!   raced, one key wins and the others are dropped before anyone signed with them. The first key
//!   is made before the master serves.
//! - **A retired key stays published for [`KEEP_PUBLISHED`]** (a day): tokens live at most an hour
//!   (`MAX_LIFETIME_SECONDS`), so every token still valid verifies against the JWKS, also from
//!   a verifier that cached it an hour or more. A new key signs as soon as it is installed;
//!   verifiers fetch the JWKS again when they meet a `kid` they do not know.
//! - **RS256 with 2048-bit keys**: what AWS STS, GCP workload identity federation and Vault's JWT
//!   auth all accept. The `kid` is the key's RFC 7638 thumbprint.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cimaster_common::secrets::SecretBox;
use cimaster_store::oidc_keys::{self, NewKey};
use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ticker::Ticker;

/// How long a retired key stays in the JWKS.
pub const KEEP_PUBLISHED: Duration = Duration::from_secs(24 * 3600);

/// How often each replica checks whether the signing key is due (at most).
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Where the keys are published, under the issuer.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the ID token keys: {0}")]
    Database(#[from] sqlx::Error),
    #[error("making an RSA key failed: {0}")]
    Generate(String),
}

/// What the master needs to issue ID tokens: its public URL (the issuer) and the key the private
/// keys are sealed with.
#[derive(Clone)]
pub struct Keys {
    pub issuer: String,
    pub secrets: SecretBox,
    /// A key signs for this long, then the next one takes over.
    pub rotation: Duration,
    pub keep_published: Duration,
}

/// The issuer for a public URL: without its trailing `/`, as `iss` must match it to the byte.
pub fn issuer(public_url: &str) -> String {
    public_url.trim_end_matches('/').to_owned()
}

impl Keys {
    /// `None` unless both `CIMASTER_PUBLIC_URL` and `CIMASTER_SECRETS_KEY` are set: no ID tokens then.
    pub fn new(public_url: Option<&str>, secrets: Option<&SecretBox>, rotation: Duration) -> Option<Keys> {
        Some(Keys { issuer: issuer(public_url?), secrets: secrets?.clone(), rotation, keep_published: KEEP_PUBLISHED })
    }

    /// Makes and installs a new signing key if the current one is due; whether this call installed
    /// one.
    pub async fn rotate_if_due(&self, pool: &PgPool) -> Result<bool, KeyError> {
        if !oidc_keys::due(pool, &self.issuer, self.rotation).await? {
            return Ok(false);
        }
        let issuer = self.issuer.clone();
        let key = tokio::task::spawn_blocking(move || generate(issuer))
            .await
            .map_err(|err| KeyError::Generate(err.to_string()))??;
        let installed = oidc_keys::rotate(pool, &self.secrets, &key, self.rotation, self.keep_published).await?;
        if installed {
            tracing::info!(kid = %key.kid, issuer = %key.issuer, "a new ID token signing key signs from now");
            metrics::counter!("cimaster_oidc_key_rotations_total").increment(1);
        }
        Ok(installed)
    }
}

/// Rotates the signing key when it is due, on every replica (see the module docs).
pub async fn run_rotation(pool: PgPool, keys: Keys, cancel: CancellationToken) {
    let mut ticker = Ticker::new(keys.rotation.clamp(Duration::from_secs(1), CHECK_EVERY), cancel);
    while ticker.tick().await {
        if let Err(err) = keys.rotate_if_due(&pool).await {
            tracing::warn!(error = %err, "rotating the ID token signing key failed; trying again later");
        }
    }
}

/// A fresh 2048-bit RSA key for `issuer`.
pub fn generate(issuer: String) -> Result<NewKey, KeyError> {
    let private =
        rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|err| KeyError::Generate(err.to_string()))?;
    let n = URL_SAFE_NO_PAD.encode(private.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(private.e().to_bytes_be());
    let pem = private.to_pkcs1_pem(LineEnding::LF).map_err(|err| KeyError::Generate(err.to_string()))?;
    Ok(NewKey { kid: thumbprint(&n, &e), issuer, n, e, private_pem: SecretString::from(pem.as_str()) })
}

/// RFC 7638: SHA-256 of the key's required members in lexicographic order, base64url.
fn thumbprint(n: &str, e: &str) -> String {
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kid_is_the_rfc_7638_thumbprint() {
        // The example key of RFC 7638, section 3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(thumbprint(n, "AQAB"), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn the_issuer_has_no_trailing_slash() {
        assert_eq!(issuer("https://ci.example.com/"), "https://ci.example.com");
        assert_eq!(issuer("https://ci.example.com"), "https://ci.example.com");
    }
}
