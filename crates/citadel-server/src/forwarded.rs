//! What a leader commits for another node (§8.1): members forward client requests' commands,
//! nothing else. Init, CA changes and leader jobs never arrive over the cluster channel;
//! keyring rotations and restores arrive authorized by a token the leader checks again; a
//! member ships only its own audit events, and a command carrying its request's event
//! (`Command::Audited`) travels unchanged and must carry the sender's own. The leader records
//! every other forwarded command it commits in its own audit log, under the request's id.
//!
//! What a leader answers when it does not commit (`ForwardError`) crosses the cluster channel
//! as a value: a forwarder retries on `NotLeader` by matching it, never by reading text (§9.2).

use citadel_core::audit::AuditBody;
use citadel_core::command::{Command, Forwarding, Response};
use citadel_core::policy::{self, Caps};
use citadel_core::token_table::TokenRead;
use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::node_error::NodeError;

/// Why a leader answered a forwarded proposal (`cluster/propose`) or a read-index call
/// (`cluster/read-index`) without a result. A value on the wire, so the forwarder decides
/// whether to retry by matching it, never by reading text (§9.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// The node asked is not (or no longer) the leader; nothing was proposed, so the caller may
    /// ask the new leader. `leader` is the one the asked node knows of, if any.
    #[error("the node asked is not the leader (its leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The leader does not commit this command for the sender (§8.1); asking again changes nothing.
    #[error(transparent)]
    Refused(#[from] ForwardRefusal),
    /// The leader tried and could not commit (no quorum, Raft refused); its reason, for people.
    #[error("{0}")]
    Failed(String),
}

impl From<NodeError> for ForwardError {
    fn from(e: NodeError) -> ForwardError {
        match e {
            NodeError::NotLeader { leader } => ForwardError::NotLeader { leader },
            other => ForwardError::Failed(other.to_string()),
        }
    }
}

/// Why a leader does not commit a command for another node. Travels to the sender inside
/// `ForwardError::Refused`; retrying it elsewhere would not help.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardRefusal {
    /// Init, CA changes and leader jobs are proposed by the leader itself only.
    #[error("a leader does not accept a {kind} command from another node")]
    NotForwardable { kind: String },
    /// An audit batch, or a command's audit event, of another node than the sender.
    #[error("a node may ship only its own audit events")]
    ForeignAuditEvents,
    /// A rotation or a restore that does not carry the token that authorized it.
    #[error("a privileged command must carry its token")]
    NoToken,
    /// A rotation or a restore whose token lacks `sudo` on its path in the leader's state.
    #[error("the forwarded {kind} command's token lacks sudo on {path}")]
    NoSudo { kind: String, path: String },
}

/// Commits `command` forwarded by member `sender` (its certificate's node id; the cluster
/// channel's gate admitted it as a current member).
pub async fn commit(app: &Node, sender: Option<u64>, command: Command) -> Result<Response, ForwardError> {
    check(app, sender, &command)?;
    // A command that carries its request's event (`Command::Audited`) is its own record in the
    // replicated log, under the request's id and the sender's node: no leader event is needed.
    let request_id = match &command {
        Command::Authorized { request_id, .. } => Some(request_id.clone()),
        _ => None,
    };
    let kind = command.kind();
    let response = app.propose_local(command).await?;
    if let Some(request_id) = request_id.filter(|_| !matches!(response, Response::Rejected(_))) {
        record(app, sender, kind, request_id);
    }
    Ok(response)
}

/// The command an envelope wraps, or the command itself.
fn unwrapped(command: &Command) -> &Command {
    match command {
        Command::Audited { command, .. } => command,
        other => other,
    }
}

fn check(app: &Node, sender: Option<u64>, command: &Command) -> Result<(), ForwardRefusal> {
    check_event_sender(sender, command)?;
    match command.forwarding() {
        Forwarding::Client => Ok(()),
        Forwarding::Refused => Err(ForwardRefusal::NotForwardable { kind: command.kind().into() }),
        Forwarding::AuditOfSender => match (command, sender) {
            (Command::AuditShip { events }, Some(node)) if events.iter().all(|e| e.body().node == node) => Ok(()),
            _ => Err(ForwardRefusal::ForeignAuditEvents),
        },
        Forwarding::Privileged => check_privileged(app, command),
    }
}

/// A member puts a request's event into the log in its own name only, as when it ships its spool.
fn check_event_sender(sender: Option<u64>, command: &Command) -> Result<(), ForwardRefusal> {
    match command {
        Command::Audited { audit, .. } if sender != Some(audit.node) => Err(ForwardRefusal::ForeignAuditEvents),
        _ => Ok(()),
    }
}

/// A rotation or a restore needs `sudo` on its path, checked against the leader's own state.
fn check_privileged(app: &Node, command: &Command) -> Result<(), ForwardRefusal> {
    let Command::Authorized { token_hash, at, command: inner, .. } = unwrapped(command) else {
        return Err(ForwardRefusal::NoToken);
    };
    let path = match inner.as_ref() {
        Command::RotateKeyring { .. } => "sys/rotate",
        _ => "sys/storage/raft/snapshot",
    };
    let allowed = app.state.read_with_store(|s, store| {
        let token = match store.tokens.token(token_hash) {
            Ok(Some(token)) => token,
            Ok(None) => return false,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the stored tokens");
                return false;
            }
        };
        if token.is_expired(*at) {
            return false;
        }
        token.policies.iter().any(|p| p == policy::ROOT)
            || policy::capabilities(s.policies_named(&token.policies), path).contains(Caps::SUDO)
    });
    if allowed {
        Ok(())
    } else {
        Err(ForwardRefusal::NoSudo { kind: inner.kind().into(), path: path.into() })
    }
}

/// The leader's own record of a command it committed for another node. The Raft entry is the
/// durable record (it carries the request id and the token's hash); this event indexes it in
/// the leader's audit chain, written in the background so it adds nothing to the write.
fn record(app: &Node, sender: Option<u64>, kind: &'static str, request_id: String) {
    let event = AuditBody {
        time: crate::ids::now_ms(),
        request_id,
        kind: "forwarded_commit".into(),
        operation: kind.into(),
        remote_addr: sender.map(|n| format!("node {n}")).unwrap_or_default(),
        status: 200,
        ..AuditBody::default()
    };
    let audit = app.audit.clone();
    tokio::spawn(async move {
        if let Err(e) = audit.record(event).await {
            tracing::error!(error = %e, "could not record a forwarded commit in the audit spool");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_core::command::Forwarding;

    fn audited(node: u64, command: Command) -> Command {
        Command::Audited { audit: Box::new(AuditBody { node, ..AuditBody::default() }), command: Box::new(command) }
    }

    fn authorized(command: Command) -> Command {
        Command::Authorized { token_hash: "t".into(), request_id: "r".into(), at: 1, command: Box::new(command) }
    }

    #[test]
    fn a_forwarded_envelope_must_carry_the_senders_own_event_around_a_client_command() {
        let put = authorized(Command::PolicyDelete { name: "p".into() });
        assert_eq!(check_event_sender(Some(2), &audited(2, put.clone())), Ok(()));
        assert_eq!(check_event_sender(Some(2), &audited(3, put.clone())), Err(ForwardRefusal::ForeignAuditEvents));
        assert_eq!(check_event_sender(None, &audited(2, put.clone())), Err(ForwardRefusal::ForeignAuditEvents));
        assert_eq!(audited(2, put).forwarding(), Forwarding::Client, "the envelope travels as what it wraps");
        let rotate =
            authorized(Command::RotateKeyring { expected_term: 1, new_term: 2, wrapped_keyring: vec![], at: 1 });
        assert_eq!(audited(2, rotate.clone()).forwarding(), Forwarding::Privileged);
        assert!(matches!(unwrapped(&audited(2, rotate)), Command::Authorized { .. }), "checked for sudo inside");
        let unauthorized = Command::PolicyDelete { name: "p".into() };
        assert_eq!(audited(2, unauthorized).forwarding(), Forwarding::Refused, "only a request's command rides");
        let job = authorized(Command::PruneExpired { now: 1 });
        assert_eq!(audited(2, job).forwarding(), Forwarding::Refused);
    }
}
