//! The OpenAPI 3 document served at `sys/openapi`, generated from the route table: a route
//! cannot be served without being documented, nor documented without being served.
//!
//! Engine routes are listed under each mount that exists, as Vault does (`/secret/data/{path}`).
//! A LIST is documented as Vault documents it: a GET with `list=true`.

use citadel_core::route::{In, Kind, Need, Op, Operation, Param, Route};
use serde_json::{json, Map, Value};

use super::routes::{tables, Handler};
use crate::node::Node;

pub fn document(app: &Node) -> Value {
    let mut paths = Map::new();
    if let Ok(tables) = tables() {
        for route in tables.core.routes() {
            insert(&mut paths, openapi_path("", route.pattern), route);
        }
        let auth_mounts = app.state.read(super::routes::auth_mounts);
        for (mount, kind) in auth_mounts {
            let Some((_, table)) = tables.auth_methods.iter().find(|(k, _)| *k == kind) else { continue };
            for route in table.routes() {
                insert(&mut paths, openapi_path(&format!("auth/{mount}"), route.pattern), route);
            }
        }
        let mounts: Vec<(String, String)> =
            app.state.read(|s| s.mounts.iter().map(|(path, m)| (path.clone(), m.kind.clone())).collect());
        for (mount, kind) in mounts {
            let Some((_, table)) = tables.engines.iter().find(|(k, _)| *k == kind) else { continue };
            for route in table.routes() {
                insert(&mut paths, openapi_path(&mount, route.pattern), route);
            }
        }
    }
    json!({
        "openapi": "3.0.2",
        "info": {
            "title": "Citadel",
            "description": "HashiCorp Vault-compatible HTTP API of Citadel",
            "version": crate::api::VERSION,
        },
        "servers": [{ "url": "/v1" }],
        "components": {
            "securitySchemes": { "token": { "type": "apiKey", "in": "header", "name": "X-Vault-Token" } },
            "schemas": {
                "Errors": {
                    "type": "object",
                    "properties": { "errors": { "type": "array", "items": { "type": "string" } } },
                },
                "Response": {
                    "type": "object",
                    "description": "Vault's envelope: data, auth, warnings",
                    "additionalProperties": true,
                },
            },
        },
        "security": [{ "token": [] }],
        "paths": paths,
    })
}

fn insert(paths: &mut Map<String, Value>, path: String, route: &Route<Handler>) {
    // Unique across mounts: the operation id names the full path.
    let id = path.trim_start_matches('/').replace('/', "_").replace(['{', '}'], "");
    paths.insert(path, path_item(route, &id));
}

/// `/secret/data/{path}` from the mount `secret/` and the pattern `data/*path`.
fn openapi_path(mount: &str, pattern: &str) -> String {
    let segments: Vec<String> = pattern
        .split('/')
        .map(|s| match s.strip_prefix(':').or_else(|| s.strip_prefix('*')) {
            Some(name) => format!("{{{name}}}"),
            None => s.to_string(),
        })
        .collect();
    format!("/{mount}{}", segments.join("/"))
}

fn path_parameters(pattern: &str) -> Vec<Value> {
    pattern
        .split('/')
        .filter_map(|s| s.strip_prefix(':').or_else(|| s.strip_prefix('*')))
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "schema": { "type": "string", "minLength": 1 },
            })
        })
        .collect()
}

fn path_item(route: &Route<Handler>, id: &str) -> Value {
    let mut item = Map::new();
    item.insert("parameters".into(), Value::Array(path_parameters(route.pattern)));
    let read = route.operation(Op::Read);
    let list = route.operation(Op::List);
    match (read, list) {
        (Some(read), list) => {
            item.insert("get".into(), operation(read, &format!("read_{id}"), list.is_some()));
        }
        (None, Some(list)) => {
            item.insert("get".into(), operation(list, &format!("list_{id}"), true));
        }
        (None, None) => {}
    }
    for (op, method) in [(Op::Write, "post"), (Op::Patch, "patch"), (Op::Delete, "delete")] {
        if let Some(o) = route.operation(op) {
            item.insert(method.into(), operation(o, &format!("{method}_{id}"), false));
        }
    }
    Value::Object(item)
}

fn operation(o: &Operation<Handler>, id: &str, with_list: bool) -> Value {
    let mut parameters: Vec<Value> = o.params.iter().filter(|p| p.location == In::Query).map(query_parameter).collect();
    if with_list {
        // A list-only path answers GET only with `list=true`; a path that also reads, with or without.
        let list_only = o.op == Op::List;
        parameters.push(json!({
            "name": "list",
            "in": "query",
            "required": list_only,
            "description": "Must be true: list the keys under this path",
            "schema": { "type": "string", "enum": ["true"] },
        }));
    }
    let mut op = Map::new();
    op.insert("operationId".into(), json!(id));
    op.insert("summary".into(), json!(o.summary));
    op.insert("parameters".into(), Value::Array(parameters));
    let body: Vec<&Param> = o.params.iter().filter(|p| p.location == In::Body).collect();
    if matches!(o.op, Op::Write | Op::Patch) {
        let media = if o.op == Op::Patch { "application/merge-patch+json" } else { "application/json" };
        op.insert(
            "requestBody".into(),
            json!({ "required": body.iter().any(|p| p.required), "content": { media: { "schema": body_schema(&body) } } }),
        );
    }
    op.insert("responses".into(), responses(o.op));
    if matches!(o.need, Need::Unauthenticated { .. }) {
        op.insert("security".into(), json!([]));
    }
    Value::Object(op)
}

fn responses(op: Op) -> Value {
    let error = |description: &str| json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Errors" } } } });
    let ok = json!({
        "description": "OK",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Response" } } },
    });
    let mut responses = Map::new();
    responses.insert("200".into(), ok);
    if matches!(op, Op::Write | Op::Patch | Op::Delete) {
        responses.insert("204".into(), json!({ "description": "Done, nothing to return" }));
    }
    responses.insert("400".into(), error("Invalid request"));
    responses.insert("403".into(), error("Permission denied"));
    responses.insert("404".into(), error("Not found"));
    responses.insert("405".into(), error("Method not allowed on this path"));
    responses.insert("503".into(), error("Sealed, or no leader"));
    Value::Object(responses)
}

fn schema(kind: Kind) -> Value {
    match kind {
        Kind::String => json!({ "type": "string" }),
        Kind::Integer => json!({ "type": "integer", "minimum": 0 }),
        Kind::Boolean => json!({ "type": "boolean" }),
        Kind::Object => json!({ "type": "object" }),
        Kind::StringList => {
            json!({ "oneOf": [{ "type": "array", "items": { "type": "string" } }, { "type": "string" }] })
        }
        Kind::Duration => json!({ "oneOf": [{ "type": "integer", "minimum": 0 }, { "type": "string" }] }),
        Kind::IntegerList => json!({ "type": "array", "items": { "type": "integer", "minimum": 0 } }),
    }
}

fn query_parameter(p: &Param) -> Value {
    let schema = match p.kind {
        // Query values are strings on the wire; documented as their type where OpenAPI can say so.
        Kind::Integer | Kind::Boolean | Kind::String => schema(p.kind),
        _ => json!({ "type": "string" }),
    };
    json!({ "name": p.name, "in": "query", "required": p.required, "description": p.description, "schema": schema })
}

fn body_schema(params: &[&Param]) -> Value {
    let properties: Map<String, Value> = params
        .iter()
        .map(|p| {
            let mut s = schema(p.kind);
            if let Some(obj) = s.as_object_mut() {
                obj.insert("description".into(), json!(p.description));
            }
            (p.name.to_string(), s)
        })
        .collect();
    let required: Vec<&str> = params.iter().filter(|p| p.required).map(|p| p.name).collect();
    let mut schema = json!({ "type": "object", "properties": properties });
    if !required.is_empty() {
        schema["required"] = json!(required);
    }
    schema
}
