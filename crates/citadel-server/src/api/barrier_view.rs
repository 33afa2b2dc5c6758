//! The barrier as an engine sees it (§9.1): bound to one mount, it builds the associated data
//! that ties a ciphertext to the mount, the path and the version, and does the encryption. An
//! engine stores and reads JSON values through it and never calls a cipher.

use citadel_core::barrier::mount_aad;
use serde_json::Value;
use zeroize::Zeroizing;

use super::ApiError;
use crate::ids;
use crate::node::Node;
use crate::seal::Unsealed;

pub struct MountBarrier {
    /// The engine's type, the associated data's domain.
    kind: String,
    /// Bound into every ciphertext, so data cannot move between mounts.
    mount_uuid: String,
}

impl MountBarrier {
    /// The barrier of the mount at `mount` (`secret/`), or a 404 if nothing is mounted there.
    pub fn of(app: &Node, mount: &str) -> Result<MountBarrier, ApiError> {
        app.state
            .read(|s| s.mounts.get(mount).map(|m| MountBarrier { kind: m.kind.clone(), mount_uuid: m.uuid.clone() }))
            .ok_or_else(|| ApiError::no_route(mount))
    }

    /// Seals `value` for `version` of `path` with the newest keyring term: a rotation elsewhere
    /// must not leave a writer sealing with an old one.
    pub fn seal(&self, app: &Node, path: &str, version: u64, value: &Value) -> Result<Vec<u8>, ApiError> {
        let plain = Zeroizing::new(serde_json::to_vec(value).map_err(|e| ApiError::bad_request(e.to_string()))?);
        let keys = app.keys()?;
        Ok(keys.keyring.encrypt(&ids::random_bytes(), &self.aad(path, version), &plain))
    }

    /// Opens what `seal` stored for `version` of `path`.
    pub fn open(&self, keys: &Unsealed, path: &str, version: u64, ciphertext: &[u8]) -> Result<Value, ApiError> {
        let plain = keys.keyring.decrypt(&self.aad(path, version), ciphertext).map_err(|e| {
            ApiError::internal(format!("stored value failed to decrypt ({e}); the data may be damaged"))
        })?;
        serde_json::from_slice(&plain)
            .map_err(|_| ApiError::internal("stored value is not valid JSON after decryption"))
    }

    fn aad(&self, path: &str, version: u64) -> Vec<u8> {
        mount_aad(&self.kind, &self.mount_uuid, path, version)
    }
}
