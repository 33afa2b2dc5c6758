//! Certifying joining nodes: the cluster keeps its CA key sealed in the replicated state; a node
//! presenting a one-time join token receives a certificate for its node id and addresses, valid
//! for `tls.cert_validity_days`. A token never certifies a current member's node id (that would
//! let its holder impersonate the member), and a token issued for a node id certifies only it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use citadel_core::command::{Command, Response};
use citadel_core::state::ClusterCa;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::ids;
use crate::node::Node;
use crate::node_error::NodeError;
use crate::peer::PeerIdentity;
use crate::tls::{write_private, DevPki, NodeCert};

const AAD_CLUSTER_CA: &[u8] = b"citadel/cluster-ca";

/// After init: if this node was given the CA key, hand it to the cluster (sealed).
pub async fn store_cluster_ca(app: &Node) -> Result<()> {
    let (Some(key_path), Some(common_name)) = (&app.config.tls.ca_key, &app.config.tls.ca_common_name) else {
        return Ok(());
    };
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read(key_path).with_context(|| format!("cannot read tls.ca_key {}", key_path.display()))?,
    );
    let cert_pem = std::fs::read_to_string(&app.config.tls.ca)?;
    let keys = app.keys()?;
    let key_ciphertext = keys.keyring.encrypt(&ids::random_bytes(), AAD_CLUSTER_CA, &key_pem);
    let ca = ClusterCa { common_name: common_name.clone(), cert_pem, key_ciphertext };
    match app.propose(Command::SetClusterCa { ca }).await? {
        Response::Rejected(r) => bail!("{r}"),
        _ => Ok(()),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BootstrapRequest {
    pub join_token: String,
    pub node_id: u64,
    /// IP addresses and DNS names the certificate must cover.
    pub names: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BootstrapReply {
    pub certificate: String,
    pub private_key: String,
    pub ca_certificate: String,
}

/// Issues a node certificate for a valid join token, spending the token.
pub async fn issue(app: &Node, req: &BootstrapRequest) -> Result<BootstrapReply, String> {
    if req.node_id == 0 {
        return Err("node_id must be a positive integer".into());
    }
    if is_member(app, req.node_id) {
        return Err(format!(
            "node {} is a current member of this cluster: a join token cannot certify a member's node id; \
             give the new node an unused node_id",
            req.node_id
        ));
    }
    check_names(&req.names)?;
    let keys = app.keys().map_err(|_| "the node is sealed".to_string())?;
    let hash = citadel_core::token::token_hash(&keys.keyring.token_hmac_key, &req.join_token);
    let (pki, ca_cert_pem) = cluster_issuer(app)?;
    let spend = Command::JoinTokenUse { hash, now: ids::now_ms(), node_id: Some(req.node_id) };
    let spent = app.propose(spend).await.map_err(|e| e.to_string())?;
    if let Response::Rejected(r) = spent {
        return Err(r.to_string());
    }
    let (certificate, private_key) = pki
        .node_cert_valid_for(&format!("node-{}", req.node_id), &req.names, app.config.tls.cert_validity_days)
        .map_err(|e| e.to_string())?;
    tracing::info!(node = req.node_id, "issued a node certificate for a join token");
    Ok(BootstrapReply { certificate, private_key, ca_certificate: ca_cert_pem })
}

fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() || names.len() > 16 {
        return Err("names must list between 1 and 16 addresses or DNS names".into());
    }
    if names
        .iter()
        .any(|n| n.is_empty() || n.len() > 253 || !n.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c)))
    {
        return Err("names must be IP addresses or DNS names".into());
    }
    Ok(())
}

/// The cluster CA as an issuer (its key unsealed with the keyring), and its certificate (PEM).
fn cluster_issuer(app: &Node) -> Result<(DevPki, String), String> {
    let keys = app.keys().map_err(|_| "the node is sealed".to_string())?;
    let ca = app
        .state
        .read(|s| s.cluster_ca.clone())
        .ok_or("this cluster holds no CA key: start the initializing node with tls.ca_key to certify nodes")?;
    let key_pem = zeroize::Zeroizing::new(
        keys.keyring.decrypt(AAD_CLUSTER_CA, &ca.key_ciphertext).map_err(|e| format!("cluster CA key: {e}"))?,
    );
    let key_pem = std::str::from_utf8(&key_pem).map_err(|_| "cluster CA key is not PEM")?;
    let pki = DevPki::from_key(&ca.common_name, &ca.cert_pem, key_pem).map_err(|e| e.to_string())?;
    Ok((pki, ca.cert_pem))
}

/// Leader side of a renewal: a fresh certificate for the node id and names of the member's
/// current one (`peer`, which the cluster gate admitted as a member), recorded so that removing
/// the member revokes it too.
pub async fn renew(app: &Node, peer: &PeerIdentity) -> Result<BootstrapReply, String> {
    let node_id = peer.node_id.ok_or_else(|| crate::peer::PeerRefusal::NoNodeId.to_string())?;
    if !app.is_leader() {
        let not_leader = NodeError::NotLeader { leader: app.raft_metrics().current_leader };
        return Err(format!("{not_leader}: ask the leader to renew a certificate"));
    }
    check_names(&peer.names)?;
    let (pki, ca_certificate) = cluster_issuer(app)?;
    let (certificate, private_key) = pki
        .node_cert_valid_for(&format!("node-{node_id}"), &peer.names, app.config.tls.cert_validity_days)
        .map_err(|e| e.to_string())?;
    let renewed = identity_of_pem(&certificate)?;
    crate::peer::record_certificate(app, node_id, &renewed).await?;
    tracing::info!(node = node_id, serial = %renewed.serial, "renewed a member's certificate");
    Ok(BootstrapReply { certificate, private_key, ca_certificate })
}

fn identity_of_pem(pem: &str) -> Result<PeerIdentity, String> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM text")?
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    PeerIdentity::from_der(&der)
}

/// How often a member looks at its certificate's expiry, and how soon it retries a renewal
/// that failed (no leader, sealed leader, ...).
const RENEW_CHECK: Duration = Duration::from_secs(60);
const RENEW_RETRY: Duration = Duration::from_secs(5);

/// Member side: renews this node's certificate once it expires within `tls.renew_before_days`.
pub async fn renew_when_due(app: Arc<Node>, node_cert: Arc<NodeCert>) {
    let mut reported = String::new();
    // The expiry of a renewed certificate that was itself already due (the leader's validity is
    // shorter than this node's renewal window): not renewed again, or the node would loop.
    let mut too_short = None;
    loop {
        let wait = match renew_if_due(&app, &node_cert, &mut too_short).await {
            Ok(()) => RENEW_CHECK,
            Err(e) => {
                if e != reported {
                    tracing::warn!(error = %e, "this node's certificate is due for renewal, which failed; retrying");
                    reported = e;
                }
                RENEW_RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn renew_window_ms(app: &Node) -> u64 {
    u64::from(app.config.tls.renew_before_days) * 86_400_000
}

/// Renews if due (and this node is a member that can reach a leader); Ok when nothing is due.
async fn renew_if_due(app: &Node, node_cert: &NodeCert, too_short: &mut Option<u64>) -> Result<(), String> {
    let current = PeerIdentity::from_der(&node_cert.current().cert[0])?;
    app.metrics.observe_certificate_expiry(current.not_after);
    let due = ids::now_ms().saturating_add(renew_window_ms(app)) >= current.not_after;
    if !due || crate::peer::is_removed(app) || *too_short == Some(current.not_after) {
        return Ok(());
    }
    let metrics = app.raft_metrics();
    let membership = metrics.membership_config.membership();
    if membership.get_node(&app.node_id()).is_none() {
        return Err("this node is not a member yet".into());
    }
    let leader = metrics.current_leader.and_then(|id| membership.get_node(&id)).ok_or("the cluster has no leader")?;
    let reply: BootstrapReply =
        app.peers.call(&leader.cluster_addr, "cluster/renew-cert", &(), Duration::from_secs(30)).await?;
    let renewed = identity_of_pem(&reply.certificate)?;
    install(app, node_cert, &reply).map_err(|e| format!("cannot install the renewed certificate: {e:#}"))?;
    tracing::info!(serial = %renewed.serial, "renewed this node's certificate; new connections use it");
    if ids::now_ms().saturating_add(renew_window_ms(app)) >= renewed.not_after {
        tracing::warn!(
            "the leader issues certificates valid for less than tls.renew_before_days: this node will not \
             renew again until the certificate it has is replaced or this node restarts"
        );
        *too_short = Some(renewed.not_after);
    }
    Ok(())
}

/// Writes the renewed key (0600) and certificate atomically (a temporary file renamed over the
/// old one), then presents them on new connections.
fn install(app: &Node, node_cert: &NodeCert, reply: &BootstrapReply) -> Result<()> {
    let (cert_path, key_path) = (&app.config.tls.cert, &app.config.tls.key);
    let staged = |path: &std::path::Path| path.with_file_name(format!(".{}.new", file_name(path)));
    let (cert_new, key_new) = (staged(cert_path), staged(key_path));
    write_private(&key_new, reply.private_key.as_bytes())?;
    write_private(&cert_new, reply.certificate.as_bytes())?;
    // Check the pair before it replaces anything: a mismatch must not stop the next start.
    NodeCert::load(&cert_new, &key_new)?;
    std::fs::rename(&key_new, key_path).with_context(|| format!("cannot replace {}", key_path.display()))?;
    std::fs::rename(&cert_new, cert_path).with_context(|| format!("cannot replace {}", cert_path.display()))?;
    node_cert.reload(cert_path, key_path)
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Whether `node_id` is a voter or non-voter of this node's view of the membership.
pub fn is_member(app: &Node, node_id: u64) -> bool {
    app.raft_metrics().membership_config.membership().get_node(&node_id).is_some()
}

/// At start: a node without its certificate files, configured with a join token, fetches them.
pub async fn bootstrap_if_needed(config: &Config) -> Result<()> {
    if config.tls.cert.exists() && config.tls.key.exists() {
        return Ok(());
    }
    let Some(join) = config.retry_join.iter().find(|j| j.join_token.is_some()) else {
        bail!(
            "the certificate files {} and {} do not exist; provide them, or a [[retry_join]] join_token to obtain them",
            config.tls.cert.display(),
            config.tls.key.display()
        );
    };
    let (addr, token) =
        (join.leader_api_addr.as_deref().unwrap_or_default(), join.join_token.as_deref().unwrap_or_default());
    let tls = crate::tls::client_config(&config.tls.ca)?;
    let http = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(30)).build()?;
    // The hosts it listens on and the hosts it advertises: the leader checks the latter at join.
    let mut names = vec![config.api_addr.ip().to_string(), config.cluster_addr.ip().to_string()];
    names.extend([config.api_url(), config.cluster_url()].iter().filter_map(|a| crate::peer::host_of(a)));
    names.sort();
    names.dedup();
    let body = BootstrapRequest { join_token: token.to_string(), node_id: config.node_id, names };
    let url = format!("{}/v1/sys/storage/raft/bootstrap", addr.trim_end_matches('/'));
    let response = http.post(&url).json(&body).send().await.with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let reply: serde_json::Value = response.json().await.context("bad answer to the bootstrap request")?;
    if !status.is_success() {
        bail!("{url} refused the join token: {}", reply["errors"]);
    }
    let reply: BootstrapReply = serde_json::from_value(reply).context("bad answer to the bootstrap request")?;
    write_private(&config.tls.key, reply.private_key.as_bytes())?;
    std::fs::write(&config.tls.cert, &reply.certificate)?;
    tracing::info!(cert = %config.tls.cert.display(), "received a node certificate with the join token");
    Ok(())
}
