//! The deterministic heart of Citadel.
//!
//! Everything here is a pure function of its inputs: no clock, no randomness drawn inside
//! `apply`, no I/O, no async runtime. Commands carry every id, timestamp and nonce chosen by the
//! proposing node, so every replica that applies the same log reaches the same [`state::State`].
//! That is what lets the storage layer replay, snapshot and compare states byte for byte, and what
//! makes this crate testable in microseconds.

pub mod alerts;
pub mod audit;
pub mod audited;
pub mod barrier;
pub mod command;
pub mod encoding;
pub mod job;
pub mod kv;
pub mod policy;
pub mod route;
pub mod shamir;
pub mod snapshot_auto;
pub mod state;
pub mod stored_map;
pub mod time;
pub mod token;
pub mod token_table;

/// Raft node identifier.
pub type NodeId = u64;
/// Milliseconds since the Unix epoch, always chosen by a proposer, never read in `apply`.
pub type UnixMillis = u64;
