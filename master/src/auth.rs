//! Bearer-token authentication (JWT) and role checks.
//!
//! One algorithm is pinned per installation; `exp`, `sub` and `aud` (`cimaster`, or an array holding
//! it, as external identity providers send) are required and `nbf` is honoured. Roles nest:
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

/// What a verified token must carry besides the claims the library checks (`exp`, `nbf`, `aud`).
#[derive(Deserialize)]
struct Verified {
    sub: String,
    roles: Vec<Role>,
    /// Required by the validation, which names it when it is missing.
    #[serde(default)]
    exp: u64,
}

/// Who made a request, once their token checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: String,
    pub roles: Vec<Role>,
    /// When the token expires (seconds since the epoch): a web session lasts as long.
    pub expires: u64,
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
    /// A webhook whose signature does not verify.
    #[error("{0}")]
    Signature(String),
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
        validation.validate_nbf = true;
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
        let data = jsonwebtoken::decode::<Verified>(token, &self.key, &self.validation).map_err(refusal)?;
        Ok(Caller { subject: data.claims.sub, roles: data.claims.roles, expires: data.claims.exp })
    }
}

/// Why a token was refused, in words that name the rule and never echo the parser's internals.
fn refusal(err: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    let why = match err.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::ImmatureSignature => "not valid yet (`nbf` is in the future)".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm not accepted".into(),
        ErrorKind::InvalidAudience => format!("audience must be `{AUDIENCE}` or a list holding it"),
        ErrorKind::MissingRequiredClaim(claim) => format!("claim `{claim}` is required"),
        ErrorKind::Json(_) => "claims must include `sub` (a string) and `roles` (read, trigger, admin)".into(),
        _ => "not a well-formed JWT".into(),
    };
    AuthError::Invalid(why)
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
        let caller = Caller { subject: "a".into(), roles: vec![Role::Trigger], expires: 0 };
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

    fn hs256_token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn an_audience_list_holding_cimaster_is_accepted() {
        let token = hs256_token(serde_json::json!({
            "sub": "ci-bot", "aud": ["https://idp.example", "cimaster"], "exp": now() + 60, "roles": ["read"]}));
        let caller = verifier().verify_header(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(caller.subject, "ci-bot");
        let foreign = hs256_token(serde_json::json!({
            "sub": "ci-bot", "aud": ["https://idp.example"], "exp": now() + 60, "roles": ["read"]}));
        let err = verifier().verify_header(Some(&format!("Bearer {foreign}"))).unwrap_err();
        assert!(err.to_string().contains("audience"), "{err}");
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let token = hs256_token(serde_json::json!({
            "sub": "early", "aud": "cimaster", "nbf": now() + 3600, "exp": now() + 7200, "roles": ["admin"]}));
        let err = verifier().verify_header(Some(&format!("Bearer {token}"))).unwrap_err();
        assert!(err.to_string().contains("nbf"), "{err}");
    }

    #[test]
    fn refusals_do_not_echo_parser_internals() {
        let wrong_claims = hs256_token(serde_json::json!({
            "sub": 42, "aud": "cimaster", "exp": now() + 60, "roles": ["root"]}));
        for token in [wrong_claims.as_str(), "abc.def.ghi", "%%%", "a.b"] {
            let err = verifier().verify_header(Some(&format!("Bearer {token}"))).unwrap_err().to_string();
            for internal in ["line", "column", "invalid type", "Base64", "Utf8", "Json", "unknown variant"] {
                assert!(!err.contains(internal), "`{token}` answered `{err}`");
            }
        }
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
