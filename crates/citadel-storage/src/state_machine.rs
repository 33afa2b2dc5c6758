//! The state machine: `citadel_core::state::State` in memory, snapshotted to a file, and the
//! audit log on disk ([`AuditStore`]).
//!
//! The state without its audit events is small (secrets are kilobytes), so it lives in memory
//! and is rebuilt at start from the latest snapshot plus the committed log after it. The audit
//! events, which grow with every request, go to the audit store after every batch. Readers take
//! a shared lock; `apply` takes the write lock for the duration of one batch, including its
//! store commit, so a reader never sees a state whose events are not yet queryable.
//!
//! A snapshot has two forms. The *local* form (`snapshot.bin`, what openraft builds and reads
//! at start) holds each audit chain's tip only. The *full* form, sent to a follower and saved by
//! an operator, holds every event as well ([`StateReader::full_snapshot`]); installing it puts
//! the events back in the store.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use citadel_core::audit::Chain;
use citadel_core::command::Response;
use citadel_core::state::State;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;

use crate::audit_store::AuditStore;
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

/// How long the audit store's commits may go without an fsync (each is replayable from the
/// log; the fsync lets redb reuse the pages they freed).
const AUDIT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Directory of audit archives inside a node's data directory.
pub const ARCHIVE_DIR: &str = "audit-archive";

/// The first storage format whose snapshots leave the audit events in the audit store.
const AUDIT_STORE_FORMAT: u32 = 5;

/// A cheap, cloneable read handle on the applied state, for the layers above.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<RwLock<Applied>>,
    applied_index: watch::Receiver<u64>,
    audit: AuditStore,
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

    /// The audit log on disk, for queries and verification.
    pub fn audit(&self) -> &AuditStore {
        &self.audit
    }

    /// A local snapshot (`snapshot.bin`'s form) in its full form: every audit event up to each
    /// chain's tip, read from the store. Blocking: the store is read from disk.
    pub fn full_snapshot(&self, local: &[u8]) -> io::Result<Vec<u8>> {
        let mut stored: StoredSnapshot = codec::decode(local, "local snapshot")?;
        let audit = &mut stored.state.audit;
        let tips: Vec<_> = audit.tips().collect();
        for (chain, up_to) in tips {
            let (anchor, tip) = match chain {
                Chain::Log => (audit.log.pruned.clone(), audit.log.stored.clone()),
                Chain::Node(node) => (audit.chains[&node].pruned.clone(), audit.chains[&node].stored.clone()),
            };
            let loaded = self.audit.chain_events(chain, anchor.seq + 1, up_to)?;
            let covered = loaded.len() as u64 == up_to - anchor.seq
                && (tip.is_genesis() || loaded.last().is_none_or(|e| e.hash == tip.hash));
            if !covered {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the audit store holds {} of the events {}..={up_to} of {chain} the snapshot covers",
                        loaded.len(),
                        anchor.seq + 1
                    ),
                ));
            }
            match chain {
                Chain::Log => audit.log.events = loaded,
                Chain::Node(node) => audit.chains.get_mut(&node).expect("a tip comes from a chain").events = loaded,
            }
        }
        // The window is rebuilt from the events by whoever installs this form.
        audit.log.recent_requests.clear();
        Ok(codec::encode(&stored))
    }
}

pub struct StateMachine {
    inner: Arc<RwLock<Applied>>,
    snapshots: Arc<SnapshotFile>,
    applied_tx: Arc<watch::Sender<u64>>,
    audit: AuditStore,
    last_sync: Instant,
    /// Where retention writes the events it prunes (`DATA/audit-archive`).
    archive_dir: Arc<Path>,
}

impl StateMachine {
    pub(crate) fn open(db: Arc<Db>, data_dir: &Path) -> Result<StateMachine, StorageOpenError> {
        let snapshots = SnapshotFile::in_dir(data_dir);
        let corrupt = |e: io::Error| StorageOpenError::Corrupt(snapshots.path().to_path_buf(), e.to_string());
        let record = match snapshots.read::<StoredSnapshotRecord>().map_err(corrupt)? {
            Some(record) => Some(record),
            None => move_snapshot_out_of(&db, &snapshots)?,
        };
        let mut format = citadel_core::command::FORMAT_VERSION;
        let mut applied = match record {
            Some(record) => {
                let what = format!("{} (its state)", snapshots.path().display());
                let snap: StoredSnapshot = codec::decode(&record.data, &what).map_err(corrupt)?;
                format = snap.format;
                restore(snap).map_err(corrupt)?
            }
            None => Applied { state: State::default(), last_applied: None, membership: StoredMembership::default() },
        };
        let index = applied.last_applied.as_ref().map_or(0, |l| l.index);
        let audit = AuditStore::new(db.clone());
        let db_err = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
        // A snapshot of format 4 or older holds its audit events: they move to the store once.
        let events = applied.state.audit.take_unstored();
        if !events.is_empty() || format < AUDIT_STORE_FORMAT {
            let stored = audit.applied().map_err(db_err)?;
            audit.store(&events, stored.max(index), true, false).map_err(db_err)?;
            tracing::info!(events = events.len(), "moved the audit log out of the snapshot into the audit store");
        }
        // Every snapshot is written after the store was synced up to it: a store behind the
        // snapshot has lost events the log no longer holds.
        let stored = audit.applied().map_err(db_err)?;
        if stored < index {
            return Err(db_err(io::Error::other(format!(
                "its audit store covers the log up to entry {stored}, but {} starts at entry {index}: \
                 audit events between them are lost",
                snapshots.path().display()
            ))));
        }
        Ok(StateMachine {
            inner: Arc::new(RwLock::new(applied)),
            snapshots: Arc::new(snapshots),
            applied_tx: Arc::new(watch::channel(index).0),
            audit,
            last_sync: Instant::now(),
            archive_dir: data_dir.join(ARCHIVE_DIR).into(),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader { inner: self.inner.clone(), applied_index: self.applied_tx.subscribe(), audit: self.audit.clone() }
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

type Answer = (openraft::storage::ApplyResponder<TypeConfig>, Response);

/// Applies one batch under the state's write lock, then stores its audit events with the
/// applied index it reaches (fsynced when `durable`). Returns the answers to send and that index.
fn apply_batch(
    inner: &RwLock<Applied>,
    audit: &AuditStore,
    archive_dir: &Path,
    batch: Vec<EntryResponder<TypeConfig>>,
    durable: bool,
) -> io::Result<(Vec<Answer>, Option<u64>)> {
    let mut last_index = None;
    let mut answers = Vec::with_capacity(batch.len());
    let mut applied = inner.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    for (entry, responder) in batch {
        if let Some(prev) = &applied.last_applied {
            assert!(entry.log_id.index > prev.index, "entries are applied once, in order");
        }
        applied.last_applied = Some(entry.log_id);
        let response = match entry.payload {
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
        };
        last_index = Some(entry.log_id.index);
        answers.extend(responder.map(|r| (r, response)));
        // Retention: the events before the cut must be in the store before it is carried out.
        let prunes = applied.state.audit.take_prunes();
        if !prunes.is_empty() {
            let events = applied.state.audit.take_unstored();
            audit.store(&events, entry.log_id.index, false, false)?;
            let archived = audit.prune(&prunes, archive_dir, entry.log_id.index)?;
            tracing::info!(events = archived, dir = %archive_dir.display(), "audit retention archived and pruned events");
        }
    }
    if let Some(index) = last_index {
        // Under the lock: no reader sees this batch before its events are queryable, and no
        // snapshot copies the state between the two.
        let events = applied.state.audit.take_unstored();
        audit.store(&events, index, durable, false)?;
    }
    Ok((answers, last_index))
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
        let audit = self.audit.clone();
        let data = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            // The log may be purged up to this snapshot once it is written: first make the audit
            // events it covers durable (apply stored them before the copy above was taken).
            audit.sync()?;
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
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        // Applied off the async threads: the store's commit (and, once a second, its fsync) must
        // not stall Raft's heartbeats on a machine with two cores (`bench scale` at full size
        // saw elections while a commit ran on a runtime thread).
        let durable = self.last_sync.elapsed() >= AUDIT_SYNC_INTERVAL;
        let (inner, audit, archive_dir) = (self.inner.clone(), self.audit.clone(), self.archive_dir.clone());
        let (answers, last_index) =
            tokio::task::spawn_blocking(move || apply_batch(&inner, &audit, &archive_dir, batch, durable))
                .await
                .map_err(io::Error::other)??;
        if durable {
            self.last_sync = Instant::now();
        }
        for (responder, response) in answers {
            responder.send(response);
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
            audit: self.audit.clone(),
            last_sync: self.last_sync,
            archive_dir: self.archive_dir.clone(),
        }
    }

    /// Installs a snapshot in its full form (sent by a leader): its audit events replace the
    /// store's, durably, before the local form replaces `snapshot.bin`.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> Result<(), io::Error> {
        let stored: StoredSnapshot = codec::decode(&snapshot, "received snapshot")?;
        drop(snapshot);
        let mut restored = restore(stored)?;
        let index = restored.last_applied.as_ref().map_or(0, |l| l.index);
        let events = restored.state.audit.take_unstored();
        let local = StoredSnapshot {
            format: citadel_core::command::FORMAT_VERSION,
            last_applied: restored.last_applied.as_ref().map(Into::into),
            membership: (&restored.membership).into(),
            state: restored.state.clone(),
        };
        let record = StoredSnapshotRecord {
            last_log_id: meta.last_log_id.as_ref().map(Into::into),
            membership: (&meta.last_membership).into(),
            data: codec::encode(&local),
        };
        let (snapshots, audit) = (self.snapshots.clone(), self.audit.clone());
        tokio::task::spawn_blocking(move || {
            audit.store(&events, index, true, true)?;
            snapshots.write(&record)
        })
        .await
        .map_err(io::Error::other)??;
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

    fn membership() -> StoredMembershipState {
        StoredMembershipState {
            log_id: None,
            config: StoredMembershipConfig { configs: vec![[1].into()], nodes: [(1, Default::default())].into() },
        }
    }

    /// Writes `snapshot.bin` of `format` at index 7 holding `state`.
    fn write_snapshot(dir: &Path, format: u32, state: State) {
        let last = StoredLogId { term: 1, leader: 1, index: 7 };
        let stored = StoredSnapshot { format, last_applied: Some(last), membership: membership(), state };
        let record =
            StoredSnapshotRecord { last_log_id: Some(last), membership: membership(), data: codec::encode(&stored) };
        SnapshotFile::in_dir(dir).write(&record).unwrap();
    }

    fn spool_events(n: u64) -> Vec<citadel_core::audit::AuditEvent> {
        let mut prev = citadel_core::audit::GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let body = citadel_core::audit::AuditBody { node: 1, seq, time: seq, ..Default::default() };
                let event = citadel_core::audit::AuditEvent::seal(body, &prev);
                prev = event.hash.clone();
                event
            })
            .collect()
    }

    #[test]
    fn a_format_4_snapshots_audit_events_move_to_the_store_and_the_full_form_gives_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        state.audit.ship(spool_events(3)).unwrap();
        write_snapshot(dir.path(), 4, state);
        let db = Arc::new(Db::open(&dir.path().join(crate::DB_FILE)).unwrap());
        let sm = StateMachine::open(db, dir.path()).unwrap();
        let reader = sm.reader();
        assert_eq!(reader.read(|s| (s.audit.events().count(), s.audit.chains[&1].last_seq())), (0, 3));
        let stored = reader.audit().query(&crate::AuditQuery { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(stored, spool_events(3), "the events are on disk");

        let local = SnapshotFile::in_dir(dir.path()).read::<StoredSnapshotRecord>().unwrap().unwrap().data;
        let full: StoredSnapshot = codec::decode(&reader.full_snapshot(&local).unwrap(), "full").unwrap();
        assert_eq!(full.state.audit.chains[&1].events, spool_events(3));
        assert_eq!(full.state.audit.verify(), Ok(3));
    }

    #[test]
    fn an_audit_store_behind_its_snapshot_stops_the_node_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        state.audit.ship(spool_events(2)).unwrap();
        state.audit.take_unstored();
        write_snapshot(dir.path(), AUDIT_STORE_FORMAT, state);
        let db = Arc::new(Db::open(&dir.path().join(crate::DB_FILE)).unwrap());
        let err = StateMachine::open(db, dir.path()).err().unwrap().to_string();
        assert!(err.contains(crate::DB_FILE) && err.contains(crate::snapshot_file::SNAPSHOT_FILE), "{err}");
        assert!(err.contains("audit events between them are lost"), "{err}");
    }

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
            format: 3,
            last_applied: Some(last),
            membership: membership.clone(),
            state: State::default(),
        };
        let record = StoredSnapshotRecord { last_log_id: Some(last), membership, data: codec::encode(&stored) };
        db.write_meta(KEY_SNAPSHOT, &record).unwrap();

        let db = Arc::new(db);
        let sm = StateMachine::open(db.clone(), dir.path()).unwrap();
        assert_eq!(sm.reader().applied_index(), 7, "the state comes from the moved snapshot");
        assert!(dir.path().join(crate::snapshot_file::SNAPSHOT_FILE).exists());
        assert!(db.read_meta::<StoredSnapshotRecord>(KEY_SNAPSHOT).unwrap().is_none(), "removed from raft.redb");
        let again = StateMachine::open(db, dir.path()).unwrap();
        assert_eq!(again.reader().applied_index(), 7);
    }
}
