//! A Citadel node: HTTP API → request handling → barrier → replicated storage.
//!
//! - [`api`]: Vault's HTTP API; one dispatcher applies seal check, authentication, ACL and
//!   audit to every request.
//! - [`seal`]: the node's keys (in memory only while unsealed).
//! - [`audit`]: the local audit spool (fsynced before answering) and its shipping.
//! - [`cluster`]: Raft transport over mutual TLS.
//! - [`jobs`]: leader-only periodic jobs; [`events`]: the node's typed event stream.
//! - [`server`]: wiring and the node's background tasks.

pub mod alert_sinks;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod audit_envelope;
pub mod audit_shipping;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod events;
pub mod forwarded;
pub mod graceful_stop;
pub mod ha;
pub mod ids;
pub mod jobs;
pub mod leaderless_alerts;
pub mod lifecycle;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod node_error;
pub mod peer;
pub mod pki;
pub mod raft_stream;
pub mod request_path;
pub mod resync;
pub mod scheduled_snapshots;
pub mod seal;
pub mod server;
pub mod snapshot;
pub mod snapshot_archive;
pub mod stall;
pub mod tls;
pub mod ui;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod layering_tests;

/// This build's version, as nodes report it (`sys/health`, the HA table, cluster status).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use config::Config;
pub use server::run;
