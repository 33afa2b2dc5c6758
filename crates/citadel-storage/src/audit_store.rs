//! The replicated audit log on disk, in the node's redb database (§9.3).
//!
//! Why here and not in the state in memory: a vault audits every request, so its audit log
//! grows for ever; held in memory (and copied into every snapshot) it grew each node by
//! ~3 KiB per event. The state in memory keeps each chain's tip ([`citadel_core::audit::ChainTip`]);
//! `apply` hands the events it seals to this store after every batch
//! ([`citadel_core::audit::AuditLog::take_unstored`]), in one transaction that also records the
//! applied index it covers. Those commits are not fsynced one by one: the Raft log is durable and
//! replays them, and storing an event again under its (chain, sequence) key changes nothing.
//! A commit is made durable at least once a second and before every snapshot, so what the log
//! may have purged behind a snapshot is always on disk here.
//!
//! Tables: the events by (chain, sequence), and four indexes by node, user, path and time,
//! each ending in (time, chain, sequence), so a query reads the newest matches first and stops
//! at its limit. An event is stored as its sealed JSON (body bytes, link, hash) and its hash is
//! checked when it is read, so a damaged event is reported, never served.

use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use citadel_core::audit::{chain_hash, AuditEvent, Chain, ChainTip, ChainVerifier, PrunePoint};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;
use crate::db::{Db, META};

/// One set of the store's tables: the events by (chain, sequence) → the sealed event's JSON (the
/// log chain is chain 0, node ids start at 1), and the indexes, each ending in (time, chain,
/// sequence): by time; by the node that accepted the request; by user; by path.
struct Tables {
    events: TableDefinition<'static, (u64, u64), &'static [u8]>,
    by_time: TableDefinition<'static, (u64, u64, u64), ()>,
    by_node: TableDefinition<'static, (u64, u64, u64, u64), ()>,
    by_user: TableDefinition<'static, (&'static str, u64, u64, u64), ()>,
    by_path: TableDefinition<'static, (&'static str, u64, u64, u64), ()>,
}

/// The tables queries read.
const LIVE: Tables = Tables {
    events: TableDefinition::new("audit_events"),
    by_time: TableDefinition::new("audit_by_time"),
    by_node: TableDefinition::new("audit_by_node"),
    by_user: TableDefinition::new("audit_by_user"),
    by_path: TableDefinition::new("audit_by_path"),
};
/// A snapshot's events while they arrive from the leader, renamed to [`LIVE`] in one commit
/// when it is installed.
const STAGED: Tables = Tables {
    events: TableDefinition::new("audit_events.staged"),
    by_time: TableDefinition::new("audit_by_time.staged"),
    by_node: TableDefinition::new("audit_by_node.staged"),
    by_user: TableDefinition::new("audit_by_user.staged"),
    by_path: TableDefinition::new("audit_by_path.staged"),
};
const EVENTS: TableDefinition<(u64, u64), &[u8]> = LIVE.events;
type EventsTable = redb::ReadOnlyTable<(u64, u64), &'static [u8]>;
const BY_TIME: TableDefinition<(u64, u64, u64), ()> = LIVE.by_time;
const BY_NODE: TableDefinition<(u64, u64, u64, u64), ()> = LIVE.by_node;
const BY_USER: TableDefinition<(&str, u64, u64, u64), ()> = LIVE.by_user;
const BY_PATH: TableDefinition<(&str, u64, u64, u64), ()> = LIVE.by_path;

#[derive(Clone, Copy)]
enum Change {
    Insert,
    Remove,
}

impl Tables {
    fn delete(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        txn.delete_table(self.events)?;
        txn.delete_table(self.by_time)?;
        txn.delete_table(self.by_node)?;
        txn.delete_table(self.by_user)?;
        txn.delete_table(self.by_path)?;
        Ok(())
    }

    /// Adds `events` and their index entries, or removes them.
    fn write(&self, txn: &redb::WriteTransaction, events: &[AuditEvent], change: Change) -> Result<(), redb::Error> {
        let mut table = txn.open_table(self.events)?;
        let mut by_time = txn.open_table(self.by_time)?;
        let mut by_node = txn.open_table(self.by_node)?;
        let mut by_user = txn.open_table(self.by_user)?;
        let mut by_path = txn.open_table(self.by_path)?;
        for event in events {
            let body = event.body();
            let (chain, seq, time) = (chain_key(Chain::of(event)), body.seq, body.time);
            let (user, path) = (body.user.as_str(), body.path.as_str());
            match change {
                Change::Insert => {
                    let json = serde_json::to_vec(event).expect("an audit event serializes");
                    table.insert((chain, seq), json.as_slice())?;
                    by_time.insert((time, chain, seq), ())?;
                    by_node.insert((body.node, time, chain, seq), ())?;
                    by_user.insert((user, time, chain, seq), ())?;
                    by_path.insert((path, time, chain, seq), ())?;
                }
                Change::Remove => {
                    table.remove((chain, seq))?;
                    by_time.remove((time, chain, seq))?;
                    by_node.remove((body.node, time, chain, seq))?;
                    by_user.remove((user, time, chain, seq))?;
                    by_path.remove((path, time, chain, seq))?;
                }
            }
        }
        Ok(())
    }

    /// Renames this set to `to` (which must not exist).
    fn rename(&self, txn: &redb::WriteTransaction, to: &Tables) -> Result<(), redb::Error> {
        txn.rename_table(self.events, to.events)?;
        txn.rename_table(self.by_time, to.by_time)?;
        txn.rename_table(self.by_node, to.by_node)?;
        txn.rename_table(self.by_user, to.by_user)?;
        txn.rename_table(self.by_path, to.by_path)?;
        Ok(())
    }
}

/// The applied index the store's contents cover, in `META`, written with every batch.
const KEY_APPLIED: &str = "audit_applied";
/// The snapshot (its last log id) whose events [`STAGED`] holds, once all of them arrived.
const KEY_STAGED_FOR: &str = "audit_staged_for";

const LOG_CHAIN_KEY: u64 = 0;

fn chain_key(chain: Chain) -> u64 {
    match chain {
        Chain::Log => LOG_CHAIN_KEY,
        Chain::Node(node) => node,
    }
}

fn chain_of_key(key: u64) -> Chain {
    if key == LOG_CHAIN_KEY {
        Chain::Log
    } else {
        Chain::Node(key)
    }
}

/// Which events a query wants: every filter given must match. The newest `limit` matches are
/// returned, oldest first.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub node: Option<u64>,
    pub user: Option<String>,
    /// A prefix of the event's path.
    pub path: Option<String>,
    pub since: u64,
    pub limit: usize,
}

impl AuditQuery {
    fn matches(&self, event: &AuditEvent) -> bool {
        let body = event.body();
        body.time >= self.since
            && self.node.is_none_or(|n| n == body.node)
            && self.user.as_ref().is_none_or(|u| *u == body.user)
            && self.path.as_ref().is_none_or(|p| body.path.starts_with(p.as_str()))
    }
}

/// One chain as the store holds it, verified from its first event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub chain: Chain,
    pub events: u64,
    pub last: ChainTip,
    /// The first fault found, if any: a gap, a broken link, a tampered event.
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct AuditStore {
    db: Arc<Db>,
}

impl AuditStore {
    pub(crate) fn new(db: Arc<Db>) -> AuditStore {
        AuditStore { db }
    }

    fn err(&self, e: impl std::fmt::Display) -> io::Error {
        self.db.err(e)
    }

    /// The applied index the stored events cover (0 for an empty store).
    pub(crate) fn applied(&self) -> io::Result<u64> {
        Ok(self.db.read_meta::<u64>(KEY_APPLIED)?.unwrap_or(0))
    }

    /// Stores `events` and the applied index they bring the store to, in one transaction;
    /// fsynced only when `durable`. `replace` first empties the store (a received snapshot).
    pub(crate) fn store(&self, events: &[AuditEvent], applied: u64, durable: bool, replace: bool) -> io::Result<()> {
        self.db.commit(durable, |txn| self.store_in(txn, events, applied, replace))
    }

    /// [`AuditStore::store`] inside the caller's transaction (the state machine's batch).
    pub(crate) fn store_in(
        &self,
        txn: &redb::WriteTransaction,
        events: &[AuditEvent],
        applied: u64,
        replace: bool,
    ) -> Result<(), redb::Error> {
        if replace {
            LIVE.delete(txn)?;
        }
        LIVE.write(txn, events, Change::Insert)?;
        txn.open_table(META)?.insert(KEY_APPLIED, codec::encode(&applied).as_slice())?;
        Ok(())
    }

    /// Adds a received snapshot's events to the staging tables, emptied first by the `first`
    /// batch, inside the caller's transaction (the receiver's, which stages its secrets too).
    pub(crate) fn stage_in(
        &self,
        txn: &redb::WriteTransaction,
        events: &[AuditEvent],
        first: bool,
    ) -> Result<(), redb::Error> {
        if first {
            self.clear_staged_in(txn)?;
        }
        STAGED.write(txn, events, Change::Insert)
    }

    /// Forgets staged events and their mark (a transfer that will not be installed).
    pub(crate) fn clear_staged_in(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        STAGED.delete(txn)?;
        txn.open_table(META)?.remove(KEY_STAGED_FOR)?;
        Ok(())
    }

    /// Marks the staged events (and secrets, `kv_table`) complete for the snapshot `snapshot`
    /// (its last log id, encoded).
    /// Not fsynced: the install that relies on the mark commits durably (a crash before it only
    /// loses a transfer the leader sends again).
    pub(crate) fn staged_for(&self, snapshot: &[u8]) -> io::Result<()> {
        self.db.commit(false, |txn| {
            txn.open_table(META)?.insert(KEY_STAGED_FOR, snapshot)?;
            Ok(())
        })
    }

    /// Installs the staged events as the store, with the applied index they cover, inside the
    /// caller's transaction, if they are complete for `snapshot`; says whether they were.
    pub(crate) fn promote_staged_in(
        &self,
        txn: &redb::WriteTransaction,
        snapshot: &[u8],
        applied: u64,
    ) -> Result<bool, redb::Error> {
        let mut meta = txn.open_table(META)?;
        if meta.get(KEY_STAGED_FOR)?.is_none_or(|v| v.value() != snapshot) {
            return Ok(false);
        }
        meta.remove(KEY_STAGED_FOR)?;
        meta.insert(KEY_APPLIED, codec::encode(&applied).as_slice())?;
        drop(meta);
        LIVE.delete(txn)?;
        STAGED.rename(txn, &LIVE)?;
        Ok(true)
    }

    /// Writes the stored bytes of `chain`'s events `from` to `up_to`, one per line, to `out`:
    /// a snapshot's events, streamed from a read transaction and never held whole.
    pub(crate) fn write_chain(
        &self,
        chain: Chain,
        from: u64,
        up_to: u64,
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        if from > up_to {
            return Ok(0);
        }
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let Some(table) = self.events_table(&txn)? else { return Ok(0) };
        let key = chain_key(chain);
        let mut written = 0;
        for row in table.range((key, from)..=(key, up_to)).map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            out(v.value())?;
            written += 1;
        }
        Ok(written)
    }

    /// The events table as of `txn`; `None` before the first event was stored.
    fn events_table(&self, txn: &redb::ReadTransaction) -> io::Result<Option<EventsTable>> {
        match txn.open_table(EVENTS) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Reads one event, checking that its hash covers its bytes and link.
    fn decode(&self, key: (u64, u64), bytes: &[u8]) -> io::Result<AuditEvent> {
        let damaged = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: audit event {} of {}: {what}", self.db.path.display(), key.1, chain_of_key(key.0)),
            )
        };
        let event: AuditEvent = serde_json::from_slice(bytes).map_err(|e| damaged(format!("undecodable: {e}")))?;
        if chain_hash(&event.prev_hash, event.raw().as_bytes()) != event.hash || event.body().seq != key.1 {
            return Err(damaged("its hash does not match its bytes (damaged or tampered)".into()));
        }
        Ok(event)
    }

    /// The newest `query.limit` events matching `query`, oldest first (by time, node, the log
    /// chain before a spool chain, sequence). Reads the most selective index: user, node, path,
    /// else time.
    pub fn query(&self, query: &AuditQuery) -> io::Result<Vec<AuditEvent>> {
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let Some(events) = self.events_table(&txn)? else { return Ok(Vec::new()) };
        let mut found = Vec::new();
        // Loads the event under `key`, keeps it if it matches; says whether the limit is reached.
        let mut take = |key: (u64, u64)| -> io::Result<bool> {
            if let Some(bytes) = events.get(key).map_err(|e| self.err(e))? {
                let event = self.decode(key, bytes.value())?;
                if query.matches(&event) {
                    found.push(event);
                }
            }
            Ok(found.len() >= query.limit)
        };
        let (since, max) = (query.since, u64::MAX);
        if let Some(user) = &query.user {
            let table = txn.open_table(BY_USER).map_err(|e| self.err(e))?;
            let range = table.range((user.as_str(), since, 0, 0)..=(user.as_str(), max, max, max));
            for row in range.map_err(|e| self.err(e))?.rev() {
                let (_, time, chain, seq) = row.map_err(|e| self.err(e))?.0.value();
                debug_assert!(time >= since);
                if take((chain, seq))? {
                    break;
                }
            }
        } else if let Some(node) = query.node {
            let table = txn.open_table(BY_NODE).map_err(|e| self.err(e))?;
            for row in table.range((node, since, 0, 0)..=(node, max, max, max)).map_err(|e| self.err(e))?.rev() {
                let (_, _, chain, seq) = row.map_err(|e| self.err(e))?.0.value();
                if take((chain, seq))? {
                    break;
                }
            }
        } else if let Some(prefix) = &query.path {
            // The paths under a prefix are ordered by path, not time: keep the newest `limit`.
            let table = txn.open_table(BY_PATH).map_err(|e| self.err(e))?;
            let mut newest = BinaryHeap::new();
            for row in table.range((prefix.as_str(), 0, 0, 0)..).map_err(|e| self.err(e))? {
                let row = row.map_err(|e| self.err(e))?;
                let (path, time, chain, seq) = row.0.value();
                if !path.starts_with(prefix.as_str()) {
                    break;
                }
                if time >= since {
                    newest.push(std::cmp::Reverse((time, chain, seq)));
                    if newest.len() > query.limit {
                        newest.pop();
                    }
                }
            }
            for std::cmp::Reverse((_, chain, seq)) in newest.into_sorted_vec() {
                take((chain, seq))?;
            }
        } else {
            let table = txn.open_table(BY_TIME).map_err(|e| self.err(e))?;
            for row in table.range((since, 0, 0)..).map_err(|e| self.err(e))?.rev() {
                let (_, chain, seq) = row.map_err(|e| self.err(e))?.0.value();
                if take((chain, seq))? {
                    break;
                }
            }
        }
        found.sort_by_key(|e| (e.body().time, e.body().node, e.body().chain.is_empty(), e.body().seq));
        Ok(found)
    }

    /// Verifies every chain the store holds, one event at a time, from the event after its
    /// retention anchor (`anchors`, from the replicated state; genesis where none is given).
    /// A chain in `anchors` that the store holds nothing of is reported at its anchor.
    pub fn verify(&self, anchors: &BTreeMap<Chain, ChainTip>) -> io::Result<Vec<ChainReport>> {
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let mut reports: Vec<ChainReport> = Vec::new();
        let table = self.events_table(&txn)?;
        let mut verifier: Option<ChainVerifier> = None;
        for row in table.as_ref().map(|t| t.iter()).transpose().map_err(|e| self.err(e))?.into_iter().flatten() {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let key = k.value();
            let chain = chain_of_key(key.0);
            if reports.last().is_none_or(|r| r.chain != chain) {
                let anchor = anchors.get(&chain).cloned().unwrap_or_default();
                reports.push(ChainReport { chain, events: 0, last: anchor.clone(), error: None });
                verifier = Some(ChainVerifier::after(chain, anchor));
            }
            let (report, verifier) = (reports.last_mut().expect("pushed above"), verifier.as_mut().expect("set above"));
            report.events += 1;
            if report.error.is_some() {
                continue;
            }
            match serde_json::from_slice::<AuditEvent>(v.value()) {
                Ok(event) => match verifier.check(&event) {
                    Ok(()) => report.last = verifier.last().clone(),
                    Err(e) => report.error = Some(e.to_string()),
                },
                Err(e) => report.error = Some(format!("sequence {}: undecodable: {e}", key.1)),
            }
        }
        for (chain, anchor) in anchors {
            if !reports.iter().any(|r| r.chain == *chain) {
                reports.push(ChainReport { chain: *chain, events: 0, last: anchor.clone(), error: None });
            }
        }
        Ok(reports)
    }

    /// Where retention may cut each chain: the last of its oldest events (at most `cap` per
    /// chain) whose time is before `before`. A chain is cut as a prefix, so it stays a chain;
    /// an event out of time order ends the prefix early.
    pub fn prune_points(&self, before: u64, cap: usize) -> io::Result<Vec<PrunePoint>> {
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let Some(table) = self.events_table(&txn)? else { return Ok(Vec::new()) };
        let mut points = Vec::new();
        let mut next_chain = Some(0u64);
        while let Some(start) = next_chain {
            let mut point: Option<PrunePoint> = None;
            let mut chain_key = None;
            for (taken, row) in table.range((start, 0)..).map_err(|e| self.err(e))?.enumerate() {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let key = k.value();
                if *chain_key.get_or_insert(key.0) != key.0 {
                    break;
                }
                let event = self.decode(key, v.value())?;
                if event.body().time >= before || taken == cap {
                    break;
                }
                point = Some(PrunePoint { chain: chain_of_key(key.0), seq: key.1, hash: event.hash.clone() });
            }
            points.extend(point);
            next_chain = chain_key.and_then(|k| k.checked_add(1));
        }
        Ok(points)
    }

    /// Carries out a prune applied at log entry `index`: writes each chain's events up to its
    /// point to `archive_dir/audit-INDEX.jsonl` (fsynced), then deletes them and their index
    /// entries. Replayed after a crash, it finds what the first run already deleted gone and
    /// writes the same file again. An event at a point whose hash differs from the point's
    /// means this replica's audit log diverged: an error, and the node stops.
    pub(crate) fn prune(&self, points: &[PrunePoint], archive_dir: &Path, index: u64) -> io::Result<usize> {
        let mut txn = self.db.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None).map_err(|e| self.err(e))?;
        let mut doomed = Vec::new();
        {
            let table = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            for point in points {
                let key = chain_key(point.chain);
                for row in table.range((key, 0)..=(key, point.seq)).map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    let event = self.decode(k.value(), v.value())?;
                    if event.body().seq == point.seq && event.hash != point.hash {
                        return Err(self.err(format!(
                            "retention names event {} of {} with hash {}, but this node holds {}: its audit log \
                             diverged from the cluster's; move the data directory aside and let the node rejoin",
                            point.seq, point.chain, point.hash, event.hash
                        )));
                    }
                    doomed.push(event);
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        write_archive(&archive_dir.join(format!("audit-{index}.jsonl")), &doomed)?;
        LIVE.write(&txn, &doomed, Change::Remove).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(doomed.len())
    }
}

/// Writes pruned events as JSON lines (each the event as stored: body bytes, link, hash),
/// replacing the file atomically and durably, 0600 in a 0700 directory.
fn write_archive(path: &Path, events: &[AuditEvent]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let err = |what: &str, e: &dyn std::fmt::Display| io::Error::other(format!("{what} {}: {e}", path.display()));
    crate::files::create_private_dir(dir).map_err(|e| err("cannot create the directory of", &e))?;
    crate::files::replace_durably(path, &path.with_extension("jsonl.new"), |out| {
        for event in events {
            serde_json::to_writer(&mut *out, event)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use citadel_core::audit::{AuditBody, AuditLog, GENESIS};

    use super::*;

    fn store() -> (tempfile::TempDir, AuditStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join(crate::DB_FILE)).unwrap();
        (dir, AuditStore::new(Arc::new(db)))
    }

    /// Node 1's spool chain: event `seq` at time `seq`, by `user{seq % 2}` on `secret/data/{seq % 3}`.
    fn spool_chain(n: u64) -> Vec<AuditEvent> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let body = AuditBody {
                    node: 1,
                    seq,
                    time: seq,
                    user: format!("user{}", seq % 2),
                    path: format!("secret/data/{}", seq % 3),
                    ..AuditBody::default()
                };
                let event = AuditEvent::seal(body, &prev);
                prev = event.hash.clone();
                event
            })
            .collect()
    }

    fn seqs(events: &[AuditEvent]) -> Vec<u64> {
        events.iter().map(|e| e.body().seq).collect()
    }

    #[test]
    fn events_stored_again_by_a_replay_change_nothing() {
        let (_dir, store) = store();
        let events = spool_chain(5);
        store.store(&events, 7, false, false).unwrap();
        store.store(&events[2..], 7, false, false).unwrap();
        let all = AuditQuery { limit: 100, ..AuditQuery::default() };
        assert_eq!(seqs(&store.query(&all).unwrap()), [1, 2, 3, 4, 5]);
        let report = &store.verify(&BTreeMap::new()).unwrap()[0];
        assert_eq!((report.chain, report.events, report.last.seq, report.error.clone()), (Chain::Node(1), 5, 5, None));
        assert_eq!(store.applied().unwrap(), 7);
    }

    #[test]
    fn a_query_reads_only_what_matches_every_filter_newest_first_up_to_its_limit() {
        let (_dir, store) = store();
        store.store(&spool_chain(30), 30, false, false).unwrap();
        let query = |q: AuditQuery| seqs(&store.query(&AuditQuery { limit: q.limit.max(1), ..q }).unwrap());
        let by_user = query(AuditQuery { user: Some("user1".into()), limit: 3, ..AuditQuery::default() });
        assert_eq!(by_user, [25, 27, 29], "the newest three, oldest first");
        let by_path = query(AuditQuery { path: Some("secret/data/2".into()), limit: 2, ..AuditQuery::default() });
        assert_eq!(by_path, [26, 29]);
        let prefix = query(AuditQuery { path: Some("secret/".into()), since: 28, limit: 10, ..AuditQuery::default() });
        assert_eq!(prefix, [28, 29, 30]);
        let both = query(AuditQuery {
            user: Some("user0".into()),
            path: Some("secret/data/0".into()),
            limit: 10,
            ..AuditQuery::default()
        });
        assert_eq!(both, [6, 12, 18, 24, 30]);
        assert_eq!(query(AuditQuery { node: Some(1), since: 29, limit: 10, ..AuditQuery::default() }), [29, 30]);
        assert!(query(AuditQuery { node: Some(2), limit: 10, ..AuditQuery::default() }).is_empty());
    }

    #[test]
    fn a_received_snapshot_replaces_the_stored_events_whole() {
        let (_dir, store) = store();
        store.store(&spool_chain(9), 9, false, false).unwrap();
        store.store(&spool_chain(4), 4, true, true).unwrap();
        let all = store.query(&AuditQuery { limit: 100, ..AuditQuery::default() }).unwrap();
        assert_eq!(seqs(&all), [1, 2, 3, 4]);
        let by_user = store.query(&AuditQuery { user: Some("user1".into()), limit: 100, ..AuditQuery::default() });
        assert_eq!(seqs(&by_user.unwrap()), [1, 3], "the indexes were replaced too");
    }

    #[test]
    fn a_damaged_event_is_refused_naming_the_file_the_chain_and_the_sequence_and_verify_reports_it() {
        let (_dir, store) = store();
        let mut log = AuditLog::default();
        log.ship(spool_chain(3)).unwrap();
        store.store(&log.take_unstored(), 3, true, false).unwrap();
        let txn = store.db.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(EVENTS).unwrap();
            let bytes = table.get((1, 2)).unwrap().unwrap().value().to_vec();
            let forged = String::from_utf8(bytes).unwrap().replace("secret/data/2", "secret/data/9");
            table.insert((1, 2), forged.as_bytes()).unwrap();
        }
        txn.commit().unwrap();
        let err = store.query(&AuditQuery { limit: 10, ..AuditQuery::default() }).unwrap_err().to_string();
        assert!(err.contains(crate::DB_FILE) && err.contains("audit event 2 of node 1's chain"), "{err}");
        let report = &store.verify(&BTreeMap::new()).unwrap()[0];
        assert_eq!(report.events, 3);
        assert!(report.error.as_deref().is_some_and(|e| e.contains("sequence 2")), "{report:?}");
    }

    #[test]
    fn retention_cuts_each_chain_at_its_oldest_prefix_and_archives_before_it_deletes() {
        let (dir, store) = store();
        let events = spool_chain(10);
        store.store(&events, 10, false, false).unwrap();
        let points = store.prune_points(5, 100).unwrap();
        let expected = PrunePoint { chain: Chain::Node(1), seq: 4, hash: events[3].hash.clone() };
        assert_eq!(points, std::slice::from_ref(&expected), "events at times 1 to 4 are before 5");
        assert_eq!(store.prune_points(5, 2).unwrap()[0].seq, 2, "at most `cap` per run");

        let archive = dir.path().join("audit-archive");
        assert_eq!(store.prune(&points, &archive, 42).unwrap(), 4);
        let file = archive.join("audit-42.jsonl");
        let archived: Vec<AuditEvent> =
            std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(archived, events[..4]);
        let all = store.query(&AuditQuery { limit: 100, ..AuditQuery::default() }).unwrap();
        assert_eq!(seqs(&all), [5, 6, 7, 8, 9, 10]);
        let by_user = store.query(&AuditQuery { user: Some("user1".into()), limit: 100, ..Default::default() });
        assert_eq!(seqs(&by_user.unwrap()), [5, 7, 9], "index entries went with their events");
        let anchors = BTreeMap::from([(Chain::Node(1), ChainTip { seq: 4, hash: events[3].hash.clone() })]);
        let report = &store.verify(&anchors).unwrap()[0];
        assert_eq!((report.events, report.last.seq, report.error.clone()), (6, 10, None));

        // Replayed after a crash: nothing left to delete, the archive stays as written.
        assert_eq!(store.prune(&points, &archive, 42).unwrap(), 0);
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 4);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_prune_naming_an_event_this_replica_holds_differently_stops_it_and_deletes_nothing() {
        let (dir, store) = store();
        store.store(&spool_chain(3), 3, false, false).unwrap();
        let point = PrunePoint { chain: Chain::Node(1), seq: 2, hash: "not-this-one".into() };
        let err = store.prune(&[point], &dir.path().join("a"), 7).unwrap_err().to_string();
        assert!(err.contains("diverged") && err.contains(crate::DB_FILE), "{err}");
        assert_eq!(store.query(&AuditQuery { limit: 10, ..Default::default() }).unwrap().len(), 3);
        assert!(!dir.path().join("a").exists(), "no archive was written");
    }
}
