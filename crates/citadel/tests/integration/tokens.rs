//! Vault's token semantics (§8.2) and token checks on every node (§8.1). Ports 26000-26490.

use citadel::dev;
use citadel_client::Client;
use serde_json::{json, Value};

use crate::harness::{Cluster, Node1, STARTUP};

fn token_of(reply: &Value) -> String {
    reply["auth"]["client_token"].as_str().expect("a client token").to_string()
}

async fn status(client: &Client, method: &str, path: &str, body: Option<&Value>) -> u16 {
    client.raw(method, path, body, &[]).await.expect("an answer").status.as_u16()
}

/// The answer once the cluster has a leader: a 503 during an election (the machine is shared with
/// the build, so elections happen) is asked again.
async fn settled_status(client: &Client, method: &str, path: &str, body: Option<&Value>) -> u16 {
    dev::wait_for("an answer from a cluster with a leader", STARTUP, || async {
        Some(status(client, method, path, body).await).filter(|s| *s != 503)
    })
    .await
    .expect("the cluster has a leader")
}

/// Revokes the client's token. After a 503 the first attempt may have committed: the retry then
/// meets the revocation at the token check (403) or, if the check ran before the revocation was
/// applied, at `apply` (400, "the request's token was revoked or has expired"); either counts.
async fn revoke_self(client: &Client, trial: usize) {
    let deadline = std::time::Instant::now() + STARTUP;
    let mut retried = false;
    while std::time::Instant::now() < deadline {
        match status(client, "POST", "auth/token/revoke-self", None).await {
            204 => return,
            403 | 400 if retried => return,
            503 => retried = true,
            other => panic!("trial {trial}: revoke-self answered {other}"),
        }
    }
    panic!("trial {trial}: the cluster had no leader for {STARTUP:?}");
}

async fn ttl_of(client: &Client) -> u64 {
    client.get("auth/token/lookup-self").await.unwrap()["data"]["ttl"].as_u64().unwrap()
}

#[tokio::test]
async fn a_revoked_token_is_refused_on_every_node_immediately_after_the_revoke_returns() {
    let cluster = Cluster::start_nodes(3, 26000, true, "").await;
    let leader = cluster.leader().await;
    let root = cluster.root_at(leader);
    root.post(
        "sys/policies/acl/rw",
        &json!({ "policy": "path \"secret/data/*\" { capabilities = [\"create\", \"read\", \"update\"] }" }),
    )
    .await
    .unwrap();
    root.kv_put("secret", "revoked", &json!({ "v": "secret-value" }), None).await.unwrap();
    let mut accepted = Vec::new();
    for trial in 0..100 {
        let created = dev::wait_for("a token", STARTUP, || async {
            root.post("auth/token/create", &json!({ "policies": ["rw"] })).await.ok()
        })
        .await
        .unwrap();
        let token = token_of(&created);
        let revoker = cluster.anonymous_at(trial % 3).with_token(token.clone());
        revoke_self(&revoker, trial).await;
        for node in 0..3 {
            let client = cluster.anonymous_at(node).with_token(token.clone());
            let read = settled_status(&client, "GET", "secret/data/revoked", None).await;
            let write =
                settled_status(&client, "POST", "secret/data/revoked-write", Some(&json!({ "data": { "t": trial } })))
                    .await;
            if read != 403 || write != 403 {
                accepted.push(format!("trial {trial} node {node}: read {read}, write {write}"));
            }
        }
    }
    assert!(accepted.is_empty(), "a revoked token was accepted: {accepted:?}");
    let written = root.raw("GET", "secret/data/revoked-write", None, &[]).await.unwrap();
    assert_eq!(written.status, 404, "no write with a revoked token was committed");
}

#[tokio::test]
async fn token_limits_hold_explicit_max_ttl_period_num_uses_and_the_system_max_ttl() {
    let node = Node1::start_with(26100, true, "[auth]\nmax_ttl = \"2h\"\n").await;
    let root = node.root();

    // explicit_max_ttl caps the TTL and every renewal.
    let capped =
        token_of(&root.post("auth/token/create", &json!({ "ttl": "1h", "explicit_max_ttl": "10s" })).await.unwrap());
    let capped = node.anonymous().with_token(capped);
    assert!(ttl_of(&capped).await <= 10);
    let renewed = capped.post("auth/token/renew-self", &json!({ "increment": "1h" })).await.unwrap();
    assert!(renewed["auth"]["lease_duration"].as_u64().unwrap() <= 10, "{renewed}");
    assert!(ttl_of(&capped).await <= 10);
    assert_eq!(capped.get("auth/token/lookup-self").await.unwrap()["data"]["explicit_max_ttl"], json!(10));

    // The system max TTL caps a token that asks for more.
    let long = token_of(&root.post("auth/token/create", &json!({ "ttl": "10000h" })).await.unwrap());
    let long = node.anonymous().with_token(long);
    assert!(ttl_of(&long).await <= 7200);
    long.post("auth/token/renew-self", &json!({ "increment": "1000h" })).await.unwrap();
    assert!(ttl_of(&long).await <= 7200, "a renewal never passes the system max TTL");

    // Durations that overflow are a 400, never a wrap-around.
    for increment in [json!(u64::MAX), json!("99999999999999999999h"), json!(i64::MAX)] {
        let r = long.raw("POST", "auth/token/renew-self", Some(&json!({ "increment": increment })), &[]).await.unwrap();
        assert_eq!(r.status, 400, "increment {increment}: {}", r.body);
    }
    assert!(ttl_of(&long).await <= 7200);

    // A periodic token renews to its period, past the system max TTL but not past explicit_max_ttl.
    let periodic = token_of(&root.post("auth/token/create", &json!({ "period": "60s" })).await.unwrap());
    let periodic = node.anonymous().with_token(periodic);
    periodic.post("auth/token/renew-self", &json!({ "increment": "1h" })).await.unwrap();
    let ttl = ttl_of(&periodic).await;
    assert!((50..=60).contains(&ttl), "ttl {ttl}");

    // num_uses: each request spends one; then the token is refused.
    let limited = token_of(&root.post("auth/token/create", &json!({ "num_uses": 2 })).await.unwrap());
    let limited = node.anonymous().with_token(limited);
    assert_eq!(status(&limited, "GET", "auth/token/lookup-self", None).await, 200);
    assert_eq!(status(&limited, "GET", "auth/token/lookup-self", None).await, 200);
    assert_eq!(status(&limited, "GET", "auth/token/lookup-self", None).await, 403);
}

#[tokio::test]
async fn userpass_token_ttl_and_max_ttl_hold_and_lookups_name_the_token() {
    let node = Node1::start(26150).await;
    let root = node.root();
    root.post(
        "auth/userpass/users/ttl-user",
        &json!({ "password": "ttl-user-password", "token_ttl": "1h", "token_max_ttl": "2h" }),
    )
    .await
    .unwrap();
    assert_eq!(root.get("auth/userpass/users/ttl-user").await.unwrap()["data"]["token_max_ttl"], json!(7200));
    let mut user = node.anonymous();
    let token = user.login_userpass("ttl-user", "ttl-user-password").await.unwrap();
    let ttl = ttl_of(&user).await;
    assert!((3500..=3600).contains(&ttl), "ttl {ttl}");
    let renewed = user.post("auth/token/renew-self", &json!({ "increment": "10h" })).await.unwrap();
    assert_eq!(renewed["auth"]["client_token"], json!(token), "renew-self names the token, as Vault does");
    assert!(ttl_of(&user).await <= 7200, "token_max_ttl caps renewals");
    assert_eq!(user.get("auth/token/lookup-self").await.unwrap()["data"]["id"], json!(token));
}

#[tokio::test]
async fn deleting_a_user_or_changing_its_password_revokes_its_tokens() {
    let node = Node1::start(26200).await;
    let root = node.root();
    root.post(
        "sys/policies/acl/child",
        &json!({ "policy": "path \"auth/token/create\" { capabilities = [\"update\"] }" }),
    )
    .await
    .unwrap();
    root.post("auth/userpass/users/carol", &json!({ "password": "carol-password-1", "token_policies": "child" }))
        .await
        .unwrap();
    let mut first = node.anonymous();
    first.login_userpass("carol", "carol-password-1").await.unwrap();
    let mut second = node.anonymous();
    second.login_userpass("carol", "carol-password-1").await.unwrap();
    let child = token_of(&first.post("auth/token/create", &json!({})).await.unwrap());
    let child = node.anonymous().with_token(child);
    assert_eq!(status(&child, "GET", "auth/token/lookup-self", None).await, 200);

    root.post("auth/userpass/users/carol/password", &json!({ "password": "carol-password-2" })).await.unwrap();
    for client in [&first, &second, &child] {
        assert_eq!(status(client, "GET", "auth/token/lookup-self", None).await, 403, "a new password revokes logins");
    }
    let mut third = node.anonymous();
    third.login_userpass("carol", "carol-password-2").await.unwrap();
    assert_eq!(status(&third, "GET", "auth/token/lookup-self", None).await, 200);
    root.delete("auth/userpass/users/carol").await.unwrap();
    assert_eq!(status(&third, "GET", "auth/token/lookup-self", None).await, 403, "deleting the user revokes logins");
}

#[tokio::test]
async fn accessors_look_up_and_revoke_tokens_and_orphans_need_sudo() {
    let node = Node1::start(26250).await;
    let root = node.root();
    root.post(
        "sys/policies/acl/tokens",
        &json!({ "policy": "path \"auth/token/*\" { capabilities = [\"create\", \"update\", \"read\"] }" }),
    )
    .await
    .unwrap();
    let created = root.post("auth/token/create", &json!({ "policies": ["tokens"] })).await.unwrap();
    let accessor = created["auth"]["accessor"].as_str().unwrap().to_string();
    let holder = node.anonymous().with_token(token_of(&created));

    let looked_up = root.post("auth/token/lookup-accessor", &json!({ "accessor": accessor })).await.unwrap();
    assert_eq!(looked_up["data"]["accessor"], json!(accessor));
    assert_eq!(looked_up["data"]["id"], json!(""), "a lookup by accessor never reveals the token");
    assert!(root.list("auth/token/accessors").await.unwrap().contains(&accessor));
    assert_eq!(status(&holder, "LIST", "auth/token/accessors", None).await, 403, "listing accessors needs sudo");

    assert_eq!(status(&holder, "POST", "auth/token/create-orphan", Some(&json!({}))).await, 403);
    assert_eq!(status(&holder, "POST", "auth/token/create", Some(&json!({ "no_parent": true }))).await, 403);
    assert_eq!(status(&holder, "POST", "auth/token/create", Some(&json!({}))).await, 200, "a child needs no sudo");
    let orphan = root.post("auth/token/create-orphan", &json!({})).await.unwrap();
    assert_eq!(orphan["auth"]["orphan"], json!(true));

    root.post("auth/token/revoke-accessor", &json!({ "accessor": accessor })).await.unwrap();
    assert_eq!(status(&holder, "GET", "auth/token/lookup-self", None).await, 403);
}

#[tokio::test]
async fn two_concurrent_rotations_leave_every_node_running() {
    let cluster = Cluster::start_nodes(3, 26300, true, "").await;
    let rotations: Vec<_> = (0..6)
        .map(|i| {
            let client = cluster.root_at(i % 3);
            async move { client.raw("POST", "sys/rotate", None, &[]).await.unwrap().status.as_u16() }
        })
        .collect();
    let statuses = futures::future::join_all(rotations).await;
    assert!(statuses.iter().all(|s| *s == 204 || *s == 409), "a rotation succeeds or asks to retry: {statuses:?}");
    assert!(statuses.contains(&204), "{statuses:?}");
    for node in 0..3 {
        let root = cluster.root_at(node);
        let path = format!("secret/data/after-rotation-{node}");
        let written = settled_status(&root, "POST", &path, Some(&json!({ "data": { "v": node } }))).await;
        assert_eq!(written, 200, "node {node} writes after the rotations");
        assert_eq!(root.kv_get("secret", &format!("after-rotation-{node}"), None).await.unwrap(), json!({ "v": node }));
        let term = root.get("sys/key-status").await.unwrap()["data"]["term"].as_u64().unwrap();
        assert!(term >= 2, "node {node} sees term {term}");
    }
}

#[tokio::test]
async fn emergency_tokens_are_revocable_once_quorum_returns() {
    let mut cluster = Cluster::start_nodes(3, 26400, true, "").await;
    let leader = cluster.leader().await;
    let root = cluster.root_at(leader);
    let user = json!({ "password": "oncall-password" });
    assert_eq!(settled_status(&root, "POST", "auth/userpass/users/oncall", Some(&user)).await, 204);
    let survivor = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    dev::wait_for("the survivor to know the user", STARTUP, || async {
        cluster.root_at(survivor).get("auth/userpass/users/oncall").await.ok().map(|_| ())
    })
    .await
    .unwrap();
    cluster.kill9_at(leader);
    cluster.kill9_at(other);
    let anon = cluster.anonymous_at(survivor);
    dev::wait_for("read-only mode", STARTUP, || async { (dev::health_code(&anon).await == Some(474)).then_some(()) })
        .await
        .unwrap();
    let mut oncall = cluster.anonymous_at(survivor);
    let token = oncall.login_userpass("oncall", "oncall-password").await.unwrap();
    assert!(token.starts_with("cre."));
    assert_eq!(status(&oncall, "GET", "auth/token/lookup-self", None).await, 200);

    cluster.respawn_at(leader);
    cluster.respawn_at(other);
    // Every node serving again (a restarted node unseals itself first), so each one's answer below
    // is about the token, not about a node still starting.
    cluster.wait_healthy(3).await;
    let leader = cluster.leader().await;
    let root = cluster.root_at(leader);
    dev::wait_for("the revocation to commit", STARTUP, || async {
        root.post("auth/token/revoke", &json!({ "token": token })).await.ok()
    })
    .await
    .unwrap();
    for node in 0..3 {
        let client = cluster.anonymous_at(node).with_token(token.clone());
        assert_eq!(status(&client, "GET", "auth/token/lookup-self", None).await, 403, "node {node}");
    }
}

#[tokio::test]
async fn a_user_or_a_parent_token_cannot_hold_more_tokens_than_the_quota() {
    let node = Node1::start_with(26470, true, "[limits]\nmax_tokens_per_owner = 3\n").await;
    let root = node.root();
    root.post(
        "sys/policies/acl/child",
        &json!({ "policy": "path \"auth/token/create\" { capabilities = [\"update\"] }" }),
    )
    .await
    .unwrap();
    root.post("auth/userpass/users/dave", &json!({ "password": "dave-password-1", "token_policies": "child" }))
        .await
        .unwrap();
    let mut logins = Vec::new();
    for _ in 0..3 {
        let mut dave = node.anonymous();
        dave.login_userpass("dave", "dave-password-1").await.unwrap();
        logins.push(dave);
    }
    let refused = node.anonymous().post("auth/userpass/login/dave", &json!({ "password": "dave-password-1" })).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.status().unwrap(), 429, "{refused}");
    assert!(refused.to_string().contains("max_tokens_per_owner"), "{refused}");

    // Children count against their parent.
    for _ in 0..3 {
        logins[0].post("auth/token/create", &json!({})).await.unwrap();
    }
    assert_eq!(status(&logins[0], "POST", "auth/token/create", Some(&json!({}))).await, 429);

    // Revoking a login makes room for another.
    logins[1].post("auth/token/revoke-self", &json!({})).await.unwrap();
    node.anonymous().login_userpass("dave", "dave-password-1").await.unwrap();
}
