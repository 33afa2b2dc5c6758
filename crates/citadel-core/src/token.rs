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

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Vault's `explicit_max_ttl`: a hard limit no renewal passes, even for periodic tokens.
    #[serde(default)]
    pub explicit_max_ttl_secs: u64,
    /// Vault's `period`: every renewal sets the TTL back to it, without the system max TTL.
    #[serde(default)]
    pub period_secs: u64,
    /// Vault's `num_uses` as created (0: unlimited).
    #[serde(default)]
    pub num_uses: u64,
    /// Requests the token may still make; `None`: unlimited.
    #[serde(default)]
    pub uses_left: Option<u64>,
    /// The deadline no renewal passes (creation + the smallest max TTL that applies); `None`:
    /// none (the root token, periodic tokens without an explicit max TTL).
    #[serde(default)]
    pub max_expires: Option<UnixMillis>,
    /// The request that spent the latest use (`TokenUse` inside `Command::Authorized`), so a
    /// proposal retried after an ambiguous failure spends no second use for one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_use_request: Option<String>,
}

impl TokenEntry {
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// Whether the token may authorize a request at `now`: not expired, and uses left if counted.
    pub fn is_usable(&self, now: UnixMillis) -> bool {
        !self.is_expired(now) && self.uses_left != Some(0)
    }

    /// The expiry a renewal asking for `increment_secs` gets (Vault's rules): a periodic token
    /// gets its period; any token is capped at its `max_expires`. `None` when the arithmetic
    /// overflows (the caller answers 400).
    pub fn renewed_expiry(&self, now: UnixMillis, increment_secs: u64) -> Option<UnixMillis> {
        let secs = if self.period_secs > 0 { self.period_secs } else { increment_secs };
        let wanted = now.checked_add(secs.checked_mul(1000)?)?;
        Some(self.max_expires.map_or(wanted, |max| wanted.min(max)))
    }
}

/// What a login proves to `apply`: the password hash it checked. If the user was deleted or
/// its password changed before the token is committed, the token is refused, so a change of
/// password revokes even the logins racing with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginProof {
    pub username: String,
    pub password_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    /// Argon2id PHC string; the salt was chosen by the proposer.
    pub password_hash: String,
    pub policies: Vec<String>,
    pub token_ttl_secs: u64,
    /// Vault's `token_max_ttl` for this user's logins (0: the system max TTL).
    #[serde(default)]
    pub token_max_ttl_secs: u64,
}

/// Reads users where they live: a node's store, or a state's memory (tests and tools).
pub trait UserRead {
    /// The user stored under `key` (`state::user_key`: the mount's path, then the name).
    fn user(&self, key: &str) -> std::io::Result<Option<User>>;

    /// The keys that start with `prefix` (an auth mount's path), in order.
    fn user_keys_under(&self, prefix: &str) -> std::io::Result<Vec<String>>;
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
/// carries its own proof: an HMAC under a key derived from the keyring's current term, which
/// every unsealed node holds and which a keyring rotation replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmergencyClaims {
    pub username: String,
    pub policies: Vec<String>,
    pub node: u64,
    pub issued: UnixMillis,
    pub expires: UnixMillis,
    /// The keyring term whose key signed the token.
    #[serde(default)]
    pub term: u32,
}

/// Prefix that tells emergency tokens from stored ones.
pub const EMERGENCY_PREFIX: &str = "cre.";

/// The longest an emergency token lives (§8.2): long enough to fetch a password in an outage.
pub const EMERGENCY_TTL_MS: UnixMillis = 15 * 60 * 1000;

/// How far in the future an emergency token's issue time may lie (clock skew between nodes).
const EMERGENCY_SKEW_MS: UnixMillis = 60 * 1000;

fn emergency_mac(key: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(b"citadel-emergency-token\0");
    mac.update(payload.as_bytes());
    mac
}

/// `cre.<base64url(claims JSON)>.<base64url(HMAC)>`.
pub fn issue_emergency(signing_key: &[u8], claims: &EmergencyClaims) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = b64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let tag = b64.encode(emergency_mac(signing_key, &payload).finalize().into_bytes());
    format!("{EMERGENCY_PREFIX}{payload}.{tag}")
}

/// Verifies the signature (in constant time) under the key of `term`, the keyring's current
/// term, then the lifetime: not expired, never longer than `EMERGENCY_TTL_MS`, not issued in
/// the future. `None` for anything else.
pub fn verify_emergency(signing_key: &[u8], term: u32, token: &str, now: UnixMillis) -> Option<EmergencyClaims> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, tag) = token.strip_prefix(EMERGENCY_PREFIX)?.split_once('.')?;
    let tag = b64.decode(tag).ok()?;
    emergency_mac(signing_key, payload).verify_slice(&tag).ok()?;
    let claims: EmergencyClaims = serde_json::from_slice(&b64.decode(payload).ok()?).ok()?;
    let lifetime_ok = claims.expires.checked_sub(claims.issued).is_some_and(|l| l <= EMERGENCY_TTL_MS);
    let issued_ok = claims.issued <= now.saturating_add(EMERGENCY_SKEW_MS);
    (claims.term == term && lifetime_ok && issued_ok && claims.expires > now).then_some(claims)
}

#[cfg(test)]
mod emergency_tests {
    use super::*;

    fn claims(expires: u64) -> EmergencyClaims {
        EmergencyClaims { username: "ann".into(), policies: vec!["ops".into()], node: 2, issued: 1, expires, term: 3 }
    }

    #[test]
    fn emergency_tokens_verify_until_they_expire() {
        let token = issue_emergency(b"key", &claims(100));
        assert!(token.starts_with(EMERGENCY_PREFIX));
        assert_eq!(verify_emergency(b"key", 3, &token, 99), Some(claims(100)));
        assert_eq!(verify_emergency(b"key", 3, &token, 100), None);
    }

    #[test]
    fn forged_or_altered_emergency_tokens_are_refused() {
        use base64::Engine;
        let token = issue_emergency(b"key", &claims(100));
        assert_eq!(verify_emergency(b"other-key", 3, &token, 1), None);
        let (payload, tag) = token.strip_prefix(EMERGENCY_PREFIX).unwrap().split_once('.').unwrap();
        let mut forged = claims(100);
        forged.policies = vec!["root".into()];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged_payload = b64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(verify_emergency(b"key", 3, &format!("{EMERGENCY_PREFIX}{forged_payload}.{tag}"), 1), None);
        assert_eq!(verify_emergency(b"key", 3, &format!("{EMERGENCY_PREFIX}{payload}"), 1), None);
        assert_eq!(verify_emergency(b"key", 3, "hvs.abc", 1), None);
    }
}

#[cfg(test)]
mod emergency_lifetime_tests {
    use super::*;

    fn claims(issued: u64, expires: u64, term: u32) -> EmergencyClaims {
        EmergencyClaims { username: "ann".into(), policies: vec![], node: 1, issued, expires, term }
    }

    #[test]
    fn an_emergency_token_signed_for_longer_than_15_minutes_is_refused() {
        let long = issue_emergency(b"key", &claims(0, EMERGENCY_TTL_MS + 1, 1));
        assert_eq!(verify_emergency(b"key", 1, &long, 10), None);
        let ok = issue_emergency(b"key", &claims(0, EMERGENCY_TTL_MS, 1));
        assert!(verify_emergency(b"key", 1, &ok, 10).is_some());
    }

    #[test]
    fn an_emergency_token_of_an_older_keyring_term_is_refused() {
        let token = issue_emergency(b"key", &claims(0, 1000, 1));
        assert_eq!(verify_emergency(b"key", 2, &token, 10), None);
    }

    #[test]
    fn an_emergency_token_issued_in_the_future_is_refused() {
        let token = issue_emergency(b"key", &claims(10 * EMERGENCY_TTL_MS, 10 * EMERGENCY_TTL_MS + 1000, 1));
        assert_eq!(verify_emergency(b"key", 1, &token, 0), None);
    }

    #[test]
    fn renewals_are_capped_at_the_max_and_overflow_is_refused() {
        let entry = TokenEntry { max_expires: Some(5_000), ..TokenEntry::default() };
        assert_eq!(entry.renewed_expiry(1_000, 3600), Some(5_000));
        assert_eq!(entry.renewed_expiry(1_000, 2), Some(3_000));
        assert_eq!(entry.renewed_expiry(1_000, u64::MAX), None);
        let periodic = TokenEntry { period_secs: 10, ..TokenEntry::default() };
        assert_eq!(periodic.renewed_expiry(1_000, 3600), Some(11_000));
    }
}
