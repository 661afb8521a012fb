//! Bearer-token authentication (JWT) and role checks.
//!
//! One algorithm is pinned per installation; `exp` and `aud = cimaster` are required. Roles nest:
//! `admin` may do everything `trigger` may, which may do everything `read` may.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};

pub const AUDIENCE: &str = "cimaster";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Trigger,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Trigger => "trigger",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
    pub roles: Vec<Role>,
}

/// Who made a request, once their token checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: String,
    pub roles: Vec<Role>,
}

impl Caller {
    pub fn has(&self, role: Role) -> bool {
        self.roles.iter().any(|held| *held >= role)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token; send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("set CIMASTER_JWT_SECRET (HS256) or CIMASTER_JWT_PUBLIC_KEY_FILE with CIMASTER_JWT_ALGORITHM")]
    NothingConfigured,
    #[error("CIMASTER_JWT_ALGORITHM=HS256 needs CIMASTER_JWT_SECRET")]
    SecretMissing,
    #[error("CIMASTER_JWT_ALGORITHM must be RS256 or EdDSA with a public key file")]
    AlgorithmMissing,
    #[error("the JWT secret must be at least 32 bytes")]
    SecretTooShort,
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("key file {path} is not a usable PEM key: {source}")]
    Pem { path: String, source: jsonwebtoken::errors::Error },
}

/// Checks bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn from_config(config: &AuthConfig) -> Result<Self, KeyError> {
        let (algorithm, key) = match (&config.jwt_public_key_file, config.jwt_algorithm) {
            (Some(path), Some(JwtAlgorithm::Rs256)) => {
                let pem = read_key(path)?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|source| pem_error(path, source))?;
                (Algorithm::RS256, key)
            }
            (Some(path), Some(JwtAlgorithm::EdDsa)) => {
                let pem = read_key(path)?;
                let key = DecodingKey::from_ed_pem(&pem).map_err(|source| pem_error(path, source))?;
                (Algorithm::EdDSA, key)
            }
            (Some(_), _) => return Err(KeyError::AlgorithmMissing),
            (None, Some(JwtAlgorithm::Hs256) | None) => {
                let secret = config.jwt_secret.as_ref().ok_or(if config.jwt_algorithm.is_some() {
                    KeyError::SecretMissing
                } else {
                    KeyError::NothingConfigured
                })?;
                let secret = secret.expose_secret().as_bytes();
                if secret.len() < 32 {
                    return Err(KeyError::SecretTooShort);
                }
                (Algorithm::HS256, DecodingKey::from_secret(secret))
            }
            (None, Some(_)) => return Err(KeyError::NothingConfigured),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = 30;
        Ok(Self { key, validation })
    }

    /// Checks the value of an `Authorization` header.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Malformed)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|err| {
            use jsonwebtoken::errors::ErrorKind;
            match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
                ErrorKind::InvalidAudience => AuthError::Invalid(format!("audience must be `{AUDIENCE}`")),
                ErrorKind::MissingRequiredClaim(claim) => AuthError::Invalid(format!("claim `{claim}` is required")),
                _ => AuthError::Invalid(err.to_string()),
            }
        })?;
        Ok(Caller { subject: data.claims.sub, roles: data.claims.roles })
    }
}

fn read_key(path: &std::path::Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

fn pem_error(path: &std::path::Path, source: jsonwebtoken::errors::Error) -> KeyError {
    KeyError::Pem { path: path.display().to_string(), source }
}

/// Mints tokens: HS256 from the shared secret, or RS256/EdDSA from a private key file.
pub struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
}

impl Signer {
    pub fn hs256(secret: &str) -> Result<Self, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError::SecretTooShort);
        }
        Ok(Self { key: EncodingKey::from_secret(secret.as_bytes()), algorithm: Algorithm::HS256 })
    }

    pub fn from_private_key(path: &std::path::Path, algorithm: JwtAlgorithm) -> Result<Self, KeyError> {
        let pem = read_key(path)?;
        let (key, algorithm) = match algorithm {
            JwtAlgorithm::Rs256 => (EncodingKey::from_rsa_pem(&pem), Algorithm::RS256),
            JwtAlgorithm::EdDsa => (EncodingKey::from_ed_pem(&pem), Algorithm::EdDSA),
            JwtAlgorithm::Hs256 => return Err(KeyError::AlgorithmMissing),
        };
        let key = key.map_err(|source| pem_error(path, source))?;
        Ok(Self { key, algorithm })
    }

    pub fn mint(&self, subject: &str, roles: &[Role], ttl: Duration) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = Claims {
            sub: subject.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + ttl.as_secs(),
            roles: roles.to_vec(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .expect("claims always serialise and keys were checked when loaded")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::from_config(&AuthConfig {
            jwt_secret: Some(SecretString::from(SECRET)),
            jwt_public_key_file: None,
            jwt_algorithm: None,
        })
        .unwrap()
    }

    #[test]
    fn roles_nest() {
        let caller = Caller { subject: "a".into(), roles: vec![Role::Trigger] };
        assert!(caller.has(Role::Read) && caller.has(Role::Trigger) && !caller.has(Role::Admin));
    }

    #[test]
    fn minted_tokens_verify() {
        let token = Signer::hs256(SECRET).unwrap().mint("alice", &[Role::Admin], Duration::from_secs(60));
        let caller = verifier().verify_header(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(caller.subject, "alice");
        assert!(caller.has(Role::Admin));
    }

    #[test]
    fn unsigned_and_foreign_tokens_are_refused() {
        let v = verifier();
        // alg: none, with a valid-looking payload.
        let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        let payload =
            "eyJzdWIiOiJtYWxsb3J5IiwiYXVkIjoiY2ltYXN0ZXIiLCJleHAiOjk5OTk5OTk5OTksImlhdCI6MCwicm9sZXMiOlsiYWRtaW4iXX0";
        assert!(matches!(v.verify_header(Some(&format!("Bearer {header}.{payload}."))), Err(AuthError::Invalid(_))));
        let other = Signer::hs256("another-secret-another-secret-xx").unwrap().mint(
            "m",
            &[Role::Admin],
            Duration::from_secs(60),
        );
        assert!(matches!(v.verify_header(Some(&format!("Bearer {other}"))), Err(AuthError::Invalid(_))));
        assert!(matches!(v.verify_header(None), Err(AuthError::Missing)));
        assert!(matches!(v.verify_header(Some("Basic abc")), Err(AuthError::Malformed)));
    }

    fn key(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
    }

    #[test]
    fn public_key_algorithms_verify_their_own_tokens_only() {
        for (algorithm, private, public) in [
            (JwtAlgorithm::EdDsa, "ed25519-test.pem", "ed25519-test.pub.pem"),
            (JwtAlgorithm::Rs256, "rsa-test.pem", "rsa-test.pub.pem"),
        ] {
            let verifier = Verifier::from_config(&AuthConfig {
                jwt_secret: None,
                jwt_public_key_file: Some(key(public)),
                jwt_algorithm: Some(algorithm),
            })
            .unwrap();
            let token = Signer::from_private_key(&key(private), algorithm).unwrap().mint(
                "ci-bot",
                &[Role::Trigger],
                Duration::from_secs(60),
            );
            let caller = verifier.verify_header(Some(&format!("Bearer {token}"))).unwrap();
            assert_eq!(caller.subject, "ci-bot");
            // The pinned algorithm refuses an HS256 token, even one signed with the public key's bytes.
            let forged = Signer::hs256(&std::fs::read_to_string(key(public)).unwrap()).unwrap().mint(
                "mallory",
                &[Role::Admin],
                Duration::from_secs(60),
            );
            assert!(matches!(verifier.verify_header(Some(&format!("Bearer {forged}"))), Err(AuthError::Invalid(_))));
        }
        let missing = AuthConfig {
            jwt_secret: None,
            jwt_public_key_file: Some(key("ed25519-test.pub.pem")),
            jwt_algorithm: None,
        };
        assert!(matches!(Verifier::from_config(&missing), Err(KeyError::AlgorithmMissing)));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(Signer::hs256("short"), Err(KeyError::SecretTooShort)));
    }
}
