//! `sys/auth/:path`: enabling and disabling auth methods, as Vault's clients call it.
//!
//! Citadel has exactly two auth methods, `token/` and `userpass/`, both always enabled (§9.1).
//! Enabling `userpass` at `userpass/` therefore succeeds with nothing to do, so scripts written
//! for a fresh Vault server (which enable it first) run unchanged; anything else is a 400 that
//! says what exists. Vault answers 400 "path is already in use" to the first case; answering
//! success is the deliberate difference (docs/ARCHITECTURE.md, deviations).

use serde_json::Value;

use super::{ApiError, ApiRequest, Op, Reply};
use crate::app::App;
use crate::auth::Caller;

const WHAT_EXISTS: &str = "Citadel has two auth methods, token/ and userpass/, always enabled";

/// `rest` is the path after `sys/`: `auth/<path>`.
pub fn route(app: &App, req: &ApiRequest, op: Op, caller: &Caller, rest: &str) -> Result<Reply, ApiError> {
    // Enabling and disabling auth methods takes sudo, as in Vault.
    super::sys::need_sudo(app, caller, req, op)?;
    let path = rest.strip_prefix("auth/").unwrap_or(rest).trim_matches('/');
    match op {
        Op::Write => {
            let body: Value = req.json()?;
            let kind = body.get("type").and_then(Value::as_str).unwrap_or_default();
            match (path, kind) {
                ("userpass", "userpass") => Ok(Reply::empty()),
                (_, "") => Err(ApiError::bad_request("missing required field \"type\" (the auth method's type)")),
                (_, "userpass") => Err(ApiError::bad_request(format!(
                    "cannot enable userpass at {path:?}/: {WHAT_EXISTS}; use auth/userpass/"
                ))),
                _ => Err(ApiError::bad_request(format!("auth method type {kind:?} is not supported: {WHAT_EXISTS}"))),
            }
        }
        Op::Delete => Err(ApiError::bad_request(format!("cannot disable {path:?}/: {WHAT_EXISTS}"))),
        _ => Err(ApiError::method_not_allowed()),
    }
}
