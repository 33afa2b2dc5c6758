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
