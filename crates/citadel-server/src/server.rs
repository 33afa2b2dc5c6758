//! Starting a node: storage, Raft, listeners, and the background tasks (leader jobs: `jobs.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use citadel_core::barrier::Key;
use citadel_storage::types::Raft;
use tokio::net::TcpListener;

use crate::api::{self, ApiError, ApiRequest, MAX_BODY, MAX_SNAPSHOT};
use crate::audit::{AuditSpool, RefusalLog};
use crate::auth::{BackoffPolicy, HashPool, LoginLimiter};
use crate::cluster::{self, ClusterNetwork};
use crate::config::{Config, SealKind};
use crate::limits::ConnectionLimits;
use crate::node::Node;
use crate::tls;

#[derive(Clone, Copy)]
struct RemoteAddr(SocketAddr);

/// Runs a node until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<()> {
    // Before anything is created: every file of the node is private to its user (§8.4).
    citadel_storage::files::set_private_umask();
    // A route declared without its guard is a build defect: refuse to serve at all.
    api::routes::tables().map_err(|e| anyhow::anyhow!("invalid route table: {e}"))?;
    tls::install_crypto_provider();
    crate::limits::raise_open_file_limit();
    crate::limits::release_large_allocations();
    crate::pki::bootstrap_if_needed(&config).await?;
    let node_cert = tls::NodeCert::load(&config.tls.cert, &config.tls.key)?;
    let api_tls = tls::server_config(node_cert.clone())?;
    let cluster_tls = cluster_tls(&config, node_cert.clone())?;
    crate::resync::discard_if_requested(&config.data_dir)?;
    let (mut log, sm) = citadel_storage::open(&config.data_dir, config.node_id).map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    log.observe_flushes(metrics.clone());
    let state = sm.reader();
    let started_empty = {
        use openraft::storage::RaftLogStorage;
        let log_state = log.get_log_state().await.context("reading the Raft log's state")?;
        log_state.last_log_id.is_none() && log_state.last_purged_log_id.is_none() && state.applied_index() == 0
    };
    let log_failures = log.failures();
    let raft_config = openraft::Config {
        cluster_name: config.cluster_name.clone(),
        heartbeat_interval: config.raft.heartbeat_ms,
        election_timeout_min: config.raft.election_timeout_ms,
        // openraft's leader lease equals the maximum: followers refuse to elect until it runs
        // out, so a wide window delays failover by up to a whole extra timeout. Keep it narrow.
        election_timeout_max: config.raft.election_timeout_ms * 4 / 3,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_threshold),
        max_in_snapshot_log_to_keep: config.raft.max_trailing_logs,
        enable_pre_vote: Some(true),
        // Bounds one append's size: audit batches make large entries.
        max_payload_entries: 64,
        // A restarted leader must win an election (and commit a blank entry in its new term)
        // before it serves: restored at once, it would answer reads from a state machine rebuilt
        // only up to the last committed index it had persisted, which may be behind what it
        // acknowledged (found by scripts/chaos, crash-all).
        enable_leader_restore: Some(false),
        ..Default::default()
    }
    .validate()
    .context("invalid [raft] settings")?;
    let network = ClusterNetwork::new(&config, node_cert.clone(), state.clone())?;
    let raft =
        Raft::new(config.node_id, Arc::new(raft_config), network.clone(), log, sm).await.context("starting raft")?;
    let audit = AuditSpool::open(&config.data_dir.join("audit"), config.node_id, config.audit.file.as_deref())?;
    let spool_failures = audit.failures();

    let api_listener = TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("cannot listen on api_addr {}", config.api_addr))?;
    let cluster_listener = TcpListener::bind(config.cluster_addr)
        .await
        .with_context(|| format!("cannot listen on cluster_addr {}", config.cluster_addr))?;

    let limiter = LoginLimiter::new(BackoffPolicy::from_config(&config.limits));
    let hash_pool = HashPool::new(
        config.limits.password_hash_concurrency,
        Duration::from_millis(config.limits.password_hash_wait_ms),
    );
    let refusals = RefusalLog::new(config.audit.refusal_summary_keys, config.audit.max_path_bytes);
    let events = crate::events::EventBus::new(config.node_id, &config.events);
    let app = Arc::new(Node {
        config,
        raft: raft.clone(),
        state,
        seal: Default::default(),
        audit,
        limiter,
        hash_pool,
        refusals,
        metrics,
        peers: network.peers(),
        started: Instant::now(),
        started_empty,
        leader_contact: Default::default(),
        read_only_since: Default::default(),
        stalls: crate::stall::StallWatch::new(Instant::now()),
        active_since: Default::default(),
        alert_delivery: Default::default(),
        member_statuses: Default::default(),
        leaderless_alerts: Default::default(),
        leaving: Default::default(),
        removed: Default::default(),
        events,
        resyncing: Default::default(),
        restart: Default::default(),
        lifecycle_lock: Default::default(),
        snapshot_build: Default::default(),
        snapshot_restore: Default::default(),
    });
    tracing::info!(node = app.node_id(), api = %app.config.api_addr, cluster = %app.config.cluster_addr, "citadel node started");
    crate::peer::load_removed_marker(&app);
    if cfg!(any(feature = "unsafe-ack-before-commit", feature = "unsafe-stale-reads")) {
        tracing::error!("this build is broken on purpose (an unsafe-* cargo feature): it can lose writes or serve stale reads; use it only to test the chaos harness");
    }

    let cluster_limits = ConnectionLimits::new("cluster", &app.config.limits, false);
    let api_limits = ConnectionLimits::new("api", &app.config.limits, true);
    tokio::spawn(cluster_limits.clone().report_refusals());
    tokio::spawn(api_limits.clone().report_refusals());
    let cluster_router = cluster::router(app.clone());
    tokio::spawn(serve_tls(cluster_listener, cluster_tls, cluster_router, cluster_limits, Some(app.clone())));
    let api_server = tokio::spawn(serve_tls(api_listener, api_tls, api_router(app.clone()), api_limits, None));
    tokio::spawn(crate::audit::write_refusal_summaries(app.clone()));
    tokio::spawn(crate::audit_shipping::ship_audit(app.clone()));
    tokio::spawn(crate::jobs::run(app.clone()));
    tokio::spawn(crate::events::watch(app.clone()));
    tokio::spawn(crate::leaderless_alerts::watch(app.clone()));
    tokio::spawn(crate::membership::retry_join(app.clone()));
    tokio::spawn(watch_leadership(app.clone()));
    tokio::spawn(crate::peer::watch_membership(app.clone()));
    tokio::spawn(crate::pki::renew_when_due(app.clone(), node_cert));
    tokio::spawn(crate::membership::autopilot(app.clone()));
    if app.config.seal.kind == SealKind::Keyfile {
        tokio::spawn(auto_unseal(app.clone()));
    }

    let stopped_by = tokio::select! {
        () = shutdown_signal() => Stop::Signal,
        () = app.restart.notified() => Stop::Resync,
        why = storage_failed(log_failures) => Stop::Failed(why),
        why = storage_failed(spool_failures) => Stop::Failed(why),
        why = raft_failed(raft.clone()) => Stop::Failed(why),
    };
    if !matches!(stopped_by, Stop::Failed(_)) {
        crate::graceful_stop::stop(&app, || api_server.abort()).await;
    }
    tracing::info!("shutting down");
    let _ = raft.shutdown().await;
    match stopped_by {
        Stop::Signal => Ok(()),
        Stop::Resync => {
            // Raft is stopped: the membership it last saw is final until the restart.
            crate::resync::mark_unless_voting(&app);
            Err(crate::resync::restart_process())
        }
        Stop::Failed(why) => Err(anyhow::anyhow!(why)),
    }
}

/// Why the node stops.
enum Stop {
    /// SIGTERM or SIGINT.
    Signal,
    /// A resync: start afresh without the replicated state.
    Resync,
    /// The log, the audit spool or Raft failed: the node must not go on.
    Failed(String),
}

/// Resolves when the Raft log or the audit spool has failed (a write or fsync error): the node
/// must not go on, and a restart is what trusts the file again (a torn tail is cut there).
async fn storage_failed(mut failures: tokio::sync::watch::Receiver<Option<String>>) -> String {
    match failures.wait_for(Option::is_some).await {
        Ok(why) => why.clone().unwrap_or_default(),
        // The file's owner is gone without failing: never resolve, the node stops on a signal.
        Err(_) => std::future::pending().await,
    }
}

/// Resolves when Raft stopped on a fatal error, such as a state-machine write that failed (the
/// audit store on a full disk): the node must not go on serving from a state it cannot keep.
async fn raft_failed(raft: Raft) -> String {
    use openraft::async_runtime::WatchReceiver;
    // Raft's core drops its metrics senders when it ends: wait for that on the server metrics,
    // which, unlike the full metrics, do not change with every write.
    let mut server = raft.server_metrics();
    while server.changed().await.is_ok() {}
    match &raft.metrics().borrow_watched().running_state {
        Err(fatal) => format!("Raft stopped: {fatal}"),
        // The core ended without saying why (a panic): nothing would replicate or apply.
        Ok(()) => "Raft stopped without reporting an error (see the log above)".into(),
    }
}

/// The cluster port demands a client certificate signed by the cluster CA.
fn cluster_tls(config: &Config, node_cert: Arc<tls::NodeCert>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(tls::root_store(&config.tls.ca)?),
        provider.clone(),
    )
    .build()
    .context("cluster CA is unusable for client verification")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(node_cert);
    server.alpn_protocols = vec![crate::raft_stream::ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Accepts TLS connections and serves `router` on each, recording the peer address; on the
/// cluster port (`raft` given), a connection that negotiated the Raft stream is served that.
/// Connections beyond the listener's or the source's cap are closed at once (counted, and
/// reported once per interval by `ConnectionLimits::report_refusals`).
async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Arc<ConnectionLimits>,
    raft: Option<Arc<Node>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = limits.try_admit(remote.ip()) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        let service = router.clone().layer(Extension(RemoteAddr(remote)));
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer = crate::peer::PeerCert::of(tls.get_ref().1);
            if let Some(app) = raft.filter(|_| tls.get_ref().1.alpn_protocol() == Some(crate::raft_stream::ALPN)) {
                crate::raft_stream::serve(app, tls, peer).await;
                return;
            }
            let service = service.layer(Extension(peer));
            // HTTP/1.1 or HTTP/2, whichever the peer speaks (the API advertises only HTTP/1.1).
            crate::limits::serve_connection(tls, service, &limits).await;
        });
    }
}

fn api_router(app: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/{*path}", any(api_entry))
        .route("/ui", axum::routing::get(crate::ui::redirect))
        .route("/ui/", axum::routing::get(crate::ui::index))
        .route("/ui/{file}", axum::routing::get(crate::ui::file))
        .fallback(not_found)
        .with_state(app)
}

const INACTIVE_MESSAGE: &str = "this node is inactive: an operator deactivated it (`citadel operator node \
     activate ID` brings it back); send requests to another node";

async fn not_found(uri: Uri) -> Response {
    ApiError::no_route(uri.path()).into_response()
}

async fn api_entry(
    State(app): State<Arc<Node>>,
    Extension(RemoteAddr(remote)): Extension<RemoteAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = match crate::request_path::api_path(uri.path()) {
        Ok(path) => path,
        Err(reason) => return ApiError::bad_request(reason).into_response(),
    };
    if crate::peer::is_removed(&app) && path != "sys/health" {
        return ApiError::unavailable(crate::peer::REMOVED_MESSAGE).into_response();
    }
    // A deactivated node serves operators (`sys/`), not clients (§10.1).
    if !path.starts_with("sys/") && app.is_inactive() {
        return ApiError::unavailable(INACTIVE_MESSAGE).into_response();
    }
    let query = match crate::request_path::query(&uri) {
        Ok(q) => q,
        Err(e) => return ApiError::bad_request(e).into_response(),
    };
    // Only a snapshot restore may exceed the API's body limit...
    let limit = if path.starts_with("sys/storage/raft/snapshot") { MAX_SNAPSHOT } else { MAX_BODY };
    // ...and its body is read only for a caller allowed to restore; anyone else gets 403 unread.
    let may_upload = limit == MAX_SNAPSHOT && api::may_read_snapshot_body(&app, &method, &path, &headers);
    let body = if limit == MAX_SNAPSHOT && !may_upload { Body::empty() } else { body };
    // One upload at a time, held until it is restored or refused: each may hold MAX_SNAPSHOT.
    let _restoring = match may_upload && (method == Method::POST || method == Method::PUT) {
        false => None,
        true => match app.snapshot_restore.clone().try_lock_owned() {
            Ok(guard) => Some(guard),
            Err(_) => {
                let busy = "another snapshot restore is being uploaded or applied on this node; retry when it is done";
                return ApiError::unavailable(busy).into_response();
            }
        },
    };
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            let message = format!("request body is larger than {} MiB", limit >> 20);
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
        }
    };
    let request = ApiRequest {
        method,
        path,
        query,
        headers,
        body,
        remote: remote.ip().to_string(),
        id: crate::ids::uuid(),
        served_stale: Default::default(),
    };
    api::handle(app, request).await
}

/// Key-file seal: unseals once, as soon as the replicated state says the vault is initialized.
/// An operator's later `sys/seal` holds until the node restarts (or `sys/unseal`), as in Vault.
async fn auto_unseal(app: Arc<Node>) {
    let Some(path) = app.config.seal.key_file.clone() else { return };
    let mut reported = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !app.seal.is_sealed() {
            continue;
        }
        let Some(info) = app.state.read(|s| s.seal.clone()) else { continue };
        let outcome = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read seal.key_file {}: {e}", path.display()))
            .and_then(|text| {
                let bytes = zeroize::Zeroizing::new(
                    hex::decode(text.trim()).map_err(|_| format!("{} does not hold a hex key", path.display()))?,
                );
                Key::from_slice(&bytes).ok_or_else(|| format!("{} does not hold a 32-byte key", path.display()))
            })
            .and_then(|key| app.seal.unseal_with_key(&key, &info).map_err(|e| format!("{}: {e}", path.display())));
        match outcome {
            Ok(()) => {
                tracing::info!("unsealed from key file");
                return;
            }
            Err(e) if e != reported => {
                tracing::error!("{e}");
                reported = e;
            }
            Err(_) => {}
        }
    }
}

/// Refreshes "leader contact" when Raft reports a new leader (an election or a transfer, this
/// node included), so a leader that steps down is not taken for read-only before the new
/// leader's first heartbeat (stepping down counts: it led with a quorum until then). Only changes count: a dead leader stays "current" in the metrics
/// until an election succeeds, and must not look alive.
async fn watch_leadership(app: Arc<Node>) {
    use openraft::async_runtime::WatchReceiver;
    let mut metrics = app.raft.server_metrics();
    let mut last = None;
    loop {
        let leader = metrics.borrow_watched().current_leader;
        let stepped_down = last == Some(app.node_id()) && leader != last;
        if (leader.is_some() && leader != last) || stepped_down {
            app.touch_leader();
        }
        if leader != last {
            let since = if leader == Some(app.node_id()) { crate::ids::now_ms() } else { 0 };
            app.active_since.store(since, std::sync::atomic::Ordering::Relaxed);
        }
        last = leader;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
