//! Fuzzing (proptest) of the on-disk record decoder: whatever bytes a damaged or hostile data
//! directory holds, `codec::decode` refuses them with an error and never panics, and no bit flip
//! of a valid record is ever accepted (docs/TESTING.md).

use std::collections::{BTreeMap, BTreeSet};

use citadel_core::command::Command;
use citadel_core::kv::{KvEntry, KvVersion};
use citadel_core::state::State;
use citadel_core::token::TokenEntry;
use citadel_storage::codec::{
    self, Identity, StoredEntry, StoredLogId, StoredMembershipConfig, StoredMembershipState, StoredPayload,
    StoredSnapshot, StoredVote,
};
use citadel_storage::NodeInfo;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Decodes `bytes` as every record type the storage reads; true if any accepted them.
fn any_decodes(bytes: &[u8]) -> bool {
    [
        codec::decode::<StoredEntry>(bytes, "log entry").is_ok(),
        codec::decode::<StoredVote>(bytes, "vote").is_ok(),
        codec::decode::<StoredLogId>(bytes, "log id").is_ok(),
        codec::decode::<StoredSnapshot>(bytes, "snapshot").is_ok(),
        codec::decode::<StoredMembershipState>(bytes, "membership").is_ok(),
        codec::decode::<Identity>(bytes, "identity").is_ok(),
        codec::decode::<KvEntry>(bytes, "secret").is_ok(),
    ]
    .into_iter()
    .any(|ok| ok)
}

/// A record with a correct format byte (1: JSON, 2: postcard) and checksum around arbitrary body
/// bytes: only the body's decoding stands between them and the node.
fn framed(format: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![format];
    out.extend_from_slice(&Sha256::digest(body)[..8]);
    out.extend_from_slice(body);
    out
}

fn membership() -> StoredMembershipConfig {
    let node =
        NodeInfo { api_addr: "https://a".into(), cluster_addr: "a:1".into(), name: "n".into(), site: "s".into() };
    StoredMembershipConfig {
        configs: vec![BTreeSet::from([1, 2])],
        nodes: BTreeMap::from([(1, node.clone()), (2, node)]),
    }
}

/// One valid record of each kind the storage writes.
fn valid_records() -> Vec<Vec<u8>> {
    let log_id = StoredLogId { term: 3, leader: 1, index: 42 };
    let write = Command::KvWrite {
        mount: "secret/".into(),
        path: "a".into(),
        version: 1,
        ciphertext: vec![1, 2, 3],
        cas: None,
        at: 5,
    };
    vec![
        codec::encode(&StoredEntry { log_id, payload: StoredPayload::Normal(write) }),
        codec::encode(&StoredEntry { log_id, payload: StoredPayload::Membership(membership()) }),
        codec::encode(&StoredEntry { log_id, payload: StoredPayload::Blank }),
        codec::encode(&StoredVote { term: 3, node: 1, committed: true }),
        codec::encode(&StoredSnapshot {
            format: citadel_core::command::FORMAT_VERSION,
            last_applied: Some(log_id),
            membership: StoredMembershipState { log_id: Some(log_id), config: membership() },
            state: state_with_tokens(),
            tokens: Default::default(),
            users: Default::default(),
            kv: vec![],
            streamed_secrets: None,
            streamed_maps: None,
        }),
        codec::encode(&Identity { node_id: 1, format: 1 }),
        codec::encode_binary(&secret()),
    ]
}

/// A state holding a login and its child, so the token table's decoding is fuzzed too.
fn state_with_tokens() -> State {
    let mut state = State::default();
    for (hash, parent) in [("login", None), ("child", Some("login"))] {
        let entry = TokenEntry {
            hash: hash.into(),
            parent: parent.map(Into::into),
            username: Some("ann".into()),
            ..TokenEntry::default()
        };
        state.tokens.insert(hash.into(), entry);
    }
    state
}

/// A secret as the KV table stores it (a binary record).
fn secret() -> KvEntry {
    let version = |n: u64| KvVersion { created: n, deletion_time: Some(9), destroyed: false, ciphertext: vec![7; 30] };
    KvEntry {
        current_version: 2,
        max_versions: 10,
        custom_metadata: BTreeMap::from([("owner".to_string(), "ops".to_string())]),
        versions: BTreeMap::from([(1, version(1)), (2, version(2))]),
        ..KvEntry::default()
    }
}

#[test]
fn no_bit_flip_of_a_valid_record_is_ever_accepted() {
    for record in valid_records() {
        assert!(any_decodes(&record), "the valid record decodes");
        for bit in 0..record.len() * 8 {
            let mut damaged = record.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(!any_decodes(&damaged), "a flip of bit {bit} was accepted");
        }
        for len in 0..record.len() {
            assert!(!any_decodes(&record[..len]), "a record truncated to {len} bytes was accepted");
        }
    }
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn arbitrary_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(!any_decodes(&bytes));
    }

    #[test]
    fn a_checksummed_body_of_arbitrary_json_decodes_or_is_refused_without_panicking(
        body in "\\PC{0,200}|\\{\"log_id\":\\{\"term\":[0-9]{1,22},\"leader\":1,\"index\":[0-9-]{1,22}\\},\"payload\":\\PC{0,40}\\}"
    ) {
        let _ = any_decodes(&framed(1, body.as_bytes()));
    }

    #[test]
    fn a_checksummed_binary_body_of_arbitrary_bytes_decodes_or_is_refused_without_panicking(
        body in proptest::collection::vec(any::<u8>(), 0..300)
    ) {
        let _ = any_decodes(&framed(2, &body));
    }

    #[test]
    fn mutated_valid_bodies_decode_or_are_refused_without_panicking(
        index in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let records = valid_records();
        let record = &records[index % records.len()];
        let format = record[0];
        let mut body = record[9..].to_vec();
        for (at, byte) in edits {
            let at = at % body.len();
            body[at] = byte;
        }
        if let Ok(entry) = codec::decode::<StoredEntry>(&framed(format, &body), "log entry") {
            // A decodable entry must also convert (or be refused) without panicking.
            let _ = entry.into_entry();
        }
        let _ = any_decodes(&framed(format, &body));
    }
}
