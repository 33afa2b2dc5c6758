//! Real `citadel server` processes on loopback for integration tests. Every process is killed
//! by PID when the harness drops, whatever the test's outcome.

use std::process::Child;
use std::time::Duration;

use citadel::dev::{self, Layout};
use citadel_client::Client;

pub const EXE: &str = env!("CARGO_BIN_EXE_citadel");
/// Generous: the machine is shared with the build.
pub const STARTUP: Duration = Duration::from_secs(60);

pub struct Node1 {
    pub layout: Layout,
    pub child: Option<Child>,
    pub root: String,
    pub unseal_key: String,
    _dir: tempfile::TempDir,
}

impl Node1 {
    /// One initialized, unsealed node with a key-file seal, on `port` (API) and `port + 1`.
    pub async fn start(port: u16) -> Node1 {
        Node1::start_with(port, true, "").await
    }

    pub async fn start_with(port: u16, keyfile_seal: bool, extra_config: &str) -> Node1 {
        let mut node = Node1::spawn_uninitialized(port, keyfile_seal, extra_config).await;
        let (root, key) = dev::initialize(&node.layout).await.expect("init");
        node.root = root;
        node.unseal_key = key;
        if keyfile_seal {
            dev::wait_healthy(&node.layout, STARTUP).await.expect("node healthy");
        }
        node
    }

    /// A started node that has not been initialized.
    pub async fn spawn_uninitialized(port: u16, keyfile_seal: bool, extra_config: &str) -> Node1 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut layout = Layout::new(dir.path(), 1, port).expect("layout");
        layout.keyfile_seal = keyfile_seal;
        layout.write_files(extra_config).expect("write files");
        let child = layout.spawn(EXE.as_ref(), 0).expect("spawn server");
        let node = Node1 { layout, child: Some(child), root: String::new(), unseal_key: String::new(), _dir: dir };
        let client = node.anonymous();
        dev::wait_for("the API to answer", STARTUP, || async { dev::health_code(&client).await })
            .await
            .expect("api up");
        node
    }

    pub fn anonymous(&self) -> Client {
        self.layout.client(0).expect("client")
    }

    pub fn root(&self) -> Client {
        self.anonymous().with_token(self.root.clone())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the node before restarting it");
        self.child = Some(self.layout.spawn(EXE.as_ref(), 0).expect("respawn"));
        dev::wait_healthy(&self.layout, STARTUP).await.expect("node healthy after restart");
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.layout.log_path(0)).unwrap_or_default()
    }
}

impl Drop for Node1 {
    fn drop(&mut self) {
        self.kill9();
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
