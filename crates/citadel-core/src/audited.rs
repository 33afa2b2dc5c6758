//! A write's audit event inside the write's own Raft entry (`Command::Audited`, §1.4, §9.3).
//!
//! The accepting node prepares the request's event (who, what, where, when) before the handler
//! runs and wraps the first command the request proposes in the envelope. `apply` applies the
//! inner command exactly as it would alone, then records the event in the cluster's log chain
//! (`audit::LogChain`) with the command's outcome: committed together, the entry is the event's
//! durable record, and the request pays no spool fsync and no second entry.
//!
//! What `apply` decides here, and why:
//! - the bounds an envelope must keep ([`check`]): a body past them is a rejection (the inner
//!   command is not applied either), never an assertion, since a proposer can send anything;
//! - whether a response records the event ([`records`]): a rejection the proposer answers by
//!   retrying (a KV version race) is not the request's outcome, so the envelope rides again on
//!   the retry and the request ends with one event, the outcome its client saw;
//! - the outcome itself ([`outcome`]): the status the API answers the rejection with, and its
//!   text, exactly as the client's answer says it (`status` 200 for an applied command).

use crate::audit::AuditBody;
use crate::command::{Command, Rejection, Response};
use crate::kv::KvError;

/// Longest `path` or `user` an envelope's event may carry, in bytes: twice the largest cap a
/// node may be configured with (`[audit] max_path_bytes`), so its truncation marker always fits.
pub const MAX_FIELD_BYTES: usize = 2 * MAX_CONFIGURED_CAP;
/// The largest `[audit] max_path_bytes` a node accepts.
pub const MAX_CONFIGURED_CAP: usize = 4096;
/// Largest encoded event an envelope may carry, in bytes (path and user at their limits, with
/// room for the other fields): a Raft entry is replicated to every node and kept for ever.
pub const MAX_BODY_BYTES: usize = 3 * MAX_FIELD_BYTES;
/// Longest rejection text `apply` writes into an event; longer ones are cut at a character
/// boundary with a marker (a rejection may quote a name from the request).
pub const MAX_ERROR_BYTES: usize = 1024;

/// Refuses an envelope whose event breaks a bound, or that wraps another envelope.
pub fn check(audit: &AuditBody, command: &Command) -> Result<(), Rejection> {
    if matches!(command, Command::Audited { .. }) {
        return Err(Rejection::NestedAudit);
    }
    let too_large = || Rejection::AuditEventTooLarge { max_field: MAX_FIELD_BYTES, max_event: MAX_BODY_BYTES };
    if audit.path.len() > MAX_FIELD_BYTES || audit.user.len() > MAX_FIELD_BYTES {
        return Err(too_large());
    }
    // Counted, not collected: this runs on every write. Serializing a body of strings and
    // numbers cannot fail; an error would only leave the count short.
    let mut size = ByteCount(0);
    let _ = serde_json::to_writer(&mut size, audit);
    if size.0 > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(())
}

/// A writer that only counts what it is given.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `apply` records the envelope's event with this response of its inner command. Not for
/// a rejection the proposer answers by proposing again: the envelope rides on the retry.
pub fn records(response: &Response) -> bool {
    !matches!(response, Response::Rejected(Rejection::Kv(KvError::VersionRace { .. })))
}

/// Whether the proposer of an envelope may take this response as "the request's event is in the
/// log": the event was recorded now, or (a retried proposal) by an earlier attempt.
pub fn event_committed(response: &Response) -> bool {
    records(response)
        && !matches!(
            response,
            Response::Rejected(
                Rejection::AuditEventTooLarge { .. } | Rejection::NestedAudit | Rejection::NotInitialized
            )
        )
}

/// The event `apply` records: the proposer's body with the inner command's outcome. `seq` and
/// `chain` are the log chain's to give; a summary belongs to spool events only.
pub fn outcome(mut body: AuditBody, response: &Response) -> AuditBody {
    match response {
        Response::Rejected(rejection) => {
            body.status = rejection.status();
            body.error = crate::audit::cap_for_audit(&rejection.to_string(), MAX_ERROR_BYTES);
        }
        _ => {
            body.status = 200;
            body.error = String::new();
        }
    }
    body.summary = None;
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{chain_hash, AuditEvent, ChainError, LOG_CHAIN};
    use crate::state::tests::initialized;
    use crate::state::State;
    use crate::token::TokenEntry;

    fn kv_write(path: &str, version: u64, cas: Option<u64>) -> Command {
        let ciphertext = crate::state::tests::sealed();
        Command::KvWrite { mount: "secret/".into(), path: path.into(), version, ciphertext, cas, at: 5 }
    }

    /// A client request's write as a node proposes it: authorized by the root token, with the
    /// request's event prepared by the node that accepted it.
    fn audited(node: u64, request_id: &str, path: &str, command: Command) -> Command {
        let audit = AuditBody {
            node,
            time: 7,
            request_id: request_id.into(),
            kind: "request".into(),
            operation: "update".into(),
            path: format!("secret/data/{path}"),
            user: "root".into(),
            token_hmac: "hmac-sha256:00".into(),
            remote_addr: "127.0.0.1".into(),
            ..AuditBody::default()
        };
        let authorized = Command::Authorized {
            token_hash: "root".into(),
            request_id: request_id.into(),
            at: 6,
            command: Box::new(command),
        };
        Command::Audited { audit: Box::new(audit), command: Box::new(authorized) }
    }

    #[test]
    fn audited_writes_get_consecutive_log_sequences_and_a_verifying_link_in_log_order() {
        let mut state = initialized();
        let entries = [
            audited(2, "r1", "a", kv_write("a", 1, None)),
            audited(1, "r2", "b", kv_write("b", 1, None)),
            audited(3, "r3", "a", kv_write("a", 2, None)),
        ];
        for entry in entries {
            assert!(matches!(state.apply(entry), Response::KvWritten { .. }), "the write applies as it would alone");
        }
        let log = &state.audit.log.events;
        let numbered: Vec<(u64, u64, &str)> =
            log.iter().map(|e| (e.body().seq, e.body().node, e.body().request_id.as_str())).collect();
        assert_eq!(numbered, [(1, 2, "r1"), (2, 1, "r2"), (3, 3, "r3")], "numbered in log order, whoever accepted");
        assert_eq!(log[0].prev_hash, crate::audit::GENESIS);
        assert_eq!(log[1].prev_hash, log[0].hash);
        assert_eq!(log[2].prev_hash, log[1].hash);
        assert!(log.iter().all(|e| e.body().chain == LOG_CHAIN && e.body().status == 200 && e.body().error.is_empty()));
        assert_eq!(state.audit.verify(), Ok(3));
        assert!(state.audit.chains.is_empty(), "no node's spool chain is touched");
    }

    #[test]
    fn a_rejected_audited_command_records_its_rejection_and_changes_nothing_else() {
        let mut state = initialized();
        state.apply(audited(1, "r1", "a", kv_write("a", 1, None)));
        let before = state.clone();
        let response = state.apply(audited(1, "r2", "a", kv_write("a", 2, Some(7))));
        let rejection = Rejection::Kv(KvError::CasMismatch { current: 1 });
        assert_eq!(response, Response::Rejected(rejection.clone()), "the inner command's own rejection");
        let event = state.audit.log.events.last().unwrap().body();
        assert_eq!((event.seq, event.request_id.as_str()), (2, "r2"));
        assert_eq!((event.status, event.error.clone()), (400, rejection.to_string()));
        let mut without_event = state.clone();
        without_event.audit.log.events.pop();
        assert_eq!(without_event, before, "nothing but the event changed");

        // A token revoked before the entry is applied: refused, and recorded as refused.
        let mut revoked = initialized();
        let stale = Command::Audited {
            audit: Box::new(AuditBody { request_id: "r3".into(), ..AuditBody::default() }),
            command: Box::new(Command::Authorized {
                token_hash: "gone".into(),
                request_id: "r3".into(),
                at: 1,
                command: Box::new(kv_write("a", 1, None)),
            }),
        };
        assert_eq!(revoked.apply(stale), Response::Rejected(Rejection::TokenInvalid));
        assert_eq!(revoked.audit.log.events[0].body().error, Rejection::TokenInvalid.to_string());
        assert!(revoked.mounts["secret/"].kv.entries.is_empty());
    }

    #[test]
    fn an_audit_body_past_its_bounds_is_rejected_without_panicking_and_nothing_applies() {
        let mut state = initialized();
        let before = state.clone();
        let mut long_path = audited(1, "r1", "a", kv_write("a", 1, None));
        if let Command::Audited { audit, .. } = &mut long_path {
            audit.path = "p".repeat(MAX_FIELD_BYTES + 1);
        }
        let too_large = Rejection::AuditEventTooLarge { max_field: MAX_FIELD_BYTES, max_event: MAX_BODY_BYTES };
        assert_eq!(state.apply(long_path), Response::Rejected(too_large.clone()));
        let mut long_body = audited(1, "r2", "a", kv_write("a", 1, None));
        if let Command::Audited { audit, .. } = &mut long_body {
            audit.detail = "d".repeat(MAX_BODY_BYTES);
        }
        assert_eq!(state.apply(long_body), Response::Rejected(too_large));
        let nested = Command::Audited {
            audit: Box::default(),
            command: Box::new(audited(1, "r3", "a", kv_write("a", 1, None))),
        };
        assert_eq!(state.apply(nested), Response::Rejected(Rejection::NestedAudit));
        assert_eq!(state, before, "neither the write nor an event was applied");
    }

    #[test]
    fn replaying_the_same_entries_on_another_replica_gives_a_byte_identical_audit_log() {
        let entries = vec![
            audited(1, "r1", "a", kv_write("a", 1, None)),
            audited(2, "r2", "a", kv_write("a", 1, None)),
            audited(2, "r3", "a", kv_write("a", 2, Some(9))),
            audited(3, "r4", "b", kv_write("b", 1, None)),
        ];
        let mut leader = initialized();
        let mut replica = initialized();
        for entry in &entries {
            let response = leader.apply(entry.clone());
            assert_eq!(replica.apply(entry.clone()), response);
        }
        assert_eq!(serde_json::to_vec(&leader.audit).unwrap(), serde_json::to_vec(&replica.audit).unwrap());
        assert_eq!(serde_json::to_vec(&leader).unwrap(), serde_json::to_vec(&replica).unwrap());
        // The stored bytes survive a snapshot's re-encoding and still verify.
        let restored: State = serde_json::from_slice(&serde_json::to_vec(&leader).unwrap()).unwrap();
        assert_eq!(restored.audit.verify(), Ok(3), "r2's version race left its event to its retry");
    }

    #[test]
    fn a_version_race_leaves_the_event_to_the_retry_so_the_request_has_one_event() {
        let mut state = initialized();
        state.apply(audited(1, "r1", "a", kv_write("a", 1, None)));
        let raced = state.apply(audited(2, "r2", "a", kv_write("a", 1, None)));
        assert!(matches!(raced, Response::Rejected(Rejection::Kv(KvError::VersionRace { .. }))));
        assert!(!event_committed(&raced), "the proposer keeps the envelope for its retry");
        assert!(matches!(state.apply(audited(2, "r2", "a", kv_write("a", 2, None))), Response::KvWritten { .. }));
        let r2: Vec<_> = state.audit.log.events.iter().filter(|e| e.body().request_id == "r2").collect();
        assert_eq!(r2.len(), 1);
        assert_eq!(r2[0].body().status, 200, "the event says what the client was told");
    }

    #[test]
    fn a_proposal_retried_after_an_ambiguous_failure_records_its_request_once() {
        let mut state = initialized();
        let policy = crate::policy::parse("ops", r#"path "secret/*" { capabilities = ["read"] }"#).unwrap();
        let put = audited(1, "r1", "p", Command::PolicyPut { policy });
        assert_eq!(state.apply(put.clone()), Response::Done);
        assert_eq!(state.apply(put), Response::Done, "committed twice, applied as before");
        assert_eq!(state.audit.log.events.len(), 1);
        assert!(state.audit.log.holds_recent_request("r1"));
    }

    #[test]
    fn a_revoke_self_committed_twice_answers_done_both_times_and_another_request_with_the_token_is_refused() {
        let mut state = initialized();
        let token = TokenEntry { hash: "t".into(), policies: vec!["default".into()], ..TokenEntry::default() };
        state.apply(Command::TokenCreate { entry: Box::new(token), login: None });
        let revoke_self = |request_id: &str| {
            let mut command = audited(1, request_id, "t", Command::TokenRevoke { hash: "t".into() });
            if let Command::Audited { command, .. } = &mut command {
                if let Command::Authorized { token_hash, .. } = &mut **command {
                    *token_hash = "t".into();
                }
            }
            command
        };
        assert_eq!(state.apply(revoke_self("r1")), Response::Done);
        let before = state.clone();
        assert_eq!(state.apply(revoke_self("r1")), Response::Done, "the repeat is told what the first attempt did");
        assert_eq!(state, before, "and changes nothing");
        // Another request with the revoked token meets the token check.
        assert_eq!(state.apply(revoke_self("r2")), Response::Rejected(Rejection::TokenInvalid));
        let events: Vec<_> =
            state.audit.log.events.iter().map(|e| (e.body().request_id.clone(), e.body().status)).collect();
        assert_eq!(events, [("r1".to_string(), 200), ("r2".to_string(), 400)]);
    }

    #[test]
    fn a_cas_write_committed_twice_after_a_leader_change_answers_written_both_times_with_one_event() {
        let mut state = initialized();
        state.apply(audited(1, "r1", "a", kv_write("a", 1, None)));
        let cas = audited(2, "r2", "a", kv_write("a", 2, Some(1)));
        let first = state.apply(cas.clone());
        assert!(matches!(first, Response::KvWritten { version: 2, .. }), "{first:?}");
        assert_eq!(state.apply(cas), first, "the retry is told what the first attempt did");
        let r2: Vec<_> = state.audit.log.events.iter().filter(|e| e.body().request_id == "r2").collect();
        assert_eq!(r2.len(), 1);
        assert_eq!(r2[0].body().status, 200);
    }

    #[test]
    fn a_flipped_byte_in_the_log_chain_fails_verification_naming_the_sequence() {
        let mut state = initialized();
        for (i, id) in ["r1", "r2", "r3"].iter().enumerate() {
            state.apply(audited(1, id, "a", kv_write("a", i as u64 + 1, None)));
        }
        let second = &state.audit.log.events[1];
        let forged = second.raw().replace("secret/data/a", "secret/data/z");
        state.audit.log.events[1] =
            AuditEvent::from_parts(forged, second.prev_hash.clone(), second.hash.clone()).unwrap();
        assert_eq!(state.audit.verify(), Err(ChainError::LogTampered { seq: 2 }));
        let rehashed = &mut state.audit.log.events[1];
        rehashed.hash = chain_hash(&rehashed.prev_hash, rehashed.raw().as_bytes());
        let err = state.audit.verify().unwrap_err();
        assert_eq!(err, ChainError::LogBrokenLink { seq: 3 });
        assert!(err.to_string().contains("log chain sequence 3"), "{err}");
    }

    #[test]
    fn a_long_rejection_text_is_capped_in_the_event() {
        let long = Rejection::PolicyNotFound("x".repeat(5000));
        let body = outcome(AuditBody::default(), &Response::Rejected(long));
        assert_eq!(body.status, 404);
        assert!(body.error.len() < MAX_ERROR_BYTES + 32 && body.error.contains("truncated"), "{}", body.error);
    }
}
