//! Alerts (§11.2) delivered to real receivers: a Prometheus Alertmanager (Debian's
//! `prometheus-alertmanager`) through its API, a webhook receiver (this test, speaking HTTP on
//! loopback) for Alertmanager's webhook payload, which Citadel sends directly and the
//! Alertmanager sends on, Debian's rsyslog, and Python's aiosmtpd requiring STARTTLS; all
//! installed by `scripts/test`. Ports 29800–29890.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::harness::{Cluster, STARTUP};

const CITADEL_HOOK: u16 = 29880;
const AM_HOOK: u16 = 29881;
const ALERTMANAGER: u16 = 29870;
const SYSLOG: u16 = 29882;
const SMTP: u16 = 29883;

/// A webhook receiver: records each JSON body it is sent; answers 503 while `refusing`.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<Value>>>,
    refusing: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(port: u16) -> Receiver {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the receiver");
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let Some(body) = citadel::alert_bench::read_http_body(&mut stream).await else { return };
                    let refusing = r.refusing.load(Ordering::SeqCst);
                    if !refusing {
                        if let Ok(json) = serde_json::from_slice(&body) {
                            r.bodies.lock().unwrap().push(json);
                        }
                    }
                    let status = if refusing { "503 Service Unavailable" } else { "200 OK" };
                    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        receiver
    }

    /// How many bodies arrived so far: a phase of the test looks only at what came after.
    fn mark(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    /// Every alert received since `mark`, as (alertname, node label, status).
    fn alerts(&self, mark: usize) -> Vec<(String, String, String)> {
        let bodies = self.bodies.lock().unwrap();
        bodies[mark.min(bodies.len())..]
            .iter()
            .flat_map(|b| b["alerts"].as_array().cloned().unwrap_or_default())
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
                (label("alertname"), label("node"), a["status"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    /// Waits for `alertname` about `node` (`None`: an alert about the cluster) with `status`,
    /// received after `mark`.
    async fn wait_for(&self, what: &str, mark: usize, alertname: &str, node: Option<u64>, status: &str) {
        let deadline = Instant::now() + STARTUP;
        let node = node.map_or(String::new(), |n| n.to_string());
        let wanted = (alertname.to_string(), node, status.to_string());
        while !self.alerts(mark).contains(&wanted) {
            assert!(Instant::now() < deadline, "{what} never received {wanted:?}; got {:?}", self.alerts(mark));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An Alertmanager that sends every notification (resolved ones too) to `AM_HOOK` at once.
struct Alertmanager {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "route: {{ receiver: hook, group_by: ['...'], group_wait: 0s, group_interval: 1s, repeat_interval: 1h }}\n\
             receivers:\n  - name: hook\n    webhook_configs: [{{ url: 'http://127.0.0.1:{AM_HOOK}/', send_resolved: true }}]\n"
        );
        std::fs::write(dir.path().join("alertmanager.yml"), config).unwrap();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", dir.path().join("alertmanager.yml").display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{ALERTMANAGER}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus-alertmanager (scripts/test installs Debian's package)");
        Alertmanager { child, _dir: dir }
    }

    /// The alerts it holds, by alertname and node: their fingerprint.
    async fn fingerprints(&self) -> Vec<(String, String, String)> {
        let url = format!("http://127.0.0.1:{ALERTMANAGER}/api/v2/alerts");
        let Ok(reply) = reqwest::get(url).await else { return Vec::new() };
        let alerts: Value = reply.json().await.unwrap_or(Value::Null);
        alerts
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
                (label("alertname"), label("node"), a["fingerprint"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn alerts_reach_alertmanager_and_a_webhook_on_failover_resolve_on_recovery_and_survive_a_leader_killed_mid_delivery(
) {
    citadel_server::tls::install_crypto_provider();
    let direct = Receiver::start(CITADEL_HOOK).await;
    let via_alertmanager = Receiver::start(AM_HOOK).await;
    let alertmanager = Alertmanager::start();
    let mut cluster = Cluster::start_nodes(3, 29800, true, "").await;
    let root = cluster.root();
    let hook = json!({ "type": "webhook", "url": format!("http://127.0.0.1:{CITADEL_HOOK}/citadel") });
    root.post("sys/alerts/sinks/hook", &hook).await.unwrap();
    let am = json!({ "type": "alertmanager", "url": format!("http://127.0.0.1:{ALERTMANAGER}") });
    root.post("sys/alerts/sinks/am", &am).await.unwrap();
    let bad = json!({ "type": "webhook", "url": "file:///etc/passwd" });
    let refused = root.raw("POST", "sys/alerts/sinks/bad", Some(&bad), &[]).await.unwrap();
    assert_eq!(refused.status, 400, "{:?}", refused.body);

    // The first leader's election is announced, and Alertmanager agrees on its fingerprint.
    let first = cluster.leader().await;
    let first_id = cluster.layout.node_id(first);
    direct.wait_for("the webhook", 0, "CitadelLeaderChanged", Some(first_id), "firing").await;
    let listed = root.get("sys/alerts").await.unwrap()["data"].clone();
    let ours = listed["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "CitadelLeaderChanged")
        .map(|a| a["fingerprint"].as_str().unwrap().to_string())
        .expect("listed in sys/alerts");
    let deadline = Instant::now() + STARTUP;
    loop {
        let held = alertmanager.fingerprints().await;
        if let Some((_, _, theirs)) = held.iter().find(|(name, ..)| name == "CitadelLeaderChanged") {
            assert_eq!(theirs, &ours, "the same fingerprint as Alertmanager's");
            break;
        }
        assert!(Instant::now() < deadline, "Alertmanager never received the alert");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the leader: the new leader's election and the dead node arrive at both receivers.
    let receivers = [(&direct, "the webhook"), (&via_alertmanager, "Alertmanager's webhook")];
    let marks = receivers.map(|(r, _)| r.mark());
    cluster.kill9_at(first);
    let second = cluster.leader().await;
    let second_id = cluster.layout.node_id(second);
    for ((receiver, what), mark) in receivers.iter().zip(marks) {
        receiver.wait_for(what, mark, "CitadelLeaderChanged", Some(second_id), "firing").await;
        receiver.wait_for(what, mark, "CitadelNodeUnreachable", Some(first_id), "firing").await;
    }
    // Restart it: the resolved notice arrives.
    let marks = receivers.map(|(r, _)| r.mark());
    cluster.respawn_at(first);
    for ((receiver, what), mark) in receivers.iter().zip(marks) {
        receiver.wait_for(what, mark, "CitadelNodeUnreachable", Some(first_id), "resolved").await;
    }
    // An ordinary failover is no outage: no node sent an alert of its own.
    for (receiver, what) in receivers {
        let leaderless =
            receiver.alerts(0).into_iter().filter(|a| a.0 == "CitadelNoLeader" || a.0 == "CitadelReadOnly");
        assert_eq!(leaderless.count(), 0, "{what} was paged for a failover");
    }

    // The receiver refuses while the leader dies with notices still owed: its successor sends them.
    cluster.wait_healthy(3).await;
    let owed_mark = direct.mark();
    direct.refusing.store(true, Ordering::SeqCst);
    let leader = cluster.leader().await;
    let leader_id = cluster.layout.node_id(leader);
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let victim_id = cluster.layout.node_id(victim);
    cluster.kill9_at(victim);
    owed_to_hook(&cluster.root_at(leader), "active", victim_id).await;
    // The victim comes back: the leader resolves its alert, and owes that notice too.
    cluster.respawn_at(victim);
    cluster.wait_healthy(3).await;
    owed_to_hook(&cluster.root_at(leader), "resolved", victim_id).await;
    cluster.kill9_at(leader);
    direct.refusing.store(false, Ordering::SeqCst);
    // Only the dead leader's outbox held this notice: the next leader sees the victim healthy.
    direct.wait_for("the webhook", owed_mark, "CitadelNodeUnreachable", Some(victim_id), "resolved").await;
    direct.wait_for("the webhook", owed_mark, "CitadelNodeUnreachable", Some(leader_id), "firing").await;

    // A majority lost: the survivor has no leader and sends its own alerts; a leader back, it
    // sends their resolved notices.
    let up: Vec<usize> = (0..3).filter(|i| cluster.is_running(*i)).collect();
    let marks = receivers.map(|(r, _)| r.mark());
    cluster.kill9_at(up[0]);
    let survivor_id = cluster.layout.node_id(up[1]);
    for ((receiver, what), mark) in receivers.iter().zip(marks) {
        receiver.wait_for(what, mark, "CitadelNoLeader", None, "firing").await;
        receiver.wait_for(what, mark, "CitadelReadOnly", Some(survivor_id), "firing").await;
    }
    let marks = receivers.map(|(r, _)| r.mark());
    cluster.respawn_at(up[0]);
    for ((receiver, what), mark) in receivers.iter().zip(marks) {
        receiver.wait_for(what, mark, "CitadelNoLeader", None, "resolved").await;
        receiver.wait_for(what, mark, "CitadelReadOnly", Some(survivor_id), "resolved").await;
    }
}

/// Waits until the leader's `sys/alerts` lists, under `section` (`active` or `resolved`),
/// `CitadelNodeUnreachable` for `node` with its notice still owed to the `hook` sink.
async fn owed_to_hook(leader: &citadel_client::Client, section: &str, node: u64) {
    let what = format!("CitadelNodeUnreachable for node {node} {section} and owed to the hook");
    citadel::dev::wait_for(&what, STARTUP, || async {
        let body = leader.get("sys/alerts").await.ok()?;
        let owed = body["data"][section].as_array()?.iter().any(|a| {
            a["labels"]["alertname"] == "CitadelNodeUnreachable"
                && a["labels"]["node"].as_str() == Some(node.to_string().as_str())
                && a["deliveries"]["hook"] == "pending"
        });
        owed.then_some(())
    })
    .await
    .expect("the alert");
}

/// A process this test started, killed by its PID on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + STARTUP;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// rsyslog taking RFC 6587 octet-counted messages on TCP, writing each raw to `dir/messages`.
fn rsyslog(dir: &std::path::Path) -> Daemon {
    let config = format!(
        "global(workDirectory=\"{dir}\")\n\
         module(load=\"imtcp\")\n\
         input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{SYSLOG}\")\n\
         template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
         *.* action(type=\"omfile\" file=\"{dir}/messages\" template=\"raw\")\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("rsyslog.conf"), config).unwrap();
    let child = Command::new("rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(dir.join("rsyslog.conf"))
        .arg("-i")
        .arg(dir.join("rsyslog.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rsyslogd (scripts/test installs Debian's rsyslog)");
    Daemon(child)
}

/// aiosmtpd requiring STARTTLS, with a certificate for 127.0.0.1 signed by `ca`, storing mail
/// in the maildir `dir/mail`.
fn smtp_server(dir: &std::path::Path, ca: &std::path::Path, ca_key: &std::path::Path) -> Daemon {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "smtp-key.pem",
        "-out",
        "smtp.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let (ca, ca_key) = (ca.display().to_string(), ca_key.display().to_string());
    run(&[
        "x509",
        "-req",
        "-in",
        "smtp.csr",
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        "smtp.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
    let child = Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{SMTP}"), "-c", "aiosmtpd.handlers.Mailbox"])
        .arg("--tlscert")
        .arg(dir.join("smtp.pem"))
        .arg("--tlskey")
        .arg(dir.join("smtp-key.pem"))
        .arg(dir.join("mail"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start aiosmtpd (scripts/test installs it with pip)");
    Daemon(child)
}

/// Every mail in the maildir, as text.
fn mails(dir: &std::path::Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir.join("mail/new")).into_iter().flatten().flatten() {
        all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    all
}

async fn wait_text(what: &str, read: impl Fn() -> String, wanted: &str) {
    let deadline = Instant::now() + STARTUP;
    while !read().contains(wanted) {
        assert!(Instant::now() < deadline, "{what} never received {wanted:?}; it holds:\n{}", read());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn alerts_reach_rsyslog_and_an_smtp_server_over_starttls_on_failover_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    // The syslog sink is declared in every node's config; the email sink through the API.
    let declared = format!("[[alerts.sink]]\nname = \"syslog\"\ntype = \"syslog\"\naddress = \"127.0.0.1:{SYSLOG}\"\n");
    let mut cluster = Cluster::start_nodes(3, 29830, true, &declared).await;
    let _syslog = rsyslog(dir.path());
    let _smtp = smtp_server(dir.path(), &cluster.layout.ca_path(), &cluster.layout.ca_key_path());
    wait_listening(SYSLOG, "rsyslogd").await;
    wait_listening(SMTP, "aiosmtpd").await;
    let root = cluster.root();
    let ca = cluster.layout.ca_path().display().to_string();
    let email = json!({ "type": "email", "smtp_host": "127.0.0.1", "smtp_port": SMTP, "from": "citadel@example.com",
        "to": "ops@example.com", "ca_file": ca });
    root.post("sys/alerts/sinks/mail", &email).await.unwrap();
    let no_ca = json!({ "type": "email", "smtp_host": "127.0.0.1", "smtp_port": SMTP, "from": "citadel@example.com",
        "to": "ops@example.com" });
    let refused = root.raw("POST", "sys/alerts/sinks/no-ca", Some(&no_ca), &[]).await.unwrap();
    assert!(refused.body["errors"][0].as_str().unwrap().contains("ca_file"), "{:?}", refused.body);

    let messages = || std::fs::read_to_string(dir.path().join("messages")).unwrap_or_default();
    let mail = || mails(dir.path());
    let first = cluster.leader().await;
    let first_id = cluster.layout.node_id(first);
    wait_text("rsyslog", messages, &format!("FIRING CitadelLeaderChanged: Node {first_id} became the leader")).await;
    wait_text("the SMTP server", mail, &format!("FIRING CitadelLeaderChanged: Node {first_id} became the leader"))
        .await;
    assert!(messages().contains("[citadel@32473 fingerprint="), "structured data: {}", messages());

    cluster.kill9_at(first);
    let second_id = cluster.layout.node_id(cluster.leader().await);
    for (what, read) in [("rsyslog", &messages as &dyn Fn() -> String), ("the SMTP server", &mail)] {
        wait_text(what, read, &format!("FIRING CitadelLeaderChanged: Node {second_id} became the leader")).await;
        wait_text(what, read, &format!("FIRING CitadelNodeUnreachable: Node {first_id} is unreachable")).await;
    }
    cluster.respawn_at(first);
    for (what, read) in [("rsyslog", &messages as &dyn Fn() -> String), ("the SMTP server", &mail)] {
        wait_text(what, read, &format!("RESOLVED CitadelNodeUnreachable: Node {first_id} is unreachable")).await;
    }
}
