use serde_json::{json, Value};

use crate::harness::{files_under, Node1};

#[tokio::test]
async fn no_plaintext_secret_reaches_the_data_directory_logs_or_audit_events() {
    let mut node = Node1::start_with(21400, true, "[raft]\nsnapshot_threshold = 10\n").await;
    let root = node.root();
    let canary = "PLAINTEXT-CANARY-7f3a9c";
    let password = "USERPASS-CANARY-b81d";
    for i in 0..15 {
        root.kv_put("secret", &format!("canary/{i}"), &json!({ "password": canary }), None).await.unwrap();
    }
    root.post("auth/userpass/users/eve", &json!({ "password": password })).await.unwrap();
    let mut eve = node.anonymous();
    let eve_token = eve.login_userpass("eve", password).await.unwrap();
    root.get("sys/audit/verify").await.unwrap();
    // Fifteen writes with a snapshot threshold of ten: a snapshot is on disk and inspected too.
    node.kill9();

    let needles = [canary, password, node.root.as_str(), eve_token.as_str()];
    let files = files_under(&node.layout.node_dir(0));
    assert!(files.iter().any(|f| f.ends_with("raft.redb")), "{files:?}");
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy();
        if name == "unseal.key" || name.ends_with(".pem") {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap();
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle:?} found in plaintext in {}",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn every_endpoint_except_the_unauthenticated_bootstrap_ones_refuses_without_a_valid_token() {
    let node = Node1::start(21410).await;
    let root = node.root();
    let openapi = root.get("sys/openapi").await.unwrap();
    // `sys/storage/raft/join` is for nodes outside any cluster (which hold no token); on a member
    // it refuses with 400 and does nothing.
    // `sys/storage/raft/bootstrap` takes a one-time join token instead of a client token.
    let open = [
        "/sys/health",
        "/sys/init",
        "/sys/seal-status",
        "/sys/unseal",
        "/sys/storage/raft/join",
        "/sys/storage/raft/bootstrap",
    ];
    let mut checked = 0;
    for (path, ops) in openapi["paths"].as_object().unwrap() {
        let concrete =
            path.replace("{mount}", "secret").replace("{path}", "x").replace("{name}", "p").replace("{username}", "u");
        // A path item holds its methods and the path's `parameters`.
        let methods = ops.as_object().unwrap().keys().filter(|k| *k != "parameters");
        for method in methods {
            let method = method.to_uppercase();
            for token in [None, Some("hvs.not-a-real-token")] {
                let client = match token {
                    Some(t) => node.anonymous().with_token(t),
                    None => node.anonymous(),
                };
                let r = client.raw(&method, concrete.trim_start_matches('/'), Some(&json!({})), &[]).await.unwrap();
                if open.contains(&path.as_str()) {
                    assert_ne!(r.status, 403, "{method} {path} must be open");
                } else if path.starts_with("/auth/userpass/login/") {
                    assert_eq!(r.status, 400, "{method} {path}: login without a password");
                } else {
                    assert_eq!(
                        r.status, 403,
                        "{method} {path} answered {} without a valid token: {:?}",
                        r.status, r.body
                    );
                    assert_eq!(r.body["errors"], json!(["permission denied"]));
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 60, "only {checked} requests checked");
    let health: Value = node.anonymous().health().await.unwrap().body;
    assert_eq!(health["sealed"], json!(false), "the node is still serving");
}

#[tokio::test]
async fn every_answer_names_its_request_and_exactly_one_audit_event_carries_that_name() {
    let node = Node1::start(21420).await;
    let root = node.root();
    let reply = root.raw("POST", "secret/data/ids", Some(&json!({ "data": { "v": "1" } })), &[]).await.unwrap();
    assert_eq!(reply.status, 200);
    let id = reply.headers["x-citadel-request-id"].to_str().unwrap().to_string();
    assert_eq!(reply.body["request_id"], json!(id), "the body's request_id is the header's");
    let read = root.raw("GET", "secret/data/ids", None, &[]).await.unwrap();
    assert_ne!(read.headers["x-citadel-request-id"].to_str().unwrap(), id, "each request has its own id");

    citadel::dev::wait_for("the write's audit event to be replicated", std::time::Duration::from_secs(30), || async {
        let events = root.get("sys/audit/events?path=secret/data/ids").await.ok()?;
        let events = events["data"]["events"].as_array()?.clone();
        let carrying: Vec<_> = events.iter().filter(|e| e["request_id"] == json!(id)).collect();
        (carrying.len() == 1).then(|| assert_eq!(carrying[0]["operation"], json!("update")))
    })
    .await
    .unwrap();
}
