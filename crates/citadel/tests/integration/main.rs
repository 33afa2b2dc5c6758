//! Integration tests: real `citadel server` processes on 127.0.0.1, driven over HTTPS.
//! Each test owns its ports (listed here) so none can collide: 21000 + 10·k; `jobs`: 27500–27999;
//! `audit_in_entry`: 29200–29290; `cluster::a_leader_stopped_with_sigterm_…`: 29300–29330;
//! `cluster::a_new_node_catches_up_from_a_leader_that_joined_…`: 29340–29380; `retention`: 29400–29430;
//! `lifecycle`: 29500–29590; `observability`: 29600–29690; `console`: 29700–29790;
//! `alerts`: 29800–29890.

mod acl;
mod alerts;
mod api_auth;
mod api_kv;
mod api_sys;
mod audit_in_entry;
mod cluster;
mod console;
mod crash;
mod files;
mod harness;
mod jobs;
mod lifecycle;
mod limits;
mod observability;
mod retention;
mod routes;
mod security;
mod tokens;
mod trust;
mod vault_client;
