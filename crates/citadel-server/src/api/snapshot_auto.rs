//! `sys/storage/raft/snapshot-auto/*`: Vault's automated-snapshot API (§10.2). The schedule is
//! replicated state (`citadel_core::snapshot_auto`); the leader's `snapshot_auto` job takes the
//! snapshots (`scheduled_snapshots.rs`).

use citadel_core::command::{Command, Response};
use citadel_core::route::{Kind, Op, Param, Route};
use citadel_core::snapshot_auto::{AutoSnapshot, AutoSnapshotConfig};
use citadel_core::time::rfc3339;
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{ApiError, Reply};

/// Vault's default `file_prefix`, and ours.
const DEFAULT_FILE_PREFIX: &str = "citadel-snapshot";

pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route(
            "sys/storage/raft/snapshot-auto/config",
            vec![op::sudo(Op::List, "Names of the scheduled snapshot configurations", handler!(list))],
        ),
        route(
            "sys/storage/raft/snapshot-auto/config/:name",
            vec![
                op::sudo(Op::Read, "A scheduled snapshot configuration", handler!(read)),
                op::sudo(Op::Write, "Create or replace a scheduled snapshot configuration", handler!(write))
                    .with_params(CONFIG_PARAMS),
                op::sudo(Op::Delete, "Delete a scheduled snapshot configuration", handler!(delete)),
            ],
        ),
        route(
            "sys/storage/raft/snapshot-auto/status/:name",
            vec![op::sudo(Op::Read, "How the configuration's last snapshot went", handler!(status))],
        ),
    ]
}

const CONFIG_PARAMS: &[Param] = &[
    Param::body("interval", Kind::Duration, "Time between snapshots (seconds or a duration such as 1h)").required(),
    Param::body("retain", Kind::Integer, "How many snapshots to keep (default 1)"),
    Param::body("storage_type", Kind::String, "Where snapshots go: local (a directory on the leader)").required(),
    Param::body("path_prefix", Kind::String, "The directory (absolute path) on the leader's disk").required(),
    Param::body("file_prefix", Kind::String, "File names start with this (default citadel-snapshot)"),
];

/// Fields a configuration may carry; anything else is a typo worth a 400.
const FIELDS: &[&str] = &["interval", "retain", "storage_type", "path_prefix", "file_prefix", "local_max_space"];

fn entry(c: &Call<'_>) -> Result<AutoSnapshot, ApiError> {
    let name = c.param("name");
    c.app.state.read(|s| s.snapshot_auto.get(name).cloned()).ok_or_else(|| {
        ApiError::new(axum::http::StatusCode::NOT_FOUND, format!("no scheduled snapshot configuration named {name:?}"))
    })
}

async fn list(c: &Call<'_>) -> Result<Reply, ApiError> {
    let keys: Vec<String> = c.app.state.read(|s| s.snapshot_auto.keys().cloned().collect());
    Ok(Reply::data(json!({ "keys": keys })))
}

async fn read(c: &Call<'_>) -> Result<Reply, ApiError> {
    let config = entry(c)?.config;
    Ok(Reply::data(json!({
        "interval": config.interval_secs,
        "retain": config.retain,
        "storage_type": "local",
        "path_prefix": config.path_prefix,
        "file_prefix": config.file_prefix,
        "local_max_space": 0,
    })))
}

async fn status(c: &Call<'_>) -> Result<Reply, ApiError> {
    let entry = entry(c)?;
    let s = &entry.status;
    let time = |ms: u64| if ms == 0 { Value::Null } else { json!(rfc3339(ms)) };
    Ok(Reply::data(json!({
        "last_snapshot_start": time(s.last_snapshot_start),
        "last_snapshot_end": time(s.last_snapshot_end),
        "last_snapshot_error": s.last_snapshot_error,
        "last_snapshot_url": s.last_snapshot_url,
        "snapshot_size": s.last_snapshot_size,
        "consecutive_errors": s.consecutive_errors,
        // A schedule that never ran is due at once.
        "next_snapshot_start": time(entry.next_start()),
    })))
}

async fn write(c: &Call<'_>) -> Result<Reply, ApiError> {
    let body: Value = c.req.json()?;
    let fields = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!("unknown field {unknown:?} (accepted: {})", FIELDS.join(", "))));
    }
    match body.get("storage_type").and_then(Value::as_str) {
        Some("local") => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "storage_type {other:?} is not supported: only \"local\" (a directory on the leader's disk)"
            )))
        }
        None => return Err(ApiError::bad_request("missing required field \"storage_type\" (\"local\")")),
    }
    if body.get("local_max_space").is_some_and(|v| v.as_u64() != Some(0)) {
        return Err(ApiError::bad_request("local_max_space is not supported (use retain to bound the files kept)"));
    }
    let interval_secs = super::duration_secs(body.get("interval"), "interval")?
        .ok_or_else(|| ApiError::bad_request("missing required field \"interval\" (such as \"1h\")"))?;
    let retain = match body.get("retain") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ApiError::bad_request("retain must be a positive integer"))?,
    };
    let text = |field: &str| match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!("{field} must be a string"))),
    };
    let path_prefix = text("path_prefix")?
        .ok_or_else(|| ApiError::bad_request("missing required field \"path_prefix\" (a directory on the leader)"))?;
    let file_prefix = text("file_prefix")?.unwrap_or_else(|| DEFAULT_FILE_PREFIX.into());
    // The data directory is the node's alone: a resync deletes parts of it whole.
    if std::path::Path::new(&path_prefix).starts_with(&c.app.config.data_dir) {
        return Err(ApiError::bad_request(format!(
            "path_prefix {path_prefix:?} is inside the node's data directory {}; choose a directory outside it",
            c.app.config.data_dir.display()
        )));
    }
    let name = c.param("name").to_string();
    let config = AutoSnapshotConfig { interval_secs, retain, path_prefix, file_prefix };
    // The same check `apply` makes: refused here with the field named, before anything is proposed.
    citadel_core::snapshot_auto::check(&name, &config).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match c.app.propose(Command::SnapshotAutoPut { name, config }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn delete(c: &Call<'_>) -> Result<Reply, ApiError> {
    let name = c.param("name").to_string();
    match c.app.propose(Command::SnapshotAutoDelete { name }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
