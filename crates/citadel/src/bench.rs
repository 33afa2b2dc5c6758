//! `citadel bench`: a load generator measuring throughput and latency percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use citadel_client::Client;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Write,
    Read,
    StaleRead,
    /// Starts its own 3-node cluster and kills the leader `--rounds` times, with a writer on a
    /// survivor through each kill.
    Failover,
    /// Starts its own 3-node cluster and restarts each node in turn (SIGTERM) `--rounds` times
    /// over, with a writer on a node that stays up.
    RollingRestart,
    /// Starts its own 3-node cluster and a webhook receiver, kills the leader `--rounds` times
    /// and times each alert from the kill to its receipt; see `alert_bench.rs`.
    Alerts,
    /// Starts its own 3-node cluster and floods one node with unauthenticated requests (or,
    /// with `--idle-connections`, idle connections); see `flood.rs`.
    Flood,
    /// Starts its own cluster and loads `--secrets` × `--versions` writes and `--events` audit
    /// events, recording memory, disk and snapshot size; see `scale.rs`.
    Scale,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Read => "read",
            Workload::StaleRead => "stale-read",
            Workload::Failover => "failover",
            Workload::RollingRestart => "rolling-restart",
            Workload::Alerts => "alerts",
            Workload::Flood => "flood",
            Workload::Scale => "scale",
        }
    }
}

pub struct Summary {
    pub ops: usize,
    pub errors: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// CPU time the target's server processes spent per operation, all nodes together; known
    /// only for a cluster this bench started.
    pub cpu_per_op: Option<Duration>,
}

impl Summary {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// The system under measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Citadel,
    /// A 3-member etcd cluster (Debian's etcd-server), through its HTTP gateway.
    Etcd,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Citadel => "citadel",
            Target::Etcd => "etcd",
        }
    }
}

/// Where operations go: the same HTTP client either way, only the paths and bodies differ.
#[derive(Clone)]
pub struct Endpoint {
    pub target: Target,
    pub client: Client,
    pub mount: String,
    /// The cluster's server processes, when this bench started them. Their CPU time per
    /// operation says where a latency comes from: three nodes and the client share the machine's
    /// cores, so at one client a request waits for every CPU microsecond on its path.
    pub servers: Vec<u32>,
}

/// CPU time (user and system) the processes have used so far; `None` for no processes, or if
/// one cannot be read.
fn cpu_time(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf reads a constant of the running system.
    let ticks_per_sec = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&t| t > 0)?;
    let mut ticks = 0;
    for pid in pids {
        ticks += cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    }
    Some(Duration::from_secs_f64(ticks as f64 / ticks_per_sec as f64))
}

/// `utime + stime` from a `/proc/PID/stat` line: fields 14 and 15, counted after the command
/// name, which is in parentheses and may itself hold spaces and parentheses.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Endpoint {
    /// One operation on key `bench-{k}`; `n` makes each written value distinct.
    async fn op(&self, workload: Workload, k: usize, n: usize) -> Result<(), citadel_client::ClientError> {
        let key = format!("bench-{k}");
        let value = format!("{n:064}");
        let (path, body, headers): (String, serde_json::Value, &[(&str, &str)]) = match (self.target, workload) {
            (Target::Citadel, Workload::Write) => {
                (format!("/v1/{}/data/{key}", self.mount), json!({ "data": { "v": value } }), &[])
            }
            (Target::Citadel, Workload::Read) => (format!("/v1/{}/data/{key}", self.mount), json!(null), &[]),
            (Target::Citadel, Workload::StaleRead) => {
                (format!("/v1/{}/data/{key}", self.mount), json!(null), &[("X-Citadel-Consistency", "stale")])
            }
            (Target::Etcd, Workload::Write) => {
                ("/v3/kv/put".into(), json!({ "key": b64(&key), "value": b64(&value) }), &[])
            }
            (Target::Etcd, Workload::Read) => ("/v3/kv/range".into(), json!({ "key": b64(&key) }), &[]),
            (Target::Etcd, Workload::StaleRead) => {
                ("/v3/kv/range".into(), json!({ "key": b64(&key), "serializable": true }), &[])
            }
            (
                _,
                Workload::Failover | Workload::RollingRestart | Workload::Alerts | Workload::Flood | Workload::Scale,
            ) => {
                unreachable!("failover, flood and scale have their own drivers")
            }
        };
        let (method, body) = match (self.target, body.is_null()) {
            (Target::Citadel, true) => ("GET", None),
            _ => ("POST", Some(&body)),
        };
        let reply = self.client.raw_at(method, &path, body, headers).await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(citadel_client::ClientError::api(reply.status, reply.body))
        }
    }
}

/// Runs `ops` operations of `workload` spread over `concurrency` clients, each on its own key.
pub async fn run(endpoint: &Endpoint, workload: Workload, ops: usize, concurrency: usize) -> Result<Summary> {
    if matches!(
        workload,
        Workload::Failover | Workload::RollingRestart | Workload::Alerts | Workload::Flood | Workload::Scale
    ) {
        anyhow::bail!("{} runs alone: `citadel bench {}`", workload.name(), workload.name());
    }
    let concurrency = concurrency.max(1);
    // Reads need something to read.
    if workload != Workload::Write {
        for k in 0..concurrency {
            endpoint.op(Workload::Write, k, 0).await?;
        }
    }
    let per_client = ops.div_ceil(concurrency);
    let cpu_before = cpu_time(&endpoint.servers);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..concurrency {
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut errors = 0;
            for n in 0..per_client {
                let t = Instant::now();
                match endpoint.op(workload, k, n).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(e) => {
                        // A failed request in a benchmark is a finding: say what it was.
                        if errors == 0 {
                            eprintln!(
                                "{} {} client {k}: request {n} failed: {e}",
                                endpoint.target.name(),
                                workload.name()
                            );
                        }
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let requests = u32::try_from(latencies.len() + errors).unwrap_or(u32::MAX).max(1);
    let cpu_per_op = match (cpu_before, cpu_time(&endpoint.servers)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) / requests),
        _ => None,
    };
    latencies.sort();
    Ok(Summary {
        ops: latencies.len(),
        errors,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        cpu_per_op,
    })
}

/// A 3-node Citadel cluster for the benchmark; nodes stop when it is dropped.
pub struct CitadelCluster {
    pub layout: crate::dev::Layout,
    /// The node processes, by slot; they stop when the cluster is dropped.
    pub nodes: crate::dev::ChildGuard,
    pub root_token: String,
    /// Node 1 initialized the cluster and leads it; clients talk to the leader.
    pub endpoint: Endpoint,
}

pub async fn start_citadel(dir: &std::path::Path, port: u16) -> Result<CitadelCluster> {
    use crate::dev::{self, ChildGuard, Layout};
    let exe = std::env::current_exe()?;
    let layout = Layout::new(dir, 3, port)?;
    layout.write_files("")?;
    let nodes = ChildGuard((0..3).map(|i| layout.spawn(&exe, i)).collect::<Result<_>>()?);
    let (root_token, _) = dev::initialize(&layout).await?;
    dev::wait_healthy(&layout, Duration::from_secs(60)).await?;
    let client = layout.client(0)?.with_token(&root_token);
    let servers = nodes.0.iter().map(std::process::Child::id).collect();
    let endpoint = Endpoint { target: Target::Citadel, client, mount: "secret".into(), servers };
    Ok(CitadelCluster { layout, nodes, root_token, endpoint })
}

/// A 3-member etcd cluster with TLS on client and peer traffic (as Citadel has), data on the
/// same disk as Citadel's; members stop when it is dropped.
pub struct EtcdCluster {
    _members: crate::dev::ChildGuard,
    pub endpoint: Endpoint,
}

/// The etcd binary, installing Debian's etcd-server when it is missing.
fn etcd_binary() -> Result<std::path::PathBuf> {
    let found = |p: &str| std::path::Path::new(p).exists().then(|| std::path::PathBuf::from(p));
    if let Some(p) = found("/usr/bin/etcd") {
        return Ok(p);
    }
    crate::out!("etcd is not installed: installing Debian's etcd-server (apt-get)");
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
    };
    let installed = apt(&["install", "-y", "-q", "etcd-server"]).map(|s| s.success()).unwrap_or(false)
        || (apt(&["update", "-q"]).is_ok() && apt(&["install", "-y", "-q", "etcd-server"]).is_ok_and(|s| s.success()));
    match found("/usr/bin/etcd") {
        Some(p) if installed => Ok(p),
        _ => anyhow::bail!("could not install etcd-server with apt-get (are you root?); install it and retry"),
    }
}

pub async fn start_etcd(dir: &std::path::Path, port: u16) -> Result<EtcdCluster> {
    use citadel_server::tls::{write_private, DevPki};
    let etcd = etcd_binary()?;
    std::fs::create_dir_all(dir)?;
    let pki = DevPki::generate("citadel-bench-etcd")?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_cert_pem)?;
    let (cert, key) = pki.node_cert("etcd", &["127.0.0.1".into(), "localhost".into()])?;
    std::fs::write(dir.join("cert.pem"), cert)?;
    write_private(&dir.join("key.pem"), key.as_bytes())?;
    let client_url = |i: usize| format!("https://127.0.0.1:{}", port + 10 * i as u16);
    let peer_url = |i: usize| format!("https://127.0.0.1:{}", port + 10 * i as u16 + 1);
    let initial: Vec<String> = (0..3).map(|i| format!("e{i}={}", peer_url(i))).collect();
    let mut members = Vec::new();
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
        let child = std::process::Command::new(&etcd)
            .arg(format!("--name=e{i}"))
            .arg(format!("--data-dir={}", dir.join(format!("etcd-{i}")).display()))
            .arg(format!("--listen-client-urls={}", client_url(i)))
            .arg(format!("--advertise-client-urls={}", client_url(i)))
            .arg(format!("--listen-peer-urls={}", peer_url(i)))
            .arg(format!("--initial-advertise-peer-urls={}", peer_url(i)))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .arg(format!("--cert-file={}", dir.join("cert.pem").display()))
            .arg(format!("--key-file={}", dir.join("key.pem").display()))
            .arg(format!("--peer-cert-file={}", dir.join("cert.pem").display()))
            .arg(format!("--peer-key-file={}", dir.join("key.pem").display()))
            .arg(format!("--peer-trusted-ca-file={}", ca.display()))
            .arg("--peer-client-cert-auth")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", etcd.display()))?;
        members.push(child);
    }
    let members = crate::dev::ChildGuard(members);
    let clients: Vec<Client> = (0..3).map(|i| Ok(Client::from_ca_file(&client_url(i), &ca)?)).collect::<Result<_>>()?;
    // Clients talk to the leader, as they do with Citadel.
    let leader = crate::dev::wait_for("an etcd leader", Duration::from_secs(60), || async {
        for (i, c) in clients.iter().enumerate() {
            let Ok(reply) = c.raw_at("POST", "/v3/maintenance/status", Some(&json!({})), &[]).await else { continue };
            let me = reply.body["header"]["member_id"].as_str().map(String::from);
            if me.is_some() && me.as_deref() == reply.body["leader"].as_str() {
                return Some(i);
            }
        }
        None
    })
    .await?;
    let servers = members.0.iter().map(std::process::Child::id).collect();
    let endpoint = Endpoint { target: Target::Etcd, client: clients[leader].clone(), mount: String::new(), servers };
    Ok(EtcdCluster { _members: members, endpoint })
}

/// The disk's raw fsync latency: the physical floor of a durable write. Returns the median.
pub fn fsync_floor(dir: &std::path::Path, samples: usize) -> Result<(Duration, Duration)> {
    use std::io::Write;
    let path = dir.join(".citadel-fsync-probe");
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        file.write_all(&[0u8; 512])?;
        let t = Instant::now();
        file.sync_data()?;
        times.push(t.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// One request of the writer that runs through a failover, timed from the round's start.
#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Duration,
    took: Duration,
    ok: bool,
}

/// A round of `citadel bench failover` (a kill) or of a rolling restart (a SIGTERM).
#[derive(Clone, Debug)]
pub struct DisruptionRound {
    /// The node stopped and the node the writer used.
    pub stopped: usize,
    pub writer_on: usize,
    pub sent: usize,
    pub failed: usize,
    /// The first failure's message, if any.
    pub first_failure: Option<String>,
    /// The writer's median latency before the stop, and its slowest request of the round.
    pub baseline_p50: Duration,
    pub worst: Duration,
    /// From the stop to the first write acknowledged after it that was sent after it.
    pub stop_to_first_new_write: Duration,
}

impl DisruptionRound {
    /// What the stop added to the slowest request.
    pub fn added_latency(&self) -> Duration {
        self.worst.saturating_sub(self.baseline_p50)
    }
}

/// What `citadel bench failover` measured.
pub struct FailoverReport {
    pub rounds: Vec<DisruptionRound>,
    /// From `kill -9` of two of three nodes to the survivor reporting read-only mode (474).
    pub read_only_entry: Duration,
    pub election_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub leader_wait_ms: u64,
}

pub fn median(sorted: &[Duration]) -> Duration {
    percentile(sorted, 0.5)
}

/// What the writer has sent so far, and its first failure.
#[derive(Default)]
struct WriterLog {
    sent: Vec<Sent>,
    first_failure: Option<String>,
}

/// Writes to `client` one request after another until `stop` is set, recording each in `log`.
fn start_writer(
    client: Client,
    start: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    log: std::sync::Arc<std::sync::Mutex<WriterLog>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let at = start.elapsed();
            let result = client.kv_put("secret", &format!("failover/{}", n % 64), &json!({ "n": n }), None).await;
            let mut log = log.lock().expect("writer log");
            if let Err(e) = &result {
                log.first_failure.get_or_insert_with(|| e.to_string());
            }
            log.sent.push(Sent { at, took: start.elapsed() - at, ok: result.is_ok() });
            n += 1;
        }
    })
}

/// Runs a writer on node `writer_on` while `disrupt` stops node `stopped`, then measures. The
/// writer runs half a second before the stop, and a second past the first write sent after the
/// stop that is acknowledged.
async fn through_disruption(
    client: Client,
    stopped: usize,
    writer_on: usize,
    disrupt: impl std::future::Future<Output = Result<()>>,
) -> Result<DisruptionRound> {
    const BASELINE: Duration = Duration::from_millis(500);
    const AFTER: Duration = Duration::from_secs(1);
    const LIMIT: Duration = Duration::from_secs(60);
    let start = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = std::sync::Arc::new(std::sync::Mutex::new(WriterLog::default()));
    let writer = start_writer(client, start, stop.clone(), log.clone());
    tokio::time::sleep(BASELINE).await;
    let stopped_at = start.elapsed();
    disrupt.await?;
    let first_new = |log: &WriterLog| {
        log.sent.iter().filter(|s| s.ok && s.at >= stopped_at).map(|s| s.at + s.took - stopped_at).min()
    };
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = first_new(&log.lock().expect("writer log"));
        if seen.is_some_and(|t| start.elapsed() >= stopped_at + t + AFTER) || start.elapsed() > stopped_at + LIMIT {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await?;
    let log = std::mem::take(&mut *log.lock().expect("writer log"));
    let mut before: Vec<Duration> = log.sent.iter().filter(|s| s.at + s.took < stopped_at).map(|s| s.took).collect();
    before.sort();
    let stop_to_first_new_write = first_new(&log)
        .ok_or_else(|| anyhow::anyhow!("no write sent after the stop was acknowledged within {LIMIT:?}"))?;
    Ok(DisruptionRound {
        stopped,
        writer_on,
        sent: log.sent.len(),
        failed: log.sent.iter().filter(|s| !s.ok).count(),
        first_failure: log.first_failure,
        baseline_p50: median(&before),
        worst: log.sent.iter().map(|s| s.took).max().unwrap_or_default(),
        stop_to_first_new_write,
    })
}

/// The index of the node that answers health as the leader.
pub(crate) async fn leader_of(clients: &[Client]) -> Result<usize> {
    crate::dev::wait_for("a leader", Duration::from_secs(60), || async {
        for (i, c) in clients.iter().enumerate() {
            if c.health().await.ok().map(|r| r.status.as_u16()) == Some(200) {
                return Some(i);
            }
        }
        None
    })
    .await
}

/// Starts a 3-node cluster under `dir` and kills its leader (`kill -9`) `rounds` times, with a
/// writer on a survivor through each kill; then kills two of three and times read-only entry.
pub async fn failover(dir: &std::path::Path, rounds: usize, port: u16) -> Result<FailoverReport> {
    use crate::dev;
    let exe = std::env::current_exe()?;
    let CitadelCluster { layout, nodes: mut guard, root_token: root, .. } = start_citadel(dir, port).await?;
    let clients: Vec<Client> = (0..3).map(|i| Ok(layout.client(i)?.with_token(root.clone()))).collect::<Result<_>>()?;
    // What the nodes actually run with (file plus CITADEL_* overrides), for the report.
    let raft = citadel_server::Config::load(&layout.config_path(0))?.raft;

    let mut results = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let leader = leader_of(&clients).await?;
        let survivor = (leader + 1) % 3;
        let child = &mut guard.0[leader];
        let kill = async {
            child.kill()?;
            child.wait()?;
            Ok(())
        };
        let result = through_disruption(clients[survivor].clone(), leader, survivor, kill).await?;
        crate::out!(
            "round {:>2}: killed node {}, writer on node {}: {} sent, {} failed, slowest {:>4} ms (+{} ms), \
             first new write after {} ms",
            round + 1,
            leader + 1,
            survivor + 1,
            result.sent,
            result.failed,
            result.worst.as_millis(),
            result.added_latency().as_millis(),
            result.stop_to_first_new_write.as_millis()
        );
        if let Some(failure) = &result.first_failure {
            crate::out!("          first failure: {failure}");
        }
        results.push(result);
        guard.0[leader] = layout.spawn(&exe, leader)?;
        dev::wait_healthy(&layout, Duration::from_secs(60)).await?;
    }

    // Read-only entry: lose two of three.
    let leader = leader_of(&clients).await?;
    let survivor = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let started = Instant::now();
    for i in [leader, other] {
        guard.0[i].kill()?;
        guard.0[i].wait()?;
    }
    dev::wait_for("read-only mode", Duration::from_secs(60), || async {
        (clients[survivor].health().await.ok().map(|r| r.status.as_u16()) == Some(474)).then_some(())
    })
    .await?;
    let read_only_entry = started.elapsed();
    guard.stop();
    Ok(FailoverReport {
        rounds: results,
        read_only_entry,
        election_timeout_ms: raft.election_timeout_ms,
        heartbeat_ms: raft.heartbeat_ms,
        leader_wait_ms: raft.leader_wait_ms(),
    })
}

/// Starts a 3-node cluster under `dir` and restarts every node in turn (SIGTERM, then start
/// again), `rounds` times over, with a writer on a node that is up and not being restarted.
pub async fn rolling_restart(dir: &std::path::Path, rounds: usize, port: u16) -> Result<Vec<DisruptionRound>> {
    use crate::dev;
    let exe = std::env::current_exe()?;
    let CitadelCluster { layout, nodes: mut guard, root_token: root, .. } = start_citadel(dir, port).await?;
    let clients: Vec<Client> = (0..3).map(|i| Ok(layout.client(i)?.with_token(root.clone()))).collect::<Result<_>>()?;
    let mut results = Vec::new();
    for _ in 0..rounds {
        for node in 0..3 {
            let writer_on = (node + 1) % 3;
            let child = &mut guard.0[node];
            let term = async {
                // SAFETY: kill only sends SIGTERM to the child this process started (by its pid).
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let status = tokio::task::block_in_place(|| child.wait())?;
                anyhow::ensure!(status.success(), "node {} exited with {status} after SIGTERM", node + 1);
                Ok(())
            };
            let result = through_disruption(clients[writer_on].clone(), node, writer_on, term).await?;
            crate::out!(
                "restarted node {} (writer on node {}): {} sent, {} failed, slowest {} ms",
                node + 1,
                writer_on + 1,
                result.sent,
                result.failed,
                result.worst.as_millis()
            );
            if let Some(failure) = &result.first_failure {
                crate::out!("          first failure: {failure}");
            }
            results.push(result);
            guard.0[node] = layout.spawn(&exe, node)?;
            dev::wait_healthy(&layout, Duration::from_secs(60)).await?;
            leader_of(&clients).await?;
        }
    }
    guard.stop();
    Ok(results)
}

/// What `citadel bench` compares.
pub struct Settings {
    pub workloads: Vec<Workload>,
    pub targets: Vec<Target>,
    pub concurrency: Vec<usize>,
    pub ops: usize,
    pub addr: Option<String>,
    pub mount: String,
    pub dir: std::path::PathBuf,
    pub json: std::path::PathBuf,
    pub port: u16,
}

pub struct Report {
    pub rows: Vec<serde_json::Value>,
    pub fsync_p50_ms: f64,
    pub fsync_p99_ms: f64,
    /// Citadel against etcd, and Citadel's single-client write against the fsync floor.
    pub ratios: Vec<String>,
    pub json: std::path::PathBuf,
    pub chart: std::path::PathBuf,
}

/// Measures every (concurrency, workload, target) in one run, alternating targets level by
/// level so the machine's noise falls on both alike; writes JSON and a PNG chart.
pub async fn compare(settings: Settings, client_at: fn(&str) -> Result<Client>) -> Result<Report> {
    let Settings { workloads, targets, concurrency, ops, addr, mount, dir, json, port } = settings;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (fsync_p50, fsync_p99) = fsync_floor(&dir, 500)?;
    let mut endpoints = Vec::new();
    let mut citadel = None;
    let mut etcd = None;
    for target in &targets {
        match (target, &addr) {
            (Target::Citadel, Some(addr)) => endpoints.push(Endpoint {
                target: Target::Citadel,
                client: client_at(addr)?,
                mount: mount.clone(),
                servers: Vec::new(),
            }),
            (Target::Citadel, None) => {
                crate::out!("starting a 3-node Citadel cluster under {}", dir.join("citadel").display());
                let cluster = start_citadel(&dir.join("citadel"), port).await?;
                endpoints.push(cluster.endpoint.clone());
                citadel = Some(cluster);
            }
            (Target::Etcd, _) => {
                crate::out!("starting a 3-member etcd cluster under {}", dir.join("etcd").display());
                let cluster = start_etcd(&dir.join("etcd"), port + 100).await?;
                endpoints.push(cluster.endpoint.clone());
                etcd = Some(cluster);
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    let mut measured: Vec<(Target, Workload, usize, Summary)> = Vec::new();
    for &c in &concurrency {
        for &workload in &workloads {
            for endpoint in &endpoints {
                let s = run(endpoint, workload, ops, c).await?;
                let cpu = s.cpu_per_op.map(|d| format!("  CPU {:.0} µs/op", d.as_secs_f64() * 1e6));
                crate::out!(
                    "{:<8} {:<10} c={:<3} {:>8.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  errors {}{}",
                    endpoint.target.name(),
                    workload.name(),
                    c,
                    s.throughput(),
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max),
                    s.errors,
                    cpu.unwrap_or_default()
                );
                rows.push(json!({
                    "target": endpoint.target.name(),
                    "workload": workload.name(),
                    "concurrency": c,
                    "ops": s.ops,
                    "errors": s.errors,
                    "ops_per_sec": format!("{:.0}", s.throughput()),
                    "p50_ms": format!("{:.2}", ms(s.p50)),
                    "p99_ms": format!("{:.2}", ms(s.p99)),
                    "max_ms": format!("{:.2}", ms(s.max)),
                    "cpu_us_per_op": s.cpu_per_op.map(|d| format!("{:.0}", d.as_secs_f64() * 1e6)),
                }));
                measured.push((endpoint.target, workload, c, s));
            }
        }
    }
    drop(citadel);
    drop(etcd);
    let _ = std::fs::remove_dir_all(dir.join("citadel"));
    let _ = std::fs::remove_dir_all(dir.join("etcd"));

    let find =
        |t: Target, w: Workload, c: usize| measured.iter().find(|m| m.0 == t && m.1 == w && m.2 == c).map(|m| &m.3);
    let mut ratios = Vec::new();
    for &c in &concurrency {
        for &w in &workloads {
            if let (Some(ours), Some(theirs)) = (find(Target::Citadel, w, c), find(Target::Etcd, w, c)) {
                let cpu = match (ours.cpu_per_op, theirs.cpu_per_op) {
                    (Some(a), Some(b)) => format!(", CPU per op {:.2}x", a.as_secs_f64() / b.as_secs_f64().max(1e-12)),
                    _ => String::new(),
                };
                ratios.push(format!(
                    "citadel / etcd, {} c={c}: throughput {:.2}x, p50 {:.2}x{cpu}",
                    w.name(),
                    ours.throughput() / theirs.throughput().max(1e-9),
                    ours.p50.as_secs_f64() / theirs.p50.as_secs_f64().max(1e-12)
                ));
            }
        }
    }
    if let Some(one) = find(Target::Citadel, Workload::Write, 1) {
        ratios.push(format!(
            "citadel write c=1 p50 is {:.1}x the raw fsync p50",
            one.p50.as_secs_f64() / fsync_p50.as_secs_f64().max(1e-12)
        ));
    }

    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let document = json!({
        "date": citadel_core::time::rfc3339(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
        ),
        "machine": machine(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "fsync_p50_ms": ms(fsync_p50),
        "fsync_p99_ms": ms(fsync_p99),
        "results": rows,
        "ratios": ratios,
    });
    std::fs::write(&json, serde_json::to_vec_pretty(&document)?)?;
    let chart = json.with_extension("png");
    let bars = |metric: fn(&Summary) -> f64| {
        measured
            .iter()
            .map(|(t, w, c, s)| crate::chart::Bar {
                group: format!("{} c={c}", w.name()),
                series: t.name().into(),
                value: metric(s),
            })
            .collect()
    };
    crate::chart::render(
        &format!("citadel bench: 3 nodes each, fsync p50 {:.2} ms", ms(fsync_p50)),
        &[
            crate::chart::Panel {
                title: "throughput (ops/s, higher is better)".into(),
                bars: bars(Summary::throughput),
            },
            crate::chart::Panel {
                title: "p50 latency (ms, lower is better)".into(),
                bars: bars(|s| s.p50.as_secs_f64() * 1e3),
            },
        ],
        &chart,
    )?;
    Ok(Report { rows, fsync_p50_ms: ms(fsync_p50), fsync_p99_ms: ms(fsync_p99), ratios, json, chart })
}

/// CPU model and count, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} x {}", model.unwrap_or("unknown CPU"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_user_plus_system_time_counted_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 1200 0 3 0 731 269 0 0 20 0 9 0 55 0 0";
        assert_eq!(cpu_ticks(stat), Some(731 + 269));
    }

    #[test]
    fn a_truncated_stat_line_gives_no_cpu_time_rather_than_a_wrong_one() {
        assert_eq!(cpu_ticks("4242 (citadel) S 1 4242"), None);
        assert_eq!(cpu_ticks("no parentheses at all"), None);
    }

    #[test]
    fn a_cluster_this_bench_did_not_start_has_no_cpu_time_and_a_running_process_has_one() {
        assert_eq!(cpu_time(&[]), None, "no processes: nothing to divide by the operations");
        assert!(cpu_time(&[std::process::id()]).is_some());
    }
}
