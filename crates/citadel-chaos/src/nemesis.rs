//! The nemesis: faults applied to the cluster while the clients run, each held for a while and
//! then undone.

use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::ChaosCluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// `kill -9` the leader, restart it later.
    KillLeader,
    /// `kill -9` a random node, restart it later.
    KillRandom,
    /// `kill -9` every node at once (power loss), restart them all.
    CrashAll,
    /// SIGSTOP the leader, SIGCONT later.
    PauseLeader,
    /// SIGSTOP a random node, SIGCONT later.
    PauseRandom,
    /// SIGSTOP every node at once, SIGCONT them all later: a virtual machine's stall, after
    /// which every node finds its last leader contact old.
    PauseAll,
    /// Cut the leader off from every other node.
    IsolateLeader,
    /// Split the nodes into a minority and a majority.
    Halves,
    /// Two halves that cannot talk, joined by one node that talks to both.
    Bridge,
    /// Add a node, transfer leadership, remove a node, under load.
    Membership,
    /// The node lifecycle under load (§10.1): deactivate then activate a follower, resync one,
    /// restart one gracefully (SIGTERM, the leader included).
    Lifecycle,
    /// A random fault each time.
    Mixed,
}

impl Fault {
    pub const ALL: [Fault; 12] = [
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::CrashAll,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::PauseAll,
        Fault::IsolateLeader,
        Fault::Halves,
        Fault::Bridge,
        Fault::Membership,
        Fault::Lifecycle,
        Fault::Mixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillRandom => "kill-random",
            Fault::CrashAll => "crash-all",
            Fault::PauseLeader => "pause-leader",
            Fault::PauseRandom => "pause-random",
            Fault::PauseAll => "pause-all",
            Fault::IsolateLeader => "isolate-leader",
            Fault::Halves => "halves",
            Fault::Bridge => "bridge",
            Fault::Membership => "membership",
            Fault::Lifecycle => "lifecycle",
            Fault::Mixed => "mixed",
        }
    }
}

/// What to undo when a fault's time is up.
enum Undo {
    Restart(Vec<usize>),
    Resume(Vec<usize>),
    HealNet,
    /// Activate a node the nemesis deactivated.
    Activate(usize),
    Nothing,
}

pub struct Nemesis {
    pub log: Vec<String>,
    start: Instant,
    membership_step: usize,
    lifecycle_step: usize,
}

impl Nemesis {
    pub fn new() -> Nemesis {
        Nemesis { log: Vec::new(), start: Instant::now(), membership_step: 0, lifecycle_step: 0 }
    }

    fn note(&mut self, what: String) {
        self.log.push(format!("{:>6.2}s {what}", self.start.elapsed().as_secs_f64()));
    }

    /// Applies `fault` over and over until `until`: a pause, the fault, a hold, the undo.
    pub async fn run(
        &mut self,
        fault: Fault,
        cluster: &mut ChaosCluster,
        rng: &mut StdRng,
        until: Instant,
    ) -> Result<()> {
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1000))).await;
            let this = match fault {
                Fault::Mixed => *Fault::ALL[..Fault::ALL.len() - 1].choose(rng).expect("faults"),
                f => f,
            };
            let undo = self.apply(this, cluster, rng).await?;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(800..2500))).await;
            match undo {
                Undo::Restart(slots) => {
                    for slot in slots {
                        cluster.restart(slot)?;
                        self.note(format!("restart node {}", slot + 1));
                    }
                }
                Undo::Resume(slots) => self.resume(cluster, &slots)?,
                Undo::HealNet => {
                    cluster.net.heal();
                    self.note("heal the network".into());
                }
                Undo::Activate(slot) => match cluster.lifecycle(slot, "activate").await {
                    Ok(()) => self.note(format!("node {} activated", slot + 1)),
                    // Converging activates it again; the final checks need every member voting.
                    Err(e) => self.note(format!("activating node {} refused: {e:#}", slot + 1)),
                },
                Undo::Nothing => {}
            }
        }
        Ok(())
    }

    /// Resumes every one of `slots`, even past one that fails; returns the first failure.
    fn resume(&mut self, cluster: &mut ChaosCluster, slots: &[usize]) -> Result<()> {
        let mut first = Ok(());
        for &slot in slots {
            match cluster.resume(slot) {
                Ok(()) => self.note(format!("SIGCONT node {}", slot + 1)),
                Err(e) => first = first.and(Err(e)),
            }
        }
        first
    }

    async fn apply(&mut self, fault: Fault, cluster: &mut ChaosCluster, rng: &mut StdRng) -> Result<Undo> {
        let members = cluster.members();
        let leader = cluster.leader().await;
        let random = *members.choose(rng).expect("a cluster has members");
        let leader_or_random = leader.filter(|l| members.contains(l)).unwrap_or(random);
        let tag = |slot: usize| if Some(slot) == leader { " (leader)" } else { "" };
        Ok(match fault {
            Fault::KillLeader | Fault::KillRandom => {
                let slot = if fault == Fault::KillLeader { leader_or_random } else { random };
                cluster.kill9(slot);
                self.note(format!("kill -9 node {}{}", slot + 1, tag(slot)));
                Undo::Restart(vec![slot])
            }
            Fault::CrashAll => {
                for &slot in &members {
                    cluster.kill9(slot);
                }
                self.note("kill -9 every node".into());
                Undo::Restart(members)
            }
            Fault::PauseLeader | Fault::PauseRandom => {
                let slot = if fault == Fault::PauseLeader { leader_or_random } else { random };
                cluster.pause(slot)?;
                self.note(format!("SIGSTOP node {}{}", slot + 1, tag(slot)));
                Undo::Resume(vec![slot])
            }
            Fault::PauseAll => {
                for (n, &slot) in members.iter().enumerate() {
                    if let Err(e) = cluster.pause(slot) {
                        // None stays stopped behind a failed fault.
                        self.resume(cluster, &members[..n])?;
                        return Err(e);
                    }
                }
                self.note("SIGSTOP every node".into());
                Undo::Resume(members)
            }
            Fault::IsolateLeader => {
                let others: Vec<usize> = members.iter().copied().filter(|&s| s != leader_or_random).collect();
                cluster.net.cut(&[leader_or_random], &others);
                self.note(format!(
                    "isolate node {}{}: {}",
                    leader_or_random + 1,
                    tag(leader_or_random),
                    cluster.net.describe()
                ));
                Undo::HealNet
            }
            Fault::Halves => {
                let mut shuffled = members.clone();
                shuffled.shuffle(rng);
                let (minority, majority) = shuffled.split_at((members.len() - 1) / 2);
                cluster.net.cut(minority, majority);
                self.note(format!("split {minority:?} | {majority:?} (slots): {}", cluster.net.describe()));
                Undo::HealNet
            }
            Fault::Bridge => {
                let mut shuffled = members.clone();
                shuffled.shuffle(rng);
                let rest = &shuffled[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cluster.net.cut(a, b);
                self.note(format!("bridge through node {}: {}", shuffled[0] + 1, cluster.net.describe()));
                Undo::HealNet
            }
            Fault::Membership => {
                self.membership_change(cluster, rng, leader).await?;
                Undo::Nothing
            }
            Fault::Lifecycle => self.lifecycle_change(cluster, rng, leader).await?,
            Fault::Mixed => unreachable!("mixed picks a concrete fault"),
        })
    }

    /// Cycles through deactivate (undone by activate), resync, and a graceful restart.
    async fn lifecycle_change(
        &mut self,
        cluster: &mut ChaosCluster,
        rng: &mut StdRng,
        leader: Option<usize>,
    ) -> Result<Undo> {
        let step = self.lifecycle_step;
        self.lifecycle_step += 1;
        let members = cluster.members();
        let running: Vec<usize> = members.iter().copied().filter(|&s| cluster.is_running(s)).collect();
        let followers: Vec<usize> = running.iter().copied().filter(|&s| Some(s) != leader).collect();
        let Some(&follower) = followers.choose(rng) else {
            self.note("lifecycle: no running follower".into());
            return Ok(Undo::Nothing);
        };
        // A refused action is noted, not a failure: the checks judge what clients saw.
        Ok(match step % 3 {
            0 => {
                self.note(format!("deactivate node {}", follower + 1));
                match cluster.lifecycle(follower, "deactivate").await {
                    Ok(()) => {
                        self.note(format!("node {} inactive", follower + 1));
                        Undo::Activate(follower)
                    }
                    Err(e) => {
                        self.note(format!("deactivation refused: {e:#}"));
                        Undo::Nothing
                    }
                }
            }
            1 => {
                self.note(format!("resync node {}", follower + 1));
                match cluster.lifecycle(follower, "resync").await {
                    Ok(()) => self.note(format!("node {} resynced", follower + 1)),
                    Err(e) => self.note(format!("resync refused: {e:#}")),
                }
                Undo::Nothing
            }
            _ => {
                let slot = leader.filter(|l| running.contains(l)).unwrap_or(follower);
                self.note(format!("SIGTERM node {}{}", slot + 1, if Some(slot) == leader { " (leader)" } else { "" }));
                match cluster.terminate(slot).await {
                    Ok(()) => self.note(format!("node {} stopped gracefully", slot + 1)),
                    Err(e) => self.note(format!("graceful stop failed: {e:#}")),
                }
                Undo::Restart(vec![slot])
            }
        })
    }

    /// Cycles through add, transfer, remove, transfer, keeping three to five voters.
    async fn membership_change(
        &mut self,
        cluster: &mut ChaosCluster,
        rng: &mut StdRng,
        leader: Option<usize>,
    ) -> Result<()> {
        let step = self.membership_step;
        self.membership_step += 1;
        let members = cluster.members();
        let others: Vec<usize> = members.iter().copied().filter(|&s| Some(s) != leader).collect();
        // A refused change is not a fault of the system (a transfer target may lag, say): it is
        // noted, and the final checks still require every member to be a voter again.
        let outcome = match step % 4 {
            0 if members.len() < 5 => {
                self.note("add a node".into());
                cluster.add_node().await.map(|slot| format!("node {} joined as a voter", slot.map_or(0, |s| s + 1)))
            }
            2 if members.len() > 3 => {
                let slot = *others.choose(rng).expect("a follower");
                self.note(format!("remove node {}", slot + 1));
                cluster.remove_node(slot).await.map(|_| format!("node {} removed and stopped", slot + 1))
            }
            _ => {
                let slot = *others.choose(rng).expect("a follower");
                self.note(format!("transfer leadership to node {}", slot + 1));
                cluster.transfer_leader(slot).await.map(|_| format!("node {} leads", slot + 1))
            }
        };
        match outcome {
            Ok(done) => self.note(done),
            Err(e) => self.note(format!("membership change refused: {e:#}")),
        }
        Ok(())
    }
}
