//! KV version 2 on every kv mount: `data/`, `delete/`, `undelete/`, `destroy/`, `metadata/`,
//! `config`. Values are sealed by the barrier here, before they are proposed (§1.2).

use std::collections::BTreeMap;

use axum::http::StatusCode;
use citadel_core::barrier::kv_aad;
use citadel_core::command::{Command, Rejection, Response};
use citadel_core::kv::{KvConfig, KvEntry, KvError, KvVersion, MetadataUpdate};
use citadel_core::time::rfc3339;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::{authorize_op, duration_secs, ApiError, ApiRequest, Op, Reply, Target};
use crate::app::App;
use crate::auth::Caller;
use crate::ids;
use crate::seal::Unsealed;

/// Writes retried when another writer took the version this value was sealed for.
const VERSION_RACE_RETRIES: usize = 8;

pub async fn route(
    app: &App,
    req: &ApiRequest,
    op: Op,
    caller: &Caller,
    keys: &Unsealed,
    mount: &str,
    rest: &str,
) -> Result<Reply, ApiError> {
    let (section, path) = match rest.split_once('/') {
        Some((s, p)) => (s, p.trim_end_matches('/')),
        None => (rest, ""),
    };
    let folder = rest.ends_with('/') || path.is_empty();
    // Vault's KV existence check: a secret exists while its metadata does (even if every version
    // is deleted), so rewriting it needs `update`.
    let secret =
        Target::exists(app.state.read(|s| s.mounts.get(mount).is_some_and(|m| m.kv.entries.contains_key(path))));
    match section {
        "data" if !path.is_empty() => {
            authorize_op(app, caller, req, op, secret)?;
            match op {
                Op::Read => read(app, req, keys, mount, path).await,
                Op::Write => write(app, req, mount, path).await,
                Op::Patch => patch(app, req, keys, mount, path).await,
                Op::Delete => versions_command(app, mount, path, vec![], VersionAction::Delete).await,
                Op::List => Err(ApiError::method_not_allowed()),
            }
        }
        "delete" | "undelete" | "destroy" if !path.is_empty() => {
            authorize_op(app, caller, req, op, Target::Action)?;
            if op != Op::Write {
                return Err(ApiError::method_not_allowed());
            }
            let body: Value = req.json()?;
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
            let action = match section {
                "delete" => VersionAction::Delete,
                "undelete" => VersionAction::Undelete,
                _ => VersionAction::Destroy,
            };
            versions_command(app, mount, path, versions, action).await
        }
        "metadata" => {
            authorize_op(app, caller, req, op, secret)?;
            match op {
                Op::List => {
                    list(app, req, mount, if path.is_empty() { String::new() } else { format!("{path}/") }).await
                }
                Op::Read if folder && path.is_empty() => Err(ApiError::method_not_allowed()),
                Op::Read => read_metadata(app, req, mount, path).await,
                Op::Write | Op::Patch => write_metadata(app, req, mount, path).await,
                Op::Delete => {
                    match app.propose(Command::KvMetadataDelete { mount: mount.into(), path: path.into() }).await? {
                        Response::Rejected(Rejection::Kv(KvError::NotFound)) => Ok(Reply::empty()),
                        Response::Rejected(r) => Err(r.into()),
                        _ => Ok(Reply::empty()),
                    }
                }
            }
        }
        "config" if path.is_empty() => {
            // A mount's configuration always exists (with defaults): writing it is an update.
            authorize_op(app, caller, req, op, Target::Existing)?;
            match op {
                Op::Read => {
                    let config =
                        app.state.read(|s| s.mounts.get(mount).map(|m| m.kv.config.clone())).unwrap_or_default();
                    Ok(Reply::data(config_json(&config)))
                }
                Op::Write => write_config(app, req, mount).await,
                _ => Err(ApiError::method_not_allowed()),
            }
        }
        _ => Err(ApiError::no_route(&req.path)),
    }
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

async fn consistent(app: &App, req: &ApiRequest) -> Result<(), ApiError> {
    // Read-only mode serves the local replica; the dispatcher marks the answer stale.
    if req.stale_ok() {
        Ok(())
    } else if app.read_only() {
        req.served_stale.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    } else {
        Ok(app.linearize().await?)
    }
}

fn entry(app: &App, mount: &str, path: &str) -> Option<(String, KvEntry)> {
    app.state.read(|s| s.mounts.get(mount).and_then(|m| m.kv.entries.get(path).map(|e| (m.uuid.clone(), e.clone()))))
}

async fn read(app: &App, req: &ApiRequest, keys: &Unsealed, mount: &str, path: &str) -> Result<Reply, ApiError> {
    consistent(app, req).await?;
    let requested = match req.query.get("version") {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| ApiError::bad_request("version must be a number"))?),
    };
    let (uuid, entry) = entry(app, mount, path).ok_or_else(ApiError::not_found)?;
    let number = requested.filter(|&v| v > 0).unwrap_or(entry.current_version);
    let version = entry.versions.get(&number).ok_or_else(ApiError::not_found)?;
    let metadata = version_json(version, number, &entry.custom_metadata);
    if version.is_gone(ids::now_ms()) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            errors: vec![],
            body: Some(super::envelope(json!({ "data": null, "metadata": metadata }), Value::Null)),
        });
    }
    let plain = keys
        .keyring
        .decrypt(&kv_aad(&uuid, path, number), &version.ciphertext)
        .map_err(|e| ApiError::internal(format!("stored value failed to decrypt ({e}); the data may be damaged")))?;
    let data: Value = serde_json::from_slice(&plain)
        .map_err(|_| ApiError::internal("stored value is not valid JSON after decryption"))?;
    Ok(Reply::data(json!({ "data": data, "metadata": metadata })))
}

/// Seals `data` for the next version of `path` and proposes it, retrying if another writer took
/// that version first (unless the caller pinned it with `cas`).
async fn put(app: &App, mount: &str, path: &str, data: &Value, cas: Option<u64>) -> Result<Reply, ApiError> {
    if !data.is_object() {
        return Err(ApiError::bad_request("data must be a JSON object of key/value pairs"));
    }
    let plain = Zeroizing::new(serde_json::to_vec(data).expect("JSON values serialize"));
    for _ in 0..VERSION_RACE_RETRIES {
        let target = app.state.read(|s| s.mounts.get(mount).map(|m| (m.uuid.clone(), m.kv.next_version(path))));
        let (uuid, version) = target.ok_or_else(|| ApiError::no_route(mount))?;
        // Always the freshest keyring: a rotation elsewhere must not leave us sealing with an old term.
        let keyring = &app.keys()?.keyring;
        let ciphertext = keyring.encrypt(&ids::random_bytes(), &kv_aad(&uuid, path, version), &plain);
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
                return Ok(written(app, mount, path, version, created, deletion_time));
            }
            Response::Rejected(Rejection::Kv(KvError::VersionRace { .. })) => {
                // Either another writer took the version, or this very write landed on an earlier
                // attempt whose answer was lost: the ciphertext (random nonce) tells which.
                app.linearize().await?;
                let landed = entry(app, mount, path).and_then(|(_, e)| {
                    e.versions.get(&version).filter(|v| v.ciphertext == sealed).map(|v| (v.created, v.deletion_time))
                });
                if let Some((created, deletion_time)) = landed {
                    return Ok(written(app, mount, path, version, created, deletion_time));
                }
                continue;
            }
            Response::Rejected(r) => return Err(r.into()),
            other => return Err(ApiError::internal(format!("unexpected response {other}"))),
        }
    }
    Err(ApiError::unavailable("too many concurrent writers to this path; retry"))
}

fn written(app: &App, mount: &str, path: &str, version: u64, created: u64, deletion_time: Option<u64>) -> Reply {
    let custom = entry(app, mount, path).map(|(_, e)| e.custom_metadata).unwrap_or_default();
    Reply::data(json!({
        "created_time": rfc3339(created),
        "custom_metadata": if custom.is_empty() { Value::Null } else { json!(custom) },
        "deletion_time": deletion_time.map(rfc3339).unwrap_or_default(),
        "destroyed": false,
        "version": version,
    }))
}

async fn write(app: &App, req: &ApiRequest, mount: &str, path: &str) -> Result<Reply, ApiError> {
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
async fn patch(app: &App, req: &ApiRequest, keys: &Unsealed, mount: &str, path: &str) -> Result<Reply, ApiError> {
    let body: Value = req.json()?;
    let changes = body.get("data").ok_or_else(|| ApiError::bad_request("missing required field \"data\""))?;
    let cas = options_cas(&body)?;
    app.linearize().await?;
    let (uuid, entry) = entry(app, mount, path).ok_or_else(ApiError::not_found)?;
    let current = entry.current_version;
    let mount_requires_cas = app.state.read(|s| s.mounts.get(mount).is_some_and(|m| m.kv.config.cas_required));
    if cas.is_none() && (mount_requires_cas || entry.cas_required) {
        return Err(Rejection::Kv(KvError::CasRequired).into());
    }
    if cas.is_some_and(|cas| cas != current) {
        return Err(Rejection::Kv(KvError::CasMismatch { current }).into());
    }
    let version = entry.versions.get(&current).filter(|v| !v.is_gone(ids::now_ms())).ok_or_else(ApiError::not_found)?;
    let plain = keys
        .keyring
        .decrypt(&kv_aad(&uuid, path, current), &version.ciphertext)
        .map_err(|e| ApiError::internal(format!("stored value failed to decrypt ({e})")))?;
    let mut data: Value = serde_json::from_slice(&plain).map_err(|_| ApiError::internal("stored value is not JSON"))?;
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
    app: &App,
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

async fn list(app: &App, req: &ApiRequest, mount: &str, prefix: String) -> Result<Reply, ApiError> {
    consistent(app, req).await?;
    let keys = app.state.read(|s| s.mounts.get(mount).map(|m| m.kv.list(&prefix)).unwrap_or_default());
    if keys.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Reply::data(json!({ "keys": keys })))
}

async fn read_metadata(app: &App, req: &ApiRequest, mount: &str, path: &str) -> Result<Reply, ApiError> {
    consistent(app, req).await?;
    let (_, entry) = entry(app, mount, path).ok_or_else(ApiError::not_found)?;
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

async fn write_metadata(app: &App, req: &ApiRequest, mount: &str, path: &str) -> Result<Reply, ApiError> {
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

async fn write_config(app: &App, req: &ApiRequest, mount: &str) -> Result<Reply, ApiError> {
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
