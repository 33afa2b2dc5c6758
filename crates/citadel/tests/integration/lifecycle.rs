//! Node lifecycle (§10.1): deactivate, activate, rename, resync; a voter that is down holds back
//! no log compaction. Ports 29500–29590.

use citadel::dev;
use citadel_client::Client;
use serde_json::{json, Value};

use crate::harness::{Cluster, STARTUP};

/// A gauge of the node's Prometheus metrics (`None` while the node cannot answer).
async fn metric(client: &Client, name: &str) -> Option<u64> {
    let reply = client.raw("GET", "sys/metrics?format=prometheus", None, &[]).await.ok()?;
    let text = reply.body.as_str()?.to_string();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

/// Writes `count` secrets with `clients` concurrent clients; every write must succeed. A 503
/// (no leader within the request's deadline: with a voter down, a heartbeat late by more than an
/// election timeout on a loaded machine costs an election) is sent again, as a client would,
/// until a generous deadline; any other error fails the test. Returns how many were sent again.
async fn write_many(client: &Client, prefix: &str, count: usize, clients: usize) -> usize {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut retried = 0;
            for n in (c..count).step_by(clients) {
                let path = format!("{prefix}/{}", n % 500);
                let deadline = std::time::Instant::now() + STARTUP;
                loop {
                    match client.kv_put("secret", &path, &json!({ "n": n }), None).await {
                        Ok(_) => break,
                        Err(e)
                            if e.status() == Some(reqwest::StatusCode::SERVICE_UNAVAILABLE)
                                && std::time::Instant::now() < deadline =>
                        {
                            retried += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("write {n} failed: {e}"),
                    }
                }
            }
            retried
        }));
    }
    let mut retried = 0;
    for t in tasks {
        retried += t.await.unwrap();
    }
    retried
}

#[tokio::test]
async fn a_follower_down_while_20000_entries_are_written_holds_back_no_compaction_and_catches_up_by_snapshot() {
    const THRESHOLD: u64 = 2000;
    const TRAILING: u64 = 500;
    let config = format!("[raft]\nsnapshot_threshold = {THRESHOLD}\nmax_trailing_logs = {TRAILING}\n");
    let mut cluster = Cluster::start_nodes(3, 29500, true, &config).await;
    let leader = cluster.leader().await;
    let down = (0..3).find(|i| *i != leader).unwrap();
    cluster.kill9_at(down);

    let root = cluster.root_at(leader);
    let retried = write_many(&root, "dead-voter", 20_000, 32).await;
    eprintln!("writes sent again after a 503: {retried}");
    let last = metric(&root, "citadel_raft_last_log_index").await.unwrap();
    let purged = metric(&root, "citadel_raft_purged_index").await.unwrap();
    eprintln!("leader's log with a voter down: last index {last}, purged through {purged}");
    assert!(last >= 20_000, "the writes reached the log (last index {last})");
    assert!(
        last - purged <= THRESHOLD + TRAILING + 100,
        "the leader keeps {} entries (last {last}, purged through {purged}) with a voter down; \
         at most snapshot_threshold + max_trailing_logs = {} expected",
        last - purged,
        THRESHOLD + TRAILING
    );

    cluster.respawn_at(down);
    cluster.wait_healthy(3).await;
    let node = cluster.root_at(down);
    dev::wait_for("the returning node to install a snapshot", STARTUP, || async {
        (metric(&node, "citadel_raft_snapshot_index").await? > 0).then_some(())
    })
    .await
    .unwrap();
    // Then it replays what followed the snapshot; a linearizable read answers once it has.
    let read = dev::wait_for("a linearizable read on the returning node", STARTUP, || async {
        node.kv_get("secret", "dead-voter/7", None).await.ok()
    })
    .await
    .unwrap();
    assert_eq!(read["n"].as_u64().unwrap() % 500, 7, "{read}");
}

/// The node's row in the HA table, as node `from` reports it.
async fn ha_row(cluster: &Cluster, from: usize, node: usize) -> Value {
    let status = cluster.root_at(from).get("sys/ha/status").await.unwrap();
    let id = cluster.layout.node_id(node);
    status["data"]["nodes"].as_array().unwrap().iter().find(|n| n["id"] == json!(id)).cloned().unwrap()
}

async fn is_voter(cluster: &Cluster, from: usize, node: usize) -> Option<bool> {
    let config = cluster.root_at(from).get("sys/storage/raft/configuration").await.ok()?;
    let id = cluster.layout.node_id(node).to_string();
    let servers = config["data"]["config"]["servers"].as_array()?.clone();
    servers.iter().find(|s| s["node_id"] == json!(id)).map(|s| s["voter"] == json!(true))
}

#[tokio::test]
async fn a_deactivated_voter_keeps_replicating_without_a_vote_serves_no_client_and_comes_back_when_activated() {
    let mut cluster = Cluster::start_nodes(3, 29520, true, "").await;
    let leader = cluster.leader().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (target, other) = (others[0], others[1]);
    let id = cluster.layout.node_id(target);
    let root = cluster.root_at(leader);
    root.kv_put("secret", "app/db", &json!({ "password": "before" }), None).await.unwrap();

    // With another voter down, taking this one's vote would leave no majority: refused, unchanged.
    cluster.kill9_at(other);
    dev::wait_for("the leader to see the killed voter unreachable", STARTUP, || async {
        (ha_row(&cluster, leader, other).await["state"] == json!("unreachable")).then_some(())
    })
    .await
    .unwrap();
    let refused = cluster.cli_at(leader, &["operator", "node", "deactivate", &id.to_string()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("failure tolerance"), "{stderr}");
    assert_eq!(is_voter(&cluster, leader, target).await, Some(true));
    assert_eq!(cluster.anonymous_at(target).health().await.unwrap().body["inactive"], json!(false));
    cluster.respawn_at(other);
    cluster.wait_healthy(3).await;
    dev::wait_for("the restarted voter to be reachable", STARTUP, || async {
        (ha_row(&cluster, leader, other).await["state"] == json!("healthy")).then_some(())
    })
    .await
    .unwrap();

    // Asked through the other follower: forwarded to the leader.
    let out = cluster.cli_at(other, &["operator", "node", "deactivate", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(is_voter(&cluster, leader, target).await, Some(false), "an inactive node has no vote");
    // Once it has applied its own deactivation, load balancers drop it.
    let health = dev::wait_for("the node to answer health 503", STARTUP, || async {
        cluster.anonymous_at(target).health().await.ok().filter(|h| h.status == 503)
    })
    .await
    .unwrap();
    assert_eq!(health.body["inactive"], json!(true), "{:?}", health.body);
    let read = cluster.root_at(target).raw("GET", "secret/data/app/db", None, &[]).await.unwrap();
    assert_eq!(read.status, 503, "it serves no client: {:?}", read.body);
    assert!(read.body["errors"][0].as_str().unwrap().contains("inactive"), "{:?}", read.body);
    assert_eq!(ha_row(&cluster, leader, target).await["state"], json!("inactive"));

    // It keeps replicating: a write on the leader reaches its state.
    root.kv_put("secret", "app/db", &json!({ "password": "after" }), None).await.unwrap();
    let commit = metric(&root, "citadel_raft_commit_index").await.unwrap();
    dev::wait_for("the inactive node to apply the write", STARTUP, || async {
        (metric(&cluster.root_at(target), "citadel_raft_applied_index").await? >= commit).then_some(())
    })
    .await
    .unwrap();
    // Caught up, it is what autopilot (every second) would promote: watch three rounds pass.
    let watch = std::time::Instant::now();
    while watch.elapsed() < std::time::Duration::from_secs(3) {
        assert_eq!(is_voter(&cluster, leader, target).await, Some(false), "autopilot gave an inactive node a vote");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let out = cluster.cli_at(leader, &["operator", "node", "activate", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dev::wait_for("the activated node to vote again", STARTUP, || async {
        is_voter(&cluster, leader, target).await.filter(|v| *v).map(|_| ())
    })
    .await
    .unwrap();
    let read = dev::wait_for("the activated node to serve", STARTUP, || async {
        cluster.root_at(target).kv_get("secret", "app/db", None).await.ok()
    })
    .await
    .unwrap();
    assert_eq!(read, json!({ "password": "after" }));
    assert_eq!(ha_row(&cluster, leader, target).await["state"], json!("healthy"));

    // Rename: the HA table shows the new name from any node.
    let out = cluster.cli_at(target, &["operator", "node", "rename", &id.to_string(), "west-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dev::wait_for("the new name on every node", STARTUP, || async {
        for from in 0..3 {
            if ha_row(&cluster, from, target).await["name"] != json!("west-1") {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    // The rename was asked of a follower, which forwards it and ships its own request event in
    // the background (gathered for up to 50 ms): wait for the events rather than look once.
    let wanted: Vec<String> =
        ["deactivate", "activate", "rename"].iter().map(|action| format!("sys/ha/nodes/{id}/{action}")).collect();
    let paths = std::cell::RefCell::new(Vec::new());
    let audited = dev::wait_for("every lifecycle request in the audit log", STARTUP, || async {
        let audit = root.get("sys/audit/events?path=sys/ha/nodes/&limit=100").await.ok()?;
        let found: Vec<String> =
            audit["data"]["events"].as_array()?.iter().filter_map(|e| e["path"].as_str().map(String::from)).collect();
        let all = wanted.iter().all(|w| found.contains(w));
        *paths.borrow_mut() = found;
        all.then_some(())
    })
    .await;
    assert!(audited.is_ok(), "deactivate, activate and rename are audited: {:?}", paths.borrow());
}

/// Checks that node `target` resynced: it caught up from a snapshot, votes, holds
/// `resync/last`, and its audit chains verify.
async fn assert_resynced(cluster: &Cluster, leader: usize, target: usize) {
    assert_eq!(is_voter(cluster, leader, target).await, Some(true), "it votes again once caught up");
    let node = cluster.root_at(target);
    // Restarted, it unseals itself (key file) before it answers.
    let snapshot = dev::wait_for("the resynced node to answer", STARTUP, || async {
        metric(&node, "citadel_raft_snapshot_index").await
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- node log:\n{}", cluster.server_log_at(target)));
    assert!(snapshot > 0, "it caught up from a snapshot");
    let read = node.raw("GET", "secret/data/resync/last", None, &[("X-Citadel-Consistency", "stale")]).await.unwrap();
    assert_eq!(read.body["data"]["data"]["n"], json!("last"), "{read:?}");
    let verify = node.get("sys/audit/verify").await.unwrap();
    assert_eq!(verify["data"]["ok"], json!(true), "{verify}");
    assert!(!cluster.layout.data_dir(target).join("RESYNC").exists(), "the marker is gone");
}

/// Kills node `target` (deleting its data directory if `lose_data`), runs its resync from the
/// leader, starts it again once it no longer votes (as the runbook says), and waits for the
/// command to succeed.
async fn resync_while_down(cluster: &mut Cluster, leader: usize, target: usize, lose_data: bool) {
    cluster.kill9_at(target);
    if lose_data {
        std::fs::remove_dir_all(cluster.layout.data_dir(target)).unwrap();
    }
    let mut resync = std::process::Command::new(crate::harness::EXE);
    resync
        .args(["operator", "node", "resync", &cluster.layout.node_id(target).to_string()])
        .env("CITADEL_ADDR", cluster.layout.api_url(leader))
        .env("CITADEL_TOKEN", &cluster.root)
        .env("CITADEL_CACERT", cluster.layout.ca_path());
    let resync = std::thread::spawn(move || resync.output().expect("run the citadel CLI"));
    let watching = &*cluster;
    dev::wait_for("the node to be demoted", STARTUP, || async {
        is_voter(watching, leader, target).await.filter(|v| !v).map(|_| ())
    })
    .await
    .unwrap();
    cluster.respawn_at(target);
    let out = tokio::task::spawn_blocking(move || resync.join().unwrap()).await.unwrap();
    assert!(
        out.status.success(),
        "{}\n--- node log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.server_log_at(target)
    );
}

const DISCARDED: &str = "resync: discarded this node's replicated state";

#[tokio::test]
async fn a_running_node_one_down_with_its_data_and_one_that_lost_it_are_resynced_from_a_snapshot_and_vote_again() {
    let mut cluster = Cluster::start_nodes(3, 29550, true, "[raft]\nsnapshot_threshold = 100\n").await;
    let leader = cluster.leader().await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let root = cluster.root_at(leader);
    for n in 0..30 {
        root.kv_put("secret", &format!("resync/{n}"), &json!({ "n": n }), None).await.unwrap();
    }
    root.kv_put("secret", "resync/last", &json!({ "n": "last" }), None).await.unwrap();

    // A running node: it discards its state and restarts in place (the same process).
    let running = followers[0];
    let out = cluster.cli_at(leader, &["operator", "node", "resync", &cluster.layout.node_id(running).to_string()]);
    assert!(
        out.status.success(),
        "{}\n--- node log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.server_log_at(running)
    );
    assert!(cluster.exited_at(running).is_none(), "the node restarted in place, as the same process");
    assert_eq!(cluster.server_log_at(running).matches(DISCARDED).count(), 1);
    assert_resynced(&cluster, leader, running).await;

    // A lost disk: the node stays down while the resync demotes it (an empty voter could vote
    // twice in a term), then starts with an empty data directory and is caught up. It started
    // empty after its demotion, so it is not asked to discard (its log would go back to
    // nothing a second time).
    let lost = followers[1];
    resync_while_down(&mut cluster, leader, lost, true).await;
    let leader_log = cluster.server_log_at(leader);
    assert!(leader_log.contains("resync: the node started empty after its demotion"), "{leader_log}");
    assert!(!cluster.server_log_at(lost).contains(DISCARDED), "the lost node had nothing to discard");
    assert_resynced(&cluster, leader, lost).await;

    // A node that was down with its data, started again during its resync: its state predates
    // the request, so it discards it.
    resync_while_down(&mut cluster, leader, running, false).await;
    assert_eq!(cluster.server_log_at(running).matches(DISCARDED).count(), 2, "it discarded its state again");
    assert_resynced(&cluster, leader, running).await;
}

#[tokio::test]
async fn a_survivor_of_a_lost_majority_is_recovered_as_a_single_node_and_new_nodes_join_with_no_acknowledged_write_lost(
) {
    let mut cluster = Cluster::start_nodes(3, 29580, true, "").await;
    let mut acknowledged = Vec::new();
    for n in 0..40 {
        let path = format!("dr/{n}");
        cluster.root_at(n % 3).kv_put("secret", &path, &json!({ "n": n }), None).await.unwrap();
        acknowledged.push((path, json!({ "n": n })));
    }
    // The survivor holds every acknowledged write (an operator recovers the node with the
    // highest applied index; a write no survivor received cannot be recovered by anyone).
    let leader = cluster.leader().await;
    let commit = metric(&cluster.root_at(leader), "citadel_raft_commit_index").await.unwrap();
    dev::wait_for("the survivor to apply every acknowledged write", STARTUP, || async {
        (metric(&cluster.root_at(0), "citadel_raft_applied_index").await? >= commit).then_some(())
    })
    .await
    .unwrap();
    // Health says how much of the log a survivor holds, to choose the one to recover.
    let health = cluster.anonymous_at(0).health().await.unwrap().body;
    assert!(health["last_log_index"].as_u64().unwrap() >= commit, "{health}");
    assert!(health["last_log_term"].as_u64().unwrap() >= 1, "{health}");
    // Two of three are destroyed for good; the survivor (node 0, which the others join) stops.
    for i in [1, 2] {
        cluster.kill9_at(i);
        std::fs::remove_dir_all(cluster.layout.data_dir(i)).unwrap();
    }
    cluster.kill9_at(0);

    let data_dir = cluster.layout.data_dir(0).display().to_string();
    let refused = cluster.cli_at(0, &["operator", "recover", "--data-dir", &data_dir]);
    assert!(!refused.status.success(), "recover without --force-single-node must refuse");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force-single-node"));
    let out = cluster.cli_at(0, &["operator", "recover", "--data-dir", &data_dir, "--force-single-node"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("one-node cluster"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    cluster.respawn_at(0);
    assert_eq!(cluster.leader().await, 0, "the survivor leads its one-node cluster");
    dev::wait_for("a write on the recovered node", STARTUP, || async {
        cluster.root_at(0).kv_put("secret", "dr/after", &json!({ "n": "after" }), None).await.ok()
    })
    .await
    .unwrap();
    acknowledged.push(("dr/after".into(), json!({ "n": "after" })));

    // Fresh nodes (empty data directories) join the recovered node.
    cluster.respawn_at(1);
    cluster.respawn_at(2);
    cluster.wait_healthy(3).await;
    for i in 0..3 {
        let node = cluster.root_at(i);
        for (path, value) in &acknowledged {
            let read = dev::wait_for(&format!("{path} on node {i}"), STARTUP, || async {
                node.kv_get("secret", path, None).await.ok()
            })
            .await
            .unwrap();
            assert_eq!(&read, value, "node {i}, {path}");
        }
        let verify = node.get("sys/audit/verify").await.unwrap();
        assert_eq!(verify["data"]["ok"], json!(true), "node {i}: {verify}");
    }
}
