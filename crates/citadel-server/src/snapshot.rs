//! Operator snapshots (`sys/storage/raft/snapshot`, scheduled snapshots), built and checked as
//! self-describing files; `api/snapshot.rs` serves them over HTTP.
//!
//! `build` writes Vault's archive (`snapshot_archive.rs`: a gzip'd tar of `meta.json`,
//! `state.bin`, `SHA256SUMS`, `SHA256SUMS.sealed`) whose `state.bin` is the file described
//! here; a restore takes the archive, or this file on its own (what older builds saved).
//!
//! File: one JSON header line (format, version, cluster, index, term, SHA-256 and size of the
//! body, keyring term and HMAC), then the body, which is the storage layer's checksummed snapshot
//! record. Nothing in the file is plaintext: values are ciphertext, tokens keyed hashes. The
//! audit log is not in it, only where each chain ends: the cluster keeps its audit log through
//! a restore, and retention archives it (§9.3).
//!
//! The checksum only detects damage: anyone can recompute it. The HMAC-SHA256, under a key
//! derived from a keyring term, proves the file was written by this cluster and not altered
//! since; a restore verifies both (and decodes the whole body) before it proposes anything, and
//! goes through Raft like every other change (§1.1). `snapshot-force` restores another cluster's
//! snapshot, whose keyring we do not hold: it skips the HMAC only, never the checksum.

use std::io::{BufReader, BufWriter, Read, Seek};
use std::path::Path;
use std::time::Duration;

use citadel_core::barrier::Keyring;
use citadel_core::state::State;
use citadel_storage::codec::{self, StoredSnapshot, StoredSnapshotSummary};
use citadel_storage::StateReader;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::node::Node;
use crate::node_error::NodeError;
use crate::seal::Unsealed;
use crate::snapshot_archive::{self as archive, RaftConfiguration, RaftMeta, RaftServer};

/// The largest snapshot upload a node reads.
pub const MAX_SNAPSHOT: usize = 256 << 20;

const FORMAT: &str = "citadel-snapshot";
/// Version 2 added `key_term` and `hmac_sha256`. Version 1 files (checksum only) are read by
/// `inspect` and by `snapshot-force`, never by a plain restore.
const VERSION: u32 = 2;
const VERSION_UNAUTHENTICATED: u32 = 1;
/// Domain separation: the snapshot key is used for nothing else.
const KEY_LABEL: &[u8] = b"citadel/snapshot-hmac-key/v1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub format: String,
    pub version: u32,
    pub cluster_id: String,
    pub last_index: u64,
    pub last_term: u64,
    pub sha256: String,
    pub size: usize,
    /// The keyring term whose key the HMAC key was derived from (0 in version 1 files).
    #[serde(default)]
    pub key_term: u32,
    /// Hex HMAC-SHA256 over every other header field (the body through `sha256` and `size`).
    #[serde(default)]
    pub hmac_sha256: String,
}

/// Why a snapshot file was refused. Every message names what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub enum SnapshotFileError {
    NoHeader,
    BadHeader(String),
    UnsupportedVersion { format: String, version: u32 },
    Damaged,
    BadBody(String),
    Inconsistent,
    Unauthenticated,
    UnknownKeyTerm(u32),
    HmacMismatch,
}

impl std::fmt::Display for SnapshotFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoHeader => f.write_str("not a Citadel snapshot file (no header line)"),
            Self::BadHeader(e) => write!(f, "not a Citadel snapshot file: {e}"),
            Self::UnsupportedVersion { format, version } => write!(
                f,
                "unsupported snapshot format {format:?} version {version}; this build reads {FORMAT:?} versions \
                 {VERSION_UNAUTHENTICATED} and {VERSION}"
            ),
            Self::Damaged => f.write_str("the snapshot file is damaged or truncated (checksum mismatch)"),
            Self::BadBody(e) => write!(f, "the snapshot body is undecodable: {e}"),
            Self::Inconsistent => f.write_str("the snapshot header does not match its body (index or term differ)"),
            Self::Unauthenticated => f.write_str(
                "the snapshot file is version 1, written before snapshots were authenticated, so it carries no \
                 HMAC to verify: save a new snapshot, or restore this one with sys/storage/raft/snapshot-force \
                 if you trust the file",
            ),
            Self::UnknownKeyTerm(term) => write!(
                f,
                "the snapshot is authenticated with keyring term {term}, which this cluster's keyring does not \
                 have: it was written by another cluster (restore it with sys/storage/raft/snapshot-force) or altered"
            ),
            Self::HmacMismatch => f.write_str(
                "the snapshot failed authentication (HMAC mismatch): it was altered after it was saved, or \
                 written by another cluster",
            ),
        }
    }
}

impl std::error::Error for SnapshotFileError {}

/// The HMAC key of keyring term `term`: derived, so the data key itself never signs anything.
fn snapshot_key(keyring: &Keyring, term: u32) -> Option<Hmac<Sha256>> {
    let entry = keyring.terms.iter().find(|t| t.term == term)?;
    let mut derive = Hmac::<Sha256>::new_from_slice(&entry.key).ok()?;
    derive.update(KEY_LABEL);
    Hmac::<Sha256>::new_from_slice(&derive.finalize().into_bytes()).ok()
}

/// Feeds every header field but the HMAC into `mac`, each length-prefixed so that no two
/// headers share an encoding. The body is covered through its SHA-256 and size.
fn mac_header(mut mac: Hmac<Sha256>, header: &SnapshotHeader) -> Hmac<Sha256> {
    let mut field = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u64).to_be_bytes());
        mac.update(bytes);
    };
    field(header.format.as_bytes());
    field(&header.version.to_be_bytes());
    field(header.cluster_id.as_bytes());
    field(&header.last_index.to_be_bytes());
    field(&header.last_term.to_be_bytes());
    field(header.sha256.as_bytes());
    field(&(header.size as u64).to_be_bytes());
    field(&header.key_term.to_be_bytes());
    mac
}

/// Signs `header` with the keyring's current term.
fn sign(header: &mut SnapshotHeader, keyring: &Keyring) -> Result<(), String> {
    header.key_term = keyring.current().term;
    let key = snapshot_key(keyring, header.key_term).ok_or("the keyring has no key for its current term")?;
    header.hmac_sha256 = hex::encode(mac_header(key, header).finalize().into_bytes());
    Ok(())
}

/// Checks the header's HMAC with this cluster's keyring (in constant time).
pub fn verify_hmac(header: &SnapshotHeader, keyring: &Keyring) -> Result<(), SnapshotFileError> {
    if header.version == VERSION_UNAUTHENTICATED {
        return Err(SnapshotFileError::Unauthenticated);
    }
    let key = snapshot_key(keyring, header.key_term).ok_or(SnapshotFileError::UnknownKeyTerm(header.key_term))?;
    // Only the exact form `save` writes (lowercase hex): no second spelling of a valid file.
    if header.hmac_sha256.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SnapshotFileError::HmacMismatch);
    }
    let tag = hex::decode(&header.hmac_sha256).map_err(|_| SnapshotFileError::HmacMismatch)?;
    mac_header(key, header).verify_slice(&tag).map_err(|_| SnapshotFileError::HmacMismatch)
}

/// Why a snapshot could not be built.
#[derive(Debug)]
pub enum BuildError {
    /// The cluster cannot answer for the present (no leader, sealed...).
    Node(NodeError),
    /// Not yet possible (no snapshot in time, nothing committed): retry.
    NotReady(String),
    /// A local failure: a damaged local snapshot, an archive that cannot be written.
    Failed(String),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::Node(e) => std::fmt::Display::fmt(e, f),
            BuildError::NotReady(e) | BuildError::Failed(e) => f.write_str(e),
        }
    }
}

/// How long a request for an operator snapshot waits for another one's build to finish.
const BUILD_WAIT: Duration = Duration::from_secs(60);

/// An operator snapshot, Vault's archive, in an unnamed temporary file of the data directory
/// (`O_TMPFILE` on Linux): the file is gone once closed, whatever happens to the node.
pub struct Built {
    pub file: std::fs::File,
    pub len: u64,
}

/// Builds a fresh snapshot covering everything committed so far, as Vault's archive. It is
/// streamed from the local snapshot's file into the archive's, so a node's memory does not
/// grow with the size of its state. One archive is written at a time: the lock goes with the
/// blocking writer, so a request abandoned by its client still holds it until its writer ends.
pub async fn build(app: &Node, keys: &Unsealed) -> Result<Built, BuildError> {
    app.linearize().await.map_err(BuildError::Node)?;
    let target = app.state.applied_index();
    app.raft.trigger().snapshot().await.map_err(|e| BuildError::NotReady(e.to_string()))?;
    app.raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.snapshot.as_ref().is_some_and(|s| s.index >= target), "a snapshot covering the request")
        .await
        .map_err(|_| BuildError::NotReady("the snapshot was not built in time; retry".into()))?;
    let building = tokio::time::timeout(BUILD_WAIT, app.snapshot_build.clone().lock_owned())
        .await
        .map_err(|_| BuildError::NotReady("another snapshot is being built; retry".into()))?;
    let (state, keyring, dir) = (app.state.clone(), keys.keyring.clone(), app.config.data_dir.clone());
    tokio::task::spawn_blocking(move || {
        let _building = building;
        write_archive(&state, &keyring, &dir)
    })
    .await
    .map_err(|e| BuildError::Failed(format!("the snapshot writer stopped: {e}")))?
}

/// Writes the archive of the local snapshot into a temporary file in `dir`. Blocking.
fn write_archive(state: &StateReader, keyring: &Keyring, dir: &Path) -> Result<Built, BuildError> {
    let damaged = |e: std::io::Error| BuildError::Failed(format!("the local snapshot is damaged: {e}"));
    let mut record = state
        .open_snapshot()
        .map_err(damaged)?
        .ok_or_else(|| BuildError::NotReady("no snapshot is available yet; retry".into()))?;
    // The local form: every audit chain's tip, not its events. A restore keeps the cluster's
    // own audit log (`State::restore`), so events in the file would serve nothing, and with
    // them the file would grow with every request ever audited.
    // One read: the summary is decoded from the bytes as they are hashed.
    let mut body = archive::HashingReader::new(record.reader().map_err(damaged)?);
    let stored: StoredSnapshotSummary = codec::decode_json_from(&mut body, "local snapshot").map_err(damaged)?;
    std::io::copy(&mut body, &mut std::io::sink()).map_err(damaged)?;
    let (body_sum, _) = body.finish();
    let last = stored.last_applied.ok_or_else(|| BuildError::NotReady("nothing to snapshot yet".into()))?;
    let mut header = SnapshotHeader {
        format: FORMAT.into(),
        version: VERSION,
        cluster_id: stored.state.cluster.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
        last_index: last.index,
        last_term: last.term,
        sha256: hex::encode(body_sum),
        size: record.size() as usize,
        key_term: 0,
        hmac_sha256: String::new(),
    };
    sign(&mut header, keyring).map_err(BuildError::Failed)?;
    let mut header_line = serde_json::to_vec(&header).map_err(|e| BuildError::Failed(e.to_string()))?;
    header_line.push(b'\n');
    let now = crate::ids::now_ms();
    let state_len = header_line.len() as u64 + record.size();
    let meta = raft_meta(&stored, state_len, now);
    let cannot_write = |e: std::io::Error| BuildError::Failed(format!("cannot write the snapshot archive: {e}"));
    let out = tempfile::tempfile_in(dir).map_err(cannot_write)?;
    // The file is the header line and then the local snapshot's record, read as it is archived.
    let file_bytes = (&header_line[..]).chain(record.reader().map_err(damaged)?);
    let nonce = crate::ids::random_bytes();
    let out = archive::write(BufWriter::new(out), &meta, file_bytes, state_len, keyring, &nonce, now / 1000)
        .map_err(cannot_write)?;
    let mut file = out.into_inner().map_err(|e| cannot_write(e.into_error()))?;
    let len = file.stream_position().map_err(cannot_write)?;
    file.rewind().map_err(cannot_write)?;
    Ok(Built { file, len })
}

/// hashicorp/raft's metadata for `meta.json`: the snapshot's last entry and its membership.
fn raft_meta(stored: &StoredSnapshotSummary, size: u64, now: u64) -> RaftMeta {
    let last = stored.last_applied.unwrap_or(codec::StoredLogId { term: 0, leader: 0, index: 0 });
    let config = &stored.membership.config;
    let voters: std::collections::BTreeSet<u64> = config.configs.iter().flatten().copied().collect();
    let servers = config
        .nodes
        .iter()
        .map(|(id, node)| RaftServer {
            suffrage: u8::from(!voters.contains(id)),
            id: id.to_string(),
            address: node.cluster_addr.clone(),
        })
        .collect();
    RaftMeta {
        version: 1,
        id: format!("{}-{}-{now}", last.term, last.index),
        index: last.index,
        term: last.term,
        peers: None,
        configuration: RaftConfiguration { servers },
        configuration_index: stored.membership.log_id.map_or(0, |l| l.index),
        size: size as i64,
    }
}

/// Reads an upload down to its snapshot file and verifies it. For Vault's archive: its limits,
/// entries and `SHA256SUMS`, then, given a keyring, `SHA256SUMS.sealed` (before anything in
/// `state.bin` is read), and that `meta.json` agrees with `state.bin`. A bare snapshot file
/// (what older builds saved) is taken as it is. Then the file itself ([`parse`]). Returns
/// whether the upload was an archive.
fn open(bytes: &[u8], keyring: Option<&Keyring>) -> Result<(bool, SnapshotHeader, StoredSnapshot), String> {
    if !archive::is_archive(bytes) {
        let (header, stored) = parse(bytes).map_err(|e| e.to_string())?;
        return Ok((false, header, stored));
    }
    let unpacked = archive::read(bytes).map_err(|e| e.to_string())?;
    if let Some(keyring) = keyring {
        archive::unseal(&unpacked, keyring).map_err(|e| e.to_string())?;
    }
    let (header, stored) = parse(&unpacked.state).map_err(|e| format!("state.bin: {e}"))?;
    if (unpacked.meta.index, unpacked.meta.term) != (header.last_index, header.last_term) {
        return Err(archive::ArchiveError::MetaMismatch.to_string());
    }
    Ok((true, header, stored))
}

/// What `citadel operator raft snapshot inspect` reads: an archive or a bare file, checked as
/// far as it can be without the cluster's keyring.
pub fn parse_any(bytes: &[u8]) -> Result<(SnapshotHeader, StoredSnapshot), String> {
    open(bytes, None).map(|(_, header, stored)| (header, stored))
}

/// Splits a snapshot file and verifies everything but the HMAC (which needs the keyring, see
/// [`verify_hmac`]): format and version, size and checksum of the body, the body's own record
/// checksum and decoding, and that header and body agree.
pub fn parse(file: &[u8]) -> Result<(SnapshotHeader, StoredSnapshot), SnapshotFileError> {
    let newline = file.iter().position(|b| *b == b'\n').ok_or(SnapshotFileError::NoHeader)?;
    let (head, rest) = file.split_at(newline);
    let header: SnapshotHeader =
        serde_json::from_slice(head).map_err(|e| SnapshotFileError::BadHeader(e.to_string()))?;
    if header.format != FORMAT || !(VERSION_UNAUTHENTICATED..=VERSION).contains(&header.version) {
        return Err(SnapshotFileError::UnsupportedVersion { format: header.format, version: header.version });
    }
    let body = rest.get(1..).unwrap_or_default();
    if body.len() != header.size || hex::encode(Sha256::digest(body)) != header.sha256 {
        return Err(SnapshotFileError::Damaged);
    }
    let stored: StoredSnapshot =
        codec::decode(body, "snapshot body").map_err(|e| SnapshotFileError::BadBody(e.to_string()))?;
    let last = stored.last_applied.as_ref().map(|l| (l.index, l.term));
    if last != Some((header.last_index, header.last_term)) {
        return Err(SnapshotFileError::Inconsistent);
    }
    check_state(&stored.state, &stored.tokens)?;
    Ok((header, stored))
}

/// Checks an archive in a file with this cluster's keyring, as a restore would, without
/// holding it or its state: four reads of the file, each through the decompressor, with
/// `state.bin` checked as it comes out. First the archive (entries and sums) and its seal,
/// before anything in `state.bin` is parsed; then the snapshot file's header, its HMAC, the size
/// and SHA-256 of its body and the body's record checksum; then the state, decoded; then each
/// secret, decoded and dropped in turn. Every read must find the sums the seal covers, so what
/// a later read decodes is what the first one verified.
pub fn verify_file(file: &mut std::fs::File, keyring: &Keyring) -> Result<SnapshotHeader, String> {
    let mut sealed_sums = None;
    let mut read = |check: &mut StateCheck<'_>| {
        file.rewind().map_err(|e| e.to_string())?;
        let archive = archive::read_streaming(BufReader::new(&mut *file), check).map_err(|e| e.to_string())?;
        match &sealed_sums {
            None => {
                archive::unseal(&archive, keyring).map_err(|e| e.to_string())?;
                sealed_sums = Some(archive.sums.clone());
            }
            Some(sums) if *sums != archive.sums => {
                return Err("the snapshot archive changed while it was verified".into())
            }
            Some(_) => {}
        }
        let checked = archive.state.map_err(|e| format!("state.bin: {e}"))?;
        Ok::<_, String>((archive.meta, checked))
    };
    let (meta, _) = read(&mut |_| Ok(Ok(0)))?;
    let mut header = None;
    read(&mut |state| {
        Ok(check_file_from(state)?.map(|checked| {
            header = Some(checked);
            0
        }))
    })?;
    let header = header.ok_or("state.bin was not read")?;
    if (meta.index, meta.term) != (header.last_index, header.last_term) {
        return Err(archive::ArchiveError::MetaMismatch.to_string());
    }
    verify_hmac(&header, keyring).map_err(|e| format!("state.bin: {e}"))?;
    let mut last_applied = None;
    let (_, secrets_in_state) = read(&mut |state| {
        Ok(skip_header_line(state)?.and_then(|()| {
            let head = codec::decode_snapshot_head_from(state, "snapshot body").map_err(bad_body)?;
            check_state(&head.state, &Default::default())?;
            last_applied = Some(head.last_applied.map(|l| (l.index, l.term)));
            Ok(head.secrets)
        }))
    })?;
    if last_applied != Some(Some((header.last_index, header.last_term))) {
        return Err(format!("state.bin: {}", SnapshotFileError::Inconsistent));
    }
    let (_, secrets) = read(&mut |state| {
        Ok(skip_header_line(state)?
            .and_then(|()| codec::check_snapshot_secrets_from(state, "snapshot body").map_err(bad_body)))
    })?;
    if secrets != secrets_in_state {
        return Err(format!("state.bin: {secrets} secrets decoded of {secrets_in_state} counted"));
    }
    Ok(header)
}

/// One of [`verify_file`]'s checks of `state.bin` as it comes out of the archive: a count, or
/// why the file is refused (an I/O error is the archive's damage).
type StateCheck<'a> = dyn FnMut(&mut dyn Read) -> std::io::Result<Result<u64, SnapshotFileError>> + 'a;

fn bad_body(e: std::io::Error) -> SnapshotFileError {
    SnapshotFileError::BadBody(e.to_string())
}

/// The longest header line a snapshot file may have (it holds a few short fields).
const MAX_HEADER_LINE: u64 = 64 << 10;

/// Reads a snapshot file's header line from `file`, leaving `file` at the body.
fn read_header_line(file: &mut dyn Read) -> std::io::Result<Result<SnapshotHeader, SnapshotFileError>> {
    let mut line = Vec::new();
    let mut byte = [0];
    while file.read(&mut byte)? == 1 {
        if byte[0] == b'\n' {
            let header: SnapshotHeader = match serde_json::from_slice(&line) {
                Ok(header) => header,
                Err(e) => return Ok(Err(SnapshotFileError::BadHeader(e.to_string()))),
            };
            if header.format != FORMAT || !(VERSION_UNAUTHENTICATED..=VERSION).contains(&header.version) {
                return Ok(Err(SnapshotFileError::UnsupportedVersion {
                    format: header.format,
                    version: header.version,
                }));
            }
            return Ok(Ok(header));
        }
        if line.len() as u64 >= MAX_HEADER_LINE {
            break;
        }
        line.push(byte[0]);
    }
    Ok(Err(SnapshotFileError::NoHeader))
}

fn skip_header_line(file: &mut dyn Read) -> std::io::Result<Result<(), SnapshotFileError>> {
    Ok(read_header_line(file)?.map(drop))
}

/// Checks a snapshot file as it streams by, as [`parse`] does before decoding: its header, the
/// size and SHA-256 of its body, and the body's record checksum.
fn check_file_from(file: &mut dyn Read) -> std::io::Result<Result<SnapshotHeader, SnapshotFileError>> {
    let header = match read_header_line(file)? {
        Ok(header) => header,
        Err(e) => return Ok(Err(e)),
    };
    let mut body = archive::HashingReader::new(file);
    let record = codec::verify_from(&mut body, header.size as u64, "snapshot body");
    // Whatever follows the record is part of the body too: it must not be there.
    std::io::copy(&mut body, &mut std::io::sink())?;
    let (sum, read) = body.finish();
    if read != header.size as u64 || hex::encode(sum) != header.sha256 {
        return Ok(Err(SnapshotFileError::Damaged));
    }
    Ok(record.map(|_| header).map_err(bad_body))
}

/// What [`parse`] checks of a decoded state, and of the tokens beside it, beyond their encoding.
fn check_state(
    state: &State,
    tokens_beside: &std::collections::BTreeMap<String, citadel_core::token::TokenEntry>,
) -> Result<(), SnapshotFileError> {
    let beside = tokens_beside.iter().any(|(key, token)| *key != token.hash);
    if beside || state.tokens.misfiled().is_some() {
        // Neither the key nor the hash: a token's keyed hash has no place in an error or a log.
        return Err(SnapshotFileError::BadBody(
            "a token is stored under a key other than its hash: the file was edited".into(),
        ));
    }
    Ok(())
}

/// What a restore proposes, once the upload is checked whole: refused if it is another
/// cluster's snapshot (unless `force`), or fails a checksum or (unless `force`) its HMAC.
pub fn check_restore(app: &Node, keys: &Unsealed, upload: &[u8], force: bool) -> Result<State, String> {
    // snapshot-force takes another cluster's snapshot, whose keyring we lack: it skips the
    // seal and the HMAC, never a checksum.
    let keyring = (!force).then_some(&keys.keyring);
    let (was_archive, header, stored) = open(upload, keyring)?;
    let current = app.state.read(|s| s.cluster.as_ref().map(|c| c.id.clone()));
    if current.as_deref() != Some(header.cluster_id.as_str()) && !force {
        return Err(format!(
            "the snapshot belongs to cluster {:?}, not this one; use sys/storage/raft/snapshot-force to restore it anyway",
            header.cluster_id
        ));
    }
    if force {
        tracing::warn!(index = header.last_index, cluster = %header.cluster_id, "forced restore: the snapshot's HMAC is not verified (checksums are)");
    } else {
        let within = if was_archive { "state.bin: " } else { "" };
        verify_hmac(&header, &keys.keyring).map_err(|e| format!("{within}{e}"))?;
    }
    tracing::warn!(index = header.last_index, cluster = %header.cluster_id, "restoring a snapshot");
    // A restore keeps this cluster's audit log (`State::restore`): the file's events would
    // only make the Raft entry larger.
    let mut state = stored.into_whole_state().map_err(|e| e.to_string())?;
    state.audit = Default::default();
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_core::state::{ClusterInfo, State};
    use citadel_storage::codec::{StoredLogId, StoredMembershipConfig, StoredMembershipState};

    fn keyring() -> Keyring {
        Keyring::new(1, [1; 32], [2; 32], [3; 32])
    }

    fn stored() -> StoredSnapshot {
        let state = State {
            cluster: Some(ClusterInfo { id: "c1".into(), name: "citadel".into(), initialized_at: 1 }),
            ..State::default()
        };
        StoredSnapshot {
            format: citadel_core::command::FORMAT_VERSION,
            last_applied: Some(StoredLogId { term: 2, leader: 1, index: 9 }),
            membership: StoredMembershipState {
                log_id: None,
                config: StoredMembershipConfig { configs: vec![], nodes: Default::default() },
            },
            state,
            tokens: Default::default(),
            users: Default::default(),
            kv: vec![],
            streamed_secrets: None,
            streamed_maps: None,
        }
    }

    /// A signed file, as `save` writes it.
    pub(crate) fn signed_file(stored: &StoredSnapshot, keyring: &Keyring) -> Vec<u8> {
        signed_file_of(codec::encode(stored), keyring)
    }

    /// A signed file of any body.
    fn signed_file_of(body: Vec<u8>, keyring: &Keyring) -> Vec<u8> {
        let mut header = SnapshotHeader {
            format: FORMAT.into(),
            version: VERSION,
            cluster_id: "c1".into(),
            last_index: 9,
            last_term: 2,
            sha256: hex::encode(Sha256::digest(&body)),
            size: body.len(),
            key_term: 0,
            hmac_sha256: String::new(),
        };
        sign(&mut header, keyring).unwrap();
        let mut file = serde_json::to_vec(&header).unwrap();
        file.push(b'\n');
        file.extend_from_slice(&body);
        file
    }

    /// `file` in Vault's archive, in a file on disk.
    fn archive_file(file: &[u8], keyring: &Keyring) -> std::fs::File {
        archive_file_at(file, keyring, 9)
    }

    /// `file` in Vault's archive whose `meta.json` says index `index`.
    fn archive_file_at(file: &[u8], keyring: &Keyring, index: u64) -> std::fs::File {
        let meta = RaftMeta {
            version: 1,
            id: "2-9-1".into(),
            index,
            term: 2,
            peers: None,
            configuration: Default::default(),
            configuration_index: 0,
            size: file.len() as i64,
        };
        let bytes = archive::write(Vec::new(), &meta, file, file.len() as u64, keyring, &[7; 24], 1).unwrap();
        let mut out = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut out, &bytes).unwrap();
        out
    }

    fn with_secrets() -> StoredSnapshot {
        let mut stored = stored();
        let mount = citadel_core::state::Mount {
            uuid: "u1".into(),
            kind: "kv".into(),
            description: String::new(),
            created: 1,
            kv: Default::default(),
        };
        stored.state.mounts.insert("secret/".into(), mount);
        stored.kv = (0..3)
            .map(|i| citadel_storage::kv_table::StoredKvEntry {
                mount: "secret/".into(),
                path: format!("p{i}"),
                entry: Default::default(),
            })
            .collect();
        stored
    }

    #[test]
    fn an_archive_on_disk_is_verified_as_it_streams_by_and_refused_as_a_restore_would_refuse_it() {
        let ring = keyring();
        let good = signed_file(&with_secrets(), &ring);
        let verified = verify_file(&mut archive_file(&good, &ring), &ring).unwrap();
        assert_eq!((verified.last_index, verified.last_term), (9, 2));

        let other_ring = Keyring::new(1, [7; 32], [2; 32], [3; 32]);
        let err = verify_file(&mut archive_file(&good, &other_ring), &ring).unwrap_err();
        assert!(err.contains("SHA256SUMS.sealed"), "{err}");

        let mut ahead = with_secrets();
        ahead.last_applied = Some(StoredLogId { term: 2, leader: 1, index: 10 });
        let err = verify_file(&mut archive_file(&signed_file(&ahead, &ring), &ring), &ring).unwrap_err();
        assert!(err.contains("does not match its body"), "{err}");

        // Checksums, sums, seal and HMAC all hold; one secret is not a secret.
        let mut body = serde_json::to_value(with_secrets()).unwrap();
        body["kv"][1] = serde_json::json!({ "mount": 7 });
        let err = verify_file(&mut archive_file(&signed_file_of(codec::encode(&body), &ring), &ring), &ring);
        assert!(err.unwrap_err().contains("state.bin: the snapshot body is undecodable"));

        // Sealed by this cluster, but the file inside was signed by another keyring.
        let err = verify_file(&mut archive_file(&signed_file(&with_secrets(), &other_ring), &ring), &ring);
        assert!(err.unwrap_err().contains("HMAC mismatch"));
        let err = verify_file(&mut archive_file_at(&good, &ring, 8), &ring).unwrap_err();
        assert!(err.contains("meta.json does not match state.bin"), "{err}");
        let mut misfiled = with_secrets();
        let token = citadel_core::token::TokenEntry { hash: "b".into(), ..Default::default() };
        misfiled.state.tokens = std::collections::BTreeMap::from([("a".to_string(), token)]).into();
        let err = verify_file(&mut archive_file(&signed_file(&misfiled, &ring), &ring), &ring).unwrap_err();
        assert!(err.contains("stored under a key other than its hash") && !err.contains("\"b\""), "{err}");
        // The same token beside the state, where a format-8 snapshot keeps its tokens.
        let mut misfiled_beside = with_secrets();
        misfiled_beside.tokens = (*std::mem::take(&mut misfiled.state.tokens)).clone();
        let err = verify_file(&mut archive_file(&signed_file(&misfiled_beside, &ring), &ring), &ring).unwrap_err();
        assert!(err.contains("stored under a key other than its hash") && !err.contains("\"b\""), "{err}");

        let mut cut = good.clone();
        cut.truncate(good.len() - 1);
        let err = verify_file(&mut archive_file(&cut, &ring), &ring).unwrap_err();
        assert!(err.contains("damaged or truncated"), "{err}");

        let mut bytes = Vec::new();
        let mut file = archive_file(&good, &ring);
        file.rewind().unwrap();
        file.read_to_end(&mut bytes).unwrap();
        for at in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 5] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 1;
            let mut out = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut out, &flipped).unwrap();
            assert!(verify_file(&mut out, &ring).is_err(), "a flip at byte {at} was accepted");
        }
    }

    #[test]
    fn a_signed_snapshot_verifies_after_a_keyring_rotation() {
        let mut ring = keyring();
        let file = signed_file(&stored(), &ring);
        let (header, body) = parse(&file).unwrap();
        assert_eq!(body, stored());
        assert_eq!(verify_hmac(&header, &ring), Ok(()));
        ring.rotate(2, [9; 32]);
        assert_eq!(verify_hmac(&header, &ring), Ok(()), "old terms stay in the keyring");
        let other = Keyring::new(1, [7; 32], [2; 32], [3; 32]);
        assert_eq!(verify_hmac(&header, &other), Err(SnapshotFileError::HmacMismatch));
    }

    #[test]
    fn a_snapshot_tampered_with_a_recomputed_checksum_fails_its_hmac() {
        let ring = keyring();
        let file = signed_file(&stored(), &ring);
        let (mut header, mut body) = parse(&file).unwrap();
        body.state.cluster.as_mut().unwrap().name = "forged".into();
        let forged = codec::encode(&body);
        header.sha256 = hex::encode(Sha256::digest(&forged));
        header.size = forged.len();
        let mut file = serde_json::to_vec(&header).unwrap();
        file.push(b'\n');
        file.extend_from_slice(&forged);
        let (header, _) = parse(&file).expect("the checksums were recomputed: only the HMAC can tell");
        assert_eq!(verify_hmac(&header, &ring), Err(SnapshotFileError::HmacMismatch));
    }

    #[test]
    fn version_1_files_parse_but_never_authenticate() {
        let ring = keyring();
        let file = signed_file(&stored(), &ring);
        let (mut header, _) = parse(&file).unwrap();
        header.version = VERSION_UNAUTHENTICATED;
        assert_eq!(verify_hmac(&header, &ring), Err(SnapshotFileError::Unauthenticated));
        header.version = 3;
        let mut file3 = serde_json::to_vec(&header).unwrap();
        file3.extend_from_slice(&file[file.iter().position(|b| *b == b'\n').unwrap()..]);
        assert!(matches!(parse(&file3), Err(SnapshotFileError::UnsupportedVersion { version: 3, .. })));
    }

    /// Parsing and then authenticating, as a restore does.
    fn accepted(file: &[u8], ring: &Keyring) -> bool {
        parse(file).is_ok_and(|(header, _)| verify_hmac(&header, ring).is_ok())
    }

    #[test]
    fn no_bit_flip_of_a_signed_snapshot_file_is_accepted() {
        let ring = keyring();
        let file = signed_file(&stored(), &ring);
        assert!(accepted(&file, &ring));
        for bit in 0..file.len() * 8 {
            let mut damaged = file.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(!accepted(&damaged, &ring), "a flip of bit {bit} was accepted");
        }
        for len in 0..file.len() {
            assert!(parse(&file[..len]).is_err(), "a file truncated to {len} bytes was accepted");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 3000, failure_persistence: None, ..Default::default()
        })]

        #[test]
        fn arbitrary_snapshot_files_are_refused_without_panicking(
            head in "\\PC{0,120}", body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)
        ) {
            let mut file = head.into_bytes();
            file.push(b'\n');
            file.extend_from_slice(&body);
            proptest::prop_assert!(!accepted(&file, &keyring()));
        }

        #[test]
        fn mutated_snapshot_files_are_refused_without_panicking(
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8)
        ) {
            let ring = keyring();
            let mut file = signed_file(&stored(), &ring);
            let original = file.clone();
            for (at, byte) in edits {
                let at = at % file.len();
                file[at] = byte;
            }
            proptest::prop_assume!(file != original);
            proptest::prop_assert!(!accepted(&file, &ring));
        }
    }

    #[test]
    fn a_header_that_disagrees_with_its_body_is_refused() {
        let ring = keyring();
        let mut other = stored();
        other.last_applied = Some(StoredLogId { term: 2, leader: 1, index: 10 });
        let file = signed_file(&other, &ring);
        assert_eq!(parse(&file).unwrap_err(), SnapshotFileError::Inconsistent);
    }

    #[test]
    fn a_snapshot_with_a_token_stored_under_another_hash_is_refused_naming_both() {
        let mut edited = stored();
        let token = citadel_core::token::TokenEntry { hash: "b".into(), ..Default::default() };
        edited.state.tokens = std::collections::BTreeMap::from([("a".to_string(), token)]).into();
        let err = parse(&signed_file(&edited, &keyring())).unwrap_err().to_string();
        assert!(err.contains("stored under a key other than its hash") && !err.contains("\"b\""), "{err}");
        let mut beside = stored();
        beside.tokens = (*std::mem::take(&mut edited.state.tokens)).clone();
        let err = parse(&signed_file(&beside, &keyring())).unwrap_err().to_string();
        assert!(err.contains("stored under a key other than its hash") && !err.contains("\"b\""), "{err}");
    }
}
