//! What the clients did, in real-time order, and the model it is checked against.
//!
//! Every key is a versioned register (Vault's KV v2): a write makes version `n + 1` hold a new,
//! unique value; a check-and-set writes only when the current version is the one given. The
//! history is linearizable per key when some order of its operations, respecting real time,
//! explains every answer the clients got.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use todc_utils::linearizability::history::{Action, History as TodcHistory};
use todc_utils::linearizability::WGLChecker;
use todc_utils::Specification;

/// A value written: unique across the run.
pub type ValueId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    Read,
    Write { value: ValueId },
    Cas { expected: u64, value: ValueId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A read saw `value` at `version` (0, 0: the key did not exist); a write made `version`.
    Ok { version: u64, value: ValueId },
    /// Definitely not applied (a check-and-set whose version did not match).
    Fail,
    /// No answer: the write may or may not have taken effect.
    Unknown,
    /// Says nothing and changed nothing: a read without a trustworthy answer (an error, or one
    /// marked stale), or a request that never reached a node.
    Dropped,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpRecord {
    pub id: usize,
    /// The client "process": a new one after every unknown outcome, since that operation stays
    /// open until the end of time.
    pub process: usize,
    pub key: usize,
    pub node: usize,
    pub kind: OpKind,
    pub invoked_ms: u64,
    pub completed_ms: Option<u64>,
    pub outcome: Option<Outcome>,
    pub request_id: Option<String>,
    /// For an unknown write, what the key's final version history says: `Some(Some(v))` it
    /// took effect as version `v`, `Some(None)` it never did, `None` the history cannot tell.
    pub resolved: Option<Option<u64>>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum Event {
    Invoke(usize),
    Complete(usize),
}

/// The shared recorder. Invocations and completions are appended under one lock, so the event
/// order is the real-time order.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Recorded>>,
    start: Instant,
}

#[derive(Default, Serialize, Deserialize)]
pub struct Recorded {
    pub ops: Vec<OpRecord>,
    pub events: Vec<Event>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder { inner: Default::default(), start: Instant::now() }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn invoke(&self, process: usize, key: usize, node: usize, kind: OpKind) -> usize {
        let invoked_ms = self.now_ms();
        let mut rec = self.inner.lock().expect("recorder lock");
        let id = rec.ops.len();
        rec.ops.push(OpRecord {
            id,
            process,
            key,
            node,
            kind,
            invoked_ms,
            completed_ms: None,
            outcome: None,
            request_id: None,
            resolved: None,
        });
        rec.events.push(Event::Invoke(id));
        id
    }

    pub fn complete(&self, id: usize, outcome: Outcome, request_id: Option<String>) {
        let completed_ms = self.now_ms();
        let mut rec = self.inner.lock().expect("recorder lock");
        let op = &mut rec.ops[id];
        assert!(op.outcome.is_none(), "operation {id} completed twice");
        op.outcome = Some(outcome);
        op.completed_ms = Some(completed_ms);
        op.request_id = request_id;
        rec.events.push(Event::Complete(id));
    }

    pub fn take(&self) -> Recorded {
        std::mem::take(&mut self.inner.lock().expect("recorder lock"))
    }
}

/// One operation as the model sees it, with its answer.
#[derive(Clone, Copy, Debug)]
pub enum RegisterOp {
    Read { version: u64, value: ValueId },
    Write { value: ValueId, version: Option<u64> },
    Cas { expected: u64, value: ValueId, result: CasResult },
}

#[derive(Clone, Copy, Debug)]
pub enum CasResult {
    Written(u64),
    Mismatch,
    Unknown,
}

/// Vault's KV v2 entry as a sequential object: (current version, its value).
pub struct VersionedRegister;

impl Specification for VersionedRegister {
    type State = (u64, ValueId);
    type Operation = RegisterOp;

    fn init() -> Self::State {
        (0, 0)
    }

    fn apply(op: &RegisterOp, state: &Self::State) -> (bool, Self::State) {
        let (current, _) = *state;
        match *op {
            RegisterOp::Read { version, value } => ((version, value) == *state, *state),
            // An unknown outcome whose response sits at the end of the history may be
            // linearized anywhere after its call; placed last, it is as if it never happened.
            RegisterOp::Write { value, version: None } => (true, (current + 1, value)),
            RegisterOp::Write { value, version: Some(v) } => (v == current + 1, (v, value)),
            RegisterOp::Cas { expected, value, result } => match result {
                CasResult::Written(v) => (expected == current && v == current + 1, (v, value)),
                CasResult::Mismatch => (expected != current, *state),
                CasResult::Unknown if expected == current => (true, (current + 1, value)),
                CasResult::Unknown => (true, *state),
            },
        }
    }
}

fn model_op(op: &OpRecord) -> Option<RegisterOp> {
    let outcome = op.outcome.unwrap_or(Outcome::Unknown);
    // A resolved unknown write is known to have happened (its answer still comes last: when it
    // took effect is unknown) or known never to have happened.
    let outcome = match (outcome, op.resolved) {
        (Outcome::Unknown, Some(None)) => return None,
        // The model takes a write's value from its kind; only the version matters here.
        (Outcome::Unknown, Some(Some(version))) => Outcome::Ok { version, value: 0 },
        (outcome, _) => outcome,
    };
    Some(match (op.kind, outcome) {
        (_, Outcome::Dropped) => return None,
        (OpKind::Read, Outcome::Ok { version, value }) => RegisterOp::Read { version, value },
        (OpKind::Read, _) => return None,
        (OpKind::Write { value }, Outcome::Ok { version, .. }) => RegisterOp::Write { value, version: Some(version) },
        (OpKind::Write { .. }, Outcome::Fail) => return None,
        (OpKind::Write { value }, Outcome::Unknown) => RegisterOp::Write { value, version: None },
        (OpKind::Cas { expected, value }, Outcome::Ok { version, .. }) => {
            RegisterOp::Cas { expected, value, result: CasResult::Written(version) }
        }
        (OpKind::Cas { expected, value }, Outcome::Fail) => {
            RegisterOp::Cas { expected, value, result: CasResult::Mismatch }
        }
        (OpKind::Cas { expected, value }, Outcome::Unknown) => {
            RegisterOp::Cas { expected, value, result: CasResult::Unknown }
        }
    })
}

/// The model's view of one key's history: calls and responses in real-time order, with the
/// responses of unknown outcomes moved to the end.
pub fn key_actions(rec: &Recorded, key: usize) -> Vec<(usize, Action<RegisterOp>)> {
    let mut actions = Vec::new();
    let mut open_ended = Vec::new();
    for event in &rec.events {
        let (Event::Invoke(id) | Event::Complete(id)) = *event;
        let op = &rec.ops[id];
        if op.key != key {
            continue;
        }
        let Some(model) = model_op(op) else { continue };
        let unknown = matches!(op.outcome, None | Some(Outcome::Unknown));
        match event {
            Event::Invoke(_) => {
                actions.push((op.process, Action::Call(model)));
                if unknown {
                    open_ended.push((op.process, Action::Response(model)));
                }
            }
            Event::Complete(_) if unknown => {}
            Event::Complete(_) => actions.push((op.process, Action::Response(model))),
        }
    }
    actions.extend(open_ended);
    actions
}

/// Whether one key's history is linearizable.
pub fn linearizable(actions: Vec<(usize, Action<RegisterOp>)>) -> bool {
    if actions.is_empty() {
        return true;
    }
    WGLChecker::<VersionedRegister>::is_linearizable(TodcHistory::from_actions(actions))
}

/// Resolves unknown writes against each key's complete version history (key → version →
/// value), which KV v2 keeps: values are unique, so a write took effect exactly when its value
/// holds some version. Keys whose history is incomplete stay unresolved.
pub fn resolve_unknown_writes(rec: &mut Recorded, histories: &BTreeMap<usize, BTreeMap<u64, ValueId>>) {
    let by_value: BTreeMap<(usize, ValueId), u64> =
        histories.iter().flat_map(|(k, versions)| versions.iter().map(move |(v, value)| ((*k, *value), *v))).collect();
    for op in &mut rec.ops {
        let (OpKind::Write { value } | OpKind::Cas { value, .. }) = op.kind else { continue };
        if !matches!(op.outcome, None | Some(Outcome::Unknown)) || !histories.contains_key(&op.key) {
            continue;
        }
        op.resolved = Some(by_value.get(&(op.key, value)).copied());
    }
}

/// Every acknowledged write: key → version → value.
pub fn acknowledged_writes(rec: &Recorded) -> BTreeMap<usize, BTreeMap<u64, ValueId>> {
    let mut writes: BTreeMap<usize, BTreeMap<u64, ValueId>> = BTreeMap::new();
    for op in &rec.ops {
        if let (OpKind::Write { value } | OpKind::Cas { value, .. }, Some(Outcome::Ok { version, .. })) =
            (op.kind, op.outcome)
        {
            writes.entry(op.key).or_default().insert(version, value);
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(ops: &[(usize, OpKind, Option<Outcome>)], order: &[Event]) -> Recorded {
        let ops = ops
            .iter()
            .enumerate()
            .map(|(id, (process, kind, outcome))| OpRecord {
                id,
                process: *process,
                key: 0,
                node: 0,
                kind: *kind,
                invoked_ms: 0,
                completed_ms: None,
                outcome: *outcome,
                request_id: None,
                resolved: None,
            })
            .collect();
        Recorded { ops, events: order.to_vec() }
    }

    use Event::{Complete as C, Invoke as I};

    #[test]
    fn sequential_writes_and_reads_are_linearizable() {
        let rec = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Ok { version: 1, value: 7 })),
                (1, OpKind::Read, Some(Outcome::Ok { version: 1, value: 7 })),
                (1, OpKind::Cas { expected: 1, value: 8 }, Some(Outcome::Ok { version: 2, value: 8 })),
                (0, OpKind::Cas { expected: 1, value: 9 }, Some(Outcome::Fail)),
            ],
            &[I(0), C(0), I(1), C(1), I(2), C(2), I(3), C(3)],
        );
        assert!(linearizable(key_actions(&rec, 0)));
    }

    #[test]
    fn a_read_older_than_a_completed_write_is_a_stale_read() {
        let rec = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Ok { version: 1, value: 7 })),
                (0, OpKind::Write { value: 8 }, Some(Outcome::Ok { version: 2, value: 8 })),
                (1, OpKind::Read, Some(Outcome::Ok { version: 1, value: 7 })),
            ],
            &[I(0), C(0), I(1), C(1), I(2), C(2)],
        );
        assert!(!linearizable(key_actions(&rec, 0)));
    }

    #[test]
    fn an_acknowledged_write_missing_from_later_reads_is_caught() {
        // Write 7 acknowledged as version 1; a later write also claims version 1: one was lost.
        let rec = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Ok { version: 1, value: 7 })),
                (1, OpKind::Write { value: 8 }, Some(Outcome::Ok { version: 1, value: 8 })),
            ],
            &[I(0), C(0), I(1), C(1)],
        );
        assert!(!linearizable(key_actions(&rec, 0)));
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        let applied = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Unknown)),
                (1, OpKind::Read, Some(Outcome::Ok { version: 1, value: 7 })),
            ],
            &[I(0), I(1), C(1)],
        );
        assert!(linearizable(key_actions(&applied, 0)));
        let not_applied = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Unknown)),
                (1, OpKind::Read, Some(Outcome::Ok { version: 0, value: 0 })),
            ],
            &[I(0), I(1), C(1)],
        );
        assert!(linearizable(key_actions(&not_applied, 0)));
        // But it cannot take effect before it was invoked.
        let too_early = history(
            &[
                (1, OpKind::Read, Some(Outcome::Ok { version: 1, value: 7 })),
                (0, OpKind::Write { value: 7 }, Some(Outcome::Unknown)),
            ],
            &[I(0), C(0), I(1)],
        );
        assert!(!linearizable(key_actions(&too_early, 0)));
    }

    #[test]
    fn resolving_an_unknown_write_pins_it_down() {
        // Write 7's answer was lost; reads saw version 1 = 7, then version 1 = 8.
        let mut rec = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Unknown)),
                (1, OpKind::Read, Some(Outcome::Ok { version: 1, value: 7 })),
                (1, OpKind::Write { value: 8 }, Some(Outcome::Ok { version: 2, value: 8 })),
            ],
            &[I(0), I(1), C(1), I(2), C(2)],
        );
        let truth = BTreeMap::from([(0, BTreeMap::from([(1, 7), (2, 8)]))]);
        resolve_unknown_writes(&mut rec, &truth);
        assert_eq!(rec.ops[0].resolved, Some(Some(1)));
        assert!(linearizable(key_actions(&rec, 0)));
        // Had the final history said write 7 never happened, the read of 7 is unexplained.
        let lie = BTreeMap::from([(0, BTreeMap::from([(1, 9), (2, 8)]))]);
        rec.ops[0].resolved = None;
        resolve_unknown_writes(&mut rec, &lie);
        assert_eq!(rec.ops[0].resolved, Some(None));
        assert!(!linearizable(key_actions(&rec, 0)));
    }

    #[test]
    fn dropped_reads_say_nothing() {
        let rec = history(
            &[
                (0, OpKind::Write { value: 7 }, Some(Outcome::Ok { version: 1, value: 7 })),
                (1, OpKind::Read, Some(Outcome::Dropped)),
            ],
            &[I(0), C(0), I(1), C(1)],
        );
        assert!(linearizable(key_actions(&rec, 0)));
        assert_eq!(acknowledged_writes(&rec)[&0][&1], 7);
    }
}
