//! The cluster under test: real `citadel server` processes, each behind a fault proxy, and the
//! faults the nemesis applies to them (by PID, never by name).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use citadel::dev::{self, Layout};
use citadel_client::Client;
use serde_json::{json, Value};

use crate::proxy::FaultNet;
use crate::workload::MAX_VERSIONS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Not started yet: a node the nemesis may add.
    Spare,
    Member,
    /// Removed by the nemesis; stopped, and left out of the final checks.
    Removed,
}

pub struct Slot {
    pub child: Option<Child>,
    pub paused: bool,
    pub membership: Membership,
    /// Deactivated by the nemesis and not yet activated again.
    pub inactive: bool,
}

pub struct ChaosCluster {
    pub layout: Layout,
    exe: PathBuf,
    pub slots: Vec<Slot>,
    pub net: FaultNet,
    /// Clients with the root token, one per slot.
    pub clients: Vec<Client>,
}

/// A request to a node that may be down, paused or cut off must not hold the harness.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

impl ChaosCluster {
    /// Starts `nodes` voters (plus `spares` slots the nemesis may add later), initializes the
    /// vault and waits until every voter serves.
    pub async fn start(dir: &Path, exe: &Path, nodes: usize, spares: usize, base_port: u16) -> Result<ChaosCluster> {
        let mut layout = Layout::new(dir, nodes + spares, base_port)?;
        layout.proxied = true;
        layout.write_files("")?;
        let mut net = FaultNet::new();
        for i in 0..layout.nodes {
            net.add_proxy(i, &layout.cluster_addr(i), &layout.cluster_listen_addr(i)).await?;
        }
        let mut cluster = ChaosCluster {
            slots: (0..layout.nodes)
                .map(|i| Slot {
                    child: None,
                    paused: false,
                    inactive: false,
                    membership: if i < nodes { Membership::Member } else { Membership::Spare },
                })
                .collect(),
            clients: Vec::new(),
            layout,
            exe: exe.to_path_buf(),
            net,
        };
        for i in 0..nodes {
            cluster.spawn(i)?;
        }
        let (root, _key) = dev::initialize(&cluster.layout).await?;
        cluster.clients = (0..cluster.layout.nodes)
            .map(|i| Ok(cluster.layout.client(i)?.with_token(&root)))
            .collect::<Result<_>>()?;
        cluster.wait_converged(Duration::from_secs(60)).await?;
        // Keep every version a run writes, so the lost-write check can read each one back.
        cluster.clients[0].post("secret/config", &json!({ "max_versions": MAX_VERSIONS })).await?;
        Ok(cluster)
    }

    fn spawn(&mut self, slot: usize) -> Result<()> {
        let child = self.layout.spawn(&self.exe, slot)?;
        self.slots[slot].child = Some(child);
        self.slots[slot].paused = false;
        Ok(())
    }

    pub fn node_id(&self, slot: usize) -> u64 {
        self.layout.node_id(slot)
    }

    pub fn members(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].membership == Membership::Member).collect()
    }

    pub fn is_running(&mut self, slot: usize) -> bool {
        matches!(self.slots[slot].child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The leader's slot, as the first answering member sees it.
    pub async fn leader(&self) -> Option<usize> {
        for slot in self.members() {
            if self.slots[slot].paused {
                continue;
            }
            let health = tokio::time::timeout(ADMIN_TIMEOUT, self.clients[slot].health()).await;
            if let Ok(Ok(reply)) = health {
                if let Some(id) = reply.body["leader_id"].as_u64() {
                    return Some(id as usize - 1);
                }
            }
        }
        None
    }

    pub fn kill9(&mut self, slot: usize) {
        if let Some(mut child) = self.slots[slot].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.slots[slot].paused = false;
    }

    pub fn restart(&mut self, slot: usize) -> Result<()> {
        if !self.is_running(slot) {
            self.kill9(slot);
            self.spawn(slot)?;
        }
        Ok(())
    }

    pub fn pause(&mut self, slot: usize) -> Result<()> {
        self.signal(slot, "-STOP")?;
        self.slots[slot].paused = true;
        Ok(())
    }

    pub fn resume(&mut self, slot: usize) -> Result<()> {
        self.signal(slot, "-CONT")?;
        self.slots[slot].paused = false;
        Ok(())
    }

    fn signal(&self, slot: usize, signal: &str) -> Result<()> {
        let pid = self.slots[slot].child.as_ref().ok_or_else(|| anyhow!("node {} is not running", slot + 1))?.id();
        let status = Command::new("kill").arg(signal).arg(pid.to_string()).status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    /// Starts the next spare node; it joins through `[[retry_join]]`.
    pub async fn add_node(&mut self) -> Result<Option<usize>> {
        let Some(slot) = self.slots.iter().position(|s| s.membership == Membership::Spare) else { return Ok(None) };
        self.spawn(slot)?;
        self.slots[slot].membership = Membership::Member;
        let id = self.node_id(slot);
        let this = &*self;
        dev::wait_for("the added node to become a voter", Duration::from_secs(30), || async move {
            this.voters().await.is_some_and(|v| v.contains(&id)).then_some(())
        })
        .await?;
        Ok(Some(slot))
    }

    /// Removes a member through the API, then stops it.
    pub async fn remove_node(&mut self, slot: usize) -> Result<()> {
        let id = self.node_id(slot);
        let via = self.members().into_iter().find(|&s| s != slot).ok_or_else(|| anyhow!("no other member"))?;
        self.clients[via]
            .post("sys/storage/raft/remove-peer", &json!({ "server_id": id }))
            .await
            .with_context(|| format!("removing node {id}"))?;
        self.slots[slot].membership = Membership::Removed;
        self.kill9(slot);
        Ok(())
    }

    /// A lifecycle action (§10.1) on `slot`'s node, asked through another member when one runs.
    /// A resync waits for the catch-up, so it may take long.
    pub async fn lifecycle(&mut self, slot: usize, action: &str) -> Result<()> {
        let via = self.members().into_iter().find(|&s| s != slot && self.is_running(s)).unwrap_or(slot);
        let client = self.clients[via].clone().with_timeout(Duration::from_secs(180));
        let path = format!("sys/ha/nodes/{}/{action}", self.node_id(slot));
        // Marked before asking: a deactivation whose answer is lost may still have taken
        // effect, and converging activates the node again either way.
        if action == "deactivate" {
            self.slots[slot].inactive = true;
        }
        client.post(&path, &json!({})).await.with_context(|| format!("{action} node {}", slot + 1))?;
        if action == "activate" {
            self.slots[slot].inactive = false;
        }
        Ok(())
    }

    /// SIGTERM, as systemd stops a node; waits for it to exit by itself.
    pub async fn terminate(&mut self, slot: usize) -> Result<()> {
        self.signal(slot, "-TERM")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let child = self.slots[slot].child.as_mut().ok_or_else(|| anyhow!("node {} is not running", slot + 1))?;
            if let Some(status) = child.try_wait()? {
                self.slots[slot].child = None;
                if !status.success() {
                    bail!("node {} exited with {status} after SIGTERM", slot + 1);
                }
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {} did not stop within 30 s of SIGTERM", slot + 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn transfer_leader(&self, slot: usize) -> Result<()> {
        let via = self.members().into_iter().find(|&s| s != slot).unwrap_or(slot);
        self.clients[via].post("sys/ha/transfer-leader", &json!({ "node_id": self.node_id(slot) })).await?;
        Ok(())
    }

    /// The voters, as a member that answers sees them.
    pub async fn voters(&self) -> Option<Vec<u64>> {
        for slot in self.members() {
            if self.slots[slot].paused {
                continue;
            }
            let Ok(Ok(config)) =
                tokio::time::timeout(ADMIN_TIMEOUT, self.clients[slot].get("sys/storage/raft/configuration")).await
            else {
                continue;
            };
            let servers = config["data"]["config"]["servers"].as_array().cloned().unwrap_or_default();
            return Some(
                servers
                    .iter()
                    .filter(|s| s["voter"] == Value::Bool(true))
                    .filter_map(|s| s["node_id"].as_str().and_then(|n| n.parse().ok()))
                    .collect(),
            );
        }
        None
    }

    /// Undoes every fault: links healed, paused nodes resumed, dead members restarted.
    pub fn heal(&mut self) -> Result<()> {
        self.net.heal();
        for slot in self.members() {
            if self.slots[slot].paused {
                self.resume(slot)?;
            }
            self.restart(slot)?;
        }
        Ok(())
    }

    /// Waits until every member is up, unsealed, active and a voter, under one leader.
    pub async fn wait_converged(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for slot in self.members() {
            while self.slots[slot].inactive {
                if let Err(e) = self.lifecycle(slot, "activate").await {
                    if tokio::time::Instant::now() > deadline {
                        bail!("node {} could not be activated again: {e:#}", slot + 1);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        for slot in self.members() {
            let client = self.clients.get(slot).cloned().unwrap_or(self.layout.client(slot)?);
            loop {
                if !self.is_running(slot) {
                    bail!("node {} exited; see {}", slot + 1, self.layout.log_path(slot).display());
                }
                let health = tokio::time::timeout(ADMIN_TIMEOUT, dev::health_code(&client)).await;
                if matches!(health, Ok(Some(200 | 429))) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("node {} did not become healthy within {timeout:?}", slot + 1);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if self.clients.is_empty() {
            return Ok(());
        }
        let expected: Vec<u64> = self.members().iter().map(|&s| self.node_id(s)).collect();
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let this = &*self;
        dev::wait_for("every member to be a voter", remaining, || {
            let expected = &expected;
            async move { this.voters().await.is_some_and(|v| expected.iter().all(|id| v.contains(id))).then_some(()) }
        })
        .await
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].paused {
                let _ = self.resume(slot);
            }
            self.kill9(slot);
        }
    }
}
