//! KV version 2 on every kv mount: `data/`, `delete/`, `undelete/`, `destroy/`, `metadata/`,
//! `config`. Values are sealed by the barrier here, before they are proposed (§1.2).

use std::collections::BTreeMap;

use axum::http::StatusCode;
use citadel_core::command::{Command, Rejection, Response};
use citadel_core::kv::{KvConfig, KvEntry, KvError, KvVersion, MetadataUpdate};
use citadel_core::time::rfc3339;
use serde_json::{json, Value};

use citadel_core::route::{Captures, Kind, Param, Route};
use citadel_core::state::{State, StoreRead};

use super::barrier_view::MountBarrier;
use super::routes::{handler, route, Call, Engine, Handler};
use super::{duration_secs, ApiError, ApiRequest, Reply};
use crate::ids;
use crate::node::Node;

/// Writes retried when another writer took the version this value was sealed for.
const VERSION_RACE_RETRIES: usize = 8;

/// KV version 2, the first secrets engine (§9.1).
pub const ENGINE: Engine = Engine { kind: "kv", routes, check_options };

/// `type: kv` is version 2 unless `options.version` says otherwise; version 1 is not served.
fn check_options(body: &Value) -> Result<(), String> {
    let kind = body.get("type").and_then(Value::as_str).unwrap_or("");
    let version = match body.pointer("/options/version") {
        None | Some(Value::Null) => "2".to_string(),
        Some(Value::String(v)) => v.clone(),
        Some(other) => other.to_string(),
    };
    if kind == "kv-v2" || version == "2" {
        Ok(())
    } else {
        Err(format!(
            "only KV version 2 secrets engines are supported (type \"kv\" with options.version \"2\", or \"kv-v2\"); got version {version:?}"
        ))
    }
}

const WRITE_PARAMS: &[Param] = &[
    Param::body("data", Kind::Object, "The secret's key/value pairs").required(),
    Param::body("options", Kind::Object, "{\"cas\": N}: write only if the current version is N (0: only if absent)"),
];
const PATCH_PARAMS: &[Param] = &[
    Param::body("data", Kind::Object, "JSON merge patch (RFC 7386) of the current version").required(),
    Param::body("options", Kind::Object, "{\"cas\": N}"),
];
const READ_PARAMS: &[Param] = &[Param::query("version", Kind::Integer, "The version to read (default: current)")];
const VERSIONS_PARAMS: &[Param] = &[Param::body("versions", Kind::IntegerList, "The version numbers").required()];
const METADATA_PARAMS: &[Param] = &[
    Param::body("max_versions", Kind::Integer, "Versions kept (0: the mount's setting)"),
    Param::body("cas_required", Kind::Boolean, "Writes must give options.cas"),
    Param::body("delete_version_after", Kind::Duration, "Versions are deleted this long after they are written"),
    Param::body("custom_metadata", Kind::Object, "String key/value pairs"),
];
const CONFIG_PARAMS: &[Param] = &[
    Param::body("max_versions", Kind::Integer, "Versions kept per secret (0 to 1000)"),
    Param::body("cas_required", Kind::Boolean, "Writes must give options.cas"),
    Param::body("delete_version_after", Kind::Duration, "Versions are deleted this long after they are written"),
];

/// Vault's KV existence check: a secret exists while its metadata does (even if every version is
/// deleted), so rewriting it needs `update`.
/// A store that cannot be read counts as holding the secret: `update` is then needed, and the
/// write itself fails on the same damage.
fn secret_exists(_: &State, store: &dyn StoreRead, c: &Captures) -> bool {
    store.contains(&c.mount, c.get("path")).unwrap_or(true)
}

/// The engine's routes, relative to its mount.
fn routes() -> Vec<Route<Handler>> {
    use super::routes::op;
    let versions = |summary, handler| vec![op::update(summary, handler).with_params(VERSIONS_PARAMS)];
    vec![
        Route {
            pattern: "data/*path",
            operations: vec![
                op::read("Read a secret's version", handler!(read)).with_params(READ_PARAMS),
                op::write("Write a new version", handler!(write)).with_params(WRITE_PARAMS),
                op::patch("Patch the current version", handler!(patch)).with_params(PATCH_PARAMS),
                op::delete("Soft-delete the current version", handler!(delete_latest)),
            ],
            exists: Some(secret_exists),
        },
        route("delete/*path", versions("Soft-delete versions", handler!(delete_versions))),
        route("undelete/*path", versions("Undelete versions", handler!(undelete_versions))),
        route("destroy/*path", versions("Destroy versions", handler!(destroy_versions))),
        route("metadata", vec![op::list("List the mount's top-level keys", handler!(list))]),
        Route {
            pattern: "metadata/*path",
            operations: vec![
                op::read("Read a secret's metadata and versions", handler!(read_metadata)),
                op::list("List the keys under a folder", handler!(list)),
                op::write("Update a secret's metadata", handler!(write_metadata)).with_params(METADATA_PARAMS),
                op::patch("Patch a secret's metadata", handler!(write_metadata)).with_params(METADATA_PARAMS),
                op::delete("Delete a secret and every version", handler!(delete_metadata)),
            ],
            exists: Some(secret_exists),
        },
        route(
            "config",
            vec![
                op::read("The mount's configuration", handler!(read_config)),
                // A mount's configuration always exists (with defaults): writing it is an update.
                op::update("Configure the mount", handler!(write_config)).with_params(CONFIG_PARAMS),
            ],
        ),
    ]
}

/// The secret a route names.
fn secret<'c>(c: &'c Call<'_>) -> (&'c str, &'c str) {
    (c.mount(), c.param("path"))
}

async fn write(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    write_version(c.app, c.req, mount, path).await
}

async fn delete_latest(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    versions_command(c.app, mount, path, vec![], VersionAction::Delete).await
}

/// The `versions` of a delete, undelete or destroy request.
fn requested_versions(c: &Call<'_>) -> Result<Vec<u64>, ApiError> {
    let body: Value = c.req.json()?;
    let versions: Vec<u64> = match body.get("versions") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad_request("versions must be a list of version numbers"))?,
        _ => return Err(ApiError::bad_request("missing required field \"versions\"")),
    };
    if versions.is_empty() {
        return Err(ApiError::bad_request("no versions provided"));
    }
    Ok(versions)
}

async fn delete_versions(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    versions_command(c.app, mount, path, requested_versions(c)?, VersionAction::Delete).await
}

async fn undelete_versions(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    versions_command(c.app, mount, path, requested_versions(c)?, VersionAction::Undelete).await
}

async fn destroy_versions(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    versions_command(c.app, mount, path, requested_versions(c)?, VersionAction::Destroy).await
}

async fn list(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
    let keys = if c.app.state.read(|s| s.mounts.contains_key(mount)) {
        c.app.state.kv_list(mount.to_string(), prefix).await.map_err(stored_secrets_unreadable)?
    } else {
        Vec::new()
    };
    if keys.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Reply::data(json!({ "keys": keys })))
}

async fn delete_metadata(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (mount, path) = secret(c);
    match c.app.propose(Command::KvMetadataDelete { mount: mount.into(), path: path.into() }).await? {
        Response::Rejected(Rejection::Kv(KvError::NotFound)) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn read_config(c: &Call<'_>) -> Result<Reply, ApiError> {
    let config = c.app.state.read(|s| s.mounts.get(c.mount()).map(|m| m.kv.config.clone())).unwrap_or_default();
    Ok(Reply::data(config_json(&config)))
}

fn version_json(v: &KvVersion, version: u64, custom: &BTreeMap<String, String>) -> Value {
    json!({
        "created_time": rfc3339(v.created),
        "custom_metadata": if custom.is_empty() { Value::Null } else { json!(custom) },
        "deletion_time": v.deletion_time.map(rfc3339).unwrap_or_default(),
        "destroyed": v.destroyed,
        "version": version,
    })
}

/// The secret at `path` of `mount` as stored.
fn entry(app: &Node, mount: &str, path: &str) -> Result<Option<KvEntry>, ApiError> {
    let entry =
        app.state.read_with_store(
            |s, store| if s.mounts.contains_key(mount) { store.kv.entry(mount, path) } else { Ok(None) },
        );
    entry.map_err(stored_secrets_unreadable)
}

/// A secret the store holds damaged is never served: the client hears that much, the log
/// hears which file and secret (never a value: the store holds ciphertext only).
fn stored_secrets_unreadable(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "cannot read the stored secrets");
    ApiError::internal("the stored secrets cannot be read on this node; see its log")
}

async fn read(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req, keys, (mount, path)) = (c.app, c.req, c.keys()?, secret(c));
    let requested = match req.query.get("version") {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| ApiError::bad_request("version must be a number"))?),
    };
    let barrier = MountBarrier::of(app, mount)?;
    let entry = entry(app, mount, path)?.ok_or_else(ApiError::not_found)?;
    let number = requested.filter(|&v| v > 0).unwrap_or(entry.current_version);
    let version = entry.versions.get(&number).ok_or_else(ApiError::not_found)?;
    let metadata = version_json(version, number, &entry.custom_metadata);
    if version.is_gone(ids::now_ms()) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            errors: vec![],
            body: Some(super::envelope(json!({ "data": null, "metadata": metadata }), Value::Null)),
            allow: None,
            stale_ms: None,
        });
    }
    let data = barrier.open(keys, path, number, &version.ciphertext)?;
    Ok(Reply::data(json!({ "data": data, "metadata": metadata })))
}

/// Seals `data` for the next version of `path` and proposes it, retrying if another writer took
/// that version first (unless the caller pinned it with `cas`).
async fn put(app: &Node, mount: &str, path: &str, data: &Value, cas: Option<u64>) -> Result<Reply, ApiError> {
    if !data.is_object() {
        return Err(ApiError::bad_request("data must be a JSON object of key/value pairs"));
    }
    let barrier = MountBarrier::of(app, mount)?;
    for _ in 0..VERSION_RACE_RETRIES {
        if !app.state.read(|s| s.mounts.contains_key(mount)) {
            return Err(ApiError::no_route(mount));
        }
        let before = entry(app, mount, path)?;
        let version = citadel_core::kv::next_version(before.as_ref());
        // A write changes no custom metadata: the answer's is the entry's before it.
        let custom = before.map(|e| e.custom_metadata).unwrap_or_default();
        let ciphertext = barrier.seal(app, path, version, data)?;
        let sealed = ciphertext.clone();
        let command =
            Command::KvWrite { mount: mount.into(), path: path.into(), version, ciphertext, cas, at: ids::now_ms() };
        #[cfg(feature = "unsafe-ack-before-commit")]
        let proposal = async {
            // BROKEN ON PURPOSE: acknowledges a write that may never commit.
            let guess = Response::KvWritten { version, created: ids::now_ms(), deletion_time: None };
            tokio::time::timeout(std::time::Duration::from_millis(50), app.propose(command)).await.unwrap_or(Ok(guess))
        };
        #[cfg(not(feature = "unsafe-ack-before-commit"))]
        let proposal = app.propose(command);
        match proposal.await? {
            Response::KvWritten { version, created, deletion_time } => {
                return Ok(written(&custom, version, created, deletion_time));
            }
            Response::Rejected(Rejection::Kv(KvError::VersionRace { .. })) => {
                // Either another writer took the version, or this very write landed on an earlier
                // attempt whose answer was lost: the ciphertext (random nonce) tells which.
                app.linearize().await?;
                let landed = entry(app, mount, path)?.and_then(|e| {
                    e.versions.get(&version).filter(|v| v.ciphertext == sealed).map(|v| (v.created, v.deletion_time))
                });
                if let Some((created, deletion_time)) = landed {
                    return Ok(written(&custom, version, created, deletion_time));
                }
                continue;
            }
            Response::Rejected(r) => return Err(r.into()),
            other => return Err(ApiError::internal(format!("unexpected response {other}"))),
        }
    }
    Err(ApiError::unavailable("too many concurrent writers to this path; retry"))
}

fn written(custom: &BTreeMap<String, String>, version: u64, created: u64, deletion_time: Option<u64>) -> Reply {
    Reply::data(json!({
        "created_time": rfc3339(created),
        "custom_metadata": if custom.is_empty() { Value::Null } else { json!(custom) },
        "deletion_time": deletion_time.map(rfc3339).unwrap_or_default(),
        "destroyed": false,
        "version": version,
    }))
}

async fn write_version(app: &Node, req: &ApiRequest, mount: &str, path: &str) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    let data = body.get("data").ok_or_else(|| ApiError::bad_request("missing required field \"data\""))?;
    put(app, mount, path, data, options_cas(&body)?).await
}

/// The `options.cas` a write or patch names, if any.
fn options_cas(body: &Value) -> Result<Option<u64>, ApiError> {
    match body.pointer("/options/cas") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            Ok(Some(v.as_u64().ok_or_else(|| ApiError::bad_request("options.cas must be a non-negative integer"))?))
        }
    }
}

/// JSON merge patch (RFC 7386) of the current version, written with `cas` = that version. As in
/// Vault, where the mount or the secret requires check-and-set the patch must name `options.cas`,
/// and a `cas` that is not the current version is refused.
async fn patch(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req, keys, (mount, path)) = (c.app, c.req, c.keys()?, secret(c));
    let body: Value = req.json()?;
    let changes = body.get("data").ok_or_else(|| ApiError::bad_request("missing required field \"data\""))?;
    let cas = options_cas(&body)?;
    app.linearize().await?;
    let barrier = MountBarrier::of(app, mount)?;
    let entry = entry(app, mount, path)?.ok_or_else(ApiError::not_found)?;
    let current = entry.current_version;
    let mount_requires_cas = app.state.read(|s| s.mounts.get(mount).is_some_and(|m| m.kv.config.cas_required));
    if cas.is_none() && (mount_requires_cas || entry.cas_required) {
        return Err(Rejection::Kv(KvError::CasRequired).into());
    }
    if cas.is_some_and(|cas| cas != current) {
        return Err(Rejection::Kv(KvError::CasMismatch { current }).into());
    }
    let version = entry.versions.get(&current).filter(|v| !v.is_gone(ids::now_ms())).ok_or_else(ApiError::not_found)?;
    let mut data = barrier.open(keys, path, current, &version.ciphertext)?;
    merge_patch(&mut data, changes);
    put(app, mount, path, &data, Some(current)).await
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

enum VersionAction {
    Delete,
    Undelete,
    Destroy,
}

async fn versions_command(
    app: &Node,
    mount: &str,
    path: &str,
    versions: Vec<u64>,
    action: VersionAction,
) -> Result<Reply, ApiError> {
    let (mount, path, at) = (mount.to_string(), path.to_string(), ids::now_ms());
    let command = match action {
        VersionAction::Delete => Command::KvDelete { mount, path, versions, at },
        VersionAction::Undelete => Command::KvUndelete { mount, path, versions, at },
        VersionAction::Destroy => Command::KvDestroy { mount, path, versions, at },
    };
    match app.propose(command).await? {
        // Vault answers 204 for a path that does not exist.
        Response::Rejected(Rejection::Kv(KvError::NotFound)) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn read_metadata(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, (mount, path)) = (c.app, secret(c));
    let entry = entry(app, mount, path)?.ok_or_else(ApiError::not_found)?;
    let versions: serde_json::Map<String, Value> = entry
        .versions
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                json!({
                    "created_time": rfc3339(v.created),
                    "deletion_time": v.deletion_time.map(rfc3339).unwrap_or_default(),
                    "destroyed": v.destroyed,
                }),
            )
        })
        .collect();
    Ok(Reply::data(json!({
        "cas_required": entry.cas_required,
        "created_time": rfc3339(entry.created),
        "current_version": entry.current_version,
        "custom_metadata": if entry.custom_metadata.is_empty() { Value::Null } else { json!(entry.custom_metadata) },
        "delete_version_after": format!("{}s", entry.delete_version_after_secs),
        "max_versions": entry.max_versions,
        "oldest_version": entry.oldest_version,
        "updated_time": rfc3339(entry.updated),
        "versions": versions,
    })))
}

async fn write_metadata(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req, (mount, path)) = (c.app, c.req, secret(c));
    if path.is_empty() {
        return Err(ApiError::bad_request("a secret path is required"));
    }
    let body: Value = req.json()?;
    let max_versions = match body.get("max_versions") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .ok_or_else(|| ApiError::bad_request("max_versions must be a non-negative integer"))?,
        ),
    };
    let cas_required = match body.get("cas_required") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_bool().ok_or_else(|| ApiError::bad_request("cas_required must be a boolean"))?),
    };
    let custom_metadata: Option<BTreeMap<String, String>> = match body.get("custom_metadata") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|_| ApiError::bad_request("custom_metadata must map strings to strings"))?,
        ),
    };
    let update = MetadataUpdate {
        max_versions,
        cas_required,
        delete_version_after_secs: duration_secs(body.get("delete_version_after"), "delete_version_after")?,
        custom_metadata,
    };
    let command = Command::KvMetadataUpdate { mount: mount.into(), path: path.into(), update, at: ids::now_ms() };
    match app.propose(command).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

fn config_json(config: &KvConfig) -> Value {
    json!({
        "max_versions": config.max_versions,
        "cas_required": config.cas_required,
        "delete_version_after": format!("{}s", config.delete_version_after_secs),
    })
}

async fn write_config(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req, mount) = (c.app, c.req, c.mount());
    let body: Value = req.json()?;
    let mut config = app.state.read(|s| s.mounts.get(mount).map(|m| m.kv.config.clone())).unwrap_or_default();
    if let Some(v) = body.get("max_versions").filter(|v| !v.is_null()) {
        config.max_versions = v
            .as_u64()
            .and_then(|m| u32::try_from(m).ok())
            .filter(|m| *m <= 1000)
            .ok_or_else(|| ApiError::bad_request("max_versions must be an integer from 0 to 1000"))?;
    }
    if let Some(v) = body.get("cas_required").filter(|v| !v.is_null()) {
        config.cas_required = v.as_bool().ok_or_else(|| ApiError::bad_request("cas_required must be a boolean"))?;
    }
    if let Some(d) = duration_secs(body.get("delete_version_after"), "delete_version_after")? {
        config.delete_version_after_secs = d;
    }
    match app.propose(Command::KvConfigure { mount: mount.into(), config }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut doc, &json!({"a": null, "b": {"c": 5}, "e": "x"}));
        assert_eq!(doc, json!({"b": {"c": 5, "d": 3}, "e": "x"}));
    }
}
