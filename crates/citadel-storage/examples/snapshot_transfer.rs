//! How much memory sending a snapshot to a follower, receiving and installing it, and a start
//! that rebuilds the store from the snapshot take on a node holding many tokens, users and
//! secrets: the resident memory before each and its peak, and how long each took. It runs on
//! the system allocator (glibc), not the server binary's jemalloc.
//!
//! `cargo run --release -p citadel-storage --example snapshot_transfer -- [TOKENS] [USERS] [SECRETS]`
//! (defaults 200,000, 20,000 and 20,000). The sender's lines go through a file, so neither
//! side's figure counts them. Before each the peak is reset (`/proc/self/clear_refs`) to the
//! resident memory then, which includes what the allocator kept from building the sender. The
//! two starts run in fresh processes (this example, `open DIR`), where nothing freed earlier
//! can hide a peak: the sender's data directory opened without its saved state, as a data
//! directory whose store went ahead of its saved state is (a rebuild), then once more, as a
//! restart finds it.

use std::io::{BufRead, Write};
use std::time::Instant;

use citadel_core::command::Command;
use citadel_core::token::User;
use citadel_storage::state_machine::TransferPart;
use citadel_storage::types::SnapshotData;
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

mod common;
use common::{apply, init, login};

/// A user with an Argon2id hash as long as a real one.
fn user(i: usize) -> Command {
    let user = User {
        username: format!("user{i}"),
        password_hash: format!("$argon2id$v=19$m=19456,t=2,p=1${i:022x}${i:043x}"),
        policies: vec!["default".into(), "ops".into()],
        token_ttl_secs: 3600,
        token_max_ttl_secs: 0,
    };
    Command::UserPut { user }
}

/// A `/proc/self/status` figure, in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib =
        status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok());
    kib.unwrap_or(0.0) / 1024.0
}

/// Resets the peak resident memory to the current one; returns that.
fn reset_peak() -> f64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak (/proc/self/clear_refs)");
    status_mib("VmRSS:")
}

#[tokio::main]
async fn main() {
    if let Some(dir) = std::env::args().nth(1).filter(|a| a == "open").and(std::env::args().nth(2)) {
        return open_and_report(std::path::Path::new(&dir));
    }
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("TOKENS, USERS and SECRETS: numbers"));
    let (tokens, users) = (args.next().unwrap_or(200_000), args.next().unwrap_or(20_000));
    let secrets = args.next().unwrap_or(20_000);
    let (from, to) = (tempfile::tempdir().expect("a directory"), tempfile::tempdir().expect("a directory"));
    let (sender_log, mut sender) = citadel_storage::open(from.path(), 1).expect("storage opens");
    let mut index = 0;
    apply(&mut sender, index, vec![init()]).await;
    index += 1;
    let commands: Vec<Command> =
        (0..users).map(user).chain((0..tokens).map(login)).chain((0..secrets).map(secret)).collect();
    for batch in commands.chunks(1_000) {
        apply(&mut sender, index, batch.to_vec()).await;
        index += batch.len() as u64;
    }
    drop(commands);
    let snapshot = sender.get_snapshot_builder().await.build_snapshot().await.expect("the snapshot builds");
    let SnapshotData::Local(mut local) = snapshot.snapshot else { unreachable!("a built snapshot is local") };

    let lines_path = from.path().join("transfer.lines");
    let base = reset_peak();
    let started = Instant::now();
    let mut file = std::io::BufWriter::new(std::fs::File::create(&lines_path).expect("the lines' file"));
    let mut header = None;
    sender
        .reader()
        .write_transfer(&mut local, &mut |part| {
            match part {
                TransferPart::Header(data) => header = Some(data),
                TransferPart::Line(line) => {
                    file.write_all(line)?;
                    file.write_all(b"\n")?;
                }
            }
            Ok(())
        })
        .expect("the transfer is written");
    file.flush().expect("the lines are written");
    drop(file);
    let header = header.expect("a header");
    let send = (started.elapsed(), base, status_mib("VmHWM:"));
    drop((sender, sender_log));

    let (receiving_log, mut receiver) = citadel_storage::open(to.path(), 2).expect("storage opens");
    let base = reset_peak();
    let started = Instant::now();
    let mut receiving = receiver.reader().receive_snapshot(&header, &snapshot.meta).expect("the header is taken");
    let lines = std::io::BufReader::new(std::fs::File::open(&lines_path).expect("the lines' file"));
    let mut count = 0;
    for line in lines.split(b'\n') {
        receiving.add(&line.expect("a line")).expect("the line is taken");
        count += 1;
    }
    receiving.finish().expect("everything arrived");
    receiver.install_snapshot(&snapshot.meta, SnapshotData::Received(header.clone())).await.expect("installed");
    let receive = (started.elapsed(), base, status_mib("VmHWM:"));
    drop((receiving_log, receiver));

    forget_saved_state(&from.path().join(citadel_storage::DB_FILE));
    let rebuild = open_in_a_process(from.path());
    let restart = open_in_a_process(from.path());
    let snapshot_mib = std::fs::metadata(from.path().join("snapshot.bin")).map_or(0, |m| m.len()) as f64 / 1048576.0;

    let mib = |(_, base, peak): (std::time::Duration, f64, f64)| format!("resident {base:.0} MiB, peak {peak:.0} MiB");
    println!(
        "{tokens} tokens, {users} users and {secrets} secrets: snapshot.bin {snapshot_mib:.0} MiB, header {:.1} MiB \
         and {count} lines; sending took {:.1} s ({}), receiving and installing {:.1} s ({}), a start rebuilding from \
         the snapshot {:.1} s ({}), a start from the saved state {:.1} s ({})",
        header.len() as f64 / (1 << 20) as f64,
        send.0.as_secs_f64(),
        mib(send),
        receive.0.as_secs_f64(),
        mib(receive),
        rebuild.0.as_secs_f64(),
        mib(rebuild),
        restart.0.as_secs_f64(),
        mib(restart),
    );
}

/// Opens the storage in `dir` as a node's start does, and prints how long it took, the
/// resident memory before and the peak.
fn open_and_report(dir: &std::path::Path) {
    let base = reset_peak();
    let started = Instant::now();
    let opened = citadel_storage::open(dir, 1).expect("storage opens");
    println!("{} {base} {}", started.elapsed().as_secs_f64(), status_mib("VmHWM:"));
    drop(opened);
}

/// Runs [`open_and_report`] in a fresh process of this example.
fn open_in_a_process(dir: &std::path::Path) -> (std::time::Duration, f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().expect("this example"))
        .arg("open")
        .arg(dir)
        .output()
        .expect("the example runs");
    assert!(out.status.success(), "open failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let figures: Vec<f64> = text.split_whitespace().map(|f| f.parse().expect("a figure")).collect();
    let [secs, base, peak] = figures[..] else { panic!("three figures: {text}") };
    (std::time::Duration::from_secs_f64(secs), base, peak)
}

/// A secret of a few versions' size, at its own path.
fn secret(i: usize) -> Command {
    let (mount, path) = ("secret/".into(), format!("db/{i:08}"));
    Command::KvWrite { mount, path, version: 1, ciphertext: vec![7; 300], cas: None, at: 5 }
}

/// Removes the state a clean stop saved beside the store (redb's `meta` table, key `state`):
/// the next open rebuilds the store from `snapshot.bin`.
fn forget_saved_state(db: &std::path::Path) {
    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    let db = redb::Database::open(db).expect("raft.redb opens");
    let txn = db.begin_write().expect("a write");
    txn.open_table(META).expect("its meta table").remove("state").expect("the saved state is removed");
    txn.commit().expect("committed");
}
