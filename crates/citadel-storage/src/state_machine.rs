//! The state machine: `citadel_core::state::State` in memory, snapshotted to a file, and the
//! audit log on disk ([`AuditStore`]).
//!
//! The state without its audit events is small (secrets are kilobytes), so it lives in memory
//! and is rebuilt at start from the latest snapshot plus the committed log after it. The audit
//! events, which grow with every request, go to the audit store after every batch. Readers take
//! a shared lock; `apply` takes the write lock for the duration of one batch, including its
//! store commit, so a reader never sees a state whose events are not yet queryable.
//!
//! A snapshot (`snapshot.bin`, what openraft builds and reads at start, and what an operator
//! saves) holds each audit chain's tip, not its events. Sent to a follower, it is followed by
//! its events, one per line, streamed from the store ([`StateReader::write_snapshot_events`]);
//! the follower checks and stages them as they arrive ([`SnapshotReceiver`]) and installs them
//! with the snapshot in one commit. Neither side holds the audit log in memory.

use std::io;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use citadel_core::audit::{Chain, ChainTip, ChainVerifier};
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
    /// Set while a snapshot's events are being received.
    receiving: Arc<AtomicBool>,
}

/// Each chain of `audit` with its retention anchor and its tip: the events a snapshot covers.
fn chain_ranges(audit: &citadel_core::audit::AuditLog) -> Vec<(Chain, ChainTip, ChainTip)> {
    let nodes = audit.chains.iter().map(|(node, c)| (Chain::Node(*node), c.pruned.clone(), c.stored.clone()));
    nodes.chain([(Chain::Log, audit.log.pruned.clone(), audit.log.stored.clone())]).collect()
}

/// What the staged events are marked with: the snapshot's last log id, encoded.
fn staging_id(meta: &SnapshotMeta) -> Vec<u8> {
    codec::encode(&meta.last_log_id.as_ref().map(codec::StoredLogId::from))
}

/// Events staged per commit while a snapshot arrives.
const STAGING_BATCH: usize = 10_000;

/// A snapshot's audit events arriving from the leader ([`StateReader::receive_snapshot`]).
pub struct SnapshotReceiver {
    audit: AuditStore,
    /// Each chain the snapshot covers: its check so far and the tip it must reach.
    chains: std::collections::BTreeMap<Chain, (ChainVerifier, ChainTip)>,
    batch: Vec<citadel_core::audit::AuditEvent>,
    first: bool,
    snapshot: Vec<u8>,
    receiving: Arc<AtomicBool>,
}

impl SnapshotReceiver {
    /// Takes the next event (one line): it must continue its chain, within the snapshot.
    /// Blocking (stages a batch now and then).
    pub fn add(&mut self, line: &[u8]) -> io::Result<()> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("received snapshot: {what}"));
        let event: citadel_core::audit::AuditEvent =
            serde_json::from_slice(line).map_err(|e| bad(format!("not an audit event: {e}")))?;
        let chain = Chain::of(&event);
        let (verifier, tip) =
            self.chains.get_mut(&chain).ok_or_else(|| bad(format!("an event of {chain}, which it does not cover")))?;
        if event.body().seq > tip.seq {
            return Err(bad(format!("event {} of {chain} is past the snapshot's tip {}", event.body().seq, tip.seq)));
        }
        verifier.check(&event).map_err(|e| bad(e.to_string()))?;
        self.batch.push(event);
        if self.batch.len() >= STAGING_BATCH {
            self.stage()?;
        }
        Ok(())
    }

    fn stage(&mut self) -> io::Result<()> {
        self.audit.stage(&self.batch, self.first)?;
        self.batch.clear();
        self.first = false;
        Ok(())
    }

    /// Every event arrived: each chain reached its tip, with the tip's hash.
    pub fn finish(mut self) -> io::Result<()> {
        for (chain, (verifier, tip)) in &self.chains {
            if verifier.last() != tip {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("received snapshot: {chain} ends at {} instead of {}", verifier.last().seq, tip.seq),
                ));
            }
        }
        self.stage()?;
        self.audit.staged_for(&self.snapshot)
    }
}

impl Drop for SnapshotReceiver {
    fn drop(&mut self) {
        self.receiving.store(false, std::sync::atomic::Ordering::Release);
    }
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

    /// A local snapshot as it is sent to a follower: without any audit events inline (a
    /// format-4 `snapshot.bin` still holds them; they are in the store), so the events can
    /// follow it one per line ([`StateReader::write_snapshot_events`]).
    pub fn transfer_form(&self, local: &[u8]) -> io::Result<Vec<u8>> {
        let mut stored: StoredSnapshot = codec::decode(local, "local snapshot")?;
        stored.state.audit.take_unstored();
        Ok(codec::encode(&stored))
    }

    /// Writes the audit events a snapshot in transfer form covers, each chain from its
    /// retention anchor to its tip, one stored event per call of `out`, read from the store
    /// and never held whole. Blocking.
    pub fn write_snapshot_events(
        &self,
        transfer: &[u8],
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        let stored: StoredSnapshot = codec::decode(transfer, "snapshot")?;
        let mut total = 0;
        for (chain, anchor, tip) in chain_ranges(&stored.state.audit) {
            let written = self.audit.write_chain(chain, anchor.seq + 1, tip.seq, out)?;
            if written != tip.seq - anchor.seq {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the audit store holds {written} of the events {}..={} of {chain} the snapshot covers",
                        anchor.seq + 1,
                        tip.seq
                    ),
                ));
            }
            total += written;
        }
        Ok(total)
    }

    /// Starts receiving the audit events of a snapshot in transfer form, whose last log id is
    /// `snapshot`: they are checked link by link and staged, then installed with the snapshot.
    /// One transfer at a time.
    pub fn receive_snapshot(&self, transfer: &[u8], snapshot: &SnapshotMeta) -> io::Result<SnapshotReceiver> {
        let stored: StoredSnapshot = codec::decode(transfer, "received snapshot")?;
        if stored.state.audit.events().next().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a snapshot in transfer form holds no audit events inline",
            ));
        }
        if self.receiving.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Err(io::Error::other("another snapshot is being received; retry"));
        }
        let chains = chain_ranges(&stored.state.audit)
            .into_iter()
            .map(|(chain, anchor, tip)| (chain, (ChainVerifier::after(chain, anchor), tip)))
            .collect();
        Ok(SnapshotReceiver {
            audit: self.audit.clone(),
            chains,
            batch: Vec::new(),
            first: true,
            snapshot: staging_id(snapshot),
            receiving: self.receiving.clone(),
        })
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
    receiving: Arc<AtomicBool>,
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
            receiving: Arc::default(),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            inner: self.inner.clone(),
            applied_index: self.applied_tx.subscribe(),
            audit: self.audit.clone(),
            receiving: self.receiving.clone(),
        }
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
            receiving: self.receiving.clone(),
        }
    }

    /// Installs a snapshot received from a leader: in transfer form, its audit events staged
    /// as they arrived ([`SnapshotReceiver`]) become the store in one durable commit; in full
    /// form (events inline), they replace the store. Then the local form replaces
    /// `snapshot.bin`.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> Result<(), io::Error> {
        let stored: StoredSnapshot = codec::decode(&snapshot, "received snapshot")?;
        drop(snapshot);
        let mut restored = restore(stored)?;
        let index = restored.last_applied.as_ref().map_or(0, |l| l.index);
        let inline = restored.state.audit.take_unstored();
        let covers_events = chain_ranges(&restored.state.audit).iter().any(|(_, anchor, tip)| tip.seq > anchor.seq);
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
        let (snapshots, audit, staged) = (self.snapshots.clone(), self.audit.clone(), staging_id(meta));
        tokio::task::spawn_blocking(move || {
            if inline.is_empty() {
                if !audit.promote_staged(&staged, index)? {
                    if covers_events {
                        return Err(io::Error::other(
                            "the snapshot's audit events did not all arrive; it will be sent again",
                        ));
                    }
                    audit.store(&[], index, true, true)?;
                }
            } else {
                audit.store(&inline, index, true, true)?;
            }
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

    /// A node holding `n` events of node 1's chain, moved from a format-4 snapshot at index 7.
    fn node_with_events(dir: &Path, n: u64) -> StateMachine {
        let mut state = State::default();
        state.audit.ship(spool_events(n)).unwrap();
        write_snapshot(dir, 4, state);
        let db = Arc::new(Db::open(&dir.join(crate::DB_FILE)).unwrap());
        StateMachine::open(db, dir).unwrap()
    }

    fn meta_at_7() -> SnapshotMeta {
        let last = StoredLogId { term: 1, leader: 1, index: 7 };
        SnapshotMeta { last_log_id: Some(last.into()), last_membership: membership().into_stored().unwrap() }
    }

    /// What the sender streams: its snapshot in transfer form and the event lines after it.
    fn transfer(sender: &StateReader, dir: &Path) -> (Vec<u8>, Vec<Vec<u8>>) {
        let local = SnapshotFile::in_dir(dir).read::<StoredSnapshotRecord>().unwrap().unwrap().data;
        let transfer = sender.transfer_form(&local).unwrap();
        let mut lines = Vec::new();
        sender.write_snapshot_events(&transfer, &mut |e| Ok(lines.push(e.to_vec()))).unwrap();
        (transfer, lines)
    }

    #[test]
    fn a_format_4_snapshots_audit_events_move_to_the_store_and_are_sent_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let reader = node_with_events(dir.path(), 3).reader();
        assert_eq!(reader.read(|s| (s.audit.events().count(), s.audit.chains[&1].last_seq())), (0, 3));
        let stored = reader.audit().query(&crate::AuditQuery { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(stored, spool_events(3), "the events are on disk");
        let (transfer, lines) = transfer(&reader, dir.path());
        let header: StoredSnapshot = codec::decode(&transfer, "transfer").unwrap();
        assert_eq!(header.state.audit.events().count(), 0, "no event inline");
        let sent: Vec<citadel_core::audit::AuditEvent> =
            lines.iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(sent, spool_events(3));
    }

    #[tokio::test]
    async fn a_snapshot_streamed_event_by_event_is_installed_whole_and_a_cut_or_forged_stream_is_not() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sender = node_with_events(from.path(), 5).reader();
        let (transfer, lines) = transfer(&sender, from.path());
        let db = Arc::new(Db::open(&to.path().join(crate::DB_FILE)).unwrap());
        let mut receiver_sm = StateMachine::open(db, to.path()).unwrap();
        let receiver = receiver_sm.reader();

        // Cut short: every event checks, but the chain does not reach its tip.
        let mut cut = receiver.receive_snapshot(&transfer, &meta_at_7()).unwrap();
        lines[..4].iter().for_each(|l| cut.add(l).unwrap());
        assert!(cut.finish().unwrap_err().to_string().contains("ends at 4 instead of 5"));
        let refused = receiver_sm.install_snapshot(&meta_at_7(), transfer.clone()).await.unwrap_err();
        assert!(refused.to_string().contains("did not all arrive"), "{refused}");
        // Forged: an event whose bytes were edited fails its chain check.
        let mut forged = receiver.receive_snapshot(&transfer, &meta_at_7()).unwrap();
        forged.add(&lines[0]).unwrap();
        let edited = String::from_utf8(lines[1].clone()).unwrap().replace("\\\"time\\\":2", "\\\"time\\\":9");
        assert_ne!(edited.as_bytes(), lines[1]);
        assert!(forged.add(edited.as_bytes()).unwrap_err().to_string().contains("tampered"));
        drop(forged);

        let mut whole = receiver.receive_snapshot(&transfer, &meta_at_7()).unwrap();
        assert!(receiver.receive_snapshot(&transfer, &meta_at_7()).is_err(), "one transfer at a time");
        lines.iter().for_each(|l| whole.add(l).unwrap());
        whole.finish().unwrap();
        receiver_sm.install_snapshot(&meta_at_7(), transfer).await.unwrap();
        let held = receiver.audit().query(&crate::AuditQuery { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(held, spool_events(5));
        assert_eq!((receiver.applied_index(), receiver.read(|s| s.audit.chains[&1].last_seq())), (7, 5));
        let report = &receiver.audit().verify(&Default::default()).unwrap()[0];
        assert_eq!((report.events, report.error.clone()), (5, None));
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
