//! The replicated state and its deterministic `apply`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditBody, AuditLog};
use crate::audited;
use crate::command::{Command, InitCommand, Rejection, Response};
use crate::job::{self, JobLog, JobRefusal, JobRun, LogPosition};
use crate::kv::{KvStore, WriteRequest};
use crate::policy::{self, Policy};
use crate::stored_map::{StoredChanges, StoredMap};
use crate::token::{LoginProof, TokenEntry, User, UserRead};
use crate::token_table::{TokenRead, TokenTable};
use crate::UnixMillis;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: String,
    pub name: String,
    pub initialized_at: UnixMillis,
}

/// Everything needed to unseal, none of it usable without the unseal key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealInfo {
    pub shares: usize,
    pub threshold: usize,
    #[serde(with = "crate::encoding")]
    pub wrapped_root_key: Vec<u8>,
    #[serde(with = "crate::encoding")]
    pub wrapped_keyring: Vec<u8>,
    pub key_term: u32,
    pub key_installed: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Bound into every ciphertext of the mount, so data cannot move between mounts.
    pub uuid: String,
    pub kind: String,
    pub description: String,
    pub created: UnixMillis,
    pub kv: KvStore,
}

/// An auth method mounted under `auth/` beside the built-in `token/` and `userpass/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthMount {
    pub uuid: String,
    /// The method (`userpass`).
    pub kind: String,
    pub description: String,
    pub created: UnixMillis,
}

/// The built-in userpass mount, under `auth/`; its users are keyed by their bare names.
pub const DEFAULT_USERPASS: &str = "userpass/";
/// The token store's mount, under `auth/`.
pub const TOKEN_AUTH: &str = "token/";
/// Most secrets engines, and most auth methods, a cluster holds (§8.3).
pub const MAX_MOUNTS: usize = 256;
/// Longest mount path, and longest mount description, in bytes: a mount is replicated state, and
/// a request body may be 1 MiB.
pub const MAX_MOUNT_PATH: usize = 128;
pub const MAX_MOUNT_DESCRIPTION: usize = 1024;

/// Refuses a mount whose path or description is longer than the limits.
fn check_mount_size(path: &str, description: &str) -> Result<(), Rejection> {
    if path.len() > MAX_MOUNT_PATH || description.len() > MAX_MOUNT_DESCRIPTION {
        return Err(Rejection::MountTooLarge { max_path: MAX_MOUNT_PATH, max_description: MAX_MOUNT_DESCRIPTION });
    }
    Ok(())
}

/// Where a user of an auth mount is stored in `State::users`: a user of the built-in
/// `userpass/` mount under its name (as before mounts existed), any other under its mount path
/// and name (`corp/alice`). Names hold no `/`, so the two never collide.
pub fn user_key(mount: &str, username: &str) -> String {
    if mount == DEFAULT_USERPASS {
        username.to_string()
    } else {
        format!("{mount}{username}")
    }
}

/// The cluster CA, held by the cluster so that it can certify joining nodes. The key is sealed
/// by the barrier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    pub common_name: String,
    pub cert_pem: String,
    #[serde(with = "crate::encoding")]
    pub key_ciphertext: Vec<u8>,
}

/// A one-time join token, stored as a keyed hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub expires: UnixMillis,
    pub used: bool,
    /// The only node id this token may certify (none: any node id that is not a member).
    #[serde(default)]
    pub node_id: Option<u64>,
}

/// Most certificates recorded for one node at a time (a renewal adds one; expired ones go).
pub const MAX_CERTS_PER_NODE: usize = 8;
/// Longest certificate serial accepted, in hex digits (RFC 5280 allows 20 octets).
pub const MAX_SERIAL_HEX: usize = 40;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub cluster: Option<ClusterInfo>,
    pub seal: Option<SealInfo>,
    /// Keyed by mount path with its trailing slash (`secret/`).
    pub mounts: BTreeMap<String, Mount>,
    pub policies: BTreeMap<String, Policy>,
    /// Keyed by `user_key` (mount path and username).
    pub users: StoredMap<User>,
    /// Keyed by token hash, with the indexes revocation walks.
    pub tokens: TokenTable,
    pub audit: AuditLog,
    #[serde(default)]
    pub cluster_ca: Option<ClusterCa>,
    /// Keyed by token hash.
    #[serde(default)]
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// Revoked emergency tokens (keyed hash → when it would have expired anyway); pruned once
    /// past that, so the list stays as small as 15 minutes of revocations.
    #[serde(default)]
    pub revoked_emergency: BTreeMap<String, UnixMillis>,
    /// Certificates of members, by node id: serial (hex) → expiry.
    #[serde(default)]
    pub node_certs: BTreeMap<u64, BTreeMap<String, UnixMillis>>,
    /// The deny list: revoked serials (hex) → expiry; kept until the certificate expires.
    #[serde(default)]
    pub revoked_serials: BTreeMap<String, UnixMillis>,
    /// Auth methods enabled with `sys/auth/:path`, keyed by path under `auth/` with its
    /// trailing slash (`corp/`).
    #[serde(default)]
    pub auth_mounts: BTreeMap<String, AuthMount>,
    /// The latest leader-only job runs (bounded), in log order.
    #[serde(default)]
    pub jobs: JobLog,
    /// Members an operator deactivated (§10.1): they replicate, but serve no client and get no
    /// vote. At most [`MAX_INACTIVE_NODES`]; a removed node leaves the set.
    #[serde(default)]
    pub inactive_nodes: BTreeSet<u64>,
    /// Scheduled snapshot configurations and how their last run went (§10.2).
    #[serde(default)]
    pub snapshot_auto: BTreeMap<String, crate::snapshot_auto::AutoSnapshot>,
    /// Alert sinks and the outbox of alerts with what each sink acknowledged (§11.2).
    #[serde(default)]
    pub alerts: crate::alerts::Alerts,
    /// Mount paths whose stored entries no longer count (the mount was disabled, or replaced by
    /// a restore) since the last batch: the store forgets them before it writes the batch's
    /// entries, and nothing is loaded from it for them meanwhile.
    #[serde(skip)]
    pub kv_cleared: BTreeSet<String>,
}

/// What one batch changed in the secrets of every mount ([`State::take_kv_changes`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StateKvChanges {
    /// Mount paths whose stored entries all go, before `mounts` is written.
    pub cleared: Vec<String>,
    /// Each mount's changes, by mount path.
    pub mounts: Vec<(String, crate::kv::KvChanges)>,
}

/// Reads what a node's store holds beside the state in memory: its secrets, users and tokens.
pub trait StoreRead: crate::kv::KvRead + UserRead + TokenRead {}

impl<T: crate::kv::KvRead + UserRead + TokenRead> StoreRead for T {}

/// A state that holds its users in memory reads them from there (tests: a node's users are in its
/// store, and its state holds none between batches).
#[cfg(test)]
impl UserRead for State {
    fn user(&self, key: &str) -> std::io::Result<Option<User>> {
        Ok(self.users.get(key).cloned())
    }

    fn user_keys_under(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        Ok(self.users.keys().filter(|k| k.starts_with(prefix)).cloned().collect())
    }
}

/// More inactive nodes than any cluster has members is a hostile or broken proposer.
pub const MAX_INACTIVE_NODES: usize = 64;

impl State {
    pub fn is_initialized(&self) -> bool {
        self.cluster.is_some()
    }

    /// Finds the mount serving `path` (longest mount prefix) and the path inside it.
    pub fn route<'a>(&self, path: &'a str) -> Option<(&str, &'a str)> {
        self.mounts
            .keys()
            .filter(|m| path.starts_with(m.as_str()) || path == m.trim_end_matches('/'))
            .max_by_key(|m| m.len())
            .map(|m| (m.as_str(), path.get(m.len()..).unwrap_or("")))
    }

    /// The policies named, with `default` as stored (built in).
    pub fn policies_named<'a>(&'a self, names: &'a [String]) -> impl Iterator<Item = &'a Policy> + 'a {
        names.iter().filter_map(|n| self.policies.get(n))
    }

    /// Applies a command that is not in a Raft log entry (tests, tools): like `apply_entry`,
    /// except that a job result, whose term cannot be checked without its entry, is refused.
    pub fn apply(&mut self, command: Command) -> Response {
        self.apply_at(None, command)
    }

    /// Applies the command carried by the log entry at `entry` (the state machine's path). The
    /// entry's leader id is replicated with it, so every replica decides alike.
    pub fn apply_entry(&mut self, entry: LogPosition, command: Command) -> Response {
        self.apply_at(Some(&entry), command)
    }

    fn apply_at(&mut self, entry: Option<&LogPosition>, command: Command) -> Response {
        if !self.is_initialized() && !matches!(command, Command::Init(_) | Command::AuditShip { .. }) {
            return Response::Rejected(Rejection::NotInitialized);
        }
        match self.apply_checked(entry, command) {
            Ok(response) => response,
            Err(rejection) => Response::Rejected(rejection),
        }
    }

    /// Loads the entry `command` will read and change, if it is neither in memory nor void, by
    /// `load(mount, path)` from the node's store. Called before `apply_entry`, so that `apply`
    /// itself stays free of I/O.
    pub fn preload_kv<E>(
        &mut self,
        command: &Command,
        load: impl FnOnce(&str, &str) -> Result<Option<crate::kv::KvEntry>, E>,
    ) -> Result<(), E> {
        let Some((mount, path)) = command.kv_target() else { return Ok(()) };
        if self.kv_cleared.contains(mount) {
            return Ok(());
        }
        if let Some(kv) = self.mounts.get_mut(mount).map(|m| &mut m.kv) {
            if kv.needs(path) {
                kv.preload(path, load(mount, path)?);
            }
        }
        Ok(())
    }

    /// What changed in the tokens since the last call, for the node's store to write.
    pub fn take_token_changes(&mut self) -> crate::token_table::TokenChanges {
        self.tokens.take_changes()
    }

    /// Loads the users `command` will read or change that memory does not answer for, from the
    /// node's store. Called before `apply_entry`, as `preload_kv` is; after the batch the store
    /// takes the changes and memory forgets the users (`State::forget_users`).
    pub fn preload_users(&mut self, command: &Command, store: &dyn UserRead) -> std::io::Result<()> {
        let mut load = |key: &str| -> std::io::Result<()> {
            if self.users.needs(key) {
                self.users.preload(key, store.user(key)?);
            }
            Ok(())
        };
        match command {
            Command::UserPut { user } => load(&user.username),
            Command::UserDelete { username } => load(username),
            Command::TokenCreate { login: Some(proof), .. } => load(&proof.username),
            Command::AuthDisable { path } => store.user_keys_under(path)?.iter().try_for_each(|key| load(key)),
            Command::Authorized { command, .. }
            | Command::Audited { command, .. }
            | Command::JobResult { command: Some(command), .. } => self.preload_users(command, store),
            _ => Ok(()),
        }
    }

    /// Empties memory of users once the store has taken their changes.
    pub fn forget_users(&mut self) {
        self.users.forget();
    }

    /// Loads the tokens `command` will read or change that memory does not answer for, from the
    /// node's store: each token it names, and every token a revocation it makes would reach
    /// (descendants, a user's tokens, those ended by a sweep's deadline). Called before
    /// `apply_entry`, after `preload_users` (a disabled auth mount's users must be in memory);
    /// after the batch the store takes the changes and memory forgets the tokens.
    pub fn preload_tokens(&mut self, command: &Command, store: &dyn TokenRead) -> std::io::Result<()> {
        match command {
            Command::Init(init) => self.load_token(&init.root_token.hash, store),
            Command::TokenCreate { entry, .. } => self.load_token(&entry.hash, store),
            Command::TokenRenew { hash, .. } | Command::TokenUse { hash } => self.load_token(hash, store),
            Command::TokenRevoke { hash } => self.load_token_tree(hash, store),
            Command::TokensExpire { now } => {
                // Those the store has ended, and those memory has (changed in this batch).
                let mut roots = store.tokens_unusable_at(*now)?;
                roots.extend(self.tokens.unusable_at(*now).map(str::to_string));
                roots.iter().try_for_each(|root| self.load_token_tree(root, store))
            }
            // A new password revokes the user's tokens (`put_user`); the user is loaded already.
            Command::UserPut { user } => {
                let old = self.users.get(&user.username);
                if old.is_some_and(|old| old.password_hash != user.password_hash) {
                    self.load_user_tokens(&user.username, store)?;
                }
                Ok(())
            }
            Command::UserDelete { username } => self.load_user_tokens(username, store),
            Command::AuthDisable { path } => {
                let users: Vec<String> = self.users.keys().filter(|k| k.starts_with(path.as_str())).cloned().collect();
                users.iter().try_for_each(|user| self.load_user_tokens(user, store))
            }
            Command::Authorized { token_hash, command, .. } => {
                self.load_token(token_hash, store)?;
                self.preload_tokens(command, store)
            }
            Command::Audited { command, .. } | Command::JobResult { command: Some(command), .. } => {
                self.preload_tokens(command, store)
            }
            _ => Ok(()),
        }
    }

    fn load_token(&mut self, key: &str, store: &dyn TokenRead) -> std::io::Result<()> {
        if self.tokens.needs(key) {
            self.tokens.preload(key, store.token(key)?);
        }
        Ok(())
    }

    /// Loads `root` and every descendant, as `TokenTable::remove_tree` walks them: the stored
    /// children memory does not answer for, then memory's own (loaded, or created in this batch).
    fn load_token_tree(&mut self, root: &str, store: &dyn TokenRead) -> std::io::Result<()> {
        let mut pending = vec![root.to_string()];
        let mut walked = BTreeSet::new();
        while let Some(key) = pending.pop() {
            if !walked.insert(key.clone()) {
                continue;
            }
            self.load_token(&key, store)?;
            for child in store.token_children(&key)? {
                self.load_token(&child, store)?;
            }
            pending.extend(self.tokens.children_of(&key).map(str::to_string));
        }
        Ok(())
    }

    /// Loads every token carrying `username`, each with its descendants.
    fn load_user_tokens(&mut self, username: &str, store: &dyn TokenRead) -> std::io::Result<()> {
        for key in store.tokens_of_username(username)? {
            self.load_token(&key, store)?;
        }
        let owned: Vec<String> = self.tokens.of_username(username).map(|t| t.hash.clone()).collect();
        owned.iter().try_for_each(|key| self.load_token_tree(key, store))
    }

    /// Empties memory of tokens once the store has taken their changes.
    pub fn forget_tokens(&mut self) {
        self.tokens.forget();
    }

    /// What changed in the users since the last call, for the node's store to write.
    pub fn take_user_changes(&mut self) -> StoredChanges<User> {
        self.users.take_changes()
    }

    /// Empties memory of secrets, returning what the store must forget and write.
    pub fn take_kv_changes(&mut self) -> StateKvChanges {
        let cleared = std::mem::take(&mut self.kv_cleared).into_iter().collect();
        let mounts = self.mounts.iter_mut().map(|(path, m)| (path.clone(), m.kv.take_changes()));
        StateKvChanges { cleared, mounts: mounts.filter(|(_, c)| !c.put.is_empty() || !c.removed.is_empty()).collect() }
    }

    fn kv_mut(&mut self, mount: &str) -> Result<&mut KvStore, Rejection> {
        self.mounts.get_mut(mount).map(|m| &mut m.kv).ok_or_else(|| Rejection::MountNotFound(mount.to_string()))
    }

    fn apply_checked(&mut self, entry: Option<&LogPosition>, command: Command) -> Result<Response, Rejection> {
        match command {
            Command::Init(init) => self.init(*init),
            Command::RotateKeyring { expected_term, new_term, wrapped_keyring, at } => {
                self.rotate_keyring(expected_term, new_term, wrapped_keyring, at)
            }
            Command::MountEnable { path, mount } => self.enable_mount(path, mount),
            Command::AuthEnable { path, mount } => self.enable_auth(path, mount),
            Command::AuthDisable { path } => self.disable_auth(path),
            Command::MountDisable { path } => {
                self.mounts.remove(&path).ok_or_else(|| Rejection::MountNotFound(path.clone()))?;
                self.kv_cleared.insert(path);
                Ok(Response::Done)
            }
            Command::KvWrite { mount, path, version, ciphertext, cas, at } => {
                let kv = self.kv_mut(&mount)?;
                let (version, created, deletion_time) =
                    kv.write(WriteRequest { path, version, ciphertext, cas, at }).map_err(Rejection::Kv)?;
                Ok(Response::KvWritten { version, created, deletion_time })
            }
            Command::KvDelete { mount, path, versions, at } => {
                self.kv_mut(&mount)?.soft_delete(&path, &versions, at).map_err(Rejection::Kv)?;
                Ok(Response::Done)
            }
            Command::KvUndelete { mount, path, versions, at } => {
                self.kv_mut(&mount)?.undelete(&path, &versions, at).map_err(Rejection::Kv)?;
                Ok(Response::Done)
            }
            Command::KvDestroy { mount, path, versions, at } => {
                self.kv_mut(&mount)?.destroy(&path, &versions, at).map_err(Rejection::Kv)?;
                Ok(Response::Done)
            }
            Command::KvMetadataUpdate { mount, path, update, at } => {
                self.kv_mut(&mount)?.update_metadata(&path, &update, at).map_err(Rejection::Kv)?;
                Ok(Response::Done)
            }
            Command::KvMetadataDelete { mount, path } => {
                self.kv_mut(&mount)?.delete_all(&path).map_err(Rejection::Kv)?;
                Ok(Response::Done)
            }
            Command::KvConfigure { mount, config } => {
                self.kv_mut(&mount)?.config = config;
                Ok(Response::Done)
            }
            Command::PolicyPut { policy } => {
                if policy.name == policy::ROOT {
                    return Err(Rejection::BuiltInPolicy(policy.name));
                }
                self.policies.insert(policy.name.clone(), policy);
                Ok(Response::Done)
            }
            Command::PolicyDelete { name } => {
                if name == policy::ROOT || name == policy::DEFAULT {
                    return Err(Rejection::BuiltInPolicy(name));
                }
                self.policies.remove(&name).ok_or(Rejection::PolicyNotFound(name))?;
                Ok(Response::Done)
            }
            Command::UserPut { user } => self.put_user(user),
            Command::UserDelete { username } => {
                self.users.remove(&username).ok_or_else(|| Rejection::UserNotFound(username.clone()))?;
                self.revoke_user_tokens(&username);
                Ok(Response::Done)
            }
            Command::TokenCreate { entry, login } => self.create_token(*entry, login),
            Command::TokenRenew { hash, expires, ttl_secs } => {
                let token = self.tokens.get(&hash).ok_or(Rejection::TokenNotFound)?;
                if token.max_expires.is_some_and(|max| expires > max) {
                    return Err(Rejection::RenewalPastMax);
                }
                self.tokens.update(&hash, |token| {
                    token.expires = Some(expires);
                    token.ttl_secs = ttl_secs;
                });
                Ok(Response::Done)
            }
            Command::TokenUse { hash } => self.spend_token_use(&hash, None),
            Command::EmergencyTokenRevoke { hash, expires, at } => {
                self.revoked_emergency.retain(|_, e| *e > at);
                if expires > at {
                    self.revoked_emergency.insert(hash, expires);
                }
                Ok(Response::Done)
            }
            Command::Authorized { token_hash, request_id, at, command } => {
                if matches!(*command, Command::Authorized { .. }) {
                    return Err(Rejection::NestedAuthorization);
                }
                let token = self.tokens.get(&token_hash).ok_or(Rejection::TokenInvalid)?;
                if token.is_expired(at) {
                    return Err(Rejection::TokenInvalid);
                }
                match *command {
                    Command::TokenUse { hash } => self.spend_token_use(&hash, Some(request_id)),
                    command => self.apply_checked(entry, command),
                }
            }
            Command::JobResult { term, node, job, at, command } => {
                self.apply_job_result(entry, JobRun { job, term, node, index: 0, at }, command)
            }
            Command::TokenRevoke { hash } => {
                if !self.tokens.contains_key(&hash) {
                    return Err(Rejection::TokenNotFound);
                }
                self.tokens.remove_tree(&hash);
                Ok(Response::Done)
            }
            Command::TokensExpire { now } => {
                self.revoked_emergency.retain(|_, e| *e > now);
                let expired: Vec<String> = self.tokens.unusable_at(now).map(str::to_string).collect();
                for hash in expired {
                    self.tokens.remove_tree(&hash);
                }
                Ok(Response::Done)
            }
            Command::SetClusterCa { ca } => {
                self.cluster_ca = Some(ca);
                Ok(Response::Done)
            }
            Command::JoinTokenCreate { hash, expires, node_id } => {
                self.join_tokens.entry(hash).or_insert(JoinToken { expires, used: false, node_id });
                Ok(Response::Done)
            }
            Command::JoinTokenUse { hash, now, node_id } => self.use_join_token(hash, now, node_id),
            Command::NodeCertRecord { node_id, serial, not_after, at } => {
                self.record_node_cert(node_id, serial, not_after, at)
            }
            Command::NodeSetActive { node_id, active: true } => {
                self.inactive_nodes.remove(&node_id);
                Ok(Response::Done)
            }
            Command::NodeSetActive { node_id, active: false } => {
                if !self.inactive_nodes.contains(&node_id) && self.inactive_nodes.len() >= MAX_INACTIVE_NODES {
                    return Err(Rejection::TooManyInactiveNodes { max: MAX_INACTIVE_NODES });
                }
                self.inactive_nodes.insert(node_id);
                Ok(Response::Done)
            }
            Command::SnapshotAutoPut { name, config } => {
                crate::snapshot_auto::put(&mut self.snapshot_auto, name, config).map_err(Rejection::SnapshotAuto)?;
                Ok(Response::Done)
            }
            Command::SnapshotAutoDelete { name } => match self.snapshot_auto.remove(&name) {
                Some(_) => Ok(Response::Done),
                None => Err(Rejection::SnapshotAutoNotFound(name)),
            },
            Command::SnapshotAutoRecord { name, status } => {
                crate::snapshot_auto::record(&mut self.snapshot_auto, &name, status);
                Ok(Response::Done)
            }
            Command::AlertSinkPut { name, sink } => {
                self.alerts.put_sink(name, sink).map_err(Rejection::Alerts)?;
                Ok(Response::Done)
            }
            Command::AlertSinkDelete { name } => {
                self.alerts.delete_sink(&name).map_err(Rejection::Alerts)?;
                Ok(Response::Done)
            }
            Command::AlertsUpdate { fire, resolve, at } => {
                self.alerts.update(fire, resolve, at).map_err(Rejection::Alerts)?;
                Ok(Response::Done)
            }
            Command::AlertsDelivered { sink, acks } => {
                self.alerts.delivered(&sink, &acks).map_err(Rejection::Alerts)?;
                Ok(Response::Done)
            }
            Command::NodeCertsRevoke { node_id, now } => {
                // Revocation follows a removal: the node is no member, active or not.
                self.inactive_nodes.remove(&node_id);
                let revoked = self.node_certs.remove(&node_id).unwrap_or_default();
                self.revoked_serials.extend(revoked);
                self.revoked_serials.retain(|_, not_after| *not_after > now);
                Ok(Response::Done)
            }
            Command::PruneExpired { now } => self.prune_expired(now),
            Command::AuditPrune { through, .. } => {
                self.audit.prune(through).map_err(Rejection::Audit)?;
                Ok(Response::Done)
            }
            Command::RestoreState { state } => self.restore(*state),
            Command::AuditShip { events } => {
                let accepted = self.audit.ship(events).map_err(Rejection::Audit)?;
                Ok(Response::AuditShipped { accepted })
            }
            Command::Audited { audit, command } => self.apply_audited(entry, *audit, *command),
        }
    }

    /// Applies an envelope's command as if alone, then records the request's event with its
    /// outcome in the log chain (`audited.rs`). The response is the inner command's, rejection
    /// included: a rejected command changes nothing but the log chain, which records it.
    fn apply_audited(
        &mut self,
        entry: Option<&LogPosition>,
        audit: AuditBody,
        command: Command,
    ) -> Result<Response, Rejection> {
        audited::check(&audit, &command)?;
        if self.revoked_its_own_token(&command) && self.audit.log.holds_recent_request(&audit.request_id) {
            return Ok(Response::Done);
        }
        let response = self.apply_checked(entry, command).unwrap_or_else(Response::Rejected);
        if audited::records(&response) {
            self.audit.log.record(audited::outcome(audit, &response));
        }
        Ok(response)
    }

    /// Spends one use of a token created with `num_uses`. `Node::propose` sends a proposal again
    /// after an ambiguous failure; when the first attempt spent the token's latest use, the
    /// repeat finds its request id on the token and is done. Only the latest is kept: a repeat
    /// that arrives after another request spent a use spends a second one (fewer uses, never
    /// more). A first attempt that was refused recorded nothing, so its repeat is refused too.
    fn spend_token_use(&mut self, hash: &str, request_id: Option<String>) -> Result<Response, Rejection> {
        let token = self.tokens.get(hash).ok_or(Rejection::TokenInvalid)?;
        let request_id = request_id.filter(|id| !id.is_empty());
        if request_id.is_some() && token.last_use_request == request_id {
            return Ok(Response::Done);
        }
        match token.uses_left {
            None => {}
            Some(0) => return Err(Rejection::TokenInvalid),
            Some(n) => {
                self.tokens.update(hash, |token| {
                    token.uses_left = Some(n - 1);
                    token.last_use_request = request_id;
                });
            }
        }
        Ok(Response::Done)
    }

    /// Whether `command` revokes the very token that authorizes it, and that token is gone. Asked
    /// of a proposal sent again after its first attempt committed (`Node::propose` re-sends once
    /// the leader goes silent): that attempt revoked the token, so the repeat is done, not refused
    /// at the token check. Only the answer differs: a repeat records no second event and the
    /// revocation changes nothing, so a replica that answers otherwise holds the same state.
    fn revoked_its_own_token(&self, command: &Command) -> bool {
        match command {
            Command::Authorized { token_hash, command, .. } => {
                matches!(&**command, Command::TokenRevoke { hash } if hash == token_hash)
                    && !self.tokens.contains_key(token_hash)
            }
            _ => false,
        }
    }

    fn rotate_keyring(
        &mut self,
        expected_term: u32,
        new_term: u32,
        wrapped_keyring: Vec<u8>,
        at: UnixMillis,
    ) -> Result<Response, Rejection> {
        let seal = self.seal.as_mut().ok_or(Rejection::NotInitialized)?;
        // A proposal retried after a leader change that already landed (§9.2): done, not a race.
        if seal.key_term == new_term && seal.wrapped_keyring == wrapped_keyring {
            return Ok(Response::Done);
        }
        if seal.key_term != expected_term {
            return Err(Rejection::KeyringChanged { current: seal.key_term });
        }
        // A proposer whose in-memory keyring is stale proposes a term that is not newer:
        // refused, never asserted (an assert here would stop every replica on replay).
        if new_term <= expected_term {
            return Err(Rejection::KeyringTermNotNewer { current: expected_term, proposed: new_term });
        }
        seal.key_term = new_term;
        seal.key_installed = at;
        seal.wrapped_keyring = wrapped_keyring;
        Ok(Response::Done)
    }

    fn enable_mount(&mut self, path: String, mount: Mount) -> Result<Response, Rejection> {
        check_mount_size(&path, &mount.description)?;
        // The proposer's random uuid recognises its own retried proposal: done, not a clash.
        if self.mounts.get(&path).is_some_and(|m| m.uuid == mount.uuid) {
            return Ok(Response::Done);
        }
        let clash = self.mounts.keys().any(|m| m.starts_with(&path) || path.starts_with(m.as_str()));
        if clash {
            return Err(Rejection::MountExists(path));
        }
        if self.mounts.len() >= MAX_MOUNTS {
            return Err(Rejection::TooManyMounts { max: MAX_MOUNTS });
        }
        self.mounts.insert(path, mount);
        Ok(Response::Done)
    }

    fn enable_auth(&mut self, path: String, mount: AuthMount) -> Result<Response, Rejection> {
        check_mount_size(&path, &mount.description)?;
        if self.auth_mounts.get(&path).is_some_and(|m| m.uuid == mount.uuid) {
            return Ok(Response::Done);
        }
        let built_in = [DEFAULT_USERPASS, TOKEN_AUTH].iter().any(|b| b.starts_with(&path) || path.starts_with(b));
        let clash = self.auth_mounts.keys().any(|m| m.starts_with(&path) || path.starts_with(m.as_str()));
        if built_in || clash || !path.ends_with('/') || path.len() < 2 {
            return Err(Rejection::MountExists(format!("auth/{path}")));
        }
        if self.auth_mounts.len() >= MAX_MOUNTS {
            return Err(Rejection::TooManyMounts { max: MAX_MOUNTS });
        }
        self.auth_mounts.insert(path, mount);
        Ok(Response::Done)
    }

    /// Disables an auth mount: its users go, and every token they logged in for.
    fn disable_auth(&mut self, path: String) -> Result<Response, Rejection> {
        self.auth_mounts.remove(&path).ok_or_else(|| Rejection::MountNotFound(format!("auth/{path}")))?;
        // Its users go, and every token they logged in for.
        let users: Vec<String> = self.users.keys().filter(|k| k.starts_with(&path)).cloned().collect();
        for key in users {
            self.users.remove(&key);
            self.revoke_user_tokens(&key);
        }
        Ok(Response::Done)
    }

    fn put_user(&mut self, user: User) -> Result<Response, Rejection> {
        // A user of another mount is kept only while that mount is: one written as its mount was
        // disabled must not come back if the path is enabled again.
        if let Some((mount, _)) = user.username.rsplit_once('/') {
            let mount = format!("{mount}/");
            if !self.auth_mounts.contains_key(&mount) {
                return Err(Rejection::MountNotFound(format!("auth/{mount}")));
            }
        }
        // A new password revokes the logins made with the old one (§8.2).
        let password_changed =
            self.users.get(&user.username).is_some_and(|old| old.password_hash != user.password_hash);
        if password_changed {
            self.revoke_user_tokens(&user.username);
        }
        self.users.insert(user.username.clone(), user);
        Ok(Response::Done)
    }

    fn create_token(&mut self, entry: TokenEntry, login: Option<LoginProof>) -> Result<Response, Rejection> {
        if self.tokens.contains_key(&entry.hash) {
            // Token hashes are random: an existing hash is this very command retried
            // after an ambiguous failure, so applying it again changes nothing.
            return Ok(Response::Done);
        }
        if let Some(proof) = login {
            let current = self.users.get(&proof.username).map(|u| u.password_hash.as_str());
            if current != Some(proof.password_hash.as_str()) {
                return Err(Rejection::LoginOutdated);
            }
        }
        self.tokens.insert(entry.hash.clone(), entry);
        Ok(Response::Done)
    }

    fn use_join_token(&mut self, hash: String, now: UnixMillis, node_id: Option<u64>) -> Result<Response, Rejection> {
        let token = self.join_tokens.get_mut(&hash).ok_or(Rejection::JoinTokenInvalid)?;
        if token.used || token.expires <= now {
            return Err(Rejection::JoinTokenInvalid);
        }
        if let Some(named) = token.node_id.filter(|named| node_id != Some(*named)) {
            return Err(Rejection::JoinTokenForAnotherNode(named));
        }
        token.used = true;
        // Spent and expired tokens are dropped: the table stays small.
        self.join_tokens.retain(|_, t| !t.used && t.expires > now);
        Ok(Response::Done)
    }

    fn prune_expired(&mut self, now: UnixMillis) -> Result<Response, Rejection> {
        self.join_tokens.retain(|_, t| !t.used && t.expires > now);
        self.revoked_serials.retain(|_, not_after| *not_after > now);
        for certs in self.node_certs.values_mut() {
            certs.retain(|_, not_after| *not_after > now);
        }
        self.node_certs.retain(|_, certs| !certs.is_empty());
        Ok(Response::Done)
    }

    fn restore(&mut self, state: State) -> Result<Response, Rejection> {
        if !state.is_initialized() {
            return Err(Rejection::NotInitialized);
        }
        // The audit log and the job history record what happened; a restore keeps them. Which
        // members are inactive belongs to the live membership, which a restore keeps too.
        let audit = std::mem::take(&mut self.audit);
        let jobs = std::mem::take(&mut self.jobs);
        let inactive_nodes = std::mem::take(&mut self.inactive_nodes);
        let snapshot_auto = std::mem::take(&mut self.snapshot_auto);
        let alerts = std::mem::take(&mut self.alerts);
        // Every mount's stored entries give way to the snapshot's, which are all in memory.
        let mut kv_cleared = std::mem::take(&mut self.kv_cleared);
        kv_cleared.extend(self.mounts.keys().cloned());
        kv_cleared.extend(state.mounts.keys().cloned());
        *self = state;
        self.kv_cleared = kv_cleared;
        // Likewise every stored token and user gives way to the snapshot's.
        self.tokens.replace_store();
        self.users.replace_store();
        self.audit = audit;
        self.jobs = jobs;
        self.inactive_nodes = inactive_nodes;
        // The schedules that make backups are not rolled back by restoring one.
        self.snapshot_auto = snapshot_auto;
        // Nor are the alerts: what fired and who was told is the live cluster's.
        self.alerts = alerts;
        Ok(Response::Done)
    }

    /// A leader job's result: refused unless it comes from the entry's leader in the entry's
    /// term; its command (only commands a job may propose) must apply too, or nothing changes.
    fn apply_job_result(
        &mut self,
        entry: Option<&LogPosition>,
        mut run: JobRun,
        command: Option<Box<Command>>,
    ) -> Result<Response, Rejection> {
        job::check(&run.job, run.term, run.node, entry).map_err(Rejection::Job)?;
        let response = match command.map(|c| *c) {
            None => Response::Done,
            Some(
                command @ (Command::TokensExpire { .. }
                | Command::PruneExpired { .. }
                | Command::AuditPrune { .. }
                | Command::SnapshotAutoRecord { .. }
                | Command::AlertsUpdate { .. }
                | Command::AlertsDelivered { .. }
                | Command::AlertSinkPut { .. }),
            ) => self.apply_checked(entry, command)?,
            Some(other) => return Err(Rejection::Job(JobRefusal::NotAJobCommand(other.kind().into()))),
        };
        run.index = entry.map_or(0, |e| e.index);
        self.jobs.record(run);
        Ok(response)
    }

    fn init(&mut self, init: InitCommand) -> Result<Response, Rejection> {
        if self.is_initialized() {
            return Err(Rejection::AlreadyInitialized);
        }
        self.cluster = Some(init.cluster);
        self.seal = Some(init.seal);
        self.policies.insert(policy::DEFAULT.to_string(), policy::default_policy());
        self.tokens.insert(init.root_token.hash.clone(), init.root_token);
        self.mounts.insert(init.default_mount_path, init.default_mount);
        Ok(Response::Done)
    }

    /// Revokes every token a user's logins issued, with their descendants.
    fn revoke_user_tokens(&mut self, username: &str) {
        let owned: Vec<String> = self.tokens.of_username(username).map(|t| t.hash.clone()).collect();
        for hash in owned {
            self.tokens.remove_tree(&hash);
        }
    }

    /// Whether a certificate serial (hex) is on the deny list.
    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        self.revoked_serials.contains_key(serial)
    }

    fn record_node_cert(
        &mut self,
        node_id: u64,
        serial: String,
        not_after: UnixMillis,
        at: UnixMillis,
    ) -> Result<Response, Rejection> {
        let is_hex = serial.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if serial.is_empty() || serial.len() > MAX_SERIAL_HEX || !is_hex {
            return Err(Rejection::NodeCertInvalid(format!(
                "the serial must be 1 to {MAX_SERIAL_HEX} lowercase hex digits"
            )));
        }
        if not_after <= at {
            return Err(Rejection::NodeCertInvalid("the certificate has expired".into()));
        }
        if self.is_serial_revoked(&serial) {
            return Err(Rejection::NodeCertRevoked(serial));
        }
        let certs = self.node_certs.entry(node_id).or_default();
        certs.retain(|_, expiry| *expiry > at);
        if !certs.contains_key(&serial) && certs.len() >= MAX_CERTS_PER_NODE {
            return Err(Rejection::NodeCertInvalid(format!(
                "node {node_id} already has {MAX_CERTS_PER_NODE} unexpired certificates recorded"
            )));
        }
        certs.insert(serial, not_after);
        Ok(Response::Done)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::{AuditBody, AuditEvent, GENESIS};

    fn token(hash: &str, parent: Option<&str>, expires: Option<u64>) -> TokenEntry {
        TokenEntry {
            hash: hash.into(),
            accessor: format!("acc-{hash}"),
            policies: vec!["default".into()],
            display_name: "t".into(),
            meta: Default::default(),
            created: 0,
            expires,
            ttl_secs: 0,
            renewable: true,
            parent: parent.map(Into::into),
            username: None,
            ..TokenEntry::default()
        }
    }

    /// An initialized state with the default `secret/` mount, whose root token's hash is `root`.
    pub(crate) fn initialized() -> State {
        let mut state = State::default();
        let init = InitCommand {
            cluster: ClusterInfo { id: "c".into(), name: "citadel".into(), initialized_at: 1 },
            seal: SealInfo {
                shares: 1,
                threshold: 1,
                wrapped_root_key: vec![1],
                wrapped_keyring: vec![2],
                key_term: 1,
                key_installed: 1,
            },
            root_token: token("root", None, None),
            default_mount_path: "secret/".into(),
            default_mount: Mount {
                uuid: "u".into(),
                kind: "kv".into(),
                description: String::new(),
                created: 1,
                kv: KvStore::default(),
            },
        };
        assert_eq!(state.apply(Command::Init(Box::new(init))), Response::Done);
        state
    }

    /// A write as a proposer seals it: each ciphertext is unique (the barrier's random nonce).
    fn write(path: &str, version: u64) -> Command {
        Command::KvWrite { mount: "secret/".into(), path: path.into(), version, ciphertext: sealed(), cas: None, at: 5 }
    }

    pub(crate) fn sealed() -> Vec<u8> {
        static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes().to_vec()
    }

    #[test]
    fn commands_before_init_are_rejected() {
        let mut state = State::default();
        assert_eq!(state.apply(write("a", 1)), Response::Rejected(Rejection::NotInitialized));
    }

    #[test]
    fn init_twice_is_rejected() {
        let mut state = initialized();
        let again = state.clone();
        let init = InitCommand {
            cluster: again.cluster.unwrap(),
            seal: again.seal.unwrap(),
            root_token: token("r2", None, None),
            default_mount_path: "x/".into(),
            default_mount: again.mounts["secret/"].clone(),
        };
        assert_eq!(state.apply(Command::Init(Box::new(init))), Response::Rejected(Rejection::AlreadyInitialized));
    }

    #[test]
    fn apply_is_deterministic_across_replicas() {
        let commands = vec![
            write("a", 1),
            write("a", 2),
            Command::TokenCreate { login: None, entry: Box::new(token("t1", Some("root"), Some(100))) },
            Command::KvDelete { mount: "secret/".into(), path: "a".into(), versions: vec![], at: 9 },
        ];
        let mut a = initialized();
        let mut b = initialized();
        for c in &commands {
            a.apply(c.clone());
            b.apply(c.clone());
        }
        assert_eq!(serde_json::to_vec(&a).unwrap(), serde_json::to_vec(&b).unwrap());
    }

    #[test]
    fn rejected_commands_change_nothing() {
        let mut state = initialized();
        state.apply(write("a", 1));
        let before = state.clone();
        assert!(matches!(state.apply(write("a", 1)), Response::Rejected(Rejection::Kv(_))));
        assert!(matches!(
            state.apply(Command::KvDelete { mount: "nope/".into(), path: "a".into(), versions: vec![], at: 1 }),
            Response::Rejected(Rejection::MountNotFound(_))
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn proposals_retried_after_they_landed_answer_done_not_a_clash_and_change_nothing() {
        let mut state = initialized();
        let mount = Mount {
            uuid: "u-1".into(),
            kind: "kv".into(),
            description: String::new(),
            created: 1,
            kv: KvStore::default(),
        };
        let enable = Command::MountEnable { path: "kv/".into(), mount: mount.clone() };
        assert_eq!(state.apply(enable.clone()), Response::Done);
        let term = state.seal.as_ref().unwrap().key_term;
        let rotate =
            Command::RotateKeyring { expected_term: term, new_term: term + 1, wrapped_keyring: vec![1, 2], at: 9 };
        assert_eq!(state.apply(rotate.clone()), Response::Done);
        let after = state.clone();
        assert_eq!(state.apply(enable), Response::Done);
        assert_eq!(state.apply(rotate), Response::Done);
        assert_eq!(state, after);
        // Another proposer's mount at the same path still clashes; a stale rotation still races.
        let other = Command::MountEnable { path: "kv/".into(), mount: Mount { uuid: "u-2".into(), ..mount } };
        assert_eq!(state.apply(other), Response::Rejected(Rejection::MountExists("kv/".into())));
        let stale = Command::RotateKeyring { expected_term: term, new_term: term + 1, wrapped_keyring: vec![3], at: 9 };
        assert_eq!(state.apply(stale), Response::Rejected(Rejection::KeyringChanged { current: term + 1 }));
    }

    #[test]
    fn restoring_a_snapshot_replaces_state_but_keeps_the_audit_log() {
        let mut state = initialized();
        state.apply(write("a", 1));
        let snapshot = state.clone();
        state.apply(write("a", 2));
        let event = AuditEvent::seal(AuditBody { node: 1, seq: 1, ..AuditBody::default() }, GENESIS);
        state.apply(Command::AuditShip { events: vec![event] });
        assert_eq!(state.apply(Command::RestoreState { state: Box::new(snapshot.clone()) }), Response::Done);
        assert_eq!(state.mounts, snapshot.mounts);
        assert_eq!(state.audit.verify(), Ok(1), "audit events survive a restore");
        let tokens = state.take_token_changes();
        assert!(tokens.replace, "the store's tokens give way to the snapshot's");
        assert_eq!(
            tokens.put.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            snapshot.tokens.keys().collect::<Vec<_>>()
        );
        let empty = Command::RestoreState { state: Box::default() };
        assert_eq!(state.apply(empty), Response::Rejected(Rejection::NotInitialized));
    }

    #[test]
    fn join_tokens_work_once_and_only_before_they_expire() {
        let mut state = initialized();
        state.apply(Command::JoinTokenCreate { hash: "h".into(), expires: 100, node_id: None });
        state.apply(Command::JoinTokenCreate { hash: "old".into(), expires: 10, node_id: None });
        assert_eq!(
            state.apply(Command::JoinTokenUse { hash: "old".into(), now: 50, node_id: Some(4) }),
            Response::Rejected(Rejection::JoinTokenInvalid)
        );
        assert_eq!(state.apply(Command::JoinTokenUse { hash: "h".into(), now: 50, node_id: Some(4) }), Response::Done);
        assert_eq!(
            state.apply(Command::JoinTokenUse { hash: "h".into(), now: 51, node_id: Some(4) }),
            Response::Rejected(Rejection::JoinTokenInvalid)
        );
        assert_eq!(
            state.apply(Command::JoinTokenUse { hash: "nope".into(), now: 1, node_id: Some(4) }),
            Response::Rejected(Rejection::JoinTokenInvalid)
        );
        assert!(state.join_tokens.is_empty(), "spent and expired tokens are dropped");
    }

    #[test]
    fn a_retried_token_create_is_idempotent() {
        let mut state = initialized();
        let create = Command::TokenCreate { login: None, entry: Box::new(token("t", Some("root"), None)) };
        assert_eq!(state.apply(create.clone()), Response::Done);
        let once = state.clone();
        assert_eq!(state.apply(create), Response::Done);
        assert_eq!(state, once);
    }

    #[test]
    fn revoking_a_token_revokes_its_children() {
        let mut state = initialized();
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("parent", Some("root"), None)) });
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("child", Some("parent"), None)) });
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("grandchild", Some("child"), None)) });
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("other", Some("root"), None)) });
        assert_eq!(state.apply(Command::TokenRevoke { hash: "parent".into() }), Response::Done);
        assert!(state.tokens.contains_key("other"));
        assert!(!state.tokens.contains_key("child"));
        assert!(!state.tokens.contains_key("grandchild"));
    }

    #[test]
    fn expiry_sweep_removes_only_expired_tokens() {
        let mut state = initialized();
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("old", Some("root"), Some(10))) });
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("new", Some("root"), Some(1000))) });
        state.apply(Command::TokensExpire { now: 500 });
        assert!(!state.tokens.contains_key("old"));
        assert!(state.tokens.contains_key("new"));
        assert!(state.tokens.contains_key("root"));
    }

    fn job_result(term: u64, node: u64, command: Option<Command>) -> Command {
        Command::JobResult { term, node, job: "token_expiry".into(), at: 500, command: command.map(Box::new) }
    }

    #[test]
    fn a_deposed_leaders_late_job_result_is_refused_and_changes_nothing() {
        let mut state = initialized();
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("old", Some("root"), Some(10))) });
        let before = state.clone();
        // Node 1 led term 3 and swept; its result reaches the log only in an entry of term 4,
        // created by the new leader (node 2).
        let late = job_result(3, 1, Some(Command::TokensExpire { now: 500 }));
        let entry = LogPosition { term: 4, leader: 2, index: 40 };
        assert_eq!(
            state.apply_entry(entry, late.clone()),
            Response::Rejected(Rejection::Job(JobRefusal::StaleTerm {
                job: "token_expiry".into(),
                job_term: 3,
                entry_term: 4
            }))
        );
        assert_eq!(state, before, "the late result neither swept nor recorded a run");
        // A result claiming another node than the entry's leader is refused too.
        let forged = job_result(4, 1, Some(Command::TokensExpire { now: 500 }));
        assert!(matches!(
            state.apply_entry(entry, forged),
            Response::Rejected(Rejection::Job(JobRefusal::NotFromEntryLeader { .. }))
        ));
        // Outside a log entry, the term cannot be checked: refused.
        assert!(matches!(state.apply(late), Response::Rejected(Rejection::Job(JobRefusal::OutsideLog))));
        assert_eq!(state, before);
        // The new leader's own result, in its own term, applies and is recorded.
        let current = job_result(4, 2, Some(Command::TokensExpire { now: 500 }));
        assert_eq!(state.apply_entry(entry, current), Response::Done);
        assert!(!state.tokens.contains_key("old"));
        let run = state.jobs.runs.back().expect("a run is recorded");
        assert_eq!((run.term, run.node, run.index, run.job.as_str()), (4, 2, 40, "token_expiry"));
    }

    #[test]
    fn pruning_forgets_only_expired_records() {
        let mut state = initialized();
        state.apply(Command::JoinTokenCreate { hash: "old".into(), expires: 10, node_id: None });
        state.apply(Command::JoinTokenCreate { hash: "new".into(), expires: 1_000, node_id: None });
        state.apply(record(2, "0a", 50, 1));
        state.apply(record(2, "0b", 5_000, 1));
        state.apply(record(3, "0c", 50, 1));
        state.apply(record(4, "0d", 60, 1));
        state.apply(Command::NodeCertsRevoke { node_id: 4, now: 1 });
        assert_eq!(state.apply(Command::PruneExpired { now: 100 }), Response::Done);
        assert_eq!(state.join_tokens.keys().collect::<Vec<_>>(), vec!["new"]);
        assert_eq!(state.node_certs.keys().collect::<Vec<_>>(), vec![&2]);
        assert_eq!(state.node_certs[&2].keys().collect::<Vec<_>>(), vec!["0b"]);
        assert!(!state.is_serial_revoked("0d"), "a revoked certificate that expired is forgotten");
    }

    #[test]
    fn a_node_marked_inactive_stays_so_until_activated_or_removed_and_the_set_is_bounded() {
        let mut state = initialized();
        let inactive = |node_id| Command::NodeSetActive { node_id, active: false };
        assert_eq!(state.apply(inactive(2)), Response::Done);
        assert_eq!(state.apply(inactive(2)), Response::Done, "marking twice is harmless");
        assert!(state.inactive_nodes.contains(&2));
        assert_eq!(state.apply(Command::NodeSetActive { node_id: 2, active: true }), Response::Done);
        assert!(state.inactive_nodes.is_empty());
        state.apply(inactive(3));
        state.apply(Command::NodeCertsRevoke { node_id: 3, now: 1 });
        assert!(state.inactive_nodes.is_empty(), "a removed node is no longer inactive");
        for id in 0..MAX_INACTIVE_NODES as u64 {
            assert_eq!(state.apply(inactive(100 + id)), Response::Done);
        }
        let before = state.clone();
        assert_eq!(
            state.apply(inactive(1)),
            Response::Rejected(Rejection::TooManyInactiveNodes { max: MAX_INACTIVE_NODES })
        );
        assert_eq!(state, before);
        assert_eq!(state.apply(inactive(100)), Response::Done, "one already inactive is no growth");
    }

    #[test]
    fn a_job_result_carries_only_job_commands() {
        let mut state = initialized();
        let before = state.clone();
        let entry = LogPosition { term: 2, leader: 1, index: 9 };
        let smuggled = job_result(2, 1, Some(Command::TokenRevoke { hash: "root".into() }));
        assert!(matches!(
            state.apply_entry(entry, smuggled),
            Response::Rejected(Rejection::Job(JobRefusal::NotAJobCommand(_)))
        ));
        assert_eq!(state, before);
        assert_eq!(state.apply_entry(entry, job_result(2, 1, None)), Response::Done);
        assert_eq!(state.jobs.runs.len(), 1, "a run with nothing to change is still recorded");
    }

    #[test]
    fn mounts_route_by_longest_prefix_and_cannot_overlap() {
        let mut state = initialized();
        let mount = state.mounts["secret/"].clone();
        assert!(matches!(
            state.apply(Command::MountEnable { path: "secret/inner/".into(), mount: mount.clone() }),
            Response::Rejected(Rejection::MountExists(_))
        ));
        assert_eq!(state.apply(Command::MountEnable { path: "team/".into(), mount }), Response::Done);
        assert_eq!(state.route("team/data/x"), Some(("team/", "data/x")));
        assert_eq!(state.route("secret/data/y"), Some(("secret/", "data/y")));
        assert_eq!(state.route("nothing/x"), None);
    }

    #[test]
    fn two_concurrent_rotations_are_rejected_not_panicking() {
        let mut state = initialized();
        let rotate = |expected_term, new_term| Command::RotateKeyring {
            expected_term,
            new_term,
            wrapped_keyring: sealed(),
            at: 7,
        };
        // Two nodes rotate from term 1 at once: the first wins, the second finds the term moved.
        assert_eq!(state.apply(rotate(1, 2)), Response::Done);
        let after_first = state.clone();
        assert_eq!(state.apply(rotate(1, 2)), Response::Rejected(Rejection::KeyringChanged { current: 2 }));
        // A node whose keyring had not reloaded yet proposes term 2 again over term 2.
        assert_eq!(
            state.apply(rotate(2, 2)),
            Response::Rejected(Rejection::KeyringTermNotNewer { current: 2, proposed: 2 })
        );
        assert_eq!(
            state.apply(rotate(2, 1)),
            Response::Rejected(Rejection::KeyringTermNotNewer { current: 2, proposed: 1 })
        );
        assert_eq!(state, after_first, "refused rotations change nothing");
    }

    #[test]
    fn audit_events_ship_exactly_once() {
        let mut state = initialized();
        let event = AuditEvent::seal(AuditBody { node: 3, seq: 1, ..AuditBody::default() }, GENESIS);
        let ship = Command::AuditShip { events: vec![event] };
        assert_eq!(state.apply(ship.clone()), Response::AuditShipped { accepted: 1 });
        assert_eq!(state.apply(ship), Response::AuditShipped { accepted: 0 });
        assert_eq!(state.audit.verify(), Ok(1));
    }

    fn user(name: &str, password_hash: &str) -> User {
        User {
            username: name.into(),
            password_hash: password_hash.into(),
            policies: vec![],
            token_ttl_secs: 0,
            token_max_ttl_secs: 0,
        }
    }

    fn authorized(token_hash: &str, at: u64, command: Command) -> Command {
        Command::Authorized { token_hash: token_hash.into(), request_id: "r".into(), at, command: Box::new(command) }
    }

    #[test]
    fn a_command_authorized_by_a_revoked_or_expired_token_is_rejected_at_apply() {
        let mut state = initialized();
        state.apply(Command::TokenCreate { login: None, entry: Box::new(token("t", Some("root"), Some(100))) });
        assert!(matches!(state.apply(authorized("t", 50, write("a", 1))), Response::KvWritten { .. }));
        let before = state.clone();
        assert_eq!(state.apply(authorized("t", 100, write("a", 2))), Response::Rejected(Rejection::TokenInvalid));
        state.apply(Command::TokenRevoke { hash: "t".into() });
        let revoked = state.clone();
        assert_eq!(state.apply(authorized("t", 60, write("a", 2))), Response::Rejected(Rejection::TokenInvalid));
        assert_eq!(state, revoked);
        assert_ne!(before, revoked);
        let nested = authorized("root", 1, authorized("root", 1, write("a", 2)));
        assert_eq!(state.apply(nested), Response::Rejected(Rejection::NestedAuthorization));
    }

    fn auth_mount() -> AuthMount {
        AuthMount { uuid: "u".into(), kind: "userpass".into(), description: String::new(), created: 1 }
    }

    #[test]
    fn disabling_an_auth_mount_deletes_its_users_and_revokes_their_tokens() {
        let mut state = initialized();
        assert_eq!(state.apply(Command::AuthEnable { path: "corp/".into(), mount: auth_mount() }), Response::Done);
        state.apply(Command::UserPut { user: user(&user_key("corp/", "ann"), "h1") });
        state.apply(Command::UserPut { user: user(&user_key(DEFAULT_USERPASS, "ann"), "h1") });
        let mut login = token("corp-login", None, Some(1000));
        login.username = Some(user_key("corp/", "ann"));
        state.apply(Command::TokenCreate { login: None, entry: Box::new(login) });
        assert_eq!(state.apply(Command::AuthDisable { path: "corp/".into() }), Response::Done);
        assert!(!state.users.contains_key("corp/ann") && !state.tokens.contains_key("corp-login"));
        assert!(state.users.contains_key("ann"), "the built-in mount's user of the same name stays");
    }

    #[test]
    fn a_user_of_a_disabled_auth_mount_is_refused_so_it_cannot_come_back() {
        let mut state = initialized();
        state.apply(Command::AuthEnable { path: "corp/".into(), mount: auth_mount() });
        state.apply(Command::AuthDisable { path: "corp/".into() });
        let before = state.clone();
        let late = state.apply(Command::UserPut { user: user(&user_key("corp/", "ann"), "h1") });
        assert_eq!(late, Response::Rejected(Rejection::MountNotFound("auth/corp/".into())));
        assert_eq!(state, before);
    }

    #[test]
    fn an_auth_mount_cannot_shadow_the_built_in_ones_or_each_other() {
        let mut state = initialized();
        for path in ["userpass/", "token/", "userpass/eu/", "/", "corp"] {
            let refused = state.apply(Command::AuthEnable { path: path.into(), mount: auth_mount() });
            assert!(matches!(refused, Response::Rejected(Rejection::MountExists(_))), "{path}: {refused:?}");
        }
        state.apply(Command::AuthEnable { path: "corp/".into(), mount: auth_mount() });
        let nested = state.apply(Command::AuthEnable { path: "corp/eu/".into(), mount: auth_mount() });
        assert!(matches!(nested, Response::Rejected(Rejection::MountExists(_))));
    }

    #[test]
    fn a_mount_path_or_description_past_its_limit_is_refused() {
        let mut state = initialized();
        let mut mount = state.mounts.values().next().unwrap().clone();
        let long_path = format!("{}/", "p".repeat(MAX_MOUNT_PATH));
        let refused = state.apply(Command::MountEnable { path: long_path, mount: mount.clone() });
        assert!(matches!(refused, Response::Rejected(Rejection::MountTooLarge { .. })));
        mount.description = "d".repeat(MAX_MOUNT_DESCRIPTION + 1);
        let refused = state.apply(Command::MountEnable { path: "big/".into(), mount });
        assert!(matches!(refused, Response::Rejected(Rejection::MountTooLarge { .. })));
        let auth = AuthMount { description: "d".repeat(MAX_MOUNT_DESCRIPTION + 1), ..auth_mount() };
        let refused = state.apply(Command::AuthEnable { path: "corp/".into(), mount: auth });
        assert!(matches!(refused, Response::Rejected(Rejection::MountTooLarge { .. })));
    }

    #[test]
    fn mounts_are_limited_in_number() {
        let mut state = initialized();
        for i in state.mounts.len()..MAX_MOUNTS {
            let mount = state.mounts.values().next().unwrap().clone();
            assert_eq!(state.apply(Command::MountEnable { path: format!("m{i}/"), mount }), Response::Done);
        }
        let mount = state.mounts.values().next().unwrap().clone();
        let refused = state.apply(Command::MountEnable { path: "one-more/".into(), mount });
        assert_eq!(refused, Response::Rejected(Rejection::TooManyMounts { max: MAX_MOUNTS }));
    }

    #[test]
    fn deleting_a_user_or_changing_its_password_revokes_its_tokens() {
        let mut state = initialized();
        state.apply(Command::UserPut { user: user("ann", "h1") });
        let mut login = token("ann-login", None, Some(1000));
        login.username = Some("ann".into());
        state.apply(Command::TokenCreate { login: None, entry: Box::new(login.clone()) });
        state.apply(Command::TokenCreate {
            login: None,
            entry: Box::new(token("child", Some("ann-login"), Some(1000))),
        });
        state.apply(Command::UserPut { user: user("ann", "h1") });
        assert!(state.tokens.contains_key("ann-login"), "an unchanged password keeps the logins");
        state.apply(Command::UserPut { user: user("ann", "h2") });
        assert!(!state.tokens.contains_key("ann-login"));
        assert!(!state.tokens.contains_key("child"));
        login.hash = "ann-login-2".into();
        state.apply(Command::TokenCreate { login: None, entry: Box::new(login) });
        state.apply(Command::UserDelete { username: "ann".into() });
        assert!(!state.tokens.contains_key("ann-login-2"));
    }

    #[test]
    fn a_login_racing_with_a_password_change_is_refused() {
        let mut state = initialized();
        state.apply(Command::UserPut { user: user("ann", "h1") });
        let proof = |hash: &str| Some(crate::token::LoginProof { username: "ann".into(), password_hash: hash.into() });
        let stale = Command::TokenCreate { login: proof("h0"), entry: Box::new(token("x", None, Some(10))) };
        assert_eq!(state.apply(stale), Response::Rejected(Rejection::LoginOutdated));
        let fresh = Command::TokenCreate { login: proof("h1"), entry: Box::new(token("y", None, Some(10))) };
        assert_eq!(state.apply(fresh), Response::Done);
    }

    #[test]
    fn token_uses_run_out_and_renewals_never_pass_the_max() {
        let mut state = initialized();
        let mut limited = token("u", Some("root"), Some(1000));
        limited.uses_left = Some(2);
        limited.max_expires = Some(2000);
        state.apply(Command::TokenCreate { login: None, entry: Box::new(limited) });
        assert_eq!(state.apply(Command::TokenUse { hash: "u".into() }), Response::Done);
        assert_eq!(state.apply(Command::TokenUse { hash: "u".into() }), Response::Done);
        assert_eq!(state.apply(Command::TokenUse { hash: "u".into() }), Response::Rejected(Rejection::TokenInvalid));
        let past = Command::TokenRenew { hash: "u".into(), expires: 2001, ttl_secs: 1 };
        assert_eq!(state.apply(past), Response::Rejected(Rejection::RenewalPastMax));
        state.apply(Command::TokensExpire { now: 10 });
        assert!(!state.tokens.contains_key("u"), "a used-up token is swept");
    }

    #[test]
    fn a_token_use_sent_again_by_its_request_spends_one_use_and_the_next_request_spends_another() {
        let mut state = initialized();
        let mut limited = token("u", Some("root"), None);
        limited.uses_left = Some(2);
        state.apply(Command::TokenCreate { login: None, entry: Box::new(limited) });
        let spend = |request: &str| Command::Authorized {
            token_hash: "u".into(),
            request_id: request.into(),
            at: 1,
            command: Box::new(Command::TokenUse { hash: "u".into() }),
        };
        assert_eq!(state.apply(spend("r1")), Response::Done);
        assert_eq!(state.apply(spend("r1")), Response::Done, "the repeat of r1 is done");
        assert_eq!(state.tokens.get("u").unwrap().uses_left, Some(1), "r1 spent one use, not two");
        assert_eq!(state.apply(spend("r2")), Response::Done);
        assert_eq!(state.tokens.get("u").unwrap().uses_left, Some(0));
        assert_eq!(state.apply(spend("r3")), Response::Rejected(Rejection::TokenInvalid));
        assert_eq!(
            state.apply(spend("r3")),
            Response::Rejected(Rejection::TokenInvalid),
            "a refused request stays refused when sent again"
        );
        assert_eq!(state.apply(spend("r2")), Response::Done, "r2's repeat is done, not refused");
    }

    #[test]
    fn revoked_emergency_tokens_are_kept_only_until_they_would_expire() {
        let mut state = initialized();
        state.apply(Command::EmergencyTokenRevoke { hash: "e1".into(), expires: 100, at: 10 });
        state.apply(Command::EmergencyTokenRevoke { hash: "e2".into(), expires: 300, at: 150 });
        assert!(!state.revoked_emergency.contains_key("e1"));
        assert!(state.revoked_emergency.contains_key("e2"));
    }

    fn record(node_id: u64, serial: &str, not_after: u64, at: u64) -> Command {
        Command::NodeCertRecord { node_id, serial: serial.into(), not_after, at }
    }

    #[test]
    fn a_join_token_for_a_node_id_certifies_only_that_node_id() {
        let mut state = initialized();
        state.apply(Command::JoinTokenCreate { hash: "h".into(), expires: 100, node_id: Some(7) });
        let before = state.clone();
        for other in [Some(8), None] {
            assert_eq!(
                state.apply(Command::JoinTokenUse { hash: "h".into(), now: 50, node_id: other }),
                Response::Rejected(Rejection::JoinTokenForAnotherNode(7))
            );
        }
        assert_eq!(state, before, "a refused use does not spend the token");
        assert_eq!(state.apply(Command::JoinTokenUse { hash: "h".into(), now: 50, node_id: Some(7) }), Response::Done);
    }

    #[test]
    fn removing_a_node_revokes_every_certificate_recorded_for_it_until_they_expire() {
        let mut state = initialized();
        assert_eq!(state.apply(record(2, "0a1b", 1_000, 10)), Response::Done);
        assert_eq!(state.apply(record(2, "0c2d", 5_000, 20)), Response::Done);
        assert_eq!(state.apply(record(3, "0e3f", 1_000, 20)), Response::Done);
        assert_eq!(state.apply(Command::NodeCertsRevoke { node_id: 2, now: 30 }), Response::Done);
        assert!(state.is_serial_revoked("0a1b") && state.is_serial_revoked("0c2d"));
        assert!(!state.is_serial_revoked("0e3f"), "other nodes' certificates stay valid");
        assert!(!state.node_certs.contains_key(&2));
        assert_eq!(
            state.apply(record(2, "0a1b", 1_000, 40)),
            Response::Rejected(Rejection::NodeCertRevoked("0a1b".into()))
        );
        // A later revocation prunes the serials that have expired since: the list stays bounded.
        assert_eq!(state.apply(Command::NodeCertsRevoke { node_id: 3, now: 2_000 }), Response::Done);
        assert_eq!(state.revoked_serials.keys().collect::<Vec<_>>(), vec!["0c2d"]);
    }

    #[test]
    fn bad_certificate_records_are_rejections_that_change_nothing() {
        let mut state = initialized();
        let before = state.clone();
        let too_long = "a".repeat(MAX_SERIAL_HEX + 1);
        for bad in
            [record(2, "", 100, 1), record(2, "XYZ", 100, 1), record(2, &too_long, 100, 1), record(2, "0a", 5, 5)]
        {
            assert!(matches!(state.apply(bad), Response::Rejected(Rejection::NodeCertInvalid(_))));
        }
        assert_eq!(state, before);
        for n in 0..MAX_CERTS_PER_NODE {
            assert_eq!(state.apply(record(2, &format!("{n:02x}"), 100, 1)), Response::Done);
        }
        assert!(matches!(state.apply(record(2, "ff", 100, 1)), Response::Rejected(Rejection::NodeCertInvalid(_))));
        assert_eq!(state.apply(record(2, "ff", 200, 100)), Response::Done, "expired records make room");
        assert_eq!(state.node_certs[&2].len(), 1);
    }

    /// A store as a node keeps one: the secrets by (mount, path), written back after each batch.
    #[derive(Default)]
    struct Store(BTreeMap<(String, String), crate::kv::KvEntry>);

    impl Store {
        fn write(&mut self, changes: StateKvChanges) {
            for mount in changes.cleared {
                self.0.retain(|(m, _), _| *m != mount);
            }
            for (mount, kv) in changes.mounts {
                for path in kv.removed {
                    self.0.remove(&(mount.clone(), path));
                }
                for (path, entry) in kv.put {
                    self.0.insert((mount.clone(), path), entry);
                }
            }
        }

        fn of(state: &State) -> BTreeMap<(String, String), crate::kv::KvEntry> {
            let mounts = state.mounts.iter();
            mounts
                .flat_map(|(m, mount)| mount.kv.entries.iter().map(|(p, e)| ((m.clone(), p.clone()), e.clone())))
                .collect()
        }
    }

    /// Every KV command, a mount disabled and enabled again on the same path, and a restore,
    /// on a few paths, chosen by `seed`.
    fn kv_commands(seed: u64, count: usize) -> Vec<Command> {
        let mut next = generator(seed);
        let mut snapshot: Option<State> = None;
        let mut commands = Vec::new();
        for _ in 0..count {
            let path = format!("p{}", next(3));
            let mount = if next(3) == 0 { "other/" } else { "secret/" }.to_string();
            let versions = vec![next(4) + 1];
            let command = match next(11) {
                0..=3 => Command::KvWrite { mount, path, version: next(5) + 1, ciphertext: sealed(), cas: None, at: 5 },
                4 => Command::KvDelete { mount, path, versions, at: 6 },
                5 => Command::KvUndelete { mount, path, versions, at: 7 },
                6 => Command::KvDestroy { mount, path, versions, at: 8 },
                7 => Command::KvMetadataDelete { mount, path },
                8 => {
                    let update =
                        crate::kv::MetadataUpdate { max_versions: Some(next(3) as u32 + 1), ..Default::default() };
                    Command::KvMetadataUpdate { mount, path, update, at: 9 }
                }
                9 if next(2) == 0 => Command::MountDisable { path: mount },
                9 => Command::MountEnable {
                    path: mount,
                    mount: Mount {
                        uuid: format!("u{}", next(1000)),
                        kind: "kv".into(),
                        description: String::new(),
                        created: 1,
                        kv: KvStore::default(),
                    },
                },
                _ => match snapshot.take() {
                    Some(state) => Command::RestoreState { state: Box::new(state) },
                    None => {
                        let mut taken = initialized();
                        let written = write("p1", 1);
                        assert!(matches!(taken.apply(written), Response::KvWritten { .. }));
                        snapshot = Some(taken);
                        continue;
                    }
                },
            };
            commands.push(command);
        }
        commands
    }

    /// A small deterministic generator of commands' choices: `next(n)` is in `0..n`.
    fn generator(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed | 1;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// User commands (writes with either of two passwords, deletions, logins with a password
    /// that may be stale, an auth mount disabled and enabled again, some wrapped as requests'
    /// commands) and restores, on a few users of two mounts, chosen by `seed`.
    fn user_commands(seed: u64, count: usize) -> Vec<Command> {
        let mut next = generator(seed);
        let mut snapshot: Option<State> = None;
        let mut commands = Vec::new();
        for i in 0..count {
            let mount = if next(2) == 0 { "corp/" } else { DEFAULT_USERPASS };
            let key = user_key(mount, ["ann", "bob", "cy"][next(3) as usize]);
            let hash = format!("h{}", next(2));
            let command = match next(9) {
                0..=2 => Command::UserPut { user: user(&key, &hash) },
                3 => Command::UserDelete { username: key },
                4 | 5 => {
                    let mut login = token(&format!("login{i}"), None, Some(1000));
                    login.username = Some(key.clone());
                    let proof = LoginProof { username: key, password_hash: hash };
                    Command::TokenCreate { entry: Box::new(login), login: Some(proof) }
                }
                6 if next(2) == 0 => Command::AuthDisable { path: "corp/".into() },
                6 => Command::AuthEnable { path: "corp/".into(), mount: auth_mount() },
                7 => authorized("root", 1, Command::UserPut { user: user(&key, &hash) }),
                _ => match snapshot.take() {
                    Some(state) => Command::RestoreState { state: Box::new(state) },
                    None => {
                        let mut taken = initialized();
                        taken.apply(Command::AuthEnable { path: "corp/".into(), mount: auth_mount() });
                        taken.apply(Command::UserPut { user: user("corp/ann", "h0") });
                        snapshot = Some(taken);
                        continue;
                    }
                },
            };
            commands.push(command);
        }
        commands
    }

    /// A model of the node's user table.
    #[derive(Default)]
    struct UserStore(BTreeMap<String, User>);

    impl UserRead for UserStore {
        fn user(&self, key: &str) -> std::io::Result<Option<User>> {
            Ok(self.0.get(key).cloned())
        }

        fn user_keys_under(&self, prefix: &str) -> std::io::Result<Vec<String>> {
            Ok(self.0.keys().filter(|k| k.starts_with(prefix)).cloned().collect())
        }
    }

    #[test]
    fn a_replica_with_its_users_in_a_store_answers_and_ends_like_one_holding_them_in_memory() {
        for seed in 1..300u64 {
            let commands = user_commands(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 60);
            let mut whole = initialized();
            let (mut node, mut store) = (initialized(), UserStore::default());
            for (i, batch) in commands.chunks(1 + (seed as usize % 4)).enumerate() {
                for command in batch {
                    let expected = whole.apply(command.clone());
                    node.preload_users(command, &store).unwrap();
                    assert_eq!(node.apply(command.clone()), expected, "seed {seed}, batch {i}: {}", command.kind());
                }
                crate::stored_map::tests::store_changes(&mut store.0, node.take_user_changes());
                node.forget_users();
                assert!(node.users.is_empty(), "memory holds no user between batches");
                assert_eq!(store.0, *whole.users, "seed {seed}, after batch {i}");
                assert_eq!(
                    node.tokens, whole.tokens,
                    "seed {seed}, after batch {i}: the same logins, the same revocations"
                );
            }
        }
    }

    /// Token commands (logins and children of a few hashes, renewals, uses, revocations,
    /// sweeps), user writes and deletions that revoke a user's tokens, an auth mount disabled
    /// and enabled again, requests authorized by tokens that may be gone, and restores, chosen
    /// by `seed`.
    fn token_commands(seed: u64, count: usize) -> Vec<Command> {
        let mut next = generator(seed);
        let mut snapshot: Option<State> = None;
        let mut commands = Vec::new();
        for _ in 0..count {
            let hash = format!("t{}", next(8));
            let users = ["ann", "corp/ann", "corp/bob"];
            let command = match next(14) {
                0..=3 => {
                    let parent = (next(3) > 0).then(|| format!("t{}", next(8)));
                    let mut entry = token(&hash, parent.as_deref(), [None, Some(10 + next(40))][next(2) as usize]);
                    entry.username = (next(3) > 0).then(|| users[next(3) as usize].to_string());
                    entry.uses_left = (next(3) == 0).then(|| next(3));
                    Command::TokenCreate { entry: Box::new(entry), login: None }
                }
                4 => Command::TokenRevoke { hash },
                5 => Command::TokenRenew { hash, expires: 10 + next(40), ttl_secs: 1 },
                6 => Command::TokenUse { hash },
                7 => Command::TokensExpire { now: next(50) },
                8 => Command::UserPut { user: user(users[next(3) as usize], &format!("h{}", next(2))) },
                9 => Command::UserDelete { username: users[next(3) as usize].into() },
                10 if next(2) == 0 => Command::AuthDisable { path: "corp/".into() },
                10 => Command::AuthEnable { path: "corp/".into(), mount: auth_mount() },
                11 => authorized(&hash, next(50), Command::TokenRevoke { hash: format!("t{}", next(8)) }),
                12 => Command::JobResult {
                    term: 1,
                    node: 1,
                    job: "token_expiry".into(),
                    at: 1,
                    command: Some(Box::new(Command::TokensExpire { now: next(50) })),
                },
                _ => match snapshot.take() {
                    Some(state) => Command::RestoreState { state: Box::new(state) },
                    None => {
                        let mut taken = initialized();
                        taken.apply(Command::TokenCreate { entry: Box::new(token("t1", None, Some(30))), login: None });
                        taken.apply(Command::TokenCreate {
                            entry: Box::new(token("t2", Some("t1"), None)),
                            login: None,
                        });
                        snapshot = Some(taken);
                        continue;
                    }
                },
            };
            commands.push(command);
        }
        commands
    }

    /// A model of the node's token table and its indexes, each query a scan of the tokens:
    /// written independently of `TokenTable`.
    #[derive(Default)]
    struct TokenStore(BTreeMap<String, TokenEntry>);

    impl TokenStore {
        fn end(entry: &TokenEntry) -> Option<UnixMillis> {
            if entry.uses_left == Some(0) {
                Some(0)
            } else {
                entry.expires
            }
        }
    }

    impl TokenRead for TokenStore {
        fn token(&self, key: &str) -> std::io::Result<Option<TokenEntry>> {
            Ok(self.0.get(key).cloned())
        }

        fn token_children(&self, parent: &str) -> std::io::Result<Vec<String>> {
            Ok(self.0.iter().filter(|(_, t)| t.parent.as_deref() == Some(parent)).map(|(k, _)| k.clone()).collect())
        }

        fn tokens_of_username(&self, username: &str) -> std::io::Result<Vec<String>> {
            Ok(self.0.iter().filter(|(_, t)| t.username.as_deref() == Some(username)).map(|(k, _)| k.clone()).collect())
        }

        fn tokens_unusable_at(&self, now: UnixMillis) -> std::io::Result<Vec<String>> {
            let mut ended: Vec<(UnixMillis, String)> =
                self.0.iter().filter_map(|(k, t)| Self::end(t).filter(|e| *e <= now).map(|e| (e, k.clone()))).collect();
            ended.sort();
            Ok(ended.into_iter().map(|(_, k)| k).collect())
        }

        fn nth_token_end(&self, n: usize) -> std::io::Result<Option<UnixMillis>> {
            let mut ends: Vec<UnixMillis> = self.0.values().filter_map(Self::end).collect();
            ends.sort();
            Ok(ends.get(n).copied())
        }
    }

    #[test]
    fn a_replica_with_its_tokens_in_a_store_answers_and_ends_like_one_holding_them_in_memory() {
        for seed in 1..400u64 {
            let commands = token_commands(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 80);
            let mut whole = initialized();
            let (mut node, mut users, mut tokens) = (initialized(), UserStore::default(), TokenStore::default());
            crate::stored_map::tests::store_changes(&mut tokens.0, node.take_token_changes());
            node.forget_tokens();
            for (i, batch) in commands.chunks(1 + (seed as usize % 5)).enumerate() {
                for command in batch {
                    let expected = whole.apply(command.clone());
                    node.preload_users(command, &users).unwrap();
                    node.preload_tokens(command, &tokens).unwrap();
                    assert_eq!(node.apply(command.clone()), expected, "seed {seed}, batch {i}: {}", command.kind());
                }
                crate::stored_map::tests::store_changes(&mut users.0, node.take_user_changes());
                crate::stored_map::tests::store_changes(&mut tokens.0, node.take_token_changes());
                node.forget_users();
                node.forget_tokens();
                assert!(
                    node.tokens.is_empty() && node.users.is_empty(),
                    "memory holds no token or user between batches"
                );
                assert_eq!(tokens.0, *whole.tokens, "seed {seed}, after batch {i}");
                assert_eq!(users.0, *whole.users, "seed {seed}, after batch {i}");
            }
        }
    }

    #[test]
    fn a_replica_with_its_secrets_in_a_store_answers_and_ends_like_one_holding_them_in_memory() {
        for seed in 1..200u64 {
            let commands = kv_commands(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 60);
            let mut whole = initialized();
            let (mut node, mut store) = (initialized(), Store::default());
            store.write(node.take_kv_changes());
            for (i, batch) in commands.chunks(1 + (seed as usize % 4)).enumerate() {
                for command in batch {
                    let expected = whole.apply(command.clone());
                    node.preload_kv(command, |m, p| Ok::<_, ()>(store.0.get(&(m.to_string(), p.to_string())).cloned()))
                        .unwrap();
                    assert_eq!(node.apply(command.clone()), expected, "seed {seed}, batch {i}: {}", command.kind());
                }
                store.write(node.take_kv_changes());
                assert!(Store::of(&node).is_empty(), "memory holds no secret between batches");
                assert_eq!(store.0, Store::of(&whole), "seed {seed}, after batch {i}");
            }
        }
    }
}
