//! Vault's snapshot archive (§10.3), as `vault operator raft snapshot save` writes it: a gzip'd
//! tar of four files, in this order:
//!
//! - `meta.json`: hashicorp/raft's `SnapshotMeta` (`Version`, `ID`, `Index`, `Term`,
//!   `Configuration`, `ConfigurationIndex`, `Size`), Go's field names;
//! - `state.bin`: the state machine's data, here Citadel's own snapshot file
//!   (`crate::snapshot`: header with checksums, cluster id and HMAC, then the stored record);
//! - `SHA256SUMS`: `sha256sum` lines (`<hex>  <name>`) for `meta.json` and `state.bin`;
//! - `SHA256SUMS.sealed`: `SHA256SUMS` sealed by the barrier (the keyring's current term,
//!   XChaCha20-Poly1305), as Vault seals it with its barrier. Only the cluster that holds the
//!   keyring can produce it, so a foreign or tampered archive is refused before anything else.
//!
//! Reading is bounded: at most four entries, each within its own size limit, and at most
//! `LIMITS.total` bytes out of the decompressor in all, counted as they come out, so a
//! gzip bomb stops at the limit instead of filling memory.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read};

use citadel_core::barrier::{BarrierError, Keyring, NONCE_LEN};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::MAX_SNAPSHOT;

pub const META: &str = "meta.json";
pub const STATE: &str = "state.bin";
pub const SUMS: &str = "SHA256SUMS";
pub const SEALED: &str = "SHA256SUMS.sealed";
/// The four entries, in the order Vault writes them.
const NAMES: [&str; 4] = [META, STATE, SUMS, SEALED];
/// Size limits while reading an archive.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// The largest `state.bin`.
    state: u64,
    /// What may come out of the decompressor in all.
    total: u64,
}

/// The largest `state.bin` is the largest snapshot; the total leaves room for the small
/// entries and tar's headers and padding.
const LIMITS: Limits = Limits { state: MAX_SNAPSHOT as u64, total: MAX_SNAPSHOT as u64 + (1 << 20) };
/// Associated data of the sealed sums: the key seals nothing else with this label.
const AAD_SUMS: &[u8] = b"citadel/snapshot-archive/SHA256SUMS";

fn max_size(name: &str, limits: Limits) -> u64 {
    match name {
        STATE => limits.state,
        META => 64 << 10,
        _ => 4 << 10,
    }
}

/// gzip's magic number: how a restore tells an archive from an older raw snapshot file.
pub fn is_archive(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// hashicorp/raft's `SnapshotMeta`, with Go's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RaftMeta {
    pub version: i64,
    #[serde(rename = "ID")]
    pub id: String,
    pub index: u64,
    pub term: u64,
    #[serde(default)]
    pub peers: Option<String>,
    #[serde(default)]
    pub configuration: RaftConfiguration,
    #[serde(default)]
    pub configuration_index: u64,
    pub size: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RaftConfiguration {
    #[serde(default)]
    pub servers: Vec<RaftServer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RaftServer {
    /// 0 voter, 1 non-voter (hashicorp/raft's `ServerSuffrage`).
    pub suffrage: u8,
    #[serde(rename = "ID")]
    pub id: String,
    pub address: String,
}

/// Why an archive was refused. Every message names the entry or check that failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ArchiveError {
    Damaged(String),
    TooLarge { what: String, limit: u64 },
    TooManyEntries,
    UnexpectedEntry(String),
    Duplicate(String),
    Missing(&'static str),
    BadSums(String),
    SumMismatch(&'static str),
    BadMeta(String),
    MetaMismatch,
    SealedUnknownTerm(u32),
    SealedUnreadable,
    SealedMismatch,
}

impl std::fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const FOREIGN: &str = "it was written by another cluster (restore it with sys/storage/raft/snapshot-force \
                               if you trust it) or altered";
        match self {
            Self::Damaged(e) => write!(f, "the snapshot archive is damaged or truncated (not a valid gzip'd tar): {e}"),
            Self::TooLarge { what, limit } => {
                write!(f, "the snapshot archive is refused: {what} is larger than the limit of {limit} bytes")
            }
            Self::TooManyEntries => {
                write!(f, "the snapshot archive holds more than the {} entries {NAMES:?}", NAMES.len())
            }
            Self::UnexpectedEntry(name) => {
                write!(f, "unexpected entry {name:?} in the snapshot archive (expected {NAMES:?})")
            }
            Self::Duplicate(name) => write!(f, "the snapshot archive holds {name:?} twice"),
            Self::Missing(name) => write!(f, "the snapshot archive has no {name}"),
            Self::BadSums(e) => write!(f, "{SUMS} in the snapshot archive is malformed: {e}"),
            Self::SumMismatch(name) => {
                write!(f, "{SUMS} check failed for {name}: the snapshot archive is damaged or was altered")
            }
            Self::BadMeta(e) => write!(f, "{META} in the snapshot archive is malformed: {e}"),
            Self::MetaMismatch => write!(f, "{META} does not match {STATE} (index, term or size differ)"),
            Self::SealedUnknownTerm(term) => write!(
                f,
                "{SEALED} is sealed with keyring term {term}, which this cluster's keyring does not have: {FOREIGN}"
            ),
            Self::SealedUnreadable => write!(f, "{SEALED} does not unseal with this cluster's keyring: {FOREIGN}"),
            Self::SealedMismatch => {
                write!(f, "{SEALED} does not match {SUMS}: the snapshot archive was altered after it was saved")
            }
        }
    }
}

impl std::error::Error for ArchiveError {}

/// The entries of an archive whose `SHA256SUMS` verified (the seal is checked by [`unseal`]).
#[derive(Debug)]
pub struct Archive<S = Vec<u8>> {
    pub meta: RaftMeta,
    /// `state.bin`, or what [`read_streaming`] made of it.
    pub state: S,
    pub sums: Vec<u8>,
    pub sealed: Vec<u8>,
}

fn sums_of(meta: &[u8], state_sum: &[u8]) -> Vec<u8> {
    format!("{}  {META}\n{}  {STATE}\n", hex::encode(Sha256::digest(meta)), hex::encode(state_sum)).into_bytes()
}

/// Writes the archive to `out`, its `state.bin` the `state_len` bytes `state` reads, hashed as
/// they go into the archive (`SHA256SUMS` follows `state.bin`): nothing is held whole, however
/// large the state. `nonce` seals the sums; `now_secs` is every entry's modification time.
pub fn write<W: io::Write>(
    out: W,
    meta: &RaftMeta,
    state: impl Read,
    state_len: u64,
    keyring: &Keyring,
    nonce: &[u8; NONCE_LEN],
    now_secs: u64,
) -> io::Result<W> {
    let mut meta_json = serde_json::to_vec(meta).map_err(io::Error::other)?;
    meta_json.push(b'\n'); // Go's json.Encoder ends the document with a newline.
    let mut tar = tar::Builder::new(GzEncoder::new(out, flate2::Compression::default()));
    let mut append = |name: &str, len: u64, data: &mut dyn Read| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o600);
        header.set_size(len);
        header.set_mtime(now_secs);
        tar.append_data(&mut header, name, data)
    };
    append(META, meta_json.len() as u64, &mut &meta_json[..])?;
    let mut state = HashingReader::new(state.take(state_len));
    append(STATE, state_len, &mut state)?;
    if state.read != state_len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "state.bin ended before its length"));
    }
    let sums = sums_of(&meta_json, &state.hasher.finalize());
    let sealed = keyring.encrypt(nonce, AAD_SUMS, &sums);
    append(SUMS, sums.len() as u64, &mut &sums[..])?;
    append(SEALED, sealed.len() as u64, &mut &sealed[..])?;
    tar.into_inner()?.finish()
}

/// Passes bytes on, hashing and counting them.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), read: 0 }
    }

    /// The SHA-256 of what was read, and how many bytes.
    pub(crate) fn finish(self) -> (sha2::digest::Output<Sha256>, u64) {
        (self.hasher.finalize(), self.read)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Counts what comes out of the decompressor and fails past `remaining`, noting why in `over`
/// (the tar crate does not pass an inner error's text on).
struct Bounded<'a, R> {
    inner: R,
    remaining: u64,
    over: &'a Cell<bool>,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.remaining {
            self.over.set(true);
            return Err(io::Error::other("decompressed size limit"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Reads and checks an archive: the four entries within their limits, `SHA256SUMS` against
/// the entries, and `meta.json`'s syntax. Nothing is trusted yet: see [`unseal`].
pub fn read(bytes: &[u8]) -> Result<Archive, ArchiveError> {
    read_within(bytes, LIMITS, &mut read_whole)
}

/// Reads and checks an archive as [`read`] does, handing `state.bin` to `state` as it comes out
/// of the decompressor instead of holding it: a file on disk is checked with none of it in
/// memory. Its sum and length are taken as it is read (whatever `state` leaves unread is read
/// too). `state`'s answer is only as trustworthy as the checks that follow it.
pub fn read_streaming<S>(
    input: impl Read,
    state: &mut dyn FnMut(&mut dyn Read) -> io::Result<S>,
) -> Result<Archive<S>, ArchiveError> {
    read_within(input, LIMITS, state)
}

fn read_whole(state: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    state.read_to_end(&mut data)?;
    Ok(data)
}

fn read_within<S>(
    input: impl Read,
    limits: Limits,
    read_state: &mut dyn FnMut(&mut dyn Read) -> io::Result<S>,
) -> Result<Archive<S>, ArchiveError> {
    let over = Cell::new(false);
    let bounded = Bounded { inner: GzDecoder::new(input), remaining: limits.total, over: &over };
    let too_large = || ArchiveError::TooLarge { what: "the decompressed archive".into(), limit: limits.total };
    let damaged = |e: io::Error| if over.get() { too_large() } else { ArchiveError::Damaged(e.to_string()) };
    let mut archive = tar::Archive::new(bounded);
    let mut found: BTreeMap<&'static str, Vec<u8>> = BTreeMap::new();
    // What `read_state` made of `state.bin`, its SHA-256 and its length.
    let mut state = None;
    let mut count = 0;
    for entry in archive.entries().map_err(damaged)? {
        let entry = entry.map_err(damaged)?;
        count += 1;
        if count > NAMES.len() {
            return Err(ArchiveError::TooManyEntries);
        }
        let path = entry.path_bytes();
        let name = NAMES
            .into_iter()
            .find(|n| n.as_bytes() == &path[..])
            .ok_or_else(|| ArchiveError::UnexpectedEntry(String::from_utf8_lossy(&path).into_owned()))?;
        if !entry.header().entry_type().is_file() {
            return Err(ArchiveError::UnexpectedEntry(format!("{name} (not a regular file)")));
        }
        let size = entry.header().size().map_err(damaged)?;
        let limit = max_size(name, limits);
        if size > limit {
            return Err(ArchiveError::TooLarge { what: name.into(), limit });
        }
        let mut data = HashingReader::new(entry.take(limit));
        let (len, value) = if name == STATE {
            let value = read_state(&mut data).map_err(damaged)?;
            io::copy(&mut data, &mut io::sink()).map_err(damaged)?;
            if state.replace((value, data.hasher.finalize(), data.read)).is_some() {
                return Err(ArchiveError::Duplicate(name.into()));
            }
            (data.read, None)
        } else {
            // The declared size is not trusted with an allocation: data grows as it arrives.
            let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
            data.read_to_end(&mut bytes).map_err(damaged)?;
            (data.read, Some(bytes))
        };
        if len != size {
            return Err(ArchiveError::Damaged(format!("{name} is truncated")));
        }
        if let Some(bytes) = value {
            if found.insert(name, bytes).is_some() {
                return Err(ArchiveError::Duplicate(name.into()));
            }
        }
    }
    // Read to the end of the gzip stream (bounded), so its CRC and length are checked too.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(damaged)?;
    let mut take = |name: &'static str| found.remove(name).ok_or(ArchiveError::Missing(name));
    let (meta_json, sums, sealed) = (take(META)?, take(SUMS)?, take(SEALED)?);
    let (state, state_sum, state_len) = state.ok_or(ArchiveError::Missing(STATE))?;
    check_sums(&sums, &meta_json, &state_sum)?;
    let meta: RaftMeta = serde_json::from_slice(&meta_json).map_err(|e| ArchiveError::BadMeta(e.to_string()))?;
    if meta.size != state_len as i64 {
        return Err(ArchiveError::MetaMismatch);
    }
    Ok(Archive { meta, state, sums, sealed })
}

/// `SHA256SUMS` must list exactly `meta.json` and `state.bin`, each with its hash (`state_sum`:
/// `state.bin`'s, taken as it was read).
fn check_sums(sums: &[u8], meta: &[u8], state_sum: &[u8]) -> Result<(), ArchiveError> {
    let text = std::str::from_utf8(sums).map_err(|_| ArchiveError::BadSums("not UTF-8".into()))?;
    let mut listed = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (hash, name) = line.split_once("  ").ok_or_else(|| ArchiveError::BadSums(format!("line {line:?}")))?;
        let name = [META, STATE]
            .into_iter()
            .find(|n| *n == name)
            .ok_or_else(|| ArchiveError::BadSums(format!("unexpected file {name:?}")))?;
        if listed.insert(name, hash.to_ascii_lowercase()).is_some() {
            return Err(ArchiveError::BadSums(format!("{name} is listed twice")));
        }
    }
    for (name, sum) in [(META, &Sha256::digest(meta)[..]), (STATE, state_sum)] {
        let hash = listed.get(name).ok_or_else(|| ArchiveError::BadSums(format!("no hash for {name}")))?;
        if *hash != hex::encode(sum) {
            return Err(ArchiveError::SumMismatch(name));
        }
    }
    Ok(())
}

/// Checks `SHA256SUMS.sealed` with this cluster's keyring: it must unseal (any term the
/// keyring still holds, so an archive verifies after rotations) to exactly `SHA256SUMS`.
pub fn unseal<S>(archive: &Archive<S>, keyring: &Keyring) -> Result<(), ArchiveError> {
    let plain = keyring.decrypt(AAD_SUMS, &archive.sealed).map_err(|e| match e {
        BarrierError::UnknownTerm(term) => ArchiveError::SealedUnknownTerm(term),
        _ => ArchiveError::SealedUnreadable,
    })?;
    if plain.as_slice() != archive.sums.as_slice() {
        return Err(ArchiveError::SealedMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn keyring() -> Keyring {
        Keyring::new(1, [1; 32], [2; 32], [3; 32])
    }

    fn meta(size: usize) -> RaftMeta {
        RaftMeta {
            version: 1,
            id: "2-9-1".into(),
            index: 9,
            term: 2,
            peers: None,
            configuration: RaftConfiguration {
                servers: vec![RaftServer { suffrage: 0, id: "1".into(), address: "127.0.0.1:8201".into() }],
            },
            configuration_index: 1,
            size: size as i64,
        }
    }

    fn archive(state: &[u8]) -> Vec<u8> {
        write(Vec::new(), &meta(state.len()), state, state.len() as u64, &keyring(), &[7; NONCE_LEN], 1_700_000_000)
            .unwrap()
    }

    /// A gzip'd tar of arbitrary entries, as an attacker would build one.
    fn custom(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            tar.append_data(&mut header, name, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn an_archive_holds_vaults_four_entries_and_reads_back() {
        let bytes = archive(b"state");
        assert!(is_archive(&bytes));
        let mut tar = tar::Archive::new(GzDecoder::new(&bytes[..]));
        let names: Vec<String> =
            tar.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, NAMES);
        let read = read(&bytes).unwrap();
        assert_eq!(read.state, b"state");
        assert_eq!(read.meta, meta(5));
        assert_eq!(unseal(&read, &keyring()), Ok(()));
        let text = String::from_utf8(read.sums.clone()).unwrap();
        assert!(text.ends_with("  state.bin\n") && text.contains("  meta.json\n"), "{text}");
    }

    #[test]
    fn a_state_shorter_than_its_declared_length_fails_the_write() {
        let err = write(Vec::new(), &meta(9), &b"state"[..], 9, &keyring(), &[7; NONCE_LEN], 1).unwrap_err();
        assert!(err.to_string().contains("state.bin ended before its length"), "{err}");
    }

    #[test]
    fn another_clusters_archive_does_not_unseal() {
        let read = read(&archive(b"state")).unwrap();
        let other = Keyring::new(1, [9; 32], [2; 32], [3; 32]);
        assert_eq!(unseal(&read, &other), Err(ArchiveError::SealedUnreadable));
        let mut rotated = keyring();
        rotated.rotate(2, [5; 32]);
        assert_eq!(unseal(&read, &rotated), Ok(()), "old terms stay in the keyring");
    }

    #[test]
    fn a_tampered_state_with_recomputed_sums_fails_the_seal() {
        let good = read(&archive(b"state")).unwrap();
        let forged_state = b"forged";
        let mut meta_json = serde_json::to_vec(&meta(forged_state.len())).unwrap();
        meta_json.push(b'\n');
        let sums = sums_of(&meta_json, &Sha256::digest(forged_state));
        let bytes = custom(&[(META, &meta_json), (STATE, forged_state), (SUMS, &sums), (SEALED, &good.sealed)]);
        let forged = read(&bytes).expect("the sums were recomputed: only the seal can tell");
        let err = unseal(&forged, &keyring()).unwrap_err();
        assert_eq!(err, ArchiveError::SealedMismatch);
        assert!(err.to_string().contains("SHA256SUMS.sealed"), "{err}");
    }

    #[test]
    fn a_state_that_does_not_match_its_sums_is_refused_naming_it() {
        let good = read(&archive(b"state")).unwrap();
        let mut meta_json = serde_json::to_vec(&good.meta).unwrap();
        meta_json.push(b'\n');
        let bytes = custom(&[(META, &meta_json), (STATE, b"stale"), (SUMS, &good.sums), (SEALED, &good.sealed)]);
        let err = read(&bytes).unwrap_err();
        assert_eq!(err, ArchiveError::SumMismatch(STATE));
        assert!(err.to_string().contains("state.bin"), "{err}");
    }

    #[test]
    fn extra_missing_or_repeated_entries_are_refused() {
        let good = read(&archive(b"state")).unwrap();
        let m = serde_json::to_vec(&good.meta).unwrap();
        let extra = custom(&[(META, &m), ("evil.sh", b"x")]);
        assert!(matches!(read(&extra), Err(ArchiveError::UnexpectedEntry(n)) if n == "evil.sh"));
        let missing = custom(&[(META, &m), (STATE, b"state"), (SUMS, &good.sums)]);
        assert_eq!(read(&missing).unwrap_err(), ArchiveError::Missing(SEALED));
        let twice = custom(&[(META, &m), (META, &m)]);
        assert_eq!(read(&twice).unwrap_err(), ArchiveError::Duplicate(META.into()));
        let five = custom(&[(META, &m), (STATE, b"s"), (SUMS, b""), (SEALED, b""), (SEALED, b"")]);
        assert_eq!(read(&five).unwrap_err(), ArchiveError::TooManyEntries);
    }

    #[test]
    fn a_gzip_bomb_is_refused_at_the_limit_without_being_read_whole() {
        // A small state.bin followed by 64 MiB of zeros (tar's end-of-archive blocks, then
        // more): under limits of 1 MiB, reading stops at the limit.
        let limits = Limits { state: 1 << 20, total: 2 << 20 };
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut header = tar::Header::new_ustar();
        header.set_path(STATE).unwrap();
        header.set_size(512);
        header.set_mode(0o600);
        header.set_cksum();
        gz.write_all(header.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "the bomb is small: {} bytes", bomb.len());
        let err = read_within(&bomb[..], limits, &mut read_whole).unwrap_err();
        assert_eq!(err, ArchiveError::TooLarge { what: "the decompressed archive".into(), limit: 2 << 20 });
        assert!(err.to_string().contains("larger than the limit"), "{err}");
        // An entry declaring more than its limit is refused from its header alone.
        let mut header = tar::Header::new_ustar();
        header.set_path(STATE).unwrap();
        header.set_size(1 << 40);
        header.set_cksum();
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(header.as_bytes()).unwrap();
        let err = read_within(&gz.finish().unwrap()[..], limits, &mut read_whole).unwrap_err();
        assert_eq!(err, ArchiveError::TooLarge { what: STATE.into(), limit: 1 << 20 });
    }

    #[test]
    fn damaged_archives_are_refused_not_panicking() {
        let bytes = archive(b"state");
        for i in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x55;
            if let Ok(read) = read(&damaged) {
                assert!(unseal(&read, &keyring()).is_err() || read.state == b"state", "flip at {i} was accepted");
            }
        }
        for len in 0..bytes.len() {
            assert!(read(&bytes[..len]).is_err(), "truncated to {len} bytes was accepted");
        }
    }
}
