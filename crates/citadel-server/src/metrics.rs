//! A small Prometheus text exporter: counters kept in atomics, Raft figures read at scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; 5],
    proposals: AtomicU64,
    proposal_micros: AtomicU64,
    audit_events: AtomicU64,
}

impl Metrics {
    pub fn observe_request(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_proposal(&self, took: Duration) {
        self.proposals.fetch_add(1, Ordering::Relaxed);
        self.proposal_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn observe_audit_event(&self) {
        self.audit_events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, raft: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP citadel_http_requests_total HTTP API requests by status class.\n");
        out.push_str("# TYPE citadel_http_requests_total counter\n");
        for (i, counter) in self.requests.iter().enumerate() {
            let _ = writeln!(
                out,
                "citadel_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                counter.load(Ordering::Relaxed)
            );
        }
        let counters = [
            ("citadel_raft_proposals_total", "Commands proposed through Raft.", &self.proposals),
            (
                "citadel_raft_proposal_seconds_sum",
                "Total time spent waiting for proposals (µs precision).",
                &self.proposal_micros,
            ),
            ("citadel_audit_events_total", "Audit events written to the local spool.", &self.audit_events),
        ];
        for (name, help, value) in counters {
            let raw = value.load(Ordering::Relaxed);
            let shown = if name.ends_with("_seconds_sum") { format!("{}", raw as f64 / 1e6) } else { raw.to_string() };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {shown}");
        }
        for (name, help, value) in raft {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
