//! Audit retention (§9.3): the leader's job cuts every chain at its events older than
//! `[audit] retain_days`; every node archives them to JSON lines and deletes them from its
//! audit store; `citadel audit verify --archive` checks the archives against the cluster.

use std::path::PathBuf;

use citadel::dev;
use serde_json::json;

use crate::harness::{Cluster, STARTUP};

/// The node's archive files, oldest first (named by the log index of their prune).
fn archives(cluster: &Cluster, i: usize) -> Vec<PathBuf> {
    let dir = cluster.layout.data_dir(i).join("audit-archive");
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let path = e.ok()?.path();
                    let index =
                        path.file_name()?.to_str()?.strip_prefix("audit-")?.strip_suffix(".jsonl")?.parse().ok()?;
                    Some((index, path))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.into_iter().map(|(_, path)| path).collect()
}

fn verify_archives(cluster: &Cluster, i: usize, files: &[PathBuf]) -> std::process::Output {
    let mut cli = std::process::Command::new(crate::harness::EXE);
    cli.args(["audit", "verify"]);
    for file in files {
        cli.arg("--archive").arg(file);
    }
    cli.env("CITADEL_ADDR", cluster.layout.api_url(i))
        .env("CITADEL_TOKEN", &cluster.root)
        .env("CITADEL_CACERT", cluster.layout.ca_path())
        .output()
        .unwrap()
}

#[tokio::test]
async fn retention_archives_old_events_on_every_node_and_the_archives_verify_against_the_cluster() {
    // 0.00003 days is 2.6 s; the job looks every 300 ms.
    let config = "[audit]\nretain_days = 0.00003\n[jobs]\naudit_retention_ms = 300\n";
    let cluster = Cluster::start_nodes(3, 29400, true, config).await;
    let root = cluster.root();
    for n in 0..20 {
        root.kv_put("secret", &format!("kept/{n}"), &json!({ "n": n }), None).await.unwrap();
    }
    for i in 0..3 {
        let node = cluster.root_at(i);
        let verify = dev::wait_for("retention to prune the writes' events", STARTUP, || async {
            let v = node.get("sys/audit/verify").await.ok()?;
            (v["data"]["log"]["pruned_through"].as_u64()? >= 20).then_some(v)
        })
        .await
        .unwrap();
        assert_eq!(verify["data"]["ok"], json!(true), "node {i}: the retained chains verify from their cut: {verify}");
        let listed = node.get("sys/audit/events?path=secret/data/kept/&limit=1000").await.unwrap();
        let listed = listed["data"]["events"].as_array().unwrap();
        assert!(listed.iter().all(|e| e["chain"] != json!("log")), "node {i}: pruned events are gone: {listed:?}");

        let files = archives(&cluster, i);
        let archived: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
        for n in 0..20 {
            assert!(archived.contains(&format!("secret/data/kept/{n}")), "node {i} archived write {n}");
        }
        let cli = verify_archives(&cluster, i, &files);
        let stdout = String::from_utf8_lossy(&cli.stdout);
        assert!(cli.status.success(), "node {i}: {}{stdout}", String::from_utf8_lossy(&cli.stderr));
        assert!(stdout.contains("the log chain"), "{stdout}");
    }
    // The secrets themselves are state, not audit: retention leaves them alone.
    assert_eq!(root.kv_get("secret", "kept/7", None).await.unwrap()["n"], json!(7));

    // An archive edited after the fact fails, naming the file and the line.
    let files = archives(&cluster, 0);
    let first = std::fs::read_to_string(&files[0]).unwrap();
    let line = first.lines().next().unwrap().to_string();
    let edited_line = line.replacen("\\\"status\\\":", "\\\"status\\\":1", 1);
    assert_ne!(edited_line, line, "the edit changes the stored body bytes");
    let edited = cluster.layout.data_dir(0).join("edited.jsonl");
    std::fs::write(&edited, first.replacen(&line, &edited_line, 1)).unwrap();
    let mut tampered = files.clone();
    tampered[0] = edited.clone();
    let cli = verify_archives(&cluster, 0, &tampered);
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(!cli.status.success(), "a tampered archive is refused");
    assert!(stderr.contains("edited.jsonl line 1") && stderr.contains("tampered"), "{stderr}");
}
