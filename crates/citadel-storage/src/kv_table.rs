//! The secrets on disk: every KV entry of every mount, in the node's redb database.
//!
//! Why here and not in the state in memory: a vault holds as many secrets as its users write,
//! each with up to `max_versions` versions; in memory (and cloned into every snapshot) they
//! made a node's memory grow with its data. The state in memory keeps each mount's settings;
//! before `apply`, the state machine loads the one entry a command touches
//! ([`citadel_core::state::State::preload_kv`]), and it writes the batch's changes here in the transaction that records the
//! applied index ([`crate::state_machine`]); the state saved at the next durable commit joins
//! them, and a start that finds them apart rebuilds from the snapshot.
//!
//! Keyed by (mount path, secret path): a mount's entries go with it when it is disabled, and
//! a LIST is a range scan. Each value is a checksummed record with a binary body ([`crate::codec`]), verified
//! when it is read; a damaged one is reported naming the file and the secret, never served.

use std::io;

use citadel_core::kv::KvEntry;
use citadel_core::state::StateKvChanges;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;

pub(crate) const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
/// The secrets of a snapshot being received, until it is installed ([`promote_staged_in`]).
const KV_STAGED: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv.staged");

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
            table.insert((mount.as_str(), path.as_str()), codec::encode_binary(entry).as_slice())?;
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
        table.insert((mount, path), codec::encode_binary(entry).as_slice())?;
        count += 1;
    }
    Ok(count)
}

/// Empties the staging table (the first commit of a snapshot being received).
pub(crate) fn clear_staged(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.delete_table(KV_STAGED)?;
    Ok(())
}

/// Adds received secrets, each already encoded as its record, to the staging table.
pub(crate) fn stage_in(txn: &redb::WriteTransaction, entries: &[(String, String, Vec<u8>)]) -> Result<(), redb::Error> {
    let mut table = txn.open_table(KV_STAGED)?;
    for (mount, path, record) in entries {
        table.insert((mount.as_str(), path.as_str()), record.as_slice())?;
    }
    Ok(())
}

/// The staged secrets become the table (a received snapshot is installed); the staging
/// table is gone after.
pub(crate) fn promote_staged_in(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.delete_table(KV)?;
    // Nothing staged (a snapshot without secrets) leaves no staging table, and no table.
    match txn.rename_table(KV_STAGED, KV) {
        Ok(()) | Err(redb::TableError::TableDoesNotExist(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The mount path ordered right after every (`mount`, _) key: `mount` is a path ending in `/`,
/// so the same text ending in the next byte (`0`) follows all of its keys.
fn next_mount(mount: &str) -> String {
    let mut next = mount.strip_suffix('/').unwrap_or(mount).to_string();
    next.push('0');
    next
}

/// What the cache holds at most, by the size of what its entries hold: ~16 MiB.
const CACHE_BYTES: usize = 16 << 20;
/// A larger entry (up to 1000 versions of up to 1 MiB each) is not kept.
const CACHE_ENTRY_BYTES: usize = 256 << 10;

/// Roughly what an entry holds in memory.
fn weight(entry: &KvEntry) -> usize {
    let versions: usize = entry.versions.values().map(|v| 64 + v.ciphertext.len()).sum();
    let metadata: usize = entry.custom_metadata.iter().map(|(k, v)| 48 + k.len() + v.len()).sum();
    256 + versions + metadata
}

#[derive(Default)]
struct Cached {
    entries: std::collections::HashMap<(String, String), (KvEntry, usize)>,
    bytes: usize,
}

impl Cached {
    fn remove(&mut self, key: &(String, String)) {
        if let Some((_, weight)) = self.entries.remove(key) {
            self.bytes -= weight;
        }
    }
}

/// Recently used entries, decoded: a write reads its secret three times on the leader (the
/// existence check, the next version, `apply`'s load) and once on each follower, and decoding
/// and checking a record of ten versions each time cost a quarter of the write throughput at 64
/// clients. Coherent with the table because only the state machine changes it, under the
/// state's write lock, and updates the cache after the commit ([`KvCache::committed`]); readers
/// fill it under the read lock from a view of the same commit. Bounded by size: when full,
/// arbitrary entries make room, and a large entry is not kept.
#[derive(Default)]
pub(crate) struct KvCache {
    cached: std::sync::Mutex<Cached>,
}

impl KvCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, mount: &str, path: &str) -> Option<KvEntry> {
        self.lock().entries.get(&(mount.to_string(), path.to_string())).map(|(e, _)| e.clone())
    }

    fn has(&self, mount: &str, path: &str) -> bool {
        self.lock().entries.contains_key(&(mount.to_string(), path.to_string()))
    }

    fn insert(&self, mount: &str, path: &str, entry: &KvEntry) {
        let key = (mount.to_string(), path.to_string());
        let weight = weight(entry);
        let mut cached = self.lock();
        cached.remove(&key);
        if weight > CACHE_ENTRY_BYTES {
            return;
        }
        while cached.bytes + weight > CACHE_BYTES {
            let Some(victim) = cached.entries.keys().next().cloned() else { break };
            cached.remove(&victim);
        }
        cached.bytes += weight;
        cached.entries.insert(key, (entry.clone(), weight));
    }

    /// What a batch committed: cleared mounts and removed entries leave, written ones are kept.
    pub(crate) fn committed(&self, changes: &StateKvChanges) {
        let mut cached = self.lock();
        let gone: Vec<(String, String)> =
            cached.entries.keys().filter(|(mount, _)| changes.cleared.contains(mount)).cloned().collect();
        for key in &gone {
            cached.remove(key);
        }
        for (mount, kv) in &changes.mounts {
            for path in &kv.removed {
                cached.remove(&(mount.clone(), path.clone()));
            }
        }
        drop(cached);
        for (mount, kv) in &changes.mounts {
            for (path, entry) in &kv.put {
                self.insert(mount, path, entry);
            }
        }
    }

    /// The table was replaced whole (a snapshot installed).
    pub(crate) fn clear(&self) {
        *self.lock() = Cached::default();
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
