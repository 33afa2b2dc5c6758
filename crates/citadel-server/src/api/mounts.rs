//! `sys/mounts` and `sys/auth` (§9.1): secrets engines and auth methods, enabled by `type`,
//! read and disabled.

use axum::http::StatusCode;
use citadel_core::command::{Command, Response};
use citadel_core::kv::KvStore;
use citadel_core::route::{Kind, Param, Route};
use citadel_core::state::{AuthMount, Mount, DEFAULT_USERPASS, TOKEN_AUTH};
use citadel_core::UnixMillis;
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{ApiError, Op, Reply};
use crate::ids;

/// `sys/mounts` and `sys/auth`: secrets engines and auth methods, enabled by type.
pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route("sys/mounts", vec![op::read("List secrets engines", handler!(list_mounts))]),
        Route {
            pattern: "sys/mounts/*path",
            operations: vec![
                op::read("Read a secrets engine", handler!(read_mount)),
                op::write("Enable a secrets engine by type", handler!(enable_mount)).with_params(MOUNT_PARAMS),
                op::delete("Disable a secrets engine and delete its data", handler!(disable_mount)),
            ],
            exists: Some(|s, _, c| s.mounts.contains_key(&mount_key(c.get("path")))),
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
    ]
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

const MOUNT_PARAMS: &[Param] = &[
    Param::body("type", Kind::String, "The engine: kv (or kv-v2)").required(),
    Param::body("description", Kind::String, "Free text"),
    Param::body("options", Kind::Object, "Engine options (kv: {\"version\": \"2\"})"),
];

const AUTH_PARAMS: &[Param] = &[
    Param::body("type", Kind::String, "The method: userpass").required(),
    Param::body("description", Kind::String, "Free text"),
];

/// A mount's key in the state: its path with one trailing slash.
fn mount_key(path: &str) -> String {
    format!("{}/", path.trim_matches('/'))
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
    let valid = path.len() > 1 && !path.contains("//");
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
