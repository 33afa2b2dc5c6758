//! `sys/storage/raft/snapshot`: operator snapshots, saved and restored as self-describing files.
//!
//! File: one JSON header line (format, version, cluster, index, term, SHA-256 of the body), then
//! the body, which is the storage layer's checksummed snapshot record. Nothing in the file is
//! plaintext: values are ciphertext, tokens keyed hashes. A restore verifies everything before it
//! proposes anything, and goes through Raft like every other change (§1.1).

use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use citadel_core::command::{Command, Response};
use citadel_core::policy::Caps;
use citadel_storage::codec::{self, StoredSnapshot};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{authorize, authorize_op, ApiError, ApiRequest, Op, Reply};
use crate::app::App;

const FORMAT: &str = "citadel-snapshot";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub format: String,
    pub version: u32,
    pub cluster_id: String,
    pub last_index: u64,
    pub last_term: u64,
    pub sha256: String,
    pub size: usize,
}

/// Builds a fresh snapshot covering everything committed so far and returns it as a file.
pub async fn save(app: &App) -> Result<Reply, ApiError> {
    app.linearize().await?;
    let target = app.state.applied_index();
    app.raft.trigger().snapshot().await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    app.raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.snapshot.as_ref().is_some_and(|s| s.index >= target), "a snapshot covering the request")
        .await
        .map_err(|_| ApiError::unavailable("the snapshot was not built in time; retry"))?;
    let snapshot = app
        .raft
        .get_snapshot()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .ok_or_else(|| ApiError::unavailable("no snapshot is available yet; retry"))?;
    let data = snapshot.snapshot;
    let stored: StoredSnapshot = codec::decode(&data, "snapshot")
        .map_err(|e| ApiError::internal(format!("the local snapshot is damaged: {e}")))?;
    let last = stored.last_applied.ok_or_else(|| ApiError::unavailable("nothing to snapshot yet"))?;
    let header = SnapshotHeader {
        format: FORMAT.into(),
        version: VERSION,
        cluster_id: stored.state.cluster.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
        last_index: last.index,
        last_term: last.term,
        sha256: hex::encode(Sha256::digest(&data)),
        size: data.len(),
    };
    let mut file = serde_json::to_vec(&header).expect("header serializes");
    file.push(b'\n');
    file.extend_from_slice(&data);
    Ok(Reply::raw(StatusCode::OK, "application/octet-stream", file))
}

/// Splits and verifies a snapshot file; every failure names what is wrong.
pub fn parse(file: &[u8]) -> Result<(SnapshotHeader, StoredSnapshot), String> {
    let newline = file.iter().position(|b| *b == b'\n').ok_or("not a Citadel snapshot file (no header line)")?;
    let header: SnapshotHeader =
        serde_json::from_slice(&file[..newline]).map_err(|e| format!("not a Citadel snapshot file: {e}"))?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(format!("unsupported snapshot format {:?} version {}", header.format, header.version));
    }
    let body = &file[newline + 1..];
    if body.len() != header.size || hex::encode(Sha256::digest(body)) != header.sha256 {
        return Err("the snapshot file is damaged or truncated (checksum mismatch)".into());
    }
    let stored: StoredSnapshot = codec::decode(body, "snapshot body").map_err(|e| e.to_string())?;
    Ok((header, stored))
}

/// Whether a request to the snapshot routes may have its body (up to 256 MiB) read: only when
/// its token is valid and holds `sudo` and the operation's capability on the path (§8.3). Anyone
/// else is answered 403 by the dispatcher without the body being read.
pub fn may_read_body(app: &App, method: &Method, path: &str, headers: &HeaderMap) -> bool {
    let path = path.strip_prefix("/v1/").unwrap_or_default().trim_matches('/');
    let op = match method.as_str() {
        "GET" | "HEAD" => Op::Read,
        "POST" | "PUT" => Op::Write,
        _ => return false,
    };
    let (Ok(keys), Some(token)) = (app.keys(), super::token_from_headers(headers)) else { return false };
    let now = crate::ids::now_ms();
    let Some(caller) = app.state.read(|s| crate::auth::resolve(s, &keys.keyring.token_hmac_key, &token, now)) else {
        return false;
    };
    !caller.read_only
        && authorize_op(app, &caller, path, op).is_ok()
        && authorize(app, &caller, path, Caps::SUDO).is_ok()
}

pub async fn restore(app: &App, req: &ApiRequest, force: bool) -> Result<Reply, ApiError> {
    let (header, stored) = parse(&req.body).map_err(ApiError::bad_request)?;
    let current = app.state.read(|s| s.cluster.as_ref().map(|c| c.id.clone()));
    if current.as_deref() != Some(header.cluster_id.as_str()) && !force {
        return Err(ApiError::bad_request(format!(
            "the snapshot belongs to cluster {:?}, not this one; use sys/storage/raft/snapshot-force to restore it anyway",
            header.cluster_id
        )));
    }
    tracing::warn!(index = header.last_index, cluster = %header.cluster_id, "restoring a snapshot");
    match app.propose(Command::RestoreState { state: Box::new(stored.state) }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
