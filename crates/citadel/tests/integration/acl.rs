//! Vault's ACL semantics where Citadel used to be looser (§8.2): `create` versus `update`,
//! parameter constraints, `cas_required` on PATCH, percent-decoded paths, and who may give which
//! policies. Ports 24500-24990.

use std::sync::Arc;

use citadel_client::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Node1, STARTUP};

/// Creates a userpass user holding `policies` (as root) and returns a client logged in as them.
async fn user_with(node: &Node1, name: &str, policies: &str) -> Client {
    user_token(node, name, policies).await.0
}

/// Like `user_with`, with the user's token.
async fn user_token(node: &Node1, name: &str, policies: &str) -> (Client, String) {
    let password = format!("{name}-password-1");
    node.root()
        .post(&format!("auth/userpass/users/{name}"), &json!({ "password": password, "token_policies": policies }))
        .await
        .unwrap();
    let mut client = node.anonymous();
    let token = client.login_userpass(name, &password).await.unwrap();
    (client, token)
}

async fn status(client: &Client, method: &str, path: &str, body: Option<&Value>) -> u16 {
    client.raw(method, path, body, &[]).await.unwrap().status.as_u16()
}

/// Sends a request with its path exactly as written: a URL library would resolve `%2e%2e` (and
/// may normalise other escapes) before the request left, so this speaks HTTP/1.1 over TLS itself.
/// Returns the status and the body.
async fn send_verbatim(node: &Node1, method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(node.layout.ca_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.layout.api_port(0))).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Vault-Token: {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The server closes the connection (`Connection: close`); a TLS close without notify is fine.
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{answer:?}"));
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_create_grant_does_not_authorize_updating_an_existing_secret_user_or_policy() {
    let node = Node1::start(24500).await;
    let root = node.root();
    let creator = r#"
        path "secret/data/*" { capabilities = ["create", "read"] }
        path "secret/metadata/*" { capabilities = ["create"] }
        path "auth/userpass/users/*" { capabilities = ["create"] }
        path "sys/policies/acl/*" { capabilities = ["create"] }
        path "sys/mounts/*" { capabilities = ["create"] }
    "#;
    root.post("sys/policies/acl/creator", &json!({ "policy": creator })).await.unwrap();
    let updater = r#"path "secret/data/*" { capabilities = ["update"] }"#;
    root.post("sys/policies/acl/updater", &json!({ "policy": updater })).await.unwrap();
    root.kv_put("secret", "existing", &json!({ "v": "original" }), None).await.unwrap();
    root.post("auth/userpass/users/victim", &json!({ "password": "victim-password-1" })).await.unwrap();
    root.post("sys/policies/acl/existing", &json!({ "policy": updater })).await.unwrap();
    let maker = user_with(&node, "maker", "creator").await;

    let secret = json!({ "data": { "v": "changed" } });
    assert_eq!(status(&maker, "POST", "secret/data/new", Some(&secret)).await, 200, "create makes a new secret");
    assert_eq!(status(&maker, "POST", "secret/data/new", Some(&secret)).await, 403, "...but cannot rewrite it");
    assert_eq!(status(&maker, "POST", "secret/data/existing", Some(&secret)).await, 403);
    let metadata = json!({ "max_versions": 1 });
    assert_eq!(status(&maker, "POST", "secret/metadata/existing", Some(&metadata)).await, 403);
    let user = json!({ "password": "changed-password-1" });
    assert_eq!(status(&maker, "POST", "auth/userpass/users/newbie", Some(&user)).await, 204);
    assert_eq!(status(&maker, "POST", "auth/userpass/users/victim", Some(&user)).await, 403);
    let policy = json!({ "policy": r#"path "secret/*" { capabilities = ["read"] }"# });
    assert_eq!(status(&maker, "POST", "sys/policies/acl/fresh", Some(&policy)).await, 204);
    assert_eq!(status(&maker, "POST", "sys/policies/acl/existing", Some(&policy)).await, 403);
    let mount = json!({ "type": "kv-v2" });
    assert_eq!(status(&maker, "POST", "sys/mounts/fresh", Some(&mount)).await, 204);
    assert_eq!(status(&maker, "POST", "sys/mounts/fresh", Some(&mount)).await, 403);

    assert_eq!(root.kv_get("secret", "existing", None).await.unwrap(), json!({ "v": "original" }));
    assert_eq!(root.get("sys/policies/acl/existing").await.unwrap()["data"]["policy"], json!(updater));
    let mut victim = node.anonymous();
    victim.login_userpass("victim", "victim-password-1").await.expect("the victim's password is unchanged");

    // And the other way round: `update` alone rewrites what exists but creates nothing.
    let editor = user_with(&node, "editor", "updater").await;
    assert_eq!(status(&editor, "POST", "secret/data/existing", Some(&secret)).await, 200);
    assert_eq!(status(&editor, "POST", "secret/data/brand-new", Some(&secret)).await, 403);
}

#[tokio::test]
async fn policies_with_parameter_constraints_are_enforced() {
    let node = Node1::start(24510).await;
    let root = node.root();
    let constrained = r#"
        path "auth/userpass/users/*" {
            capabilities = ["create", "update"]
            allowed_parameters = {
                "password" = []
                "token_ttl" = ["1h", "2h"]
            }
        }
        path "secret/data/cfg/*" {
            capabilities = ["create", "update", "read"]
            required_parameters = ["options"]
            denied_parameters = { "version" = [] }
        }
    "#;
    root.post("sys/policies/acl/constrained", &json!({ "policy": constrained })).await.unwrap();
    let helper = user_with(&node, "helper", "constrained").await;

    assert_eq!(
        status(&helper, "POST", "auth/userpass/users/u1", Some(&json!({ "password": "password-1" }))).await,
        204
    );
    let ttl = json!({ "password": "password-2", "token_ttl": "2h" });
    assert_eq!(status(&helper, "POST", "auth/userpass/users/u1", Some(&ttl)).await, 204);
    let long_ttl = json!({ "password": "password-3", "token_ttl": "5h" });
    assert_eq!(status(&helper, "POST", "auth/userpass/users/u1", Some(&long_ttl)).await, 403);
    let escalate = json!({ "password": "password-3", "token_policies": "constrained" });
    let refused = helper.raw("POST", "auth/userpass/users/u1", Some(&escalate), &[]).await.unwrap();
    assert_eq!(refused.status, 403);
    assert!(refused.body["errors"][0].as_str().unwrap().contains("token_policies"), "{}", refused.body);
    assert_eq!(
        root.get("auth/userpass/users/u1").await.unwrap()["data"]["token_ttl"],
        json!(7200),
        "refusals changed nothing"
    );

    let without_options = json!({ "data": { "k": "v" } });
    let refused = helper.raw("POST", "secret/data/cfg/a", Some(&without_options), &[]).await.unwrap();
    assert_eq!(refused.status, 403);
    assert!(refused.body["errors"][0].as_str().unwrap().contains("options"), "{}", refused.body);
    let with_options = json!({ "data": { "k": "v" }, "options": {} });
    assert_eq!(status(&helper, "POST", "secret/data/cfg/a", Some(&with_options)).await, 200);
    let denied = json!({ "data": { "k": "v" }, "options": {}, "version": 1 });
    assert_eq!(status(&helper, "POST", "secret/data/cfg/a", Some(&denied)).await, 403);
    // Reads are checked against the query, as Vault does: `options` is required there too.
    assert_eq!(status(&helper, "GET", "secret/data/cfg/a", None).await, 403);
    assert_eq!(status(&helper, "GET", "secret/data/cfg/a?options=1", None).await, 200);

    let malformed = json!({ "policy": r#"path "secret/x" { capabilities = ["read"] allowed_parameters = ["a"] }"# });
    let refused = root.raw("POST", "sys/policies/acl/malformed", Some(&malformed), &[]).await.unwrap();
    assert_eq!(refused.status, 400);
    let message = refused.body["errors"][0].as_str().unwrap();
    assert!(message.contains("secret/x") && message.contains("allowed_parameters"), "{message}");
    // A misspelt constraint is refused, not silently left unenforced.
    let misspelt =
        json!({ "policy": r#"path "secret/x" { capabilities = ["read"] denied_parameter = { "a" = [] } }"# });
    let refused = root.raw("POST", "sys/policies/acl/misspelt", Some(&misspelt), &[]).await.unwrap();
    assert_eq!(refused.status, 400);
    assert!(refused.body["errors"][0].as_str().unwrap().contains("denied_parameter"), "{}", refused.body);
    assert_eq!(status(&root, "GET", "sys/policies/acl/misspelt", None).await, 404);
}

#[tokio::test]
async fn patch_honours_cas_required() {
    let node = Node1::start(24520).await;
    let root = node.root();
    let patch = |cas: Option<u64>| {
        let mut body = json!({ "data": { "added": "yes" } });
        if let Some(cas) = cas {
            body["options"] = json!({ "cas": cas });
        }
        body
    };
    let error = |reply: &citadel_client::Reply| reply.body["errors"][0].as_str().unwrap_or_default().to_string();

    // Per-secret metadata.
    root.kv_put("secret", "guarded", &json!({ "k": "v" }), None).await.unwrap();
    root.post("secret/metadata/guarded", &json!({ "cas_required": true })).await.unwrap();
    let r = root.raw("PATCH", "secret/data/guarded", Some(&patch(None)), &[]).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(error(&r).contains("check-and-set parameter required"), "{}", r.body);
    let r = root.raw("PATCH", "secret/data/guarded", Some(&patch(Some(0))), &[]).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(error(&r).contains("did not match the current version"), "{}", r.body);
    assert_eq!(root.kv_get("secret", "guarded", None).await.unwrap(), json!({ "k": "v" }), "refusals wrote nothing");
    let r = root.raw("PATCH", "secret/data/guarded", Some(&patch(Some(1))), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["version"], json!(2));
    assert_eq!(root.kv_get("secret", "guarded", None).await.unwrap(), json!({ "k": "v", "added": "yes" }));

    // The mount's configuration.
    root.post("sys/mounts/strict", &json!({ "type": "kv-v2" })).await.unwrap();
    root.post("strict/config", &json!({ "cas_required": true })).await.unwrap();
    root.kv_put("strict", "s", &json!({ "k": "v" }), Some(0)).await.unwrap();
    let r = root.raw("PATCH", "strict/data/s", Some(&patch(None)), &[]).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(error(&r).contains("check-and-set parameter required"), "{}", r.body);
    assert_eq!(status(&root, "PATCH", "strict/data/s", Some(&patch(Some(1)))).await, 200);

    // Where check-and-set is not required, a given cas must still be the current version.
    root.kv_put("secret", "free", &json!({ "k": "v" }), None).await.unwrap();
    assert_eq!(status(&root, "PATCH", "secret/data/free", Some(&patch(Some(5)))).await, 400);
    assert_eq!(status(&root, "PATCH", "secret/data/free", Some(&patch(None))).await, 200);
}

#[tokio::test]
async fn a_secret_written_through_an_encoded_path_is_read_back_through_the_decoded_one() {
    let node = Node1::start(24530).await;
    let root = node.root();
    let body = json!({ "data": { "pw": "s3cret" } });
    let (status, answer) =
        send_verbatim(&node, "POST", "/v1/secret/data/team%2F%61pp%2Fdb", &node.root, Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(root.kv_get("secret", "team/app/db", None).await.unwrap(), json!({ "pw": "s3cret" }));
    assert_eq!(root.list("secret/metadata/team/app").await.unwrap(), vec!["db"]);
    let (status, answer) = send_verbatim(&node, "GET", "/v1/%73ecret/data/team/app/d%62", &node.root, None).await;
    assert_eq!((status, &answer["data"]["data"]), (200, &json!({ "pw": "s3cret" })));
    let root = &root;
    citadel::dev::wait_for("the write's audit event, under the decoded path", STARTUP, || async move {
        let audit = root.get("sys/audit/events?path=secret/data/team/app/db").await.ok()?;
        let events = audit["data"]["events"].as_array()?.clone();
        events
            .iter()
            .any(|e| e["operation"] == json!("update") && e["path"] == json!("secret/data/team/app/db"))
            .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_deny_rule_on_a_decoded_path_cannot_be_bypassed_by_encoding_any_of_its_characters() {
    let node = Node1::start(24540).await;
    let root = node.root();
    let policy = r#"
        path "secret/data/app/*" { capabilities = ["create", "read", "update"] }
        path "secret/data/app/locked" { capabilities = ["deny"] }
    "#;
    root.post("sys/policies/acl/app", &json!({ "policy": policy })).await.unwrap();
    root.kv_put("secret", "app/locked", &json!({ "k": "original" }), None).await.unwrap();
    let (_, token) = user_token(&node, "bob", "app").await;
    let target = "secret/data/app/locked";
    let write = json!({ "data": { "k": "overwritten" } });
    for (i, c) in target.char_indices() {
        for hex in [format!("%{:02X}", c as u32), format!("%{:02x}", c as u32)] {
            let encoded = format!("/v1/{}{hex}{}", &target[..i], &target[i + 1..]);
            let (read, answer) = send_verbatim(&node, "GET", &encoded, &token, None).await;
            assert_eq!(read, 403, "GET {encoded}: {answer}");
            let (written, answer) = send_verbatim(&node, "POST", &encoded, &token, Some(&write)).await;
            assert_eq!(written, 403, "POST {encoded}: {answer}");
        }
    }
    let (read, _) = send_verbatim(&node, "GET", "/v1/secret%2Fdata%2Fapp%2Flocked", &token, None).await;
    assert_eq!(read, 403);
    assert_eq!(root.kv_get("secret", "app/locked", None).await.unwrap(), json!({ "k": "original" }));
    // The grant next to it still works through an encoded path.
    let (status, _) = send_verbatim(&node, "POST", "/v1/secret/data/app/%6Fpen", &token, Some(&write)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn encoded_dot_segments_and_bad_escapes_are_refused() {
    let node = Node1::start(24550).await;
    let root = node.root();
    root.kv_put("secret", "x", &json!({ "k": "v" }), None).await.unwrap();
    for path in [
        "/v1/secret/data/%2e%2e/data/x",
        "/v1/secret/data/%2E%2E/data/x",
        "/v1/secret/data/a/%2e%2e%2fx",
        "/v1/secret/data/.%2e/x",
        "/v1/secret/data/%2e/x",
        "/v1/secret/data/a%2F%2Fx",
        "/v1/secret/data/%zz",
        "/v1/secret/data/%",
        "/v1/secret/data/%ff",
        "/v1/secret/data/a%00b",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let body = json!({ "data": { "k": "w" } });
            let (status, answer) = send_verbatim(&node, method, path, &node.root, Some(&body)).await;
            assert_eq!(status, 400, "{method} {path}: {answer}");
            assert!(answer["errors"][0].as_str().unwrap().contains("path"), "{answer}");
        }
    }
    assert_eq!(root.kv_get("secret", "x", None).await.unwrap(), json!({ "k": "v" }));
}

#[tokio::test]
async fn the_root_policy_cannot_be_given_to_userpass_users() {
    let node = Node1::start(24560).await;
    let root = node.root();
    for policies in [json!("root"), json!("default,root"), json!(["root"])] {
        let body = json!({ "password": "eve-password-1", "token_policies": policies });
        let refused = root.raw("POST", "auth/userpass/users/eve", Some(&body), &[]).await.unwrap();
        assert_eq!(refused.status, 400, "{policies}");
        assert!(refused.body["errors"][0].as_str().unwrap().contains("root"), "{}", refused.body);
    }
    assert_eq!(status(&root, "GET", "auth/userpass/users/eve", None).await, 404, "no user was created");
    root.post("auth/userpass/users/eve", &json!({ "password": "eve-password-1" })).await.unwrap();
    let body = json!({ "policies": ["root"] });
    assert_eq!(status(&root, "POST", "auth/userpass/users/eve", Some(&body)).await, 400, "nor given later");
    let mut eve = node.anonymous();
    eve.login_userpass("eve", "eve-password-1").await.unwrap();
    assert_eq!(status(&eve, "GET", "sys/policies/acl", None).await, 403, "eve is not root");
}

#[tokio::test]
async fn only_root_grants_a_policy_it_does_not_hold() {
    let node = Node1::start(24570).await;
    let root = node.root();
    let admin = r#"
        path "auth/userpass/users/*" { capabilities = ["create", "update", "read"] }
        path "auth/token/create" { capabilities = ["update"] }
    "#;
    root.post("sys/policies/acl/admin", &json!({ "policy": admin })).await.unwrap();
    root.post("sys/policies/acl/secrets", &json!({ "policy": r#"path "secret/*" { capabilities = ["read"] }"# }))
        .await
        .unwrap();
    let adm = user_with(&node, "adm", "admin").await;

    let refused = adm
        .raw("POST", "auth/userpass/users/u1", Some(&json!({ "password": "password-1", "policies": "secrets" })), &[])
        .await
        .unwrap();
    assert_eq!(refused.status, 403);
    assert!(refused.body["errors"][0].as_str().unwrap().contains("\"secrets\""), "{}", refused.body);
    assert_eq!(status(&root, "GET", "auth/userpass/users/u1", None).await, 404, "the refusal created nothing");
    let held = json!({ "password": "password-1", "policies": "admin,default" });
    assert_eq!(status(&adm, "POST", "auth/userpass/users/u1", Some(&held)).await, 204, "a held policy may be given");
    let token = adm.raw("POST", "auth/token/create", Some(&json!({ "policies": ["secrets"] })), &[]).await.unwrap();
    assert_eq!(token.status, 403);
    assert!(token.body["errors"][0].as_str().unwrap().contains("\"secrets\""), "{}", token.body);

    // Root may give anything; what a user already holds is not given again by an update.
    root.post("auth/userpass/users/u2", &json!({ "password": "password-2", "policies": "secrets" })).await.unwrap();
    assert_eq!(status(&adm, "POST", "auth/userpass/users/u2", Some(&json!({ "token_ttl": "1h" }))).await, 204);
    let widen = json!({ "policies": "secrets,admin" });
    assert_eq!(status(&adm, "POST", "auth/userpass/users/u2", Some(&widen)).await, 204);
    let policies = root.get("auth/userpass/users/u2").await.unwrap()["data"]["token_policies"].clone();
    assert_eq!(policies, json!(["secrets", "admin"]));
}
