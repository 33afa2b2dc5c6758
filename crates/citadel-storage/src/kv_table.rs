//! The secrets on disk: every KV entry of every mount, in the node's redb database.
//!
//! Why here and not in the state in memory: a vault holds as many secrets as its users write,
//! each with up to `max_versions` versions; in memory (and cloned into every snapshot) they
//! made a node's memory grow with its data. The state in memory keeps each mount's settings;
//! `apply` loads the one entry a command touches ([`citadel_core::state::State::preload_kv`])
//! and the state machine writes the batch's changes here in the transaction that records the
//! applied index ([`crate::state_machine`]), so the table, the audit store and the state saved
//! beside them always describe the same point of the log.
//!
//! Keyed by (mount path, secret path): a mount's entries go with it when it is disabled, and
//! a LIST is a range scan. Each value is a checksummed record ([`crate::codec`]), verified
//! when it is read; a damaged one is reported naming the file and the secret, never served.

use std::io;

use citadel_core::kv::KvEntry;
use citadel_core::state::StateKvChanges;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;

pub(crate) const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");

type ReadTable = redb::ReadOnlyTable<(&'static str, &'static str), &'static [u8]>;

/// One secret as a snapshot carries it beside the state (`codec::StoredSnapshot::kv`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredKvEntry {
    pub mount: String,
    pub path: String,
    pub entry: KvEntry,
}

/// [`StoredKvEntry`], borrowed: what a snapshot is written from.
#[derive(serde::Serialize)]
pub(crate) struct StoredKvEntryRef<'a> {
    pub mount: &'a str,
    pub path: &'a str,
    pub entry: &'a KvEntry,
}

/// Writes one batch's changes: the cleared mounts' entries go first, then each mount's.
pub(crate) fn write_changes(txn: &redb::WriteTransaction, changes: &StateKvChanges) -> Result<(), redb::Error> {
    let mut table = txn.open_table(KV)?;
    for mount in &changes.cleared {
        table.retain_in((mount.as_str(), "")..(next_mount(mount).as_str(), ""), |_, _| false)?;
    }
    for (mount, kv) in &changes.mounts {
        for path in &kv.removed {
            table.remove((mount.as_str(), path.as_str()))?;
        }
        for (path, entry) in &kv.put {
            table.insert((mount.as_str(), path.as_str()), codec::encode(entry).as_slice())?;
        }
    }
    Ok(())
}

/// Replaces every stored entry with `entries` (an installed snapshot, or the state of an older
/// format moved out of memory).
pub(crate) fn replace_all<'a>(
    txn: &redb::WriteTransaction,
    entries: impl IntoIterator<Item = StoredKvEntryRef<'a>>,
) -> Result<u64, redb::Error> {
    txn.delete_table(KV)?;
    let mut table = txn.open_table(KV)?;
    let mut count = 0;
    for StoredKvEntryRef { mount, path, entry } in entries {
        table.insert((mount, path), codec::encode(entry).as_slice())?;
        count += 1;
    }
    Ok(count)
}

/// The mount path ordered right after every (`mount`, _) key: `mount` is a path ending in `/`,
/// so the same text ending in the next byte (`0`) follows all of its keys.
fn next_mount(mount: &str) -> String {
    let mut next = mount.strip_suffix('/').unwrap_or(mount).to_string();
    next.push('0');
    next
}

/// Entries the cache holds at most: ~3 KiB each with ten versions, so ~12 MiB.
const CACHE_ENTRIES: usize = 4096;

/// Recently used entries, decoded: a write reads its secret three times on the leader (the
/// existence check, the next version, `apply`'s load) and once on each follower, and decoding
/// and checking a record of ten versions each time cost a quarter of the write throughput at 64
/// clients. Coherent with the table because only the state machine changes it, under the
/// state's write lock, and updates the cache after the commit ([`KvCache::committed`]); readers
/// fill it under the read lock from a view of the same commit. Bounded: when full, an arbitrary
/// entry makes room.
#[derive(Default)]
pub(crate) struct KvCache {
    entries: std::sync::Mutex<std::collections::HashMap<(String, String), KvEntry>>,
}

impl KvCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), KvEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, mount: &str, path: &str) -> Option<KvEntry> {
        self.lock().get(&(mount.to_string(), path.to_string())).cloned()
    }

    fn has(&self, mount: &str, path: &str) -> bool {
        self.lock().contains_key(&(mount.to_string(), path.to_string()))
    }

    fn insert(&self, mount: &str, path: &str, entry: &KvEntry) {
        let mut entries = self.lock();
        if entries.len() >= CACHE_ENTRIES {
            if let Some(key) = entries.keys().next().cloned() {
                entries.remove(&key);
            }
        }
        entries.insert((mount.to_string(), path.to_string()), entry.clone());
    }

    /// What a batch committed: cleared mounts and removed entries leave, written ones are kept.
    pub(crate) fn committed(&self, changes: &StateKvChanges) {
        let mut entries = self.lock();
        entries.retain(|(mount, _), _| !changes.cleared.contains(mount));
        for (mount, kv) in &changes.mounts {
            for path in &kv.removed {
                entries.remove(&(mount.clone(), path.clone()));
            }
        }
        drop(entries);
        for (mount, kv) in &changes.mounts {
            for (path, entry) in &kv.put {
                self.insert(mount, path, entry);
            }
        }
    }

    /// The table was replaced whole (a snapshot installed).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

/// A consistent view of the stored secrets: one redb read transaction, opened when first used,
/// read through the cache.
pub struct KvView<'db> {
    db: &'db crate::db::Db,
    cache: &'db KvCache,
    txn: std::cell::OnceCell<Result<Option<ReadTable>, String>>,
}

impl<'db> KvView<'db> {
    /// Must be made under the state's lock, so that the cache and the transaction agree.
    pub(crate) fn new(db: &'db crate::db::Db, cache: &'db KvCache) -> KvView<'db> {
        KvView { db, cache, txn: std::cell::OnceCell::new() }
    }

    fn table(&self) -> io::Result<Option<&ReadTable>> {
        let opened = self.txn.get_or_init(|| {
            let txn = self.db.db.begin_read().map_err(|e| e.to_string())?;
            match txn.open_table(KV) {
                Ok(t) => Ok(Some(t)),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        });
        opened.as_ref().map(Option::as_ref).map_err(|e| self.db.err(e))
    }

    /// Opens the read transaction now (a caller holding the state's lock pins the view to it).
    pub(crate) fn open(&self) -> io::Result<()> {
        self.table().map(drop)
    }

    /// The entry at `mount` and `path`, checked.
    pub fn entry(&self, mount: &str, path: &str) -> io::Result<Option<KvEntry>> {
        if let Some(entry) = self.cache.get(mount, path) {
            return Ok(Some(entry));
        }
        let Some(table) = self.table()? else { return Ok(None) };
        let Some(value) = table.get((mount, path)).map_err(|e| self.db.err(e))? else { return Ok(None) };
        let what = format!("{}: the secret {mount}{path}", self.db.path.display());
        let entry: KvEntry = codec::decode(value.value(), &what)?;
        self.cache.insert(mount, path, &entry);
        Ok(Some(entry))
    }

    /// The immediate children of `prefix` in `mount`, as Vault's LIST names them.
    pub fn list(&self, mount: &str, prefix: &str) -> io::Result<Vec<String>> {
        let Some(table) = self.table()? else { return Ok(Vec::new()) };
        let mut paths = Vec::new();
        for row in table.range((mount, prefix)..(next_mount(mount).as_str(), "")).map_err(|e| self.db.err(e))? {
            let (key, _) = row.map_err(|e| self.db.err(e))?;
            let path = key.value().1;
            if !path.starts_with(prefix) {
                break;
            }
            paths.push(path.to_string());
        }
        Ok(citadel_core::kv::children(prefix, paths))
    }

    /// Every stored entry, in key order, to `out`.
    pub(crate) fn for_each(&self, out: &mut dyn FnMut(&str, &str, KvEntry) -> io::Result<()>) -> io::Result<u64> {
        let Some(table) = self.table()? else { return Ok(0) };
        let mut count = 0;
        for row in table.iter().map_err(|e| self.db.err(e))? {
            let (key, value) = row.map_err(|e| self.db.err(e))?;
            let (mount, path) = key.value();
            let what = format!("{}: the secret {mount}{path}", self.db.path.display());
            out(mount, path, codec::decode(value.value(), &what)?)?;
            count += 1;
        }
        Ok(count)
    }
}

impl citadel_core::kv::KvRead for KvView<'_> {
    fn entry(&self, mount: &str, path: &str) -> io::Result<Option<KvEntry>> {
        KvView::entry(self, mount, path)
    }

    fn contains(&self, mount: &str, path: &str) -> io::Result<bool> {
        if self.cache.has(mount, path) {
            return Ok(true);
        }
        let Some(table) = self.table()? else { return Ok(false) };
        Ok(table.get((mount, path)).map_err(|e| self.db.err(e))?.is_some())
    }
}
