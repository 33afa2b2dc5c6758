//! `citadel bench flood`: what a flood of unauthenticated requests costs a node (§8.3).
//!
//! It starts a 3-node cluster and, against its first node (the leader), sends requests with
//! bogus tokens and failing logins under distinct user names while one authenticated client
//! reads a secret throughout; then it reports each node's memory, the Raft store and snapshot
//! growth, the reader's latencies and errors, and whether the leader stayed. A second mode holds
//! many idle connections open from one source address and times a request from another.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use citadel_client::Client;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::bench::{self, CitadelCluster};

/// What the flood mode sends.
pub struct FloodSettings {
    pub bogus_token_requests: usize,
    pub failing_logins: usize,
    pub concurrency: usize,
    pub port: u16,
}

/// Opens a TLS connection to `addr` from the local address `local` (any loopback address can be
/// bound on Linux), trusting the CA certificate in `ca`.
pub async fn open_tls(addr: SocketAddr, local: IpAddr, ca: &Path) -> Result<TlsStream<TcpStream>> {
    let connector = tls_connector(ca)?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(local, 0)).with_context(|| format!("cannot bind {local}"))?;
    let tcp = socket.connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    Ok(connector.connect(name, tcp).await?)
}

fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Sends one HTTP/1.1 request (`Connection: close`) on `stream` and returns the status and the
/// whole answer as text.
pub async fn http1_request(
    stream: &mut TlsStream<TcpStream>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String)> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: citadel\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    read_answer(stream).await
}

/// Reads an answer until the server closes the connection.
pub async fn read_answer(stream: &mut TlsStream<TcpStream>) -> Result<(u16, String)> {
    let mut answer = Vec::new();
    // A server that closes without TLS close_notify is fine: keep what arrived.
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP answer (got {} bytes)", answer.len()))?;
    Ok((status, text))
}

/// Resident memory of a process, from /proc/PID/status (VmRSS), in KiB.
pub fn resident_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// A KiB figure from /proc/PID/status: `VmRSS` (resident now) or `VmHWM` (peak resident).
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Each node's resident memory (KiB) and Raft store size (bytes), and the snapshot's size.
struct Footprint {
    rss_kib: Vec<u64>,
    peak_rss_kib: Vec<u64>,
    store_bytes: Vec<u64>,
    snapshot_bytes: u64,
}

async fn footprint(cluster: &CitadelCluster, root: &Client) -> Result<Footprint> {
    let pids: Vec<u32> = cluster.nodes.0.iter().map(|c| c.id()).collect();
    let rss_kib = pids.iter().map(|p| resident_kib(*p)).collect::<Result<_>>()?;
    let peak_rss_kib = pids.iter().map(|p| proc_status_kib(*p, "VmHWM")).collect::<Result<_>>()?;
    let store_bytes = (0..3).map(|i| dir_bytes(&cluster.layout.data_dir(i))).collect();
    let snapshot = root.bytes("GET", "sys/storage/raft/snapshot", None).await?;
    Ok(Footprint { rss_kib, peak_rss_kib, store_bytes, snapshot_bytes: snapshot.len() as u64 })
}

/// The leader's node id and the Raft term, as the first node to answer health reports them.
/// The nodes not under attack are asked first. A changed term means an election happened.
async fn leadership(clients: &[Client]) -> Option<(u64, u64)> {
    for client in clients.iter().rev() {
        if let Ok(h) = client.health().await {
            if let (Some(leader), Some(term)) = (h.body["leader_id"].as_u64(), h.body["term"].as_u64()) {
                return Some((leader, term));
            }
        }
    }
    None
}

/// The authenticated reader: reads one secret until `stop`, recording latencies and errors.
async fn read_throughout(client: Client, stop: Arc<AtomicBool>) -> (Vec<Duration>, Vec<String>) {
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match client.kv_get("secret", "flood/target", None).await {
            Ok(_) => latencies.push(started.elapsed()),
            Err(e) => errors.push(format!("after {} ms: {e}", started.elapsed().as_millis())),
        }
    }
    latencies.sort();
    (latencies, errors)
}

/// Watches who leads until `stop`; returns every (leader, term) seen, in order, without repeats.
async fn watch_leaders(clients: Vec<Client>, stop: Arc<AtomicBool>) -> Vec<Option<(u64, u64)>> {
    let mut seen: Vec<Option<(u64, u64)>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = leadership(&clients).await;
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

/// Sends `count` requests built by `request` from `concurrency` clients; returns status counts.
async fn send_all<F, Fut>(count: usize, concurrency: usize, request: F) -> std::collections::BTreeMap<String, usize>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut statuses = std::collections::BTreeMap::new();
    let mut results = futures::stream::iter(0..count).map(request).buffer_unordered(concurrency.max(1));
    while let Some(status) = results.next().await {
        *statuses.entry(status).or_insert(0) += 1;
    }
    statuses
}

fn status_name(result: Result<citadel_client::Reply, citadel_client::ClientError>) -> String {
    match result {
        Ok(reply) => reply.status.as_u16().to_string(),
        Err(e) => format!("transport error: {e}"),
    }
}

/// The flood mode: bogus tokens and failing logins against node 1, a reader throughout.
pub async fn flood(dir: &Path, settings: &FloodSettings) -> Result<Value> {
    let cluster = bench::start_citadel(dir, settings.port).await?;
    let root = cluster.layout.client(0)?.with_token(cluster.root_token.clone());
    root.kv_put("secret", "flood/target", &json!({ "password": "flood-reader" }), None).await?;
    let clients: Vec<Client> = (0..3).map(|i| cluster.layout.client(i)).collect::<Result<_>>()?;
    let first_leader = leadership(&clients).await;
    if first_leader.is_none() {
        bail!("the cluster has no leader");
    }
    let before = footprint(&cluster, &root).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_throughout(root.clone(), stop.clone()));
    let watcher = tokio::spawn(watch_leaders(clients.clone(), stop.clone()));
    let started = Instant::now();
    let anonymous = clients[0].clone();
    let bogus = send_all(settings.bogus_token_requests, settings.concurrency, |i| {
        let client = anonymous.clone().with_token(format!("hvs.bogus-{i}"));
        async move { status_name(client.raw("GET", "secret/data/flood/target", None, &[]).await) }
    })
    .await;
    let logins = send_all(settings.failing_logins, settings.concurrency, |i| {
        let client = anonymous.clone();
        async move {
            let body = json!({ "password": "wrong-password" });
            status_name(client.raw("POST", &format!("auth/userpass/login/flood-user-{i}"), Some(&body), &[]).await)
        }
    })
    .await;
    let flood_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (latencies, errors) = reader.await?;
    let leaders = watcher.await?;
    // Let the refusal summaries of the last interval reach the replicated log before measuring.
    let interval = citadel_server::Config::load(&cluster.layout.config_path(0))?.audit.refusal_summary_interval_ms;
    tokio::time::sleep(Duration::from_millis(interval + 2000)).await;
    let after = footprint(&cluster, &root).await?;
    let last_leader = leadership(&clients).await;

    let mib = |bytes: i64| format!("{:+.1}", bytes as f64 / (1024.0 * 1024.0));
    let nodes: Vec<Value> = (0..3)
        .map(|i| {
            json!({
                "node": i + 1,
                "rss_before_mib": before.rss_kib[i] / 1024,
                "rss_after_mib": after.rss_kib[i] / 1024,
                "rss_growth_mib": mib((after.rss_kib[i] as i64 - before.rss_kib[i] as i64) * 1024),
                "rss_peak_mib": after.peak_rss_kib[i] / 1024,
                "store_before_kib": before.store_bytes[i] / 1024,
                "store_after_kib": after.store_bytes[i] / 1024,
                "store_growth_mib": mib(after.store_bytes[i] as i64 - before.store_bytes[i] as i64),
            })
        })
        .collect();
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)));
    Ok(json!({
        "flood_seconds": format!("{flood_secs:.1}"),
        "bogus_token_statuses": bogus,
        "failing_login_statuses": logins,
        "nodes": nodes,
        "snapshot_before_kib": before.snapshot_bytes / 1024,
        "snapshot_after_kib": after.snapshot_bytes / 1024,
        "snapshot_growth_mib": mib(after.snapshot_bytes as i64 - before.snapshot_bytes as i64),
        "reader_reads": latencies.len(),
        "reader_errors": errors.len(),
        "reader_error_samples": errors.iter().take(3).collect::<Vec<_>>(),
        "reader_p50_ms": pct(0.5).map(|d| ms(*d)),
        "reader_p99_ms": pct(0.99).map(|d| ms(*d)),
        "reader_max_ms": latencies.last().map(|d| ms(*d)),
        "leader_before": first_leader.map(|(id, term)| format!("node {id} (term {term})")),
        "leader_after": last_leader.map(|(id, term)| format!("node {id} (term {term})")),
        "leaders_seen": leaders
            .iter()
            .map(|l| l.map_or("no answer".to_string(), |(id, term)| format!("node {id} (term {term})")))
            .collect::<Vec<_>>(),
        "leader_kept": leaders.iter().all(|l| *l == first_leader) && last_leader == first_leader,
    }))
}

/// The idle-connection mode: `count` idle TLS connections to node 1 from `idle_source`, then one
/// request from 127.0.0.1, timed; and the node's connection warnings, counted.
pub async fn idle_connections(dir: &Path, count: usize, idle_source: IpAddr, port: u16) -> Result<Value> {
    raise_open_file_limit();
    let cluster = bench::start_citadel(dir, port).await?;
    let addr: SocketAddr = format!("127.0.0.1:{}", cluster.layout.api_port(0)).parse()?;
    let ca = cluster.layout.ca_path();
    let started = Instant::now();
    let attempts = futures::stream::iter(0..count)
        .map(|_| {
            let ca = ca.clone();
            async move {
                let mut stream = open_tls(addr, idle_source, &ca).await.ok()?;
                // A connection the node refused is closed at once: the probe read sees its end.
                let mut probe = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut probe)).await {
                    Err(_) => Some(stream),
                    Ok(_) => None,
                }
            }
        })
        .buffer_unordered(256);
    let held: Vec<TlsStream<TcpStream>> = attempts.filter_map(|s| async move { s }).collect().await;
    let opened_in = started.elapsed();

    let probe_started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), cluster.layout.client(0)?.health()).await;
    let answered_in = probe_started.elapsed();
    let answered = matches!(answer, Ok(Ok(ref reply)) if reply.status.is_success());
    // The node reports refusals once per interval: wait for one report to be due.
    tokio::time::sleep(citadel_server::limits::REFUSAL_WARNING_INTERVAL + Duration::from_secs(1)).await;
    let log = std::fs::read_to_string(cluster.layout.log_path(0)).unwrap_or_default();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("connections refused")).collect();
    let refused_reported: u64 = warnings.iter().filter_map(|l| field(l, "refused")).sum();
    let report = json!({
        "idle_connections_attempted": count,
        "idle_source": idle_source.to_string(),
        "idle_connections_held": held.len(),
        "opening_seconds": format!("{:.1}", opened_in.as_secs_f64()),
        "request_from_127.0.0.1_answered": answered,
        "request_from_127.0.0.1_ms": format!("{:.1}", answered_in.as_secs_f64() * 1e3),
        "warning_lines": warnings.len(),
        "refusals_reported": refused_reported,
    });
    drop(held);
    Ok(report)
}

/// A `name=value` number from a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The flood opens thousands of sockets itself.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct on our stack.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Checks the results against the goals of docs/BENCHMARKS.md; returns the misses.
pub fn missed_goals(report: &Value) -> Vec<String> {
    let mut missed = Vec::new();
    let num = |v: &Value| v.as_str().and_then(|s| s.parse::<f64>().ok()).or_else(|| v.as_f64());
    for node in report["nodes"].as_array().into_iter().flatten() {
        if num(&node["rss_growth_mib"]).is_some_and(|g| g >= 50.0) {
            missed.push(format!("node {} grew {} MiB resident", node["node"], node["rss_growth_mib"]));
        }
        if num(&node["store_growth_mib"]).is_some_and(|g| g >= 5.0) {
            missed.push(format!("node {} store grew {} MiB", node["node"], node["store_growth_mib"]));
        }
    }
    if num(&report["snapshot_growth_mib"]).is_some_and(|g| g >= 5.0) {
        missed.push(format!("the snapshot grew {} MiB", report["snapshot_growth_mib"]));
    }
    if num(&report["reader_p99_ms"]).is_some_and(|p| p >= 100.0) {
        missed.push(format!("reader p99 {} ms", report["reader_p99_ms"]));
    }
    if report["reader_errors"].as_u64().is_some_and(|e| e > 0) {
        missed.push(format!("{} reader errors", report["reader_errors"]));
    }
    if report["leader_kept"] == json!(false) {
        missed.push("the leader changed".into());
    }
    missed
}

/// Runs one mode under a fresh directory and removes it afterwards.
pub async fn run(idle: Option<(usize, IpAddr)>, settings: FloodSettings) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("citadel-bench-flood-{}", std::process::id()));
    let result = match idle {
        Some((count, source)) => idle_connections(&dir, count, source, settings.port).await,
        None => flood(&dir, &settings).await,
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}
