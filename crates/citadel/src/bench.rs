//! `citadel bench`: a load generator measuring throughput and latency percentiles.

use std::time::{Duration, Instant};

use anyhow::Result;
use citadel_client::Client;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Write,
    Read,
    StaleRead,
    /// Starts its own 3-node cluster and kills the leader `--rounds` times.
    Failover,
}

pub struct Summary {
    pub ops: usize,
    pub errors: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
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

/// Runs `ops` operations spread over `concurrency` clients against `mount`/bench-*.
pub async fn run(client: &Client, workload: Workload, ops: usize, concurrency: usize, mount: &str) -> Result<Summary> {
    let concurrency = concurrency.max(1);
    // Reads need something to read.
    if workload != Workload::Write {
        for k in 0..concurrency {
            client.kv_put(mount, &format!("bench-{k}"), &json!({ "v": "x".repeat(64) }), None).await?;
        }
    }
    assert!(workload != Workload::Failover, "failover has its own driver");
    let per_client = ops.div_ceil(concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..concurrency {
        let client = client.clone();
        let mount = mount.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut errors = 0;
            let path = format!("{mount}/data/bench-{k}");
            for n in 0..per_client {
                let t = Instant::now();
                let result = match workload {
                    Workload::Write => {
                        client.request("POST", &path, Some(&json!({ "data": { "v": format!("{n:064}") } }))).await
                    }
                    Workload::Read => client.request("GET", &path, None).await,
                    Workload::StaleRead => client.raw("GET", &path, None, &[("X-Citadel-Consistency", "stale")]).await,
                    Workload::Failover => unreachable!("checked above"),
                };
                match result {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
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
    latencies.sort();
    Ok(Summary {
        ops: latencies.len(),
        errors,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
    })
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

/// What `citadel bench failover` measured.
pub struct FailoverReport {
    /// Per round: from `kill -9` of the leader to the first acknowledged write on a survivor.
    pub rounds: Vec<Duration>,
    /// From `kill -9` of two of three nodes to the survivor reporting read-only mode (474).
    pub read_only_entry: Duration,
    pub election_timeout_ms: u64,
    pub heartbeat_ms: u64,
}

pub fn median(sorted: &[Duration]) -> Duration {
    percentile(sorted, 0.5)
}

/// Starts a 3-node cluster under `dir`, kills its leader `rounds` times, and measures.
pub async fn failover(dir: &std::path::Path, rounds: usize, port: u16) -> Result<FailoverReport> {
    use crate::dev::{self, ChildGuard, Layout};
    let exe = std::env::current_exe()?;
    let layout = Layout::new(dir, 3, port)?;
    layout.write_files("")?;
    let mut guard = ChildGuard((0..3).map(|i| layout.spawn(&exe, i)).collect::<Result<_>>()?);
    let (root, _) = dev::initialize(&layout).await?;
    dev::wait_healthy(&layout, Duration::from_secs(60)).await?;
    let clients: Vec<Client> = (0..3).map(|i| Ok(layout.client(i)?.with_token(root.clone()))).collect::<Result<_>>()?;
    // What the nodes actually run with (file plus CITADEL_* overrides), for the report.
    let raft = citadel_server::Config::load(&layout.config_path(0))?.raft;

    let leader_of = |clients: &[Client]| {
        let clients = clients.to_vec();
        async move {
            dev::wait_for("a leader", Duration::from_secs(60), || async {
                for (i, c) in clients.iter().enumerate() {
                    if c.health().await.ok().map(|r| r.status.as_u16()) == Some(200) {
                        return Some(i);
                    }
                }
                None
            })
            .await
        }
    };
    let write_until_ok = |client: Client, started: Instant| async move {
        loop {
            if client
                .kv_put("secret", "failover", &json!({ "at": format!("{:?}", started.elapsed()) }), None)
                .await
                .is_ok()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("no write succeeded within 60 s of killing the leader");
            }
        }
    };

    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let leader = leader_of(&clients).await?;
        let survivor = (leader + 1) % 3;
        let started = Instant::now();
        guard.0[leader].kill()?;
        guard.0[leader].wait()?;
        let took = write_until_ok(clients[survivor].clone(), started).await?;
        crate::out!(
            "round {:>2}: killed node {}, first write on node {} after {:>4} ms",
            round + 1,
            leader + 1,
            survivor + 1,
            took.as_millis()
        );
        times.push(took);
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
        rounds: times,
        read_only_entry,
        election_timeout_ms: raft.election_timeout_ms,
        heartbeat_ms: raft.heartbeat_ms,
    })
}
