//! `citadel bench alerts`: how long after a leader is killed (`kill -9`) a receiver has the
//! alerts that say so (§11.2), and how long after it is restarted the resolved notice arrives.
//!
//! It starts a 3-node cluster and a webhook receiver in this process (HTTP on loopback, the
//! payload Alertmanager's webhook receivers take), points a `webhook` sink at it, then kills
//! the leader `rounds` times, timing each alert from the kill to its receipt.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::{start_citadel, CitadelCluster};

/// Alerts the receiver got: (alertname, node label, status, when).
type Received = Arc<Mutex<Vec<(String, String, String, Instant)>>>;

#[derive(Debug, Serialize)]
pub struct AlertRound {
    pub killed: u64,
    pub new_leader: u64,
    /// Kill to `CitadelLeaderChanged` for the new leader.
    pub leader_changed: Duration,
    /// Kill to `CitadelNodeUnreachable` for the killed node.
    pub unreachable: Duration,
    /// Restart to its resolved notice.
    pub resolved: Duration,
}

/// Reads one HTTP/1.1 request from `stream` and returns its body (by Content-Length). A small
/// webhook receiver for this bench and the alerts tests: no chunked bodies, no keep-alive.
pub async fn read_http_body(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buffer.len() >= end + 4 + length {
            return Some(buffer[end + 4..end + 4 + length].to_vec());
        }
    }
}

/// Answers every request 200 and records the alerts in its JSON body.
async fn receive(listener: tokio::net::TcpListener, received: Received) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let received = received.clone();
        tokio::spawn(async move {
            let Some(body) = read_http_body(&mut stream).await else { return };
            let now = Instant::now();
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
                let mut log = received.lock().unwrap_or_else(|p| p.into_inner());
                for alert in json["alerts"].as_array().into_iter().flatten() {
                    let label = |k: &str| alert["labels"][k].as_str().unwrap_or("").to_string();
                    let status = alert["status"].as_str().unwrap_or("").to_string();
                    log.push((label("alertname"), label("node"), status, now));
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        });
    }
}

/// When the receiver first got `alertname` about `node` with `status`, at or after `since`.
async fn arrival(received: &Received, alertname: &str, node: u64, status: &str, since: Instant) -> Result<Instant> {
    let node = node.to_string();
    crate::dev::wait_for(&format!("{alertname} {status} for node {node}"), Duration::from_secs(60), || async {
        let log = received.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().find(|(a, n, s, at)| a == alertname && *n == node && s == status && *at >= since).map(|r| r.3)
    })
    .await
}

pub async fn run(dir: &std::path::Path, rounds: usize, port: u16) -> Result<Vec<AlertRound>> {
    let exe = std::env::current_exe()?;
    let CitadelCluster { layout, nodes: mut guard, root_token: root, .. } = start_citadel(dir, port).await?;
    let clients: Vec<_> = (0..3).map(|i| Ok(layout.client(i)?.with_token(root.clone()))).collect::<Result<_>>()?;
    let receiver_port = port + 90;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", receiver_port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{receiver_port} for the webhook receiver"))?;
    let received: Received = Arc::default();
    tokio::spawn(receive(listener, received.clone()));
    let sink = serde_json::json!({ "type": "webhook", "url": format!("http://127.0.0.1:{receiver_port}/") });
    clients[0].post("sys/alerts/sinks/bench", &sink).await?;

    let mut results = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let leader = crate::bench::leader_of(&clients).await?;
        let killed = layout.node_id(leader);
        let child = &mut guard.0[leader];
        let at_kill = Instant::now();
        child.kill()?;
        child.wait()?;
        let survivor = (leader + 1) % 3;
        let new_leader = crate::dev::wait_for("a new leader", Duration::from_secs(60), || async {
            let health = clients[survivor].health().await.ok()?;
            health.body["leader_id"].as_u64().filter(|id| *id != killed)
        })
        .await?;
        let changed = arrival(&received, "CitadelLeaderChanged", new_leader, "firing", at_kill).await?;
        let unreachable = arrival(&received, "CitadelNodeUnreachable", killed, "firing", at_kill).await?;
        let at_restart = Instant::now();
        guard.0[leader] = layout.spawn(&exe, leader)?;
        let resolved = arrival(&received, "CitadelNodeUnreachable", killed, "resolved", at_restart).await?;
        let r = AlertRound {
            killed,
            new_leader,
            leader_changed: changed - at_kill,
            unreachable: unreachable - at_kill,
            resolved: resolved - at_restart,
        };
        crate::out!(
            "round {:>2}: killed node {killed}, node {new_leader} leads: CitadelLeaderChanged after {} ms, \
             CitadelNodeUnreachable after {} ms; resolved {} ms after the restart",
            round + 1,
            r.leader_changed.as_millis(),
            r.unreachable.as_millis(),
            r.resolved.as_millis()
        );
        results.push(r);
        crate::dev::wait_healthy(&layout, Duration::from_secs(60)).await?;
    }
    guard.stop();
    Ok(results)
}
