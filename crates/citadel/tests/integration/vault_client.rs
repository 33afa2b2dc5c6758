//! Vault's clients and formats against real nodes: hvac, node-vault, Vault's snapshot archive.
//! Ports: 21500 (hvac), 27000 (snapshot archive), 27100-27330 (node-vault, on a new cluster after an election).

use std::io::Read;

use serde_json::json;
use sha2::Digest;

use crate::harness::{Cluster, Node1};

/// Runs tests/hvac_client.py (hvac, the maintained Vault client for Python) against a node.
/// `scripts/test` installs hvac; without it this test fails rather than skipping.
#[tokio::test]
async fn hvac_python_client_drives_the_api() {
    let node = Node1::start(21500).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("hvac_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("VAULT_ADDR", node.layout.api_url(0))
        .env("VAULT_TOKEN", &node.root)
        .env("VAULT_CACERT", node.layout.ca_path())
        .output()
        .await
        .expect("python3 must be installed (scripts/test installs the Python dependencies)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvac run failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        node.server_log()
    );
    assert!(stdout.contains("hvac: all checks passed"), "{stdout}");
}

/// Runs tests/node_vault/test.js (node-vault, a Vault client for Node.js, version pinned in its
/// package.json and package-lock.json) against a three-node cluster, through the leader and a
/// follower. `scripts/test` runs `npm ci` there; without it this test fails rather than skipping.
///
/// The script checks which node answers as leader and which as standby, so it needs one leader
/// for its whole run. A machine that stalls every process for a second (CI's did, while node
/// started) makes the followers elect another: a failed run during which the term moved is run
/// again on a new cluster, at most twice; a failure with no election fails the test.
#[tokio::test]
async fn node_vault_client_drives_a_cluster() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("node_vault");
    assert!(
        dir.join("node_modules").join("node-vault").is_dir(),
        "node-vault is not installed: run `npm ci` in {} (scripts/test does)",
        dir.display()
    );
    for port in [27100, 27200, 27300] {
        let cluster = Cluster::start_nodes(3, port, true, "").await;
        let leader = cluster.leader().await;
        let term = cluster.term_at(leader).await.expect("the leader answers sys/health");
        let follower = (leader + 1) % 3;
        let out = tokio::process::Command::new("node")
            .arg("test.js")
            .current_dir(&dir)
            .env("VAULT_ADDR", cluster.layout.api_url(leader))
            .env("VAULT_ADDR_FOLLOWER", cluster.layout.api_url(follower))
            .env("VAULT_TOKEN", &cluster.root)
            .env("VAULT_CACERT", cluster.layout.ca_path())
            .kill_on_drop(true)
            .output()
            .await
            .expect("node must be installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            assert!(stdout.contains("node-vault: all checks passed"), "{stdout}");
            return;
        }
        let terms = cluster.terms().await;
        let elected = terms.iter().flatten().any(|t| *t != term);
        assert!(
            elected && port != 27300,
            "node-vault run failed (terms: {term} at the start, {terms:?} after)\nstdout:\n{stdout}\n\
             stderr:\n{stderr}\nleader's log:\n{}",
            cluster.server_log_at(leader)
        );
        eprintln!("an election during the run (term {term}, then {terms:?}); the script runs again on a new cluster\n{stdout}");
    }
}

/// The entries of a gzip'd tar, in order, read with the `flate2` and `tar` crates.
fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    archive
        .entries()
        .expect("a gzip'd tar")
        .map(|entry| {
            let mut entry = entry.expect("a valid tar entry");
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

fn tar_gz(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[tokio::test]
async fn snapshots_are_vaults_archive_which_restores_and_a_tampered_one_is_refused() {
    let node = Node1::start(27000).await;
    let root = node.root();
    root.kv_put("secret", "a", &json!({ "v": "before" }), None).await.unwrap();
    let archive = root.bytes("GET", "sys/storage/raft/snapshot", None).await.unwrap();
    let entries = untar(&archive);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed"]);
    let meta: serde_json::Value = serde_json::from_slice(&entries[0].1).unwrap();
    assert_eq!(meta["Size"], json!(entries[1].1.len()), "{meta}");
    assert!(meta["Index"].as_u64().unwrap() > 0 && meta["Term"].as_u64().unwrap() > 0, "{meta}");
    let sums = String::from_utf8(entries[2].1.clone()).unwrap();
    let state_sum = hex::encode(sha2::Sha256::digest(&entries[1].1));
    assert!(sums.contains(&format!("{state_sum}  state.bin\n")), "sha256sum format: {sums}");
    assert!(!archive.windows(6).any(|w| w == b"before"), "ciphertext only");

    root.kv_put("secret", "a", &json!({ "v": "after" }), None).await.unwrap();
    root.bytes("POST", "sys/storage/raft/snapshot", Some(archive.clone())).await.unwrap();
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "before" }));
    root.kv_put("secret", "a", &json!({ "v": "kept" }), None).await.unwrap();

    // Tampered: state.bin edited and SHA256SUMS recomputed; only the sealed sums can tell.
    let mut forged = entries.clone();
    let at = forged[1].1.len() - 3;
    forged[1].1[at] ^= 0x01;
    forged[2].1 = format!(
        "{}  meta.json\n{}  state.bin\n",
        hex::encode(sha2::Sha256::digest(&forged[0].1)),
        hex::encode(sha2::Sha256::digest(&forged[1].1))
    )
    .into_bytes();
    let refused = root.bytes("POST", "sys/storage/raft/snapshot", Some(tar_gz(&forged))).await.unwrap_err();
    assert_eq!(refused.status().unwrap(), 400);
    assert!(refused.to_string().contains("SHA256SUMS.sealed"), "{refused}");
    // Tampered without recomputing: SHA256SUMS names the entry.
    let mut stale = entries.clone();
    stale[1].1[at] ^= 0x01;
    let refused = root.bytes("POST", "sys/storage/raft/snapshot", Some(tar_gz(&stale))).await.unwrap_err();
    assert_eq!(refused.status().unwrap(), 400);
    assert!(refused.to_string().contains("SHA256SUMS check failed for state.bin"), "{refused}");
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "kept" }), "nothing was restored");

    // The bare snapshot file inside (what older builds saved) still restores.
    root.bytes("POST", "sys/storage/raft/snapshot", Some(entries[1].1.clone())).await.unwrap();
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "before" }));

    // The CLI saves the archive, inspects it offline and restores it.
    root.kv_put("secret", "a", &json!({ "v": "cli" }), None).await.unwrap();
    let file = node.layout.dir.join("cli.snap");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(crate::harness::EXE)
            .args(["operator", "raft", "snapshot"])
            .args(args)
            .arg(&file)
            .env("CITADEL_ADDR", node.layout.api_url(0))
            .env("CITADEL_TOKEN", &node.root)
            .env("CITADEL_CACERT", node.layout.ca_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["save"]);
    assert_eq!(untar(&std::fs::read(&file).unwrap()).len(), 4, "the CLI saved the archive");
    let inspected = cli(&["inspect"]);
    assert!(inspected.contains("cluster_id"), "{inspected}");
    root.kv_put("secret", "a", &json!({ "v": "after-cli" }), None).await.unwrap();
    cli(&["restore"]);
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "cli" }));
}
