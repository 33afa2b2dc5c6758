//! The route table drives authorization (§9.1): every declared operation is refused, over HTTP,
//! to a token whose policies do not grant it. The cases are generated from the table itself, so
//! a route added later is covered without anyone writing its test. Also: the table's 405s, a
//! second kv engine enabled by type, and the OpenAPI document. Ports 28500-28990.

use citadel_core::policy::{self, Caps};
use citadel_core::route::{Need, Op, Route, RouteTable};
use citadel_server::api::routes::{tables, Handler};
use serde_json::{json, Value};

use crate::harness::Node1;

/// A concrete path for a pattern: every capture filled in.
fn concrete(prefix: &str, pattern: &str) -> String {
    let segments: Vec<&str> = pattern
        .split('/')
        .map(|s| match s.chars().next() {
            Some(':') => "probe",
            Some('*') => "probe/item",
            _ => s,
        })
        .collect();
    format!("{prefix}{}", segments.join("/"))
}

fn method(op: Op) -> &'static str {
    match op {
        Op::Read => "GET",
        Op::List => "LIST",
        Op::Write => "POST",
        Op::Patch => "PATCH",
        Op::Delete => "DELETE",
    }
}

/// The capabilities that must each be refused when missing: what the table declares, and for a
/// create-or-update on a path that does not exist, `create`.
fn needed(need: Need) -> Option<Caps> {
    match need {
        Need::Unauthenticated { .. } => None,
        Need::Caps(caps) => Some(caps),
        Need::CreateOrUpdate => Some(Caps::CREATE),
    }
}

/// Every authenticated operation of the table, with a concrete path (engine routes under the
/// `secret/` mount that init creates, userpass routes under the built-in `auth/userpass/`).
fn guarded_operations() -> Vec<(String, Op, Caps)> {
    let tables = tables().expect("the route table registers");
    let under = |modules: &'static [(&'static str, RouteTable<Handler>)], kind: &'static str, prefix: &'static str| {
        modules
            .iter()
            .filter(move |(k, _)| *k == kind)
            .flat_map(move |(_, t)| t.routes().iter().map(move |r| (prefix, r)))
    };
    let all: Vec<(&str, &Route<Handler>)> = tables
        .core
        .routes()
        .iter()
        .map(|r| ("", r))
        .chain(under(&tables.engines, "kv", "secret/"))
        .chain(under(&tables.auth_methods, "userpass", "auth/userpass/"))
        .collect();
    let mut cases = Vec::new();
    for (prefix, route) in all {
        for operation in &route.operations {
            if let Some(caps) = needed(operation.need) {
                cases.push((concrete(prefix, route.pattern), operation.op, caps));
            }
        }
    }
    cases
}

/// A token holding only `policy_text` (and `default`), created by root.
async fn token_with(node: &Node1, name: &str, policy_text: &str) -> String {
    let root = node.root();
    root.post(&format!("sys/policies/acl/{name}"), &json!({ "policy": policy_text })).await.unwrap();
    let created = root.post("auth/token/create", &json!({ "policies": [name] })).await.unwrap();
    created["auth"]["client_token"].as_str().unwrap().to_string()
}

async fn status_as(node: &Node1, token: &str, op: Op, path: &str) -> (u16, Value) {
    let client = node.anonymous().with_token(token);
    let body = matches!(op, Op::Write | Op::Patch).then(|| json!({}));
    let reply = client.raw(method(op), path, body.as_ref(), &[]).await.unwrap();
    (reply.status.as_u16(), reply.body)
}

#[tokio::test]
async fn every_route_in_the_table_is_refused_to_a_token_whose_policy_does_not_grant_it() {
    let node = Node1::start(28500).await;
    let cases = guarded_operations();
    assert!(cases.len() > 60, "the table lists every endpoint, found {}", cases.len());
    let default = policy::default_policy();
    let unrelated = token_with(
        &node,
        "unrelated",
        r#"path "unrelated/*" { capabilities = ["create", "read", "update", "patch", "delete", "list", "sudo"] }"#,
    )
    .await;
    let mut checked = 0;
    for (i, (path, op, caps)) in cases.iter().enumerate() {
        let acl_path = if *op == Op::List { format!("{path}/") } else { path.clone() };
        // Vault's default policy lets every token look up, renew and revoke itself.
        if policy::capabilities([&default], &acl_path).contains(*caps) {
            continue;
        }
        let (status, body) = status_as(&node, &unrelated, *op, path).await;
        assert_eq!(status, 403, "{} {path} with an unrelated policy: {body}", method(*op));
        // Each needed capability on its own: a policy granting everything else is refused too.
        for (j, missing) in caps.names().into_iter().enumerate() {
            let rest: Vec<&str> =
                Caps::ALL.names().into_iter().filter(|c| *c != missing).filter(|c| *c != "deny").collect();
            let rule = format!(r#"path "{acl_path}" {{ capabilities = {} }}"#, json!(rest));
            let token = token_with(&node, &format!("without-{i}-{j}"), &rule).await;
            let (status, body) = status_as(&node, &token, *op, path).await;
            assert_eq!(status, 403, "{} {path} granted all but {missing}: {body}", method(*op));
            checked += 1;
        }
    }
    assert!(checked > 60, "checked {checked} missing capabilities");
}

#[tokio::test]
async fn a_method_a_route_does_not_answer_is_a_405_naming_the_methods_it_does() {
    let node = Node1::start(28510).await;
    let anonymous = node.anonymous();
    let health = anonymous.raw("POST", "sys/health", Some(&json!({})), &[]).await.unwrap();
    assert_eq!(health.status.as_u16(), 405, "sys/health answers only GET and HEAD");
    assert_eq!(health.headers.get("allow").and_then(|v| v.to_str().ok()), Some("GET, HEAD"));
    let root = node.root();
    let seal = root.raw("GET", "sys/seal", None, &[]).await.unwrap();
    assert_eq!(seal.status.as_u16(), 405);
    assert_eq!(seal.headers.get("allow").and_then(|v| v.to_str().ok()), Some("POST, PUT"));
    let unseal = anonymous.raw("POST", "sys/unseal", Some(&json!({})), &[]).await.unwrap();
    assert_eq!(unseal.status.as_u16(), 400, "an unseal without a key is a 400, as in Vault: {}", unseal.body);
}

#[tokio::test]
async fn a_second_kv_engine_enabled_by_type_serves_its_own_secrets() {
    let node = Node1::start(28520).await;
    let root = node.root();
    root.post("sys/mounts/kv2", &json!({ "type": "kv", "options": { "version": "2" } })).await.unwrap();
    let mounts = root.get("sys/mounts").await.unwrap();
    assert_eq!(mounts["data"]["kv2/"]["type"], json!("kv"));
    root.kv_put("kv2", "app/db", &json!({ "password": "second-engine" }), None).await.unwrap();
    let read = root.kv_get("kv2", "app/db", None).await.unwrap();
    assert_eq!(read["password"], json!("second-engine"));
    let other = root.raw("GET", "secret/data/app/db", None, &[]).await.unwrap();
    assert_eq!(other.status.as_u16(), 404, "the default mount does not see the second engine's secret");
    let unknown = root.raw("POST", "sys/mounts/nope", Some(&json!({ "type": "ldap" })), &[]).await.unwrap();
    assert_eq!(unknown.status.as_u16(), 400);
    assert!(unknown.body.to_string().contains("unknown secrets engine type"), "{}", unknown.body);
    let v1 =
        root.raw("POST", "sys/mounts/old", Some(&json!({ "type": "kv", "options": { "version": "1" } })), &[]).await;
    assert_eq!(v1.unwrap().status.as_u16(), 400, "kv version 1 is refused");
    let openapi = root.get("sys/openapi").await.unwrap();
    assert!(openapi["paths"]["/kv2/data/{path}"]["post"].is_object(), "the new mount is documented");
}

#[tokio::test]
async fn the_openapi_document_passes_a_real_validator_and_declares_every_path_parameter() {
    let node = Node1::start(28530).await;
    let root = node.root();
    // Engine and auth-method routes appear under every mount: their operation ids stay unique.
    root.post("sys/mounts/kv2", &json!({ "type": "kv" })).await.unwrap();
    root.post("sys/auth/corp", &json!({ "type": "userpass" })).await.unwrap();
    let document = root.get("sys/openapi").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, document.to_string()).unwrap();
    // openapi-spec-validator (PyPI), installed by scripts/test.
    let validator = std::process::Command::new("python3")
        .args(["-c", "import sys; from openapi_spec_validator import validate; from openapi_spec_validator.readers import read_from_filename; validate(read_from_filename(sys.argv[1])[0])"])
        .arg(&file)
        .output()
        .expect("python3 runs");
    assert!(
        validator.status.success(),
        "openapi-spec-validator refused sys/openapi:\n{}",
        String::from_utf8_lossy(&validator.stderr)
    );
    let mut operations = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        let declared: Vec<&str> =
            item["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for name in path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))) {
            assert!(declared.contains(&name), "{path}: path parameter {name} is not declared");
        }
        for (method, op) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
            operations += 1;
            assert!(
                op["responses"]["200"]["content"]["application/json"]["schema"].is_object(),
                "{method} {path}: no 2xx schema"
            );
            if matches!(method.as_str(), "post" | "patch") {
                assert!(op["requestBody"]["content"].is_object(), "{method} {path}: request body undescribed");
            }
        }
    }
    assert!(operations > 60, "every operation is documented, found {operations}");
    let health = &document["paths"]["/sys/health"];
    assert_eq!(health["get"]["security"], json!([]), "unauthenticated endpoints say so");
    assert!(health.get("post").is_none(), "sys/health answers only GET and HEAD");
    let list = &document["paths"]["/sys/policies/acl"]["get"]["parameters"];
    assert!(
        list.as_array().unwrap().iter().any(|p| p["name"] == "list" && p["required"] == json!(true)),
        "LIST is documented as Vault does: GET with list=true"
    );
}

#[tokio::test]
async fn a_second_userpass_mount_enabled_by_type_keeps_its_own_users() {
    let node = Node1::start(28540).await;
    let root = node.root();
    root.post("sys/auth/corp", &json!({ "type": "userpass", "description": "corporate" })).await.unwrap();
    let methods = root.get("sys/auth").await.unwrap();
    assert_eq!(methods["data"]["corp/"]["type"], json!("userpass"));
    assert_eq!(methods["data"]["userpass/"]["type"], json!("userpass"), "the built-in mount stays");
    root.post("auth/corp/users/ann", &json!({ "password": "corp-password-1", "token_policies": "default" }))
        .await
        .unwrap();
    root.post("auth/userpass/users/ann", &json!({ "password": "home-password-1" })).await.unwrap();
    let mut corp_ann = node.anonymous();
    corp_ann.login_userpass_at("corp", "ann", "corp-password-1").await.unwrap();
    let lookup = corp_ann.get("auth/token/lookup-self").await.unwrap();
    assert_eq!(lookup["data"]["display_name"], json!("corp-ann"));
    let wrong =
        node.anonymous().raw("POST", "auth/corp/login/ann", Some(&json!({ "password": "home-password-1" })), &[]).await;
    assert_eq!(wrong.unwrap().status.as_u16(), 400, "the other mount's password does not log in here");
    assert_eq!(root.list("auth/corp/users").await.unwrap(), vec!["ann".to_string()]);
    assert_eq!(root.list("auth/userpass/users").await.unwrap(), vec!["ann".to_string()]);
    let unknown = root.raw("POST", "sys/auth/ldap", Some(&json!({ "type": "ldap" })), &[]).await.unwrap();
    assert_eq!(unknown.status.as_u16(), 400, "{}", unknown.body);
    let again = root.raw("POST", "sys/auth/userpass", Some(&json!({ "type": "userpass" })), &[]).await.unwrap();
    assert_eq!(again.status.as_u16(), 204, "enabling the built-in mount is a no-op: {}", again.body);
    assert_eq!(root.list("auth/userpass/users").await.unwrap(), vec!["ann".to_string()], "and keeps its users");
    let nested = root.raw("POST", "sys/auth/userpass/eu", Some(&json!({ "type": "userpass" })), &[]).await.unwrap();
    assert_eq!(nested.status.as_u16(), 400, "a mount inside the built-in one is refused: {}", nested.body);
    // Disabling the mount deletes its users and revokes their logins.
    root.delete("sys/auth/corp").await.unwrap();
    let revoked = corp_ann.raw("GET", "auth/token/lookup-self", None, &[]).await.unwrap();
    assert_eq!(revoked.status.as_u16(), 403);
    let gone =
        node.anonymous().raw("POST", "auth/corp/login/ann", Some(&json!({ "password": "corp-password-1" })), &[]).await;
    // The mount is gone: its login path is no route, refused like any path without a token.
    assert_eq!(gone.unwrap().status.as_u16(), 403);
    let mut home_ann = node.anonymous();
    home_ann.login_userpass("ann", "home-password-1").await.expect("the built-in mount's ann is untouched");
}
