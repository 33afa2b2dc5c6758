//! What a leader commits for another node (§8.1): members forward client requests' commands,
//! nothing else. Init, CA changes and leader jobs never arrive over the cluster channel;
//! keyring rotations and restores arrive authorized by a token the leader checks again; a
//! member ships only its own audit events. The leader records every forwarded command it
//! commits in its own audit log, under the request's id.

use citadel_core::audit::AuditBody;
use citadel_core::command::{Command, Forwarding, Response};
use citadel_core::policy::{self, Caps};

use crate::api::ApiError;
use crate::app::App;

/// Commits `command` forwarded by member `sender` (its certificate's node id; the cluster
/// channel's gate admitted it as a current member).
pub async fn commit(app: &App, sender: Option<u64>, command: Command) -> Result<Response, String> {
    check(app, sender, &command)?;
    let request_id = match &command {
        Command::Authorized { request_id, .. } => Some(request_id.clone()),
        _ => None,
    };
    let kind = command.kind();
    let response = app.propose_local(command).await.map_err(|e: ApiError| e.errors.join("; "))?;
    if let Some(request_id) = request_id.filter(|_| !matches!(response, Response::Rejected(_))) {
        record(app, sender, kind, request_id);
    }
    Ok(response)
}

fn check(app: &App, sender: Option<u64>, command: &Command) -> Result<(), String> {
    match command.forwarding() {
        Forwarding::Client => Ok(()),
        Forwarding::Refused => Err(format!("a leader does not accept a {} command from another node", command.kind())),
        Forwarding::AuditOfSender => match (command, sender) {
            (Command::AuditShip { events }, Some(node)) if events.iter().all(|e| e.body().node == node) => Ok(()),
            _ => Err("a node may ship only its own audit events".into()),
        },
        Forwarding::Privileged => check_privileged(app, command),
    }
}

/// A rotation or a restore needs `sudo` on its path, checked against the leader's own state.
fn check_privileged(app: &App, command: &Command) -> Result<(), String> {
    let Command::Authorized { token_hash, at, command: inner, .. } = command else {
        return Err("a privileged command must carry its token".into());
    };
    let path = match inner.as_ref() {
        Command::RotateKeyring { .. } => "sys/rotate",
        _ => "sys/storage/raft/snapshot",
    };
    let allowed = app.state.read(|s| {
        let Some(token) = s.tokens.get(token_hash).filter(|t| !t.is_expired(*at)) else { return false };
        token.policies.iter().any(|p| p == policy::ROOT)
            || policy::capabilities(s.policies_named(&token.policies), path).contains(Caps::SUDO)
    });
    if allowed {
        Ok(())
    } else {
        Err(format!("the forwarded {} command's token lacks sudo on {path}", inner.kind()))
    }
}

/// The leader's own record of a command it committed for another node. The Raft entry is the
/// durable record (it carries the request id and the token's hash); this event indexes it in
/// the leader's audit chain, written in the background so it adds nothing to the write.
fn record(app: &App, sender: Option<u64>, kind: &'static str, request_id: String) {
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
