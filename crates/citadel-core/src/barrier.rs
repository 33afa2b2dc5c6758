//! The barrier: authenticated encryption of everything secret before it is proposed.
//!
//! Key hierarchy (as Vault's): the *unseal key* (split with Shamir, or held in a key file) wraps
//! the *root key*; the root key wraps the *keyring*; keyring terms encrypt values. Every
//! ciphertext names its keyring term so that rotation only adds a term and old data still
//! decrypts. Associated data binds a ciphertext to where it lives (mount, path, version), so a
//! value copied to another path does not decrypt.
//!
//! Frame: `[FORMAT_V1][term: u32 BE][nonce: 24][XChaCha20-Poly1305 ciphertext+tag]`.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::UnixMillis;

const FORMAT_V1: u8 = 1;
pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

/// Associated data for the wrapped root key.
pub const AAD_ROOT_KEY: &[u8] = b"citadel/root-key";
/// Associated data for the wrapped keyring.
pub const AAD_KEYRING: &[u8] = b"citadel/keyring";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarrierError {
    #[error("ciphertext is malformed or truncated")]
    Malformed,
    #[error("ciphertext uses keyring term {0}, which this keyring does not have")]
    UnknownTerm(u32),
    #[error("decryption failed: wrong key or tampered data")]
    Authentication,
}

/// A 256-bit key that is wiped from memory when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Key(pub [u8; KEY_LEN]);

impl Key {
    pub fn from_slice(bytes: &[u8]) -> Option<Key> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Key(array))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Encrypts `plaintext` under `key`, labelled with keyring `term`. The nonce comes from the
/// caller (the proposer), which keeps this function deterministic and testable.
pub fn encrypt(key: &Key, term: u32, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let body = cipher
        .encrypt(XNonce::from_slice(nonce), Payload { msg: plaintext, aad })
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&term.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&body);
    out
}

/// Reads the keyring term a ciphertext was sealed with.
pub fn term_of(ciphertext: &[u8]) -> Result<u32, BarrierError> {
    if ciphertext.len() < HEADER_LEN + 16 || ciphertext[0] != FORMAT_V1 {
        return Err(BarrierError::Malformed);
    }
    Ok(u32::from_be_bytes(ciphertext[1..5].try_into().expect("4 bytes")))
}

/// Decrypts a frame produced by [`encrypt`] with the given key.
pub fn decrypt(key: &Key, aad: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
    term_of(ciphertext)?;
    let nonce = XNonce::from_slice(&ciphertext[5..HEADER_LEN]);
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    cipher
        .decrypt(nonce, Payload { msg: &ciphertext[HEADER_LEN..], aad })
        .map(Zeroizing::new)
        .map_err(|_| BarrierError::Authentication)
}

/// One generation of the data-encryption key.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct KeyTerm {
    pub term: u32,
    pub installed: UnixMillis,
    #[serde(with = "crate::encoding")]
    pub key: Vec<u8>,
}

/// The decrypted keyring a node holds in memory only while unsealed.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Keyring {
    pub terms: Vec<KeyTerm>,
    /// Keys tokens into stored hashes, so the state never holds a usable token.
    #[serde(with = "crate::encoding")]
    pub token_hmac_key: Vec<u8>,
    /// Keys sensitive audit strings (as Vault's audit HMAC).
    #[serde(with = "crate::encoding")]
    pub audit_hmac_key: Vec<u8>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring(terms={}, <redacted>)", self.terms.len())
    }
}

impl Keyring {
    /// A fresh keyring from caller-provided random bytes (3 × 32).
    pub fn new(installed: UnixMillis, data_key: [u8; 32], token_key: [u8; 32], audit_key: [u8; 32]) -> Keyring {
        Keyring {
            terms: vec![KeyTerm { term: 1, installed, key: data_key.to_vec() }],
            token_hmac_key: token_key.to_vec(),
            audit_hmac_key: audit_key.to_vec(),
        }
    }

    pub fn current(&self) -> &KeyTerm {
        self.terms.last().expect("a keyring always has at least one term")
    }

    /// The key that signs emergency tokens, and its term: derived from the current term's data
    /// key, so a rotation invalidates every emergency token signed before it.
    pub fn emergency_signing_key(&self) -> (u32, Zeroizing<Vec<u8>>) {
        use hmac::{Hmac, Mac};
        let current = self.current();
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&current.key).expect("HMAC accepts any key length");
        mac.update(b"citadel emergency token signing key");
        (current.term, Zeroizing::new(mac.finalize().into_bytes().to_vec()))
    }

    /// Adds the next term; old terms stay so existing ciphertexts still decrypt.
    pub fn rotate(&mut self, installed: UnixMillis, data_key: [u8; 32]) -> u32 {
        let term = self.current().term + 1;
        self.terms.push(KeyTerm { term, installed, key: data_key.to_vec() });
        term
    }

    pub fn encrypt(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let current = self.current();
        let key = Key::from_slice(&current.key).expect("keyring keys are 32 bytes");
        encrypt(&key, current.term, nonce, aad, plaintext)
    }

    pub fn decrypt(&self, aad: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
        let term = term_of(ciphertext)?;
        let entry = self.terms.iter().find(|t| t.term == term).ok_or(BarrierError::UnknownTerm(term))?;
        let key = Key::from_slice(&entry.key).ok_or(BarrierError::Malformed)?;
        decrypt(&key, aad, ciphertext)
    }

    /// Serializes and encrypts the keyring under the root key.
    pub fn wrap(&self, root_key: &Key, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let plain = Zeroizing::new(serde_json::to_vec(self).expect("keyring serializes"));
        encrypt(root_key, 0, nonce, AAD_KEYRING, &plain)
    }

    pub fn unwrap(root_key: &Key, wrapped: &[u8]) -> Result<Keyring, BarrierError> {
        let plain = decrypt(root_key, AAD_KEYRING, wrapped)?;
        serde_json::from_slice(&plain).map_err(|_| BarrierError::Malformed)
    }
}

/// Associated data binding a KV value to its mount, path and version.
pub fn kv_aad(mount_uuid: &str, path: &str, version: u64) -> Vec<u8> {
    mount_aad("kv", mount_uuid, path, version)
}

/// Associated data of a value an engine of type `kind` stores: its mount, path and version, so a
/// ciphertext cannot be moved to another mount, path or version.
pub fn mount_aad(kind: &str, mount_uuid: &str, path: &str, version: u64) -> Vec<u8> {
    format!("{kind}\0{mount_uuid}\0{path}\0{version}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::new(1, [1; 32], [2; 32], [3; 32])
    }

    #[test]
    fn value_round_trips_and_is_not_plaintext() {
        let ring = keyring();
        let ct = ring.encrypt(&[9; 24], b"aad", b"hunter2-password");
        assert!(!ct.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&ring.decrypt(b"aad", &ct).unwrap()[..], b"hunter2-password");
    }

    #[test]
    fn wrong_associated_data_fails_authentication() {
        let ring = keyring();
        let ct = ring.encrypt(&[9; 24], &kv_aad("m", "a", 1), b"v");
        assert_eq!(ring.decrypt(&kv_aad("m", "b", 1), &ct).unwrap_err(), BarrierError::Authentication);
        assert_eq!(ring.decrypt(&kv_aad("m", "a", 2), &ct).unwrap_err(), BarrierError::Authentication);
    }

    #[test]
    fn tampered_ciphertext_is_rejected() {
        let ring = keyring();
        let mut ct = ring.encrypt(&[9; 24], b"", b"value");
        let last = ct.len() - 1;
        ct[last] ^= 1;
        assert_eq!(ring.decrypt(b"", &ct).unwrap_err(), BarrierError::Authentication);
        assert_eq!(ring.decrypt(b"", &ct[..10]).unwrap_err(), BarrierError::Malformed);
    }

    #[test]
    fn rotation_adds_a_term_and_old_terms_still_decrypt() {
        let mut ring = keyring();
        let old = ring.encrypt(&[1; 24], b"", b"old");
        assert_eq!(ring.rotate(5, [7; 32]), 2);
        let new = ring.encrypt(&[2; 24], b"", b"new");
        assert_eq!(term_of(&old).unwrap(), 1);
        assert_eq!(term_of(&new).unwrap(), 2);
        assert_eq!(&ring.decrypt(b"", &old).unwrap()[..], b"old");
        assert_eq!(&ring.decrypt(b"", &new).unwrap()[..], b"new");
    }

    #[test]
    fn keyring_wraps_under_root_key_only() {
        let ring = keyring();
        let root = Key([4; 32]);
        let wrapped = ring.wrap(&root, &[5; 24]);
        assert_eq!(Keyring::unwrap(&root, &wrapped).unwrap().current().term, 1);
        assert!(Keyring::unwrap(&Key([6; 32]), &wrapped).is_err());
    }
}
