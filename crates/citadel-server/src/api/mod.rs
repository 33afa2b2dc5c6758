//! The HTTP API (§4): Vault's paths, envelope and status codes.
//!
//! One dispatcher owns the order every request goes through, so no endpoint can skip a step:
//! unauthenticated endpoints → seal check → token → ACL → handler → audit (a write's event in
//! its own Raft entry, any other fsynced to the spool) → answer.

mod alerts;
mod audit_query;
mod auth;
mod barrier_view;
mod events;
mod kv;
mod mounts;
mod node_error;
pub mod openapi;
mod policy;
mod raft;
pub mod routes;
mod snapshot;
mod snapshot_auto;
mod sys;
mod vault_ha;

pub use crate::snapshot::{parse_any as snapshot_file, MAX_SNAPSHOT};
pub use snapshot::may_read_body as may_read_snapshot_body;
pub use sys::VERSION;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use citadel_core::audit::{hmac_string, AuditBody};
use citadel_core::command::Rejection;
use citadel_core::policy::Caps;
use citadel_core::route::{Captures, Consistency, Need, Operation, Route};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::audit_envelope::{AuditCarrier, Disposition};
use crate::auth::Caller;
use crate::ids;
use crate::node::Node;
use crate::seal::Unsealed;
use routes::{Call, Handler};

/// Largest request body accepted (§4).
pub const MAX_BODY: usize = 1 << 20;

pub use citadel_core::route::Op;

pub struct ApiRequest {
    pub method: Method,
    /// The path after `/v1/`, without leading or trailing slashes.
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub remote: String,
    /// Names this request in its answer and its audit event.
    pub id: String,
    /// Set by a handler that answered from the local replica without a read index, so the
    /// answer is marked stale even if the leader is back by the time it leaves.
    pub served_stale: std::sync::atomic::AtomicBool,
}

impl ApiRequest {
    pub fn op(&self) -> Option<Op> {
        let list_query = self.query.get("list").is_some_and(|v| v == "true" || v == "1");
        match self.method.as_str() {
            "GET" | "HEAD" if list_query => Some(Op::List),
            "GET" | "HEAD" => Some(Op::Read),
            "LIST" => Some(Op::List),
            "POST" | "PUT" => Some(Op::Write),
            "PATCH" => Some(Op::Patch),
            "DELETE" => Some(Op::Delete),
            _ => None,
        }
    }

    /// The JSON body, or `{}` when there is none; malformed JSON is a 400 naming the problem.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &self.body };
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }

    pub fn token(&self) -> Option<String> {
        token_from_headers(&self.headers)
    }

    pub fn stale_ok(&self) -> bool {
        let header = self.headers.get("x-citadel-consistency").and_then(|v| v.to_str().ok());
        header == Some("stale") || self.query.get("stale").is_some_and(|v| v == "true")
    }
}

/// The client token: `X-Vault-Token`, or `Authorization: Bearer`.
fn token_from_headers(headers: &HeaderMap) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(t) = header("x-vault-token").filter(|t| !t.is_empty()) {
        return Some(t.to_string());
    }
    header("authorization").and_then(|v| v.strip_prefix("Bearer ")).map(|t| t.trim().to_string())
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub errors: Vec<String>,
    /// Vault sometimes answers an error status with a data body (e.g. a deleted KV version).
    pub body: Option<Value>,
    /// A 405's `Allow` header.
    pub allow: Option<String>,
    /// Answered from a replica in read-only mode, this many ms after its last leader contact: a
    /// "not found" from a stale replica is as stale as a value (`X-Citadel-Stale`).
    pub stale_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, errors: vec![message.into()], body: None, allow: None, stale_ms: None }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn forbidden() -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "permission denied")
    }
    pub fn not_found() -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, errors: vec![], body: None, allow: None, stale_ms: None }
    }
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("no handler for route {path:?}"))
    }
    /// A 405, with the methods the path does answer (`Allow`).
    pub fn method_not_allowed(allowed: &[&str]) -> ApiError {
        let mut error = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "unsupported operation for this path");
        error.allow = Some(allowed.join(", "));
        error
    }
    pub fn sealed() -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed")
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// A rejection answers the status `Rejection::status` names (the one its audit event records
/// when `apply` writes it) and its text.
impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, r.to_string())
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Option<Value>,
    pub raw: Option<(&'static str, Vec<u8>)>,
    pub warnings: Vec<String>,
    pub headers: Vec<(&'static str, String)>,
    /// A body written as it is produced (`sys/events`), with its content type.
    pub stream: Option<(&'static str, axum::body::Body)>,
}

/// Vault's response envelope.
fn envelope(data: Value, auth: Value) -> Value {
    json!({
        "request_id": ids::uuid(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": auth,
        "mount_type": "",
    })
}

impl Reply {
    pub fn data(data: Value) -> Reply {
        Reply::json(StatusCode::OK, envelope(data, Value::Null))
    }
    pub fn auth(auth: Value) -> Reply {
        Reply::json(StatusCode::OK, envelope(Value::Null, auth))
    }
    pub fn json(status: StatusCode, body: Value) -> Reply {
        Reply { status, body: Some(body), raw: None, warnings: vec![], headers: vec![], stream: None }
    }
    pub fn empty() -> Reply {
        Reply { status: StatusCode::NO_CONTENT, body: None, raw: None, warnings: vec![], headers: vec![], stream: None }
    }
    pub fn raw(status: StatusCode, content_type: &'static str, bytes: Vec<u8>) -> Reply {
        Reply { status, body: None, raw: Some((content_type, bytes)), warnings: vec![], headers: vec![], stream: None }
    }
    /// A streamed answer: the connection counts as busy until the body ends (`limits.rs`).
    pub fn stream(content_type: &'static str, body: axum::body::Body) -> Reply {
        Reply { stream: Some((content_type, body)), ..Reply::json(StatusCode::OK, Value::Null) }
    }
}

impl Reply {
    /// Stamps the request's id on the answer: Vault's `request_id` field and a header, so that
    /// answers without a body can be matched to their audit event too.
    fn stamp(mut self, request_id: &str) -> Reply {
        if let Some(obj) = self.body.as_mut().and_then(Value::as_object_mut) {
            if obj.contains_key("request_id") {
                obj.insert("request_id".into(), json!(request_id));
            }
        }
        self.headers.push((REQUEST_ID_HEADER, request_id.to_string()));
        self
    }
}

/// Header carrying the request id on every authenticated answer.
pub const REQUEST_ID_HEADER: &str = "x-citadel-request-id";

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match (self.stream, self.raw, self.body) {
            (Some((content_type, body)), _, _) => {
                let mut r = (self.status, body).into_response();
                r.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
                r.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
                r.extensions_mut().insert(crate::limits::Streaming);
                r
            }
            (None, Some((content_type, bytes)), _) => {
                let mut r = (self.status, bytes).into_response();
                r.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
                r
            }
            (None, None, Some(mut body)) => {
                if !self.warnings.is_empty() {
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("warnings".into(), json!(self.warnings));
                    }
                }
                (self.status, axum::Json(body)).into_response()
            }
            (None, None, None) => self.status.into_response(),
        };
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.body.unwrap_or_else(|| json!({}));
        if let Some(obj) = body.as_object_mut() {
            obj.insert("errors".into(), json!(self.errors));
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            response.headers_mut().insert("allow", allow);
        }
        if let Some(staleness) = self.stale_ms {
            response.headers_mut().insert("x-citadel-stale", HeaderValue::from_static("true"));
            response.headers_mut().insert("x-citadel-staleness-ms", HeaderValue::from(staleness));
        }
        response
    }
}

/// Entry point from the HTTP layer.
pub async fn handle(app: Arc<Node>, req: ApiRequest) -> Response {
    let started = std::time::Instant::now();
    let result = dispatch(&app, &req).await;
    let status = match &result {
        Ok(r) => r.status,
        Err(e) => e.status,
    };
    let route = routes::resolve(&app, &req.path).map_or("unmatched", |(route, _)| route.pattern);
    app.metrics.observe_request(route, req.method.as_str(), status.as_u16(), started.elapsed());
    match result {
        Ok(reply) => reply.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn dispatch(app: &Arc<Node>, req: &ApiRequest) -> Result<Reply, ApiError> {
    let route = routes::resolve(app, &req.path);
    if let Some((route, captures)) = &route {
        // On an open route a wrong method is a 405 before any token check (`POST sys/health`).
        if routes::is_unauthenticated(route) {
            let (op, operation) = operation(route, req)?;
            if operation.need == (Need::Unauthenticated { while_sealed: true }) {
                return (operation.handler)(&Call::new(app, req, op, captures.clone())).await;
            }
        }
    }
    let leaving = app.leaving.read().await;
    if *leaving {
        return Err(ApiError::unavailable("this node is leaving the cluster; send requests to another node"));
    }
    let keys = app.keys()?;
    if let Some(redirect) = redirect_to_leader(app, req) {
        return Ok(redirect);
    }
    // Only an operation declared open is served without a token, whatever else its route declares.
    if let Some((route, captures)) = &route {
        if let Ok((op, operation)) = operation(route, req) {
            if operation.need == (Need::Unauthenticated { while_sealed: false }) {
                return (operation.handler)(&Call::new(app, req, op, captures.clone()).unsealed(&keys)).await;
            }
        }
    }
    let now = ids::now_ms();
    let token = req.token();
    let fresh = if token.is_some() { fresh_state(app, req).await } else { Ok(false) };
    let caller = match &fresh {
        Ok(_) => token
            .as_deref()
            .and_then(|t| app.state.read_with_store(|s, store| crate::auth::resolve(s, store, &keys.keyring, t, now))),
        Err(_) => None,
    };
    if caller.is_none() && fresh.is_ok() {
        // No valid token: summarized, not audited one by one (§8.3).
        return Err(refuse_unauthenticated(app, req, now));
    }
    // The request's event, prepared before the handler runs: a write carries it into its own
    // Raft entry (`audit_envelope.rs`); anything else writes it to the spool below.
    let event = request_event(app, req, now, caller.as_ref(), token.as_deref(), &keys);
    let linearized = matches!(fresh, Ok(true));
    let mut carrier = None;
    let result = match (&caller, fresh) {
        (_, Err(e)) => Err(e),
        (None, _) => Err(ApiError::forbidden()),
        (Some(caller), Ok(linearized)) => {
            // An emergency token's requests propose no authorized command (they read, or revoke
            // the token itself): their events stay in the spool, as every read-only-mode event.
            carrier = (!caller.read_only).then(|| Arc::new(AuditCarrier::new(event.clone())));
            let context = crate::node::RequestContext {
                token_hash: (!caller.read_only).then(|| caller.entry.hash.clone()),
                request_id: req.id.clone(),
                linearized,
                audit: carrier.clone(),
            };
            // Resolved again on the state the token was checked against: a mount enabled on
            // another node just before this request is found.
            let route = routes::resolve(app, &req.path);
            crate::node::REQUEST.scope(context, serve(app, req, route, caller, &keys)).await
        }
    };
    match event_place(app, carrier.as_deref(), &req.id) {
        EventPlace::Log => app.metrics.observe_audit_event(),
        place => {
            let mut event = with_outcome(event, &result);
            event.outcome_unknown = place == EventPlace::SpoolOutcomeUnknown;
            record_audit(app, event).await?;
        }
    }
    // A request brought up to the leader's read index is not stale, even if this node has not yet
    // heard the leader's next heartbeat (it still counts itself read-only for that moment).
    let served_stale = req.served_stale.load(std::sync::atomic::Ordering::Relaxed) || (app.read_only() && !linearized);
    let stale = served_stale && !cfg!(feature = "unsafe-stale-reads");
    let staleness = (matches!(req.op(), Some(Op::Read | Op::List)) && stale).then(|| app.staleness_ms());
    let mut reply = match (result, staleness) {
        (Ok(reply), _) => reply.stamp(&req.id),
        // An error a stale replica gives to a read ("not found" above all) is as stale as a value.
        (Err(mut e), Some(staleness)) => {
            e.stale_ms = Some(staleness);
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    if let Some(staleness) = staleness {
        reply.headers.push(("x-citadel-stale", "true".into()));
        reply.headers.push(("x-citadel-staleness-ms", staleness.to_string()));
        reply.warnings.push(format!(
            "read-only mode: the cluster has no leader; this answer comes from this node's replica as of {staleness} ms ago"
        ));
    }
    Ok(reply)
}

/// The operation of `route` the request's method asks for; a method the route does not answer
/// is a 405 naming the methods it does, in an `Allow` header.
fn operation<'r>(route: &'r Route<Handler>, req: &ApiRequest) -> Result<(Op, &'r Operation<Handler>), ApiError> {
    req.op()
        .and_then(|op| route.operation(op).map(|o| (op, o)))
        .ok_or_else(|| ApiError::method_not_allowed(&route.allowed_methods()))
}

/// Brings the local state up to the leader's commit index before a token is checked (§8.1), so a
/// token revoked (or a policy narrowed) before this request started is seen on every node.
/// Returns whether it did (the request's reads are then linearizable as they are). Skipped for
/// stale reads, which serve the replica as it is, and for writes on the leader, whose state
/// already holds everything it acknowledged; in read-only mode the replica answers when no
/// leader can be asked.
async fn fresh_state(app: &Node, req: &ApiRequest) -> Result<bool, ApiError> {
    let write_on_leader = !matches!(req.op(), Some(Op::Read | Op::List)) && app.is_leader();
    if req.stale_ok() || write_on_leader {
        return Ok(false);
    }
    match app.linearize_for_auth().await {
        Ok(()) => Ok(true),
        // Read-only mode (§5.4): no leader could be asked, so the replica answers as it is.
        Err(_) if app.read_only() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Serves an authenticated request: spends a use of a token with `num_uses`, then authorizes
/// the operation from the route table and brings the replica up to date as the route declares.
async fn serve(
    app: &Arc<Node>,
    req: &ApiRequest,
    route: Option<(&'static Route<Handler>, Captures)>,
    caller: &Caller,
    keys: &Unsealed,
) -> Result<Reply, ApiError> {
    if caller.entry.uses_left.is_some() {
        let spent = app.propose(citadel_core::command::Command::TokenUse { hash: caller.entry.hash.clone() }).await?;
        if let citadel_core::command::Response::Rejected(_) = spent {
            return Err(ApiError::forbidden());
        }
    }
    let Some((route, captures)) = route else {
        return Err(ApiError::no_route(&req.path));
    };
    let (op, operation) = match operation(route, req) {
        Ok(found) => found,
        // As Vault: the ACL decides before the method does, so a caller without access to the
        // path learns nothing about what it answers.
        Err(not_allowed) => {
            if let Some(op) = req.op() {
                authorize_op(app, caller, req, op, op.capability())?;
            }
            return Err(not_allowed);
        }
    };
    // An emergency token may revoke itself: that only takes access away.
    let self_revocation = req.path == "auth/token/revoke-self";
    if caller.read_only && !matches!(op, Op::Read | Op::List) && !self_revocation {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "emergency tokens (issued while the cluster had no leader) may only read and list",
        ));
    }
    authorize_route(app, caller, req, op, route, operation.need, &captures)?;
    if matches!(op, Op::Read | Op::List) && operation.consistency == Consistency::Linearizable {
        consistent(app, req).await?;
    }
    // The handler's first proposal carries the request's event; the token use above did not.
    if let Ok(Some(carrier)) = crate::node::REQUEST.try_with(|r| r.audit.clone()) {
        carrier.arm();
    }
    (operation.handler)(&Call::new(app, req, op, captures).authenticated(caller, keys)).await
}

/// Checks the capability the route table declares for this operation, with Vault's existence
/// check deciding between `create` and `update`, and the rule's parameter constraints.
fn authorize_route(
    app: &Node,
    caller: &Caller,
    req: &ApiRequest,
    op: Op,
    route: &Route<Handler>,
    need: Need,
    captures: &Captures,
) -> Result<(), ApiError> {
    let caps = match need {
        // Served before the token check; never reached with a caller.
        Need::Unauthenticated { .. } => return Ok(()),
        Need::Caps(caps) => caps,
        Need::CreateOrUpdate => {
            let exists =
                route.exists.is_some_and(|exists| app.state.read_with_store(|s, store| exists(s, store, captures)));
            if exists {
                Caps::UPDATE
            } else {
                Caps::CREATE
            }
        }
    };
    authorize_op(app, caller, req, op, caps)
}

/// Reads declared linearizable wait for the leader's read index (done already if the token check
/// waited for it); in read-only mode, or when the client asked for a stale read, the replica
/// answers and the dispatcher marks it stale.
async fn consistent(app: &Node, req: &ApiRequest) -> Result<(), ApiError> {
    let linearized = crate::node::REQUEST.try_with(|r| r.linearized) == Ok(true);
    if req.stale_ok() || linearized {
        Ok(())
    } else if app.read_only() {
        req.served_stale.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    } else {
        Ok(app.linearize().await?)
    }
}

/// With `X-Vault-No-Request-Forwarding: true`, a follower answers 307 to the leader (§5.3)
/// instead of handling the request itself.
fn redirect_to_leader(app: &Node, req: &ApiRequest) -> Option<Reply> {
    let asked = req.headers.get("x-vault-no-request-forwarding").and_then(|v| v.to_str().ok()) == Some("true");
    if !asked || req.stale_ok() {
        return None;
    }
    let metrics = app.raft_metrics();
    let leader = metrics.current_leader.filter(|id| *id != app.node_id())?;
    let node = metrics.membership_config.membership().get_node(&leader)?.clone();
    let query: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    let mut reply = Reply::empty();
    reply.status = StatusCode::TEMPORARY_REDIRECT;
    let path = crate::request_path::encode_path(&req.path);
    reply.headers.push(("location", format!("{}/v1/{path}{query}", node.api_addr)));
    Some(reply)
}

/// A request without a valid token is refused 403 and counted into its source's refusal
/// summary rather than audited on its own (§8.3): a flood of them must not grow the replicated
/// audit log by one event each.
fn refuse_unauthenticated(app: &Node, req: &ApiRequest, now: u64) -> ApiError {
    let operation = req.op().map_or("unknown", Op::name);
    app.refusals.note(&req.remote, crate::audit::RefusalReason::NoValidToken, operation, &req.path, now);
    ApiError::forbidden()
}

/// An authenticated request's event as far as it is known before the handler runs, with its
/// path and user capped (it may be proposed as it is). The outcome comes later: from `apply`
/// for an event carried in its write's entry, from `with_outcome` for one written to the spool.
fn request_event(
    app: &Node,
    req: &ApiRequest,
    now: u64,
    caller: Option<&Caller>,
    token: Option<&str>,
    keys: &Unsealed,
) -> AuditBody {
    let max = app.config.audit.max_path_bytes;
    AuditBody {
        node: app.node_id(),
        time: now,
        request_id: req.id.clone(),
        kind: "request".into(),
        operation: req.op().map_or("unknown", Op::name).into(),
        path: crate::limits::cap_for_audit(&req.path, max),
        user: crate::limits::cap_for_audit(&caller.map(Caller::name).unwrap_or_default(), max),
        token_hmac: token.map(|t| hmac_string(&keys.keyring.audit_hmac_key, t)).unwrap_or_default(),
        remote_addr: req.remote.clone(),
        ..AuditBody::default()
    }
}

/// The answer's status and first error, for an event written to the spool.
fn with_outcome(mut event: AuditBody, result: &Result<Reply, ApiError>) -> AuditBody {
    event.status = result.as_ref().map_or_else(|e| e.status.as_u16(), |r| r.status.as_u16());
    event.error = result.as_ref().err().and_then(|e| e.errors.first().cloned()).unwrap_or_default();
    event
}

/// Where a request's event belongs once its handler is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventPlace {
    /// Already in the replicated log, inside the request's write.
    Log,
    /// In the spool: nothing carried it into the log.
    Spool,
    /// In the spool, flagged `outcome_unknown`: a proposal carried it and may still commit, in
    /// which case the log chain will hold the command's own event too (docs/ARCHITECTURE.md).
    SpoolOutcomeUnknown,
}

/// Whether the request's event is already in the replicated log: committed inside its write's
/// entry, or (a proposal whose answer was lost) found among the log chain's latest events on
/// this replica. Otherwise the dispatcher writes it to the spool (fail closed).
fn event_place(app: &Node, carrier: Option<&AuditCarrier>, request_id: &str) -> EventPlace {
    match carrier.map(AuditCarrier::disposition) {
        Some(Disposition::InLog) => EventPlace::Log,
        Some(Disposition::Spool { maybe_in_log: true }) => {
            if app.state.read(|s| s.audit.log.holds_recent_request(request_id)) {
                EventPlace::Log
            } else {
                EventPlace::SpoolOutcomeUnknown
            }
        }
        Some(Disposition::Spool { maybe_in_log: false }) | None => EventPlace::Spool,
    }
}

/// Writes an audit event durably, or fails the request (fail closed, §1.4). Paths and user
/// names are capped in length first.
pub(crate) async fn record_audit(app: &Node, mut body: AuditBody) -> Result<(), ApiError> {
    let max = app.config.audit.max_path_bytes;
    body.path = crate::limits::cap_for_audit(&body.path, max);
    body.user = crate::limits::cap_for_audit(&body.user, max);
    match app.audit.record(body).await {
        Ok(_) => {
            app.metrics.observe_audit_event();
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "audit spool write failed; refusing the request");
            Err(ApiError::internal("the audit log could not be written, so the request was refused"))
        }
    }
}

/// Checks that `caller` may perform `op` on the request's path: the capabilities `need` (with
/// `sudo` where the route declares it), then the parameter constraints (`required_parameters`,
/// `denied_parameters`, `allowed_parameters`) of the rule that grants them, on the request's
/// top-level parameters (the JSON body of a write or patch, the query of a read), as Vault checks
/// them.
fn authorize_op(app: &Node, caller: &Caller, req: &ApiRequest, op: Op, need: Caps) -> Result<(), ApiError> {
    // A LIST names a folder: Vault checks it with its trailing slash (`secret/metadata/app/`).
    let folder;
    let path = if op == Op::List && !req.path.ends_with('/') {
        folder = format!("{}/", req.path);
        folder.as_str()
    } else {
        req.path.as_str()
    };
    let grant = app.state.read(|s| caller.grant(s, path));
    if !grant.caps.contains(need) {
        return Err(ApiError::forbidden());
    }
    if grant.params.is_empty() {
        return Ok(());
    }
    let params = match op {
        Op::Read => req.query.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect(),
        Op::Write | Op::Patch => match req.json::<Value>()? {
            Value::Object(body) => body,
            _ => return Err(ApiError::bad_request("request body must be a JSON object")),
        },
        Op::List | Op::Delete => return Ok(()),
    };
    grant
        .params
        .check(&params)
        .map_err(|refusal| ApiError::new(StatusCode::FORBIDDEN, format!("permission denied: {refusal}")))
}

/// Whether `caller` holds `need` on `path` (for checks that depend on a request's body, such as
/// a token created with `no_parent`, which takes `sudo` as Vault's does).
pub(crate) fn holds(app: &Node, caller: &Caller, path: &str, need: Caps) -> bool {
    app.state.read(|s| caller.capabilities(s, path)).contains(need)
}

/// Accepts a list of strings given as a JSON array or a comma-separated string (Vault does both).
pub(crate) fn string_list(value: Option<&Value>) -> Result<Option<Vec<String>>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            Ok(Some(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(|| ApiError::bad_request("expected a list of strings")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(ApiError::bad_request("expected a list of strings or a comma-separated string")),
    }
}

/// Reads a duration given as seconds or a Vault duration string.
pub(crate) fn duration_secs(value: Option<&Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ApiError::bad_request(format!("{field} must be a non-negative duration")))
            .and_then(|secs| within_duration_limit(secs, field))
            .map(Some),
        Some(Value::String(s)) => citadel_core::time::parse_duration_secs(s)
            .ok_or_else(|| ApiError::bad_request(format!("{field}: invalid duration {s:?}")))
            .and_then(|secs| within_duration_limit(secs, field))
            .map(Some),
        Some(_) => Err(ApiError::bad_request(format!("{field} must be a duration"))),
    }
}

/// Durations past what Vault can represent (int64 nanoseconds) are a 400, never a wrap-around.
fn within_duration_limit(secs: u64, field: &str) -> Result<u64, ApiError> {
    if secs > crate::config::MAX_DURATION_SECS {
        return Err(ApiError::bad_request(format!(
            "{field} is too large: at most {} seconds",
            crate::config::MAX_DURATION_SECS
        )));
    }
    Ok(secs)
}
