//! `sys/audit/*`: queries over the replicated audit log and verification of every node's chain
//! and of the log chain (the events carried inside their writes' Raft entries).

use std::collections::BTreeMap;

use citadel_core::audit::{AuditEvent, Chain, ChainTip};
use citadel_core::route::{Kind, Param, Route};
use citadel_storage::AuditQuery;
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
    Ok(Reply::data(audit_verify_body(c.app).await?))
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
    let query =
        AuditQuery { node, user: req.query.get("user").cloned(), path: req.query.get("path").cloned(), since, limit };
    let store = app.state.audit().clone();
    let events = tokio::task::spawn_blocking(move || store.query(&query))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot read the audit log: {e}")))?;
    let events: Vec<Value> = events.iter().map(AuditEvent::view).collect();
    Ok(Reply::data(json!({ "events": events })))
}

/// Verifies the audit store's chains one event at a time, and that each reaches the tip the
/// replicated state holds for it (a store that lost its newest events fails here).
async fn audit_verify_body(app: &Node) -> Result<Value, ApiError> {
    // The tips first: the store holds at least what they say once they are read (a batch's
    // events are stored before its state is visible), and may hold more by the time it is read.
    let (tips, anchors): (BTreeMap<Chain, u64>, BTreeMap<Chain, ChainTip>) = app.state.read(|s| {
        (s.audit.tips().collect(), s.audit.anchors().map(|(chain, anchor)| (chain, anchor.clone())).collect())
    });
    let store = app.state.audit().clone();
    let held_anchors = anchors.clone();
    let reports = tokio::task::spawn_blocking(move || store.verify(&held_anchors))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot read the audit log: {e}")))?;
    let mut nodes = serde_json::Map::new();
    let mut log = json!({ "events": 0, "last_seq": 0, "last_hash": citadel_core::audit::GENESIS });
    let (mut total, mut error) = (0, None);
    for report in &reports {
        // Where retention cut the chain: an archive's last event for it must be this one.
        let pruned = anchors.get(&report.chain).cloned().unwrap_or_default();
        let view = json!({
            "events": report.events,
            "last_seq": report.last.seq,
            "last_hash": report.last.hash,
            "pruned_through": pruned.seq,
            "pruned_hash": pruned.hash,
        });
        match report.chain {
            Chain::Log => log = view,
            Chain::Node(node) => {
                nodes.insert(node.to_string(), view);
            }
        }
        total += report.events;
        error = error.or_else(|| report.error.clone());
    }
    for (chain, seq) in tips {
        let held = reports.iter().find(|r| r.chain == chain).map_or(0, |r| r.last.seq);
        if error.is_none() && held < seq {
            error = Some(format!("{chain}: the audit log holds events up to {held}, the replicated state up to {seq}"));
        }
    }
    Ok(match error {
        None => json!({ "ok": true, "events": total, "nodes": nodes, "log": log }),
        Some(e) => json!({ "ok": false, "error": e, "nodes": nodes, "log": log }),
    })
}
