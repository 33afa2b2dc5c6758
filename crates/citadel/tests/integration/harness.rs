//! Real `citadel server` processes on loopback for integration tests. Every process is killed
//! by PID when the harness drops, whatever the test's outcome.

use std::process::Child;
use std::time::Duration;

use citadel::dev::{self, Layout};
use citadel_client::Client;

pub const EXE: &str = env!("CARGO_BIN_EXE_citadel");
/// Generous: the machine is shared with the build.
pub const STARTUP: Duration = Duration::from_secs(60);

/// A cluster of real server processes (node `i` has API port `port + 10·i`).
pub struct Cluster {
    pub layout: Layout,
    pub children: Vec<Option<Child>>,
    pub root: String,
    pub unseal_key: String,
    _dir: tempfile::TempDir,
}

/// Most API tests need one node.
pub type Node1 = Cluster;

impl Cluster {
    /// One initialized, unsealed node with a key-file seal, on `port` (API) and `port + 1`.
    pub async fn start(port: u16) -> Cluster {
        Cluster::start_with(port, true, "").await
    }

    pub async fn start_with(port: u16, keyfile_seal: bool, extra_config: &str) -> Cluster {
        Cluster::start_nodes(1, port, keyfile_seal, extra_config).await
    }

    /// `nodes` nodes: the first is initialized, the others join it; all unsealed (key files).
    pub async fn start_nodes(nodes: usize, port: u16, keyfile_seal: bool, extra_config: &str) -> Cluster {
        Cluster::start_partial(nodes, nodes, port, keyfile_seal, extra_config).await
    }

    /// A layout of `nodes` nodes of which only the first `running` are started (and initialized
    /// through the first); `respawn_at` starts the rest later, and they join.
    pub async fn start_partial(
        nodes: usize,
        running: usize,
        port: u16,
        keyfile_seal: bool,
        extra_config: &str,
    ) -> Cluster {
        let mut cluster = Cluster::spawn_uninitialized_nodes(nodes, running, port, keyfile_seal, extra_config).await;
        let (root, key) = dev::initialize(&cluster.layout).await.expect("init");
        cluster.root = root;
        cluster.unseal_key = key;
        if keyfile_seal {
            cluster.wait_healthy(running).await;
        }
        cluster
    }

    /// Waits until the first `running` nodes are unsealed, serving, and voting.
    pub async fn wait_healthy(&self, running: usize) {
        let first = Layout { nodes: running, ..self.layout.clone() };
        dev::wait_healthy(&first, STARTUP).await.expect("cluster healthy");
        let root = self.root();
        dev::wait_for("every node to vote", STARTUP, || async {
            let config = root.get("sys/storage/raft/configuration?stale=true").await.ok()?;
            let servers = config["data"]["config"]["servers"].as_array()?.clone();
            let voters = servers.iter().filter(|s| s["voter"] == serde_json::json!(true)).count();
            (voters >= running).then_some(())
        })
        .await
        .expect("all nodes voters");
    }

    /// A started node that has not been initialized.
    pub async fn spawn_uninitialized(port: u16, keyfile_seal: bool, extra_config: &str) -> Cluster {
        Cluster::spawn_uninitialized_nodes(1, 1, port, keyfile_seal, extra_config).await
    }

    async fn spawn_uninitialized_nodes(
        nodes: usize,
        running: usize,
        port: u16,
        keyfile_seal: bool,
        extra_config: &str,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut layout = Layout::new(dir.path(), nodes, port).expect("layout");
        layout.keyfile_seal = keyfile_seal;
        layout.write_files(extra_config).expect("write files");
        let children =
            (0..nodes).map(|i| (i < running).then(|| layout.spawn(EXE.as_ref(), i).expect("spawn server"))).collect();
        let cluster = Cluster { layout, children, root: String::new(), unseal_key: String::new(), _dir: dir };
        for i in 0..running {
            let client = cluster.anonymous_at(i);
            dev::wait_for("the API to answer", STARTUP, || async { dev::health_code(&client).await })
                .await
                .expect("api up");
        }
        cluster
    }

    pub fn anonymous_at(&self, i: usize) -> Client {
        self.layout.client(i).expect("client")
    }

    pub fn root_at(&self, i: usize) -> Client {
        self.anonymous_at(i).with_token(self.root.clone())
    }

    pub fn anonymous(&self) -> Client {
        self.anonymous_at(0)
    }

    pub fn root(&self) -> Client {
        self.root_at(0)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9_at(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// SIGSTOP (`paused`) or SIGCONT: the node stops answering without losing anything, as a
    /// process starved of CPU or swapped out does.
    pub fn pause_at(&self, i: usize, paused: bool) {
        let child = self.children[i].as_ref().expect("the node is running");
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill only sends a signal to the child we started (by its pid).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    }

    pub fn kill9(&mut self) {
        self.kill9_at(0);
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// SIGTERM, as systemd stops a node; waits (with a deadline) for it to exit by itself.
    pub async fn terminate_at(&mut self, i: usize) -> std::process::ExitStatus {
        let mut child = self.children[i].take().expect("the node is running");
        // SAFETY: kill only sends a signal to the child we started (by its pid).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + STARTUP;
        loop {
            if let Some(status) = child.try_wait().expect("poll the node") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {} did not stop within {STARTUP:?} of SIGTERM", self.layout.node_id(i));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The node's exit status, if it has stopped on its own.
    pub fn exited_at(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.children[i].as_mut().and_then(|c| c.try_wait().expect("poll the node"))
    }

    /// Starts a killed node again (without waiting for it to be healthy).
    pub fn respawn_at(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "kill the node before restarting it");
        self.children[i] = Some(self.layout.spawn(EXE.as_ref(), i).expect("respawn"));
    }

    pub async fn restart(&mut self) {
        self.respawn_at(0);
        dev::wait_healthy(&self.layout, STARTUP).await.expect("node healthy after restart");
    }

    /// Index of the node the others agree leads, waiting for one to be elected.
    pub async fn leader(&self) -> usize {
        let running: Vec<usize> = (0..self.layout.nodes).filter(|i| self.is_running(*i)).collect();
        dev::wait_for("a leader", STARTUP, || async {
            for &i in &running {
                if let Ok(h) = self.anonymous_at(i).health().await {
                    if h.status == 200 && h.body["ha_mode"] == serde_json::json!("leader") {
                        return Some(i);
                    }
                }
            }
            None
        })
        .await
        .expect("leader elected")
    }

    /// Node `i`'s Raft term, from its sys/health; `None` if it does not answer.
    pub async fn term_at(&self, i: usize) -> Option<u64> {
        self.anonymous_at(i).health().await.ok()?.body["term"].as_u64()
    }

    /// Every node's term (`None` for a stopped or silent node): a test that needs one leader
    /// throughout compares them with the term it started in.
    pub async fn terms(&self) -> Vec<Option<u64>> {
        let mut terms = Vec::new();
        for i in 0..self.layout.nodes {
            terms.push(if self.is_running(i) { self.term_at(i).await } else { None });
        }
        terms
    }

    /// Runs the `citadel` CLI against node `i` as root (blocking: the nodes are other processes).
    pub fn cli_at(&self, i: usize, args: &[&str]) -> std::process::Output {
        std::process::Command::new(EXE)
            .args(args)
            .env("CITADEL_ADDR", self.layout.api_url(i))
            .env("CITADEL_TOKEN", &self.root)
            .env("CITADEL_CACERT", self.layout.ca_path())
            .output()
            .expect("run the citadel CLI")
    }

    pub fn server_log_at(&self, i: usize) -> String {
        std::fs::read_to_string(self.layout.log_path(i)).unwrap_or_default()
    }

    pub fn server_log(&self) -> String {
        self.server_log_at(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill9_at(i);
        }
    }
}

/// Waits (with a generous deadline) for a condition; never a fixed sleep.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    dev::wait_for(what, STARTUP, || {
        let ok = condition();
        async move { ok.then_some(()) }
    })
    .await
    .expect("condition");
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
