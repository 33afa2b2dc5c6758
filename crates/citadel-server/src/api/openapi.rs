//! The OpenAPI document served at `sys/openapi`.

use serde_json::{json, Map, Value};

/// (path, methods, summary) for every route the API serves.
const ROUTES: &[(&str, &[&str], &str)] = &[
    ("/sys/health", &["get", "head"], "Node health with Vault's status codes (200, 429, 474, 501, 503)"),
    ("/sys/init", &["get", "post"], "Initialization status; initialize the vault"),
    ("/sys/seal-status", &["get"], "Seal status and unseal progress"),
    ("/sys/unseal", &["post"], "Submit an unseal key share"),
    ("/sys/seal", &["post", "put"], "Seal this node (sudo)"),
    ("/sys/leader", &["get"], "Current leader"),
    ("/sys/step-down", &["post", "put"], "Hand leadership to another voter (sudo)"),
    ("/sys/rotate", &["post", "put"], "Add a keyring term (sudo)"),
    ("/sys/key-status", &["get"], "Current keyring term"),
    ("/sys/metrics", &["get"], "Metrics (format=prometheus or json)"),
    ("/sys/openapi", &["get"], "This document"),
    ("/sys/mounts", &["get"], "List secrets engines"),
    ("/sys/mounts/{path}", &["get", "post", "delete"], "Read, enable (kv v2) or disable a secrets engine"),
    ("/sys/auth", &["get"], "List auth methods"),
    ("/sys/policies/acl", &["get"], "List ACL policies (LIST or ?list=true)"),
    ("/sys/policies/acl/{name}", &["get", "post", "put", "delete"], "Read, write or delete an ACL policy"),
    ("/sys/policy", &["get"], "List policies (legacy)"),
    ("/sys/policy/{name}", &["get", "post", "put", "delete"], "Policy (legacy path)"),
    ("/sys/storage/raft/configuration", &["get"], "Raft servers and suffrage"),
    ("/sys/storage/raft/snapshot", &["get", "post"], "Save a snapshot (binary file), or restore one (sudo)"),
    ("/sys/storage/raft/snapshot-force", &["post"], "Restore a snapshot taken from another cluster (sudo)"),
    ("/sys/storage/raft/join", &["post"], "Ask a cluster member to add this (new) node"),
    ("/sys/storage/raft/join-token", &["post"], "Issue a one-time join token, optionally for one node_id (sudo)"),
    ("/sys/storage/raft/bootstrap", &["post"], "Exchange a join token for a node certificate"),
    ("/sys/storage/raft/remove-peer", &["post"], "Remove a node from the cluster (sudo)"),
    ("/sys/storage/raft/autopilot/state", &["get"], "Autopilot view: health, failure tolerance, servers"),
    ("/sys/ha/status", &["get"], "Cluster and per-node HA status (Citadel)"),
    ("/sys/ha/transfer-leader", &["post"], "Hand leadership to a voter (Citadel, sudo)"),
    ("/sys/audit/events", &["get"], "Replicated audit events (node, user, path, since, limit) (sudo)"),
    ("/sys/audit/verify", &["get"], "Verify every node's audit hash chain (sudo)"),
    ("/sys/events", &["get"], "This node's event stream, newline-delimited JSON (Citadel, sudo)"),
    ("/sys/jobs", &["get"], "The latest leader-job runs: job, term, node, log index (Citadel)"),
    ("/auth/userpass/login/{username}", &["post"], "Log in with username and password"),
    ("/auth/userpass/users", &["get"], "List users (LIST or ?list=true)"),
    ("/auth/userpass/users/{username}", &["get", "post", "put", "delete"], "Read, write or delete a user"),
    ("/auth/userpass/users/{username}/password", &["post", "put"], "Change a user's password"),
    ("/auth/token/create", &["post"], "Create a child token"),
    ("/auth/token/create-orphan", &["post"], "Create an orphan token"),
    ("/auth/token/lookup-self", &["get"], "Look up the calling token"),
    ("/auth/token/lookup", &["post"], "Look up a token"),
    ("/auth/token/renew-self", &["post"], "Renew the calling token"),
    ("/auth/token/renew", &["post"], "Renew a token"),
    ("/auth/token/revoke-self", &["post"], "Revoke the calling token and its children"),
    ("/auth/token/revoke", &["post"], "Revoke a token and its children"),
    (
        "/{mount}/data/{path}",
        &["get", "post", "put", "patch", "delete"],
        "KV v2: read, write (options.cas), patch, soft-delete latest",
    ),
    ("/{mount}/delete/{path}", &["post", "put"], "KV v2: soft-delete versions"),
    ("/{mount}/undelete/{path}", &["post", "put"], "KV v2: undelete versions"),
    ("/{mount}/destroy/{path}", &["post", "put"], "KV v2: destroy versions"),
    ("/{mount}/metadata/{path}", &["get", "post", "put", "delete"], "KV v2: metadata read, list, update, delete all"),
    ("/{mount}/config", &["get", "post", "put"], "KV v2: mount configuration (max_versions, cas_required)"),
];

pub fn document() -> Value {
    let mut paths = Map::new();
    for (path, methods, summary) in ROUTES {
        let mut ops = Map::new();
        for method in *methods {
            ops.insert(
                method.to_string(),
                json!({
                    "summary": summary,
                    "responses": {
                        "200": { "description": "OK" },
                        "204": { "description": "No content" },
                        "400": { "description": "Invalid request", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Errors" } } } },
                        "403": { "description": "Permission denied" },
                        "404": { "description": "Not found" },
                        "503": { "description": "Sealed, or no leader" },
                    }
                }),
            );
        }
        paths.insert(path.to_string(), Value::Object(ops));
    }
    json!({
        "openapi": "3.0.2",
        "info": { "title": "Citadel", "description": "HashiCorp Vault-compatible HTTP API of Citadel", "version": super::sys::VERSION },
        "servers": [{ "url": "/v1" }],
        "components": {
            "securitySchemes": { "token": { "type": "apiKey", "in": "header", "name": "X-Vault-Token" } },
            "schemas": { "Errors": { "type": "object", "properties": { "errors": { "type": "array", "items": { "type": "string" } } } } }
        },
        "security": [{ "token": [] }],
        "paths": paths,
    })
}
