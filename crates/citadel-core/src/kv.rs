//! The KV version 2 model: versioned, soft-deletable, destroyable secrets.
//!
//! Values are ciphertext here (sealed by the barrier before proposal); this module only keeps
//! the bookkeeping Vault exposes: versions, deletion times, `cas`, `max_versions`.
//!
//! Where the entries live: without a store (tests, tools) a [`KvStore`] holds all of them. On a
//! node it holds only the entries a batch of commands touches: the state machine loads each
//! command's entry from its store first ([`KvStore::preload`]) and writes the changes back after
//! the batch ([`KvStore::take_changes`]), so memory never holds the secrets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// Vault's default when neither the key nor the mount sets `max_versions`.
pub const DEFAULT_MAX_VERSIONS: u32 = 10;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvConfig {
    pub max_versions: u32,
    pub cas_required: bool,
    pub delete_version_after_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvVersion {
    pub created: UnixMillis,
    /// Soft deletion time; may lie in the future (`delete_version_after`).
    pub deletion_time: Option<UnixMillis>,
    pub destroyed: bool,
    #[serde(with = "crate::encoding")]
    pub ciphertext: Vec<u8>,
}

impl KvVersion {
    /// Deleted or destroyed as seen at `now` (a reader's clock, never `apply`'s).
    pub fn is_gone(&self, now: UnixMillis) -> bool {
        self.destroyed || self.deletion_time.is_some_and(|t| t <= now)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub created: UnixMillis,
    pub updated: UnixMillis,
    pub current_version: u64,
    pub oldest_version: u64,
    pub max_versions: u32,
    pub cas_required: bool,
    pub delete_version_after_secs: u64,
    pub custom_metadata: BTreeMap<String, String>,
    pub versions: BTreeMap<u64, KvVersion>,
}

/// Reads secrets where they live: a node's store, or a state's memory ([`KvStore`]).
pub trait KvRead {
    /// The entry at `path` of the mount at `mount`.
    fn entry(&self, mount: &str, path: &str) -> std::io::Result<Option<KvEntry>>;

    /// Whether an entry is at `path` (without decoding it).
    fn contains(&self, mount: &str, path: &str) -> std::io::Result<bool> {
        self.entry(mount, path).map(|e| e.is_some())
    }
}

/// A state that holds its secrets in memory (tests and tools) reads them from there.
impl KvRead for crate::state::State {
    fn entry(&self, mount: &str, path: &str) -> std::io::Result<Option<KvEntry>> {
        Ok(self.mounts.get(mount).and_then(|m| m.kv.entries.get(path)).cloned())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KvError {
    #[error("check-and-set parameter did not match the current version (current version is {current})")]
    CasMismatch { current: u64 },
    #[error("check-and-set parameter required for this call")]
    CasRequired,
    #[error("the value was encrypted for version {proposed} but the next version is {next}; retry")]
    VersionRace { proposed: u64, next: u64 },
    #[error("no secret at this path")]
    NotFound,
    #[error("max_versions must be at most 1000")]
    TooManyVersions,
    #[error("this secret has reached the largest version number; delete its metadata to start again")]
    VersionsExhausted,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStore {
    pub config: KvConfig,
    /// Every entry without a store; on a node, those loaded or changed since the last batch.
    pub entries: BTreeMap<String, KvEntry>,
    /// Paths whose entry was deleted since the last batch (never also in `entries`): the store
    /// must forget them, and a later command must not load them back.
    #[serde(skip)]
    removed: BTreeSet<String>,
}

/// What one batch changed in a mount's entries: the store writes `put` and forgets `removed`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KvChanges {
    pub put: Vec<(String, KvEntry)>,
    pub removed: Vec<String>,
}

pub struct WriteRequest {
    pub path: String,
    pub version: u64,
    pub ciphertext: Vec<u8>,
    pub cas: Option<u64>,
    pub at: UnixMillis,
}

impl KvStore {
    /// Whether `path`'s entry must be loaded from the store before a command touches it: it is
    /// neither in memory nor deleted since the last batch.
    pub fn needs(&self, path: &str) -> bool {
        !self.entries.contains_key(path) && !self.removed.contains(path)
    }

    /// Takes `path`'s entry as the store holds it (none: no entry).
    pub fn preload(&mut self, path: &str, stored: Option<KvEntry>) {
        debug_assert!(self.needs(path), "an entry in memory is newer than the store's");
        if let Some(entry) = stored {
            self.entries.insert(path.to_string(), entry);
        }
    }

    /// Empties memory of entries, returning what the store must write and forget.
    pub fn take_changes(&mut self) -> KvChanges {
        KvChanges {
            put: std::mem::take(&mut self.entries).into_iter().collect(),
            removed: std::mem::take(&mut self.removed).into_iter().collect(),
        }
    }

    /// The version a new write to `path` will get; the proposer binds its ciphertext to it.
    pub fn next_version(&self, path: &str) -> u64 {
        next_version(self.entries.get(path))
    }

    /// The key's own limit, else the mount's, else Vault's default.
    fn max_versions_for(&self, path: &str) -> u32 {
        let own = self.entries.get(path).map_or(0, |e| e.max_versions);
        [own, self.config.max_versions].into_iter().find(|&m| m > 0).unwrap_or(DEFAULT_MAX_VERSIONS)
    }

    pub fn write(&mut self, req: WriteRequest) -> Result<(u64, UnixMillis, Option<UnixMillis>), KvError> {
        if let Some(earlier) = self.earlier_attempt(&req) {
            return Ok(earlier);
        }
        let next = self.next_version(&req.path);
        if self.entries.get(&req.path).is_some_and(|e| e.current_version == u64::MAX) {
            return Err(KvError::VersionsExhausted);
        }
        let cas_required = self.config.cas_required || self.entries.get(&req.path).is_some_and(|e| e.cas_required);
        match req.cas {
            None if cas_required => return Err(KvError::CasRequired),
            Some(cas) if cas != next - 1 => return Err(KvError::CasMismatch { current: next - 1 }),
            _ => {}
        }
        if req.version != next {
            return Err(KvError::VersionRace { proposed: req.version, next });
        }
        let dva = self.entries.get(&req.path).map_or(0, |e| e.delete_version_after_secs);
        let dva = if dva > 0 { dva } else { self.config.delete_version_after_secs };
        let deletion_time = (dva > 0).then(|| req.at.saturating_add(dva.saturating_mul(1000)));
        let max = self.max_versions_for(&req.path);
        self.removed.remove(&req.path);
        let entry = self.entries.entry(req.path).or_insert_with(|| KvEntry {
            created: req.at,
            oldest_version: 1,
            ..KvEntry::default()
        });
        entry.current_version = next;
        entry.updated = req.at;
        entry
            .versions
            .insert(next, KvVersion { created: req.at, deletion_time, destroyed: false, ciphertext: req.ciphertext });
        prune(entry, max);
        Ok((next, req.at, deletion_time))
    }

    /// A proposal retried after its answer was lost (a leader change) finds itself already
    /// applied: its ciphertext, sealed with a random nonce, is at its version. The earlier result
    /// stands; checking `cas` again would refuse a write that did happen.
    fn earlier_attempt(&self, req: &WriteRequest) -> Option<(u64, UnixMillis, Option<UnixMillis>)> {
        let version = self.entries.get(&req.path)?.versions.get(&req.version)?;
        let same = !version.destroyed && !req.ciphertext.is_empty() && version.ciphertext == req.ciphertext;
        same.then_some((req.version, version.created, version.deletion_time))
    }

    fn entry_mut(&mut self, path: &str) -> Result<&mut KvEntry, KvError> {
        self.entries.get_mut(path).ok_or(KvError::NotFound)
    }

    /// Soft-deletes `versions`, or the latest version when `versions` is empty.
    pub fn soft_delete(&mut self, path: &str, versions: &[u64], at: UnixMillis) -> Result<(), KvError> {
        let entry = self.entry_mut(path)?;
        let targets = if versions.is_empty() { vec![entry.current_version] } else { versions.to_vec() };
        for v in targets {
            if let Some(version) = entry.versions.get_mut(&v) {
                if !version.destroyed && version.deletion_time.is_none_or(|t| t > at) {
                    version.deletion_time = Some(at);
                }
            }
        }
        entry.updated = at;
        Ok(())
    }

    pub fn undelete(&mut self, path: &str, versions: &[u64], at: UnixMillis) -> Result<(), KvError> {
        let entry = self.entry_mut(path)?;
        for v in versions {
            if let Some(version) = entry.versions.get_mut(v) {
                if !version.destroyed {
                    version.deletion_time = None;
                }
            }
        }
        entry.updated = at;
        Ok(())
    }

    /// Destroys versions for good: the ciphertext is dropped from the state.
    pub fn destroy(&mut self, path: &str, versions: &[u64], at: UnixMillis) -> Result<(), KvError> {
        let entry = self.entry_mut(path)?;
        for v in versions {
            if let Some(version) = entry.versions.get_mut(v) {
                version.destroyed = true;
                version.ciphertext.clear();
            }
        }
        entry.updated = at;
        Ok(())
    }

    pub fn update_metadata(&mut self, path: &str, update: &MetadataUpdate, at: UnixMillis) -> Result<(), KvError> {
        if update.max_versions.is_some_and(|m| m > 1000) {
            return Err(KvError::TooManyVersions);
        }
        self.removed.remove(path);
        let entry = self.entries.entry(path.to_string()).or_insert_with(|| KvEntry {
            created: at,
            oldest_version: 0,
            ..KvEntry::default()
        });
        if let Some(m) = update.max_versions {
            entry.max_versions = m;
        }
        if let Some(c) = update.cas_required {
            entry.cas_required = c;
        }
        if let Some(d) = update.delete_version_after_secs {
            entry.delete_version_after_secs = d;
        }
        if let Some(meta) = &update.custom_metadata {
            entry.custom_metadata = meta.clone();
        }
        entry.updated = at;
        let max = self.max_versions_for(path);
        if let Some(entry) = self.entries.get_mut(path) {
            prune(entry, max);
        }
        Ok(())
    }

    pub fn delete_all(&mut self, path: &str) -> Result<(), KvError> {
        self.entries.remove(path).ok_or(KvError::NotFound)?;
        self.removed.insert(path.to_string());
        Ok(())
    }

    /// Immediate children of `prefix` (a folder path, empty or ending in `/`): names, with a
    /// trailing `/` for sub-folders, as Vault's LIST returns them.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        children(prefix, self.entries.range(prefix.to_string()..).map(|(k, _)| k.as_str()))
    }
}

/// The version a new write after `entry` gets (1 for a new secret).
pub fn next_version(entry: Option<&KvEntry>) -> u64 {
    // Saturating: a (restored) entry at u64::MAX is refused by `write`, never overflowed.
    entry.map_or(1, |e| e.current_version.saturating_add(1))
}

/// The immediate children of `prefix` among `paths`, which are sorted and start at `prefix`
/// (a store's range scan, or [`KvStore::list`]'s).
pub fn children<S: AsRef<str>>(prefix: &str, paths: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for path in paths {
        let Some(rest) = path.as_ref().strip_prefix(prefix) else { break };
        let key = match rest.find('/') {
            Some(i) => &rest[..=i],
            None => rest,
        };
        if !key.is_empty() && keys.last().map(String::as_str) != Some(key) {
            keys.push(key.to_string());
        }
    }
    keys.dedup();
    keys
}

/// Drops the oldest versions beyond `max`, as Vault does.
fn prune(entry: &mut KvEntry, max: u32) {
    while entry.versions.len() > max as usize {
        if entry.versions.pop_first().is_none() {
            break;
        }
    }
    entry.oldest_version = entry.versions.keys().next().copied().unwrap_or(entry.oldest_version);
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataUpdate {
    pub max_versions: Option<u32>,
    pub cas_required: Option<bool>,
    pub delete_version_after_secs: Option<u64>,
    pub custom_metadata: Option<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(kv: &mut KvStore, path: &str, cas: Option<u64>, at: u64) -> Result<u64, KvError> {
        let version = kv.next_version(path);
        kv.write(WriteRequest { path: path.into(), version, ciphertext: vec![at as u8], cas, at }).map(|r| r.0)
    }

    #[test]
    fn writes_create_increasing_versions() {
        let mut kv = KvStore::default();
        assert_eq!(write(&mut kv, "a", None, 1), Ok(1));
        assert_eq!(write(&mut kv, "a", None, 2), Ok(2));
        assert_eq!(kv.entries["a"].current_version, 2);
        assert_eq!(kv.entries["a"].versions.len(), 2);
    }

    #[test]
    fn cas_must_match_current_version() {
        let mut kv = KvStore::default();
        assert_eq!(write(&mut kv, "a", Some(0), 1), Ok(1));
        assert_eq!(write(&mut kv, "a", Some(0), 2), Err(KvError::CasMismatch { current: 1 }));
        assert_eq!(write(&mut kv, "a", Some(1), 3), Ok(2));
    }

    #[test]
    fn cas_required_rejects_writes_without_cas() {
        let mut kv = KvStore::default();
        kv.config.cas_required = true;
        assert_eq!(write(&mut kv, "a", None, 1), Err(KvError::CasRequired));
        assert_eq!(write(&mut kv, "a", Some(0), 1), Ok(1));
    }

    #[test]
    fn a_ciphertext_bound_to_a_stale_version_is_refused() {
        let mut kv = KvStore::default();
        write(&mut kv, "a", None, 1).unwrap();
        let stale = kv.write(WriteRequest { path: "a".into(), version: 1, ciphertext: vec![], cas: None, at: 2 });
        assert_eq!(stale, Err(KvError::VersionRace { proposed: 1, next: 2 }));
    }

    #[test]
    fn a_retried_cas_write_that_already_landed_answers_its_earlier_result_not_a_mismatch() {
        let mut kv = KvStore::default();
        write(&mut kv, "a", None, 1).unwrap();
        let attempt = || WriteRequest { path: "a".into(), version: 2, ciphertext: vec![7, 7], cas: Some(1), at: 5 };
        assert_eq!(kv.write(attempt()), Ok((2, 5, None)));
        let after_first = kv.clone();
        assert_eq!(kv.write(attempt()), Ok((2, 5, None)), "the repeat is the same write, not a cas mismatch");
        assert_eq!(kv, after_first, "the repeat changes nothing");
        // Another writer's cas against the same version still fails.
        let other = WriteRequest { path: "a".into(), version: 2, ciphertext: vec![8], cas: Some(1), at: 6 };
        assert_eq!(kv.write(other), Err(KvError::CasMismatch { current: 2 }));
    }

    #[test]
    fn max_versions_prunes_the_oldest() {
        let mut kv = KvStore::default();
        kv.config.max_versions = 2;
        for at in 1..=4 {
            write(&mut kv, "a", None, at).unwrap();
        }
        let entry = &kv.entries["a"];
        assert_eq!(entry.versions.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(entry.oldest_version, 3);
    }

    #[test]
    fn soft_delete_undelete_and_destroy() {
        let mut kv = KvStore::default();
        write(&mut kv, "a", None, 1).unwrap();
        write(&mut kv, "a", None, 2).unwrap();
        kv.soft_delete("a", &[], 10).unwrap();
        assert!(kv.entries["a"].versions[&2].is_gone(10));
        assert!(!kv.entries["a"].versions[&1].is_gone(10));
        kv.undelete("a", &[2], 11).unwrap();
        assert!(!kv.entries["a"].versions[&2].is_gone(11));
        kv.destroy("a", &[1], 12).unwrap();
        assert!(kv.entries["a"].versions[&1].destroyed);
        assert!(kv.entries["a"].versions[&1].ciphertext.is_empty());
        kv.undelete("a", &[1], 13).unwrap();
        assert!(kv.entries["a"].versions[&1].is_gone(13), "destroyed versions cannot be undeleted");
    }

    #[test]
    fn delete_version_after_schedules_deletion() {
        let mut kv = KvStore::default();
        kv.config.delete_version_after_secs = 5;
        write(&mut kv, "a", None, 1000).unwrap();
        let v = &kv.entries["a"].versions[&1];
        assert_eq!(v.deletion_time, Some(6000));
        assert!(!v.is_gone(5999));
        assert!(v.is_gone(6000));
    }

    #[test]
    fn list_returns_immediate_children_and_folders() {
        let mut kv = KvStore::default();
        for p in ["app/db", "app/web/key", "app/web/cert", "other"] {
            write(&mut kv, p, None, 1).unwrap();
        }
        assert_eq!(kv.list(""), vec!["app/", "other"]);
        assert_eq!(kv.list("app/"), vec!["db", "web/"]);
        assert!(kv.list("none/").is_empty());
    }
}
