//! Vault's own HA endpoints, shaped as Vault shapes them so its clients (the Go `api` package,
//! node-vault, hvac) decode them: `sys/leader` and `sys/ha-status`. Citadel's richer table is
//! `sys/ha/status` (§5.6); `sys/ha-status` is a view of it.

use std::sync::atomic::Ordering;

use citadel_core::time::rfc3339;
use serde_json::{json, Value};

use crate::node::Node;

/// What Vault reports as `active_time` on a node that is not active (Go's zero `time.Time`).
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `GET sys/leader`. `active_time` is when this node last became leader (Vault reports the
/// active node's time; a standby reports the zero time, as Vault's standbys do).
pub fn leader_body(app: &Node) -> Value {
    let metrics = app.raft_metrics();
    let is_self = metrics.current_leader == Some(app.node_id());
    let leader = metrics.current_leader.and_then(|id| metrics.membership_config.membership().get_node(&id).cloned());
    let since = app.active_since.load(Ordering::Relaxed);
    let active_time = if is_self && since > 0 { rfc3339(since) } else { ZERO_TIME.to_string() };
    json!({
        "ha_enabled": true,
        "is_self": is_self,
        "active_time": active_time,
        "leader_address": leader.as_ref().map(|n| n.api_addr.clone()).unwrap_or_default(),
        "leader_cluster_address": leader.as_ref().map(|n| format!("https://{}", n.cluster_addr)).unwrap_or_default(),
        "performance_standby": false,
        "performance_standby_last_remote_wal": 0,
        "last_wal": 0,
        "raft_committed_index": metrics.local_committed.as_ref().map_or(0, |l| l.index),
        "raft_applied_index": metrics.last_applied.as_ref().map_or(0, |l| l.index),
    })
}

/// `GET sys/ha-status`: Vault's `{"nodes": [...]}`, one row per member, built from Citadel's HA
/// table (so a follower answers with the leader's view, as Vault's standbys forward it). Vault's
/// Go client decodes the top-level `Nodes`; `data.nodes` carries the same for clients that
/// read the logical response.
pub async fn ha_status(app: &Node) -> Value {
    let table = crate::ha::status(app).await;
    let now = crate::ids::now_ms();
    let nodes: Vec<Value> = table
        .get("nodes")
        .and_then(Value::as_array)
        .map(|rows| rows.iter().map(|row| vault_node(row, now)).collect())
        .unwrap_or_default();
    let mut body = super::envelope(json!({ "nodes": nodes }), Value::Null);
    body.as_object_mut().expect("envelope is an object").insert("nodes".into(), json!(nodes));
    body
}

/// One row of Vault's table from one row of Citadel's. `last_echo` is when the active node last
/// heard from the node (null for the active node itself, and for a node never heard from).
fn vault_node(row: &Value, now: u64) -> Value {
    let text = |key: &str| row.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let active = row.get("role").and_then(Value::as_str) == Some("leader");
    let contact = row.get("last_contact_ms").and_then(Value::as_u64);
    let last_echo = match contact {
        Some(ms) if !active => json!(rfc3339(now.saturating_sub(ms))),
        _ => Value::Null,
    };
    let hostname = if text("name").is_empty() { format!("node-{}", row["id"]) } else { text("name") };
    json!({
        "hostname": hostname,
        "api_address": text("api_addr"),
        "cluster_address": format!("https://{}", text("cluster_addr")),
        "active_node": active,
        "last_echo": last_echo,
        "echo_duration_ms": 0,
        "clock_skew_ms": 0,
        "replication_primary_canary_age_ms": 0,
        "version": text("version"),
        "redundancy_zone": text("site"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vault_row_names_the_active_node_and_dates_the_others_last_echo() {
        let leader = json!({"id": 1, "name": "n1", "api_addr": "https://a:1", "cluster_addr": "a:2",
            "role": "leader", "last_contact_ms": 0, "version": "0.1.0", "site": "x"});
        let follower = json!({"id": 2, "name": "", "api_addr": "https://b:1", "cluster_addr": "b:2",
            "role": "follower", "last_contact_ms": 1000, "version": "0.1.0", "site": ""});
        let row = vault_node(&leader, 10_000);
        assert_eq!(row["active_node"], true);
        assert_eq!(row["last_echo"], Value::Null);
        assert_eq!(row["cluster_address"], "https://a:2");
        let row = vault_node(&follower, 10_000);
        assert_eq!(row["active_node"], false);
        assert_eq!(row["hostname"], "node-2");
        assert_eq!(row["last_echo"], "1970-01-01T00:00:09.000Z");
    }
}
