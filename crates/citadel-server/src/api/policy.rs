//! `sys/policies/acl` and the legacy `sys/policy` endpoints.

use citadel_core::command::{Command, Response};
use citadel_core::policy::{self, Policy};
use serde_json::{json, Value};

use super::{authorize_op, ApiError, ApiRequest, Op, Reply, Target};
use crate::app::App;
use crate::auth::Caller;

fn names(app: &App) -> Vec<String> {
    let mut names: Vec<String> = app.state.read(|s| s.policies.keys().cloned().collect());
    names.push(policy::ROOT.into());
    names.sort();
    names
}

pub async fn route(app: &App, req: &ApiRequest, op: Op, caller: &Caller, rest: &str) -> Result<Reply, ApiError> {
    let legacy = rest == "policy" || rest.starts_with("policy/");
    let name = rest.strip_prefix("policies/acl").or_else(|| rest.strip_prefix("policy")).unwrap_or("");
    let name = name.trim_start_matches('/');
    let exists = name == policy::ROOT || app.state.read(|s| s.policies.contains_key(name));
    authorize_op(app, caller, req, op, Target::exists(exists))?;
    if name.is_empty() {
        return match (op, legacy) {
            (Op::List, _) | (Op::Read, true) => {
                let keys = names(app);
                let mut body = super::envelope(json!({ "keys": keys, "policies": keys }), Value::Null);
                if legacy {
                    body["policies"] = json!(keys);
                    body["keys"] = json!(keys);
                }
                Ok(Reply::json(axum::http::StatusCode::OK, body))
            }
            _ => Err(ApiError::method_not_allowed()),
        };
    }
    match op {
        Op::Read => {
            let raw = if name == policy::ROOT {
                Some(String::new())
            } else {
                app.state.read(|s| s.policies.get(name).map(|p| p.raw.clone()))
            };
            let raw = raw.ok_or_else(ApiError::not_found)?;
            let data = json!({ "name": name, "policy": raw, "rules": raw });
            let mut body = super::envelope(data.clone(), Value::Null);
            if legacy {
                body.as_object_mut().expect("envelope").extend(data.as_object().expect("object").clone());
            }
            Ok(Reply::json(axum::http::StatusCode::OK, body))
        }
        Op::Write => {
            let body: Value = req.json()?;
            let text = body
                .get("policy")
                .or_else(|| body.get("rules"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("missing required field \"policy\" (the policy text)"))?;
            if name == policy::ROOT {
                return Err(ApiError::bad_request("cannot update the root policy"));
            }
            let parsed: Policy = policy::parse(name, text).map_err(|e| ApiError::bad_request(e.to_string()))?;
            match app.propose(Command::PolicyPut { policy: parsed }).await? {
                Response::Rejected(r) => Err(r.into()),
                _ => Ok(Reply::empty()),
            }
        }
        Op::Delete => {
            if name == policy::ROOT || name == policy::DEFAULT {
                return Err(ApiError::bad_request(format!("cannot delete the built-in {name} policy")));
            }
            match app.propose(Command::PolicyDelete { name: name.to_string() }).await? {
                // Deleting what is not there succeeds, as in Vault.
                Response::Rejected(citadel_core::command::Rejection::PolicyNotFound(_)) => Ok(Reply::empty()),
                Response::Rejected(r) => Err(r.into()),
                _ => Ok(Reply::empty()),
            }
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}
