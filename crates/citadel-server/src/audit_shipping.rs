//! Shipping the local audit spool into the replicated audit log (§1.4), idempotently by node
//! and sequence. A node job: the background loop here, and `membership::leave` draining the
//! spool before a node is removed.

use std::sync::Arc;
use std::time::Duration;

use citadel_core::command::{Command, Response};

use crate::node::Node;
use crate::node_error::NodeError;

/// How long a new audit event waits for company before it is shipped. Every entry costs each
/// node an fsync, an apply and a store commit, so a node reading at full speed ships ~20
/// entries a second, not one per few reads; its spool holds the events durably meanwhile.
const SHIP_GATHER: Duration = Duration::from_millis(50);
/// Events per `AuditShip` command.
const BATCH: usize = 128;

/// Why a batch of audit events was not shipped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The proposal did not commit (no leader, sealed, read-only...): the events stay spooled.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The replicated audit log refused the batch (a broken chain): the events stay spooled.
    #[error("the replicated audit log refused events: {0}")]
    Refused(Response),
}

/// Ships events as they are spooled, while a leader can commit them.
pub async fn ship_audit(app: Arc<Node>) {
    loop {
        tokio::select! {
            _ = app.audit.new_event.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        tokio::time::sleep(SHIP_GATHER).await;
        loop {
            if app.read_only() || app.raft_metrics().current_leader.is_none() {
                break;
            }
            match ship_audit_batch(&app).await {
                // A full batch means a backlog: ship the next at once. Anything less goes back
                // to gathering, or the events spooled during one proposal would each time be
                // shipped alone in the next (a few per entry at one reader's pace).
                Ok(BATCH) => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "audit shipping deferred");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// Proposes the next batch of this node's unshipped audit events; returns how many it shipped
/// (0: none were waiting).
pub async fn ship_audit_batch(app: &Node) -> Result<usize, ShipError> {
    let shipped = app.state.read(|s| s.audit.chains.get(&app.node_id()).map_or(0, |c| c.last_seq()));
    let batch = app.audit.unshipped(shipped, BATCH);
    if batch.is_empty() {
        return Ok(0);
    }
    let count = batch.len();
    match app.propose(Command::AuditShip { events: batch }).await? {
        Response::AuditShipped { .. } => Ok(count),
        other => {
            tracing::error!(response = %other, "the replicated audit log refused events from this node");
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err(ShipError::Refused(other))
        }
    }
}
