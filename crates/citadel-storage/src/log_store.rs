//! The Raft log on redb. `append` acknowledges only after a durable commit.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{self, Identity, StoredEntry, StoredLogId, StoredVote};
use crate::types::{Entry, LogId, TypeConfig, Vote};
use crate::StorageOpenError;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_IDENTITY: &str = "identity";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";

/// The database and the file it lives in (for error messages).
pub struct Db {
    pub db: redb::Database,
    pub path: PathBuf,
}

impl Db {
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
    /// and, finding it damaged, silently falls back to the one before: an acknowledged log entry
    /// would vanish without a word. Two-phase redb opens its newest commit as is, and our record
    /// checksums (verified at open) then stop the node, naming the file.
    pub(crate) fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> io::Result<()> {
        self.write_with(redb::Durability::Immediate, f)
    }

    /// Like `write`, without an fsync: durable with the next durable commit, lost in a crash
    /// before it. Only for what can be recomputed.
    pub(crate) fn write_lazily(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> io::Result<()> {
        self.write_with(redb::Durability::None, f)
    }

    fn write_with(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_two_phase_commit(true);
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

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
}

impl LogStore {
    /// Opens the log and verifies the checksum of every entry in it before anything is served.
    pub(crate) fn open(db: Arc<Db>) -> Result<LogStore, StorageOpenError> {
        let store = LogStore { db };
        let entries =
            store.read_range(..).map_err(|e| StorageOpenError::Corrupt(store.db.path.clone(), e.to_string()))?;
        let mut prev: Option<u64> = None;
        for e in &entries {
            if let Some(p) = prev {
                if e.log_id.index != p + 1 {
                    return Err(StorageOpenError::Corrupt(
                        store.db.path.clone(),
                        format!("log has a hole between index {p} and {}", e.log_id.index),
                    ));
                }
            }
            prev = Some(e.log_id.index);
        }
        Ok(store)
    }

    fn read_range(&self, range: impl RangeBounds<u64>) -> io::Result<Vec<Entry>> {
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.err(e))?;
        let table = match txn.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db.err(e)),
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(e),
            Bound::Excluded(&e) => Bound::Excluded(e),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in table.range::<u64>((Bound::Included(start), end)).map_err(|e| db.err(e))? {
            let (key, value) = item.map_err(|e| db.err(e))?;
            let what = format!("{} log entry {}", db.path.display(), key.value());
            let stored: StoredEntry = codec::decode(value.value(), &what)?;
            if stored.log_id.index != key.value() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what}: stored under the wrong index"),
                ));
            }
            out.push(stored.into_entry()?);
        }
        Ok(out)
    }

    fn last_entry_id(&self) -> io::Result<Option<LogId>> {
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.err(e))?;
        let table = match txn.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db.err(e)),
        };
        let Some((key, value)) = table.last().map_err(|e| db.err(e))? else { return Ok(None) };
        let what = format!("{} log entry {}", db.path.display(), key.value());
        let stored: StoredEntry = codec::decode(value.value(), &what)?;
        Ok(Some(stored.log_id.into()))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let store = self.clone();
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        tokio::task::spawn_blocking(move || store.read_range(bounds)).await.map_err(io::Error::other)?
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.db.read_meta::<StoredVote>(KEY_VOTE)?.map(Into::into))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = self.db.read_meta::<StoredLogId>(KEY_PURGED)?.map(Into::into);
        let last = self.last_entry_id()?.or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let stored = StoredVote::from(vote);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.write_meta(KEY_VOTE, &stored)).await.map_err(io::Error::other)?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not needed for safety (a leader recomputes it), so no fsync of its own: it lets a
        // restarted node re-apply what it had committed without waiting for a leader, and rides
        // along with the next durable append.
        if let Some(c) = committed {
            let bytes = codec::encode(&StoredLogId::from(&c));
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || {
                db.write_lazily(|txn| {
                    txn.open_table(META)?.insert(KEY_COMMITTED, bytes.as_slice())?;
                    Ok(())
                })
            })
            .await
            .map_err(io::Error::other)??;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.db.read_meta::<StoredLogId>(KEY_COMMITTED)?.map(Into::into))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<(u64, Vec<u8>)> =
            entries.into_iter().map(|e| (e.log_id.index, codec::encode(&StoredEntry::from(&e)))).collect();
        let db = self.db.clone();
        let result = tokio::task::spawn_blocking(move || {
            db.write(|txn| {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &records {
                    table.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
        })
        .await
        .map_err(io::Error::other)?;
        // Only now is the entry durable; openraft may count it toward a quorum.
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            db.write(|txn| {
                let mut table = txn.open_table(LOG)?;
                table.retain_in(from.., |_, _| false)?;
                Ok(())
            })
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let stored = codec::encode(&StoredLogId::from(&log_id));
        let upto = log_id.index;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            db.write(|txn| {
                txn.open_table(META)?.insert(KEY_PURGED, stored.as_slice())?;
                txn.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
                Ok(())
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_readable_format_is_marked_current_and_an_unknown_one_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::DB_FILE);
        let db = Db { db: crate::open_db(&path).unwrap(), path: path.clone() };
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
