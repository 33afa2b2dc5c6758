//! The node (§9.2): Raft, the applied state, the seal, the audit spool, the event stream, and the
//! routing of proposals and linearizable reads to wherever the leader is. It knows nothing of
//! HTTP: failures are `NodeError` values, and the API layer above turns them into answers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citadel_core::command::{Command, Response};
use citadel_storage::types::Raft;
use citadel_storage::{NodeInfo, StateReader, TypeConfig};
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};

use crate::audit::{AuditSpool, RefusalLog};
use crate::audit_envelope::AuditCarrier;
use crate::auth::{HashPool, LoginLimiter};
use crate::cluster::{NodeStatus, PeerClient, PeerError};
use crate::config::Config;
use crate::forwarded::ForwardError;
use crate::metrics::Metrics;
use crate::node_error::NodeError;
use crate::seal::{SealManager, Unsealed};
use crate::stall::StallWatch;

pub struct Node {
    pub config: Config,
    pub raft: Raft,
    pub state: StateReader,
    pub seal: SealManager,
    pub audit: Arc<AuditSpool>,
    pub limiter: LoginLimiter,
    /// Runs every Argon2 hash, a bounded number at once.
    pub hash_pool: HashPool,
    /// Unauthenticated refusals, counted until the next summary event.
    pub refusals: RefusalLog,
    pub metrics: Arc<Metrics>,
    pub peers: PeerClient,
    pub started: Instant,
    /// This process started with no replicated state (a new or lost data directory, or a
    /// resync's discard): a resync begun before it has nothing to discard (`lifecycle.rs`).
    pub started_empty: bool,
    /// When a leader was last heard from (a follower's appends, or a leader's quorum acks).
    pub leader_contact: Mutex<Option<Instant>>,
    /// When a look first found this node in read-only mode this time; `None` while it has a
    /// leader.
    pub read_only_since: Mutex<Option<Instant>>,
    /// When this process last resumed from a stall (`stall.rs`).
    pub stalls: StallWatch,
    /// When this node last became leader (Unix ms; 0 while it is not): Vault's `active_time`.
    pub active_since: std::sync::atomic::AtomicU64,
    /// Where this node, while it leads, is in delivering alerts to each sink (§11.2).
    pub alert_delivery: crate::alerts::Delivery,
    /// The members' own views (sealed, audit backlog), as the leader's alerts job last asked.
    pub member_statuses: crate::alerts::StatusCache,
    /// Alerts this node raises and sends itself while it has no leader (§11.2).
    pub leaderless_alerts: crate::leaderless_alerts::Local,
    /// True while this node is being removed. Client requests hold a read guard from the check
    /// to their audit event, so once the flag is set under the write guard, every request this
    /// node answered has its event in the log (a write's, in its entry) or in the spool, ready to
    /// ship before the node leaves.
    pub leaving: tokio::sync::RwLock<bool>,
    /// This node was removed from the cluster (its `REMOVED` marker): it serves no client request.
    pub removed: std::sync::atomic::AtomicBool,
    /// The node's event stream (§9.2).
    pub events: crate::events::EventBus,
    /// Nodes this leader is resyncing (`lifecycle.rs`): autopilot gives them no vote meanwhile.
    pub resyncing: Mutex<std::collections::BTreeSet<u64>>,
    /// Asks the server to stop and start afresh (a resync, `resync.rs`).
    pub restart: tokio::sync::Notify,
    /// Held by the lifecycle action this leader is carrying out (`lifecycle.rs`).
    pub lifecycle_lock: tokio::sync::Mutex<()>,
    /// Held while an operator snapshot's archive is written (`snapshot.rs`): one at a time, so
    /// that concurrent requests take their turn for the CPU and disk instead of sharing them.
    pub snapshot_build: Arc<tokio::sync::Mutex<()>>,
    /// Held while a snapshot restore's upload is read and checked (up to `MAX_SNAPSHOT` in
    /// memory, §8.3): one at a time, another is refused before its body is read.
    pub snapshot_restore: Arc<tokio::sync::Mutex<()>>,
}

/// The request a node is serving, for the commands it proposes and the reads it makes.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// The keyed hash of the token that authorized the request (`None`: no stored token, as for
    /// a login or an emergency token).
    pub token_hash: Option<String>,
    pub request_id: String,
    /// The request already waited for the leader's read index before its token was checked, so
    /// its reads are linearizable without asking again.
    pub linearized: bool,
    /// The request's audit event, carried into the log by the first command the request's
    /// handler proposes (`audit_envelope.rs`); `None` for requests whose events go to the spool
    /// whatever they do (an emergency token's: it only reads, or revokes itself unauthorized).
    pub audit: Option<Arc<AuditCarrier>>,
}

tokio::task_local! {
    /// Set by the API dispatcher around a request's handling: every command proposed while it
    /// is set is wrapped in `Command::Authorized` (§8.1), so no handler can forget to.
    pub static REQUEST: RequestContext;
}

/// Wraps a client request's command with the token that authorized it; other commands (a
/// node's own jobs, a login's token) are proposed as they are.
fn authorize_command(command: Command) -> Command {
    let auth = REQUEST.try_with(|r| r.token_hash.clone().map(|hash| (hash, r.request_id.clone())));
    match auth {
        Ok(Some((token_hash, request_id))) => {
            Command::Authorized { token_hash, request_id, at: crate::ids::now_ms(), command: Box::new(command) }
        }
        _ => command,
    }
}

/// Wraps the first command a request's handler proposes in the envelope carrying the request's
/// audit event (§1.4); returns the carrier to settle with the proposal's result.
fn carry_audit(command: Command) -> (Command, Option<Arc<AuditCarrier>>) {
    match REQUEST.try_with(|r| r.audit.clone()) {
        Ok(Some(carrier)) => (carrier.wrap(command), Some(carrier)),
        _ => (command, None),
    }
}

/// A leader heard from this recently may still be reachable, whatever read-only detection says.
const RECENT_LEADER_MS: u64 = 2_000;

/// The longest a proposal may wait on a leader that still hears from a quorum.
const PROPOSAL_LIMIT: Duration = Duration::from_secs(10);

/// How a forwarded proposal ended when it did not commit.
enum Forwarding {
    /// Nothing was proposed, or the command is safe to propose again; the text is for the log.
    Retry(String),
    /// The leader refused or failed it; asking again would not help.
    Failed(String),
}

/// What the leader's answer to a forwarded proposal means for the forwarder. An undelivered
/// command, or one the ex-leader refused as not leading (a value, never text), is retried;
/// commands are safe to retry anyway (their apply recognises a repeat).
fn forwarding_outcome(answer: Result<Result<Response, ForwardError>, PeerError>) -> Result<Response, Forwarding> {
    match answer {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e @ ForwardError::NotLeader { .. })) => Err(Forwarding::Retry(e.to_string())),
        Ok(Err(e @ (ForwardError::Refused(_) | ForwardError::Failed(_)))) => Err(Forwarding::Failed(e.to_string())),
        Err(PeerError::Unreachable(e)) => Err(Forwarding::Retry(e)),
        Err(PeerError::Refused(e)) => Err(Forwarding::Failed(e)),
    }
}

/// Where the cluster's leader is, as this node sees it.
enum Leadership {
    Me,
    Other(NodeInfo),
    Unknown,
}

impl Node {
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.config.raft.election_timeout_ms)
    }

    /// How long a request waits for a leader to exist (§1.5): `raft.leader_wait_ms`, longer than
    /// an election, so that a failover fails no request. Waiting on a leader that still hears
    /// from a quorum is bounded by `PROPOSAL_LIMIT` instead.
    pub fn consensus_deadline(&self) -> Duration {
        Duration::from_millis(self.config.raft.leader_wait_ms())
    }

    /// When a wait for consensus that began at `started` gives up: `raft.leader_wait_ms` later,
    /// or that long after this process last resumed, if it was stopped meanwhile (`stall.rs`);
    /// never later than `PROPOSAL_LIMIT` after it began, however often the process stalls.
    fn consensus_deadline_from(&self, started: Instant) -> Instant {
        let deadline = started.max(self.stalls.running_since()) + self.consensus_deadline();
        deadline.min(started + PROPOSAL_LIMIT.max(self.consensus_deadline()))
    }

    pub fn raft_metrics(&self) -> openraft::RaftMetrics<TypeConfig> {
        use openraft::async_runtime::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }

    /// Whether `node` votes in the membership this node knows (its log's latest).
    pub fn votes(&self, node: u64) -> bool {
        self.raft_metrics().membership_config.membership().voter_ids().any(|v| v == node)
    }

    /// Whether an operator deactivated this node (§10.1): it serves no client request.
    pub fn is_inactive(&self) -> bool {
        self.state.read(|s| s.inactive_nodes.contains(&self.node_id()))
    }

    pub fn is_leader(&self) -> bool {
        self.raft_metrics().current_leader == Some(self.node_id())
    }

    fn leadership(&self) -> Leadership {
        let m = self.raft_metrics();
        match m.current_leader {
            Some(id) if id == self.node_id() => Leadership::Me,
            Some(id) => match m.membership_config.membership().get_node(&id) {
                Some(node) => Leadership::Other(node.clone()),
                None => Leadership::Unknown,
            },
            None => Leadership::Unknown,
        }
    }

    /// Records that a leader was heard from (called on every accepted append, heartbeats included).
    pub fn touch_leader(&self) {
        *self.leader_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Milliseconds since this node last heard from a leader (or, leading, from a quorum).
    pub fn staleness_ms(&self) -> u64 {
        let m = self.raft_metrics();
        if m.current_leader == Some(self.node_id()) {
            use openraft::Instant as _;
            return m.last_quorum_acked.map_or(0, |t| t.elapsed().as_millis() as u64);
        }
        let contact = *self.leader_contact.lock().unwrap_or_else(|p| p.into_inner());
        match contact {
            Some(t) => t.elapsed().as_millis() as u64,
            None => self.started.elapsed().as_millis() as u64,
        }
    }

    /// How long the leader has been silent while this process ran: time stopped (`stall.rs`)
    /// is no silence of the leader's, whose heartbeats arrive a moment after the resume.
    fn leader_silence(&self) -> Duration {
        Duration::from_millis(self.staleness_ms()).min(self.stalls.running_since().elapsed())
    }

    /// Read-only mode (§5.4): an initialized node that has had no leader for one election timeout.
    pub fn read_only(&self) -> bool {
        let members = self.raft_metrics().membership_config.membership().nodes().count();
        // A cluster of one is its own quorum: it never loses its leader to the network.
        let read_only = members > 1 && self.staleness_ms() > self.config.raft.election_timeout_ms;
        let mut since = self.read_only_since.lock().unwrap_or_else(|p| p.into_inner());
        *since = if read_only { Some(since.unwrap_or_else(Instant::now)) } else { None };
        read_only
    }

    /// Settled read-only mode: no leader for `raft.leader_wait_ms`. Requests then fail at once;
    /// before that, an election or a leader transfer may still be finishing, so they wait (within
    /// their deadline) for a leader instead.
    ///
    /// All but one election timeout of that wait must have passed since this node last resumed
    /// from a stall (`stall.rs`). A process that was stopped (a virtual machine's stall,
    /// SIGSTOP) finds its last leader contact old when it resumes, though the leader, stopped
    /// too, is about to send its next heartbeat: such a node has not seen an outage, and must
    /// not fail requests, issue emergency tokens or page anyone for it.
    pub(crate) fn settled_read_only(&self) -> bool {
        let wait = self.config.raft.leader_wait_ms();
        if !self.read_only() || self.staleness_ms() <= wait {
            return false;
        }
        let since = *self.read_only_since.lock().unwrap_or_else(|p| p.into_inner());
        let watched = Duration::from_millis(wait.saturating_sub(self.config.raft.election_timeout_ms));
        since.is_some_and(|since| self.stalls.watched_since(since) >= watched)
    }

    fn leaderless(&self) -> NodeError {
        if self.read_only() {
            NodeError::ReadOnly
        } else {
            NodeError::NoLeader
        }
    }

    /// The refusal of a node that is no longer the leader, naming the one it knows of.
    fn not_leader(&self) -> NodeError {
        NodeError::NotLeader { leader: self.raft_metrics().current_leader }
    }

    /// Proposes a command through the leader, wherever it is, and waits for it to be applied.
    /// Fails (the API answers 503) within `raft.leader_wait_ms` (counted again from a resume
    /// after a stall: `stall.rs`), or at once in settled read-only mode.
    pub async fn propose(&self, command: Command) -> Result<Response, NodeError> {
        let (command, carrier) = carry_audit(authorize_command(command));
        let started = Instant::now();
        let result = self.propose_routed(command).await;
        self.metrics.observe_proposal(started.elapsed(), result.is_ok());
        if let Some(carrier) = carrier {
            carrier.settle(&result);
        }
        result
    }

    /// Proposes on the leader or forwards to it, retrying while leadership moves.
    async fn propose_routed(&self, command: Command) -> Result<Response, NodeError> {
        let started = Instant::now();
        loop {
            if self.settled_read_only() {
                return Err(NodeError::ReadOnly);
            }
            match self.leadership() {
                Leadership::Me => match self.propose_local(command.clone()).await {
                    // Leadership moved while proposing (e.g. a transfer): retry through the new
                    // leader. Commands are safe to retry: `apply` and the KV writer recognise
                    // their own earlier attempt.
                    Err(NodeError::NotLeader { .. }) => {}
                    other => return other,
                },
                Leadership::Other(leader) => match self.forward(&leader, &command).await {
                    Ok(response) => return Ok(response),
                    Err(Forwarding::Retry(e)) => {
                        tracing::debug!(error = %e, "forwarding the proposal failed; retrying")
                    }
                    Err(Forwarding::Failed(e)) => return Err(NodeError::LeaderFailed(e)),
                },
                Leadership::Unknown => {}
            }
            if Instant::now() >= self.consensus_deadline_from(started) {
                return Err(self.leaderless());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hands a command to the leader over the cluster channel. The call may take as long as the
    /// leader stays audible (its heartbeats keep arriving); it is abandoned once the leader has
    /// been silent for an election timeout while this process ran. Abandoning it sends the
    /// command again, and `apply` recognises a repeat only among the latest
    /// `REQUEST_ID_WINDOW` events: a node stopped for seconds (SIGSTOP, a virtual machine's
    /// stall) finds the leader's answer waiting when it resumes, while the cluster may have
    /// applied thousands of writes, so it must read that answer rather than ask again. Not
    /// covered: a stop shorter than `stall::GAP`, and one longer than the call's own
    /// `PROPOSAL_LIMIT`, which then fails as unreachable and is sent again.
    async fn forward(&self, leader: &NodeInfo, command: &Command) -> Result<Response, Forwarding> {
        let call = self.peers.call::<_, Result<Response, ForwardError>>(
            &leader.cluster_addr,
            "cluster/propose",
            command,
            PROPOSAL_LIMIT,
        );
        tokio::pin!(call);
        let mut check = tokio::time::interval(self.election_timeout() / 4);
        loop {
            tokio::select! {
                result = &mut call => return forwarding_outcome(result),
                _ = check.tick() => {
                    if self.leader_silence() > self.election_timeout() {
                        return Err(Forwarding::Retry("the leader went silent".into()));
                    }
                }
            }
        }
    }

    /// Proposes on this node, which must be the leader. It waits for the commit as long as a
    /// quorum keeps acknowledging this leader (a slow disk is not an outage), and fails (`NoLeader`)
    /// once it has not heard from a quorum for `raft.leader_wait_ms`, as a follower's request
    /// waits that long for a leader (§1.5's two election timeouts are too short: see
    /// ARCHITECTURE's deviations).
    pub async fn propose_local(&self, command: Command) -> Result<Response, NodeError> {
        let kind = command.kind();
        let started = Instant::now();
        let write = self.raft.client_write(command);
        tokio::pin!(write);
        let period = self.election_timeout() / 4;
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let result = loop {
            tokio::select! {
                result = &mut write => break Ok(result),
                _ = check.tick() => {
                    if !self.is_leader() {
                        break Err(self.not_leader());
                    }
                    if self.lost_quorum(self.stalls.watched_since(started)) || started.elapsed() > PROPOSAL_LIMIT {
                        break Err(NodeError::NoLeader);
                    }
                }
            }
        };
        if matches!(result, Ok(Ok(_))) {
            self.metrics.observe_commit(started.elapsed());
        }
        match result? {
            Ok(reply) => Ok(reply.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(NodeError::NotLeader { leader: f.leader_id })
            }
            Err(e) => {
                tracing::warn!(command = kind, error = %e, "proposal failed");
                Err(NodeError::CommitFailed(e.to_string()))
            }
        }
    }

    /// Leading, but no quorum has acknowledged this node for `raft.leader_wait_ms`. Not one
    /// election timeout: on a busy machine the heartbeats to both followers can miss their
    /// deadline together for 100–150 ms with nothing wrong (a CI dry run's `transfer_leader_under_load…`
    /// got a 503 from one such moment). A leader just elected (or handed leadership) has no
    /// acknowledgement yet: it has lost none until the proposal has `waited` (since it began, or
    /// since this process resumed from a stall) as long for one; one that resumed from a stall
    /// since its last acknowledgement gives its quorum an election timeout to answer. A
    /// cluster of one is its own quorum (and sends no heartbeats that would refresh the
    /// acknowledgement).
    fn lost_quorum(&self, waited: Duration) -> bool {
        use openraft::Instant as _;
        let m = self.raft_metrics();
        if m.membership_config.membership().voter_ids().count() <= 1 {
            return false;
        }
        let limit = self.consensus_deadline();
        match m.last_quorum_acked {
            // A leader that resumed after the last acknowledgement hears from its quorum within
            // a heartbeat or two: the proposal gives it an election timeout for that.
            Some(acked) => {
                let resumed_since_ack = self.stalls.running_since().elapsed() < acked.elapsed();
                acked.elapsed() > limit && (!resumed_since_ack || waited > self.election_timeout())
            }
            None => waited > limit,
        }
    }

    /// ReadIndex on this node, which must be the leader: the index a linearizable read must see.
    pub async fn read_index_local(&self) -> Result<u64, NodeError> {
        let read = tokio::time::timeout(
            self.consensus_deadline(),
            self.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
        )
        .await;
        match read {
            Err(_) => Err(NodeError::NoLeader),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(NodeError::NotLeader { leader: f.leader_id })
            }
            Ok(Err(e)) => Err(NodeError::ReadIndexFailed(e.to_string())),
            Ok(Ok(log_id)) => Ok(log_id.index()),
        }
    }

    /// Waits until the local state reflects everything committed before this call (ReadIndex
    /// from the leader, then wait for the local apply), so a follower serves linearizable reads.
    pub async fn linearize(&self) -> Result<(), NodeError> {
        if cfg!(feature = "unsafe-stale-reads") {
            // BROKEN ON PURPOSE: answers from whatever this replica holds.
            return Ok(());
        }
        if REQUEST.try_with(|r| r.linearized) == Ok(true) {
            return Ok(());
        }
        self.wait_for_read_index(true).await
    }

    /// Like `linearize`, but asks the leader even when this node believes it has had none for a
    /// while, as long as it heard from one recently: on a loaded machine a few late heartbeats
    /// look like read-only mode, and a token check must not trust a replica that a reachable
    /// leader could bring up to date (§8.1).
    pub async fn linearize_for_auth(&self) -> Result<(), NodeError> {
        if cfg!(feature = "unsafe-stale-reads") {
            // BROKEN ON PURPOSE, as `linearize`: a token check that asked the leader would bring
            // the replica up to date and make every read behind it linearizable after all.
            return Ok(());
        }
        self.wait_for_read_index(self.staleness_ms() > RECENT_LEADER_MS).await
    }

    async fn wait_for_read_index(&self, give_up_when_read_only: bool) -> Result<(), NodeError> {
        let started = Instant::now();
        let index = loop {
            if give_up_when_read_only && self.settled_read_only() {
                return Err(NodeError::ReadOnly);
            }
            let remaining = self.consensus_deadline_from(started).saturating_duration_since(Instant::now());
            match self.leadership() {
                // Leadership may be moving (a transfer, an election): ask again within the deadline.
                Leadership::Me => match self.read_index_local().await {
                    Ok(index) => break index,
                    Err(e) => tracing::debug!(error = %e, "read index as leader failed; retrying"),
                },
                Leadership::Other(leader) => {
                    let call = self.peers.call::<_, Result<u64, ForwardError>>(
                        &leader.cluster_addr,
                        "cluster/read-index",
                        &(),
                        remaining,
                    );
                    // Whatever the failure (not the leader any more, no quorum, unreachable), the
                    // leadership is asked again until the deadline.
                    match call.await {
                        Ok(Ok(index)) => break index,
                        Ok(Err(e)) => tracing::debug!(error = %e, "the leader refused a read index; retrying"),
                        Err(e) => tracing::debug!(error = %e, "read index from the leader failed; retrying"),
                    }
                }
                Leadership::Unknown => {}
            }
            if Instant::now() >= self.consensus_deadline_from(started) {
                return Err(self.leaderless());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Asked again after a timeout: a stall meanwhile moves the deadline (`stall.rs`).
        loop {
            let deadline = self.consensus_deadline_from(started);
            let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
            if tokio::time::timeout(remaining, self.state.wait_applied(index)).await.is_ok() {
                return Ok(());
            }
            if self.consensus_deadline_from(started) <= deadline {
                return Err(NodeError::ReplicaBehind);
            }
        }
    }

    /// The node's keys, reloaded if another node rotated the keyring; `Sealed` while sealed
    /// (or not initialized).
    pub fn keys(&self) -> Result<Arc<Unsealed>, NodeError> {
        let info = self.state.read(|s| s.seal.clone());
        let keys = match info {
            Some(info) => self.seal.refresh(&info),
            None => None,
        };
        keys.ok_or(NodeError::Sealed)
    }

    pub fn node_status(&self) -> NodeStatus {
        let now = crate::ids::now_ms();
        NodeStatus {
            node_id: self.node_id(),
            sealed: self.seal.is_sealed(),
            version: crate::VERSION.to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            started_empty: self.started_empty,
            applied_index: self.state.applied_index(),
            // Tokens still usable (not expired, uses left), counted from the index of ends.
            active_sessions: self.state.read_with_store(|_, store| {
                let (held, ended) = (store.tokens.count(), store.tokens.count_unusable_at(now));
                held.and_then(|held| Ok(held.saturating_sub(ended?) as usize)).unwrap_or_default()
            }),
            audit_backlog: self.audit_backlog(),
        }
    }

    /// Audit events in this node's spool that the replicated log does not hold yet.
    pub fn audit_backlog(&self) -> u64 {
        let shipped = self.state.read(|s| s.audit.chains.get(&self.node_id()).map_or(0, |c| c.last_seq()));
        self.audit.last_seq().saturating_sub(shipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarded::ForwardRefusal;

    /// The answer as it crosses the cluster channel: encoded by the leader, decoded here.
    fn over_the_wire(
        answer: Result<Result<Response, ForwardError>, String>,
    ) -> Result<Result<Response, ForwardError>, PeerError> {
        let bytes = serde_json::to_vec(&answer).expect("encodes");
        let decoded: Result<Result<Response, ForwardError>, String> = serde_json::from_slice(&bytes).expect("decodes");
        decoded.map_err(PeerError::Refused)
    }

    #[test]
    fn a_forwarder_retries_on_not_leader_as_a_value_and_fails_on_refusals() {
        let not_leader = over_the_wire(Ok(Err(ForwardError::from(NodeError::NotLeader { leader: Some(3) }))));
        assert!(matches!(not_leader, Ok(Err(ForwardError::NotLeader { leader: Some(3) }))), "{not_leader:?}");
        assert!(matches!(forwarding_outcome(not_leader), Err(Forwarding::Retry(_))));

        let refused = over_the_wire(Ok(Err(ForwardRefusal::ForeignAuditEvents.into())));
        match forwarding_outcome(refused) {
            Err(Forwarding::Failed(e)) => assert_eq!(e, "a node may ship only its own audit events"),
            _ => panic!("a refusal is not retried"),
        }
        let no_quorum = over_the_wire(Ok(Err(NodeError::NoLeader.into())));
        assert!(matches!(forwarding_outcome(no_quorum), Err(Forwarding::Failed(_))));
        let gate = over_the_wire(Err("node 4 is not a member of this cluster".into()));
        assert!(matches!(forwarding_outcome(gate), Err(Forwarding::Failed(_))));
        let unreachable = Err(PeerError::Unreachable("cannot reach 10.0.0.2:8201".into()));
        assert!(matches!(forwarding_outcome(unreachable), Err(Forwarding::Retry(_))));
        let committed = over_the_wire(Ok(Ok(Response::Done)));
        assert!(matches!(forwarding_outcome(committed), Ok(Response::Done)));
    }
}
