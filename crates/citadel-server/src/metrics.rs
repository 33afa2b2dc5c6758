//! The node's metrics (§11.3), through `prometheus-client`, with etcd's and Vault's names where
//! they exist.
//!
//! Two kinds: what the node counts as it goes (requests, proposals, fsyncs, leader changes),
//! kept in the registry's atomics, and what it is (term, indexes, lag, read-only, sealed), read
//! from Raft and the state at scrape time by [`NodeGauges::read`]. Every label is bounded: a
//! route is its pattern in the route table, never the path a client sent; a method outside the
//! few the API serves is `other`; a follower is a member id.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::node::Node;

/// What a scrape answers with (OpenMetrics text, which Prometheus asks for first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: u64,
}

/// A scheduled snapshot configuration (at most 16, names checked when configured).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabel {
    name: String,
}

/// Latency buckets from 100 µs to ~6.5 s (doubling): an fsync, a commit and a request all fit.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: the per-follower gauges are cleared and refilled by each.
    scrape: Mutex<()>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    proposal_seconds: Histogram,
    proposals_failed: Counter,
    commit_seconds: Histogram,
    wal_fsync_seconds: Histogram,
    leader_changes: Counter,
    audit_events: Counter,
    has_leader: Gauge,
    is_leader: Gauge,
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    snapshot_index: Gauge,
    purged_index: Gauge,
    follower_lag: Family<NodeLabel, Gauge>,
    follower_contact: Family<NodeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Unlabelled, and present on the leader only (a follower does not know it).
    failure_tolerance: Family<Vec<(String, String)>, Gauge>,
    read_only: Gauge,
    sealed: Gauge,
    audit_backlog: Gauge,
    snapshot_errors: Family<ScheduleLabel, Gauge>,
    certificate_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("citadel"),
            scrape: Mutex::new(()),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            proposal_seconds: latency_histogram(),
            proposals_failed: Counter::default(),
            commit_seconds: latency_histogram(),
            wal_fsync_seconds: latency_histogram(),
            leader_changes: Counter::default(),
            audit_events: Counter::default(),
            has_leader: Gauge::default(),
            is_leader: Gauge::default(),
            term: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            purged_index: Gauge::default(),
            follower_lag: Family::default(),
            follower_contact: Family::default(),
            failure_tolerance: Family::default(),
            read_only: Gauge::default(),
            sealed: Gauge::default(),
            audit_backlog: Gauge::default(),
            snapshot_errors: Family::default(),
            certificate_expiry: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register("http_requests", "API requests by route pattern, method and status code", m.requests.clone());
        r.register(
            "http_request_duration_seconds",
            "API request latency by route pattern and method",
            m.request_seconds.clone(),
        );
        r.register(
            "raft_proposal_duration_seconds",
            "Time a request waited on consensus for a command, forwarding to the leader included",
            m.proposal_seconds.clone(),
        );
        r.register(
            "raft_proposals_failed",
            "Commands that did not commit (no leader, lost quorum, refused by the leader)",
            m.proposals_failed.clone(),
        );
        r.register(
            "raft_commit_duration_seconds",
            "On the leader, from proposing a command to its being applied",
            m.commit_seconds.clone(),
        );
        r.register(
            "disk_wal_fsync_duration_seconds",
            "From an append to the Raft log to the fsync that made it durable",
            m.wal_fsync_seconds.clone(),
        );
        r.register(
            "raft_leader_changes_seen",
            "Leaders this node has seen elected (etcd's leader_changes_seen_total)",
            m.leader_changes.clone(),
        );
        r.register("audit_events", "Audit events this node recorded", m.audit_events.clone());
        r.register("raft_has_leader", "1 if this node knows a leader", m.has_leader.clone());
        r.register("raft_is_leader", "1 if this node leads", m.is_leader.clone());
        r.register("raft_term", "Current Raft term", m.term.clone());
        r.register("raft_commit_index", "Highest log index this node knows committed", m.commit_index.clone());
        r.register("raft_applied_index", "Highest log index applied to this node's state", m.applied_index.clone());
        r.register("raft_last_log_index", "Last index in this node's log", m.last_log_index.clone());
        r.register("raft_snapshot_index", "Last log index covered by this node's snapshot", m.snapshot_index.clone());
        r.register("raft_purged_index", "Last log index removed by compaction", m.purged_index.clone());
        r.register(
            "raft_follower_lag_entries",
            "On the leader, entries each member is behind the leader's log",
            m.follower_lag.clone(),
        );
        r.register(
            "raft_follower_last_contact_seconds",
            "On the leader, seconds since each member last answered it (absent: never)",
            m.follower_contact.clone(),
        );
        r.register(
            "cluster_failure_tolerance",
            "On the leader, voters it hears from minus the quorum: how many more may fail",
            m.failure_tolerance.clone(),
        );
        r.register("read_only", "1 if this node is in read-only mode (no leader)", m.read_only.clone());
        r.register("sealed", "1 if this node is sealed", m.sealed.clone());
        r.register(
            "audit_spool_backlog_events",
            "Audit events in this node's spool not yet in the replicated log",
            m.audit_backlog.clone(),
        );
        r.register(
            "snapshot_auto_consecutive_errors",
            "Scheduled snapshot runs that failed in a row, by configuration (0: the last one worked)",
            m.snapshot_errors.clone(),
        );
        r.register(
            "node_certificate_expiry_timestamp_seconds",
            "When this node's cluster certificate expires (Unix seconds)",
            m.certificate_expiry.clone(),
        );
        m
    }

    /// Noted each time the node looks at its certificate for renewal.
    pub fn observe_certificate_expiry(&self, not_after_ms: u64) {
        self.certificate_expiry.set(i64::try_from(not_after_ms / 1000).unwrap_or(i64::MAX));
    }

    /// Counts an answered API request. `route` is the pattern that served it (`unmatched` when
    /// none did).
    pub fn observe_request(&self, route: &'static str, method: &str, status: u16, took: Duration) {
        let method = bounded_method(method);
        self.requests.get_or_create(&RequestLabels { route, method, code: status }).inc();
        self.request_seconds.get_or_create(&RouteLabels { route, method }).observe(took.as_secs_f64());
    }

    pub fn observe_proposal(&self, took: Duration, committed: bool) {
        self.proposal_seconds.observe(took.as_secs_f64());
        if !committed {
            self.proposals_failed.inc();
        }
    }

    pub fn observe_commit(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    pub fn observe_leader_change(&self) {
        self.leader_changes.inc();
    }

    pub fn observe_audit_event(&self) {
        self.audit_events.inc();
    }

    /// The registry as OpenMetrics text, after setting the gauges to `now`.
    pub fn render(&self, now: &NodeGauges) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let set = |gauge: &Gauge, value: u64| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(&self.has_leader, u64::from(now.has_leader));
        set(&self.is_leader, u64::from(now.is_leader));
        set(&self.term, now.term);
        set(&self.commit_index, now.commit_index);
        set(&self.applied_index, now.applied_index);
        set(&self.last_log_index, now.last_log_index);
        set(&self.snapshot_index, now.snapshot_index);
        set(&self.purged_index, now.purged_index);
        set(&self.read_only, u64::from(now.read_only));
        set(&self.sealed, u64::from(now.sealed));
        set(&self.audit_backlog, now.audit_backlog);
        self.failure_tolerance.clear();
        if let Some(tolerance) = now.failure_tolerance {
            self.failure_tolerance.get_or_create(&Vec::new()).set(tolerance);
        }
        // A member removed since the last scrape must not keep its series.
        self.follower_lag.clear();
        self.follower_contact.clear();
        for follower in &now.followers {
            let node = NodeLabel { node: follower.id };
            set(&self.follower_lag.get_or_create(&node), follower.lag);
            if let Some(ms) = follower.contact_ms {
                self.follower_contact.get_or_create(&node).set(ms as f64 / 1000.0);
            }
        }
        self.snapshot_errors.clear();
        for (name, errors) in &now.snapshot_errors {
            set(&self.snapshot_errors.get_or_create(&ScheduleLabel { name: name.clone() }), u64::from(*errors));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl citadel_storage::DiskObserver for Metrics {
    fn log_flushed(&self, took: Duration) {
        self.wal_fsync_seconds.observe(took.as_secs_f64());
    }
}

/// A client may send any method token; the label keeps the ones the API serves.
fn bounded_method(method: &str) -> &'static str {
    const SERVED: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "LIST", "HEAD"];
    SERVED.into_iter().find(|m| *m == method).unwrap_or("other")
}

/// What the node is at one moment: Raft's figures, the mode, the audit backlog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeGauges {
    pub has_leader: bool,
    pub is_leader: bool,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    /// On the leader only: the other members.
    pub followers: Vec<Follower>,
    /// On the leader only.
    pub failure_tolerance: Option<i64>,
    pub read_only: bool,
    pub sealed: bool,
    pub audit_backlog: u64,
    /// Each scheduled snapshot configuration's consecutive failures.
    pub snapshot_errors: Vec<(String, u32)>,
}

/// A member as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Follower {
    pub id: u64,
    /// Entries behind the leader's log.
    pub lag: u64,
    /// Since it last answered (`None`: never).
    pub contact_ms: Option<u64>,
}

impl NodeGauges {
    pub fn read(app: &Node) -> NodeGauges {
        let m = app.raft_metrics();
        let index = |l: &Option<citadel_storage::types::LogId>| l.as_ref().map_or(0, |l| l.index);
        let is_leader = m.current_leader == Some(app.node_id());
        let (followers, failure_tolerance) = if is_leader {
            let progress = crate::ha::Progress::of(app);
            let others = progress.membership.nodes().map(|(id, _)| *id).filter(|id| *id != app.node_id());
            let followers =
                others.map(|id| Follower { id, lag: progress.lag(id), contact_ms: progress.contact_ms(id) }).collect();
            let heard = |id: &u64| {
                *id == app.node_id()
                    || progress.contact_ms(*id).is_some_and(|ms| ms <= app.config.raft.election_timeout_ms)
            };
            let audible = progress.voters.iter().filter(|id| heard(id)).count() as i64;
            let quorum = crate::ha::quorum(progress.voters.len()) as i64;
            (followers, Some(audible - quorum))
        } else {
            (Vec::new(), None)
        };
        let snapshot_errors = app
            .state
            .read(|s| s.snapshot_auto.iter().map(|(name, a)| (name.clone(), a.status.consecutive_errors)).collect());
        NodeGauges {
            has_leader: m.current_leader.is_some(),
            is_leader,
            term: m.current_term,
            commit_index: index(&m.local_committed),
            applied_index: index(&m.last_applied),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: index(&m.snapshot),
            purged_index: index(&m.purged),
            followers,
            failure_tolerance,
            read_only: app.read_only(),
            sealed: app.seal.is_sealed(),
            audit_backlog: app.audit_backlog(),
            snapshot_errors,
        }
    }

    /// Vault's JSON format (`sys/metrics` without `format`): the gauges.
    pub fn to_json(&self) -> serde_json::Value {
        let mut gauges = vec![
            ("citadel_raft_has_leader", u64::from(self.has_leader)),
            ("citadel_raft_is_leader", u64::from(self.is_leader)),
            ("citadel_raft_term", self.term),
            ("citadel_raft_commit_index", self.commit_index),
            ("citadel_raft_applied_index", self.applied_index),
            ("citadel_raft_last_log_index", self.last_log_index),
            ("citadel_raft_snapshot_index", self.snapshot_index),
            ("citadel_raft_purged_index", self.purged_index),
            ("citadel_read_only", u64::from(self.read_only)),
            ("citadel_sealed", u64::from(self.sealed)),
            ("citadel_audit_spool_backlog_events", self.audit_backlog),
        ];
        if let Some(tolerance) = self.failure_tolerance {
            gauges.push(("citadel_cluster_failure_tolerance", tolerance.max(0) as u64));
        }
        let gauges: Vec<_> =
            gauges.into_iter().map(|(name, value)| serde_json::json!({ "Name": name, "Value": value })).collect();
        serde_json::json!({ "Gauges": gauges, "Counters": [], "Samples": [] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_listed_series_is_rendered_with_its_value() {
        let metrics = Metrics::new();
        metrics.observe_request("secret/data/*path", "GET", 200, Duration::from_millis(3));
        metrics.observe_proposal(Duration::from_millis(2), false);
        metrics.observe_commit(Duration::from_millis(1));
        metrics.observe_leader_change();
        citadel_storage::DiskObserver::log_flushed(&metrics, Duration::from_micros(300));
        let now = NodeGauges {
            has_leader: true,
            is_leader: true,
            term: 7,
            commit_index: 40,
            applied_index: 39,
            followers: vec![
                Follower { id: 2, lag: 5, contact_ms: Some(1500) },
                Follower { id: 3, lag: 0, contact_ms: None },
            ],
            failure_tolerance: Some(1),
            audit_backlog: 4,
            snapshot_errors: vec![("daily".into(), 2)],
            ..NodeGauges::default()
        };
        metrics.observe_certificate_expiry(1_900_000_000_500);
        let text = metrics.render(&now);
        for (series, value) in [
            ("citadel_raft_has_leader", 1.0),
            ("citadel_raft_term", 7.0),
            ("citadel_raft_commit_index", 40.0),
            ("citadel_raft_applied_index", 39.0),
            ("citadel_raft_leader_changes_seen_total", 1.0),
            ("citadel_raft_follower_lag_entries{node=\"2\"}", 5.0),
            ("citadel_raft_follower_lag_entries{node=\"3\"}", 0.0),
            ("citadel_raft_follower_last_contact_seconds{node=\"2\"}", 1.5),
            ("citadel_cluster_failure_tolerance{}", 1.0),
            ("citadel_read_only", 0.0),
            ("citadel_sealed", 0.0),
            ("citadel_audit_spool_backlog_events", 4.0),
            ("citadel_snapshot_auto_consecutive_errors{name=\"daily\"}", 2.0),
            ("citadel_node_certificate_expiry_timestamp_seconds", 1_900_000_000.0),
            ("citadel_raft_proposals_failed_total", 1.0),
            ("citadel_http_requests_total{route=\"secret/data/*path\",method=\"GET\",code=\"200\"}", 1.0),
            ("citadel_http_request_duration_seconds_count{route=\"secret/data/*path\",method=\"GET\"}", 1.0),
            ("citadel_raft_proposal_duration_seconds_count", 1.0),
            ("citadel_raft_commit_duration_seconds_count", 1.0),
            ("citadel_disk_wal_fsync_duration_seconds_count", 1.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with EOF");
    }

    #[test]
    fn a_removed_follower_loses_its_lag_series_and_unknown_methods_share_one_label() {
        let metrics = Metrics::new();
        let follower = Follower { id: 2, lag: 1, contact_ms: Some(5) };
        let leading = NodeGauges { followers: vec![follower], ..NodeGauges::default() };
        assert!(metrics.render(&leading).contains("node=\"2\""));
        let following = metrics.render(&NodeGauges::default());
        assert!(!following.contains("node=\"2\""));
        assert!(!following.contains("citadel_cluster_failure_tolerance{"), "a follower does not know it");
        for method in ["BREW", "PROPFIND", "X".repeat(100).as_str()] {
            metrics.observe_request("unmatched", method, 405, Duration::ZERO);
        }
        let text = metrics.render(&NodeGauges::default());
        let series = "citadel_http_requests_total{route=\"unmatched\",method=\"other\",code=\"405\"}";
        assert_eq!(sample(&text, series), Some(3.0), "{text}");
        assert!(!text.contains("BREW"));
    }
}
