//! `State::apply` over arbitrary command sequences (§8.3: `apply` never panics on a command).
//!
//! Commands are drawn from a small vocabulary of mounts, paths, tokens and terms, so that
//! sequences hit the same entries repeatedly (versions, cas, deletes, rotations, audit chains)
//! and reach the edges (u64::MAX versions and times, zero limits). Properties: no panic; a
//! rejected command changes nothing (an audited one only records its
//! event); replicas applying the same sequence stay identical.

use citadel_core::audit::{AuditBody, AuditEvent, GENESIS};
use citadel_core::command::{Command, InitCommand, Response};
use citadel_core::job::LogPosition;
use citadel_core::kv::{KvConfig, KvStore, MetadataUpdate};
use citadel_core::policy::{self, Caps, Policy, Rule};
use citadel_core::state::{AuthMount, ClusterInfo, JoinToken, Mount, SealInfo, State};
use citadel_core::token::{LoginProof, TokenEntry, User};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[ab]", Just("secret/".to_string()), Just("x/".to_string()), "[a-z/]{0,6}"]
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn term() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..4, Just(u32::MAX), any::<u32>()]
}

fn mount() -> impl Strategy<Value = Mount> {
    (name(), number()).prop_map(|(uuid, created)| Mount {
        uuid,
        kind: "kv".into(),
        description: String::new(),
        created,
        kv: KvStore::default(),
    })
}

fn token() -> impl Strategy<Value = TokenEntry> {
    (
        name(),
        proptest::option::of(name()),
        proptest::option::of(number()),
        proptest::option::of(0u64..3),
        proptest::option::of(name()),
    )
        .prop_map(|(hash, parent, expires, uses_left, username)| TokenEntry {
            accessor: format!("acc-{hash}"),
            hash,
            policies: vec![policy::DEFAULT.into()],
            display_name: "t".into(),
            meta: Default::default(),
            created: 0,
            expires,
            ttl_secs: 0,
            renewable: true,
            parent,
            username,
            uses_left,
            max_expires: expires,
            ..TokenEntry::default()
        })
}

/// A short chain of audit events from `node`, possibly with a gap, a duplicate or a forged link.
fn audit_events() -> impl Strategy<Value = Vec<AuditEvent>> {
    (0u64..3, 1u64..5, 0u8..4).prop_map(|(node, count, damage)| {
        let mut prev = GENESIS.to_string();
        let mut events: Vec<AuditEvent> = (1..=count)
            .map(|seq| {
                let event = AuditEvent::seal(AuditBody { node, seq, time: seq, ..AuditBody::default() }, &prev);
                prev = event.hash.clone();
                event
            })
            .collect();
        match damage {
            0 => {}
            1 => {
                events.remove(0);
            }
            2 => {
                let raw = events[0].raw().replace("\"path\":\"\"", "\"path\":\"forged\"");
                events[0] = AuditEvent::from_parts(raw, events[0].prev_hash.clone(), events[0].hash.clone())
                    .expect("a body with another path is a body");
            }
            _ => events.push(events[0].clone()),
        }
        events
    })
}

fn init() -> BoxedStrategy<Command> {
    (name(), mount(), term())
        .prop_map(|(path, default_mount, key_term)| {
            Command::Init(Box::new(InitCommand {
                cluster: ClusterInfo { id: "c".into(), name: "citadel".into(), initialized_at: 1 },
                seal: SealInfo {
                    shares: 1,
                    threshold: 1,
                    wrapped_root_key: vec![1],
                    wrapped_keyring: vec![2],
                    key_term,
                    key_installed: 1,
                },
                root_token: TokenEntry {
                    hash: "root".into(),
                    accessor: "root-acc".into(),
                    policies: vec![policy::ROOT.into()],
                    display_name: "root".into(),
                    meta: Default::default(),
                    created: 1,
                    expires: None,
                    ttl_secs: 0,
                    renewable: false,
                    parent: None,
                    username: None,
                    ..TokenEntry::default()
                },
                default_mount_path: path,
                default_mount,
            }))
        })
        .boxed()
}

fn versions() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(number(), 0..3)
}

fn kv_command() -> BoxedStrategy<Command> {
    prop_oneof![
        (name(), name(), number(), proptest::option::of(number()), number()).prop_map(
            |(mount, path, version, cas, at)| Command::KvWrite { mount, path, version, ciphertext: vec![1], cas, at }
        ),
        (name(), name(), versions(), number()).prop_map(|(mount, path, versions, at)| Command::KvDelete {
            mount,
            path,
            versions,
            at
        }),
        (name(), name(), versions(), number()).prop_map(|(mount, path, versions, at)| Command::KvUndelete {
            mount,
            path,
            versions,
            at
        }),
        (name(), name(), versions(), number()).prop_map(|(mount, path, versions, at)| Command::KvDestroy {
            mount,
            path,
            versions,
            at
        }),
        (name(), name(), proptest::option::of(0u32..1200), proptest::option::of(number()), number()).prop_map(
            |(mount, path, max_versions, dva, at)| Command::KvMetadataUpdate {
                mount,
                path,
                update: MetadataUpdate {
                    max_versions,
                    cas_required: None,
                    delete_version_after_secs: dva,
                    custom_metadata: None
                },
                at,
            }
        ),
        (name(), name()).prop_map(|(mount, path)| Command::KvMetadataDelete { mount, path }),
        (name(), prop_oneof![0u32..3, any::<u32>()], any::<bool>(), number()).prop_map(
            |(mount, max_versions, cas_required, delete_version_after_secs)| Command::KvConfigure {
                mount,
                config: KvConfig { max_versions, cas_required, delete_version_after_secs },
            }
        ),
    ]
    .boxed()
}

fn other_command() -> BoxedStrategy<Command> {
    prop_oneof![
        init(),
        (term(), term(), number()).prop_map(|(expected_term, new_term, at)| Command::RotateKeyring {
            expected_term,
            new_term,
            wrapped_keyring: vec![3],
            at
        }),
        (name(), mount()).prop_map(|(path, mount)| Command::MountEnable { path, mount }),
        name().prop_map(|path| Command::MountDisable { path }),
        prop_oneof![name(), Just("userpass/".to_string()), Just("corp/".to_string())].prop_map(|path| {
            let mount = AuthMount { uuid: "u".into(), kind: "userpass".into(), description: String::new(), created: 1 };
            Command::AuthEnable { path, mount }
        }),
        prop_oneof![name(), Just("corp/".to_string())].prop_map(|path| Command::AuthDisable { path }),
        prop_oneof![name(), Just(policy::ROOT.to_string()), Just(policy::DEFAULT.to_string())].prop_map(|name| {
            Command::PolicyPut {
                policy: Policy {
                    name,
                    raw: String::new(),
                    rules: vec![Rule { pattern: "*".into(), caps: Caps::READ, params: Default::default() }],
                },
            }
        }),
        prop_oneof![name(), Just(policy::DEFAULT.to_string())].prop_map(|name| Command::PolicyDelete { name }),
        name().prop_map(|username| Command::UserPut {
            user: User {
                username,
                password_hash: String::new(),
                policies: vec![],
                token_ttl_secs: 0,
                token_max_ttl_secs: 0
            }
        }),
        name().prop_map(|username| Command::UserDelete { username }),
        (token(), proptest::option::of(name())).prop_map(|(entry, user)| Command::TokenCreate {
            entry: Box::new(entry),
            login: user.map(|username| LoginProof { username, password_hash: String::new() })
        }),
        name().prop_map(|hash| Command::TokenUse { hash }),
        (name(), number(), number()).prop_map(|(hash, expires, at)| Command::EmergencyTokenRevoke {
            hash,
            expires,
            at
        }),
        (name(), number(), number()).prop_map(|(hash, expires, ttl_secs)| Command::TokenRenew {
            hash,
            expires,
            ttl_secs
        }),
        name().prop_map(|hash| Command::TokenRevoke { hash }),
        number().prop_map(|now| Command::TokensExpire { now }),
        number().prop_map(|now| Command::PruneExpired { now }),
        (1u64..6, 1u64..4, name(), number(), any::<bool>()).prop_map(|(term, node, job, at, sweep)| {
            Command::JobResult {
                term,
                node,
                job,
                at,
                command: sweep.then(|| {
                    Box::new(if at % 2 == 0 {
                        Command::TokensExpire { now: at }
                    } else {
                        Command::PruneExpired { now: at }
                    })
                }),
            }
        }),
        audit_events().prop_map(|events| Command::AuditShip { events }),
        (name(), number(), proptest::option::of(1u64..4))
            .prop_map(|(hash, expires, node_id)| Command::JoinTokenCreate { hash, expires, node_id }),
        (name(), number(), proptest::option::of(1u64..4)).prop_map(|(hash, now, node_id)| Command::JoinTokenUse {
            hash,
            now,
            node_id
        }),
        (1u64..4, name(), number(), number()).prop_map(|(node_id, serial, not_after, at)| Command::NodeCertRecord {
            node_id,
            serial,
            not_after,
            at
        }),
        (1u64..4, number()).prop_map(|(node_id, now)| Command::NodeCertsRevoke { node_id, now }),
        any::<bool>().prop_map(|initialized| {
            let mut state = State::default();
            if initialized {
                state.cluster = Some(ClusterInfo { id: "other".into(), name: "n".into(), initialized_at: 2 });
                state.join_tokens.insert("j".into(), JoinToken { expires: 5, used: false, node_id: None });
            }
            Command::RestoreState { state: Box::new(state) }
        }),
    ]
    .boxed()
}

/// A command wrapped with a token, as a client request's is: usually the root token, sometimes
/// one that may not exist, sometimes nested (which `apply` refuses).
fn authorized() -> BoxedStrategy<Command> {
    // A token spending its own use, under one of a few request ids so that repeats occur.
    let token_use = name().prop_map(|hash| Command::TokenUse { hash }).boxed();
    let request_id = prop_oneof![Just("r1".to_string()), Just("r2".to_string())];
    (
        prop_oneof![Just("root".to_string()), name()],
        number(),
        prop_oneof![kv_command(), token_use],
        request_id,
        any::<bool>(),
    )
        .prop_map(|(token_hash, at, inner, request_id, nested)| {
            let wrap = |command: Command| Command::Authorized {
                token_hash: token_hash.clone(),
                request_id: request_id.clone(),
                at,
                command: Box::new(command),
            };
            if nested {
                wrap(wrap(inner))
            } else {
                wrap(inner)
            }
        })
        .boxed()
}

/// A request's command carried with its audit event: request ids repeat (retried proposals),
/// paths are sometimes past the bound, and envelopes sometimes nest (both refused by `apply`).
fn audited() -> BoxedStrategy<Command> {
    let path = prop_oneof![8 => name(), 1 => Just("p".repeat(citadel_core::audited::MAX_FIELD_BYTES + 1))];
    (1u64..4, "r[0-3]", path, prop_oneof![3 => authorized(), 1 => kv_command()], any::<bool>())
        .prop_map(|(node, request_id, path, inner, nested)| {
            let wrap = |command: Command| Command::Audited {
                audit: Box::new(AuditBody {
                    node,
                    request_id: request_id.clone(),
                    path: path.clone(),
                    ..AuditBody::default()
                }),
                command: Box::new(command),
            };
            if nested {
                wrap(wrap(inner))
            } else {
                wrap(inner)
            }
        })
        .boxed()
}

fn command() -> BoxedStrategy<Command> {
    prop_oneof![3 => kv_command(), 2 => other_command(), 1 => init(), 1 => authorized(), 1 => audited()].boxed()
}

/// Mostly sequences that start with an init (so the rest is not all "not initialized").
fn sequence() -> impl Strategy<Value = Vec<Command>> {
    let commands = || proptest::collection::vec(command(), 1..40);
    prop_oneof![
        1 => commands(),
        4 => (init(), commands()).prop_map(|(init, rest)| std::iter::once(init).chain(rest).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn apply_never_panics_and_rejected_commands_change_nothing(commands in sequence()) {
        let mut state = State::default();
        let mut replica = State::default();
        for (i, command) in commands.into_iter().enumerate() {
            // Entries of a few terms, each led by some node: job results must match them.
            let i = i as u64;
            let entry = LogPosition { term: 1 + i / 8, leader: 1 + (i / 8) % 3, index: i + 1 };
            let before = state.clone();
            let response = state.apply_entry(entry, command.clone());
            if let Response::Rejected(rejection) = &response {
                // An audited command's rejection is the request's outcome, recorded in the log
                // chain; nothing else may change.
                let mut rest = state.clone();
                if matches!(command, Command::Audited { .. }) {
                    rest.audit.log = before.audit.log.clone();
                }
                prop_assert_eq!(&rest, &before, "rejected ({}) yet the state changed: {:?}", rejection, command);
            }
            prop_assert_eq!(replica.apply_entry(entry, command), response);
            prop_assert!(state.tokens.indexes_match_tokens(), "the token indexes drifted from the tokens");
        }
        prop_assert_eq!(state.audit.log.verify(), Ok(()), "the log chain apply built verifies");
        prop_assert_eq!(state, replica);
    }
}
