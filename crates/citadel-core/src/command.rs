//! Commands: the only way state changes (§1.1). Each carries every value `apply` needs that is
//! not a pure function of the state (times, ids, ciphertexts), chosen by the proposing node.

use serde::{Deserialize, Serialize};

use crate::audit::{AuditBody, AuditEvent, ChainError};
use crate::kv::{KvConfig, KvError, MetadataUpdate};
use crate::policy::Policy;
use crate::state::{AuthMount, ClusterInfo, Mount, SealInfo};
use crate::token::{LoginProof, TokenEntry, User};
use crate::UnixMillis;

/// Bumped whenever the encoding of a command or of the state changes incompatibly.
/// 2: audit events keep their body's stored bytes (`audit::AuditEvent`).
/// 3: the Raft log lives in `raft-log` files, not in `raft.redb` (commands are unchanged; format
///    2 data is imported once at start). An older build must refuse such a directory: it would
///    find no vote and no log in `raft.redb` and start as an empty node.
/// 4: log entries may hold `Command::Audited` (a write's audit event inside its entry) and the
///    state the log chain (`audit::LogChain`); a build of format 3 cannot decode either.
/// 5: the audit events live in the node's audit store, not in the state: `snapshot.bin` keeps
///    each chain's tip (`audit::ChainTip`); a build of format 4 would read its chains as empty.
/// 6: the secrets live in the node's state store, not in the state in memory: `snapshot.bin`
///    carries them beside the state (`StoredSnapshot::kv`), and `raft.redb` holds the state as
///    of its applied index; a build of format 5 would read every mount as empty.
/// 7: `snapshot.bin` is `[3][header][snapshot record]`, written as it serializes
///    (`citadel_storage::snapshot_file`), which a build of format 6 would call a damaged record.
/// 8: the tokens and users live in the node's state store (`raft.redb`), not in the state it
///    saves beside it, and `snapshot.bin` carries them beside its state
///    (`StoredSnapshot::tokens`, `users`), read from there; a build of format 7 would start
///    with none.
pub const FORMAT_VERSION: u32 = 8;
/// The oldest format this build still reads. Format 1 differs from 2 only in how audit events
/// are encoded, and `AuditEvent`'s decoding migrates those (their hashes still verify); formats
/// 2 and 3 are format 4 without the new variant and field, which decode as absent; a format 4
/// snapshot holds its audit events, which move to the audit store when it is read.
pub const OLDEST_READABLE_FORMAT: u32 = 1;

/// Whether this build reads data written in `format`.
pub fn readable_format(format: u32) -> bool {
    (OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&format)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitCommand {
    pub cluster: ClusterInfo,
    pub seal: SealInfo,
    pub root_token: TokenEntry,
    pub default_mount_path: String,
    pub default_mount: Mount,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Init(Box<InitCommand>),
    /// Replaces the wrapped keyring with one holding a new term, if nobody rotated meanwhile.
    RotateKeyring {
        expected_term: u32,
        new_term: u32,
        #[serde(with = "crate::encoding")]
        wrapped_keyring: Vec<u8>,
        at: UnixMillis,
    },
    MountEnable {
        path: String,
        mount: Mount,
    },
    MountDisable {
        path: String,
    },
    /// Enables an auth method at `auth/<path>`.
    AuthEnable {
        path: String,
        mount: AuthMount,
    },
    /// Disables an auth method: its users and their tokens go with it.
    AuthDisable {
        path: String,
    },
    KvWrite {
        mount: String,
        path: String,
        /// The version the ciphertext's associated data is bound to.
        version: u64,
        #[serde(with = "crate::encoding")]
        ciphertext: Vec<u8>,
        cas: Option<u64>,
        at: UnixMillis,
    },
    KvDelete {
        mount: String,
        path: String,
        versions: Vec<u64>,
        at: UnixMillis,
    },
    KvUndelete {
        mount: String,
        path: String,
        versions: Vec<u64>,
        at: UnixMillis,
    },
    KvDestroy {
        mount: String,
        path: String,
        versions: Vec<u64>,
        at: UnixMillis,
    },
    KvMetadataUpdate {
        mount: String,
        path: String,
        update: MetadataUpdate,
        at: UnixMillis,
    },
    KvMetadataDelete {
        mount: String,
        path: String,
    },
    KvConfigure {
        mount: String,
        config: KvConfig,
    },
    PolicyPut {
        policy: Policy,
    },
    PolicyDelete {
        name: String,
    },
    UserPut {
        user: User,
    },
    UserDelete {
        username: String,
    },
    TokenCreate {
        entry: Box<TokenEntry>,
        /// Set by a login: the token is refused if the user changed meanwhile.
        #[serde(default)]
        login: Option<LoginProof>,
    },
    TokenRenew {
        hash: String,
        expires: UnixMillis,
        ttl_secs: u64,
    },
    /// Revokes the token and, as Vault does, every token created under it.
    TokenRevoke {
        hash: String,
    },
    /// Removes tokens whose deadline (chosen by the leader's sweep) has passed.
    TokensExpire {
        now: UnixMillis,
    },
    AuditShip {
        events: Vec<AuditEvent>,
    },
    /// Replaces the state with a snapshot's (operator restore). The audit log is kept as it is:
    /// a restore must not lose audit events.
    RestoreState {
        state: Box<crate::state::State>,
    },
    SetClusterCa {
        ca: crate::state::ClusterCa,
    },
    JoinTokenCreate {
        hash: String,
        expires: UnixMillis,
        /// The only node id a certificate bought with this token may name (none: any).
        #[serde(default)]
        node_id: Option<u64>,
    },
    /// Spends a join token: accepted once, before it expires (`now` chosen by the proposer),
    /// and only for the node id it was issued for, if it names one.
    JoinTokenUse {
        hash: String,
        now: UnixMillis,
        #[serde(default)]
        node_id: Option<u64>,
    },
    /// Records a member's certificate, so that removing the member can revoke it. Records of
    /// that node whose certificates expired by `at` (chosen by the proposer) are dropped.
    NodeCertRecord {
        node_id: u64,
        /// Lowercase hex, as `PeerIdentity` shows it.
        serial: String,
        not_after: UnixMillis,
        at: UnixMillis,
    },
    /// Revokes every certificate recorded for a removed node, and forgets revoked serials whose
    /// certificates expired by `now` (chosen by the proposer): the deny list stays bounded.
    NodeCertsRevoke {
        node_id: u64,
        now: UnixMillis,
    },
    /// A client request's command, with the token that authorized it (§8.1): `apply` refuses it
    /// if that token no longer exists or had expired at `at`, so a token revoked on the leader
    /// cannot write through a follower that has not yet heard of the revocation.
    Authorized {
        token_hash: String,
        request_id: String,
        at: UnixMillis,
        command: Box<Command>,
    },
    /// Spends one use of a token created with `num_uses`.
    TokenUse {
        hash: String,
    },
    /// Revokes an emergency token until it would have expired anyway.
    EmergencyTokenRevoke {
        hash: String,
        expires: UnixMillis,
        at: UnixMillis,
    },
    /// Marks a member inactive (§10.1: it serves no client and autopilot gives it no vote) or
    /// active again. The leader checks that `node_id` is a member before proposing.
    NodeSetActive {
        node_id: u64,
        active: bool,
    },
    /// Adds or replaces a scheduled snapshot configuration (§10.2).
    SnapshotAutoPut {
        name: String,
        config: crate::snapshot_auto::AutoSnapshotConfig,
    },
    SnapshotAutoDelete {
        name: String,
    },
    /// How a scheduled snapshot run went (the leader's `snapshot_auto` job).
    SnapshotAutoRecord {
        name: String,
        status: crate::snapshot_auto::AutoSnapshotStatus,
    },
    /// Adds or replaces an alert sink (§11.2).
    AlertSinkPut {
        name: String,
        sink: crate::alerts::Sink,
    },
    AlertSinkDelete {
        name: String,
    },
    /// Alerts the leader's `alerts` job fired and resolved at `at`.
    AlertsUpdate {
        fire: Vec<crate::alerts::Firing>,
        /// Fingerprints.
        resolve: Vec<String>,
        at: UnixMillis,
    },
    /// What `sink` acknowledged: (fingerprint, revision) pairs (the leader's delivery job).
    AlertsDelivered {
        sink: String,
        acks: Vec<(String, u64)>,
    },
    /// Forgets records that expired by `now` (chosen by the leader's job): unused join tokens,
    /// revoked serials whose certificates expired, and expired member certificates. Nothing
    /// here is still valid, so nothing a client holds changes meaning.
    PruneExpired {
        now: UnixMillis,
    },
    /// Retention (§9.3, the leader's `audit_retention` job): each chain's events up to its
    /// point, all older than `before`, leave the audit store for an archive file.
    AuditPrune {
        before: UnixMillis,
        through: Vec<crate::audit::PrunePoint>,
    },
    /// The result of a leader-only job (§1.6): `job` ran on `node` while it led in `term`.
    /// `apply` refuses it unless the log entry carrying it was created by that node in that
    /// term (a deposed leader's late result), then applies `command` (if the run changed
    /// anything) and records the run in the state's bounded job log.
    JobResult {
        term: u64,
        node: crate::NodeId,
        job: String,
        at: UnixMillis,
        command: Option<Box<Command>>,
    },
    /// A client request's command with the request's audit event (§1.4, `audited.rs`): `apply`
    /// applies `command` exactly as alone (same rejections, same response), then records
    /// `audit` with that outcome in the cluster's log chain, numbered and linked in log order.
    /// An event past the bounds (`audited::check`) is a rejection: nothing is applied.
    Audited {
        audit: Box<AuditBody>,
        command: Box<Command>,
    },
}

impl Command {
    /// The secret (mount, path) a KV command reads and changes, through its envelopes: the
    /// state machine loads that entry from its store before `apply` ([`crate::state::State::preload_kv`]).
    pub fn kv_target(&self) -> Option<(&str, &str)> {
        match self {
            Command::KvWrite { mount, path, .. }
            | Command::KvDelete { mount, path, .. }
            | Command::KvUndelete { mount, path, .. }
            | Command::KvDestroy { mount, path, .. }
            | Command::KvMetadataUpdate { mount, path, .. }
            | Command::KvMetadataDelete { mount, path } => Some((mount, path)),
            Command::Authorized { command, .. } | Command::Audited { command, .. } => command.kv_target(),
            _ => None,
        }
    }

    /// A short name for logs and metrics; never includes a value.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Init(_) => "init",
            Command::RotateKeyring { .. } => "rotate_keyring",
            Command::MountEnable { .. } => "mount_enable",
            Command::MountDisable { .. } => "mount_disable",
            Command::AuthEnable { .. } => "auth_enable",
            Command::AuthDisable { .. } => "auth_disable",
            Command::KvWrite { .. } => "kv_write",
            Command::KvDelete { .. } => "kv_delete",
            Command::KvUndelete { .. } => "kv_undelete",
            Command::KvDestroy { .. } => "kv_destroy",
            Command::KvMetadataUpdate { .. } => "kv_metadata_update",
            Command::KvMetadataDelete { .. } => "kv_metadata_delete",
            Command::KvConfigure { .. } => "kv_configure",
            Command::PolicyPut { .. } => "policy_put",
            Command::PolicyDelete { .. } => "policy_delete",
            Command::UserPut { .. } => "user_put",
            Command::UserDelete { .. } => "user_delete",
            Command::TokenCreate { .. } => "token_create",
            Command::TokenRenew { .. } => "token_renew",
            Command::TokenRevoke { .. } => "token_revoke",
            Command::TokensExpire { .. } => "tokens_expire",
            Command::AuditShip { .. } => "audit_ship",
            Command::RestoreState { .. } => "restore_state",
            Command::SetClusterCa { .. } => "set_cluster_ca",
            Command::JoinTokenCreate { .. } => "join_token_create",
            Command::JoinTokenUse { .. } => "join_token_use",
            Command::Authorized { command, .. } => command.kind(),
            Command::TokenUse { .. } => "token_use",
            Command::EmergencyTokenRevoke { .. } => "emergency_token_revoke",
            Command::NodeCertRecord { .. } => "node_cert_record",
            Command::NodeCertsRevoke { .. } => "node_certs_revoke",
            Command::NodeSetActive { .. } => "node_set_active",
            Command::SnapshotAutoPut { .. } => "snapshot_auto_put",
            Command::SnapshotAutoDelete { .. } => "snapshot_auto_delete",
            Command::SnapshotAutoRecord { .. } => "snapshot_auto_record",
            Command::AlertSinkPut { .. } => "alert_sink_put",
            Command::AlertSinkDelete { .. } => "alert_sink_delete",
            Command::AlertsUpdate { .. } => "alerts_update",
            Command::AlertsDelivered { .. } => "alerts_delivered",
            Command::PruneExpired { .. } => "prune_expired",
            Command::AuditPrune { .. } => "audit_prune",
            Command::JobResult { .. } => "job_result",
            Command::Audited { command, .. } => command.kind(),
        }
    }

    /// What the leader may commit when a member forwards it (§8.1). Client requests only:
    /// authorized commands, and the few a client makes without a token (a login's token, a
    /// join token being spent, an emergency token's revocation). Init, CA changes and leader
    /// jobs never arrive from another node; keyring rotations and restores arrive authorized
    /// and the leader also checks their token's privileges.
    pub fn forwarding(&self) -> Forwarding {
        match self {
            Command::Authorized { command, .. } => match command.as_ref() {
                Command::RotateKeyring { .. } | Command::RestoreState { .. } => Forwarding::Privileged,
                Command::Init(_)
                | Command::SetClusterCa { .. }
                | Command::TokensExpire { .. }
                | Command::JobResult { .. }
                | Command::PruneExpired { .. }
                | Command::AuditPrune { .. }
                | Command::AuditShip { .. }
                | Command::Audited { .. }
                | Command::Authorized { .. }
                // The leader's own: a lifecycle action runs on the leader, a job's record in its job.
                | Command::NodeSetActive { .. }
                | Command::SnapshotAutoRecord { .. }
                | Command::AlertsUpdate { .. }
                | Command::AlertsDelivered { .. } => Forwarding::Refused,
                _ => Forwarding::Client,
            },
            // An envelope travels as it is: what it wraps decides, and it must wrap an
            // authorized command (the sender's request); the leader also checks that the
            // event is the sender's own.
            Command::Audited { command, .. } => match command.as_ref() {
                Command::Authorized { .. } => command.forwarding(),
                _ => Forwarding::Refused,
            },
            Command::TokenCreate { login: Some(_), .. }
            | Command::JoinTokenUse { .. }
            | Command::EmergencyTokenRevoke { .. } => Forwarding::Client,
            Command::AuditShip { .. } => Forwarding::AuditOfSender,
            _ => Forwarding::Refused,
        }
    }
}

/// How the leader treats a command a member forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// A client request: committed.
    Client,
    /// Committed if its token holds `sudo` on the operation's path on the leader too.
    Privileged,
    /// The sender's own audit events: committed if every event is the sender's.
    AuditOfSender,
    /// Never accepted from another node.
    Refused,
}

/// Why `apply` refused a command. A refused command changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("the vault is not initialized")]
    NotInitialized,
    #[error("the vault is already initialized")]
    AlreadyInitialized,
    #[error("nothing is mounted at {0:?}")]
    MountNotFound(String),
    #[error("a secrets engine or auth method is already mounted at {0:?}, or the path overlaps one")]
    MountExists(String),
    #[error("at most {max} mounts of each kind may exist; disable one first")]
    TooManyMounts { max: usize },
    #[error("a mount path may be at most {max_path} bytes and its description at most {max_description}")]
    MountTooLarge { max_path: usize, max_description: usize },
    #[error("{0}")]
    Kv(KvError),
    #[error("the keyring was rotated concurrently (current term {current}); retry")]
    KeyringChanged { current: u32 },
    #[error("policy {0:?} is built in and cannot be changed or deleted")]
    BuiltInPolicy(String),
    #[error("no policy named {0:?}")]
    PolicyNotFound(String),
    #[error("no user named {0:?}")]
    UserNotFound(String),
    #[error("token not found")]
    TokenNotFound,
    #[error("audit chain: {0}")]
    Audit(ChainError),
    #[error("the join token is unknown, expired, or already used")]
    JoinTokenInvalid,
    #[error("the request's token was revoked or has expired")]
    TokenInvalid,
    #[error("the user was deleted or its password changed during the login; log in again")]
    LoginOutdated,
    #[error("a renewal may not pass the token's maximum TTL")]
    RenewalPastMax,
    #[error("an authorized command cannot wrap another authorized command")]
    NestedAuthorization,
    #[error("the proposed keyring term {proposed} is not newer than the current term {current}; retry")]
    KeyringTermNotNewer { current: u32, proposed: u32 },
    #[error("the join token was issued for node {0}, not for this node id")]
    JoinTokenForAnotherNode(u64),
    #[error("node certificate: {0}")]
    NodeCertInvalid(String),
    #[error("node certificate {0} is revoked")]
    NodeCertRevoked(String),
    #[error("{0}")]
    Job(crate::job::JobRefusal),
    #[error(
        "an audited command's event may hold at most {max_field} bytes of path or user and {max_event} bytes in all"
    )]
    AuditEventTooLarge { max_field: usize, max_event: usize },
    #[error("an audited command cannot wrap another audited command")]
    NestedAudit,
    #[error("at most {max} nodes may be inactive; activate or remove one first")]
    TooManyInactiveNodes { max: usize },
    #[error("scheduled snapshot: {0}")]
    SnapshotAuto(crate::snapshot_auto::ConfigError),
    #[error("no scheduled snapshot configuration named {0:?}")]
    SnapshotAutoNotFound(String),
    #[error("alerts: {0}")]
    Alerts(crate::alerts::AlertError),
}

impl Rejection {
    /// The HTTP status the API answers this rejection with. Kept here, beside the rejections,
    /// because `apply` writes it into the audit event of a request whose command it rejected
    /// (`audited.rs`): the event and the client's answer must say the same.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Kv(KvError::NotFound)
            | Rejection::PolicyNotFound(_)
            | Rejection::UserNotFound(_)
            | Rejection::MountNotFound(_)
            | Rejection::SnapshotAutoNotFound(_)
            | Rejection::Alerts(crate::alerts::AlertError::NoSuchSink(_)) => 404,
            Rejection::KeyringChanged { .. } | Rejection::KeyringTermNotNewer { .. } => 409,
            _ => 400,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    KvWritten { version: u64, created: UnixMillis, deletion_time: Option<UnixMillis> },
    AuditShipped { accepted: usize },
    Rejected(Rejection),
}

/// Log lines name the command kind only: values never reach a log.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Response::Done => f.write_str("done"),
            Response::KvWritten { version, .. } => write!(f, "kv_written(v{version})"),
            Response::AuditShipped { accepted } => write!(f, "audit_shipped({accepted})"),
            Response::Rejected(r) => write!(f, "rejected({r})"),
        }
    }
}
