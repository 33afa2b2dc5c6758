//! A write's audit event rides inside the write's own Raft entry (§1.4, §9.3): one event in the
//! replicated log per request, numbered by `apply` in the log chain, and no spool write for it.

use serde_json::{json, Value};

use crate::harness::Cluster;

/// The events under `path` whose request id is `id`, as the leader's replicated log holds them.
async fn events_of(client: &citadel_client::Client, path: &str, id: &str) -> Vec<Value> {
    let events = client.get(&format!("sys/audit/events?path={path}&limit=1000")).await.unwrap();
    events["data"]["events"].as_array().unwrap().iter().filter(|e| e["request_id"] == json!(id)).cloned().collect()
}

/// The node's audit spool as text (events are JSON lines whose bodies are JSON strings).
fn spool_of(cluster: &Cluster, i: usize) -> String {
    std::fs::read_to_string(cluster.layout.data_dir(i).join("audit/audit.spool")).unwrap_or_default()
}

#[tokio::test]
async fn a_kv_write_on_a_follower_or_the_leader_has_one_event_in_its_entry_and_none_in_any_spool() {
    let cluster = Cluster::start_nodes(3, 29200, true, "").await;
    let leader = cluster.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let mut written = Vec::new();
    for (i, name) in [(follower, "on-follower"), (leader, "on-leader")] {
        let path = format!("secret/data/audited/{name}");
        let body = json!({ "data": { "pw": "s3cret-value" } });
        let reply = cluster.root_at(i).raw("POST", &path, Some(&body), &[]).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        let id = reply.headers["x-citadel-request-id"].to_str().unwrap().to_string();
        written.push((i, path, id));
    }
    // Refused in apply: a check-and-set that names the wrong version, accepted by the follower.
    let stale = json!({ "options": { "cas": 7 }, "data": { "pw": "other" } });
    let refused = cluster.root_at(follower).raw("POST", "secret/data/audited/on-follower", Some(&stale), &[]).await;
    let refused = refused.unwrap();
    assert_eq!(refused.status, 400, "{}", refused.body);

    let auditor = cluster.root_at(leader);
    for (i, path, id) in &written {
        let events = events_of(&auditor, path, id).await;
        assert_eq!(events.len(), 1, "exactly one event for request {id}: {events:?}");
        let event = &events[0];
        assert_eq!(event["chain"], json!("log"), "carried in the write's entry: {event}");
        assert_eq!(event["node"], json!(cluster.layout.node_id(*i)), "the accepting node: {event}");
        assert_eq!(
            (&event["operation"], &event["status"], &event["error"]),
            (&json!("update"), &json!(200), &json!(""))
        );
        assert!(!event.to_string().contains("s3cret-value"), "no secret value in an event: {event}");
    }
    let on_follower = auditor.get("sys/audit/events?path=secret/data/audited/on-follower&limit=1000").await.unwrap();
    let rejected: Vec<&Value> = on_follower["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["error"].as_str().is_some_and(|e| e.contains("check-and-set")))
        .collect();
    assert_eq!(rejected.len(), 1, "the refused write is audited once, with its error: {on_follower}");
    assert_eq!((&rejected[0]["chain"], &rejected[0]["status"]), (&json!("log"), &json!(400)));
    let refused_id = rejected[0]["request_id"].as_str().unwrap().to_string();

    // Reads still go through the spool: the leader's holds the queries above (so the file read
    // here is the right one, and the absences below mean something).
    assert!(spool_of(&cluster, leader).contains("sys/audit/events"), "the leader's spool holds its reads");
    for i in 0..3 {
        let spool = spool_of(&cluster, i);
        for id in written.iter().map(|(_, _, id)| id).chain([&refused_id]) {
            assert!(!spool.contains(id.as_str()), "node {i}'s spool holds an event of request {id}");
        }
    }
    let verify = auditor.get("sys/audit/verify").await.unwrap();
    assert_eq!(verify["data"]["ok"], json!(true), "{verify}");
    assert!(verify["data"]["log"]["events"].as_u64().unwrap() >= 3, "{verify}");
    let cli = std::process::Command::new(crate::harness::EXE)
        .args(["audit", "verify"])
        .env("CITADEL_ADDR", cluster.layout.api_url(follower))
        .env("CITADEL_TOKEN", &cluster.root)
        .env("CITADEL_CACERT", cluster.layout.ca_path())
        .output()
        .unwrap();
    assert!(cli.status.success(), "citadel audit verify: {}", String::from_utf8_lossy(&cli.stderr));
}
