//! How much memory sending a snapshot to a follower, and receiving and installing it, takes on
//! a node holding many tokens and users: the peak resident memory of each side above what the
//! process held before it, and how long each took.
//!
//! `cargo run --release -p citadel-storage --example snapshot_transfer -- [TOKENS] [USERS]`
//! (defaults 200,000 and 20,000). The sender's lines go through a file, so neither side's
//! figure counts them. Before each side the peak is reset (`/proc/self/clear_refs`) to the
//! resident memory then, which includes what the allocator kept from building the sender.

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
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("TOKENS and USERS: numbers"));
    let (tokens, users) = (args.next().unwrap_or(200_000), args.next().unwrap_or(20_000));
    let (from, to) = (tempfile::tempdir().expect("a directory"), tempfile::tempdir().expect("a directory"));
    let (_log, mut sender) = citadel_storage::open(from.path(), 1).expect("storage opens");
    let mut index = 0;
    apply(&mut sender, index, vec![init()]).await;
    index += 1;
    let commands: Vec<Command> = (0..users).map(user).chain((0..tokens).map(login)).collect();
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
    drop(sender);

    let (_log, mut receiver) = citadel_storage::open(to.path(), 2).expect("storage opens");
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
    let mib = |(_, base, peak): (std::time::Duration, f64, f64)| format!("resident {base:.0} MiB, peak {peak:.0} MiB");
    println!(
        "{tokens} tokens and {users} users: header {:.1} MiB and {count} lines; sending took {:.1} s ({}), receiving \
         and installing {:.1} s ({})",
        header.len() as f64 / (1 << 20) as f64,
        send.0.as_secs_f64(),
        mib(send),
        receive.0.as_secs_f64(),
        mib(receive)
    );
}
