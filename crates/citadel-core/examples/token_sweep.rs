//! How long `apply` takes to sweep expired tokens and to revoke a token tree, with many tokens
//! held: every replica runs these inside `apply`, so their cost stalls the whole cluster.
//!
//! `cargo run --release -p citadel-core --example token_sweep -- [TOKENS]` (default 20,000):
//! TOKENS (at least 40) tokens as logins of 20 users (parent none), each holding children of its
//! own, every other child expired.

use std::time::Instant;

use citadel_core::command::{Command, InitCommand, Response};
use citadel_core::kv::KvStore;
use citadel_core::state::{ClusterInfo, Mount, SealInfo, State};
use citadel_core::token::TokenEntry;

const USERS: usize = 20;

/// A 64-hex-digit hash, as `token_hash` makes them.
fn hash(name: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(name.as_bytes()))
}

/// A token shaped like a login's: its hash, accessor and display name as long as real ones.
fn token(name: &str, parent: Option<String>, username: &str, expires: u64) -> TokenEntry {
    TokenEntry {
        hash: hash(name),
        accessor: hash(&format!("accessor {name}"))[..24].to_string(),
        display_name: format!("userpass-{username}"),
        parent,
        username: Some(username.to_string()),
        expires: Some(expires),
        ttl_secs: 3600,
        policies: vec!["default".into(), "ops".into()],
        ..TokenEntry::default()
    }
}

fn create(state: &mut State, entry: TokenEntry) {
    assert_eq!(state.apply(Command::TokenCreate { entry: Box::new(entry), login: None }), Response::Done);
}

fn initialized() -> State {
    let mut state = State::default();
    let init = InitCommand {
        cluster: ClusterInfo { id: "c".into(), name: "citadel".into(), initialized_at: 1 },
        seal: SealInfo {
            shares: 1,
            threshold: 1,
            wrapped_root_key: vec![1],
            wrapped_keyring: vec![2],
            key_term: 1,
            key_installed: 1,
        },
        root_token: TokenEntry { hash: "root".into(), ..TokenEntry::default() },
        default_mount_path: "secret/".into(),
        default_mount: Mount {
            uuid: "u".into(),
            kind: "kv".into(),
            description: String::new(),
            created: 1,
            kv: KvStore::default(),
        },
    };
    assert_eq!(state.apply(Command::Init(Box::new(init))), Response::Done);
    state
}

/// `total` tokens: per user one login and its children; every other child expires at 10.
fn loaded(total: usize) -> State {
    let mut state = initialized();
    let per_user = total / USERS;
    for u in 0..USERS {
        let user = format!("user{u}");
        let login = format!("login{u}");
        create(&mut state, token(&login, None, &user, 1_000));
        for c in 1..per_user {
            let expires = if c % 2 == 0 { 10 } else { 1_000 };
            create(&mut state, token(&format!("child{u}-{c}"), Some(hash(&login)), &user, expires));
        }
    }
    state
}

fn main() {
    let total: usize = std::env::args().nth(1).map_or(20_000, |n| n.parse().expect("TOKENS: a number"));
    assert!(total >= 2 * USERS, "TOKENS: at least {} (a login and a child for each of {USERS} users)", 2 * USERS);
    let mut state = loaded(total);
    let held = state.tokens.len();
    let resident = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l[6..].trim().to_string()))
        .unwrap_or_else(|| "unknown".into());

    let started = Instant::now();
    assert_eq!(state.apply(Command::TokensExpire { now: 500 }), Response::Done);
    let sweep = started.elapsed();
    let swept = held - state.tokens.len();
    assert_eq!(swept, (total / USERS - 1) / 2 * USERS, "every expired token goes, and only those");

    let before = state.tokens.len();
    let started = Instant::now();
    assert_eq!(state.apply(Command::TokenRevoke { hash: hash("login0") }), Response::Done);
    let revoke = started.elapsed();

    println!(
        "{held} tokens ({resident} resident): expiry sweep of {swept} took {:.1} ms; revoking a login with its {} children took {:.2} ms",
        sweep.as_secs_f64() * 1e3,
        before - state.tokens.len() - 1,
        revoke.as_secs_f64() * 1e3
    );

    // The leader's job sweeps at most 10,000 at a time, up to just before the 10,001st due
    // token ended; here every expiring token ends in a millisecond of its own.
    let mut state = loaded(total);
    let mut ends = 0;
    let hashes: Vec<String> = state.tokens.keys().cloned().collect();
    for hash in &hashes {
        ends += 1;
        let end = 10 + ends;
        state.tokens.update(hash, |t| t.expires = t.expires.map(|e| if e == 10 { end } else { u64::MAX }));
    }
    let now = 10 + ends;
    let mut sweeps = Vec::new();
    while let Some(up_to) = citadel_core::token_table::sweep_cut(&state.tokens, now, 10_000).expect("memory reads") {
        let before = state.tokens.len();
        let started = Instant::now();
        assert_eq!(state.apply(Command::TokensExpire { now: up_to }), Response::Done);
        sweeps.push((started.elapsed(), before - state.tokens.len()));
    }
    let longest = sweeps.iter().map(|(t, _)| *t).max().unwrap_or_default();
    println!(
        "the same {} expired tokens, each ending in a millisecond of its own, swept 10,000 at a time: {} sweeps, the longest {:.1} ms",
        sweeps.iter().map(|(_, n)| n).sum::<usize>(),
        sweeps.len(),
        longest.as_secs_f64() * 1e3
    );
}
