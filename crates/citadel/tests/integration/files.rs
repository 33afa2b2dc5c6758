//! Files (§8.4): private modes, no symlinks, refused writable data directories, authenticated
//! snapshots. Ports 24000-24490.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::Digest;

use crate::harness::{Node1, EXE};

/// Every file and directory under `dir` (not following links), with its permission bits.
fn modes_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            }
            out.push((entry.path(), meta.permissions().mode() & 0o7777));
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `citadel server` on node 0's config in the foreground and returns its failure output.
fn server_refuses_to_start(node: &Node1) -> String {
    let out = std::process::Command::new(EXE).args(["server", "--config"]).arg(node.layout.config_path(0)).output();
    let out = out.unwrap();
    assert!(!out.status.success(), "the server started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn no_file_under_a_data_directory_is_readable_by_others() {
    // The usual umask would leave files 0644: the modes must come from Citadel, not from it.
    // SAFETY: umask only swaps the process's file creation mask.
    unsafe { libc::umask(0o022) };
    let node = Node1::start(24000).await;
    let root = node.root();
    root.kv_put("secret", "files", &json!({ "v": "1" }), None).await.unwrap();
    citadel::dev::wait_for(
        "the audit event of the write to be shipped",
        std::time::Duration::from_secs(30),
        || async {
            let events = root.get("sys/audit/events?path=secret/data/files&limit=10").await.ok()?;
            events["data"]["events"].as_array().is_some_and(|e| !e.is_empty()).then_some(())
        },
    )
    .await
    .unwrap();
    // An operator snapshot through the CLI, saved into the dev directory, and the dev env file.
    let saved = node.layout.dir.join("saved.snap");
    let out = std::process::Command::new(EXE)
        .args(["operator", "raft", "snapshot", "save"])
        .arg(&saved)
        .env("CITADEL_ADDR", node.layout.api_url(0))
        .env("CITADEL_TOKEN", &node.root)
        .env("CITADEL_CACERT", node.layout.ca_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    citadel::dev::write_env(&node.layout, &node.root, &node.unseal_key).unwrap();

    let data = node.layout.data_dir(0);
    let seen = modes_under(&node.layout.dir);
    for required in [data.join("raft.redb"), data.join("audit/audit.spool"), saved, node.layout.dir.join("env")] {
        assert!(seen.iter().any(|(p, _)| *p == required), "{} was written", required.display());
    }
    let open: Vec<_> = seen.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable or writable by others: {open:?}");
    assert_eq!(mode(&data), 0o700);
}

#[tokio::test]
async fn a_node_refuses_a_data_directory_others_can_write() {
    let mut node = Node1::start(24010).await;
    node.kill9();
    let data = node.layout.data_dir(0);
    chmod(&data, 0o777);
    let stderr = server_refuses_to_start(&node);
    let fix = format!("chmod 700 {}", data.display());
    assert!(stderr.contains(&fix), "the message names the directory and the fix: {stderr}");

    // What an older version left (0755 and 0644) is not writable by others: tightened at start.
    chmod(&data, 0o755);
    chmod(&data.join("raft.redb"), 0o644);
    chmod(&data.join("audit"), 0o755);
    node.restart().await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("raft.redb")), 0o600);
    assert_eq!(mode(&data.join("audit")), 0o700);
    let log = node.server_log();
    assert_eq!(log.matches("tightened the modes").count(), 1, "logged once: {log}");
    assert_eq!(node.anonymous().health().await.unwrap().status, 200, "it serves");
}

#[tokio::test]
async fn a_symlink_in_the_data_directory_is_refused() {
    let mut node = Node1::start(24020).await;
    node.kill9();
    let spool = node.layout.data_dir(0).join("audit").join("audit.spool");
    let elsewhere = node.layout.dir.join("elsewhere.spool");
    std::fs::rename(&spool, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &spool).unwrap();
    let stderr = server_refuses_to_start(&node);
    assert!(stderr.contains(&spool.display().to_string()) && stderr.contains("symbolic link"), "{stderr}");
}

#[tokio::test]
async fn a_snapshot_tampered_with_a_recomputed_checksum_is_refused() {
    let node = Node1::start(24030).await;
    let root = node.root();
    root.kv_put("secret", "a", &json!({ "v": "kept" }), None).await.unwrap();
    let file = root.bytes("GET", "sys/storage/raft/snapshot", None).await.unwrap();
    let (mut header, mut stored) = citadel_server::api::snapshot_file(&file).unwrap();
    // The attacker adds a token of their own and recomputes every checksum.
    let mut forged = stored.tokens.values().next().unwrap().clone();
    forged.hash = "attacker".into();
    stored.tokens.insert(forged.hash.clone(), forged);
    stored.state.mounts.clear();
    let body = citadel_storage::codec::encode(&stored);
    header.sha256 = hex::encode(sha2::Sha256::digest(&body));
    header.size = body.len();
    let mut tampered = serde_json::to_vec(&header).unwrap();
    tampered.push(b'\n');
    tampered.extend_from_slice(&body);
    assert!(citadel_server::api::snapshot_file(&tampered).is_ok(), "the checksums alone cannot tell");

    let refused = root.bytes("POST", "sys/storage/raft/snapshot", Some(tampered.clone())).await.unwrap_err();
    assert_eq!(refused.status().unwrap(), 400);
    assert!(refused.to_string().contains("HMAC"), "{refused}");
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "kept" }), "nothing was restored");

    // snapshot-force skips the HMAC only: a damaged checksum is refused all the same.
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    let damaged = root.bytes("POST", "sys/storage/raft/snapshot-force", Some(tampered)).await.unwrap_err();
    assert_eq!(damaged.status().unwrap(), 400);
    assert!(damaged.to_string().contains("checksum"), "{damaged}");
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "kept" }));
    // The untampered file restores.
    root.bytes("POST", "sys/storage/raft/snapshot", Some(file)).await.unwrap();
}

/// §8.3 (here for its port range): concurrent `sys/rotate` calls used to be able to commit an
/// entry whose `apply` asserted, stopping every replica on every replay. Now the loser is refused
/// (409) and the log replays after a restart.
#[tokio::test]
async fn concurrent_rotations_are_refused_not_fatal_and_the_log_replays() {
    let mut node = Node1::start(24040).await;
    let root = node.root();
    root.kv_put("secret", "r", &json!({ "v": "before" }), None).await.unwrap();
    let rotations = (0..8).map(|_| root.request("PUT", "sys/rotate", None));
    let results = futures::future::join_all(rotations).await;
    let mut rotated = 0;
    for result in results {
        match result {
            Ok(_) => rotated += 1,
            Err(e) => assert_eq!(e.status().map(|s| s.as_u16()), Some(409), "{e}"),
        }
    }
    assert!(rotated >= 1);
    let term = root.get("sys/key-status").await.unwrap()["data"]["term"].as_u64().unwrap();
    assert_eq!(term, 1 + rotated, "each accepted rotation added one term");
    root.kv_put("secret", "r", &json!({ "v": "after" }), None).await.unwrap();

    node.kill9();
    node.restart().await;
    let root = node.root();
    assert_eq!(root.kv_get("secret", "r", None).await.unwrap(), json!({ "v": "after" }), "the log replayed");
    assert_eq!(root.get("sys/key-status").await.unwrap()["data"]["term"].as_u64(), Some(term));
}
