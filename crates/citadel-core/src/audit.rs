//! Audit events and the per-node hash chain that makes tampering and loss detectable.
//!
//! Each node numbers its events 1, 2, 3 … and links each to the previous one by hash:
//! `hash = SHA-256(prev_hash || body bytes)`, where the body bytes are the event's canonical
//! JSON exactly as it was first serialized and as it is stored, shipped and snapshotted
//! (`AuditEvent::raw`). Verification hashes those stored bytes and never re-serializes a parsed
//! body, so a field added to `AuditBody` later (or removed, or reordered) cannot change the hash
//! of an event written before (§9.3). The replicated audit log accepts a node's events only in
//! sequence and only if the link holds, and ignores a sequence number it already has, so
//! shipping is idempotent: at least once on the wire, exactly once in the log.
//!
//! A write's event may instead ride inside the write's own Raft entry (`Command::Audited`,
//! §1.4, §9.3). Those events form one more chain, the cluster's *log chain*
//! ([`LogChain`]): `apply` numbers them 1, 2, 3 … in log order and links them as above, so every
//! replica builds the same bytes. Their body says `"chain": "log"`, keeps the accepting node in
//! `node`, and takes its `seq` from the log chain, never from the node's spool.

use std::collections::{BTreeMap, HashMap, VecDeque};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::{NodeId, UnixMillis};

/// The `prev_hash` of a node's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `chain` of an event numbered by `apply` in the cluster's log chain.
pub const LOG_CHAIN: &str = "log";

/// How many of the log chain's latest events `apply` searches for an envelope's request id
/// before recording it: a proposal retried after an ambiguous failure (its first attempt
/// committed, the answer was lost) must not record its request twice. Retries come within
/// seconds, far fewer entries than this apart on any cluster Citadel targets; past the window a
/// retry records a second event (a duplicate, never a loss).
pub const REQUEST_ID_WINDOW: usize = 1024;

/// What an event says. Parsed leniently from the stored bytes (a field missing from an older
/// event takes its default; a field unknown to this build is ignored but kept in the bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditBody {
    pub node: NodeId,
    pub seq: u64,
    pub time: UnixMillis,
    /// The id the client got back with its answer (`request_id`, `X-Citadel-Request-Id`), so
    /// an answer can be matched to its event.
    pub request_id: String,
    /// `request`, `login`, `seal`, `ha`, `cluster_event`.
    pub kind: String,
    pub operation: String,
    pub path: String,
    /// Username or token display name: who acted, never a credential.
    pub user: String,
    /// HMAC of the client token, so events from one token can be correlated without revealing it.
    pub token_hmac: String,
    pub remote_addr: String,
    pub status: u16,
    pub error: String,
    /// Only on `refusal_summary` events: many refusals from one source, counted. Absent from
    /// every other event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<RefusalSummary>,
    /// Only on `cluster_event` events: what changed (e.g. `term 7, leader 2`), never a secret.
    /// Absent from every other event, so their encoding (and chain hash) is what it always was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// [`LOG_CHAIN`] on an event that rode inside its write's Raft entry: `seq` is then its
    /// place in the cluster's log chain, given by `apply`. Absent from spool events (numbered
    /// per node), so their encoding and chain hash are what they always were.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain: String,
    /// On a spool event only: the request's command was proposed carrying its event, but this
    /// node answered before learning whether it committed (a timeout, a lost leader). This event
    /// records the answer the client got; if the command committed after all, the log chain also
    /// holds the command's own event, with its outcome, under the same request id. Absent
    /// otherwise, so other events encode (and hash) as they always did.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outcome_unknown: bool,
}

/// Refusals of one reason from one source address within one interval (§8.3): a flood of
/// unauthenticated requests is recorded as a count instead of one replicated event each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalSummary {
    /// Why the requests were refused, e.g. `no_valid_token`, `unknown_user`.
    pub reason: String,
    pub count: u64,
    pub first: UnixMillis,
    pub last: UnixMillis,
    /// The first few paths refused (capped in length).
    pub sample_paths: Vec<String>,
}

/// A sealed event: the body's stored bytes, what they say, and the link.
///
/// Encoded as `{"body": "<the body's JSON, as a string>", "prev_hash", "hash"}`: a JSON string
/// carries the bytes unchanged through any re-encoding of the record around it. `body()` is a
/// view parsed from those bytes for readers; nothing hashes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    raw: String,
    body: AuditBody,
    pub prev_hash: String,
    pub hash: String,
}

/// Cuts `text` to at most `max` bytes (at a character boundary) and says how much was cut, so a
/// truncated path or message in an audit event cannot be mistaken for the real one.
pub fn cap_for_audit(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated {} bytes]", &text[..end], text.len() - end)
}

pub fn chain_hash(prev_hash: &str, body_bytes: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(prev_hash.as_bytes());
    digest.update(body_bytes);
    hex::encode(digest.finalize())
}

impl AuditEvent {
    /// Serializes `body` once, for good: these bytes are what is stored and hashed.
    pub fn seal(body: AuditBody, prev_hash: &str) -> AuditEvent {
        let raw = serde_json::to_string(&body).expect("audit body serializes");
        let hash = chain_hash(prev_hash, raw.as_bytes());
        AuditEvent { raw, body, prev_hash: prev_hash.to_string(), hash }
    }

    /// An event from its stored parts. Fails only if `raw` is not a JSON object of a body; the
    /// link is not checked here (that is `verify_chain`'s and `AuditLog::ship`'s job).
    pub fn from_parts(raw: String, prev_hash: String, hash: String) -> Result<AuditEvent, serde_json::Error> {
        let body = serde_json::from_str(&raw)?;
        Ok(AuditEvent { raw, body, prev_hash, hash })
    }

    pub fn body(&self) -> &AuditBody {
        &self.body
    }

    /// The body's bytes exactly as stored: what the hash covers.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The event as the API shows it: the stored body's fields (including any this build does
    /// not know) with `prev_hash` and `hash` beside them.
    pub fn view(&self) -> serde_json::Value {
        let mut map = match serde_json::from_str::<serde_json::Value>(&self.raw) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        map.insert("prev_hash".into(), self.prev_hash.clone().into());
        map.insert("hash".into(), self.hash.clone().into());
        serde_json::Value::Object(map)
    }
}

#[derive(Serialize)]
struct EventOut<'a> {
    body: &'a str,
    prev_hash: &'a str,
    hash: &'a str,
}

#[derive(Deserialize)]
struct EventIn {
    body: Option<String>,
    prev_hash: String,
    hash: String,
    /// Storage format 1 (before the bytes were kept) flattened the body's fields here.
    #[serde(flatten)]
    legacy: serde_json::Map<String, serde_json::Value>,
}

impl Serialize for AuditEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EventOut { body: &self.raw, prev_hash: &self.prev_hash, hash: &self.hash }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for AuditEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wire = EventIn::deserialize(deserializer)?;
        let raw = match wire.body {
            Some(raw) => raw,
            // Format 1 stored the parsed fields, and hashed `serde_json::to_vec` of the body
            // struct of that build, which is the struct above with every field present: its
            // serialization now is exactly the bytes that were hashed then. Migrating them
            // once, here, keeps every format 1 chain verifiable; from then on the bytes are kept.
            None => {
                let body: AuditBody = serde_json::from_value(serde_json::Value::Object(wire.legacy))
                    .map_err(|e| D::Error::custom(format!("audit event (format 1): {e}")))?;
                serde_json::to_string(&body).map_err(D::Error::custom)?
            }
        };
        AuditEvent::from_parts(raw, wire.prev_hash, wire.hash)
            .map_err(|e| D::Error::custom(format!("audit event body is not an event: {e}")))
    }
}

/// HMAC of a sensitive string, in Vault's `hmac-sha256:` form.
pub fn hmac_string(audit_hmac_key: &[u8], value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(audit_hmac_key).expect("HMAC accepts any key length");
    mac.update(value.as_bytes());
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ChainError {
    #[error("node {node}: expected sequence {expected}, found {found}")]
    Gap { node: NodeId, expected: u64, found: u64 },
    #[error("node {node} sequence {seq}: previous-hash link is broken")]
    BrokenLink { node: NodeId, seq: u64 },
    #[error("node {node} sequence {seq}: hash does not match the event (tampered)")]
    Tampered { node: NodeId, seq: u64 },
    #[error("event from node {found} in the chain of node {node}")]
    WrongNode { node: NodeId, found: NodeId },
    #[error("log chain: expected sequence {expected}, found {found}")]
    LogGap { expected: u64, found: u64 },
    #[error("log chain sequence {seq}: previous-hash link is broken")]
    LogBrokenLink { seq: u64 },
    #[error("log chain sequence {seq}: hash does not match the event (tampered)")]
    LogTampered { seq: u64 },
    #[error("log chain sequence {seq}: the event is not marked as the log chain's")]
    NotInLogChain { seq: u64 },
    #[error("cannot prune {chain} through sequence {seq}: it ends at {last}")]
    PruneBeyondTip { chain: String, seq: u64, last: u64 },
    #[error("a prune names {chain} twice")]
    PruneRepeated { chain: String },
}

/// Retention's cut in one chain: every event up to and including `seq`, whose hash is
/// `hash`, leaves the audit store for an archive file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunePoint {
    pub chain: Chain,
    pub seq: u64,
    pub hash: String,
}

/// Where a chain stands after the events a node's audit store already holds: the last one's
/// sequence and hash. The events themselves live on disk, not in the replicated state in
/// memory (§9.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainTip {
    pub seq: u64,
    pub hash: String,
}

impl Default for ChainTip {
    fn default() -> Self {
        ChainTip { seq: 0, hash: GENESIS.to_string() }
    }
}

impl ChainTip {
    fn of(event: &AuditEvent) -> ChainTip {
        ChainTip { seq: event.body().seq, hash: event.hash.clone() }
    }

    pub fn is_genesis(&self) -> bool {
        self.seq == 0
    }
}

/// One node's chain as replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeChain {
    /// Events applied but not yet handed to the audit store ([`AuditLog::take_unstored`]). In a
    /// snapshot's full form (and in every snapshot of format 4 and older), the whole chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<AuditEvent>,
    /// The last event handed to the audit store.
    #[serde(default, skip_serializing_if = "ChainTip::is_genesis")]
    pub stored: ChainTip,
    /// The last event pruned by retention (and archived): the chain's retained events link
    /// to it.
    #[serde(default, skip_serializing_if = "ChainTip::is_genesis")]
    pub pruned: ChainTip,
}

impl NodeChain {
    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(self.stored.seq, |e| e.body().seq)
    }

    pub fn last_hash(&self) -> &str {
        self.events.last().map_or(self.stored.hash.as_str(), |e| e.hash.as_str())
    }

    /// Appends `event` if it is the next link; returns `Ok(false)` for an already-held sequence.
    pub fn append(&mut self, node: NodeId, event: AuditEvent) -> Result<bool, ChainError> {
        if event.body().node != node {
            return Err(ChainError::WrongNode { node, found: event.body().node });
        }
        let expected = self.last_seq() + 1;
        if event.body().seq < expected {
            return Ok(false);
        }
        if event.body().seq > expected {
            return Err(ChainError::Gap { node, expected, found: event.body().seq });
        }
        check_link(self.last_hash(), &event)?;
        self.events.push(event);
        Ok(true)
    }
}

/// Which chain an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Chain {
    /// A node's spool chain, shipped.
    Node(NodeId),
    /// The cluster's log chain.
    Log,
}

impl Chain {
    pub fn of(event: &AuditEvent) -> Chain {
        if event.body().chain == LOG_CHAIN {
            Chain::Log
        } else {
            Chain::Node(event.body().node)
        }
    }
}

impl std::fmt::Display for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chain::Node(node) => write!(f, "node {node}'s chain"),
            Chain::Log => f.write_str("the log chain"),
        }
    }
}

/// Checks one chain an event at a time, in order from its first event: a store verifies a
/// chain of any length without holding it in memory.
pub struct ChainVerifier {
    chain: Chain,
    last: ChainTip,
}

impl ChainVerifier {
    pub fn new(chain: Chain) -> ChainVerifier {
        ChainVerifier { chain, last: ChainTip::default() }
    }

    /// Starts after `anchor`, the last event retention pruned: the next must link to it.
    pub fn after(chain: Chain, anchor: ChainTip) -> ChainVerifier {
        ChainVerifier { chain, last: anchor }
    }

    /// Checks that `event` is the next one of the chain: its sequence, its link, its hash.
    pub fn check(&mut self, event: &AuditEvent) -> Result<(), ChainError> {
        let expected = self.last.seq + 1;
        let seq = event.body().seq;
        match self.chain {
            Chain::Node(node) => {
                if event.body().node != node {
                    return Err(ChainError::WrongNode { node, found: event.body().node });
                }
                if seq != expected {
                    return Err(ChainError::Gap { node, expected, found: seq });
                }
                check_link(&self.last.hash, event)?;
            }
            Chain::Log => {
                if seq != expected {
                    return Err(ChainError::LogGap { expected, found: seq });
                }
                if event.body().chain != LOG_CHAIN {
                    return Err(ChainError::NotInLogChain { seq });
                }
                if event.prev_hash != self.last.hash {
                    return Err(ChainError::LogBrokenLink { seq });
                }
                if chain_hash(&self.last.hash, event.raw.as_bytes()) != event.hash {
                    return Err(ChainError::LogTampered { seq });
                }
            }
        }
        self.last = ChainTip::of(event);
        Ok(())
    }

    /// The last event checked (genesis before the first).
    pub fn last(&self) -> &ChainTip {
        &self.last
    }
}

fn check_link(prev_hash: &str, event: &AuditEvent) -> Result<(), ChainError> {
    let (node, seq) = (event.body().node, event.body().seq);
    if event.prev_hash != prev_hash {
        return Err(ChainError::BrokenLink { node, seq });
    }
    if chain_hash(prev_hash, event.raw.as_bytes()) != event.hash {
        return Err(ChainError::Tampered { node, seq });
    }
    Ok(())
}

/// Verifies a sequence of events from one node, starting at sequence 1.
pub fn verify_chain(node: NodeId, events: &[AuditEvent]) -> Result<(), ChainError> {
    let mut verifier = ChainVerifier::new(Chain::Node(node));
    events.iter().try_for_each(|e| verifier.check(e))
}

/// Checks archive files' events chain by chain (§9.3). Files are read oldest first, and each
/// chain's events must continue where the file before left them. A chain's first archived
/// event links to genesis if it is the chain's first; otherwise an older archive held what it
/// links to, and its link is taken as given.
#[derive(Default)]
pub struct ArchiveCheck {
    chains: BTreeMap<Chain, (u64, ChainVerifier)>,
}

impl ArchiveCheck {
    pub fn add(&mut self, event: &AuditEvent) -> Result<(), ChainError> {
        let chain = Chain::of(event);
        let (_, verifier) = self.chains.entry(chain).or_insert_with(|| {
            let seq = event.body().seq;
            let anchor = match seq {
                0 | 1 => ChainTip::default(),
                _ => ChainTip { seq: seq - 1, hash: event.prev_hash.clone() },
            };
            (seq, ChainVerifier::after(chain, anchor))
        });
        verifier.check(event)
    }

    /// Each chain archived: its first sequence and its last event.
    pub fn chains(&self) -> impl Iterator<Item = (Chain, u64, &ChainTip)> {
        self.chains.iter().map(|(chain, (first, verifier))| (*chain, *first, verifier.last()))
    }
}

/// The cluster's log chain: the events that rode inside their write's Raft entry, numbered and
/// linked by `apply` in log order. One chain for the whole cluster, because only the log orders
/// entries from every node: a per-node numbering would need each node's last sequence at
/// propose time, which a follower cannot know before the leader orders its entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "LogChainFields")]
pub struct LogChain {
    /// As [`NodeChain::events`]: not yet in the audit store, or, in a full snapshot, all.
    /// Appended to by [`LogChain::record`] alone, which keeps the request window in step
    /// (crate-visible for the tests that tamper with a chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) events: Vec<AuditEvent>,
    #[serde(default, skip_serializing_if = "ChainTip::is_genesis")]
    pub stored: ChainTip,
    /// As [`NodeChain::pruned`].
    #[serde(default, skip_serializing_if = "ChainTip::is_genesis")]
    pub pruned: ChainTip,
    /// The request ids of the latest stored events (at most [`REQUEST_ID_WINDOW`], oldest
    /// first), so a retried proposal is still recognised once its event has left memory.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    recent_requests: VecDeque<String>,
    /// The ids of the latest [`REQUEST_ID_WINDOW`] events, stored or not: derived from
    /// `recent_requests` and `events` (rebuilt when a chain is decoded), never encoded.
    #[serde(skip)]
    window: RequestWindow,
}

/// Equal chains hold the same events and ids; the window follows from them.
impl PartialEq for LogChain {
    fn eq(&self, other: &Self) -> bool {
        (&self.events, &self.stored, &self.pruned, &self.recent_requests)
            == (&other.events, &other.stored, &other.pruned, &other.recent_requests)
    }
}

impl Eq for LogChain {}

/// [`LogChain`] as encoded: everything but the window, which decoding rebuilds.
#[derive(Deserialize)]
struct LogChainFields {
    #[serde(default)]
    events: Vec<AuditEvent>,
    #[serde(default)]
    stored: ChainTip,
    #[serde(default)]
    pruned: ChainTip,
    #[serde(default)]
    recent_requests: VecDeque<String>,
}

impl From<LogChainFields> for LogChain {
    fn from(fields: LogChainFields) -> Self {
        let LogChainFields { events, stored, pruned, recent_requests } = fields;
        let mut chain = LogChain { events, stored, pruned, recent_requests, window: RequestWindow::default() };
        let total = chain.ids_len();
        for i in total.saturating_sub(REQUEST_ID_WINDOW)..total {
            chain.window.add(id_at(&chain.recent_requests, &chain.events, i));
        }
        chain
    }
}

/// The request ids of the log chain's latest [`REQUEST_ID_WINDOW`] events, counted: `apply`
/// asks whether an envelope is a retry on every write, and scanning the window showed in the
/// profile (1 to 3 % of a node's CPU).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RequestWindow {
    counts: HashMap<String, u32>,
    len: usize,
}

impl RequestWindow {
    fn add(&mut self, id: &str) {
        *self.counts.entry(id.to_owned()).or_default() += 1;
        self.len += 1;
    }

    fn remove(&mut self, id: &str) {
        let count = self.counts.get_mut(id).expect("an id leaving the request window is in it");
        *count -= 1;
        if *count == 0 {
            self.counts.remove(id);
        }
        self.len -= 1;
    }

    fn holds(&self, id: &str) -> bool {
        self.counts.contains_key(id)
    }
}

/// The `i`th request id of the chain, oldest first: the stored ones, then those in memory.
fn id_at<'a>(stored: &'a VecDeque<String>, events: &'a [AuditEvent], i: usize) -> &'a str {
    match stored.get(i) {
        Some(id) => id,
        None => &events[i - stored.len()].body().request_id,
    }
}

impl LogChain {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.stored.is_genesis()
    }

    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(self.stored.seq, |e| e.body().seq)
    }

    pub fn last_hash(&self) -> &str {
        self.events.last().map_or(self.stored.hash.as_str(), |e| e.hash.as_str())
    }

    /// How many request ids the chain remembers, stored and in memory.
    fn ids_len(&self) -> usize {
        self.recent_requests.len() + self.events.len()
    }

    /// Whether one of the latest [`REQUEST_ID_WINDOW`] events belongs to `request_id`. The
    /// answer does not depend on when events were handed to the store: the window runs over
    /// the stored events' ids and then the events in memory.
    pub fn holds_recent_request(&self, request_id: &str) -> bool {
        !request_id.is_empty() && self.window.holds(request_id)
    }

    /// Numbers `body` as the next event of the log chain, links it and appends it; returns
    /// `false`, appending nothing, if its request already has a recent event (a retried proposal).
    /// Deterministic: a pure function of the chain and the body.
    pub fn record(&mut self, mut body: AuditBody) -> bool {
        if self.holds_recent_request(&body.request_id) {
            return false;
        }
        body.chain = LOG_CHAIN.to_string();
        body.seq = self.last_seq() + 1;
        let event = AuditEvent::seal(body, self.last_hash());
        self.window.add(&event.body().request_id);
        self.events.push(event);
        let total = self.ids_len();
        if total > REQUEST_ID_WINDOW {
            self.window.remove(id_at(&self.recent_requests, &self.events, total - REQUEST_ID_WINDOW - 1));
        }
        assert_eq!(self.window.len, total.min(REQUEST_ID_WINDOW), "the request window covers the latest events");
        true
    }

    /// Verifies the events in memory as the whole chain from sequence 1, hashing the stored
    /// bytes (a full snapshot's chain; the audit store verifies its own).
    pub fn verify(&self) -> Result<(), ChainError> {
        let mut verifier = ChainVerifier::after(Chain::Log, self.pruned.clone());
        self.events.iter().try_for_each(|e| verifier.check(e))
    }
}

/// The replicated audit log: one chain per node (its spool, shipped), and the cluster's log
/// chain (events carried inside their write's Raft entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    pub chains: BTreeMap<NodeId, NodeChain>,
    /// Absent from the encoding while empty, so a state that never held one encodes as before.
    #[serde(default, skip_serializing_if = "LogChain::is_empty")]
    pub log: LogChain,
    /// Prunes applied but not yet carried out by the audit store ([`AuditLog::take_prunes`]).
    #[serde(skip)]
    pub prunes: Vec<PrunePoint>,
}

impl AuditLog {
    /// Appends a shipped batch all or nothing: every event is checked against the chain tips
    /// (as they will be after the events before it) before any is appended, so a batch with a
    /// gap or a broken link anywhere is refused whole and changes nothing. Events already held
    /// are skipped (shipping is at least once). Returns how many were appended.
    pub fn ship(&mut self, events: Vec<AuditEvent>) -> Result<usize, ChainError> {
        let mut tips: BTreeMap<NodeId, (u64, String)> = BTreeMap::new();
        let mut accepted = Vec::with_capacity(events.len());
        for event in events {
            let node = event.body().node;
            let (last_seq, last_hash) = tips.entry(node).or_insert_with(|| {
                let chain = self.chains.get(&node);
                (chain.map_or(0, NodeChain::last_seq), chain.map_or(GENESIS, NodeChain::last_hash).to_string())
            });
            if event.body().seq <= *last_seq {
                continue;
            }
            // `seq > last_seq` here, so `last_seq + 1` cannot overflow.
            if event.body().seq != *last_seq + 1 {
                return Err(ChainError::Gap { node, expected: *last_seq + 1, found: event.body().seq });
            }
            check_link(last_hash, &event)?;
            *last_seq = event.body().seq;
            last_hash.clone_from(&event.hash);
            accepted.push(event);
        }
        let count = accepted.len();
        for event in accepted {
            self.chains.entry(event.body().node).or_default().events.push(event);
        }
        Ok(count)
    }

    /// Verifies every node's chain and the log chain; returns how many events they hold.
    pub fn verify(&self) -> Result<usize, ChainError> {
        let mut total = 0;
        for (node, chain) in &self.chains {
            let mut verifier = ChainVerifier::after(Chain::Node(*node), chain.pruned.clone());
            chain.events.iter().try_for_each(|e| verifier.check(e))?;
            total += chain.events.len();
        }
        self.log.verify()?;
        Ok(total + self.log.events.len())
    }

    /// Every event in memory, the nodes' chains first, then the log chain.
    pub fn events(&self) -> impl Iterator<Item = &AuditEvent> {
        self.chains.values().flat_map(|c| c.events.iter()).chain(self.log.events.iter())
    }

    /// Hands over the events applied since the last call, for the audit store, leaving each
    /// chain's tip in memory. Where the events are (memory or store) changes no decision
    /// `apply` makes, so replicas that hand them over at different times stay identical in
    /// everything they answer.
    pub fn take_unstored(&mut self) -> Vec<AuditEvent> {
        let mut taken = Vec::new();
        for chain in self.chains.values_mut() {
            if let Some(last) = chain.events.last() {
                chain.stored = ChainTip::of(last);
            }
            taken.append(&mut chain.events);
        }
        let log = &mut self.log;
        if let Some(last) = log.events.last() {
            log.stored = ChainTip::of(last);
        }
        for event in &log.events {
            log.recent_requests.push_back(event.body().request_id.clone());
        }
        let excess = log.recent_requests.len().saturating_sub(REQUEST_ID_WINDOW);
        log.recent_requests.drain(..excess);
        taken.append(&mut log.events);
        taken
    }

    /// Every chain's tip: the stored one when nothing waits in memory.
    pub fn tips(&self) -> impl Iterator<Item = (Chain, u64)> + '_ {
        let nodes = self.chains.iter().map(|(node, c)| (Chain::Node(*node), c.last_seq()));
        nodes.chain(std::iter::once((Chain::Log, self.log.last_seq())))
    }

    /// Every chain's retention anchor (genesis where nothing was pruned).
    pub fn anchors(&self) -> impl Iterator<Item = (Chain, &ChainTip)> + '_ {
        let nodes = self.chains.iter().map(|(node, c)| (Chain::Node(*node), &c.pruned));
        nodes.chain(std::iter::once((Chain::Log, &self.log.pruned)))
    }

    /// Moves each named chain's retention anchor forward to its point, for the audit store to
    /// archive and delete the events up to it. All or nothing: a point past its chain's end
    /// refuses the whole prune. A point at or behind its chain's anchor is skipped (a job's
    /// retried run). Returns how many chains moved.
    pub fn prune(&mut self, points: Vec<PrunePoint>) -> Result<usize, ChainError> {
        let mut seen = std::collections::BTreeSet::new();
        for point in &points {
            if !seen.insert(point.chain) {
                return Err(ChainError::PruneRepeated { chain: point.chain.to_string() });
            }
            let last = match point.chain {
                Chain::Log => self.log.last_seq(),
                Chain::Node(node) => self.chains.get(&node).map_or(0, NodeChain::last_seq),
            };
            if point.seq > last {
                return Err(ChainError::PruneBeyondTip { chain: point.chain.to_string(), seq: point.seq, last });
            }
        }
        let mut moved = 0;
        for point in points {
            let anchor = match point.chain {
                Chain::Log => &mut self.log.pruned,
                Chain::Node(node) => match self.chains.get_mut(&node) {
                    Some(chain) => &mut chain.pruned,
                    None => continue,
                },
            };
            if point.seq > anchor.seq {
                *anchor = ChainTip { seq: point.seq, hash: point.hash.clone() };
                self.prunes.push(point);
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Hands over the prunes applied since the last call, for the audit store.
    pub fn take_prunes(&mut self) -> Vec<PrunePoint> {
        std::mem::take(&mut self.prunes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(node: NodeId, n: u64) -> Vec<AuditEvent> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let body = AuditBody { node, seq, time: seq, path: format!("p{seq}"), ..AuditBody::default() };
                let event = AuditEvent::seal(body, &prev);
                prev = event.hash.clone();
                event
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify_chain(1, &chain(1, 5)), Ok(()));
    }

    /// Replaces `p3` with `forged` in event 3's stored bytes, keeping its hash and link.
    fn forge(event: &AuditEvent) -> AuditEvent {
        let raw = event.raw().replace("\"p3\"", "\"forged\"");
        AuditEvent::from_parts(raw, event.prev_hash.clone(), event.hash.clone()).unwrap()
    }

    #[test]
    fn editing_an_event_is_detected() {
        let mut events = chain(1, 5);
        events[2] = forge(&events[2]);
        assert_eq!(events[2].body().path, "forged");
        assert_eq!(verify_chain(1, &events), Err(ChainError::Tampered { node: 1, seq: 3 }));
    }

    #[test]
    fn removing_an_event_is_detected() {
        let mut events = chain(1, 5);
        events.remove(1);
        assert_eq!(verify_chain(1, &events), Err(ChainError::Gap { node: 1, expected: 2, found: 3 }));
    }

    #[test]
    fn rehashing_an_edited_event_breaks_the_next_link() {
        let mut events = chain(1, 5);
        events[2] = forge(&events[2]);
        events[2].hash = chain_hash(&events[2].prev_hash, events[2].raw().as_bytes());
        assert_eq!(verify_chain(1, &events), Err(ChainError::BrokenLink { node: 1, seq: 4 }));
    }

    #[test]
    fn shipping_is_idempotent_and_in_order() {
        let events = chain(7, 3);
        let mut log = NodeChain::default();
        assert_eq!(log.append(7, events[0].clone()), Ok(true));
        assert_eq!(log.append(7, events[0].clone()), Ok(false), "duplicate is ignored");
        assert_eq!(log.append(7, events[2].clone()), Err(ChainError::Gap { node: 7, expected: 2, found: 3 }));
        assert_eq!(log.append(7, events[1].clone()), Ok(true));
        assert_eq!(log.append(7, events[2].clone()), Ok(true));
        assert_eq!(log.last_seq(), 3);
        assert!(matches!(log.append(8, events[0].clone()), Err(ChainError::WrongNode { .. })));
    }

    #[test]
    fn a_batch_with_a_gap_is_refused_whole() {
        let events = chain(4, 3);
        let mut log = AuditLog::default();
        let batch = vec![events[0].clone(), events[2].clone()];
        assert_eq!(log.ship(batch), Err(ChainError::Gap { node: 4, expected: 2, found: 3 }));
        assert_eq!(log, AuditLog::default(), "the valid first event was not appended either");
        assert_eq!(log.ship(events.clone()), Ok(3));
        assert_eq!(log.ship(events), Ok(0), "a re-shipped batch is skipped");
        assert_eq!(log.verify(), Ok(3));
    }

    fn log_body(request_id: String) -> AuditBody {
        AuditBody { node: 1, time: 5, request_id, ..AuditBody::default() }
    }

    #[test]
    fn events_handed_to_the_store_leave_tips_that_the_next_event_links_to() {
        let mut log = AuditLog::default();
        assert_eq!(log.ship(chain(3, 2)), Ok(2));
        assert!(log.log.record(log_body("a".into())));
        let mut stored = log.take_unstored();
        assert_eq!(stored.len(), 3);
        assert!(log.events().next().is_none(), "nothing left in memory");
        assert_eq!((log.chains[&3].last_seq(), log.log.last_seq()), (2, 1));
        assert_eq!(log.ship(chain(3, 3)), Ok(1), "shipping resumes after the stored tip");
        assert!(log.log.record(log_body("b".into())));
        stored.extend(log.take_unstored());
        let mut node_chain = ChainVerifier::new(Chain::Node(3));
        let mut log_chain = ChainVerifier::new(Chain::Log);
        for event in &stored {
            let verifier = if Chain::of(event) == Chain::Log { &mut log_chain } else { &mut node_chain };
            assert_eq!(verifier.check(event), Ok(()), "{event:?}");
        }
        assert_eq!((node_chain.last().seq, log_chain.last().seq), (3, 2));
        assert_eq!(log.chains[&3].last_hash(), node_chain.last().hash);
    }

    #[test]
    fn whether_a_request_is_recent_does_not_depend_on_when_events_were_stored() {
        let (mut kept, mut stored) = (AuditLog::default(), AuditLog::default());
        let n = REQUEST_ID_WINDOW + 10;
        for i in 0..n {
            assert!(kept.log.record(log_body(format!("r{i}"))));
            assert!(stored.log.record(log_body(format!("r{i}"))));
            if i % 7 == 0 {
                stored.take_unstored();
            }
        }
        assert!(stored.log.recent_requests.len() <= REQUEST_ID_WINDOW);
        assert_eq!(stored.log.window, kept.log.window, "one window, whenever events were stored");
        for i in [0, 9, 10, 11, n - 1] {
            let id = format!("r{i}");
            assert_eq!(kept.log.holds_recent_request(&id), stored.log.holds_recent_request(&id), "{id}");
        }
        assert!(!stored.log.holds_recent_request("r9") && stored.log.holds_recent_request("r10"));
        assert!(!stored.log.record(log_body(format!("r{}", n - 1))), "a recent retry is still recognised");
    }

    /// The window as it was first written: a scan of the latest ids, newest first.
    fn scanned(recorded: &[String], request_id: &str) -> bool {
        !request_id.is_empty() && recorded.iter().rev().take(REQUEST_ID_WINDOW).any(|id| id == request_id)
    }

    #[test]
    fn the_request_window_answers_as_a_scan_of_the_latest_ids_whatever_the_store_timing_and_repeats() {
        let mut log = AuditLog::default();
        let mut recorded: Vec<String> = Vec::new();
        // Ids recur (i % 1500) so that some come back after leaving the window, and one is empty.
        for i in 0..3 * REQUEST_ID_WINDOW {
            let id = if i % 997 == 5 { String::new() } else { format!("req-{}", i % 1500) };
            let fresh = !scanned(&recorded, &id);
            assert_eq!(log.log.record(log_body(id.clone())), fresh, "request {i} ({id:?})");
            if fresh {
                recorded.push(id);
            }
            if i % 13 == 0 {
                log.take_unstored();
            }
            if i % 211 == 0 {
                for probe in [format!("req-{}", i % 1500), format!("req-{}", (i + 700) % 1500), String::new()] {
                    assert_eq!(log.log.holds_recent_request(&probe), scanned(&recorded, &probe), "{probe:?} at {i}");
                }
            }
        }
    }

    #[test]
    fn a_decoded_log_chain_recognises_the_same_recent_requests_as_the_one_encoded() {
        let mut log = AuditLog::default();
        for i in 0..REQUEST_ID_WINDOW + 50 {
            assert!(log.log.record(log_body(format!("r{i}"))));
            if i == REQUEST_ID_WINDOW / 2 {
                log.take_unstored();
            }
        }
        let decoded: AuditLog = serde_json::from_slice(&serde_json::to_vec(&log).unwrap()).unwrap();
        assert_eq!(decoded, log);
        assert_eq!(
            decoded.log.window, log.log.window,
            "the rebuilt window equals the one kept up as events were recorded"
        );
        for id in ["r0", "r49", "r50", "r600", &format!("r{}", REQUEST_ID_WINDOW + 49)] {
            assert_eq!(decoded.log.holds_recent_request(id), log.log.holds_recent_request(id), "{id}");
        }
        assert!(!decoded.log.holds_recent_request("r49") && decoded.log.holds_recent_request("r50"));
    }

    #[test]
    fn a_format_4_chain_holding_its_events_reads_as_events_not_yet_stored() {
        let events = chain(2, 3);
        let old = serde_json::json!({ "chains": { "2": { "events": events } } });
        let mut log: AuditLog = serde_json::from_value(old).unwrap();
        assert_eq!(log.verify(), Ok(3));
        assert_eq!(log.take_unstored(), events);
        assert_eq!(log.chains[&2].stored, ChainTip { seq: 3, hash: events[2].hash.clone() });
    }

    #[test]
    fn a_prune_moves_anchors_and_refuses_a_point_past_a_chain_end_changing_nothing() {
        let events = chain(2, 5);
        let mut log = AuditLog::default();
        log.ship(events.clone()).unwrap();
        log.take_unstored();
        let point = |seq: u64| PrunePoint { chain: Chain::Node(2), seq, hash: events[seq as usize - 1].hash.clone() };
        let past = PrunePoint { chain: Chain::Node(2), seq: 6, hash: String::new() };
        let before = log.clone();
        assert!(matches!(log.prune(vec![past]), Err(ChainError::PruneBeyondTip { seq: 6, last: 5, .. })));
        let twice = vec![point(2), point(3)];
        assert!(matches!(log.prune(twice), Err(ChainError::PruneRepeated { .. })));
        assert_eq!(log, before, "a refused prune changes nothing");

        assert_eq!(log.prune(vec![point(3)]), Ok(1));
        assert_eq!(log.take_prunes(), vec![point(3)]);
        assert_eq!(log.prune(vec![point(2)]), Ok(0), "a point behind the anchor is skipped");
        assert!(log.take_prunes().is_empty());
        // A full snapshot after the prune holds events 4 and 5, which verify from the anchor.
        log.chains.get_mut(&2).unwrap().events = events[3..].to_vec();
        assert_eq!(log.verify(), Ok(2));
        log.chains.get_mut(&2).unwrap().events = events[2..].to_vec();
        assert!(log.verify().is_err(), "an event at or before the anchor does not continue the chain");
    }

    #[test]
    fn archives_are_checked_link_by_link_across_files_and_a_gap_is_named() {
        let events = chain(1, 6);
        let mut check = ArchiveCheck::default();
        events[..3].iter().chain(&events[3..]).try_for_each(|e| check.add(e)).unwrap();
        let (chain, first, last) = check.chains().next().unwrap();
        assert_eq!((chain, first, last.seq, last.hash.as_str()), (Chain::Node(1), 1, 6, events[5].hash.as_str()));

        let mut later_only = ArchiveCheck::default();
        assert_eq!(events[2..].iter().try_for_each(|e| later_only.add(e)), Ok(()), "an archive may start mid-chain");
        let mut gap = ArchiveCheck::default();
        let err = [&events[0], &events[2]].into_iter().try_for_each(|e| gap.add(e)).unwrap_err();
        assert_eq!(err, ChainError::Gap { node: 1, expected: 2, found: 3 });
        let mut forged = ArchiveCheck::default();
        let err = [events[0].clone(), events[1].clone(), forge(&events[2])].iter().try_for_each(|e| forged.add(e));
        assert_eq!(err, Err(ChainError::Tampered { node: 1, seq: 3 }));
    }

    #[test]
    fn sensitive_strings_are_hmacd() {
        let h = hmac_string(b"key", "s3cret-token");
        assert!(h.starts_with("hmac-sha256:"));
        assert!(!h.contains("s3cret"));
    }

    /// Stores events as the spool and the state do (one JSON record each), from body bytes
    /// written by an "older build": one lacks `request_id` and `summary`, one carries a field
    /// this build does not know.
    fn stored_chain_from_bodies(bodies: &[&str]) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        bodies
            .iter()
            .map(|raw| {
                let hash = chain_hash(&prev, raw.as_bytes());
                let line = serde_json::json!({ "body": raw, "prev_hash": prev, "hash": hash }).to_string();
                prev = hash;
                line
            })
            .collect()
    }

    const OLD_BODIES: [&str; 3] = [
        r#"{"node":1,"seq":1,"time":10,"kind":"request","operation":"read","path":"secret/data/a","user":"root","token_hmac":"","remote_addr":"","status":200,"error":""}"#,
        r#"{"node":1,"seq":2,"time":11,"kind":"request","operation":"update","path":"secret/data/b","user":"ops","token_hmac":"","remote_addr":"","status":204,"error":"","added_later":{"x":1}}"#,
        r#"{"seq":3,"node":1,"time":12,"kind":"login","path":"auth/userpass/login/ops"}"#,
    ];

    #[test]
    fn a_chain_written_before_a_field_was_added_still_verifies() {
        let lines = stored_chain_from_bodies(&OLD_BODIES);
        let events: Vec<AuditEvent> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(verify_chain(1, &events), Ok(()));
        assert_eq!(events[1].body().user, "ops", "the parsed view reads the fields it knows");
        assert_eq!(events[0].body().request_id, "", "a missing field takes its default");
        // Shipped, snapshotted and read back: the bytes travel unchanged, unknown field included.
        let mut log = AuditLog::default();
        assert_eq!(log.ship(events.clone()), Ok(3));
        let restored: AuditLog = serde_json::from_slice(&serde_json::to_vec(&log).unwrap()).unwrap();
        assert_eq!(restored.verify(), Ok(3));
        assert_eq!(restored.chains[&1].events[1].raw(), OLD_BODIES[1]);
        assert_eq!(restored.chains[&1].events[1].view()["added_later"]["x"], 1);
    }

    #[test]
    fn a_flipped_byte_in_a_stored_event_fails_verification_naming_the_event() {
        let mut lines = stored_chain_from_bodies(&OLD_BODIES);
        // "secret/data/b" becomes "secret/data/c" in event 2's stored bytes.
        lines[1] = lines[1].replacen("secret/data/b", "secret/data/c", 1);
        let events: Vec<AuditEvent> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let err = verify_chain(1, &events).unwrap_err();
        assert_eq!(err, ChainError::Tampered { node: 1, seq: 2 });
        assert!(err.to_string().contains("node 1 sequence 2"), "{err}");
    }

    #[test]
    fn format_1_events_are_migrated_and_still_verify() {
        // Format 1 flattened the body beside its link and hashed the struct's serialization.
        let sealed = chain(2, 2);
        let legacy: Vec<String> = sealed
            .iter()
            .map(|e| {
                let mut map = serde_json::to_value(e.body()).unwrap();
                map["prev_hash"] = e.prev_hash.clone().into();
                map["hash"] = e.hash.clone().into();
                map.to_string()
            })
            .collect();
        let events: Vec<AuditEvent> = legacy.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(verify_chain(2, &events), Ok(()));
        assert_eq!(events, sealed);
    }
}
