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

/// Parts of a secret shorter than this are not masked at all: they would mask too much.
const MIN_MASKED: usize = 3;
/// Parts of a secret shorter than this are masked as they are, not in their encoded forms: a short
/// value's base64 or hex is a short string of common characters.
const MIN_ENCODED: usize = 8;

/// Replaces secret values, and their base64 and hex forms, in complete lines of output.
///
/// Each line of a value (trimmed, of [`MIN_MASKED`] bytes or more) is masked as it is; one of
/// [`MIN_ENCODED`] bytes or more also in hex (lower and upper case) and in base64 (standard and
/// URL-safe) at each of the three byte alignments it can have inside a longer base64 string, as in
/// `base64("user:" + secret)`. An aligned base64 form is the run of characters that depend on the
/// value's bits alone: those shared with the bytes before or after it are left out, so it is found
/// whatever surrounds the value.
#[derive(Default, Clone)]
pub struct Masker {
    /// Every form of every value, found in one pass; `None` when there is nothing to mask.
    finder: Option<aho_corasick::AhoCorasick>,
    longest: usize,
}

impl Masker {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needles = Vec::new();
        for value in values {
            // Multi-line values are masked line by line.
            for part in value.lines().map(str::trim).filter(|part| part.len() >= MIN_MASKED) {
                needles.push(part.as_bytes().to_vec());
                if part.len() >= MIN_ENCODED {
                    needles.extend(encoded_forms(part.as_bytes()));
                }
            }
        }
        needles.sort();
        needles.dedup();
        let longest = needles.iter().map(Vec::len).max().unwrap_or(0);
        let finder = (!needles.is_empty())
            .then(|| aho_corasick::AhoCorasick::new(&needles).expect("a few secrets make a small automaton"));
        Self { finder, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.finder.is_none()
    }

    /// The longest byte string masked.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// Where to cut `data` at or before `at` so that no masked value is split in two (each half
    /// would pass the masker): `at` moved back to the start of any value that spans it.
    pub fn safe_cut(&self, data: &[u8], mut at: usize) -> usize {
        while let Some(start) = self.spanning(data, at) {
            at = start;
        }
        at
    }

    /// The earliest start of a masked value in `data` that begins before `at` and ends after it.
    fn spanning(&self, data: &[u8], at: usize) -> Option<usize> {
        let finder = self.finder.as_ref()?;
        let reach = self.longest.saturating_sub(1);
        let to = at.saturating_add(reach).min(data.len());
        let from = at.saturating_sub(reach).min(to);
        finder
            .find_overlapping_iter(&data[from..to])
            .map(|found| (from + found.start(), from + found.end()))
            .filter(|&(start, end)| start < at && end > at)
            .map(|(start, _)| start)
            .min()
    }

    /// Masks one line (or any complete piece of text): every byte of every occurrence of a masked
    /// value, overlapping ones included, is hidden; each run of hidden bytes becomes one [`MASK`].
    pub fn mask(&self, line: &[u8]) -> Vec<u8> {
        let Some(finder) = &self.finder else { return line.to_vec() };
        let mut spans: Vec<(usize, usize)> =
            finder.find_overlapping_iter(line).map(|found| (found.start(), found.end())).collect();
        if spans.is_empty() {
            return line.to_vec();
        }
        spans.sort_unstable();
        let mut out = Vec::with_capacity(line.len());
        let mut copied = 0;
        let mut spans = spans.into_iter().peekable();
        while let Some((start, mut end)) = spans.next() {
            while let Some(&(next_start, next_end)) = spans.peek() {
                if next_start >= end {
                    break;
                }
                end = end.max(next_end);
                spans.next();
            }
            out.extend_from_slice(&line[copied..start]);
            out.extend_from_slice(MASK.as_bytes());
            copied = end;
        }
        out.extend_from_slice(&line[copied..]);
        out
    }
}

/// A value's hex (lower and upper case) and its base64 cores at each alignment in both alphabets.
fn encoded_forms(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let hex: String = value.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut forms = vec![hex.to_ascii_uppercase().into_bytes(), hex.into_bytes()];
    for skip in 0..3 {
        // The value after `skip` other bytes: base64 character `i` holds bits 6i..6i+6 of the
        // string, the value bits 8·skip..8·(skip + len). The core: the characters wholly inside.
        let mut shifted = vec![0; skip];
        shifted.extend_from_slice(value);
        let first = (8 * skip).div_ceil(6);
        let end = 8 * shifted.len() / 6;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&shifted);
            forms.push(encoded.as_bytes()[first..end].to_vec());
        }
    }
    forms
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

    /// What is left of `encoded` (`prefix` + the secret, base64) around the mask: at most the
    /// characters the prefix decides, then at most one character shared with the secret's last bits
    /// and the padding.
    fn assert_masked_in_base64(masker: &Masker, prefix: &str, encoded: &str) {
        let line = format!("Authorization: Basic {encoded} rest\n");
        let masked = String::from_utf8(masker.mask(line.as_bytes())).unwrap();
        let inner = masked.strip_prefix("Authorization: Basic ").and_then(|m| m.strip_suffix(" rest\n"));
        let Some((head, tail)) = inner.and_then(|inner| inner.split_once(MASK)) else {
            panic!("not masked: `{prefix}` then the secret, {encoded} → {masked}");
        };
        assert!(head.len() <= (8 * prefix.len()).div_ceil(6), "{encoded} → {masked}");
        assert!(encoded.starts_with(head), "{encoded} → {masked}");
        assert!(tail.len() <= 3 && !tail.contains(MASK), "{encoded} → {masked}");
    }

    #[test]
    fn base64_of_a_secret_after_other_bytes_is_masked_at_every_alignment() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        // 19 bytes (not a multiple of 3), and bytes whose base64 holds `+` and `/`.
        let secret = "hunter2?>?~~~secret";
        let masker = Masker::new([secret]);
        let mut alphabets_differ = 0;
        for prefix in ["user:", "users:", "u:", "admin:x:", ""] {
            let standard = STANDARD.encode(format!("{prefix}{secret}"));
            let url_safe = URL_SAFE.encode(format!("{prefix}{secret}"));
            alphabets_differ += usize::from(standard != url_safe);
            assert_masked_in_base64(&masker, prefix, &standard);
            assert_masked_in_base64(&masker, prefix, &url_safe);
        }
        assert_eq!(alphabets_differ, 5, "the test secret exercises both alphabets at every alignment");
        // Base64 with a secret in its middle: masked too, even across several values around it.
        let middle = STANDARD.encode(format!("{{\"user\":\"ci\",\"token\":\"{secret}\",\"scope\":\"all\"}}"));
        let masked = String::from_utf8(masker.mask(middle.as_bytes())).unwrap();
        assert!(masked.contains(MASK) && masked.len() < middle.len() - 20, "{middle} → {masked}");
    }

    #[test]
    fn hex_of_a_secret_is_masked_inside_longer_strings() {
        let secret = "hunter2-very-secret";
        let masker = Masker::new([secret]);
        let hex: String = format!("xx{secret}xx").bytes().map(|b| format!("{b:02x}")).collect();
        // `printf 'xx%sxx' "$SECRET" | xxd -p`, and the same in capitals.
        assert_eq!(masker.mask(hex.as_bytes()), b"7878***7878");
        assert_eq!(masker.mask(hex.to_uppercase().as_bytes()), b"7878***7878");
        assert_eq!(masker.mask(format!("sha={hex}\n").as_bytes()), b"sha=7878***7878\n");
    }

    #[test]
    fn short_secrets_are_masked_only_as_they_are() {
        use base64::engine::general_purpose::STANDARD;
        let short = "pw12345";
        let masker = Masker::new([short]);
        assert_eq!(masker.longest(), short.len(), "no encoded form of a 7-byte value");
        let line = format!("{short} {} 7077313233343", STANDARD.encode(short));
        assert_eq!(masker.mask(line.as_bytes()), format!("*** {} 7077313233343", STANDARD.encode(short)).as_bytes());
        assert_eq!(Masker::new(["pw123456"]).longest(), 16, "8 bytes: hex (and base64) masked");
    }

    #[test]
    fn overlapping_forms_are_masked_whole() {
        // One secret's hex runs into another's raw value: both hidden, as one mask.
        let masker = Masker::new(["hunter2-very-secret", "736563726574abc"]);
        let hex: String = "hunter2-very-secret".bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(masker.mask(format!("{hex}abc!").as_bytes()), b"***!");
    }

    #[test]
    fn cuts_never_split_a_masked_value() {
        let masker = Masker::new(["s3cr3t-value"]);
        let data = b"0123456789s3cr3t-value tail";
        assert_eq!(masker.safe_cut(data, 14), 10, "inside the value: moved to its start");
        assert_eq!(masker.safe_cut(data, 10), 10);
        assert_eq!(masker.safe_cut(data, 22), 22, "right after it");
        assert_eq!(Masker::default().safe_cut(data, 14), 14);
        assert_eq!(masker.longest(), 2 * "s3cr3t-value".len(), "its hex");
    }

    #[test]
    fn cuts_never_split_an_encoded_value() {
        use base64::engine::general_purpose::STANDARD;
        let secret = "s3cr3t-value";
        let masker = Masker::new([secret]);
        // base64("user:" + secret): the secret's core starts 7 characters in (5 bytes = 40 bits).
        let encoded = STANDARD.encode(format!("user:{secret}"));
        let data = format!("token {encoded} tail");
        let core = 6 + 7;
        for at in [core + 1, core + 8, core + 14] {
            let cut = masker.safe_cut(data.as_bytes(), at);
            assert_eq!(cut, core, "a cut at {at} in {data}");
            // Cut there, each side masked on its own, nothing of the secret survives.
            let (left, right) = data.split_at(cut);
            let (left, right) = (masker.mask(left.as_bytes()), masker.mask(right.as_bytes()));
            assert_eq!(left, b"token dXNlcjp");
            assert!(right.starts_with(b"***"), "{}", String::from_utf8_lossy(&right));
        }
        // Hex, split across a chunk boundary.
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        let data = format!("0123{hex}");
        assert_eq!(masker.safe_cut(data.as_bytes(), 20), 4);
        assert_eq!(masker.safe_cut(data.as_bytes(), data.len()), data.len(), "at its end: whole");
    }
}
