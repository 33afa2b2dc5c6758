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

use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;

use citadel_core::audit::{chain_hash, AuditEvent, Chain, ChainTip, ChainVerifier};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;
use crate::db::{Db, META};

/// (chain, sequence) → the sealed event's JSON. The log chain is chain 0 (node ids start at 1).
const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("audit_events");
/// (time, chain, sequence).
const BY_TIME: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("audit_by_time");
/// (node that accepted the request, time, chain, sequence).
const BY_NODE: TableDefinition<(u64, u64, u64, u64), ()> = TableDefinition::new("audit_by_node");
const BY_USER: TableDefinition<(&str, u64, u64, u64), ()> = TableDefinition::new("audit_by_user");
const BY_PATH: TableDefinition<(&str, u64, u64, u64), ()> = TableDefinition::new("audit_by_path");

/// The applied index the store's contents cover, in `META`, written with every batch.
const KEY_APPLIED: &str = "audit_applied";

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
        let mut txn = self.db.db.begin_write().map_err(|e| self.err(e))?;
        let durability = if durable { Durability::Immediate } else { Durability::None };
        txn.set_durability(durability).map_err(|e| self.err(e))?;
        let write = |txn: &redb::WriteTransaction| -> Result<(), redb::Error> {
            if replace {
                txn.delete_table(EVENTS)?;
                txn.delete_table(BY_TIME)?;
                txn.delete_table(BY_NODE)?;
                txn.delete_table(BY_USER)?;
                txn.delete_table(BY_PATH)?;
            }
            let mut table = txn.open_table(EVENTS)?;
            let mut by_time = txn.open_table(BY_TIME)?;
            let mut by_node = txn.open_table(BY_NODE)?;
            let mut by_user = txn.open_table(BY_USER)?;
            let mut by_path = txn.open_table(BY_PATH)?;
            for event in events {
                let body = event.body();
                let (chain, seq, time) = (chain_key(Chain::of(event)), body.seq, body.time);
                let json = serde_json::to_vec(event).expect("an audit event serializes");
                table.insert((chain, seq), json.as_slice())?;
                by_time.insert((time, chain, seq), ())?;
                by_node.insert((body.node, time, chain, seq), ())?;
                by_user.insert((body.user.as_str(), time, chain, seq), ())?;
                by_path.insert((body.path.as_str(), time, chain, seq), ())?;
            }
            txn.open_table(META)?.insert(KEY_APPLIED, codec::encode(&applied).as_slice())?;
            Ok(())
        };
        write(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Makes every commit so far durable (one fsync).
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut txn = self.db.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
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

    /// The events of `chain` with sequence 1 to `up_to`, in order: a snapshot's full form.
    pub(crate) fn chain_events(&self, chain: Chain, up_to: u64) -> io::Result<Vec<AuditEvent>> {
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let key = chain_key(chain);
        let mut events = Vec::new();
        for row in table.range((key, 1)..=(key, up_to)).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            events.push(self.decode(k.value(), v.value())?);
        }
        Ok(events)
    }

    /// The newest `query.limit` events matching `query`, oldest first (by time, node, the log
    /// chain before a spool chain, sequence). Reads the most selective index: user, node, path,
    /// else time.
    pub fn query(&self, query: &AuditQuery) -> io::Result<Vec<AuditEvent>> {
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let events = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
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

    /// Verifies every chain the store holds from its first event, one event at a time.
    pub fn verify(&self) -> io::Result<Vec<ChainReport>> {
        let txn = self.db.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut reports: Vec<ChainReport> = Vec::new();
        let mut verifier: Option<ChainVerifier> = None;
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let key = k.value();
            let chain = chain_of_key(key.0);
            if reports.last().is_none_or(|r| r.chain != chain) {
                reports.push(ChainReport { chain, events: 0, last: ChainTip::default(), error: None });
                verifier = Some(ChainVerifier::new(chain));
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
        Ok(reports)
    }
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
        let report = &store.verify().unwrap()[0];
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
        let report = &store.verify().unwrap()[0];
        assert_eq!(report.events, 3);
        assert!(report.error.as_deref().is_some_and(|e| e.contains("sequence 2")), "{report:?}");
    }
}
