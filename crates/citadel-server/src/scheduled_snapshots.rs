//! Scheduled snapshots (§10.2), taken by the leader's `snapshot_auto` job: a fresh snapshot
//! archive written under the configuration's `path_prefix` (storage type `local`: the disk of
//! whichever node leads then), read back and verified whole before it counts, then only the
//! newest `retain` of that configuration's files are kept. A run that fails says why in the
//! configuration's status (`consecutive_errors` counts them) and on the event stream.

use std::io::Read;
use std::path::{Path, PathBuf};

use citadel_core::barrier::Keyring;
use citadel_core::snapshot_auto::{AutoSnapshot, AutoSnapshotConfig, AutoSnapshotStatus};
use citadel_core::UnixMillis;

use crate::events::NodeEvent;
use crate::node::Node;

/// Takes one scheduled snapshot for configuration `name` (started at `start`, the leader's
/// clock) and returns the status to record.
pub async fn take(app: &Node, name: &str, entry: &AutoSnapshot, start: UnixMillis) -> AutoSnapshotStatus {
    let outcome = write_verified(app, &entry.config, start).await;
    let end = crate::ids::now_ms();
    match outcome {
        Ok((path, size)) => {
            tracing::info!(name, path = %path.display(), size, "scheduled snapshot written and verified");
            AutoSnapshotStatus {
                last_snapshot_start: start,
                last_snapshot_end: end,
                last_snapshot_error: String::new(),
                last_snapshot_url: format!("file://{}", path.display()),
                last_snapshot_size: size,
                consecutive_errors: 0,
            }
        }
        Err(error) => {
            tracing::warn!(name, %error, "scheduled snapshot failed");
            app.events.publish(NodeEvent::SnapshotFailed { name: name.to_string(), error: error.clone() });
            AutoSnapshotStatus {
                last_snapshot_start: start,
                last_snapshot_end: end,
                last_snapshot_error: error,
                consecutive_errors: entry.status.consecutive_errors.saturating_add(1),
                ..entry.status.clone()
            }
        }
    }
}

async fn write_verified(app: &Node, config: &AutoSnapshotConfig, start: UnixMillis) -> Result<(PathBuf, u64), String> {
    let keys = app.keys().map_err(|e| format!("cannot take a snapshot: {e}"))?;
    let built = crate::snapshot::build(app, &keys).await.map_err(|e| format!("cannot take a snapshot: {e}"))?;
    let config = config.clone();
    let keyring = keys.keyring.clone();
    tokio::task::spawn_blocking(move || write_file(&config, start, &mut std::io::BufReader::new(built.file), &keyring))
        .await
        .map_err(|e| format!("the snapshot writer stopped: {e}"))?
}

/// The file of configuration `config` for a run started at `start`.
fn file_name(config: &AutoSnapshotConfig, start: UnixMillis) -> String {
    format!("{}-{start}.snap", config.file_prefix)
}

/// The run time in a file name of this configuration, or `None` for any other file.
fn run_of(config: &AutoSnapshotConfig, file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix(&config.file_prefix)?.strip_prefix('-')?.strip_suffix(".snap")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Writes the archive durably, reads it back and verifies it, then applies retention.
fn write_file(
    config: &AutoSnapshotConfig,
    start: UnixMillis,
    archive: &mut impl Read,
    keyring: &Keyring,
) -> Result<(PathBuf, u64), String> {
    let dir = Path::new(&config.path_prefix);
    citadel_storage::files::create_private_dir(dir).map_err(|e| e.to_string())?;
    let path = dir.join(file_name(config, start));
    let staging = dir.join(format!("{}.tmp", file_name(config, start)));
    if let Err(e) =
        citadel_storage::files::replace_durably(&path, &staging, |out| std::io::copy(archive, out).map(drop))
    {
        let _ = std::fs::remove_file(&staging);
        return Err(e.to_string());
    }
    // Read back and verified as it streams by: a scheduled snapshot never holds its state in memory.
    let verified = std::fs::File::open(&path)
        .and_then(|mut file| Ok((crate::snapshot::verify_file(&mut file, keyring), file.metadata()?.len())))
        .map_err(|e| format!("cannot read back {}: {e}", path.display()))
        .and_then(|(verified, len)| match verified {
            Ok(_) => Ok(len),
            Err(e) => Err(format!("{} failed verification after writing, and was deleted: {e}", path.display())),
        });
    let len = match verified {
        Ok(len) => len,
        Err(e) => {
            // A file that did not verify must not count as a snapshot, nor push a good one out.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    prune(dir, config).map_err(|e| format!("the snapshot {} is written, but retention failed: {e}", path.display()))?;
    Ok((path, len))
}

/// Deletes this configuration's oldest files beyond `retain`, and its staging files a crash
/// left behind (none is being written: runs follow one another); never touches another file.
fn prune(dir: &Path, config: &AutoSnapshotConfig) -> std::io::Result<()> {
    let mut runs: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(run) = run_of(config, &name) {
            runs.push((run, entry.path()));
        } else if name.strip_suffix(".tmp").and_then(|n| run_of(config, n)).is_some() {
            std::fs::remove_file(entry.path())?;
        }
    }
    runs.sort();
    let excess = runs.len().saturating_sub(config.retain as usize);
    for (_, path) in runs.into_iter().take(excess) {
        std::fs::remove_file(&path)?;
        tracing::info!(path = %path.display(), "scheduled snapshot removed by retention");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, retain: u32) -> AutoSnapshotConfig {
        AutoSnapshotConfig {
            interval_secs: 60,
            retain,
            path_prefix: dir.display().to_string(),
            file_prefix: "citadel".into(),
        }
    }

    #[test]
    fn only_this_configurations_files_are_pruned_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), 2);
        for run in [900, 1000, 20, 300] {
            std::fs::write(dir.path().join(file_name(&c, run)), b"x").unwrap();
        }
        for other in
            ["citadel-12.snap.tmp", "citadel-x.snap", "other-1.snap", "other-1.snap.tmp", "citadel-.snap", "notes.txt"]
        {
            std::fs::write(dir.path().join(other), b"x").unwrap();
        }
        prune(dir.path(), &c).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "citadel-.snap",
                "citadel-1000.snap",
                "citadel-900.snap",
                "citadel-x.snap",
                "notes.txt",
                "other-1.snap",
                "other-1.snap.tmp"
            ],
            "its own stale staging file goes too"
        );
    }

    #[test]
    fn a_file_that_is_not_a_valid_snapshot_fails_verification_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::new(1, [1; 32], [2; 32], [3; 32]);
        let err = write_file(&config(dir.path(), 1), 5, &mut &b"not an archive"[..], &keyring).unwrap_err();
        assert!(err.contains("failed verification"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the file that failed is gone");
    }

    #[test]
    fn an_unwritable_path_prefix_is_reported_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"x").unwrap();
        let keyring = Keyring::new(1, [1; 32], [2; 32], [3; 32]);
        let err = write_file(&config(&blocker.join("sub"), 1), 5, &mut &b"x"[..], &keyring).unwrap_err();
        assert!(err.contains("a-file"), "{err}");
    }
}
