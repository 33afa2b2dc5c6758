use serde_json::json;

use crate::harness::Node1;

const POLICY: &str = r#"
path "secret/data/app/*" { capabilities = ["create", "read", "update"] }
path "secret/data/app/locked" { capabilities = ["deny"] }
path "secret/data/+/shared" { capabilities = ["read"] }
path "secret/metadata/app/*" { capabilities = ["list"] }
"#;

#[tokio::test]
async fn policies_grant_by_glob_and_plus_and_deny_wins() {
    let node = Node1::start(21200).await;
    let root = node.root();
    root.post("sys/policies/acl/app", &json!({ "policy": POLICY })).await.unwrap();
    let bad = root
        .post("sys/policies/acl/broken", &json!({ "policy": "path \"x\" { capabilities = [\"fly\"] }" }))
        .await
        .unwrap_err();
    assert_eq!(bad.status().unwrap(), 400);
    assert!(bad.to_string().contains("fly"));
    assert_eq!(
        root.raw("GET", "sys/policies/acl/broken", None, &[]).await.unwrap().status,
        404,
        "bad input changed nothing"
    );
    root.post(
        "sys/policies/acl/jsonpol",
        &json!({ "policy": r#"{"path":{"secret/data/json":{"capabilities":["read"]}}}"# }),
    )
    .await
    .unwrap();
    let listed = root.list("sys/policies/acl").await.unwrap();
    for p in ["app", "default", "jsonpol", "root"] {
        assert!(listed.contains(&p.to_string()), "{listed:?}");
    }
    assert_eq!(root.get("sys/policies/acl/app").await.unwrap()["data"]["policy"], json!(POLICY));

    root.post("auth/userpass/users/bob", &json!({ "password": "bob-password-1", "token_policies": "app" }))
        .await
        .unwrap();
    root.kv_put("secret", "team/shared", &json!({ "s": "1" }), None).await.unwrap();
    root.kv_put("secret", "app/locked", &json!({ "s": "1" }), None).await.unwrap();
    let mut bob = node.anonymous();
    bob.login_userpass("bob", "bob-password-1").await.unwrap();

    assert_eq!(bob.kv_put("secret", "app/db", &json!({ "pw": "x" }), None).await.unwrap(), 1);
    assert_eq!(bob.kv_get("secret", "app/db", None).await.unwrap(), json!({ "pw": "x" }));
    assert_eq!(bob.kv_get("secret", "team/shared", None).await.unwrap(), json!({ "s": "1" }));
    assert_eq!(bob.list("secret/metadata/app").await.unwrap(), vec!["db", "locked"]);
    for (method, path) in [
        ("GET", "secret/data/app/locked"),
        ("GET", "secret/data/other"),
        ("DELETE", "secret/data/app/db"),
        ("GET", "sys/policies/acl/app"),
        ("POST", "sys/mounts/x"),
    ] {
        let r = bob.raw(method, path, Some(&json!({ "type": "kv-v2" })), &[]).await.unwrap();
        assert_eq!(r.status, 403, "{method} {path}");
    }
    root.delete("sys/policies/acl/app").await.unwrap();
    assert_eq!(
        bob.raw("GET", "secret/data/app/db", None, &[]).await.unwrap().status,
        403,
        "policy removal takes effect"
    );
    assert_eq!(root.raw("DELETE", "sys/policies/acl/default", None, &[]).await.unwrap().status, 400);
}

#[tokio::test]
async fn tokens_create_lookup_renew_and_revoke_with_their_children() {
    let node = Node1::start(21210).await;
    let root = node.root();
    root.post("sys/policies/acl/reader", &json!({ "policy": "path \"secret/data/*\" { capabilities = [\"read\"] }" }))
        .await
        .unwrap();
    let parent = root.post("auth/token/create", &json!({ "policies": ["reader"], "ttl": "1h" })).await.unwrap();
    let parent_token = parent["auth"]["client_token"].as_str().unwrap().to_string();
    assert_eq!(parent["auth"]["lease_duration"], json!(3600));
    let p = node.anonymous().with_token(parent_token.clone());
    let me = p.get("auth/token/lookup-self").await.unwrap();
    assert_eq!(me["data"]["policies"], json!(["reader", "default"]));
    assert!(me["data"]["ttl"].as_u64().unwrap() <= 3600);

    let escalate = p.post("auth/token/create", &json!({ "policies": ["root"] })).await.unwrap_err();
    assert_eq!(escalate.status().unwrap(), 403, "a child cannot hold more than its parent");
    root.post("sys/policies/acl/reader", &json!({ "policy": "path \"secret/data/*\" { capabilities = [\"read\"] }\npath \"auth/token/create\" { capabilities = [\"update\"] }" })).await.unwrap();
    let child = p.post("auth/token/create", &json!({ "ttl": "10h" })).await.unwrap();
    let child_token = child["auth"]["client_token"].as_str().unwrap().to_string();
    assert!(child["auth"]["lease_duration"].as_u64().unwrap() <= 3600, "a child never outlives its parent");

    let renewed = p.post("auth/token/renew-self", &json!({ "increment": "2h" })).await.unwrap();
    assert_eq!(renewed["auth"]["lease_duration"], json!(7200));
    let looked = root.post("auth/token/lookup", &json!({ "token": child_token })).await.unwrap();
    assert_eq!(looked["data"]["policies"], json!(["reader", "default"]));

    p.post("auth/token/revoke-self", &json!({})).await.unwrap();
    let c = node.anonymous().with_token(child_token);
    assert_eq!(
        c.raw("GET", "auth/token/lookup-self", None, &[]).await.unwrap().status,
        403,
        "children die with the parent"
    );
    assert_eq!(p.raw("GET", "auth/token/lookup-self", None, &[]).await.unwrap().status, 403);
}

#[tokio::test]
async fn bearer_header_authenticates_like_x_vault_token() {
    let node = Node1::start(21220).await;
    let r = node
        .anonymous()
        .raw("GET", "auth/token/lookup-self", None, &[("Authorization", &format!("Bearer {}", node.root))])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["policies"], json!(["root"]));
    let bogus = node
        .anonymous()
        .raw("GET", "auth/token/lookup-self", None, &[("Authorization", "Bearer hvs.nope")])
        .await
        .unwrap();
    assert_eq!(bogus.status, 403);
}

#[tokio::test]
async fn userpass_users_log_in_and_repeated_failures_are_rate_limited() {
    let node = Node1::start(21230).await;
    let root = node.root();
    let short = root.post("auth/userpass/users/carol", &json!({ "password": "short" })).await.unwrap_err();
    assert_eq!(short.status().unwrap(), 400);
    root.post(
        "auth/userpass/users/carol",
        &json!({ "password": "carol-password", "policies": ["default"], "token_ttl": "30m" }),
    )
    .await
    .unwrap();
    assert_eq!(root.get("auth/userpass/users/carol").await.unwrap()["data"]["token_ttl"], json!(1800));
    assert_eq!(root.list("auth/userpass/users").await.unwrap(), vec!["carol"]);

    let mut carol = node.anonymous();
    let ok = carol.post("auth/userpass/login/carol", &json!({ "password": "carol-password" })).await.unwrap();
    assert_eq!(ok["auth"]["lease_duration"], json!(1800));
    assert_eq!(ok["auth"]["metadata"]["username"], json!("carol"));
    let unknown = carol.post("auth/userpass/login/nobody", &json!({ "password": "whatever1" })).await.unwrap_err();
    let wrong = carol.post("auth/userpass/login/carol", &json!({ "password": "wrong-pass" })).await.unwrap_err();
    assert_eq!(
        (unknown.status().unwrap(), wrong.status().unwrap()),
        (400.try_into().unwrap(), 400.try_into().unwrap())
    );
    assert_eq!(unknown.to_string(), wrong.to_string(), "unknown users look like wrong passwords");
    for _ in 0..4 {
        let _ = carol.post("auth/userpass/login/carol", &json!({ "password": "wrong-pass" })).await;
    }
    let limited = carol.post("auth/userpass/login/carol", &json!({ "password": "carol-password" })).await.unwrap_err();
    assert_eq!(limited.status().unwrap(), 429);

    root.post("auth/userpass/users/carol/password", &json!({ "password": "new-password-2" })).await.unwrap();
    root.post("auth/userpass/users/dave", &json!({ "password": "dave-password" })).await.unwrap();
    carol.login_userpass("dave", "dave-password").await.unwrap();
    root.delete("auth/userpass/users/dave").await.unwrap();
    assert_eq!(
        node.anonymous()
            .post("auth/userpass/login/dave", &json!({ "password": "dave-password" }))
            .await
            .unwrap_err()
            .status()
            .unwrap(),
        400
    );
}

#[tokio::test]
async fn every_request_and_failure_is_audited_hash_chained_and_verifiable() {
    // Refusals without a valid token arrive as per-interval summaries (§8.3): keep it short.
    let node = Node1::start_with(21240, true, "[audit]\nrefusal_summary_interval_ms = 200\n").await;
    let root = node.root();
    root.kv_put("secret", "audited", &json!({ "pw": "AUDIT-CANARY-VALUE" }), None).await.unwrap();
    let _ = node.anonymous().with_token("hvs.bogus").raw("GET", "secret/data/audited", None, &[]).await.unwrap();
    let _ = node.anonymous().post("auth/userpass/login/ghost", &json!({ "password": "nope-nope" })).await;

    let mut events = serde_json::Value::Null;
    for _ in 0..100 {
        events = root.get("sys/audit/events?limit=1000").await.unwrap()["data"]["events"].clone();
        let paths: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["path"].as_str()).collect();
        if paths.contains(&"auth/userpass/login/ghost") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let events = events.as_array().unwrap().clone();
    let find =
        |path: &str, status: u64| events.iter().any(|e| e["path"] == json!(path) && e["status"] == json!(status));
    assert!(find("secret/data/audited", 200), "write audited");
    assert!(find("secret/data/audited", 403), "refused request audited");
    assert!(find("auth/userpass/login/ghost", 400), "failed login audited");
    assert!(events.iter().any(|e| e["kind"] == json!("seal") && e["operation"] == json!("init")));
    let text = serde_json::to_string(&events).unwrap();
    assert!(!text.contains("AUDIT-CANARY-VALUE"), "no secret value in audit events");
    assert!(!text.contains(&node.root), "no token in audit events");
    assert!(text.contains("hmac-sha256:"), "tokens appear as HMACs");

    let filtered = root.get("sys/audit/events?path=auth/userpass&limit=10").await.unwrap();
    assert!(filtered["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["path"].as_str().unwrap().starts_with("auth/userpass")));
    let verify = root.get("sys/audit/verify").await.unwrap();
    assert_eq!(verify["data"]["ok"], json!(true), "{verify}");
    assert!(verify["data"]["events"].as_u64().unwrap() >= 3);
}
