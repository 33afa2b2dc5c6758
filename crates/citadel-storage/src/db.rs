//! The node's redb database: its identity, the audit log ([`crate::audit_store`]), the secrets
//! ([`crate::kv_table`]) and the state saved beside them ([`crate::state_machine`]). The Raft log ([`crate::log_store`]) and the snapshot
//! ([`crate::snapshot_file`]) live in files of their own; what older formats kept here is moved
//! out once at open.

use std::io;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, TableDefinition};

use crate::codec::{self, Identity};
use crate::StorageOpenError;

/// Where format 2 kept the Raft log; read once, by [`crate::import`].
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_IDENTITY: &str = "identity";
/// redb's page cache. Its default (1 GiB) would let the audit store's reads grow a node's
/// memory far past its working set; the state a node serves from is small.
const CACHE_BYTES: usize = 64 << 20;
// Format 2's Raft state, moved out by [`crate::import`].
pub(crate) const KEY_VOTE: &str = "vote";
pub(crate) const KEY_COMMITTED: &str = "committed";
pub(crate) const KEY_PURGED: &str = "purged";

/// The database and the file it lives in (for error messages).
pub struct Db {
    pub db: redb::Database,
    pub path: PathBuf,
}

impl Db {
    /// Opens (or creates) the redb file: 0600, never through a symbolic link.
    pub(crate) fn open(path: &Path) -> Result<Db, StorageOpenError> {
        let io = |e: String| StorageOpenError::Io(path.to_path_buf(), e);
        let file = crate::files::open_private(
            path,
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false),
        )
        .map_err(StorageOpenError::Files)?;
        let backend = redb::backends::FileBackend::new(file).map_err(|e| io(e.to_string()))?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|e| io(e.to_string()))?;
        Ok(Db { db, path: path.to_path_buf() })
    }

    pub(crate) fn err(&self, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("{}: {e}", self.path.display()))
    }

    pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let value = table.get(key).map_err(|e| self.err(e))?;
        value.map(|v| codec::decode(v.value(), &format!("{} ({key})", self.path.display()))).transpose()
    }

    /// Writes a set of changes in one durable, two-phase commit. Two fsyncs, where redb's
    /// one-phase commit needs one; but after a crash, one-phase redb checks its newest commit
    /// and, finding it damaged, silently falls back to the one before: a snapshot the log was
    /// already purged behind would vanish without a word. Two-phase redb opens its newest commit
    /// as is, and our record checksums (verified at open) then stop the node, naming the file.
    pub(crate) fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_two_phase_commit(true);
        f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Writes a set of changes in one one-phase commit, fsynced only when `durable`: the
    /// state machine's batches and the audit store's writes.
    pub(crate) fn commit(
        &self,
        durable: bool,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let durability = if durable { redb::Durability::Immediate } else { redb::Durability::None };
        txn.set_durability(durability).map_err(|e| self.err(e))?;
        f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    pub(crate) fn write_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> io::Result<()> {
        let bytes = codec::encode(value);
        self.write(|txn| {
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
    }
}

/// The node id recorded in the database, if any.
pub(crate) fn identity(db: &Db) -> io::Result<Option<u64>> {
    Ok(db.read_meta::<Identity>(KEY_IDENTITY)?.map(|id| id.node_id))
}

pub(crate) fn check_identity(db: &Db, node_id: u64) -> Result<(), StorageOpenError> {
    let corrupt = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
    match db.read_meta::<Identity>(KEY_IDENTITY).map_err(corrupt)? {
        Some(id) if !citadel_core::command::readable_format(id.format) => {
            Err(StorageOpenError::Format { path: db.path.clone(), found: id.format })
        }
        Some(id) if id.node_id != node_id => {
            Err(StorageOpenError::Foreign { path: db.path.clone(), found: id.node_id, expected: node_id })
        }
        // An older format this build reads: records are migrated as they are read, and new
        // records are written in the current format, so the directory is marked as current
        // (an older build then refuses it with a message instead of failing on a record).
        Some(id) if id.format != citadel_core::command::FORMAT_VERSION => {
            tracing::info!(path = %db.path.display(), from = id.format, to = citadel_core::command::FORMAT_VERSION, "upgrading the storage format");
            db.write_meta(KEY_IDENTITY, &Identity { node_id, format: citadel_core::command::FORMAT_VERSION })
                .map_err(|e| StorageOpenError::Io(db.path.clone(), e.to_string()))
        }
        Some(_) => Ok(()),
        None => db
            .write_meta(KEY_IDENTITY, &Identity { node_id, format: citadel_core::command::FORMAT_VERSION })
            .map_err(|e| StorageOpenError::Io(db.path.clone(), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_readable_format_is_marked_current_and_an_unknown_one_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::DB_FILE);
        let db = Db::open(&path).unwrap();
        let current = citadel_core::command::FORMAT_VERSION;
        db.write_meta(KEY_IDENTITY, &Identity { node_id: 1, format: citadel_core::command::OLDEST_READABLE_FORMAT })
            .unwrap();
        check_identity(&db, 1).unwrap();
        assert_eq!(db.read_meta::<Identity>(KEY_IDENTITY).unwrap().unwrap().format, current);

        db.write_meta(KEY_IDENTITY, &Identity { node_id: 1, format: current + 1 }).unwrap();
        let err = check_identity(&db, 1).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains(&format!("format {}", current + 1)), "{err}");
    }
}
