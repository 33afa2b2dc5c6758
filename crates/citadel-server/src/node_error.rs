//! Why the node could not propose a command or serve a linearizable read, as values (§9.2).
//!
//! The node layer knows nothing of HTTP: these carry no status code. The API maps them to
//! answers in one place (`api/node_error.rs`); the cluster channel carries the part a forwarder
//! acts on as `forwarded::ForwardError`. The texts are what clients read (integration tests and
//! operators' scripts match some of them), so they change only deliberately.

/// What stopped a proposal or a linearizable read on this node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The node holds no keys: it is sealed, or the vault is not initialized yet.
    #[error("Vault is sealed")]
    Sealed,
    /// This node is not (or no longer) the leader; nothing was proposed, so the request may go
    /// to the new leader. `leader` is the one this node knows of, if any.
    #[error("this node is not the leader")]
    NotLeader { leader: Option<u64> },
    /// No leader committed the request, or answered a read index, within the deadline (§1.5).
    #[error("the cluster has no leader: the request could not be committed within the deadline")]
    NoLeader,
    /// Settled read-only mode (§5.4): no leader for `raft.leader_wait_ms`, so writes fail at once.
    #[error("the cluster is read-only because it has no leader: writes are refused until a quorum of voters is back")]
    ReadOnly,
    /// The leader refused or failed a command this node forwarded to it; the text is its reason,
    /// for the client to read (the decision to retry was taken on `forwarded::ForwardError`).
    #[error("the leader could not commit the request: {0}")]
    LeaderFailed(String),
    /// Raft on this node, the leader, refused the proposal (it is shutting down, say).
    #[error("the cluster could not commit the request: {0}")]
    CommitFailed(String),
    /// Raft on this node, the leader, could not confirm its leadership for a read index.
    #[error("linearizable read failed: {0}")]
    ReadIndexFailed(String),
    /// The leader gave a read index, but this replica did not apply up to it before the deadline.
    #[error("the local replica did not catch up in time")]
    ReplicaBehind,
}
