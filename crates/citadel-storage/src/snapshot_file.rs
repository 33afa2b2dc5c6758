//! The state machine's latest snapshot, in a file of its own (`DATA/snapshot.bin`).
//!
//! Why a file and not a value in `raft.redb`: a snapshot is one large blob replaced whole each
//! time, and redb's copy-on-write commits of it grew the database to many times the snapshot's
//! size. A file is replaced atomically (written beside, fsynced, renamed, directory fsynced), so
//! a crash leaves either the old snapshot or the new one, and its checksums are verified
//! before it is trusted.
//!
//! Layout: `[3][header length: u32 LE][header record][snapshot record]`, where the header
//! record holds openraft's meta ([`SnapshotHeader`]) and the snapshot record is the snapshot
//! itself (a [`crate::codec::StoredSnapshot`]), each a checksummed record of its own. The
//! snapshot is serialized straight into the file: encoding it in memory first, then again
//! base64-encoded inside an outer record (the layout before, still read), made each snapshot
//! cost a node ten times its size in memory for a moment (`bench scale`: a 27 MB snapshot took
//! a node from 260 to 560 MiB).

use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec::{self, StoredLogId, StoredMembershipState};
use crate::files::open_private;

/// File name of the snapshot inside a node's data directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
/// Where a new snapshot is written before it is renamed over [`SNAPSHOT_FILE`].
pub const STAGING_FILE: &str = "snapshot.bin.new";

/// The first byte of the file's layout (the layout before began with a record's format byte, 1).
const LAYOUT: u8 = 3;
/// The layout byte and the header's length.
const PREFIX: usize = 5;
/// A header holds a log id and a membership: a length beyond this is damage.
const MAX_HEADER: usize = 1 << 20;

/// openraft's meta of a snapshot, in our encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    pub last_log_id: Option<StoredLogId>,
    pub membership: StoredMembershipState,
}

/// A snapshot as read: its meta and its record's bytes (checksum verified, not decoded). Its
/// serde form is how the layout before stored it (the data base64-encoded inside one record),
/// still read from old files and from format 3's `raft.redb`.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSnapshotRecord {
    pub last_log_id: Option<StoredLogId>,
    pub membership: StoredMembershipState,
    #[serde(with = "citadel_core::encoding")]
    pub data: Vec<u8>,
}

/// A snapshot's record in its file, checksums verified when it was opened
/// ([`SnapshotFile::open_record`]).
pub struct SnapshotRecordFile {
    pub last_log_id: Option<StoredLogId>,
    pub membership: StoredMembershipState,
    file: std::fs::File,
    /// Where the record starts in the file.
    start: u64,
    len: u64,
}

impl SnapshotRecordFile {
    /// The record's size in bytes.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Reads the record from its first byte to its last, each time it is called.
    pub fn reader(&mut self) -> io::Result<impl Read + '_> {
        self.file.seek(io::SeekFrom::Start(self.start))?;
        Ok(io::BufReader::with_capacity(1 << 16, &self.file).take(self.len))
    }
}

/// Reads the header at the start of a file of this layout, and where it ends; `None` for a
/// file in the layout before, which has no header of its own.
fn read_header(file: &mut impl Read, what: &str) -> io::Result<Option<(SnapshotHeader, u64)>> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"));
    let mut prefix = [0; PREFIX];
    file.read_exact(&mut prefix).map_err(|_| bad("the file is truncated".into()))?;
    if prefix[0] != LAYOUT {
        return Ok(None);
    }
    let len = u32::from_le_bytes(prefix[1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_HEADER {
        return Err(bad(format!("a header of {len} bytes: the file is damaged")));
    }
    let mut header = vec![0; len];
    file.read_exact(&mut header).map_err(|_| bad("the file is truncated".into()))?;
    Ok(Some((codec::decode(&header, what)?, (PREFIX + len) as u64)))
}

pub(crate) struct SnapshotFile {
    path: PathBuf,
    /// Held while the file is replaced: a snapshot built while a newer one was installed
    /// (openraft builds on a task of its own) must not take the newer one's place.
    replacing: std::sync::Mutex<()>,
}

impl SnapshotFile {
    pub(crate) fn in_dir(data_dir: &Path) -> SnapshotFile {
        SnapshotFile { path: data_dir.join(SNAPSHOT_FILE), replacing: std::sync::Mutex::new(()) }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The snapshot, if one was ever written; its checksums verified (the header's and the
    /// snapshot record's; in the layout before, the one record's).
    pub(crate) fn read(&self) -> io::Result<Option<StoredSnapshotRecord>> {
        let mut file = match open_private(&self.path, std::fs::OpenOptions::new().read(true)) {
            Ok(f) => f,
            Err(crate::files::FileError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        let size = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut bytes = Vec::with_capacity(size);
        file.read_to_end(&mut bytes)?;
        let what = self.path.display().to_string();
        if bytes.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: the file is empty")));
        }
        match read_header(&mut &bytes[..], &what)? {
            Some((header, header_end)) => {
                bytes.drain(..header_end as usize);
                codec::verify(&bytes, &what)?;
                Ok(Some(StoredSnapshotRecord {
                    last_log_id: header.last_log_id,
                    membership: header.membership,
                    data: bytes,
                }))
            }
            // The layout before: one record, the snapshot base64-encoded inside it.
            None => codec::decode(&bytes, &what).map(Some),
        }
    }

    /// Rewrites a snapshot an earlier build left in the layout before in this one, which can be
    /// streamed ([`Self::open_record`]): read whole, once. Does nothing to a file in this layout,
    /// or without a file. A damaged file of the layout before is refused (`InvalidData`).
    pub(crate) fn upgrade_layout(&self) -> io::Result<()> {
        let mut first = [0];
        match open_private(&self.path, std::fs::OpenOptions::new().read(true)) {
            Ok(mut file) => {
                if file.read(&mut first)? == 0 {
                    // Empty: `open_record` names the damage.
                    return Ok(());
                }
            }
            Err(crate::files::FileError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
        if first[0] == LAYOUT {
            return Ok(());
        }
        let Some(record) = self.read()? else { return Ok(()) };
        tracing::info!(path = %self.path.display(), "rewriting the snapshot in this build's layout");
        self.write(&record)
    }

    /// Replaces the snapshot atomically and durably with one whose record is already encoded,
    /// unless the file holds a later one.
    pub(crate) fn write(&self, record: &StoredSnapshotRecord) -> io::Result<()> {
        let header = SnapshotHeader { last_log_id: record.last_log_id, membership: record.membership.clone() };
        self.replace(&header, |out| out.write_all(&record.data))
    }

    /// Replaces the snapshot atomically and durably, unless the file holds a later one,
    /// serializing `snapshot` into the file as it goes: it is never whole in memory.
    pub(crate) fn write_streamed(&self, header: &SnapshotHeader, snapshot: &impl Serialize) -> io::Result<()> {
        self.replace(header, |out| codec::write_record(out, snapshot))
    }

    /// The last log id of the snapshot in the file, read from its header alone; `None` when
    /// there is none, it is in the layout before (whose header is the whole file), or its
    /// header is damaged (a new snapshot is the cure).
    fn last_log_id_on_disk(&self) -> Option<StoredLogId> {
        let file = open_private(&self.path, std::fs::OpenOptions::new().read(true)).ok()?;
        match read_header(&mut io::BufReader::new(file), &self.path.display().to_string()) {
            Ok(header) => header?.0.last_log_id,
            Err(e) => {
                tracing::warn!(error = %e, "replacing a snapshot whose header is damaged");
                None
            }
        }
    }

    /// The snapshot's record as a file, its checksums verified, for a reader that streams it
    /// rather than hold it (a start, a transfer to a follower, an operator snapshot). What it reads is the file as it was when
    /// opened, whatever snapshot replaces it meanwhile. `None` if no snapshot was ever written.
    pub fn open_record(&self) -> io::Result<Option<SnapshotRecordFile>> {
        let mut file = match open_private(&self.path, std::fs::OpenOptions::new().read(true)) {
            Ok(f) => f,
            Err(crate::files::FileError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        let what = self.path.display().to_string();
        let size = file.metadata()?.len();
        let (header, start) = read_header(&mut io::BufReader::new(&mut file), &what)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what} is in an earlier build's layout: the next snapshot replaces it; retry"),
            )
        })?;
        let mut record =
            SnapshotRecordFile { last_log_id: header.last_log_id, membership: header.membership, file, start, len: 0 };
        record.len = size
            .checked_sub(start)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: the file is truncated")))?;
        let len = record.len;
        codec::verify_from(&mut record.reader()?, len, &what)?;
        Ok(Some(record))
    }

    fn replace(
        &self,
        header: &SnapshotHeader,
        write_snapshot: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> io::Result<()>,
    ) -> io::Result<()> {
        let _replacing = self.replacing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(on_disk) = self.last_log_id_on_disk() {
            if header.last_log_id.is_none_or(|new| new < on_disk) {
                tracing::info!(path = %self.path.display(), ?on_disk, new = ?header.last_log_id, "kept the later snapshot in place");
                return Ok(());
            }
        }
        let header = codec::encode(header);
        let header_len = u32::try_from(header.len()).map_err(io::Error::other)?;
        crate::files::replace_durably(&self.path, &self.path.with_file_name(STAGING_FILE), |out| {
            out.write_all(&[LAYOUT])?;
            out.write_all(&header_len.to_le_bytes())?;
            out.write_all(&header)?;
            write_snapshot(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::StoredMembershipConfig;

    fn header(index: u64) -> SnapshotHeader {
        SnapshotHeader {
            last_log_id: Some(StoredLogId { term: 1, leader: 1, index }),
            membership: StoredMembershipState {
                log_id: None,
                config: StoredMembershipConfig { configs: vec![[1].into()], nodes: Default::default() },
            },
        }
    }

    #[test]
    fn a_snapshot_is_replaced_whole_and_written_as_it_serializes_or_from_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        assert!(file.read().unwrap().is_none());
        file.write_streamed(&header(3), &vec![1u32, 2, 3]).unwrap();
        let read = file.read().unwrap().unwrap();
        assert_eq!(
            (read.last_log_id, codec::decode::<Vec<u32>>(&read.data, "s").unwrap()),
            (header(3).last_log_id, vec![1, 2, 3])
        );
        assert_eq!(read.data, codec::encode(&vec![1u32, 2, 3]), "the same record as encoded in memory");
        let record = StoredSnapshotRecord {
            last_log_id: header(4).last_log_id,
            membership: header(4).membership,
            data: codec::encode(&vec![4u32]),
        };
        file.write(&record).unwrap();
        let read = file.read().unwrap().unwrap();
        assert_eq!((read.last_log_id, read.data), (record.last_log_id, record.data));
    }

    #[test]
    fn an_earlier_snapshot_does_not_replace_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        file.write_streamed(&header(9), &vec![9u32]).unwrap();
        file.write_streamed(&header(4), &vec![4u32]).unwrap();
        let read = file.read().unwrap().unwrap();
        assert_eq!(
            (read.last_log_id, codec::decode::<Vec<u32>>(&read.data, "s").unwrap()),
            (header(9).last_log_id, vec![9])
        );
        file.write_streamed(&header(12), &vec![12u32]).unwrap();
        assert_eq!(file.read().unwrap().unwrap().last_log_id, header(12).last_log_id);
        // A damaged file holds no snapshot to keep: the next one replaces it.
        let mut bytes = std::fs::read(file.path()).unwrap();
        bytes[PREFIX + 2] ^= 1;
        std::fs::write(file.path(), bytes).unwrap();
        file.write_streamed(&header(10), &vec![10u32]).unwrap();
        assert_eq!(file.read().unwrap().unwrap().last_log_id, header(10).last_log_id);
    }

    #[test]
    fn a_record_opened_for_streaming_reads_as_the_whole_file_does_and_is_verified_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        assert!(file.open_record().unwrap().is_none());
        file.write_streamed(&header(3), &vec![1u32, 2, 3]).unwrap();
        let mut record = file.open_record().unwrap().unwrap();
        assert_eq!((record.last_log_id, &record.membership), (header(3).last_log_id, &header(3).membership));
        let read_twice: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let mut bytes = Vec::new();
                record.reader().unwrap().read_to_end(&mut bytes).unwrap();
                bytes
            })
            .collect();
        let whole = file.read().unwrap().unwrap().data;
        assert_eq!(read_twice, [whole.clone(), whole]);
        assert_eq!(record.size(), read_twice[0].len() as u64);
        // Replacing the file leaves what was opened as it was.
        file.write_streamed(&header(4), &vec![4u32]).unwrap();
        let mut bytes = Vec::new();
        record.reader().unwrap().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, read_twice[0]);

        let good = std::fs::read(file.path()).unwrap();
        for at in [2, PREFIX + 3, good.len() - 1] {
            let mut bytes = good.clone();
            bytes[at] ^= 1;
            std::fs::write(file.path(), bytes).unwrap();
            let Err(err) = file.open_record() else { panic!("byte {at} flipped: opened") };
            assert!(err.to_string().contains(SNAPSHOT_FILE), "byte {at}: {err}");
        }
        let earlier = StoredSnapshotRecord {
            last_log_id: header(5).last_log_id,
            membership: header(5).membership,
            data: codec::encode(&vec![5u32]),
        };
        std::fs::write(file.path(), codec::encode(&earlier)).unwrap();
        let Err(err) = file.open_record() else { panic!("the layout before: opened") };
        assert!(err.to_string().contains("earlier build's layout"), "{err}");
        // Rewritten in this layout (as a node does when it opens), it opens and reads the same.
        file.upgrade_layout().unwrap();
        let mut record = file.open_record().unwrap().unwrap();
        let mut bytes = Vec::new();
        record.reader().unwrap().read_to_end(&mut bytes).unwrap();
        assert_eq!((record.last_log_id, bytes), (earlier.last_log_id, earlier.data));
        let upgraded = std::fs::read(file.path()).unwrap();
        file.upgrade_layout().unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), upgraded, "a file in this layout is left as it is");
    }

    #[test]
    fn a_snapshot_in_the_layout_before_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        let record = StoredSnapshotRecord {
            last_log_id: header(5).last_log_id,
            membership: header(5).membership,
            data: codec::encode(&vec![5u32]),
        };
        std::fs::write(file.path(), codec::encode(&record)).unwrap();
        let read = file.read().unwrap().unwrap();
        assert_eq!((read.last_log_id, read.data), (record.last_log_id, record.data));
    }

    #[test]
    fn a_damaged_or_cut_snapshot_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        file.write_streamed(&header(3), &vec![1u32, 2, 3]).unwrap();
        let good = std::fs::read(file.path()).unwrap();
        for at in [1, PREFIX + 3, good.len() - 1] {
            let mut bytes = good.clone();
            bytes[at] ^= 1;
            std::fs::write(file.path(), bytes).unwrap();
            let Err(err) = file.read() else { panic!("byte {at} flipped: read") };
            assert!(err.to_string().contains(SNAPSHOT_FILE), "byte {at}: {err}");
        }
        for len in [0, 3, PREFIX + 2, good.len() - 1] {
            std::fs::write(file.path(), &good[..len]).unwrap();
            let Err(err) = file.read() else { panic!("{len} bytes: read") };
            assert!(err.to_string().contains(SNAPSHOT_FILE), "{len} bytes: {err}");
        }
    }
}
