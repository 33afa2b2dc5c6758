//! The node's shared context: Raft, the applied state, the seal, the audit spool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel_core::command::{Command, Response};
use citadel_storage::types::Raft;
use citadel_storage::StateReader;
use openraft::error::{ClientWriteError, RaftError};

use crate::api::ApiError;
use crate::audit::AuditSpool;
use crate::auth::LoginLimiter;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::seal::{SealManager, Unsealed};

pub struct App {
    pub config: Config,
    pub raft: Raft,
    pub state: StateReader,
    pub seal: SealManager,
    pub audit: Arc<AuditSpool>,
    pub limiter: LoginLimiter,
    pub metrics: Metrics,
    pub started: Instant,
}

impl App {
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// The bound on any wait for consensus (§1.5): two election timeouts.
    pub fn consensus_deadline(&self) -> Duration {
        Duration::from_millis(2 * self.config.raft.election_timeout_ms)
    }

    /// Proposes a command and waits for it to be applied; fails with 503 within the deadline.
    pub async fn propose(&self, command: Command) -> Result<Response, ApiError> {
        let kind = command.kind();
        let started = Instant::now();
        let result = tokio::time::timeout(self.consensus_deadline(), self.raft.client_write(command)).await;
        self.metrics.observe_proposal(started.elapsed());
        match result {
            Err(_) => Err(ApiError::no_leader()),
            Ok(Ok(reply)) => Ok(reply.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ApiError::unavailable(match f.leader_id {
                    Some(id) => format!("this node is not the leader (node {id} is); retry against the leader"),
                    None => "the cluster has no leader; writes are refused until one is elected".into(),
                }))
            }
            Ok(Err(e)) => {
                tracing::warn!(command = kind, error = %e, "proposal failed");
                Err(ApiError::unavailable(format!("the cluster could not commit the request: {e}")))
            }
        }
    }

    /// Waits until the local state reflects everything committed before this call (ReadIndex).
    pub async fn linearize(&self) -> Result<(), ApiError> {
        let read = tokio::time::timeout(
            self.consensus_deadline(),
            self.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
        )
        .await;
        let log_id = match read {
            Err(_) => return Err(ApiError::no_leader()),
            Ok(Err(e)) => return Err(ApiError::unavailable(format!("linearizable read failed: {e}"))),
            Ok(Ok(log_id)) => log_id,
        };
        tokio::time::timeout(self.consensus_deadline(), self.state.wait_applied(log_id.index()))
            .await
            .map_err(|_| ApiError::unavailable("the local replica did not catch up in time"))?;
        Ok(())
    }

    /// The node's keys, reloaded if another node rotated the keyring; 503 while sealed.
    pub fn keys(&self) -> Result<Arc<Unsealed>, ApiError> {
        let info = self.state.read(|s| s.seal.clone());
        let keys = match info {
            Some(info) => self.seal.refresh(&info),
            None => None,
        };
        keys.ok_or_else(ApiError::sealed)
    }

    pub fn raft_metrics(&self) -> openraft::RaftMetrics<citadel_storage::TypeConfig> {
        use openraft::async_runtime::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.raft_metrics().current_leader == Some(self.node_id())
    }
}
