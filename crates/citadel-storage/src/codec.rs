//! Citadel's own on-disk records: `[format: u8][checksum: 8 bytes of SHA-256][body]`.
//!
//! The body is JSON (format 1) or postcard (format 2). Binary bodies are for the records written
//! on every write, where JSON's base64 and text scanning showed in the profile (KV entries);
//! everything else stays readable JSON. `decode` reads either, so a store written before
//! binary bodies existed reads as it is and is rewritten entry by entry as entries change.
//!
//! openraft's structs are converted to the `Stored*` mirrors below before they touch disk, so
//! the disk format is ours to version. A record whose checksum does not verify is never decoded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use citadel_core::command::Command;
use citadel_core::state::State;
use citadel_core::token::{TokenEntry, User};
use openraft::entry::RaftEntry;
use openraft::EntryPayload;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::{Entry, LeaderId, LogId, Membership, NodeInfo, StoredMembership, Vote};

const RECORD_FORMAT_JSON: u8 = 1;
const RECORD_FORMAT_BINARY: u8 = 2;
const HEADER: usize = 9;

fn checksum(body: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(body);
    digest[..8].try_into().expect("8 bytes")
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    try_encode(value).expect("storage records serialize")
}

/// Encodes a record whose serialization may fail: one that reads the store as it is written
/// ([`crate::state_machine`]'s snapshots).
pub fn try_encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    Ok(framed(RECORD_FORMAT_JSON, &body))
}

/// Encodes a record with a postcard body (format 2). Only for types without serde attributes
/// that skip or default fields: postcard is not self-describing, so such a field would shift
/// every field after it.
pub fn encode_binary<T: Serialize>(value: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(value).expect("storage records serialize");
    framed(RECORD_FORMAT_BINARY, &body)
}

fn framed(format: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.push(format);
    out.extend_from_slice(&checksum(body));
    out.extend_from_slice(body);
    out
}

/// Decodes a record, verifying its format byte and checksum first. `what` names the record in
/// the error (e.g. "log entry 42").
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> io::Result<T> {
    let (format, body) = verified_body(bytes, what)?;
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"));
    let undecodable = |e: &dyn std::fmt::Display| bad(format!("undecodable record: {e}"));
    if format == RECORD_FORMAT_JSON {
        serde_json::from_slice(body).map_err(|e| undecodable(&e))
    } else {
        match postcard::take_from_bytes(body) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(bad(format!("{} bytes after the record", rest.len()))),
            Err(e) => Err(undecodable(&e)),
        }
    }
}

/// Checks a record's format byte and checksum without decoding it (a snapshot's bytes, handed
/// on whole and decoded later).
pub fn verify(bytes: &[u8], what: &str) -> io::Result<()> {
    verified_body(bytes, what).map(drop)
}

/// Checks a record of `len` bytes read from `reader`, as [`verify`] does, without holding it:
/// the checksum is computed as the body streams by. Returns the record's format.
pub fn verify_from(reader: &mut impl io::Read, len: u64, what: &str) -> io::Result<u8> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"));
    let mut header = [0; HEADER];
    if len < HEADER as u64 {
        return Err(bad("record is truncated".into()));
    }
    reader.read_exact(&mut header).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("record is truncated".into()),
        _ => bad(format!("cannot read the record: {e}")),
    })?;
    let format = known_format(header[0], what)?;
    let mut hasher = HashingWriter { out: &mut io::sink(), hasher: Sha256::new(), written: 0 };
    let body = len - HEADER as u64;
    let copied = io::copy(&mut reader.take(body), &mut hasher)?;
    if copied != body {
        return Err(bad("record is truncated".into()));
    }
    if hasher.hasher.finalize()[..HEADER - 1] != header[1..] {
        return Err(bad("checksum mismatch".into()));
    }
    Ok(format)
}

/// Decodes a JSON record from `reader`, which holds the record and nothing after it. The
/// checksum is not checked here: the caller verified it ([`verify_from`]) before trusting the
/// bytes, and a reader cannot be read twice.
pub fn decode_json_from<T: DeserializeOwned>(reader: impl io::Read, what: &str) -> io::Result<T> {
    decode_json_seed_from(reader, std::marker::PhantomData::<T>, what)
}

/// [`decode_json_from`] through a seed, which may act on the record as it is read.
fn decode_json_seed_from<S: for<'de> serde::de::DeserializeSeed<'de, Value = V>, V>(
    reader: impl io::Read,
    seed: S,
    what: &str,
) -> io::Result<V> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"));
    let mut reader = io::BufReader::with_capacity(1 << 16, reader);
    let mut header = [0; HEADER];
    reader.read_exact(&mut header).map_err(|e| bad(format!("cannot read the record: {e}")))?;
    if header[0] != RECORD_FORMAT_JSON {
        return Err(bad(format!("record format {} where a JSON record was expected", header[0])));
    }
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let value = seed.deserialize(&mut deserializer).map_err(|e| bad(format!("undecodable record: {e}")))?;
    deserializer.end().map_err(|e| bad(format!("undecodable record: {e}")))?;
    Ok(value)
}

/// Writes a JSON record of `value` to `out` as it serializes, so the encoded record is never
/// whole in memory: the checksum goes in last, over a placeholder.
pub fn write_record<W: io::Write + io::Seek>(out: &mut W, value: &impl Serialize) -> io::Result<()> {
    let start = out.stream_position()?;
    out.write_all(&[RECORD_FORMAT_JSON])?;
    out.write_all(&[0; HEADER - 1])?;
    let mut body = HashingWriter { out: &mut *out, hasher: Sha256::new(), written: 0 };
    serde_json::to_writer(&mut body, value).map_err(io::Error::other)?;
    let (digest, written) = (body.hasher.finalize(), body.written);
    out.seek(io::SeekFrom::Start(start + 1))?;
    out.write_all(&digest[..HEADER - 1])?;
    out.seek(io::SeekFrom::Start(start + HEADER as u64 + written))?;
    Ok(())
}

/// Passes bytes on, hashing and counting them.
struct HashingWriter<'a, W> {
    out: &'a mut W,
    hasher: Sha256,
    written: u64,
}

impl<W: io::Write> io::Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A record's format byte and body, once the format is known and the checksum verifies.
fn known_format(format: u8, what: &str) -> io::Result<u8> {
    match format {
        RECORD_FORMAT_JSON | RECORD_FORMAT_BINARY => Ok(format),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: unknown record format {format}"))),
    }
}

fn verified_body<'a>(bytes: &'a [u8], what: &str) -> io::Result<(u8, &'a [u8])> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"));
    if bytes.len() < HEADER {
        return Err(bad("record is truncated".into()));
    }
    let format = known_format(bytes[0], what)?;
    let body = &bytes[HEADER..];
    if checksum(body) != bytes[1..HEADER] {
        return Err(bad("checksum mismatch".into()));
    }
    Ok((format, body))
}

/// Ordered as openraft orders log ids: by leader (term, then node), then index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StoredLogId {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

impl From<&LogId> for StoredLogId {
    fn from(id: &LogId) -> Self {
        StoredLogId { term: id.leader_id.term, leader: id.leader_id.node_id, index: id.index }
    }
}

impl From<StoredLogId> for LogId {
    fn from(id: StoredLogId) -> Self {
        LogId::new(LeaderId { term: id.term, node_id: id.leader }, id.index)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVote {
    pub term: u64,
    pub node: u64,
    pub committed: bool,
}

impl From<&Vote> for StoredVote {
    fn from(v: &Vote) -> Self {
        StoredVote { term: v.leader_id.term, node: v.leader_id.node_id, committed: v.committed }
    }
}

/// Ordered as openraft orders votes (the log refuses a vote that goes back).
impl PartialOrd for StoredVote {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Vote::from(self.clone()).partial_cmp(&Vote::from(other.clone()))
    }
}

impl From<StoredVote> for Vote {
    fn from(v: StoredVote) -> Self {
        Vote { leader_id: LeaderId { term: v.term, node_id: v.node }, committed: v.committed }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMembershipConfig {
    pub configs: Vec<BTreeSet<u64>>,
    pub nodes: BTreeMap<u64, NodeInfo>,
}

impl From<&Membership> for StoredMembershipConfig {
    fn from(m: &Membership) -> Self {
        StoredMembershipConfig {
            configs: m.get_joint_config().clone(),
            nodes: m.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }
}

impl StoredMembershipConfig {
    pub fn into_membership(self) -> io::Result<Membership> {
        Membership::new(self.configs, self.nodes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("invalid stored membership: {e}")))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredPayload {
    Blank,
    Normal(Command),
    Membership(StoredMembershipConfig),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    pub log_id: StoredLogId,
    pub payload: StoredPayload,
}

impl From<&Entry> for StoredEntry {
    fn from(e: &Entry) -> Self {
        let payload = match &e.payload {
            EntryPayload::Blank => StoredPayload::Blank,
            EntryPayload::Normal(c) => StoredPayload::Normal(c.clone()),
            EntryPayload::Membership(m) => StoredPayload::Membership(m.into()),
        };
        StoredEntry { log_id: (&e.log_id).into(), payload }
    }
}

impl StoredEntry {
    pub fn into_entry(self) -> io::Result<Entry> {
        let log_id: LogId = self.log_id.into();
        Ok(match self.payload {
            StoredPayload::Blank => Entry::new_blank(log_id),
            StoredPayload::Normal(c) => Entry::new_normal(log_id, c),
            StoredPayload::Membership(m) => Entry::new_membership(log_id, m.into_membership()?),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMembershipState {
    pub log_id: Option<StoredLogId>,
    pub config: StoredMembershipConfig,
}

impl From<&StoredMembership> for StoredMembershipState {
    fn from(m: &StoredMembership) -> Self {
        StoredMembershipState { log_id: m.log_id().as_ref().map(Into::into), config: m.membership().into() }
    }
}

impl StoredMembershipState {
    pub fn into_stored(self) -> io::Result<StoredMembership> {
        Ok(StoredMembership::new(self.log_id.map(Into::into), self.config.into_membership()?))
    }
}

/// A state-machine snapshot: what was applied, up to where, under which membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub format: u32,
    pub last_applied: Option<StoredLogId>,
    pub membership: StoredMembershipState,
    /// From format 6 the state holds no secrets: they follow in `kv`. Older formats hold them
    /// in their mounts.
    pub state: State,
    /// From format 8 the state holds no tokens and no users: they are here, by key. Older
    /// formats hold them in the state.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenEntry>,
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    #[serde(default)]
    pub kv: Vec<crate::kv_table::StoredKvEntry>,
    /// Set in a snapshot sent to a follower (its transfer form): its secrets follow it as that
    /// many lines instead of being in `kv`. Never set in a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed_secrets: Option<u64>,
    /// Set in a snapshot sent to a follower by a node of protocol 11 or later: its tokens and
    /// users follow it as lines, before its secrets, instead of being in `tokens` and `users`.
    /// Never set in a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed_maps: Option<StreamedMaps>,
}

/// How many tokens and users follow a snapshot in transfer form, each as one line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamedMaps {
    pub tokens: u64,
    pub users: u64,
}

/// A token's line in a snapshot transfer, as sent (`token` is its record's JSON text).
#[derive(Serialize)]
pub(crate) struct TokenLineRef<'a> {
    pub key: &'a str,
    pub token: &'a serde_json::value::RawValue,
}

/// A token's line in a snapshot transfer, as received.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenLine {
    pub key: String,
    pub token: TokenEntry,
}

/// A user's line in a snapshot transfer, as sent.
#[derive(Serialize)]
pub(crate) struct UserLineRef<'a> {
    pub key: &'a str,
    pub user: &'a serde_json::value::RawValue,
}

/// A user's line in a snapshot transfer, as received.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserLine {
    pub key: String,
    pub user: User,
}

/// What a [`StoredSnapshot`] says of itself, decoded without building its state or its
/// secrets: the fields not named here are skipped as they are read. A snapshot for an operator
/// needs no more, and decoding a whole one held every secret a second time in memory. Skipping
/// needs a self-describing body: snapshot records are JSON (format 1), never postcard.
#[derive(Deserialize)]
pub struct StoredSnapshotSummary {
    pub last_applied: Option<StoredLogId>,
    pub membership: StoredMembershipState,
    pub state: StateSummary,
}

#[derive(Deserialize)]
pub struct StateSummary {
    pub cluster: Option<citadel_core::state::ClusterInfo>,
}

/// A [`StoredSnapshot`] with its secrets counted, not decoded: an operator's restore reads
/// the rest ([`decode_snapshot_head_from`]), then checks the secrets one at a time
/// ([`check_snapshot_secrets_from`]).
#[derive(Deserialize)]
pub(crate) struct StoredSnapshotCountedKv {
    pub last_applied: Option<StoredLogId>,
    pub state: State,
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenEntry>,
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    #[serde(default)]
    pub kv: Counted,
}

/// A [`StoredSnapshot`] with its tokens, users and secrets counted, not decoded: the first of
/// two reads of `snapshot.bin` when it is sent to a follower by a node of protocol 11 (whose
/// header says how many of each follow it) or rebuilds the store at a start. The second
/// ([`for_each_streamed`]) streams them.
#[derive(Deserialize)]
pub(crate) struct StoredSnapshotCounted {
    pub format: u32,
    pub last_applied: Option<StoredLogId>,
    pub membership: StoredMembershipState,
    pub state: State,
    #[serde(default)]
    pub tokens: CountedMap,
    #[serde(default)]
    pub users: CountedMap,
    #[serde(default)]
    pub kv: Counted,
}

/// The length of a sequence, its elements skipped as they are read.
#[derive(Default)]
pub(crate) struct Counted(pub u64);

/// The length of a map, its entries skipped as they are read.
#[derive(Default)]
pub(crate) struct CountedMap(pub u64);

impl<'de> Deserialize<'de> for CountedMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = CountedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<CountedMap, A::Error> {
                let mut count = 0;
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(CountedMap(count))
            }
        }
        deserializer.deserialize_map(Counter)
    }
}

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = Counted;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Counted, A::Error> {
                let mut count = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(Counted(count))
            }
        }
        deserializer.deserialize_seq(Counter)
    }
}

/// Reads a snapshot record (JSON, its checksum verified by the caller) from `reader` and calls
/// `line` with each of its secrets (`kv`), one at a time, decoded as `T` (a `Box<RawValue>`
/// passes its JSON text on): neither the record nor its secrets are ever whole in memory.
/// Everything else is skipped as it is read. Returns how many secrets it passed on.
pub(crate) fn for_each_secret<T: DeserializeOwned>(
    reader: impl io::Read,
    what: &str,
    line: &mut dyn FnMut(T) -> io::Result<()>,
) -> io::Result<u64> {
    for_each_streamed(reader, what, &mut |_, _, _| Ok(()), line)
}

/// One of a snapshot record's stored maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapField {
    Tokens,
    Users,
}

/// Like [`for_each_secret`], and calls `entry` with each token and user (`tokens`, `users`),
/// one at a time, as its key and its JSON text, in the record's order. Returns how many
/// secrets it passed on.
pub(crate) fn for_each_streamed<T: DeserializeOwned>(
    reader: impl io::Read,
    what: &str,
    entry: &mut dyn FnMut(MapField, &str, &serde_json::value::RawValue) -> io::Result<()>,
    line: &mut dyn FnMut(T) -> io::Result<()>,
) -> io::Result<u64> {
    use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// The record's map, its `tokens`, `users` and `kv` passed on and every other field skipped.
    struct Record<'a, T> {
        entry: &'a mut dyn FnMut(MapField, &str, &serde_json::value::RawValue) -> io::Result<()>,
        line: &'a mut dyn FnMut(T) -> io::Result<()>,
        /// Why a callback stopped the read: returned rather than the parser's wording of it.
        stopped: &'a mut Option<io::Error>,
    }
    impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Record<'_, T> {
        type Value = u64;
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
            deserializer.deserialize_map(self)
        }
    }
    impl<'de, T: DeserializeOwned> Visitor<'de> for Record<'_, T> {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a snapshot record")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
            let mut passed = 0;
            while let Some(key) = map.next_key::<String>()? {
                let field = match key.as_str() {
                    "tokens" => MapField::Tokens,
                    "users" => MapField::Users,
                    "kv" => {
                        passed = map.next_value_seed(Secrets { line: &mut *self.line, stopped: &mut *self.stopped })?;
                        continue;
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                map.next_value_seed(Entries { field, entry: &mut *self.entry, stopped: &mut *self.stopped })?;
            }
            Ok(passed)
        }
    }
    struct Entries<'a> {
        field: MapField,
        entry: &'a mut dyn FnMut(MapField, &str, &serde_json::value::RawValue) -> io::Result<()>,
        stopped: &'a mut Option<io::Error>,
    }
    impl<'de> DeserializeSeed<'de> for Entries<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Entries<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of key to entry")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value::<Box<serde_json::value::RawValue>>()?;
                if let Err(e) = (self.entry)(self.field, &key, &value) {
                    *self.stopped = Some(e);
                    return Err(A::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
    struct Secrets<'a, T> {
        line: &'a mut dyn FnMut(T) -> io::Result<()>,
        stopped: &'a mut Option<io::Error>,
    }
    impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Secrets<'_, T> {
        type Value = u64;
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
            deserializer.deserialize_seq(self)
        }
    }
    impl<'de, T: DeserializeOwned> Visitor<'de> for Secrets<'_, T> {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a sequence of secrets")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
            let mut passed = 0;
            while let Some(secret) = seq.next_element::<T>()? {
                if let Err(e) = (self.line)(secret) {
                    *self.stopped = Some(e);
                    return Err(A::Error::custom("stopped"));
                }
                passed += 1;
            }
            Ok(passed)
        }
    }

    let mut stopped = None;
    let passed = decode_json_seed_from(reader, Record { entry, line, stopped: &mut stopped }, what);
    match stopped {
        Some(e) => Err(e),
        None => passed,
    }
}

/// What a snapshot record holds beside its secrets, decoded from a reader
/// ([`decode_snapshot_head_from`]).
pub struct SnapshotHead {
    pub last_applied: Option<StoredLogId>,
    pub state: State,
    /// How many secrets follow the state (counted, not decoded).
    pub secrets: u64,
}

/// Decodes a snapshot record read from `reader` (its checksum verified by the caller), all but
/// its secrets, which are counted and skipped: [`check_snapshot_secrets_from`] decodes them.
pub fn decode_snapshot_head_from(reader: impl io::Read, what: &str) -> io::Result<SnapshotHead> {
    let mut counted: StoredSnapshotCountedKv = decode_json_from(reader, what)?;
    with_stored_maps(&mut counted.state, counted.tokens, counted.users)?;
    Ok(SnapshotHead { last_applied: counted.last_applied, state: counted.state, secrets: counted.kv.0 })
}

/// Puts a snapshot's tokens and users (format 8: beside its state) in its state. Refuses a
/// snapshot that has either in both places: no build writes one.
pub(crate) fn with_stored_maps(
    state: &mut State,
    tokens: BTreeMap<String, TokenEntry>,
    users: BTreeMap<String, User>,
) -> io::Result<()> {
    let both = |what: &str| {
        io::Error::new(io::ErrorKind::InvalidData, format!("the snapshot holds {what} both in its state and beside it"))
    };
    if !tokens.is_empty() {
        if !state.tokens.is_empty() {
            return Err(both("tokens"));
        }
        state.tokens = tokens.into();
    }
    if !users.is_empty() {
        if !state.users.is_empty() {
            return Err(both("users"));
        }
        state.users = users.into();
    }
    Ok(())
}

/// Decodes every secret of a snapshot record read from `reader`, one at a time, as a restore
/// would, holding none of them: whether they all decode, and how many there are.
pub fn check_snapshot_secrets_from(reader: impl io::Read, what: &str) -> io::Result<u64> {
    for_each_secret::<crate::kv_table::StoredKvEntry>(reader, what, &mut |_| Ok(()))
}

/// A [`StoredSnapshot`] as written, borrowing its state (without tokens and users), with its
/// tokens and users from anywhere that serializes as a map of key to [`TokenEntry`] or [`User`],
/// and its secrets from anywhere that serializes as a sequence of
/// [`crate::kv_table::StoredKvEntry`] (a store being read).
#[derive(Serialize)]
pub(crate) struct StoredSnapshotRef<'a, T: Serialize, U: Serialize, K: Serialize> {
    pub format: u32,
    pub last_applied: Option<StoredLogId>,
    pub membership: StoredMembershipState,
    pub state: &'a State,
    pub tokens: T,
    pub users: U,
    pub kv: K,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_secrets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_maps: Option<StreamedMaps>,
}

impl StoredSnapshot {
    /// The state with its tokens, its users and every secret in its mount, as a state without a store holds it (a
    /// restore proposes it whole; tools count it). Refuses a secret of a mount it lacks.
    pub fn into_whole_state(self) -> io::Result<State> {
        let mut state = self.state;
        with_stored_maps(&mut state, self.tokens, self.users)?;
        for stored in self.kv {
            let mount = state.mounts.get_mut(&stored.mount).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the snapshot holds a secret of {}, which is not one of its mounts", stored.mount),
                )
            })?;
            mount.kv.entries.insert(stored.path, stored.entry);
        }
        Ok(state)
    }
}

/// Which node a data directory belongs to, and in which format it was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: u64,
    pub format: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshots_tokens_and_users_beside_its_state_join_it_and_either_in_both_places_is_refused() {
        let token = |hash: &str| TokenEntry { hash: hash.into(), ..TokenEntry::default() };
        let user = |name: &str| User {
            username: name.into(),
            password_hash: String::new(),
            policies: vec![],
            token_ttl_secs: 0,
            token_max_ttl_secs: 0,
        };
        let tokens = BTreeMap::from([("a".to_string(), token("a"))]);
        let users = BTreeMap::from([("ann".to_string(), user("ann"))]);
        let mut state = State::default();
        with_stored_maps(&mut state, tokens.clone(), users.clone()).unwrap();
        assert_eq!((&*state.tokens, &*state.users), (&tokens, &users));
        let err = with_stored_maps(&mut state, tokens.clone(), BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("tokens both in its state and beside it"), "{err}");
        let err = with_stored_maps(&mut state, BTreeMap::new(), users.clone()).unwrap_err();
        assert!(err.to_string().contains("users both in its state and beside it"), "{err}");
        with_stored_maps(&mut state, BTreeMap::new(), BTreeMap::new()).unwrap();
        assert_eq!((&*state.tokens, &*state.users), (&tokens, &users), "nothing beside leaves the state's own");
    }

    #[test]
    fn records_round_trip() {
        let id = StoredLogId { term: 3, leader: 1, index: 9 };
        let bytes = encode(&id);
        assert_eq!(decode::<StoredLogId>(&bytes, "x").unwrap(), id);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let bytes = encode(&StoredLogId { term: 3, leader: 1, index: 9 });
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x20;
            assert!(decode::<StoredLogId>(&damaged, "log entry 9").is_err(), "flip at byte {i} went unnoticed");
        }
        let err = decode::<StoredLogId>(&bytes[..4], "log entry 9").unwrap_err();
        assert!(err.to_string().contains("log entry 9"));
    }

    #[test]
    fn a_snapshots_summary_reads_its_position_membership_and_cluster_past_its_secrets() {
        let mut state = State::default();
        state.cluster =
            Some(citadel_core::state::ClusterInfo { id: "c1".into(), name: "citadel".into(), initialized_at: 1 });
        let membership = StoredMembershipState {
            log_id: Some(StoredLogId { term: 2, leader: 1, index: 4 }),
            config: StoredMembershipConfig { configs: vec![BTreeSet::from([1, 2, 3])], nodes: BTreeMap::new() },
        };
        let kv = (0..3)
            .map(|i| crate::kv_table::StoredKvEntry { mount: "secret/".into(), path: format!("p{i}"), entry: secret() })
            .collect();
        let snapshot = StoredSnapshot {
            format: 6,
            last_applied: Some(StoredLogId { term: 2, leader: 1, index: 9 }),
            membership: membership.clone(),
            state,
            tokens: Default::default(),
            users: Default::default(),
            kv,
            streamed_secrets: None,
            streamed_maps: None,
        };
        let record = encode(&snapshot);
        let from_bytes: StoredSnapshotSummary = decode(&record, "snapshot").unwrap();
        let from_reader: StoredSnapshotSummary = decode_json_from(&record[..], "snapshot").unwrap();
        for summary in [from_bytes, from_reader] {
            assert_eq!(summary.last_applied, snapshot.last_applied);
            assert_eq!(summary.membership, membership);
            assert_eq!(summary.state.cluster.map(|c| c.id), Some("c1".to_string()));
        }
    }

    #[test]
    fn a_snapshots_secrets_are_counted_then_read_one_at_a_time_as_their_text() {
        let kv: Vec<_> = (0..3)
            .map(|i| crate::kv_table::StoredKvEntry { mount: "secret/".into(), path: format!("p{i}"), entry: secret() })
            .collect();
        let snapshot = StoredSnapshot {
            format: 6,
            last_applied: Some(StoredLogId { term: 2, leader: 1, index: 9 }),
            membership: StoredMembershipState {
                log_id: None,
                config: StoredMembershipConfig { configs: vec![], nodes: BTreeMap::new() },
            },
            state: State::default(),
            tokens: Default::default(),
            users: Default::default(),
            kv: kv.clone(),
            streamed_secrets: None,
            streamed_maps: None,
        };
        let record = encode(&snapshot);
        let counted: StoredSnapshotCountedKv = decode_json_from(&record[..], "snapshot").unwrap();
        assert_eq!((counted.kv.0, counted.last_applied), (3, snapshot.last_applied));
        let mut lines = Vec::new();
        let passed = for_each_secret(&record[..], "snapshot", &mut |secret: Box<serde_json::value::RawValue>| {
            lines.push(serde_json::from_str::<crate::kv_table::StoredKvEntry>(secret.get()).unwrap());
            Ok(())
        });
        assert_eq!((passed.unwrap(), lines), (3, kv));
        let mut seen = 0;
        let stopped = for_each_secret(&record[..], "snapshot", &mut |_: crate::kv_table::StoredKvEntry| {
            seen += 1;
            Err(io::Error::other("the transfer was abandoned"))
        });
        assert_eq!((stopped.unwrap_err().to_string(), seen), ("the transfer was abandoned".to_string(), 1));
        assert_eq!(check_snapshot_secrets_from(&record[..], "snapshot").unwrap(), 3);
        let head = decode_snapshot_head_from(&record[..], "snapshot").unwrap();
        assert_eq!((head.secrets, head.last_applied), (3, snapshot.last_applied));
        let cut = check_snapshot_secrets_from(&record[..record.len() - 3], "snapshot").unwrap_err();
        assert!(cut.to_string().starts_with("snapshot: undecodable record"), "{cut}");
    }

    #[test]
    fn a_record_verified_as_it_streams_by_is_refused_when_flipped_or_cut_naming_it() {
        for record in [encode(&StoredLogId { term: 3, leader: 1, index: 9 }), encode_binary(&secret())] {
            let len = record.len() as u64;
            assert_eq!(verify_from(&mut &record[..], len, "snapshot.bin").unwrap(), record[0]);
            for i in 0..record.len() {
                let mut damaged = record.clone();
                damaged[i] ^= 0x20;
                let err = verify_from(&mut &damaged[..], len, "snapshot.bin").unwrap_err();
                assert!(err.to_string().contains("snapshot.bin"), "flip at byte {i}: {err}");
            }
            for cut in [0, 5, record.len() - 1] {
                let err = verify_from(&mut &record[..cut], len, "snapshot.bin").unwrap_err();
                assert!(err.to_string().contains("snapshot.bin: record is truncated"), "cut to {cut}: {err}");
            }
        }
        let binary = encode_binary(&secret());
        let err = decode_json_from::<StoredLogId>(&binary[..], "snapshot.bin").unwrap_err();
        assert!(err.to_string().contains("record format 2 where a JSON record was expected"), "{err}");
    }

    fn secret() -> citadel_core::kv::KvEntry {
        let version = |n: u8| citadel_core::kv::KvVersion {
            created: u64::from(n),
            deletion_time: (n == 2).then_some(9),
            destroyed: n == 3,
            ciphertext: vec![n; 40],
        };
        citadel_core::kv::KvEntry {
            current_version: 3,
            custom_metadata: [("owner".to_string(), "ops".to_string())].into(),
            versions: (1..=3).map(|n| (u64::from(n), version(n))).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn binary_records_round_trip_with_bytes_as_they_are_and_json_records_still_decode() {
        let binary = encode_binary(&secret());
        assert_eq!(binary[0], RECORD_FORMAT_BINARY);
        assert!(!String::from_utf8_lossy(&binary).contains("AQEBAQ"), "ciphertext is not base64 in a binary record");
        assert_eq!(decode::<citadel_core::kv::KvEntry>(&binary, "x").unwrap(), secret());
        let json = encode(&secret());
        assert_eq!(json[0], RECORD_FORMAT_JSON);
        assert!(binary.len() < json.len(), "{} vs {} bytes", binary.len(), json.len());
        assert_eq!(decode::<citadel_core::kv::KvEntry>(&json, "x").unwrap(), secret(), "what earlier builds wrote");
    }

    #[test]
    fn a_binary_record_flipped_cut_or_extended_is_refused_naming_it() {
        let bytes = encode_binary(&secret());
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x20;
            assert!(decode::<citadel_core::kv::KvEntry>(&damaged, "s").is_err(), "flip at byte {i} went unnoticed");
        }
        // A body that checks but holds more or less than one record (a bug, not bit rot).
        let mut body = postcard::to_allocvec(&secret()).unwrap();
        body.push(0);
        let err =
            decode::<citadel_core::kv::KvEntry>(&framed(RECORD_FORMAT_BINARY, &body), "the secret a").unwrap_err();
        assert!(err.to_string().contains("the secret a: 1 bytes after the record"), "{err}");
        body.truncate(body.len() - 10);
        let err =
            decode::<citadel_core::kv::KvEntry>(&framed(RECORD_FORMAT_BINARY, &body), "the secret a").unwrap_err();
        assert!(err.to_string().contains("the secret a: undecodable record"), "{err}");
    }
}
