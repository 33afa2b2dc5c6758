//! Audit events and the per-node hash chain that makes tampering and loss detectable.
//!
//! Each node numbers its events 1, 2, 3 … and links each to the previous one by hash:
//! `hash = SHA-256(prev_hash || canonical JSON of the body)`. The replicated audit log accepts a
//! node's events only in sequence and only if the link holds, and ignores a sequence number it
//! already has, so shipping is idempotent: at least once on the wire, exactly once in the log.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{NodeId, UnixMillis};

/// The `prev_hash` of a node's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditBody {
    pub node: NodeId,
    pub seq: u64,
    pub time: UnixMillis,
    /// The id the client got back with its answer (`request_id`, `X-Citadel-Request-Id`), so
    /// an answer can be matched to its event.
    #[serde(default)]
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
    /// every other event, so their encoding (and chain hash) is what it always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<RefusalSummary>,
    /// Only on `cluster_event` events: what changed (e.g. `term 7, leader 2`), never a secret.
    /// Absent from every other event, so their encoding (and chain hash) is what it always was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(flatten)]
    pub body: AuditBody,
    pub prev_hash: String,
    pub hash: String,
}

pub fn chain_hash(prev_hash: &str, body: &AuditBody) -> String {
    let mut digest = Sha256::new();
    digest.update(prev_hash.as_bytes());
    digest.update(serde_json::to_vec(body).expect("audit body serializes"));
    hex::encode(digest.finalize())
}

impl AuditEvent {
    pub fn seal(body: AuditBody, prev_hash: &str) -> AuditEvent {
        let hash = chain_hash(prev_hash, &body);
        AuditEvent { body, prev_hash: prev_hash.to_string(), hash }
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
}

/// One node's chain as replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeChain {
    pub events: Vec<AuditEvent>,
}

impl NodeChain {
    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(0, |e| e.body.seq)
    }

    pub fn last_hash(&self) -> &str {
        self.events.last().map_or(GENESIS, |e| e.hash.as_str())
    }

    /// Appends `event` if it is the next link; returns `Ok(false)` for an already-held sequence.
    pub fn append(&mut self, node: NodeId, event: AuditEvent) -> Result<bool, ChainError> {
        if event.body.node != node {
            return Err(ChainError::WrongNode { node, found: event.body.node });
        }
        let expected = self.last_seq() + 1;
        if event.body.seq < expected {
            return Ok(false);
        }
        if event.body.seq > expected {
            return Err(ChainError::Gap { node, expected, found: event.body.seq });
        }
        check_link(self.last_hash(), &event)?;
        self.events.push(event);
        Ok(true)
    }
}

fn check_link(prev_hash: &str, event: &AuditEvent) -> Result<(), ChainError> {
    let (node, seq) = (event.body.node, event.body.seq);
    if event.prev_hash != prev_hash {
        return Err(ChainError::BrokenLink { node, seq });
    }
    if chain_hash(prev_hash, &event.body) != event.hash {
        return Err(ChainError::Tampered { node, seq });
    }
    Ok(())
}

/// Verifies a sequence of events from one node, starting at sequence 1.
pub fn verify_chain(node: NodeId, events: &[AuditEvent]) -> Result<(), ChainError> {
    let mut prev = GENESIS.to_string();
    for (i, event) in events.iter().enumerate() {
        if event.body.node != node {
            return Err(ChainError::WrongNode { node, found: event.body.node });
        }
        let expected = i as u64 + 1;
        if event.body.seq != expected {
            return Err(ChainError::Gap { node, expected, found: event.body.seq });
        }
        check_link(&prev, event)?;
        prev = event.hash.clone();
    }
    Ok(())
}

/// The replicated audit log: one chain per node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    pub chains: BTreeMap<NodeId, NodeChain>,
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
            let node = event.body.node;
            let (last_seq, last_hash) = tips.entry(node).or_insert_with(|| {
                let chain = self.chains.get(&node);
                (chain.map_or(0, NodeChain::last_seq), chain.map_or(GENESIS, NodeChain::last_hash).to_string())
            });
            if event.body.seq <= *last_seq {
                continue;
            }
            // `seq > last_seq` here, so `last_seq + 1` cannot overflow.
            if event.body.seq != *last_seq + 1 {
                return Err(ChainError::Gap { node, expected: *last_seq + 1, found: event.body.seq });
            }
            check_link(last_hash, &event)?;
            *last_seq = event.body.seq;
            last_hash.clone_from(&event.hash);
            accepted.push(event);
        }
        let count = accepted.len();
        for event in accepted {
            self.chains.entry(event.body.node).or_default().events.push(event);
        }
        Ok(count)
    }

    pub fn verify(&self) -> Result<usize, ChainError> {
        let mut total = 0;
        for (node, chain) in &self.chains {
            verify_chain(*node, &chain.events)?;
            total += chain.events.len();
        }
        Ok(total)
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

    #[test]
    fn editing_an_event_is_detected() {
        let mut events = chain(1, 5);
        events[2].body.path = "forged".into();
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
        events[2].body.path = "forged".into();
        events[2].hash = chain_hash(&events[2].prev_hash, &events[2].body);
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

    #[test]
    fn sensitive_strings_are_hmacd() {
        let h = hmac_string(b"key", "s3cret-token");
        assert!(h.starts_with("hmac-sha256:"));
        assert!(!h.contains("s3cret"));
    }
}
