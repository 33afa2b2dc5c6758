//! The HA status table (§5.6): who leads, who votes, who replicates, and how far behind.
//!
//! The leader knows replication progress, so it assembles the table, asking each peer for what
//! only the peer knows (sealed, version, uptime). A follower asks the leader; a node without a
//! leader reports its own view and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::NodeStatus;
use crate::node::Node;

/// Entries behind the leader beyond which a node counts as lagging.
pub(crate) const LAG_ENTRIES: u64 = 1000;

/// Votes a change needs among `voters`: a majority.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// The leader's view of how far each member has replicated, read from openraft's metrics.
pub struct Progress {
    pub membership: citadel_storage::types::Membership,
    pub voters: BTreeSet<u64>,
    pub last_index: u64,
    matched: BTreeMap<u64, u64>,
    contact_ms: BTreeMap<u64, u64>,
}

impl Progress {
    pub fn of(app: &Node) -> Progress {
        use openraft::Instant as _;
        let metrics = app.raft_metrics();
        let membership = metrics.membership_config.membership().clone();
        let matched = metrics
            .replication
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, log)| log.map(|l| (id, l.index)))
            .collect();
        let contact_ms = metrics
            .heartbeat
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, t)| t.map(|t| (id, t.elapsed().as_millis() as u64)))
            .collect();
        Progress {
            voters: membership.voter_ids().collect(),
            membership,
            last_index: metrics.last_log_index.unwrap_or(0),
            matched,
            contact_ms,
        }
    }

    pub fn matched(&self, id: u64) -> u64 {
        self.matched.get(&id).copied().unwrap_or(0)
    }

    /// Milliseconds since the leader last heard from `id` (`None`: never).
    pub fn contact_ms(&self, id: u64) -> Option<u64> {
        self.contact_ms.get(&id).copied()
    }

    pub fn lag(&self, id: u64) -> u64 {
        self.last_index.saturating_sub(self.matched(id))
    }
}

pub async fn status(app: &Node) -> Value {
    let metrics = app.raft_metrics();
    match metrics.current_leader {
        Some(id) if id == app.node_id() => leader_view(app).await,
        Some(id) if !app.read_only() => {
            let leader = metrics.membership_config.membership().get_node(&id).cloned();
            if let Some(leader) = leader {
                match app
                    .peers
                    .call::<_, Value>(&leader.cluster_addr, "cluster/ha-status", &(), app.consensus_deadline())
                    .await
                {
                    Ok(view) => return view,
                    Err(e) => tracing::debug!(error = %e, "the leader did not answer the HA status request"),
                }
            }
            local_view(app, "this node could not reach the leader; showing its own view")
        }
        _ => local_view(app, "read-only mode: the cluster has no leader; this is this node's last view"),
    }
}

/// `failure_tolerance`: how many more voters may fail before writes stop, counted by the leader
/// from the voters it hears from (Vault's autopilot counts healthy voters the same way); `None`
/// in a node's local view, which cannot know.
fn cluster_summary(
    app: &Node,
    (voters, non_voters): (usize, usize),
    failure_tolerance: Option<usize>,
    health: &str,
    source: &str,
    note: &str,
) -> Value {
    let metrics = app.raft_metrics();
    let (id, name) = app.state.read(|s| s.cluster.as_ref().map(|c| (c.id.clone(), c.name.clone()))).unwrap_or_default();
    let quorum = quorum(voters);
    json!({
        "id": id,
        "name": name,
        "leader_id": metrics.current_leader,
        "term": metrics.current_term,
        "commit_index": metrics.local_committed.as_ref().map_or(0, |l| l.index),
        "voters": voters,
        "non_voters": non_voters,
        "quorum_size": quorum,
        "failure_tolerance": failure_tolerance,
        "health": health,
        "source": source,
        "note": note,
    })
}

async fn leader_view(app: &Node) -> Value {
    let progress = Progress::of(app);
    let (membership, voters) = (&progress.membership, &progress.voters);
    let inactive = app.state.read(|s| s.inactive_nodes.clone());
    let mut nodes = Vec::new();
    let mut reachable_voters = 0;
    let mut all_replicating = true;
    for (id, info) in membership.nodes() {
        let me = *id == app.node_id();
        let status: Option<NodeStatus> = if me {
            Some(app.node_status())
        } else {
            app.peers.call(&info.cluster_addr, "cluster/status", &(), Duration::from_millis(500)).await.ok()
        };
        let matched = if me { progress.last_index } else { progress.matched(*id) };
        let last_contact_ms = if me { 0 } else { progress.contact_ms(*id).unwrap_or(u64::MAX) };
        let lag = progress.last_index.saturating_sub(matched);
        let state = match &status {
            None => "unreachable",
            Some(_) if !me && last_contact_ms > app.config.raft.election_timeout_ms => "unreachable",
            Some(s) if s.sealed => "sealed",
            Some(_) if inactive.contains(id) => "inactive",
            Some(_) if lag > LAG_ENTRIES => "lagging",
            Some(_) => "healthy",
        };
        if matches!(state, "unreachable" | "lagging") {
            all_replicating = false;
        }
        if voters.contains(id) && state != "unreachable" {
            reachable_voters += 1;
        }
        let voter = voters.contains(id);
        nodes.push(node_row(
            *id,
            info,
            role(app, *id, voter),
            voter,
            state,
            last_contact_ms,
            Some(matched),
            Some(lag),
            status.as_ref(),
        ));
    }
    let quorum = quorum(voters.len());
    let health = if all_replicating {
        "alive"
    } else if reachable_voters >= quorum {
        "degraded"
    } else {
        "failed"
    };
    json!({
        "cluster": cluster_summary(
            app,
            (voters.len(), membership.nodes().count() - voters.len()),
            Some(reachable_voters.saturating_sub(quorum)),
            health,
            "leader",
            "",
        ),
        "nodes": nodes,
    })
}

fn local_view(app: &Node, note: &str) -> Value {
    let metrics = app.raft_metrics();
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let me = app.node_status();
    let nodes: Vec<Value> = membership
        .nodes()
        .map(|(id, info)| {
            let mine = *id == app.node_id();
            let status = mine.then_some(&me);
            let state = if !mine {
                "unknown"
            } else if me.sealed {
                "sealed"
            } else if app.is_inactive() {
                "inactive"
            } else {
                "healthy"
            };
            let contact = if mine { 0 } else { app.staleness_ms() };
            let voter = voters.contains(id);
            // Without a leader, only this node's own progress is known.
            let matched = mine.then_some(me.applied_index);
            node_row(*id, info, role(app, *id, voter), voter, state, contact, matched, None, status)
        })
        .collect();
    let health = if app.read_only() { "failed" } else { "degraded" };
    json!({
        "cluster": cluster_summary(
            app,
            (voters.len(), membership.nodes().count() - voters.len()),
            None,
            health,
            "local",
            note,
        ),
        "nodes": nodes,
    })
}

fn role(app: &Node, id: u64, voter: bool) -> &'static str {
    if app.raft_metrics().current_leader == Some(id) {
        "leader"
    } else if voter {
        "follower"
    } else {
        "learner"
    }
}

#[allow(clippy::too_many_arguments)]
fn node_row(
    id: u64,
    info: &citadel_storage::NodeInfo,
    role: &str,
    voter: bool,
    state: &str,
    last_contact_ms: u64,
    matched: Option<u64>,
    lag: Option<u64>,
    status: Option<&NodeStatus>,
) -> Value {
    json!({
        "id": id,
        "name": info.name,
        "site": info.site,
        "api_addr": info.api_addr,
        "cluster_addr": info.cluster_addr,
        "role": role,
        "suffrage": if voter { "voter" } else { "non-voter" },
        "state": state,
        "last_contact_ms": if last_contact_ms == u64::MAX { Value::Null } else { json!(last_contact_ms) },
        "matched_index": matched,
        "lag": lag,
        "version": status.map(|s| s.version.clone()),
        "uptime_ms": status.map(|s| s.uptime_ms),
        "active_sessions": status.map(|s| s.active_sessions),
    })
}
