//! `sys/` endpoints of the node's lifecycle and status: health, init, seal and unseal, leader,
//! step-down, keyring rotation, metrics and the OpenAPI document.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use citadel_core::audit::AuditBody;
use citadel_core::barrier::{self, Key, Keyring};
use citadel_core::command::{Command, InitCommand, Response};
use citadel_core::policy;
use citadel_core::route::{Kind, Param, Route};
use citadel_core::shamir;
use citadel_core::state::{ClusterInfo, SealInfo};
use citadel_core::time::rfc3339;
use citadel_core::token::{token_hash, TokenEntry};
use citadel_storage::NodeInfo;
use serde::Deserialize;
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{record_audit, ApiError, ApiRequest, Op, Reply};
use crate::config::SealKind;
use crate::ids;
use crate::node::Node;
use crate::seal::decode_share;

pub use crate::VERSION;

/// The `sys/` routes of the node's lifecycle and status (mounts, the cluster and audit queries
/// have files of their own; policies are in `policy.rs`).
pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route(
            "sys/health",
            vec![op::open(Op::Read, "Node health with Vault's status codes", handler!(health))
                .with_params(HEALTH_PARAMS)],
        ),
        route(
            "sys/init",
            vec![
                op::open(Op::Read, "Whether the vault is initialized", handler!(init_status)),
                op::open(Op::Write, "Initialize the vault", handler!(init)).with_params(INIT_PARAMS),
            ],
        ),
        route("sys/seal-status", vec![op::open(Op::Read, "Seal status and unseal progress", handler!(seal_status))]),
        route(
            "sys/unseal",
            vec![op::open(Op::Write, "Submit an unseal key share", handler!(unseal)).with_params(UNSEAL_PARAMS)],
        ),
        route("sys/seal", vec![op::sudo(Op::Write, "Seal this node", handler!(seal))]),
        route("sys/leader", vec![op::read("Current leader", handler!(leader)).local()]),
        route("sys/step-down", vec![op::sudo(Op::Write, "Hand leadership to another voter", handler!(step_down))]),
        route("sys/rotate", vec![op::sudo(Op::Write, "Add a keyring term", handler!(rotate))]),
        route("sys/key-status", vec![op::read("Current keyring term", handler!(key_status))]),
        route("sys/metrics", vec![op::read("Metrics", handler!(metrics)).local().with_params(METRICS_PARAMS)]),
        route("sys/openapi", vec![op::read("This document, generated from the route table", handler!(openapi))]),
        route(
            "sys/events",
            vec![op::sudo(Op::Read, "The node's event stream (NDJSON)", handler!(super::events::subscribe)).local()],
        ),
        route("sys/jobs", vec![op::read("The latest leader-only job runs", handler!(super::events::jobs))]),
    ]
}

/// A status code a health check asks for (`activecode=` ...): one of HTTP's classes, 200 to 599.
fn query_code(req: &ApiRequest, name: &str, default: u16) -> Result<StatusCode, ApiError> {
    let code = match req.query.get(name) {
        None => default,
        Some(v) => v.parse::<u16>().ok().filter(|c| (200..=599).contains(c)).ok_or_else(|| {
            ApiError::bad_request(format!("{name} must be an HTTP status code from 200 to 599, not {v:?}"))
        })?,
    };
    StatusCode::from_u16(code).map_err(|_| ApiError::bad_request(format!("{name}: {code} is not a valid status code")))
}

/// This node's view of leadership: `leader`, `follower` or `read_only`.
pub fn ha_mode(app: &Node) -> &'static str {
    if app.read_only() {
        return "read_only";
    }
    match app.raft_metrics().current_leader {
        Some(id) if id == app.node_id() => "leader",
        Some(_) => "follower",
        None => "read_only",
    }
}

async fn health(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    let (initialized, cluster) = app.state.read(|s| (s.is_initialized(), s.cluster.clone()));
    let sealed = app.seal.is_sealed();
    let metrics = app.raft_metrics();
    let last_log = {
        use openraft::async_runtime::WatchReceiver;
        app.raft.data_metrics().borrow_watched().last_log
    };
    let mode = ha_mode(app);
    let standby_ok = req.query.get("standbyok").is_some_and(|v| v == "true" || v.is_empty());
    let removed = crate::peer::is_removed(app);
    let inactive = app.is_inactive();
    let status = if removed {
        StatusCode::SERVICE_UNAVAILABLE
    } else if !initialized {
        query_code(req, "uninitcode", 501)?
    } else if sealed {
        query_code(req, "sealedcode", 503)?
    } else if inactive {
        // Load balancers drop a deactivated node (§10.1).
        query_code(req, "inactivecode", 503)?
    } else if mode == "leader" {
        query_code(req, "activecode", 200)?
    } else if mode == "follower" {
        if standby_ok {
            query_code(req, "activecode", 200)?
        } else {
            query_code(req, "standbycode", 429)?
        }
    } else {
        query_code(req, "haunhealthycode", 474)?
    };
    let body = json!({
        "initialized": initialized,
        "sealed": sealed,
        "standby": mode != "leader",
        "performance_standby": false,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": ids::now_ms() / 1000,
        "version": VERSION,
        "cluster_name": cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
        "cluster_id": cluster.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
        "node_id": app.node_id(),
        "ha_mode": mode,
        "inactive": inactive,
        "leader_id": metrics.current_leader,
        "term": metrics.current_term,
        "commit_index": metrics.local_committed.as_ref().map_or(0, |l| l.index),
        "applied_index": metrics.last_applied.as_ref().map_or(0, |l| l.index),
        // Which survivor holds the most of the log (§10.3): the highest term, then index.
        "last_log_term": last_log.as_ref().map_or(0, |l| l.leader_id.term),
        "last_log_index": last_log.as_ref().map_or(0, |l| l.index),
    });
    let body = if removed { with_removed(body) } else { body };
    if req.method == axum::http::Method::HEAD {
        return Ok(Reply { body: None, ..Reply::json(status, Value::Null) });
    }
    Ok(Reply::json(status, body))
}

/// A removed node's health says so, and what to do.
fn with_removed(mut body: Value) -> Value {
    body["removed"] = json!(true);
    body["errors"] = json!([crate::peer::REMOVED_MESSAGE]);
    body
}

pub fn seal_status_body(app: &Node) -> Value {
    let (info, cluster) = app.state.read(|s| (s.seal.clone(), s.cluster.clone()));
    let (progress, nonce) = app.seal.progress();
    json!({
        "type": "shamir",
        "initialized": info.is_some(),
        "sealed": app.seal.is_sealed(),
        "t": info.as_ref().map_or(0, |i| i.threshold),
        "n": info.as_ref().map_or(0, |i| i.shares),
        "progress": progress,
        "nonce": nonce,
        "version": VERSION,
        "build_date": "",
        "migration": false,
        "cluster_name": cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
        "cluster_id": cluster.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
        "recovery_seal": false,
        "storage_type": "raft",
    })
}

async fn seal_status(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::json(StatusCode::OK, seal_status_body(c.app)))
}

fn seal_event(app: &Node, req: &ApiRequest, operation: &str, status: u16, error: String) -> AuditBody {
    AuditBody {
        time: ids::now_ms(),
        request_id: req.id.clone(),
        kind: "seal".into(),
        operation: operation.into(),
        path: req.path.clone(),
        remote_addr: req.remote.clone(),
        status,
        error,
        node: app.node_id(),
        ..AuditBody::default()
    }
}

async fn unseal(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    #[derive(Deserialize)]
    struct UnsealRequest {
        #[serde(default)]
        key: Option<String>,
        #[serde(default)]
        reset: bool,
    }
    let body: UnsealRequest = req.json()?;
    if body.reset {
        app.seal.reset_progress();
        return Ok(Reply::json(StatusCode::OK, seal_status_body(app)));
    }
    // As Vault: a request with neither a key nor `reset` is a 400, sealed or not.
    let key = body.key.ok_or_else(|| {
        ApiError::bad_request("missing required field \"key\" (an unseal key share), or \"reset\": true")
    })?;
    let info = app.state.read(|s| s.seal.clone());
    if info.is_none() {
        return Err(ApiError::bad_request("the vault is not initialized"));
    }
    if !app.seal.is_sealed() {
        return Ok(Reply::json(StatusCode::OK, seal_status_body(app)));
    }
    let share = decode_share(&key).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let outcome = app.seal.submit_share(share, info.as_ref());
    let unsealed = !app.seal.is_sealed();
    match &outcome {
        Err(e) => {
            record_audit(app, seal_event(app, req, "unseal", 400, e.to_string())).await?;
        }
        Ok(()) if unsealed => {
            tracing::info!("node unsealed");
            record_audit(app, seal_event(app, req, "unseal", 200, String::new())).await?;
        }
        Ok(()) => {}
    }
    outcome.map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Reply::json(StatusCode::OK, seal_status_body(app)))
}

async fn init_status(c: &Call<'_>) -> Result<Reply, ApiError> {
    let initialized = c.app.state.read(|s| s.is_initialized());
    Ok(Reply::json(StatusCode::OK, json!({ "initialized": initialized })))
}

async fn init(c: &Call<'_>) -> Result<Reply, ApiError> {
    initialize(c.app, c.req).await
}

/// Bootstraps the single-node Raft cluster (if needed), then proposes the initial state.
async fn initialize(app: &Arc<Node>, req: &ApiRequest) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct InitRequest {
        #[serde(default)]
        secret_shares: Option<usize>,
        #[serde(default)]
        secret_threshold: Option<usize>,
    }
    let body: InitRequest = req.json()?;
    let shares = body.secret_shares.unwrap_or(5);
    let threshold = body.secret_threshold.unwrap_or(if shares == 1 { 1 } else { 3.min(shares) });
    shamir::validate(shares, threshold).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if app.state.read(|s| s.is_initialized()) {
        return Err(ApiError::bad_request("Vault is already initialized"));
    }
    bootstrap_raft(app).await?;

    let now = ids::now_ms();
    let unseal_key = Key(ids::random_bytes());
    let root_key = Key(ids::random_bytes());
    let keyring = Keyring::new(now, ids::random_bytes(), ids::random_bytes(), ids::random_bytes());
    let root_token = ids::token();
    let root_entry = TokenEntry {
        hash: token_hash(&keyring.token_hmac_key, &root_token),
        accessor: ids::accessor(),
        policies: vec![policy::ROOT.into()],
        display_name: "root".into(),
        meta: BTreeMap::new(),
        created: now,
        expires: None,
        ttl_secs: 0,
        renewable: false,
        parent: None,
        username: None,
        ..TokenEntry::default()
    };
    let init = InitCommand {
        cluster: ClusterInfo { id: ids::uuid(), name: app.config.cluster_name.clone(), initialized_at: now },
        seal: SealInfo {
            shares,
            threshold,
            wrapped_root_key: barrier::encrypt(
                &unseal_key,
                0,
                &ids::random_bytes(),
                barrier::AAD_ROOT_KEY,
                &root_key.0,
            ),
            wrapped_keyring: keyring.wrap(&root_key, &ids::random_bytes()),
            key_term: 1,
            key_installed: now,
        },
        root_token: root_entry,
        default_mount_path: "secret/".into(),
        default_mount: super::mounts::new_mount("kv", now, "key/value secret storage"),
    };
    let seal_info = init.seal.clone();
    match app.propose(Command::Init(Box::new(init))).await? {
        Response::Rejected(r) => return Err(r.into()),
        _ => tracing::info!("vault initialized"),
    }
    let key_shares = shamir::split(&unseal_key, shares, threshold).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if app.config.seal.kind == SealKind::Keyfile {
        if let Some(path) = &app.config.seal.key_file {
            crate::tls::write_private(path, hex::encode(unseal_key.0).as_bytes())
                .map_err(|e| ApiError::internal(format!("initialized, but the key file could not be written: {e}")))?;
            app.seal
                .unseal_with_key(&unseal_key, &seal_info)
                .map_err(|e| ApiError::internal(format!("initialized, but auto-unseal failed: {e}")))?;
        }
    }
    if let Err(e) = crate::pki::store_cluster_ca(app).await {
        tracing::error!(error = %e, "the cluster CA key could not be stored; join tokens will not work");
    }
    // This node never joins: record its certificate here, so that removing it revokes it.
    if let Err(e) = crate::peer::record_own_certificate(app).await {
        tracing::error!(error = %e, "this node's certificate could not be recorded; removing it will not revoke it");
    }
    record_audit(app, seal_event(app, req, "init", 200, String::new())).await?;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(Reply::json(
        StatusCode::OK,
        json!({
            "keys": key_shares.iter().map(|s| hex::encode(&s[..])).collect::<Vec<_>>(),
            "keys_base64": key_shares.iter().map(|s| b64.encode(&s[..])).collect::<Vec<_>>(),
            "root_token": root_token,
        }),
    ))
}

/// Makes this node the sole voter of a new cluster and waits for it to lead.
async fn bootstrap_raft(app: &Node) -> Result<(), ApiError> {
    let initialized = app.raft.is_initialized().await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    if !initialized {
        let me = NodeInfo {
            api_addr: app.config.api_url(),
            cluster_addr: app.config.cluster_url(),
            name: app.config.name(),
            site: app.config.site.clone(),
        };
        let members = BTreeMap::from([(app.node_id(), me)]);
        if let Err(e) = app.raft.initialize(members).await {
            tracing::warn!(error = %e, "raft initialize");
        }
    }
    let me = app.node_id();
    let wait = app.raft.wait(Some(Duration::from_secs(10)));
    wait.metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .map_err(|_| ApiError::from(crate::node_error::NodeError::NoLeader))?;
    let leader = app.raft_metrics().current_leader;
    if leader != Some(me) {
        return Err(ApiError::bad_request(format!(
            "this node is part of a cluster led by node {leader:?}; initialize through the leader"
        )));
    }
    Ok(())
}

const INIT_PARAMS: &[Param] = &[
    Param::body("secret_shares", Kind::Integer, "Number of unseal key shares"),
    Param::body("secret_threshold", Kind::Integer, "Shares needed to unseal"),
];

const UNSEAL_PARAMS: &[Param] = &[
    Param::body("key", Kind::String, "An unseal key share (hex or base64)"),
    Param::body("reset", Kind::Boolean, "Discard the shares submitted so far"),
];

const HEALTH_PARAMS: &[Param] = &[
    Param::query("standbyok", Kind::Boolean, "Answer 200 on a standby"),
    Param::query("activecode", Kind::Integer, "Status code for the active node (200 to 599)"),
    Param::query("standbycode", Kind::Integer, "Status code for a standby (200 to 599)"),
    Param::query("sealedcode", Kind::Integer, "Status code when sealed (200 to 599)"),
    Param::query("uninitcode", Kind::Integer, "Status code when not initialized (200 to 599)"),
    Param::query("haunhealthycode", Kind::Integer, "Status code in read-only mode (200 to 599)"),
    Param::query("inactivecode", Kind::Integer, "Status code on a deactivated node (200 to 599)"),
];

const METRICS_PARAMS: &[Param] = &[Param::query("format", Kind::String, "prometheus or json")];

async fn seal(c: &Call<'_>) -> Result<Reply, ApiError> {
    c.app.seal.seal();
    tracing::info!("node sealed by request");
    Ok(Reply::empty())
}

async fn leader(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::json(StatusCode::OK, super::vault_ha::leader_body(c.app)))
}

async fn key_status(c: &Call<'_>) -> Result<Reply, ApiError> {
    let info = c.app.state.read(|s| s.seal.clone()).ok_or_else(ApiError::sealed)?;
    let body = json!({ "term": info.key_term, "install_time": rfc3339(info.key_installed) });
    let mut reply = Reply::data(body.clone());
    if let (Some(obj), Some(extra)) = (reply.body.as_mut().and_then(Value::as_object_mut), body.as_object()) {
        obj.extend(extra.clone());
    }
    Ok(reply)
}

async fn openapi(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::json(StatusCode::OK, super::openapi::document(c.app)))
}

/// Hands leadership to another voter; on a cluster of one there is nobody to hand it to.
async fn step_down(c: &Call<'_>) -> Result<Reply, ApiError> {
    let app = c.app;
    let metrics = app.raft_metrics();
    if metrics.current_leader != Some(app.node_id()) {
        return Ok(Reply::empty());
    }
    // Offered to the first other voter; if it cannot take over, another elects itself.
    let other = metrics.membership_config.membership().voter_ids().find(|id| *id != app.node_id());
    if let Some(target) = other {
        crate::membership::step_aside(app, target).await.map_err(ApiError::unavailable)?;
    }
    Ok(Reply::empty())
}

async fn rotate(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, keys) = (c.app, c.keys()?);
    let info = app.state.read(|s| s.seal.clone()).ok_or_else(ApiError::sealed)?;
    let mut ring = keys.keyring.clone();
    let now = ids::now_ms();
    let new_term = ring.rotate(now, ids::random_bytes());
    let wrapped_keyring = ring.wrap(&keys.root_key, &ids::random_bytes());
    let command = Command::RotateKeyring { expected_term: info.key_term, new_term, wrapped_keyring, at: now };
    match app.propose(command).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => {
            tracing::info!(term = new_term, "keyring rotated");
            Ok(Reply::empty())
        }
    }
}

async fn metrics(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    let now = crate::metrics::NodeGauges::read(app);
    match req.query.get("format").map(String::as_str) {
        Some("prometheus") => {
            Ok(Reply::raw(StatusCode::OK, crate::metrics::CONTENT_TYPE, app.metrics.render(&now).into_bytes()))
        }
        None | Some("json") => Ok(Reply::json(StatusCode::OK, now.to_json())),
        Some(other) => Err(ApiError::bad_request(format!("unknown metrics format {other:?} (use prometheus or json)"))),
    }
}
