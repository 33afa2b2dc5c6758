//! Results of leader-only jobs (§1.6): the term check that refuses a deposed leader's late
//! result, and the bounded history of job runs kept in the replicated state.
//!
//! A job runs on the leader of term T and proposes its result tagged with T and its node id.
//! `apply` compares the tag with the log entry that carries it (the entry's leader id is
//! replicated with the entry, so every replica decides alike): a result from an older term, or
//! from another node than the entry's leader, is a rejection and changes nothing.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{NodeId, UnixMillis};

/// Where a command sits in the Raft log: the leader id (term and node) that created the entry,
/// and its index. Passed to `State::apply_entry` by the state machine; never read from a clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    pub term: u64,
    pub leader: NodeId,
    pub index: u64,
}

/// Runs kept in the state (oldest dropped first): enough for an operator to see which node ran
/// what, and in which term, over the last few intervals.
pub const MAX_JOB_RUNS: usize = 128;
/// Longest job name accepted (names come from the server's job table).
pub const MAX_JOB_NAME: usize = 64;

/// One committed job run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    pub job: String,
    pub term: u64,
    pub node: NodeId,
    /// The log index of the entry that carried the result.
    pub index: u64,
    /// The proposer's clock when it ran.
    pub at: UnixMillis,
}

/// The last `MAX_JOB_RUNS` job runs, in log order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLog {
    pub runs: VecDeque<JobRun>,
}

impl JobLog {
    pub fn record(&mut self, run: JobRun) {
        while self.runs.len() >= MAX_JOB_RUNS {
            self.runs.pop_front();
        }
        self.runs.push_back(run);
    }
}

/// Why a job result was refused before its command was looked at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JobRefusal {
    #[error("job {job:?} ran in term {job_term} but its result was committed in term {entry_term}: a deposed leader's late result is refused")]
    StaleTerm { job: String, job_term: u64, entry_term: u64 },
    #[error("job {job:?} claims term {job_term} on node {job_node}, but the entry was created by node {entry_leader} in term {entry_term}")]
    NotFromEntryLeader { job: String, job_term: u64, job_node: NodeId, entry_term: u64, entry_leader: NodeId },
    #[error("a job result can only be applied from a Raft log entry")]
    OutsideLog,
    #[error("a job name must be 1 to {MAX_JOB_NAME} bytes")]
    BadName,
    #[error("{0} is not a job's command")]
    NotAJobCommand(String),
}

/// Checks a job result's claimed (term, node) against the entry carrying it.
pub fn check(job: &str, term: u64, node: NodeId, entry: Option<&LogPosition>) -> Result<(), JobRefusal> {
    if job.is_empty() || job.len() > MAX_JOB_NAME {
        return Err(JobRefusal::BadName);
    }
    let entry = entry.ok_or(JobRefusal::OutsideLog)?;
    if term < entry.term {
        return Err(JobRefusal::StaleTerm { job: job.into(), job_term: term, entry_term: entry.term });
    }
    if term != entry.term || node != entry.leader {
        return Err(JobRefusal::NotFromEntryLeader {
            job: job.into(),
            job_term: term,
            job_node: node,
            entry_term: entry.term,
            entry_leader: entry.leader,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_log_keeps_only_the_latest_runs() {
        let mut log = JobLog::default();
        for i in 0..(MAX_JOB_RUNS as u64 + 5) {
            log.record(JobRun { job: "j".into(), term: 1, node: 1, index: i, at: 0 });
        }
        assert_eq!(log.runs.len(), MAX_JOB_RUNS);
        assert_eq!(log.runs.front().map(|r| r.index), Some(5));
    }

    #[test]
    fn a_result_must_come_from_the_entry_leader_in_its_term() {
        let entry = LogPosition { term: 5, leader: 2, index: 10 };
        assert_eq!(check("j", 5, 2, Some(&entry)), Ok(()));
        assert!(matches!(check("j", 4, 2, Some(&entry)), Err(JobRefusal::StaleTerm { .. })));
        assert!(matches!(check("j", 5, 3, Some(&entry)), Err(JobRefusal::NotFromEntryLeader { .. })));
        assert!(matches!(check("j", 6, 2, Some(&entry)), Err(JobRefusal::NotFromEntryLeader { .. })));
        assert_eq!(check("j", 5, 2, None), Err(JobRefusal::OutsideLog));
        assert_eq!(check("", 5, 2, Some(&entry)), Err(JobRefusal::BadName));
    }
}
