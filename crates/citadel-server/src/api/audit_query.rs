//! `sys/audit/*`: queries over the replicated audit log and verification of every node's chain
//! and of the log chain (the events carried inside their writes' Raft entries).

use citadel_core::audit::AuditEvent;
use citadel_core::route::{Kind, Param, Route};
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{ApiError, Op, Reply};
use crate::ids;
use crate::node::Node;

/// `sys/audit/*`: the replicated audit log, queried and verified.
pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route(
            "sys/audit/events",
            vec![op::sudo(Op::Read, "Replicated audit events", handler!(audit_events)).with_params(AUDIT_PARAMS)],
        ),
        route(
            "sys/audit/verify",
            vec![op::sudo(Op::Read, "Verify every node's audit hash chain and the log chain", handler!(audit_verify))],
        ),
    ]
}

const AUDIT_PARAMS: &[Param] = &[
    Param::query("node", Kind::Integer, "Only this node's events"),
    Param::query("user", Kind::String, "Only this user's events"),
    Param::query("path", Kind::String, "Only events under this path"),
    Param::query("since", Kind::String, "Unix milliseconds, or a duration ago (15m)"),
    Param::query("limit", Kind::Integer, "At most this many (1 to 10000, default 100)"),
];

async fn audit_verify(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(Reply::data(audit_verify_body(c.app)))
}

async fn audit_events(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (app, req) = (c.app, c.req);
    let node = req
        .query
        .get("node")
        .map(|n| n.parse::<u64>().map_err(|_| ApiError::bad_request("node must be a node id (integer)")))
        .transpose()?;
    let since = match req.query.get("since") {
        None => 0,
        Some(s) => match s.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => {
                let secs = citadel_core::time::parse_duration_secs(s).ok_or_else(|| {
                    ApiError::bad_request(
                        "since must be Unix milliseconds or a duration such as 15m (meaning: that long ago)",
                    )
                })?;
                ids::now_ms().saturating_sub(secs * 1000)
            }
        },
    };
    let limit = match req.query.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=10_000).contains(l))
            .ok_or_else(|| ApiError::bad_request("limit must be between 1 and 10000"))?,
    };
    let user = req.query.get("user");
    let path = req.query.get("path");
    // By the node that accepted the request: its spool chain's events, and its requests' events
    // in the log chain (whose `node` is the accepting node too).
    let mut events = app.state.read(|s| {
        s.audit
            .events()
            .filter(|e| node.is_none_or(|n| n == e.body().node))
            .filter(|e| e.body().time >= since)
            .filter(|e| user.is_none_or(|u| &e.body().user == u))
            .filter(|e| path.is_none_or(|p| e.body().path.starts_with(p.as_str())))
            .cloned()
            .collect::<Vec<_>>()
    });
    events.sort_by_key(|e| (e.body().time, e.body().node, e.body().chain.is_empty(), e.body().seq));
    let skip = events.len().saturating_sub(limit);
    let events: Vec<Value> = events.iter().skip(skip).map(AuditEvent::view).collect();
    Ok(Reply::data(json!({ "events": events })))
}

fn audit_verify_body(app: &Node) -> Value {
    app.state.read(|s| {
        let nodes: serde_json::Map<String, Value> = s
            .audit
            .chains
            .iter()
            .map(|(id, chain)| {
                (id.to_string(), json!({ "events": chain.events.len(), "last_seq": chain.last_seq(), "last_hash": chain.last_hash() }))
            })
            .collect();
        let log = &s.audit.log;
        let log = json!({ "events": log.events.len(), "last_seq": log.last_seq(), "last_hash": log.last_hash() });
        match s.audit.verify() {
            Ok(total) => json!({ "ok": true, "events": total, "nodes": nodes, "log": log }),
            Err(e) => json!({ "ok": false, "error": e.to_string(), "nodes": nodes, "log": log }),
        }
    })
}
