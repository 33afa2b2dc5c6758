use crate::harness::Node1;

/// Runs tests/hvac_client.py (hvac, the maintained Vault client for Python) against a node.
/// `scripts/test` installs hvac; without it this test fails rather than skipping.
#[tokio::test]
async fn hvac_python_client_drives_the_api() {
    let node = Node1::start(21500).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("hvac_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("VAULT_ADDR", node.layout.api_url(0))
        .env("VAULT_TOKEN", &node.root)
        .env("VAULT_CACERT", node.layout.ca_path())
        .output()
        .await
        .expect("python3 must be installed (scripts/test installs the Python dependencies)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvac run failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        node.server_log()
    );
    assert!(stdout.contains("hvac: all checks passed"), "{stdout}");
}
