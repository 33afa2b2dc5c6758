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
