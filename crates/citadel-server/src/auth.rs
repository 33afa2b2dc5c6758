//! Who is calling, and what may they do: token resolution, ACL checks, password hashing and the
//! per-user login limiter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use citadel_core::barrier::Keyring;
use citadel_core::policy::{self, Caps};
use citadel_core::state::State;
use citadel_core::token::{hashes_equal, token_hash, verify_emergency, TokenEntry, EMERGENCY_PREFIX};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub entry: TokenEntry,
    /// Emergency tokens (issued in read-only mode) may only read and list.
    pub read_only: bool,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.entry.policies.iter().any(|p| p == policy::ROOT)
    }

    pub fn name(&self) -> String {
        self.entry.username.clone().unwrap_or_else(|| self.entry.display_name.clone())
    }

    /// What this caller's policies grant on `path`.
    pub fn capabilities(&self, state: &State, path: &str) -> Caps {
        if self.is_root() {
            return Caps::ALL;
        }
        policy::capabilities(state.policies_named(&self.entry.policies), path)
    }

    /// What this caller's policies grant on `path`, with the parameter constraints that come with
    /// it (root has every capability and no constraints).
    pub fn grant(&self, state: &State, path: &str) -> policy::Grant {
        if self.is_root() {
            return policy::Grant { caps: Caps::ALL, params: Default::default() };
        }
        policy::grant(state.policies_named(&self.entry.policies), path)
    }
}

/// Looks a presented token up by its keyed hash, or verifies an emergency token's signature
/// under the current keyring term; expired, used-up and revoked tokens do not authenticate.
pub fn resolve(state: &State, keyring: &Keyring, token: &str, now: u64) -> Option<Caller> {
    let hash = token_hash(&keyring.token_hmac_key, token);
    if token.starts_with(EMERGENCY_PREFIX) {
        let (term, key) = keyring.emergency_signing_key();
        let claims = verify_emergency(&key, term, token, now)?;
        if state.revoked_emergency.contains_key(&hash) {
            return None;
        }
        let entry = TokenEntry {
            hash,
            display_name: format!("emergency-{}", claims.username),
            created: claims.issued,
            expires: Some(claims.expires),
            max_expires: Some(claims.expires),
            ttl_secs: claims.expires.saturating_sub(claims.issued) / 1000,
            policies: claims.policies,
            username: Some(claims.username),
            ..TokenEntry::default()
        };
        return Some(Caller { entry, read_only: true });
    }
    let entry = state.tokens.get(&hash)?;
    if !hashes_equal(&entry.hash, &hash) || !entry.is_usable(now) {
        return None;
    }
    Some(Caller { entry: entry.clone(), read_only: false })
}

fn argon2() -> Argon2<'static> {
    Argon2::default()
}

/// Argon2id with a fresh random salt. CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2().hash_password(password.as_bytes(), &salt).expect("argon2 hashing with valid parameters").to_string()
}

/// Verifies a password; with no stored hash, burns the same time so that unknown users cannot be
/// told apart from wrong passwords.
pub fn verify_password(stored: Option<&str>, password: &str) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("citadel-timing-equaliser"));
    let (hash, real) = match stored {
        Some(h) => (h, true),
        None => (dummy.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    argon2().verify_password(password.as_bytes(), &parsed).is_ok() && real
}

/// Refuses logins for a user after repeated failures, for a cooling-off window.
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    max_failures: u32,
    window: Duration,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter { failures: Mutex::new(HashMap::new()), max_failures: 5, window: Duration::from_secs(60) }
    }
}

impl LoginLimiter {
    /// `Err(seconds to wait)` when the user is locked out.
    pub fn check(&self, user: &str) -> Result<(), u64> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(user) {
            Some((count, since)) if since.elapsed() < self.window && *count >= self.max_failures => {
                Err((self.window - since.elapsed()).as_secs().max(1))
            }
            Some((_, since)) if since.elapsed() >= self.window => {
                map.remove(user);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, user: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(user.to_string()).or_insert((0, Instant::now()));
        entry.0 += 1;
    }

    pub fn succeeded(&self, user: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let hash = hash_password("correct horse");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(Some(&hash), "correct horse"));
        assert!(!verify_password(Some(&hash), "wrong"));
        assert!(!verify_password(None, "citadel-timing-equaliser"));
    }

    #[test]
    fn limiter_locks_a_user_out_after_repeated_failures_only() {
        let limiter = LoginLimiter::default();
        for _ in 0..5 {
            assert!(limiter.check("alice").is_ok());
            limiter.failed("alice");
        }
        assert!(limiter.check("alice").is_err());
        assert!(limiter.check("bob").is_ok());
        limiter.succeeded("alice");
        assert!(limiter.check("alice").is_ok());
    }
}
