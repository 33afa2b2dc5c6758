//! Who is calling on the cluster channel (§8.1). Mutual TLS proves only that a peer holds a
//! certificate from the cluster CA; a join token buys such a certificate. So every cluster
//! route but `/cluster/join` also asks: does the certificate name a node id that is a member
//! now, and is its serial off the deny list?
//!
//! Also here: the `REMOVED` marker of a node that was removed from the cluster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use citadel_core::command::{Command, Response as CommandResponse};
use citadel_core::UnixMillis;

use crate::ids;
use crate::node::Node;

/// The one cluster route open to a certified node that is not (yet) a member.
pub const JOIN_PATH: &str = "/cluster/join";

/// What a peer's end-entity certificate says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// From the subject's common name `node-<id>`; none when the name has another form.
    pub node_id: Option<u64>,
    /// Lowercase hex without leading zero octets, as the deny list keeps it.
    pub serial: String,
    /// Subject alternative names: DNS names (lowercase) and IP addresses (canonical text).
    pub names: Vec<String>,
    pub not_after: UnixMillis,
}

impl PeerIdentity {
    /// Reads a DER certificate. Never panics on bad input: the bytes come from the network.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let node_id =
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).and_then(node_id_of_common_name);
        let significant = cert.raw_serial().iter().position(|b| *b != 0).unwrap_or(cert.raw_serial().len());
        let serial = match hex::encode(&cert.raw_serial()[significant..]) {
            s if s.is_empty() => "00".to_string(),
            s => s,
        };
        let mut names = Vec::new();
        let san = cert.subject_alternative_name().map_err(|e| format!("bad subject alternative names: {e}"))?;
        for name in san.map(|ext| ext.value.general_names.as_slice()).unwrap_or_default() {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_of_octets(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
        let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0).saturating_mul(1000);
        Ok(PeerIdentity { node_id, serial, names, not_after })
    }

    /// The identity in a PEM certificate file (this node's own).
    pub fn from_pem_file(path: &Path) -> anyhow::Result<PeerIdentity> {
        let certs = crate::tls::load_certs(path)?;
        PeerIdentity::from_der(&certs[0]).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Whether the certificate covers `host` (an IP address or a DNS name, as in an address).
    pub fn covers_host(&self, host: &str) -> bool {
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => host.to_ascii_lowercase(),
        };
        self.names.contains(&host)
    }
}

/// `node-<id>` → id; anything else (including `node-0` and `node-007`) names no node.
fn node_id_of_common_name(common_name: &str) -> Option<u64> {
    let digits = common_name.strip_prefix("node-")?;
    let id: u64 = digits.parse().ok()?;
    (id > 0 && id.to_string() == digits).then_some(id)
}

fn ip_of_octets(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The host of an address: `https://host:port`, `host:port` or `[v6]:port`.
pub fn host_of(addr: &str) -> Option<String> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("https://{addr}") };
    let url = reqwest::Url::parse(&url).ok()?;
    let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => Some(ip.to_string()),
        Err(_) => Some(host.to_ascii_lowercase()),
    }
}

/// The identity of a connection's peer, attached to each of its requests. None on the API port
/// (no client certificates) or when the certificate cannot be read.
#[derive(Clone, Debug, Default)]
pub struct PeerCert(pub Option<Arc<PeerIdentity>>);

impl PeerCert {
    pub fn of(connection: &rustls::ServerConnection) -> PeerCert {
        let der = connection.peer_certificates().and_then(|certs| certs.first());
        PeerCert(der.and_then(|der| match PeerIdentity::from_der(der) {
            Ok(identity) => Some(Arc::new(identity)),
            Err(e) => {
                tracing::debug!(error = %e, "a peer certificate could not be read");
                None
            }
        }))
    }
}

/// Why the cluster channel refused a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRefusal {
    NoCertificate,
    NoNodeId,
    Revoked { node_id: u64, serial: String },
    NotMember { node_id: u64 },
    WrongNodeId { certified: u64, requested: u64 },
    AddressNotCertified { host: String },
}

impl std::fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRefusal::NoCertificate => f.write_str("refused: the peer presented no readable certificate"),
            PeerRefusal::NoNodeId => {
                f.write_str("refused: the peer certificate names no node id (its common name must be node-<id>)")
            }
            PeerRefusal::Revoked { node_id, serial } => write!(
                f,
                "refused: the certificate of node {node_id} (serial {serial}) is revoked: the node was removed \
                 from the cluster"
            ),
            PeerRefusal::NotMember { node_id } => write!(
                f,
                "refused: node {node_id} is not a member of this cluster; its certificate is good for joining only"
            ),
            PeerRefusal::WrongNodeId { certified, requested } => {
                write!(f, "refused: the certificate was issued to node {certified}, not to node {requested}")
            }
            PeerRefusal::AddressNotCertified { host } => {
                write!(f, "refused: the address host {host} is not among the names the certificate covers")
            }
        }
    }
}

impl std::error::Error for PeerRefusal {}

fn check_not_revoked(app: &Node, peer: &PeerIdentity, node_id: u64) -> Result<(), PeerRefusal> {
    if app.state.read(|s| s.is_serial_revoked(&peer.serial)) {
        return Err(PeerRefusal::Revoked { node_id, serial: peer.serial.clone() });
    }
    Ok(())
}

/// May this peer use a cluster route other than join? A member may, unless its certificate is
/// revoked. A node that belongs to no membership yet (being added, it has received nothing)
/// takes Raft's RPCs from any certified peer: it cannot know the leader before its first append.
pub fn admit(app: &Node, peer: Option<&PeerIdentity>, raft_rpc: bool) -> Result<u64, PeerRefusal> {
    let peer = peer.ok_or(PeerRefusal::NoCertificate)?;
    let node_id = peer.node_id.ok_or(PeerRefusal::NoNodeId)?;
    check_not_revoked(app, peer, node_id)?;
    let view = membership_of(app, node_id);
    // A node whose log does not yet hold its own addition is replaying history: the members it
    // knows may be long gone and the leader one it has not heard of yet, so any certified,
    // unrevoked peer may send it Raft messages (Raft's terms still decide what it accepts).
    if view.peer_is_member || (raft_rpc && !view.includes_me) {
        return Ok(node_id);
    }
    Err(PeerRefusal::NotMember { node_id })
}

/// What this node's membership says of a peer, and of itself.
struct MembershipView {
    peer_is_member: bool,
    /// False while the log this node holds predates its own addition (or is empty).
    includes_me: bool,
}

/// Every Raft RPC asks: the metrics are borrowed, not cloned.
fn membership_of(app: &Node, node_id: u64) -> MembershipView {
    use openraft::async_runtime::WatchReceiver;
    let receiver = app.raft.metrics();
    let metrics = receiver.borrow_watched();
    let membership = metrics.membership_config.membership();
    let view = MembershipView {
        peer_is_member: membership.get_node(&node_id).is_some(),
        includes_me: membership.get_node(&app.node_id()).is_some(),
    };
    view
}

/// May this peer join as `node_id` at these addresses? Its certificate must name that node id
/// and cover every address's host, and must not be revoked.
pub fn admit_join(
    app: &Node,
    peer: Option<&PeerIdentity>,
    node_id: u64,
    addresses: &[&str],
) -> Result<(), PeerRefusal> {
    let peer = peer.ok_or(PeerRefusal::NoCertificate)?;
    let certified = peer.node_id.ok_or(PeerRefusal::NoNodeId)?;
    if certified != node_id {
        return Err(PeerRefusal::WrongNodeId { certified, requested: node_id });
    }
    for addr in addresses {
        // The address is the peer's text: shown short and without control characters.
        let shown = || addr.chars().filter(|c| !c.is_control()).take(100).collect();
        let host = host_of(addr).ok_or_else(|| PeerRefusal::AddressNotCertified { host: shown() })?;
        if !peer.covers_host(&host) {
            return Err(PeerRefusal::AddressNotCertified { host });
        }
    }
    check_not_revoked(app, peer, node_id)
}

/// The refusal as the cluster channel's wire error (`{"Err": message}`), with 403.
pub fn refusal_response(refusal: &PeerRefusal) -> Response {
    (StatusCode::FORBIDDEN, Json(Err::<(), String>(refusal.to_string()))).into_response()
}

/// Middleware on the cluster router: every route but join needs a current member's certificate.
pub async fn gate(State(app): State<Arc<Node>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == JOIN_PATH {
        return next.run(request).await;
    }
    let peer = request.extensions().get::<PeerCert>().and_then(|p| p.0.clone());
    match admit(&app, peer.as_deref(), path.starts_with("/raft/")) {
        Ok(_) => next.run(request).await,
        Err(refusal) => {
            warn_refused(peer.as_deref(), &refusal, path);
            refusal_response(&refusal)
        }
    }
}

/// Logs a refusal at most once per peer per minute, so refused peers cannot flood the log.
pub fn warn_refused(peer: Option<&PeerIdentity>, refusal: &PeerRefusal, path: &str) {
    let key = peer.map_or_else(|| "unidentified".to_string(), |p| p.serial.clone());
    if REFUSAL_WARNINGS.allow(&key, Instant::now()) {
        tracing::warn!(%path, serial = %key, "{refusal} (further refusals of this peer are not logged for a minute)");
    }
}

static REFUSAL_WARNINGS: WarnLimiter = WarnLimiter::new();

/// Remembers when each peer was last warned about. Bounded: when the table is full of peers
/// warned within the interval, new peers are not logged (rather than growing without bound).
pub struct WarnLimiter {
    last: Mutex<Option<HashMap<String, Instant>>>,
}

impl WarnLimiter {
    pub const INTERVAL: Duration = Duration::from_secs(60);
    pub const MAX_PEERS: usize = 1024;

    pub const fn new() -> WarnLimiter {
        WarnLimiter { last: Mutex::new(None) }
    }

    /// Whether `key` may be logged at `now` (and if so, records it).
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        let mut guard = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let last = guard.get_or_insert_with(HashMap::new);
        let recent = |t: &Instant| now.saturating_duration_since(*t) < WarnLimiter::INTERVAL;
        if last.get(key).is_some_and(recent) {
            return false;
        }
        if !last.contains_key(key) && last.len() >= WarnLimiter::MAX_PEERS {
            last.retain(|_, t| recent(t));
            if last.len() >= WarnLimiter::MAX_PEERS {
                return false;
            }
        }
        last.insert(key.to_string(), now);
        true
    }
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter::new()
    }
}

/// Records a certificate of `node_id` in the replicated state, so that removing the node revokes
/// it. Refused (and so is the join) when the serial is revoked.
pub async fn record_certificate(app: &Node, node_id: u64, peer: &PeerIdentity) -> Result<(), String> {
    // A non-voter asks to join again and again: record its certificate once, not every time.
    let recorded = app.state.read(|s| s.node_certs.get(&node_id).is_some_and(|c| c.contains_key(&peer.serial)));
    if recorded {
        return Ok(());
    }
    let command =
        Command::NodeCertRecord { node_id, serial: peer.serial.clone(), not_after: peer.not_after, at: ids::now_ms() };
    match app.propose(command).await.map_err(|e| e.to_string())? {
        CommandResponse::Rejected(r) => Err(r.to_string()),
        _ => Ok(()),
    }
}

/// Records this node's own certificate (the initializing node never joins, so nobody else does).
pub async fn record_own_certificate(app: &Node) -> Result<(), String> {
    let own = PeerIdentity::from_pem_file(&app.config.tls.cert).map_err(|e| e.to_string())?;
    record_certificate(app, app.node_id(), &own).await
}

/// Revokes every certificate recorded for a removed node.
pub async fn revoke_certificates(app: &Node, node_id: u64) -> Result<(), String> {
    let command = Command::NodeCertsRevoke { node_id, now: ids::now_ms() };
    match app.propose(command).await.map_err(|e| e.to_string())? {
        CommandResponse::Rejected(r) => Err(r.to_string()),
        _ => {
            tracing::info!(node = node_id, "revoked the certificates of a removed node");
            Ok(())
        }
    }
}

/// What a removed node answers to every client request, and says in its log.
pub const REMOVED_MESSAGE: &str =
    "this node was removed from the cluster; wipe its data directory and join it as a new node";

/// The file whose presence means "this node was removed" (it survives restarts).
pub fn removed_marker(data_dir: &Path) -> PathBuf {
    data_dir.join("REMOVED")
}

pub fn is_removed(app: &Node) -> bool {
    app.removed.load(Ordering::Relaxed)
}

/// Marks this node removed: from now on (and after restarts) it serves no client request.
pub fn mark_removed(app: &Node, why: &str) {
    if app.removed.swap(true, Ordering::SeqCst) {
        return;
    }
    let marker = removed_marker(&app.config.data_dir);
    if let Err(e) = crate::tls::write_private(&marker, format!("{why}\n").as_bytes()) {
        tracing::error!(error = %e, "could not write the REMOVED marker; the node refuses requests until it restarts");
    }
    tracing::error!("{REMOVED_MESSAGE} ({why})");
}

/// Undoes `mark_removed` when a removal failed and this node is still a member.
pub fn unmark_removed(app: &Node) {
    if !app.removed.swap(false, Ordering::SeqCst) {
        return;
    }
    let marker = removed_marker(&app.config.data_dir);
    if let Err(e) = std::fs::remove_file(&marker) {
        tracing::error!(error = %e, marker = %marker.display(), "could not delete the REMOVED marker");
    }
    tracing::info!("the removal failed: this node is still a member and serves again");
}

/// At start: a node that finds its marker stays removed, and says so.
pub fn load_removed_marker(app: &Node) {
    if removed_marker(&app.config.data_dir).exists() {
        app.removed.store(true, Ordering::SeqCst);
        tracing::error!("{REMOVED_MESSAGE}: it serves no client request and issues no token");
    }
}

/// Marks this node removed once an applied membership no longer contains it, after it had been
/// a member (a removal it was not told about, e.g. the leader could not reach it).
pub async fn watch_membership(app: Arc<Node>) {
    use openraft::async_runtime::WatchReceiver;
    let me = app.node_id();
    // Woken by membership changes only (the server metrics); the data metrics, which change with
    // every write, are watched only while a membership without this node waits to be applied.
    let mut server = app.raft.server_metrics();
    let mut data = app.raft.data_metrics();
    let mut was_member = false;
    loop {
        let (member, applied) = {
            let stored = server.borrow_watched().membership_config.clone();
            let applied = data.borrow_watched().last_applied.as_ref().map(|l| l.index);
            (stored.membership().get_node(&me).is_some(), stored.log_id().as_ref().map(|l| l.index) <= applied)
        };
        was_member |= member;
        let woken = match (was_member && !member, applied) {
            (true, true) => {
                mark_removed(&app, "an applied membership no longer contains this node");
                return;
            }
            (true, false) => data.changed().await,
            _ => server.changed().await,
        };
        if woken.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity_of(common_name: &str, names: &[&str]) -> PeerIdentity {
        crate::tls::install_crypto_provider();
        let pki = crate::tls::DevPki::generate("test").unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let (cert, _) = pki.node_cert(common_name, &names).unwrap();
        let der = rustls_pemfile::certs(&mut cert.as_bytes()).next().unwrap().unwrap();
        PeerIdentity::from_der(&der).unwrap()
    }

    #[test]
    fn a_node_certificate_yields_its_node_id_serial_names_and_expiry() {
        let id = identity_of("node-42", &["127.0.0.1", "Node.Example", "::1"]);
        assert_eq!(id.node_id, Some(42));
        assert!(!id.serial.is_empty() && !id.serial.starts_with("00"), "{}", id.serial);
        assert!(id.serial.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(id.names, vec!["127.0.0.1", "node.example", "::1"]);
        assert!(id.not_after > ids::now_ms());
        assert!(id.covers_host("127.0.0.1") && id.covers_host("NODE.example") && id.covers_host("0:0:0:0:0:0:0:1"));
        assert!(!id.covers_host("127.0.0.2"));
        let other = identity_of("node-42", &["127.0.0.1"]);
        assert_ne!(id.serial, other.serial, "every certificate has its own serial");
    }

    #[test]
    fn a_common_name_not_of_the_form_node_id_names_no_node() {
        for cn in ["intruder", "node-", "node-0", "node-007", "node-1x", "node--1", "xnode-1"] {
            assert_eq!(identity_of(cn, &["127.0.0.1"]).node_id, None, "{cn}");
        }
        assert_eq!(node_id_of_common_name("node-18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(PeerIdentity::from_der(b"").is_err());
        assert!(PeerIdentity::from_der(&[0x30, 0x82, 0xff, 0xff, 0x01]).is_err());
    }

    #[test]
    fn hosts_are_taken_from_urls_and_host_port_pairs() {
        assert_eq!(host_of("https://127.0.0.1:8200").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("127.0.0.1:8201").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8201").as_deref(), Some("::1"));
        assert_eq!(host_of("Vault.Example:8201").as_deref(), Some("vault.example"));
        assert_eq!(host_of(""), None);
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_peer_per_minute_in_a_bounded_table() {
        let limiter = WarnLimiter::new();
        let t0 = Instant::now();
        assert!(limiter.allow("a", t0));
        assert!(!limiter.allow("a", t0 + Duration::from_secs(59)));
        assert!(limiter.allow("b", t0 + Duration::from_secs(1)));
        assert!(limiter.allow("a", t0 + WarnLimiter::INTERVAL));
        let limiter = WarnLimiter::new();
        for n in 0..WarnLimiter::MAX_PEERS {
            assert!(limiter.allow(&n.to_string(), t0));
        }
        assert!(!limiter.allow("one-too-many", t0), "a full table of recent peers logs no new one");
        assert!(limiter.allow("one-too-many", t0 + WarnLimiter::INTERVAL), "old entries make room");
        assert!(limiter.last.lock().unwrap().as_ref().unwrap().len() <= WarnLimiter::MAX_PEERS);
    }
}
