//! `sys/storage/raft/snapshot` over HTTP: the snapshot itself is built and checked by
//! `crate::snapshot`.

use axum::http::{HeaderMap, Method};
use citadel_core::command::{Command, Response};
use citadel_core::policy::Caps;
use tokio::io::AsyncReadExt;

use super::{ApiError, ApiRequest, Reply};
use crate::node::Node;
use crate::seal::Unsealed;
use crate::snapshot::BuildError;

/// A fresh snapshot of everything committed so far, as Vault's archive, streamed from the
/// temporary file it was built in.
pub async fn save(app: &Node, keys: &Unsealed) -> Result<Reply, ApiError> {
    let built = crate::snapshot::build(app, keys).await.map_err(|e| match e {
        BuildError::Node(e) => ApiError::from(e),
        BuildError::NotReady(e) => ApiError::unavailable(e),
        BuildError::Failed(e) => ApiError::internal(e),
    })?;
    let chunks = futures::stream::try_unfold(tokio::fs::File::from_std(built.file), |mut file| async move {
        let mut chunk = vec![0; CHUNK];
        let n = file.read(&mut chunk).await?;
        chunk.truncate(n);
        Ok::<_, std::io::Error>((n > 0).then(|| (axum::body::Bytes::from(chunk), file)))
    });
    let mut reply = Reply::stream("application/gzip", axum::body::Body::from_stream(chunks));
    reply.headers.push(("content-length", built.len.to_string()));
    Ok(reply)
}

/// Bytes of a snapshot read from its file at a time.
const CHUNK: usize = 64 << 10;

/// Whether a request to the snapshot routes may have its body (up to 256 MiB) read: only when
/// its token is valid and holds `sudo` and the operation's capability on the path (§8.3). Anyone
/// else is answered 403 by the dispatcher without the body being read.
pub fn may_read_body(app: &Node, method: &Method, path: &str, headers: &HeaderMap) -> bool {
    let need = match method.as_str() {
        "GET" | "HEAD" => Caps::READ,
        "POST" | "PUT" => Caps::UPDATE,
        _ => return false,
    };
    let (Ok(keys), Some(token)) = (app.keys(), super::token_from_headers(headers)) else { return false };
    let now = crate::ids::now_ms();
    let Some(caller) = app.state.read_with_store(|s, store| crate::auth::resolve(s, store, &keys.keyring, &token, now))
    else {
        return false;
    };
    !caller.read_only && super::holds(app, &caller, path, need.union(Caps::SUDO))
}

pub async fn restore(app: &Node, keys: &Unsealed, req: &ApiRequest, force: bool) -> Result<Reply, ApiError> {
    let state = crate::snapshot::check_restore(app, keys, &req.body, force).map_err(ApiError::bad_request)?;
    match app.propose(Command::RestoreState { state: Box::new(state) }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
