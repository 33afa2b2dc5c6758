//! The seal: whether this node holds its keys, and the unseal protocol that brings them back.
//!
//! Sealed, a node still replicates and votes (apply needs no key, §1.2); it only refuses API
//! requests. Keys live in memory only, in `Zeroize` types, and are wiped on seal.

use std::sync::{Arc, RwLock};

use citadel_core::barrier::{self, Key, Keyring};
use citadel_core::shamir;
use citadel_core::state::SealInfo;
use zeroize::Zeroizing;

/// The keys of an unsealed node.
pub struct Unsealed {
    pub root_key: Key,
    pub keyring: Keyring,
}

enum SealState {
    Sealed { shares: Vec<Zeroizing<Vec<u8>>>, nonce: String },
    Unsealed(Arc<Unsealed>),
}

pub struct SealManager {
    inner: RwLock<SealState>,
    /// Whether the node is sealed, for the event stream (`events.rs`): one value, never a queue.
    sealed: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum UnsealError {
    NotInitialized,
    BadShare(String),
    WrongKey,
}

impl std::fmt::Display for UnsealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnsealError::NotInitialized => f.write_str("the vault is not initialized"),
            UnsealError::BadShare(why) => write!(f, "invalid unseal key: {why}"),
            UnsealError::WrongKey => {
                f.write_str("unseal failed: the key shares do not reconstruct the unseal key; progress was reset")
            }
        }
    }
}

fn new_nonce() -> String {
    crate::ids::uuid()
}

impl Default for SealManager {
    fn default() -> Self {
        SealManager {
            inner: RwLock::new(SealState::Sealed { shares: Vec::new(), nonce: new_nonce() }),
            sealed: tokio::sync::watch::channel(true).0,
        }
    }
}

impl SealManager {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, SealState> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SealState> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes of the sealed flag (true: sealed), for the event stream.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.sealed.subscribe()
    }

    fn announce(&self, sealed: bool) {
        self.sealed.send_if_modified(|current| std::mem::replace(current, sealed) != sealed);
    }

    pub fn is_sealed(&self) -> bool {
        matches!(*self.read(), SealState::Sealed { .. })
    }

    pub fn keys(&self) -> Option<Arc<Unsealed>> {
        match &*self.read() {
            SealState::Unsealed(keys) => Some(keys.clone()),
            SealState::Sealed { .. } => None,
        }
    }

    /// (shares submitted so far, nonce of this unseal attempt).
    pub fn progress(&self) -> (usize, String) {
        match &*self.read() {
            SealState::Sealed { shares, nonce } => (shares.len(), nonce.clone()),
            SealState::Unsealed(_) => (0, String::new()),
        }
    }

    pub fn reset_progress(&self) {
        let mut guard = self.write();
        if let SealState::Sealed { .. } = &*guard {
            *guard = SealState::Sealed { shares: Vec::new(), nonce: new_nonce() };
        }
    }

    /// Adds one share; unseals once `threshold` distinct shares are in.
    pub fn submit_share(&self, share: Zeroizing<Vec<u8>>, info: Option<&SealInfo>) -> Result<(), UnsealError> {
        let info = info.ok_or(UnsealError::NotInitialized)?;
        let expected_len = if info.shares == 1 { barrier::KEY_LEN } else { barrier::KEY_LEN + 1 };
        if share.len() != expected_len {
            return Err(UnsealError::BadShare(format!("expected {expected_len} bytes, got {}", share.len())));
        }
        let mut guard = self.write();
        let SealState::Sealed { shares, .. } = &mut *guard else { return Ok(()) };
        if !shares.iter().any(|s| s[..] == share[..]) {
            shares.push(share);
        }
        if shares.len() < info.threshold {
            return Ok(());
        }
        let combined = shamir::combine(shares);
        let outcome = combined.map_err(|_| UnsealError::WrongKey).and_then(|key| open(&key, info));
        match outcome {
            Ok(keys) => {
                *guard = SealState::Unsealed(Arc::new(keys));
                drop(guard);
                self.announce(false);
                Ok(())
            }
            Err(e) => {
                *guard = SealState::Sealed { shares: Vec::new(), nonce: new_nonce() };
                Err(e)
            }
        }
    }

    /// Unseals with the whole unseal key (key-file seal).
    pub fn unseal_with_key(&self, key: &Key, info: &SealInfo) -> Result<(), UnsealError> {
        let keys = open(key, info)?;
        *self.write() = SealState::Unsealed(Arc::new(keys));
        self.announce(false);
        Ok(())
    }

    pub fn seal(&self) {
        *self.write() = SealState::Sealed { shares: Vec::new(), nonce: new_nonce() };
        self.announce(true);
    }

    /// Reloads the keyring when another node rotated it (the state's term moved on).
    pub fn refresh(&self, info: &SealInfo) -> Option<Arc<Unsealed>> {
        let keys = self.keys()?;
        if keys.keyring.current().term == info.key_term {
            return Some(keys);
        }
        let keyring = Keyring::unwrap(&keys.root_key, &info.wrapped_keyring).ok()?;
        let fresh = Arc::new(Unsealed { root_key: keys.root_key.clone(), keyring });
        *self.write() = SealState::Unsealed(fresh.clone());
        Some(fresh)
    }
}

fn open(unseal_key: &Key, info: &SealInfo) -> Result<Unsealed, UnsealError> {
    let root = barrier::decrypt(unseal_key, barrier::AAD_ROOT_KEY, &info.wrapped_root_key)
        .map_err(|_| UnsealError::WrongKey)?;
    let root_key = Key::from_slice(&root).ok_or(UnsealError::WrongKey)?;
    let keyring = Keyring::unwrap(&root_key, &info.wrapped_keyring).map_err(|_| UnsealError::WrongKey)?;
    Ok(Unsealed { root_key, keyring })
}

/// Decodes a share given as hex or base64, as Vault accepts both.
pub fn decode_share(text: &str) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
    use base64::Engine;
    let text = text.trim();
    if let Ok(bytes) = hex::decode(text) {
        return Ok(Zeroizing::new(bytes));
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(Zeroizing::new)
        .map_err(|_| UnsealError::BadShare("expected hex or base64".into()))
}
