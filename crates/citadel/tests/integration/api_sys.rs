use serde_json::json;

use crate::harness::Node1;

#[tokio::test]
async fn health_uses_vault_codes_through_init_and_shamir_unseal() {
    let node = Node1::spawn_uninitialized(21000, false, "").await;
    let c = node.anonymous();
    assert_eq!(c.health().await.unwrap().status, 501, "uninitialized");
    let custom = c.raw("GET", "sys/health?uninitcode=299", None, &[]).await.unwrap();
    assert_eq!(custom.status, 299);
    assert_eq!(c.get("sys/init").await.unwrap()["initialized"], json!(false));

    let (keys, root) = c.init(5, 3).await.unwrap();
    assert_eq!(keys.len(), 5);
    assert!(root.starts_with("hvs."));
    let h = c.health().await.unwrap();
    assert_eq!(h.status, 503, "initialized but sealed");
    assert_eq!(h.body["sealed"], json!(true));
    assert_eq!(c.raw("GET", "sys/health?sealedcode=200", None, &[]).await.unwrap().status, 200);
    for outside_http in ["sealedcode=673", "sealedcode=99", "sealedcode=1000000"] {
        let refused = c.raw("GET", &format!("sys/health?{outside_http}"), None, &[]).await.unwrap();
        assert_eq!(refused.status, 400, "{outside_http} is not an HTTP status code");
    }

    // A request needing the barrier is refused while sealed.
    let kv = c.clone().with_token(root.clone()).raw("GET", "secret/data/x", None, &[]).await.unwrap();
    assert_eq!(kv.status, 503);

    let s = c.unseal(&keys[0]).await.unwrap();
    assert_eq!((s["sealed"].clone(), s["progress"].clone(), s["t"].clone()), (json!(true), json!(1), json!(3)));
    c.unseal(&keys[3]).await.unwrap();
    let s = c.unseal(&keys[4]).await.unwrap();
    assert_eq!(s["sealed"], json!(false));

    let h = c.health().await.unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.body["ha_mode"], json!("leader"));
    assert!(h.body["commit_index"].as_u64().unwrap() > 0);
    let head = c.raw("HEAD", "sys/health", None, &[]).await.unwrap();
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn unseal_with_inconsistent_shares_fails_and_resets_progress() {
    let node = Node1::spawn_uninitialized(21010, false, "").await;
    let c = node.anonymous();
    let (keys, _) = c.init(3, 2).await.unwrap();
    let other = Node1::spawn_uninitialized(21020, false, "").await;
    let (foreign, _) = other.anonymous().init(3, 2).await.unwrap();

    c.unseal(&keys[0]).await.unwrap();
    let err = c.unseal(&foreign[1]).await.unwrap_err();
    assert_eq!(err.status().unwrap(), 400);
    let s = c.seal_status().await.unwrap();
    assert_eq!((s["sealed"].clone(), s["progress"].clone()), (json!(true), json!(0)));

    let bad = c.unseal("not-a-key").await.unwrap_err();
    assert_eq!(bad.status().unwrap(), 400);
    c.unseal(&keys[2]).await.unwrap();
    assert_eq!(c.unseal(&keys[1]).await.unwrap()["sealed"], json!(false));
}

#[tokio::test]
async fn init_rejects_bad_parameters_and_a_second_init() {
    let node = Node1::spawn_uninitialized(21030, false, "").await;
    let c = node.anonymous();
    for (shares, threshold) in [(0, 0), (3, 1), (3, 4), (256, 3)] {
        let err =
            c.post("sys/init", &json!({ "secret_shares": shares, "secret_threshold": threshold })).await.unwrap_err();
        assert_eq!(err.status().unwrap(), 400, "{shares}/{threshold}");
    }
    assert_eq!(c.get("sys/init").await.unwrap()["initialized"], json!(false), "bad input changed nothing");
    c.init(1, 1).await.unwrap();
    let again = c.init(1, 1).await.unwrap_err();
    assert_eq!(again.status().unwrap(), 400);
    assert!(again.to_string().contains("already initialized"));
}

#[tokio::test]
async fn seal_refuses_requests_until_unsealed_with_the_key() {
    let node = Node1::start(21040).await;
    let root = node.root();
    root.kv_put("secret", "a", &json!({ "v": "1" }), None).await.unwrap();
    root.request("PUT", "sys/seal", None).await.unwrap();
    assert_eq!(root.raw("GET", "secret/data/a", None, &[]).await.unwrap().status, 503);
    assert_eq!(node.anonymous().health().await.unwrap().status, 503);
    node.anonymous().unseal(&node.unseal_key).await.unwrap();
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "1" }));
}

#[tokio::test]
async fn rotation_adds_a_term_and_values_from_older_terms_still_read() {
    let node = Node1::start(21050).await;
    let root = node.root();
    root.kv_put("secret", "old", &json!({ "v": "before" }), None).await.unwrap();
    assert_eq!(root.get("sys/key-status").await.unwrap()["data"]["term"], json!(1));
    root.request("PUT", "sys/rotate", None).await.unwrap();
    assert_eq!(root.get("sys/key-status").await.unwrap()["term"], json!(2));
    root.kv_put("secret", "new", &json!({ "v": "after" }), None).await.unwrap();
    assert_eq!(root.kv_get("secret", "old", None).await.unwrap(), json!({ "v": "before" }));
    assert_eq!(root.kv_get("secret", "new", None).await.unwrap(), json!({ "v": "after" }));
}

#[tokio::test]
async fn kv_v2_mounts_can_be_enabled_listed_and_disabled() {
    let node = Node1::start(21060).await;
    let root = node.root();
    root.post("sys/mounts/team", &json!({ "type": "kv", "options": { "version": "2" } })).await.unwrap();
    root.post("sys/mounts/ops", &json!({ "type": "kv-v2" })).await.unwrap();
    let mounts = root.get("sys/mounts").await.unwrap();
    assert_eq!(mounts["team/"]["type"], json!("kv"));
    assert_eq!(mounts["data"]["ops/"]["options"]["version"], json!("2"));
    root.kv_put("team", "x", &json!({ "a": "b" }), None).await.unwrap();
    assert_eq!(root.kv_get("team", "x", None).await.unwrap(), json!({ "a": "b" }));

    let v1 = root.post("sys/mounts/legacy", &json!({ "type": "kv", "options": { "version": "1" } })).await.unwrap_err();
    assert_eq!(v1.status().unwrap(), 400);
    let clash = root.post("sys/mounts/secret", &json!({ "type": "kv-v2" })).await.unwrap_err();
    assert_eq!(clash.status().unwrap(), 400);
    let reserved = root.post("sys/mounts/sys", &json!({ "type": "kv-v2" })).await.unwrap_err();
    assert_eq!(reserved.status().unwrap(), 400);

    root.delete("sys/mounts/team").await.unwrap();
    assert_eq!(root.raw("GET", "team/data/x", None, &[]).await.unwrap().status, 404);
    let auths = root.get("sys/auth").await.unwrap();
    assert_eq!(auths["userpass/"]["type"], json!("userpass"));
}

#[tokio::test]
async fn api_edges_answer_with_vault_status_codes_and_never_5xx_on_bad_input() {
    let node = Node1::start(21070).await;
    let root = node.root();
    let big = json!({ "data": { "blob": "x".repeat(1_100_000) } });
    let r = root.raw("POST", "secret/data/big", Some(&big), &[]).await.unwrap();
    assert_eq!(r.status, 413);
    assert!(r.body["errors"][0].as_str().unwrap().contains("1 MiB"));

    let http = reqwest_raw(&node);
    let malformed = http
        .0
        .post(format!("{}/v1/secret/data/x", http.1))
        .header("X-Vault-Token", &node.root)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: serde_json::Value = malformed.json().await.unwrap();
    assert!(body["errors"][0].as_str().unwrap().contains("invalid request body"));

    let not_object = root.raw("POST", "secret/data/x", Some(&json!({ "data": "str" })), &[]).await.unwrap();
    assert_eq!(not_object.status, 400);
    assert_eq!(root.raw("POST", "sys/leader", None, &[]).await.unwrap().status, 405);
    assert_eq!(root.raw("GET", "nomount/data/x", None, &[]).await.unwrap().status, 404);
    assert_eq!(root.raw("BREW", "secret/data/x", None, &[]).await.unwrap().status, 405);
    assert_eq!(root.raw("GET", "secret/data/x?version=abc", None, &[]).await.unwrap().status, 400);
    let bogus_query = root.raw("GET", "sys/audit/events?limit=0", None, &[]).await.unwrap();
    assert_eq!(bogus_query.status, 400);

    let openapi = root.get("sys/openapi").await.unwrap();
    assert_eq!(openapi["openapi"], json!("3.0.2"));
    assert!(openapi["paths"]["/sys/health"].is_object());
    let metrics = root.raw("GET", "sys/metrics?format=prometheus", None, &[]).await.unwrap();
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str().unwrap().to_string();
    assert!(text.contains("citadel_raft_is_leader 1") && text.contains("citadel_http_requests_total"), "{text}");
    let leader = root.get("sys/leader").await.unwrap();
    assert_eq!(leader["is_self"], json!(true));
    let config = root.get("sys/storage/raft/configuration").await.unwrap();
    assert_eq!(config["data"]["config"]["servers"][0]["voter"], json!(true));
    assert!(node.is_running(0), "the node survived every request");
    assert_eq!(node.anonymous().health().await.unwrap().status, 200);
}

/// A plain HTTPS client for requests the typed client will not send (malformed bodies).
fn reqwest_raw(node: &Node1) -> (reqwest::Client, String) {
    citadel_server::tls::install_crypto_provider();
    let ca = std::fs::read(node.layout.ca_path()).unwrap();
    let cert = reqwest::Certificate::from_pem(&ca).unwrap();
    let client = reqwest::Client::builder().tls_built_in_root_certs(false).add_root_certificate(cert).build().unwrap();
    (client, node.layout.api_url(0))
}

#[tokio::test]
async fn snapshots_save_and_restore_state_but_keep_the_audit_log() {
    let node = Node1::start(21080).await;
    let root = node.root();
    root.kv_put("secret", "a", &json!({ "v": "before" }), None).await.unwrap();
    let snapshot = root.bytes("GET", "sys/storage/raft/snapshot", None).await.unwrap();
    let canary = b"before";
    assert!(!snapshot.windows(canary.len()).any(|w| w == canary), "snapshots hold ciphertext only");
    root.kv_put("secret", "a", &json!({ "v": "after" }), None).await.unwrap();
    root.kv_put("secret", "b", &json!({ "v": "new" }), None).await.unwrap();
    // The write's audit event is shipped to the replicated log in the background: the restore
    // must keep it once it is there.
    citadel::dev::wait_for(
        "the audit event of the write to b to be replicated",
        std::time::Duration::from_secs(30),
        || async {
            let events = root.get("sys/audit/events?path=secret/data/b&limit=10").await.ok()?;
            events["data"]["events"].as_array().is_some_and(|e| !e.is_empty()).then_some(())
        },
    )
    .await
    .unwrap();

    root.bytes("POST", "sys/storage/raft/snapshot", Some(snapshot.clone())).await.unwrap();
    assert_eq!(root.kv_get("secret", "a", None).await.unwrap(), json!({ "v": "before" }));
    assert_eq!(root.raw("GET", "secret/data/b", None, &[]).await.unwrap().status, 404);
    let events = root.get("sys/audit/events?path=secret/data/b&limit=10").await.unwrap();
    assert!(!events["data"]["events"].as_array().unwrap().is_empty(), "audit events after the snapshot survive");
    assert_eq!(root.get("sys/audit/verify").await.unwrap()["data"]["ok"], json!(true));

    let mut damaged = snapshot.clone();
    let last = damaged.len() - 2;
    damaged[last] ^= 1;
    let err = root.bytes("POST", "sys/storage/raft/snapshot", Some(damaged)).await.unwrap_err();
    assert_eq!(err.status().unwrap(), 400);
    assert!(err.to_string().contains("damaged"), "{err}");
    let junk = root.bytes("POST", "sys/storage/raft/snapshot", Some(b"junk".to_vec())).await.unwrap_err();
    assert_eq!(junk.status().unwrap(), 400);

    let other = Node1::start(21090).await;
    let foreign = other.root().bytes("GET", "sys/storage/raft/snapshot", None).await.unwrap();
    let refused = root.bytes("POST", "sys/storage/raft/snapshot", Some(foreign)).await.unwrap_err();
    assert!(refused.to_string().contains("snapshot-force"), "{refused}");
    assert_eq!(
        root.kv_get("secret", "a", None).await.unwrap(),
        json!({ "v": "before" }),
        "a refused restore changes nothing"
    );
}

/// Operator snapshots are built one at a time into an unnamed temporary file and streamed from
/// it: concurrent downloads each get a whole archive with its length, and nothing is left in
/// the data directory.
#[tokio::test]
async fn concurrent_snapshot_downloads_each_stream_a_whole_archive_and_leave_no_file_behind() {
    let node = Node1::start(21097).await;
    let root = node.root();
    for i in 0..20 {
        root.kv_put("secret", &format!("s{i}"), &json!({ "v": "x".repeat(1000) }), None).await.unwrap();
    }
    let files = |dir: &std::path::Path| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    // One download first, so that the files a first snapshot creates are there before counting.
    root.bytes("GET", "sys/storage/raft/snapshot", None).await.unwrap();
    let before = files(&node.layout.data_dir(0));
    let (http, url) = reqwest_raw(&node);
    let downloads = (0..3).map(|_| {
        let request = http.get(format!("{url}/v1/sys/storage/raft/snapshot")).header("X-Vault-Token", &node.root);
        async move {
            let reply = request.send().await.unwrap();
            assert_eq!(reply.status(), 200);
            let length = reply.content_length().expect("a snapshot download says its length");
            let body = reply.bytes().await.unwrap();
            assert_eq!(body.len() as u64, length);
            body
        }
    });
    for archive in futures::future::join_all(downloads).await {
        let verified = citadel_server::snapshot::parse_any(&archive);
        assert!(verified.is_ok(), "each download is a whole archive: {:?}", verified.err());
    }
    assert_eq!(files(&node.layout.data_dir(0)), before, "no temporary file is left in the data directory");
    assert!(node.is_running(0));
}

/// A snapshot file is data: a crafted one with valid checksums must not be able to crash a node.
#[tokio::test]
async fn a_crafted_snapshot_with_odd_contents_cannot_crash_the_node() {
    use sha2::Digest;
    let node = Node1::start(21095).await;
    let root = node.root();
    let file = root.bytes("GET", "sys/storage/raft/snapshot", None).await.unwrap();
    let (mut header, mut stored) = citadel_server::api::snapshot_file(&file).unwrap();
    for mount in stored.state.mounts.values_mut() {
        mount.uuid.clear();
    }
    let body = citadel_storage::codec::encode(&stored);
    header.sha256 = hex_lower(&sha2::Sha256::digest(&body));
    header.size = body.len();
    let mut crafted = serde_json::to_vec(&header).unwrap();
    crafted.push(b'\n');
    crafted.extend_from_slice(&body);
    // Checksums recomputed: only the HMAC tells, so only snapshot-force takes the file.
    root.bytes("POST", "sys/storage/raft/snapshot-force", Some(crafted)).await.unwrap();
    let mounts = root.get("sys/mounts").await.unwrap();
    assert_eq!(mounts["secret/"]["type"], json!("kv"));
    assert_eq!(node.anonymous().health().await.unwrap().status, 200, "the node still serves");
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
