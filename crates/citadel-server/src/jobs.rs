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
use citadel_core::state::State;
use citadel_core::token_table::{self, TokenRead};
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
    /// Whether, after a committed run, more work is due than one run does: the job runs again
    /// after [`AGAIN_PAUSE`] instead of at its next interval.
    pub again: fn(&Node) -> bool,
}

/// The pause before a job runs again at once: room for the cluster between bounded runs.
const AGAIN_PAUSE: Duration = Duration::from_millis(100);

fn never_again(_: &Node) -> bool {
    false
}

/// Every leader-only job.
pub const JOBS: &[Job] = &[
    Job {
        name: "token_expiry",
        every: |c| Duration::from_millis(c.jobs.token_sweep_ms),
        run: token_expiry,
        record_idle: true,
        // A store that cannot be read says nothing more is due: the next run reports the error.
        again: |app| {
            app.state.read_with_store(|_, store| sweep_is_cut_short(store, crate::ids::now_ms())).unwrap_or(false)
        },
    },
    Job {
        name: "prune_expired",
        every: |c| Duration::from_millis(c.jobs.prune_ms),
        run: prune_expired,
        record_idle: true,
        again: never_again,
    },
    Job {
        name: "audit_retention",
        every: |c| Duration::from_millis(c.jobs.audit_retention_ms),
        run: audit_retention,
        record_idle: true,
        again: never_again,
    },
    Job {
        name: "snapshot_auto",
        every: |c| Duration::from_millis(c.jobs.snapshot_auto_ms),
        run: snapshot_auto,
        record_idle: false,
        again: never_again,
    },
    Job {
        name: "alerts",
        every: |c| Duration::from_millis(c.jobs.alerts_ms),
        run: |app| Box::pin(crate::alerts::alerts_job(app)),
        record_idle: false,
        again: never_again,
    },
    Job {
        name: "alert_delivery",
        every: |c| Duration::from_millis(c.jobs.alert_delivery_ms),
        run: |app| Box::pin(crate::alerts::delivery_job(app)),
        record_idle: false,
        again: never_again,
    },
];

/// What a run that found nothing to do and commits nothing reports.
const IDLE: &str = "idle";

/// Most events one retention run prunes per chain: bounds the work one entry makes every node
/// do; a backlog is cleared over several runs.
const RETENTION_BATCH: usize = 100_000;

/// Tokens one sweep removes at most (more if several ended in the same millisecond, and each
/// with its descendants): a sweep runs inside `apply` on every replica, under the state's
/// write lock. Sweeping 499,980 of a million tokens at once took 1.5 s; 10,000 at a time, the
/// longest of the 50 sweeps took 92 ms (`examples/token_sweep.rs`).
const SWEEP_BATCH: usize = 10_000;

/// Removes expired (and used-up) tokens, and revoked emergency tokens past their expiry, the
/// oldest first and at most about [`SWEEP_BATCH`] at a time; when more are due, the job runs
/// again at once. The deadline is the leader's clock, carried in the command (`apply` reads none).
fn token_expiry(app: &Node) -> BoxFuture<'_, JobOutput> {
    Box::pin(async move {
        let now = crate::ids::now_ms();
        let up_to = app.state.read_with_store(|s, store| sweep_up_to(s, store, now)).map_err(|e| e.to_string())?;
        Ok(up_to.map(|up_to| Command::TokensExpire { now: up_to }))
    })
}

/// Up to when the next sweep goes (`token_table::sweep_cut`); `now` when only revoked emergency
/// tokens are due; `None` when nothing is.
fn sweep_up_to(state: &State, tokens: &dyn TokenRead, now: u64) -> std::io::Result<Option<u64>> {
    let emergency = state.revoked_emergency.values().any(|e| *e <= now);
    Ok(token_table::sweep_cut(tokens, now, SWEEP_BATCH)?.or(emergency.then_some(now)))
}

/// Whether more tokens are due than one sweep removes.
fn sweep_is_cut_short(tokens: &dyn TokenRead, now: u64) -> std::io::Result<bool> {
    Ok(token_table::nth_end_by(tokens, now, SWEEP_BATCH + 1)?.is_some())
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
    let mut again = false;
    loop {
        if again {
            tokio::time::sleep(AGAIN_PAUSE).await;
        } else {
            ticks.tick().await;
        }
        let outcome = run_once(&app, job, term).await;
        again = outcome == "done" && (job.again)(&app);
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
    use citadel_core::command::Command;
    use citadel_core::state::State;
    use citadel_core::token::TokenEntry;

    fn initialized() -> State {
        let cluster = citadel_core::state::ClusterInfo { id: "c".into(), name: "citadel".into(), initialized_at: 1 };
        State { cluster: Some(cluster), ..State::default() }
    }

    /// A state holding `n` tokens that expire at 1, 2, … n ms, and one that never does.
    fn state_with_expiring_tokens(n: u64) -> State {
        let mut state = initialized();
        for i in 1..=n {
            let hash = format!("t{i:06}");
            state.tokens.insert(hash.clone(), TokenEntry { hash, expires: Some(i), ..TokenEntry::default() });
        }
        state.tokens.insert("root".into(), TokenEntry { hash: "root".into(), ..TokenEntry::default() });
        state
    }

    #[test]
    fn a_sweep_takes_the_oldest_tokens_a_batch_at_a_time_and_asks_to_run_again_until_none_is_due() {
        let total = 2 * SWEEP_BATCH as u64 + 500;
        let mut state = state_with_expiring_tokens(total);
        let now = total + 10;
        let mut sweeps = Vec::new();
        while let Some(up_to) = sweep_up_to(&state, &state.tokens, now).unwrap() {
            let cut_short = sweep_is_cut_short(&state.tokens, now).unwrap();
            let before = state.tokens.len();
            assert_eq!(state.apply(Command::TokensExpire { now: up_to }), citadel_core::command::Response::Done);
            sweeps.push((before - state.tokens.len(), cut_short));
            assert!(sweeps.len() <= 3, "{sweeps:?}");
        }
        assert_eq!(sweeps, [(SWEEP_BATCH, true), (SWEEP_BATCH, true), (500, false)]);
        assert_eq!(state.tokens.keys().collect::<Vec<_>>(), ["root"], "every expired token went, the oldest first");
        assert!(state.tokens.indexes_match_tokens());
    }

    #[test]
    fn a_batch_of_tokens_that_ended_in_the_same_millisecond_is_swept_whole() {
        let mut state = initialized();
        for i in 0..SWEEP_BATCH + 5 {
            let hash = format!("used{i:06}");
            // Used up: no longer usable from the start (their end is 0).
            state.tokens.insert(hash.clone(), TokenEntry { hash, uses_left: Some(0), ..TokenEntry::default() });
        }
        assert_eq!(sweep_up_to(&state, &state.tokens, 50).unwrap(), Some(0));
        assert_eq!(state.apply(Command::TokensExpire { now: 0 }), citadel_core::command::Response::Done);
        assert!(state.tokens.is_empty());
        assert_eq!(sweep_up_to(&state, &state.tokens, 50).unwrap(), None, "nothing left to sweep");
    }

    #[test]
    fn job_names_are_unique_and_fit_the_job_log() {
        let names: std::collections::BTreeSet<&str> = JOBS.iter().map(|j| j.name).collect();
        assert_eq!(names.len(), JOBS.len());
        assert!(JOBS.iter().all(|j| !j.name.is_empty() && j.name.len() <= citadel_core::job::MAX_JOB_NAME));
    }
}
