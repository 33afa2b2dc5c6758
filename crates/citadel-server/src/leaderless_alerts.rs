//! Alerts a node raises and sends itself in settled read-only mode ([`Node::settled_read_only`]:
//! no leader for `raft.leader_wait_ms`, longer than an election, so a failover raises none, and
//! counted from the last resume, so a stall of the machine raises none) (§11.2): `CitadelNoLeader`
//! (labelled with the cluster only, so every node's copy has the same fingerprint and a
//! receiver merges them) and `CitadelReadOnly` (labelled with this node).
//!
//! Without a leader nothing can be committed, so these live in a small outbox in this node's
//! memory, with the same per-sink acknowledgements and backoff as the replicated one. When a
//! leader is back they are resolved, the resolved notices are sent the same way, and an alert
//! every sink has acknowledged as resolved is forgotten. A restart in between loses only this
//! node's copy: the other nodes without a leader send theirs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_core::alerts::{fingerprint, Alert};

use crate::alerts::Delivery;
use crate::node::Node;

/// How often a node looks at whether it has a leader, and sends what it owes.
const POLL: Duration = Duration::from_millis(250);
/// A node that just started has heard from no leader yet: it judges only once it has had one,
/// or after this long (as the event stream does).
const START_GRACE: Duration = Duration::from_secs(2);

/// This node's own outbox and its delivery progress.
#[derive(Default)]
pub struct Local {
    alerts: Mutex<BTreeMap<String, Alert>>,
    delivery: Delivery,
}

impl Local {
    fn outbox(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Alert>> {
        self.alerts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The alerts this node holds now (for `GET sys/alerts` on a node without a leader).
    pub fn snapshot(&self) -> BTreeMap<String, Alert> {
        self.outbox().clone()
    }
}

fn leaderless_alert(cluster: &str, name: &str, node: Option<u64>, summary: String, now: u64) -> Alert {
    let mut labels = BTreeMap::from([
        ("alertname".to_string(), name.to_string()),
        ("severity".to_string(), "critical".to_string()),
        ("cluster".to_string(), cluster.to_string()),
    ]);
    if let Some(node) = node {
        labels.insert("node".into(), node.to_string());
    }
    let description = "Writes fail; reads are served from each node's own copy. Bring a majority of voters back \
                       (docs/OPERATIONS.md, losing a majority).";
    let annotations =
        BTreeMap::from([("summary".to_string(), summary), ("description".to_string(), description.to_string())]);
    Alert { labels, annotations, starts_at: now, ends_at: None, revision: 1, delivered: BTreeMap::new() }
}

/// What this node should have firing now: both alerts while it is in read-only mode.
fn wanted(cluster: &str, me: u64, read_only: bool, now: u64) -> Vec<Alert> {
    if !read_only {
        return Vec::new();
    }
    vec![
        leaderless_alert(cluster, "CitadelNoLeader", None, "No leader: the cluster cannot write".into(), now),
        leaderless_alert(cluster, "CitadelReadOnly", Some(me), format!("Node {me} is in read-only mode"), now),
    ]
}

/// Fires what is wanted and not firing, resolves what fires and is not wanted, and forgets
/// what every sink has been told is resolved.
fn reconcile(outbox: &mut BTreeMap<String, Alert>, wanted: Vec<Alert>, sinks: &[String], now: u64) {
    let wanted: BTreeMap<String, Alert> = wanted.into_iter().map(|a| (fingerprint(&a.labels), a)).collect();
    for (key, alert) in outbox.iter_mut() {
        if alert.is_firing() && !wanted.contains_key(key) {
            alert.ends_at = Some(now);
            alert.revision += 1;
        }
    }
    for (key, alert) in wanted {
        let firing = outbox.get(&key).is_some_and(Alert::is_firing);
        if !firing {
            let revision = outbox.get(&key).map_or(1, |a| a.revision + 1);
            outbox.insert(key, Alert { revision, ..alert });
        }
    }
    forget_delivered(outbox, sinks);
}

/// Forgets resolved alerts every sink has been told of.
fn forget_delivered(outbox: &mut BTreeMap<String, Alert>, sinks: &[String]) {
    outbox.retain(|_, a| a.is_firing() || sinks.iter().any(|s| a.pending_for(s)));
}

/// Runs for as long as the node does.
pub async fn watch(app: Arc<Node>) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = String::new();
    let mut had_leader = false;
    loop {
        poll.tick().await;
        had_leader |= app.raft_metrics().current_leader.is_some();
        let settled = had_leader || app.started.elapsed() > START_GRACE;
        let now = crate::ids::now_ms();
        let (initialized, cluster, sinks) = app.state.read(|s| {
            let cluster = s.cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default();
            (s.is_initialized(), cluster, s.alerts.sinks.clone())
        });
        if !initialized {
            continue;
        }
        let names: Vec<String> = sinks.keys().cloned().collect();
        let snapshot = {
            let mut outbox = app.leaderless_alerts.outbox();
            // Settled read-only mode (no leader for `raft.leader_wait_ms`): the survivors of an
            // ordinary failover are without a leader for a moment too, and must not page anyone.
            // A removed node has no leader for good, and says why elsewhere: it resolves its own.
            let removed = crate::peer::is_removed(&app);
            let settled_read_only = app.settled_read_only();
            // Read-only but not settled (just entered, or just resumed from a stall in an
            // outage): what fires keeps firing, and nothing new fires yet.
            if removed || settled_read_only || !app.read_only() {
                let read_only = settled && settled_read_only && !removed;
                reconcile(&mut outbox, wanted(&cluster, app.node_id(), read_only, now), &names, now);
            }
            outbox.clone()
        };
        if snapshot.is_empty() {
            continue;
        }
        match app.leaderless_alerts.delivery.round(&app, &sinks, &snapshot).await {
            Ok(Some(delivered)) => {
                let mut outbox = app.leaderless_alerts.outbox();
                for (key, revision) in delivered.acks {
                    if let Some(alert) = outbox.get_mut(&key) {
                        let acked = alert.delivered.entry(delivered.sink.clone()).or_insert(0);
                        *acked = (*acked).max(revision);
                    }
                }
                forget_delivered(&mut outbox, &names);
                reported.clear();
            }
            Ok(None) => {}
            Err(e) => {
                if e != reported {
                    tracing::warn!(error = %e, "cannot send this node's own alerts (it has no leader)");
                    reported = e;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_a_leader_fires_both_alerts_and_resolves_them_when_a_leader_returns() {
        let sinks = vec!["hook".to_string()];
        let mut outbox = BTreeMap::new();
        reconcile(&mut outbox, wanted("prod", 2, true, 10), &sinks, 10);
        assert_eq!(outbox.len(), 2);
        assert!(outbox.values().all(|a| a.is_firing() && a.pending_for("hook")));
        let no_leader = outbox.values().find(|a| a.name() == "CitadelNoLeader").unwrap();
        assert!(!no_leader.labels.contains_key("node"), "one fingerprint for every node's copy");
        let before = outbox.clone();
        reconcile(&mut outbox, wanted("prod", 2, true, 20), &sinks, 20);
        assert_eq!(outbox, before, "still read-only: nothing changes");
        for alert in outbox.values_mut() {
            alert.delivered.insert("hook".into(), alert.revision);
        }
        reconcile(&mut outbox, wanted("prod", 2, false, 30), &sinks, 30);
        assert!(outbox.values().all(|a| a.ends_at == Some(30) && a.pending_for("hook")), "resolved notices owed");
        for alert in outbox.values_mut() {
            alert.delivered.insert("hook".into(), alert.revision);
        }
        reconcile(&mut outbox, Vec::new(), &sinks, 40);
        assert!(outbox.is_empty(), "forgotten once every sink was told");
    }
}
