//! The summary of a run: printed for people, or as JSON (`--json`) for scripts.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub transport: String,
    /// Protocol level: 3 (3.1), 4 (3.1.1) or 5.
    pub protocol: u8,
    pub qos: u8,
    /// Payload size in bytes (0 without publishers).
    pub size: usize,
    pub publishers: u64,
    pub subscribers: u64,
    /// Connections that only connected and kept alive.
    pub idle: u64,
    pub connections: ConnStats,
    pub messages: MsgStats,
    /// End-to-end latency, from the timestamp in the payload to its receipt.
    pub latency_us: Latency,
    /// Failures by kind ("connection refused", "auth refused", "closed by broker"…).
    pub errors: BTreeMap<String, u64>,
    /// The first detail seen of each kind.
    pub error_examples: BTreeMap<String, String>,
    /// Wall-clock time of the whole run.
    pub elapsed_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnStats {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    /// Connections lost after they were up (closed by the broker, reset, keep-alive timeout).
    pub dropped: u64,
    /// Connections still up when the run stopped.
    pub up_at_end: u64,
    pub subscribed: u64,
    /// From the first connect attempt to the last CONNACK of the ramp.
    pub ramp_secs: f64,
    /// Connections per second over the ramp.
    pub connect_rate: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MsgStats {
    /// Publishes written to the broker.
    pub sent: u64,
    /// QoS 1/2 publishes acknowledged (PUBACK / PUBCOMP).
    pub acked: u64,
    /// Publishes the subscribers received.
    pub received: u64,
    /// Copies the subscribers should have received (sent × copies per message), when known.
    pub expected: Option<u64>,
    pub lost: Option<u64>,
    pub duplicates: Option<u64>,
    /// Sent messages per second, first send to last send.
    pub send_rate: f64,
    /// Received messages per second, first send to last receipt.
    pub throughput: f64,
    pub duration_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Messages measured.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Report {
    /// Whether nothing went wrong: no failure of any kind (losses are reported, not errors).
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

fn us(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1} ms", x / 1e3)
    } else {
        format!("{x:.0} µs")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: MQTT level {} over {}",
            self.scenario, self.protocol, self.transport
        )?;
        if self.publishers > 0 || self.subscribers > 0 {
            write!(f, ", QoS {}", self.qos)?;
        }
        if self.publishers > 0 {
            write!(f, ", {}-byte payloads", self.size)?;
        }
        writeln!(f)?;
        let c = &self.connections;
        writeln!(
            f,
            "  connections: {} attempted, {} connected, {} failed, {} dropped, {} up at the end ({} publishers, {} subscribers, {} idle)",
            c.attempted, c.connected, c.failed, c.dropped, c.up_at_end, self.publishers, self.subscribers, self.idle
        )?;
        if c.ramp_secs > 0.0 {
            writeln!(
                f,
                "  ramp: {:.0} connections/s over {:.3} s",
                c.connect_rate, c.ramp_secs
            )?;
        }
        if self.publishers > 0 || self.subscribers > 0 {
            let m = &self.messages;
            write!(f, "  messages: sent {}", m.sent)?;
            if self.qos > 0 && self.publishers > 0 {
                write!(f, ", acked {}", m.acked)?;
            }
            write!(f, ", received {}", m.received)?;
            if let (Some(expected), Some(lost)) = (m.expected, m.lost) {
                write!(f, " of {expected} expected, lost {lost}")?;
                if expected > 0 {
                    write!(f, " ({:.2}%)", 100.0 * lost as f64 / expected as f64)?;
                }
                if let Some(d) = m.duplicates.filter(|&d| d > 0) {
                    write!(f, ", {d} extra")?;
                }
            }
            writeln!(f)?;
            writeln!(
                f,
                "  throughput: {:.0} msg/s received, {:.0} msg/s sent, over {:.3} s",
                m.throughput, m.send_rate, m.duration_secs
            )?;
            let l = &self.latency_us;
            if l.count > 0 {
                writeln!(
                    f,
                    "  latency: p50 {}, p90 {}, p99 {}, p999 {}, max {} ({} samples)",
                    us(l.p50),
                    us(l.p90),
                    us(l.p99),
                    us(l.p999),
                    us(l.max),
                    l.count
                )?;
            }
        }
        if self.errors.is_empty() {
            write!(f, "  errors: none")?;
        } else {
            write!(f, "  errors:")?;
            for (kind, n) in &self.errors {
                let example = self.error_examples.get(kind).map_or("", String::as_str);
                write!(f, "\n    {kind}: {n} (e.g. {example})")?;
            }
        }
        write!(f, "\n  elapsed {:.3} s", self.elapsed_secs)
    }
}
