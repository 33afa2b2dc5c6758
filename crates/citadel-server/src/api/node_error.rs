//! The one place the node's errors become HTTP answers (§9.2): the node layer knows no status
//! codes, and handlers convert with `?`.

use axum::http::StatusCode;

use super::ApiError;
use crate::node_error::NodeError;

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> ApiError {
        // No wildcard: a new kind of node error must be given its status here.
        let status = match &e {
            NodeError::Sealed
            | NodeError::NotLeader { .. }
            | NodeError::NoLeader
            | NodeError::ReadOnly
            | NodeError::LeaderFailed(_)
            | NodeError::CommitFailed(_)
            | NodeError::ReadIndexFailed(_)
            | NodeError::ReplicaBehind => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(e: NodeError) -> (u16, String) {
        let api = ApiError::from(e);
        (api.status.as_u16(), api.errors.join("; "))
    }

    /// Clients, Vault tools and the integration tests read these texts: they are the contract.
    #[test]
    fn node_errors_keep_the_status_and_text_clients_know() {
        assert_eq!(answer(NodeError::Sealed), (503, "Vault is sealed".into()));
        assert_eq!(
            answer(NodeError::ReadOnly),
            (
                503,
                "the cluster is read-only because it has no leader: writes are refused until a quorum of voters is back"
                    .into()
            )
        );
        assert_eq!(
            answer(NodeError::NoLeader),
            (503, "the cluster has no leader: the request could not be committed within the deadline".into())
        );
        assert_eq!(
            answer(NodeError::LeaderFailed("a node may ship only its own audit events".into())),
            (503, "the leader could not commit the request: a node may ship only its own audit events".into())
        );
        assert_eq!(answer(NodeError::ReplicaBehind), (503, "the local replica did not catch up in time".into()));
    }
}
