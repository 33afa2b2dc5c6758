//! `sys/` endpoints: lifecycle (init, seal, unseal), status, mounts, keyring, audit queries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use citadel_core::audit::{AuditBody, AuditEvent};
use citadel_core::barrier::{self, Key, Keyring};
use citadel_core::command::{Command, InitCommand, Response};
use citadel_core::kv::KvStore;
use citadel_core::policy;
use citadel_core::state::{AuthMount, ClusterInfo, Mount, SealInfo, DEFAULT_USERPASS, TOKEN_AUTH};
use citadel_core::time::rfc3339;
use citadel_core::token::{token_hash, TokenEntry};
use citadel_core::{shamir, UnixMillis};
use citadel_storage::NodeInfo;
use serde::Deserialize;
use serde_json::{json, Value};

use citadel_core::route::{Kind, Param, Route};

use super::routes::{self, handler, route, Call, Handler};
use super::{record_audit, ApiError, ApiRequest, Op, Reply};
use crate::config::SealKind;
use crate::ids;
use crate::node::Node;
use crate::seal::decode_share;

pub use crate::VERSION;

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
    let mode = ha_mode(app);
    let standby_ok = req.query.get("standbyok").is_some_and(|v| v == "true" || v.is_empty());
    let removed = crate::peer::is_removed(app);
    let status = if removed {
        StatusCode::SERVICE_UNAVAILABLE
    } else if !initialized {
        query_code(req, "uninitcode", 501)?
    } else if sealed {
        query_code(req, "sealedcode", 503)?
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
        "ha_mode": mode,
        "leader_id": metrics.current_leader,
        "term": metrics.current_term,
        "commit_index": metrics.local_committed.as_ref().map_or(0, |l| l.index),
        "applied_index": metrics.last_applied.as_ref().map_or(0, |l| l.index),
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

/// `sys/storage/raft/bootstrap`: a node with no certificate yet presents a one-time join token and
/// receives a certificate from the cluster CA. The token is the credential (spent on use).
async fn bootstrap(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    let body: crate::pki::BootstrapRequest = req.json()?;
    let result = crate::pki::issue(app, &body).await;
    let event = AuditBody {
        time: ids::now_ms(),
        request_id: req.id.clone(),
        kind: "join".into(),
        operation: "update".into(),
        path: req.path.clone(),
        user: format!("node-{}", body.node_id),
        remote_addr: req.remote.clone(),
        status: if result.is_ok() { 200 } else { 400 },
        error: result.as_ref().err().cloned().unwrap_or_default(),
        ..AuditBody::default()
    };
    record_audit(app, event).await?;
    let reply = result.map_err(ApiError::bad_request)?;
    Ok(Reply::json(StatusCode::OK, serde_json::to_value(reply).expect("serializes")))
}

/// `sys/storage/raft/join`, called on a node that belongs to no cluster yet (so it has no token
/// to present): it asks the given member to add it. The cluster authenticates the node by its
/// certificate (mutual TLS), so this endpoint grants the caller nothing.
async fn join(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    if app.raft.is_initialized().await.unwrap_or(true) {
        return Err(ApiError::bad_request("this node already belongs to a cluster"));
    }
    let body: Value = req.json()?;
    let target = body.get("leader_cluster_addr").and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request("missing required field \"leader_cluster_addr\" (host:port of a member's cluster port)")
    })?;
    let voter = crate::membership::join(app, target).await.map_err(ApiError::bad_request)?;
    Ok(Reply::json(StatusCode::OK, json!({ "joined": true, "voter": voter })))
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
        default_mount: new_mount("kv", now, "key/value secret storage"),
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

pub fn new_mount(kind: &str, now: UnixMillis, description: &str) -> Mount {
    Mount {
        uuid: ids::uuid(),
        kind: kind.into(),
        description: description.into(),
        created: now,
        kv: KvStore::default(),
    }
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

/// The optional `node_id` of a join token request: the only node id the token may certify.
fn join_token_node_id(app: &Node, body: &Value) -> Result<Option<u64>, ApiError> {
    let Some(raw) = body.get("node_id").filter(|v| !v.is_null()) else { return Ok(None) };
    let node_id =
        raw.as_u64().or_else(|| raw.as_str().and_then(|s| s.parse().ok())).filter(|id| *id > 0).ok_or_else(|| {
            ApiError::bad_request("node_id must be a positive integer (the node the token certifies)")
        })?;
    if crate::pki::is_member(app, node_id) {
        return Err(ApiError::bad_request(format!(
            "node {node_id} is a current member of this cluster: a join token cannot certify it"
        )));
    }
    Ok(Some(node_id))
}

const ADDR_PARAMS: &[Param] =
    &[Param::body("leader_cluster_addr", Kind::String, "host:port of a current member's cluster port").required()];
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
];
const BOOTSTRAP_PARAMS: &[Param] = &[
    Param::body("join_token", Kind::String, "A one-time join token").required(),
    Param::body("node_id", Kind::Integer, "The joining node's id").required(),
    Param::body("csr", Kind::String, "The node's certificate signing request (PEM)").required(),
];
const MOUNT_PARAMS: &[Param] = &[
    Param::body("type", Kind::String, "The engine: kv (or kv-v2)").required(),
    Param::body("description", Kind::String, "Free text"),
    Param::body("options", Kind::Object, "Engine options (kv: {\"version\": \"2\"})"),
];
const AUTH_PARAMS: &[Param] = &[
    Param::body("type", Kind::String, "The method: userpass").required(),
    Param::body("description", Kind::String, "Free text"),
];
const REMOVE_PEER_PARAMS: &[Param] = &[Param::body("server_id", Kind::String, "The node id to remove").required()];
const JOIN_TOKEN_PARAMS: &[Param] = &[
    Param::body("ttl", Kind::Duration, "Lifetime (60s to 7 days, default 1h)"),
    Param::body("node_id", Kind::Integer, "Bind the token to one node id"),
];
const TRANSFER_PARAMS: &[Param] =
    &[Param::body("node_id", Kind::Integer, "The voter to hand leadership to").required()];
const METRICS_PARAMS: &[Param] = &[Param::query("format", Kind::String, "prometheus or json")];
const AUDIT_PARAMS: &[Param] = &[
    Param::query("node", Kind::Integer, "Only this node's events"),
    Param::query("user", Kind::String, "Only this user's events"),
    Param::query("path", Kind::String, "Only events under this path"),
    Param::query("since", Kind::String, "Unix milliseconds, or a duration ago (15m)"),
    Param::query("limit", Kind::Integer, "At most this many (1 to 10000, default 100)"),
];

/// The `sys/` routes (policies are in `policy.rs`).
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
        route(
            "sys/storage/raft/join",
            vec![op::open(Op::Write, "Ask a cluster member to add this new node", handler!(join))
                .with_params(ADDR_PARAMS)],
        ),
        route(
            "sys/storage/raft/bootstrap",
            vec![op::open(Op::Write, "Exchange a join token for a node certificate", handler!(bootstrap))
                .with_params(BOOTSTRAP_PARAMS)],
        ),
        route("sys/seal", vec![op::sudo(Op::Write, "Seal this node", handler!(seal))]),
        route("sys/leader", vec![op::read("Current leader", handler!(leader)).local()]),
        route("sys/step-down", vec![op::sudo(Op::Write, "Hand leadership to another voter", handler!(step_down))]),
        route("sys/rotate", vec![op::sudo(Op::Write, "Add a keyring term", handler!(rotate))]),
        route("sys/key-status", vec![op::read("Current keyring term", handler!(key_status))]),
        route("sys/metrics", vec![op::read("Metrics", handler!(metrics)).local().with_params(METRICS_PARAMS)]),
        route("sys/openapi", vec![op::read("This document, generated from the route table", handler!(openapi))]),
        route("sys/mounts", vec![op::read("List secrets engines", handler!(list_mounts))]),
        Route {
            pattern: "sys/mounts/*path",
            operations: vec![
                op::read("Read a secrets engine", handler!(read_mount)),
                op::write("Enable a secrets engine by type", handler!(enable_mount)).with_params(MOUNT_PARAMS),
                op::delete("Disable a secrets engine and delete its data", handler!(disable_mount)),
            ],
            exists: Some(|s, c| s.mounts.contains_key(&mount_key(c.get("path")))),
        },
        route("sys/auth", vec![op::read("List auth methods", handler!(list_auth))]),
        // Vault's auth endpoints are root-protected: each needs sudo.
        route(
            "sys/auth/*path",
            vec![
                op::sudo(Op::Read, "Read an auth method", handler!(read_auth)),
                op::sudo(Op::Write, "Enable an auth method by type", handler!(enable_auth)).with_params(AUTH_PARAMS),
                op::sudo(Op::Delete, "Disable an auth method: its users and their tokens go", handler!(disable_auth)),
            ],
        ),
        route("sys/storage/raft/configuration", vec![op::read("Raft servers and suffrage", handler!(raft_config))]),
        route(
            "sys/storage/raft/remove-peer",
            vec![op::sudo(Op::Write, "Remove a node from the cluster", handler!(remove_peer))
                .with_params(REMOVE_PEER_PARAMS)],
        ),
        route(
            "sys/storage/raft/join-token",
            vec![
                op::sudo(Op::Write, "Issue a one-time join token", handler!(join_token)).with_params(JOIN_TOKEN_PARAMS)
            ],
        ),
        route(
            "sys/storage/raft/snapshot",
            vec![
                op::sudo(Op::Read, "Save a snapshot", handler!(snapshot_save)),
                op::sudo(Op::Write, "Restore a snapshot of this cluster", handler!(snapshot_restore)),
            ],
        ),
        route(
            "sys/storage/raft/snapshot-force",
            vec![op::sudo(Op::Write, "Restore a snapshot taken from another cluster", handler!(snapshot_force))],
        ),
        route(
            "sys/storage/raft/autopilot/state",
            vec![op::read("Autopilot view: health, failure tolerance, servers", handler!(autopilot)).local()],
        ),
        route("sys/ha/status", vec![op::read("Cluster and per-node HA status", handler!(ha_status)).local()]),
        route(
            "sys/ha-status",
            vec![op::read("Vault's HA table: nodes, addresses, active node, last echo", handler!(vault_ha_status))
                .local()],
        ),
        route(
            "sys/ha/transfer-leader",
            vec![op::sudo(Op::Write, "Hand leadership to a voter", handler!(transfer_leader))
                .with_params(TRANSFER_PARAMS)],
        ),
        route(
            "sys/events",
            vec![op::sudo(Op::Read, "The node's event stream (NDJSON)", handler!(super::events::subscribe)).local()],
        ),
        route("sys/jobs", vec![op::read("The latest leader-only job runs", handler!(super::events::jobs))]),
        route(
            "sys/audit/events",
            vec![op::sudo(Op::Read, "Replicated audit events", handler!(audit_events)).with_params(AUDIT_PARAMS)],
        ),
        route(
            "sys/audit/verify",
            vec![op::sudo(Op::Read, "Verify every node's audit hash chain", handler!(audit_verify))],
        ),
    ]
}

/// A mount's key in the state: its path with one trailing slash.
fn mount_key(path: &str) -> String {
    format!("{}/", path.trim_matches('/'))
}

async fn seal(c: &Call<'_>) -> Result<Reply, ApiError> {
    c.app.seal.seal();
    tracing::info!("node sealed by request");
    Ok(Reply::empty())
}

async fn leader(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::json(StatusCode::OK, super::vault_ha::leader_body(c.app)))
}

async fn vault_ha_status(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::json(StatusCode::OK, super::vault_ha::ha_status(c.app).await))
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

/// Vault answers these listings with the map both at the top level and under `data`.
fn listing(map: serde_json::Map<String, Value>) -> Reply {
    let mut body = super::envelope(Value::Object(map.clone()), Value::Null);
    if let Some(obj) = body.as_object_mut() {
        obj.extend(map);
    }
    Reply::json(StatusCode::OK, body)
}

async fn list_mounts(c: &Call<'_>) -> Result<Reply, ApiError> {
    let mounts = c.app.state.read(|s| s.mounts.iter().map(|(path, m)| (path.clone(), mount_json(m))).collect());
    Ok(listing(mounts))
}

/// Vault's description of an auth mount.
fn auth_json(path: &str, kind: &str, uuid: &str, description: &str) -> Value {
    json!({
        "type": kind,
        "description": description,
        "accessor": format!("auth_{kind}_{}", uuid.get(..8).unwrap_or(uuid)),
        "uuid": uuid,
        "local": false,
        "seal_wrap": false,
        "options": null,
        "config": { "default_lease_ttl": 0, "max_lease_ttl": 0, "token_type": "default-service" },
        "path": format!("auth/{path}"),
    })
}

/// Every auth mount: the token store, the built-in userpass, and those enabled since.
fn auth_listing(s: &citadel_core::state::State) -> serde_json::Map<String, Value> {
    let mut methods = serde_json::Map::new();
    methods.insert(TOKEN_AUTH.into(), auth_json(TOKEN_AUTH, "token", "token000", "token based credentials"));
    methods
        .insert(DEFAULT_USERPASS.into(), auth_json(DEFAULT_USERPASS, "userpass", "userpass", "username and password"));
    for (path, m) in &s.auth_mounts {
        methods.insert(path.clone(), auth_json(path, &m.kind, &m.uuid, &m.description));
    }
    methods
}

async fn list_auth(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(listing(c.app.state.read(auth_listing)))
}

async fn read_auth(c: &Call<'_>) -> Result<Reply, ApiError> {
    let path = mount_key(c.param("path"));
    let method = c.app.state.read(|s| auth_listing(s).remove(&path)).ok_or_else(ApiError::not_found)?;
    Ok(Reply::data(method))
}

/// Enables an auth method by `type` (§9.1), as `vault auth enable -path=P userpass` does.
async fn enable_auth(c: &Call<'_>) -> Result<Reply, ApiError> {
    let path = mount_key(c.param("path"));
    let body: Value = c.req.json()?;
    let kind = body.get("type").and_then(Value::as_str).unwrap_or("");
    if path == DEFAULT_USERPASS && kind == "userpass" {
        // Built in, so already enabled: scripts written for a fresh Vault, which enable it
        // first, run unchanged (docs/ARCHITECTURE.md, deviations).
        return Ok(Reply::empty());
    }
    let method = super::routes::auth_method(kind).ok_or_else(|| {
        let known: Vec<&str> = super::routes::AUTH_METHODS.iter().map(|m| m.kind).collect();
        ApiError::bad_request(format!("unknown auth method type {kind:?}: this build serves {known:?}"))
    })?;
    let valid = path.len() > 1 && !path.contains("//") && path.len() <= 128;
    if !valid {
        return Err(ApiError::bad_request(format!("cannot enable an auth method at auth/{path}: invalid path")));
    }
    let mount = AuthMount {
        uuid: ids::uuid(),
        kind: method.kind.into(),
        description: body.get("description").and_then(Value::as_str).unwrap_or("").into(),
        created: ids::now_ms(),
    };
    match c.app.propose(Command::AuthEnable { path, mount }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn disable_auth(c: &Call<'_>) -> Result<Reply, ApiError> {
    let path = mount_key(c.param("path"));
    if path == DEFAULT_USERPASS || path == TOKEN_AUTH {
        return Err(ApiError::bad_request(format!("auth/{path} is built in and cannot be disabled")));
    }
    match c.app.propose(Command::AuthDisable { path }).await? {
        Response::Rejected(citadel_core::command::Rejection::MountNotFound(_)) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn raft_config(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(raft_configuration(c.app)))
}

/// A node id given as a number or a numeric string.
fn node_id_field(body: &Value, names: &[&str]) -> Result<u64, ApiError> {
    names
        .iter()
        .find_map(|name| body.get(*name))
        .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
        .ok_or_else(|| ApiError::bad_request(format!("missing required field {:?} (a node id)", names[0])))
}

async fn remove_peer(c: &Call<'_>) -> Result<Reply, ApiError> {
    let target = node_id_field(&c.req.json()?, &["server_id", "node_id"])?;
    crate::membership::remove_peer(c.app, target).await.map_err(ApiError::bad_request)?;
    Ok(Reply::empty())
}

async fn join_token(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, keys) = (c.app, c.keys()?);
    let body: Value = c.req.json()?;
    let ttl = super::duration_secs(body.get("ttl"), "ttl")?.unwrap_or(3600).clamp(60, 7 * 86_400);
    let node_id = join_token_node_id(app, &body)?;
    let token = format!("cjt.{}", &ids::token()[4..]);
    let expires = ids::now_ms() + ttl * 1000;
    let hash = citadel_core::token::token_hash(&keys.keyring.token_hmac_key, &token);
    match app.propose(Command::JoinTokenCreate { hash, expires, node_id }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::data(
            json!({ "join_token": token, "expire_time": rfc3339(expires), "ttl": ttl, "node_id": node_id }),
        )),
    }
}

async fn snapshot_save(c: &Call<'_>) -> Result<Reply, ApiError> {
    super::snapshot::save(c.app, c.keys()?).await
}

async fn snapshot_restore(c: &Call<'_>) -> Result<Reply, ApiError> {
    super::snapshot::restore(c.app, c.keys()?, c.req, false).await
}

async fn snapshot_force(c: &Call<'_>) -> Result<Reply, ApiError> {
    super::snapshot::restore(c.app, c.keys()?, c.req, true).await
}

async fn autopilot(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(autopilot_state(crate::ha::status(c.app).await)))
}

async fn ha_status(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(crate::ha::status(c.app).await))
}

async fn transfer_leader(c: &Call<'_>) -> Result<Reply, ApiError> {
    let target = node_id_field(&c.req.json()?, &["node_id"])?;
    crate::membership::transfer_leadership(c.app, target).await.map_err(ApiError::bad_request)?;
    Ok(Reply::empty())
}

async fn audit_verify(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(audit_verify_body(c.app)))
}

fn mount_json(m: &Mount) -> Value {
    json!({
        "type": m.kind,
        "description": m.description,
        "uuid": m.uuid,
        // `get`: a restored snapshot is a data file, and data files must not be able to panic us.
        "accessor": format!("kv_{}", m.uuid.get(..8).unwrap_or(&m.uuid)),
        "config": { "default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": false },
        "options": { "version": "2" },
        "local": false,
        "seal_wrap": false,
        "external_entropy_access": false,
        "running_plugin_version": "",
    })
}

async fn read_mount(c: &Call<'_>) -> Result<Reply, ApiError> {
    let path = mount_key(c.param("path"));
    let mount = c.app.state.read(|s| s.mounts.get(&path).map(mount_json)).ok_or_else(ApiError::not_found)?;
    Ok(Reply::data(mount))
}

/// Enables a secrets engine by `type` (§9.1), as `vault secrets enable` does.
async fn enable_mount(c: &Call<'_>) -> Result<Reply, ApiError> {
    let path = mount_key(c.param("path"));
    let body: Value = c.req.json()?;
    let kind = body.get("type").and_then(Value::as_str).unwrap_or("");
    let engine = super::routes::engine(kind).ok_or_else(|| {
        let known: Vec<&str> = super::routes::ENGINES.iter().map(|e| e.kind).collect();
        ApiError::bad_request(format!("unknown secrets engine type {kind:?}: this build serves {known:?}"))
    })?;
    (engine.check_options)(&body).map_err(ApiError::bad_request)?;
    let reserved = ["sys/", "auth/", "identity/", "cubbyhole/"];
    if path == "/" || reserved.iter().any(|r| path.starts_with(r)) || path.contains("//") {
        return Err(ApiError::bad_request(format!("cannot mount at {path:?}: the path is reserved or invalid")));
    }
    let description = body.get("description").and_then(Value::as_str).unwrap_or("");
    let mount = new_mount(engine.kind, ids::now_ms(), description);
    match c.app.propose(Command::MountEnable { path, mount }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn disable_mount(c: &Call<'_>) -> Result<Reply, ApiError> {
    let path = mount_key(c.param("path"));
    match c.app.propose(Command::MountDisable { path }).await? {
        Response::Rejected(citadel_core::command::Rejection::MountNotFound(_)) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

/// Hands leadership to another voter; on a cluster of one there is nobody to hand it to.
async fn step_down(c: &Call<'_>) -> Result<Reply, ApiError> {
    let app = c.app;
    let metrics = app.raft_metrics();
    if metrics.current_leader != Some(app.node_id()) {
        return Ok(Reply::empty());
    }
    let other = metrics.membership_config.membership().voter_ids().find(|id| *id != app.node_id());
    if let Some(target) = other {
        crate::membership::transfer_leadership(app, target).await.map_err(ApiError::unavailable)?;
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
    let m = app.raft_metrics();
    let idx = |l: &Option<citadel_storage::types::LogId>| l.as_ref().map_or(0, |l| l.index);
    let raft = [
        ("citadel_raft_term", "Current Raft term.", m.current_term),
        ("citadel_raft_commit_index", "Highest committed log index.", idx(&m.local_committed)),
        ("citadel_raft_applied_index", "Highest applied log index.", idx(&m.last_applied)),
        ("citadel_raft_snapshot_index", "Last log index in the latest snapshot.", idx(&m.snapshot)),
        ("citadel_raft_purged_index", "Last log index removed by compaction.", idx(&m.purged)),
        ("citadel_raft_is_leader", "1 if this node leads.", u64::from(m.current_leader == Some(app.node_id()))),
        ("citadel_sealed", "1 if this node is sealed.", u64::from(app.seal.is_sealed())),
        ("citadel_audit_spool_last_seq", "Last sequence written to the local audit spool.", app.audit.last_seq()),
    ];
    match req.query.get("format").map(String::as_str) {
        Some("prometheus") => {
            Ok(Reply::raw(StatusCode::OK, "text/plain; version=0.0.4", app.metrics.render(&raft).into_bytes()))
        }
        None | Some("json") => {
            let gauges: Vec<Value> = raft.iter().map(|(name, _, v)| json!({ "Name": name, "Value": v })).collect();
            Ok(Reply::json(StatusCode::OK, json!({ "Gauges": gauges, "Counters": [], "Samples": [] })))
        }
        Some(other) => Err(ApiError::bad_request(format!("unknown metrics format {other:?} (use prometheus or json)"))),
    }
}

/// Vault's autopilot state, derived from the HA table.
fn autopilot_state(ha: Value) -> Value {
    let cluster = &ha["cluster"];
    let nodes = ha["nodes"].as_array().cloned().unwrap_or_default();
    let servers: serde_json::Map<String, Value> = nodes
        .iter()
        .map(|n| {
            let healthy = matches!(n["state"].as_str(), Some("healthy" | "sealed"));
            let status = if n["role"] == json!("leader") {
                "leader".to_string()
            } else {
                n["suffrage"].as_str().unwrap_or("").to_string()
            };
            (
                n["id"].to_string(),
                json!({
                    "id": n["id"].to_string(),
                    "name": n["name"],
                    "address": n["cluster_addr"],
                    "node_status": if n["state"] == json!("unreachable") { "left" } else { "alive" },
                    "last_contact": n["last_contact_ms"],
                    "last_index": n["matched_index"],
                    "healthy": healthy,
                    "status": status,
                    "version": n["version"],
                }),
            )
        })
        .collect();
    let voters: Vec<String> =
        nodes.iter().filter(|n| n["suffrage"] == json!("voter")).map(|n| n["id"].to_string()).collect();
    json!({
        "healthy": cluster["health"] == json!("alive"),
        "failure_tolerance": cluster["failure_tolerance"],
        "leader": cluster["leader_id"].to_string(),
        "voters": voters,
        "servers": servers,
    })
}

fn raft_configuration(app: &Node) -> Value {
    let metrics = app.raft_metrics();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let servers: Vec<Value> = membership
        .nodes()
        .map(|(id, node)| {
            json!({
                "node_id": id.to_string(),
                "address": node.cluster_addr,
                "leader": metrics.current_leader == Some(*id),
                "protocol_version": "3",
                "voter": voters.contains(id),
            })
        })
        .collect();
    json!({ "config": { "servers": servers, "index": metrics.membership_config.log_id().as_ref().map_or(0, |l| l.index) } })
}

async fn audit_events(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    let node = req
        .query
        .get("node")
        .map(|n| n.parse::<u64>().map_err(|_| ApiError::bad_request("node must be a node id (integer)")))
        .transpose()?;
    let since = match req.query.get("since") {
        None => 0,
        Some(s) => match s.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => {
                let secs = citadel_core::time::parse_duration_secs(s).ok_or_else(|| {
                    ApiError::bad_request(
                        "since must be Unix milliseconds or a duration such as 15m (meaning: that long ago)",
                    )
                })?;
                ids::now_ms().saturating_sub(secs * 1000)
            }
        },
    };
    let limit = match req.query.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=10_000).contains(l))
            .ok_or_else(|| ApiError::bad_request("limit must be between 1 and 10000"))?,
    };
    let user = req.query.get("user");
    let path = req.query.get("path");
    let mut events = app.state.read(|s| {
        s.audit
            .chains
            .iter()
            .filter(|(id, _)| node.is_none_or(|n| n == **id))
            .flat_map(|(_, chain)| chain.events.iter())
            .filter(|e| e.body().time >= since)
            .filter(|e| user.is_none_or(|u| &e.body().user == u))
            .filter(|e| path.is_none_or(|p| e.body().path.starts_with(p.as_str())))
            .cloned()
            .collect::<Vec<_>>()
    });
    events.sort_by_key(|e| (e.body().time, e.body().node, e.body().seq));
    let skip = events.len().saturating_sub(limit);
    let events: Vec<Value> = events.iter().skip(skip).map(AuditEvent::view).collect();
    Ok(Reply::data(json!({ "events": events })))
}

fn audit_verify_body(app: &Node) -> Value {
    app.state.read(|s| {
        let nodes: serde_json::Map<String, Value> = s
            .audit
            .chains
            .iter()
            .map(|(id, chain)| {
                (id.to_string(), json!({ "events": chain.events.len(), "last_seq": chain.last_seq(), "last_hash": chain.last_hash() }))
            })
            .collect();
        match s.audit.verify() {
            Ok(total) => json!({ "ok": true, "events": total, "nodes": nodes }),
            Err(e) => json!({ "ok": false, "error": e.to_string(), "nodes": nodes }),
        }
    })
}
