//! Tokens and users as the replicated state stores them: keyed hashes and password hashes only.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::UnixMillis;

/// The keyed hash under which a token is stored. The state never holds the token itself.
pub fn token_hash(token_hmac_key: &[u8], token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token_hmac_key).expect("HMAC accepts any key length");
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of two stored hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// `token_hash` of the token.
    pub hash: String,
    pub accessor: String,
    pub policies: Vec<String>,
    pub display_name: String,
    pub meta: BTreeMap<String, String>,
    pub created: UnixMillis,
    /// `None` for tokens that never expire (the root token).
    pub expires: Option<UnixMillis>,
    pub ttl_secs: u64,
    pub renewable: bool,
    pub parent: Option<String>,
    pub username: Option<String>,
}

impl TokenEntry {
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    /// Argon2id PHC string; the salt was chosen by the proposer.
    pub password_hash: String,
    pub policies: Vec<String>,
    pub token_ttl_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_keyed_and_stable() {
        let a = token_hash(b"k1", "tok");
        assert_eq!(a, token_hash(b"k1", "tok"));
        assert_ne!(a, token_hash(b"k2", "tok"));
        assert!(!a.contains("tok"));
        assert!(hashes_equal(&a, &a.clone()));
        assert!(!hashes_equal(&a, &token_hash(b"k1", "tok2")));
    }
}

/// What an emergency token asserts. Issued without consensus in read-only mode (§5.4), so it
/// carries its own proof: an HMAC under the keyring's token key, which every node holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmergencyClaims {
    pub username: String,
    pub policies: Vec<String>,
    pub node: u64,
    pub issued: UnixMillis,
    pub expires: UnixMillis,
}

/// Prefix that tells emergency tokens from stored ones.
pub const EMERGENCY_PREFIX: &str = "cre.";

fn emergency_mac(key: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(b"citadel-emergency-token\0");
    mac.update(payload.as_bytes());
    mac
}

/// `cre.<base64url(claims JSON)>.<base64url(HMAC)>`.
pub fn issue_emergency(token_hmac_key: &[u8], claims: &EmergencyClaims) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = b64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let tag = b64.encode(emergency_mac(token_hmac_key, &payload).finalize().into_bytes());
    format!("{EMERGENCY_PREFIX}{payload}.{tag}")
}

/// Verifies signature (in constant time) and expiry; `None` for anything else.
pub fn verify_emergency(token_hmac_key: &[u8], token: &str, now: UnixMillis) -> Option<EmergencyClaims> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, tag) = token.strip_prefix(EMERGENCY_PREFIX)?.split_once('.')?;
    let tag = b64.decode(tag).ok()?;
    emergency_mac(token_hmac_key, payload).verify_slice(&tag).ok()?;
    let claims: EmergencyClaims = serde_json::from_slice(&b64.decode(payload).ok()?).ok()?;
    (claims.expires > now).then_some(claims)
}

#[cfg(test)]
mod emergency_tests {
    use super::*;

    fn claims(expires: u64) -> EmergencyClaims {
        EmergencyClaims { username: "ann".into(), policies: vec!["ops".into()], node: 2, issued: 1, expires }
    }

    #[test]
    fn emergency_tokens_verify_until_they_expire() {
        let token = issue_emergency(b"key", &claims(100));
        assert!(token.starts_with(EMERGENCY_PREFIX));
        assert_eq!(verify_emergency(b"key", &token, 99), Some(claims(100)));
        assert_eq!(verify_emergency(b"key", &token, 100), None);
    }

    #[test]
    fn forged_or_altered_emergency_tokens_are_refused() {
        use base64::Engine;
        let token = issue_emergency(b"key", &claims(100));
        assert_eq!(verify_emergency(b"other-key", &token, 1), None);
        let (payload, tag) = token.strip_prefix(EMERGENCY_PREFIX).unwrap().split_once('.').unwrap();
        let mut forged = claims(100);
        forged.policies = vec!["root".into()];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged_payload = b64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(verify_emergency(b"key", &format!("{EMERGENCY_PREFIX}{forged_payload}.{tag}"), 1), None);
        assert_eq!(verify_emergency(b"key", &format!("{EMERGENCY_PREFIX}{payload}"), 1), None);
        assert_eq!(verify_emergency(b"key", "hvs.abc", 1), None);
    }
}
