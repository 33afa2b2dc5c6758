//! How long applying one write takes on a node holding many tokens, in a batch that is durable
//! (one a second: fsynced, with the state saved beside the store) and in one that is not. A
//! batch holds the state's write lock throughout, so this is how long every write and every
//! reader on the node waits behind it.
//!
//! `cargo run --release -p citadel-storage --example durable_batch -- [TOKENS] [ROUNDS]`
//! (defaults 100,000 and 5): TOKENS logins of 100 users, then ROUNDS rounds of a durable and a
//! plain one-write batch, then ROUNDS snapshot builds, each with a write applied 1 ms into it;
//! prints medians.

use std::time::{Duration, Instant};

use citadel_core::command::Command;
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

mod common;
use common::{apply, init, login};

fn write(version: u64) -> Command {
    Command::KvWrite { mount: "secret/".into(), path: "a".into(), version, ciphertext: vec![7; 64], cas: None, at: 5 }
}

/// This process's resident memory, as /proc says it.
fn resident() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).map_or_else(|| "unknown".into(), |v| v.trim().to_string())
}

fn median(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("TOKENS and ROUNDS: numbers"));
    let (tokens, rounds) = (args.next().unwrap_or(100_000), args.next().unwrap_or(5).max(1));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (_log, mut sm) = citadel_storage::open(dir.path(), 1).expect("storage opens");
    let mut index = 0;
    apply(&mut sm, index, vec![init()]).await;
    index += 1;
    for start in (0..tokens).step_by(1_000) {
        let batch: Vec<Command> = (start..tokens.min(start + 1_000)).map(login).collect();
        let n = batch.len() as u64;
        apply(&mut sm, index, batch).await;
        index += n;
    }
    let (mut durable, mut plain) = (Vec::new(), Vec::new());
    for round in 0..rounds as u64 {
        // A batch is durable when a second has passed since the last durable one.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        durable.push(apply(&mut sm, index, vec![write(2 * round + 1)]).await);
        plain.push(apply(&mut sm, index + 1, vec![write(2 * round + 2)]).await);
        index += 2;
    }
    println!(
        "{tokens} tokens held ({} resident): one write applies in {:.2} ms (median of {rounds}) in a durable batch, {:.2} ms in a plain one",
        resident(),
        median(durable),
        median(plain)
    );
    // A snapshot is built beside `apply` (openraft builds every `snapshot_threshold` entries):
    // what it holds the state's lock for, a write started just after it waits.
    let (mut builds, mut waits) = (Vec::new(), Vec::new());
    for round in 0..rounds as u64 {
        let mut builder = sm.get_snapshot_builder().await;
        let started = Instant::now();
        let build = tokio::spawn(async move {
            builder.build_snapshot().await.expect("the snapshot builds");
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        waits.push(apply(&mut sm, index, vec![write(2 * rounds as u64 + round + 1)]).await);
        index += 1;
        builds.push(build.await.expect("the build task"));
    }
    println!(
        "a snapshot builds in {:.0} ms (median of {rounds}); a write started 1 ms into the build applies in {:.2} ms",
        median(builds),
        median(waits)
    );
}
