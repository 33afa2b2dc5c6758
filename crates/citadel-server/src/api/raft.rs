//! `sys/storage/raft/*` and `sys/ha/*`: a node joining (join token → certificate), membership,
//! snapshots, autopilot and HA status.

use axum::http::StatusCode;
use citadel_core::audit::AuditBody;
use citadel_core::command::{Command, Response};
use citadel_core::route::{Kind, Param, Route};
use citadel_core::time::rfc3339;
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{record_audit, ApiError, Op, Reply};
use crate::ids;
use crate::node::Node;

/// `sys/storage/raft/*` and `sys/ha/*`: joining, membership, snapshots, HA status.
pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
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
            "sys/ha/nodes/:id/deactivate",
            vec![op::sudo(
                Op::Write,
                "Stop a node serving clients and take its vote; it keeps replicating",
                handler!(node_deactivate),
            )
            .with_params(FORCE_PARAMS)],
        ),
        route(
            "sys/ha/nodes/:id/activate",
            vec![op::sudo(Op::Write, "Let a deactivated node serve and vote again", handler!(node_activate))],
        ),
        route(
            "sys/ha/nodes/:id/resync",
            vec![op::sudo(
                Op::Write,
                "Make a node discard its state and catch up from a snapshot",
                handler!(node_resync),
            )
            .with_params(FORCE_PARAMS)],
        ),
        route(
            "sys/ha/nodes/:id/rename",
            vec![op::sudo(Op::Write, "Change a node's display name", handler!(node_rename)).with_params(RENAME_PARAMS)],
        ),
        route(
            "sys/ha/nodes/:id/remove",
            vec![op::sudo(Op::Write, "Remove a node from the cluster (remove-peer)", handler!(node_remove))],
        ),
        route(
            "sys/ha/transfer-leader",
            vec![op::sudo(Op::Write, "Hand leadership to a voter", handler!(transfer_leader))
                .with_params(TRANSFER_PARAMS)],
        ),
    ]
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

const BOOTSTRAP_PARAMS: &[Param] = &[
    Param::body("join_token", Kind::String, "A one-time join token").required(),
    Param::body("node_id", Kind::Integer, "The joining node's id").required(),
    Param::body("names", Kind::StringList, "IP addresses and DNS names the certificate must cover").required(),
];

const REMOVE_PEER_PARAMS: &[Param] = &[Param::body("server_id", Kind::String, "The node id to remove").required()];

const JOIN_TOKEN_PARAMS: &[Param] = &[
    Param::body("ttl", Kind::Duration, "Lifetime (60s to 7 days, default 1h)"),
    Param::body("node_id", Kind::Integer, "Bind the token to one node id"),
];

const FORCE_PARAMS: &[Param] =
    &[Param::body("force", Kind::Boolean, "Go ahead even if the cluster would lose its failure tolerance")];

const RENAME_PARAMS: &[Param] = &[Param::body("name", Kind::String, "The node's new display name").required()];

/// The `:id` of a `sys/ha/nodes/:id/...` path.
fn path_node_id(c: &Call<'_>) -> Result<u64, ApiError> {
    let raw = c.param("id");
    raw.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::bad_request(format!("{raw:?} is not a node id (a positive integer, as in sys/ha/status)"))
    })
}

/// The optional `force` flag of a lifecycle request.
fn force_field(c: &Call<'_>) -> Result<bool, ApiError> {
    let body: Value = if c.req.body.is_empty() { Value::Null } else { c.req.json()? };
    match body.get("force") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(force)) => Ok(*force),
        Some(other) => Err(ApiError::bad_request(format!("force must be true or false, not {other}"))),
    }
}

async fn lifecycle(c: &Call<'_>, action: crate::lifecycle::Action) -> Result<Reply, ApiError> {
    use crate::lifecycle::LifecycleError;
    let node_id = path_node_id(c)?;
    crate::lifecycle::run(c.app, crate::lifecycle::Request { node_id, action }).await.map_err(|e| match e {
        LifecycleError::NotMember(e) => ApiError::new(StatusCode::NOT_FOUND, e),
        LifecycleError::Busy(e) => ApiError::new(StatusCode::CONFLICT, e),
        LifecycleError::Unavailable(e) => ApiError::unavailable(e),
        LifecycleError::Refused(e) => ApiError::bad_request(e),
    })?;
    Ok(Reply::empty())
}

async fn node_deactivate(c: &Call<'_>) -> Result<Reply, ApiError> {
    lifecycle(c, crate::lifecycle::Action::Deactivate { force: force_field(c)? }).await
}

async fn node_activate(c: &Call<'_>) -> Result<Reply, ApiError> {
    lifecycle(c, crate::lifecycle::Action::Activate).await
}

async fn node_resync(c: &Call<'_>) -> Result<Reply, ApiError> {
    lifecycle(c, crate::lifecycle::Action::Resync { force: force_field(c)? }).await
}

async fn node_rename(c: &Call<'_>) -> Result<Reply, ApiError> {
    let body: Value = c.req.json()?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("missing required field \"name\" (the node's new display name)"))?;
    lifecycle(c, crate::lifecycle::Action::Rename { name: name.to_string() }).await
}

async fn node_remove(c: &Call<'_>) -> Result<Reply, ApiError> {
    let node_id = path_node_id(c)?;
    crate::membership::remove_peer(c.app, node_id).await.map_err(ApiError::bad_request)?;
    Ok(Reply::empty())
}

const TRANSFER_PARAMS: &[Param] =
    &[Param::body("node_id", Kind::Integer, "The voter to hand leadership to").required()];

async fn vault_ha_status(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::json(StatusCode::OK, super::vault_ha::ha_status(c.app).await))
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
    crate::membership::check_voter(c.app, target).map_err(ApiError::bad_request)?;
    // A voter that could not take over now may next time: asking again is the remedy.
    crate::membership::transfer_leadership(c.app, target).await.map_err(ApiError::unavailable)?;
    Ok(Reply::empty())
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
