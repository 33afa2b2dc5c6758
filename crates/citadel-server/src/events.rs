//! The node's typed event stream (§9.2): leader changes, nodes unreachable or back, read-only
//! mode, seal and unseal, membership changes and job results, as this node observes them.
//!
//! Events go out on a bounded broadcast channel (`[events] buffer`): a subscriber that falls
//! behind loses the oldest events and is told how many (never unbounded memory). `citadel dev`,
//! the console and alerts subscribe, over `GET sys/events` (`api/events.rs`). Events name ids,
//! terms and outcomes only, never a token, key or value.
//!
//! Producers: `watch` (Raft metrics, read-only detection, the leader's view of its followers,
//! and the seal manager's flag) and the job runner (`jobs.rs`). Events that change the cluster
//! are audited too (`kind = "cluster_event"`), by the node that leads when it sees them, so a
//! change is recorded once rather than once per node.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel_core::audit::AuditBody;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use crate::config::EventsConfig;
use crate::node::Node;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    /// A leader was elected (or re-elected) for `term`.
    LeaderChanged {
        term: u64,
        leader: u64,
    },
    /// The leader has not heard from member `id` for a while.
    NodeUnreachable {
        id: u64,
    },
    /// The leader hears from member `id` again.
    NodeBack {
        id: u64,
    },
    /// This node has had no leader for an election timeout: it serves reads from its replica.
    ReadOnlyEntered,
    ReadOnlyLeft,
    Sealed,
    Unsealed,
    MembershipChanged {
        voters: Vec<u64>,
        learners: Vec<u64>,
    },
    /// The leader carried out an operator's lifecycle action on member `id` (§10.1).
    Lifecycle {
        id: u64,
        action: String,
    },
    /// A scheduled snapshot (`name`) failed (§10.2).
    SnapshotFailed {
        name: String,
        error: String,
    },
    /// A leader-only job ran (`outcome`: `done`, `rejected(...)`, `failed: ...`).
    JobResult {
        job: String,
        term: u64,
        outcome: String,
    },
}

impl NodeEvent {
    /// The event's name, as in its `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            NodeEvent::LeaderChanged { .. } => "leader_changed",
            NodeEvent::NodeUnreachable { .. } => "node_unreachable",
            NodeEvent::NodeBack { .. } => "node_back",
            NodeEvent::ReadOnlyEntered => "read_only_entered",
            NodeEvent::ReadOnlyLeft => "read_only_left",
            NodeEvent::Sealed => "sealed",
            NodeEvent::Unsealed => "unsealed",
            NodeEvent::MembershipChanged { .. } => "membership_changed",
            NodeEvent::Lifecycle { .. } => "lifecycle",
            NodeEvent::SnapshotFailed { .. } => "snapshot_failed",
            NodeEvent::JobResult { .. } => "job_result",
        }
    }
}

/// An event as published: which node saw it, and when (its clock, Unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub time: u64,
    pub node: u64,
    #[serde(flatten)]
    pub event: NodeEvent,
}

/// The broadcast channel and the cap on its subscribers.
pub struct EventBus {
    node: u64,
    tx: broadcast::Sender<Published>,
    subscribers: Arc<Semaphore>,
}

/// A live subscription; its slot is freed when it is dropped.
pub struct Subscription {
    pub events: broadcast::Receiver<Published>,
    _slot: OwnedSemaphorePermit,
}

impl EventBus {
    pub fn new(node: u64, config: &EventsConfig) -> EventBus {
        EventBus {
            node,
            tx: broadcast::channel(config.buffer).0,
            subscribers: Arc::new(Semaphore::new(config.max_subscribers)),
        }
    }

    pub fn publish(&self, event: NodeEvent) {
        match &event {
            // Every run of every job: routine, so not at info.
            NodeEvent::JobResult { .. } => tracing::debug!(event = ?event, "node event"),
            _ => tracing::info!(event = ?event, "node event"),
        }
        // No subscriber is not an error: the event is simply not wanted.
        let _ = self.tx.send(Published { time: crate::ids::now_ms(), node: self.node, event });
    }

    /// A new subscriber, or `None` when `[events] max_subscribers` are already connected.
    pub fn subscribe(&self) -> Option<Subscription> {
        let slot = self.subscribers.clone().try_acquire_owned().ok()?;
        Some(Subscription { events: self.tx.subscribe(), _slot: slot })
    }
}

/// What the watcher saw at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Observation {
    leader: Option<u64>,
    term: u64,
    voters: BTreeSet<u64>,
    learners: BTreeSet<u64>,
    read_only: bool,
    sealed: bool,
    /// Members the leader cannot hear from; `None` when this node does not lead (it cannot know).
    unreachable: Option<BTreeSet<u64>>,
}

/// The events between two observations. Leader changes are announced once per (leader, term),
/// whatever the metrics showed in between (a candidate has no leader for a moment).
fn changes(before: &Observation, now: &Observation, announced: &mut Option<(u64, u64)>) -> Vec<NodeEvent> {
    let mut events = Vec::new();
    if let Some(leader) = now.leader {
        if *announced != Some((leader, now.term)) {
            *announced = Some((leader, now.term));
            events.push(NodeEvent::LeaderChanged { term: now.term, leader });
        }
    }
    if (&before.voters, &before.learners) != (&now.voters, &now.learners) {
        events.push(NodeEvent::MembershipChanged {
            voters: now.voters.iter().copied().collect(),
            learners: now.learners.iter().copied().collect(),
        });
    }
    if let (Some(was), Some(is)) = (&before.unreachable, &now.unreachable) {
        events.extend(is.difference(was).map(|id| NodeEvent::NodeUnreachable { id: *id }));
        events.extend(was.difference(is).map(|id| NodeEvent::NodeBack { id: *id }));
    }
    if before.read_only != now.read_only {
        events.push(if now.read_only { NodeEvent::ReadOnlyEntered } else { NodeEvent::ReadOnlyLeft });
    }
    if before.sealed != now.sealed {
        events.push(if now.sealed { NodeEvent::Sealed } else { NodeEvent::Unsealed });
    }
    events
}

/// How often the watcher looks at what has no change notification (read-only, reachability).
const POLL: Duration = Duration::from_millis(100);
/// A node just started has not heard from the leader yet; read-only is reported only after this
/// (or once it has had a leader), so every start does not announce read-only mode.
const START_GRACE: Duration = Duration::from_secs(2);

/// What the watcher remembers between observations.
struct Watcher {
    had_leader: bool,
    leading_since: Option<Instant>,
    /// The members it last judged unreachable, while it leads.
    unreachable: BTreeSet<u64>,
}

impl Watcher {
    fn observe(&mut self, app: &Node) -> Observation {
        // The regular look that lets every judgement tell a stall from silence (`stall.rs`).
        let running_since = app.stalls.running_since();
        let metrics = app.raft_metrics();
        let me = app.node_id();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners = membership.nodes().map(|(id, _)| *id).filter(|id| !voters.contains(id)).collect();
        self.had_leader |= metrics.current_leader.is_some();
        let leading = metrics.current_leader == Some(me);
        if !leading {
            self.leading_since = None;
        } else if self.leading_since.is_none() {
            self.leading_since = Some(Instant::now());
        }
        let settled = self.had_leader || app.started.elapsed() > START_GRACE;
        Observation {
            leader: metrics.current_leader,
            term: metrics.current_term,
            voters,
            learners,
            read_only: settled && app.read_only(),
            sealed: app.seal.is_sealed(),
            unreachable: leading.then(|| self.unreachable(app, running_since)),
        }
    }

    /// Members the leader has not heard from for the threshold. A new leader waits that long
    /// before judging: it has had no time to hear from anyone yet. One that resumed from a
    /// stall waits as long too, and meanwhile holds to what it last judged.
    fn unreachable(&mut self, app: &Node, running_since: Instant) -> BTreeSet<u64> {
        let threshold = unreachable_after(app);
        if self.leading_since.is_none_or(|since| since.elapsed() < threshold) {
            self.unreachable.clear();
            return BTreeSet::new();
        }
        if running_since.elapsed() < threshold {
            return self.unreachable.clone();
        }
        let progress = crate::ha::Progress::of(app);
        let me = app.node_id();
        self.unreachable = progress
            .membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != me)
            .filter(|id| progress.contact_ms(*id).is_none_or(|ms| ms > threshold.as_millis() as u64))
            .collect();
        self.unreachable.clone()
    }
}

/// Silence after which the leader calls a member unreachable: several election timeouts, so a
/// few late heartbeats on a loaded machine do not make the node flap.
pub(crate) fn unreachable_after(app: &Node) -> Duration {
    (4 * app.election_timeout()).max(Duration::from_secs(1))
}

/// Publishes what changes, for as long as the node runs.
///
/// It looks every `POLL` rather than at every change of Raft's metrics, which change with every
/// append on a busy leader: events come within `POLL`, at a fixed cost.
pub async fn watch(app: Arc<Node>) {
    let mut sealed = app.seal.subscribe();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watcher = Watcher { had_leader: false, leading_since: None, unreachable: BTreeSet::new() };
    let mut last = watcher.observe(&app);
    let mut announced = last.leader.map(|leader| (leader, last.term));
    loop {
        tokio::select! {
            changed = sealed.changed() => if changed.is_err() { return },
            _ = poll.tick() => {}
        }
        let now = watcher.observe(&app);
        for event in changes(&last, &now, &mut announced) {
            if matches!(event, NodeEvent::LeaderChanged { .. }) {
                app.metrics.observe_leader_change();
            }
            if should_audit(&app, &event, &now) {
                audit(&app, &event).await;
            }
            app.events.publish(event);
        }
        last = now;
    }
}

/// Leader and membership changes are audited by the node that leads: once per change, not
/// once per node.
fn should_audit(app: &Node, event: &NodeEvent, now: &Observation) -> bool {
    let leading = now.leader == Some(app.node_id());
    leading && matches!(event, NodeEvent::LeaderChanged { .. } | NodeEvent::MembershipChanged { .. })
}

async fn audit(app: &Node, event: &NodeEvent) {
    let detail = match event {
        NodeEvent::LeaderChanged { term, leader } => format!("term {term}, leader {leader}"),
        NodeEvent::MembershipChanged { voters, learners } => format!("voters {voters:?}, learners {learners:?}"),
        other => other.name().to_string(),
    };
    let body = AuditBody {
        time: crate::ids::now_ms(),
        // No request caused it: no request id, as for refusal summaries.
        kind: "cluster_event".into(),
        operation: event.name().into(),
        path: "sys/events".into(),
        node: app.node_id(),
        status: 200,
        detail,
        ..AuditBody::default()
    };
    // Nothing waits on this event to answer: a failed write is logged, as for refusal summaries.
    match app.audit.record(body).await {
        Ok(_) => app.metrics.observe_audit_event(),
        Err(e) => tracing::error!(error = %e, event = event.name(), "cannot write a cluster event to the audit spool"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(leader: Option<u64>, term: u64) -> Observation {
        Observation { leader, term, voters: BTreeSet::from([1, 2, 3]), ..Observation::default() }
    }

    #[test]
    fn a_leader_change_is_announced_once_per_leader_and_term() {
        let mut announced = Some((1, 3));
        let steps = [seen(Some(1), 3), seen(None, 4), seen(Some(2), 4), seen(Some(2), 4), seen(Some(2), 5)];
        let mut events = Vec::new();
        for pair in steps.windows(2) {
            events.extend(changes(&pair[0], &pair[1], &mut announced));
        }
        assert_eq!(
            events,
            vec![NodeEvent::LeaderChanged { term: 4, leader: 2 }, NodeEvent::LeaderChanged { term: 5, leader: 2 }]
        );
    }

    #[test]
    fn reachability_is_reported_only_while_leading() {
        let mut announced = None;
        let leading =
            |down: &[u64]| Observation { unreachable: Some(down.iter().copied().collect()), ..Observation::default() };
        assert_eq!(changes(&leading(&[]), &leading(&[3]), &mut announced), vec![NodeEvent::NodeUnreachable { id: 3 }]);
        assert_eq!(changes(&leading(&[3]), &leading(&[]), &mut announced), vec![NodeEvent::NodeBack { id: 3 }]);
        // Stepping down or taking over says nothing about the others.
        assert!(changes(&leading(&[3]), &Observation::default(), &mut announced).is_empty());
        assert!(changes(&Observation::default(), &leading(&[3]), &mut announced).is_empty());
    }

    #[test]
    fn seal_read_only_and_membership_changes_are_events() {
        let mut announced = None;
        let before = Observation::default();
        let after = Observation { read_only: true, sealed: true, learners: BTreeSet::from([4]), ..before.clone() };
        assert_eq!(
            changes(&before, &after, &mut announced),
            vec![
                NodeEvent::MembershipChanged { voters: vec![], learners: vec![4] },
                NodeEvent::ReadOnlyEntered,
                NodeEvent::Sealed
            ]
        );
    }

    #[test]
    fn events_serialize_tagged_with_their_type() {
        let line = Published { time: 5, node: 2, event: NodeEvent::LeaderChanged { term: 7, leader: 3 } };
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json, serde_json::json!({ "time": 5, "node": 2, "type": "leader_changed", "term": 7, "leader": 3 }));
        assert_eq!(serde_json::from_value::<Published>(json).unwrap(), line);
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_how_many_events_it_missed_and_subscribers_are_capped() {
        let bus = EventBus::new(1, &EventsConfig { buffer: 2, max_subscribers: 1, heartbeat_ms: 1000 });
        let mut sub = bus.subscribe().expect("first subscriber");
        assert!(bus.subscribe().is_none(), "beyond max_subscribers");
        for _ in 0..5 {
            bus.publish(NodeEvent::Sealed);
        }
        assert!(matches!(sub.events.recv().await, Err(broadcast::error::RecvError::Lagged(3))));
        drop(sub);
        assert!(bus.subscribe().is_some(), "a dropped subscription frees its slot");
    }
}
