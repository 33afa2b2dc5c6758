//! Raft's hot path on its own channel: appends and votes as length-prefixed JSON frames on
//! mutual-TLS connections to the cluster port, told apart from HTTP by ALPN.
//!
//! Why: over HTTP/2 (reqwest → h2 → axum) every append paid for a URL, header maps, stream
//! bookkeeping and a path-tracking JSON decoder on both ends. Those layers took about a third
//! of the leader's and a quarter of a follower's CPU per write at one client (perf, recorded in
//! docs/BENCHMARKS.md), on a machine where three nodes share two cores. openraft sends each
//! peer one RPC at a time per replication stream, so a plain request/answer exchange on a
//! connection of its own is enough: no multiplexing, no flow control.
//!
//! A frame is `[length: u32 BE][tag: u8][payload]`. A request's tag names its RPC
//! ([`Rpc`]); the answer echoes it and carries `Result<T, String>` in JSON, as the HTTP routes do.
//! Every frame is checked against the member-only gate (`peer::admit`), as every HTTP request
//! is: a refused peer gets the refusal and the connection is closed.
//!
//! Snapshots, leadership transfer and Citadel's own calls stay on HTTP/2: they are rare, and
//! a snapshot streams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::cluster::{PeerError, Wire};
use crate::node::Node;
use crate::peer::PeerCert;

/// The ALPN name of this channel; the protocol version is in it, so a node of another version
/// fails the handshake with a clear alert instead of misreading frames.
pub const ALPN: &[u8] = b"citadel-raft/8";

/// Longest frame either way: an append of many large entries, as the HTTP channel allows.
const MAX_FRAME: usize = crate::cluster::MAX_PEER_BODY;
/// Longest vote or pre-vote: a vote and a log id.
const MAX_VOTE_FRAME: usize = 64 << 10;
/// A server closes a connection that sent no frame for this long. The leader's heartbeats keep
/// a used connection far busier; a client drops pooled ones sooner ([`POOLED_FOR`]), so it never
/// sends on a connection the server is closing.
const SERVER_IDLE: Duration = Duration::from_secs(60);
const POOLED_FOR: Duration = Duration::from_secs(30);
/// Idle connections kept per peer: a replication stream, a heartbeat and a vote at once.
const POOLED_PER_PEER: usize = 4;
/// How long a server may take to write one answer to a peer that does not read.
const ANSWER_WRITE_LIMIT: Duration = Duration::from_secs(10);

/// The RPCs this channel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    Append = 1,
    Vote = 2,
    PreVote = 3,
}

impl Rpc {
    fn of_tag(tag: u8) -> Option<Rpc> {
        match tag {
            1 => Some(Rpc::Append),
            2 => Some(Rpc::Vote),
            3 => Some(Rpc::PreVote),
            _ => None,
        }
    }

    fn max_request(self) -> usize {
        match self {
            Rpc::Append => MAX_FRAME,
            Rpc::Vote | Rpc::PreVote => MAX_VOTE_FRAME,
        }
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|_| payload.len() <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other(format!("a frame of {} bytes is over the limit", payload.len())))?;
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.push(tag);
    frame.extend_from_slice(payload);
    io.write_all(&frame).await?;
    io.flush().await
}

/// Reads one frame.
async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let (tag, length) = read_head(io).await?;
    Ok((tag, read_payload(io, length, MAX_FRAME).await?))
}

/// A frame's tag and payload length.
async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<(u8, usize)> {
    let mut head = [0u8; 5];
    io.read_exact(&mut head).await?;
    Ok((head[4], u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize))
}

/// A frame's payload, refused past `limit`. It grows as its bytes arrive, so a claimed length
/// allocates nothing the peer has not sent.
async fn read_payload<R: AsyncRead + Unpin>(io: &mut R, length: usize, limit: usize) -> std::io::Result<Vec<u8>> {
    if length > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes is over the {limit}-byte limit"),
        ));
    }
    let mut payload = Vec::with_capacity(length.min(64 << 10));
    (&mut *io).take(length as u64).read_to_end(&mut payload).await?;
    if payload.len() != length {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(payload)
}

/// Serves one peer's Raft stream until it closes, idles, or is refused.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(app: Arc<Node>, mut io: S, peer: PeerCert) {
    loop {
        let (tag, length) = match tokio::time::timeout(SERVER_IDLE, read_head(&mut io)).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!(error = %e, "a Raft stream ended");
                }
                return;
            }
            Err(_) => return,
        };
        // The gate and the message kind are checked before the payload is read, as the HTTP
        // routes' gate runs before a body is: a refused peer cannot make this node buffer a frame.
        let rpc = match (crate::peer::admit(&app, peer.0.as_deref(), true), Rpc::of_tag(tag)) {
            (Err(refusal), _) => {
                crate::peer::warn_refused(peer.0.as_deref(), &refusal, "raft stream");
                return refuse(&mut io, tag, refusal.to_string()).await;
            }
            (Ok(_), None) => return refuse(&mut io, tag, format!("unknown Raft stream message {tag}")).await,
            (Ok(_), Some(rpc)) => rpc,
        };
        let payload = match tokio::time::timeout(SERVER_IDLE, read_payload(&mut io, length, rpc.max_request())).await {
            Ok(Ok(payload)) => payload,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                return refuse(&mut io, tag, format!("{rpc:?}: {e}")).await;
            }
            _ => return,
        };
        let answer = match answer(&app, rpc, &payload).await {
            Ok(answer) => answer,
            Err(unreadable) => return refuse(&mut io, tag, unreadable).await,
        };
        if !matches!(tokio::time::timeout(ANSWER_WRITE_LIMIT, write_frame(&mut io, tag, &answer)).await, Ok(Ok(()))) {
            return;
        }
    }
}

/// Answers a request with a refusal; the caller then closes the connection.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, tag: u8, why: String) {
    let _ = tokio::time::timeout(ANSWER_WRITE_LIMIT, write_frame(io, tag, &encode::<()>(Err(why)))).await;
}

/// Decodes a request and runs it: its encoded answer, or why it could not be read (the
/// connection then closes).
async fn answer(app: &Node, rpc: Rpc, payload: &[u8]) -> Result<Vec<u8>, String> {
    fn request<T: DeserializeOwned>(rpc: Rpc, payload: &[u8]) -> Result<T, String> {
        serde_json::from_slice(payload).map_err(|e| format!("unreadable {rpc:?} request: {e}"))
    }
    Ok(match rpc {
        Rpc::Append => encode(crate::cluster::receive_append(app, request(rpc, payload)?).await),
        Rpc::Vote => encode(app.raft.vote(request(rpc, payload)?).await.map_err(|e| e.to_string())),
        Rpc::PreVote => encode(app.raft.pre_vote(request(rpc, payload)?).await.map_err(|e| e.to_string())),
    })
}

fn encode<T: Serialize>(wire: Wire<T>) -> Vec<u8> {
    serde_json::to_vec(&wire).unwrap_or_else(|e| {
        serde_json::to_vec(&Wire::<()>::Err(format!("cannot encode the answer: {e}"))).unwrap_or_default()
    })
}

/// Whether an idle connection is still open. A server never speaks unasked, so anything to read
/// (its close after a restart, or after [`SERVER_IDLE`]) means the connection is done; without
/// this check, the first vote to a restarted peer would be sent into a dead connection and lost.
fn still_open(conn: &TlsStream<TcpStream>) -> bool {
    let mut byte = [0u8; 1];
    matches!(conn.get_ref().0.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Opens and pools this node's Raft stream connections to its peers. Shared by every
/// `PeerConnection`, so votes and heartbeats reuse the replication streams' idle connections.
#[derive(Clone)]
pub struct RaftStreams {
    tls: tokio_rustls::TlsConnector,
    /// Connections leave from the cluster address, as the HTTP channel's do.
    source: Option<IpAddr>,
    connect_timeout: Duration,
    idle: Arc<Mutex<HashMap<String, Vec<IdleConnection>>>>,
}

/// A pooled connection and when it was last used.
type IdleConnection = (TlsStream<TcpStream>, Instant);

impl RaftStreams {
    /// `tls` must present this node's certificate and trust the cluster CA; its ALPN is set here.
    pub fn new(mut tls: rustls::ClientConfig, source: Option<IpAddr>, connect_timeout: Duration) -> RaftStreams {
        tls.alpn_protocols = vec![ALPN.to_vec()];
        RaftStreams {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            source,
            connect_timeout,
            idle: Arc::default(),
        }
    }

    /// Sends `req` to the peer at `cluster_addr` and waits for its answer, all within `timeout`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        cluster_addr: &str,
        rpc: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let payload =
            serde_json::to_vec(req).map_err(|e| PeerError::Refused(format!("cannot encode the request: {e}")))?;
        let exchange = async {
            let mut conn = match self.pooled(cluster_addr) {
                Some(conn) => conn,
                None => self.connect(cluster_addr).await?,
            };
            let unreachable = |e: std::io::Error| PeerError::Unreachable(format!("{cluster_addr}: {e}"));
            write_frame(&mut conn, rpc as u8, &payload).await.map_err(unreachable)?;
            let (tag, answer) = read_frame(&mut conn).await.map_err(unreachable)?;
            if tag != rpc as u8 {
                return Err(PeerError::Refused(format!("{cluster_addr} answered message {tag} to {rpc:?}")));
            }
            Ok((conn, answer))
        };
        // The connection is owned by this future: if it times out or is dropped half-way, the
        // connection goes with it and no later call can read this call's answer.
        let (conn, answer) = tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            PeerError::Unreachable(format!("{cluster_addr} did not answer {rpc:?} within {} ms", timeout.as_millis()))
        })??;
        let wire: Wire<Resp> = serde_json::from_slice(&answer)
            .map_err(|e| PeerError::Refused(format!("bad answer from {cluster_addr}: {e}")))?;
        // A refusal closes the connection on the server's side: only an answer returns it.
        if wire.is_ok() {
            self.put_back(cluster_addr, conn);
        }
        wire.map_err(PeerError::Refused)
    }

    fn pooled(&self, cluster_addr: &str) -> Option<TlsStream<TcpStream>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(cluster_addr)?;
        let now = Instant::now();
        conns.retain(|(conn, since)| now.saturating_duration_since(*since) < POOLED_FOR && still_open(conn));
        let conn = conns.pop().map(|(conn, _)| conn);
        if conns.is_empty() {
            idle.remove(cluster_addr);
        }
        conn
    }

    fn put_back(&self, cluster_addr: &str, conn: TlsStream<TcpStream>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Expired connections go under every address, or those of a removed peer would stay.
        let now = Instant::now();
        idle.retain(|_, conns| {
            conns.retain(|(_, since)| now.saturating_duration_since(*since) < POOLED_FOR);
            !conns.is_empty()
        });
        let conns = idle.entry(cluster_addr.to_string()).or_default();
        if conns.len() < POOLED_PER_PEER {
            conns.push((conn, Instant::now()));
        }
    }

    async fn connect(&self, cluster_addr: &str) -> Result<TlsStream<TcpStream>, PeerError> {
        let unreachable = |why: String| PeerError::Unreachable(format!("cannot reach {cluster_addr}: {why}"));
        let mut targets: Vec<SocketAddr> =
            tokio::net::lookup_host(cluster_addr).await.map_err(|e| unreachable(e.to_string()))?.collect();
        // Addresses of the source's family first: those are the ones it can leave from.
        targets.sort_by_key(|t| self.source.is_some_and(|s| s.is_ipv4() != t.is_ipv4()));
        let mut last_error = "the address resolves to nothing".to_string();
        let mut connected = None;
        for target in targets {
            match tokio::time::timeout(self.connect_timeout, self.connect_tcp(target)).await {
                Ok(Ok(stream)) => {
                    connected = Some(stream);
                    break;
                }
                Ok(Err(e)) => last_error = format!("{target}: {e}"),
                Err(_) => last_error = format!("{target}: connection timed out"),
            }
        }
        let stream = connected.ok_or_else(|| unreachable(last_error))?;
        let _ = stream.set_nodelay(true);
        let host = crate::peer::host_of(cluster_addr).ok_or_else(|| unreachable("no host in the address".into()))?;
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| unreachable(e.to_string()))?;
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(name, stream))
            .await
            .map_err(|_| unreachable("TLS handshake timed out".into()))?
            .map_err(|e| unreachable(format!("TLS handshake failed: {e}")))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(PeerError::Refused(format!(
                "{cluster_addr} does not speak {} (another Citadel version?)",
                String::from_utf8_lossy(ALPN)
            )));
        }
        Ok(tls)
    }

    async fn connect_tcp(&self, target: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if target.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
        if let Some(source) = self.source.filter(|s| s.is_ipv4() == target.is_ipv4()) {
            socket.bind(SocketAddr::new(source, 0))?;
        }
        socket.connect(target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_frame_reads_back_as_written_and_an_overlong_or_cut_one_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, 2, b"{\"x\":1}").await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), (2, b"{\"x\":1}".to_vec()));

        let mut overlong = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        overlong.push(1);
        a.write_all(&overlong).await.unwrap();
        let e = read_frame(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("over the"), "{e}");

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0, 0, 0, 10, 1, b'{']).await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn only_known_tags_name_an_rpc() {
        for rpc in [Rpc::Append, Rpc::Vote, Rpc::PreVote] {
            assert_eq!(Rpc::of_tag(rpc as u8), Some(rpc));
        }
        assert_eq!(Rpc::of_tag(0), None);
        assert_eq!(Rpc::of_tag(4), None);
    }
}
