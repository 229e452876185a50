//! Behaviour of the per-socket `Connection` state machine, driven with a virtual clock.

mod common;

use common::*;
use ferry_codec::{
    Auth, ConnAck, Packet, Protocol, PubAck, Publish, QoS, ReasonCode, SubAck, UnsubAck,
};
use ferry_core::conn::{Inbound, Violation};
use ferry_core::{Connection, Output};
use std::time::{Duration, Instant};

const HANDSHAKE: Duration = Duration::from_secs(10);

fn conn(t0: Instant) -> Connection {
    Connection::new(t0, HANDSHAKE, 1024 * 1024, 3, 4)
}

/// A connection that has sent a v5 CONNECT with `connect` and been accepted with `keep_alive`.
fn connected(t0: Instant, connect: ferry_codec::Connect, keep_alive: u16) -> Connection {
    let mut c = conn(t0);
    let inbound = c
        .on_packet(Packet::Connect(Box::new(connect)), t0)
        .expect("CONNECT");
    assert!(matches!(inbound, Inbound::Connect(_)));
    c.accepted(keep_alive);
    c
}

fn code(r: Result<Inbound, Violation>) -> ReasonCode {
    match r {
        Err(v) => v.code,
        Ok(i) => panic!("expected a violation, got {i:?}"),
    }
}

fn forwarded(r: Result<Inbound, Violation>) -> Packet {
    match r {
        Ok(Inbound::Forward(p)) => p,
        other => panic!("expected Forward, got {other:?}"),
    }
}

fn forwarded_publish(r: Result<Inbound, Violation>) -> Publish {
    match forwarded(r) {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn aliased(topic: &str, alias: u16) -> Packet {
    let mut p = publish(topic, "x", QoS::AtMostOnce, 0);
    p.properties.make_mut().topic_alias = Some(alias);
    Packet::Publish(p)
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[test]
fn first_packet_must_be_connect() {
    let t0 = Instant::now();
    for packet in [
        Packet::PingReq,
        pub_packet("t", "x", QoS::AtMostOnce, 0),
        subscribe(1, "t", QoS::AtMostOnce),
        disconnect(ReasonCode::SUCCESS),
    ] {
        let mut c = conn(t0);
        assert_eq!(
            code(c.on_packet(packet.clone(), t0)),
            ReasonCode::PROTOCOL_ERROR,
            "{packet:?}"
        );
        assert!(!c.is_connected());
    }
}

#[test]
fn connect_is_handed_over_and_sets_the_protocol() {
    let t0 = Instant::now();
    let mut c = conn(t0);
    assert_eq!(
        c.protocol(),
        Protocol::V3_1_1,
        "3.1.1 until CONNECT says otherwise"
    );
    let connect = v5("c");
    match c.on_packet(Packet::Connect(Box::new(connect.clone())), t0) {
        Ok(Inbound::Connect(got)) => assert_eq!(*got, connect),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.protocol(), Protocol::V5);
    assert!(!c.is_connected(), "connected only once the broker accepted");
    assert_eq!(
        c.poll_timeout(),
        None,
        "no deadline while the broker decides"
    );
    c.accepted(0);
    assert!(c.is_connected());
    assert_eq!(c.max_packet_size(), 1024 * 1024);
}

#[test]
fn handshake_timeout_fires_at_the_deadline_and_not_before() {
    let t0 = Instant::now();
    let mut c = conn(t0);
    assert_eq!(c.poll_timeout(), Some(t0 + HANDSHAKE));
    assert_eq!(c.handle_timeout(t0), Ok(()));
    assert_eq!(
        c.handle_timeout(t0 + HANDSHAKE - Duration::from_nanos(1)),
        Ok(())
    );
    let v = c
        .handle_timeout(t0 + HANDSHAKE)
        .expect_err("deadline passed");
    assert_eq!(v.code, ReasonCode::MAXIMUM_CONNECT_TIME);
    assert!(c.handle_timeout(at(t0, 60)).is_err());
}

#[test]
fn handshake_deadline_is_not_pushed_back_by_other_traffic() {
    let t0 = Instant::now();
    let mut c = conn(t0);
    // A refused non-CONNECT packet does not buy time either.
    let _ = c.on_packet(Packet::PingReq, at(t0, 9));
    assert_eq!(c.poll_timeout(), Some(t0 + HANDSHAKE));
}

#[test]
fn connect_in_time_cancels_the_handshake_timeout() {
    let t0 = Instant::now();
    let mut c = conn(t0);
    c.on_packet(Packet::Connect(Box::new(v5("c"))), at(t0, 9))
        .unwrap();
    assert_eq!(c.handle_timeout(at(t0, 10)), Ok(()));
    assert_eq!(c.handle_timeout(at(t0, 1000)), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Keep-alive

#[test]
fn keep_alive_fires_at_one_and_a_half_intervals_after_the_last_packet() {
    let t0 = Instant::now();
    let mut c = conn(t0);
    c.on_packet(Packet::Connect(Box::new(v5("c"))), at(t0, 1))
        .unwrap();
    c.accepted(10);
    assert_eq!(c.poll_timeout(), Some(at(t0, 16)));
    assert_eq!(c.handle_timeout(at_ms(t0, 15_999)), Ok(()));
    let v = c
        .handle_timeout(at(t0, 16))
        .expect_err("keep-alive expired");
    assert_eq!(v.code, ReasonCode::KEEP_ALIVE_TIMEOUT);
}

#[test]
fn keep_alive_odd_interval_uses_exact_one_and_a_half() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 5);
    assert_eq!(c.poll_timeout(), Some(at_ms(t0, 7_500)));
    assert!(c.handle_timeout(at_ms(t0, 7_499)).is_ok());
    assert!(c.handle_timeout(at_ms(t0, 7_500)).is_err());
}

#[test]
fn keep_alive_is_pushed_back_by_any_packet() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 10);
    for (secs, packet) in [
        (10, Packet::PingReq),
        (20, puback(1)),
        (30, pub_packet("t", "x", QoS::AtMostOnce, 0)),
        (40, subscribe(1, "t", QoS::AtMostOnce)),
    ] {
        c.on_packet(packet, at(t0, secs)).expect("accepted");
        assert_eq!(c.poll_timeout(), Some(at(t0, secs + 15)));
        assert!(c.handle_timeout(at(t0, secs + 14)).is_ok());
    }
    assert!(c.handle_timeout(at(t0, 55)).is_err());
}

#[test]
fn keep_alive_0_never_times_out() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 0);
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(c.handle_timeout(at(t0, 1_000_000)), Ok(()));
}

#[test]
fn pingreq_is_answered_directly() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 10);
    assert_eq!(
        c.on_packet(Packet::PingReq, at(t0, 5)),
        Ok(Inbound::Reply(Packet::PingResp))
    );
}

// ---------------------------------------------------------------------------------------------
// Protocol errors after the handshake

#[test]
fn second_connect_auth_and_server_packets_are_protocol_errors() {
    let t0 = Instant::now();
    for packet in [
        Packet::Connect(Box::new(v5("again"))),
        Packet::Auth(Auth::default()),
        Packet::ConnAck(ConnAck::default()),
        Packet::SubAck(SubAck::default()),
        Packet::UnsubAck(UnsubAck::default()),
        Packet::PingResp,
    ] {
        let mut c = connected(t0, v5("c"), 10);
        assert_eq!(
            code(c.on_packet(packet.clone(), t0)),
            ReasonCode::PROTOCOL_ERROR,
            "{packet:?}"
        );
    }
}

#[test]
fn client_packets_are_forwarded_unchanged() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 10);
    for packet in [
        pub_packet("t", "x", QoS::AtLeastOnce, 1),
        puback(1),
        pubrec(2),
        pubrel(3),
        pubcomp(4),
        subscribe(5, "t", QoS::AtLeastOnce),
        disconnect(ReasonCode::SUCCESS),
    ] {
        assert_eq!(forwarded(c.on_packet(packet.clone(), t0)), packet);
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound topic aliases

#[test]
fn inbound_topic_alias_is_set_then_used() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 0);
    let p = forwarded_publish(c.on_packet(aliased("a/b", 1), t0));
    assert_eq!(p.topic, "a/b");
    assert_eq!(p.properties.topic_alias, None, "the alias is resolved here");

    let p = forwarded_publish(c.on_packet(aliased("", 1), t0));
    assert_eq!(p, publish("a/b", "x", QoS::AtMostOnce, 0));

    // Re-setting an alias changes what it stands for.
    forwarded_publish(c.on_packet(aliased("c/d", 1), t0));
    assert_eq!(
        forwarded_publish(c.on_packet(aliased("", 1), t0)).topic,
        "c/d"
    );

    // The maximum (4) itself is valid.
    forwarded_publish(c.on_packet(aliased("e", 4), t0));
    assert_eq!(
        forwarded_publish(c.on_packet(aliased("", 4), t0)).topic,
        "e"
    );
}

#[test]
fn inbound_topic_alias_out_of_range_is_0x94() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 0);
    assert_eq!(
        code(c.on_packet(aliased("a", 5), t0)),
        ReasonCode::TOPIC_ALIAS_INVALID
    );
    let mut c = connected(t0, v5("c"), 0);
    assert_eq!(
        code(c.on_packet(aliased("a", 0), t0)),
        ReasonCode::TOPIC_ALIAS_INVALID
    );
    let mut c = Connection::new(t0, HANDSHAKE, 1024, 10, 0);
    c.on_packet(Packet::Connect(Box::new(v5("c"))), t0).unwrap();
    c.accepted(0);
    assert_eq!(
        code(c.on_packet(aliased("a", 1), t0)),
        ReasonCode::TOPIC_ALIAS_INVALID,
        "no alias is valid with a maximum of 0"
    );
    assert_eq!(ReasonCode::TOPIC_ALIAS_INVALID.0, 0x94);
}

#[test]
fn unknown_inbound_alias_with_empty_topic_is_0x82() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 0);
    forwarded_publish(c.on_packet(aliased("a", 1), t0));
    assert_eq!(
        code(c.on_packet(aliased("", 2), t0)),
        ReasonCode::PROTOCOL_ERROR
    );
}

// ---------------------------------------------------------------------------------------------
// Inbound receive maximum (3 in these tests)

#[test]
fn receive_maximum_exceeded_is_0x93() {
    let t0 = Instant::now();
    let mut c = connected(t0, v5("c"), 0);
    for id in 1..=3 {
        forwarded_publish(c.on_packet(pub_packet("t", "x", QoS::AtLeastOnce, id), t0));
    }
    // QoS 0 does not count.
    forwarded_publish(c.on_packet(pub_packet("t", "x", QoS::AtMostOnce, 0), t0));
    assert_eq!(
        code(c.on_packet(pub_packet("t", "x", QoS::AtLeastOnce, 4), t0)),
        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
    );
    assert_eq!(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED.0, 0x93);
}

#[test]
fn acks_going_out_free_receive_maximum_slots() {
    let t0 = Instant::now();
    let mut c = unacked(
        t0,
        &[
            (1, QoS::AtLeastOnce),
            (2, QoS::ExactlyOnce),
            (3, QoS::ExactlyOnce),
        ],
    );
    // PUBACK frees a QoS 1 slot.
    c.on_outbound(&mut puback(1));
    forwarded_publish(c.on_packet(pub_packet("t", "d", QoS::AtLeastOnce, 4), t0));
    // PUBCOMP frees a QoS 2 slot.
    c.on_outbound(&mut pubcomp(2));
    forwarded_publish(c.on_packet(pub_packet("t", "e", QoS::AtLeastOnce, 5), t0));
    // An error PUBREC ends the exchange and frees the slot.
    c.on_outbound(&mut Packet::PubRec(PubAck::with_code(
        3,
        ReasonCode::NOT_AUTHORIZED,
    )));
    forwarded_publish(c.on_packet(pub_packet("t", "f", QoS::AtLeastOnce, 6), t0));
    // Full again (4, 5, 6).
    assert_eq!(
        code(c.on_packet(pub_packet("t", "g", QoS::AtLeastOnce, 7), t0)),
        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
    );
}

#[test]
fn successful_pubrec_does_not_free_a_slot() {
    let t0 = Instant::now();
    let mut c = unacked(
        t0,
        &[
            (1, QoS::ExactlyOnce),
            (2, QoS::ExactlyOnce),
            (3, QoS::ExactlyOnce),
        ],
    );
    for id in 1..=3 {
        c.on_outbound(&mut pubrec(id));
    }
    assert_eq!(
        code(c.on_packet(pub_packet("t", "x", QoS::AtLeastOnce, 4), t0)),
        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
        "the QoS 2 exchanges are not over until PUBCOMP"
    );
}

#[test]
fn acks_for_other_ids_free_nothing() {
    let t0 = Instant::now();
    let mut c = unacked(
        t0,
        &[
            (1, QoS::AtLeastOnce),
            (2, QoS::AtLeastOnce),
            (3, QoS::AtLeastOnce),
        ],
    );
    c.on_outbound(&mut puback(9));
    c.on_outbound(&mut pubcomp(8));
    assert_eq!(
        code(c.on_packet(pub_packet("t", "x", QoS::AtLeastOnce, 4), t0)),
        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
    );
}

/// A connection with the given QoS 1/2 packet ids unacknowledged.
fn unacked(t0: Instant, unacked: &[(u16, QoS)]) -> Connection {
    let mut c = connected(t0, v5("c"), 0);
    for &(id, qos) in unacked {
        forwarded_publish(c.on_packet(pub_packet("t", "x", qos, id), t0));
    }
    c
}

#[test]
fn retransmission_with_the_same_id_takes_no_extra_slot() {
    let t0 = Instant::now();
    let mut c = unacked(
        t0,
        &[
            (1, QoS::AtLeastOnce),
            (2, QoS::AtLeastOnce),
            (3, QoS::AtLeastOnce),
        ],
    );
    let mut again = publish("t", "x", QoS::AtLeastOnce, 3);
    again.dup = true;
    forwarded_publish(c.on_packet(Packet::Publish(again), t0));
}

// ---------------------------------------------------------------------------------------------
// Outbound topic aliases

fn with_alias_max(max: u16) -> ferry_codec::Connect {
    let mut c = v5("c");
    c.properties.make_mut().topic_alias_maximum = Some(max);
    c
}

fn outbound(c: &mut Connection, topic: &str) -> Publish {
    let mut packet = pub_packet(topic, "x", QoS::AtMostOnce, 0);
    c.on_outbound(&mut packet);
    match packet {
        Packet::Publish(p) => p,
        other => panic!("{other:?}"),
    }
}

#[test]
fn outbound_topic_alias_is_assigned_then_used() {
    let t0 = Instant::now();
    let mut c = connected(t0, with_alias_max(2), 0);
    let p = outbound(&mut c, "x/1");
    assert_eq!(
        (p.topic.as_str(), p.properties.topic_alias),
        ("x/1", Some(1))
    );
    let p = outbound(&mut c, "x/1");
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(1)));
    let p = outbound(&mut c, "x/2");
    assert_eq!(
        (p.topic.as_str(), p.properties.topic_alias),
        ("x/2", Some(2))
    );
    // The client's maximum is reached: a third topic goes out in full, without alias.
    let p = outbound(&mut c, "x/3");
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("x/3", None));
    let p = outbound(&mut c, "x/3");
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("x/3", None));
    let p = outbound(&mut c, "x/2");
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(2)));
    assert_eq!(p.payload, "x");
}

#[test]
fn no_outbound_topic_alias_when_the_client_allows_none() {
    let t0 = Instant::now();
    for connect in [v5("c"), with_alias_max(0), v3("c", true)] {
        let mut c = connected(t0, connect, 0);
        for _ in 0..2 {
            let p = outbound(&mut c, "x/1");
            assert_eq!(p, publish("x/1", "x", QoS::AtMostOnce, 0));
        }
    }
}

#[test]
fn non_publish_packets_pass_on_outbound_unchanged() {
    let t0 = Instant::now();
    let mut c = connected(t0, with_alias_max(5), 0);
    for packet in [
        Packet::PingResp,
        puback(1),
        pubrel(2),
        Packet::ConnAck(ConnAck::default()),
    ] {
        let mut p = packet.clone();
        c.on_outbound(&mut p);
        assert_eq!(p, packet);
    }
}

// ---------------------------------------------------------------------------------------------
// Connection and broker together, as the runtime drives them

/// The broker checks a PUBLISH against the client's Maximum Packet Size before the connection
/// adds the outbound topic alias, which makes the first PUBLISH to a topic 3 bytes longer: a
/// message that just fits is then sent above the client's limit (MQTT 5 §3.1.2.11.4).
#[test]
fn outbound_alias_never_pushes_a_publish_over_the_clients_maximum_packet_size() {
    let t0 = Instant::now();
    const MAX: usize = 64;
    let mut b = broker();
    let mut connect = with_alias_max(10);
    connect.properties.make_mut().maximum_packet_size = Some(MAX as u32);
    let mut c = conn(t0);
    let Ok(Inbound::Connect(connect)) = c.on_packet(Packet::Connect(Box::new(connect)), t0) else {
        panic!()
    };
    let accepted = b.connect(1, *connect, t0).expect("accepted");
    c.accepted(accepted.keep_alive);
    let sub = forwarded(c.on_packet(subscribe(1, "t", QoS::AtMostOnce), t0));
    b.handle(1, sub, t0);
    drain(&mut b);
    online(&mut b, 2, v5("pub"), t0);

    // The largest payload that fits the client's limit without an alias.
    let mut n = 0;
    while Packet::Publish(Publish {
        payload: vec![b'p'; n + 1].into(),
        ..publish("t", "", QoS::AtMostOnce, 0)
    })
    .encoded_len(Protocol::V5)
        <= MAX
    {
        n += 1;
    }
    let mut p = publish("t", "", QoS::AtMostOnce, 0);
    p.payload = vec![b'p'; n].into();
    b.handle(2, Packet::Publish(p), t0);
    let out = drain(&mut b);
    let mut sent = 0;
    for o in out {
        if let Output::Send {
            conn: 1,
            mut packet,
        } = o
        {
            c.on_outbound(&mut packet);
            let len = packet.encoded_len(Protocol::V5);
            assert!(
                len <= MAX,
                "{len}-byte packet sent to a client with a {MAX}-byte maximum: {packet:?}"
            );
            if matches!(packet, Packet::Publish(_)) {
                sent += 1;
            }
        }
    }
    assert_eq!(
        sent, 1,
        "the message fits without an alias and must be delivered"
    );
}

#[test]
fn runtime_loop_resolves_aliases_and_delivers() {
    let t0 = Instant::now();
    let mut b = broker();
    // Subscriber with outbound aliases.
    let mut sc = conn(t0);
    let Ok(Inbound::Connect(connect)) =
        sc.on_packet(Packet::Connect(Box::new(with_alias_max(5))), t0)
    else {
        panic!()
    };
    sc.accepted(b.connect(1, *connect, t0).unwrap().keep_alive);
    b.handle(
        1,
        forwarded(sc.on_packet(subscribe(1, "s/#", QoS::AtLeastOnce), t0)),
        t0,
    );
    // Publisher using an inbound alias.
    let mut pc = conn(t0);
    let Ok(Inbound::Connect(connect)) = pc.on_packet(Packet::Connect(Box::new(v5("pub"))), t0)
    else {
        panic!()
    };
    pc.accepted(b.connect(2, *connect, t0).unwrap().keep_alive);
    drain(&mut b);

    let mut first = publish("s/long/topic", "1", QoS::AtLeastOnce, 1);
    first.properties.make_mut().topic_alias = Some(2);
    let mut second = publish("", "2", QoS::AtLeastOnce, 2);
    second.properties.make_mut().topic_alias = Some(2);
    for p in [first, second] {
        b.handle(2, forwarded(pc.on_packet(Packet::Publish(p), t0)), t0);
    }
    let mut to_sub = Vec::new();
    for o in drain(&mut b) {
        match o {
            Output::Send {
                conn: 1,
                mut packet,
            } => {
                sc.on_outbound(&mut packet);
                to_sub.push(packet);
            }
            Output::Send {
                conn: 2,
                mut packet,
            } => pc.on_outbound(&mut packet),
            other => panic!("{other:?}"),
        }
    }
    let pubs: Vec<Publish> = to_sub
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(pubs.len(), 2);
    assert_eq!(
        (pubs[0].topic.as_str(), pubs[0].properties.topic_alias),
        ("s/long/topic", Some(1))
    );
    assert_eq!(
        (pubs[1].topic.as_str(), pubs[1].properties.topic_alias),
        ("", Some(1))
    );
    assert_eq!(pubs[1].payload, "2");
    // The publisher's PUBACKs freed its receive-maximum slots: 3 more fit.
    for id in 3..=5 {
        forwarded_publish(pc.on_packet(pub_packet("s/x", "x", QoS::AtLeastOnce, id), t0));
    }
}
