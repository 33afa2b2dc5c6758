//! Metrics (§11.3) as a real Prometheus (Debian's `prometheus`, installed by `scripts/test`)
//! scrapes them from a cluster, with the alerting rules `deploy/prometheus/` ships.
//! Ports 29600–29690.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::harness::{Cluster, STARTUP};

/// Every series §11.3 lists, and those the shipped rules read. Leader-only ones included: some
/// node leads.
const LISTED: [&str; 20] = [
    "citadel_raft_has_leader",
    "citadel_raft_leader_changes_seen_total",
    "citadel_raft_term",
    "citadel_raft_commit_index",
    "citadel_raft_applied_index",
    "citadel_raft_follower_lag_entries",
    "citadel_raft_follower_last_contact_seconds",
    "citadel_cluster_failure_tolerance",
    "citadel_read_only",
    "citadel_sealed",
    "citadel_raft_proposal_duration_seconds_bucket",
    "citadel_raft_commit_duration_seconds_bucket",
    "citadel_disk_wal_fsync_duration_seconds_bucket",
    "citadel_http_requests_total",
    "citadel_http_request_duration_seconds_bucket",
    "citadel_audit_spool_backlog_events",
    "citadel_raft_proposals_failed_total",
    "citadel_snapshot_auto_consecutive_errors",
    "citadel_node_certificate_expiry_timestamp_seconds",
    "citadel_audit_events_total",
];

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/citadel-rules.yml")
}

/// A Prometheus server scraping `cluster`, killed by PID on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(cluster: &Cluster, port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, &cluster.root).unwrap();
        let targets: Vec<String> =
            (0..cluster.layout.nodes).map(|i| format!("\"127.0.0.1:{}\"", cluster.layout.api_port(i))).collect();
        let config = format!(
            r#"
global: {{ scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms }}
rule_files: ["{rules}"]
scrape_configs:
  - job_name: citadel
    scheme: https
    metrics_path: /v1/sys/metrics
    params: {{ format: [prometheus] }}
    authorization: {{ type: Bearer, credentials_file: "{token}" }}
    tls_config: {{ ca_file: "{ca}" }}
    static_configs: [{{ targets: [{targets}], labels: {{ cluster: test }} }}]
"#,
            rules = rules_file().display(),
            token = token.display(),
            ca = cluster.layout.ca_path().display(),
            targets = targets.join(", "),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (scripts/test installs Debian's prometheus package)");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        citadel_server::tls::install_crypto_provider();
        let reply = reqwest::get(format!("{}{path}", self.url)).await.ok()?;
        let body: Value = reply.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// The series a PromQL query returns now.
    async fn series(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", query.replace('{', "%7B").replace('}', "%7D"));
        self.get(&path).await.and_then(|d| d["result"].as_array().cloned()).unwrap_or_default()
    }

    async fn firing(&self) -> Vec<String> {
        let alerts = self.get("/api/v1/alerts").await.and_then(|d| d["alerts"].as_array().cloned()).unwrap_or_default();
        alerts
            .iter()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_shipped_alerting_rules_pass_promtool() {
    let out = Command::new("promtool").arg("check").arg("rules").arg(rules_file()).output().expect("run promtool");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 11 rules found"), "one rule per alert of §11.2: {text}");
}

#[tokio::test]
async fn a_real_prometheus_scrapes_every_listed_series_and_the_rules_fire_on_a_failing_snapshot_and_a_dead_leader() {
    let mut cluster = Cluster::start_nodes(3, 29600, true, "").await;
    for i in 0..5 {
        cluster.root().kv_put("secret", "metrics/k", &serde_json::json!({ "v": i }), None).await.unwrap();
    }
    // A scheduled snapshot that cannot work: a file stands where its directory should be.
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let broken =
        serde_json::json!({ "interval": "1h", "storage_type": "local", "path_prefix": blocker.display().to_string() });
    cluster.root().post("sys/storage/raft/snapshot-auto/config/broken", &broken).await.unwrap();
    let prometheus = Prometheus::start(&cluster, 29690);

    let up = |series: &[Value]| series.iter().filter(|s| s["value"][1] == "1").count();
    let deadline = std::time::Instant::now() + STARTUP;
    loop {
        if up(&prometheus.series("up{job=\"citadel\"}").await) == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Prometheus never scraped all three nodes");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for name in LISTED {
        let series = prometheus.series(name).await;
        assert!(!series.is_empty(), "{name} is not among the scraped series");
    }
    assert_eq!(prometheus.series("citadel_raft_has_leader == 1").await.len(), 3, "every node knows the leader");
    assert_eq!(prometheus.series("citadel_cluster_failure_tolerance").await.len(), 1, "the leader alone reports it");
    let rules = prometheus.get("/api/v1/rules").await.expect("rules");
    let loaded: Vec<&Value> =
        rules["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(loaded.len(), 11);
    assert!(loaded.iter().all(|r| r["health"] == "ok"), "every rule evaluates: {loaded:?}");
    let deadline = std::time::Instant::now() + STARTUP;
    loop {
        let firing = prometheus.firing().await;
        assert!(!firing.iter().any(|a| a == "CitadelNodeUnreachable" || a == "CitadelNoLeader"), "{firing:?}");
        if firing.iter().any(|a| a == "CitadelSnapshotFailed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the failing snapshot schedule fired nothing: {firing:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let leader = cluster.leader().await;
    cluster.kill9_at(leader);
    let deadline = std::time::Instant::now() + STARTUP;
    loop {
        let firing = prometheus.firing().await;
        if ["CitadelLeaderChanged", "CitadelNodeUnreachable", "CitadelQuorumDegraded"]
            .iter()
            .all(|a| firing.iter().any(|f| f == a))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the leader's death did not fire its alerts: {firing:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
