//! Alerts (§11.2) delivered to real receivers: a Prometheus Alertmanager (Debian's
//! `prometheus-alertmanager`, installed by `scripts/test`) through its API, and a webhook
//! receiver (this test, speaking HTTP on loopback) for Alertmanager's webhook payload, which
//! Citadel sends directly and the Alertmanager sends on. Ports 29800–29890.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Cluster, STARTUP};

const CITADEL_HOOK: u16 = 29880;
const AM_HOOK: u16 = 29881;
const ALERTMANAGER: u16 = 29870;

/// A webhook receiver: records each JSON body it is sent; answers 503 while `refusing`.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<Value>>>,
    refusing: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(port: u16) -> Receiver {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the receiver");
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let Some(body) = read_request(&mut stream).await else { return };
                    let refusing = r.refusing.load(Ordering::SeqCst);
                    if !refusing {
                        if let Ok(json) = serde_json::from_slice(&body) {
                            r.bodies.lock().unwrap().push(json);
                        }
                    }
                    let status = if refusing { "503 Service Unavailable" } else { "200 OK" };
                    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        receiver
    }

    /// Every alert received so far, as (alertname, node label, status).
    fn alerts(&self) -> Vec<(String, String, String)> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .flat_map(|b| b["alerts"].as_array().cloned().unwrap_or_default())
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
                (label("alertname"), label("node"), a["status"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    async fn wait_for(&self, what: &str, alertname: &str, node: u64, status: &str) {
        let deadline = Instant::now() + STARTUP;
        let wanted = (alertname.to_string(), node.to_string(), status.to_string());
        while !self.alerts().contains(&wanted) {
            assert!(Instant::now() < deadline, "{what} never received {wanted:?}; got {:?}", self.alerts());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads one HTTP/1.1 request and returns its body (by Content-Length).
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            return Some(buffer[end + 4..end + 4 + length].to_vec());
        }
    }
}

/// An Alertmanager that sends every notification (resolved ones too) to `AM_HOOK` at once.
struct Alertmanager {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "route: {{ receiver: hook, group_by: ['...'], group_wait: 0s, group_interval: 1s, repeat_interval: 1h }}\n\
             receivers:\n  - name: hook\n    webhook_configs: [{{ url: 'http://127.0.0.1:{AM_HOOK}/', send_resolved: true }}]\n"
        );
        std::fs::write(dir.path().join("alertmanager.yml"), config).unwrap();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", dir.path().join("alertmanager.yml").display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{ALERTMANAGER}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus-alertmanager (scripts/test installs Debian's package)");
        Alertmanager { child, _dir: dir }
    }

    /// The alerts it holds, by alertname and node: their fingerprint.
    async fn fingerprints(&self) -> Vec<(String, String, String)> {
        let url = format!("http://127.0.0.1:{ALERTMANAGER}/api/v2/alerts");
        let Ok(reply) = reqwest::get(url).await else { return Vec::new() };
        let alerts: Value = reply.json().await.unwrap_or(Value::Null);
        alerts
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
                (label("alertname"), label("node"), a["fingerprint"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn alerts_reach_alertmanager_and_a_webhook_on_failover_resolve_on_recovery_and_survive_a_leader_killed_mid_delivery(
) {
    citadel_server::tls::install_crypto_provider();
    let direct = Receiver::start(CITADEL_HOOK).await;
    let via_alertmanager = Receiver::start(AM_HOOK).await;
    let alertmanager = Alertmanager::start();
    let mut cluster = Cluster::start_nodes(3, 29800, true, "").await;
    let root = cluster.root();
    let hook = json!({ "type": "webhook", "url": format!("http://127.0.0.1:{CITADEL_HOOK}/citadel") });
    root.post("sys/alerts/sinks/hook", &hook).await.unwrap();
    let am = json!({ "type": "alertmanager", "url": format!("http://127.0.0.1:{ALERTMANAGER}") });
    root.post("sys/alerts/sinks/am", &am).await.unwrap();
    let bad = json!({ "type": "webhook", "url": "file:///etc/passwd" });
    let refused = root.raw("POST", "sys/alerts/sinks/bad", Some(&bad), &[]).await.unwrap();
    assert_eq!(refused.status, 400, "{:?}", refused.body);

    // The first leader's election is announced, and Alertmanager agrees on its fingerprint.
    let first = cluster.leader().await;
    let first_id = cluster.layout.node_id(first);
    direct.wait_for("the webhook", "CitadelLeaderChanged", first_id, "firing").await;
    let listed = root.get("sys/alerts").await.unwrap()["data"].clone();
    let ours = listed["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "CitadelLeaderChanged")
        .map(|a| a["fingerprint"].as_str().unwrap().to_string())
        .expect("listed in sys/alerts");
    let deadline = Instant::now() + STARTUP;
    loop {
        let held = alertmanager.fingerprints().await;
        if let Some((_, _, theirs)) = held.iter().find(|(name, ..)| name == "CitadelLeaderChanged") {
            assert_eq!(theirs, &ours, "the same fingerprint as Alertmanager's");
            break;
        }
        assert!(Instant::now() < deadline, "Alertmanager never received the alert");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the leader: the new leader's election and the dead node arrive at both receivers.
    cluster.kill9_at(first);
    let second = cluster.leader().await;
    let second_id = cluster.layout.node_id(second);
    for (receiver, what) in [(&direct, "the webhook"), (&via_alertmanager, "Alertmanager's webhook")] {
        receiver.wait_for(what, "CitadelLeaderChanged", second_id, "firing").await;
        receiver.wait_for(what, "CitadelNodeUnreachable", first_id, "firing").await;
    }
    // Restart it: the resolved notice arrives.
    cluster.respawn_at(first);
    for (receiver, what) in [(&direct, "the webhook"), (&via_alertmanager, "Alertmanager's webhook")] {
        receiver.wait_for(what, "CitadelNodeUnreachable", first_id, "resolved").await;
    }

    // The receiver refuses while the leader dies with notices still owed: its successor sends them.
    cluster.wait_healthy(3).await;
    direct.refusing.store(true, Ordering::SeqCst);
    let leader = cluster.leader().await;
    let leader_id = cluster.layout.node_id(leader);
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let victim_id = cluster.layout.node_id(victim);
    cluster.kill9_at(victim);
    let pending = |body: Value| {
        body["data"]["active"].as_array().is_some_and(|active| {
            active.iter().any(|a| {
                a["labels"]["alertname"] == "CitadelNodeUnreachable"
                    && a["labels"]["node"].as_str() == Some(victim_id.to_string().as_str())
                    && a["deliveries"]["hook"] == "pending"
            })
        })
    };
    let deadline = Instant::now() + STARTUP;
    while !pending(cluster.root_at(leader).get("sys/alerts").await.unwrap_or_default()) {
        assert!(Instant::now() < deadline, "the unreachable node's alert was never raised");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.respawn_at(victim);
    cluster.wait_healthy(3).await;
    cluster.kill9_at(leader);
    direct.refusing.store(false, Ordering::SeqCst);
    direct.wait_for("the webhook", "CitadelNodeUnreachable", victim_id, "resolved").await;
    direct.wait_for("the webhook", "CitadelNodeUnreachable", leader_id, "firing").await;
}
