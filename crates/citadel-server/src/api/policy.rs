//! `sys/policies/acl` and the legacy `sys/policy` endpoints.

use citadel_core::command::{Command, Response};
use citadel_core::policy::{self, Policy};
use citadel_core::route::{Kind, Param, Route};
use citadel_core::state::State;
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{ApiError, Reply};
use crate::node::Node;

const POLICY_PARAMS: &[Param] = &[
    Param::body("policy", Kind::String, "The policy text (HCL or JSON)").required(),
    Param::body("rules", Kind::String, "The policy text (legacy name)"),
];

fn policy_exists(s: &State, name: &str) -> bool {
    name == policy::ROOT || s.policies.contains_key(name)
}

pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route("sys/policies/acl", vec![op::list("List ACL policies", handler!(list))]),
        Route {
            pattern: "sys/policies/acl/:name",
            operations: vec![
                op::read("Read an ACL policy", handler!(read)),
                op::write("Create or update an ACL policy", handler!(write)).with_params(POLICY_PARAMS),
                op::delete("Delete an ACL policy", handler!(delete)),
            ],
            exists: Some(|s, _, c| policy_exists(s, c.get("name"))),
        },
        route(
            "sys/policy",
            vec![
                op::read("List policies (legacy)", handler!(list_legacy)),
                op::list("List policies (legacy)", handler!(list_legacy)),
            ],
        ),
        Route {
            pattern: "sys/policy/:name",
            operations: vec![
                op::read("Read a policy (legacy)", handler!(read_legacy)),
                op::write("Create or update a policy (legacy)", handler!(write)).with_params(POLICY_PARAMS),
                op::delete("Delete a policy (legacy)", handler!(delete)),
            ],
            exists: Some(|s, _, c| policy_exists(s, c.get("name"))),
        },
    ]
}

fn names(app: &Node) -> Vec<String> {
    let mut names: Vec<String> = app.state.read(|s| s.policies.keys().cloned().collect());
    names.push(policy::ROOT.into());
    names.sort();
    names
}

/// The policy names, under `data` and (for the legacy path) at the top level too.
fn listing(app: &Node, legacy: bool) -> Reply {
    let keys = names(app);
    let mut body = super::envelope(json!({ "keys": keys, "policies": keys }), Value::Null);
    if legacy {
        body["policies"] = json!(keys);
        body["keys"] = json!(keys);
    }
    Reply::json(axum::http::StatusCode::OK, body)
}

async fn list(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(listing(c.app, false))
}

async fn list_legacy(c: &Call<'_>) -> Result<Reply, ApiError> {
    Ok(listing(c.app, true))
}

/// The policy's text and Vault's body for it.
fn policy_body(c: &Call<'_>, legacy: bool) -> Result<Reply, ApiError> {
    let name = c.param("name");
    let raw = if name == policy::ROOT {
        Some(String::new())
    } else {
        c.app.state.read(|s| s.policies.get(name).map(|p| p.raw.clone()))
    };
    let raw = raw.ok_or_else(ApiError::not_found)?;
    let data = json!({ "name": name, "policy": raw, "rules": raw });
    let mut body = super::envelope(data.clone(), Value::Null);
    if let (true, Some(top), Some(data)) = (legacy, body.as_object_mut(), data.as_object()) {
        top.extend(data.clone());
    }
    Ok(Reply::json(axum::http::StatusCode::OK, body))
}

async fn read(c: &Call<'_>) -> Result<Reply, ApiError> {
    policy_body(c, false)
}

async fn read_legacy(c: &Call<'_>) -> Result<Reply, ApiError> {
    policy_body(c, true)
}

async fn write(c: &Call<'_>) -> Result<Reply, ApiError> {
    let name = c.param("name");
    let body: Value = c.req.json()?;
    let text = body
        .get("policy")
        .or_else(|| body.get("rules"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("missing required field \"policy\" (the policy text)"))?;
    if name == policy::ROOT {
        return Err(ApiError::bad_request("cannot update the root policy"));
    }
    let parsed: Policy = policy::parse(name, text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match c.app.propose(Command::PolicyPut { policy: parsed }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn delete(c: &Call<'_>) -> Result<Reply, ApiError> {
    let name = c.param("name");
    if name == policy::ROOT || name == policy::DEFAULT {
        return Err(ApiError::bad_request(format!("cannot delete the built-in {name} policy")));
    }
    match c.app.propose(Command::PolicyDelete { name: name.to_string() }).await? {
        // Deleting what is not there succeeds, as in Vault.
        Response::Rejected(citadel_core::command::Rejection::PolicyNotFound(_)) => Ok(Reply::empty()),
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
