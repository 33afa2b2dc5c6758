//! `sys/` endpoints: lifecycle (init, seal, unseal), status, mounts, keyring, audit queries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use citadel_core::audit::AuditBody;
use citadel_core::barrier::{self, Key, Keyring};
use citadel_core::command::{Command, InitCommand, Response};
use citadel_core::kv::KvStore;
use citadel_core::policy::{self, Caps};
use citadel_core::state::{ClusterInfo, Mount, SealInfo};
use citadel_core::time::rfc3339;
use citadel_core::token::{token_hash, TokenEntry};
use citadel_core::{shamir, UnixMillis};
use citadel_storage::NodeInfo;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{authorize, authorize_op, record_audit, ApiError, ApiRequest, Op, Reply, Target};
use crate::app::App;
use crate::auth::Caller;
use crate::config::SealKind;
use crate::ids;
use crate::seal::{decode_share, Unsealed};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn query_code(req: &ApiRequest, name: &str, default: u16) -> Result<StatusCode, ApiError> {
    let code = match req.query.get(name) {
        None => default,
        Some(v) => {
            v.parse::<u16>().map_err(|_| ApiError::bad_request(format!("{name} must be an HTTP status code")))?
        }
    };
    StatusCode::from_u16(code).map_err(|_| ApiError::bad_request(format!("{name}: {code} is not a valid status code")))
}

/// This node's view of leadership: `leader`, `follower` or `read_only`.
pub fn ha_mode(app: &App) -> &'static str {
    if app.read_only() {
        return "read_only";
    }
    match app.raft_metrics().current_leader {
        Some(id) if id == app.node_id() => "leader",
        Some(_) => "follower",
        None => "read_only",
    }
}

pub fn health(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
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

pub fn seal_status_body(app: &App) -> Value {
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

pub fn seal_status(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
    if req.op() != Some(Op::Read) {
        return Err(ApiError::method_not_allowed());
    }
    Ok(Reply::json(StatusCode::OK, seal_status_body(app)))
}

fn seal_event(app: &App, req: &ApiRequest, operation: &str, status: u16, error: String) -> AuditBody {
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

pub async fn unseal(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
    if req.op() != Some(Op::Write) {
        return Err(ApiError::method_not_allowed());
    }
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
    let info = app.state.read(|s| s.seal.clone());
    if info.is_none() {
        return Err(ApiError::bad_request("the vault is not initialized"));
    }
    if !app.seal.is_sealed() {
        return Ok(Reply::json(StatusCode::OK, seal_status_body(app)));
    }
    let key = body.key.ok_or_else(|| ApiError::bad_request("missing required field \"key\""))?;
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
pub async fn bootstrap(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
    if req.op() != Some(Op::Write) {
        return Err(ApiError::method_not_allowed());
    }
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
pub async fn join(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
    if req.op() != Some(Op::Write) {
        return Err(ApiError::method_not_allowed());
    }
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

pub async fn init(app: &Arc<App>, req: &ApiRequest) -> Result<Reply, ApiError> {
    match req.op() {
        Some(Op::Read) => {
            let initialized = app.state.read(|s| s.is_initialized());
            Ok(Reply::json(StatusCode::OK, json!({ "initialized": initialized })))
        }
        Some(Op::Write) => initialize(app, req).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Bootstraps the single-node Raft cluster (if needed), then proposes the initial state.
async fn initialize(app: &Arc<App>, req: &ApiRequest) -> Result<Reply, ApiError> {
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
        default_mount: new_kv_mount(now, "key/value secret storage"),
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

pub fn new_kv_mount(now: UnixMillis, description: &str) -> Mount {
    Mount {
        uuid: ids::uuid(),
        kind: "kv".into(),
        description: description.into(),
        created: now,
        kv: KvStore::default(),
    }
}

/// Makes this node the sole voter of a new cluster and waits for it to lead.
async fn bootstrap_raft(app: &App) -> Result<(), ApiError> {
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
    wait.metrics(|m| m.current_leader.is_some(), "a leader is elected").await.map_err(|_| ApiError::no_leader())?;
    let leader = app.raft_metrics().current_leader;
    if leader != Some(me) {
        return Err(ApiError::bad_request(format!(
            "this node is part of a cluster led by node {leader:?}; initialize through the leader"
        )));
    }
    Ok(())
}

/// The optional `node_id` of a join token request: the only node id the token may certify.
fn join_token_node_id(app: &App, body: &Value) -> Result<Option<u64>, ApiError> {
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

pub(crate) fn need_sudo(app: &App, caller: &Caller, req: &ApiRequest, op: Op) -> Result<(), ApiError> {
    authorize_op(app, caller, req, op, Target::Action)?;
    authorize(app, caller, &req.path, Caps::SUDO)
}

pub async fn route(
    app: &Arc<App>,
    req: &ApiRequest,
    op: Op,
    caller: &Caller,
    rest: &str,
    keys: &Unsealed,
) -> Result<Reply, ApiError> {
    match (rest, op) {
        ("seal", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            app.seal.seal();
            tracing::info!("node sealed by request");
            Ok(Reply::empty())
        }
        ("leader", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            Ok(Reply::json(StatusCode::OK, leader_body(app)))
        }
        ("step-down", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            step_down(app).await
        }
        ("rotate", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            rotate(app, keys).await
        }
        ("key-status", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            let info = app.state.read(|s| s.seal.clone()).ok_or_else(ApiError::sealed)?;
            let body = json!({ "term": info.key_term, "install_time": rfc3339(info.key_installed) });
            let mut reply = Reply::data(body.clone());
            if let (Some(obj), Some(extra)) = (reply.body.as_mut().and_then(Value::as_object_mut), body.as_object()) {
                obj.extend(extra.clone());
            }
            Ok(reply)
        }
        ("metrics", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            metrics(app, req)
        }
        ("openapi", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            Ok(Reply::json(StatusCode::OK, super::openapi::document()))
        }
        ("mounts", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            let mounts = app.state.read(|s| {
                s.mounts.iter().map(|(path, m)| (path.clone(), mount_json(m))).collect::<serde_json::Map<_, _>>()
            });
            let mut body = super::envelope(Value::Object(mounts.clone()), Value::Null);
            body.as_object_mut().expect("envelope is an object").extend(mounts);
            Ok(Reply::json(StatusCode::OK, body))
        }
        ("auth", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            let methods = json!({
                "token/": { "type": "token", "description": "token based credentials", "accessor": "auth_token", "local": false, "seal_wrap": false, "options": null, "config": {} },
                "userpass/": { "type": "userpass", "description": "username and password", "accessor": "auth_userpass", "local": false, "seal_wrap": false, "options": null, "config": {} },
            });
            let mut body = super::envelope(methods.clone(), Value::Null);
            body.as_object_mut().expect("envelope").extend(methods.as_object().expect("object").clone());
            Ok(Reply::json(StatusCode::OK, body))
        }
        ("storage/raft/configuration", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            Ok(Reply::data(raft_configuration(app)))
        }
        ("storage/raft/remove-peer", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            let body: Value = req.json()?;
            let target = body
                .get("server_id")
                .or_else(|| body.get("node_id"))
                .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
                .ok_or_else(|| ApiError::bad_request("missing required field \"server_id\" (a node id)"))?;
            crate::membership::remove_peer(app, target).await.map_err(ApiError::bad_request)?;
            Ok(Reply::empty())
        }
        ("storage/raft/join-token", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            let body: Value = req.json()?;
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
        ("storage/raft/snapshot", Op::Read) => {
            need_sudo(app, caller, req, op)?;
            super::snapshot::save(app, keys).await
        }
        ("storage/raft/snapshot", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            super::snapshot::restore(app, keys, req, false).await
        }
        ("storage/raft/snapshot-force", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            super::snapshot::restore(app, keys, req, true).await
        }
        ("storage/raft/autopilot/state", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            Ok(Reply::data(autopilot_state(crate::ha::status(app).await)))
        }
        ("ha/status", Op::Read) => {
            authorize_op(app, caller, req, op, Target::Action)?;
            Ok(Reply::data(crate::ha::status(app).await))
        }
        ("ha/transfer-leader", Op::Write) => {
            need_sudo(app, caller, req, op)?;
            let body: Value = req.json()?;
            let target = body
                .get("node_id")
                .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
                .ok_or_else(|| ApiError::bad_request("missing required field \"node_id\" (a node id)"))?;
            crate::membership::transfer_leadership(app, target).await.map_err(ApiError::bad_request)?;
            Ok(Reply::empty())
        }
        ("events" | "jobs", Op::Read) => super::events::route(app, req, op, caller, rest).await,
        ("audit/events", Op::Read) => {
            need_sudo(app, caller, req, op)?;
            audit_events(app, req).await
        }
        ("audit/verify", Op::Read) => {
            need_sudo(app, caller, req, op)?;
            app.linearize().await?;
            Ok(Reply::data(audit_verify(app)))
        }
        _ => {
            if let Some(path) = rest.strip_prefix("mounts/") {
                let exists = app.state.read(|s| s.mounts.contains_key(&format!("{}/", path.trim_matches('/'))));
                authorize_op(app, caller, req, op, Target::exists(exists))?;
                return mount(app, req, op, path).await;
            }
            if rest == "policies/acl"
                || rest.starts_with("policies/acl/")
                || rest == "policy"
                || rest.starts_with("policy/")
            {
                return super::policy::route(app, req, op, caller, rest).await;
            }
            let known = ["seal", "leader", "step-down", "rotate", "key-status", "metrics", "openapi", "mounts", "auth"];
            if known.contains(&rest) || ["storage/raft/", "audit/", "ha/"].iter().any(|p| rest.starts_with(p)) {
                return Err(ApiError::method_not_allowed());
            }
            Err(ApiError::no_route(&req.path))
        }
    }
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

async fn mount(app: &App, req: &ApiRequest, op: Op, path: &str) -> Result<Reply, ApiError> {
    let path = format!("{}/", path.trim_matches('/'));
    match op {
        Op::Read => {
            let m = app.state.read(|s| s.mounts.get(&path).map(mount_json)).ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(m))
        }
        Op::Write => {
            let body: Value = req.json()?;
            let kind = body.get("type").and_then(Value::as_str).unwrap_or("");
            let version = body.pointer("/options/version").and_then(Value::as_str).unwrap_or("2");
            if !(kind == "kv-v2" || (kind == "kv" && version == "2")) {
                return Err(ApiError::bad_request(format!(
                    "only KV version 2 secrets engines are supported (type \"kv\" with options.version \"2\", or \"kv-v2\"); got type {kind:?} version {version:?}"
                )));
            }
            let reserved = ["sys/", "auth/", "identity/", "cubbyhole/"];
            if path == "/" || reserved.iter().any(|r| path.starts_with(r)) || path.contains("//") {
                return Err(ApiError::bad_request(format!(
                    "cannot mount at {path:?}: the path is reserved or invalid"
                )));
            }
            let description = body.get("description").and_then(Value::as_str).unwrap_or("");
            let mount = new_kv_mount(ids::now_ms(), description);
            match app.propose(Command::MountEnable { path, mount }).await? {
                Response::Rejected(r) => Err(r.into()),
                _ => Ok(Reply::empty()),
            }
        }
        Op::Delete => match app.propose(Command::MountDisable { path }).await? {
            Response::Rejected(citadel_core::command::Rejection::MountNotFound(_)) => Ok(Reply::empty()),
            Response::Rejected(r) => Err(r.into()),
            _ => Ok(Reply::empty()),
        },
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn node_addrs(app: &App, id: u64) -> Option<NodeInfo> {
    app.raft_metrics().membership_config.membership().get_node(&id).cloned()
}

fn leader_body(app: &App) -> Value {
    let metrics = app.raft_metrics();
    let leader = metrics.current_leader.and_then(|id| node_addrs(app, id));
    json!({
        "ha_enabled": true,
        "is_self": metrics.current_leader == Some(app.node_id()),
        "active_time": "0001-01-01T00:00:00Z",
        "leader_address": leader.as_ref().map(|n| n.api_addr.clone()).unwrap_or_default(),
        "leader_cluster_address": leader.as_ref().map(|n| format!("https://{}", n.cluster_addr)).unwrap_or_default(),
        "performance_standby": false,
        "performance_standby_last_remote_wal": 0,
        "raft_committed_index": metrics.local_committed.as_ref().map_or(0, |l| l.index),
        "raft_applied_index": metrics.last_applied.as_ref().map_or(0, |l| l.index),
    })
}

/// Hands leadership to another voter; on a cluster of one there is nobody to hand it to.
async fn step_down(app: &App) -> Result<Reply, ApiError> {
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

async fn rotate(app: &App, keys: &Unsealed) -> Result<Reply, ApiError> {
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

fn metrics(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
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

fn raft_configuration(app: &App) -> Value {
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

async fn audit_events(app: &App, req: &ApiRequest) -> Result<Reply, ApiError> {
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
    if !req.stale_ok() {
        app.linearize().await?;
    }
    let mut events = app.state.read(|s| {
        s.audit
            .chains
            .iter()
            .filter(|(id, _)| node.is_none_or(|n| n == **id))
            .flat_map(|(_, chain)| chain.events.iter())
            .filter(|e| e.body.time >= since)
            .filter(|e| user.is_none_or(|u| &e.body.user == u))
            .filter(|e| path.is_none_or(|p| e.body.path.starts_with(p.as_str())))
            .cloned()
            .collect::<Vec<_>>()
    });
    events.sort_by_key(|e| (e.body.time, e.body.node, e.body.seq));
    let skip = events.len().saturating_sub(limit);
    let events: Vec<Value> =
        events.into_iter().skip(skip).map(|e| serde_json::to_value(e).expect("serializes")).collect();
    Ok(Reply::data(json!({ "events": events })))
}

fn audit_verify(app: &App) -> Value {
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
