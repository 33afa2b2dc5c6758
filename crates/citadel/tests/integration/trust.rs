//! Who may use the cluster channel (§8.1): certificates bought with a join token, removed nodes,
//! certificates naming another node, and renewal. Ports 23000 + 50·k.

use citadel::dev;
use citadel_server::cluster::PeerError;
use citadel_server::peer::PeerIdentity;
use citadel_server::raft_stream::{RaftStreams, Rpc};
use serde_json::{json, Value};

use crate::harness::{Cluster, STARTUP};

/// Every HTTP cluster route except `/cluster/join`, with a body each would accept from a member.
/// (Appends and votes travel on the Raft stream: `assert_the_raft_stream_refuses`.)
fn guarded_routes() -> Vec<(&'static str, Value)> {
    vec![
        ("raft/snapshot", json!(null)),
        ("raft/transfer-leader", json!(null)),
        ("cluster/propose", root_user_put("mallory")),
        ("cluster/read-index", json!(null)),
        ("cluster/status", json!(null)),
        ("cluster/ha-status", json!(null)),
        ("cluster/transfer-leader", json!(1)),
        ("cluster/remove-peer", json!(1)),
        ("cluster/leave", json!(true)),
        ("cluster/renew-cert", json!(null)),
    ]
}

/// A forwarded command creating a userpass user that holds the root policy.
fn root_user_put(username: &str) -> Value {
    json!({ "UserPut": { "user": {
        "username": username,
        "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA",
        "policies": ["root"],
        "token_ttl_secs": 0,
    } } })
}

/// A client of the cluster channel presenting `cert` and `key` (PEM).
fn peer_client(cluster: &Cluster, cert: &str, key: &str) -> reqwest::Client {
    citadel_server::tls::install_crypto_provider();
    let ca = std::fs::read(cluster.layout.ca_path()).unwrap();
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// POSTs `body` to a cluster route of node `i`: (HTTP status, wire answer).
async fn call(cluster: &Cluster, client: &reqwest::Client, i: usize, route: &str, body: &Value) -> (u16, Value) {
    let url = format!("https://{}/{route}", cluster.layout.cluster_addr(i));
    let response = client.post(&url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Asserts that every guarded route of node `i` refuses the client with a message containing `why`.
async fn assert_every_route_refuses(cluster: &Cluster, client: &reqwest::Client, i: usize, why: &str) {
    for (route, body) in guarded_routes() {
        let (status, answer) = call(cluster, client, i, route, &body).await;
        let refusal = answer["Err"].as_str().unwrap_or_default();
        assert_eq!(status, 403, "{route}: {answer}");
        assert!(refusal.contains(why), "{route} answered {answer}, expected a refusal saying {why:?}");
    }
}

/// TLS for a cluster peer presenting `cert` and `key` (PEM).
fn peer_tls(cluster: &Cluster, cert: &str, key: &str) -> rustls::ClientConfig {
    citadel_server::tls::install_crypto_provider();
    let certs = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut key.as_bytes()).unwrap().unwrap();
    let roots = citadel_server::tls::root_store(&cluster.layout.ca_path()).unwrap();
    rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(certs, key).unwrap()
}

/// A Raft stream client presenting `cert` and `key` (PEM).
fn raft_stream_client(cluster: &Cluster, cert: &str, key: &str) -> RaftStreams {
    RaftStreams::new(peer_tls(cluster, cert, key), None, std::time::Duration::from_secs(5))
}

/// Opens a Raft stream to node `i` as `cert`, sends only the head of an append that claims to be
/// 1 GiB long, and returns the server's answer: a refused peer is answered before its payload.
async fn answer_to_a_claimed_gibibyte(cluster: &Cluster, i: usize, cert: &str, key: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = peer_tls(cluster, cert, key);
    tls.alpn_protocols = vec![citadel_server::raft_stream::ALPN.to_vec()];
    let tcp = tokio::net::TcpStream::connect(cluster.layout.cluster_addr(i)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.unwrap();
    stream.write_all(&[0x40, 0, 0, 0, Rpc::Append as u8]).await.unwrap();
    let read = async {
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.unwrap();
        let mut payload = vec![0; u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize];
        stream.read_exact(&mut payload).await.unwrap();
        serde_json::from_slice(&payload).unwrap()
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read).await.expect("answered before the payload")
}

/// Asserts that node `i`'s Raft stream refuses appends, votes and pre-votes from the client,
/// saying `why`. The gate answers before a request is read, as on the HTTP routes.
async fn assert_the_raft_stream_refuses(cluster: &Cluster, streams: &RaftStreams, i: usize, why: &str) {
    let addr = cluster.layout.cluster_addr(i);
    for rpc in [Rpc::Append, Rpc::Vote, Rpc::PreVote] {
        let answer = streams.call::<Value, Value>(&addr, rpc, &json!(null), std::time::Duration::from_secs(10)).await;
        match answer {
            Err(PeerError::Refused(refusal)) => {
                assert!(refusal.contains(why), "{rpc:?} was refused with {refusal:?}, expected one saying {why:?}")
            }
            other => panic!("{rpc:?} on the Raft stream was not refused: {other:?}"),
        }
    }
}

async fn join_token(cluster: &Cluster, node_id: Option<u64>) -> String {
    let body = match node_id {
        Some(id) => json!({ "ttl": "10m", "node_id": id }),
        None => json!({ "ttl": "10m" }),
    };
    let reply = cluster.root().post("sys/storage/raft/join-token", &body).await.unwrap();
    reply["data"]["join_token"].as_str().unwrap().to_string()
}

/// Buys a certificate for `node_id` with a join token: (cert PEM, key PEM).
async fn bootstrap(cluster: &Cluster, token: &str, node_id: u64) -> Result<(String, String), String> {
    let body = json!({ "join_token": token, "node_id": node_id, "names": ["127.0.0.1"] });
    let reply = cluster.anonymous().post("sys/storage/raft/bootstrap", &body).await.map_err(|e| e.to_string())?;
    Ok((reply["certificate"].as_str().unwrap().into(), reply["private_key"].as_str().unwrap().into()))
}

fn join_request(node_id: u64, cluster_addr: &str) -> Value {
    json!({
        "node_id": node_id,
        "node": { "api_addr": "https://127.0.0.1:1", "cluster_addr": cluster_addr, "name": "n", "site": "" },
        "protocol_version": citadel_server::cluster::PROTOCOL_VERSION,
    })
}

async fn server_count(cluster: &Cluster, i: usize) -> usize {
    let config = cluster.root_at(i).get("sys/storage/raft/configuration").await.unwrap();
    config["data"]["config"]["servers"].as_array().unwrap().len()
}

/// Removes follower `removed` through the leader and returns the leader's index.
async fn remove(cluster: &Cluster, removed: usize) -> usize {
    let leader = cluster.leader().await;
    assert_ne!(leader, removed, "the test removes a follower");
    let id = cluster.layout.node_id(removed);
    cluster.root_at(leader).post("sys/storage/raft/remove-peer", &json!({ "server_id": id })).await.unwrap();
    assert_eq!(server_count(cluster, leader).await, 2);
    leader
}

fn node_cert_and_key(cluster: &Cluster, i: usize) -> (String, String) {
    let dir = cluster.layout.node_dir(i);
    (std::fs::read_to_string(dir.join("cert.pem")).unwrap(), std::fs::read_to_string(dir.join("key.pem")).unwrap())
}

#[tokio::test]
async fn a_join_token_certificate_of_a_non_member_is_refused_on_every_cluster_route() {
    let cluster = Cluster::start_nodes(1, 23000, true, "").await;
    let token = join_token(&cluster, Some(7)).await;
    let (cert, key) = bootstrap(&cluster, &token, 7).await.unwrap();
    let outsider = peer_client(&cluster, &cert, &key);
    assert_every_route_refuses(&cluster, &outsider, 0, "node 7 is not a member of this cluster").await;
    let outsider_stream = raft_stream_client(&cluster, &cert, &key);
    assert_the_raft_stream_refuses(&cluster, &outsider_stream, 0, "node 7 is not a member of this cluster").await;
    let answer = answer_to_a_claimed_gibibyte(&cluster, 0, &cert, &key).await;
    assert!(answer["Err"].as_str().unwrap_or_default().contains("node 7 is not a member"), "{answer}");

    let user = cluster.root().raw("GET", "auth/userpass/users/mallory", None, &[]).await.unwrap();
    assert_eq!(user.status, 404, "the forwarded root user was not created: {:?}", user.body);
    let (cert, key) = node_cert_and_key(&cluster, 0);
    let (status, _) = call(&cluster, &peer_client(&cluster, &cert, &key), 0, "cluster/status", &json!(null)).await;
    assert_eq!(status, 200, "the member's own certificate is still accepted");
    assert!(cluster.server_log().contains("node 7 is not a member"), "the refusal is logged");
}

#[tokio::test]
async fn a_removed_nodes_certificate_is_refused_on_every_cluster_route_and_cannot_rejoin() {
    let mut cluster = Cluster::start_nodes(3, 23100, true, "").await;
    let removed = (cluster.leader().await + 1) % 3;
    let (cert, key) = node_cert_and_key(&cluster, removed);
    let leader = remove(&cluster, removed).await;
    cluster.kill9_at(removed);
    let id = cluster.layout.node_id(removed);
    let former = peer_client(&cluster, &cert, &key);
    assert_every_route_refuses(&cluster, &former, leader, &format!("certificate of node {id}")).await;
    let (_, answer) = call(&cluster, &former, leader, "raft/snapshot", &json!(null)).await;
    assert!(answer["Err"].as_str().unwrap().contains("revoked"), "{answer}");
    let former_stream = raft_stream_client(&cluster, &cert, &key);
    assert_the_raft_stream_refuses(&cluster, &former_stream, leader, "revoked").await;

    let other = 3 - leader - removed;
    dev::wait_for("the other member to refuse the revoked certificate", STARTUP, || async {
        let (_, answer) = call(&cluster, &former, other, "cluster/status", &json!(null)).await;
        answer["Err"].as_str().is_some_and(|e| e.contains("revoked")).then_some(())
    })
    .await
    .unwrap();

    let rejoin = join_request(id, &cluster.layout.cluster_addr(removed));
    let (_, answer) = call(&cluster, &former, leader, "cluster/join", &rejoin).await;
    assert!(answer["Err"].as_str().unwrap_or_default().contains("revoked"), "{answer}");
    assert_eq!(server_count(&cluster, leader).await, 2, "the removed node did not rejoin");
}

#[tokio::test]
async fn a_removed_node_that_restarts_serves_nothing_and_says_why() {
    let mut cluster = Cluster::start_nodes(3, 23200, true, "").await;
    let removed = (cluster.leader().await + 1) % 3;
    remove(&cluster, removed).await;
    let marker = cluster.layout.data_dir(removed).join("REMOVED");
    wait_until_removed_marker(&marker).await;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&marker).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the marker is private");

    cluster.kill9_at(removed);
    cluster.respawn_at(removed);
    let anonymous = cluster.anonymous_at(removed);
    let health =
        dev::wait_for("the removed node to answer", STARTUP, || async { anonymous.health().await.ok() }).await.unwrap();
    assert_eq!(health.status, 503);
    assert_eq!(health.body["removed"], json!(true), "{:?}", health.body);
    let message = "this node was removed from the cluster; wipe its data directory and join it as a new node";
    for (method, path) in [("GET", "sys/seal-status"), ("GET", "secret/data/x"), ("GET", "sys/ha/status")] {
        let reply = cluster.root_at(removed).raw(method, path, None, &[]).await.unwrap();
        assert_eq!(reply.status, 503, "{path}");
        assert_eq!(reply.body["errors"][0], json!(message), "{path}");
    }
    let login = anonymous.raw("POST", "auth/userpass/login/anyone", Some(&json!({ "password": "x" })), &[]).await;
    assert_eq!(login.unwrap().status, 503, "no login, so no emergency token");
    let log = cluster.server_log_at(removed);
    let restarted = log.rsplit("citadel node started").next().unwrap();
    assert!(restarted.contains(message), "the restarted node says it was removed and what to do");
}

async fn wait_until_removed_marker(marker: &std::path::Path) {
    dev::wait_for("the REMOVED marker", STARTUP, || async { marker.exists().then_some(()) }).await.unwrap();
}

#[tokio::test]
async fn bootstrap_refuses_to_certify_a_current_members_node_id() {
    let cluster = Cluster::start_nodes(1, 23300, true, "").await;
    let token = join_token(&cluster, None).await;
    let refused = bootstrap(&cluster, &token, 1).await.unwrap_err();
    assert!(refused.contains("400") && refused.contains("node 1 is a current member"), "{refused}");
    assert!(bootstrap(&cluster, &token, 5).await.is_ok(), "the refusal did not spend the token");

    let member_token = cluster.root().post("sys/storage/raft/join-token", &json!({ "node_id": 1 })).await.unwrap_err();
    assert_eq!(member_token.status().unwrap(), 400, "no token is issued for a member's node id");
}

#[tokio::test]
async fn joining_with_a_certificate_issued_for_another_node_id_is_refused() {
    let cluster = Cluster::start_nodes(1, 23400, true, "").await;
    let token = join_token(&cluster, Some(7)).await;
    let wrong = bootstrap(&cluster, &token, 8).await.unwrap_err();
    assert!(wrong.contains("issued for node 7"), "a token for node 7 certifies no other node: {wrong}");
    let (cert, key) = bootstrap(&cluster, &token, 7).await.unwrap();
    let seven = peer_client(&cluster, &cert, &key);

    let (_, answer) = call(&cluster, &seven, 0, "cluster/join", &join_request(8, "127.0.0.1:23491")).await;
    let refusal = answer["Err"].as_str().unwrap_or_default();
    assert!(refusal.contains("issued to node 7, not to node 8"), "{answer}");
    let (_, answer) = call(&cluster, &seven, 0, "cluster/join", &join_request(7, "10.9.9.9:23491")).await;
    let refusal = answer["Err"].as_str().unwrap_or_default();
    assert!(refusal.contains("10.9.9.9 is not among the names"), "{answer}");
    assert_eq!(server_count(&cluster, 0).await, 1, "nobody joined");
}

/// The certificate a node's API port presents on a new connection.
async fn presented_certificate(cluster: &Cluster, i: usize) -> Option<PeerIdentity> {
    citadel_server::tls::install_crypto_provider();
    let ca = std::fs::read(cluster.layout.ca_path()).unwrap();
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .tls_info(true)
        .build()
        .unwrap();
    let response = client.get(format!("{}/v1/sys/health", cluster.layout.api_url(i))).send().await.ok()?;
    let der = response.extensions().get::<reqwest::tls::TlsInfo>()?.peer_certificate()?.to_vec();
    PeerIdentity::from_der(&der).ok()
}

#[tokio::test]
async fn a_member_renews_its_certificate_before_it_expires_and_uses_it_without_a_restart() {
    let mut cluster = Cluster::start_partial(3, 2, 23250, true, "").await;
    // Node 3 renews a certificate that expires within a year: its own (from `citadel dev`) is due.
    let config = cluster.layout.config_path(2);
    let text = std::fs::read_to_string(&config).unwrap();
    let renewing = text.replace("[tls]\n", "[tls]\nrenew_before_days = 365\ncert_validity_days = 3650\n");
    assert_ne!(text, renewing);
    std::fs::write(&config, renewing).unwrap();
    let cert_path = cluster.layout.node_dir(2).join("cert.pem");
    let original = PeerIdentity::from_pem_file(&cert_path).unwrap();
    cluster.respawn_at(2);
    cluster.wait_healthy(3).await;

    let renewed = dev::wait_for("node 3 to renew its certificate", STARTUP, || async {
        let current = PeerIdentity::from_pem_file(&cert_path).ok()?;
        (current.serial != original.serial).then_some(current)
    })
    .await
    .unwrap();
    assert_eq!((renewed.node_id, &renewed.names), (Some(3), &original.names), "same node id and names");
    assert!(renewed.not_after > original.not_after, "the renewed certificate expires later");
    let key = cluster.layout.node_dir(2).join("key.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the renewed key is private");

    dev::wait_for("node 3 to present the renewed certificate", STARTUP, || async {
        let presented = presented_certificate(&cluster, 2).await?;
        (presented.serial == renewed.serial).then_some(())
    })
    .await
    .unwrap();
    let process = cluster.children[2].as_mut().unwrap();
    assert!(process.try_wait().unwrap().is_none(), "the same process, not restarted");
    cluster.root_at(2).kv_put("secret", "after-renewal", &json!({ "v": 1 }), None).await.unwrap();
    // Whichever node led when node 3 asked (a busy machine may have elected another since).
    let issued = (0..3).any(|i| cluster.server_log_at(i).contains("renewed a member's certificate"));
    assert!(issued, "a leader issued it");
}
