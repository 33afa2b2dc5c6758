//! The job runner (§1.6, §9.2): leader-only periodic jobs.
//!
//! Jobs run on the leader only. The runner follows openraft's metrics: when this node becomes
//! leader of a term it starts one task per job, and when it steps down (or a new term begins)
//! it aborts them. Each run proposes `Command::JobResult` tagged with the term and this node,
//! on this node only (never forwarded): `apply` refuses a result from a deposed leader (its
//! term is older than the entry carrying it), so even a run that raced a leader change cannot
//! act twice. Every run is committed, even one that changed nothing (except for a job that looks
//! often for rare work, `Job::record_idle`), so the replicated job log (`State::jobs`,
//! `GET sys/jobs`) shows which node ran what in which term; each outcome is also published on the
//! event stream.
//!
//! The job set is declared once, in `JOBS`: a new job (audit retention, scheduled snapshots,
//! rotations, alert delivery) is one entry.

use std::sync::Arc;
use std::time::Duration;

use citadel_core::command::{Command, Response};
use futures::future::BoxFuture;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::events::NodeEvent;
use crate::node::Node;

/// What a job decides in one run: the command to commit with its result (`None`: nothing to
/// change), or why it could not run.
pub type JobOutput = Result<Option<Command>, String>;

pub struct Job {
    pub name: &'static str,
    /// Its interval, from the configuration (`[jobs]`).
    pub every: fn(&Config) -> Duration,
    pub run: for<'a> fn(&'a Node) -> BoxFuture<'a, JobOutput>,
    /// Whether a run that found nothing to do is committed too. A job that looks often for
    /// rare work (scheduled snapshots, every second) would otherwise fill the log with nothing.
    pub record_idle: bool,
}

/// Every leader-only job.
pub const JOBS: &[Job] = &[
    Job {
        name: "token_expiry",
        every: |c| Duration::from_millis(c.jobs.token_sweep_ms),
        run: token_expiry,
        record_idle: true,
    },
    Job {
        name: "prune_expired",
        every: |c| Duration::from_millis(c.jobs.prune_ms),
        run: prune_expired,
        record_idle: true,
    },
    Job {
        name: "audit_retention",
        every: |c| Duration::from_millis(c.jobs.audit_retention_ms),
        run: audit_retention,
        record_idle: true,
    },
    Job {
        name: "snapshot_auto",
        every: |c| Duration::from_millis(c.jobs.snapshot_auto_ms),
        run: snapshot_auto,
        record_idle: false,
    },
    Job {
        name: "alerts",
        every: |c| Duration::from_millis(c.jobs.alerts_ms),
        run: |app| Box::pin(crate::alerts::alerts_job(app)),
        record_idle: false,
    },
    Job {
        name: "alert_delivery",
        every: |c| Duration::from_millis(c.jobs.alert_delivery_ms),
        run: |app| Box::pin(crate::alerts::delivery_job(app)),
        record_idle: false,
    },
];

/// What a run that found nothing to do and commits nothing reports.
const IDLE: &str = "idle";

/// Most events one retention run prunes per chain: bounds the work one entry makes every node
/// do; a backlog is cleared over several runs.
const RETENTION_BATCH: usize = 100_000;

/// Removes expired (and used-up) tokens, and revoked emergency tokens past their expiry. The
/// deadline is the leader's clock, carried in the command (`apply` reads none).
fn token_expiry(app: &Node) -> BoxFuture<'_, JobOutput> {
    Box::pin(async move {
        let now = crate::ids::now_ms();
        let due = app
            .state
            .read(|s| s.tokens.values().any(|t| !t.is_usable(now)) || s.revoked_emergency.values().any(|e| *e <= now));
        Ok(due.then_some(Command::TokensExpire { now }))
    })
}

/// Forgets join tokens, revoked serials and member certificates that expired: the tables stay
/// as small as what is still valid.
fn prune_expired(app: &Node) -> BoxFuture<'_, JobOutput> {
    Box::pin(async move {
        let now = crate::ids::now_ms();
        let due = app.state.read(|s| {
            s.join_tokens.values().any(|t| t.used || t.expires <= now)
                || s.revoked_serials.values().any(|e| *e <= now)
                || s.node_certs.values().flat_map(|c| c.values()).any(|e| *e <= now)
        });
        Ok(due.then_some(Command::PruneExpired { now }))
    })
}

/// Moves audit events older than `[audit] retain_days` from the replicated audit log into each
/// node's archive files (§9.3). The cut per chain is read from this node's audit store, named
/// by sequence and hash, so every replica cuts at the same event (and a replica whose event
/// there differs stops instead of cutting elsewhere).
fn audit_retention(app: &Node) -> BoxFuture<'_, JobOutput> {
    Box::pin(async move {
        let before = crate::ids::now_ms().saturating_sub(app.config.audit.retain_ms());
        let store = app.state.audit().clone();
        let through = tokio::task::spawn_blocking(move || store.prune_points(before, RETENTION_BATCH))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read the audit log: {e}"))?;
        Ok((!through.is_empty()).then_some(Command::AuditPrune { before, through }))
    })
}

/// Takes the scheduled snapshot that is most overdue (§10.2) and records how it went.
fn snapshot_auto(app: &Node) -> BoxFuture<'_, JobOutput> {
    Box::pin(async move {
        let now = crate::ids::now_ms();
        let due = app.state.read(|s| {
            citadel_core::snapshot_auto::most_overdue(&s.snapshot_auto, now).map(|(n, e)| (n.clone(), e.clone()))
        });
        let Some((name, entry)) = due else { return Ok(None) };
        let status = crate::scheduled_snapshots::take(app, &name, &entry, now).await;
        Ok(Some(Command::SnapshotAutoRecord { name, status }))
    })
}

/// Starts the jobs whenever this node leads, and stops them when it no longer does.
pub async fn run(app: Arc<Node>) {
    use openraft::async_runtime::WatchReceiver;
    // The server metrics change with leadership and membership only; the full metrics change
    // with every write, and waking on each was a tenth of a busy leader's CPU.
    let mut metrics = app.raft.server_metrics();
    // The term the running tasks belong to; dropping the set aborts them.
    let mut running: Option<(u64, JoinSet<()>)> = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_watched();
            (m.current_leader, m.vote.leader_id.term)
        };
        let leading = leader == Some(app.node_id());
        if running.as_ref().is_some_and(|(t, _)| !leading || *t != term) {
            tracing::info!(term = running.as_ref().map(|(t, _)| *t), "stepped down: leader jobs stopped");
            running = None;
        }
        if leading && running.is_none() {
            tracing::info!(term, jobs = JOBS.len(), "leading: leader jobs started");
            let mut tasks = JoinSet::new();
            for job in JOBS {
                tasks.spawn(every_interval(app.clone(), job, term));
            }
            running = Some((term, tasks));
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Runs `job` once per interval, for as long as the runner keeps this task (the term lasts).
async fn every_interval(app: Arc<Node>, job: &'static Job, term: u64) {
    let every = (job.every)(&app.config);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = run_once(&app, job, term).await;
        if outcome == IDLE {
            continue;
        }
        if outcome != "done" {
            tracing::warn!(job = job.name, term, outcome = %outcome, "leader job did not complete");
        }
        app.events.publish(NodeEvent::JobResult { job: job.name.into(), term, outcome });
    }
}

/// One run: decide, then commit the result on this node. Never forwarded: a node that no
/// longer leads gets "not the leader", and a late result is refused by `apply`.
async fn run_once(app: &Node, job: &Job, term: u64) -> String {
    let command = match (job.run)(app).await {
        Ok(None) if !job.record_idle => return IDLE.into(),
        Ok(command) => command,
        Err(e) => return format!("failed: {e}"),
    };
    let result = Command::JobResult {
        term,
        node: app.node_id(),
        job: job.name.into(),
        at: crate::ids::now_ms(),
        command: command.map(Box::new),
    };
    match app.propose_local(result).await {
        Ok(Response::Rejected(r)) => format!("rejected: {r}"),
        Ok(_) => "done".into(),
        Err(e) => format!("not committed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_unique_and_fit_the_job_log() {
        let names: std::collections::BTreeSet<&str> = JOBS.iter().map(|j| j.name).collect();
        assert_eq!(names.len(), JOBS.len());
        assert!(JOBS.iter().all(|j| !j.name.is_empty() && j.name.len() <= citadel_core::job::MAX_JOB_NAME));
    }
}
