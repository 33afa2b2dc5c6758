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
pub mod log_store;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

pub use audit_store::{AuditQuery, AuditStore, ChainReport};
pub use log_store::{LogFailure, LogStore, LOG_DIR};
pub use state_machine::{StateMachine, StateReader};
pub use types::{NodeInfo, TypeConfig};

use std::path::{Path, PathBuf};

/// File name of the redb database inside a node's data directory (identity, audit log).
pub const DB_FILE: &str = "raft.redb";

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
