//! Node-to-node transport on the cluster port, with mutual TLS: Raft's appends and votes on
//! the Raft stream (`raft_stream`), everything else as JSON over HTTP/2.
//!
//! Both ends present certificates from the cluster CA; a peer with any other certificate is
//! refused during the handshake. Past the handshake, only members may use the routes, and
//! only with unrevoked certificates (`peer::gate`; joining has its own checks).
//! One HTTP/2 connection per peer is multiplexed between forwarded commands, snapshot transfers
//! and Citadel's own calls. openraft's messages travel as its serde encoding: the wire
//! needs both ends on the same protocol version (checked at join), unlike the disk format.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::extract::{Extension, State};
use axum::routing::post;
use axum::{Json, Router};
use citadel_storage::state_machine::TransferPart;
use citadel_storage::types::{Raft, Snapshot, SnapshotData, SnapshotMeta, Vote};
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
use crate::raft_stream::{RaftStreams, Rpc};

/// Wire form of a snapshot: this header as one JSON line (the snapshot in transfer form,
/// without its tokens, users, secrets and audit events), then each token, each user, each
/// secret and each audit event it covers as one line, streamed from the sender's snapshot and
/// store into the receiver's staging tables (`StateReader::write_transfer`,
/// `SnapshotReceiver`), so neither node holds any of them whole in memory.
#[derive(Serialize, Deserialize)]
struct SnapshotTransfer {
    vote: Vote,
    meta: SnapshotMeta,
    #[serde(with = "citadel_core::encoding")]
    data: Vec<u8>,
}

/// Longest audit event line of a snapshot transfer: one stored event (its fields are capped far
/// below this). A secret's line, which may hold a thousand versions, is bounded as the header is.
const MAX_SNAPSHOT_EVENT_LINE: usize = 1 << 20;
/// Bytes of a snapshot transfer's lines handed to the receiver at once (or 4,096 lines).
const SNAPSHOT_BATCH_BYTES: usize = 32 << 20;
/// Bytes per chunk of a snapshot transfer's body, and chunks in flight.
const SNAPSHOT_CHUNK: usize = 256 << 10;
const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 8;

/// Every RPC answers `Ok(response)` or `Err(message)`. The message is for people (a refusal
/// by the member-only gate, a failed join); an outcome a caller acts on travels inside `Ok` as
/// a typed value (`forwarded::ForwardError`).
pub(crate) type Wire<T> = Result<T, String>;

#[derive(Clone)]
pub struct ClusterNetwork {
    http: reqwest::Client,
    /// Raft's appends and votes.
    streams: RaftStreams,
    /// Streams a snapshot's secrets and audit events when it is sent.
    state: StateReader,
}

/// Version of the node-to-node protocol. Nodes refuse to form a cluster across versions.
/// 2: audit events travel with their body's stored bytes (storage format 2).
/// 3: forwarded proposals and log entries may be `Command::Audited` (a write's audit event in
///    its own entry, storage format 4), which a node of version 2 cannot decode.
/// 4: a snapshot travels as a header line (storage format 5) followed by its audit events, one
///    per line, which a node of version 3 cannot read.
/// 5: log entries may be `Command::NodeSetActive` (a deactivated member, §10.1) or
///    `Command::SnapshotAuto*` (scheduled snapshots, §10.2), and the leader asks members for
///    `cluster/lifecycle` and `cluster/resync`.
/// 6: log entries may be `Command::AlertSink*` and `Command::Alerts*` (§11.2).
/// 7: a snapshot's secrets travel beside its state (storage format 6), where a node of version
///    6 would find every mount empty.
/// 8: appends and votes travel on the Raft stream (ALPN `citadel-raft/8`), not as HTTP routes.
/// 9: a snapshot's secrets follow its header one per line, before its audit events; a node of
///    version 8 would read them as events and refuse every snapshot.
/// 10: a snapshot's tokens and users travel beside its state (storage format 8), which a node of
///    version 9 refuses as a format it does not read.
/// 11: a snapshot's tokens and users follow its header one per line, before its secrets; a node
///    of version 10 would read them as secrets and refuse every snapshot.
/// 12: `apply` spends a limited-use token's use once per request (`TokenEntry::last_use_request`),
///    where a node of version 11 would spend a retried proposal's twice and its replica differ.
pub const PROTOCOL_VERSION: u32 = 12;

impl ClusterNetwork {
    pub fn new(config: &Config, node_cert: Arc<crate::tls::NodeCert>, state: StateReader) -> Result<ClusterNetwork> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(crate::tls::root_store(&config.tls.ca)?)
            .with_client_cert_resolver(node_cert);
        let connect_timeout = Duration::from_millis(config.raft.election_timeout_ms);
        // Cluster traffic leaves from the cluster address, so peers (and their firewalls or
        // fault proxies) see this node at the address it was configured with.
        let source = Some(config.cluster_addr.ip()).filter(|ip| !ip.is_unspecified());
        let streams = RaftStreams::new(tls.clone(), source, connect_timeout);
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        // HTTP/2: one long-lived, multiplexed connection per peer carries forwarded commands,
        // snapshots and Citadel's own calls.
        let http = reqwest::Client::builder()
            .local_address(source)
            .use_preconfigured_tls(tls)
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(ClusterNetwork { http, streams, state })
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
        let body =
            serde_json::to_vec(req).map_err(|e| PeerError::Refused(format!("cannot encode the request: {e}")))?;
        self.call_with_body(cluster_addr, path, body.into(), timeout).await
    }

    /// As `call`, with a body already encoded (or streamed).
    async fn call_with_body<Resp: DeserializeOwned>(
        &self,
        cluster_addr: &str,
        path: &str,
        body: reqwest::Body,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let response = self
            .http
            .post(format!("https://{cluster_addr}/{path}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
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
    streams: RaftStreams,
    cluster_addr: String,
    state: StateReader,
}

impl RaftNetworkFactory<TypeConfig> for ClusterNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, _target: u64, node: &NodeInfo) -> PeerConnection {
        PeerConnection {
            peers: self.peers(),
            streams: self.streams.clone(),
            cluster_addr: node.cluster_addr.clone(),
            state: self.state.clone(),
        }
    }
}

/// The least time an append carrying entries may take (a heartbeat keeps openraft's own).
const BULK_RPC_LIMIT: Duration = Duration::from_secs(5);
/// The least time a whole snapshot may take to send and install: a million audit events are
/// checked and indexed on the way in.
const SNAPSHOT_RPC_LIMIT: Duration = Duration::from_secs(600);
/// Largest body a peer may send (a snapshot, JSON-encoded). Peers are authenticated members.
pub(crate) const MAX_PEER_BODY: usize = 1 << 30;

impl PeerConnection {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.streams.call(&self.cluster_addr, rpc, req, timeout).await.map_err(|e| rpc_error(&e))
    }

    async fn call_http<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.peers.call(&self.cluster_addr, path, req, timeout).await.map_err(|e| rpc_error(&e))
    }
}

fn rpc_error(e: &PeerError) -> RPCError<TypeConfig> {
    match e {
        PeerError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(e)),
        PeerError::Refused(_) => RPCError::Network(NetworkError::new(e)),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft allows one heartbeat interval per append; a catch-up batch of large entries
        // cannot cross TLS and a follower's fsync that fast, and would be retried forever.
        let timeout = if rpc.entries.is_empty() { option.hard_ttl() } else { option.hard_ttl().max(BULK_RPC_LIMIT) };
        self.call(Rpc::Append, &rpc, timeout).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::PreVote, &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(SNAPSHOT_CHUNKS_IN_FLIGHT);
        let state = self.state.clone();
        // The snapshot is cut into lines on a blocking thread (its events read from a store
        // transaction) and flows through a bounded channel: the body never holds more than a
        // few chunks.
        tokio::task::spawn_blocking(move || {
            let (snapshot_meta, local) = (snapshot.meta, snapshot.snapshot);
            let SnapshotData::Local(mut local) = local else {
                let _ = tx.blocking_send(Err(std::io::Error::other("only this node's own snapshot is sent")));
                return;
            };
            let mut meta = Some(snapshot_meta);
            let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK * 2);
            let written = state.write_transfer(&mut local, &mut |part| {
                match part {
                    TransferPart::Header(data) => {
                        let meta = meta.take().ok_or_else(|| std::io::Error::other("a second snapshot header"))?;
                        let header = SnapshotTransfer { vote, meta, data };
                        serde_json::to_writer(&mut chunk, &header).map_err(std::io::Error::other)?;
                    }
                    TransferPart::Line(line) => chunk.extend_from_slice(line),
                }
                chunk.push(b'\n');
                if chunk.len() >= SNAPSHOT_CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(SNAPSHOT_CHUNK * 2));
                    tx.blocking_send(Ok(full)).map_err(|_| std::io::Error::other("the transfer was abandoned"))?;
                }
                Ok(())
            });
            let _ = tx.blocking_send(written.map(|()| chunk));
        });
        let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) });
        let timeout = option.hard_ttl().max(SNAPSHOT_RPC_LIMIT);
        let call =
            self.peers.call_with_body(&self.cluster_addr, "raft/snapshot", reqwest::Body::wrap_stream(body), timeout);
        call.await.map_err(|e| match e {
            PeerError::Unreachable(_) => StreamingError::Unreachable(Unreachable::new(&e)),
            PeerError::Refused(_) => StreamingError::Network(NetworkError::new(&e)),
        })
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call_http("raft/transfer-leader", &req, option.hard_ttl()).await
    }
}

/// The cluster port's HTTP routes: snapshots, leadership transfer, and Citadel's own calls
/// (join, forwarded proposals, read index, status), all behind mutual TLS. Appends and votes
/// come on the Raft stream.
pub fn router(app: Arc<Node>) -> Router {
    let snapshots = Router::new().route("/raft/snapshot", post(snapshot)).with_state(app.clone());
    let raft = Router::new().route("/raft/transfer-leader", post(transfer_leader)).with_state(app.raft.clone());
    let cluster = Router::new()
        .route(crate::peer::JOIN_PATH, post(join))
        .route("/cluster/propose", post(propose))
        .route("/cluster/read-index", post(read_index))
        .route("/cluster/status", post(status))
        .route("/cluster/ha-status", post(ha_status))
        .route("/cluster/transfer-leader", post(transfer))
        .route("/cluster/remove-peer", post(remove_peer))
        .route("/cluster/leave", post(leave))
        .route("/cluster/lifecycle", post(lifecycle))
        .route("/cluster/resync", post(resync))
        .route("/cluster/renew-cert", post(renew_cert))
        .with_state(app.clone());
    // The gate runs before a body is read: a refused peer cannot make this node buffer one.
    raft.merge(snapshots)
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
    /// It started with no replicated state (absent from older nodes).
    #[serde(default)]
    pub started_empty: bool,
    pub applied_index: u64,
    pub active_sessions: usize,
    /// Audit events in its spool not yet in the replicated log (absent from older nodes).
    #[serde(default)]
    pub audit_backlog: u64,
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

async fn lifecycle(
    State(app): State<Arc<Node>>,
    Json(req): Json<crate::lifecycle::Request>,
) -> Json<Wire<Result<(), crate::lifecycle::LifecycleError>>> {
    Json(Ok(crate::lifecycle::run(&app, req).await))
}

async fn resync(State(app): State<Arc<Node>>, Json(()): Json<()>) -> Json<Wire<()>> {
    Json(crate::resync::request(&app).await)
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

/// An append from the leader, as the Raft stream delivers it.
pub(crate) async fn receive_append(
    app: &Node,
    req: AppendEntriesRequest<TypeConfig>,
) -> Wire<AppendEntriesResponse<TypeConfig>> {
    let result = app.raft.append_entries(req).await;
    // Any answer but "your vote is stale" means a live leader is talking to us.
    if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
        app.touch_leader();
    }
    result.map_err(|e| e.to_string())
}

/// Receives a snapshot: its header line, then its tokens, users, secrets and audit events line
/// by line, each checked and staged as it comes; only once all arrived is the snapshot
/// installed.
async fn snapshot(State(app): State<Arc<Node>>, body: axum::body::Body) -> Json<Wire<SnapshotResponse<TypeConfig>>> {
    Json(receive_snapshot(&app, body).await)
}

async fn receive_snapshot(app: &Node, body: axum::body::Body) -> Wire<SnapshotResponse<TypeConfig>> {
    let mut lines = Lines { stream: body.into_data_stream(), buf: Vec::new(), start: 0, searched: 0 };
    let header = lines.next(MAX_PEER_BODY).await?.ok_or("an empty snapshot transfer")?;
    let header: SnapshotTransfer = serde_json::from_slice(&header).map_err(|e| format!("snapshot header: {e}"))?;
    let mut receiver = app.state.receive_snapshot(&header.data, &header.meta).map_err(|e| e.to_string())?;
    let (mut batch, mut batch_bytes, mut entry_lines) = (Vec::new(), 0, receiver.lines_before_events());
    loop {
        // A secret may hold a thousand versions: its line is bounded as the whole body is.
        let max = if entry_lines > 0 { MAX_PEER_BODY } else { MAX_SNAPSHOT_EVENT_LINE };
        let line = lines.next(max).await?;
        entry_lines = entry_lines.saturating_sub(1);
        let end = line.is_none();
        batch_bytes += line.as_ref().map_or(0, Vec::len);
        batch.extend(line);
        if end || batch.len() >= 4096 || batch_bytes >= SNAPSHOT_BATCH_BYTES {
            batch_bytes = 0;
            let lines_now = std::mem::take(&mut batch);
            receiver = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                lines_now.iter().try_for_each(|l| receiver.add(l))?;
                Ok(receiver)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        }
        if end {
            break;
        }
    }
    tokio::task::spawn_blocking(move || receiver.finish())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let snapshot = Snapshot { meta: header.meta, snapshot: SnapshotData::Received(header.data) };
    app.raft.install_full_snapshot(header.vote, snapshot).await.map_err(|e| e.to_string())
}

/// A request body read line by line, each line at most a given length.
struct Lines<S> {
    stream: S,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    /// How much of the unread part holds no newline: each byte is searched once (a 30 MB
    /// header arriving in 16 KiB frames, searched whole each time, took minutes).
    searched: usize,
}

impl<S: futures::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin> Lines<S> {
    /// The next line without its newline; `None` at the end of the body.
    async fn next(&mut self, max: usize) -> Result<Option<Vec<u8>>, String> {
        use futures::StreamExt;
        loop {
            let unsearched = self.start + self.searched;
            if let Some(at) = self.buf[unsearched..].iter().position(|b| *b == b'\n') {
                let end = unsearched + at;
                if end - self.start > max {
                    return Err(format!("a snapshot transfer line is longer than {max} bytes"));
                }
                let line = self.buf[self.start..end].to_vec();
                self.start = end + 1;
                self.searched = 0;
                return Ok(Some(line));
            }
            self.searched = self.buf.len() - self.start;
            if self.searched > max {
                return Err(format!("a snapshot transfer line is longer than {max} bytes"));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk.map_err(|e| format!("snapshot transfer: {e}"))?),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err("the snapshot transfer ended in the middle of a line".into()),
            }
        }
    }
}

async fn transfer_leader(
    State(raft): State<Raft>,
    Json(req): Json<TransferLeaderRequest<TypeConfig>>,
) -> Json<Wire<TransferLeaderResponse<TypeConfig>>> {
    wire(raft.handle_transfer_leader(req).await)
}

#[cfg(test)]
mod tests {
    use axum::body::Bytes;

    use super::Lines;

    fn lines_of(chunks: &[&str]) -> Lines<impl futures::Stream<Item = Result<Bytes, axum::Error>> + Unpin> {
        let chunks: Vec<Result<Bytes, axum::Error>> = chunks.iter().map(|c| Ok(Bytes::from(c.to_string()))).collect();
        Lines { stream: futures::stream::iter(chunks), buf: Vec::new(), start: 0, searched: 0 }
    }

    #[tokio::test]
    async fn a_transfer_body_splits_into_its_lines_whatever_its_chunks_and_refuses_an_overlong_or_cut_line() {
        let mut lines = lines_of(&["hea", "der\nfir", "st\n\nsec", "ond\n"]);
        for expected in ["header", "first", "", "second"] {
            assert_eq!(lines.next(16).await.unwrap().as_deref(), Some(expected.as_bytes()));
        }
        assert_eq!(lines.next(16).await.unwrap(), None);

        let mut long = lines_of(&["0123456789", "0123456789\n"]);
        assert!(long.next(15).await.unwrap_err().contains("longer than 15 bytes"));
        let mut cut = lines_of(&["whole\n", "half"]);
        assert_eq!(cut.next(16).await.unwrap().as_deref(), Some(&b"whole"[..]));
        assert!(cut.next(16).await.unwrap_err().contains("middle of a line"));
    }
}
