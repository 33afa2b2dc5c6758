//! The node's audit spool: every event is appended and fsynced here before the client gets its
//! answer (fail closed), then shipped into the replicated audit log through Raft.
//!
//! The spool is a JSON-lines file of chained events. A torn final line (a crash mid-write, so the
//! request it records was never answered) is cut off at start; damage anywhere else stops the
//! node with a message naming the file.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use citadel_core::audit::{verify_chain, AuditBody, AuditEvent, RefusalSummary, GENESIS};
use citadel_core::{NodeId, UnixMillis};
use citadel_storage::files::{create_private_dir, open_private, FileError, PRIVATE_FILE};

use crate::node::Node;

/// What the writer thread keeps: the file and the chain's head.
struct SpoolFile {
    file: File,
    next_seq: u64,
    last_hash: String,
    export: Option<File>,
}

/// One request's event on its way to the writer thread, and who waits for it.
struct Append {
    body: AuditBody,
    done: tokio::sync::oneshot::Sender<std::result::Result<AuditEvent, String>>,
}

/// The most events one write and fsync carry: a backlog is written in bounded pieces.
const MAX_GROUP: usize = 1024;

pub struct AuditSpool {
    node: NodeId,
    path: PathBuf,
    /// To the writer thread, which numbers, chains, appends and fsyncs events in groups; the
    /// thread ends when the spool is dropped.
    appends: std::sync::mpsc::Sender<Append>,
    /// The last sequence written and fsynced.
    last_seq: Arc<std::sync::atomic::AtomicU64>,
    /// Durable events not yet confirmed in the replicated log, in sequence order.
    pending: Arc<Mutex<Vec<AuditEvent>>>,
    /// Why the writer failed, once it has: the node stops on it (`server.rs`).
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
    pub new_event: tokio::sync::Notify,
}

impl AuditSpool {
    pub fn open(dir: &Path, node: NodeId, export: Option<&Path>) -> Result<Arc<AuditSpool>> {
        create_private_dir(dir)?;
        let path = dir.join("audit.spool");
        let events = read_spool(&path, node)?;
        let file = open_private(&path, OpenOptions::new().create(true).append(true))
            .with_context(|| format!("cannot open audit spool {}", path.display()))?;
        let export = export
            .map(|p| {
                // The operator's own path (it may be a link to a log pipe): private, but followed.
                std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), PRIVATE_FILE)
                    .open(p)
                    .with_context(|| format!("cannot open audit export {}", p.display()))
            })
            .transpose()?;
        let (next_seq, last_hash) =
            events.last().map_or((1, GENESIS.to_string()), |e| (e.body().seq + 1, e.hash.clone()));
        let spool = SpoolFile { file, next_seq, last_hash, export };
        let last_seq = Arc::new(std::sync::atomic::AtomicU64::new(next_seq - 1));
        let pending = Arc::new(Mutex::new(events));
        let (appends, queue) = std::sync::mpsc::channel();
        let failure = Arc::new(tokio::sync::watch::channel(None).0);
        let writer = Writer {
            node,
            path: path.clone(),
            spool,
            last_seq: last_seq.clone(),
            pending: pending.clone(),
            failure: failure.clone(),
            failed: None,
        };
        std::thread::Builder::new()
            .name("citadel-audit-spool".into())
            .spawn(move || writer.run(queue))
            .with_context(|| format!("cannot start the writer of audit spool {}", path.display()))?;
        Ok(Arc::new(AuditSpool {
            node,
            path,
            appends,
            last_seq,
            pending,
            failure,
            new_event: tokio::sync::Notify::new(),
        }))
    }

    /// Numbers, chains, appends and fsyncs one event. Only after this returns may the request it
    /// describes be answered.
    pub async fn record(self: &Arc<Self>, body: AuditBody) -> Result<AuditEvent> {
        let stopped = || anyhow!("the writer of audit spool {} has stopped", self.path.display());
        let (done, written) = tokio::sync::oneshot::channel();
        self.appends.send(Append { body, done }).map_err(|_| stopped())?;
        let event = written.await.map_err(|_| stopped())?.map_err(|e| anyhow!(e))?;
        self.new_event.notify_one();
        Ok(event)
    }

    /// Up to `max` events after `shipped_seq` (the replicated log's last sequence for this node).
    pub fn unshipped(&self, shipped_seq: u64, max: usize) -> Vec<AuditEvent> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|e| e.body().seq > shipped_seq);
        pending.iter().take(max).cloned().collect()
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Tells when the spool has failed and the node must stop, and why.
    pub fn failures(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The spool's one writer. Requests queue while it fsyncs, and the next round writes all of
/// them with one `write` and one `fdatasync` (group commit): under 64 readers the previous
/// design, a blocking-pool thread per event taking turns on two locks, kept 64 threads and a
/// tenth of the leader's CPU in the spool's fsyncs alone.
struct Writer {
    node: NodeId,
    path: PathBuf,
    spool: SpoolFile,
    last_seq: Arc<std::sync::atomic::AtomicU64>,
    pending: Arc<Mutex<Vec<AuditEvent>>>,
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// Set by the first failed write or fsync, and then the answer to every append: after it the
    /// file may end in a torn line, and after a failed fsync the kernel may have dropped pages it
    /// had accepted. The node stops on it; a restart cuts the torn tail, and nothing is ever
    /// appended after damage.
    failed: Option<String>,
}

impl Writer {
    fn run(mut self, queue: std::sync::mpsc::Receiver<Append>) {
        while let Ok(first) = queue.recv() {
            let mut group = vec![first];
            group.extend(queue.try_iter().take(MAX_GROUP - 1));
            let (bodies, waiting): (Vec<_>, Vec<_>) = group.into_iter().map(|a| (a.body, a.done)).unzip();
            match self.append(bodies) {
                Ok(events) => {
                    self.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(events.iter().cloned());
                    for (done, event) in waiting.into_iter().zip(events) {
                        let _ = done.send(Ok(event));
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    for done in waiting {
                        let _ = done.send(Err(why.clone()));
                    }
                }
            }
        }
    }

    /// Writes and fsyncs `bodies` as the next events of the chain. On an error none of them
    /// counts: the chain's head stays where it was.
    fn append(&mut self, bodies: Vec<AuditBody>) -> Result<Vec<AuditEvent>> {
        if let Some(why) = &self.failed {
            return Err(anyhow!("{why}"));
        }
        let (mut seq, mut hash) = (self.spool.next_seq, self.spool.last_hash.clone());
        let mut lines = Vec::new();
        let mut events = Vec::with_capacity(bodies.len());
        for mut body in bodies {
            body.node = self.node;
            body.seq = seq;
            let event = AuditEvent::seal(body, &hash);
            serde_json::to_writer(&mut lines, &event)?;
            lines.push(b'\n');
            seq += 1;
            hash = event.hash.clone();
            events.push(event);
        }
        let written = self.spool.file.write_all(&lines).and_then(|()| self.spool.file.sync_data());
        if let Err(e) = written {
            let why = format!(
                "cannot write audit spool {}: {e}; the node stops: free or fix the disk, then start it again",
                self.path.display()
            );
            tracing::error!("{why}");
            self.failed = Some(why.clone());
            self.failure.send_replace(Some(why.clone()));
            return Err(anyhow!(why));
        }
        if let Some(export) = self.spool.export.as_mut() {
            // The export sink is a convenience copy; the spool is the durable record.
            let _ = export.write_all(&lines);
        }
        self.spool.next_seq = seq;
        self.spool.last_hash = hash;
        self.last_seq.store(seq - 1, std::sync::atomic::Ordering::Release);
        Ok(events)
    }
}

pub use citadel_core::audit::cap_for_audit;

/// Why a request was refused before anyone was authenticated. Such refusals are summarized
/// instead of audited one by one (see [`RefusalLog`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No token, or one that does not resolve (403).
    NoValidToken,
    /// A login for a user that does not exist (400, the same answer as a wrong password).
    UnknownUser,
    /// A login refused by the login limiter's backoff (429).
    LoginThrottled,
    /// A login refused because every password-hashing slot stayed busy (503).
    HashPoolBusy,
}

impl RefusalReason {
    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::NoValidToken => "no_valid_token",
            RefusalReason::UnknownUser => "unknown_user",
            RefusalReason::LoginThrottled => "login_throttled",
            RefusalReason::HashPoolBusy => "hash_pool_busy",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            RefusalReason::NoValidToken => 403,
            RefusalReason::UnknownUser => 400,
            RefusalReason::LoginThrottled => 429,
            RefusalReason::HashPoolBusy => 503,
        }
    }
}

/// Sample paths kept per summary.
const SAMPLE_PATHS: usize = 3;
/// The source recorded for refusals beyond the table's bound.
pub const OTHER_SOURCES: &str = "other";

struct Tally {
    count: u64,
    first: UnixMillis,
    last: UnixMillis,
    operation: String,
    samples: Vec<String>,
}

/// Counts refusals per (source address, reason) between summaries (§8.3). A flood of bogus
/// tokens or guessed user names then costs the replicated audit log one event per source and
/// reason per interval, not one per request. The table is bounded: sources beyond it are counted
/// together under [`OTHER_SOURCES`].
pub struct RefusalLog {
    tallies: Mutex<HashMap<(String, RefusalReason), Tally>>,
    max_keys: usize,
    max_path_bytes: usize,
}

impl RefusalLog {
    pub fn new(max_keys: usize, max_path_bytes: usize) -> RefusalLog {
        RefusalLog { tallies: Mutex::new(HashMap::new()), max_keys, max_path_bytes }
    }

    pub fn note(&self, source: &str, reason: RefusalReason, operation: &str, path: &str, now: UnixMillis) {
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (source.to_string(), reason);
        if !tallies.contains_key(&key) && tallies.len() >= self.max_keys {
            key.0 = OTHER_SOURCES.to_string();
        }
        let tally = tallies.entry(key).or_insert_with(|| Tally {
            count: 0,
            first: now,
            last: now,
            operation: operation.to_string(),
            samples: Vec::new(),
        });
        tally.count += 1;
        tally.last = tally.last.max(now);
        if tally.samples.len() < SAMPLE_PATHS {
            tally.samples.push(cap_for_audit(path, self.max_path_bytes));
        }
    }

    /// Empties the table into one `refusal_summary` event per key.
    pub fn drain(&self) -> Vec<AuditBody> {
        let tallies = std::mem::take(&mut *self.tallies.lock().unwrap_or_else(|p| p.into_inner()));
        let mut events: Vec<AuditBody> = tallies
            .into_iter()
            .map(|((source, reason), tally)| AuditBody {
                time: tally.last,
                kind: "refusal_summary".into(),
                operation: tally.operation,
                path: tally.samples.first().cloned().unwrap_or_default(),
                remote_addr: source,
                status: reason.status(),
                error: format!("{} requests refused ({})", tally.count, reason.name()),
                summary: Some(RefusalSummary {
                    reason: reason.name().into(),
                    count: tally.count,
                    first: tally.first,
                    last: tally.last,
                    sample_paths: tally.samples,
                }),
                ..AuditBody::default()
            })
            .collect();
        events.sort_by(|a, b| (a.time, &a.remote_addr).cmp(&(b.time, &b.remote_addr)));
        events
    }
}

/// Writes the refusal summaries once per interval, through the spool (fsynced, then shipped).
/// A refusal is therefore durable within one interval rather than before its answer: the
/// deviation from §1.4 recorded in docs/ARCHITECTURE.md.
pub async fn write_refusal_summaries(app: Arc<Node>) {
    let interval = Duration::from_millis(app.config.audit.refusal_summary_interval_ms);
    loop {
        tokio::time::sleep(interval).await;
        for body in app.refusals.drain() {
            match app.audit.record(body).await {
                Ok(_) => app.metrics.observe_audit_event(),
                Err(e) => tracing::error!(error = %e, "cannot write a refusal summary to the audit spool"),
            }
        }
    }
}

fn read_spool(path: &Path, node: NodeId) -> Result<Vec<AuditEvent>> {
    let file = match open_private(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(FileError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!("cannot read audit spool: {e}")),
    };
    let mut events = Vec::new();
    let mut good_len: u64 = 0;
    let mut lines = BufReader::new(file).split(b'\n').peekable();
    let mut line_no = 0;
    while let Some(line) = lines.next() {
        line_no += 1;
        let line = line.with_context(|| format!("cannot read audit spool {}", path.display()))?;
        let is_last = lines.peek().is_none();
        match serde_json::from_slice::<AuditEvent>(&line) {
            Ok(event) => {
                events.push(event);
                good_len += line.len() as u64 + 1;
            }
            Err(_) if is_last => {
                tracing::warn!(file = %path.display(), line = line_no, "cutting off a torn final audit record");
                break;
            }
            Err(e) => {
                return Err(anyhow!(
                    "audit spool {} is damaged at line {line_no} ({e}); move it aside and run `citadel audit verify` \
                     against the cluster to see what the replicated log holds",
                    path.display()
                ))
            }
        }
    }
    verify_chain(node, &events).map_err(|e| {
        anyhow!(
            "audit spool {} fails verification: {e}; it was altered or belongs to another node. Move it aside and investigate",
            path.display()
        )
    })?;
    let actual = std::fs::metadata(path)?.len();
    if actual != good_len {
        let file = open_private(path, OpenOptions::new().write(true))?;
        file.set_len(good_len)?;
        file.sync_all()?;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_audit_fields_are_cut_with_a_visible_marker() {
        assert_eq!(cap_for_audit("secret/data/app", 64), "secret/data/app");
        let long = "é".repeat(400);
        let capped = cap_for_audit(&long, 101);
        assert!(capped.starts_with(&"é".repeat(50)), "cut at a character boundary");
        assert!(capped.ends_with("…[truncated 700 bytes]"), "{capped}");
        assert!(capped.len() < 101 + 32);
    }

    fn body(path: &str) -> AuditBody {
        AuditBody { path: path.into(), kind: "request".into(), ..AuditBody::default() }
    }

    #[tokio::test]
    async fn events_survive_reopen_and_continue_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let spool = AuditSpool::open(dir.path(), 3, None).unwrap();
        spool.record(body("a")).await.unwrap();
        spool.record(body("b")).await.unwrap();
        drop(spool);
        let spool = AuditSpool::open(dir.path(), 3, None).unwrap();
        let third = spool.record(body("c")).await.unwrap();
        assert_eq!(third.body().seq, 3);
        let all = spool.unshipped(0, 100);
        assert_eq!(verify_chain(3, &all), Ok(()));
        assert_eq!(spool.unshipped(2, 100).len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_events_are_grouped_into_one_gapless_chain_each_answered_with_its_own_event() {
        let dir = tempfile::tempdir().unwrap();
        let spool = AuditSpool::open(dir.path(), 4, None).unwrap();
        let records = (0..300).map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move { (i, spool.record(body(&format!("p{i}"))).await.unwrap()) })
        });
        let answered = futures::future::join_all(records).await;
        for answer in &answered {
            let (i, event) = answer.as_ref().unwrap();
            assert_eq!(event.body().path, format!("p{i}"), "each request is answered with its own event");
        }
        let mut seqs: Vec<u64> = answered.iter().map(|a| a.as_ref().unwrap().1.body().seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
        assert_eq!(spool.last_seq(), 300);
        assert_eq!(verify_chain(4, &spool.unshipped(0, 1000)), Ok(()));
        drop(spool);
        let spool = AuditSpool::open(dir.path(), 4, None).unwrap();
        assert_eq!(spool.record(body("after")).await.unwrap().body().seq, 301, "the chain goes on after a restart");
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_and_earlier_damage_stops_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let spool = AuditSpool::open(dir.path(), 1, None).unwrap();
        spool.record(body("a")).await.unwrap();
        spool.record(body("b")).await.unwrap();
        drop(spool);
        let path = dir.path().join("audit.spool");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"node\":1,\"se").unwrap();
        drop(f);
        let spool = AuditSpool::open(dir.path(), 1, None).unwrap();
        assert_eq!(spool.last_seq(), 2);
        drop(spool);

        let text = std::fs::read_to_string(&path).unwrap().replacen(r#"\"a\""#, r#"\"forged\""#, 1);
        std::fs::write(&path, text).unwrap();
        let err = AuditSpool::open(dir.path(), 1, None).err().unwrap().to_string();
        assert!(err.contains("audit.spool") && err.contains("tampered"), "{err}");
    }

    #[test]
    fn refusals_are_counted_per_source_and_reason_into_one_event_each() {
        let log = RefusalLog::new(100, 64);
        for i in 0..1000 {
            log.note("10.0.0.66", RefusalReason::NoValidToken, "read", &format!("secret/data/{i}"), 5 + i);
        }
        log.note("10.0.0.66", RefusalReason::UnknownUser, "update", "auth/userpass/login/ghost", 7);
        log.note("10.0.0.7", RefusalReason::NoValidToken, "read", "sys/mounts", 9);
        let events = log.drain();
        assert_eq!(events.len(), 3);
        let flood = events.iter().find(|e| e.remote_addr == "10.0.0.66" && e.status == 403).unwrap();
        let summary = flood.summary.as_ref().unwrap();
        assert_eq!((summary.count, summary.first, summary.last), (1000, 5, 1004));
        assert_eq!(summary.reason, "no_valid_token");
        assert_eq!(summary.sample_paths, ["secret/data/0", "secret/data/1", "secret/data/2"]);
        assert_eq!(flood.kind, "refusal_summary");
        assert!(log.drain().is_empty(), "a drained table starts afresh");
    }

    #[test]
    fn the_refusal_table_is_bounded_by_an_other_bucket() {
        let log = RefusalLog::new(10, 64);
        for i in 0..5000u32 {
            let long_path = format!("secret/{}", "x".repeat(1000));
            log.note(&format!("10.{}.{}.1", i / 256, i % 256), RefusalReason::NoValidToken, "read", &long_path, 1);
            assert!(log.tallies.lock().unwrap().len() <= 11);
        }
        let events = log.drain();
        let other = events.iter().find(|e| e.remote_addr == OTHER_SOURCES).unwrap();
        assert_eq!(other.summary.as_ref().unwrap().count, 4990);
        assert!(other.path.len() < 64 + 32 && other.path.contains("truncated"), "{}", other.path);
    }
}
