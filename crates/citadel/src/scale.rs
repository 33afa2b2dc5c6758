//! `citadel bench scale`: how a node's memory, disk and snapshot grow with the data it holds.
//!
//! Loads secrets (several versions each) and audit events into a fresh 3-node cluster by real
//! requests: every write is one audited request, and reads make up the rest of the events. At
//! each tenth of the load it records each node's resident memory, data directory size and the
//! snapshot's size. Then it times a fresh node joining and catching up, a node's restart to
//! serving, and audit queries by user and by path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use citadel_client::Client;
use serde::Serialize;
use serde_json::json;

use crate::dev::{self, ChildGuard, Layout};

pub struct ScaleSettings {
    pub secrets: usize,
    pub versions: usize,
    pub events: usize,
    pub concurrency: usize,
    pub port: u16,
    pub dir: std::path::PathBuf,
    pub json: std::path::PathBuf,
}

/// One node's footprint at one point of the load.
#[derive(Serialize)]
pub struct NodeSample {
    pub node: u64,
    pub rss_mib: f64,
    /// The most it has held resident since it started (`VmHWM`): what a sample between two
    /// snapshots or transfers misses.
    pub peak_rss_mib: f64,
    pub data_dir_mib: f64,
}

#[derive(Serialize)]
pub struct Step {
    pub tenth: usize,
    pub writes: usize,
    pub events: usize,
    pub load_seconds: f64,
    /// Requests refused (e.g. 503 while leaderless) and sent again.
    pub retried_requests: usize,
    pub snapshot_mib: f64,
    pub nodes: Vec<NodeSample>,
}

#[derive(Serialize)]
pub struct ScaleReport {
    pub secrets: usize,
    pub versions: usize,
    pub events: usize,
    pub steps: Vec<Step>,
    pub catch_up_seconds: f64,
    pub restart_to_serving_seconds: f64,
    pub audit_query_by_user_p50_ms: f64,
    pub audit_query_by_path_p50_ms: f64,
    pub max_rss_mib: f64,
    /// Every node once the new one caught up (its peak is what the catch-up cost it).
    pub after_join: Vec<NodeSample>,
    /// The largest peak of any node, during the load or the catch-up.
    pub max_peak_rss_mib: f64,
}

/// Three voters plus one node kept back to join after the load.
const NODES: usize = 4;
const QUERIES: usize = 50;
/// Attempts per request before the load gives up.
const RETRIES: usize = 5;

pub async fn run(settings: &ScaleSettings) -> Result<ScaleReport> {
    let exe = std::env::current_exe()?;
    let _ = std::fs::remove_dir_all(&settings.dir);
    let layout = Layout::new(&settings.dir, NODES, settings.port)?;
    layout.write_files("")?;
    let mut nodes = ChildGuard((0..3).map(|i| layout.spawn(&exe, i)).collect::<Result<_>>()?);
    let (root, _) = dev::initialize(&layout).await?;
    for i in 0..3 {
        wait_serving(&layout, i, Duration::from_secs(60)).await?;
    }
    let client = layout.client(0)?.with_token(&root);
    let writes_total = settings.secrets * settings.versions;
    if settings.events < writes_total {
        bail!(
            "--events ({}) must be at least --secrets × --versions ({writes_total}): every write is an event",
            settings.events
        );
    }
    let mut steps = Vec::new();
    let (mut writes, mut events) = (0, 0);
    for tenth in 1..=10 {
        let started = Instant::now();
        let write_goal = writes_total * tenth / 10;
        let mut retried = load(&client, settings, writes..write_goal, true, settings.secrets).await?;
        events += write_goal - writes;
        writes = write_goal;
        let event_goal = settings.events * tenth / 10;
        let reads = event_goal.saturating_sub(events);
        retried += load(&client, settings, 0..reads, false, writes).await?;
        events += reads;
        let load_seconds = started.elapsed().as_secs_f64();
        let snapshot = client.bytes("GET", "sys/storage/raft/snapshot", None).await.context("taking a snapshot")?;
        let samples = (0..3).map(|i| sample(&layout, &nodes, i)).collect::<Result<Vec<_>>>()?;
        eprintln!(
            "{}0%: {writes} writes, {events} events in {load_seconds:.0} s; rss {} MiB (peak {}); snapshot {:.1} MiB",
            tenth,
            samples.iter().map(|s| format!("{:.0}", s.rss_mib)).collect::<Vec<_>>().join("/"),
            samples.iter().map(|s| format!("{:.0}", s.peak_rss_mib)).collect::<Vec<_>>().join("/"),
            mib(snapshot.len() as u64)
        );
        steps.push(Step {
            tenth,
            writes,
            events,
            load_seconds,
            retried_requests: retried,
            snapshot_mib: mib(snapshot.len() as u64),
            nodes: samples,
        });
    }

    // A fresh node joins and catches up (by snapshot: the log is compacted long before).
    let target = leader_commit_index(&client).await?;
    let started = Instant::now();
    nodes.0.push(layout.spawn(&exe, 3)?);
    let new_id = layout.node_id(3);
    dev::wait_for("the new node to catch up", Duration::from_secs(600), || async {
        let status = client.get("sys/ha/status").await.ok()?;
        let row = status["data"]["nodes"].as_array()?.iter().find(|n| n["id"] == json!(new_id))?.clone();
        (row["matched_index"].as_u64()? >= target).then_some(())
    })
    .await?;
    wait_serving(&layout, 3, Duration::from_secs(600)).await?;
    let catch_up_seconds = started.elapsed().as_secs_f64();
    let after_join = (0..NODES).map(|i| sample(&layout, &nodes, i)).collect::<Result<Vec<_>>>()?;

    // A follower's restart to serving.
    let follower = 1;
    nodes.0[follower].kill().context("stopping a follower")?;
    nodes.0[follower].wait()?;
    let started = Instant::now();
    nodes.0[follower] = layout.spawn(&exe, follower)?;
    wait_serving(&layout, follower, Duration::from_secs(600)).await?;
    let restart_to_serving_seconds = started.elapsed().as_secs_f64();

    let by_user = query_p50(&client, |_| "sys/audit/events?user=root&limit=100".to_string()).await?;
    let by_path = query_p50(&client, |q| {
        format!("sys/audit/events?path={}/data/scale/s{}&limit=100", "secret", q * 997 % settings.secrets.max(1))
    })
    .await?;
    let max_rss_mib = steps.iter().flat_map(|s| s.nodes.iter().map(|n| n.rss_mib)).fold(0.0, f64::max);
    let max_peak_rss_mib = after_join.iter().map(|n| n.peak_rss_mib).fold(0.0, f64::max);
    let report = ScaleReport {
        secrets: settings.secrets,
        versions: settings.versions,
        events: settings.events,
        steps,
        catch_up_seconds,
        restart_to_serving_seconds,
        audit_query_by_user_p50_ms: by_user,
        audit_query_by_path_p50_ms: by_path,
        max_rss_mib,
        after_join,
        max_peak_rss_mib,
    };
    write_results(&report, &settings.json)?;
    drop(nodes);
    let _ = std::fs::remove_dir_all(&settings.dir);
    Ok(report)
}

/// Sends requests `range` with `concurrency` clients (returns how many were refused and sent again): writes of secret `n % secrets` (each pass
/// over the secrets adds a version) or reads of one of the `written` secrets written so far.
async fn load(
    client: &Client,
    settings: &ScaleSettings,
    range: std::ops::Range<usize>,
    write: bool,
    written: usize,
) -> Result<usize> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let failed = Arc::new(AtomicUsize::new(0));
    let gave_up = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..settings.concurrency.max(1) {
        let (client, next, failed, gave_up, first_error, end, secrets) = (
            client.clone(),
            next.clone(),
            failed.clone(),
            gave_up.clone(),
            first_error.clone(),
            range.end,
            settings.secrets.min(written).max(1),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    break;
                }
                let path = format!("scale/s{}", n % secrets);
                // A request refused while the cluster is briefly leaderless (a disk stall on a
                // shared machine) is counted and sent again: the load must be complete.
                for attempt in 0..RETRIES {
                    let result = if write {
                        client.kv_put("secret", &path, &json!({ "password": format!("{n:032}") }), None).await.map(drop)
                    } else {
                        client.kv_get("secret", &path, None).await.map(drop)
                    };
                    match result {
                        Ok(()) => break,
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert_with(|| format!("{path}: {e}"));
                            if attempt + 1 == RETRIES {
                                gave_up.fetch_add(1, Ordering::Relaxed);
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let first = first_error.lock().unwrap().clone().unwrap_or_default();
    let gave_up = gave_up.load(Ordering::Relaxed);
    if gave_up > 0 {
        bail!(
            "{gave_up} of {} requests failed {RETRIES} times during the load; the first failure: {first}",
            range.len()
        );
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("{failed} requests failed and were sent again; the first failure: {first}");
    }
    Ok(failed)
}

async fn wait_serving(layout: &Layout, i: usize, timeout: Duration) -> Result<()> {
    let client = layout.client(i)?;
    dev::wait_for(&format!("node {} to serve", layout.node_id(i)), timeout, || async {
        let code = client.health().await.ok()?.status.as_u16();
        matches!(code, 200 | 429).then_some(())
    })
    .await
}

async fn leader_commit_index(client: &Client) -> Result<u64> {
    let status = client.get("sys/ha/status").await?;
    status["data"]["cluster"]["commit_index"].as_u64().context("sys/ha/status has no commit_index")
}

fn sample(layout: &Layout, nodes: &ChildGuard, i: usize) -> Result<NodeSample> {
    let pid = nodes.0[i].id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> Result<f64> {
        let value: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
        Ok(value as f64 / 1024.0)
    };
    Ok(NodeSample {
        node: layout.node_id(i),
        rss_mib: kib("VmRSS:")?,
        peak_rss_mib: kib("VmHWM:")?,
        data_dir_mib: mib(dir_size(&layout.data_dir(i))),
    })
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn query_p50(client: &Client, path: impl Fn(usize) -> String) -> Result<f64> {
    let mut times = Vec::with_capacity(QUERIES);
    for q in 0..QUERIES {
        let started = Instant::now();
        client.get(&path(q)).await.context("querying the audit log")?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(crate::bench::median(&times).as_secs_f64() * 1e3)
}

fn write_results(report: &ScaleReport, json_path: &std::path::Path) -> Result<()> {
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(json_path, serde_json::to_vec_pretty(report)?)?;
    let bars = |value: fn(&NodeSample) -> f64| {
        report
            .steps
            .iter()
            .flat_map(|s| {
                s.nodes.iter().map(move |n| crate::chart::Bar {
                    group: format!("{}k", s.events / 1000),
                    series: format!("node {}", n.node),
                    value: value(n),
                })
            })
            .collect()
    };
    let panels = [
        crate::chart::Panel { title: "resident memory (MiB) by audit events loaded".into(), bars: bars(|n| n.rss_mib) },
        crate::chart::Panel {
            title: "peak resident memory so far (MiB, VmHWM)".into(),
            bars: bars(|n| n.peak_rss_mib),
        },
    ];
    crate::chart::render("citadel bench scale", &panels, &json_path.with_extension("png"))
}
