//! Server configuration (§6): a TOML file whose every key can be overridden by a `CITADEL_*`
//! environment variable. Errors name the key and the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    /// Address clients are redirected to; defaults to `https://{api_addr}`.
    #[serde(default)]
    pub advertise_api_addr: Option<String>,
    /// Address peers dial; defaults to `cluster_addr`.
    #[serde(default)]
    pub advertise_cluster_addr: Option<String>,
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub site: String,
    pub tls: TlsConfig,
    #[serde(default)]
    pub seal: SealConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub retry_join: Vec<RetryJoin>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
}

/// `[[alerts.sink]]`: sinks the leader puts into the replicated state (§11.2), as
/// `POST sys/alerts/sinks/:name` would, and puts back if they are changed or deleted there.
/// Declare the same sinks on every node: each leader enforces its own file. Sinks added
/// through the API and not declared here are left alone.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default)]
    pub sink: Vec<SinkConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct SinkConfig {
    pub name: String,
    pub sink: citadel_core::alerts::Sink,
}

/// A `[[alerts.sink]]` table: `name` and the fields its `type` takes, no others (as the API).
impl TryFrom<toml::Table> for SinkConfig {
    type Error = String;

    fn try_from(mut table: toml::Table) -> Result<SinkConfig, String> {
        let name = match table.remove("name") {
            Some(toml::Value::String(name)) => name,
            _ => return Err("each [[alerts.sink]] needs a name (a string)".into()),
        };
        let kind = table.get("type").and_then(toml::Value::as_str).unwrap_or_default().to_string();
        let types = citadel_core::alerts::SINK_FIELDS.map(|(t, _)| t).join(", ");
        let (_, fields) = citadel_core::alerts::SINK_FIELDS
            .iter()
            .find(|(t, _)| *t == kind)
            .ok_or_else(|| format!("sink {name:?}: type must be one of {types}"))?;
        if let Some(unknown) = table.keys().find(|k| !fields.contains(&k.as_str())) {
            return Err(format!("sink {name:?}: unknown key {unknown:?} for a {kind} sink ({})", fields.join(", ")));
        }
        let sink = toml::Value::Table(table).try_into().map_err(|e| format!("sink {name:?}: {e}"))?;
        Ok(SinkConfig { name, sink })
    }
}

impl AlertsConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let mut seen = std::collections::BTreeSet::new();
        for SinkConfig { name, sink } in &self.sink {
            let mut probe = citadel_core::alerts::Alerts::default();
            probe.put_sink(name.clone(), sink.clone()).map_err(|e| ("alerts.sink", format!("sink {name:?}: {e}")))?;
            if !seen.insert(name) {
                return Err(("alerts.sink", format!("sink {name:?} is declared twice")));
            }
        }
        if self.sink.len() > citadel_core::alerts::MAX_SINKS {
            return Err(("alerts.sink", format!("at most {} sinks", citadel_core::alerts::MAX_SINKS)));
        }
        Ok(())
    }
}

/// How often each leader-only job runs (§1.6, `jobs.rs`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// The expiry sweep: removes expired tokens and revoked emergency tokens past their expiry.
    #[serde(default = "default_token_sweep_ms")]
    pub token_sweep_ms: u64,
    /// Forgets expired records: unused join tokens, revoked and member certificates.
    #[serde(default = "default_prune_ms")]
    pub prune_ms: u64,
    /// Audit retention: archives and prunes events older than `audit.retain_days`.
    #[serde(default = "default_prune_ms")]
    pub audit_retention_ms: u64,
    /// Scheduled snapshots: how often the leader looks for a configuration that is due.
    #[serde(default = "default_snapshot_auto_ms")]
    pub snapshot_auto_ms: u64,
    /// Alerts (§11.2): how often the leader looks at the cluster to fire and resolve them.
    #[serde(default = "default_alerts_ms")]
    pub alerts_ms: u64,
    /// How often the leader sends what a sink has not acknowledged.
    #[serde(default = "default_alert_delivery_ms")]
    pub alert_delivery_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            token_sweep_ms: default_token_sweep_ms(),
            prune_ms: default_prune_ms(),
            audit_retention_ms: default_prune_ms(),
            snapshot_auto_ms: default_snapshot_auto_ms(),
            alerts_ms: default_alerts_ms(),
            alert_delivery_ms: default_alert_delivery_ms(),
        }
    }
}

fn default_token_sweep_ms() -> u64 {
    30_000
}
fn default_prune_ms() -> u64 {
    3_600_000
}
fn default_snapshot_auto_ms() -> u64 {
    1_000
}
fn default_alerts_ms() -> u64 {
    250
}
fn default_alert_delivery_ms() -> u64 {
    100
}

/// Shortest job interval: each run commits a Raft entry.
pub const MIN_JOB_INTERVAL_MS: u64 = 100;
/// Longest job interval: a day.
pub const MAX_JOB_INTERVAL_MS: u64 = 86_400_000;

impl JobsConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let intervals = [
            ("jobs.token_sweep_ms", self.token_sweep_ms),
            ("jobs.prune_ms", self.prune_ms),
            ("jobs.audit_retention_ms", self.audit_retention_ms),
            ("jobs.snapshot_auto_ms", self.snapshot_auto_ms),
            ("jobs.alerts_ms", self.alerts_ms),
            ("jobs.alert_delivery_ms", self.alert_delivery_ms),
        ];
        match intervals.into_iter().find(|(_, ms)| !(MIN_JOB_INTERVAL_MS..=MAX_JOB_INTERVAL_MS).contains(ms)) {
            Some((key, _)) => {
                Err((key, format!("must be between {MIN_JOB_INTERVAL_MS} and {MAX_JOB_INTERVAL_MS} milliseconds")))
            }
            None => Ok(()),
        }
    }
}

/// The node's event stream (`events.rs`, `GET sys/events`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Events buffered for subscribers; one that falls further behind is told how many it missed.
    #[serde(default = "default_events_buffer")]
    pub buffer: usize,
    /// Subscribers to `sys/events` at once; further ones get 429.
    #[serde(default = "default_events_max_subscribers")]
    pub max_subscribers: usize,
    /// An idle stream gets a heartbeat line this often.
    #[serde(default = "default_events_heartbeat_ms")]
    pub heartbeat_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            buffer: default_events_buffer(),
            max_subscribers: default_events_max_subscribers(),
            heartbeat_ms: default_events_heartbeat_ms(),
        }
    }
}

fn default_events_buffer() -> usize {
    256
}
fn default_events_max_subscribers() -> usize {
    32
}
fn default_events_heartbeat_ms() -> u64 {
    5_000
}

impl EventsConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=65_536).contains(&self.buffer) {
            return Err(("events.buffer", "must be between 1 and 65536".into()));
        }
        if !(1..=4096).contains(&self.max_subscribers) {
            return Err(("events.max_subscribers", "must be between 1 and 4096".into()));
        }
        if !(100..=600_000).contains(&self.heartbeat_ms) {
            return Err(("events.heartbeat_ms", "must be between 100 and 600000 milliseconds".into()));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The system max TTL (§8.2): no token outlives it without a period, renewals included.
    /// Seconds, or a Vault duration string ("768h").
    #[serde(default = "default_max_ttl", deserialize_with = "duration_secs")]
    pub max_ttl: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { max_ttl: default_max_ttl() }
    }
}

/// Vault's default system max TTL: 32 days.
fn default_max_ttl() -> u64 {
    768 * 3600
}

/// A duration key given as seconds or as a Vault duration string.
fn duration_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(s),
        Raw::Text(t) => citadel_core::time::parse_duration_secs(&t)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid duration {t:?} (use seconds or e.g. \"768h\")"))),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// On the node that initializes the cluster: the CA's private key, which the cluster then
    /// keeps (sealed) to certify nodes that join with a join token.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// The CA's common name, as in its certificate (needed to sign with it).
    #[serde(default)]
    pub ca_common_name: Option<String>,
    /// How long the node certificates the cluster issues (join tokens, renewals) stay valid.
    #[serde(default = "default_cert_validity_days")]
    pub cert_validity_days: u32,
    /// A member renews its certificate this many days before it expires.
    #[serde(default = "default_renew_before_days")]
    pub renew_before_days: u32,
}

fn default_cert_validity_days() -> u32 {
    crate::tls::DEFAULT_CERT_VALIDITY_DAYS
}
fn default_renew_before_days() -> u32 {
    30
}
/// Longest certificate validity accepted: ten years.
const MAX_CERT_VALIDITY_DAYS: u32 = 3650;

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SealKind {
    #[default]
    Shamir,
    Keyfile,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    #[serde(default, rename = "type")]
    pub kind: SealKind,
    /// With `type = "keyfile"`: the file holding the unseal key (hex). Keep it outside the data
    /// directory and readable by the server's user only.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftConfig {
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: u64,
    /// How long a request waits for a leader while none is known (an election under way)
    /// before it fails with 503. Longer than an election (≈ 0.4 s measured), so a request that
    /// arrives while the leader dies is held and answered by the next one; read-only mode
    /// itself (stale reads, emergency logins) starts after one election timeout. Unset: 1 s, or
    /// 2 × `election_timeout_ms` if that is longer (read it through [`RaftConfig::leader_wait_ms`]).
    #[serde(default, rename = "leader_wait_ms")]
    pub leader_wait_ms_setting: Option<u64>,
    /// Log entries between automatic snapshots (which also bound the log kept on disk).
    #[serde(default = "default_snapshot_threshold")]
    pub snapshot_threshold: u64,
    /// Entries kept in the log behind the latest snapshot, so a follower briefly behind catches
    /// up from the log. A follower further behind (one that was down) gets a snapshot: a dead
    /// voter never holds the log longer than this plus `snapshot_threshold` (§10.1).
    #[serde(default = "default_max_trailing_logs")]
    pub max_trailing_logs: u64,
    /// Voters kept while enough nodes exist; later nodes replicate as non-voters (odd, ≥ 1).
    #[serde(default = "default_max_voters")]
    pub max_voters: usize,
    /// A voter unreachable this long is replaced by a healthy non-voter (autopilot).
    #[serde(default = "default_dead_server_threshold_ms")]
    pub dead_server_threshold_ms: u64,
}

impl RaftConfig {
    /// How long a request waits for a leader (`leader_wait_ms`, or its default).
    pub fn leader_wait_ms(&self) -> u64 {
        self.leader_wait_ms_setting.unwrap_or_else(|| (2 * self.election_timeout_ms).max(1_000))
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_ms: default_election_timeout_ms(),
            leader_wait_ms_setting: None,
            snapshot_threshold: default_snapshot_threshold(),
            max_trailing_logs: default_max_trailing_logs(),
            max_voters: default_max_voters(),
            dead_server_threshold_ms: default_dead_server_threshold_ms(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryJoin {
    /// Cluster address (`host:port`) of a node of the cluster to join; any member redirects to
    /// the leader. The cluster CA certificate authenticates both sides.
    pub leader_cluster_addr: String,
    /// With `join_token`: a member's API address (`https://host:port`). A node whose certificate
    /// files do not exist yet asks it for one, presenting the token, before it starts.
    #[serde(default)]
    pub leader_api_addr: Option<String>,
    /// A one-time join token from `citadel operator raft join-token`.
    #[serde(default)]
    pub join_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Optional export sink: every local audit event is also appended here as a JSON line.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Refusals of unauthenticated requests are counted per (source, reason) and written as one
    /// `refusal_summary` event per key per interval, so a flood cannot grow the replicated log.
    #[serde(default = "default_refusal_summary_interval_ms")]
    pub refusal_summary_interval_ms: u64,
    /// Distinct (source, reason) keys counted per interval; further sources share an "other" key.
    #[serde(default = "default_refusal_summary_keys")]
    pub refusal_summary_keys: usize,
    /// Longest path or user name stored in an audit event; longer ones are cut with a marker.
    #[serde(default = "default_max_path_bytes")]
    pub max_path_bytes: usize,
    /// Days an event stays in the replicated audit log before retention moves it to an archive
    /// file (`DATA/audit-archive/`, checked by `citadel audit verify --archive`). A fraction is
    /// allowed (0.5 keeps twelve hours).
    #[serde(default = "default_retain_days")]
    pub retain_days: f64,
}

fn default_retain_days() -> f64 {
    400.0
}

/// Longest retention: a hundred years.
const MAX_RETAIN_DAYS: f64 = 36_500.0;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            refusal_summary_interval_ms: default_refusal_summary_interval_ms(),
            refusal_summary_keys: default_refusal_summary_keys(),
            max_path_bytes: default_max_path_bytes(),
            retain_days: default_retain_days(),
        }
    }
}

impl AuditConfig {
    /// How long an event is retained, in milliseconds.
    pub fn retain_ms(&self) -> u64 {
        (self.retain_days * 86_400_000.0) as u64
    }
}

/// Caps on what any client, authenticated or not, can make a node spend (§8.3).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Argon2 hashes running at once (each holds ~19 MiB); default 2 × cores.
    #[serde(default = "default_password_hash_concurrency")]
    pub password_hash_concurrency: usize,
    /// How long a login waits for a hashing slot before it is answered 503 with `Retry-After`.
    #[serde(default = "default_password_hash_wait_ms")]
    pub password_hash_wait_ms: u64,
    /// Entries of the login limiter's table (user-and-source pairs plus sources); the least
    /// recently used is evicted beyond it.
    #[serde(default = "default_login_limiter_entries")]
    pub login_limiter_entries: usize,
    /// Failed logins a user-and-source pair may make before backoff starts.
    #[serde(default = "default_login_free_failures")]
    pub login_free_failures: u32,
    /// Failed logins (any user) a source address may make before backoff starts.
    #[serde(default = "default_login_source_free_failures")]
    pub login_source_free_failures: u32,
    /// The first backoff; each further failure doubles it.
    #[serde(default = "default_login_backoff_base_ms")]
    pub login_backoff_base_ms: u64,
    /// The longest backoff; a key quiet for this long after its backoff ends is forgotten.
    #[serde(default = "default_login_backoff_max_ms")]
    pub login_backoff_max_ms: u64,
    /// Open connections per listener; beyond it new connections are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections per source address, per listener.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// A TLS handshake must finish within this.
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// A request's headers must arrive within this (HTTP/1).
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Tokens one user's logins, or one parent token, may hold in the replicated state at once
    /// (expired ones count until the sweep removes them).
    #[serde(default = "default_max_tokens_per_owner")]
    pub max_tokens_per_owner: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            password_hash_concurrency: default_password_hash_concurrency(),
            password_hash_wait_ms: default_password_hash_wait_ms(),
            login_limiter_entries: default_login_limiter_entries(),
            login_free_failures: default_login_free_failures(),
            login_source_free_failures: default_login_source_free_failures(),
            login_backoff_base_ms: default_login_backoff_base_ms(),
            login_backoff_max_ms: default_login_backoff_max_ms(),
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
            tls_handshake_timeout_ms: default_tls_handshake_timeout_ms(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_tokens_per_owner: default_max_tokens_per_owner(),
        }
    }
}

impl LimitsConfig {
    /// Each key that must be positive, with its value, for validation.
    fn positive_keys(&self) -> [(&'static str, u64); 12] {
        [
            ("limits.password_hash_concurrency", self.password_hash_concurrency as u64),
            ("limits.password_hash_wait_ms", self.password_hash_wait_ms),
            ("limits.login_limiter_entries", self.login_limiter_entries as u64),
            ("limits.login_source_free_failures", u64::from(self.login_source_free_failures)),
            ("limits.login_backoff_base_ms", self.login_backoff_base_ms),
            ("limits.login_backoff_max_ms", self.login_backoff_max_ms),
            ("limits.max_connections", self.max_connections as u64),
            ("limits.max_connections_per_source", self.max_connections_per_source as u64),
            ("limits.tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("limits.header_read_timeout_ms", self.header_read_timeout_ms),
            ("limits.idle_timeout_ms", self.idle_timeout_ms),
            ("limits.max_tokens_per_owner", self.max_tokens_per_owner as u64),
        ]
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some((key, _)) = self.positive_keys().into_iter().find(|(_, v)| *v == 0) {
            return Err((key, "must be positive".into()));
        }
        if self.max_connections_per_source > self.max_connections {
            return Err((
                "limits.max_connections_per_source",
                format!("must not exceed limits.max_connections ({})", self.max_connections),
            ));
        }
        if self.login_backoff_base_ms > self.login_backoff_max_ms {
            return Err((
                "limits.login_backoff_base_ms",
                format!("must not exceed limits.login_backoff_max_ms ({})", self.login_backoff_max_ms),
            ));
        }
        Ok(())
    }
}

impl AuditConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.refusal_summary_interval_ms == 0 {
            return Err(("audit.refusal_summary_interval_ms", "must be positive".into()));
        }
        if self.refusal_summary_keys == 0 {
            return Err(("audit.refusal_summary_keys", "must be positive".into()));
        }
        if self.max_path_bytes < MIN_AUDIT_PATH_BYTES {
            return Err(("audit.max_path_bytes", format!("must be at least {MIN_AUDIT_PATH_BYTES}")));
        }
        // A write's event rides in its Raft entry, where `apply` refuses longer fields.
        if self.max_path_bytes > MAX_CONFIGURED_CAP {
            return Err(("audit.max_path_bytes", format!("must be at most {MAX_CONFIGURED_CAP}")));
        }
        if !(self.retain_days > 0.0 && self.retain_days <= MAX_RETAIN_DAYS) {
            return Err(("audit.retain_days", format!("must be more than 0 and at most {MAX_RETAIN_DAYS} days")));
        }
        Ok(())
    }
}

/// Shorter caps would make audit events useless for telling requests apart.
const MIN_AUDIT_PATH_BYTES: usize = 64;
use citadel_core::audited::MAX_CONFIGURED_CAP;

fn default_refusal_summary_interval_ms() -> u64 {
    10_000
}
fn default_refusal_summary_keys() -> usize {
    1024
}
fn default_max_path_bytes() -> usize {
    512
}
fn default_password_hash_concurrency() -> usize {
    2 * std::thread::available_parallelism().map_or(1, usize::from)
}
fn default_password_hash_wait_ms() -> u64 {
    2000
}
fn default_login_limiter_entries() -> usize {
    10_000
}
fn default_login_free_failures() -> u32 {
    3
}
fn default_login_source_free_failures() -> u32 {
    20
}
fn default_login_backoff_base_ms() -> u64 {
    1000
}
fn default_login_backoff_max_ms() -> u64 {
    60_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_source() -> usize {
    256
}
fn default_tls_handshake_timeout_ms() -> u64 {
    5000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_max_tokens_per_owner() -> usize {
    1_000
}

/// The longest duration Citadel accepts anywhere (Vault's: what fits in int64 nanoseconds).
pub const MAX_DURATION_SECS: u64 = (i64::MAX / 1_000_000_000) as u64;

fn default_cluster_name() -> String {
    "citadel".into()
}
/// Heartbeat and election timeout are chosen for sub-0.5 s failover on a LAN (measured:
/// docs/BENCHMARKS.md): the election window is [timeout, 4/3 × timeout] and openraft's leader
/// lease is its upper end, so a leader's death is acted on after ~200 ms.
fn default_heartbeat_ms() -> u64 {
    40
}
fn default_election_timeout_ms() -> u64 {
    150
}
fn default_snapshot_threshold() -> u64 {
    5000
}
fn default_max_trailing_logs() -> u64 {
    1000
}
fn default_max_voters() -> usize {
    5
}
fn default_dead_server_threshold_ms() -> u64 {
    60_000
}

/// Environment variables that override config keys, and the key each one sets.
const ENV_OVERRIDES: &[(&str, &[&str])] = &[
    ("CITADEL_NODE_ID", &["node_id"]),
    ("CITADEL_DATA_DIR", &["data_dir"]),
    ("CITADEL_API_ADDR", &["api_addr"]),
    ("CITADEL_CLUSTER_ADDR", &["cluster_addr"]),
    ("CITADEL_ADVERTISE_API_ADDR", &["advertise_api_addr"]),
    ("CITADEL_ADVERTISE_CLUSTER_ADDR", &["advertise_cluster_addr"]),
    ("CITADEL_CLUSTER_NAME", &["cluster_name"]),
    ("CITADEL_NODE_NAME", &["node_name"]),
    ("CITADEL_SITE", &["site"]),
    ("CITADEL_TLS_CERT", &["tls", "cert"]),
    ("CITADEL_TLS_KEY", &["tls", "key"]),
    ("CITADEL_TLS_CA", &["tls", "ca"]),
    ("CITADEL_TLS_CA_KEY", &["tls", "ca_key"]),
    ("CITADEL_TLS_CERT_VALIDITY_DAYS", &["tls", "cert_validity_days"]),
    ("CITADEL_TLS_RENEW_BEFORE_DAYS", &["tls", "renew_before_days"]),
    ("CITADEL_SEAL_TYPE", &["seal", "type"]),
    ("CITADEL_SEAL_KEY_FILE", &["seal", "key_file"]),
    ("CITADEL_RAFT_HEARTBEAT_MS", &["raft", "heartbeat_ms"]),
    ("CITADEL_RAFT_ELECTION_TIMEOUT_MS", &["raft", "election_timeout_ms"]),
    ("CITADEL_RAFT_SNAPSHOT_THRESHOLD", &["raft", "snapshot_threshold"]),
    ("CITADEL_RAFT_LEADER_WAIT_MS", &["raft", "leader_wait_ms"]),
    ("CITADEL_RAFT_MAX_TRAILING_LOGS", &["raft", "max_trailing_logs"]),
    ("CITADEL_RAFT_MAX_VOTERS", &["raft", "max_voters"]),
    ("CITADEL_RAFT_DEAD_SERVER_THRESHOLD_MS", &["raft", "dead_server_threshold_ms"]),
    ("CITADEL_AUDIT_FILE", &["audit", "file"]),
    ("CITADEL_AUTH_MAX_TTL", &["auth", "max_ttl"]),
    ("CITADEL_AUDIT_REFUSAL_SUMMARY_INTERVAL_MS", &["audit", "refusal_summary_interval_ms"]),
    ("CITADEL_AUDIT_REFUSAL_SUMMARY_KEYS", &["audit", "refusal_summary_keys"]),
    ("CITADEL_AUDIT_MAX_PATH_BYTES", &["audit", "max_path_bytes"]),
    ("CITADEL_LIMITS_PASSWORD_HASH_CONCURRENCY", &["limits", "password_hash_concurrency"]),
    ("CITADEL_LIMITS_PASSWORD_HASH_WAIT_MS", &["limits", "password_hash_wait_ms"]),
    ("CITADEL_LIMITS_LOGIN_LIMITER_ENTRIES", &["limits", "login_limiter_entries"]),
    ("CITADEL_LIMITS_LOGIN_FREE_FAILURES", &["limits", "login_free_failures"]),
    ("CITADEL_LIMITS_LOGIN_SOURCE_FREE_FAILURES", &["limits", "login_source_free_failures"]),
    ("CITADEL_LIMITS_LOGIN_BACKOFF_BASE_MS", &["limits", "login_backoff_base_ms"]),
    ("CITADEL_LIMITS_LOGIN_BACKOFF_MAX_MS", &["limits", "login_backoff_max_ms"]),
    ("CITADEL_LIMITS_MAX_CONNECTIONS", &["limits", "max_connections"]),
    ("CITADEL_LIMITS_MAX_CONNECTIONS_PER_SOURCE", &["limits", "max_connections_per_source"]),
    ("CITADEL_LIMITS_TLS_HANDSHAKE_TIMEOUT_MS", &["limits", "tls_handshake_timeout_ms"]),
    ("CITADEL_LIMITS_HEADER_READ_TIMEOUT_MS", &["limits", "header_read_timeout_ms"]),
    ("CITADEL_LIMITS_IDLE_TIMEOUT_MS", &["limits", "idle_timeout_ms"]),
    ("CITADEL_LIMITS_MAX_TOKENS_PER_OWNER", &["limits", "max_tokens_per_owner"]),
    ("CITADEL_JOBS_TOKEN_SWEEP_MS", &["jobs", "token_sweep_ms"]),
    ("CITADEL_JOBS_PRUNE_MS", &["jobs", "prune_ms"]),
    ("CITADEL_JOBS_AUDIT_RETENTION_MS", &["jobs", "audit_retention_ms"]),
    ("CITADEL_JOBS_SNAPSHOT_AUTO_MS", &["jobs", "snapshot_auto_ms"]),
    ("CITADEL_JOBS_ALERTS_MS", &["jobs", "alerts_ms"]),
    ("CITADEL_JOBS_ALERT_DELIVERY_MS", &["jobs", "alert_delivery_ms"]),
    ("CITADEL_AUDIT_RETAIN_DAYS", &["audit", "retain_days"]),
    ("CITADEL_EVENTS_BUFFER", &["events", "buffer"]),
    ("CITADEL_EVENTS_MAX_SUBSCRIBERS", &["events", "max_subscribers"]),
    ("CITADEL_EVENTS_HEARTBEAT_MS", &["events", "heartbeat_ms"]),
];

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::parse(&text, path, &env)
    }

    /// Parses `text`, applies `env` overrides, and validates. Pure, for tests.
    pub fn parse(text: &str, path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let file = path.display();
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("config file {file}: {}", e.message())))?;
        for (var, key) in ENV_OVERRIDES {
            if let Some((_, raw)) = env.iter().find(|(k, _)| k == var) {
                set_key(&mut value, key, raw);
            }
        }
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(format!("config file {file}: {}", e.message())))?;
        config.validate().map_err(|(key, msg)| ConfigError(format!("config file {file}: key `{key}`: {msg}")))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.node_id == 0 {
            return Err(("node_id", "must be a positive integer".into()));
        }
        if self.api_addr == self.cluster_addr {
            return Err(("cluster_addr", "must differ from api_addr".into()));
        }
        if self.seal.kind == SealKind::Keyfile && self.seal.key_file.is_none() {
            return Err(("seal.key_file", "is required when seal.type is \"keyfile\"".into()));
        }
        if self.raft.heartbeat_ms == 0 || self.raft.heartbeat_ms * 3 > self.raft.election_timeout_ms {
            return Err((
                "raft.heartbeat_ms",
                format!(
                    "must be positive and at most a third of raft.election_timeout_ms ({})",
                    self.raft.election_timeout_ms
                ),
            ));
        }
        if self.tls.ca_key.is_some() && self.tls.ca_common_name.is_none() {
            return Err((
                "tls.ca_common_name",
                "is required with tls.ca_key (the CA certificate's common name)".into(),
            ));
        }
        if self.tls.cert_validity_days == 0 || self.tls.cert_validity_days > MAX_CERT_VALIDITY_DAYS {
            return Err(("tls.cert_validity_days", format!("must be between 1 and {MAX_CERT_VALIDITY_DAYS}")));
        }
        if self.tls.renew_before_days >= self.tls.cert_validity_days {
            return Err(("tls.renew_before_days", "must be less than tls.cert_validity_days".into()));
        }
        if self.retry_join.iter().any(|j| j.join_token.is_some() && j.leader_api_addr.is_none()) {
            return Err(("retry_join.leader_api_addr", "is required with retry_join.join_token".into()));
        }
        if self.raft.max_voters == 0 || self.raft.max_voters.is_multiple_of(2) {
            return Err(("raft.max_voters", format!("must be odd and positive, got {}", self.raft.max_voters)));
        }
        if self.auth.max_ttl == 0 || self.auth.max_ttl > MAX_DURATION_SECS {
            return Err(("auth.max_ttl", format!("must be between 1 second and {MAX_DURATION_SECS} seconds")));
        }
        let leader_wait_ms = self.raft.leader_wait_ms();
        if leader_wait_ms < 2 * self.raft.election_timeout_ms || leader_wait_ms > 60_000 {
            return Err((
                "raft.leader_wait_ms",
                format!(
                    "must be between 2 × raft.election_timeout_ms ({}) and 60000",
                    2 * self.raft.election_timeout_ms
                ),
            ));
        }
        if self.raft.snapshot_threshold < 10 {
            return Err(("raft.snapshot_threshold", "must be at least 10".into()));
        }
        self.limits.validate()?;
        self.audit.validate()?;
        self.jobs.validate()?;
        self.events.validate()?;
        self.alerts.validate()?;
        Ok(())
    }

    pub fn api_url(&self) -> String {
        self.advertise_api_addr.clone().unwrap_or_else(|| format!("https://{}", self.api_addr))
    }

    pub fn cluster_url(&self) -> String {
        self.advertise_cluster_addr.clone().unwrap_or_else(|| self.cluster_addr.to_string())
    }

    pub fn name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| format!("node-{}", self.node_id))
    }
}

/// Sets a (possibly nested) key from an environment string, keeping numbers numeric.
fn set_key(table: &mut toml::Table, key: &[&str], raw: &str) {
    let (last, parents) = key.split_last().expect("non-empty key");
    let mut current = table;
    for part in parents {
        current = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("config sections are tables");
    }
    let value = raw
        .parse::<i64>()
        .map(toml::Value::Integer)
        .or_else(|_| raw.parse::<f64>().map(toml::Value::Float))
        .unwrap_or_else(|_| toml::Value::String(raw.into()));
    current.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        node_id = 1
        data_dir = "/tmp/x"
        api_addr = "127.0.0.1:8200"
        cluster_addr = "127.0.0.1:8201"
        [tls]
        cert = "c.pem"
        key = "k.pem"
        ca = "ca.pem"
    "#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Config::parse(text, Path::new("/etc/citadel.toml"), &env)
    }

    #[test]
    fn the_shipped_example_config_is_accepted_as_it_is_and_with_every_commented_key_set() {
        let example = include_str!("../../../deploy/systemd/citadel.toml.example");
        parse(example, &[]).unwrap();
        // Uncommenting a `# key = value` line must give a valid config too: the defaults it shows
        // are real keys with accepted values (the first of alternatives for one key).
        let mut seen = std::collections::BTreeSet::new();
        let mut table = String::new();
        let mut uncommented = Vec::new();
        for line in example.lines() {
            // A commented table header (`# [[retry_join]]`) is uncommented with its keys.
            if let Some(header) = line.strip_prefix("# ").filter(|h| h.starts_with('[')) {
                table = header.to_string();
                seen.retain(|k: &String| !k.starts_with(&table));
                uncommented.push(header);
                continue;
            }
            if line.starts_with('[') {
                table = line.to_string();
            }
            let key = line.split_once(" = ").map(|(k, _)| k.trim_start_matches("# ").to_string());
            if let Some(key) = key.filter(|k| !k.contains(' ')) {
                if !seen.insert(format!("{table}.{key}")) && line.starts_with("# ") {
                    continue;
                }
            }
            match line.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => uncommented.push(rest),
                _ => uncommented.push(line),
            }
        }
        parse(&uncommented.join("\n"), &[]).unwrap();
    }

    #[test]
    fn alert_sinks_are_declared_in_the_config_and_a_bad_one_is_refused_naming_it() {
        let sinks = r#"
            [[alerts.sink]]
            name = "ops"
            type = "webhook"
            url = "http://127.0.0.1:9000/hook"
            [[alerts.sink]]
            name = "oncall"
            type = "email"
            smtp_host = "mx.example.com"
            smtp_port = 587
            from = "citadel@example.com"
            to = ["ops@example.com"]
            ca_file = "/etc/citadel/mx-ca.pem"
        "#;
        let config = parse(&format!("{GOOD}{sinks}"), &[]).unwrap();
        assert_eq!(config.alerts.sink.len(), 2);
        assert!(matches!(&config.alerts.sink[1].sink, citadel_core::alerts::Sink::Email { starttls: true, .. }));
        let insecure = sinks.replace("ca_file = \"/etc/citadel/mx-ca.pem\"", "");
        let err = parse(&format!("{GOOD}{insecure}"), &[]).unwrap_err().0;
        assert!(err.contains("alerts.sink") && err.contains("\"oncall\"") && err.contains("ca_file"), "{err}");
        let twice =
            format!("{GOOD}{sinks}{}", &sinks[..sinks.find("[[alerts.sink]]\n            name = \"oncall\"").unwrap()]);
        let err = parse(&twice, &[]).unwrap_err().0;
        assert!(err.contains("declared twice"), "{err}");
        let typo = sinks.replace("smtp_port = 587", "smtp_port = 587\n            start_tls = true");
        let err = parse(&format!("{GOOD}{typo}"), &[]).unwrap_err().0;
        assert!(err.contains("unknown key \"start_tls\""), "{err}");
    }

    #[test]
    fn the_wait_for_a_leader_is_at_least_two_election_timeouts_and_bounded() {
        assert_eq!(parse(GOOD, &[]).unwrap().raft.leader_wait_ms(), 1000);
        for bad in ["299", "60001"] {
            let err = parse(GOOD, &[("CITADEL_RAFT_LEADER_WAIT_MS", bad)]).unwrap_err().0;
            assert!(err.contains("raft.leader_wait_ms"), "{err}");
        }
        assert_eq!(parse(GOOD, &[("CITADEL_RAFT_LEADER_WAIT_MS", "300")]).unwrap().raft.leader_wait_ms(), 300);
        // Unset, it follows a longer election timeout instead of refusing the config.
        let slow = parse(GOOD, &[("CITADEL_RAFT_ELECTION_TIMEOUT_MS", "800")]).unwrap();
        assert_eq!(slow.raft.leader_wait_ms(), 1600);
    }

    #[test]
    fn audit_retention_defaults_to_400_days_takes_a_fraction_and_refuses_none_naming_the_key() {
        assert_eq!(parse(GOOD, &[]).unwrap().audit.retain_ms(), 400 * 86_400_000);
        let half = parse(&format!("{GOOD}\n[audit]\nretain_days = 0.5\n"), &[]).unwrap();
        assert_eq!(half.audit.retain_ms(), 43_200_000);
        let from_env = parse(GOOD, &[("CITADEL_AUDIT_RETAIN_DAYS", "2.5")]).unwrap();
        assert_eq!(from_env.audit.retain_ms(), 216_000_000);
        for bad in ["0", "-1", "nan", "inf", "36501"] {
            let err = parse(GOOD, &[("CITADEL_AUDIT_RETAIN_DAYS", bad)]).unwrap_err().0;
            assert!(err.contains("audit.retain_days"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_minimal_config_gets_safe_defaults() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.seal.kind, SealKind::Shamir);
        assert_eq!(c.api_url(), "https://127.0.0.1:8200");
        assert_eq!(c.raft.election_timeout_ms, 150);
    }

    #[test]
    fn environment_overrides_file_keys() {
        let c = parse(GOOD, &[("CITADEL_NODE_ID", "7"), ("CITADEL_RAFT_HEARTBEAT_MS", "20")]).unwrap();
        assert_eq!(c.node_id, 7);
        assert_eq!(c.raft.heartbeat_ms, 20);
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let err = parse(&format!("{GOOD}\nbogus = 1\n"), &[]).unwrap_err().0;
        assert!(err.contains("/etc/citadel.toml") && err.contains("bogus"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = parse(&GOOD.replace("node_id = 1", "node_id = 0"), &[]).unwrap_err().0;
        assert!(err.contains("`node_id`"), "{err}");
        let err = parse(&format!("{GOOD}\n[seal]\ntype = \"keyfile\"\n"), &[]).unwrap_err().0;
        assert!(err.contains("seal.key_file"), "{err}");
        let err = parse(&GOOD.replace("127.0.0.1:8201", "not-an-address"), &[]).unwrap_err().0;
        assert!(err.contains("/etc/citadel.toml"), "{err}");
    }

    #[test]
    fn certificate_lifetimes_default_to_a_year_renewed_a_month_ahead_and_are_checked() {
        let config = parse(GOOD, &[]).unwrap();
        assert_eq!((config.tls.cert_validity_days, config.tls.renew_before_days), (365, 30));
        let config = parse(GOOD, &[("CITADEL_TLS_CERT_VALIDITY_DAYS", "90")]).unwrap();
        assert_eq!(config.tls.cert_validity_days, 90);
        let err = parse(GOOD, &[("CITADEL_TLS_CERT_VALIDITY_DAYS", "0")]).unwrap_err().0;
        assert!(err.contains("`tls.cert_validity_days`"), "{err}");
        let err = parse(GOOD, &[("CITADEL_TLS_RENEW_BEFORE_DAYS", "365")]).unwrap_err().0;
        assert!(err.contains("`tls.renew_before_days`"), "{err}");
    }

    #[test]
    fn limits_have_safe_defaults_and_env_overrides() {
        let c = parse(GOOD, &[]).unwrap();
        assert!(c.limits.password_hash_concurrency >= 2);
        assert_eq!(c.limits.max_connections, 4096);
        assert_eq!(c.limits.max_connections_per_source, 256);
        assert_eq!(c.audit.max_path_bytes, 512);
        assert_eq!(c.audit.refusal_summary_interval_ms, 10_000);
        let c = parse(GOOD, &[("CITADEL_LIMITS_MAX_CONNECTIONS_PER_SOURCE", "8")]).unwrap();
        assert_eq!(c.limits.max_connections_per_source, 8);
    }

    #[test]
    fn job_intervals_and_event_limits_are_configurable_and_checked() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.jobs.token_sweep_ms, 30_000);
        assert_eq!((c.events.buffer, c.events.max_subscribers), (256, 32));
        let c = parse(GOOD, &[("CITADEL_JOBS_TOKEN_SWEEP_MS", "200")]).unwrap();
        assert_eq!(c.jobs.token_sweep_ms, 200);
        let err = parse(GOOD, &[("CITADEL_JOBS_TOKEN_SWEEP_MS", "5")]).unwrap_err().0;
        assert!(err.contains("`jobs.token_sweep_ms`"), "{err}");
        let err = parse(&format!("{GOOD}\n[jobs]\nprune_ms = 86400001\n"), &[]).unwrap_err().0;
        assert!(err.contains("`jobs.prune_ms`"), "{err}");
        let err = parse(&format!("{GOOD}\n[events]\nmax_subscribers = 0\n"), &[]).unwrap_err().0;
        assert!(err.contains("`events.max_subscribers`"), "{err}");
    }

    #[test]
    fn invalid_limits_name_the_key() {
        let err = parse(&format!("{GOOD}\n[limits]\npassword_hash_concurrency = 0\n"), &[]).unwrap_err().0;
        assert!(err.contains("`limits.password_hash_concurrency`"), "{err}");
        let err = parse(&format!("{GOOD}\n[limits]\nmax_connections = 4\n"), &[]).unwrap_err().0;
        assert!(err.contains("`limits.max_connections_per_source`"), "{err}");
        let err = parse(&format!("{GOOD}\n[audit]\nmax_path_bytes = 3\n"), &[]).unwrap_err().0;
        assert!(err.contains("`audit.max_path_bytes`"), "{err}");
        let err = parse(&format!("{GOOD}\n[limits]\nmax_conections = 4\n"), &[]).unwrap_err().0;
        assert!(err.contains("max_conections"), "{err}");
    }
}
