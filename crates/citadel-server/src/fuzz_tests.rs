//! Fuzzing (proptest) of what the node parses from outside: request paths and query strings,
//! request bodies, and the cluster's messages (openraft's requests, joins, commands). Snapshot
//! files are fuzzed beside their parser (`api::snapshot`). Properties: no panic, valid input
//! round-trips, damaged input is refused (docs/TESTING.md).

use std::collections::BTreeMap;

use axum::http::{HeaderMap, Method, Uri};
use citadel_core::command::Command;
use citadel_storage::codec::{StoredEntry, StoredLogId, StoredPayload, StoredVote};
use citadel_storage::types::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use proptest::prelude::*;
use serde_json::Value;

use crate::api::{duration_secs, string_list, ApiRequest};
use crate::cluster::JoinRequest;
use crate::request_path::{api_path, query};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn request(body: Vec<u8>) -> ApiRequest {
    ApiRequest {
        method: Method::POST,
        path: "x".into(),
        query: Default::default(),
        headers: HeaderMap::new(),
        body: body.into(),
        remote: "127.0.0.1".into(),
        id: "id".into(),
        served_stale: Default::default(),
    }
}

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Binary fractions: they print and parse back exactly.
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        "\\PC{0,20}|[0-9smhd, ]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn vote(term: u64, node: u64) -> Vote {
    StoredVote { term, node, committed: true }.into()
}

fn log_id(term: u64, index: u64) -> LogId {
    StoredLogId { term, leader: 1, index }.into()
}

fn entry(index: u64) -> Entry {
    let command = Command::KvWrite {
        mount: "secret/".into(),
        path: "a".into(),
        version: 1,
        ciphertext: vec![1, 2, 3],
        cas: None,
        at: 5,
    };
    let stored =
        StoredEntry { log_id: StoredLogId { term: 2, leader: 1, index }, payload: StoredPayload::Normal(command) };
    stored.into_entry().expect("a valid entry")
}

/// Valid encodings of every message a peer sends, to mutate.
fn valid_messages() -> Vec<String> {
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: vote(2, 1),
        prev_log_id: Some(log_id(2, 4)),
        entries: vec![entry(5), entry(6)],
        leader_commit: Some(log_id(2, 4)),
    };
    let vote_request =
        VoteRequest::<TypeConfig> { vote: vote(3, 2), last_log_id: Some(log_id(2, 6)), leadership_transfer: true };
    let join = serde_json::json!({
        "node_id": 4, "protocol_version": 1,
        "node": { "api_addr": "https://127.0.0.1:1", "cluster_addr": "127.0.0.1:2", "name": "n", "site": "s" }
    });
    vec![
        serde_json::to_string(&append).unwrap(),
        serde_json::to_string(&vote_request).unwrap(),
        join.to_string(),
        serde_json::to_string(&SnapshotMeta::default()).unwrap(),
    ]
}

/// Decodes `text` as every message type the cluster port accepts; never panics.
fn decode_cluster_message(text: &[u8]) {
    let _ = serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(text);
    let _ = serde_json::from_slice::<VoteRequest<TypeConfig>>(text);
    let _ = serde_json::from_slice::<TransferLeaderRequest<TypeConfig>>(text);
    let _ = serde_json::from_slice::<SnapshotMeta>(text);
    let _ = serde_json::from_slice::<JoinRequest>(text);
    let _ = serde_json::from_slice::<Command>(text);
    let _ = serde_json::from_slice::<u64>(text);
}

#[test]
fn valid_cluster_messages_round_trip() {
    let messages = valid_messages();
    let append: AppendEntriesRequest<TypeConfig> = serde_json::from_str(&messages[0]).unwrap();
    assert_eq!(serde_json::to_string(&append).unwrap(), messages[0]);
    let vote: VoteRequest<TypeConfig> = serde_json::from_str(&messages[1]).unwrap();
    assert_eq!(serde_json::to_string(&vote).unwrap(), messages[1]);
    let join: JoinRequest = serde_json::from_str(&messages[2]).unwrap();
    assert_eq!(join.node_id, 4);
    let meta: SnapshotMeta = serde_json::from_str(&messages[3]).unwrap();
    assert_eq!(serde_json::to_string(&meta).unwrap(), messages[3]);
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn any_request_path_is_normalized_or_refused_without_panicking(
        path in "(/v1/)?([a-z.%+*]{0,4}/?){0,8}|\\PC{0,60}"
    ) {
        if let Ok(normal) = api_path(&path) {
            prop_assert!(!normal.starts_with('/') && !normal.ends_with('/'), "{normal:?}");
            prop_assert!(!normal.contains("//"), "{normal:?}");
            prop_assert!(normal.is_empty() || normal.split('/').all(|s| s != "." && s != ".."), "{normal:?}");
        }
    }

    #[test]
    fn clean_request_paths_round_trip(segments in proptest::collection::vec("[a-z0-9_-][a-z0-9_.-]{0,8}", 0..6)) {
        let path = segments.join("/");
        prop_assume!(path.split('/').all(|s| s != "." && s != ".."));
        prop_assert_eq!(api_path(&format!("/v1/{path}/")), Ok(path));
    }

    #[test]
    fn any_query_string_parses_or_is_refused_without_panicking(text in "[a-z0-9=&%+;,._~-]{0,40}|\\PC{0,40}") {
        if let Ok(uri) = format!("/v1/x?{text}").parse::<Uri>() {
            let _ = query(&uri);
        }
    }

    #[test]
    fn query_strings_round_trip(params in proptest::collection::btree_map("[a-z]{1,6}", "[a-zA-Z0-9 /]{0,10}", 0..5)) {
        let encoded: Vec<String> =
            params.iter().map(|(k, v)| format!("{k}={}", v.replace(' ', "%20").replace('/', "%2F"))).collect();
        let uri: Uri = format!("/v1/x?{}", encoded.join("&")).parse().unwrap();
        let decoded: BTreeMap<String, String> = query(&uri).unwrap().into_iter().collect();
        prop_assert_eq!(decoded, params);
    }

    #[test]
    fn any_request_body_decodes_or_is_refused_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let req = request(body);
        let _ = req.json::<Value>();
        let _ = req.json::<BTreeMap<String, Value>>();
        let _ = req.json::<JoinRequest>();
    }

    #[test]
    fn any_json_field_is_read_as_a_list_or_duration_or_refused_without_panicking(value in json_value()) {
        let _ = string_list(Some(&value));
        let _ = duration_secs(Some(&value), "ttl");
        let body = serde_json::to_vec(&value).unwrap();
        prop_assert_eq!(request(body).json::<Value>().ok(), Some(value));
    }

    #[test]
    fn lists_and_durations_round_trip(items in proptest::collection::vec("[a-z0-9_-]{1,8}", 0..6), secs in any::<u64>()) {
        let array = Value::Array(items.iter().cloned().map(Value::from).collect());
        prop_assert_eq!(string_list(Some(&array)).unwrap(), Some(items.clone()));
        prop_assert_eq!(string_list(Some(&Value::from(items.join(",")))).unwrap(), Some(items));
        let max = crate::config::MAX_DURATION_SECS;
        if secs <= max {
            prop_assert_eq!(duration_secs(Some(&Value::from(secs)), "ttl").unwrap(), Some(secs));
        } else {
            // Past int64 nanoseconds: a 400, never a wrap-around.
            prop_assert!(duration_secs(Some(&Value::from(secs)), "ttl").is_err());
        }
        let half = (secs / 2).min(max);
        prop_assert_eq!(duration_secs(Some(&Value::from(format!("{half}s"))), "ttl").unwrap(), Some(half));
    }

    #[test]
    fn any_bytes_on_the_cluster_port_decode_or_are_refused_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..200)
    ) {
        decode_cluster_message(&bytes);
    }

    #[test]
    fn mutated_cluster_messages_decode_or_are_refused_without_panicking(
        index in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), prop_oneof![any::<u8>(), Just(b'"'), Just(b'9'), Just(b'-')]), 1..6),
    ) {
        let messages = valid_messages();
        let mut bytes = messages[index % messages.len()].clone().into_bytes();
        for (at, byte) in edits {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        decode_cluster_message(&bytes);
    }
}
