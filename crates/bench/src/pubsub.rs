//! The `pubsub` scenario: one subscriber, one publisher, one topic.
//!
//! The subscriber connects and subscribes first (waiting for SUBACK), then the publisher sends
//! `count` messages as fast as the broker takes them; at QoS 1 and 2 it keeps at most
//! `inflight` messages unacknowledged. The first 8 bytes of each payload are the send time in
//! nanoseconds since a common start, so the subscriber measures end-to-end latency.

use crate::client::{Client, ConnectOptions, Step, WRITE_BATCH};
use crate::transport::{Target, Transport};
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use ferry_codec::{ByteStr, Packet, Protocol, PubAck, Publish, QoS, SubOptions, Subscribe};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// The bytes of the payload that carry the send timestamp.
const STAMP: usize = 8;

#[derive(Clone, Debug)]
pub struct PubSubOptions {
    pub host: String,
    pub port: u16,
    /// Messages to publish.
    pub count: u64,
    /// Payload size in bytes, at least 8 (the timestamp).
    pub size: usize,
    /// QoS of the publishes and of the subscription.
    pub qos: QoS,
    pub protocol: Protocol,
    /// Unacknowledged QoS 1/2 publishes the publisher allows itself.
    pub inflight: u16,
    /// Either side gives up after this long without progress.
    pub timeout: Duration,
    /// Topic to use; a unique one by default.
    pub topic: Option<String>,
    /// The subscriber keeps a persistent session (so a durable broker stores every message).
    pub persistent: bool,
}

impl Default for PubSubOptions {
    fn default() -> Self {
        PubSubOptions {
            host: "127.0.0.1".into(),
            port: 1883,
            count: 100_000,
            size: 64,
            qos: QoS::AtMostOnce,
            protocol: Protocol::V3_1_1,
            inflight: 64,
            timeout: Duration::from_secs(5),
            topic: None,
            persistent: false,
        }
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// Protocol level: 3, 4 (3.1.1) or 5.
    pub protocol: u8,
    pub qos: u8,
    pub size: usize,
    pub count: u64,
    /// Messages the publisher wrote to the connection.
    pub sent: u64,
    /// Publishes the subscriber received.
    pub received: u64,
    /// `sent - received` (0 if the broker delivered duplicates).
    pub lost: u64,
    /// From the first send to the last receipt, in seconds.
    pub duration_secs: f64,
    /// Received messages per second over `duration_secs`.
    pub throughput: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    /// The publisher's QoS 1/2 messages still unacknowledged at the end.
    pub unacked: u64,
    /// Whether a side stopped for lack of progress rather than by finishing.
    pub timed_out: bool,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: MQTT level {}, QoS {}, {} x {} bytes",
            self.scenario, self.protocol, self.qos, self.count, self.size
        )?;
        writeln!(
            f,
            "  sent {}, received {}, lost {}{}{}",
            self.sent,
            self.received,
            self.lost,
            if self.unacked > 0 {
                format!(", unacked {}", self.unacked)
            } else {
                String::new()
            },
            if self.timed_out { " (timed out)" } else { "" },
        )?;
        writeln!(
            f,
            "  {:.0} msgs/s over {:.3} s",
            self.throughput, self.duration_secs
        )?;
        write!(
            f,
            "  latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            self.latency_p50_us, self.latency_p99_us, self.latency_max_us
        )
    }
}

/// Runs the scenario once.
pub async fn run_pubsub(opts: &PubSubOptions) -> Result<Report> {
    ensure!(
        opts.size >= STAMP,
        "payload size must be at least {STAMP} bytes"
    );
    ensure!(opts.count > 0, "count must be at least 1");
    ensure!(opts.inflight > 0, "inflight must be at least 1");
    let id = unique_id();
    let topic = opts
        .topic
        .clone()
        .unwrap_or_else(|| format!("ferry-bench/{id}"));

    let sub_expiry = opts.persistent.then_some(600);
    let target = Target::new(
        &opts.host,
        opts.port,
        Transport::Tcp,
        "/",
        &Default::default(),
    )?;
    let connect = |client_id: String, session_expiry| {
        let options = ConnectOptions {
            protocol: opts.protocol,
            client_id,
            username: None,
            password: None,
            keep_alive: 0,
            session_expiry,
            bind: None,
        };
        let target = &target;
        async move { Client::connect(target, &options, opts.timeout).await }
    };
    let mut sub = connect(format!("fbs-{id}"), sub_expiry)
        .await
        .context("subscriber")?;
    subscribe(&mut sub, &topic, opts.qos)
        .await
        .context("subscriber")?;
    let publ = connect(format!("fbp-{id}"), None)
        .await
        .context("publisher")?;

    let start = Instant::now();
    let (p, s) = tokio::join!(
        publish(publ, opts, topic.into(), start),
        receive(sub, opts, start)
    );
    let p = p.context("publisher")?;
    let s = s.context("subscriber")?;

    let duration_ns = match (p.first_send_ns, s.last_receive_ns) {
        (Some(first), Some(last)) => last.saturating_sub(first),
        _ => 0,
    };
    let duration_secs = duration_ns as f64 / 1e9;
    let us = |ns: u64| ns as f64 / 1e3;
    let empty = s.latency.is_empty();
    Ok(Report {
        scenario: "pubsub",
        protocol: opts.protocol.level(),
        qos: opts.qos as u8,
        size: opts.size,
        count: opts.count,
        sent: p.sent,
        received: s.received,
        lost: p.sent.saturating_sub(s.received),
        duration_secs,
        throughput: if duration_ns > 0 {
            s.received as f64 / duration_secs
        } else {
            0.0
        },
        latency_p50_us: if empty {
            0.0
        } else {
            us(s.latency.value_at_quantile(0.5))
        },
        latency_p99_us: if empty {
            0.0
        } else {
            us(s.latency.value_at_quantile(0.99))
        },
        latency_max_us: if empty { 0.0 } else { us(s.latency.max()) },
        unacked: p.unacked,
        timed_out: p.timed_out || s.timed_out,
    })
}

async fn subscribe(sub: &mut Client, topic: &str, qos: QoS) -> Result<()> {
    sub.push(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            topic.into(),
            SubOptions {
                qos,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }))?;
    sub.flush().await?;
    loop {
        match sub.recv().await? {
            Packet::SubAck(ack) if ack.packet_id == 1 => {
                return match ack.codes.first() {
                    Some(code) if !code.is_error() => Ok(()),
                    Some(code) => bail!("subscription refused: {code}"),
                    None => bail!("empty SUBACK"),
                };
            }
            Packet::Disconnect(d) => bail!("disconnected while subscribing: {}", d.code),
            _ => {}
        }
    }
}

struct Published {
    sent: u64,
    unacked: u64,
    first_send_ns: Option<u64>,
    timed_out: bool,
}

/// Publishes `count` messages, keeping the write buffer topped up to [`WRITE_BATCH`] bytes and,
/// at QoS 1/2, at most `inflight` messages unacknowledged.
async fn publish(
    mut client: Client,
    opts: &PubSubOptions,
    topic: ByteStr,
    start: Instant,
) -> Result<Published> {
    let acked = opts.qos != QoS::AtMostOnce;
    let window = if acked {
        u64::from(opts.inflight)
    } else {
        u64::MAX
    };
    // Every message is this packet with its own packet id; the timestamp is written into the
    // encoded bytes afterwards, so no payload is built per message.
    let mut packet = Packet::Publish(Publish {
        qos: opts.qos,
        topic,
        payload: Bytes::from(vec![0u8; opts.size]),
        ..Default::default()
    });
    let mut ids = PacketIds::new();
    let mut sent = 0u64;
    let mut first_send_ns = None;
    let mut last_progress = Instant::now();
    let mut timed_out = false;
    loop {
        while sent < opts.count && ids.in_use < window && client.wbuf.len() < WRITE_BATCH {
            if let (true, Packet::Publish(p)) = (acked, &mut packet) {
                p.packet_id = ids.take();
            }
            client.push(&packet)?;
            let now = ns_since(start);
            let at = client.wbuf.len() - opts.size;
            client.wbuf[at..at + STAMP].copy_from_slice(&now.to_be_bytes());
            first_send_ns.get_or_insert(now);
            sent += 1;
        }
        if sent == opts.count && ids.in_use == 0 && client.wbuf.is_empty() {
            break;
        }
        match client.step(Some(last_progress + opts.timeout)).await? {
            Step::Idle => {
                timed_out = true;
                break;
            }
            Step::Wrote => last_progress = Instant::now(),
            Step::Read => {
                while let Some(packet) = client.try_decode()? {
                    match packet {
                        Packet::PubAck(ack) | Packet::PubComp(ack) => {
                            // A stray or repeated acknowledgement is no progress.
                            let freed = ids.release(ack.packet_id);
                            if freed {
                                last_progress = Instant::now();
                            }
                        }
                        // An error code ends the QoS 2 flow at PUBREC.
                        Packet::PubRec(ack) if ack.code.is_error() => {
                            ids.release(ack.packet_id);
                        }
                        Packet::PubRec(ack) => {
                            client.push(&Packet::PubRel(PubAck::new(ack.packet_id)))?;
                            last_progress = Instant::now();
                        }
                        Packet::Disconnect(d) => bail!("disconnected by the broker: {}", d.code),
                        _ => {}
                    }
                }
            }
        }
    }
    if timed_out {
        // What is still buffered never reached the broker. At QoS 0 the buffer holds only
        // publishes, all of one size; at QoS 1/2 the odd PUBREL makes this an estimate.
        let publish_len = packet.encoded_len(opts.protocol);
        sent -= (client.wbuf.len().div_ceil(publish_len) as u64).min(sent);
    } else {
        client.disconnect().await;
    }
    Ok(Published {
        sent,
        unacked: ids.in_use,
        first_send_ns,
        timed_out,
    })
}

struct Received {
    received: u64,
    last_receive_ns: Option<u64>,
    /// End-to-end latency in nanoseconds.
    latency: Histogram<u64>,
    timed_out: bool,
}

/// Receives (and acknowledges) publishes until `count` arrived or nothing came for `timeout`.
async fn receive(mut client: Client, opts: &PubSubOptions, start: Instant) -> Result<Received> {
    // 1 ns to 10 minutes, 3 significant digits.
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
    let mut received = 0u64;
    let mut last_receive_ns = None;
    let mut last_progress = Instant::now();
    let mut timed_out = false;
    while received < opts.count {
        let step = client
            .step(Some(last_progress + opts.timeout))
            .await
            .with_context(|| format!("after {received} messages"))?;
        match step {
            Step::Idle => {
                timed_out = true;
                break;
            }
            Step::Wrote => {}
            Step::Read => {
                // One clock read per read syscall: the messages in it arrived together.
                let now = ns_since(start);
                let before = received;
                while let Some(packet) = client.try_decode()? {
                    match packet {
                        Packet::Publish(p) => {
                            received += 1;
                            if let Some(stamp) = p.payload.get(..STAMP) {
                                let sent_at = u64::from_be_bytes(stamp.try_into()?);
                                latency.saturating_record(now.saturating_sub(sent_at).max(1));
                            }
                            client.acknowledge(p.qos, p.packet_id)?;
                        }
                        Packet::PubRel(rel) => {
                            client.push(&Packet::PubComp(PubAck::new(rel.packet_id)))?
                        }
                        Packet::Disconnect(d) => {
                            bail!(
                                "disconnected by the broker after {received} messages: {}",
                                d.code
                            )
                        }
                        _ => {}
                    }
                }
                if received > before {
                    last_receive_ns = Some(now);
                    last_progress = Instant::now();
                }
            }
        }
    }
    client.disconnect().await;
    Ok(Received {
        received,
        last_receive_ns,
        latency,
        timed_out,
    })
}

/// Packet identifiers for the publisher's unacknowledged messages.
struct PacketIds {
    used: Vec<bool>,
    next: u16,
    in_use: u64,
}

impl PacketIds {
    fn new() -> Self {
        PacketIds {
            used: vec![false; 65_536],
            next: 0,
            in_use: 0,
        }
    }

    /// A free identifier (the window is far below 65,535, so one is always found).
    fn take(&mut self) -> u16 {
        loop {
            self.next = self.next.wrapping_add(1);
            let slot = &mut self.used[usize::from(self.next)];
            if self.next != 0 && !*slot {
                *slot = true;
                self.in_use += 1;
                return self.next;
            }
        }
    }

    /// Frees `id`; false if it was not in use (a stray or repeated acknowledgement).
    fn release(&mut self, id: u16) -> bool {
        let slot = &mut self.used[usize::from(id)];
        let was = std::mem::replace(slot, false);
        self.in_use -= u64::from(was);
        was
    }
}

fn ns_since(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// An identifier unique enough for client ids and topics: process id and wall-clock time.
fn unique_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64 ^ (d.as_secs() << 30));
    format!("{:x}", (u64::from(std::process::id()) << 40) ^ nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_zero_and_ids_in_use() {
        let mut ids = PacketIds::new();
        ids.next = u16::MAX - 1;
        assert_eq!(ids.take(), u16::MAX);
        assert_eq!(ids.take(), 1);
        ids.next = u16::MAX - 1;
        assert_eq!(ids.take(), 2);
        assert_eq!(ids.in_use, 3);
        assert!(ids.release(1));
        assert!(!ids.release(1));
        assert_eq!(ids.in_use, 2);
    }
}
