//! One run: a fresh cluster, clients and a nemesis for a while, then healing and the checks.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;

use crate::cluster::ChaosCluster;
use crate::history::{self, OpKind, Outcome, Recorded, Recorder, ValueId};
use crate::nemesis::{Fault, Nemesis};
use crate::workload::{key_path, Workload, VERSION_BUDGET};

pub struct RunConfig {
    pub seed: u64,
    pub fault: Fault,
    pub time: Duration,
    pub nodes: usize,
    pub clients: usize,
    pub keys: usize,
    pub base_port: u16,
    pub exe: PathBuf,
    pub dir: PathBuf,
}

pub struct Verdict {
    pub problems: Vec<String>,
    pub summary: String,
    pub nemesis_log: Vec<String>,
    pub recorded: Option<Recorded>,
}

/// How long the keys' first writes may take, before any fault (peers may still be connecting).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long healing may take: every member back, unsealed and voting.
const HEAL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the audit log may take to hold every acknowledged request's event.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a final read may keep failing (a restarted node catching up).
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The checker's budget per run; a history it cannot decide in time fails the run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run(config: &RunConfig) -> Verdict {
    let mut verdict = Verdict { problems: Vec::new(), summary: String::new(), nemesis_log: Vec::new(), recorded: None };
    if let Err(e) = run_inner(config, &mut verdict).await {
        verdict.problems.push(format!("{e:#}"));
    }
    verdict
}

async fn run_inner(config: &RunConfig, verdict: &mut Verdict) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let spares = if matches!(config.fault, Fault::Membership | Fault::Mixed) { 2 } else { 0 };
    let mut cluster = ChaosCluster::start(&config.dir, &config.exe, config.nodes, spares, config.base_port)
        .await
        .context("starting the cluster")?;
    let recorder = Recorder::new();
    let workload = Workload::new(recorder.clone(), cluster.clients.clone(), config.keys);

    // Every key exists before the faults begin, so that "not found" is never a stale answer.
    let setup_deadline = Instant::now() + SETUP_TIMEOUT;
    for key in 0..config.keys {
        if let Err(outcome) = workload.create_key(0, key, setup_deadline).await {
            anyhow::bail!("the first write of key {key} failed for {SETUP_TIMEOUT:?}: {outcome:?}");
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let members = cluster.members();
    let all_slots: Vec<usize> = (0..cluster.slots.len()).collect();
    let clients: Vec<_> = (0..config.clients)
        .map(|c| {
            let home = members[c % members.len()];
            let seed = rng.gen();
            tokio::spawn(workload.clone().run_client(home, seed, all_slots.clone(), stop_rx.clone()))
        })
        .collect();

    let mut nemesis = Nemesis::new();
    let until = Instant::now() + config.time;
    let nemesis_result = nemesis.run(config.fault, &mut cluster, &mut rng, until).await;
    let _ = stop_tx.send(true);
    for client in clients {
        let _ = client.await;
    }
    verdict.nemesis_log = std::mem::take(&mut nemesis.log);
    nemesis_result.context("applying a fault")?;

    cluster.heal()?;
    cluster.wait_converged(HEAL_TIMEOUT).await.context("after healing, the cluster did not recover")?;

    // Final reads: every member must answer (a restarted node may still be catching up).
    let final_process = workload.new_process();
    for key in 0..config.keys {
        for slot in cluster.members() {
            let deadline = Instant::now() + FINAL_READ_TIMEOUT;
            loop {
                let outcome = workload.perform(final_process, slot, key, OpKind::Read).await;
                if matches!(outcome, Outcome::Ok { .. }) {
                    break;
                }
                if Instant::now() > deadline {
                    verdict.problems.push(format!("final read of key {key} on node {} failed: {outcome:?}", slot + 1));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut recorded = recorder.take();

    // The audit check first: the version-history reads below add events of their own.
    check_audit(&cluster, &recorded, config.keys, &mut verdict.problems).await;
    let histories = check_version_histories(&cluster, &recorded, config.keys, &mut verdict.problems).await;
    history::resolve_unknown_writes(&mut recorded, &histories);
    verdict.summary = summarize(&recorded);
    let checked = Instant::now();
    check_linearizable(&recorded, config.keys, &mut verdict.problems).await;
    verdict.summary.push_str(&format!(", checked in {:.1}s", checked.elapsed().as_secs_f64()));
    verdict.recorded = Some(recorded);
    Ok(())
}

fn summarize(rec: &Recorded) -> String {
    let count = |f: &dyn Fn(&Outcome) -> bool| rec.ops.iter().filter(|o| o.outcome.as_ref().is_some_and(f)).count();
    let mut summary = format!(
        "{} ops: {} ok, {} cas-mismatch, {} unknown, {} dropped reads",
        rec.ops.len(),
        count(&|o| matches!(o, Outcome::Ok { .. })),
        count(&|o| matches!(o, Outcome::Fail)),
        count(&|o| matches!(o, Outcome::Unknown)),
        count(&|o| matches!(o, Outcome::Dropped)),
    );
    let full = history::acknowledged_writes(rec)
        .values()
        .filter(|versions| versions.keys().next_back().is_some_and(|v| *v >= VERSION_BUDGET))
        .count();
    if full > 0 {
        summary.push_str(&format!(", {full} keys reached the version budget (then only read: use more --keys)"));
    }
    summary
}

/// Reads each key's whole version history from every member: they must agree, and hold every
/// acknowledged write at the version it was acknowledged with (no lost writes). Returns the
/// histories that are complete (no version evicted), for resolving unknown writes.
async fn check_version_histories(
    cluster: &ChaosCluster,
    rec: &Recorded,
    keys: usize,
    problems: &mut Vec<String>,
) -> BTreeMap<usize, BTreeMap<u64, ValueId>> {
    let acknowledged = history::acknowledged_writes(rec);
    let mut complete = BTreeMap::new();
    for key in 0..keys {
        let mut reference: Option<(usize, BTreeMap<u64, ValueId>)> = None;
        for slot in cluster.members() {
            let versions = match version_history(&cluster.clients[slot], key).await {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("cannot read key {key}'s versions on node {}: {e:#}", slot + 1));
                    continue;
                }
            };
            let lost: Vec<_> = acknowledged
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|(version, value)| **version > evicted_below(&versions) && versions.get(version) != Some(value))
                .collect();
            if let Some((version, value)) = lost.first() {
                problems.push(format!(
                    "lost writes on node {}: {} acknowledged versions of key {key} differ, e.g. version {version} was acknowledged with value {value}, the node has {:?}",
                    slot + 1,
                    lost.len(),
                    versions.get(version)
                ));
            }
            match &reference {
                None => reference = Some((slot, versions)),
                Some((first, theirs)) if *theirs != versions => {
                    problems.push(format!("nodes {} and {} disagree on the versions of key {key}", first + 1, slot + 1))
                }
                Some(_) => {}
            }
        }
        if let Some((_, versions)) = reference {
            if evicted_below(&versions) == 0 {
                complete.insert(key, versions);
            }
        }
    }
    complete
}

/// Versions below this one were evicted by `max_versions` (0: none were).
fn evicted_below(versions: &BTreeMap<u64, ValueId>) -> u64 {
    versions.keys().next().map_or(0, |first| first - 1)
}

/// Version → value of every version a node still keeps for `key`.
async fn version_history(client: &citadel_client::Client, key: usize) -> Result<BTreeMap<u64, ValueId>> {
    let meta = client.get(&format!("secret/metadata/{}", key_path(key))).await?;
    let current = meta["data"]["current_version"].as_u64().context("metadata without current_version")?;
    let oldest = meta["data"]["oldest_version"].as_u64().unwrap_or(1).max(1);
    let mut versions = BTreeMap::new();
    for version in oldest..=current {
        let body = client.get(&format!("secret/data/{}?version={version}", key_path(key))).await?;
        let value = body["data"]["data"]["v"].as_str().and_then(|v| v.parse().ok());
        versions.insert(version, value.with_context(|| format!("version {version} has no value"))?);
    }
    Ok(versions)
}

/// Every acknowledged request has exactly one event in the replicated audit log, and every
/// node's chain verifies.
async fn check_audit(cluster: &ChaosCluster, rec: &Recorded, keys: usize, problems: &mut Vec<String>) {
    let acknowledged: HashSet<&str> = rec.ops.iter().filter_map(|o| o.request_id.as_deref()).collect();
    let members = cluster.members();
    let client = &cluster.clients[members[0]];
    let deadline = Instant::now() + AUDIT_TIMEOUT;
    let counts = loop {
        let counts = match audit_counts(client, keys).await {
            Ok(counts) => counts,
            Err(e) => {
                problems.push(format!("cannot read the audit log: {e:#}"));
                return;
            }
        };
        let missing = acknowledged.iter().filter(|id| !counts.contains_key(**id)).count();
        if missing == 0 {
            break counts;
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "audit: {missing} of {} acknowledged requests have no event in the replicated log after {AUDIT_TIMEOUT:?}",
                acknowledged.len()
            ));
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // One event per request; the one exception is a write whose accepting node answered before
    // learning whether it committed: its answer is in a spool event flagged `outcome_unknown`,
    // and, if it committed, its outcome is in the log chain.
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| !n.is_exactly_once()).collect();
    if !repeated.is_empty() {
        problems.push(format!("audit: {} requests have more than one event, e.g. {:?}", repeated.len(), repeated[0]));
    }
    for slot in members {
        match cluster.clients[slot].get("sys/audit/verify").await {
            Ok(body) if body["data"]["ok"] == Value::Bool(true) => {}
            Ok(body) => problems.push(format!("audit verify failed on node {}: {}", slot + 1, body["data"])),
            Err(e) => problems.push(format!("audit verify on node {} failed: {e}", slot + 1)),
        }
    }
}

/// The events the replicated log holds for one request.
#[derive(Debug, Default)]
struct EventCount {
    /// Ordinary events, and how many of them are in the log chain (a write's own event).
    plain: usize,
    in_log_chain: usize,
    /// Spool events flagged `outcome_unknown`.
    outcome_unknown: usize,
}

impl EventCount {
    fn is_exactly_once(&self) -> bool {
        match (self.plain, self.outcome_unknown) {
            (1, 0) | (0, 1) => true,
            // The answer (spool) and the committed command's outcome (log chain).
            (1, 1) => self.in_log_chain == 1,
            _ => false,
        }
    }
}

/// Request id → its events in the replicated log, for the chaos keys' requests (read one key at
/// a time: the events API answers at most 10 000 events per call).
async fn audit_counts(client: &citadel_client::Client, keys: usize) -> Result<BTreeMap<String, EventCount>> {
    const LIMIT: usize = 10_000;
    let mut counts = BTreeMap::new();
    for key in 0..keys {
        let path = format!("secret/data/{}", key_path(key));
        let body = client.get(&format!("sys/audit/events?path={path}&limit={LIMIT}")).await?;
        let events = body["data"]["events"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(events.len() < LIMIT, "more than {LIMIT} audit events for {path}: shorten the run");
        for event in events.iter().filter(|e| e["path"] == Value::String(path.clone())) {
            if let Some(id) = event["request_id"].as_str().filter(|id| !id.is_empty()) {
                let count: &mut EventCount = counts.entry(id.to_string()).or_default();
                if event["outcome_unknown"] == Value::Bool(true) {
                    count.outcome_unknown += 1;
                } else {
                    count.plain += 1;
                    count.in_log_chain += usize::from(event["chain"] == Value::String("log".into()));
                }
            }
        }
    }
    Ok(counts)
}

async fn check_linearizable(rec: &Recorded, keys: usize, problems: &mut Vec<String>) {
    let per_key: Vec<_> = (0..keys).map(|k| (k, history::key_actions(rec, k))).collect();
    let check = tokio::task::spawn_blocking(move || {
        per_key
            .into_iter()
            .map(|(k, actions)| (k, actions.len() / 2, history::linearizable(actions)))
            .collect::<Vec<_>>()
    });
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(results)) => {
            for (key, ops, ok) in results {
                if !ok {
                    problems.push(format!("key {key}: the history of its {ops} operations is not linearizable"));
                }
            }
        }
        Ok(Err(e)) => problems.push(format!("the linearizability checker failed: {e}")),
        Err(_) => {
            // The search is exponential only in writes that may or may not have happened.
            let unresolved = rec
                .ops
                .iter()
                .filter(|o| !matches!(o.kind, OpKind::Read))
                .filter(|o| matches!(o.outcome, None | Some(Outcome::Unknown)) && o.resolved.is_none())
                .count();
            problems.push(format!(
                "the linearizability checker did not decide within {CHECK_TIMEOUT:?} ({unresolved} unknown writes could not be resolved against a complete version history)"
            ))
        }
    }
}
