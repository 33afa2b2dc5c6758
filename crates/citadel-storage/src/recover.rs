//! Disaster recovery (§10.3): when a majority is lost for good, one survivor's Raft state
//! becomes a one-node cluster, offline (`citadel operator recover --force-single-node`).
//!
//! Raft cannot do this by itself: the survivor cannot commit anything without a majority of
//! the voters it knows. Like etcd's `--force-new-cluster`, the tool writes what an election
//! and a membership change would have: a vote for itself in a new term, and at the end of its
//! log a membership entry naming itself the only voter. Every entry already in its log is
//! kept, committed or not: an entry the survivor holds may have been acknowledged to a client
//! by the lost majority, and keeping one that was not only settles an answer the client never
//! had. Started, the node elects itself in a later term and commits the whole log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage, RaftStateMachine};

use crate::types::{Entry, LeaderId, LogId, Membership, TypeConfig, Vote};

/// What the recovery did, for the operator.
#[derive(Debug)]
pub struct Recovery {
    /// The last index of the log before the membership entry.
    pub last_index: u64,
    /// The last index this node knew to be committed.
    pub committed: Option<u64>,
    /// The term of the vote and of the new membership entry.
    pub term: u64,
    /// The voters and non-voters of the membership the node had.
    pub previous_voters: Vec<u64>,
    pub previous_learners: Vec<u64>,
}

/// The node id a data directory belongs to (its identity record), read without creating
/// anything.
pub fn node_id_of(data_dir: &Path) -> Result<u64, String> {
    let path = data_dir.join(crate::DB_FILE);
    if !path.exists() {
        return Err(format!(
            "{} does not exist: {} is not a Citadel data directory",
            path.display(),
            data_dir.display()
        ));
    }
    let db = crate::db::Db::open(&path).map_err(|e| still_running(e.to_string()))?;
    crate::db::identity(&db)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} holds no node identity", path.display()))
}

/// A database another process holds is a node still running on it.
fn still_running(error: String) -> String {
    if error.contains("already open") {
        format!("{error}: is the node still running? Stop it first (recovery is offline)")
    } else {
        error
    }
}

/// Rewrites the node's Raft state in `data_dir` into a one-node cluster of `node_id`.
pub async fn force_single_node(data_dir: &Path, node_id: u64) -> Result<Recovery, String> {
    let (mut log, mut sm) = crate::open(data_dir, node_id).map_err(|e| still_running(e.to_string()))?;
    let io = |e: std::io::Error| e.to_string();
    let state = log.get_log_state().await.map_err(io)?;
    let Some(last) = state.last_log_id else {
        return Err(format!(
            "{} holds no Raft log: this node never joined a cluster, so there is nothing to recover",
            data_dir.display()
        ));
    };
    // The membership in effect is the latest in the log (committed or not), else the applied one.
    let (_, applied) = sm.applied_state().await.map_err(io)?;
    let mut membership: Membership = applied.membership().clone();
    let first = state.last_purged_log_id.map_or(0, |p| p.index + 1);
    let entries = log.try_get_log_entries(first..=last.index).await.map_err(io)?;
    if let Some(latest) = entries.iter().rev().find_map(|e| e.get_membership()) {
        membership = latest;
    }
    let me = membership.get_node(&node_id).cloned().ok_or_else(|| {
        format!("node {node_id} is not in the membership its own log holds: recover a node that was a member")
    })?;
    let vote = log.read_vote().await.map_err(io)?;
    let term = vote.map_or(0, |v| v.leader_id.term).max(last.leader_id.term) + 1;
    let committed = log.read_committed().await.map_err(io)?.map(|c| c.index);

    let single = Membership::new(vec![BTreeSet::from([node_id])], BTreeMap::from([(node_id, me)]))
        .map_err(|e| format!("cannot form a one-node membership: {e}"))?;
    let entry = Entry::new_membership(LogId::new(LeaderId { term, node_id }, last.index + 1), single);
    log.save_vote(&Vote { leader_id: LeaderId { term, node_id }, committed: true }).await.map_err(io)?;
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    log.append([entry], IOFlushed::signal(tx)).await.map_err(io)?;
    rx.await.map_err(|_| "the log's flush thread stopped".to_string())?.map_err(io)?;

    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    Ok(Recovery {
        last_index: last.index,
        committed,
        term,
        previous_learners: membership.nodes().map(|(id, _)| *id).filter(|id| !voters.contains(id)).collect(),
        previous_voters: voters.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeInfo;
    use citadel_core::command::Command;

    fn node(n: u64) -> NodeInfo {
        NodeInfo { cluster_addr: format!("127.0.0.1:{n}"), name: format!("node-{n}"), ..NodeInfo::default() }
    }

    async fn append(log: &mut crate::LogStore, entries: Vec<Entry>) {
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_survivors_log_is_kept_whole_and_ends_with_itself_as_the_only_voter() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _sm) = crate::open(dir.path(), 2).unwrap();
            let three = Membership::new(
                vec![BTreeSet::from([1, 2, 3])],
                (1..=3).map(|n| (n, node(n))).collect::<BTreeMap<_, _>>(),
            )
            .unwrap();
            let id = |i| LogId::new(LeaderId { term: 4, node_id: 1 }, i);
            let mut entries = vec![Entry::new_membership(id(1), three)];
            entries.extend((2..=5).map(|i| Entry::new_normal(id(i), Command::MountDisable { path: format!("m{i}") })));
            log.save_vote(&Vote { leader_id: LeaderId { term: 5, node_id: 3 }, committed: false }).await.unwrap();
            append(&mut log, entries).await;
        }
        let recovery = force_single_node(dir.path(), 2).await.unwrap();
        assert_eq!((recovery.last_index, recovery.term), (5, 6), "{recovery:?}");
        assert_eq!(recovery.previous_voters, vec![1, 2, 3]);

        let (mut log, _sm) = crate::open(dir.path(), 2).unwrap();
        let entries = log.try_get_log_entries(1..=6).await.unwrap();
        assert_eq!(entries.len(), 6, "every entry is kept, and one is added");
        let last = entries.last().unwrap();
        assert_eq!(last.log_id, LogId::new(LeaderId { term: 6, node_id: 2 }, 6));
        let membership = last.get_membership().unwrap();
        assert_eq!(membership.voter_ids().collect::<Vec<_>>(), vec![2]);
        assert_eq!(membership.get_node(&2).unwrap().name, "node-2", "the node keeps its addresses and name");
        let vote = log.read_vote().await.unwrap().unwrap();
        assert_eq!((vote.leader_id.term, vote.leader_id.node_id), (6, 2));
    }

    #[tokio::test]
    async fn a_node_that_never_joined_or_is_not_a_member_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let err = node_id_of(dir.path()).unwrap_err();
        assert!(err.contains("not a Citadel data directory"), "{err}");
        let err = force_single_node(dir.path(), 7).await.unwrap_err();
        assert!(err.contains("never joined"), "{err}");
        assert_eq!(node_id_of(dir.path()), Ok(7));
        {
            let (mut log, _sm) = crate::open(dir.path(), 7).unwrap();
            let others = Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, node(1))])).unwrap();
            append(&mut log, vec![Entry::new_membership(LogId::new(LeaderId { term: 1, node_id: 1 }, 1), others)])
                .await;
        }
        let err = force_single_node(dir.path(), 7).await.unwrap_err();
        assert!(err.contains("not in the membership"), "{err}");
        let (mut log, _sm) = crate::open(dir.path(), 7).unwrap();
        assert_eq!(log.get_log_state().await.unwrap().last_log_id.map(|l| l.index), Some(1), "nothing appended");
        assert_eq!(log.read_vote().await.unwrap(), None, "no vote written");
    }
}
