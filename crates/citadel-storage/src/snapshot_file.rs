//! The state machine's latest snapshot, in a file of its own (`DATA/snapshot.bin`).
//!
//! Why a file and not a value in `raft.redb`: a snapshot is one large blob replaced whole each
//! time, and redb's copy-on-write commits of it grew the database to many times the snapshot's
//! size. A file is replaced atomically (written beside, fsynced, renamed, directory fsynced), so
//! a crash leaves either the old snapshot or the new one, and its record checksum is verified
//! before it is trusted.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::files::open_private;

/// File name of the snapshot inside a node's data directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
/// Where a new snapshot is written before it is renamed over [`SNAPSHOT_FILE`].
pub const STAGING_FILE: &str = "snapshot.bin.new";

pub(crate) struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    pub(crate) fn in_dir(data_dir: &Path) -> SnapshotFile {
        SnapshotFile { path: data_dir.join(SNAPSHOT_FILE) }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The snapshot, if one was ever written; its checksum verified.
    pub(crate) fn read<T: DeserializeOwned>(&self) -> io::Result<Option<T>> {
        let mut file = match open_private(&self.path, std::fs::OpenOptions::new().read(true)) {
            Ok(f) => f,
            Err(crate::files::FileError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes)?;
        codec::decode(&bytes, &self.path.display().to_string()).map(Some)
    }

    /// Replaces the snapshot atomically and durably.
    pub(crate) fn write<T: Serialize>(&self, value: &T) -> io::Result<()> {
        let bytes = codec::encode(value);
        crate::files::replace_durably(&self.path, &self.path.with_file_name(STAGING_FILE), |out| out.write_all(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_replaced_whole_and_a_damaged_one_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        assert_eq!(file.read::<Vec<u32>>().unwrap(), None);
        file.write(&vec![1u32, 2, 3]).unwrap();
        file.write(&vec![4u32]).unwrap();
        assert_eq!(file.read::<Vec<u32>>().unwrap(), Some(vec![4]));
        let mut bytes = std::fs::read(file.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(file.path(), bytes).unwrap();
        let err = file.read::<Vec<u32>>().unwrap_err().to_string();
        assert!(err.contains(SNAPSHOT_FILE) && err.contains("checksum"), "{err}");
    }
}
