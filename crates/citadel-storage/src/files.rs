//! Files under a data directory (§8.4): created 0600 in 0700 directories, never opened through a
//! symbolic link, and a data directory that others can write is refused.
//!
//! Why: the Raft store, the audit spool and snapshots hold ciphertext and keyed hashes, but also
//! who did what (audit) and enough to mount an offline guessing attack on weak tokens or to
//! roll a node back. Another local user must neither read them nor swap one for a link to a
//! file they control. The process umask (set by the server at start) is the first line; every
//! place that creates a file also gives the mode explicitly, so a caller with a loose umask
//! (tests, a library user) still gets private files.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file Citadel creates under a data directory, and of key files.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of every directory Citadel creates.
pub const PRIVATE_DIR: u32 = 0o700;
/// How deep the start-up check descends: a data directory is two levels deep today.
const MAX_DEPTH: usize = 8;
/// How many entries the start-up check looks at before it gives up (a bound on start time).
const MAX_ENTRIES: usize = 100_000;

/// Why a data directory or one of its files was refused.
#[derive(Debug)]
pub enum FileError {
    /// The path is a symbolic link; Citadel never follows one under its data directory.
    Symlink(PathBuf),
    /// Group or others can write the directory: they could replace any file in it.
    WritableByOthers {
        path: PathBuf,
        mode: u32,
    },
    /// The directory tree is larger than the check's bound: something else lives there.
    TooLarge(PathBuf),
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Symlink(p) => write!(
                f,
                "{} is a symbolic link; Citadel does not follow links in its data directory: replace it with the \
                 file itself",
                p.display()
            ),
            FileError::WritableByOthers { path, mode } => write!(
                f,
                "the directory {} can be written by group or others (mode {mode:o}): anyone could replace the \
                 node's data. Fix it with: chmod 700 {}",
                path.display(),
                path.display()
            ),
            FileError::TooLarge(p) => write!(
                f,
                "{} holds more than {MAX_ENTRIES} entries or is nested deeper than {MAX_DEPTH}: it is not a Citadel \
                 data directory",
                p.display()
            ),
            FileError::Io(p, e) => write!(f, "cannot use {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for FileError {}

/// Makes every file and directory the process creates private to its user, whatever the
/// umask it was started with (the files' explicit modes stay the primary guard).
pub fn set_private_umask() {
    // SAFETY: umask only swaps the process's file creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and missing parents) with mode 0700; refuses it if it is a symbolic link.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(dir).map_err(|e| FileError::Io(dir.into(), e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| FileError::Io(dir.into(), e))?;
    if meta.file_type().is_symlink() {
        return Err(FileError::Symlink(dir.into()));
    }
    Ok(())
}

/// Opens `path` with `options` plus mode 0600 for a new file and `O_NOFOLLOW`: a symbolic link
/// at `path` is refused, naming the path. An existing file with a looser mode is tightened.
pub fn open_private(path: &Path, options: &mut OpenOptions) -> Result<File, FileError> {
    let file =
        options.mode(PRIVATE_FILE).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::ELOOP) => FileError::Symlink(path.into()),
            _ => FileError::Io(path.into(), e),
        })?;
    let meta = file.metadata().map_err(|e| FileError::Io(path.into(), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))
            .map_err(|e| FileError::Io(path.into(), e))?;
    }
    Ok(file)
}

/// Replaces `path` atomically and durably with what `write` puts into `staging`, a private file
/// beside it: written, fsynced, renamed over `path`, then the directory fsynced. A crash leaves
/// the old file or the new one. Errors name the file and the step that failed.
pub fn replace_durably(
    path: &Path,
    staging: &Path,
    write: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let err = |what: &str, e: &dyn std::fmt::Display| io::Error::other(format!("{what} {}: {e}", path.display()));
    let file = open_private(staging, OpenOptions::new().write(true).create(true).truncate(true))
        .map_err(|e| err("cannot create", &e))?;
    let mut out = io::BufWriter::new(file);
    write(&mut out).map_err(|e| err("cannot write", &e))?;
    let file = out.into_inner().map_err(|e| err("cannot write", &e))?;
    file.sync_data().map_err(|e| err("cannot write", &e))?;
    std::fs::rename(staging, path).map_err(|e| err("cannot rename to", &e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err("cannot sync the directory of", &e))
}

/// Checks a node's data directory at start, creating it 0700 if it is missing. Refuses a
/// directory (the data directory or one inside it) that group or others can write, and any
/// symbolic link inside it. Files and directories with looser modes than 0600/0700 (written by
/// an older version) are tightened; returns how many were.
pub fn secure_data_dir(dir: &Path) -> Result<usize, FileError> {
    if !dir.exists() {
        create_private_dir(dir)?;
    }
    // The data directory itself may be a link an operator placed (to another disk): followed.
    // Nothing inside it is.
    let meta = std::fs::metadata(dir).map_err(|e| FileError::Io(dir.into(), e))?;
    let mut walk = Walk { tightened: 0, seen: 0 };
    walk.visit(dir, &meta, 0)?;
    Ok(walk.tightened)
}

struct Walk {
    tightened: usize,
    seen: usize,
}

impl Walk {
    fn visit(&mut self, path: &Path, meta: &std::fs::Metadata, depth: usize) -> Result<(), FileError> {
        self.seen += 1;
        if depth > MAX_DEPTH || self.seen > MAX_ENTRIES {
            return Err(FileError::TooLarge(path.into()));
        }
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(FileError::Symlink(path.into()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if kind.is_dir() {
            if mode & 0o022 != 0 {
                return Err(FileError::WritableByOthers { path: path.into(), mode });
            }
            self.tighten(path, mode)?;
            let entries = std::fs::read_dir(path).map_err(|e| FileError::Io(path.into(), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| FileError::Io(path.into(), e))?;
                let child = entry.path();
                let child_meta = std::fs::symlink_metadata(&child).map_err(|e| FileError::Io(child.clone(), e))?;
                self.visit(&child, &child_meta, depth + 1)?;
            }
            Ok(())
        } else {
            self.tighten(path, mode)
        }
    }

    /// Clears the group and other bits (0644 becomes 0600, 0755 becomes 0700); adds none.
    fn tighten(&mut self, path: &Path, mode: u32) -> Result<(), FileError> {
        if mode & 0o077 == 0 {
            return Ok(());
        }
        let tightened = mode & !0o077;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(tightened))
            .map_err(|e| FileError::Io(path.into(), e))?;
        self.tightened += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_files_and_directories_are_private_whatever_the_umask() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("f");
        open_private(&file, OpenOptions::new().create(true).append(true)).unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn a_symlink_is_never_opened() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_private(&link, OpenOptions::new().read(true)).unwrap_err();
        assert!(matches!(&err, FileError::Symlink(p) if p == &link), "{err}");
        assert!(err.to_string().contains("link"));
    }

    #[test]
    fn an_old_data_directory_is_tightened_and_a_writable_one_refused() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("audit")).unwrap();
        std::fs::write(data.join("raft.redb"), b"x").unwrap();
        std::fs::write(data.join("audit/audit.spool"), b"x").unwrap();
        for (p, m) in [("", 0o755), ("audit", 0o755), ("raft.redb", 0o644), ("audit/audit.spool", 0o644)] {
            std::fs::set_permissions(data.join(p), std::fs::Permissions::from_mode(m)).unwrap();
        }
        assert_eq!(secure_data_dir(&data).unwrap(), 4);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("audit")), 0o700);
        assert_eq!(mode(&data.join("audit/audit.spool")), 0o600);
        assert_eq!(secure_data_dir(&data).unwrap(), 0, "nothing left to tighten");

        std::fs::set_permissions(data.join("audit"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = secure_data_dir(&data).unwrap_err().to_string();
        assert!(err.contains("audit") && err.contains("chmod 700"), "{err}");
    }

    #[test]
    fn a_symlink_inside_the_data_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        create_private_dir(&data).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", data.join("raft.redb")).unwrap();
        let err = secure_data_dir(&data).unwrap_err();
        assert!(matches!(&err, FileError::Symlink(p) if p.ends_with("raft.redb")), "{err}");
    }
}
