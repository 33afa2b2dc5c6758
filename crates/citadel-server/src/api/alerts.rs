//! `sys/alerts` (§11.2): the alerts that fire and those resolved recently, with what each sink
//! was told; and `sys/alerts/sinks/:name`, where they go. The outbox is replicated state
//! (`citadel_core::alerts`); the leader's jobs fill and drain it (`crate::alerts`).

use citadel_core::alerts::{Alert, Sink};
use citadel_core::command::{Command, Response};
use citadel_core::route::{Kind, Op, Param, Route};
use citadel_core::time::rfc3339;
use serde_json::{json, Value};

use super::routes::{self, handler, route, Call, Handler};
use super::{ApiError, Reply};

pub fn routes() -> Vec<Route<Handler>> {
    use routes::op;
    vec![
        route(
            "sys/alerts",
            vec![op::read("Alerts firing and recently resolved, with their deliveries", handler!(list))],
        ),
        route("sys/alerts/sinks", vec![op::sudo(Op::List, "Names of the alert sinks", handler!(sinks))]),
        route(
            "sys/alerts/sinks/:name",
            vec![
                op::sudo(Op::Read, "An alert sink", handler!(read_sink)),
                op::sudo(Op::Write, "Create or replace an alert sink", handler!(write_sink)).with_params(SINK_PARAMS),
                op::sudo(Op::Delete, "Delete an alert sink", handler!(delete_sink)),
            ],
        ),
    ]
}

const SINK_PARAMS: &[Param] = &[
    Param::body("type", Kind::String, "webhook, alertmanager, syslog or email").required(),
    Param::body("url", Kind::String, "webhook: the receiver's URL; alertmanager: its base URL"),
    Param::body("address", Kind::String, "syslog: host:port (TCP)"),
    Param::body("tls", Kind::Boolean, "syslog: over TLS"),
    Param::body("smtp_host", Kind::String, "email: the SMTP server"),
    Param::body("smtp_port", Kind::Integer, "email: its port"),
    Param::body("from", Kind::String, "email: the sender's address"),
    Param::body("to", Kind::String, "email: the recipients' addresses (a string or a list)"),
    Param::body("starttls", Kind::Boolean, "email: STARTTLS (default true)"),
    Param::body(
        "ca_file",
        Kind::String,
        "The CA (PEM, absolute path on every node) that signed the receiver's TLS certificate",
    ),
];

fn alert_json(fingerprint: &str, alert: &Alert, sinks: &[String]) -> Value {
    let deliveries: serde_json::Map<String, Value> =
        sinks.iter().map(|s| (s.clone(), json!(if alert.pending_for(s) { "pending" } else { "delivered" }))).collect();
    json!({
        "fingerprint": fingerprint,
        "status": if alert.is_firing() { "firing" } else { "resolved" },
        "labels": alert.labels,
        "annotations": alert.annotations,
        "startsAt": rfc3339(alert.starts_at),
        "endsAt": alert.ends_at.map(rfc3339),
        "deliveries": deliveries,
    })
}

async fn list(c: &Call<'_>) -> Result<Reply, ApiError> {
    let (active, resolved, sinks) = c.app.state.read(|s| {
        let sinks: Vec<String> = s.alerts.sinks.keys().cloned().collect();
        let mut alerts: Vec<(&String, &Alert)> = s.alerts.alerts.iter().collect();
        alerts.sort_by_key(|(_, a)| std::cmp::Reverse(a.ends_at.unwrap_or(a.starts_at)));
        let (active, resolved): (Vec<_>, Vec<_>) = alerts.into_iter().partition(|(_, a)| a.is_firing());
        let view = |list: Vec<(&String, &Alert)>| -> Vec<Value> {
            list.into_iter().map(|(k, a)| alert_json(k, a, &sinks)).collect()
        };
        (view(active), view(resolved), sinks)
    });
    let sink_errors: serde_json::Map<String, Value> =
        sinks.iter().map(|s| (s.clone(), json!(c.app.alert_delivery.last_error(s)))).collect();
    // What this node raised and sends itself because it has (or had) no leader.
    let local: Vec<Value> = c.app.leaderless_alerts.snapshot().iter().map(|(k, a)| alert_json(k, a, &sinks)).collect();
    Ok(Reply::data(json!({ "active": active, "resolved": resolved, "local": local, "sink_errors": sink_errors })))
}

async fn sinks(c: &Call<'_>) -> Result<Reply, ApiError> {
    let keys: Vec<String> = c.app.state.read(|s| s.alerts.sinks.keys().cloned().collect());
    Ok(Reply::data(json!({ "keys": keys })))
}

async fn read_sink(c: &Call<'_>) -> Result<Reply, ApiError> {
    let name = c.param("name");
    let sink = c.app.state.read(|s| s.alerts.sinks.get(name).cloned());
    let sink =
        sink.ok_or_else(|| ApiError::new(axum::http::StatusCode::NOT_FOUND, format!("no alert sink named {name:?}")))?;
    Ok(Reply::data(serde_json::to_value(&sink).unwrap_or(Value::Null)))
}

async fn write_sink(c: &Call<'_>) -> Result<Reply, ApiError> {
    let mut body: Value = c.req.json()?;
    let fields = body.as_object_mut().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let types = citadel_core::alerts::SINK_FIELDS.map(|(t, _)| t).join(", ");
    let kind = fields.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let (_, accepted) = citadel_core::alerts::SINK_FIELDS
        .iter()
        .find(|(t, _)| *t == kind)
        .ok_or_else(|| ApiError::bad_request(format!("type must be one of {types}")))?;
    if let Some(unknown) = fields.keys().find(|k| !accepted.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown field {unknown:?} for a {kind} sink ({})",
            accepted.join(", ")
        )));
    }
    // One recipient may be given as a string.
    if let Some(Value::String(one)) = fields.get("to").cloned() {
        fields.insert("to".into(), json!([one]));
    }
    let sink: Sink = serde_json::from_value(body).map_err(|e| ApiError::bad_request(format!("{kind} sink: {e}")))?;
    // The checks `apply` makes, answered before anything is proposed.
    sink.check().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let name = c.param("name").to_string();
    match c.app.propose(Command::AlertSinkPut { name, sink }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}

async fn delete_sink(c: &Call<'_>) -> Result<Reply, ApiError> {
    let name = c.param("name").to_string();
    match c.app.propose(Command::AlertSinkDelete { name }).await? {
        Response::Rejected(r) => Err(r.into()),
        _ => Ok(Reply::empty()),
    }
}
