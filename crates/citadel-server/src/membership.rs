//! Joining a cluster: a new node asks the leader over the cluster channel (mutual TLS). Its
//! certificate must name the node id it joins as and cover its addresses, and must not be
//! revoked (`peer::admit_join`). The leader records the certificate (so that removing the node
//! revokes it), adds the node as a non-voter, waits until it has caught up (log or snapshot),
//! then gives it a vote while voters < `max_voters`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use citadel_storage::NodeInfo;
use openraft::ChangeMembers;

use crate::cluster::{JoinReply, JoinRequest, PROTOCOL_VERSION};
use crate::node::Node;
use crate::peer::PeerIdentity;

/// Leader side of a join; `peer` is the identity in the caller's certificate.
pub async fn accept_join(app: &Node, peer: Option<&PeerIdentity>, req: JoinRequest) -> Result<JoinReply, String> {
    if req.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: node {} speaks version {}, this cluster speaks version {PROTOCOL_VERSION}; \
             run the same citadel version on every node",
            req.node_id, req.protocol_version
        ));
    }
    let addresses = [req.node.api_addr.as_str(), req.node.cluster_addr.as_str()];
    if let Err(refusal) = crate::peer::admit_join(app, peer, req.node_id, &addresses) {
        crate::peer::warn_refused(peer, &refusal, crate::peer::JOIN_PATH);
        return Err(refusal.to_string());
    }
    let metrics = app.raft_metrics();
    let me = app.node_id();
    match metrics.current_leader {
        Some(id) if id == me => {}
        Some(id) => {
            let leader = metrics.membership_config.membership().get_node(&id).cloned();
            return match leader {
                Some(n) => Ok(JoinReply::Redirect { leader_cluster_addr: n.cluster_addr }),
                None => Err("the leader is not yet known here; retry".into()),
            };
        }
        None => return Err("the cluster has no leader; retry".into()),
    }
    let membership = metrics.membership_config.membership().clone();
    if let Some(peer) = peer {
        crate::peer::record_certificate(app, req.node_id, peer)
            .await
            .map_err(|e| format!("cannot record the certificate of node {}: {e}", req.node_id))?;
    }
    match membership.get_node(&req.node_id) {
        Some(existing) if existing.cluster_addr != req.node.cluster_addr => {
            return Err(format!(
                "node id {} is already a member at {}; give the new node another node_id",
                req.node_id, existing.cluster_addr
            ))
        }
        Some(_) if membership.voter_ids().any(|v| v == req.node_id) => return Ok(JoinReply::Joined { voter: true }),
        Some(_) => {}
        None => {
            tracing::info!(node = req.node_id, addr = %req.node.cluster_addr, "adding node as non-voter");
            app.raft.add_learner(req.node_id, req.node.clone(), true).await.map_err(|e| e.to_string())?;
        }
    }
    let voters = app.raft_metrics().membership_config.membership().voter_ids().count();
    if voters >= app.config.raft.max_voters || held_back(app).contains(&req.node_id) {
        return Ok(JoinReply::Joined { voter: false });
    }
    app.raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id])), false)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(node = req.node_id, "node promoted to voter");
    Ok(JoinReply::Joined { voter: true })
}

/// Joiner side: asks `leader_cluster_addr` (following redirects) to add this node.
pub async fn join(app: &Node, leader_cluster_addr: &str) -> Result<bool, String> {
    let req = JoinRequest {
        node_id: app.node_id(),
        node: NodeInfo {
            api_addr: app.config.api_url(),
            cluster_addr: app.config.cluster_url(),
            name: app.config.name(),
            site: app.config.site.clone(),
        },
        protocol_version: PROTOCOL_VERSION,
    };
    let mut target = leader_cluster_addr.to_string();
    for _ in 0..5 {
        // Catching up may take a snapshot transfer: give it time.
        let reply: JoinReply = app.peers.call(&target, "cluster/join", &req, Duration::from_secs(120)).await?;
        match reply {
            JoinReply::Joined { voter } => return Ok(voter),
            JoinReply::Redirect { leader_cluster_addr } => target = leader_cluster_addr,
        }
    }
    Err("too many redirects while looking for the leader".into())
}

/// `[[retry_join]]`: until this node is a member (a voter, or a non-voter the leader chose to
/// keep as such), keep asking the configured leaders.
pub async fn retry_join(app: Arc<Node>) {
    if app.config.retry_join.is_empty() {
        return;
    }
    if crate::peer::is_removed(&app) {
        tracing::warn!("not joining: {}", crate::peer::REMOVED_MESSAGE);
        return;
    }
    let mut reported = String::new();
    loop {
        // Done once this node votes. A non-voter keeps asking: its promotion may have failed
        // (a concurrent membership change), and the leader decides whether a seat is free.
        if app.votes(app.node_id()) {
            return;
        }
        // Deactivated: the operator decides when it votes again (activate).
        if app.is_inactive() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        for target in &app.config.retry_join {
            match join(&app, &target.leader_cluster_addr).await {
                Ok(voter) => {
                    tracing::info!(leader = %target.leader_cluster_addr, voter, "joined the cluster");
                    return;
                }
                Err(e) if e != reported => {
                    tracing::warn!(leader = %target.leader_cluster_addr, error = %e, "join attempt failed; retrying");
                    reported = e;
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Hands leadership to `target` (a voter) and waits until it leads, so planned maintenance
/// fails no request: proposals arriving meanwhile wait for the new leader (`Node::propose`).
/// The operator named the target, so another voter winning the election instead is an error.
pub async fn transfer_leadership(app: &Node, target: u64) -> Result<(), String> {
    let metrics = app.raft_metrics();
    check_voter(app, target)?;
    match metrics.current_leader {
        Some(id) if id == target => Ok(()),
        Some(id) if id == app.node_id() => match hand_over(app, target).await? {
            leader if leader == target => Ok(()),
            leader => Err(format!(
                "node {leader} was elected before node {target} could take over (node {target}'s log was not \
                 written in time); ask again to move leadership to node {target}"
            )),
        },
        Some(id) => {
            let leader = metrics.membership_config.membership().get_node(&id).cloned().ok_or("leader unknown")?;
            app.peers
                .call(&leader.cluster_addr, "cluster/transfer-leader", &target, Duration::from_secs(10))
                .await
                .map_err(String::from)
        }
        None => Err("the cluster has no leader".into()),
    }
}

/// Moves leadership off this node, offering it to `preferred`, and returns the voter that leads
/// afterwards. For a node about to stop or be demoted any other leader will do: when the
/// preferred voter declines (its log not written within an election timeout), the transferring
/// leader has stopped its heartbeats and another voter's timer elects it.
pub async fn step_aside(app: &Node, preferred: u64) -> Result<u64, String> {
    check_voter(app, preferred)?;
    match app.raft_metrics().current_leader {
        Some(id) if id == app.node_id() => hand_over(app, preferred).await,
        Some(id) => Ok(id),
        None => Err("the cluster has no leader".into()),
    }
}

pub fn check_voter(app: &Node, id: u64) -> Result<(), String> {
    match app.raft_metrics().membership_config.membership().voter_ids().any(|v| v == id) {
        true => Ok(()),
        false => Err(format!("node {id} is not a voter of this cluster")),
    }
}

/// Run on the leader: offers leadership to `target` and waits until another voter leads.
async fn hand_over(app: &Node, target: u64) -> Result<u64, String> {
    // The target declines unless its log reaches ours within an election timeout; under write
    // load a lagging target would leave the cluster leaderless until timers fire. Hand over only
    // once it has caught up, so the handover itself takes one vote round.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while crate::ha::Progress::of(app).lag(target) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.raft.trigger().transfer_leader(target).await.map_err(|e| e.to_string())?;
    let me = app.node_id();
    let metrics = app
        .raft
        .wait(Some(Duration::from_secs(5)))
        .metrics(|m| m.current_leader.is_some_and(|leader| leader != me), "another voter leads")
        .await
        .map_err(|e| format!("no other voter took over from node {me}: {e}"))?;
    metrics.current_leader.ok_or_else(|| format!("no other voter took over from node {me}"))
}

/// Removes a node from the cluster (voter or non-voter), through the leader, and revokes its
/// certificates. Autopilot then fills a freed voting seat with a caught-up non-voter.
pub async fn remove_peer(app: &Node, target: u64) -> Result<(), String> {
    let metrics = app.raft_metrics();
    let membership = metrics.membership_config.membership().clone();
    if membership.get_node(&target).is_none() {
        // A removal whose revocation failed is finished by asking again.
        if app.state.read(|s| s.node_certs.contains_key(&target)) {
            return crate::peer::revoke_certificates(app, target).await;
        }
        return Err(format!("node {target} is not a member of this cluster"));
    }
    match metrics.current_leader {
        Some(id) if id == app.node_id() => {}
        Some(id) => {
            let leader = membership.get_node(&id).cloned().ok_or("leader unknown")?;
            return app
                .peers
                .call(&leader.cluster_addr, "cluster/remove-peer", &target, Duration::from_secs(10))
                .await
                .map_err(String::from);
        }
        None => return Err("the cluster has no leader".into()),
    }
    if target == app.node_id() {
        return Err("the leader cannot remove itself: transfer leadership first".into());
    }
    // Whatever the node audited must reach the replicated log before it leaves: afterwards it
    // has no leader to ship to. A dead node cannot drain; its spool keeps the events.
    let node = membership.get_node(&target).cloned().expect("checked above");
    let drained = app.peers.call::<_, ()>(&node.cluster_addr, "cluster/leave", &true, LEAVE_LIMIT).await;
    if let Err(e) = &drained {
        tracing::warn!(node = target, error = %e, "removing a node that could not ship its audit events; they stay in its spool");
    }
    let change = if membership.voter_ids().any(|v| v == target) {
        ChangeMembers::RemoveVoters(BTreeSet::from([target]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([target]))
    };
    if let Err(e) = app.raft.change_membership(change, false).await {
        // Still a member: let it serve again (and drop its REMOVED marker), even if it could not
        // ship its audit events: it was told to leave all the same.
        let _ = app.peers.call::<_, ()>(&node.cluster_addr, "cluster/leave", &false, LEAVE_LIMIT).await;
        return Err(e.to_string());
    }
    tracing::info!(node = target, "node removed from the cluster");
    revoke_after_removal(app, target).await?;
    autopilot_step(app).await;
    Ok(())
}

/// Revokes a removed node's certificates, retrying for a while: the node is already out of the
/// membership, so giving up at the first leaderless moment would leave its certificate good for
/// joining again.
async fn revoke_after_removal(app: &Node, target: u64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + LEAVE_LIMIT;
    loop {
        match crate::peer::revoke_certificates(app, target).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "node {target} was removed, but its certificates could not be revoked ({e}); \
                     run remove-peer again"
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// How long a node being removed may take to ship its audit events.
const LEAVE_LIMIT: Duration = Duration::from_secs(15);

/// The side of a node being removed: with `leaving`, stop taking client requests, wait for the
/// ones in progress, and ship every audit event; without it, serve again (the removal failed).
pub async fn leave(app: &Node, leaving: bool) -> Result<(), String> {
    *app.leaving.write().await = leaving;
    if !leaving {
        crate::peer::unmark_removed(app);
        return Ok(());
    }
    crate::peer::mark_removed(app, "the leader is removing this node from the cluster");
    tracing::info!("leaving the cluster: refusing client requests and shipping audit events");
    let deadline = tokio::time::Instant::now() + LEAVE_LIMIT - Duration::from_secs(1);
    loop {
        match crate::audit_shipping::ship_audit_batch(app).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("could not ship this node's audit events: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One round of autopilot, on the leader: promote a caught-up non-voter while voters are below
/// `max_voters`; retire a voter unreachable past `dead_server_threshold` when a non-voter can
/// take its seat.
pub async fn autopilot_step(app: &Node) {
    if !app.is_leader() {
        return;
    }
    let progress = crate::ha::Progress::of(app);
    let voters = &progress.voters;
    let timeout = app.config.raft.election_timeout_ms;
    let caught_up = |id: u64| progress.lag(id) <= 100 && progress.contact_ms(id).is_some_and(|ms| ms <= timeout);
    let held_back = held_back(app);
    let candidate = progress
        .membership
        .nodes()
        .map(|(id, _)| *id)
        .find(|id| !voters.contains(id) && !held_back.contains(id) && caught_up(*id));
    let Some(candidate) = candidate else { return };
    let change = if voters.len() < app.config.raft.max_voters {
        ChangeMembers::AddVoterIds(BTreeSet::from([candidate]))
    } else {
        let dead = voters.iter().copied().find(|id| {
            *id != app.node_id()
                && progress.contact_ms(*id).is_some_and(|ms| ms > app.config.raft.dead_server_threshold_ms)
        });
        match dead {
            Some(dead) => {
                tracing::warn!(node = dead, "autopilot: retiring a voter unreachable past dead_server_threshold");
                ChangeMembers::RemoveVoters(BTreeSet::from([dead]))
            }
            None => return,
        }
    };
    match app.raft.change_membership(change, false).await {
        Ok(_) => tracing::info!(node = candidate, "autopilot: membership updated"),
        Err(e) => tracing::debug!(error = %e, "autopilot: change deferred"),
    }
}

/// Non-voters that must not get a vote: deactivated ones, and those this leader is resyncing.
fn held_back(app: &Node) -> BTreeSet<u64> {
    let mut nodes = app.state.read(|s| s.inactive_nodes.clone());
    nodes.extend(app.resyncing.lock().expect("resyncing lock").iter().copied());
    nodes
}

/// The leader's autopilot loop.
pub async fn autopilot(app: Arc<Node>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        autopilot_step(&app).await;
    }
}
