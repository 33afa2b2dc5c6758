//! The state machine: `citadel_core::state::State` in memory without its secrets and its
//! audit events, which live on disk beside it ([`crate::kv_table`], [`AuditStore`]).
//!
//! What stays in memory: mounts, policies, chain tips, the alert outbox, each bounded. The tokens
//! and users live in tables of their own (`map_tables.rs`). Each batch of entries loads the
//! secrets, users and tokens its commands touch, applies under the state's write lock, writes
//! the secrets, tokens and users it changed and the events it sealed in one redb transaction
//! that records the applied index, and forgets what it loaded. Readers take the shared lock and read the
//! store through a read transaction opened under it, so a reader never sees a state whose
//! secrets or events are not yet stored.
//!
//! Durability: the batch commits are not fsynced one by one (the Raft log is durable and
//! replays them). At least once a second, and before every snapshot, a commit is made durable,
//! and every durable commit also saves the state in memory as of that commit (`KEY_STATE`).
//! After a crash redb is back at its last durable commit, where the secrets, the audit events
//! and the saved state agree; the node starts from there and Raft replays the rest. Replaying
//! onto a store that is ahead of the state in memory would not converge (a write's version
//! depends on what it finds). A durable commit made elsewhere (the staging of a received
//! snapshot) or redb's clean close can leave the store ahead of the saved state: the start sees
//! that the applied indexes differ and rebuilds from the snapshot.
//!
//! A snapshot (`snapshot.bin`, what openraft sends and an operator saves) holds the state and,
//! beside it, every token and every secret (`StoredSnapshot::tokens`, `kv`), streamed out of
//! read transactions, and each audit chain's tip, not its events. Sent to a follower, its state
//! and tokens go first, then its secrets and events, one per line ([`StateReader::write_transfer`]); the follower checks and stages
//! them as they arrive ([`SnapshotReceiver`]) and installs them with the state in one commit.
//! A start that rebuilds the store from `snapshot.bin` stages its tokens, users and secrets
//! from the file one at a time too (its events are in the store already).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use citadel_core::audit::{Chain, ChainTip, ChainVerifier};
use citadel_core::command::Response;
use citadel_core::state::State;
use citadel_core::stored_map::StoredChanges;
use citadel_core::token::{TokenEntry, User, UserRead};
use citadel_core::token_table::TokenRead;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;

use crate::audit_store::AuditStore;
use crate::codec::{self, StoredSnapshot, StoredSnapshotRef};
use crate::db::{Db, META};
use crate::kv_table::{self, KvCache, KvView, StoredKvEntryRef};
use crate::map_tables::{StoredEntries, TokenCache, TokensView, UsersView, TOKENS, USERS};
use crate::snapshot_file::{SnapshotFile, SnapshotHeader, SnapshotRecordFile, StoredSnapshotRecord};
use crate::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::StorageOpenError;

/// Where format 3 kept the snapshot, moved out at open.
const KEY_SNAPSHOT: &str = "snapshot";
/// The state in memory as of the last durable commit: a snapshot record without secrets.
const KEY_STATE: &str = "state";

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
/// The first storage format whose saved state leaves the tokens and the users in their tables.
const MAP_TABLES_FORMAT: u32 = 8;

/// The applied state as saved beside the tables at a durable commit.
/// Writes a saved state ([`saved_state`]) in `txn`.
fn put_saved_state(txn: &redb::WriteTransaction, saved: &[u8]) -> Result<(), redb::Error> {
    txn.open_table(META)?.insert(KEY_STATE, saved)?;
    Ok(())
}

/// Saves the state in a durable commit of its own (at stop, before a snapshot is built).
fn save_state(db: &Db, applied: &Applied) -> io::Result<()> {
    let saved = saved_state(applied);
    db.commit(true, |txn| put_saved_state(txn, &saved))
}

/// What the state's tokens and users changed since the last call, for their tables
/// ([`crate::map_tables`]); memory keeps none of them afterwards, so the state saved or copied
/// into a snapshot between batches holds neither.
fn take_stored_maps(state: &mut State) -> (StoredChanges<TokenEntry>, StoredChanges<User>) {
    let changes = (state.take_token_changes(), state.take_user_changes());
    state.forget_tokens();
    state.forget_users();
    changes
}

/// The state as saved beside the store: without tokens and users ([`take_stored_maps`]).
fn saved_state(applied: &Applied) -> Vec<u8> {
    assert!(
        applied.state.tokens.is_empty() && applied.state.users.is_empty(),
        "tokens and users are saved in their tables"
    );
    codec::encode(&StoredSnapshotRef {
        format: citadel_core::command::FORMAT_VERSION,
        last_applied: applied.last_applied.as_ref().map(Into::into),
        membership: (&applied.membership).into(),
        state: &applied.state,
        tokens: BTreeMap::<String, TokenEntry>::new(),
        users: BTreeMap::<String, User>::new(),
        kv: [(); 0],
        streamed_secrets: None,
        streamed_maps: None,
    })
}

/// Writes `snapshot.bin` for `meta`: `state` (without tokens and users), and every token, user
/// and secret of the store as `tables` and `secrets` read them, serialized into the file as
/// they are read.
fn write_local_snapshot(
    snapshots: &SnapshotFile,
    meta: &SnapshotMeta,
    state: &State,
    tables: &StoredTables<'_>,
    secrets: &KvView<'_>,
) -> io::Result<()> {
    assert!(state.tokens.is_empty() && state.users.is_empty(), "a snapshot's tokens and users come from the store");
    let header = SnapshotHeader {
        last_log_id: meta.last_log_id.as_ref().map(Into::into),
        membership: (&meta.last_membership).into(),
    };
    snapshots.write_streamed(
        &header,
        &StoredSnapshotRef {
            format: citadel_core::command::FORMAT_VERSION,
            last_applied: header.last_log_id,
            membership: header.membership.clone(),
            state,
            tokens: &tables.tokens,
            users: &tables.users,
            kv: StreamedKv(secrets),
            streamed_secrets: None,
            streamed_maps: None,
        },
    )
}

/// The token and user tables as of one commit, for a snapshot.
struct StoredTables<'a> {
    tokens: StoredEntries<'a, TokenEntry>,
    users: StoredEntries<'a, User>,
}

impl<'a> StoredTables<'a> {
    /// Opened under the state's lock, so that both are of the state's applied index.
    fn open(db: &'a Db) -> io::Result<Self> {
        Ok(StoredTables { tokens: TOKENS.snapshot(db)?, users: USERS.snapshot(db)? })
    }
}

/// Serializes every secret a view holds as a snapshot's `kv`, one entry at a time.
struct StreamedKv<'a>(&'a KvView<'a>);

impl serde::Serialize for StreamedKv<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = serializer.serialize_seq(None)?;
        self.0
            .for_each(&mut |mount, path, entry| {
                seq.serialize_element(&StoredKvEntryRef { mount, path, entry: &entry })
                    .map_err(|e| io::Error::other(e.to_string()))
            })
            .map_err(S::Error::custom)?;
        seq.end()
    }
}

/// What the store holds beside the state in memory, as of the state's applied index
/// ([`StateReader::read_with_store`]).
pub struct StoreView<'db> {
    pub kv: KvView<'db>,
    pub users: UsersView<'db>,
    pub tokens: TokensView<'db>,
}

impl TokenRead for StoreView<'_> {
    fn token(&self, key: &str) -> io::Result<Option<TokenEntry>> {
        self.tokens.token(key)
    }

    fn token_children(&self, parent: &str) -> io::Result<Vec<String>> {
        self.tokens.token_children(parent)
    }

    fn tokens_of_username(&self, username: &str) -> io::Result<Vec<String>> {
        self.tokens.tokens_of_username(username)
    }

    fn tokens_unusable_at(&self, now: citadel_core::UnixMillis) -> io::Result<Vec<String>> {
        self.tokens.tokens_unusable_at(now)
    }

    fn nth_token_end(&self, n: usize) -> io::Result<Option<citadel_core::UnixMillis>> {
        self.tokens.nth_token_end(n)
    }
}

impl citadel_core::kv::KvRead for StoreView<'_> {
    fn entry(&self, mount: &str, path: &str) -> io::Result<Option<citadel_core::kv::KvEntry>> {
        self.kv.entry(mount, path)
    }

    fn contains(&self, mount: &str, path: &str) -> io::Result<bool> {
        citadel_core::kv::KvRead::contains(&self.kv, mount, path)
    }
}

impl UserRead for StoreView<'_> {
    fn user(&self, key: &str) -> io::Result<Option<User>> {
        self.users.user(key)
    }

    fn user_keys_under(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.users.user_keys_under(prefix)
    }
}

/// The decoded entries kept beside the store's tables, coherent with them
/// ([`kv_table::KvCache`], [`crate::map_tables::TokenCache`]).
#[derive(Default)]
struct Caches {
    kv: KvCache,
    tokens: TokenCache,
}

/// A cheap, cloneable read handle on the applied state, for the layers above.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<RwLock<Applied>>,
    applied_index: watch::Receiver<u64>,
    db: Arc<Db>,
    caches: Arc<Caches>,
    audit: AuditStore,
    /// Set while a snapshot's secrets and events are being received.
    receiving: Arc<AtomicBool>,
    snapshots: Arc<SnapshotFile>,
    /// Whole-table scans running ([`StateReader::scan`]).
    scans: Arc<tokio::sync::Semaphore>,
}

/// Whole-table scans a node runs at once: each holds a blocking thread and its results (10 MB
/// of accessors with 200,000 tokens), and batches share the blocking pool with them.
const CONCURRENT_SCANS: usize = 2;

/// Each chain of `audit` with its retention anchor and its tip: the events a snapshot covers.
fn chain_ranges(audit: &citadel_core::audit::AuditLog) -> Vec<(Chain, ChainTip, ChainTip)> {
    let nodes = audit.chains.iter().map(|(node, c)| (Chain::Node(*node), c.pruned.clone(), c.stored.clone()));
    nodes.chain([(Chain::Log, audit.log.pruned.clone(), audit.log.stored.clone())]).collect()
}

/// What the staged events are marked with: the snapshot's last log id, encoded.
fn staging_id(meta: &SnapshotMeta) -> Vec<u8> {
    codec::encode(&meta.last_log_id.as_ref().map(codec::StoredLogId::from))
}

/// Events, or tokens, users and secrets, staged per commit while a snapshot is read. Tests
/// stage a few per commit, so that their small snapshots take several.
const STAGING_BATCH: usize = if cfg!(test) { 3 } else { 10_000 };
/// Bytes of secrets staged per commit at most: a secret may hold a thousand versions.
const STAGING_SECRET_BYTES: usize = 32 << 20;

/// One part of a snapshot sent to a follower ([`StateReader::write_transfer`]).
pub enum TransferPart<'a> {
    /// The snapshot in transfer form, which says how many secrets follow it.
    Header(Vec<u8>),
    /// A token's line, then a user's, then a secret's, then an audit event's.
    Line(&'a [u8]),
}

/// Tokens, users, secrets and audit events written beside the live tables, in batches, as a
/// snapshot's are read (from a leader, or from `snapshot.bin` at a rebuild), to become the
/// tables in one commit at the end: it holds one batch at a time.
struct Staging {
    db: Arc<Db>,
    audit: AuditStore,
    /// Tokens and users to stage (key, record), secrets (mount, path, record), and their size.
    tokens: Vec<(String, Vec<u8>)>,
    users: Vec<(String, Vec<u8>)>,
    secrets: Vec<(String, String, Vec<u8>)>,
    bytes: usize,
    events: Vec<citadel_core::audit::AuditEvent>,
    /// Before the first commit, which empties the staging tables.
    first: bool,
    /// Commits made so far.
    commits: u64,
}

impl Staging {
    fn new(db: Arc<Db>, audit: AuditStore) -> Staging {
        Staging {
            db,
            audit,
            tokens: Vec::new(),
            users: Vec::new(),
            secrets: Vec::new(),
            bytes: 0,
            events: Vec::new(),
            first: true,
            commits: 0,
        }
    }

    fn token(&mut self, key: String, token: &TokenEntry) -> io::Result<()> {
        let record = codec::encode(token);
        self.bytes += key.len() + record.len();
        self.tokens.push((key, record));
        self.commit_if_full()
    }

    fn user(&mut self, key: String, user: &User) -> io::Result<()> {
        let record = codec::encode(user);
        self.bytes += key.len() + record.len();
        self.users.push((key, record));
        self.commit_if_full()
    }

    fn secret(&mut self, mount: String, path: String, entry: &citadel_core::kv::KvEntry) -> io::Result<()> {
        let record = codec::encode_binary(entry);
        self.bytes += mount.len() + path.len() + record.len();
        self.secrets.push((mount, path, record));
        self.commit_if_full()
    }

    fn event(&mut self, event: citadel_core::audit::AuditEvent) -> io::Result<()> {
        self.events.push(event);
        if self.events.len() >= STAGING_BATCH {
            self.commit()?;
        }
        Ok(())
    }

    fn commit_if_full(&mut self) -> io::Result<()> {
        let held = self.tokens.len() + self.users.len() + self.secrets.len();
        if held >= STAGING_BATCH || self.bytes >= STAGING_SECRET_BYTES {
            self.commit()?;
        }
        Ok(())
    }

    /// Stages what came since the last commit; the first commit empties the staging tables.
    /// Fsynced: redb keeps what unsynced commits free until a durable one, and a million-event
    /// transfer of a hundred unsynced commits slowed as it went (`bench scale`'s catch-up: 54 s
    /// with durable commits, 65 and 75 s without). Such a commit may also make the state
    /// machine's latest commits durable without its saved state: the next start then finds the
    /// store ahead of the saved state and rebuilds from the snapshot.
    fn commit(&mut self) -> io::Result<()> {
        let first = self.first;
        self.db.commit(true, |txn| {
            if first {
                kv_table::clear_staged(txn)?;
                TOKENS.clear_staged(txn)?;
                USERS.clear_staged(txn)?;
            }
            TOKENS.stage_in(txn, &self.tokens)?;
            USERS.stage_in(txn, &self.users)?;
            kv_table::stage_in(txn, &self.secrets)?;
            self.audit.stage_in(txn, &self.events, first)
        })?;
        self.tokens.clear();
        self.users.clear();
        self.secrets.clear();
        self.bytes = 0;
        self.events.clear();
        self.first = false;
        self.commits += 1;
        Ok(())
    }
}

/// A snapshot's secrets and audit events arriving from the leader
/// ([`StateReader::receive_snapshot`]).
pub struct SnapshotReceiver {
    staging: Staging,
    /// Each chain the snapshot covers: its check so far and the tip it must reach.
    chains: std::collections::BTreeMap<Chain, (ChainVerifier, ChainTip)>,
    /// The snapshot's mounts: every secret belongs to one.
    mounts: std::collections::BTreeSet<String>,
    /// Tokens, users and secrets still to come, in that order, before the events.
    tokens_left: u64,
    users_left: u64,
    secrets_left: u64,
    snapshot: Vec<u8>,
    receiving: Arc<AtomicBool>,
}

impl SnapshotReceiver {
    /// Tokens, users and secrets still to come, before the events.
    pub fn lines_before_events(&self) -> u64 {
        self.tokens_left.saturating_add(self.users_left).saturating_add(self.secrets_left)
    }

    /// Takes the next line: while tokens are due, a token; then users; then while secrets are
    /// due, a secret of one of the snapshot's mounts; then an event, which must continue its
    /// chain within the snapshot. Blocking (stages a batch now and then).
    pub fn add(&mut self, line: &[u8]) -> io::Result<()> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("received snapshot: {what}"));
        if self.tokens_left > 0 {
            let entry: codec::TokenLine = serde_json::from_slice(line).map_err(|e| bad(format!("not a token: {e}")))?;
            self.tokens_left -= 1;
            return self.staging.token(entry.key, &entry.token);
        }
        if self.users_left > 0 {
            let entry: codec::UserLine = serde_json::from_slice(line).map_err(|e| bad(format!("not a user: {e}")))?;
            self.users_left -= 1;
            return self.staging.user(entry.key, &entry.user);
        }
        if self.secrets_left > 0 {
            let secret: kv_table::StoredKvEntry =
                serde_json::from_slice(line).map_err(|e| bad(format!("not a secret: {e}")))?;
            if !self.mounts.contains(&secret.mount) {
                return Err(bad(format!("a secret of {}, which is not one of its mounts", secret.mount)));
            }
            self.secrets_left -= 1;
            return self.staging.secret(secret.mount, secret.path, &secret.entry);
        }
        let event: citadel_core::audit::AuditEvent =
            serde_json::from_slice(line).map_err(|e| bad(format!("not an audit event: {e}")))?;
        let chain = Chain::of(&event);
        let (verifier, tip) =
            self.chains.get_mut(&chain).ok_or_else(|| bad(format!("an event of {chain}, which it does not cover")))?;
        if event.body().seq > tip.seq {
            return Err(bad(format!("event {} of {chain} is past the snapshot's tip {}", event.body().seq, tip.seq)));
        }
        verifier.check(&event).map_err(|e| bad(e.to_string()))?;
        self.staging.event(event)
    }

    /// Everything arrived: every secret, and each chain reached its tip, with the tip's hash.
    pub fn finish(mut self) -> io::Result<()> {
        for (left, what) in [(self.tokens_left, "tokens"), (self.users_left, "users"), (self.secrets_left, "secrets")] {
            if left > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("received snapshot: it ended with {left} of its {what} still due"),
                ));
            }
        }
        for (chain, (verifier, tip)) in &self.chains {
            if verifier.last() != tip {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("received snapshot: {chain} ends at {} instead of {}", verifier.last().seq, tip.seq),
                ));
            }
        }
        self.staging.commit()?;
        self.staging.audit.staged_for(&self.snapshot)
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

    /// Runs `f` against the current state and what the store holds beside it (secrets, users,
    /// tokens),
    /// both as of the same applied index (the store is read in transactions opened under the
    /// state's lock).
    pub fn read_with_store<T>(&self, f: impl FnOnce(&State, &StoreView<'_>) -> T) -> T {
        let applied = self.lock();
        let store = StoreView {
            kv: KvView::new(&self.db, &self.caches.kv),
            users: UsersView::new(&self.db),
            tokens: TokensView::new(&self.db, &self.caches.tokens),
        };
        f(&applied.state, &store)
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied_index.borrow()
    }

    /// Runs a scan of whole tables (a listing) on the blocking pool, in a read transaction of its
    /// own and outside the state's lock, for which every batch would wait; at most
    /// [`CONCURRENT_SCANS`] at once, each holding its place until it ends, even if its caller
    /// has gone. It reads the latest commit, which may be a batch ahead of the state a caller
    /// read before: a listing needs nothing more.
    async fn scan<T: Send + 'static>(&self, scan: impl FnOnce(&Db) -> io::Result<T> + Send + 'static) -> io::Result<T> {
        let place = self.scans.clone().acquire_owned().await.map_err(io::Error::other)?;
        let db = self.db.clone();
        let scan = move || {
            let _place = place;
            scan(&db)
        };
        tokio::task::spawn_blocking(scan).await.map_err(io::Error::other)?
    }

    /// Every token's accessor, in order (a [`Self::scan`]: 200,000 rows with as many tokens).
    pub async fn token_accessors(&self) -> io::Result<Vec<String>> {
        // A cache of its own, empty: every read comes from the view's one transaction.
        self.scan(|db| TokensView::new(db, &TokenCache::default()).accessors()).await
    }

    /// The keys of the users that start with `prefix`, in order (a [`Self::scan`]).
    pub async fn user_keys_under(&self, prefix: String) -> io::Result<Vec<String>> {
        self.scan(move |db| UsersView::new(db).user_keys_under(&prefix)).await
    }

    /// The immediate children of `prefix` in the secrets of `mount`, as Vault's LIST names them
    /// (a [`Self::scan`]: a mount's root lists every secret in it).
    pub async fn kv_list(&self, mount: String, prefix: String) -> io::Result<Vec<String>> {
        self.scan(move |db| KvView::new(db, &KvCache::default()).list(&mount, &prefix)).await
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

    /// The latest local snapshot's record as a file, checksums verified, to be streamed (an
    /// operator snapshot); `None` before the first snapshot. Blocking.
    pub fn open_snapshot(&self) -> io::Result<Option<SnapshotRecordFile>> {
        self.snapshots.open_record()
    }

    /// Writes a local snapshot as it is sent to a follower, part by part: its transfer form
    /// (the state without tokens, users, secrets or audit events), then each token, each user
    /// and each secret as one line of JSON ([`codec::TokenLine`], [`codec::UserLine`], a
    /// [`kv_table::StoredKvEntry`]; read from the snapshot's file as their text, never decoded),
    /// then each audit event it covers, each chain from its retention anchor to its tip, as
    /// stored (read from the store). Neither the file nor any of its parts is ever whole in
    /// memory. Blocking.
    pub fn write_transfer(
        &self,
        local: &mut SnapshotRecordFile,
        out: &mut dyn FnMut(TransferPart<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        const WHAT: &str = "local snapshot";
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{WHAT}: {what}"));
        // Read twice: the state first, with the tokens, users and secrets counted (the header
        // says how many of each follow), then those, one at a time.
        let mut stored: codec::StoredSnapshotCounted = codec::decode_json_from(local.reader()?, WHAT)?;
        // A format-4 snapshot still holds its events inline; they are in the store.
        stored.state.audit.take_unstored();
        // A snapshot of format 5 or older holds its secrets in its mounts, and one of format 7
        // its tokens and users in its state: they go as lines too.
        let in_mounts = stored.state.take_kv_changes();
        let in_state_tokens = std::mem::take(&mut stored.state.tokens);
        let in_state_users = std::mem::take(&mut stored.state.users);
        if (!in_state_tokens.is_empty() || !in_state_users.is_empty()) && (stored.tokens.0 > 0 || stored.users.0 > 0) {
            return Err(bad("it holds tokens or users both in its state and beside it".into()));
        }
        let maps = codec::StreamedMaps {
            tokens: stored.tokens.0 + in_state_tokens.len() as u64,
            users: stored.users.0 + in_state_users.len() as u64,
        };
        let streamed = stored.kv.0 + kv_refs(&in_mounts).count() as u64;
        let transfer = StoredSnapshotRef {
            format: stored.format,
            last_applied: stored.last_applied,
            membership: stored.membership,
            state: &stored.state,
            tokens: BTreeMap::<String, TokenEntry>::new(),
            users: BTreeMap::<String, User>::new(),
            kv: [(); 0],
            streamed_secrets: Some(streamed),
            streamed_maps: Some(maps),
        };
        out(TransferPart::Header(codec::encode(&transfer)))?;
        let out = std::cell::RefCell::new(out);
        let line = |bytes: &[u8]| -> io::Result<()> {
            if bytes.contains(&b'\n') {
                return Err(bad("an entry's JSON spans lines".into()));
            }
            (out.borrow_mut())(TransferPart::Line(bytes))
        };
        for (key, token) in in_state_tokens.iter() {
            let token = serde_json::value::to_raw_value(token).map_err(io::Error::other)?;
            line(&serde_json::to_vec(&codec::TokenLineRef { key, token: &token }).map_err(io::Error::other)?)?;
        }
        for (key, user) in in_state_users.iter() {
            let user = serde_json::value::to_raw_value(user).map_err(io::Error::other)?;
            line(&serde_json::to_vec(&codec::UserLineRef { key, user: &user }).map_err(io::Error::other)?)?;
        }
        // The file holds its tokens, then its users, then its secrets (`StoredSnapshotRef`'s
        // order): a receiver takes the lines in that order.
        let sent_maps = std::cell::Cell::new(codec::StreamedMaps::default());
        let sent_secrets = std::cell::Cell::new(0u64);
        let sent = codec::for_each_streamed(
            local.reader()?,
            WHAT,
            &mut |field, key, value| {
                let mut sent = sent_maps.get();
                if sent_secrets.get() > 0 || (field == codec::MapField::Tokens && sent.users > 0) {
                    return Err(bad("its tokens, users and secrets are not in that order".into()));
                }
                let encoded = match field {
                    codec::MapField::Tokens => {
                        sent.tokens += 1;
                        serde_json::to_vec(&codec::TokenLineRef { key, token: value })
                    }
                    codec::MapField::Users => {
                        sent.users += 1;
                        serde_json::to_vec(&codec::UserLineRef { key, user: value })
                    }
                };
                sent_maps.set(sent);
                line(&encoded.map_err(io::Error::other)?)
            },
            &mut |secret: Box<serde_json::value::RawValue>| {
                sent_secrets.set(sent_secrets.get() + 1);
                line(secret.get().as_bytes())
            },
        )?;
        let sent_maps = sent_maps.get();
        if sent != stored.kv.0 || sent_maps.tokens != stored.tokens.0 || sent_maps.users != stored.users.0 {
            return Err(bad(format!(
                "{} tokens, {} users and {} secrets counted, then {}, {} and {sent} read",
                stored.tokens.0, stored.users.0, stored.kv.0, sent_maps.tokens, sent_maps.users
            )));
        }
        let out = out.into_inner();
        for secret in kv_refs(&in_mounts) {
            out(TransferPart::Line(&serde_json::to_vec(&secret).map_err(io::Error::other)?))?;
        }
        for (chain, anchor, tip) in chain_ranges(&stored.state.audit) {
            let written =
                self.audit.write_chain(chain, anchor.seq + 1, tip.seq, &mut |e| out(TransferPart::Line(e)))?;
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
        }
        Ok(())
    }

    /// Starts receiving the lines after a snapshot in transfer form, whose last log id is
    /// `snapshot`: its tokens and users (as many as it says; a leader of protocol 10 or earlier
    /// sends them inline), its secrets (likewise; protocol 8 or earlier), then its audit events,
    /// checked link by link. All are staged as they come and installed with the snapshot. One
    /// transfer at a time.
    pub fn receive_snapshot(&self, transfer: &[u8], snapshot: &SnapshotMeta) -> io::Result<SnapshotReceiver> {
        let stored: StoredSnapshot = codec::decode(transfer, "received snapshot")?;
        if stored.state.audit.events().next().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a snapshot in transfer form holds no audit events inline",
            ));
        }
        check_streamed_parts(&stored)?;
        if self.receiving.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Err(io::Error::other("another snapshot is being received; retry"));
        }
        let chains = chain_ranges(&stored.state.audit)
            .into_iter()
            .map(|(chain, anchor, tip)| (chain, (ChainVerifier::after(chain, anchor), tip)))
            .collect();
        Ok(SnapshotReceiver {
            staging: Staging::new(self.db.clone(), self.audit.clone()),
            chains,
            mounts: stored.state.mounts.keys().cloned().collect(),
            tokens_left: stored.streamed_maps.map_or(0, |m| m.tokens),
            users_left: stored.streamed_maps.map_or(0, |m| m.users),
            secrets_left: stored.streamed_secrets.unwrap_or(0),
            snapshot: staging_id(snapshot),
            receiving: self.receiving.clone(),
        })
    }
}

pub struct StateMachine {
    inner: Arc<RwLock<Applied>>,
    save_on_drop: Arc<SaveOnDrop>,
    snapshots: Arc<SnapshotFile>,
    applied_tx: Arc<watch::Sender<u64>>,
    db: Arc<Db>,
    caches: Arc<Caches>,
    audit: AuditStore,
    last_sync: Instant,
    /// Where retention writes the events it prunes (`DATA/audit-archive`).
    archive_dir: Arc<Path>,
    receiving: Arc<AtomicBool>,
    scans: Arc<tokio::sync::Semaphore>,
}

impl StateMachine {
    pub(crate) fn open(db: Arc<Db>, data_dir: &Path) -> Result<StateMachine, StorageOpenError> {
        let snapshots = SnapshotFile::in_dir(data_dir);
        let corrupt = |e: io::Error| StorageOpenError::Corrupt(snapshots.path().to_path_buf(), e.to_string());
        snapshots.upgrade_layout().map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => corrupt(e),
            _ => StorageOpenError::Io(snapshots.path().into(), e.to_string()),
        })?;
        // Opened, not read: the file is checked as it streams and never whole in memory.
        let mut record = snapshots.open_record().map_err(corrupt)?;
        if record.is_none() && move_snapshot_out_of(&db, &snapshots)? {
            record = snapshots.open_record().map_err(corrupt)?;
        }
        let snapshot_index = record.as_ref().and_then(|r| r.last_log_id).map_or(0, |l| l.index);
        let audit = AuditStore::new(db.clone());
        let db_err = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
        let stored = audit.applied().map_err(db_err)?;
        let applied = match db.read_meta::<StoredSnapshot>(KEY_STATE).map_err(db_err)? {
            Some(saved) if saved.last_applied.map_or(0, |l| l.index) == stored => {
                let format = saved.format;
                let mut applied = restore(saved).map_err(db_err)?;
                with_stored_maps(&db, &mut applied, format)?;
                applied
            }
            Some(saved) => {
                // A clean close of redb makes its commits durable, and the last ones did not save
                // the state (a stop the state machine did not see through): start over from the
                // snapshot rather than replay onto secrets that are ahead of the state.
                let saved_at = saved.last_applied.map_or(0, |l| l.index);
                tracing::warn!(path = %db.path.display(), saved_at, stored, "the stored secrets and events are ahead of the saved state; rebuilding from the snapshot");
                rebuild_from_snapshot(&db, &audit, snapshots.path(), record.as_mut())?.0
            }
            None => rebuild_from_snapshot(&db, &audit, snapshots.path(), record.as_mut())?.0,
        };
        let index = applied.last_applied.as_ref().map_or(0, |l| l.index);
        // Every snapshot is written after a durable commit that covers it: a database behind the
        // snapshot has lost secrets and events the log no longer holds.
        let stored = audit.applied().map_err(db_err)?;
        if index < snapshot_index || stored < index {
            return Err(db_err(io::Error::other(format!(
                "it holds the state up to entry {index} and audit events up to entry {stored}, but {} starts \
                 at entry {snapshot_index}: what lies between them is lost",
                snapshots.path().display()
            ))));
        }
        // What a transfer cut short by a stop staged is never installed: the leader sends the
        // snapshot whole again. Left, it would hold a copy of the secrets and events on disk.
        db.commit(false, |txn| {
            kv_table::clear_staged(txn)?;
            TOKENS.clear_staged(txn)?;
            USERS.clear_staged(txn)?;
            audit.clear_staged_in(txn)
        })
        .map_err(db_err)?;
        let inner = Arc::new(RwLock::new(applied));
        Ok(StateMachine {
            save_on_drop: Arc::new(SaveOnDrop { inner: inner.clone(), db: db.clone(), failed: AtomicBool::new(false) }),
            inner,
            snapshots: Arc::new(snapshots),
            applied_tx: Arc::new(watch::channel(index).0),
            db,
            caches: Arc::default(),
            audit,
            last_sync: Instant::now(),
            archive_dir: data_dir.join(ARCHIVE_DIR).into(),
            receiving: Arc::default(),
            scans: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCANS)),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            inner: self.inner.clone(),
            applied_index: self.applied_tx.subscribe(),
            db: self.db.clone(),
            caches: self.caches.clone(),
            audit: self.audit.clone(),
            receiving: self.receiving.clone(),
            snapshots: self.snapshots.clone(),
            scans: self.scans.clone(),
        }
    }
}

/// Saves the state when the last state machine handle goes (Raft has stopped): redb's clean
/// close makes every commit durable, and without the state saved beside the last of them the
/// next start would rebuild from the snapshot. Should anything have failed half-way, the saved
/// index differs from the store's and the next start rebuilds anyway.
struct SaveOnDrop {
    inner: Arc<RwLock<Applied>>,
    db: Arc<Db>,
    /// Set when a batch or an install failed: memory may then hold a half-applied batch, which
    /// must not be saved (the next start rebuilds from the snapshot instead).
    failed: AtomicBool,
}

impl SaveOnDrop {
    /// Passes `result` on, remembering a failure.
    fn watch<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.failed.store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }
}

impl Drop for SaveOnDrop {
    fn drop(&mut self) {
        if self.failed.load(std::sync::atomic::Ordering::Acquire) {
            tracing::warn!(
                "not saving the state at stop after a failed write; the next start rebuilds it from the snapshot"
            );
            return;
        }
        let applied = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = save_state(&self.db, &applied) {
            tracing::warn!(error = %e, "cannot save the state at stop; the next start rebuilds it from the snapshot");
        }
    }
}

/// Format 3 kept the snapshot in `raft.redb`: moved to its file once (written first, then
/// removed from the database, so a crash between the two only repeats the move). Whether
/// there was one.
fn move_snapshot_out_of(db: &Db, snapshots: &SnapshotFile) -> Result<bool, StorageOpenError> {
    let corrupt = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
    let Some(record) = db.read_meta::<StoredSnapshotRecord>(KEY_SNAPSHOT).map_err(corrupt)? else { return Ok(false) };
    let io_err = |e: io::Error| StorageOpenError::Io(snapshots.path().to_path_buf(), e.to_string());
    snapshots.write(&record).map_err(io_err)?;
    db.write(|txn| {
        txn.open_table(crate::db::META)?.remove(KEY_SNAPSHOT)?;
        Ok(())
    })
    .map_err(|e| StorageOpenError::Io(db.path.clone(), e.to_string()))?;
    tracing::info!(from = %db.path.display(), to = %snapshots.path().display(), "moved the snapshot to its own file");
    Ok(true)
}

/// Readies a state restored from the saved state for its tables: its tokens and users stay
/// there, loaded as commands need them; a state saved before the tables existed holds its own,
/// which move to the tables once.
fn with_stored_maps(db: &Db, applied: &mut Applied, format: u32) -> Result<(), StorageOpenError> {
    if format >= MAP_TABLES_FORMAT {
        // The saved state's empty maps, decoded, would replace the tables at the next commit.
        (applied.state.tokens, applied.state.users) = Default::default();
        return Ok(());
    }
    applied.state.tokens.replace_store();
    applied.state.users.replace_store();
    let (tokens, users) = take_stored_maps(&mut applied.state);
    let saved = saved_state(applied);
    db.commit(true, |txn| {
        TOKENS.write_changes(txn, &tokens)?;
        USERS.write_changes(txn, &users)?;
        put_saved_state(txn, &saved)
    })
    .map_err(|e| StorageOpenError::Io(db.path.clone(), e.to_string()))?;
    tracing::info!(tokens = tokens.put.len(), users = users.put.len(), path = %db.path.display(), "moved the tokens and users out of the saved state into their tables");
    Ok(())
}

/// Starts the database over from `snapshot.bin` (or from nothing, without one): its tokens,
/// users and secrets are read from the file one at a time and staged (an earlier format's held
/// in its state, format 7's tokens and users and format 5's secrets, are decoded with it), and replace the tables
/// in one durable commit that saves its state beside them; its audit events (format 4 and
/// older) move to the audit store, whose applied index goes back to the snapshot's. Raft then
/// replays the log after it, and events stored again are unchanged. For a data directory of
/// format 5 or older, and for one whose store went ahead of its saved state. A crash part way
/// leaves the saved state as it was, so the next start rebuilds again.
fn rebuild_from_snapshot(
    db: &Arc<Db>,
    audit: &AuditStore,
    snapshot_path: &Path,
    mut record: Option<&mut SnapshotRecordFile>,
) -> Result<(Applied, StagedCounts), StorageOpenError> {
    let corrupt = |e: io::Error| StorageOpenError::Corrupt(snapshot_path.to_path_buf(), e.to_string());
    let db_err = |e: io::Error| StorageOpenError::Corrupt(db.path.clone(), e.to_string());
    let what = format!("{} (its state)", snapshot_path.display());
    let (mut applied, format) = match record.as_deref_mut() {
        Some(record) => {
            let head = record
                .reader()
                .and_then(|reader| codec::decode_json_from(reader, &what))
                .and_then(|head: codec::StoredSnapshotCounted| {
                    check_readable(head.format)?;
                    // Format 7 kept them in its state; a later one beside it; never both.
                    let both = |what: &str| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("it holds {what} both in its state and beside it"),
                        )
                    };
                    if !head.state.tokens.is_empty() && head.tokens.0 > 0 {
                        return Err(both("tokens"));
                    }
                    if !head.state.users.is_empty() && head.users.0 > 0 {
                        return Err(both("users"));
                    }
                    Ok(head)
                })
                .map_err(corrupt)?;
            let applied = Applied {
                state: head.state,
                last_applied: head.last_applied.map(Into::into),
                membership: head.membership.into_stored().map_err(corrupt)?,
            };
            (applied, head.format)
        }
        None => {
            let empty =
                Applied { state: State::default(), last_applied: None, membership: StoredMembership::default() };
            (empty, citadel_core::command::FORMAT_VERSION)
        }
    };
    let index = applied.last_applied.as_ref().map_or(0, |l| l.index);
    let events = applied.state.audit.take_unstored();
    if !events.is_empty() || format < AUDIT_STORE_FORMAT {
        let stored = audit.applied().map_err(db_err)?;
        audit.store(&events, stored.max(index), true, false).map_err(db_err)?;
        tracing::info!(events = events.len(), "moved the audit log out of the snapshot into the audit store");
    }
    // Every snapshot is written after the store was made durable up to it: a store behind the
    // snapshot has lost events the log no longer holds.
    let stored = audit.applied().map_err(db_err)?;
    if stored < index {
        return Err(db_err(io::Error::other(format!(
            "its audit store covers the log up to entry {stored}, but {} starts at entry {index}: \
             audit events between them are lost",
            snapshot_path.display()
        ))));
    }
    let mut staging = Staging::new(db.clone(), audit.clone());
    let staged =
        stage_snapshot_entries(&mut applied.state, record, &mut staging, snapshot_path).map_err(|e| match e {
            StageError::File(e) => corrupt(e),
            StageError::Store(e) => StorageOpenError::Io(db.path.clone(), e.to_string()),
        })?;
    let saved = saved_state(&applied);
    db.write(|txn| {
        // The snapshot's tokens, users and secrets replace the store's (none, without a snapshot).
        kv_table::promote_staged_in(txn)?;
        TOKENS.promote_staged_in::<TokenEntry>(txn)?;
        USERS.promote_staged_in::<User>(txn)?;
        audit.store_in(txn, &[], index, false)?;
        put_saved_state(txn, &saved)?;
        Ok(())
    })
    .map_err(|e| StorageOpenError::Io(db.path.clone(), e.to_string()))?;
    tracing::info!(secrets = staged.secrets, tokens = staged.tokens, users = staged.users, commits = staged.commits, index, from = %snapshot_path.display(), to = %db.path.display(), "rebuilt the state store from the snapshot");
    Ok((applied, staged))
}

/// Why staging a snapshot's entries stopped: the file (damaged, or not as any build writes
/// it) or the store it stages into.
enum StageError {
    File(io::Error),
    Store(io::Error),
}

/// How many of each a rebuild staged, and in how many commits.
#[derive(Default)]
struct StagedCounts {
    tokens: u64,
    users: u64,
    secrets: u64,
    commits: u64,
}

/// Stages every token, user and secret of a snapshot whose state is `state`: those the file
/// holds beside its state, read one at a time (`record`), and those an earlier format held in
/// the state itself (format 7's tokens and users, format 5's secrets in their mounts), which
/// leave it. Ends with a commit, so the staging tables hold exactly these, even if none.
fn stage_snapshot_entries(
    state: &mut State,
    record: Option<&mut SnapshotRecordFile>,
    staging: &mut Staging,
    path: &Path,
) -> Result<StagedCounts, StageError> {
    let in_mounts = state.take_kv_changes();
    state.tokens.replace_store();
    state.users.replace_store();
    let (in_state_tokens, in_state_users) = take_stored_maps(state);
    let mut counts = StagedCounts::default();
    for (key, token) in &in_state_tokens.put {
        staging.token(key.clone(), token).map_err(StageError::Store)?;
        counts.tokens += 1;
    }
    for (key, user) in &in_state_users.put {
        staging.user(key.clone(), user).map_err(StageError::Store)?;
        counts.users += 1;
    }
    for secret in kv_refs(&in_mounts) {
        staging.secret(secret.mount.to_string(), secret.path.to_string(), secret.entry).map_err(StageError::Store)?;
        counts.secrets += 1;
    }
    if let Some(record) = record {
        let what = path.display().to_string();
        let reader = record.reader().map_err(StageError::File)?;
        let store_failed = std::cell::RefCell::new(None);
        let staging = std::cell::RefCell::new(&mut *staging);
        let counts = std::cell::RefCell::new(&mut counts);
        // A store error stops the read; it is told apart from the file's own damage.
        let stage = |result: io::Result<()>| {
            result.map_err(|e| {
                *store_failed.borrow_mut() = Some(e);
                io::Error::other("the store failed")
            })
        };
        let read = codec::for_each_streamed(
            reader,
            &what,
            &mut |field, key, value| {
                let mut staging = staging.borrow_mut();
                match field {
                    codec::MapField::Tokens => {
                        let token: TokenEntry = serde_json::from_str(value.get())
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("token {key}: {e}")))?;
                        counts.borrow_mut().tokens += 1;
                        stage(staging.token(key.to_string(), &token))
                    }
                    codec::MapField::Users => {
                        let user: User = serde_json::from_str(value.get())
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("user {key}: {e}")))?;
                        counts.borrow_mut().users += 1;
                        stage(staging.user(key.to_string(), &user))
                    }
                }
            },
            &mut |secret: kv_table::StoredKvEntry| {
                if !state.mounts.contains_key(&secret.mount) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a secret of {}, which is not one of its mounts", secret.mount),
                    ));
                }
                counts.borrow_mut().secrets += 1;
                stage(staging.borrow_mut().secret(secret.mount, secret.path, &secret.entry))
            },
        );
        if let Some(e) = store_failed.into_inner() {
            return Err(StageError::Store(e));
        }
        read.map_err(StageError::File)?;
    }
    staging.commit().map_err(StageError::Store)?;
    counts.commits = staging.commits;
    Ok(counts)
}

/// Refuses a snapshot or saved state of a format this build cannot read.
fn check_readable(format: u32) -> io::Result<()> {
    if !citadel_core::command::readable_format(format) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snapshot format {format} is not supported by this build"),
        ));
    }
    Ok(())
}

fn restore(snap: StoredSnapshot) -> io::Result<Applied> {
    check_readable(snap.format)?;
    let last_applied = snap.last_applied.map(Into::into);
    let membership = snap.membership.clone().into_stored()?;
    // Its secrets in memory for now: the caller moves them to the store.
    Ok(Applied { state: snap.into_whole_state()?, last_applied, membership })
}

/// Whether a snapshot holds secrets in itself: beside its state, or (format 5 and older) in
/// its mounts.
fn holds_secrets_inline(stored: &StoredSnapshot) -> bool {
    !stored.kv.is_empty() || stored.state.mounts.values().any(|m| !m.kv.entries.is_empty())
}

/// A snapshot in transfer form that says a part follows it holds none of that part inline.
fn check_streamed_parts(stored: &StoredSnapshot) -> io::Result<()> {
    let refuse = |what: &str| {
        Err(io::Error::new(io::ErrorKind::InvalidData, format!("a snapshot whose {what} follow it holds none inline")))
    };
    if stored.streamed_secrets.is_some() && holds_secrets_inline(stored) {
        return refuse("secrets");
    }
    let maps_inline = !stored.tokens.is_empty()
        || !stored.users.is_empty()
        || !stored.state.tokens.is_empty()
        || !stored.state.users.is_empty();
    if stored.streamed_maps.is_some() && maps_inline {
        return refuse("tokens and users");
    }
    Ok(())
}

fn into_snapshot(record: SnapshotRecordFile) -> io::Result<Snapshot> {
    Ok(Snapshot {
        meta: SnapshotMeta {
            last_log_id: record.last_log_id.map(Into::into),
            last_membership: record.membership.clone().into_stored()?,
        },
        snapshot: SnapshotData::Local(record),
    })
}

type Answer = (openraft::storage::ApplyResponder<TypeConfig>, Response);

/// Applies one batch under the state's write lock, loading the secrets its commands touch, then
/// writes the secrets it changed and the events it sealed with the applied index it reaches, in
/// one commit; when `durable`, fsynced and with the state saved. Returns the answers to send
/// and that index.
fn apply_batch(
    db: &Db,
    caches: &Caches,
    audit: &AuditStore,
    inner: &RwLock<Applied>,
    archive_dir: &Path,
    batch: Vec<EntryResponder<TypeConfig>>,
    durable: bool,
) -> io::Result<(Vec<Answer>, Option<u64>)> {
    let mut last_index = None;
    let mut answers = Vec::with_capacity(batch.len());
    let mut applied = inner.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    // What the store held before this batch: its changes stay in memory until the commit below.
    let stored = KvView::new(db, &caches.kv);
    let stored_users = UsersView::new(db);
    let stored_tokens = TokensView::new(db, &caches.tokens);
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
                applied.state.preload_kv(&command, |mount, path| stored.entry(mount, path))?;
                applied.state.preload_users(&command, &stored_users)?;
                applied.state.preload_tokens(&command, &stored_tokens)?;
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
    drop((stored, stored_users, stored_tokens));
    if let Some(index) = last_index {
        // Under the lock: no reader sees this batch before its secrets and events are stored,
        // and no snapshot copies the state between the two.
        let events = applied.state.audit.take_unstored();
        let kv = applied.state.take_kv_changes();
        let (tokens, users) = take_stored_maps(&mut applied.state);
        let saved = durable.then(|| saved_state(&applied));
        db.commit(durable, |txn| {
            audit.store_in(txn, &events, index, false)?;
            kv_table::write_changes(txn, &kv)?;
            TOKENS.write_changes(txn, &tokens)?;
            USERS.write_changes(txn, &users)?;
            if let Some(saved) = &saved {
                put_saved_state(txn, saved)?;
            }
            Ok(())
        })?;
        caches.kv.committed(&kv);
        caches.tokens.committed(&tokens);
    }
    Ok((answers, last_index))
}

/// Every secret a batch's changes put, as a snapshot's `kv` lists them.
fn kv_refs(kv: &citadel_core::state::StateKvChanges) -> impl Iterator<Item = StoredKvEntryRef<'_>> {
    kv.mounts
        .iter()
        .flat_map(|(mount, c)| c.put.iter().map(move |(path, entry)| StoredKvEntryRef { mount, path, entry }))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (inner, db, caches, snapshots) =
            (self.inner.clone(), self.db.clone(), self.caches.clone(), self.snapshots.clone());
        let record = tokio::task::spawn_blocking(move || -> io::Result<SnapshotRecordFile> {
            // Under the lock only: a durable commit with the state saved (the log may be purged
            // up to this snapshot once it is written), a copy of the state without its secrets
            // and tokens, and read transactions on both as of the same index. Encoding them
            // holds no lock `apply` needs: with the whole state under it, writes waiting to apply
            // timed out (`bench scale` found it), and copying 100,000 tokens held them 80 ms.
            let stored = KvView::new(&db, &caches.kv);
            let (state, meta, tables) = {
                let applied = inner.read().unwrap_or_else(|p| p.into_inner());
                save_state(&db, &applied)?;
                stored.open()?;
                let tables = StoredTables::open(&db)?;
                let meta =
                    SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone() };
                (applied.state.clone(), meta, tables)
            };
            write_local_snapshot(&snapshots, &meta, &state, &tables, &stored)?;
            drop((state, tables, stored));
            // What the file holds is the snapshot (a later one, if one was installed meanwhile):
            // openraft gets the file, verified, never its bytes.
            snapshots.open_record()?.ok_or_else(|| io::Error::other("the snapshot just written is gone"))
        })
        .await
        .map_err(io::Error::other)??;
        into_snapshot(record)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
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
        let (db, caches, audit, inner, archive_dir) =
            (self.db.clone(), self.caches.clone(), self.audit.clone(), self.inner.clone(), self.archive_dir.clone());
        let applied = tokio::task::spawn_blocking(move || {
            apply_batch(&db, &caches, &audit, &inner, &archive_dir, batch, durable)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        let (answers, last_index) = self.save_on_drop.watch(applied)?;
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
            save_on_drop: self.save_on_drop.clone(),
            snapshots: self.snapshots.clone(),
            applied_tx: self.applied_tx.clone(),
            db: self.db.clone(),
            caches: self.caches.clone(),
            audit: self.audit.clone(),
            last_sync: self.last_sync,
            archive_dir: self.archive_dir.clone(),
            receiving: self.receiving.clone(),
            scans: self.scans.clone(),
        }
    }

    /// Installs a snapshot received from a leader: in transfer form, its secrets and audit
    /// events staged as they arrived ([`SnapshotReceiver`]) become the store in one durable
    /// commit. An earlier build's leader sends the secrets inline (and a format-4 snapshot the
    /// events too): those replace the store instead. Then the local form, its secrets read
    /// back from the store, replaces `snapshot.bin`.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let snapshot = match snapshot {
            SnapshotData::Received(bytes) => bytes,
            // openraft lets a snapshot a node built be installed as it is (its conformance suite
            // does; a leader never sends one so). It holds its secrets inline, as a transfer
            // from an earlier build did.
            SnapshotData::Local(mut record) => tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
                let mut bytes = Vec::new();
                record.reader()?.read_to_end(&mut bytes)?;
                Ok(bytes)
            })
            .await
            .map_err(io::Error::other)??,
        };
        let stored: StoredSnapshot = codec::decode(&snapshot, "received snapshot")?;
        drop(snapshot);
        check_streamed_parts(&stored)?;
        let streamed = stored.streamed_secrets.is_some();
        let maps_streamed = stored.streamed_maps.is_some();
        let mut restored = restore(stored)?;
        let index = restored.last_applied.as_ref().map_or(0, |l| l.index);
        let inline = restored.state.audit.take_unstored();
        let covers_events = chain_ranges(&restored.state.audit).iter().any(|(_, anchor, tip)| tip.seq > anchor.seq);
        let inline_kv = restored.state.take_kv_changes();
        restored.state.tokens.replace_store();
        restored.state.users.replace_store();
        let (tokens, users) = take_stored_maps(&mut restored.state);
        let saved = saved_state(&restored);
        let (inner, db, audit, staged) = (self.inner.clone(), self.db.clone(), self.audit.clone(), staging_id(meta));
        let caches = self.caches.clone();
        let (snapshots, applied_tx) = (self.snapshots.clone(), self.applied_tx.clone());
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            // Under the write lock: no snapshot saves the old state beside the new tables.
            let mut applied = inner.write().unwrap_or_else(|p| p.into_inner());
            let mut txn = db.db.begin_write().map_err(|e| db.err(e))?;
            txn.set_two_phase_commit(true);
            let promoted = inline.is_empty() && audit.promote_staged_in(&txn, &staged, index).map_err(|e| db.err(e))?;
            // A receiver marks what it staged as complete: without the mark, entries or events
            // that were to follow the snapshot are missing.
            if !promoted && (streamed || maps_streamed || (inline.is_empty() && covers_events)) {
                return Err(io::Error::other(
                    "the snapshot's tokens, users, secrets and audit events did not all arrive; it will be sent again",
                ));
            }
            let write = |txn: &redb::WriteTransaction| -> Result<(), redb::Error> {
                if !promoted {
                    audit.store_in(txn, &inline, index, true)?;
                }
                if streamed {
                    kv_table::promote_staged_in(txn)?;
                } else {
                    kv_table::replace_all(txn, kv_refs(&inline_kv))?;
                    kv_table::clear_staged(txn)?;
                }
                if maps_streamed {
                    // Not `write_changes` too: the state's empty maps replace what the store
                    // holds, which would take the promoted tables with them.
                    TOKENS.promote_staged_in::<TokenEntry>(txn)?;
                    USERS.promote_staged_in::<User>(txn)?;
                } else {
                    TOKENS.write_changes(txn, &tokens)?;
                    USERS.write_changes(txn, &users)?;
                    TOKENS.clear_staged(txn)?;
                    USERS.clear_staged(txn)?;
                }
                put_saved_state(txn, &saved)?;
                Ok(())
            };
            write(&txn).map_err(|e| db.err(e))?;
            txn.commit().map_err(|e| db.err(e))?;
            // The database holds the snapshot now: so does memory, whatever becomes of the file.
            caches.kv.clear();
            caches.tokens.clear();
            *applied = restored;
            applied_tx.send_replace(index);
            drop(applied);
            // Only this task applies or installs, so the state read back is the one installed.
            let applied = inner.read().unwrap_or_else(|p| p.into_inner());
            let secrets = KvView::new(&db, &caches.kv);
            let tables = StoredTables::open(&db)?;
            write_local_snapshot(&snapshots, &meta, &applied.state, &tables, &secrets)
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let snapshots = self.snapshots.clone();
        let record = tokio::task::spawn_blocking(move || snapshots.open_record()).await.map_err(io::Error::other)??;
        record.map(into_snapshot).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{StoredLogId, StoredMembershipConfig, StoredMembershipState};
    use citadel_core::stored_map::StoredChanges;

    fn membership() -> StoredMembershipState {
        StoredMembershipState {
            log_id: None,
            config: StoredMembershipConfig { configs: vec![[1].into()], nodes: [(1, Default::default())].into() },
        }
    }

    /// Writes `snapshot.bin` of `format` at index 7 holding `state`.
    fn write_snapshot(dir: &Path, format: u32, state: State) {
        let last = StoredLogId { term: 1, leader: 1, index: 7 };
        let stored = StoredSnapshot {
            format,
            last_applied: Some(last),
            membership: membership(),
            state,
            tokens: Default::default(),
            users: Default::default(),
            kv: vec![],
            streamed_secrets: None,
            streamed_maps: None,
        };
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

    /// What the sender streams: its snapshot in transfer form, how many secret lines follow
    /// (as it says), and the lines after it.
    fn transfer(sender: &StateReader, mut local: SnapshotData) -> (Vec<u8>, u64, Vec<Vec<u8>>) {
        let SnapshotData::Local(local) = &mut local else { panic!("a snapshot to send is local") };
        let (mut header, mut lines) = (None, Vec::new());
        sender
            .write_transfer(local, &mut |part| {
                match part {
                    TransferPart::Header(data) => assert!(header.replace(data).is_none()),
                    TransferPart::Line(line) => lines.push(line.to_vec()),
                }
                Ok(())
            })
            .unwrap();
        let data = header.expect("a header first");
        let secrets = codec::decode::<StoredSnapshot>(&data, "transfer").unwrap().streamed_secrets.unwrap();
        (data, secrets, lines)
    }

    /// The token and user lines a transfer sends first, and the lines after them.
    fn split_maps<'a>(data: &[u8], lines: &'a [Vec<u8>]) -> (&'a [Vec<u8>], &'a [Vec<u8>]) {
        let maps = codec::decode::<StoredSnapshot>(data, "transfer").unwrap().streamed_maps.unwrap();
        lines.split_at((maps.tokens + maps.users) as usize)
    }

    fn local_snapshot(dir: &Path) -> SnapshotData {
        SnapshotData::Local(SnapshotFile::in_dir(dir).open_record().unwrap().unwrap())
    }

    /// The record `snapshot.bin` holds, as bytes.
    fn local_bytes(dir: &Path) -> Vec<u8> {
        SnapshotFile::in_dir(dir).read().unwrap().unwrap().data
    }

    #[test]
    fn a_format_4_snapshots_audit_events_move_to_the_store_and_are_sent_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let reader = node_with_events(dir.path(), 3).reader();
        assert_eq!(reader.read(|s| (s.audit.events().count(), s.audit.chains[&1].last_seq())), (0, 3));
        let stored = reader.audit().query(&crate::AuditQuery { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(stored, spool_events(3), "the events are on disk");
        let (transfer, secrets, lines) = transfer(&reader, local_snapshot(dir.path()));
        assert_eq!(secrets, 0);
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
        let (transfer, secrets, lines) = transfer(&sender, local_snapshot(from.path()));
        assert_eq!(secrets, 0);
        let db = Arc::new(Db::open(&to.path().join(crate::DB_FILE)).unwrap());
        let mut receiver_sm = StateMachine::open(db, to.path()).unwrap();
        let receiver = receiver_sm.reader();

        // Cut short: every event checks, but the chain does not reach its tip.
        let mut cut = receiver.receive_snapshot(&transfer, &meta_at_7()).unwrap();
        lines[..4].iter().for_each(|l| cut.add(l).unwrap());
        assert!(cut.finish().unwrap_err().to_string().contains("ends at 4 instead of 5"));
        let refused =
            receiver_sm.install_snapshot(&meta_at_7(), SnapshotData::Received(transfer.clone())).await.unwrap_err();
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
        receiver_sm.install_snapshot(&meta_at_7(), SnapshotData::Received(transfer)).await.unwrap();
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
            tokens: Default::default(),
            users: Default::default(),
            kv: vec![],
            streamed_secrets: None,
            streamed_maps: None,
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

    fn init() -> citadel_core::command::Command {
        use citadel_core::state::{ClusterInfo, Mount, SealInfo};
        citadel_core::command::Command::Init(Box::new(citadel_core::command::InitCommand {
            cluster: ClusterInfo { id: "c".into(), name: "citadel".into(), initialized_at: 1 },
            seal: SealInfo {
                shares: 1,
                threshold: 1,
                wrapped_root_key: vec![1],
                wrapped_keyring: vec![2],
                key_term: 1,
                key_installed: 1,
            },
            root_token: citadel_core::token::TokenEntry { hash: "root".into(), ..Default::default() },
            default_mount_path: "secret/".into(),
            default_mount: Mount {
                uuid: "u".into(),
                kind: "kv".into(),
                description: String::new(),
                created: 1,
                kv: Default::default(),
            },
        }))
    }

    fn write(path: &str, version: u64) -> citadel_core::command::Command {
        let ciphertext = format!("{path}@{version}").into_bytes();
        citadel_core::command::Command::KvWrite {
            mount: "secret/".into(),
            path: path.into(),
            version,
            ciphertext,
            cas: None,
            at: 5,
        }
    }

    /// Applies `commands` as the log entries after `after`, one batch.
    async fn apply(sm: &mut StateMachine, after: u64, commands: Vec<citadel_core::command::Command>) {
        use openraft::entry::RaftEntry;
        let entries = commands.into_iter().enumerate().map(|(i, c)| {
            let id = LogId::new(crate::types::LeaderId { term: 1, node_id: 1 }, after + 1 + i as u64);
            Ok((crate::types::Entry::new_normal(id, c), None))
        });
        sm.apply(futures::stream::iter(entries.collect::<Vec<_>>())).await.unwrap();
    }

    fn open(dir: &Path) -> StateMachine {
        let db = Arc::new(Db::open(&dir.join(crate::DB_FILE)).unwrap());
        StateMachine::open(db, dir).unwrap()
    }

    /// What the store holds at `path` of `secret/`, and how many entries the state in memory holds.
    fn stored_and_in_memory(reader: &StateReader, path: &str) -> (Option<u64>, usize) {
        reader.read_with_store(|s, store| {
            let kv = &store.kv;
            let held = s.mounts.values().map(|m| m.kv.entries.len()).sum();
            (kv.entry("secret/", path).unwrap().map(|e| e.current_version), held)
        })
    }

    #[tokio::test]
    async fn secrets_live_in_the_store_not_in_memory_and_a_restarted_node_finds_them_at_its_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        apply(&mut sm, 0, vec![init(), write("a", 1), write("b", 1)]).await;
        apply(&mut sm, 3, vec![write("a", 2)]).await;
        let reader = sm.reader();
        assert_eq!(stored_and_in_memory(&reader, "a"), (Some(2), 0), "stored, and none in memory");
        assert_eq!(reader.read_with_store(|_, store| store.kv.list("secret/", "").unwrap()), ["a", "b"]);
        drop((sm, reader));

        let sm = open(dir.path());
        assert_eq!(sm.reader().applied_index(), 4, "the state saved at stop, not a snapshot's");
        assert_eq!(stored_and_in_memory(&sm.reader(), "a"), (Some(2), 0));
        assert_eq!(stored_and_in_memory(&sm.reader(), "b"), (Some(1), 0));
    }

    #[tokio::test]
    async fn a_store_ahead_of_its_saved_state_is_rebuilt_from_the_snapshot_and_the_log_replays_onto_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        apply(&mut sm, 0, vec![init(), write("a", 1)]).await;
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        apply(&mut sm, 2, vec![write("a", 2), write("b", 1)]).await;
        // What a stop between durable commits leaves: the secrets at entry 4, the state at 2.
        let saved_at_2 = sm.db.read_meta::<StoredSnapshot>(KEY_STATE).unwrap().unwrap();
        let db = sm.db.clone();
        drop(sm);
        db.write_meta(KEY_STATE, &saved_at_2).unwrap();
        drop(db);

        let mut sm = open(dir.path());
        assert_eq!(sm.reader().applied_index(), 2, "the snapshot's");
        assert_eq!(stored_and_in_memory(&sm.reader(), "a"), (Some(1), 0), "the snapshot's secrets");
        assert_eq!(stored_and_in_memory(&sm.reader(), "b"), (None, 0));
        apply(&mut sm, 2, vec![write("a", 2), write("b", 1)]).await;
        assert_eq!(stored_and_in_memory(&sm.reader(), "a"), (Some(2), 0), "the replay converges");
        assert_eq!(stored_and_in_memory(&sm.reader(), "b"), (Some(1), 0));
    }

    /// Rewinds the saved state to what it was at `index` (which the caller read then), as a stop
    /// between durable commits leaves it: the next open rebuilds from the snapshot.
    fn rewind_saved_state(sm: StateMachine, saved: &StoredSnapshot) {
        let db = sm.db.clone();
        drop(sm);
        db.write_meta(KEY_STATE, saved).unwrap();
    }

    #[tokio::test]
    async fn a_rebuild_stages_the_snapshots_entries_in_batches_and_takes_nothing_a_cut_transfer_left_staged() {
        let dir = tempfile::tempdir().unwrap();
        let mut commands = vec![init(), add_user("ann"), add_user("bob")];
        commands.extend(["t1", "t2", "t3", "t4"].map(|t| login(t, None)));
        commands.extend(["a", "b", "c", "d"].map(|p| write(p, 1)));
        let (mut sm, snapshot) = node_with_snapshot(dir.path(), commands).await;
        let at_snapshot = sm.db.read_meta::<StoredSnapshot>(KEY_STATE).unwrap().unwrap();
        let want = held(&sm);
        assert_eq!(want.len(), 7, "root, four tokens and two users: more than one staging batch");
        apply(&mut sm, 11, vec![revoke("t1"), login("late", None), write("a", 2), write("e", 1)]).await;
        // A transfer cut short leaves a token the snapshot does not hold staged.
        let (data, _, lines) = transfer(&sm.reader(), snapshot.snapshot);
        let ghost = String::from_utf8(lines[0].clone()).unwrap().replace(r#""key":"root""#, r#""key":"ghost""#);
        assert_ne!(ghost.as_bytes(), lines[0]);
        let mut abandoned = sm.reader().receive_snapshot(&data, &snapshot.meta).unwrap();
        abandoned.add(ghost.as_bytes()).unwrap();
        abandoned.staging.commit().unwrap();
        drop(abandoned);
        rewind_saved_state(sm, &at_snapshot);

        let db = Arc::new(Db::open(&dir.path().join(crate::DB_FILE)).unwrap());
        let mut record = SnapshotFile::in_dir(dir.path()).open_record().unwrap().unwrap();
        let snapshot_path = dir.path().join(crate::snapshot_file::SNAPSHOT_FILE);
        let Ok((_, staged)) =
            rebuild_from_snapshot(&db, &AuditStore::new(db.clone()), &snapshot_path, Some(&mut record))
        else {
            panic!("the rebuild failed")
        };
        assert_eq!((staged.tokens, staged.users, staged.secrets), (5, 2, 4));
        assert!(staged.commits > 1, "staged in batches of {STAGING_BATCH}: {} commits", staged.commits);
        drop((db, record));
        let sm = open(dir.path());
        assert_eq!(sm.reader().applied_index(), 11, "the snapshot's");
        assert_eq!(held(&sm), want, "the snapshot's tokens and users, and no staged ghost");
        let listed = sm.reader().read_with_store(|_, store| store.kv.list("secret/", "").unwrap());
        assert_eq!(listed, ["a", "b", "c", "d"], "the snapshot's secrets");
        assert_eq!(stored_and_in_memory(&sm.reader(), "a"), (Some(1), 0));
        let of_ann = sm.reader().read_with_store(|_, store| store.tokens_of_username("ann").unwrap());
        assert_eq!(of_ann, ["t1", "t2", "t3", "t4"], "the indexes are built again from the snapshot's tokens");
    }

    #[tokio::test]
    async fn a_rebuild_from_a_snapshot_holding_a_secret_of_no_mount_stops_naming_the_file_and_keeps_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut commands = vec![init()];
        commands.extend(["t1", "t2", "t3", "t4"].map(|t| login(t, None)));
        commands.push(write("a", 1));
        let (mut sm, _) = node_with_snapshot(dir.path(), commands).await;
        let at_snapshot = sm.db.read_meta::<StoredSnapshot>(KEY_STATE).unwrap().unwrap();
        apply(&mut sm, 6, vec![write("b", 1), revoke("t1")]).await;
        let live_tokens = held(&sm);
        rewind_saved_state(sm, &at_snapshot);
        let good = std::fs::read(dir.path().join(crate::snapshot_file::SNAPSHOT_FILE)).unwrap();
        let record = SnapshotFile::in_dir(dir.path()).read().unwrap().unwrap();
        let mut stored: StoredSnapshot = codec::decode(&record.data, "snapshot").unwrap();
        stored.state.mounts.remove("secret/");
        let forged = StoredSnapshotRecord { data: codec::encode(&stored), ..record };
        SnapshotFile::in_dir(dir.path()).write(&forged).unwrap();

        let db = Arc::new(Db::open(&dir.path().join(crate::DB_FILE)).unwrap());
        let Err(err) = StateMachine::open(db.clone(), dir.path()) else { panic!("opened") };
        assert!(matches!(err, StorageOpenError::Corrupt(..)), "{err}");
        let err = err.to_string();
        assert!(err.contains("snapshot.bin") && err.contains("a secret of secret/"), "{err}");
        let txn = redb::ReadableDatabase::begin_read(&db.db).unwrap();
        let live = txn.open_table(kv_table::KV).unwrap().get(("secret/", "b")).unwrap().is_some();
        assert!(live, "the store's own secrets stay where they were");
        const TOKENS_STAGED: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tokens.staged");
        let staged = redb::ReadableTableMetadata::len(&txn.open_table(TOKENS_STAGED).unwrap()).unwrap();
        assert_eq!(staged, STAGING_BATCH as u64, "a batch of the tokens before the bad secret went to staging");
        let tokens = TOKENS.read_all::<TokenEntry>(&db).unwrap().into_keys().collect::<Vec<_>>();
        assert_eq!(tokens, live_tokens, "the store's own tokens stay where they were");
        drop((txn, db));
        std::fs::write(dir.path().join(crate::snapshot_file::SNAPSHOT_FILE), good).unwrap();
        let sm = open(dir.path());
        assert_eq!(stored_and_in_memory(&sm.reader(), "a"), (Some(1), 0), "rebuilt from the good file");
        assert_eq!(stored_and_in_memory(&sm.reader(), "b"), (None, 0));
        assert_eq!(held(&sm), keys(&["root", "t1", "t2", "t3", "t4"]), "the snapshot's tokens, and none left staged");
    }

    #[tokio::test]
    async fn listing_every_accessor_user_or_secret_waits_for_no_batch_being_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let mut with_accessor = login("b", None);
        if let citadel_core::command::Command::TokenCreate { entry, .. } = &mut with_accessor {
            entry.accessor = "acc-b".into();
        }
        let commands = vec![init(), add_user("ann"), add_user("bob"), login("a", None), with_accessor, write("x", 1)];
        apply(&mut sm, 0, commands).await;
        let reader = sm.reader();
        let under_lock = reader.read_with_store(|_, store| store.tokens.accessors().unwrap());
        assert!(under_lock.contains(&"acc-b".to_string()), "{under_lock:?}");
        // A batch being applied holds the write lock, here for up to a minute, on a thread of
        // its own: a listing that took the lock would wait that long, not hang the test.
        let (inner, (held_tx, held), (release, release_rx)) =
            (sm.inner.clone(), std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let applying = std::thread::spawn(move || {
            let _batch = inner.write().unwrap();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
        });
        held.recv().unwrap();
        let started = Instant::now();
        let listed = (
            reader.token_accessors().await.unwrap(),
            reader.user_keys_under(String::new()).await.unwrap(),
            reader.kv_list("secret/".into(), String::new()).await.unwrap(),
        );
        let waited = started.elapsed();
        release.send(()).unwrap();
        applying.join().unwrap();
        assert!(waited < Duration::from_secs(30), "listed while a batch holds the state's lock: waited {waited:?}");
        assert_eq!(listed, (under_lock, keys(&["ann", "bob"]), keys(&["x"])));
    }

    fn login(hash: &str, parent: Option<&str>) -> citadel_core::command::Command {
        let entry = citadel_core::token::TokenEntry {
            hash: hash.into(),
            parent: parent.map(Into::into),
            username: Some("ann".into()),
            ..Default::default()
        };
        citadel_core::command::Command::TokenCreate { entry: Box::new(entry), login: None }
    }

    fn revoke(hash: &str) -> citadel_core::command::Command {
        citadel_core::command::Command::TokenRevoke { hash: hash.into() }
    }

    fn add_user(name: &str) -> citadel_core::command::Command {
        let user = User {
            username: name.into(),
            password_hash: format!("$argon2id$hash-of-{name}"),
            policies: vec!["default".into()],
            token_ttl_secs: 60,
            token_max_ttl_secs: 0,
        };
        citadel_core::command::Command::UserPut { user }
    }

    fn delete_user(name: &str) -> citadel_core::command::Command {
        citadel_core::command::Command::UserDelete { username: name.into() }
    }

    /// The keys of the tokens and users (`user:` and its name) in their tables; asserts that
    /// neither memory nor the saved state holds a token or user.
    fn held(sm: &StateMachine) -> Vec<String> {
        let in_memory = sm.reader().read(|s| (s.tokens.len(), s.users.len()));
        assert_eq!(in_memory, (0, 0), "memory holds no token or user between batches");
        let (tokens, users) = (TOKENS.read_all::<TokenEntry>(&sm.db).unwrap(), USERS.read_all::<User>(&sm.db).unwrap());
        if let Some(saved) = sm.db.read_meta::<StoredSnapshot>(KEY_STATE).unwrap() {
            let none = [saved.state.tokens.len(), saved.state.users.len(), saved.tokens.len(), saved.users.len()];
            assert_eq!(none, [0; 4], "the saved state holds no token or user");
        }
        tokens.into_keys().chain(users.into_keys().map(|u| format!("user:{u}"))).collect()
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    /// Empties the token and user tables, as a data directory of format 7 has them.
    fn no_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        TOKENS.write_changes::<TokenEntry>(txn, &StoredChanges { replace: true, ..Default::default() })?;
        USERS.write_changes::<User>(txn, &StoredChanges { replace: true, ..Default::default() })
    }

    #[tokio::test]
    async fn tokens_and_users_live_in_their_tables_not_in_the_saved_state_and_a_restarted_node_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let first =
            vec![init(), add_user("ann"), add_user("bob"), login("a", None), login("b", Some("a")), login("c", None)];
        apply(&mut sm, 0, first).await;
        apply(&mut sm, 6, vec![revoke("a"), delete_user("bob")]).await;
        let expected = keys(&["c", "root", "user:ann"]);
        assert_eq!(held(&sm), expected, "each batch's changes are written");
        drop(sm);

        let mut sm = open(dir.path());
        assert_eq!(sm.reader().applied_index(), 8);
        assert_eq!(held(&sm), expected);
        apply(&mut sm, 8, vec![add_user("dan")]).await;
        assert_eq!(held(&sm), keys(&["c", "root", "user:ann", "user:dan"]), "a write after a start adds to the tables");
    }

    #[tokio::test]
    async fn a_state_saved_with_its_tokens_and_users_by_format_7_moves_them_to_their_tables_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        apply(&mut sm, 0, vec![init(), add_user("ann"), login("a", None)]).await;
        // What a format-7 node saved: the whole state, tokens and users included, and no tables.
        let mut whole = sm.reader().read(State::clone);
        whole.users = USERS.read_all(&sm.db).unwrap().into();
        whole.tokens = TOKENS.read_all(&sm.db).unwrap().into();
        let db = sm.db.clone();
        drop(sm);
        let mut saved = db.read_meta::<StoredSnapshot>(KEY_STATE).unwrap().unwrap();
        (saved.format, saved.state) = (7, whole);
        db.commit(true, no_tables).unwrap();
        db.write_meta(KEY_STATE, &saved).unwrap();
        drop(db);

        let mut sm = open(dir.path());
        assert_eq!(held(&sm), keys(&["a", "root", "user:ann"]), "moved, and saved without them");
        apply(&mut sm, 3, vec![revoke("a"), delete_user("ann")]).await;
        drop(sm);
        let sm = open(dir.path());
        assert_eq!(held(&sm), ["root"], "read from the tables from then on");
    }

    #[tokio::test]
    async fn a_rebuild_from_the_snapshot_or_an_installed_snapshot_replaces_the_stored_tokens_and_users() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        apply(&mut sm, 0, vec![init(), add_user("ann"), login("a", None)]).await;
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let in_file: StoredSnapshot = codec::decode(&local_bytes(dir.path()), "snapshot").unwrap();
        assert!(in_file.state.tokens.is_empty() && in_file.state.users.is_empty(), "beside the state, not in it");
        assert_eq!(in_file.tokens.keys().chain(in_file.users.keys()).collect::<Vec<_>>(), ["a", "root", "ann"]);
        apply(&mut sm, 3, vec![revoke("a"), login("b", None), delete_user("ann"), add_user("bob")]).await;
        // A stop between durable commits: the store at entry 7, the saved state at 3.
        let saved_at_3 = sm.db.read_meta::<StoredSnapshot>(KEY_STATE).unwrap().unwrap();
        let db = sm.db.clone();
        drop(sm);
        db.write_meta(KEY_STATE, &saved_at_3).unwrap();
        drop(db);
        let snapshots = keys(&["a", "root", "user:ann"]);
        let sm = open(dir.path());
        assert_eq!(held(&sm), snapshots, "the snapshot's");
        drop(sm);

        let other = tempfile::tempdir().unwrap();
        let mut receiver = open(other.path());
        apply(&mut receiver, 0, vec![init(), add_user("stale"), login("stale", None)]).await;
        let (data, _, lines) = transfer(&open(dir.path()).reader(), snapshot.snapshot);
        let header: StoredSnapshot = codec::decode(&data, "transfer").unwrap();
        assert!(header.tokens.is_empty() && header.users.is_empty(), "no token or user in the header");
        assert_eq!(header.streamed_maps, Some(codec::StreamedMaps { tokens: 2, users: 1 }), "one line each");
        // Cut short among the tokens: nothing is installed.
        let cut = receive(&mut receiver, &snapshot.meta, &data, &lines[..1]).await.unwrap_err();
        assert!(cut.to_string().contains("1 of its tokens still due"), "{cut}");
        assert_eq!(held(&receiver), keys(&["root", "stale", "user:stale"]), "its own still");
        receive(&mut receiver, &snapshot.meta, &data, &lines).await.unwrap();
        assert_eq!(held(&receiver), snapshots, "the sender's, not its own");
        let of_ann = receiver.reader().read_with_store(|_, store| store.tokens_of_username("ann").unwrap());
        assert_eq!(of_ann, ["a"], "the indexes follow the tables: its own token of ann is gone from them");
    }

    #[tokio::test]
    async fn a_format_7_snapshot_with_its_tokens_and_users_in_its_state_still_rebuilds_and_transfers_them() {
        let dir = tempfile::tempdir().unwrap();
        let (sm, snapshot) = node_with_snapshot(dir.path(), vec![init(), add_user("ann"), login("a", None)]).await;
        let db = sm.db.clone();
        drop(sm);
        // What format 7 left: the tokens and users in the snapshot's state, and neither tables
        // nor (here) a saved state, so that the start rebuilds from the snapshot.
        let files = SnapshotFile::in_dir(dir.path());
        let mut record = files.read().unwrap().unwrap();
        let mut stored: StoredSnapshot = codec::decode(&record.data, "snapshot").unwrap();
        stored.state.tokens = std::mem::take(&mut stored.tokens).into();
        stored.state.users = std::mem::take(&mut stored.users).into();
        stored.format = 7;
        record.data = codec::encode(&stored);
        files.write(&record).unwrap();
        db.commit(true, |txn| {
            txn.open_table(META)?.remove(KEY_STATE)?;
            no_tables(txn)
        })
        .unwrap();
        drop(db);

        let all = keys(&["a", "root", "user:ann"]);
        let sm = open(dir.path());
        assert_eq!(held(&sm), all, "moved to the tables");
        let other = tempfile::tempdir().unwrap();
        let mut receiver = open(other.path());
        let (data, _, lines) = transfer(&sm.reader(), local_snapshot(dir.path()));
        receive(&mut receiver, &snapshot.meta, &data, &lines).await.unwrap();
        assert_eq!(held(&receiver), all);
    }

    /// A node that applied `commands` and built a snapshot of them.
    async fn node_with_snapshot(dir: &Path, commands: Vec<citadel_core::command::Command>) -> (StateMachine, Snapshot) {
        let mut node = open(dir);
        apply(&mut node, 0, commands).await;
        let snapshot = node.get_snapshot_builder().await.build_snapshot().await.unwrap();
        (node, snapshot)
    }

    /// Receives `lines` after the transfer form `data` and installs it.
    async fn receive(
        receiver: &mut StateMachine,
        meta: &SnapshotMeta,
        data: &[u8],
        lines: &[Vec<u8>],
    ) -> io::Result<()> {
        let mut receiving = receiver.reader().receive_snapshot(data, meta)?;
        lines.iter().try_for_each(|l| receiving.add(l))?;
        receiving.finish()?;
        receiver.install_snapshot(meta, SnapshotData::Received(data.to_vec())).await
    }

    /// The secrets `snapshot.bin` holds, by path and current version.
    fn secrets_in_snapshot_file(dir: &Path) -> Vec<(String, u64)> {
        let stored: StoredSnapshot = codec::decode(&local_bytes(dir), "snapshot").unwrap();
        stored.kv.into_iter().map(|e| (e.path, e.entry.current_version)).collect()
    }

    #[tokio::test]
    async fn a_snapshot_streams_its_secrets_line_by_line_and_installing_it_replaces_the_receivers() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sender, snapshot) =
            node_with_snapshot(from.path(), vec![init(), write("a", 1), write("a", 2), write("b", 1)]).await;
        let stored: StoredSnapshot = codec::decode(&local_bytes(from.path()), "snapshot").unwrap();
        let paths: Vec<_> = stored.kv.iter().map(|e| (e.path.as_str(), e.entry.current_version)).collect();
        assert_eq!(paths, [("a", 2), ("b", 1)]);
        assert!(stored.state.mounts["secret/"].kv.entries.is_empty(), "beside the state, not in it");

        let (data, secrets, lines) = transfer(&sender.reader(), snapshot.snapshot);
        let header: StoredSnapshot = codec::decode(&data, "transfer").unwrap();
        assert!(header.kv.is_empty(), "no secret in the header");
        assert_eq!(secrets, 2);
        let (root_token, secret_lines) = split_maps(&data, &lines);
        assert_eq!(root_token.len(), 1, "the root token's line first");
        let sent: Vec<kv_table::StoredKvEntry> =
            secret_lines.iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(sent, stored.kv, "one line each");

        let mut receiver = open(to.path());
        apply(&mut receiver, 0, vec![init(), write("stale", 1)]).await;
        receive(&mut receiver, &snapshot.meta, &data, &lines).await.unwrap();
        assert_eq!(stored_and_in_memory(&receiver.reader(), "a"), (Some(2), 0));
        assert_eq!(stored_and_in_memory(&receiver.reader(), "stale"), (None, 0), "the receiver's own secrets are gone");
        assert_eq!(
            secrets_in_snapshot_file(to.path()),
            [("a".into(), 2), ("b".into(), 1)],
            "read back into snapshot.bin"
        );
        drop(receiver);
        assert_eq!(stored_and_in_memory(&open(to.path()).reader(), "b"), (Some(1), 0), "installed durably");
    }

    #[tokio::test]
    async fn an_earlier_builds_snapshot_with_its_secrets_inline_still_installs() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sender, snapshot) = node_with_snapshot(from.path(), vec![init(), write("a", 1), write("b", 1)]).await;
        // An earlier build sent its local form as it is (no event here to take out) and no secret lines.
        let mut receiver = open(to.path());
        apply(&mut receiver, 0, vec![init(), write("stale", 1)]).await;
        // Secrets left staged by an abandoned transfer must not come back.
        let (data, _, lines) = transfer(&sender.reader(), snapshot.snapshot);
        let (root_token, lines) = split_maps(&data, &lines);
        let mut abandoned = receiver.reader().receive_snapshot(&data, &snapshot.meta).unwrap();
        root_token.iter().for_each(|l| abandoned.add(l).unwrap());
        let ghost = String::from_utf8(lines[0].clone()).unwrap().replace("\"path\":\"a\"", "\"path\":\"ghost\"");
        assert_ne!(ghost.as_bytes(), lines[0]);
        abandoned.add(ghost.as_bytes()).unwrap();
        abandoned.staging.commit().unwrap();
        drop(abandoned);

        receive(&mut receiver, &snapshot.meta, &local_bytes(from.path()), &[]).await.unwrap();
        assert_eq!(stored_and_in_memory(&receiver.reader(), "a"), (Some(1), 0));
        assert_eq!(stored_and_in_memory(&receiver.reader(), "stale"), (None, 0));
        assert_eq!(stored_and_in_memory(&receiver.reader(), "ghost"), (None, 0), "not from the abandoned transfer");
        assert_eq!(secrets_in_snapshot_file(to.path()), [("a".into(), 1), ("b".into(), 1)]);
    }

    #[tokio::test]
    async fn a_streamed_secret_of_no_mount_or_a_stream_cut_among_its_secrets_is_refused_and_installs_nothing() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sender, snapshot) = node_with_snapshot(from.path(), vec![init(), write("a", 1), write("b", 1)]).await;
        let (data, _, all_lines) = transfer(&sender.reader(), snapshot.snapshot);
        let (root_token, lines) = split_maps(&data, &all_lines);
        let after_root = |rest: &[Vec<u8>]| [root_token, rest].concat();
        let mut receiver = open(to.path());
        apply(&mut receiver, 0, vec![init(), write("mine", 1)]).await;

        let cut = receive(&mut receiver, &snapshot.meta, &data, &after_root(&lines[..1])).await.unwrap_err();
        assert!(cut.to_string().contains("1 of its secrets still due"), "{cut}");
        let refused =
            receiver.install_snapshot(&snapshot.meta, SnapshotData::Received(data.clone())).await.unwrap_err();
        assert!(refused.to_string().contains("did not all arrive"), "{refused}");

        let elsewhere = String::from_utf8(lines[0].clone()).unwrap().replace("\"secret/\"", "\"gone/\"");
        assert_ne!(elsewhere.as_bytes(), lines[0]);
        let elsewhere = after_root(&[elsewhere.into_bytes(), lines[1].clone()]);
        let refused = receive(&mut receiver, &snapshot.meta, &data, &elsewhere).await;
        assert!(refused.unwrap_err().to_string().contains("a secret of gone/, which is not one of its mounts"));
        let garbled =
            receive(&mut receiver, &snapshot.meta, &data, &after_root(&[b"{".to_vec(), lines[1].clone()])).await;
        assert!(garbled.unwrap_err().to_string().contains("not a secret"));
        assert_eq!(stored_and_in_memory(&receiver.reader(), "mine"), (Some(1), 0), "nothing installed");
        assert_eq!(receiver.reader().applied_index(), 2);
    }

    /// A node of format 5: `snapshot.bin` at index 7 holds secret `a` in its mount, and the
    /// audit store covers the snapshot.
    fn format_5_node(dir: &Path) -> StateMachine {
        let mut state = State::default();
        assert_eq!(state.apply(init()), Response::Done);
        assert!(matches!(state.apply(write("a", 1)), Response::KvWritten { .. }));
        write_snapshot(dir, 5, state);
        let db = Arc::new(Db::open(&dir.join(crate::DB_FILE)).unwrap());
        AuditStore::new(db).store(&[], 7, true, false).unwrap();
        open(dir)
    }

    #[test]
    fn a_format_5_snapshots_secrets_move_to_the_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let sm = format_5_node(dir.path());
        assert_eq!((sm.reader().applied_index(), stored_and_in_memory(&sm.reader(), "a")), (7, (Some(1), 0)));
        drop(sm);
        let again = open(dir.path());
        assert_eq!(stored_and_in_memory(&again.reader(), "a"), (Some(1), 0), "read from the store the next time");
    }

    #[tokio::test]
    async fn a_format_5_snapshot_sent_to_a_follower_streams_the_secrets_of_its_mounts() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // Opening moves the secrets to the store; snapshot.bin stays as it is until the next one.
        let sender = format_5_node(from.path());
        let (data, secrets, lines) = transfer(&sender.reader(), local_snapshot(from.path()));
        assert_eq!(secrets, 1, "the secret of its mount");
        let header: StoredSnapshot = codec::decode(&data, "transfer").unwrap();
        assert!(!holds_secrets_inline(&header), "taken out of the mounts");

        let mut receiver = open(to.path());
        receive(&mut receiver, &meta_at_7(), &data, &lines).await.unwrap();
        assert_eq!(stored_and_in_memory(&receiver.reader(), "a"), (Some(1), 0));
    }

    #[tokio::test]
    async fn a_snapshot_that_says_its_secrets_follow_but_holds_some_is_refused() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_sender, snapshot) = node_with_snapshot(from.path(), vec![init(), write("a", 1)]).await;
        let mut both: StoredSnapshot = codec::decode(&local_bytes(from.path()), "snapshot").unwrap();
        both.streamed_secrets = Some(0);
        let both = codec::encode(&both);
        let receiver = open(to.path());
        let Err(refused) = receiver.reader().receive_snapshot(&both, &snapshot.meta) else { panic!("received") };
        assert!(refused.to_string().contains("holds none inline"), "{refused}");
    }

    #[test]
    fn any_line_where_a_secret_is_due_is_staged_or_refused_without_panicking() {
        let valid = serde_json::to_vec(&kv_table::StoredKvEntry {
            mount: "secret/".into(),
            path: "a/b".into(),
            entry: citadel_core::kv::KvEntry::default(),
        })
        .unwrap();
        any_line_is_staged_or_refused(None, valid, |line| {
            let secret: kv_table::StoredKvEntry = serde_json::from_slice(line).unwrap();
            secret.mount == "secret/"
        });
    }

    #[test]
    fn any_line_where_a_token_is_due_is_staged_or_refused_without_panicking() {
        let token = serde_json::value::to_raw_value(&TokenEntry::default()).unwrap();
        let valid = serde_json::to_vec(&codec::TokenLineRef { key: "k", token: &token }).unwrap();
        let maps = codec::StreamedMaps { tokens: u64::MAX, users: u64::MAX };
        any_line_is_staged_or_refused(Some(maps), valid, |line| {
            serde_json::from_slice::<codec::TokenLine>(line).is_ok()
        });
    }

    /// Feeds a receiver that expects endless lines of one kind (tokens when `maps` says so,
    /// else secrets) `valid`, then arbitrary and mutated lines: each is taken (and `accepted`
    /// says it may be) or refused, never a panic.
    fn any_line_is_staged_or_refused(maps: Option<codec::StreamedMaps>, valid: Vec<u8>, accepted: fn(&[u8]) -> bool) {
        use proptest::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        assert_eq!(state.apply(init()), Response::Done);
        // Its root token would follow as a line.
        std::mem::take(&mut state.tokens);
        let transfer = codec::encode(&StoredSnapshot {
            format: citadel_core::command::FORMAT_VERSION,
            last_applied: Some(StoredLogId { term: 1, leader: 1, index: 7 }),
            membership: membership(),
            state,
            tokens: Default::default(),
            users: Default::default(),
            kv: vec![],
            streamed_secrets: Some(u64::MAX),
            streamed_maps: maps,
        });
        let reader = open(dir.path()).reader();
        let mut receiving = reader.receive_snapshot(&transfer, &meta_at_7()).unwrap();
        assert_eq!(receiving.lines_before_events(), u64::MAX, "counted without overflow");
        receiving.add(&valid).unwrap();
        let receiving = std::cell::RefCell::new(receiving);
        let lines = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..120),
            (0..valid.len(), any::<u8>()).prop_map(move |(at, byte)| {
                let mut line = valid.clone();
                line[at] = byte;
                line
            }),
        ];
        let config = ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() };
        proptest::test_runner::TestRunner::new(config)
            .run(&lines, |line| {
                if receiving.borrow_mut().add(&line).is_ok() {
                    prop_assert!(accepted(&line), "a line of another kind was taken");
                }
                Ok(())
            })
            .unwrap();
        receiving.into_inner().staging.commit().expect("what was taken is staged");
    }

    /// The record kept for `path` of `secret/`, as its bytes.
    fn raw_record(sm: &StateMachine, path: &str) -> Vec<u8> {
        let txn = redb::ReadableDatabase::begin_read(&sm.db.db).unwrap();
        let table = txn.open_table(kv_table::KV).unwrap();
        table.get(("secret/", path)).unwrap().unwrap().value().to_vec()
    }

    #[tokio::test]
    async fn a_secret_an_earlier_build_stored_as_json_still_reads_and_is_stored_binary_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        apply(&mut sm, 0, vec![init(), write("a", 1)]).await;
        assert_eq!(raw_record(&sm, "a")[0], 2, "written binary");
        // What a build before binary records left on disk: the same entry as JSON.
        let entry = sm.reader().read_with_store(|_, store| store.kv.entry("secret/", "a").unwrap().unwrap());
        sm.db
            .write(|txn| {
                txn.open_table(kv_table::KV)?.insert(("secret/", "a"), codec::encode(&entry).as_slice())?;
                Ok(())
            })
            .unwrap();
        drop(sm);

        let mut sm = open(dir.path());
        assert_eq!(raw_record(&sm, "a")[0], 1);
        assert_eq!(stored_and_in_memory(&sm.reader(), "a"), (Some(1), 0), "the JSON record reads");
        apply(&mut sm, 2, vec![write("a", 2)]).await;
        assert_eq!(raw_record(&sm, "a")[0], 2, "rewritten binary");
        let versions =
            sm.reader().read_with_store(|_, store| store.kv.entry("secret/", "a").unwrap().unwrap().versions);
        assert_eq!(versions[&1].ciphertext, b"a@1", "the old version came through");
        assert_eq!(versions[&2].ciphertext, b"a@2");
    }
}
