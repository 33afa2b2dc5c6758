//! Node lifecycle (§10.1, the seeds' inactive / activate / resync): run on the leader, which
//! owns membership. Any node accepts the request and forwards it.
//!
//! - **deactivate**: the node is marked inactive in the replicated state (it then refuses client
//!   requests and its health answers 503 `inactive`), then demoted to non-voter; it keeps
//!   replicating, and autopilot leaves it without a vote.
//! - **activate**: the mark goes; autopilot gives the node its vote back once it is caught up.
//! - **resync**: the node is demoted (only a node that does not vote may forget its log), the
//!   leader compacts its log so that catching up takes a snapshot, the node discards its
//!   replicated state and restarts (`resync.rs`); once it has caught up it votes again.
//! - **rename**: its display name in the membership changes (addresses stay, so no peer is lost).
//!
//! Taking a vote away is refused when the voters left could not lose one more and keep a
//! majority of reachable nodes (failure tolerance below 0), unless forced. One action runs at a
//! time on a leader: two checked apart could together take a majority away.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use citadel_core::command::{Command, Response};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use crate::events::NodeEvent;
use crate::node::Node;

/// What an operator asks of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    Deactivate { force: bool },
    Activate,
    Resync { force: bool },
    Rename { name: String },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Deactivate { .. } => "deactivate",
            Action::Activate => "activate",
            Action::Resync { .. } => "resync",
            Action::Rename { .. } => "rename",
        }
    }
}

/// Why an action was not carried out; the API answers 404, 409, 503 or 400.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleError {
    NotMember(String),
    /// Another action is in progress.
    Busy(String),
    /// No leader, a peer out of reach, a change that did not commit: retry later.
    Unavailable(String),
    /// Refused as asked (a bad name, a vote the cluster cannot spare).
    Refused(String),
}

impl std::fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LifecycleError::NotMember(e)
            | LifecycleError::Busy(e)
            | LifecycleError::Unavailable(e)
            | LifecycleError::Refused(e) => f.write_str(e),
        }
    }
}

use LifecycleError::{Busy, NotMember, Refused, Unavailable};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub node_id: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// A display name: what `node_name` accepts.
pub const MAX_NAME_BYTES: usize = 64;

/// How long a forwarded request may take on the leader: a resync waits for the node's catch-up.
const FORWARD_LIMIT: Duration = Duration::from_secs(150);
/// How long a resync may take on the leader, from asking the node to its catch-up (within
/// `FORWARD_LIMIT`, with room for the changes around it).
const RESYNC_LIMIT: Duration = Duration::from_secs(120);
/// How long the leader waits for its snapshot before a resync.
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(30);
/// How long it waits for the purge that follows.
const PURGE_WAIT: Duration = Duration::from_secs(2);
/// Entries a node may trail the leader by and count as caught up (autopilot's measure).
const CAUGHT_UP_LAG: u64 = 100;
/// How long a voter may take to answer before it counts as out of reach.
const PING_LIMIT: Duration = Duration::from_millis(500);
/// How long a membership change may take to commit. It needs a majority of the old and of the
/// new voters: past this, one of them is out of reach.
const MEMBERSHIP_LIMIT: Duration = Duration::from_secs(10);

/// Runs `req` on the leader, forwarding it there if needed.
pub async fn run(app: &Node, req: Request) -> Result<(), LifecycleError> {
    check_name(&req.action)?;
    let metrics = app.raft_metrics();
    let membership = metrics.membership_config.membership().clone();
    if membership.get_node(&req.node_id).is_none() {
        return Err(NotMember(format!("node {} is not a member of this cluster", req.node_id)));
    }
    let me = app.node_id();
    match metrics.current_leader {
        Some(id) if id == me => {}
        Some(id) => return forward(app, id, &req).await,
        None => return Err(Unavailable("the cluster has no leader; retry once one is elected".into())),
    }
    let Ok(_one_at_a_time) = app.lifecycle_lock.try_lock() else {
        return Err(Busy("another lifecycle action is in progress on the leader; retry when it ends".into()));
    };
    if req.node_id == me {
        if let Action::Deactivate { force } | Action::Resync { force } = req.action {
            // The leader would demote itself: check first, hand leadership over, let the new
            // leader act.
            check_tolerance(app, me, force).await?;
            let successor = crate::graceful_stop::successor(app).ok_or_else(|| {
                Unavailable(format!(
                    "node {me} leads and no other voter is reachable to take over; nothing was changed"
                ))
            })?;
            let leader = crate::membership::step_aside(app, successor).await.map_err(Unavailable)?;
            return forward(app, leader, &req).await;
        }
    }
    let outcome = match &req.action {
        Action::Deactivate { force } => deactivate(app, req.node_id, *force).await,
        Action::Activate => activate(app, req.node_id).await,
        Action::Resync { force } => resync(app, req.node_id, *force).await,
        Action::Rename { name } => rename(app, req.node_id, name).await,
    };
    if outcome.is_ok() {
        tracing::info!(node = req.node_id, action = req.action.name(), "node lifecycle action done");
        app.events.publish(NodeEvent::Lifecycle { id: req.node_id, action: req.action.name().into() });
    }
    outcome
}

async fn forward(app: &Node, leader: u64, req: &Request) -> Result<(), LifecycleError> {
    let node = app
        .raft_metrics()
        .membership_config
        .membership()
        .get_node(&leader)
        .cloned()
        .ok_or_else(|| Unavailable("the leader is not in this node's membership yet; retry".into()))?;
    app.peers
        .call::<_, Result<(), LifecycleError>>(&node.cluster_addr, "cluster/lifecycle", req, FORWARD_LIMIT)
        .await
        .map_err(|e| Unavailable(format!("the leader did not answer: {e}")))?
}

fn check_name(action: &Action) -> Result<(), LifecycleError> {
    let Action::Rename { name } = action else { return Ok(()) };
    if name.trim().is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(Refused(format!(
            "name must be 1 to {MAX_NAME_BYTES} bytes of printable characters, not blank: {:?}",
            name.chars().take(MAX_NAME_BYTES).collect::<String>()
        )));
    }
    Ok(())
}

/// Refuses to take `target`'s vote unless the voters left keep a failure tolerance of at
/// least 0 among the reachable ones (or `force`).
async fn check_tolerance(app: &Node, target: u64, force: bool) -> Result<(), LifecycleError> {
    let progress = crate::ha::Progress::of(app);
    if !progress.voters.contains(&target) {
        return Ok(());
    }
    let remaining: Vec<u64> = progress.voters.iter().copied().filter(|v| *v != target).collect();
    if remaining.is_empty() {
        return Err(Refused(format!("node {target} is the only voter: the cluster cannot go on without its vote")));
    }
    // Reachable: answers the cluster channel now (openraft's last-contact times lag behind a
    // node's death). A refusal is retried; a demotion without a majority stalls every write.
    let me = app.node_id();
    let mut reachable = 0;
    for id in &remaining {
        let answers = match progress.membership.get_node(id) {
            _ if *id == me => true,
            Some(node) => node_status(app, node).await.is_some(),
            None => false,
        };
        reachable += usize::from(answers);
    }
    let quorum = crate::ha::quorum(remaining.len());
    let tolerance = reachable as i64 - quorum as i64;
    if tolerance < 0 && !force {
        return Err(Refused(format!(
            "taking node {target}'s vote would leave {} voters of which {reachable} are reachable, \
             below their quorum of {quorum} (failure tolerance {tolerance}): the cluster would stop \
             accepting writes. Bring the unreachable voters back first, or pass force",
            remaining.len()
        )));
    }
    Ok(())
}

async fn set_active(app: &Node, node_id: u64, active: bool) -> Result<(), LifecycleError> {
    match app.propose(Command::NodeSetActive { node_id, active }).await {
        Ok(Response::Rejected(r)) => Err(Refused(r.to_string())),
        Ok(_) => Ok(()),
        Err(e) => Err(Unavailable(e.to_string())),
    }
}

/// Commits a membership change within [`MEMBERSHIP_LIMIT`]; `what` says what it was for.
async fn change_membership(
    app: &Node,
    change: ChangeMembers<u64, citadel_storage::NodeInfo>,
    what: &str,
) -> Result<(), LifecycleError> {
    match tokio::time::timeout(MEMBERSHIP_LIMIT, app.raft.change_membership(change, true)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(Unavailable(format!(
            "{what}: the membership change did not commit within {MEMBERSHIP_LIMIT:?}; \
             a majority of the voters is out of reach (see sys/ha/status)"
        ))),
    }
}

/// Takes `target`'s vote, keeping it as a non-voter that replicates.
async fn demote(app: &Node, target: u64) -> Result<(), LifecycleError> {
    if !app.votes(target) {
        return Ok(());
    }
    let change = ChangeMembers::RemoveVoters(BTreeSet::from([target]));
    change_membership(app, change, &format!("node {target} could not be demoted to non-voter")).await
}

async fn deactivate(app: &Node, target: u64, force: bool) -> Result<(), LifecycleError> {
    check_tolerance(app, target, force).await?;
    // Marked first, so that autopilot cannot give the vote back in between...
    set_active(app, target, false).await?;
    if let Err(e) = demote(app, target).await {
        // ...and unmarked if the vote stays: a node that votes but serves nobody helps no one.
        return Err(match set_active(app, target, true).await {
            Ok(()) => Unavailable(format!("{e}; nothing was changed")),
            Err(undo) => Unavailable(format!(
                "{e}; node {target} is still marked inactive but votes ({undo}): run deactivate or activate again"
            )),
        });
    }
    Ok(())
}

async fn activate(app: &Node, target: u64) -> Result<(), LifecycleError> {
    set_active(app, target, true).await?;
    crate::membership::autopilot_step(app).await;
    Ok(())
}

async fn rename(app: &Node, target: u64, name: &str) -> Result<(), LifecycleError> {
    let mut node = app
        .raft_metrics()
        .membership_config
        .membership()
        .get_node(&target)
        .cloned()
        .ok_or_else(|| NotMember(format!("node {target} is not a member of this cluster")))?;
    node.name = name.to_string();
    let change = ChangeMembers::SetNodes(BTreeMap::from([(target, node)]));
    change_membership(app, change, &format!("node {target} could not be renamed")).await
}

/// Keeps this leader's autopilot from promoting `node` while it resyncs. Only this leader's:
/// a new leader may promote it, which the node itself checks before it discards anything
/// (`resync::discard_unless_voting`).
struct Resyncing<'a> {
    app: &'a Node,
    node: u64,
}

impl<'a> Resyncing<'a> {
    fn start(app: &'a Node, node: u64) -> Resyncing<'a> {
        app.resyncing.lock().expect("resyncing lock").insert(node);
        Resyncing { app, node }
    }
}

impl Drop for Resyncing<'_> {
    fn drop(&mut self) {
        self.app.resyncing.lock().expect("resyncing lock").remove(&self.node);
    }
}

/// Fails once this node no longer leads: the rest of a resync is a leader's to do.
fn still_leading(app: &Node, target: u64) -> Result<(), LifecycleError> {
    if app.is_leader() {
        return Ok(());
    }
    Err(Unavailable(format!(
        "leadership moved during the resync of node {target}: see sys/ha/status; the new leader's \
         autopilot gives it its vote back once it has caught up, or run resync again"
    )))
}

async fn resync(app: &Node, target: u64, force: bool) -> Result<(), LifecycleError> {
    check_tolerance(app, target, force).await?;
    let _guard = Resyncing::start(app, target);
    let outcome = discard_and_catch_up(app, target).await;
    // Done or given up: a later reversion of its log would be a lost disk again, not this
    // resync's, and must not be repaired silently. (A resync asked again permits it again.)
    if app.is_leader() {
        if let Err(e) = allow_log_reversion(app, target, false).await {
            tracing::warn!(node = target, error = %e, "resync: could not withdraw the log reversion permission");
        }
    }
    outcome
}

/// The resync's work on the leader: compact, demote, ask, wait, give the vote back.
async fn discard_and_catch_up(app: &Node, target: u64) -> Result<(), LifecycleError> {
    let deadline = tokio::time::Instant::now() + RESYNC_LIMIT;
    let was_voter = app.votes(target);
    allow_log_reversion(app, target, true).await?;
    // Compacted before the demotion, so that a node started empty once it no longer votes (a
    // lost data directory, as the runbook says) finds the log purged and takes the snapshot;
    // compacted after, it could start replaying the log first and hold the purge back.
    compact_log(app).await?;
    demote(app, target).await?;
    let demoted = tokio::time::Instant::now();
    let node = app
        .raft_metrics()
        .membership_config
        .membership()
        .get_node(&target)
        .cloned()
        .ok_or_else(|| NotMember(format!("node {target} left the cluster during its resync")))?;
    // A node that is down, or lost its data directory and knows no member until the log
    // reaches it, does not accept yet: ask until it does.
    let asked = loop {
        still_leading(app, target)?;
        let refusal = match node_status(app, &node).await {
            // A node that started empty once demoted (a lost data directory, replaced) holds
            // nothing older than the request: asked, it would send its log back to nothing a
            // second time, and the leader's search for it would need a second permission. One
            // that started empty earlier may have voted with a forgotten vote: it discards.
            Some(s) if s.started_empty && s.uptime_ms < demoted.elapsed().as_millis() as u64 => {
                tracing::info!(node = target, "resync: the node started empty after its demotion; nothing to discard");
                break demoted;
            }
            // Asked only once it answers, so that one just started empty shows it first.
            None => "it does not answer".to_string(),
            Some(_) => {
                // Again before each ask: a node that came back empty used up the first permission.
                allow_log_reversion(app, target, true).await?;
                let asked = tokio::time::Instant::now();
                match app.peers.call::<_, ()>(&node.cluster_addr, "cluster/resync", &(), Duration::from_secs(10)).await
                {
                    Ok(()) => break asked,
                    Err(e) => e.to_string(),
                }
            }
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Unavailable(format!("node {target} did not accept the resync: {refusal}")));
        }
        tracing::debug!(node = target, error = %refusal, "resync: the node refused; asking again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Caught up once it answers as a process started after the request, at most CAUGHT_UP_LAG
    // entries behind.
    loop {
        still_leading(app, target)?;
        let status = node_status(app, &node).await;
        let restarted = status.is_some_and(|s| s.uptime_ms < asked.elapsed().as_millis() as u64);
        if restarted && crate::ha::Progress::of(app).lag(target) <= CAUGHT_UP_LAG {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Unavailable(format!(
                "node {target} was asked to resync but has not caught up within {RESYNC_LIMIT:?}; \
                 check its log (autopilot gives it its vote back once it has)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let inactive = app.state.read(|s| s.inactive_nodes.contains(&target));
    if was_voter && !inactive {
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([target]));
        change_membership(app, change, &format!("node {target} caught up but could not get its vote back")).await?;
    }
    Ok(())
}

/// The node's own view, or `None` if it does not answer within `PING_LIMIT`.
async fn node_status(app: &Node, node: &citadel_storage::NodeInfo) -> Option<crate::cluster::NodeStatus> {
    app.peers.call(&node.cluster_addr, "cluster/status", &(), PING_LIMIT).await.ok()
}

/// The node's log is about to go back to nothing: the leader must search it again instead of
/// taking that for a broken follower (openraft's one-shot permission, used up by the next
/// reversion it sees). `allow: false` withdraws a permission left unused.
async fn allow_log_reversion(app: &Node, target: u64, allow: bool) -> Result<(), LifecycleError> {
    match app.raft.trigger().allow_next_revert(&target, allow).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Unavailable(format!("cannot prepare the resync of node {target}: {e}"))),
        Err(e) => Err(Unavailable(e.to_string())),
    }
}

/// Snapshots the leader's state and purges its log up to the snapshot, so that a node that
/// starts empty catches up from the snapshot rather than by replaying the whole log. A purge
/// that openraft defers (a replication still reading those entries) only makes the catch-up
/// replay more; it is waited for a little, never required.
async fn compact_log(app: &Node) -> Result<(), LifecycleError> {
    let applied = app.raft_metrics().last_applied.map_or(0, |l| l.index);
    app.raft.trigger().snapshot().await.map_err(|e| Unavailable(e.to_string()))?;
    app.raft
        .wait(Some(SNAPSHOT_LIMIT))
        .metrics(|m| m.snapshot.as_ref().is_some_and(|s| s.index >= applied), "a snapshot of the applied state")
        .await
        .map_err(|e| Unavailable(format!("the leader could not take a snapshot for the resync: {e}")))?;
    app.raft.trigger().purge_log(applied).await.map_err(|e| Unavailable(e.to_string()))?;
    let purged = app
        .raft
        .wait(Some(PURGE_WAIT))
        .metrics(|m| m.purged.as_ref().is_some_and(|p| p.index >= applied), "the log purged")
        .await;
    if purged.is_err() {
        tracing::info!("resync: the leader's log purge is deferred; the node may replay part of the log");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_as_the_api_sends_it() {
        let req: Request =
            serde_json::from_value(serde_json::json!({ "node_id": 3, "action": "deactivate", "force": true })).unwrap();
        assert_eq!((req.node_id, req.action), (3, Action::Deactivate { force: true }));
        let req: Request =
            serde_json::from_value(serde_json::json!({ "node_id": 2, "action": "rename", "name": "db-west" })).unwrap();
        assert_eq!(req.action, Action::Rename { name: "db-west".into() });
    }

    #[test]
    fn a_blank_long_or_control_character_name_is_refused_naming_the_rule() {
        for bad in ["", "   ", "a\nb", &"x".repeat(MAX_NAME_BYTES + 1)] {
            let err = check_name(&Action::Rename { name: bad.into() }).unwrap_err();
            assert!(matches!(&err, Refused(e) if e.contains("printable")), "{err}");
        }
        assert!(check_name(&Action::Rename { name: "node west-1".into() }).is_ok());
    }
}
