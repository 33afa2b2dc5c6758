//! `auth/userpass/*` and `auth/token/*`.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use citadel_core::audit::{hmac_string, AuditBody};
use citadel_core::command::{Command, Response};
use citadel_core::policy;
use citadel_core::time::rfc3339;
use citadel_core::token::{issue_emergency, token_hash, EmergencyClaims, TokenEntry, User};
use serde_json::{json, Value};

use super::{authorize_op, duration_secs, record_audit, string_list, ApiError, ApiRequest, Op, Reply};
use crate::app::App;
use crate::audit::RefusalReason;
use crate::auth::{self as authn, Caller};
use crate::ids;
use crate::seal::Unsealed;

/// Vault's default token TTL (32 days).
const DEFAULT_TTL_SECS: u64 = 768 * 3600;

fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

pub async fn login(app: &App, req: &ApiRequest, username: &str, keys: &Unsealed) -> Result<Reply, ApiError> {
    let now = ids::now_ms();
    let mut refusal = None;
    let result = login_inner(app, req, username, keys, now, &mut refusal).await;
    if let (Some(refusal), Err(error)) = (refusal, &result) {
        return Ok(refused_login(app, req, refusal, error, now));
    }
    let (status, error) = match &result {
        Ok(_) => (200, String::new()),
        Err(e) => (e.status.as_u16(), e.errors.first().cloned().unwrap_or_default()),
    };
    let event = AuditBody {
        time: now,
        request_id: req.id.clone(),
        kind: "login".into(),
        operation: "update".into(),
        path: req.path.clone(),
        user: username.to_string(),
        remote_addr: req.remote.clone(),
        status,
        error,
        token_hmac: result
            .as_ref()
            .ok()
            .and_then(|(_, token)| token.as_ref().map(|t| hmac_string(&keys.keyring.audit_hmac_key, t)))
            .unwrap_or_default(),
        ..AuditBody::default()
    };
    record_audit(app, event).await?;
    result.map(|(reply, _)| reply)
}

async fn login_inner(
    app: &App,
    req: &ApiRequest,
    username: &str,
    keys: &Unsealed,
    now: u64,
    refusal: &mut Option<LoginRefusal>,
) -> Result<(Reply, Option<String>), ApiError> {
    if req.op() != Some(Op::Write) {
        return Err(ApiError::method_not_allowed());
    }
    let body: Value = req.json()?;
    let password = body
        .get("password")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("missing required field \"password\""))?
        .to_string();
    let user = check_password(app, req, username, password, refusal).await?;
    let mut policies = user.policies.clone();
    if !policies.iter().any(|p| p == policy::DEFAULT) {
        policies.push(policy::DEFAULT.into());
    }
    if app.read_only() {
        return Ok(emergency_login(app, username, policies, keys, now));
    }
    let ttl = if user.token_ttl_secs > 0 { user.token_ttl_secs } else { DEFAULT_TTL_SECS };
    let token = ids::token();
    let entry = TokenEntry {
        hash: token_hash(&keys.keyring.token_hmac_key, &token),
        accessor: ids::accessor(),
        policies,
        display_name: format!("userpass-{username}"),
        meta: BTreeMap::from([("username".to_string(), username.to_string())]),
        created: now,
        expires: Some(now + ttl * 1000),
        ttl_secs: ttl,
        renewable: true,
        parent: None,
        username: Some(username.to_string()),
    };
    let auth = auth_block(&token, &entry);
    match app.propose(Command::TokenCreate { entry }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok((Reply::auth(auth), Some(token))),
    }
}

/// A login refused before any user was authenticated: counted into its source's refusal
/// summary instead of audited on its own (§8.3), and answered with `Retry-After` when waiting helps.
#[derive(Clone, Copy, Debug)]
struct LoginRefusal {
    reason: RefusalReason,
    retry_after_secs: Option<u64>,
}

/// Checks a login's password under the login limiter and the bounded hashing pool. Refusals that
/// are summarized rather than audited one by one are reported through `refusal`; failed logins of
/// existing users stay individual audit events (the limiter bounds their number).
async fn check_password(
    app: &App,
    req: &ApiRequest,
    username: &str,
    password: String,
    refusal: &mut Option<LoginRefusal>,
) -> Result<User, ApiError> {
    let invalid = || ApiError::bad_request("invalid username or password");
    if !valid_username(username) {
        // No such user can exist: nothing to hash and nothing to charge.
        *refusal = Some(LoginRefusal { reason: RefusalReason::UnknownUser, retry_after_secs: None });
        return Err(invalid());
    }
    let charge = match app.limiter.check_and_charge(&req.remote, username) {
        Ok(charge) => charge,
        Err(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            *refusal = Some(LoginRefusal { reason: RefusalReason::LoginThrottled, retry_after_secs: Some(secs) });
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many failed logins; try again in {secs}s"),
            ));
        }
    };
    let user = app.state.read(|s| s.users.get(username).cloned());
    let stored = user.as_ref().map(|u| u.password_hash.clone());
    let verified = app.hash_pool.run(move || authn::verify_password(stored.as_deref(), &password)).await;
    let Ok(ok) = verified else {
        app.limiter.refund(charge);
        let secs = app.hash_pool.retry_after_secs();
        *refusal = Some(LoginRefusal { reason: RefusalReason::HashPoolBusy, retry_after_secs: Some(secs) });
        return Err(ApiError::unavailable(format!("the server is busy checking passwords; retry in {secs}s")));
    };
    let missing = user.is_none();
    match user.filter(|_| ok) {
        Some(user) => {
            app.limiter.succeeded(charge);
            Ok(user)
        }
        None => {
            if missing {
                *refusal = Some(LoginRefusal { reason: RefusalReason::UnknownUser, retry_after_secs: None });
            }
            Err(invalid())
        }
    }
}

/// Answers a summarized login refusal: counted, not audited on its own.
fn refused_login(app: &App, req: &ApiRequest, refusal: LoginRefusal, error: &ApiError, now: u64) -> Reply {
    app.refusals.note(&req.remote, refusal.reason, "update", &req.path, now);
    let mut reply = Reply::json(error.status, json!({ "errors": error.errors }));
    if let Some(secs) = refusal.retry_after_secs {
        reply.headers.push(("retry-after", secs.to_string()));
    }
    reply
}

/// How long an emergency token lives: long enough to fetch a password during an outage.
const EMERGENCY_TTL_SECS: u64 = 15 * 60;

/// Read-only mode (§5.4): the password was checked against this node's replica; the token is
/// self-verifying, read-only and short-lived, and needs no consensus.
fn emergency_login(
    app: &App,
    username: &str,
    policies: Vec<String>,
    keys: &Unsealed,
    now: u64,
) -> (Reply, Option<String>) {
    let claims = EmergencyClaims {
        username: username.to_string(),
        policies: policies.clone(),
        node: app.node_id(),
        issued: now,
        expires: now + EMERGENCY_TTL_SECS * 1000,
    };
    let token = issue_emergency(&keys.keyring.token_hmac_key, &claims);
    let mut reply = Reply::auth(json!({
        "client_token": token,
        "accessor": "",
        "policies": policies,
        "token_policies": policies,
        "metadata": { "username": username, "emergency": "true" },
        "lease_duration": EMERGENCY_TTL_SECS,
        "renewable": false,
        "entity_id": "",
        "token_type": "batch",
        "orphan": true,
    }));
    reply.warnings.push(format!(
        "emergency token: the cluster has no leader, so this token was issued by node {} without consensus; \
         it can only read and list, and expires in {} minutes",
        app.node_id(),
        EMERGENCY_TTL_SECS / 60
    ));
    (reply, Some(token))
}

fn auth_block(token: &str, entry: &TokenEntry) -> Value {
    let user_policies: Vec<&String> = entry.policies.iter().filter(|p| *p != policy::DEFAULT).collect();
    json!({
        "client_token": token,
        "accessor": entry.accessor,
        "policies": entry.policies,
        "token_policies": entry.policies,
        "identity_policies": null,
        "metadata": entry.meta,
        "lease_duration": entry.ttl_secs,
        "renewable": entry.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": entry.parent.is_none(),
        "mfa_requirement": null,
        "num_uses": 0,
        "user_policies": user_policies,
    })
}

fn lookup_data(entry: &TokenEntry, now: u64) -> Value {
    let ttl = entry.expires.map_or(0, |e| e.saturating_sub(now) / 1000);
    json!({
        "accessor": entry.accessor,
        "creation_time": entry.created / 1000,
        "creation_ttl": entry.ttl_secs,
        "display_name": entry.display_name,
        "entity_id": "",
        "expire_time": entry.expires.map(rfc3339),
        "explicit_max_ttl": 0,
        "id": "",
        "issue_time": rfc3339(entry.created),
        "meta": entry.meta,
        "num_uses": 0,
        "orphan": entry.parent.is_none(),
        "path": if entry.username.is_some() { "auth/userpass/login" } else { "auth/token/create" },
        "policies": entry.policies,
        "renewable": entry.renewable,
        "ttl": ttl,
        "type": "service",
    })
}

pub async fn route(
    app: &App,
    req: &ApiRequest,
    op: Op,
    caller: &Caller,
    rest: &str,
    keys: &Unsealed,
) -> Result<Reply, ApiError> {
    if let Some(rest) = rest.strip_prefix("token/") {
        authorize_op(app, caller, &req.path, op)?;
        return token_route(app, req, op, caller, rest, keys).await;
    }
    if rest == "userpass/users" {
        authorize_op(app, caller, &req.path, op)?;
        if op != Op::List {
            return Err(ApiError::method_not_allowed());
        }
        let keys: Vec<String> = app.state.read(|s| s.users.keys().cloned().collect());
        if keys.is_empty() {
            return Err(ApiError::not_found());
        }
        return Ok(Reply::data(json!({ "keys": keys })));
    }
    if let Some(name) = rest.strip_prefix("userpass/users/") {
        authorize_op(app, caller, &req.path, op)?;
        if let Some(name) = name.strip_suffix("/password") {
            if op != Op::Write {
                return Err(ApiError::method_not_allowed());
            }
            return user_write(app, req, name, true).await;
        }
        return user_route(app, req, op, name).await;
    }
    Err(ApiError::no_route(&req.path))
}

async fn user_route(app: &App, req: &ApiRequest, op: Op, name: &str) -> Result<Reply, ApiError> {
    if !valid_username(name) {
        return Err(ApiError::bad_request(format!(
            "invalid username {name:?}: use letters, digits, '-', '_', '.', '@' (at most 128)"
        )));
    }
    match op {
        Op::Read => {
            let user = app.state.read(|s| s.users.get(name).cloned()).ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(json!({
                "policies": user.policies,
                "token_policies": user.policies,
                "token_ttl": user.token_ttl_secs,
                "token_max_ttl": 0,
                "token_type": "default",
            })))
        }
        Op::Write => user_write(app, req, name, false).await,
        Op::Delete => match app.propose(Command::UserDelete { username: name.to_string() }).await? {
            Response::Rejected(citadel_core::command::Rejection::UserNotFound(_)) => Ok(Reply::empty()),
            Response::Rejected(r) => Err(r.into()),
            _ => Ok(Reply::empty()),
        },
        _ => Err(ApiError::method_not_allowed()),
    }
}

async fn user_write(app: &App, req: &ApiRequest, name: &str, password_only: bool) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    let existing = app.state.read(|s| s.users.get(name).cloned());
    let password = body
        .get("password")
        .map(|p| p.as_str().map(String::from).ok_or_else(|| ApiError::bad_request("password must be a string")));
    let password = password.transpose()?;
    if let Some(p) = &password {
        if p.len() < 8 {
            return Err(ApiError::bad_request("password must be at least 8 characters"));
        }
    }
    let password_hash = match (password, &existing) {
        (Some(p), _) => app
            .hash_pool
            .run(move || authn::hash_password(&p))
            .await
            .map_err(|_| ApiError::unavailable("every password-hashing slot is busy; retry shortly"))?,
        (None, Some(u)) if !password_only => u.password_hash.clone(),
        _ => return Err(ApiError::bad_request("missing required field \"password\"")),
    };
    let policies = if password_only {
        None
    } else {
        string_list(body.get("token_policies"))?.or(string_list(body.get("policies"))?)
    };
    for p in policies.iter().flatten() {
        policy::validate_name(p).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let ttl = if password_only { None } else { duration_secs(body.get("token_ttl").or(body.get("ttl")), "token_ttl")? };
    let user = User {
        username: name.to_string(),
        password_hash,
        policies: policies.or_else(|| existing.as_ref().map(|u| u.policies.clone())).unwrap_or_default(),
        token_ttl_secs: ttl.or_else(|| existing.as_ref().map(|u| u.token_ttl_secs)).unwrap_or(0),
    };
    match app.propose(Command::UserPut { user }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn token_route(
    app: &App,
    req: &ApiRequest,
    op: Op,
    caller: &Caller,
    rest: &str,
    keys: &Unsealed,
) -> Result<Reply, ApiError> {
    let now = ids::now_ms();
    match (rest, op) {
        ("create", Op::Write) | ("create-orphan", Op::Write) => {
            create_token(app, req, caller, keys, rest == "create-orphan").await
        }
        ("lookup-self", Op::Read) | ("lookup-self", Op::Write) => Ok(Reply::data(lookup_data(&caller.entry, now))),
        ("lookup", Op::Write) | ("lookup", Op::Read) => {
            let target = target_token(app, req, keys, now)?;
            Ok(Reply::data(lookup_data(&target, now)))
        }
        ("renew-self", Op::Write) => renew(app, req, &caller.entry, now).await,
        ("renew", Op::Write) => {
            let target = target_token(app, req, keys, now)?;
            renew(app, req, &target, now).await
        }
        ("revoke-self", Op::Write) => revoke(app, &caller.entry.hash).await,
        ("revoke", Op::Write) => {
            let target = target_token(app, req, keys, now)?;
            revoke(app, &target.hash).await
        }
        (
            "create" | "create-orphan" | "lookup-self" | "lookup" | "renew-self" | "renew" | "revoke-self" | "revoke",
            _,
        ) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::no_route(&req.path)),
    }
}

/// The token named in the body (`token`) or query, which must exist.
fn target_token(app: &App, req: &ApiRequest, keys: &Unsealed, now: u64) -> Result<TokenEntry, ApiError> {
    let body: Value = req.json()?;
    let token = body
        .get("token")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| req.query.get("token").cloned())
        .ok_or_else(|| ApiError::bad_request("missing required field \"token\""))?;
    app.state
        .read(|s| authn::resolve(s, &keys.keyring.token_hmac_key, &token, now))
        .map(|c| c.entry)
        .ok_or_else(|| ApiError::bad_request("bad token"))
}

async fn create_token(
    app: &App,
    req: &ApiRequest,
    caller: &Caller,
    keys: &Unsealed,
    orphan: bool,
) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    let now = ids::now_ms();
    let requested = string_list(body.get("policies"))?;
    let policies = match requested {
        Some(p) => p,
        None => caller.entry.policies.clone(),
    };
    for p in &policies {
        policy::validate_name(p).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    if !caller.is_root() {
        if let Some(extra) = policies.iter().find(|p| *p != policy::DEFAULT && !caller.entry.policies.contains(p)) {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                format!("child policies must be a subset of the parent's; {extra:?} is not"),
            ));
        }
    }
    let mut policies = policies;
    let no_default = body.get("no_default_policy").and_then(Value::as_bool).unwrap_or(false);
    if !no_default && !policies.iter().any(|p| p == policy::DEFAULT || p == policy::ROOT) {
        policies.push(policy::DEFAULT.into());
    }
    let mut ttl = duration_secs(body.get("ttl"), "ttl")?.unwrap_or(DEFAULT_TTL_SECS);
    if ttl == 0 {
        ttl = DEFAULT_TTL_SECS;
    }
    let mut expires = now + ttl * 1000;
    if let Some(parent_expiry) = caller.entry.expires {
        // A child never outlives its parent.
        expires = expires.min(parent_expiry);
        ttl = expires.saturating_sub(now) / 1000;
    }
    let meta: BTreeMap<String, String> = match body.get("meta") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|_| ApiError::bad_request("meta must map strings to strings"))?
        }
    };
    let display = body.get("display_name").and_then(Value::as_str).unwrap_or("token");
    let token = ids::token();
    let entry = TokenEntry {
        hash: token_hash(&keys.keyring.token_hmac_key, &token),
        accessor: ids::accessor(),
        policies,
        display_name: format!("token-{display}"),
        meta,
        created: now,
        expires: Some(expires),
        ttl_secs: ttl,
        renewable: body.get("renewable").and_then(Value::as_bool).unwrap_or(true),
        parent: if orphan || body.get("no_parent").and_then(Value::as_bool) == Some(true) {
            None
        } else {
            Some(caller.entry.hash.clone())
        },
        username: caller.entry.username.clone(),
    };
    let auth = auth_block(&token, &entry);
    match app.propose(Command::TokenCreate { entry }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::auth(auth)),
    }
}

async fn renew(app: &App, req: &ApiRequest, entry: &TokenEntry, now: u64) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    if entry.expires.is_none() {
        // Tokens without a TTL (root) have nothing to renew.
        return Ok(Reply::auth(
            json!({ "client_token": "", "accessor": entry.accessor, "policies": entry.policies, "lease_duration": 0, "renewable": false }),
        ));
    }
    if !entry.renewable {
        return Err(ApiError::bad_request("this token is not renewable"));
    }
    let increment = duration_secs(body.get("increment"), "increment")?.filter(|&i| i > 0).unwrap_or(entry.ttl_secs);
    let expires = now + increment * 1000;
    match app.propose(Command::TokenRenew { hash: entry.hash.clone(), expires, ttl_secs: increment }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => {
            let mut renewed = entry.clone();
            renewed.expires = Some(expires);
            renewed.ttl_secs = increment;
            let mut auth = auth_block("", &renewed);
            auth["client_token"] = json!("");
            Ok(Reply::auth(auth))
        }
    }
}

async fn revoke(app: &App, hash: &str) -> Result<Reply, ApiError> {
    match app.propose(Command::TokenRevoke { hash: hash.to_string() }).await? {
        Response::Rejected(citadel_core::command::Rejection::TokenNotFound) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
