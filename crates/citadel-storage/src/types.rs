//! openraft's type configuration for Citadel.

use std::fmt;

use citadel_core::command::{Command, Response};
use serde::{Deserialize, Serialize};

/// What the cluster knows about a member: where to reach it and where it lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub api_addr: String,
    pub cluster_addr: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub site: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.cluster_addr)
    }
}

openraft::declare_raft_types!(
    /// Citadel's Raft: commands in, responses out, u64 node ids.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
);

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Membership = openraft::Membership<u64, NodeInfo>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// A snapshot's data as openraft hands it between the state machine and the network.
pub enum SnapshotData {
    /// This node's own snapshot, in its file: a snapshot built, or one to send to a follower,
    /// which streams it from the file ([`crate::StateReader::write_transfer`]).
    Local(crate::snapshot_file::SnapshotRecordFile),
    /// A snapshot received from a leader in transfer form, its secrets and audit events staged
    /// as they arrived: what [`crate::StateMachine`] installs.
    Received(Vec<u8>),
}

impl fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotData::Local(record) => write!(f, "Local({} bytes)", record.size()),
            SnapshotData::Received(data) => write!(f, "Received({} bytes)", data.len()),
        }
    }
}
pub type Raft = openraft::Raft<TypeConfig, crate::StateMachine>;
