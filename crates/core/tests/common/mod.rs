//! Helpers shared by the integration tests of `ferry-core`: packet builders and output
//! filters. Every test drives the core with a virtual clock (`t0 + n seconds`).
#![allow(dead_code)]

use bytes::Bytes;
use ferry_codec::{
    ConnAck, Connect, Disconnect, Packet, Properties, Protocol, PubAck, Publish, QoS,
    RetainHandling, SubOptions, Subscribe, Will,
};
use ferry_core::{Acl, Broker, ConnId, Limits, Output};
use std::time::{Duration, Instant};

/// `t0 + secs` seconds.
pub fn at(t0: Instant, secs: u64) -> Instant {
    t0 + Duration::from_secs(secs)
}

/// `t0 + millis` milliseconds.
pub fn at_ms(t0: Instant, millis: u64) -> Instant {
    t0 + Duration::from_millis(millis)
}

/// A broker with default limits (on the in-memory stores).
pub fn broker() -> Broker {
    broker_with(Limits::default())
}

/// A broker with `limits` (on the in-memory stores).
pub fn broker_with(limits: Limits) -> Broker {
    broker_acl(limits, Acl::default())
}

/// A broker with `limits` and `acl` (on the in-memory stores).
pub fn broker_acl(limits: Limits, acl: Acl) -> Broker {
    Broker::new(limits, acl)
}

/// An MQTT 5 CONNECT with clean start, keep-alive 60 and no properties.
pub fn v5(client_id: &str) -> Connect {
    Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// An MQTT 5 CONNECT without clean start and with the given session expiry interval.
pub fn v5_persistent(client_id: &str, session_expiry: u32) -> Connect {
    let mut c = v5(client_id);
    c.clean_start = false;
    c.properties.make_mut().session_expiry_interval = Some(session_expiry);
    c
}

/// An MQTT 3.1.1 CONNECT with keep-alive 60.
pub fn v3(client_id: &str, clean_session: bool) -> Connect {
    Connect {
        protocol: Protocol::V3_1_1,
        clean_start: clean_session,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

pub fn will(topic: &str, payload: &str, qos: QoS) -> Will {
    Will {
        topic: topic.into(),
        payload: bytes(payload),
        qos,
        retain: false,
        properties: Properties::default(),
    }
}

pub fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn publish(topic: &str, payload: &str, qos: QoS, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload: bytes(payload),
        properties: Properties::default(),
    }
}

pub fn pub_packet(topic: &str, payload: &str, qos: QoS, packet_id: u16) -> Packet {
    Packet::Publish(publish(topic, payload, qos, packet_id))
}

pub fn retained(topic: &str, payload: &str, qos: QoS, packet_id: u16) -> Packet {
    let mut p = publish(topic, payload, qos, packet_id);
    p.retain = true;
    Packet::Publish(p)
}

pub fn opts(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::OnSubscribe,
    }
}

pub fn subscribe(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    subscribe_with(packet_id, &[(filter, opts(qos))], None)
}

pub fn subscribe_with(packet_id: u16, filters: &[(&str, SubOptions)], id: Option<u32>) -> Packet {
    let mut properties = Properties::default();
    properties.make_mut().subscription_identifiers.extend(id);
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: filters.iter().map(|(f, o)| ((*f).into(), *o)).collect(),
        properties,
    })
}

pub fn puback(id: u16) -> Packet {
    Packet::PubAck(PubAck::new(id))
}
pub fn pubrec(id: u16) -> Packet {
    Packet::PubRec(PubAck::new(id))
}
pub fn pubrel(id: u16) -> Packet {
    Packet::PubRel(PubAck::new(id))
}
pub fn pubcomp(id: u16) -> Packet {
    Packet::PubComp(PubAck::new(id))
}

pub fn disconnect(code: ferry_codec::ReasonCode) -> Packet {
    Packet::Disconnect(Disconnect {
        code,
        properties: Properties::default(),
    })
}

/// Everything the broker produced so far.
pub fn drain(b: &mut Broker) -> Vec<Output> {
    b.drain_output().collect()
}

/// The packets sent to `conn`, in order (durable answers included).
pub fn sent_to(out: &[Output], conn: ConnId) -> Vec<Packet> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, packet } | Output::SendDurable { conn: c, packet }
                if *c == conn =>
            {
                Some(packet.clone())
            }
            _ => None,
        })
        .collect()
}

/// The PUBLISH packets sent to `conn`, in order.
pub fn publishes_to(out: &[Output], conn: ConnId) -> Vec<Publish> {
    sent_to(out, conn)
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// Payloads of the PUBLISH packets sent to `conn`, as strings.
pub fn payloads_to(out: &[Output], conn: ConnId) -> Vec<String> {
    publishes_to(out, conn)
        .into_iter()
        .map(|p| String::from_utf8(p.payload.to_vec()).expect("utf-8 payload"))
        .collect()
}

/// The `Close` outputs, in order.
pub fn closes(out: &[Output]) -> Vec<(ConnId, Option<Disconnect>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Close { conn, disconnect } => Some((*conn, disconnect.clone())),
            _ => None,
        })
        .collect()
}

/// Connects `conn`, asserts the CONNACK succeeded, drains the output and returns the CONNACK
/// and everything that followed it.
pub fn online(
    b: &mut Broker,
    conn: ConnId,
    connect: Connect,
    now: Instant,
) -> (ConnAck, Vec<Output>) {
    let accepted = b.connect(conn, connect, now);
    assert!(accepted.is_some(), "CONNECT refused");
    let out = drain(b);
    let Some(
        Output::Send {
            conn: c,
            packet: Packet::ConnAck(ack),
        }
        | Output::SendDurable {
            conn: c,
            packet: Packet::ConnAck(ack),
        },
    ) = out.first().cloned()
    else {
        panic!("first output is not a CONNACK: {out:?}");
    };
    assert_eq!(c, conn);
    assert!(!ack.code.is_error(), "CONNACK refused: {ack:?}");
    (ack, out[1..].to_vec())
}

/// Connects and subscribes `conn` to `filter` at `qos`, draining the CONNACK and SUBACK.
pub fn subscriber(
    b: &mut Broker,
    conn: ConnId,
    connect: Connect,
    filter: &str,
    qos: QoS,
    now: Instant,
) {
    online(b, conn, connect, now);
    b.handle(conn, subscribe(1, filter, qos), now);
    let out = drain(b);
    assert!(
        matches!(sent_to(&out, conn).first(), Some(Packet::SubAck(a)) if a.codes == vec![ferry_codec::ReasonCode(qos as u8)]),
        "unexpected SUBACK: {out:?}"
    );
}
