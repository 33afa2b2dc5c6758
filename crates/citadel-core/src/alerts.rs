//! Alerts (§11.2) in the replicated state: the sinks they go to and an outbox of alerts with,
//! for each sink, the last revision it acknowledged. Delivery is at least once: the leader's
//! job sends what a sink has not acknowledged and commits the acknowledgement; a new leader
//! finds the outbox as it was and sends again whatever was not acknowledged.
//!
//! Alerts follow Prometheus Alertmanager's model: identity is the label set, hashed into the
//! same fingerprint Alertmanager computes, so a receiver merges the copies it gets from two
//! leaders (or from a node that sent one itself while it had no leader).
//!
//! Everything here is bounded: sinks, alerts kept (active and recently resolved), labels and
//! annotations, and the recent leader changes `CitadelLeaderFlapping` counts.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

pub const MAX_SINKS: usize = 16;
/// Active and resolved alerts kept; the oldest resolved ones go first.
pub const MAX_ALERTS: usize = 256;
/// Alerts one command may fire or resolve.
pub const MAX_CHANGES: usize = 64;
/// A resolved alert is kept this long, for `GET sys/alerts` and for sinks still to be told.
pub const RESOLVED_KEPT_MS: UnixMillis = 24 * 3600 * 1000;
/// Leader changes remembered for `CitadelLeaderFlapping`.
pub const MAX_LEADER_CHANGES: usize = 16;
pub const MAX_LABELS: usize = 16;
pub const MAX_LABEL_BYTES: usize = 256;
pub const MAX_ANNOTATION_BYTES: usize = 2048;
pub const MAX_NAME_BYTES: usize = 64;
pub const MAX_URL_BYTES: usize = 2048;

/// Where alerts go. Tagged by `type` as in `POST sys/alerts/sinks/:name`. A sink reached over
/// TLS names `ca_file`, the PEM of the CA that signed the receiver's certificate (on every
/// node: any may lead): a vault trusts the CAs it is told to, never the system's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Sink {
    /// Alertmanager's webhook receiver payload (`"version": "4"`), POSTed to `url`.
    Webhook {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
    },
    /// An Alertmanager: its `POST /api/v2/alerts` under `url`.
    Alertmanager {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
    },
    /// RFC 5424 messages over TCP with RFC 6587 octet counting, over TLS when `tls`.
    Syslog {
        address: String,
        #[serde(default)]
        tls: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
    },
    /// One mail per alert notice, through `smtp_host:smtp_port`, with STARTTLS unless
    /// `starttls` is false.
    Email {
        smtp_host: String,
        smtp_port: u16,
        from: String,
        to: Vec<String>,
        #[serde(default = "yes")]
        starttls: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
    },
}

fn yes() -> bool {
    true
}

/// The fields each sink type takes, `type` included (the API and the config refuse others).
pub const SINK_FIELDS: [(&str, &[&str]); 4] = [
    ("webhook", &["type", "url", "ca_file"]),
    ("alertmanager", &["type", "url", "ca_file"]),
    ("syslog", &["type", "address", "tls", "ca_file"]),
    ("email", &["type", "smtp_host", "smtp_port", "from", "to", "starttls", "ca_file"]),
];

/// Most recipients of an email sink.
pub const MAX_RECIPIENTS: usize = 10;
const MAX_ADDRESS_BYTES: usize = 254;
const MAX_PATH_BYTES: usize = 4096;

fn check_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// `host:port` with a port.
fn check_address(address: &str) -> bool {
    address.rsplit_once(':').is_some_and(|(host, port)| check_host(host) && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// A mailbox as SMTP sends it: no spaces, brackets or line breaks that could smuggle commands.
fn check_mailbox(mailbox: &str) -> bool {
    mailbox.len() <= MAX_ADDRESS_BYTES
        && mailbox.split_once('@').is_some_and(|(l, d)| !l.is_empty() && check_host(d))
        && !mailbox.chars().any(|c| c.is_whitespace() || c.is_control() || "<>,;\"".contains(c))
}

impl Sink {
    pub fn check(&self) -> Result<(), AlertError> {
        let ca_file = match self {
            Sink::Webhook { ca_file, .. }
            | Sink::Alertmanager { ca_file, .. }
            | Sink::Syslog { ca_file, .. }
            | Sink::Email { ca_file, .. } => ca_file,
        };
        let ca_ok = ca_file.as_ref().is_none_or(|p| p.starts_with('/') && p.len() <= MAX_PATH_BYTES);
        if !ca_ok {
            return Err(AlertError::BadCaFile);
        }
        let needs_ca = match self {
            Sink::Webhook { url, .. } | Sink::Alertmanager { url, .. } => {
                let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
                // User info in a URL is a password stored in plain text in the state and named in errors.
                let authority =
                    url.split_once("://").map_or("", |(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""));
                let bad = url.len() > MAX_URL_BYTES || url.chars().any(|c| c.is_whitespace() || c.is_control());
                if !scheme_ok || bad || authority.is_empty() || authority.contains('@') {
                    return Err(AlertError::BadUrl { max: MAX_URL_BYTES });
                }
                url.starts_with("https://")
            }
            Sink::Syslog { address, tls, .. } => {
                if !check_address(address) {
                    return Err(AlertError::BadAddress);
                }
                *tls
            }
            Sink::Email { smtp_host, smtp_port, from, to, starttls, .. } => {
                if !check_host(smtp_host) || *smtp_port == 0 {
                    return Err(AlertError::BadAddress);
                }
                if !check_mailbox(from)
                    || to.is_empty()
                    || to.len() > MAX_RECIPIENTS
                    || !to.iter().all(|t| check_mailbox(t))
                {
                    return Err(AlertError::BadMailbox { max: MAX_RECIPIENTS });
                }
                *starttls
            }
        };
        if needs_ca && ca_file.is_none() {
            return Err(AlertError::CaFileNeeded);
        }
        Ok(())
    }
}

/// One alert, in Alertmanager's shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: UnixMillis,
    /// When it was resolved; `None` while it fires.
    pub ends_at: Option<UnixMillis>,
    /// Raised by every change (fired, resolved); a sink is up to date when it acknowledged it.
    pub revision: u64,
    /// Sink name → the revision it acknowledged.
    pub delivered: BTreeMap<String, u64>,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }

    pub fn is_firing(&self) -> bool {
        self.ends_at.is_none()
    }

    pub fn pending_for(&self, sink: &str) -> bool {
        self.delivered.get(sink).is_none_or(|acked| *acked < self.revision)
    }
}

/// An alert to raise: its labels and annotations and when it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firing {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: UnixMillis,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alerts {
    pub sinks: BTreeMap<String, Sink>,
    /// By fingerprint.
    pub alerts: BTreeMap<String, Alert>,
    /// When leaders were elected, newest last (at most `MAX_LEADER_CHANGES`).
    pub leader_changes: VecDeque<UnixMillis>,
    next_revision: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AlertError {
    #[error("a sink name is 1 to {max} letters, digits, '-' or '_'")]
    BadName { max: usize },
    #[error("a sink url must be an http:// or https:// URL with a host and no user info, of at most {max} bytes")]
    BadUrl { max: usize },
    #[error("a sink address must be host:port (smtp_host a host name or address, smtp_port above 0)")]
    BadAddress,
    #[error("from and to must be plain mail addresses (user@host), with 1 to {max} recipients")]
    BadMailbox { max: usize },
    #[error("ca_file must be an absolute path to a PEM file")]
    BadCaFile,
    #[error(
        "a sink reached over TLS (https, tls, starttls) needs ca_file: the CA that signed the receiver's certificate"
    )]
    CaFileNeeded,
    #[error("at most {max} alert sinks; delete one first")]
    TooManySinks { max: usize },
    #[error("no alert sink named {0:?}")]
    NoSuchSink(String),
    #[error("an alert needs an alertname and at most {max_labels} labels of {max_label} bytes, annotations of {max_annotation} bytes")]
    BadAlert { max_labels: usize, max_label: usize, max_annotation: usize },
    #[error("at most {max} alerts may change in one command")]
    TooManyChanges { max: usize },
    #[error("the outbox holds {max} alerts that are still firing or not yet delivered; none can be added")]
    OutboxFull { max: usize },
}

fn check_name(name: &str) -> Result<(), AlertError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(()).ok_or(AlertError::BadName { max: MAX_NAME_BYTES })
}

fn check_alert(firing: &Firing) -> Result<(), AlertError> {
    let bad = || AlertError::BadAlert {
        max_labels: MAX_LABELS,
        max_label: MAX_LABEL_BYTES,
        max_annotation: MAX_ANNOTATION_BYTES,
    };
    let labels_ok = firing.labels.contains_key("alertname")
        && firing.labels.len() <= MAX_LABELS
        && firing.labels.iter().all(|(k, v)| k.len() <= MAX_LABEL_BYTES && v.len() <= MAX_LABEL_BYTES);
    let annotations_ok = firing.annotations.len() <= MAX_LABELS
        && firing.annotations.iter().all(|(k, v)| k.len() <= MAX_LABEL_BYTES && v.len() <= MAX_ANNOTATION_BYTES);
    (labels_ok && annotations_ok).then_some(()).ok_or_else(bad)
}

/// Alertmanager's fingerprint of a label set (`model.LabelSet.Fingerprint`): FNV-1a 64 over
/// the labels sorted by name, each name and value followed by the byte 255, as 16 hex digits.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    const OFFSET: u64 = 14_695_981_039_346_656_037;
    const PRIME: u64 = 1_099_511_628_211;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for (name, value) in labels {
        feed(name.as_bytes());
        feed(&[255]);
        feed(value.as_bytes());
        feed(&[255]);
    }
    format!("{hash:016x}")
}

impl Alerts {
    pub fn put_sink(&mut self, name: String, sink: Sink) -> Result<(), AlertError> {
        check_name(&name)?;
        sink.check()?;
        if !self.sinks.contains_key(&name) && self.sinks.len() >= MAX_SINKS {
            return Err(AlertError::TooManySinks { max: MAX_SINKS });
        }
        // A new sink starts from what fires now, not from the history; a changed one is sent
        // what fires again (its receiver may be another) and keeps the resolved notices owed.
        let new = !self.sinks.contains_key(&name);
        for alert in self.alerts.values_mut() {
            if alert.is_firing() {
                alert.delivered.remove(&name);
            } else if new {
                alert.delivered.insert(name.clone(), alert.revision);
            }
        }
        self.sinks.insert(name, sink);
        Ok(())
    }

    pub fn delete_sink(&mut self, name: &str) -> Result<(), AlertError> {
        self.sinks.remove(name).ok_or_else(|| AlertError::NoSuchSink(name.into()))?;
        for alert in self.alerts.values_mut() {
            alert.delivered.remove(name);
        }
        Ok(())
    }

    /// Fires and resolves alerts (the leader's `alerts` job) at `now`, all or nothing. Firing one
    /// that already fires changes nothing; resolving one that does not fire changes nothing.
    /// Resolves come first, so they make room; resolved alerts older than `RESOLVED_KEPT_MS`
    /// and delivered everywhere are forgotten.
    pub fn update(&mut self, fire: Vec<Firing>, resolve: Vec<String>, now: UnixMillis) -> Result<(), AlertError> {
        if fire.len() + resolve.len() > MAX_CHANGES {
            return Err(AlertError::TooManyChanges { max: MAX_CHANGES });
        }
        fire.iter().try_for_each(check_alert)?;
        // Bounded (`MAX_ALERTS`): a copy keeps a refused update from changing anything.
        let mut next = self.clone();
        next.forget_old(now);
        for key in resolve {
            if let Some(alert) = next.alerts.get_mut(&key).filter(|a| a.is_firing()) {
                next.next_revision += 1;
                alert.ends_at = Some(now);
                alert.revision = next.next_revision;
            }
        }
        for firing in fire {
            let key = fingerprint(&firing.labels);
            if next.alerts.get(&key).is_some_and(Alert::is_firing) {
                continue;
            }
            if !next.alerts.contains_key(&key) {
                while next.alerts.len() >= MAX_ALERTS {
                    if !next.forget_oldest_resolved() {
                        return Err(AlertError::OutboxFull { max: MAX_ALERTS });
                    }
                }
            }
            if firing.labels.get("alertname").is_some_and(|n| n == "CitadelLeaderChanged") {
                while next.leader_changes.len() >= MAX_LEADER_CHANGES {
                    next.leader_changes.pop_front();
                }
                next.leader_changes.push_back(firing.starts_at);
            }
            next.next_revision += 1;
            let alert = Alert {
                labels: firing.labels,
                annotations: firing.annotations,
                starts_at: firing.starts_at,
                ends_at: None,
                revision: next.next_revision,
                delivered: BTreeMap::new(),
            };
            next.alerts.insert(key, alert);
        }
        *self = next;
        Ok(())
    }

    /// A sink acknowledged these (fingerprint, revision) pairs. Unknown ones are ignored: the
    /// alert may have been forgotten meanwhile.
    pub fn delivered(&mut self, sink: &str, acks: &[(String, u64)]) -> Result<(), AlertError> {
        if !self.sinks.contains_key(sink) {
            return Err(AlertError::NoSuchSink(sink.into()));
        }
        if acks.len() > MAX_ALERTS {
            return Err(AlertError::TooManyChanges { max: MAX_ALERTS });
        }
        for (key, revision) in acks {
            if let Some(alert) = self.alerts.get_mut(key) {
                let acked = alert.delivered.entry(sink.to_string()).or_insert(0);
                *acked = (*acked).max((*revision).min(alert.revision));
            }
        }
        Ok(())
    }

    /// Leader changes at or after `since`.
    pub fn leader_changes_since(&self, since: UnixMillis) -> usize {
        self.leader_changes.iter().filter(|t| **t >= since).count()
    }

    fn forget_old(&mut self, now: UnixMillis) {
        let sinks: Vec<&String> = self.sinks.keys().collect();
        self.alerts.retain(|_, a| {
            let old = a.ends_at.is_some_and(|end| end.saturating_add(RESOLVED_KEPT_MS) < now);
            !(old && sinks.iter().all(|s| !a.pending_for(s)))
        });
    }

    /// Makes room: the oldest resolved alert every sink was told of, else the oldest resolved
    /// one (a sink that acknowledges nothing loses old resolved notices, never a firing alert).
    fn forget_oldest_resolved(&mut self) -> bool {
        let sinks: Vec<&String> = self.sinks.keys().collect();
        let oldest = self
            .alerts
            .iter()
            .filter(|(_, a)| !a.is_firing())
            .min_by_key(|(_, a)| (sinks.iter().any(|s| a.pending_for(s)), a.ends_at))
            .map(|(k, _)| k.clone());
        oldest.is_some_and(|key| self.alerts.remove(&key).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn firing(name: &str, node: &str, at: UnixMillis) -> Firing {
        Firing { labels: labels(&[("alertname", name), ("node", node)]), annotations: BTreeMap::new(), starts_at: at }
    }

    #[test]
    fn fingerprints_are_alertmanagers_fnv1a_over_sorted_labels() {
        // FNV-1a 64 of the empty input is its offset basis.
        assert_eq!(fingerprint(&BTreeMap::new()), "cbf29ce484222325");
        let a = labels(&[("alertname", "CitadelNodeUnreachable"), ("node", "2")]);
        let b = labels(&[("node", "2"), ("alertname", "CitadelNodeUnreachable")]);
        assert_eq!(fingerprint(&a), fingerprint(&b), "label order does not matter");
        assert_ne!(fingerprint(&a), fingerprint(&labels(&[("alertname", "CitadelNodeUnreachable"), ("node", "3")])));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(fingerprint(&labels(&[("ab", "c")])), fingerprint(&labels(&[("a", "bc")])));
    }

    #[test]
    fn an_alert_fires_once_resolves_once_and_is_pending_for_each_sink_until_acknowledged() {
        let mut alerts = Alerts::default();
        alerts.put_sink("ops".into(), Sink::Webhook { url: "http://127.0.0.1:9/hook".into(), ca_file: None }).unwrap();
        alerts.update(vec![firing("CitadelNodeUnreachable", "2", 10)], vec![], 10).unwrap();
        let key = fingerprint(&firing("CitadelNodeUnreachable", "2", 0).labels);
        let before = alerts.clone();
        alerts.update(vec![firing("CitadelNodeUnreachable", "2", 20)], vec![], 20).unwrap();
        assert_eq!(alerts, before, "firing what fires changes nothing");
        let revision = alerts.alerts[&key].revision;
        assert!(alerts.alerts[&key].pending_for("ops"));
        alerts.delivered("ops", &[(key.clone(), revision)]).unwrap();
        assert!(!alerts.alerts[&key].pending_for("ops"));
        alerts.update(vec![], vec![key.clone()], 30).unwrap();
        assert_eq!(alerts.alerts[&key].ends_at, Some(30));
        assert!(alerts.alerts[&key].pending_for("ops"), "the resolved notice is owed");
        // A late acknowledgement of the firing notice does not cover the resolved one.
        alerts.delivered("ops", &[(key.clone(), revision)]).unwrap();
        assert!(alerts.alerts[&key].pending_for("ops"));
        let after_resolve = alerts.clone();
        alerts.update(vec![], vec![key.clone()], 40).unwrap();
        assert_eq!(alerts, after_resolve, "resolving what is resolved changes nothing");
    }

    #[test]
    fn resolved_alerts_are_forgotten_after_a_day_once_delivered_and_the_outbox_is_bounded() {
        let mut alerts = Alerts::default();
        alerts.put_sink("ops".into(), Sink::Alertmanager { url: "http://am:9093".into(), ca_file: None }).unwrap();
        let fire: Vec<Firing> = (0..MAX_CHANGES).map(|i| firing("CitadelNodeLagging", &i.to_string(), 1)).collect();
        alerts.update(fire, vec![], 1).unwrap();
        let keys: Vec<String> = alerts.alerts.keys().cloned().collect();
        alerts.update(vec![], keys.clone(), 2).unwrap();
        let acks: Vec<(String, u64)> = alerts.alerts.iter().map(|(k, a)| (k.clone(), a.revision)).collect();
        alerts.delivered("ops", &acks).unwrap();
        alerts.update(vec![], vec![], 2 + RESOLVED_KEPT_MS + 1).unwrap();
        assert!(alerts.alerts.is_empty(), "delivered and a day old");
        // Firing alerts are never dropped to make room: the outbox refuses instead.
        for round in 0..MAX_ALERTS / MAX_CHANGES {
            let fire = (0..MAX_CHANGES).map(|i| firing("CitadelNodeLagging", &format!("{round}-{i}"), 5)).collect();
            alerts.update(fire, vec![], 5).unwrap();
        }
        let before = alerts.clone();
        let refused = alerts.update(vec![firing("CitadelNodeSealed", "1", 6)], vec![], 6);
        assert_eq!(refused, Err(AlertError::OutboxFull { max: MAX_ALERTS }));
        assert_eq!(alerts, before, "a refused update changes nothing");
        // A resolve in the same update makes the room.
        let one = alerts.alerts.keys().next().unwrap().clone();
        alerts.update(vec![firing("CitadelNodeSealed", "1", 7)], vec![one], 7).unwrap();
        assert_eq!(alerts.alerts.len(), MAX_ALERTS);
    }

    #[test]
    fn bad_sinks_and_alerts_are_refused_naming_the_rule() {
        let mut alerts = Alerts::default();
        let hook = |url: &str| Sink::Webhook { url: url.into(), ca_file: None };
        assert_eq!(alerts.put_sink("a b".into(), hook("http://x")), Err(AlertError::BadName { max: MAX_NAME_BYTES }));
        assert!(matches!(alerts.put_sink("a".into(), hook("file:///etc/passwd")), Err(AlertError::BadUrl { .. })));
        for i in 0..MAX_SINKS {
            alerts.put_sink(format!("s{i}"), hook("http://x")).unwrap();
        }
        assert_eq!(
            alerts.put_sink("one-more".into(), hook("http://x")),
            Err(AlertError::TooManySinks { max: MAX_SINKS })
        );
        assert_eq!(alerts.put_sink("a".into(), hook("https://x")), Err(AlertError::CaFileNeeded));
        assert!(matches!(alerts.put_sink("a".into(), hook("http://user:pw@x/")), Err(AlertError::BadUrl { .. })));
        assert!(matches!(alerts.put_sink("a".into(), hook("http:///path")), Err(AlertError::BadUrl { .. })));
        let syslog = |address: &str| Sink::Syslog { address: address.into(), tls: false, ca_file: None };
        assert_eq!(syslog("logs:514").check(), Ok(()));
        assert_eq!(syslog("logs").check(), Err(AlertError::BadAddress));
        let mail = |to: &str| Sink::Email {
            smtp_host: "mx".into(),
            smtp_port: 25,
            from: "citadel@example.com".into(),
            to: vec![to.into()],
            starttls: false,
            ca_file: None,
        };
        assert_eq!(mail("ops@example.com").check(), Ok(()));
        for smuggled in ["ops@example.com>\r\nRCPT TO:<x@y", "a b@c", "nobody", "x@y,z@w"] {
            assert_eq!(mail(smuggled).check(), Err(AlertError::BadMailbox { max: MAX_RECIPIENTS }), "{smuggled}");
        }
        let nameless = Firing { labels: labels(&[("node", "1")]), annotations: BTreeMap::new(), starts_at: 1 };
        assert!(matches!(alerts.update(vec![nameless], vec![], 1), Err(AlertError::BadAlert { .. })));
        let huge = Firing { labels: labels(&[("alertname", &"x".repeat(MAX_LABEL_BYTES + 1))]), ..firing("x", "1", 1) };
        assert!(matches!(alerts.update(vec![huge], vec![], 1), Err(AlertError::BadAlert { .. })));
        assert_eq!(alerts.delivered("nope", &[]), Err(AlertError::NoSuchSink("nope".into())));
    }

    #[test]
    fn leader_changes_are_counted_for_flapping_and_bounded() {
        let mut alerts = Alerts::default();
        for term in 0..(MAX_LEADER_CHANGES as u64 + 4) {
            // Each new leader has its own label set (its node), so each fires.
            alerts
                .update(vec![firing("CitadelLeaderChanged", &term.to_string(), 1000 * term)], vec![], 1000 * term)
                .unwrap();
        }
        assert_eq!(alerts.leader_changes.len(), MAX_LEADER_CHANGES);
        assert_eq!(alerts.leader_changes_since(1000 * (MAX_LEADER_CHANGES as u64 + 1)), 3);
    }
}
