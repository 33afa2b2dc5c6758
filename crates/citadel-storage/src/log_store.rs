//! The Raft log on `raft-log` (§2, §9.3): an append-only, group-committed record log.
//!
//! Why this shape: `append` only queues the entries (they are readable at once, from raft-log's
//! cache) and asks raft-log's flush thread for an fsync; openraft learns the entries are durable
//! from `IOFlushed`, which fires after that fsync. So the leader's fsync runs while the entries
//! are already travelling to the followers, and one fsync covers every entry queued meanwhile.
//!
//! Inside raft-log's own checksummed records, every entry is one of Citadel's versioned,
//! checksummed records ([`codec`]), so the meaning of the bytes stays ours to version.
//!
//! Failure policy: a torn or zeroed tail (a crash mid-write: nothing acknowledged is in it) is
//! cut at open, with a warning naming the file; a complete record that fails its checksum stops
//! the node, naming the file. A failed fsync or write is never retried: the log is marked
//! failed, every later operation fails, and [`LogStore::failures`] tells the server to stop (a
//! retried fsync can report success for data the kernel already dropped).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::{Decode, Encode};
use raft_log::{RaftLog, WALRecord};
use tokio::sync::{oneshot, watch};

use crate::codec::{self, Identity, StoredEntry, StoredLogId, StoredVote};
use crate::types::{Entry, LogId, TypeConfig, Vote};
use crate::StorageOpenError;

/// Directory of the log inside a node's data directory.
pub const LOG_DIR: &str = "raft-log";

/// The largest record the log accepts or reads back. A request body is at most 1 MiB and an
/// append carries at most 64 entries, so this is never reached by a valid entry; it bounds the
/// memory a damaged length field could make a read allocate.
const MAX_RECORD: usize = 64 << 20;
/// Entries kept in memory for readers (followers catching up): recent ones are read from here,
/// older ones from disk.
const CACHE_ENTRIES: usize = 20_000;
const CACHE_BYTES: usize = 32 << 20;
/// A chunk file is closed and a new one started at this size; purging deletes whole chunks.
const CHUNK_BYTES: usize = 32 << 20;
const READ_BUFFER: usize = 1 << 20;
/// Decoded copies of the newest entries ([`RecentEntries`]), by count and by encoded size.
const RECENT_ENTRIES: usize = 1024;
const RECENT_BYTES: usize = 8 << 20;

/// Citadel's types for raft-log.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub(crate) struct WalTypes;

impl raft_log::Types for WalTypes {
    type LogId = StoredLogId;
    type LogPayload = Record;
    type Vote = StoredVote;
    type Callback = Flushed;
    type UserData = Record;

    fn log_index(log_id: &StoredLogId) -> u64 {
        log_id.index
    }

    fn payload_size(payload: &Record) -> u64 {
        payload.0.len() as u64
    }
}

/// One of Citadel's own records ([`codec::encode`]), length-prefixed inside raft-log's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record(Vec<u8>);

impl Encode for Record {
    fn encode<W: io::Write>(&self, mut w: W) -> io::Result<usize> {
        if self.0.len() > MAX_RECORD {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a log record is larger than 64 MiB"));
        }
        w.write_all(&(self.0.len() as u32).to_be_bytes())?;
        w.write_all(&self.0)?;
        Ok(4 + self.0.len())
    }
}

impl Decode for Record {
    fn decode<R: io::Read>(mut r: R) -> io::Result<Record> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RECORD {
            // Not `UnexpectedEof`: a damaged length must stop the node, not be cut as a torn tail.
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a record claims {len} bytes")));
        }
        let mut bytes = vec![0; len];
        r.read_exact(&mut bytes)?;
        Ok(Record(bytes))
    }
}

impl Encode for StoredLogId {
    fn encode<W: io::Write>(&self, mut w: W) -> io::Result<usize> {
        Ok(self.term.encode(&mut w)? + self.leader.encode(&mut w)? + self.index.encode(&mut w)?)
    }
}

impl Decode for StoredLogId {
    fn decode<R: io::Read>(mut r: R) -> io::Result<StoredLogId> {
        Ok(StoredLogId { term: u64::decode(&mut r)?, leader: u64::decode(&mut r)?, index: u64::decode(&mut r)? })
    }
}

impl Encode for StoredVote {
    fn encode<W: io::Write>(&self, mut w: W) -> io::Result<usize> {
        Ok(self.term.encode(&mut w)? + self.node.encode(&mut w)? + self.committed.encode(&mut w)?)
    }
}

impl Decode for StoredVote {
    fn decode<R: io::Read>(mut r: R) -> io::Result<StoredVote> {
        Ok(StoredVote { term: u64::decode(&mut r)?, node: u64::decode(&mut r)?, committed: bool::decode(&mut r)? })
    }
}

/// Why the log can no longer be trusted; the server stops on it.
pub type LogFailure = watch::Receiver<Option<String>>;

/// Who waits for a flush: openraft (an append) or this store (a vote, a truncation).
enum Waiter {
    Raft(IOFlushed<TypeConfig>),
    Store(oneshot::Sender<io::Result<()>>),
}

/// raft-log's flush callback. Dropped without being called means raft-log's flush thread
/// stopped (a write failed): reported as a failure, never as silence.
pub(crate) struct Flushed {
    waiter: Option<Waiter>,
    failure: Arc<watch::Sender<Option<String>>>,
    dir: PathBuf,
    /// When the flush was asked for, and who hears how long it took (Raft appends only).
    queued: Instant,
    observer: Option<Arc<dyn DiskObserver>>,
}

impl Flushed {
    fn complete(&mut self, result: io::Result<()>) {
        if let Err(e) = &result {
            let message = format!(
                "writing the Raft log in {} failed: {e}. The node stops rather than trust the disk: check \
                 it (space, errors in the kernel log), then restart the node",
                self.dir.display()
            );
            tracing::error!("{message}");
            self.failure.send_if_modified(|current| {
                let first = current.is_none();
                if first {
                    *current = Some(message);
                }
                first
            });
        }
        if let (Ok(()), Some(observer)) = (&result, &self.observer) {
            observer.log_flushed(self.queued.elapsed());
        }
        match self.waiter.take() {
            Some(Waiter::Raft(callback)) => callback.io_completed(result),
            Some(Waiter::Store(tx)) => {
                let _ = tx.send(result);
            }
            None => {}
        }
    }
}

impl raft_log::Callback for Flushed {
    fn send(mut self, result: io::Result<()>) {
        self.complete(result);
    }
}

impl Drop for Flushed {
    fn drop(&mut self) {
        if self.waiter.is_some() {
            self.complete(Err(io::Error::other("the log's flush thread stopped before this write was flushed")));
        }
    }
}

#[derive(Clone)]
pub struct LogStore {
    log: Arc<Mutex<RaftLog<WalTypes>>>,
    /// Changed only under `log`'s lock, so it is always a suffix of the log.
    recent: Arc<Mutex<RecentEntries>>,
    dir: PathBuf,
    failure: Arc<watch::Sender<Option<String>>>,
    observer: Option<Arc<dyn DiskObserver>>,
}

/// Where the log reports how long its flushes took; the metrics live above storage.
pub trait DiskObserver: Send + Sync {
    /// From an append's flush request to the fsync that made it durable.
    fn log_flushed(&self, took: std::time::Duration);
}

impl LogStore {
    /// Reports each Raft append's flush time to `observer` from now on.
    pub fn observe_flushes(&mut self, observer: Arc<dyn DiskObserver>) {
        self.observer = Some(observer);
    }

    /// Opens the log in `dir`, verifying every record; refuses another node's log.
    pub(crate) fn open(dir: &Path, node_id: u64) -> Result<LogStore, StorageOpenError> {
        crate::files::create_private_dir(dir).map_err(StorageOpenError::Files)?;
        let before = chunk_sizes(dir);
        let log = RaftLog::<WalTypes>::open(Arc::new(config(dir))).map_err(|e| opening_error(dir, e))?;
        for (path, size) in before {
            let now = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(size);
            if now < size {
                tracing::warn!(file = %path.display(), cut = size - now, "cut the torn tail of the Raft log left by a crash (its last write was never acknowledged)");
            }
        }
        let store = LogStore {
            log: Arc::new(Mutex::new(log)),
            recent: Arc::default(),
            dir: dir.to_path_buf(),
            failure: Arc::new(watch::channel(None).0),
            observer: None,
        };
        store.check_identity(node_id)?;
        Ok(store)
    }

    /// Tells when the log has failed and the node must stop, and why.
    pub fn failures(&self) -> LogFailure {
        self.failure.subscribe()
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_identity(&self, node_id: u64) -> Result<(), StorageOpenError> {
        let corrupt = |e: io::Error| StorageOpenError::Corrupt(self.dir.clone(), e.to_string());
        let saved = self.lock().map_err(corrupt)?.log_state().user_data.clone();
        match saved {
            Some(Record(bytes)) => {
                let id: Identity =
                    codec::decode(&bytes, &format!("{} identity", self.dir.display())).map_err(corrupt)?;
                if id.node_id != node_id {
                    return Err(StorageOpenError::Foreign {
                        path: self.dir.clone(),
                        found: id.node_id,
                        expected: node_id,
                    });
                }
                Ok(())
            }
            None => {
                let id = Identity { node_id, format: citadel_core::command::FORMAT_VERSION };
                let wait = self
                    .with_log(|log| log.save_user_data(Some(Record(codec::encode(&id)))).map(drop))
                    .map_err(corrupt)?;
                futures::executor::block_on(wait).map_err(corrupt)
            }
        }
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, RaftLog<WalTypes>>> {
        self.check_not_failed()?;
        Ok(self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A failed log serves nothing: neither its records nor what it holds decoded.
    fn check_not_failed(&self) -> io::Result<()> {
        match self.failure.borrow().as_ref() {
            Some(why) => Err(io::Error::other(why.clone())),
            None => Ok(()),
        }
    }

    fn recent(&self) -> MutexGuard<'_, RecentEntries> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flushed(&self, waiter: Waiter) -> Flushed {
        let observer = matches!(waiter, Waiter::Raft(_)).then(|| self.observer.clone()).flatten();
        Flushed {
            waiter: Some(waiter),
            failure: self.failure.clone(),
            dir: self.dir.clone(),
            queued: Instant::now(),
            observer,
        }
    }

    /// Runs `f` on the log, then queues a flush; the future resolves once all of it is durable.
    fn with_log(
        &self,
        f: impl FnOnce(&mut RaftLog<WalTypes>) -> io::Result<()>,
    ) -> io::Result<impl std::future::Future<Output = io::Result<()>>> {
        let (tx, rx) = oneshot::channel();
        let mut log = self.lock()?;
        f(&mut log)?;
        log.flush(Some(self.flushed(Waiter::Store(tx))))?;
        Ok(async move { rx.await.map_err(|_| io::Error::other("the log's flush thread stopped"))? })
    }

    /// Writes a format-2 log into this (new, empty) log and waits until it is durable.
    pub(crate) fn import(&self, old: crate::import::OldLog) -> io::Result<()> {
        let last = old.entries.last().map(|e| e.log_id).or(old.purged);
        let wait = self.with_log(|log| {
            if let Some(vote) = old.vote {
                log.save_vote(vote)?;
            }
            if let Some(purged) = old.purged {
                log.purge(purged)?;
            }
            log.append(old.entries.iter().map(|e| (e.log_id, Record(codec::encode(e)))))?;
            if let Some(committed) = old.committed.filter(|c| Some(*c) <= last) {
                log.commit(committed)?;
            }
            Ok(())
        })?;
        futures::executor::block_on(wait)
    }

    fn read_range(&self, start: u64, end: Bound<u64>) -> io::Result<Vec<Entry>> {
        let log = self.lock()?;
        let last = log.log_state().last().map_or(0, |l| l.index + 1);
        let end = match end {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => e,
            Bound::Unbounded => last,
        }
        .min(last);
        if start >= end {
            // raft-log's map panics on a reversed range (one starting past the log's end).
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(end.saturating_sub(start).min(1024) as usize);
        for item in log.read(start, end) {
            let (log_id, Record(bytes)) = item.map_err(|e| self.err(e))?;
            let what = format!("{} log entry {}", self.dir.display(), log_id.index);
            let stored: StoredEntry = codec::decode(&bytes, &what)?;
            if stored.log_id != log_id {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: stored under another log id")));
            }
            out.push(stored.into_entry()?);
        }
        Ok(out)
    }

    fn err(&self, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("{}: {e}", self.dir.display()))
    }
}

fn config(dir: &Path) -> raft_log::Config {
    raft_log::Config {
        dir: dir.display().to_string(),
        log_cache_max_items: Some(CACHE_ENTRIES),
        log_cache_capacity: Some(CACHE_BYTES),
        read_buffer_size: Some(READ_BUFFER),
        chunk_max_size: Some(CHUNK_BYTES),
        truncate_incomplete_record: Some(true),
        ..Default::default()
    }
}

/// The chunk files of a log and their sizes.
fn chunk_sizes(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "wal") {
                if let Ok(meta) = entry.metadata() {
                    out.push((path, meta.len()));
                }
            }
        }
    }
    out.sort();
    out
}

/// raft-log does not say which file it could not read: find it, so the message can.
fn opening_error(dir: &Path, e: io::Error) -> StorageOpenError {
    if e.kind() == io::ErrorKind::WouldBlock {
        return StorageOpenError::Io(
            dir.to_path_buf(),
            format!("{e} (is another citadel running on this data directory?)"),
        );
    }
    match first_damaged_record(dir) {
        Some((path, offset, why)) => {
            StorageOpenError::Corrupt(path, format!("the record at byte {offset} is damaged ({why})"))
        }
        None => StorageOpenError::Corrupt(dir.to_path_buf(), e.to_string()),
    }
}

/// Reads every chunk as raft-log does and returns the first record that does not decode and
/// is not a cuttable tail.
pub(crate) fn first_damaged_record(dir: &Path) -> Option<(PathBuf, u64, String)> {
    for (path, size) in chunk_sizes(dir) {
        let file = File::open(&path).ok()?;
        let mut reader = Counting { inner: BufReader::new(file), read: 0 };
        while reader.read < size {
            let at = reader.read;
            match WALRecord::<WalTypes>::decode(&mut reader) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => {
                    let rest_is_zero = std::fs::read(&path).ok()?.get(at as usize..)?.iter().all(|b| *b == 0);
                    if rest_is_zero {
                        break;
                    }
                    return Some((path, at, e.to_string()));
                }
            }
        }
    }
    None
}

struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = range.end_bound().cloned();
        self.check_not_failed()?;
        if let Some(entries) = self.recent().range(start, end) {
            return Ok(entries);
        }
        let store = self.clone();
        // A range far behind the cache is read from disk: off the async threads.
        tokio::task::spawn_blocking(move || store.read_range(start, end)).await.map_err(io::Error::other)?
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock()?.log_state().vote().cloned().map(Into::into))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let log = self.lock()?;
        let state = log.log_state();
        Ok(LogState {
            last_purged_log_id: state.purged().copied().map(Into::into),
            last_log_id: state.last().copied().map(Into::into),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let stored = StoredVote::from(vote);
        let wait = self.with_log(|log| {
            // raft-log refuses a vote that goes back only after writing it: check first, so a
            // refused vote never reaches the file.
            let goes_back = log.log_state().vote().is_some_and(|current| {
                !matches!(stored.partial_cmp(current), Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal))
            });
            if goes_back {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("vote {stored:?} is older than the saved one"),
                ));
            }
            log.save_vote(stored).map(drop)
        })?;
        // openraft must not act on a vote before it is durable.
        wait.await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not needed for safety (a leader recomputes it): it lets a restarted node re-apply what
        // it had committed without waiting for a leader. Written without an fsync of its own; it
        // is made durable by the next append's.
        let Some(committed) = committed else { return Ok(()) };
        let stored = StoredLogId::from(&committed);
        let mut log = self.lock()?;
        if log.log_state().committed().is_some_and(|current| stored <= *current) {
            return Ok(());
        }
        log.commit(stored)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock()?.log_state().committed().copied().map(Into::into))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let records: Vec<(StoredLogId, Record)> = entries
            .iter()
            .map(|e| {
                let stored = StoredEntry::from(e);
                (stored.log_id, Record(codec::encode(&stored)))
            })
            .collect();
        if let Some((_, Record(bytes))) = records.iter().find(|(_, r)| r.0.len() > MAX_RECORD) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a log entry of {} bytes", bytes.len())));
        }
        let mut log = self.lock()?;
        // raft-log refuses a hole only after writing the record: check first.
        let mut next = log.log_state().last().map(|l| l.index + 1);
        for (id, _) in &records {
            if next.is_some_and(|n| n != id.index) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("appending entry {} would leave a hole after {:?}", id.index, next.map(|n| n - 1)),
                ));
            }
            next = Some(id.index + 1);
        }
        let sizes: Vec<usize> = records.iter().map(|(_, Record(bytes))| bytes.len()).collect();
        log.append(records)?;
        self.recent().push(entries.into_iter().zip(sizes));
        // Returns now: the flush thread tells openraft after the fsync that covers these entries.
        log.flush(Some(self.flushed(Waiter::Raft(callback))))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let wait = self.with_log(|log| {
            if log.log_state().last().is_some_and(|last| last.index >= from) {
                self.recent().truncate(from);
                log.truncate(from)?;
            }
            Ok(())
        })?;
        wait.await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let stored = StoredLogId::from(&log_id);
        let wait = self.with_log(|log| {
            self.recent().purge(log_id.index);
            log.purge(stored).map(drop)
        })?;
        wait.await
    }
}

/// The newest entries, decoded, as appended: a leader sends each new entry to every follower
/// right after appending it, and the state machine applies it soon after, on every node. Read
/// back from the log, each read would cost a blocking-pool hop, a checksum and a JSON decode.
/// Holds a contiguous run that ends at the log's last entry, or nothing.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn push(&mut self, appended: impl IntoIterator<Item = (Entry, usize)>) {
        for (entry, size) in appended {
            if self.entries.back().is_some_and(|(last, _)| last.log_id.index + 1 != entry.log_id.index) {
                self.clear();
            }
            self.bytes += size;
            self.entries.push_back((entry, size));
            while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
                let Some((_, size)) = self.entries.pop_front() else { break };
                self.bytes -= size;
            }
        }
    }

    /// Forgets entries from index `from` on (the log is being cut there).
    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= from) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets entries up to index `upto` (the log is being purged through it).
    fn purge(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|(e, _)| e.log_id.index <= upto) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Copies of the entries from `start` to `end`, if all of them are here. An end past the
    /// last entry means the last entry, as when reading the log.
    fn range(&self, start: u64, end: Bound<u64>) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.0.log_id.index;
        let last = self.entries.back()?.0.log_id.index;
        let end = match end {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => e,
            Bound::Unbounded => last + 1,
        }
        .min(last + 1);
        if start < first {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let skip = usize::try_from(start - first).ok()?;
        Some(self.entries.iter().skip(skip).take((end - start) as usize).map(|(e, _)| e.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_core::command::Command;
    use openraft::entry::RaftEntry;

    fn entry(index: u64, bytes: usize) -> Entry {
        let id = LogId::new(crate::types::LeaderId { term: 1, node_id: 1 }, index);
        Entry::new_normal(id, Command::MountDisable { path: "x".repeat(bytes) })
    }

    /// Appends `count` entries of `bytes` each after the log's end and waits for their flush.
    async fn append(store: &mut LogStore, from: u64, count: u64, bytes: usize) -> io::Result<()> {
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        store.append((from..from + count).map(|i| entry(i, bytes)), IOFlushed::signal(tx)).await?;
        rx.await.map_err(|_| io::Error::other("flush callback dropped"))?
    }

    /// Every range around `indexes`, read through the recent entries and straight from the
    /// log, must be the same entries.
    async fn assert_reads_match_the_log(store: &mut LogStore, indexes: &[u64]) {
        for &start in indexes {
            for &end in indexes.iter().filter(|e| **e >= start) {
                let read = store.try_get_log_entries(start..end).await.unwrap();
                let from_log = store.read_range(start, Bound::Excluded(end)).unwrap();
                assert!(read == from_log, "entries {start}..{end} differ from the log's");
            }
        }
    }

    #[tokio::test]
    async fn reads_served_from_the_recent_entries_match_the_log_through_appends_truncations_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        let n = RECENT_ENTRIES as u64 + 300;
        append(&mut store, 1, n / 2, 10).await.unwrap();
        append(&mut store, n / 2 + 1, n - n / 2, 300).await.unwrap();
        assert_eq!(store.recent().entries.len(), RECENT_ENTRIES, "bounded by count");
        assert!(store.recent().range(n - 5, Bound::Unbounded).is_some(), "the newest are served from memory");
        let edges = [1, 2, 299, 300, 301, n / 2, n - 200, n - 1, n, n + 1, n + 5];
        assert_reads_match_the_log(&mut store, &edges).await;

        // A new leader overwrites the tail: the cache must not serve the old term's entries.
        let cut = n - 100;
        store.truncate_after(Some(LogId::new(crate::types::LeaderId { term: 1, node_id: 1 }, cut))).await.unwrap();
        assert_reads_match_the_log(&mut store, &[cut - 1, cut, cut + 1, cut + 2]).await;
        let term_2 = |i: u64, path: String| {
            Entry::new_normal(
                LogId::new(crate::types::LeaderId { term: 2, node_id: 2 }, i),
                Command::MountDisable { path },
            )
        };
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        store
            .append((cut + 1..cut + 51).map(|i| term_2(i, format!("entry {i}"))), IOFlushed::signal(tx))
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
        let newest = store.try_get_log_entries(cut + 50..cut + 51).await.unwrap();
        assert_eq!(newest[0].log_id.leader_id.term, 2);
        store.purge(LogId::new(crate::types::LeaderId { term: 1, node_id: 1 }, n - 300)).await.unwrap();
        let oldest_held = store.recent().entries.front().map(|(e, _)| e.log_id.index);
        assert!(oldest_held.is_some_and(|i| i > n - 300), "purged entries are not held: {oldest_held:?}");
        let edges = [n - 299, n - 150, cut - 1, cut, cut + 1, cut + 2, cut + 50, cut + 51, cut + 60];
        assert_reads_match_the_log(&mut store, &edges).await;

        // Large entries are bounded by bytes, not count.
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        store
            .append((cut + 51..cut + 56).map(|i| term_2(i, "x".repeat(3 << 20))), IOFlushed::signal(tx))
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
        assert!(store.recent().bytes <= RECENT_BYTES && store.recent().entries.len() < 5);
        assert_reads_match_the_log(&mut store, &[cut + 40, cut + 51, cut + 53, cut + 55, cut + 56]).await;
    }

    async fn last_index(store: &mut LogStore) -> Option<u64> {
        store.get_log_state().await.unwrap().last_log_id.map(|l| l.index)
    }

    fn only_chunk(dir: &Path) -> PathBuf {
        let chunks = chunk_sizes(dir);
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        chunks[0].0.clone()
    }

    #[test]
    fn a_damaged_length_is_refused_as_damage_not_cut_as_a_torn_tail() {
        let mut bytes = Vec::new();
        Record(vec![7; 10]).encode(&mut bytes).unwrap();
        bytes[0] = 0xff;
        let err = Record::decode(&bytes[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let err = Record::decode(&bytes[..3]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "a short record is a torn tail: {err}");
    }

    #[tokio::test]
    async fn appended_entries_survive_a_reopen_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        append(&mut store, 1, 20, 100).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        assert_eq!(last_index(&mut store).await, Some(20));
        let read = store.try_get_log_entries(5..=7).await.unwrap();
        assert_eq!(read.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(read[0], entry(5, 100));
        let err = LogStore::open(&tempfile::tempdir().unwrap().path().join("x"), 1).map(drop);
        assert!(err.is_ok(), "a new log opens empty");
    }

    #[tokio::test]
    async fn another_nodes_log_is_refused_naming_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        drop(LogStore::open(dir.path(), 1).unwrap());
        let err = LogStore::open(dir.path(), 2).map(drop).unwrap_err();
        assert!(matches!(&err, StorageOpenError::Foreign { found: 1, expected: 2, .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_back_to_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        append(&mut store, 1, 10, 100).await.unwrap();
        drop(store);
        // A crash in the middle of the last write: its record is cut short.
        let chunk = only_chunk(dir.path());
        let len = std::fs::metadata(&chunk).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&chunk).unwrap().set_len(len - 20).unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        assert_eq!(last_index(&mut store).await, Some(9), "the torn entry is gone, the ones before it stay");
        append(&mut store, 10, 1, 100).await.unwrap();
        assert_eq!(last_index(&mut store).await, Some(10), "the log goes on after the cut");
    }

    #[tokio::test]
    async fn a_zeroed_tail_is_cut_and_every_whole_record_stays() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        append(&mut store, 1, 10, 100).await.unwrap();
        drop(store);
        // Some file systems grow the file before its data reaches the disk: zeros after a crash.
        let chunk = only_chunk(dir.path());
        let mut file = std::fs::OpenOptions::new().append(true).open(&chunk).unwrap();
        std::io::Write::write_all(&mut file, &[0; 4096]).unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        assert_eq!(last_index(&mut store).await, Some(10));
    }

    #[tokio::test]
    async fn a_damaged_last_record_stops_the_open_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1).unwrap();
        append(&mut store, 1, 10, 100).await.unwrap();
        drop(store);
        // A complete record whose bytes changed: not a crash, damage. Never cut silently.
        let chunk = only_chunk(dir.path());
        let mut bytes = std::fs::read(&chunk).unwrap();
        let at = bytes.len() - 30;
        bytes[at] ^= 0x01;
        std::fs::write(&chunk, bytes).unwrap();
        let err = LogStore::open(dir.path(), 1).map(drop).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StorageOpenError::Corrupt(..)), "{message}");
        assert!(message.contains(&chunk.display().to_string()) && message.contains("damaged"), "{message}");
    }

    /// Whether the test command found that this machine cannot mount (it then says so loudly).
    fn mounting_is_impossible_here() -> bool {
        let skip = std::env::var("CITADEL_SKIP_MOUNT_TESTS").is_ok_and(|v| v == "1");
        if skip {
            eprintln!("SKIPPED: this machine cannot mount file systems (CITADEL_SKIP_MOUNT_TESTS=1)");
        }
        skip
    }

    /// A small file system mounted for the life of the value. Needs root, as the test command
    /// runs; every mount and loop device is undone on drop.
    struct SmallDisk {
        root: tempfile::TempDir,
        mounts: Vec<PathBuf>,
        loop_device: Option<String>,
    }

    impl SmallDisk {
        fn run(command: &str, args: &[&str]) -> String {
            let out =
                std::process::Command::new(command).args(args).output().unwrap_or_else(|e| panic!("{command}: {e}"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{command} {args:?} failed (these tests run as root): {stderr}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }

        fn tmpfs(bytes: u64) -> SmallDisk {
            let root = tempfile::tempdir().unwrap();
            let at = root.path().to_str().unwrap().to_string();
            Self::run("mount", &["-t", "tmpfs", "-o", &format!("size={bytes}"), "citadel-test", &at]);
            SmallDisk { root, mounts: vec![at.into()], loop_device: None }
        }

        /// ext4 on a loop device whose backing file lives on a tmpfs of `backing` bytes: writes
        /// land in the page cache, and the fsync that pushes them to the full backing store
        /// fails with EIO, as a failing disk's does.
        fn failing_ext4(backing: u64) -> SmallDisk {
            let mut disk = Self::tmpfs(backing);
            let image = disk.root.path().join("image");
            let image = image.to_str().unwrap();
            Self::run("truncate", &["-s", "32M", image]);
            Self::run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", image]);
            let device = Self::run("losetup", &["-f", "--show", image]);
            disk.loop_device = Some(device.clone());
            let mount = disk.root.path().join("fs");
            std::fs::create_dir(&mount).unwrap();
            Self::run("mount", &["-o", "errors=continue", &device, mount.to_str().unwrap()]);
            disk.mounts.push(mount);
            disk
        }

        fn path(&self) -> PathBuf {
            self.mounts.last().unwrap().join("log")
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            while let Some(mount) = self.mounts.pop() {
                let _ = std::process::Command::new("umount").arg(&mount).status();
                if let Some(device) = self.loop_device.take() {
                    let _ = std::process::Command::new("losetup").args(["-d", &device]).status();
                }
            }
        }
    }

    /// Appends until the disk fails, then checks that the log reports it and takes nothing more.
    async fn fill_until_the_disk_fails(dir: &Path) -> io::Error {
        let mut store = LogStore::open(dir, 1).unwrap();
        let failures = store.failures();
        let mut next = 1;
        let err = loop {
            match append(&mut store, next, 4, 16 << 10).await {
                Ok(()) => next += 4,
                Err(e) => break e,
            }
            assert!(next < 10_000, "the small disk never failed");
        };
        assert!(next > 1, "some entries fit before the disk failed: {err}");
        let why = failures.borrow().clone().expect("the failure is reported to the server");
        assert!(why.contains(&dir.display().to_string()), "{why}");
        // Never retried: whatever the disk does next, this log takes no more writes.
        let again = append(&mut store, next, 1, 10).await.unwrap_err();
        assert!(again.to_string().contains("failed"), "{again}");
        assert!(store.save_vote(&Vote::new(2, 1)).await.is_err(), "nor a vote");
        err
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_append_and_the_log_stops_for_good() {
        if mounting_is_impossible_here() {
            return;
        }
        let disk = SmallDisk::tmpfs(256 << 10);
        let err = fill_until_the_disk_fails(&disk.path()).await;
        assert!(err.to_string().contains("stopped") || err.raw_os_error() == Some(libc::ENOSPC), "{err}");
    }

    #[tokio::test]
    async fn an_fsync_error_fails_the_append_and_the_log_stops_for_good() {
        if mounting_is_impossible_here() {
            return;
        }
        let disk = SmallDisk::failing_ext4(6 << 20);
        let err = fill_until_the_disk_fails(&disk.path()).await;
        // raft-log passes the error on as text: EIO's.
        assert!(err.to_string().contains("Input/output error"), "the fsync's own error reaches openraft: {err}");
    }
}
