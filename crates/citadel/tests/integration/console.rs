//! The web console (§11.1) in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/test`), driven over the W3C WebDriver protocol.
//! Ports 29700–29790.
//!
//! Set `CITADEL_SCREENSHOTS=DIR` to keep a screenshot of each page (docs/screenshots/ holds them).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use citadel::dev;

use crate::harness::{Cluster, STARTUP};

const DRIVER_PORT: u16 = 29790;
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver and the browser session it runs; the driver's process group (the browser
/// included) is killed by its id on drop.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
    base: String,
}

impl Browser {
    async fn start() -> Browser {
        use std::os::unix::process::CommandExt;
        citadel_server::tls::install_crypto_provider();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={DRIVER_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver (scripts/test installs Debian's chromium-driver)");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{DRIVER_PORT}");
        let mut browser = Browser { driver, http, session: String::new(), base };
        let deadline = Instant::now() + STARTUP;
        while browser.call("GET", "/status", None).await.is_none_or(|v| v["ready"] != true) {
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // The cluster's own CA signed the node's certificate.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--lang=en-GB"],
            },
        }}});
        let session = browser.call("POST", "/session", Some(capabilities)).await.expect("a browser session");
        browser.session = session["sessionId"].as_str().expect("session id").to_string();
        browser
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Option<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body.unwrap_or_else(|| json!({}))),
        };
        let reply: Value = request.send().await.ok()?.json().await.ok()?;
        Some(reply["value"].clone())
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let value = self.call(method, &path, body).await.expect("the driver answers");
        assert!(value.get("error").is_none(), "{method} {path}: {value}");
        value
    }

    async fn open(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self.wait_for(&format!("return document.querySelector({css:?}) ? 'yes' : null")).await;
        assert_eq!(found, "yes");
        let value = self.session_call("POST", "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        value[ELEMENT].as_str().unwrap_or_else(|| panic!("element id in {value}")).to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.session_call("POST", &format!("/element/{id}/value"), Some(json!({ "text": text }))).await;
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.session_call("POST", &format!("/element/{id}/click"), None).await;
    }

    /// Runs `script` until it returns a string, then returns that string.
    async fn wait_for(&self, script: &str) -> String {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(found) = self.script(script).await {
                return found;
            }
            assert!(Instant::now() < deadline, "the page never satisfied: {script}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn script(&self, script: &str) -> Option<String> {
        let value = self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] }))).await;
        value.as_str().map(String::from)
    }

    async fn text(&self, css: &str) -> String {
        self.script(&format!("const e = document.querySelector({css:?}); return e ? e.textContent : ''")).await.unwrap()
    }

    /// Keeps a PNG of the page when `CITADEL_SCREENSHOTS` names a directory.
    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("CITADEL_SCREENSHOTS").map(PathBuf::from) else { return };
        let png = self.session_call("GET", "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("console-{name}.png")), bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test created (chromedriver's, by its id).
        unsafe { libc::kill(-(self.driver.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

/// The name of the node whose row says it leads, as the page shows it.
const LEADER_ROW: &str = "const rows = [...document.querySelectorAll('#nodes tr')];\
     const leader = rows.find(r => r.children[2].textContent === 'leader');\
     return leader ? leader.children[0].textContent : null";

#[tokio::test]
async fn the_console_shows_the_cluster_follows_a_failover_within_two_seconds_and_takes_a_snapshot() {
    let mut cluster = Cluster::start_nodes(3, 29700, true, "").await;
    let root = cluster.root();
    root.kv_put("secret", "app/db", &json!({ "password": "s3cret" }), None).await.unwrap();
    root.kv_put("secret", "app/db", &json!({ "password": "rotated" }), None).await.unwrap();
    let leader = cluster.leader().await;
    let watcher = (0..3).find(|i| *i != leader).unwrap();
    let browser = Browser::start().await;
    browser.open(&format!("{}/ui/", cluster.layout.api_url(watcher))).await;

    // Log in through the field labelled "Token".
    let label = browser.text("label[for=token]").await;
    assert_eq!(label, "Token");
    browser.type_into("#token", &cluster.root).await;
    browser.click("#token-form button[type=submit]").await;

    // All three nodes by name, with their roles; one leads.
    let rows = browser
        .wait_for(
            "const rows = [...document.querySelectorAll('#nodes tr')];\
             return rows.length === 3 ? rows.map(r => r.children[0].textContent + '=' + r.children[2].textContent).join(',') : null",
        )
        .await;
    for i in 0..3 {
        assert!(rows.contains(&format!("node-{}=", i + 1)), "node-{} listed: {rows}", i + 1);
    }
    // The page names the leader the cluster reports. On a busy machine a few late heartbeats may
    // elect another before the page first shows it: then both are asked again, and leadership
    // that moved to the page's own node (which must outlive the kill) is handed on.
    let leader = dev::wait_for("the page and the cluster to name the same leader", STARTUP, || async {
        let shown = browser.wait_for(LEADER_ROW).await;
        let leader = cluster.leader().await;
        if leader == watcher {
            let other = cluster.layout.node_id((0..3).find(|i| *i != watcher).unwrap());
            let _ = cluster.root_at(leader).post("sys/ha/transfer-leader", &json!({ "node_id": other })).await;
            return None;
        }
        (shown == format!("node-{}", leader + 1)).then_some(leader)
    })
    .await
    .expect("the page names the cluster's leader");
    let old_leader = format!("node-{}", leader + 1);
    assert!(rows.contains("=follower"), "{rows}");
    browser.screenshot("cluster").await;

    // Kill the leader: the page names the new one, and the timeline (newest first) says so, within
    // 2 s. Only the newest "New leader" line counts: an older one may name another node.
    const NEWEST_LEADER_LINE: &str = "const line = [...document.querySelectorAll('#timeline li')]\
         .find(l => l.textContent.includes('New leader: '));";
    cluster.kill9_at(leader);
    let killed = Instant::now();
    let new_leader = browser
        .wait_for(&format!(
            "const shown = document.getElementById('leader').textContent; {NEWEST_LEADER_LINE}\
             return line && !line.textContent.includes('{old_leader} ')\
                 && shown.startsWith('node-') && !shown.startsWith('{old_leader} ') ? shown : null"
        ))
        .await;
    let took = killed.elapsed();
    println!("the console showed the new leader ({new_leader}) {} ms after the kill", took.as_millis());
    assert!(took < Duration::from_secs(2), "the page showed the new leader after {took:?}");
    // The newest line and the page's leader agree (once both have caught up with any later election).
    browser
        .wait_for(&format!(
            "const shown = document.getElementById('leader').textContent.split(' ')[0]; {NEWEST_LEADER_LINE}\
             return line && line.textContent.includes('New leader: ' + shown) ? 'yes' : null"
        ))
        .await;
    // The table follows once the new leader answers for it.
    let unreachable = browser
        .wait_for(&format!(
            "const row = [...document.querySelectorAll('#nodes tr')].find(r => r.children[0].textContent === '{old_leader}');\
             return row && row.children[4].textContent === 'unreachable' ? 'yes' : null"
        ))
        .await;
    assert_eq!(unreachable, "yes");
    browser.wait_for("return document.getElementById('banner').hidden ? 'yes' : null").await;
    assert_eq!(browser.text("#tolerance").await, "0", "the leader hears from just a quorum");
    browser.screenshot("cluster-after-failover").await;

    browser.open(&format!("{}/ui/#/nodes", cluster.layout.api_url(watcher))).await;
    browser
        .wait_for("return document.querySelectorAll('#nodes tr td.actions button').length >= 6 ? 'yes' : null")
        .await;
    browser.screenshot("nodes").await;

    browser.open(&format!("{}/ui/#/secrets", cluster.layout.api_url(watcher))).await;
    browser.wait_for("return document.querySelector('.listing button') ? 'yes' : null").await;
    browser.click(".listing button").await; // app/
    browser
        .wait_for(
            "return [...document.querySelectorAll('.listing button')].some(b => b.textContent === 'db') ? 'yes' : null",
        )
        .await;
    let db = "[...document.querySelectorAll('.listing button')].find(b => b.textContent === 'db').click(); return 'ok'";
    browser.script(db).await;
    browser.wait_for("return document.querySelectorAll('.detail tbody tr').length === 2 ? 'yes' : null").await;
    assert!(!browser.text("body").await.contains("rotated"), "a value is shown only on request");
    browser.click(".detail tbody tr button").await;
    let value = browser
        .wait_for(
            "const v = document.querySelector('.detail pre.value'); return v && v.textContent ? v.textContent : null",
        )
        .await;
    assert!(value.contains("rotated"), "{value}");
    browser.screenshot("secrets").await;

    browser.open(&format!("{}/ui/#/audit", cluster.layout.api_url(watcher))).await;
    browser.wait_for("return document.querySelectorAll('tbody tr').length > 0 ? 'yes' : null").await;
    browser.screenshot("audit").await;

    // The failover's alerts are listed.
    browser.open(&format!("{}/ui/#/alerts", cluster.layout.api_url(watcher))).await;
    let firing = browser
        .wait_for(
            "const t = document.getElementById('alerts-active').textContent;\
             return t.includes('CitadelLeaderChanged') && t.includes('CitadelNodeUnreachable') ? t : null",
        )
        .await;
    assert!(firing.contains("critical"), "{firing}");
    browser.screenshot("alerts").await;

    // Take a snapshot from the Snapshots page.
    browser.open(&format!("{}/ui/#/snapshots", cluster.layout.api_url(watcher))).await;
    browser.click("#take-snapshot").await;
    let taken = browser
        .wait_for("const t = document.getElementById('snapshot-result').textContent; return t.startsWith('Snapshot taken') ? t : null")
        .await;
    let bytes: u64 = taken.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(bytes > 1000, "{taken}");
    browser.screenshot("snapshots").await;

    // With the last other node gone the console still works, and says the node is read-only.
    let other = (0..3).find(|i| *i != leader && *i != watcher).unwrap();
    cluster.kill9_at(other);
    browser.open(&format!("{}/ui/#/cluster", cluster.layout.api_url(watcher))).await;
    let banner =
        browser.wait_for("const b = document.getElementById('banner'); return b.hidden ? null : b.textContent").await;
    assert!(banner.starts_with("Read-only mode"), "{banner}");
    browser.wait_for("return document.querySelectorAll('#nodes tr').length === 3 ? 'yes' : null").await;
    browser.screenshot("read-only").await;
    browser.session_call("DELETE", "", None).await;
}
