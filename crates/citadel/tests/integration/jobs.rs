//! Leader-only jobs and the event stream, through a leader's death (kill -9). Ports 27500–27999.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use citadel::dev;
use citadel_client::{Client, ClientError, LineStream};
use serde_json::{json, Value};

use crate::harness::{Cluster, STARTUP};

/// Short intervals, so runs on both sides of the failover come quickly.
const FAST_JOBS: &str = "[jobs]\ntoken_sweep_ms = 200\n";

/// One committed job run, as `GET sys/jobs` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Run {
    job: String,
    term: u64,
    node: u64,
}

/// Adds the job log as one node sees it to `runs` (keyed by log index). Errors (an election
/// under way) are ignored: the caller polls again.
async fn collect_runs(client: &Client, runs: &mut BTreeMap<u64, Run>) {
    let Ok(body) = client.get("sys/jobs").await else { return };
    for run in body["data"]["runs"].as_array().into_iter().flatten() {
        let index = run["index"].as_u64().expect("index");
        let run = Run {
            job: run["job"].as_str().expect("job").to_string(),
            term: run["term"].as_u64().expect("term"),
            node: run["node"].as_u64().expect("node"),
        };
        let held = runs.entry(index).or_insert_with(|| run.clone());
        assert_eq!(*held, run, "log index {index} holds one run, whichever node is asked");
    }
}

/// Polls the job log through `client` until `enough` says the runs collected so far suffice.
async fn runs_until(
    client: &Client,
    runs: &mut BTreeMap<u64, Run>,
    what: &str,
    enough: impl Fn(&BTreeMap<u64, Run>) -> bool,
) {
    let deadline = Instant::now() + STARTUP;
    while !enough(runs) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; runs so far: {runs:?}");
        collect_runs(client, runs).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_periodic_job_runs_on_exactly_one_node_per_term_across_a_leader_change() {
    let mut cluster = Cluster::start_nodes(3, 27500, true, FAST_JOBS).await;
    let leader = cluster.leader().await;
    let old_leader = cluster.layout.node_id(leader);
    let survivor = (0..3).find(|i| *i != leader).expect("a follower");
    let client = cluster.root_at(survivor);
    let mut runs = BTreeMap::new();
    runs_until(&client, &mut runs, "three runs by the first leader", |runs| {
        runs.values().filter(|r| r.job == "token_expiry" && r.node == old_leader).count() >= 3
    })
    .await;

    cluster.kill9_at(leader);
    runs_until(&client, &mut runs, "three runs by a new leader", |runs| {
        runs.values().filter(|r| r.job == "token_expiry" && r.node != old_leader).count() >= 3
    })
    .await;

    // In log order, terms never go back, and each term's runs all come from one node: every
    // leader job's (token_expiry's, and the alerts job's, which the failover gives work).
    let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut last_term = 0;
    for (index, run) in &runs {
        assert!(run.term >= last_term, "run at index {index} is of term {} after term {last_term}: {runs:?}", run.term);
        last_term = run.term;
        by_term.entry(run.term).or_default().insert(run.node);
    }
    for (term, nodes) in &by_term {
        assert_eq!(nodes.len(), 1, "term {term} has job runs from nodes {nodes:?}");
    }
    let old_terms: Vec<u64> = by_term.iter().filter(|(_, n)| n.contains(&old_leader)).map(|(t, _)| *t).collect();
    let new_terms: Vec<u64> = by_term.iter().filter(|(_, n)| !n.contains(&old_leader)).map(|(t, _)| *t).collect();
    assert!(old_terms.iter().max() < new_terms.iter().min(), "the new leader's runs come in later terms: {by_term:?}");
}

/// Subscribes, retrying while the node answers 503 (an election, or a read index not served
/// yet): elections happen under load.
async fn subscribe(client: &Client) -> LineStream {
    dev::wait_for("an event subscription", STARTUP, || async {
        match client.stream("sys/events").await {
            Ok(stream) => Some(stream),
            Err(e) if e.status().map(|s| s.as_u16()) == Some(503) => None,
            Err(ClientError::Transport { .. }) => None,
            Err(e) => panic!("subscribing failed: {e}"),
        }
    })
    .await
    .expect("subscribed")
}

/// Reads lines until one satisfies `wanted`, within the deadline.
async fn line_where(stream: &mut LineStream, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + STARTUP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("the stream stays readable")
            .unwrap_or_else(|| panic!("the stream ended before {what}"));
        if wanted(&line) {
            return line;
        }
    }
}

#[tokio::test]
async fn the_event_stream_reports_a_leader_change_and_the_dead_leader_and_refuses_tokens_without_sudo() {
    let mut cluster = Cluster::start_nodes(3, 27550, true, "[events]\nmax_subscribers = 2\n").await;
    let leader = cluster.leader().await;
    let old_leader = cluster.layout.node_id(leader);
    let watcher = (0..3).find(|i| *i != leader).expect("a follower");

    // `read` on sys/events is not enough: the stream needs sudo.
    let root = cluster.root_at(watcher);
    let policy = r#"path "sys/events" { capabilities = ["read", "list"] }"#;
    root.post("sys/policies/acl/events-reader", &json!({ "policy": policy })).await.unwrap();
    let token = root.post("auth/token/create", &json!({ "policies": ["events-reader"] })).await.unwrap();
    let token = token["auth"]["client_token"].as_str().expect("token").to_string();
    let refused = cluster.anonymous_at(watcher).with_token(token).stream("sys/events").await;
    assert_eq!(refused.err().and_then(|e| e.status()).map(|s| s.as_u16()), Some(403));

    let mut stream = subscribe(&root).await;
    let hello = line_where(&mut stream, "the subscribed line", |l| l["type"] == json!("subscribed")).await;
    assert_eq!(hello["node"], json!(cluster.layout.node_id(watcher)));
    let old_term = hello["term"].as_u64().expect("term");

    // Subscribers are capped: one more fits, the next is 429.
    let second = subscribe(&cluster.root_at(watcher)).await;
    let third = cluster.root_at(watcher).stream("sys/events").await;
    assert_eq!(third.err().and_then(|e| e.status()).map(|s| s.as_u16()), Some(429));
    drop(second);
    // The other follower's stream too: whichever follower takes over reports the dead leader.
    let other = (0..3).find(|i| *i != leader && *i != watcher).expect("another follower");
    let mut other_stream = subscribe(&cluster.root_at(other)).await;

    cluster.kill9_at(leader);
    let change = line_where(&mut stream, "a leader change away from the killed leader", |l| {
        l["type"] == json!("leader_changed") && l["leader"] != json!(old_leader)
    })
    .await;
    let new_leader = change["leader"].as_u64().expect("leader");
    assert!(change["term"].as_u64().expect("term") > old_term, "{change}");

    // The new leader reports the old one unreachable.
    let new_index = (0..3).find(|i| cluster.layout.node_id(*i) == new_leader).expect("new leader is a node");
    let leader_stream = if new_index == watcher { &mut stream } else { &mut other_stream };
    line_where(leader_stream, "the killed leader reported unreachable", |l| {
        l["type"] == json!("node_unreachable") && l["id"] == json!(old_leader) && l["node"] == json!(new_leader)
    })
    .await;

    // The new leader audited the change it saw (once, as the leader).
    let auditor = cluster.root_at(new_index);
    dev::wait_for("the leader change in the replicated audit log", STARTUP, || async {
        let events = auditor.get(&format!("sys/audit/events?node={new_leader}&limit=10000")).await.ok()?;
        let events = events["data"]["events"].as_array()?.clone();
        events
            .iter()
            .any(|e| e["kind"] == json!("cluster_event") && e["operation"] == json!("leader_changed"))
            .then_some(())
    })
    .await
    .expect("leader change audited");
}

#[tokio::test]
async fn an_event_stream_outlives_the_idle_timeout_on_heartbeats() {
    let config = "[limits]\nidle_timeout_ms = 1000\n[events]\nheartbeat_ms = 200\n";
    let cluster = Cluster::start_with(27600, true, config).await;
    let mut stream = subscribe(&cluster.root()).await;
    let started = Instant::now();
    for n in 0..12 {
        line_where(&mut stream, &format!("heartbeat {n}"), |l| l["type"] == json!("heartbeat")).await;
    }
    assert!(started.elapsed() > Duration::from_millis(2000), "twelve heartbeats 200 ms apart span two idle timeouts");
}

#[tokio::test]
async fn an_event_stream_ends_once_its_tokens_policy_no_longer_grants_sudo() {
    let cluster = Cluster::start_with(27650, true, "[events]\nheartbeat_ms = 200\n").await;
    let root = cluster.root();
    let grant = |caps: &str| json!({ "policy": format!(r#"path "sys/events" {{ capabilities = [{caps}] }}"#) });
    root.post("sys/policies/acl/watcher", &grant(r#""read", "sudo""#)).await.unwrap();
    let created = root.post("auth/token/create", &json!({ "policies": ["watcher"] })).await.unwrap();
    let token = created["auth"]["client_token"].as_str().unwrap().to_string();
    let mut stream = subscribe(&cluster.anonymous().with_token(token)).await;
    line_where(&mut stream, "a heartbeat while granted", |l| l["type"] == json!("heartbeat")).await;
    root.post("sys/policies/acl/watcher", &grant(r#""read""#)).await.unwrap();
    let closed = line_where(&mut stream, "the stream closing", |l| l["type"] == json!("closed")).await;
    assert!(closed["reason"].as_str().unwrap().contains("no longer grant"), "{closed}");
}

/// The snapshot files of the configuration `prefix` in `dir`, oldest first.
fn snapshot_files(dir: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        name.starts_with(&format!("{prefix}-")) && name.ends_with(".snap")
    });
    files.sort();
    files
}

#[tokio::test]
async fn scheduled_snapshots_are_written_verified_and_pruned_to_retain_and_a_failure_shows_in_the_status() {
    let mut cluster = Cluster::start_nodes(3, 27700, true, "[jobs]\nsnapshot_auto_ms = 200\n").await;
    let root = cluster.root();
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "interval": "1s", "retain": 2, "storage_type": "local",
        "path_prefix": dir.path().join("backups").display().to_string(), "file_prefix": "hourly",
    });
    root.post("sys/storage/raft/snapshot-auto/config/hourly", &config).await.unwrap();
    let bad = json!({ "interval": "1s", "storage_type": "local", "path_prefix": "relative/dir" });
    let refused = root.raw("POST", "sys/storage/raft/snapshot-auto/config/bad", Some(&bad), &[]).await.unwrap();
    assert_eq!(refused.status, 400);
    assert!(refused.body["errors"][0].as_str().unwrap().contains("path_prefix"), "{:?}", refused.body);
    let s3 = json!({ "interval": "1s", "storage_type": "aws-s3", "path_prefix": "/x" });
    let refused = root.raw("POST", "sys/storage/raft/snapshot-auto/config/s3", Some(&s3), &[]).await.unwrap();
    assert!(refused.body["errors"][0].as_str().unwrap().contains("aws-s3"), "{:?}", refused.body);
    let inside = cluster.layout.data_dir(0).join("snapshots").display().to_string();
    let inside = json!({ "interval": "1s", "storage_type": "local", "path_prefix": inside });
    let refused = root.raw("POST", "sys/storage/raft/snapshot-auto/config/inside", Some(&inside), &[]).await.unwrap();
    assert!(refused.body["errors"][0].as_str().unwrap().contains("data directory"), "{:?}", refused.body);
    // Two configurations whose retention would delete each other's files.
    let twin = json!({ "interval": "1h", "storage_type": "local", "file_prefix": "hourly",
        "path_prefix": dir.path().join("backups").display().to_string() });
    let refused = root.raw("POST", "sys/storage/raft/snapshot-auto/config/twin", Some(&twin), &[]).await.unwrap();
    assert!(refused.body["errors"][0].as_str().unwrap().contains("already writes"), "{:?}", refused.body);
    // A file where the directory should be: every run fails, and says so.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let failing =
        json!({ "interval": "1s", "storage_type": "local", "path_prefix": blocker.join("sub").display().to_string() });
    root.post("sys/storage/raft/snapshot-auto/config/failing", &failing).await.unwrap();

    let listed = root.list("sys/storage/raft/snapshot-auto/config").await.unwrap();
    assert_eq!(listed, vec!["failing".to_string(), "hourly".to_string()]);
    let read = root.get("sys/storage/raft/snapshot-auto/config/hourly").await.unwrap();
    assert_eq!((read["data"]["interval"].clone(), read["data"]["retain"].clone()), (json!(1), json!(2)));

    // Runs go on through a leader change: the schedule is replicated.
    let backups = dir.path().join("backups");
    let mut seen = BTreeSet::new();
    let leader = cluster.leader().await;
    let mut killed = false;
    dev::wait_for("four scheduled snapshots, one after a leader change", STARTUP, || {
        for file in snapshot_files(&backups, "hourly") {
            seen.insert(file);
        }
        if seen.len() >= 2 && !killed {
            cluster.kill9_at(leader);
            killed = true;
        }
        let done = seen.len() >= 4;
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    let survivor = cluster.root_at((leader + 1) % 3);
    // Stop the schedule, so that the files looked at below are not pruned meanwhile.
    let stopped = json!({
        "interval": "24h", "retain": 2, "storage_type": "local",
        "path_prefix": backups.display().to_string(), "file_prefix": "hourly",
    });
    survivor.post("sys/storage/raft/snapshot-auto/config/hourly", &stopped).await.unwrap();
    let status = survivor.get("sys/storage/raft/snapshot-auto/status/hourly").await.unwrap();
    assert_eq!(status["data"]["last_snapshot_error"], json!(""), "{status}");
    assert_eq!(status["data"]["consecutive_errors"], json!(0), "{status}");
    let url = status["data"]["last_snapshot_url"].as_str().unwrap();
    let last = std::path::PathBuf::from(url.strip_prefix("file://").unwrap());
    dev::wait_for("retention to keep two files", STARTUP, || {
        let files = snapshot_files(&backups, "hourly");
        async move { (files.len() == 2).then_some(files) }
    })
    .await
    .unwrap();
    let inspect =
        cluster.cli_at((leader + 1) % 3, &["operator", "raft", "snapshot", "inspect", last.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    // Restoring it through the API verifies its HMAC with the cluster's keyring.
    let bytes = std::fs::read(&last).unwrap();
    survivor.bytes("POST", "sys/storage/raft/snapshot", Some(bytes)).await.unwrap();

    let failing = survivor.get("sys/storage/raft/snapshot-auto/status/failing").await.unwrap();
    assert!(failing["data"]["consecutive_errors"].as_u64().unwrap() >= 1, "{failing}");
    assert!(failing["data"]["last_snapshot_error"].as_str().unwrap().contains("not-a-dir"), "{failing}");
    survivor.delete("sys/storage/raft/snapshot-auto/config/failing").await.unwrap();
    let gone = survivor.raw("GET", "sys/storage/raft/snapshot-auto/status/failing", None, &[]).await.unwrap();
    assert_eq!(gone.status, 404);
}
