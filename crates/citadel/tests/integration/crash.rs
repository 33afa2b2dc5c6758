use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::harness::Node1;

#[tokio::test]
async fn writes_acknowledged_before_kill_9_are_all_present_after_restart() {
    let mut node = Node1::start(21300).await;
    let root = node.root();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    // The one write in flight when the node dies may or may not have committed.
    let in_flight: Arc<Mutex<Option<(String, String)>>> = Arc::default();
    let writer = {
        let (root, acked, in_flight) = (root.clone(), acked.clone(), in_flight.clone());
        tokio::spawn(async move {
            for i in 0.. {
                let (path, value) = (format!("crash/k{}", i % 40), format!("value-{i}"));
                *in_flight.lock().unwrap() = Some((path.clone(), value.clone()));
                match root.kv_put("secret", &path, &json!({ "v": value }), None).await {
                    Ok(_) => acked.lock().unwrap().push((path, value)),
                    Err(_) => break,
                }
            }
        })
    };
    crate::harness::wait_until("60 acknowledged writes", || acked.lock().unwrap().len() >= 60).await;
    node.kill9();
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();

    node.restart().await;
    let mut latest = std::collections::BTreeMap::new();
    for (path, value) in &acked {
        latest.insert(path.clone(), value.clone());
    }
    let in_flight = in_flight.lock().unwrap().clone();
    assert!(latest.len() >= 40, "every key was acknowledged at least once");
    for (path, value) in latest {
        let got = root.kv_get("secret", &path, None).await.unwrap()["v"].clone();
        let unacked = in_flight.as_ref().filter(|(p, _)| *p == path).map(|(_, v)| json!(v));
        assert!(
            got == json!(value) || Some(&got) == unacked.as_ref(),
            "{path}: found {got}, but the last acknowledged write was {value:?} (in flight: {unacked:?})"
        );
    }
    let verify = root.get("sys/audit/verify").await.unwrap();
    assert_eq!(verify["data"]["ok"], json!(true), "{verify}");
}

#[tokio::test]
async fn a_node_refuses_a_data_directory_of_another_node() {
    let mut node = Node1::start(21310).await;
    node.kill9();
    let config = node.layout.config_path(0);
    let text = std::fs::read_to_string(&config).unwrap().replace("node_id = 1", "node_id = 7");
    std::fs::write(&config, text).unwrap();
    let status =
        std::process::Command::new(crate::harness::EXE).args(["server", "--config"]).arg(&config).output().unwrap();
    assert!(!status.status.success());
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("raft.redb") && stderr.contains("belongs to node 1"), "{stderr}");
}

#[tokio::test]
async fn a_tampered_audit_spool_stops_the_node_with_the_file_named() {
    let mut node = Node1::start(21320).await;
    node.root().kv_put("secret", "x", &json!({ "v": "1" }), None).await.unwrap();
    // The write's event rides in its Raft entry; the read's is the spool's to hold.
    node.root().kv_get("secret", "x", None).await.unwrap();
    node.kill9();
    let spool = node.layout.data_dir(0).join("audit").join("audit.spool");
    let text = std::fs::read_to_string(&spool).unwrap();
    let forged = text.replacen("secret/data/x", "secret/data/y", 1);
    assert_ne!(text, forged);
    std::fs::write(&spool, forged).unwrap();
    let out = std::process::Command::new(crate::harness::EXE)
        .args(["server", "--config"])
        .arg(node.layout.config_path(0))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("audit.spool") && stderr.contains("tampered"), "{stderr}");
}

#[tokio::test]
async fn a_bad_config_stops_the_server_naming_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "node_id = 1\ndata_dir = \"/tmp/x\"\napi_addr = \"127.0.0.1:1\"\ncluster_addr = \"127.0.0.1:2\"\nbogus_key = 3\n[tls]\ncert=\"a\"\nkey=\"b\"\nca=\"c\"\n").unwrap();
    let out = std::process::Command::new(crate::harness::EXE).args(["server", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml") && stderr.contains("bogus_key"), "{stderr}");
}

#[tokio::test]
async fn a_damaged_raft_log_record_stops_the_node_with_the_file_named() {
    let mut node = Node1::start(21330).await;
    let root = node.root();
    root.kv_put("secret", "damage-me", &json!({ "v": "1" }), None).await.unwrap();
    // The write's audit event travels through the Raft log; wait until it is there.
    citadel::dev::wait_for("the audit event to be replicated", std::time::Duration::from_secs(30), || async {
        let events = root.get("sys/audit/events?path=secret/data/damage-me").await.ok()?;
        events["data"]["events"].as_array().is_some_and(|e| !e.is_empty()).then_some(())
    })
    .await
    .unwrap();
    node.kill9();
    let log_dir = node.layout.data_dir(0).join(citadel_storage::LOG_DIR);
    let needle = b"secret/data/damage-me";
    let mut damaged = None;
    for file in std::fs::read_dir(&log_dir).unwrap() {
        let path = file.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at + needle.len() - 2] ^= 0x01;
            std::fs::write(&path, bytes).unwrap();
            damaged = Some(path);
        }
    }
    let damaged = damaged.expect("the record is in a log file");
    let mut server = std::process::Command::new(crate::harness::EXE)
        .args(["server", "--config"])
        .arg(node.layout.config_path(0))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            server.kill().unwrap();
            server.wait().unwrap();
            panic!("the node started on a damaged log instead of stopping");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success(), "a node must not serve a damaged log");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut stderr).unwrap();
    let name = damaged.file_name().unwrap().to_string_lossy();
    assert!(stderr.contains(&*name) && stderr.contains("damaged"), "the message must name the damaged file: {stderr}");
}

/// The test command sets `CITADEL_SKIP_MOUNT_TESTS=1`, and says so loudly, where mounting is
/// impossible; the disk-fault tests then say SKIPPED.
fn mounting_is_impossible() -> bool {
    let skip = std::env::var("CITADEL_SKIP_MOUNT_TESTS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("SKIPPED: this machine cannot mount file systems (CITADEL_SKIP_MOUNT_TESTS=1)");
    }
    skip
}

/// Waits (a minute at most) for the cluster's node 0 to exit, and says how it did.
async fn stopped(node: &mut Node1) -> std::process::ExitStatus {
    citadel::dev::wait_for("the node to stop", std::time::Duration::from_secs(60), || {
        let exit = node.exited_at(0);
        async move { exit }
    })
    .await
    .unwrap()
}

/// A tmpfs mounted over a directory (its contents kept) for the life of the value; needs root,
/// as the test command runs.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount_over(dir: &std::path::Path, bytes: u64) -> SmallDisk {
        let aside = dir.with_extension("aside");
        std::fs::rename(dir, &aside).unwrap();
        std::fs::create_dir(dir).unwrap();
        let options = format!("size={bytes},mode=0700");
        let status =
            std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &options, "citadel-test"]).arg(dir).status();
        assert!(status.is_ok_and(|s| s.success()), "mounting a small tmpfs failed (the tests run as root)");
        for file in std::fs::read_dir(&aside).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), dir.join(file.file_name())).unwrap();
        }
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_node_whose_raft_log_cannot_be_written_stops_saying_why() {
    if mounting_is_impossible() {
        return;
    }
    let mut node = Node1::start(21340).await;
    node.root().kv_put("secret", "before", &json!({ "v": "1" }), None).await.unwrap();
    node.kill9();
    let log_dir = node.layout.data_dir(0).join(citadel_storage::LOG_DIR);
    let used: u64 = std::fs::read_dir(&log_dir).unwrap().map(|f| f.unwrap().metadata().unwrap().len()).sum();
    let _disk = SmallDisk::mount_over(&log_dir, used + (2 << 20));
    node.restart().await;
    let root = node.root();
    let big = "x".repeat(200 << 10);
    for i in 0..200 {
        if node.exited_at(0).is_some() {
            break;
        }
        // Refused writes are expected once the disk is full; the node must then stop.
        let _ = root.kv_put("secret", &format!("fill{i}"), &json!({ "v": big }), None).await;
    }
    assert!(!stopped(&mut node).await.success(), "a node that cannot write its log exits with an error");
    let log = node.server_log();
    assert!(
        log.contains("writing the Raft log") && log.contains(&log_dir.display().to_string()),
        "the node says what failed and where: {log}"
    );
}

/// A tmpfs of `bytes` holding a copy of `file`, bind-mounted over it for the life of the value.
struct SmallFile {
    file: std::path::PathBuf,
    /// Unmounted after the bind mount over `file` (fields drop after `drop`).
    _disk: SmallDisk,
}

impl SmallFile {
    fn mount_over(file: &std::path::Path, bytes: u64) -> SmallFile {
        let dir = file.with_extension("disk");
        std::fs::create_dir(&dir).unwrap();
        let disk = SmallDisk::mount_over(&dir, bytes);
        let copy = dir.join(file.file_name().unwrap());
        std::fs::copy(file, &copy).unwrap();
        let status = std::process::Command::new("mount").arg("--bind").arg(&copy).arg(file).status();
        assert!(status.is_ok_and(|s| s.success()), "bind-mounting a file failed (the tests run as root)");
        SmallFile { file: file.to_path_buf(), _disk: disk }
    }
}

impl Drop for SmallFile {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.file).status();
    }
}

#[tokio::test]
async fn a_node_whose_audit_store_cannot_be_written_stops_saying_why() {
    if mounting_is_impossible() {
        return;
    }
    let mut node = Node1::start(21350).await;
    node.root().kv_put("secret", "before", &json!({ "v": "1" }), None).await.unwrap();
    node.kill9();
    // Only the redb file (the audit store) sits on a full disk; the Raft log has room.
    let db = node.layout.data_dir(0).join(citadel_storage::DB_FILE);
    let size = std::fs::metadata(&db).unwrap().len();
    let _disk = SmallFile::mount_over(&db, size + (1 << 20));
    node.restart().await;
    let root = node.root();
    let long_path = "p".repeat(400);
    for i in 0..20_000 {
        if node.exited_at(0).is_some() {
            break;
        }
        // Each write's audit event goes to the store; refusals are expected once it is full.
        let _ = root.kv_put("secret", &format!("{long_path}{i}"), &json!({ "v": i }), None).await;
    }
    assert!(!stopped(&mut node).await.success(), "a node that cannot keep its state exits with an error");
    let log = node.server_log();
    assert!(
        log.contains("Raft stopped") && log.contains(&db.display().to_string()),
        "the node says what failed and where: {log}"
    );
}

#[tokio::test]
async fn a_node_whose_audit_spool_cannot_be_written_stops_saying_why() {
    if mounting_is_impossible() {
        return;
    }
    let mut node = Node1::start(21360).await;
    node.root().kv_put("secret", "before", &json!({ "v": "1" }), None).await.unwrap();
    node.kill9();
    // Only the spool sits on a full disk: every read's event is fsynced there before its answer.
    let spool = node.layout.data_dir(0).join("audit").join("audit.spool");
    let size = std::fs::metadata(&spool).unwrap().len();
    let _disk = SmallFile::mount_over(&spool, size + (64 << 10));
    node.restart().await;
    let root = node.root();
    let mut answered_after_failure = 0;
    for _ in 0..5_000 {
        if node.exited_at(0).is_some() {
            break;
        }
        // Reads succeed until the spool is full; once a write to it failed, none may be answered.
        let failed_already = node.server_log().contains("cannot write audit spool");
        if root.kv_get("secret", "before", None).await.is_ok() && failed_already {
            answered_after_failure += 1;
        }
    }
    assert!(!stopped(&mut node).await.success(), "a node that cannot audit exits with an error");
    assert_eq!(answered_after_failure, 0, "no read is answered once its event cannot be written");
    let log = node.server_log();
    assert!(
        log.contains("cannot write audit spool") && log.contains(&spool.display().to_string()),
        "the node says what failed and where: {log}"
    );
}
