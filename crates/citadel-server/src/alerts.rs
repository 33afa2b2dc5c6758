//! Alerts (§11.2) on the leader: which alerts the cluster's condition calls for, and their
//! delivery to the sinks. The outbox itself is replicated state (`citadel_core::alerts`).
//!
//! Two leader-only jobs (`jobs.rs`):
//! - `alerts` looks at the cluster every `[jobs] alerts_ms` and commits the alerts that start or
//!   stop firing ([`evaluate`] decides, from an [`Observation`], with no I/O);
//! - `alert_delivery` sends a sink what it has not acknowledged, then commits the
//!   acknowledgement. A send that fails backs off (per sink, in memory); a new leader starts
//!   from the replicated acknowledgements and sends again what was not acknowledged, so a
//!   receiver may get a notice twice, never zero times.
//!
//! `CitadelNoLeader` and `CitadelReadOnly` cannot wait for a leader: a node without one raises
//! and sends them itself (`leaderless_alerts.rs`). The wire protocols are in `alert_sinks.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use citadel_core::alerts::{fingerprint, Alert, Firing, Sink};
use citadel_core::command::Command;
use citadel_core::time::rfc3339;
use citadel_core::UnixMillis;
use serde_json::{json, Value};

use crate::node::Node;

/// `CitadelLeaderChanged` resolves itself this long after the change.
pub const LEADER_CHANGED_MS: UnixMillis = 10 * 60 * 1000;
/// Earlier leaders' `CitadelLeaderChanged` alerts kept firing beside the current one.
const LEADER_CHANGES_KEPT: usize = 3;
/// `CitadelLeaderFlapping`: this many changes within `FLAPPING_WINDOW_MS`.
pub const FLAPPING_CHANGES: usize = 3;
pub const FLAPPING_WINDOW_MS: UnixMillis = 15 * 60 * 1000;
/// `CitadelCertificateExpiring`: a member's newest certificate expires within this.
pub const CERT_WARNING_MS: UnixMillis = 7 * 86_400_000;
/// `CitadelAuditBacklog`: a member's spool holds more events than this not yet replicated.
pub const AUDIT_BACKLOG: u64 = 10_000;
/// How long the members' statuses are reused before the alerts job asks again (each answer
/// counts the member's sessions).
const STATUS_REFRESH: Duration = Duration::from_secs(2);
/// How long the alerts job waits for one member's status.
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);
/// Alerts one send carries at most.
pub(crate) const BATCH: usize = 64;
/// An Alertmanager forgets a firing alert it is not told about again (its `resolve_timeout`):
/// firing alerts are sent again this often, each valid for `AM_VALIDITY`.
const AM_RESEND: Duration = Duration::from_secs(60);
const AM_VALIDITY_MS: UnixMillis = 4 * 60 * 1000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the leader sees when it looks.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub now: UnixMillis,
    pub cluster: String,
    pub me: u64,
    /// The term this node leads.
    pub term: u64,
    /// When this node became leader (Unix ms).
    pub leading_since: UnixMillis,
    /// Silence after which a member is unreachable; a new leader waits as long before it judges
    /// anyone (it has heard nobody yet).
    pub unreachable_ms: u64,
    /// How long this process has run since it last resumed from a stall (`stall.rs`): a leader
    /// that was stopped waits as long as a new one before it judges anyone.
    pub running_ms: u64,
    pub members: Vec<Member>,
    pub quorum: usize,
    /// Leader changes within the flapping window.
    pub recent_leader_changes: usize,
    /// (configuration, consecutive errors, last error).
    pub snapshot_errors: Vec<(String, u32, String)>,
    /// (member, when its newest certificate expires).
    pub certificates: Vec<(u64, UnixMillis)>,
    /// Alerts firing now (from the outbox).
    pub firing: Vec<Alert>,
    /// The members that answered, this node included.
    pub statuses: Vec<MemberStatus>,
}

/// What a member says of itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub sealed: bool,
    pub audit_backlog: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Member {
    pub id: u64,
    pub voter: bool,
    /// Since the leader last heard from it (`None`: never).
    pub contact_ms: Option<u64>,
    pub lag: u64,
}

/// The members' statuses as last asked, reused for `STATUS_REFRESH`.
#[derive(Default)]
pub struct StatusCache(Mutex<Option<(Instant, Vec<MemberStatus>)>>);

impl StatusCache {
    /// A member that does not answer keeps its last known status: a sealed node that also went
    /// down is still sealed, and a slow one does not flap its alerts.
    async fn get(&self, app: &Node) -> Vec<MemberStatus> {
        let previous = match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some((at, statuses)) if at.elapsed() < STATUS_REFRESH => return statuses.clone(),
            Some((_, statuses)) => statuses.clone(),
            None => Vec::new(),
        };
        let me = app.node_status();
        let members: Vec<_> =
            app.raft_metrics().membership_config.membership().nodes().map(|(id, n)| (*id, n.clone())).collect();
        let ids: Vec<u64> = members.iter().map(|(id, _)| *id).collect();
        let asks = members.into_iter().filter(|(id, _)| *id != me.node_id).map(|(_, node)| async move {
            app.peers
                .call::<_, crate::cluster::NodeStatus>(&node.cluster_addr, "cluster/status", &(), STATUS_TIMEOUT)
                .await
                .ok()
        });
        let status = |s: crate::cluster::NodeStatus| MemberStatus {
            id: s.node_id,
            sealed: s.sealed,
            audit_backlog: s.audit_backlog,
        };
        let mut statuses: Vec<MemberStatus> =
            futures::future::join_all(asks).await.into_iter().flatten().map(status).collect();
        statuses.push(status(me));
        for old in previous {
            if ids.contains(&old.id) && !statuses.iter().any(|s| s.id == old.id) {
                statuses.push(old);
            }
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), statuses.clone()));
        statuses
    }
}

impl Observation {
    pub async fn of(app: &Node) -> Observation {
        let statuses = app.member_statuses.get(app).await;
        let now = crate::ids::now_ms();
        let progress = crate::ha::Progress::of(app);
        let me = app.node_id();
        let members = progress
            .membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != me)
            .map(|id| Member {
                id,
                voter: progress.voters.contains(&id),
                contact_ms: progress.contact_ms(id),
                lag: progress.lag(id),
            })
            .collect();
        let (cluster, recent, snapshot_errors, certificates, firing) = app.state.read(|s| {
            let cluster = s.cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default();
            let recent = s.alerts.leader_changes_since(now.saturating_sub(FLAPPING_WINDOW_MS));
            let snapshots = s
                .snapshot_auto
                .iter()
                .map(|(n, a)| (n.clone(), a.status.consecutive_errors, a.status.last_snapshot_error.clone()))
                .collect();
            let certs = s.node_certs.iter().filter_map(|(id, c)| c.values().max().map(|t| (*id, *t))).collect();
            let firing = s.alerts.alerts.values().filter(|a| a.is_firing()).cloned().collect();
            (cluster, recent, snapshots, certs, firing)
        });
        Observation {
            now,
            cluster,
            me,
            term: app.raft_metrics().current_term,
            // Not recorded yet (the job saw the election first): it is happening now.
            leading_since: Some(app.active_since.load(std::sync::atomic::Ordering::Relaxed))
                .filter(|since| *since > 0)
                .unwrap_or(now),
            unreachable_ms: crate::events::unreachable_after(app).as_millis() as u64,
            running_ms: app.stalls.running_since().elapsed().as_millis() as u64,
            members,
            quorum: crate::ha::quorum(progress.voters.len()),
            recent_leader_changes: recent,
            snapshot_errors,
            certificates,
            firing,
            statuses,
        }
    }
}

fn alert(o: &Observation, name: &str, severity: &str, node: Option<u64>, extra: &[(&str, &str)]) -> Firing {
    let mut labels = BTreeMap::from([
        ("alertname".to_string(), name.to_string()),
        ("severity".to_string(), severity.to_string()),
        ("cluster".to_string(), o.cluster.clone()),
    ]);
    if let Some(node) = node {
        labels.insert("node".into(), node.to_string());
    }
    for (k, v) in extra {
        labels.insert(k.to_string(), v.to_string());
    }
    Firing { labels, annotations: BTreeMap::new(), starts_at: o.now }
}

fn annotate(mut firing: Firing, summary: String, description: &str) -> Firing {
    firing.annotations.insert("summary".into(), summary);
    firing.annotations.insert("description".into(), description.into());
    firing
}

/// The alerts about members that a leader raises only once it has heard from them for a while.
const JUDGED_ALERTS: [&str; 3] = ["CitadelNodeUnreachable", "CitadelNodeLagging", "CitadelQuorumDegraded"];

/// The alerts the cluster's condition calls for now. Pure: unit-tested without a cluster.
pub fn evaluate(o: &Observation) -> Vec<Firing> {
    let mut out = Vec::new();
    let judged = o.now.saturating_sub(o.leading_since) >= o.unreachable_ms && o.running_ms >= o.unreachable_ms;
    // One alert per election (its term is a label): a node elected again within ten minutes
    // is a new change, and is announced.
    let term = o.term.to_string();
    let changed = annotate(
        Firing {
            starts_at: o.leading_since,
            ..alert(o, "CitadelLeaderChanged", "info", Some(o.me), &[("term", &term)])
        },
        format!("Node {} became the leader in term {}", o.me, o.term),
        "A new leader was elected (a failover, a transfer or a restart). Resolves itself after 10 minutes.",
    );
    if o.now.saturating_sub(o.leading_since) < LEADER_CHANGED_MS {
        out.push(changed);
    }
    // An earlier leader's change keeps firing for its ten minutes, the newest few only: a
    // flapping cluster is one `CitadelLeaderFlapping`, not hundreds of changes.
    let mut earlier: Vec<&Alert> = o
        .firing
        .iter()
        .filter(|a| a.name() == "CitadelLeaderChanged" && o.now.saturating_sub(a.starts_at) < LEADER_CHANGED_MS)
        .collect();
    earlier.sort_by_key(|a| std::cmp::Reverse(a.starts_at));
    out.extend(earlier.into_iter().take(LEADER_CHANGES_KEPT).map(|a| Firing {
        labels: a.labels.clone(),
        annotations: a.annotations.clone(),
        starts_at: a.starts_at,
    }));
    if o.recent_leader_changes >= FLAPPING_CHANGES {
        out.push(annotate(
            alert(o, "CitadelLeaderFlapping", "warning", None, &[]),
            format!("{} leader changes in 15 minutes", o.recent_leader_changes),
            "Look for a flapping network, an overloaded node or a disk that stalls.",
        ));
    }
    // A condition near its threshold must not fire and resolve on every look: once firing, an
    // alert about lag or backlog resolves only under half its threshold.
    let fires = |name: &str, node: u64| {
        o.firing.iter().any(|a| a.name() == name && a.labels.get("node").is_some_and(|n| *n == node.to_string()))
    };
    let over = |value: u64, threshold: u64, firing: bool| value > if firing { threshold / 2 } else { threshold };
    if judged {
        let mut heard_voters = 1; // this leader
        let voters = 1 + o.members.iter().filter(|m| m.voter).count();
        for m in &o.members {
            let heard = m.contact_ms.is_some_and(|ms| ms <= o.unreachable_ms);
            if m.voter && heard {
                heard_voters += 1;
            }
            if !heard {
                out.push(annotate(
                    alert(o, "CitadelNodeUnreachable", "critical", Some(m.id), &[]),
                    format!("Node {} is unreachable", m.id),
                    "The leader has not heard from this member for several election timeouts.",
                ));
            } else if over(m.lag, crate::ha::LAG_ENTRIES, fires("CitadelNodeLagging", m.id)) {
                out.push(annotate(
                    alert(o, "CitadelNodeLagging", "warning", Some(m.id), &[]),
                    format!("Node {} is {} entries behind the leader", m.id, m.lag),
                    "It replicates, but slowly: check its disk and network.",
                ));
            }
        }
        // A cluster of one or two voters never tolerates a failure: nothing was lost.
        if voters >= 3 && heard_voters <= o.quorum {
            out.push(annotate(
                alert(o, "CitadelQuorumDegraded", "warning", None, &[]),
                "The cluster cannot lose another voter".into(),
                "The leader hears from just a quorum of voters: one more failure stops writes.",
            ));
        }
    } else {
        // Not judging yet (just elected, or just resumed from a stall): what fires about the
        // members keeps firing until this leader can judge, rather than resolving and firing
        // again a moment later.
        let held = o.firing.iter().filter(|a| JUDGED_ALERTS.contains(&a.name()));
        out.extend(held.map(|a| Firing {
            labels: a.labels.clone(),
            annotations: a.annotations.clone(),
            starts_at: a.starts_at,
        }));
    }
    for &MemberStatus { id: node, sealed, audit_backlog: backlog } in &o.statuses {
        if sealed {
            out.push(annotate(
                alert(o, "CitadelNodeSealed", "critical", Some(node), &[]),
                format!("Node {node} is sealed"),
                "A sealed node serves nothing until it is unsealed (citadel operator unseal).",
            ));
        }
        if over(backlog, AUDIT_BACKLOG, fires("CitadelAuditBacklog", node)) {
            out.push(annotate(
                alert(o, "CitadelAuditBacklog", "warning", Some(node), &[]),
                format!("Node {node} holds {backlog} audit events not yet replicated"),
                "Its audit spool is not draining into the replicated log.",
            ));
        }
    }
    for (name, errors, error) in &o.snapshot_errors {
        if *errors > 0 {
            out.push(annotate(
                alert(o, "CitadelSnapshotFailed", "warning", None, &[("snapshot", name)]),
                format!("Scheduled snapshot {name} failed {errors} time(s) in a row"),
                error,
            ));
        }
    }
    for (node, expires) in &o.certificates {
        if expires.saturating_sub(o.now) < CERT_WARNING_MS {
            out.push(annotate(
                alert(o, "CitadelCertificateExpiring", "warning", Some(*node), &[]),
                format!("Node {node}'s cluster certificate expires {}", rfc3339(*expires)),
                "Members renew through the leader before tls.renew_before_days; this one has not.",
            ));
        }
    }
    out
}

/// What to commit: alerts that start firing and fingerprints of those that stop.
pub fn changes(o: &Observation, wanted: Vec<Firing>) -> (Vec<Firing>, Vec<String>) {
    let wanted: BTreeMap<String, Firing> = wanted.into_iter().map(|f| (fingerprint(&f.labels), f)).collect();
    let firing: BTreeMap<String, &Alert> = o.firing.iter().map(|a| (fingerprint(&a.labels), a)).collect();
    let fire = wanted.iter().filter(|(k, _)| !firing.contains_key(*k)).map(|(_, f)| f.clone()).collect();
    let resolve = firing.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
    (fire, resolve)
}

/// A sink `[[alerts.sink]]` declares that the replicated state does not hold as declared.
fn configured_sink(app: &Node) -> Option<Command> {
    let declared = &app.config.alerts.sink;
    app.state.read(|s| {
        // Only a put `apply` would accept (16 sinks added through the API may leave no room): a
        // refused put, proposed again on every look, would be a rejected entry four times a second.
        declared
            .iter()
            .filter(|c| s.alerts.sinks.get(&c.name) != Some(&c.sink))
            .find(|c| s.alerts.clone().put_sink(c.name.clone(), c.sink.clone()).is_ok())
            .map(|c| Command::AlertSinkPut { name: c.name.clone(), sink: c.sink.clone() })
    })
}

/// The `alerts` job: commits what started or stopped firing, else puts a configured sink in
/// place.
pub async fn alerts_job(app: &Node) -> Result<Option<Command>, String> {
    let observation = Observation::of(app).await;
    let (mut fire, mut resolve) = changes(&observation, evaluate(&observation));
    if fire.is_empty() && resolve.is_empty() {
        return Ok(configured_sink(app));
    }
    fire.truncate(citadel_core::alerts::MAX_CHANGES / 2);
    resolve.truncate(citadel_core::alerts::MAX_CHANGES / 2);
    Ok(Some(Command::AlertsUpdate { fire, resolve, at: observation.now }))
}

/// This node's delivery progress per sink (in memory: a new leader starts afresh from the
/// replicated acknowledgements).
#[derive(Default)]
pub struct Delivery {
    sinks: Mutex<HashMap<String, SinkProgress>>,
}

#[derive(Clone, Debug, Default)]
pub struct SinkProgress {
    pub failures: u32,
    pub next_try: Option<Instant>,
    pub last_error: String,
    pub last_full_send: Option<Instant>,
    pub last_attempt: Option<Instant>,
}

impl Delivery {
    fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<String, SinkProgress>> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sink's last error as this node saw it (empty: none, or this node does not deliver).
    pub fn last_error(&self, sink: &str) -> String {
        self.progress().get(sink).map(|p| p.last_error.clone()).unwrap_or_default()
    }
}

/// What one delivery round achieved: the sink, and the (fingerprint, revision) it acknowledged.
pub struct Delivered {
    pub sink: String,
    pub acks: Vec<(String, u64)>,
}

impl Delivery {
    /// Sends one sink (the one waiting longest, not backing off) what `alerts` still owes it.
    /// `Ok(None)`: nothing to send.
    pub async fn round(
        &self,
        app: &Node,
        sinks: &BTreeMap<String, Sink>,
        alerts: &BTreeMap<String, Alert>,
    ) -> Result<Option<Delivered>, String> {
        let now = Instant::now();
        let chosen = {
            let mut progress = self.progress();
            progress.retain(|name, _| sinks.contains_key(name));
            sinks
                .iter()
                .filter_map(|(name, sink)| {
                    let p = progress.get(name).cloned().unwrap_or_default();
                    if p.next_try.is_some_and(|t| t > now) {
                        return None;
                    }
                    let resend = matches!(sink, Sink::Alertmanager { .. })
                        && p.last_full_send.is_none_or(|t| now.duration_since(t) >= AM_RESEND);
                    // A re-send to an Alertmanager covers every firing alert (at most
                    // `MAX_ALERTS`), or the ones past a batch would expire there.
                    let limit = if resend { citadel_core::alerts::MAX_ALERTS } else { BATCH };
                    let batch: Vec<(String, Alert)> = alerts
                        .iter()
                        .filter(|(_, a)| a.pending_for(name) || (resend && a.is_firing()))
                        .take(limit)
                        .map(|(k, a)| (k.clone(), a.clone()))
                        .collect();
                    (!batch.is_empty()).then(|| (p.last_attempt, name.clone(), sink.clone(), resend, batch))
                })
                .min_by_key(|(last, ..)| *last)
        };
        let Some((_, name, sink, resend, batch)) = chosen else { return Ok(None) };
        let sent = send(app, &name, &sink, &batch).await;
        let mut progress = self.progress();
        let p = progress.entry(name.clone()).or_default();
        p.last_attempt = Some(Instant::now());
        match sent {
            Ok(()) => {
                let last_full_send = if resend { Some(Instant::now()) } else { p.last_full_send };
                *p = SinkProgress { last_attempt: p.last_attempt, last_full_send, ..Default::default() };
                let acks =
                    batch.iter().filter(|(_, a)| a.pending_for(&name)).map(|(k, a)| (k.clone(), a.revision)).collect();
                Ok(Some(Delivered { sink: name, acks }))
            }
            Err(e) => {
                p.failures += 1;
                let backoff = (Duration::from_millis(200) * 2u32.saturating_pow(p.failures.min(8))).min(MAX_BACKOFF);
                p.next_try = Some(Instant::now() + backoff);
                p.last_error = e.clone();
                Err(format!("alert sink {name}: {e} (next try in {} ms)", backoff.as_millis()))
            }
        }
    }
}

/// The `alert_delivery` job: one sink's round, its acknowledgements committed.
pub async fn delivery_job(app: &Node) -> Result<Option<Command>, String> {
    // Every 100 ms: copy only what a round can send (firing, or owed to a sink), not the day of
    // resolved history the outbox keeps.
    let (sinks, alerts) = app.state.read(|s| {
        let sendable = |a: &&Alert| a.is_firing() || s.alerts.sinks.keys().any(|n| a.pending_for(n));
        let alerts: BTreeMap<String, Alert> =
            s.alerts.alerts.iter().filter(|(_, a)| sendable(a)).map(|(k, a)| (k.clone(), a.clone())).collect();
        (s.alerts.sinks.clone(), alerts)
    });
    if alerts.is_empty() {
        return Ok(None);
    }
    let delivered = app.alert_delivery.round(app, &sinks, &alerts).await?;
    Ok(delivered.filter(|d| !d.acks.is_empty()).map(|d| Command::AlertsDelivered { sink: d.sink, acks: d.acks }))
}

/// Alertmanager's zero time: what its payloads carry for "not ended".
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn generator_url(app: &Node) -> String {
    app.raft_metrics()
        .membership_config
        .membership()
        .get_node(&app.node_id())
        .map(|n| format!("{}/ui/", n.api_addr.trim_end_matches('/')))
        .unwrap_or_default()
}

/// Alertmanager's webhook payload (`"version": "4"`) for `batch`.
pub fn webhook_payload(receiver: &str, external_url: &str, batch: &[(String, Alert)]) -> Value {
    let status = if batch.iter().any(|(_, a)| a.is_firing()) { "firing" } else { "resolved" };
    let common = |pick: fn(&Alert) -> &BTreeMap<String, String>| {
        let mut common = batch.first().map(|(_, a)| pick(a).clone()).unwrap_or_default();
        common.retain(|k, v| batch.iter().all(|(_, a)| pick(a).get(k) == Some(v)));
        common
    };
    let alerts: Vec<Value> = batch
        .iter()
        .map(|(key, a)| {
            json!({
                "status": if a.is_firing() { "firing" } else { "resolved" },
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": rfc3339(a.starts_at),
                "endsAt": a.ends_at.map_or(ZERO_TIME.to_string(), rfc3339),
                "generatorURL": external_url,
                "fingerprint": key,
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{cluster=\"{}\"}}", common(|a| &a.labels).get("cluster").cloned().unwrap_or_default()),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {},
        "commonLabels": common(|a| &a.labels),
        "commonAnnotations": common(|a| &a.annotations),
        "externalURL": external_url,
        "alerts": alerts,
    })
}

/// Alertmanager's `POST /api/v2/alerts` body: a firing alert is valid for `AM_VALIDITY_MS`
/// (and sent again before that), a resolved one ends when it was resolved.
pub fn alertmanager_payload(external_url: &str, batch: &[(String, Alert)], now: UnixMillis) -> Value {
    Value::Array(
        batch
            .iter()
            .map(|(_, a)| {
                json!({
                    "labels": a.labels,
                    "annotations": a.annotations,
                    "startsAt": rfc3339(a.starts_at),
                    "endsAt": rfc3339(a.ends_at.unwrap_or(now + AM_VALIDITY_MS)),
                    "generatorURL": external_url,
                })
            })
            .collect(),
    )
}

/// Sends `batch` to `sink` by its protocol.
pub(crate) async fn send(app: &Node, name: &str, sink: &Sink, batch: &[(String, Alert)]) -> Result<(), String> {
    use crate::alert_sinks as wire;
    let external = generator_url(app);
    let hostname = format!("citadel-{}", app.node_id());
    match sink {
        Sink::Webhook { url, ca_file } => {
            wire::post_json(url, ca_file.as_deref(), &webhook_payload(name, &external, batch)).await
        }
        Sink::Alertmanager { url, ca_file } => {
            let url = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
            let body = alertmanager_payload(&external, batch, crate::ids::now_ms());
            wire::post_json(&url, ca_file.as_deref(), &body).await
        }
        Sink::Syslog { address, tls, ca_file } => {
            wire::send_syslog(address, *tls, ca_file.as_deref(), &hostname, batch).await
        }
        Sink::Email { smtp_host, smtp_port, from, to, starttls, ca_file } => {
            wire::send_email(smtp_host, *smtp_port, *starttls, ca_file.as_deref(), from, to, &hostname, batch).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> Observation {
        Observation {
            now: 1_000_000,
            cluster: "prod".into(),
            me: 1,
            leading_since: 1_000_000 - 5_000,
            unreachable_ms: 1_000,
            running_ms: 60_000,
            members: vec![
                Member { id: 2, voter: true, contact_ms: Some(10), lag: 0 },
                Member { id: 3, voter: true, contact_ms: Some(10), lag: 0 },
            ],
            quorum: 2,
            ..Observation::default()
        }
    }

    fn names(alerts: &[Firing]) -> Vec<String> {
        let mut names: Vec<String> = alerts
            .iter()
            .map(|a| format!("{}:{}", a.labels["alertname"], a.labels.get("node").map_or("", |n| n)))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_leader_announces_itself_and_a_healthy_cluster_raises_nothing_else() {
        let o = observation();
        assert_eq!(names(&evaluate(&o)), ["CitadelLeaderChanged:1"]);
        let settled = Observation { leading_since: o.now - LEADER_CHANGED_MS, ..o };
        assert!(evaluate(&settled).is_empty(), "the change resolves itself after ten minutes");
    }

    #[test]
    fn a_silent_voter_is_unreachable_and_leaves_the_quorum_degraded_only_after_the_grace_and_not_after_a_stall() {
        let mut o = observation();
        o.members[1].contact_ms = Some(5_000);
        assert_eq!(
            names(&evaluate(&o)),
            ["CitadelLeaderChanged:1", "CitadelNodeUnreachable:3", "CitadelQuorumDegraded:"]
        );
        let just_elected = Observation { leading_since: o.now - 100, ..o.clone() };
        assert_eq!(names(&evaluate(&just_elected)), ["CitadelLeaderChanged:1"], "nobody heard from yet");
        let just_resumed = Observation { running_ms: 100, ..o.clone() };
        assert_eq!(names(&evaluate(&just_resumed)), ["CitadelLeaderChanged:1"], "a stall is not silence");
        // What already fires keeps firing while the leader cannot judge: no resolve, no new fire.
        let firing: Vec<Alert> = evaluate(&o)
            .into_iter()
            .filter(|f| f.labels["alertname"] != "CitadelLeaderChanged")
            .map(|f| Alert { labels: f.labels, starts_at: 5, ..Alert::default() })
            .collect();
        let still_down = Observation { firing: firing.clone(), ..just_resumed.clone() };
        let held = evaluate(&still_down);
        assert_eq!(names(&held), ["CitadelLeaderChanged:1", "CitadelNodeUnreachable:3", "CitadelQuorumDegraded:"]);
        let (fire, resolve) = changes(&still_down, held);
        assert_eq!((fire.len(), resolve.len()), (1, 0), "only the leader change is new; nothing resolves");
        o.members[1].contact_ms = Some(10);
        o.members[1].lag = crate::ha::LAG_ENTRIES + 1;
        assert_eq!(names(&evaluate(&o)), ["CitadelLeaderChanged:1", "CitadelNodeLagging:3"]);
    }

    #[test]
    fn flapping_failed_snapshots_expiring_certificates_sealed_nodes_and_audit_backlogs_fire() {
        let mut o = observation();
        o.statuses = vec![
            MemberStatus { id: 1, sealed: false, audit_backlog: AUDIT_BACKLOG + 1 },
            MemberStatus { id: 2, sealed: true, audit_backlog: 0 },
            MemberStatus { id: 3, sealed: false, audit_backlog: 0 },
        ];
        o.leading_since = o.now - LEADER_CHANGED_MS;
        o.recent_leader_changes = FLAPPING_CHANGES;
        o.snapshot_errors = vec![("daily".into(), 2, "disk full".into()), ("hourly".into(), 0, String::new())];
        o.certificates = vec![(2, o.now + CERT_WARNING_MS - 1), (3, o.now + CERT_WARNING_MS + 1)];
        assert_eq!(
            names(&evaluate(&o)),
            [
                "CitadelAuditBacklog:1",
                "CitadelCertificateExpiring:2",
                "CitadelLeaderFlapping:",
                "CitadelNodeSealed:2",
                "CitadelSnapshotFailed:"
            ]
        );
    }

    #[test]
    fn changes_fire_what_is_new_resolve_what_stopped_and_keep_an_earlier_leaders_change_for_its_ten_minutes() {
        let mut o = observation();
        let old_change = Alert {
            labels: alert(&o, "CitadelLeaderChanged", "info", Some(2), &[]).labels,
            starts_at: o.now - 60_000,
            ..Alert::default()
        };
        let stale =
            Alert { labels: alert(&o, "CitadelNodeUnreachable", "critical", Some(3), &[]).labels, ..Alert::default() };
        o.firing = vec![old_change.clone(), stale.clone()];
        let (fire, resolve) = changes(&o, evaluate(&o));
        assert_eq!(names(&fire), ["CitadelLeaderChanged:1"]);
        assert_eq!(resolve, vec![fingerprint(&stale.labels)], "node 3 answers again; node 2's change stays");
    }

    #[test]
    fn payloads_have_alertmanagers_shapes() {
        let o = observation();
        let firing = Alert {
            labels: alert(&o, "CitadelNodeUnreachable", "critical", Some(3), &[]).labels,
            starts_at: 1_000,
            revision: 1,
            ..Alert::default()
        };
        let resolved = Alert { ends_at: Some(2_000), ..firing.clone() };
        let key = fingerprint(&firing.labels);
        let hook = webhook_payload("ops", "https://n1:8200/ui/", &[(key.clone(), firing.clone())]);
        assert_eq!(hook["version"], "4");
        assert_eq!(hook["status"], "firing");
        assert_eq!(hook["alerts"][0]["fingerprint"], key.as_str());
        assert_eq!(hook["alerts"][0]["endsAt"], ZERO_TIME);
        assert_eq!(hook["commonLabels"]["alertname"], "CitadelNodeUnreachable");
        let hook = webhook_payload("ops", "", &[(key.clone(), resolved.clone())]);
        assert_eq!(
            (hook["status"].as_str(), hook["alerts"][0]["endsAt"].as_str()),
            (Some("resolved"), Some("1970-01-01T00:00:02.000Z"))
        );
        let am = alertmanager_payload("", &[(key.clone(), firing)], 10_000);
        assert_eq!(am[0]["endsAt"], rfc3339(10_000 + AM_VALIDITY_MS));
        let am = alertmanager_payload("", &[(key, resolved)], 10_000);
        assert_eq!(am[0]["endsAt"], rfc3339(2_000));
    }
}
