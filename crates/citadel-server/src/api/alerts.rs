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
    Param::body("type", Kind::String, "webhook (Alertmanager's receiver payload) or alertmanager (its API)").required(),
    Param::body("url", Kind::String, "Where to POST: the receiver's URL, or the Alertmanager's base URL").required(),
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
        let view = |list: Vec<(&String, &Alert)>| list.into_iter().map(|(k, a)| alert_json(k, a, &sinks)).collect();
        (view(active), view(resolved), sinks)
    });
    let sink_errors: serde_json::Map<String, Value> =
        sinks.iter().map(|s| (s.clone(), json!(c.app.alert_delivery.last_error(s)))).collect();
    let active: Vec<Value> = active;
    let resolved: Vec<Value> = resolved;
    Ok(Reply::data(json!({ "active": active, "resolved": resolved, "sink_errors": sink_errors })))
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
    let body: Value = c.req.json()?;
    let fields = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    if let Some(unknown) = fields.keys().find(|k| !["type", "url"].contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!("unknown field {unknown:?} (accepted: type, url)")));
    }
    let url = || {
        body.get("url")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| ApiError::bad_request("missing required field \"url\""))
    };
    let sink = match body.get("type").and_then(Value::as_str) {
        Some("webhook") => Sink::Webhook { url: url()? },
        Some("alertmanager") => Sink::Alertmanager { url: url()? },
        Some(other @ ("syslog" | "email")) => {
            return Err(ApiError::bad_request(format!(
                "sink type {other:?} is not supported yet (webhook, alertmanager)"
            )))
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!("unknown sink type {other:?} (webhook, alertmanager)")))
        }
        None => return Err(ApiError::bad_request("missing required field \"type\" (webhook or alertmanager)")),
    };
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
