//! `GET /metrics`: the broker's counters in the Prometheus text exposition format (0.0.4),
//! all instances together, behind the same admin-key authentication as the REST API (in a
//! Prometheus scrape config: `basic_auth` with the key's id and secret).

use crate::rest::{method_not_allowed, Admin};
use crate::AdminState;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use ferry_broker::Metrics;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The exposition format's media type.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) fn route() -> MethodRouter<AdminState> {
    get(metrics).fallback(method_not_allowed("GET, HEAD".into()))
}

async fn metrics(_: Admin, State(s): State<AdminState>) -> Response {
    let body = render(s.control.metrics(), s.control.uptime());
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], body).into_response()
}

/// A metric family: name, type, help, and its samples (label set, value).
type Family<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, f64)>);

/// The text of every family, each with its `# HELP` and `# TYPE` lines.
pub fn render(m: &Metrics, uptime: Duration) -> String {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    let families: [Family; 11] = [
        (
            "ferry_build_info",
            "gauge",
            "Always 1; the version is in the label.",
            vec![(concat!("version=\"", env!("CARGO_PKG_VERSION"), "\""), 1.0)],
        ),
        (
            "ferry_uptime_seconds",
            "gauge",
            "Seconds since the broker started.",
            vec![("", uptime.as_secs_f64())],
        ),
        (
            "ferry_connections",
            "gauge",
            "MQTT network connections open now, including ones still in the handshake.",
            vec![("", n(&m.connections))],
        ),
        (
            "ferry_sessions",
            "gauge",
            "MQTT sessions held now, online and offline.",
            vec![("", n(&m.sessions))],
        ),
        (
            "ferry_retained_messages",
            "gauge",
            "Retained messages held now.",
            vec![("", n(&m.retained))],
        ),
        (
            "ferry_offline_messages",
            "gauge",
            "Messages queued on disk for offline sessions now.",
            vec![("", n(&m.offline_messages))],
        ),
        (
            "ferry_messages_received_total",
            "counter",
            "PUBLISH packets accepted from clients.",
            vec![("", n(&m.messages_received))],
        ),
        (
            "ferry_messages_sent_total",
            "counter",
            "PUBLISH packets handed to client connections (deliveries; a fan-out to 1,000 \
             subscribers counts 1,000).",
            vec![("", n(&m.messages_sent))],
        ),
        (
            "ferry_messages_dropped_total",
            "counter",
            "Deliveries dropped, by reason: qos0_outbox_full (a QoS 0 message to a connection \
             holding outbox_qos0_limit packets), queue_full (a session holding \
             max_queued_messages), too_large (over the client's maximum packet size), expired \
             (message expiry interval ran out while queued).",
            vec![
                ("reason=\"qos0_outbox_full\"", n(&m.dropped_qos0)),
                ("reason=\"queue_full\"", n(&m.dropped_queue_full)),
                ("reason=\"too_large\"", n(&m.dropped_too_large)),
                ("reason=\"expired\"", n(&m.dropped_expired)),
            ],
        ),
        (
            "ferry_offline_messages_evicted_total",
            "counter",
            "Offline messages deleted, oldest first, because an instance held its \
             max_offline_messages.",
            vec![("", n(&m.offline_evicted))],
        ),
        (
            "ferry_protocol_errors_total",
            "counter",
            "Malformed or forbidden packets that closed a connection.",
            vec![("", n(&m.protocol_errors))],
        ),
    ];
    let mut out = String::with_capacity(4096);
    for (name, kind, help, samples) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_type_and_well_formed_samples() {
        let m = Metrics::default();
        m.connections.store(3, Ordering::Relaxed);
        m.dropped_qos0.store(7, Ordering::Relaxed);
        let text = render(&m, Duration::from_millis(1500));
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(kind == "gauge" || kind == "counter", "{line}");
                assert!(
                    kind != "counter" || name.ends_with("_total"),
                    "a counter's name ends in _total: {line}"
                );
                declared.push(name.to_string());
            } else if !line.starts_with("# HELP ") {
                let (series, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().expect("numeric value");
                let name = series.split('{').next().unwrap();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                    "{line}"
                );
            }
        }
        assert!(text.contains("\nferry_connections 3\n"), "{text}");
        assert!(
            text.contains("\nferry_messages_dropped_total{reason=\"qos0_outbox_full\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("\nferry_uptime_seconds 1.5\n"), "{text}");
    }
}
