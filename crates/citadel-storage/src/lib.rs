//! Replicated storage: the Raft log (on `raft-log`) and the state machine (on redb).
//!
//! Everything here sees only ciphertext and keyed hashes (the barrier sits above). What reaches
//! disk is encoded in Citadel's own versioned records ([`codec`]), never openraft's structs, so
//! an openraft upgrade cannot silently change the disk format; every record carries a checksum
//! that is verified before the record is trusted.

pub mod audit_store;
pub mod codec;
pub(crate) mod db;
pub mod files;
mod import;
pub mod kv_table;
pub mod log_store;
pub mod map_tables;
pub mod recover;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

pub use audit_store::{AuditQuery, AuditStore, ChainReport};
pub use log_store::{DiskObserver, LogFailure, LogStore, LOG_DIR};
pub use state_machine::{StateMachine, StateReader};
pub use types::{NodeInfo, TypeConfig};

#[cfg(test)]
mod tests {
    #[test]
    fn discarding_the_replicated_state_keeps_the_nodes_own_files_and_can_be_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(super::LOG_DIR)).unwrap();
        std::fs::write(d.join(super::LOG_DIR).join("chunk"), b"x").unwrap();
        for f in [super::DB_FILE, super::snapshot_file::SNAPSHOT_FILE, "audit-spool", "REMOVED"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let deleted = super::discard_replicated_state(d).unwrap();
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        let mut left: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["REMOVED", "audit-spool"]);
        assert!(super::discard_replicated_state(d).unwrap().is_empty(), "a second run finds nothing to do");
    }
}

use std::path::{Path, PathBuf};

/// File name of the redb database inside a node's data directory (identity, audit log).
pub const DB_FILE: &str = "raft.redb";

/// Deletes the node's replicated state (the Raft log, the state machine's database and its
/// snapshot) so that it catches up from the cluster as a new replica would (§10.1 resync).
/// What is the node's own stays: its audit spool (its chain goes on from its last sequence),
/// the audit archives, its certificates and keys. Returns what it deleted; missing files are
/// no error, so an interrupted discard is finished by running it again.
pub fn discard_replicated_state(data_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut deleted = Vec::new();
    for name in [LOG_DIR, DB_FILE, snapshot_file::SNAPSHOT_FILE, snapshot_file::STAGING_FILE] {
        let path = data_dir.join(name);
        let result = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(e),
        };
        result.map_err(|e| std::io::Error::new(e.kind(), format!("cannot delete {}: {e}", path.display())))?;
        deleted.push(path);
    }
    std::fs::File::open(data_dir).and_then(|d| d.sync_all())?;
    Ok(deleted)
}

/// Opens (or creates) a node's storage, refusing data that belongs to another node or fails
/// its checksums. Errors say which file and what to do.
pub fn open(data_dir: &Path, node_id: u64) -> Result<(LogStore, StateMachine), StorageOpenError> {
    let tightened = files::secure_data_dir(data_dir).map_err(StorageOpenError::Files)?;
    if tightened > 0 {
        tracing::warn!(
            dir = %data_dir.display(),
            count = tightened,
            "tightened the modes of files and directories an older version left readable by others (now 0600/0700)"
        );
    }
    let db = db::Db::open(&data_dir.join(DB_FILE))?;
    db::check_identity(&db, node_id)?;
    import::import_old_log(&db, data_dir, node_id)?;
    let log = LogStore::open(&data_dir.join(LOG_DIR), node_id)?;
    let sm = StateMachine::open(std::sync::Arc::new(db), data_dir)?;
    Ok((log, sm))
}

#[derive(Debug)]
pub enum StorageOpenError {
    Files(files::FileError),
    Io(PathBuf, String),
    Corrupt(PathBuf, String),
    Foreign { path: PathBuf, found: u64, expected: u64 },
    Format { path: PathBuf, found: u32 },
}

impl std::fmt::Display for StorageOpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageOpenError::Files(e) => std::fmt::Display::fmt(e, f),
            StorageOpenError::Io(p, e) => write!(f, "cannot open {}: {e}", p.display()),
            StorageOpenError::Corrupt(p, e) => write!(
                f,
                "{} is damaged: {e}. Do not serve from it: move it aside and let the node rejoin \
                 (it will catch up from the cluster), or restore a snapshot",
                p.display()
            ),
            StorageOpenError::Foreign { path, found, expected } => write!(
                f,
                "{} belongs to node {found}, but this server is configured as node {expected}: \
                 check node_id and data_dir in the config",
                path.display()
            ),
            StorageOpenError::Format { path, found } => write!(
                f,
                "{} uses storage format {found}, which this build ({}) does not read: run a matching citadel version",
                path.display(),
                citadel_core::command::FORMAT_VERSION
            ),
        }
    }
}

impl std::error::Error for StorageOpenError {}
