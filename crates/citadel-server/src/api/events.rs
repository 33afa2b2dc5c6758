//! `GET sys/events`: the node's event stream (`events.rs`) as newline-delimited JSON, and
//! `GET sys/jobs`: the replicated log of leader-job runs.
//!
//! A subscription needs `sudo` on `sys/events`; at most `[events] max_subscribers` are open at
//! once (429 beyond), on top of the listener's connection caps. Each line is one JSON object
//! with `type`, `time` (Unix ms) and `node`: a `NodeEvent`, or one of the stream's own lines:
//! `subscribed` (first, with the node's current leader and term), `heartbeat` (every
//! `[events] heartbeat_ms` so both sides notice a dead connection), `lagged` (`missed` events
//! were dropped because this subscriber fell behind) and `closed` (the token stopped being
//! valid; the stream ends).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use citadel_core::policy::Caps;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use zeroize::Zeroizing;

use super::routes::Call;
use super::{ApiError, Reply};
use crate::events::Subscription;
use crate::node::Node;

pub(super) async fn jobs(c: &Call<'_>) -> Result<Reply, ApiError> {
    let runs = c.app.state.read(|s| serde_json::to_value(&s.jobs.runs).unwrap_or(Value::Null));
    Ok(Reply::data(json!({ "runs": runs })))
}

pub(super) async fn subscribe(c: &Call<'_>) -> Result<Reply, ApiError> {
    let token = c.req.token().ok_or_else(ApiError::forbidden)?;
    open_stream(c.app, &c.req.path, Zeroizing::new(token))
}

fn open_stream(app: &Arc<Node>, path: &str, token: Zeroizing<String>) -> Result<Reply, ApiError> {
    let subscription = app.events.subscribe().ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this node already serves {} event subscribers ([events] max_subscribers); try another node or later",
                app.config.events.max_subscribers
            ),
        )
    })?;
    let heartbeat = Duration::from_millis(app.config.events.heartbeat_ms);
    let mut feed = Feed {
        app: app.clone(),
        subscription,
        heartbeat: tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat),
        // Checked again at each heartbeat, as a new request would be: revoked, expired, or
        // without `sudo` on this path any more, and the stream ends.
        token,
        path: path.to_string(),
        first: None,
        done: false,
    };
    feed.first = Some(feed.control("subscribed", json!({ "leader": feed.leader(), "term": feed.term() })));
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        let line = feed.next_line().await?;
        Some((Ok::<_, Infallible>(line), feed))
    });
    Ok(Reply::stream("application/x-ndjson", Body::from_stream(stream)))
}

struct Feed {
    app: Arc<Node>,
    subscription: Subscription,
    heartbeat: tokio::time::Interval,
    token: Zeroizing<String>,
    path: String,
    first: Option<Bytes>,
    done: bool,
}

impl Feed {
    async fn next_line(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        tokio::select! {
            received = self.subscription.events.recv() => match received {
                Ok(event) => Some(line(&serde_json::to_value(&event).unwrap_or(Value::Null))),
                Err(RecvError::Lagged(missed)) => Some(self.control("lagged", json!({ "missed": missed }))),
                Err(RecvError::Closed) => None,
            },
            _ = self.heartbeat.tick() => {
                if self.token_valid() {
                    Some(self.control("heartbeat", json!({})))
                } else {
                    self.done = true;
                    let reason = "the token was revoked or has expired, its policies no longer grant this stream, or the node was sealed";
                    Some(self.control("closed", json!({ "reason": reason })))
                }
            }
        }
    }

    fn token_valid(&self) -> bool {
        let Ok(keys) = self.app.keys() else { return false };
        let now = crate::ids::now_ms();
        let caller =
            self.app.state.read_with_store(|s, store| crate::auth::resolve(s, store, &keys.keyring, &self.token, now));
        caller.is_some_and(|caller| super::holds(&self.app, &caller, &self.path, Caps::READ.union(Caps::SUDO)))
    }

    fn leader(&self) -> Option<u64> {
        self.app.raft_metrics().current_leader
    }

    fn term(&self) -> u64 {
        self.app.raft_metrics().current_term
    }

    fn control(&self, kind: &str, mut fields: Value) -> Bytes {
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("type".into(), json!(kind));
            obj.insert("time".into(), json!(crate::ids::now_ms()));
            obj.insert("node".into(), json!(self.app.node_id()));
        }
        line(&fields)
    }
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}
