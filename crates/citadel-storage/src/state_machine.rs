//! The state machine: `citadel_core::state::State` in memory, snapshotted to a file.
//!
//! The state is small (secrets are kilobytes), so it lives in memory and is rebuilt at start from
//! the latest snapshot plus the committed log after it. Readers take a shared lock; `apply` takes
//! the write lock for the duration of one batch.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use citadel_core::command::Response;
use citadel_core::state::State;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;

use crate::codec::{self, StoredMembershipState, StoredSnapshot};
use crate::db::Db;
use crate::snapshot_file::SnapshotFile;
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};
use crate::StorageOpenError;

/// Where format 3 kept the snapshot, moved out at open.
const KEY_SNAPSHOT: &str = "snapshot";

struct Applied {
    state: State,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// A cheap, cloneable read handle on the applied state, for the layers above.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<RwLock<Applied>>,
    applied_index: watch::Receiver<u64>,
}

impl StateReader {
    /// Runs `f` against the current state under a shared lock.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied_index.borrow()
    }

    /// Waits until the state machine has applied `index` (for ReadIndex reads).
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.applied_index.clone();
        let _ = rx.wait_for(|&applied| applied >= index).await;
    }

    fn lock(&self) -> RwLockReadGuard<'_, Applied> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct StateMachine {
    inner: Arc<RwLock<Applied>>,
    snapshots: Arc<SnapshotFile>,
    applied_tx: Arc<watch::Sender<u64>>,
}

impl StateMachine {
    pub(crate) fn open(db: &Db, data_dir: &Path) -> Result<StateMachine, StorageOpenError> {
        let snapshots = SnapshotFile::in_dir(data_dir);
        let corrupt = |e: io::Error| StorageOpenError::Corrupt(snapshots.path().to_path_buf(), e.to_string());
        let record = match snapshots.read::<StoredSnapshotRecord>().map_err(corrupt)? {
            Some(record) => Some(record),
            None => move_snapshot_out_of(db, &snapshots)?,
        };
        let applied = match record {
            Some(record) => {
                let what = format!("{} (its state)", snapshots.path().display());
                let snap: StoredSnapshot = codec::decode(&record.data, &what).map_err(corrupt)?;
                restore(snap).map_err(corrupt)?
            }
            None => Applied { state: State::default(), last_applied: None, membership: StoredMembership::default() },
        };
        let index = applied.last_applied.as_ref().map_or(0, |l| l.index);
        Ok(StateMachine {
            inner: Arc::new(RwLock::new(applied)),
            snapshots: Arc::new(snapshots),
            applied_tx: Arc::new(watch::channel(index).0),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader { inner: self.inner.clone(), applied_index: self.applied_tx.subscribe() }
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Format 3 kept the snapshot in `raft.redb`: moved to its file once (written first, then
/// removed from the database, so a crash between the two only repeats the move).
fn move_snapshot_out_of(db: &Db, snapshots: &SnapshotFile) -> Result<Option<StoredSnapshotRecord>, StorageOpenError> {
    let corrupt = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
    let Some(record) = db.read_meta::<StoredSnapshotRecord>(KEY_SNAPSHOT).map_err(corrupt)? else { return Ok(None) };
    let io_err = |e: io::Error| StorageOpenError::Io(snapshots.path().to_path_buf(), e.to_string());
    snapshots.write(&record).map_err(io_err)?;
    db.write(|txn| {
        txn.open_table(crate::db::META)?.remove(KEY_SNAPSHOT)?;
        Ok(())
    })
    .map_err(|e| StorageOpenError::Io(db.path.clone(), e.to_string()))?;
    tracing::info!(from = %db.path.display(), to = %snapshots.path().display(), "moved the snapshot to its own file");
    Ok(Some(record))
}

fn restore(snap: StoredSnapshot) -> io::Result<Applied> {
    if !citadel_core::command::readable_format(snap.format) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snapshot format {} is not supported by this build", snap.format),
        ));
    }
    Ok(Applied {
        state: snap.state,
        last_applied: snap.last_applied.map(Into::into),
        membership: snap.membership.into_stored()?,
    })
}

/// A snapshot as persisted: openraft's meta in our encoding, plus the encoded data.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshotRecord {
    last_log_id: Option<codec::StoredLogId>,
    membership: StoredMembershipState,
    #[serde(with = "citadel_core::encoding")]
    data: Vec<u8>,
}

impl StoredSnapshotRecord {
    fn into_snapshot(self) -> io::Result<Snapshot> {
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.last_log_id.map(Into::into),
                last_membership: self.membership.into_stored()?,
            },
            snapshot: self.data,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Only the copy holds the lock `apply` needs: encoding and hashing a large state took
        // hundreds of milliseconds, and writes waiting to apply timed out (`bench scale` found it).
        let (stored, meta) = {
            let applied = self.inner.read().unwrap_or_else(|p| p.into_inner());
            let stored = StoredSnapshot {
                format: citadel_core::command::FORMAT_VERSION,
                last_applied: applied.last_applied.as_ref().map(Into::into),
                membership: (&applied.membership).into(),
                state: applied.state.clone(),
            };
            let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone() };
            (stored, meta)
        };
        let snapshots = self.snapshots.clone();
        let data = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let record = StoredSnapshotRecord {
                last_log_id: stored.last_applied,
                membership: stored.membership.clone(),
                data: codec::encode(&stored),
            };
            snapshots.write(&record)?;
            Ok(record.data)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Snapshot { meta, snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.inner.read().unwrap_or_else(|p| p.into_inner());
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut last_index = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut applied = self.write_lock();
                if let Some(prev) = &applied.last_applied {
                    assert!(entry.log_id.index > prev.index, "entries are applied once, in order");
                }
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Normal(command) => {
                        // The entry's leader id (term and node) is replicated with it: a leader
                        // job's result is checked against it (§1.6), alike on every replica.
                        let position = citadel_core::job::LogPosition {
                            term: entry.log_id.leader_id.term,
                            leader: entry.log_id.leader_id.node_id,
                            index: entry.log_id.index,
                        };
                        applied.state.apply_entry(position, command)
                    }
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::Done
                    }
                }
            };
            last_index = Some(entry.log_id.index);
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        if let Some(index) = last_index {
            self.applied_tx.send_replace(index);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            inner: self.inner.clone(),
            snapshots: self.snapshots.clone(),
            applied_tx: self.applied_tx.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> Result<(), io::Error> {
        let stored: StoredSnapshot = codec::decode(&snapshot, "received snapshot")?;
        let restored = restore(stored)?;
        let record = StoredSnapshotRecord {
            last_log_id: meta.last_log_id.as_ref().map(Into::into),
            membership: (&meta.last_membership).into(),
            data: snapshot,
        };
        let snapshots = self.snapshots.clone();
        tokio::task::spawn_blocking(move || snapshots.write(&record)).await.map_err(io::Error::other)??;
        let index = restored.last_applied.as_ref().map_or(0, |l| l.index);
        *self.write_lock() = restored;
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let snapshots = self.snapshots.clone();
        let record = tokio::task::spawn_blocking(move || snapshots.read::<StoredSnapshotRecord>())
            .await
            .map_err(io::Error::other)??;
        record.map(StoredSnapshotRecord::into_snapshot).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{StoredLogId, StoredMembershipConfig};

    #[test]
    fn a_snapshot_kept_in_raft_redb_moves_to_its_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::DB_FILE);
        let db = Db::open(&path).unwrap();
        let last = StoredLogId { term: 1, leader: 1, index: 7 };
        let membership = StoredMembershipState {
            log_id: None,
            config: StoredMembershipConfig { configs: vec![[1].into()], nodes: [(1, Default::default())].into() },
        };
        let stored = StoredSnapshot {
            format: citadel_core::command::FORMAT_VERSION,
            last_applied: Some(last),
            membership: membership.clone(),
            state: State::default(),
        };
        let record = StoredSnapshotRecord { last_log_id: Some(last), membership, data: codec::encode(&stored) };
        db.write_meta(KEY_SNAPSHOT, &record).unwrap();

        let sm = StateMachine::open(&db, dir.path()).unwrap();
        assert_eq!(sm.reader().applied_index(), 7, "the state comes from the moved snapshot");
        assert!(dir.path().join(crate::snapshot_file::SNAPSHOT_FILE).exists());
        assert!(db.read_meta::<StoredSnapshotRecord>(KEY_SNAPSHOT).unwrap().is_none(), "removed from raft.redb");
        let again = StateMachine::open(&db, dir.path()).unwrap();
        assert_eq!(again.reader().applied_index(), 7);
    }
}
