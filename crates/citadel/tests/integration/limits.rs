//! Limits on what a client can make a node spend (§8.3): login backoff per source, refusal
//! summaries, connection caps, header timeouts, and snapshot bodies read only after the token.
//! Ports 23500-23590.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use citadel::flood::{http1_request, open_tls, read_answer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{wait_until, Node1};

const ATTACKER: &str = "127.0.0.2";

fn api_addr(node: &Node1) -> SocketAddr {
    format!("127.0.0.1:{}", node.layout.api_port(0)).parse().unwrap()
}

fn attacker() -> IpAddr {
    ATTACKER.parse().unwrap()
}

/// A userpass login sent from `source`; returns the status and the raw answer.
async fn login_from(node: &Node1, source: IpAddr, user: &str, password: &str) -> (u16, String) {
    let mut stream = open_tls(api_addr(node), source, &node.layout.ca_path()).await.expect("connect");
    let body = serde_json::to_vec(&json!({ "password": password })).unwrap();
    let path = format!("/v1/auth/userpass/login/{user}");
    http1_request(&mut stream, "POST", &path, &[("Content-Type", "application/json")], &body).await.expect("answer")
}

#[tokio::test]
async fn failed_logins_from_one_source_do_not_lock_the_user_out_from_another() {
    let config = "[limits]\nlogin_free_failures = 2\nlogin_backoff_base_ms = 60000\nlogin_backoff_max_ms = 60000\n";
    let node = Node1::start_with(23500, true, config).await;
    node.root()
        .post("auth/userpass/users/alice", &json!({ "password": "alice-password", "policies": "default" }))
        .await
        .unwrap();

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(login_from(&node, attacker(), "alice", "guess-guess").await);
    }
    let codes: Vec<u16> = statuses.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, [400, 400, 400, 429], "two free failures, one that starts the backoff, then 429");
    let throttled = statuses[3].1.to_ascii_lowercase();
    assert!(throttled.contains("retry-after: 60"), "429 carries Retry-After: {throttled}");
    let (status, _) = login_from(&node, attacker(), "alice", "alice-password").await;
    assert_eq!(status, 429, "the guessing source waits even with the right password");

    let mut alice = node.anonymous();
    alice.login_userpass("alice", "alice-password").await.expect("alice logs in from her own address at once");
}

/// Every audit event in the replicated log.
async fn audit_events(node: &Node1) -> Vec<Value> {
    let events = node.root().get("sys/audit/events?limit=10000").await.unwrap();
    events["data"]["events"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn bogus_token_requests_are_summarized_instead_of_growing_the_replicated_audit_log() {
    let node = Node1::start_with(23510, true, "[audit]\nrefusal_summary_interval_ms = 300\n").await;
    let before = audit_events(&node).await.len();
    let bogus = node.anonymous().with_token("hvs.bogus");
    let long_path = format!("secret/data/{}", "x".repeat(4000));
    for i in 0..300 {
        let path = if i == 0 { long_path.clone() } else { format!("secret/data/flood-{i}") };
        let reply = bogus.raw("GET", &path, None, &[]).await.unwrap();
        assert_eq!(reply.status.as_u16(), 403);
    }
    let counted = |events: &[Value]| -> u64 {
        events
            .iter()
            .filter(|e| e["kind"] == json!("refusal_summary") && e["summary"]["reason"] == json!("no_valid_token"))
            .filter(|e| e["remote_addr"] == json!("127.0.0.1"))
            .filter_map(|e| e["summary"]["count"].as_u64())
            .sum()
    };
    let events = citadel::dev::wait_for("the refusals to be summarized", crate::harness::STARTUP, || async {
        let events = audit_events(&node).await;
        (counted(&events) == 300).then_some(events)
    })
    .await
    .expect("300 refusals counted");
    let added = events.len() - before;
    assert!(added <= 20, "300 refusals added {added} events to the replicated log");
    let longest = events
        .iter()
        .filter_map(|e| e["summary"]["sample_paths"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .map(str::len)
        .max()
        .unwrap();
    assert!(longest < 600, "sample paths are capped (longest {longest} bytes)");
    assert!(events.iter().any(|e| e["summary"]["sample_paths"].to_string().contains("truncated")));
}

#[tokio::test]
async fn idle_connections_from_one_source_do_not_starve_a_client_from_another() {
    let node = Node1::start_with(23520, true, "[limits]\nmax_connections_per_source = 16\n").await;
    let (addr, ca) = (api_addr(&node), node.layout.ca_path());
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(open_tls(addr, attacker(), &ca).await.expect("within the per-source cap"));
    }
    for _ in 0..10 {
        let refused = match open_tls(addr, attacker(), &ca).await {
            Err(_) => true,
            Ok(mut stream) => matches!(
                tokio::time::timeout(Duration::from_secs(10), stream.read(&mut [0u8; 1])).await,
                Ok(Ok(0) | Err(_))
            ),
        };
        assert!(refused, "a connection beyond the per-source cap is closed at once");
    }
    let started = Instant::now();
    let health = node.anonymous().health().await.expect("answered");
    assert_eq!(health.status.as_u16(), 200);
    assert!(started.elapsed() < Duration::from_secs(1), "answered in {:?}", started.elapsed());

    // One warning per interval with the count, not one line per refused connection.
    let reported = || -> (usize, u64) {
        let log = node.server_log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("connections refused")).collect();
        let count =
            lines.iter().filter_map(|l| l.split(" refused=").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
        (lines.len(), count)
    };
    wait_until("the refusals to be reported", || reported().1 == 10).await;
    assert!(reported().0 <= 2, "{} warning lines for 10 refusals", reported().0);
    drop(held);
}

#[tokio::test]
async fn slow_headers_are_dropped_after_the_header_read_timeout() {
    let node = Node1::start_with(23530, true, "[limits]\nheader_read_timeout_ms = 1000\n").await;
    let mut stream = open_tls(api_addr(&node), attacker(), &node.layout.ca_path()).await.unwrap();
    stream.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: citadel\r\n").await.unwrap();
    let started = Instant::now();
    // Keep sending a header line now and then, never finishing the headers.
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "the slow client was never dropped");
        if stream.write_all(b"X-Slow: still-coming\r\n").await.is_err() {
            break;
        }
        // Anything but a timeout (the end of the stream, an error, a refusal) means dropped.
        if tokio::time::timeout(Duration::from_millis(200), stream.read(&mut [0u8; 64])).await.is_ok() {
            break;
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(5), "dropped after {took:?}");
}

#[tokio::test]
async fn a_snapshot_restore_body_is_read_only_with_a_sudo_token_and_one_upload_at_a_time() {
    let node = Node1::start(23540).await;
    let (addr, ca) = (api_addr(&node), node.layout.ca_path());
    // Announce 200 MB, send 1 KiB: a server that read the body first would wait for the rest.
    let mut stream = open_tls(addr, "127.0.0.1".parse().unwrap(), &ca).await.unwrap();
    let head = "POST /v1/sys/storage/raft/snapshot HTTP/1.1\r\nHost: citadel\r\nX-Vault-Token: hvs.bogus\r\n\
                Content-Length: 200000000\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 1024]).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream)).await;
    let (status, _) = answer.expect("answered without the body").expect("an HTTP answer");
    assert_eq!(status, 403);

    // A token without sudo is refused the same way.
    node.root()
        .post("sys/policies/acl/reader", &json!({ "policy": "path \"sys/*\" { capabilities = [\"update\"] }" }))
        .await
        .unwrap();
    let token = node.root().post("auth/token/create", &json!({ "policies": ["reader"] })).await.unwrap();
    let token = token["auth"]["client_token"].as_str().unwrap().to_string();
    let mut stream = open_tls(addr, "127.0.0.1".parse().unwrap(), &ca).await.unwrap();
    let head = format!(
        "POST /v1/sys/storage/raft/snapshot HTTP/1.1\r\nHost: citadel\r\nX-Vault-Token: {token}\r\nContent-Length: 200000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream)).await;
    assert_eq!(answer.expect("answered without the body").expect("an HTTP answer").0, 403);

    // The root token's body is read (and found not to be a snapshot).
    let mut stream = open_tls(addr, "127.0.0.1".parse().unwrap(), &ca).await.unwrap();
    let (status, text) = http1_request(
        &mut stream,
        "POST",
        "/v1/sys/storage/raft/snapshot",
        &[("X-Vault-Token", &node.root)],
        b"not a snapshot",
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not a Citadel snapshot file"), "{text}");

    // One upload at a time: while one is being read, another is refused before its body is.
    let mut first = open_tls(addr, "127.0.0.1".parse().unwrap(), &ca).await.unwrap();
    let head = format!(
        "POST /v1/sys/storage/raft/snapshot HTTP/1.1\r\nHost: citadel\r\nX-Vault-Token: {}\r\nContent-Length: 200000000\r\n\r\n",
        node.root
    );
    first.write_all(head.as_bytes()).await.unwrap();
    first.write_all(&[b'x'; 1024]).await.unwrap();
    let (root, ca) = (node.root.as_str(), ca.as_path());
    let upload = |body: &'static [u8]| async move {
        let mut stream = open_tls(addr, "127.0.0.1".parse().unwrap(), ca).await.ok()?;
        let headers = [("X-Vault-Token", root)];
        http1_request(&mut stream, "POST", "/v1/sys/storage/raft/snapshot", &headers, body).await.ok()
    };
    let second = citadel::dev::wait_for("a second upload to be refused", Duration::from_secs(30), || async {
        upload(b"not a snapshot").await.filter(|(status, _)| *status == 503)
    })
    .await
    .unwrap();
    assert!(second.1.contains("another snapshot restore is being uploaded"), "{}", second.1);
    // Once the first upload ends (its client went away), the next one is read again.
    drop(first);
    let third = citadel::dev::wait_for("the next upload to be read", Duration::from_secs(30), || async {
        upload(b"not a snapshot").await.filter(|(status, _)| *status != 503)
    })
    .await
    .unwrap();
    assert_eq!(third.0, 400, "{}", third.1);
}

#[tokio::test]
async fn logins_beyond_the_hash_pool_get_503_with_retry_after_instead_of_piling_up() {
    let config = "[limits]\npassword_hash_concurrency = 1\npassword_hash_wait_ms = 1\n";
    let node = Node1::start_with(23550, true, config).await;
    // Distinct users: simultaneous attempts on one user are each charged before hashing, and
    // the limiter would rightly slow them down.
    for i in 0..16 {
        node.root()
            .post(&format!("auth/userpass/users/user{i}"), &json!({ "password": "user-password" }))
            .await
            .unwrap();
    }
    let body = json!({ "password": "user-password" });
    let logins = (0..16).map(|i| {
        let client = node.anonymous();
        let body = body.clone();
        async move { client.raw("POST", &format!("auth/userpass/login/user{i}"), Some(&body), &[]).await.unwrap() }
    });
    let replies = futures::future::join_all(logins).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    let ok = replies.iter().filter(|r| r.status.as_u16() == 200).count();
    let busy: Vec<_> = replies.iter().filter(|r| r.status.as_u16() == 503).collect();
    assert!(ok >= 1, "the login holding the slot succeeds");
    assert!(!busy.is_empty(), "16 simultaneous logins, one slot, a 1 ms wait: some are refused: {statuses:?}");
    let others: Vec<_> =
        replies.iter().filter(|r| ![200, 503].contains(&r.status.as_u16())).map(|r| (r.status, &r.body)).collect();
    assert!(others.is_empty(), "nothing but success or busy: {statuses:?}; the others said {others:?}");
    assert!(busy.iter().all(|r| r.headers.get("retry-after").is_some()), "every 503 says when to retry");
}
