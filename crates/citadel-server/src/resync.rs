//! Resync (§10.1): a node discards its replicated state and catches up from the leader's
//! snapshot, as a new replica would.
//!
//! The discard runs at start, before storage opens, driven by a marker file: the running node
//! stops as on SIGTERM, then, with Raft stopped, writes the marker and replaces itself with a
//! fresh start of the same command line (same PID, so systemd and `citadel dev` keep tracking
//! it). A crash after the marker finds it at the next start and finishes the job. Only a node
//! that does not vote may forget its log: a voter that forgot whom it voted for could vote twice
//! in a term. The leader demotes it first (`lifecycle.rs`), and the node checks again once Raft
//! has stopped, when nothing can change any more: a new leader may have given the vote back.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::node::Node;

/// The marker file, in the data directory.
pub const MARKER: &str = "RESYNC";

/// How long this node waits to see itself demoted before it refuses to discard anything.
const DEMOTION_WAIT: Duration = Duration::from_secs(5);

/// Called by the leader once it has demoted this node: asks the server to stop and restart.
pub async fn request(app: &Node) -> Result<(), String> {
    let me = app.node_id();
    let deadline = tokio::time::Instant::now() + DEMOTION_WAIT;
    while app.votes(me) {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("node {me} still votes: a voter cannot discard its log (demote it first)"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("resync requested: restarting to discard the replicated state and catch up from the cluster");
    app.restart.notify_one();
    Ok(())
}

/// With Raft stopped: marks the data directory for the discard, unless the membership this
/// node last saw (its log's latest, committed or not) gives it a vote again.
pub fn mark_unless_voting(app: &Node) {
    let me = app.node_id();
    if app.votes(me) {
        tracing::error!(
            "resync abandoned: node {me} was given a vote again before it stopped, and a voter must not forget \
             its log; it restarts with its state (run the resync again)"
        );
        return;
    }
    let marker = app.config.data_dir.join(MARKER);
    if let Err(e) = write_marker(&marker) {
        tracing::error!(path = %marker.display(), error = %e, "resync abandoned: cannot write the marker; restarting with the state");
    }
}

fn write_marker(path: &Path) -> std::io::Result<()> {
    citadel_storage::files::replace_durably(path, &path.with_extension("new"), |out| {
        out.write_all(b"the replicated state is discarded at the next start (citadel operator node resync)\n")
    })
}

/// At start, before storage opens: if a resync was requested, discards the replicated state,
/// then the marker (last, so an interrupted discard is finished by the next start).
pub fn discard_if_requested(data_dir: &Path) -> anyhow::Result<()> {
    let marker = data_dir.join(MARKER);
    if !marker.exists() {
        return Ok(());
    }
    let deleted =
        citadel_storage::discard_replicated_state(data_dir).context("resync: discarding the replicated state")?;
    tracing::warn!(
        deleted = ?deleted,
        "resync: discarded this node's replicated state; it catches up from the cluster's snapshot"
    );
    std::fs::remove_file(&marker).with_context(|| format!("resync: cannot delete {}", marker.display()))?;
    Ok(())
}

/// Replaces this process with a fresh start of the same command line. Returns only on failure.
pub fn restart_process() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow::anyhow!("resync: cannot find this program to restart it: {e}"),
    };
    tracing::info!("resync: restarting");
    let err = std::process::Command::new(&exe).args(std::env::args_os().skip(1)).exec();
    anyhow::anyhow!("resync: cannot restart {}: {err}; start the node again (it will resync)", exe.display())
}
