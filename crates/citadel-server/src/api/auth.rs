//! `auth/userpass/*` and `auth/token/*`.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use citadel_core::audit::{hmac_string, AuditBody};
use citadel_core::command::{Command, Response};
use citadel_core::policy;
use citadel_core::time::rfc3339;
use citadel_core::token::{
    issue_emergency, token_hash, EmergencyClaims, LoginProof, TokenEntry, User, UserRead, EMERGENCY_TTL_MS,
};
use citadel_core::token_table::TokenRead;
use serde_json::{json, Value};

use citadel_core::route::{Kind, Op, Param, Route};
use citadel_core::state::{user_key, DEFAULT_USERPASS};

use super::routes::{self, handler, route, AuthMethod, Call, Handler};
use super::{duration_secs, record_audit, string_list, ApiError, ApiRequest, Reply};
use crate::audit::RefusalReason;
use crate::auth::{self as authn, Caller};
use crate::ids;
use crate::node::Node;
use crate::node_error::NodeError;
use crate::seal::Unsealed;

fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// A user of a userpass mount: its name, and where it is stored (`state::user_key`).
#[derive(Clone, Copy)]
struct UserRef<'a> {
    mount: &'a str,
    name: &'a str,
}

impl UserRef<'_> {
    fn key(&self) -> String {
        user_key(self.mount, self.name)
    }
}

async fn login(app: &Node, req: &ApiRequest, user: UserRef<'_>, keys: &Unsealed) -> Result<Reply, ApiError> {
    let now = ids::now_ms();
    let mut refusal = None;
    let result = login_inner(app, req, user, keys, now, &mut refusal).await;
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
        user: user.key(),
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
    app: &Node,
    req: &ApiRequest,
    login_as: UserRef<'_>,
    keys: &Unsealed,
    now: u64,
    refusal: &mut Option<LoginRefusal>,
) -> Result<(Reply, Option<String>), ApiError> {
    let body: Value = req.json()?;
    let password = body
        .get("password")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("missing required field \"password\""))?
        .to_string();
    let user = check_password(app, req, login_as, password, refusal).await?;
    let username = user.username.as_str();
    // No auth method issues a root token (§8.2), even for a user stored before that was refused.
    let mut policies: Vec<String> = user.policies.iter().filter(|p| *p != policy::ROOT).cloned().collect();
    if !policies.iter().any(|p| p == policy::DEFAULT) {
        policies.push(policy::DEFAULT.into());
    }
    // Read-only mode (§5.4), settled: no leader for `raft.leader_wait_ms`. Before that a few late
    // heartbeats on a busy machine look like read-only mode too: the login waits for a leader as
    // a write does (`Node::propose`), and only then falls back to an emergency token.
    if app.settled_read_only() {
        return Ok(emergency_login(app, username, policies, keys, now));
    }
    within_token_quota(app, TokenOwner::User(username))?;
    // The user's max TTL, never past the system's (§8.2).
    let system_max = app.config.auth.max_ttl;
    let max_ttl = if user.token_max_ttl_secs > 0 { user.token_max_ttl_secs.min(system_max) } else { system_max };
    let ttl = if user.token_ttl_secs > 0 { user.token_ttl_secs.min(max_ttl) } else { max_ttl };
    let token = ids::token();
    let entry = TokenEntry {
        hash: token_hash(&keys.keyring.token_hmac_key, &token),
        accessor: ids::accessor(),
        policies,
        display_name: format!("{}-{}", login_as.mount.trim_end_matches('/'), login_as.name),
        meta: BTreeMap::from([("username".to_string(), login_as.name.to_string())]),
        created: now,
        expires: Some(now + ttl * 1000),
        max_expires: Some(now + max_ttl * 1000),
        ttl_secs: ttl,
        renewable: true,
        parent: None,
        username: Some(username.to_string()),
        ..TokenEntry::default()
    };
    let auth = auth_block(&token, &entry);
    let policies = entry.policies.clone();
    let login = Some(LoginProof { username: username.to_string(), password_hash: user.password_hash.clone() });
    match app.propose(Command::TokenCreate { entry: Box::new(entry), login }).await {
        Err(NodeError::ReadOnly) => Ok(emergency_login(app, username, policies, keys, ids::now_ms())),
        Err(NodeError::NoLeader) if app.read_only() => {
            Ok(emergency_login(app, username, policies, keys, ids::now_ms()))
        }
        Err(e) => Err(e.into()),
        Ok(Response::Rejected(r)) => Err(r.into()),
        Ok(_) => Ok((Reply::auth(auth), Some(token))),
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
    app: &Node,
    req: &ApiRequest,
    login_as: UserRef<'_>,
    password: String,
    refusal: &mut Option<LoginRefusal>,
) -> Result<User, ApiError> {
    let invalid = || ApiError::bad_request("invalid username or password");
    if !valid_username(login_as.name) {
        // No such user can exist: nothing to hash and nothing to charge.
        *refusal = Some(LoginRefusal { reason: RefusalReason::UnknownUser, retry_after_secs: None });
        return Err(invalid());
    }
    let username = login_as.key();
    let charge = match app.limiter.check_and_charge(&req.remote, &username) {
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
    let user = stored_user(app, &username)?;
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
fn refused_login(app: &Node, req: &ApiRequest, refusal: LoginRefusal, error: &ApiError, now: u64) -> Reply {
    app.refusals.note(&req.remote, refusal.reason, "update", &req.path, now);
    let mut reply = Reply::json(error.status, json!({ "errors": error.errors }));
    if let Some(secs) = refusal.retry_after_secs {
        reply.headers.push(("retry-after", secs.to_string()));
    }
    reply
}

/// Read-only mode (§5.4): the password was checked against this node's replica; the token is
/// self-verifying (signed with the current keyring term's key), read-only, short-lived, and
/// needs no consensus.
fn emergency_login(
    app: &Node,
    username: &str,
    policies: Vec<String>,
    keys: &Unsealed,
    now: u64,
) -> (Reply, Option<String>) {
    let (term, signing_key) = keys.keyring.emergency_signing_key();
    let claims = EmergencyClaims {
        username: username.to_string(),
        policies: policies.clone(),
        node: app.node_id(),
        issued: now,
        expires: now + EMERGENCY_TTL_MS,
        term,
    };
    let token = issue_emergency(&signing_key, &claims);
    let mut reply = Reply::auth(json!({
        "client_token": token,
        "accessor": "",
        "policies": policies,
        "token_policies": policies,
        "metadata": { "username": username, "emergency": "true" },
        "lease_duration": EMERGENCY_TTL_MS / 1000,
        "renewable": false,
        "entity_id": "",
        "token_type": "batch",
        "orphan": true,
    }));
    reply.warnings.push(format!(
        "emergency token: the cluster has no leader, so this token was issued by node {} without consensus; \
         it can only read and list, and expires in {} minutes",
        app.node_id(),
        EMERGENCY_TTL_MS / 60_000
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
        "num_uses": entry.num_uses,
        "user_policies": user_policies,
    })
}

/// Where the token came from: the login path of its user's mount, or the token store.
fn login_path(entry: &TokenEntry) -> String {
    match entry.username.as_deref().map(|key| key.rsplit_once('/')) {
        Some(Some((mount, _))) => format!("auth/{mount}/login"),
        Some(None) => format!("auth/{DEFAULT_USERPASS}login"),
        None => "auth/token/create".into(),
    }
}

/// Vault's token lookup body; `id` is the token itself, shown only to whoever presented it.
fn lookup_data(entry: &TokenEntry, now: u64, id: &str) -> Value {
    let ttl = entry.expires.map_or(0, |e| e.saturating_sub(now) / 1000);
    json!({
        "accessor": entry.accessor,
        "creation_time": entry.created / 1000,
        "creation_ttl": entry.ttl_secs,
        "display_name": entry.display_name,
        "entity_id": "",
        "expire_time": entry.expires.map(rfc3339),
        "explicit_max_ttl": entry.explicit_max_ttl_secs,
        "id": id,
        "issue_time": rfc3339(entry.created),
        "meta": entry.meta,
        "num_uses": entry.uses_left.unwrap_or(0),
        "orphan": entry.parent.is_none(),
        "path": login_path(entry),
        "period": (entry.period_secs > 0).then_some(entry.period_secs),
        "policies": entry.policies,
        "renewable": entry.renewable,
        "ttl": ttl,
        "type": "service",
    })
}

const USER_PARAMS: &[Param] = &[
    Param::body("password", Kind::String, "At least 8 characters"),
    Param::body("policies", Kind::StringList, "Policies of the user's tokens (alias: token_policies)"),
    Param::body("token_policies", Kind::StringList, "Policies of the user's tokens"),
    Param::body("token_ttl", Kind::Duration, "Lifetime of the user's tokens"),
    Param::body("token_max_ttl", Kind::Duration, "Longest the user's tokens may be renewed to"),
];
const PASSWORD_PARAMS: &[Param] = &[Param::body("password", Kind::String, "At least 8 characters").required()];
const LOGIN_PARAMS: &[Param] = &[Param::body("password", Kind::String, "The user's password").required()];
const CREATE_PARAMS: &[Param] = &[
    Param::body("policies", Kind::StringList, "Policies (at most the caller's, unless root)"),
    Param::body("ttl", Kind::Duration, "Lifetime"),
    Param::body("explicit_max_ttl", Kind::Duration, "Hard limit on the lifetime"),
    Param::body("period", Kind::Duration, "Periodic token: renewable by this much forever"),
    Param::body("num_uses", Kind::Integer, "Uses before the token is revoked (0: unlimited)"),
    Param::body("no_parent", Kind::Boolean, "Create an orphan (needs sudo)"),
    Param::body("renewable", Kind::Boolean, "Whether the token may be renewed"),
    Param::body("display_name", Kind::String, "A name shown in lookups"),
    Param::body("meta", Kind::Object, "String metadata"),
];
const TOKEN_PARAMS: &[Param] = &[Param::body("token", Kind::String, "The token").required()];
const RENEW_PARAMS: &[Param] = &[
    Param::body("token", Kind::String, "The token").required(),
    Param::body("increment", Kind::Duration, "Asked extension"),
];
const RENEW_SELF_PARAMS: &[Param] = &[Param::body("increment", Kind::Duration, "Asked extension")];
const TOKEN_QUERY_PARAMS: &[Param] = &[Param::query("token", Kind::String, "The token").required()];
const ACCESSOR_PARAMS: &[Param] = &[Param::body("accessor", Kind::String, "The token's accessor").required()];

/// The userpass auth method (§9.1): the built-in `auth/userpass/`, and any mount enabled with
/// `sys/auth/:path` and `type: userpass`.
pub const USERPASS: AuthMethod = AuthMethod { kind: "userpass", routes: userpass_routes };

/// The userpass routes, relative to the method's mount.
fn userpass_routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route(
            "login/:username",
            vec![op::login("Log in with username and password", handler!(login_route)).with_params(LOGIN_PARAMS)],
        ),
        route("users", vec![op::list("List users", handler!(list_users))]),
        Route {
            pattern: "users/:username",
            operations: vec![
                op::read("Read a user", handler!(read_user)),
                op::write("Create or update a user", handler!(write_user)).with_params(USER_PARAMS),
                op::delete("Delete a user and revoke its tokens", handler!(delete_user)),
            ],
            exists: Some(|_, store, c| {
                store.user(&user_key(&c.mount, c.get("username"))).map_or(true, |u| u.is_some())
            }),
        },
        route(
            "users/:username/password",
            vec![op::update("Change a user's password", handler!(change_password)).with_params(PASSWORD_PARAMS)],
        ),
    ]
}

/// The token store's routes (`auth/token/`).
pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route(
            "auth/token/create",
            vec![op::update("Create a child token", handler!(create_child)).with_params(CREATE_PARAMS)],
        ),
        route(
            "auth/token/create-orphan",
            vec![op::sudo(Op::Write, "Create an orphan token", handler!(create_orphan)).with_params(CREATE_PARAMS)],
        ),
        route(
            "auth/token/lookup-self",
            vec![
                op::read("Look up the calling token", handler!(lookup_self)),
                op::update("Look up the calling token", handler!(lookup_self)),
            ],
        ),
        route(
            "auth/token/lookup",
            vec![
                op::read("Look up a token (query token=)", handler!(lookup)).with_params(TOKEN_QUERY_PARAMS),
                op::update("Look up a token", handler!(lookup)).with_params(TOKEN_PARAMS),
            ],
        ),
        route(
            "auth/token/lookup-accessor",
            vec![op::update("Look up a token by accessor", handler!(lookup_accessor)).with_params(ACCESSOR_PARAMS)],
        ),
        route("auth/token/accessors", vec![op::sudo(Op::List, "List token accessors", handler!(list_accessors))]),
        route(
            "auth/token/renew-self",
            vec![op::update("Renew the calling token", handler!(renew_self)).with_params(RENEW_SELF_PARAMS)],
        ),
        route("auth/token/renew", vec![op::update("Renew a token", handler!(renew_token)).with_params(RENEW_PARAMS)]),
        route(
            "auth/token/revoke-self",
            vec![op::update("Revoke the calling token and its children", handler!(revoke_self))],
        ),
        route(
            "auth/token/revoke",
            vec![op::update("Revoke a token and its children", handler!(revoke_token)).with_params(TOKEN_PARAMS)],
        ),
        route(
            "auth/token/revoke-accessor",
            vec![op::update("Revoke a token by accessor", handler!(revoke_accessor)).with_params(ACCESSOR_PARAMS)],
        ),
    ]
}

async fn login_route(c: &Call<'_>) -> Result<Reply, ApiError> {
    login(c.app, c.req, UserRef { mount: c.mount(), name: c.param("username") }, c.keys()?).await
}

/// The user stored under `key`, as of the state's applied index.
fn stored_user(app: &Node, key: &str) -> Result<Option<User>, ApiError> {
    app.state.read_with_store(|_, store| store.user(key)).map_err(stored_users_unreadable)
}

/// A user record the store holds damaged is never used: the client hears that much, the log
/// hears which file and user.
fn stored_users_unreadable(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "cannot read the stored users");
    ApiError::internal("the stored users cannot be read on this node; see its log")
}

/// Likewise for a token record.
fn stored_tokens_unreadable(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "cannot read the stored tokens");
    ApiError::internal("the stored tokens cannot be read on this node; see its log")
}

/// The users of the route's mount, by name.
async fn list_users(c: &Call<'_>) -> Result<Reply, ApiError> {
    let mount = c.mount();
    // The built-in mount's users have no prefix: every key without a mount path in it.
    let prefix = if mount == DEFAULT_USERPASS { "" } else { mount };
    let stored = c.app.state.user_keys_under(prefix.to_string()).await.map_err(stored_users_unreadable)?;
    let keys: Vec<String> = stored
        .iter()
        .filter_map(|key| {
            if mount == DEFAULT_USERPASS {
                (!key.contains('/')).then_some(key.as_str())
            } else {
                key.strip_prefix(mount)
            }
        })
        .map(String::from)
        .collect();
    if keys.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Reply::data(json!({ "keys": keys })))
}

/// The user a route names, refused if the name could not be a user's.
fn username<'c>(c: &'c Call<'_>) -> Result<UserRef<'c>, ApiError> {
    let name = c.param("username");
    if !valid_username(name) {
        return Err(ApiError::bad_request(format!(
            "invalid username {name:?}: use letters, digits, '-', '_', '.', '@' (at most 128)"
        )));
    }
    Ok(UserRef { mount: c.mount(), name })
}

async fn read_user(c: &Call<'_>) -> Result<Reply, ApiError> {
    let key = username(c)?.key();
    let user = stored_user(c.app, &key)?.ok_or_else(ApiError::not_found)?;
    Ok(Reply::data(json!({
        "policies": user.policies,
        "token_policies": user.policies,
        "token_ttl": user.token_ttl_secs,
        "token_max_ttl": user.token_max_ttl_secs,
        "token_type": "default",
    })))
}

async fn write_user(c: &Call<'_>) -> Result<Reply, ApiError> {
    user_write(c.app, c.req, c.caller()?, &username(c)?.key(), false).await
}

async fn change_password(c: &Call<'_>) -> Result<Reply, ApiError> {
    user_write(c.app, c.req, c.caller()?, &username(c)?.key(), true).await
}

async fn delete_user(c: &Call<'_>) -> Result<Reply, ApiError> {
    let username = username(c)?.key();
    match c.app.propose(Command::UserDelete { username }).await? {
        Response::Rejected(citadel_core::command::Rejection::UserNotFound(_)) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn create_child(c: &Call<'_>) -> Result<Reply, ApiError> {
    create_token(c.app, c.req, c.caller()?, c.keys()?, false).await
}

async fn create_orphan(c: &Call<'_>) -> Result<Reply, ApiError> {
    create_token(c.app, c.req, c.caller()?, c.keys()?, true).await
}

async fn lookup_self(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(lookup_data(&c.caller()?.entry, ids::now_ms(), &c.req.token().unwrap_or_default())))
}

async fn lookup(c: &Call<'_>) -> Result<Reply, ApiError> {
    let now = ids::now_ms();
    let (target, token) = target_token(c.app, c.req, c.keys()?, now)?;
    Ok(Reply::data(lookup_data(&target.entry, now, &token)))
}

async fn lookup_accessor(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(lookup_data(&by_accessor(c.app, c.req)?, ids::now_ms(), "")))
}

async fn list_accessors(c: &Call<'_>) -> Result<Reply, ApiError> {
    let accessors = c.app.state.token_accessors().await.map_err(stored_tokens_unreadable)?;
    Ok(Reply::data(json!({ "keys": accessors })))
}

async fn renew_self(c: &Call<'_>) -> Result<Reply, ApiError> {
    renew(c.app, c.req, &c.caller()?.entry, &c.req.token().unwrap_or_default(), ids::now_ms()).await
}

async fn renew_token(c: &Call<'_>) -> Result<Reply, ApiError> {
    let now = ids::now_ms();
    let (target, token) = target_token(c.app, c.req, c.keys()?, now)?;
    renew(c.app, c.req, &target.entry, &token, now).await
}

async fn revoke_self(c: &Call<'_>) -> Result<Reply, ApiError> {
    revoke(c.app, c.caller()?).await
}

async fn revoke_token(c: &Call<'_>) -> Result<Reply, ApiError> {
    revoke(c.app, &target_token(c.app, c.req, c.keys()?, ids::now_ms())?.0).await
}

async fn revoke_accessor(c: &Call<'_>) -> Result<Reply, ApiError> {
    let entry = by_accessor(c.app, c.req)?;
    revoke(c.app, &Caller { entry, read_only: false }).await
}

async fn user_write(
    app: &Node,
    req: &ApiRequest,
    caller: &Caller,
    name: &str,
    password_only: bool,
) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    let existing = stored_user(app, name)?;
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
    if let Some(policies) = &policies {
        let held = existing.as_ref().map(|u| u.policies.as_slice()).unwrap_or_default();
        check_policies_given(caller, policies, held)?;
    }
    let ttl = if password_only { None } else { duration_secs(body.get("token_ttl").or(body.get("ttl")), "token_ttl")? };
    let max_ttl = if password_only {
        None
    } else {
        duration_secs(body.get("token_max_ttl").or(body.get("max_ttl")), "token_max_ttl")?
    };
    let user = User {
        username: name.to_string(),
        password_hash,
        policies: policies.or_else(|| existing.as_ref().map(|u| u.policies.clone())).unwrap_or_default(),
        token_ttl_secs: ttl.or_else(|| existing.as_ref().map(|u| u.token_ttl_secs)).unwrap_or(0),
        token_max_ttl_secs: max_ttl.or_else(|| existing.as_ref().map(|u| u.token_max_ttl_secs)).unwrap_or(0),
    };
    match app.propose(Command::UserPut { user }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

/// Who may give a user which policies (§8.2): nobody gives `root` to a login method, and only a
/// root caller gives a policy it does not hold itself (`default` every token has). Policies the
/// user already had (`held`) are not being given.
fn check_policies_given(caller: &Caller, policies: &[String], held: &[String]) -> Result<(), ApiError> {
    if policies.iter().any(|p| p == policy::ROOT) {
        return Err(ApiError::bad_request(
            "the root policy cannot be given to a userpass user: no auth method issues root tokens",
        ));
    }
    if caller.is_root() {
        return Ok(());
    }
    let mut given = policies.iter().filter(|p| !held.contains(p) && *p != policy::DEFAULT);
    if let Some(extra) = given.find(|p| !caller.entry.policies.contains(p)) {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            format!("only a root token can give a policy it does not hold; this token does not hold {extra:?}"),
        ));
    }
    Ok(())
}

/// The token named in the body (`token`) or query, which must be valid; with the token itself.
fn target_token(app: &Node, req: &ApiRequest, keys: &Unsealed, now: u64) -> Result<(Caller, String), ApiError> {
    let body: Value = req.json()?;
    let token = body
        .get("token")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| req.query.get("token").cloned())
        .ok_or_else(|| ApiError::bad_request("missing required field \"token\""))?;
    let caller = app
        .state
        .read_with_store(|s, store| authn::resolve(s, store, &keys.keyring, &token, now))
        .ok_or_else(|| ApiError::bad_request("bad token"))?;
    Ok((caller, token))
}

/// The token whose accessor is named in the body (`accessor`).
fn by_accessor(app: &Node, req: &ApiRequest) -> Result<TokenEntry, ApiError> {
    let body: Value = req.json()?;
    let accessor = body
        .get("accessor")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing required field \"accessor\""))?;
    app.state
        .read_with_store(|_, store| store.tokens.by_accessor(accessor))
        .map_err(stored_tokens_unreadable)?
        .ok_or_else(|| ApiError::bad_request("invalid accessor"))
}

/// Whose tokens count toward a quota: a user's logins, or a parent token's children.
enum TokenOwner<'a> {
    User(&'a str),
    Parent(&'a str),
}

/// Refuses a new token when its owner already holds `[limits] max_tokens_per_owner` (§8.3): an
/// authenticated client must not grow the replicated state without bound either. Counted on the
/// state the request was checked against, so concurrent requests may pass it by their number.
fn within_token_quota(app: &Node, owner: TokenOwner) -> Result<(), ApiError> {
    let max = app.config.limits.max_tokens_per_owner;
    let held = app.state.read_with_store(|_, store| match owner {
        TokenOwner::User(user) => store.tokens.count_logins(user),
        TokenOwner::Parent(parent) => store.tokens.token_children(parent).map(|children| children.len()),
    });
    let held = held.map_err(stored_tokens_unreadable)?;
    if held >= max {
        let whose = match owner {
            TokenOwner::User(user) => format!("user {user:?}"),
            TokenOwner::Parent(_) => "this token".to_string(),
        };
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            format!("{whose} already holds {held} tokens (limits.max_tokens_per_owner = {max}); revoke some or wait for them to expire"),
        ));
    }
    Ok(())
}

/// A token's lifetime as asked in a create request, within the system's limits (§8.2).
struct Lifetime {
    ttl_secs: u64,
    explicit_max_ttl_secs: u64,
    period_secs: u64,
    expires: u64,
    max_expires: Option<u64>,
}

fn token_lifetime(app: &Node, body: &Value, caller: &Caller, orphan: bool, now: u64) -> Result<Lifetime, ApiError> {
    let system_max = app.config.auth.max_ttl;
    let explicit_max = duration_secs(body.get("explicit_max_ttl"), "explicit_max_ttl")?.unwrap_or(0);
    let period = duration_secs(body.get("period"), "period")?.unwrap_or(0);
    // A periodic token is bounded only by its explicit max; any other by the system's too.
    let max_ttl = match (period > 0, explicit_max > 0) {
        (true, true) => Some(explicit_max),
        (true, false) => None,
        (false, true) => Some(explicit_max.min(system_max)),
        (false, false) => Some(system_max),
    };
    let asked = duration_secs(body.get("ttl"), "ttl")?.filter(|&t| t > 0);
    let mut ttl = if period > 0 { period } else { asked.unwrap_or(system_max) };
    if let Some(max) = max_ttl {
        ttl = ttl.min(max);
    }
    let mut expires = now + ttl * 1000;
    let mut max_expires = max_ttl.map(|m| now + m * 1000);
    if let (false, Some(parent_expiry)) = (orphan, caller.entry.expires) {
        // A child never outlives its parent.
        expires = expires.min(parent_expiry);
        max_expires = Some(max_expires.map_or(parent_expiry, |m| m.min(parent_expiry)));
        ttl = expires.saturating_sub(now) / 1000;
    }
    Ok(Lifetime { ttl_secs: ttl, explicit_max_ttl_secs: explicit_max, period_secs: period, expires, max_expires })
}

async fn create_token(
    app: &Node,
    req: &ApiRequest,
    caller: &Caller,
    keys: &Unsealed,
    orphan_path: bool,
) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    let now = ids::now_ms();
    let orphan = orphan_path || body.get("no_parent").and_then(Value::as_bool) == Some(true);
    if orphan {
        // Vault: an orphan outlives its creator, so creating one takes sudo (on `create`, the
        // body decides, so the table cannot; `create-orphan` declares it).
        if !super::holds(app, caller, &req.path, citadel_core::policy::Caps::SUDO) {
            return Err(ApiError::forbidden());
        }
    }
    let policies = token_policies(&body, caller)?;
    if !orphan {
        within_token_quota(app, TokenOwner::Parent(&caller.entry.hash))?;
    }
    let lifetime = token_lifetime(app, &body, caller, orphan, now)?;
    let num_uses = match body.get("num_uses") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| ApiError::bad_request("num_uses must be a non-negative integer"))?,
    };
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
        expires: Some(lifetime.expires),
        max_expires: lifetime.max_expires,
        ttl_secs: lifetime.ttl_secs,
        explicit_max_ttl_secs: lifetime.explicit_max_ttl_secs,
        period_secs: lifetime.period_secs,
        num_uses,
        uses_left: (num_uses > 0).then_some(num_uses),
        renewable: body.get("renewable").and_then(Value::as_bool).unwrap_or(true),
        parent: if orphan { None } else { Some(caller.entry.hash.clone()) },
        username: caller.entry.username.clone(),
        last_use_request: None,
    };
    let auth = auth_block(&token, &entry);
    match app.propose(Command::TokenCreate { entry: Box::new(entry), login: None }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::auth(auth)),
    }
}

/// The policies a new token gets: a subset of the caller's unless the caller is root (§8.2).
fn token_policies(body: &Value, caller: &Caller) -> Result<Vec<String>, ApiError> {
    let mut policies = string_list(body.get("policies"))?.unwrap_or_else(|| caller.entry.policies.clone());
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
    let no_default = body.get("no_default_policy").and_then(Value::as_bool).unwrap_or(false);
    if !no_default && !policies.iter().any(|p| p == policy::DEFAULT || p == policy::ROOT) {
        policies.push(policy::DEFAULT.into());
    }
    Ok(policies)
}

async fn renew(app: &Node, req: &ApiRequest, entry: &TokenEntry, token: &str, now: u64) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    if entry.expires.is_none() {
        // Tokens without a TTL (root) have nothing to renew.
        return Ok(Reply::auth(
            json!({ "client_token": "", "accessor": entry.accessor, "policies": entry.policies, "lease_duration": 0, "renewable": false }),
        ));
    }
    if !entry.renewable || entry.accessor.is_empty() {
        return Err(ApiError::bad_request("this token is not renewable"));
    }
    let increment = duration_secs(body.get("increment"), "increment")?.filter(|&i| i > 0).unwrap_or(entry.ttl_secs);
    let expires =
        entry.renewed_expiry(now, increment).ok_or_else(|| ApiError::bad_request("increment is too large"))?;
    let ttl_secs = expires.saturating_sub(now) / 1000;
    match app.propose(Command::TokenRenew { hash: entry.hash.clone(), expires, ttl_secs }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => {
            let mut renewed = entry.clone();
            renewed.expires = Some(expires);
            renewed.ttl_secs = ttl_secs;
            let mut reply = Reply::auth(auth_block(token, &renewed));
            if ttl_secs < increment && entry.period_secs == 0 {
                reply.warnings.push(format!(
                    "TTL of {increment}s exceeded the effective max TTL; the token expires in {ttl_secs}s"
                ));
            }
            Ok(reply)
        }
    }
}

/// Revokes a stored token with its children, or an emergency token until it would expire.
async fn revoke(app: &Node, target: &Caller) -> Result<Reply, ApiError> {
    let command = if target.read_only {
        Command::EmergencyTokenRevoke {
            hash: target.entry.hash.clone(),
            expires: target.entry.expires.unwrap_or_default(),
            at: ids::now_ms(),
        }
    } else {
        Command::TokenRevoke { hash: target.entry.hash.clone() }
    };
    match app.propose(command).await? {
        Response::Rejected(citadel_core::command::Rejection::TokenNotFound) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
