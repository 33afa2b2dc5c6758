//! Fuzzing (on the stable toolchain, with proptest) of every core parser that takes outside
//! bytes: policies, durations, emergency tokens, Shamir shares, barrier ciphertext and commands
//! as they arrive from the cluster. Each property states what must hold for *any* input: no
//! panic, valid input round-trips, damaged input is refused. Case counts are bounded so that
//! the whole fuzz suite stays well under a minute in a debug build (docs/TESTING.md).

use std::collections::BTreeMap;

use citadel_core::barrier::{self, Key, Keyring};
use citadel_core::command::Command;
use citadel_core::policy::{self, Caps, Rule};
use citadel_core::time::parse_duration_secs;
use citadel_core::token::{issue_emergency, verify_emergency, EmergencyClaims};
use citadel_core::{shamir, state::State};
use proptest::prelude::*;
use zeroize::Zeroizing;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

const CAP_NAMES: [&str; 8] = ["create", "read", "update", "patch", "delete", "list", "sudo", "deny"];

/// A valid policy: distinct patterns, each with a non-empty set of capability names.
fn policy_rules() -> impl Strategy<Value = BTreeMap<String, Vec<&'static str>>> {
    let caps = proptest::sample::subsequence(CAP_NAMES.to_vec(), 1..=CAP_NAMES.len());
    proptest::collection::btree_map("[a-z0-9_.-]{1,8}(/[a-z0-9_+.-]{1,8}){0,3}\\*?", caps, 1..6)
}

fn hcl(rules: &BTreeMap<String, Vec<&str>>) -> String {
    rules
        .iter()
        .map(|(pattern, caps)| {
            let list = caps.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
            format!("# rule\npath \"{pattern}\" {{\n  capabilities = [{list}]\n}}\n")
        })
        .collect()
}

fn json(rules: &BTreeMap<String, Vec<&str>>) -> String {
    let paths: serde_json::Map<String, serde_json::Value> =
        rules.iter().map(|(pattern, caps)| (pattern.clone(), serde_json::json!({ "capabilities": caps }))).collect();
    serde_json::json!({ "path": paths }).to_string()
}

fn expected(rules: &BTreeMap<String, Vec<&str>>) -> Vec<Rule> {
    rules
        .iter()
        .map(|(pattern, caps)| Rule {
            pattern: pattern.clone(),
            caps: caps.iter().fold(Caps::default(), |all, c| all.union(Caps::parse(c).unwrap())),
            params: Default::default(),
        })
        .collect()
}

fn sorted(mut rules: Vec<Rule>) -> Vec<Rule> {
    rules.sort_by(|a, b| a.pattern.cmp(&b.pattern));
    rules
}

/// Replaces, inserts or deletes characters of `text` at the given positions.
fn mutate(text: &str, edits: &[(usize, char, u8)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(at, ch, kind) in edits {
        let at = at % (chars.len() + 1);
        match kind % 3 {
            0 if at < chars.len() => chars[at] = ch,
            1 => chars.insert(at, ch),
            _ if at < chars.len() => {
                chars.remove(at);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

fn edits() -> impl Strategy<Value = Vec<(usize, char, u8)>> {
    proptest::collection::vec(
        (
            any::<usize>(),
            prop_oneof![
                any::<char>(),
                "[{}\\[\\]\",=#*/\\\\ \n]".prop_map(|s: String| s.chars().next().unwrap_or(' '))
            ],
            any::<u8>(),
        ),
        1..6,
    )
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn any_policy_text_parses_or_is_refused_without_panicking(text in "\\PC{0,200}") {
        let _ = policy::parse("fuzz", &text);
    }

    #[test]
    fn valid_policies_round_trip_in_hcl_and_json(rules in policy_rules()) {
        let from_hcl = policy::parse("p", &hcl(&rules)).unwrap();
        prop_assert_eq!(sorted(from_hcl.rules), expected(&rules));
        let from_json = policy::parse("p", &json(&rules)).unwrap();
        prop_assert_eq!(sorted(from_json.rules), expected(&rules));
    }

    #[test]
    fn mutated_policies_parse_or_are_refused_without_panicking(rules in policy_rules(), edits in edits()) {
        let _ = policy::parse("p", &mutate(&hcl(&rules), &edits));
        let _ = policy::parse("p", &mutate(&json(&rules), &edits));
    }

    #[test]
    fn policy_patterns_match_any_path_without_panicking(pattern in "\\PC{0,30}", path in "\\PC{0,40}") {
        let _ = policy::matches(&pattern, &path);
    }

    #[test]
    fn any_duration_text_parses_or_is_refused_without_panicking(text in "\\PC{0,40}|[0-9smhd]{0,30}") {
        let _ = parse_duration_secs(&text);
    }

    #[test]
    fn durations_round_trip(d in 0u64..100_000, h in 0u64..100_000, m in 0u64..100_000, s in 0u64..100_000) {
        let text = format!("{d}d{h}h{m}m{s}s");
        prop_assert_eq!(parse_duration_secs(&text), Some(d * 86_400 + h * 3600 + m * 60 + s));
        prop_assert_eq!(parse_duration_secs(&s.to_string()), Some(s));
    }

    #[test]
    fn durations_that_overflow_are_refused(extra in 1u64..1000) {
        let text = format!("{}h", u64::MAX / 3600 + extra);
        prop_assert_eq!(parse_duration_secs(&text), None);
    }

    #[test]
    fn any_emergency_token_text_is_refused(text in "(cre\\.)?[A-Za-z0-9_.-]{0,120}|\\PC{0,80}") {
        prop_assert_eq!(verify_emergency(b"key", 1, &text, 0), None);
    }

    #[test]
    fn an_altered_emergency_token_is_refused(at in any::<usize>(), ch in "[A-Za-z0-9_.-]") {
        let claims = EmergencyClaims { username: "ann".into(), policies: vec!["ops".into()], node: 1, issued: 1, expires: 100, term: 1 };
        let token = issue_emergency(b"key", &claims);
        prop_assert_eq!(verify_emergency(b"key", 1, &token, 50), Some(claims));
        let at = at % token.len();
        let altered = format!("{}{}{}", &token[..at], ch, &token[at + 1..]);
        prop_assume!(altered != token);
        prop_assert_eq!(verify_emergency(b"key", 1, &altered, 50), None);
    }

    #[test]
    fn any_shamir_shares_combine_or_are_refused_without_panicking(
        shares in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6)
    ) {
        let shares: Vec<Zeroizing<Vec<u8>>> = shares.into_iter().map(Zeroizing::new).collect();
        let _ = shamir::combine(&shares);
    }

    #[test]
    fn shamir_shares_round_trip_and_mutated_shares_do_not_panic(
        key in any::<[u8; 32]>(), threshold in 2usize..5, extra in 0usize..3, at in any::<usize>(), flip in 1u8..=255
    ) {
        let key = Key(key);
        let shares = shamir::split(&key, threshold + extra, threshold).unwrap();
        prop_assert_eq!(shamir::combine(&shares[..threshold]).unwrap(), key.clone());
        let mut damaged = shares[..threshold].to_vec();
        let share = at % threshold;
        let byte = (at / threshold) % damaged[share].len();
        damaged[share][byte] ^= flip;
        // A damaged share yields an error or another key (which then fails to unwrap the root key).
        prop_assert!(!shamir::combine(&damaged).is_ok_and(|k| k == key));
    }

    #[test]
    fn any_ciphertext_is_refused_by_the_barrier(bytes in proptest::collection::vec(any::<u8>(), 0..120), term in any::<u32>()) {
        let ring = Keyring::new(1, [1; 32], [2; 32], [3; 32]);
        prop_assert!(ring.decrypt(b"aad", &bytes).is_err());
        // A well-formed header does not help.
        let mut framed = vec![1u8];
        framed.extend_from_slice(&term.to_be_bytes());
        framed.extend_from_slice(&bytes);
        prop_assert!(ring.decrypt(b"aad", &framed).is_err());
        prop_assert!(barrier::decrypt(&Key([1; 32]), b"aad", &framed).is_err());
    }

    #[test]
    fn any_flipped_bit_of_a_ciphertext_is_refused(plain in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<usize>()) {
        let ring = Keyring::new(1, [1; 32], [2; 32], [3; 32]);
        let ciphertext = ring.encrypt(&[7; 24], b"aad", &plain);
        prop_assert_eq!(&ring.decrypt(b"aad", &ciphertext).unwrap()[..], &plain[..]);
        let mut damaged = ciphertext.clone();
        let bit = bit % (damaged.len() * 8);
        damaged[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(ring.decrypt(b"aad", &damaged).is_err());
    }

    #[test]
    fn any_bytes_from_the_cluster_decode_as_a_command_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(command) = serde_json::from_slice::<Command>(&bytes) {
            let _ = State::default().apply(command);
        }
    }

    #[test]
    fn mutated_commands_decode_or_are_refused_and_never_panic_apply(index in any::<usize>(), edits in edits()) {
        let valid = sample_commands();
        let text = serde_json::to_string(&valid[index % valid.len()]).unwrap();
        if let Ok(command) = serde_json::from_str::<Command>(&mutate(&text, &edits)) {
            let mut state = State::default();
            for c in sample_commands().into_iter().take(1) {
                state.apply(c);
            }
            let _ = state.apply(command);
        }
    }
}

/// Valid encodings to mutate: one of each shape the cluster sends.
fn sample_commands() -> Vec<Command> {
    let json = serde_json::json!([
        {"Init": {"cluster": {"id": "c", "name": "n", "initialized_at": 1},
                  "seal": {"shares": 1, "threshold": 1, "wrapped_root_key": "AQ==", "wrapped_keyring": "Ag==", "key_term": 1, "key_installed": 1},
                  "root_token": {"hash": "r", "accessor": "a", "policies": ["root"], "display_name": "root", "meta": {},
                                 "created": 1, "expires": null, "ttl_secs": 0, "renewable": false, "parent": null, "username": null},
                  "default_mount_path": "secret/",
                  "default_mount": {"uuid": "u", "kind": "kv", "description": "", "created": 1,
                                    "kv": {"config": {"max_versions": 0, "cas_required": false, "delete_version_after_secs": 0}, "entries": {}}}}},
        {"KvWrite": {"mount": "secret/", "path": "a", "version": 1, "ciphertext": "AQID", "cas": null, "at": 5}},
        {"RotateKeyring": {"expected_term": 1, "new_term": 1, "wrapped_keyring": "AQ==", "at": 5}},
        {"KvDelete": {"mount": "secret/", "path": "a", "versions": [1, u64::MAX], "at": 5}},
        {"TokenRenew": {"hash": "r", "expires": u64::MAX, "ttl_secs": u64::MAX}},
        {"AuditShip": {"events": [{"node": 1, "seq": 1, "time": 1, "kind": "request", "operation": "read", "path": "p",
                                   "user": "u", "token_hmac": "", "remote_addr": "", "status": 200, "error": "",
                                   "prev_hash": "0000000000000000000000000000000000000000000000000000000000000000", "hash": "x"}]}},
        {"JoinTokenUse": {"hash": "h", "now": 0}}
    ]);
    serde_json::from_value(json).expect("the sample commands are valid encodings")
}
