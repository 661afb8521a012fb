//! Job secrets: AES-256-GCM encryption at rest, and masking of their values in console output.

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secrets key must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)")]
    BadKey,
    #[error("a stored secret cannot be decrypted with this key")]
    Decrypt,
}

/// Encrypts and decrypts secret values with the installation's key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl SecretBox {
    /// `key`: 32 bytes, base64.
    pub fn from_base64(key: &SecretString) -> Result<Self, SecretError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| SecretError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretError::BadKey);
        }
        Ok(Self { cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)) })
    }

    /// Returns (nonce, ciphertext). `context` (job and name) is bound into the ciphertext, so a value
    /// copied to another job's row does not decrypt.
    pub fn seal(&self, context: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let payload = aes_gcm::aead::Payload { msg: value.as_bytes(), aad: context.as_bytes() };
        let ciphertext = self.cipher.encrypt(&nonce, payload).expect("AES-GCM encryption does not fail");
        (nonce.to_vec(), ciphertext)
    }

    pub fn open(&self, context: &str, nonce: &[u8], ciphertext: &[u8]) -> Result<SecretString, SecretError> {
        if nonce.len() != 12 {
            return Err(SecretError::Decrypt);
        }
        let payload = aes_gcm::aead::Payload { msg: ciphertext, aad: context.as_bytes() };
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), payload).map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(plain).map(SecretString::from).map_err(|_| SecretError::Decrypt)
    }
}

pub const MASK: &str = "***";

/// Replaces secret values, and their base64 forms, in complete lines of output.
#[derive(Default, Clone)]
pub struct Masker {
    needles: Vec<Vec<u8>>,
}

impl Masker {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needles = Vec::new();
        for value in values {
            // Multi-line values are masked line by line; very short fragments would mask too much.
            for part in value.lines().map(str::trim).filter(|part| part.len() >= 3) {
                needles.push(part.as_bytes().to_vec());
                for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE] {
                    let encoded = engine.encode(part);
                    needles.push(encoded.trim_end_matches('=').as_bytes().to_vec());
                }
            }
        }
        needles.sort_by_key(|needle| std::cmp::Reverse(needle.len()));
        needles.dedup();
        Self { needles }
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The longest byte string masked.
    pub fn longest(&self) -> usize {
        self.needles.first().map_or(0, Vec::len)
    }

    /// Where to cut `data` at or before `at` so that no masked value is split in two (each half
    /// would pass the masker): `at` moved back to the start of any value that spans it.
    pub fn safe_cut(&self, data: &[u8], mut at: usize) -> usize {
        while let Some(start) = self.spanning(data, at) {
            at = start;
        }
        at
    }

    /// The start of a masked value in `data` that begins before `at` and ends after it.
    fn spanning(&self, data: &[u8], at: usize) -> Option<usize> {
        self.needles.iter().find_map(|needle| {
            let from = at.saturating_sub(needle.len().saturating_sub(1));
            (from..at).find(|&start| data[start..].starts_with(needle) && start + needle.len() > at)
        })
    }

    /// Masks one line (or any complete piece of text).
    pub fn mask(&self, line: &[u8]) -> Vec<u8> {
        let mut out = line.to_vec();
        for needle in &self.needles {
            out = replace_all(&out, needle, MASK.as_bytes());
        }
        out
    }
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretString {
        SecretString::from(base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
    }

    #[test]
    fn sealed_values_open_only_in_their_context() {
        let secrets = SecretBox::from_base64(&key()).unwrap();
        let (nonce, sealed) = secrets.seal("job/DB_PASSWORD", "hunter22");
        assert!(!sealed.windows(8).any(|w| w == b"hunter22"));
        assert_eq!(secrets.open("job/DB_PASSWORD", &nonce, &sealed).unwrap().expose_secret(), "hunter22");
        assert!(secrets.open("other/DB_PASSWORD", &nonce, &sealed).is_err());
        assert!(SecretBox::from_base64(&SecretString::from("c2hvcnQ=")).is_err());
    }

    #[test]
    fn values_and_their_base64_are_masked() {
        let masker = Masker::new(["s3cr3t-value", "line-one\nline-two"]);
        let b64 = base64::engine::general_purpose::STANDARD.encode("s3cr3t-value");
        let line = format!("pw=s3cr3t-value b64={b64} key=line-two\n");
        let masked = String::from_utf8(masker.mask(line.as_bytes())).unwrap();
        assert_eq!(masked, "pw=*** b64=*** key=***\n");
        assert_eq!(masker.mask(b"nothing here"), b"nothing here");
        assert!(Masker::new(["ab"]).is_empty(), "too short to mask safely");
    }

    #[test]
    fn cuts_never_split_a_masked_value() {
        let masker = Masker::new(["s3cr3t-value"]);
        let data = b"0123456789s3cr3t-value tail";
        assert_eq!(masker.safe_cut(data, 14), 10, "inside the value: moved to its start");
        assert_eq!(masker.safe_cut(data, 10), 10);
        assert_eq!(masker.safe_cut(data, 22), 22, "right after it");
        assert_eq!(Masker::default().safe_cut(data, 14), 14);
        assert_eq!(masker.longest(), base64::engine::general_purpose::STANDARD.encode("s3cr3t-value").len());
    }
}
