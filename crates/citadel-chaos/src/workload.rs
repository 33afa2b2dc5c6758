//! Concurrent clients over a few keys: writes of unique values, linearizable reads, and
//! check-and-set, each recorded at invocation and completion.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel_client::{Client, ClientError, HeaderMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::history::{OpKind, Outcome, Recorder, ValueId};

/// How long a client waits for one answer before calling the outcome unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// A client pauses this long after a failure, so a dead node is not hammered.
const BACKOFF: Duration = Duration::from_millis(50);

/// Versions KV v2 keeps per key in a run (`max_versions`, the engine's ceiling).
pub const MAX_VERSIONS: u64 = 1000;

/// Clients stop writing a key once they have seen it reach this version. The margin below
/// `MAX_VERSIONS` is far more than clients that have not yet seen it can still write, so no
/// version is evicted: every unknown write can then be resolved, and the checker never has to
/// search over writes that may or may not have happened (that search is exponential).
pub const VERSION_BUDGET: u64 = MAX_VERSIONS - 100;

pub fn key_path(key: usize) -> String {
    format!("chaos/k{key}")
}

/// What the clients share.
pub struct Workload {
    pub recorder: Recorder,
    /// One client per node slot (root token).
    pub clients: Vec<Client>,
    pub keys: usize,
    next_process: AtomicUsize,
    next_value: AtomicU64,
}

impl Workload {
    pub fn new(recorder: Recorder, clients: Vec<Client>, keys: usize) -> Arc<Workload> {
        Arc::new(Workload { recorder, clients, keys, next_process: AtomicUsize::new(0), next_value: AtomicU64::new(1) })
    }

    pub fn new_process(&self) -> usize {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    fn new_value(&self) -> ValueId {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }

    /// Performs one operation against `node`, recording it. Returns the outcome.
    pub async fn perform(&self, process: usize, node: usize, key: usize, kind: OpKind) -> Outcome {
        let id = self.recorder.invoke(process, key, node, kind);
        let client = &self.clients[node];
        let path = format!("secret/data/{}", key_path(key));
        let answer = match kind {
            OpKind::Read => tokio::time::timeout(OP_TIMEOUT, client.raw("GET", &path, None, &[])).await,
            OpKind::Write { value } => {
                let body = json!({ "data": { "v": value.to_string() } });
                tokio::time::timeout(OP_TIMEOUT, client.raw("POST", &path, Some(&body), &[])).await
            }
            OpKind::Cas { expected, value } => {
                let body = json!({ "data": { "v": value.to_string() }, "options": { "cas": expected } });
                tokio::time::timeout(OP_TIMEOUT, client.raw("POST", &path, Some(&body), &[])).await
            }
        };
        let (outcome, request_id) = match answer {
            Ok(Ok(reply)) => {
                let request_id =
                    reply.headers.get("x-citadel-request-id").and_then(|v| v.to_str().ok()).map(String::from);
                (classify(kind, reply.status.as_u16(), &reply.headers, &reply.body), request_id)
            }
            // A request that never got a connection cannot have done anything.
            Ok(Err(ClientError::Transport { source, .. })) if source.is_connect() => (Outcome::Dropped, None),
            Ok(Err(_)) | Err(_) => (unanswered(kind), None),
        };
        self.recorder.complete(id, outcome, request_id);
        outcome
    }

    /// Writes `key`'s first value through `node`, retrying until one write is acknowledged or
    /// `deadline` passes. A cluster that has just formed may still be connecting its peers, so
    /// a first attempt can end unknown. Each retry is a new process with a new value, as a
    /// client's would be: the unknown write stays open in the history for the checker.
    pub async fn create_key(&self, node: usize, key: usize, deadline: Instant) -> Result<(), Outcome> {
        let mut value = 1_000_000 + key as u64;
        loop {
            let outcome = self.perform(self.new_process(), node, key, OpKind::Write { value }).await;
            match outcome {
                Outcome::Ok { .. } => return Ok(()),
                _ if Instant::now() > deadline => return Err(outcome),
                _ => {
                    tokio::time::sleep(BACKOFF).await;
                    value = self.new_value();
                }
            }
        }
    }

    /// One client: random operations until told to stop. Its node is `home` until that node
    /// fails to answer, then a random one.
    pub async fn run_client(
        self: Arc<Self>,
        home: usize,
        seed: u64,
        nodes: Vec<usize>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut process = self.new_process();
        let mut node = home;
        // The last version this client saw per key: what its check-and-set expects.
        let mut seen = vec![0u64; self.keys];
        while !*stop.borrow_and_update() {
            let key = rng.gen_range(0..self.keys);
            let kind = match rng.gen_range(0..10) {
                _ if seen[key] >= VERSION_BUDGET => OpKind::Read,
                0..=3 => OpKind::Read,
                4..=7 => OpKind::Write { value: self.new_value() },
                _ => OpKind::Cas { expected: seen[key], value: self.new_value() },
            };
            match self.perform(process, node, key, kind).await {
                Outcome::Ok { version, .. } => seen[key] = version,
                Outcome::Fail => {}
                Outcome::Unknown => {
                    // That operation stays open forever: this client continues as a new process.
                    process = self.new_process();
                    node = nodes[rng.gen_range(0..nodes.len())];
                    tokio::time::sleep(BACKOFF).await;
                }
                Outcome::Dropped => {
                    node = nodes[rng.gen_range(0..nodes.len())];
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }
}

fn unanswered(kind: OpKind) -> Outcome {
    match kind {
        OpKind::Read => Outcome::Dropped,
        _ => Outcome::Unknown,
    }
}

/// What an answer says about the operation. Only answers that prove the outcome count; any
/// other error leaves a write unknown (it may have been proposed) and a read dropped.
fn classify(kind: OpKind, status: u16, headers: &HeaderMap, body: &Value) -> Outcome {
    let error_says = |what: &dyn Fn(&str) -> bool| {
        body["errors"].as_array().is_some_and(|errors| errors.iter().any(|e| e.as_str().is_some_and(what)))
    };
    let cas_mismatch = || error_says(&|e| e.contains("check-and-set parameter did not match"));
    let refused_up_front = || error_says(&|e| e == "Vault is sealed" || e.contains("leaving the cluster"));
    match (kind, status) {
        (OpKind::Read, 200) => {
            if headers.contains_key("x-citadel-stale") {
                return Outcome::Dropped;
            }
            let version = body["data"]["metadata"]["version"].as_u64();
            let value = body["data"]["data"]["v"].as_str().and_then(|v| v.parse().ok());
            match (version, value) {
                (Some(version), Some(value)) => Outcome::Ok { version, value },
                _ => Outcome::Dropped,
            }
        }
        // A stale replica's "not found" proves nothing either.
        (OpKind::Read, 404) if headers.contains_key("x-citadel-stale") => Outcome::Dropped,
        (OpKind::Read, 404) => Outcome::Ok { version: 0, value: 0 },
        (OpKind::Read, _) => Outcome::Dropped,
        (OpKind::Write { value } | OpKind::Cas { value, .. }, 200) => match body["data"]["version"].as_u64() {
            Some(version) => Outcome::Ok { version, value },
            None => Outcome::Unknown,
        },
        (OpKind::Cas { .. }, 400) if cas_mismatch() => Outcome::Fail,
        // Refused before anything was proposed.
        (_, 503) if refused_up_front() => Outcome::Dropped,
        _ => Outcome::Unknown,
    }
}
