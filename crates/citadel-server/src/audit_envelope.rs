//! A request's audit event on its way into the first Raft entry the request proposes (§1.4).
//!
//! The dispatcher prepares the event before the handler runs and hands it down in the request's
//! context (`node::RequestContext::audit`); `Node::propose` wraps the first command the request
//! proposes in `Command::Audited` with it, and settles the carrier with the proposal's result.
//! After the handler the dispatcher asks where the event is: in the replicated log (committed
//! with the write, nothing more to do) or still to be written to the spool (fail closed:
//! nothing was proposed, or the proposal failed, timed out or is not known to have committed).
//!
//! A proposal that timed out may still commit later: its event is then in the log *and* in the
//! spool, two events under one request id (docs/ARCHITECTURE.md). Never none.

use std::sync::Mutex;

use citadel_core::audit::AuditBody;
use citadel_core::audited;
use citadel_core::command::{Command, Response};

use crate::node_error::NodeError;

/// Where a request's event is, once its handler is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Committed inside the request's entry: the replicated log holds it.
    InLog,
    /// Not known to be in the log: the dispatcher writes it to the spool. `maybe_in_log`: a
    /// proposal carried it, so a look at the local log may still find it committed.
    Spool { maybe_in_log: bool },
}

#[derive(Debug)]
enum Fate {
    /// Prepared; proposals go without it until the handler runs (the dispatcher's own token-use
    /// proposal must not carry the request's event: its outcome is not the request's).
    Waiting(AuditBody),
    /// The next proposal carries it.
    Armed(AuditBody),
    /// Riding in a proposal now.
    InFlight(AuditBody),
    /// Committed: the log holds it.
    InLog,
    /// Not known to be in the log (the proposal failed, timed out, or its envelope was refused);
    /// later proposals go without it.
    Unknown,
}

/// The request's event and what became of it.
#[derive(Debug)]
pub struct AuditCarrier {
    fate: Mutex<Fate>,
    /// A proposal carried the event at least once.
    proposed: std::sync::atomic::AtomicBool,
}

impl AuditCarrier {
    /// `body` must already be capped (`audit::cap_for_audit`): it is proposed as it is.
    pub fn new(body: AuditBody) -> AuditCarrier {
        AuditCarrier { fate: Mutex::new(Fate::Waiting(body)), proposed: false.into() }
    }

    fn fate(&self) -> std::sync::MutexGuard<'_, Fate> {
        self.fate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, the next proposal carries the event (called just before the handler; a
    /// carrier already armed or used stays as it is).
    pub fn arm(&self) {
        let mut fate = self.fate();
        *fate = match std::mem::replace(&mut *fate, Fate::Unknown) {
            Fate::Waiting(body) => Fate::Armed(body),
            other => other,
        };
    }

    /// Wraps an authorized command in the envelope if the event is waiting for a proposal;
    /// anything else (a command of a node's own, a later proposal) goes as it is.
    pub fn wrap(&self, command: Command) -> Command {
        if !matches!(command, Command::Authorized { .. }) {
            return command;
        }
        let mut fate = self.fate();
        match std::mem::replace(&mut *fate, Fate::Unknown) {
            Fate::Armed(body) => {
                *fate = Fate::InFlight(body.clone());
                self.proposed.store(true, std::sync::atomic::Ordering::Relaxed);
                Command::Audited { audit: Box::new(body), command: Box::new(command) }
            }
            other => {
                *fate = other;
                command
            }
        }
    }

    /// Records what became of the proposal that carried the event (a no-op for one that did not).
    pub fn settle(&self, result: &Result<Response, NodeError>) {
        let mut fate = self.fate();
        let Fate::InFlight(body) = std::mem::replace(&mut *fate, Fate::Unknown) else {
            return;
        };
        *fate = match result {
            Ok(response) if audited::event_committed(response) => Fate::InLog,
            // A version race: `apply` left the event to the retry the handler proposes next.
            Ok(response) if !audited::records(response) => Fate::Armed(body),
            Ok(_) | Err(_) => Fate::Unknown,
        };
    }

    pub fn disposition(&self) -> Disposition {
        match *self.fate() {
            Fate::InLog => Disposition::InLog,
            _ => Disposition::Spool { maybe_in_log: self.proposed.load(std::sync::atomic::Ordering::Relaxed) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_core::command::Rejection;
    use citadel_core::kv::KvError;

    fn authorized() -> Command {
        Command::Authorized {
            token_hash: "t".into(),
            request_id: "r".into(),
            at: 1,
            command: Box::new(Command::PolicyDelete { name: "p".into() }),
        }
    }

    fn body() -> AuditBody {
        AuditBody { request_id: "r".into(), path: "sys/policies/acl/p".into(), ..AuditBody::default() }
    }

    #[test]
    fn only_the_first_proposal_after_arming_carries_the_event() {
        let carrier = AuditCarrier::new(body());
        assert_eq!(carrier.wrap(authorized()), authorized(), "the dispatcher's token use goes without it");
        carrier.arm();
        let first = carrier.wrap(authorized());
        assert!(matches!(&first, Command::Audited { audit, .. } if audit.request_id == "r"), "{first:?}");
        carrier.settle(&Ok(Response::Done));
        assert_eq!(carrier.wrap(authorized()), authorized(), "a second proposal goes without it");
        assert_eq!(carrier.disposition(), Disposition::InLog);
    }

    #[test]
    fn a_committed_rejection_is_in_the_log_and_a_failed_proposal_goes_to_the_spool() {
        let rejected = AuditCarrier::new(body());
        rejected.arm();
        rejected.wrap(authorized());
        rejected.settle(&Ok(Response::Rejected(Rejection::PolicyNotFound("p".into()))));
        assert_eq!(rejected.disposition(), Disposition::InLog);

        let failed = AuditCarrier::new(body());
        failed.arm();
        failed.wrap(authorized());
        failed.settle(&Err(NodeError::NoLeader));
        assert_eq!(failed.disposition(), Disposition::Spool { maybe_in_log: true });
        assert_eq!(failed.wrap(authorized()), authorized(), "a fate unknown is never carried twice");

        let idle = AuditCarrier::new(body());
        idle.arm();
        assert_eq!(idle.disposition(), Disposition::Spool { maybe_in_log: false }, "nothing proposed");
    }

    #[test]
    fn a_version_race_keeps_the_event_for_the_retry() {
        let carrier = AuditCarrier::new(body());
        carrier.arm();
        carrier.wrap(authorized());
        carrier.settle(&Ok(Response::Rejected(Rejection::Kv(KvError::VersionRace { proposed: 2, next: 3 }))));
        assert!(matches!(carrier.wrap(authorized()), Command::Audited { .. }), "the retry carries it");
        carrier.settle(&Ok(Response::KvWritten { version: 3, created: 1, deletion_time: None }));
        assert_eq!(carrier.disposition(), Disposition::InLog);
    }

    #[test]
    fn an_envelope_refused_for_its_bounds_leaves_the_event_to_the_spool() {
        let carrier = AuditCarrier::new(body());
        carrier.arm();
        carrier.wrap(authorized());
        let refused = Rejection::AuditEventTooLarge { max_field: 1, max_event: 1 };
        carrier.settle(&Ok(Response::Rejected(refused)));
        assert!(matches!(carrier.disposition(), Disposition::Spool { .. }));
    }
}
