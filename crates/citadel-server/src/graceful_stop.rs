//! Stopping a node on SIGTERM without costing the cluster an election (§10, issue 11 item 3).
//!
//! Why: killed while it leads, a node leaves the others to notice its silence and elect, and
//! writes wait or fail for an election timeout. Stopped politely it first hands leadership to the
//! most caught-up reachable voter (one vote round), then stops taking connections, lets the
//! client requests it is serving finish, and only then stops Raft.

use std::sync::Arc;
use std::time::Duration;

use crate::node::Node;

/// How long the requests in progress may take to finish before the node stops anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long handing over leadership may take before the node stops anyway (an election follows).
/// A handover is one vote round once the successor has caught up; the bound matters when the
/// successor is stopping too (a whole `citadel dev` cluster on Ctrl-C).
const HANDOVER_LIMIT: Duration = Duration::from_secs(3);

/// Hands over leadership if this node leads, then waits for the client requests in progress.
/// `stop_accepting` closes the API listener. Never fails: each step is bounded and logged.
pub async fn stop(app: &Arc<Node>, stop_accepting: impl FnOnce()) {
    if app.is_leader() {
        match successor(app) {
            Some(target) => {
                tracing::info!(to = target, "stopping: handing leadership over first");
                match tokio::time::timeout(HANDOVER_LIMIT, crate::membership::step_aside(app, target)).await {
                    Ok(Ok(leader)) => tracing::info!(to = leader, "stopping: leadership handed over"),
                    Ok(Err(e)) => {
                        tracing::warn!(to = target, error = %e, "stopping: leadership not handed over; the others will elect")
                    }
                    Err(_) => {
                        tracing::warn!(to = target, "stopping: leadership handover timed out; the others will elect")
                    }
                }
            }
            None => tracing::info!("stopping: no reachable voter to hand leadership to"),
        }
    }
    stop_accepting();
    // Client requests hold a read guard on `leaving` from their check to their audit event:
    // taking the write guard waits for every one in progress, and later ones are refused.
    match tokio::time::timeout(DRAIN_LIMIT, app.leaving.write()).await {
        Ok(mut leaving) => {
            *leaving = true;
            tracing::info!("stopping: every request in progress has been answered");
        }
        Err(_) => tracing::warn!("stopping: requests still in progress after {DRAIN_LIMIT:?}; stopping anyway"),
    }
}

/// The reachable voter with the least lag, or none.
pub fn successor(app: &Node) -> Option<u64> {
    let progress = crate::ha::Progress::of(app);
    let timeout = app.config.raft.election_timeout_ms;
    progress
        .voters
        .iter()
        .copied()
        .filter(|id| *id != app.node_id() && progress.contact_ms(*id).is_some_and(|ms| ms <= timeout))
        .min_by_key(|id| progress.lag(*id))
}
