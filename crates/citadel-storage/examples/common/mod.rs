//! What the storage examples share: a node's first command, logins shaped like real ones, and
//! applying commands as one batch.

use std::time::{Duration, Instant};

use citadel_core::command::{Command, InitCommand};
use citadel_core::state::{ClusterInfo, Mount, SealInfo};
use citadel_core::token::TokenEntry;
use citadel_storage::types::{Entry, LeaderId, LogId};
use citadel_storage::StateMachine;
use openraft::entry::RaftEntry;
use openraft::storage::RaftStateMachine;

/// The first command of a cluster: its keys wrapped, a root token, the default KV mount.
pub fn init() -> Command {
    Command::Init(Box::new(InitCommand {
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
            kv: Default::default(),
        },
    }))
}

/// A login's token, with a hash, accessor and policies as long as real ones.
pub fn login(i: usize) -> Command {
    let entry = TokenEntry {
        hash: format!("{i:064x}"),
        accessor: format!("{i:024x}"),
        display_name: format!("userpass-user{}", i % 100),
        username: Some(format!("user{}", i % 100)),
        policies: vec!["default".into(), "ops".into()],
        expires: Some(u64::MAX / 2),
        ttl_secs: 3600,
        ..TokenEntry::default()
    };
    Command::TokenCreate { entry: Box::new(entry), login: None }
}

/// Applies `commands` as the entries after `after`, as one batch; returns how long it took.
pub async fn apply(sm: &mut StateMachine, after: u64, commands: Vec<Command>) -> Duration {
    let entries: Vec<_> = commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            Ok((Entry::new_normal(LogId::new(LeaderId { term: 1, node_id: 1 }, after + 1 + i as u64), c), None))
        })
        .collect();
    let started = Instant::now();
    sm.apply(futures::stream::iter(entries)).await.expect("the batch applies");
    started.elapsed()
}
