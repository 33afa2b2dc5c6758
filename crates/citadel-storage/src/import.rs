//! The one-time move of a log written before format 3, when the Raft log lived in `raft.redb`,
//! into `raft-log`.
//!
//! Crash-safe by order: the log is written into `raft-log.import`, made durable, renamed to
//! `raft-log`, and only then are the old tables dropped. A crash before the rename redoes the
//! import; a crash after it finds `raft-log` complete and only drops the old tables.

use std::io;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable};

use crate::codec::{self, StoredEntry, StoredLogId, StoredVote};
use crate::db::{Db, KEY_COMMITTED, KEY_PURGED, KEY_VOTE, LOG, META};
use crate::log_store::{LogStore, LOG_DIR};
use crate::StorageOpenError;

const IMPORT_DIR: &str = "raft-log.import";

/// The Raft state a format-2 `raft.redb` held.
pub(crate) struct OldLog {
    pub vote: Option<StoredVote>,
    pub committed: Option<StoredLogId>,
    pub purged: Option<StoredLogId>,
    pub entries: Vec<StoredEntry>,
}

/// Moves an old log out of `db` into `data_dir/raft-log`, if `db` still holds one.
pub(crate) fn import_old_log(db: &Db, data_dir: &Path, node_id: u64) -> Result<(), StorageOpenError> {
    let corrupt = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
    let Some(old) = read_old_log(db).map_err(corrupt)? else { return Ok(()) };
    let log_dir = data_dir.join(LOG_DIR);
    let io_err = |p: &Path, e: io::Error| StorageOpenError::Io(p.to_path_buf(), e.to_string());
    if !log_dir.exists() {
        let staging = data_dir.join(IMPORT_DIR);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
        }
        let count = old.entries.len();
        LogStore::open(&staging, node_id)?.import(old).map_err(|e| io_err(&staging, e))?;
        std::fs::rename(&staging, &log_dir).map_err(|e| io_err(&log_dir, e))?;
        std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(|e| io_err(data_dir, e))?;
        tracing::info!(entries = count, from = %db.path.display(), to = %log_dir.display(), "moved the Raft log to its own files (storage format 3)");
    }
    db.write(|txn| {
        txn.delete_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        for key in [KEY_VOTE, KEY_COMMITTED, KEY_PURGED] {
            meta.remove(key)?;
        }
        Ok(())
    })
    .map_err(|e| io_err(&db.path, e))
}

fn read_old_log(db: &Db) -> io::Result<Option<OldLog>> {
    let vote = db.read_meta::<StoredVote>(KEY_VOTE)?;
    let committed = db.read_meta::<StoredLogId>(KEY_COMMITTED)?;
    let purged = db.read_meta::<StoredLogId>(KEY_PURGED)?;
    let txn = db.db.begin_read().map_err(|e| db.err(e))?;
    let table = match txn.open_table(LOG) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(db.err(e)),
    };
    if table.is_none() && vote.is_none() && committed.is_none() && purged.is_none() {
        return Ok(None);
    }
    let mut entries = Vec::new();
    if let Some(table) = table {
        for item in table.iter().map_err(|e| db.err(e))? {
            let (key, value) = item.map_err(|e| db.err(e))?;
            let what = format!("{} log entry {}", db.path.display(), key.value());
            let entry: StoredEntry = codec::decode(value.value(), &what)?;
            if entry.log_id.index != key.value() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what}: stored under the wrong index"),
                ));
            }
            entries.push(entry);
        }
    }
    let mut expected = purged.map(|p| p.index + 1).or(entries.first().map(|e| e.log_id.index));
    for entry in &entries {
        if Some(entry.log_id.index) != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: the log has a hole before entry {}", db.path.display(), entry.log_id.index),
            ));
        }
        expected = Some(entry.log_id.index + 1);
    }
    Ok(Some(OldLog { vote, committed, purged, entries }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LeaderId, LogId, Vote};
    use citadel_core::command::Command;
    use openraft::entry::RaftEntry;
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;

    fn entry(index: u64) -> StoredEntry {
        let id = LogId::new(LeaderId { term: 2, node_id: 1 }, index);
        StoredEntry::from(&Entry::new_normal(id, Command::MountDisable { path: format!("m{index}") }))
    }

    /// A data directory as format 2 left it: entries 4..=9 after a purge at 3, committed at 8.
    fn format_2_directory(dir: &Path) {
        let path = dir.join(crate::DB_FILE);
        let db = Db::open(&path).unwrap();
        db.write_meta(KEY_VOTE, &StoredVote { term: 2, node: 1, committed: true }).unwrap();
        db.write_meta(KEY_PURGED, &StoredLogId { term: 1, leader: 1, index: 3 }).unwrap();
        db.write_meta(KEY_COMMITTED, &StoredLogId { term: 2, leader: 1, index: 8 }).unwrap();
        db.write(|txn| {
            let mut table = txn.open_table(LOG)?;
            for i in 4..=9 {
                table.insert(i, codec::encode(&entry(i)).as_slice())?;
            }
            Ok(())
        })
        .unwrap();
    }

    #[tokio::test]
    async fn a_format_2_log_is_moved_to_raft_log_once_with_its_vote_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        format_2_directory(dir.path());
        // A crash during an earlier attempt left a half-written staging directory.
        std::fs::create_dir(dir.path().join(IMPORT_DIR)).unwrap();
        std::fs::write(dir.path().join(IMPORT_DIR).join("r-00_000_000_000_000_000_000.wal"), b"half").unwrap();

        let (mut log, _sm) = crate::open(dir.path(), 1).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(3));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(9));
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::from(StoredVote { term: 2, node: 1, committed: true })));
        assert_eq!(log.read_committed().await.unwrap().map(|l| l.index), Some(8));
        let entries = log.try_get_log_entries(4..10).await.unwrap();
        assert_eq!(entries.iter().map(StoredEntry::from).collect::<Vec<_>>(), (4..=9).map(entry).collect::<Vec<_>>());
        assert!(!dir.path().join(IMPORT_DIR).exists());
        drop((log, _sm));

        // The old tables are gone: a second open imports nothing and finds the same log.
        let path = dir.path().join(crate::DB_FILE);
        let db = Db::open(&path).unwrap();
        assert!(read_old_log(&db).unwrap().is_none());
        drop(db);
        let (mut log, _sm) = crate::open(dir.path(), 1).unwrap();
        assert_eq!(log.get_log_state().await.unwrap().last_log_id.map(|l| l.index), Some(9));
    }
}
