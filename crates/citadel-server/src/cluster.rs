//! Node-to-node transport: Raft RPCs as JSON over HTTPS with mutual TLS on the cluster port.
//!
//! Both ends present certificates from the cluster CA; a peer with any other certificate is
//! refused during the handshake. Past the handshake, only members may use the routes, and
//! only with unrevoked certificates (`peer::gate`; joining has its own checks).
//! Peers speak HTTP/2, so one connection per peer is multiplexed
//! between Raft's messages, forwarded commands and snapshot transfers. openraft's messages travel as its serde encoding: the wire
//! needs both ends on the same protocol version (checked at join), unlike the disk format.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::extract::{Extension, State};
use axum::routing::post;
use axum::{Json, Router};
use citadel_storage::types::{Raft, Snapshot, SnapshotMeta, Vote};
use citadel_storage::{NodeInfo, StateReader, TypeConfig};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::RaftNetworkV2;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use citadel_core::command::{Command, Response};

use crate::config::Config;
use crate::forwarded::ForwardError;
use crate::node::Node;
use crate::peer::PeerCert;

/// Wire form of a full snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotTransfer {
    vote: Vote,
    meta: SnapshotMeta,
    #[serde(with = "citadel_core::encoding")]
    data: Vec<u8>,
}

/// Every RPC answers `Ok(response)` or `Err(message)`. The message is for people (a refusal
/// by the member-only gate, a failed join); an outcome a caller acts on travels inside `Ok` as
/// a typed value (`forwarded::ForwardError`).
type Wire<T> = Result<T, String>;

#[derive(Clone)]
pub struct ClusterNetwork {
    http: reqwest::Client,
    /// Expands a snapshot to its full form (with the audit events) before it is sent.
    state: StateReader,
}

/// Version of the node-to-node protocol. Nodes refuse to form a cluster across versions.
/// 2: audit events travel with their body's stored bytes (storage format 2).
/// 3: forwarded proposals and log entries may be `Command::Audited` (a write's audit event in
///    its own entry, storage format 4), which a node of version 2 cannot decode.
/// 4: a snapshot sent to a follower is storage format 5 (the audit events read back from the
///    sender's audit store), which a node of version 3 refuses to install.
pub const PROTOCOL_VERSION: u32 = 4;

impl ClusterNetwork {
    pub fn new(config: &Config, node_cert: Arc<crate::tls::NodeCert>, state: StateReader) -> Result<ClusterNetwork> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(crate::tls::root_store(&config.tls.ca)?)
            .with_client_cert_resolver(node_cert);
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        // HTTP/2: one long-lived, multiplexed connection per peer carries Raft messages,
        // forwarded commands and snapshots alike.
        // Cluster traffic leaves from the cluster address, so peers (and their firewalls or
        // fault proxies) see this node at the address it was configured with.
        let source = Some(config.cluster_addr.ip()).filter(|ip| !ip.is_unspecified());
        let http = reqwest::Client::builder()
            .local_address(source)
            .use_preconfigured_tls(tls)
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .connect_timeout(Duration::from_millis(config.raft.election_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(ClusterNetwork { http, state })
    }

    /// A client for Citadel's own cluster calls (join, forwarded proposals, read index).
    pub fn peers(&self) -> PeerClient {
        PeerClient { http: self.http.clone() }
    }
}

/// Calls to another node's cluster port: Raft's RPCs and Citadel's own alike.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
}

/// Why a call to a peer failed.
#[derive(Debug)]
pub enum PeerError {
    /// The request could not be delivered or got no answer (refused, reset, timed out).
    Unreachable(String),
    /// The peer answered with an error, or with something undecodable.
    Refused(String),
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Unreachable(e) | PeerError::Refused(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for PeerError {}

impl From<PeerError> for String {
    fn from(e: PeerError) -> String {
        e.to_string()
    }
}

/// An error with its causes ("error sending request: connection refused"), which reqwest's
/// own message leaves out.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl PeerClient {
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        cluster_addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let response = self
            .http
            .post(format!("https://{cluster_addr}/{path}"))
            .json(req)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| PeerError::Unreachable(format!("cannot reach {cluster_addr}: {}", chain(&e))))?;
        let wire: Wire<Resp> = response
            .json()
            .await
            .map_err(|e| PeerError::Refused(format!("bad answer from {cluster_addr}: {}", chain(&e))))?;
        wire.map_err(PeerError::Refused)
    }
}

pub struct PeerConnection {
    peers: PeerClient,
    cluster_addr: String,
    state: StateReader,
}

impl RaftNetworkFactory<TypeConfig> for ClusterNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, _target: u64, node: &NodeInfo) -> PeerConnection {
        PeerConnection { peers: self.peers(), cluster_addr: node.cluster_addr.clone(), state: self.state.clone() }
    }
}

/// The least time an append carrying entries may take (a heartbeat keeps openraft's own).
const BULK_RPC_LIMIT: Duration = Duration::from_secs(5);
/// The least time a whole snapshot may take to send and install.
const SNAPSHOT_RPC_LIMIT: Duration = Duration::from_secs(120);
/// Largest body a peer may send (a snapshot, JSON-encoded). Peers are authenticated members.
const MAX_PEER_BODY: usize = 1 << 30;

impl PeerConnection {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.peers.call(&self.cluster_addr, &format!("raft/{rpc}"), req, timeout).await.map_err(|e| match e {
            PeerError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
            PeerError::Refused(_) => RPCError::Network(NetworkError::new(&e)),
        })
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft allows one heartbeat interval per append; a catch-up batch of large entries
        // cannot cross TLS and a follower's fsync that fast, and would be retried forever.
        let timeout = if rpc.entries.is_empty() { option.hard_ttl() } else { option.hard_ttl().max(BULK_RPC_LIMIT) };
        self.call("append", &rpc, timeout).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("pre-vote", &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // openraft hands over the local form; a follower needs the audit events too.
        let state = self.state.clone();
        let data = tokio::task::spawn_blocking(move || state.full_snapshot(&snapshot.snapshot))
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let transfer = SnapshotTransfer { vote, meta: snapshot.meta, data };
        self.call("snapshot", &transfer, option.hard_ttl().max(SNAPSHOT_RPC_LIMIT)).await.map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            RPCError::Timeout(t) => StreamingError::Timeout(t),
            RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
        })
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer-leader", &req, option.hard_ttl()).await
    }
}

/// The cluster port's routes: inbound Raft RPCs, and Citadel's own calls (join, forwarded
/// proposals, read index, status), all behind mutual TLS.
pub fn router(app: Arc<Node>) -> Router {
    let appends = Router::new().route("/raft/append", post(append)).with_state(app.clone());
    let raft = Router::new()
        .route("/raft/vote", post(vote))
        .route("/raft/pre-vote", post(pre_vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/transfer-leader", post(transfer_leader))
        .with_state(app.raft.clone());
    let cluster = Router::new()
        .route(crate::peer::JOIN_PATH, post(join))
        .route("/cluster/propose", post(propose))
        .route("/cluster/read-index", post(read_index))
        .route("/cluster/status", post(status))
        .route("/cluster/ha-status", post(ha_status))
        .route("/cluster/transfer-leader", post(transfer))
        .route("/cluster/remove-peer", post(remove_peer))
        .route("/cluster/leave", post(leave))
        .route("/cluster/renew-cert", post(renew_cert))
        .with_state(app.clone());
    // The gate runs before a body is read: a refused peer cannot make this node buffer one.
    raft.merge(appends)
        .merge(cluster)
        .layer(axum::middleware::from_fn_with_state(app, crate::peer::gate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_PEER_BODY))
}

/// What a node presents when it asks to join.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: u64,
    pub node: NodeInfo,
    pub protocol_version: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JoinReply {
    /// Joined; `voter` tells whether it got a vote or replicates as a non-voter.
    Joined { voter: bool },
    /// Not the leader: ask this cluster address instead.
    Redirect { leader_cluster_addr: String },
}

async fn join(
    State(app): State<Arc<Node>>,
    Extension(PeerCert(peer)): Extension<PeerCert>,
    Json(req): Json<JoinRequest>,
) -> Json<Wire<JoinReply>> {
    Json(crate::membership::accept_join(&app, peer.as_deref(), req).await)
}

/// A member asks the leader for a fresh certificate for the node id and names of its current one.
async fn renew_cert(
    State(app): State<Arc<Node>>,
    Extension(PeerCert(peer)): Extension<PeerCert>,
) -> Json<Wire<crate::pki::BootstrapReply>> {
    Json(match peer {
        Some(peer) => crate::pki::renew(&app, &peer).await,
        None => Err(crate::peer::PeerRefusal::NoCertificate.to_string()),
    })
}

async fn propose(
    State(app): State<Arc<Node>>,
    axum::Extension(peer): axum::Extension<crate::peer::PeerCert>,
    Json(command): Json<Command>,
) -> Json<Wire<Result<Response, ForwardError>>> {
    let sender = peer.0.and_then(|p| p.node_id);
    Json(Ok(crate::forwarded::commit(&app, sender, command).await))
}

async fn read_index(State(app): State<Arc<Node>>) -> Json<Wire<Result<u64, ForwardError>>> {
    Json(Ok(app.read_index_local().await.map_err(ForwardError::from)))
}

/// A node's view of itself, for the HA table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub sealed: bool,
    pub version: String,
    pub uptime_ms: u64,
    pub applied_index: u64,
    pub active_sessions: usize,
}

async fn status(State(app): State<Arc<Node>>) -> Json<Wire<NodeStatus>> {
    Json(Ok(app.node_status()))
}

async fn ha_status(State(app): State<Arc<Node>>) -> Json<Wire<serde_json::Value>> {
    Json(Ok(crate::ha::status(&app).await))
}

async fn remove_peer(State(app): State<Arc<Node>>, Json(target): Json<u64>) -> Json<Wire<()>> {
    Json(crate::membership::remove_peer(&app, target).await)
}

async fn leave(State(app): State<Arc<Node>>, Json(leaving): Json<bool>) -> Json<Wire<()>> {
    Json(crate::membership::leave(&app, leaving).await)
}

async fn transfer(State(app): State<Arc<Node>>, Json(target): Json<u64>) -> Json<Wire<()>> {
    Json(crate::membership::transfer_leadership(&app, target).await)
}

fn wire<T, E: std::fmt::Display>(r: Result<T, E>) -> Json<Wire<T>> {
    Json(r.map_err(|e| e.to_string()))
}

async fn append(
    State(app): State<Arc<Node>>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Wire<AppendEntriesResponse<TypeConfig>>> {
    let result = app.raft.append_entries(req).await;
    // Any answer but "your vote is stale" means a live leader is talking to us.
    if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
        app.touch_leader();
    }
    wire(result)
}

async fn vote(
    State(raft): State<Raft>,
    Json(req): Json<VoteRequest<TypeConfig>>,
) -> Json<Wire<VoteResponse<TypeConfig>>> {
    wire(raft.vote(req).await)
}

async fn pre_vote(
    State(raft): State<Raft>,
    Json(req): Json<VoteRequest<TypeConfig>>,
) -> Json<Wire<VoteResponse<TypeConfig>>> {
    wire(raft.pre_vote(req).await)
}

async fn snapshot(
    State(raft): State<Raft>,
    Json(req): Json<SnapshotTransfer>,
) -> Json<Wire<SnapshotResponse<TypeConfig>>> {
    let snapshot = Snapshot { meta: req.meta, snapshot: req.data };
    wire(raft.install_full_snapshot(req.vote, snapshot).await)
}

async fn transfer_leader(
    State(raft): State<Raft>,
    Json(req): Json<TransferLeaderRequest<TypeConfig>>,
) -> Json<Wire<TransferLeaderResponse<TypeConfig>>> {
    wire(raft.handle_transfer_leader(req).await)
}
