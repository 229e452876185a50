//! Hostile and malformed input against a real server: truncated and oversized frames, invalid
//! strings, protocol-order violations, reused packet ids, limits (receive maximum, handshake and
//! keep-alive timeouts), a subscriber that never reads, and random garbage.
//!
//! Each test starts its own server on an ephemeral port, talks raw bytes over TCP, checks the
//! exact answer (MQTT 5: a DISCONNECT with a reason code; MQTT 3.1.1: just the close) and that
//! the socket is then closed, and finally that the server still serves a well-behaved client.

mod common;

use common::*;
use ferry_codec::{Packet, Protocol, PubAck, QoS, ReasonCode};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use Protocol::{V3_1_1, V5};

/// A raw CONNECT with the given protocol level and client id bytes (clean start, keep-alive
/// 60; an empty property block for level 5).
fn raw_connect(level: u8, client_id: &[u8]) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.push(level);
    body.push(0x02);
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&field(client_id));
    frame(0x10, &body)
}

/// A raw QoS 0 PUBLISH with the given topic bytes (and an empty v5 property block).
fn raw_publish(protocol: Protocol, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = field(topic);
    if protocol.is_v5() {
        body.push(0);
    }
    body.extend_from_slice(payload);
    frame(0x30, &body)
}

/// A QoS 2 PUBLISH, optionally with DUP.
fn qos2(topic: &str, packet_id: u16, payload: &[u8], dup: bool) -> Packet {
    let mut p = publish(topic, QoS::ExactlyOnce, packet_id, payload);
    if let Packet::Publish(p) = &mut p {
        p.dup = dup;
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Framing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_connect_then_eof_is_closed() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for protocol in [V3_1_1, V5] {
        let full = encode(&connect_packet(protocol, &cid("trunc"), 60), protocol);
        // Cut inside the fixed header, just after it, in the middle and one byte short.
        for cut in [1, 2, full.len() / 2, full.len() - 1] {
            let mut c = Client::tcp(addr, protocol, &format!("trunc-{protocol:?}-{cut}")).await;
            c.send_raw(&full[..cut]).await;
            c.stream.shutdown().await.unwrap();
            c.expect_closed().await;
        }
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_byte_remaining_length_is_malformed() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let bad = [0x30, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00];

    let mut c = Client::v5(addr, &cid("len5-v5")).await;
    c.send_raw(&bad).await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;

    let mut c = Client::v3(addr, &cid("len5-v3")).await;
    c.send_raw(&bad).await;
    c.expect_closed().await;

    // Before CONNECT: closed without any answer.
    let mut c = Client::tcp(addr, V3_1_1, "len5-pre-connect").await;
    c.send_raw(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
    c.expect_closed().await;

    assert!(server.metrics().protocol_errors.load(Ordering::Relaxed) >= 3);
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_above_maximum_size_is_refused_from_its_header() {
    const MAX: u32 = 1024;
    let server = start(|c| c.limits.max_packet_size = MAX).await;
    let addr = server.local_addr();

    let id = cid("big-v5");
    let (mut c, ack) = Client::connect(addr, V5, &id, 0).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(MAX));

    // A PUBLISH of exactly MAX bytes is fine.
    let topic = format!("big/{id}");
    c.subscribe(1, &topic, QoS::AtMostOnce).await;
    let overhead = encode(&publish(&topic, QoS::AtMostOnce, 0, b""), V5).len();
    // Remaining length stays in two bytes either way, so the payload fills the rest.
    let payload = vec![b'x'; MAX as usize - overhead - 1];
    let packet = encode(&publish(&topic, QoS::AtMostOnce, 0, &payload), V5);
    assert_eq!(packet.len(), MAX as usize);
    c.send_raw(&packet).await;
    match c.recv().await {
        Packet::Publish(p) => assert_eq!(p.payload.len(), payload.len()),
        other => panic!("expected the {MAX}-byte PUBLISH back, got {other:?}"),
    }

    // One byte more, announced by the fixed header only: refused without waiting for the body.
    let mut header = vec![0x30];
    put_varint(&mut header, MAX - 2); // 1 + 2 + (MAX - 2) = MAX + 1 bytes
    c.send_raw(&header).await;
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;

    // 10 MB announced: the answer comes at once.
    let (mut c, _) = Client::connect(addr, V5, &cid("huge-v5"), 0).await;
    let mut header = vec![0x30];
    put_varint(&mut header, 10_000_000);
    let sent = Instant::now();
    c.send_raw(&header).await;
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "took {:?}",
        sent.elapsed()
    );

    let mut c = Client::v3(addr, &cid("huge-v3")).await;
    c.send_raw(&header).await;
    c.expect_closed().await;

    // A CONNECT above the limit is refused the same way (no CONNACK).
    let mut c = Client::tcp(addr, V3_1_1, "huge-connect").await;
    let mut header = vec![0x10];
    put_varint(&mut header, 10_000_000);
    c.send_raw(&header).await;
    c.expect_closed().await;

    assert_serves(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Strings

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_null_in_publish_topic() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let bad_topics: [&[u8]; 4] = [
        b"a/\xff\xfe",
        b"a/\xc3\x28",
        b"a/\xed\xa0\x80", // an encoded surrogate (U+D800)
        b"a/\0/b",
    ];
    for topic in bad_topics {
        let mut c = Client::v5(addr, &cid("utf8-v5")).await;
        c.send_raw(&raw_publish(V5, topic, b"x")).await;
        c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;

        let mut c = Client::v3(addr, &cid("utf8-v3")).await;
        c.send_raw(&raw_publish(V3_1_1, topic, b"x")).await;
        c.expect_closed().await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_id_is_closed_without_connack() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for level in [4, 5] {
        for id in [&b"bad\xff"[..], b"\xc3\x28", b"nul\0id"] {
            let protocol = if level == 5 { V5 } else { V3_1_1 };
            let mut c = Client::tcp(addr, protocol, &format!("client-id-{level}")).await;
            c.send_raw(&raw_connect(level, id)).await;
            c.expect_closed().await;
        }
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Protocol order

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_before_connect_are_closed_without_connack() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let firsts = [
        encode(&publish("a/b", QoS::AtMostOnce, 0, b"early"), V3_1_1),
        encode(&publish("a/b", QoS::AtLeastOnce, 1, b"early"), V3_1_1),
        encode(&subscribe(1, "a/#", QoS::AtMostOnce), V3_1_1),
        vec![0xc0, 0x00], // PINGREQ
        vec![0xe0, 0x00], // DISCONNECT
    ];
    for bytes in firsts {
        let mut c = Client::tcp(addr, V3_1_1, "before-connect").await;
        // A valid CONNECT right after must not be honoured either.
        let mut both = bytes.clone();
        both.extend(encode(&connect_packet(V3_1_1, &cid("late"), 60), V3_1_1));
        c.send_raw_lossy(&both).await;
        c.expect_closed().await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_is_a_protocol_error() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();

    let id = cid("twice-v5");
    let mut c = Client::v5(addr, &id).await;
    c.send(&connect_packet(V5, &id, 0)).await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;

    let id = cid("twice-v3");
    let mut c = Client::v3(addr, &id).await;
    c.send(&connect_packet(V3_1_1, &id, 0)).await;
    c.expect_closed().await;

    // A second CONNECT with another protocol level is refused the same way.
    let mut c = Client::v5(addr, &cid("twice-mixed")).await;
    c.send_raw(&encode(&connect_packet(V3_1_1, &cid("other"), 0), V3_1_1))
        .await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;

    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_only_packets_from_a_client_are_protocol_errors() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let packets: [&[u8]; 5] = [
        &[0x20, 0x03, 0x00, 0x00, 0x00],       // CONNACK
        &[0x90, 0x04, 0x00, 0x01, 0x00, 0x00], // SUBACK
        &[0xb0, 0x03, 0x00, 0x01, 0x00],       // UNSUBACK
        &[0xd0, 0x00],                         // PINGRESP
        &[0xf0, 0x00],                         // AUTH (no enhanced authentication)
    ];
    for bytes in packets {
        let mut c = Client::v5(addr, &cid("server-only")).await;
        c.send_raw(bytes).await;
        c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
    }
    // MQTT 3.1.1 has no packet type 15: malformed, closed.
    let mut c = Client::v3(addr, &cid("auth-v3")).await;
    c.send_raw(&[0xf0, 0x00]).await;
    c.expect_closed().await;

    assert_serves(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Invalid PUBLISH / SUBSCRIBE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_in_publish_topic() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for topic in ["a/+", "a/#", "+", "#", "a/b+"] {
        let mut c = Client::v5(addr, &cid("wild-v5")).await;
        c.send(&publish(topic, QoS::AtMostOnce, 0, b"x")).await;
        c.expect_disconnect(ReasonCode::TOPIC_NAME_INVALID).await;

        let mut c = Client::v5(addr, &cid("wild-v5-qos1")).await;
        c.send(&publish(topic, QoS::AtLeastOnce, 3, b"x")).await;
        c.expect_disconnect(ReasonCode::TOPIC_NAME_INVALID).await;

        let mut c = Client::v3(addr, &cid("wild-v3")).await;
        c.send(&publish(topic, QoS::AtMostOnce, 0, b"x")).await;
        c.expect_closed().await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_publish_header_fields() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    // QoS 3.
    let mut body = field(b"a/b");
    body.extend_from_slice(&[0x00, 0x01, 0x00]);
    let qos3 = frame(0x36, &body);
    // QoS 1 with packet identifier 0.
    let mut body = field(b"a/b");
    body.extend_from_slice(&[0x00, 0x00, 0x00]);
    let zero_id = frame(0x32, &body);
    // DUP on QoS 0.
    let dup0 = {
        let mut f = raw_publish(V5, b"a/b", b"x");
        f[0] |= 0x08;
        f
    };
    for (bytes, code) in [
        (qos3, ReasonCode::MALFORMED_PACKET),
        (zero_id, ReasonCode::PROTOCOL_ERROR),
        (dup0, ReasonCode::MALFORMED_PACKET),
    ] {
        let mut c = Client::v5(addr, &cid("pubhdr")).await;
        c.send_raw(&bytes).await;
        c.expect_disconnect(code).await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_abuse() {
    let server = start(|c| c.limits.topic_alias_maximum = 2).await;
    let addr = server.local_addr();
    let with_alias = |topic: &str, alias: u16| {
        let mut p = publish(topic, QoS::AtMostOnce, 0, b"x");
        if let Packet::Publish(p) = &mut p {
            p.properties.make_mut().topic_alias = Some(alias);
        }
        p
    };
    for (packet, code) in [
        (with_alias("a/b", 3), ReasonCode::TOPIC_ALIAS_INVALID),
        (with_alias("", 1), ReasonCode::PROTOCOL_ERROR),
    ] {
        let (mut c, ack) = Client::connect(addr, V5, &cid("alias"), 0).await;
        assert_eq!(ack.properties.topic_alias_maximum, Some(2));
        c.send(&packet).await;
        c.expect_disconnect(code).await;
    }
    // Alias 0, written by hand (property 0x23 = 0): the codec refuses the property value itself,
    // which is a Protocol Error ([MQTT-3.3.2-8] names no reason code for it).
    let mut body = field(b"a/b");
    body.extend_from_slice(&[0x03, 0x23, 0x00, 0x00]);
    body.push(b'x');
    let mut c = Client::v5(addr, &cid("alias0")).await;
    c.send_raw(&frame(0x30, &body)).await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;

    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_wrong_fixed_header_flags() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for flags in [0x0, 0x1, 0x3, 0xf] {
        let mut body = vec![0x00, 0x01, 0x00]; // packet id 1, no properties
        body.extend_from_slice(&field(b"a/b"));
        body.push(0x00);
        let mut c = Client::v5(addr, &cid("subflags-v5")).await;
        c.send_raw(&frame(0x80 | flags, &body)).await;
        c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;

        let mut body = vec![0x00, 0x01];
        body.extend_from_slice(&field(b"a/b"));
        body.push(0x00);
        let mut c = Client::v3(addr, &cid("subflags-v3")).await;
        c.send_raw(&frame(0x80 | flags, &body)).await;
        c.expect_closed().await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_subscription_filter_is_refused_in_suback_only() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut c = Client::v5(addr, &cid("badfilter")).await;
    for (i, filter) in ["a/#/b", "a/b#", "a+/b", "$share//a", "$share/g"]
        .into_iter()
        .enumerate()
    {
        let id = i as u16 + 1;
        c.send(&subscribe(id, filter, QoS::AtLeastOnce)).await;
        match c.recv().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, id);
                assert_eq!(
                    ack.codes,
                    vec![ReasonCode::TOPIC_FILTER_INVALID],
                    "{filter}"
                );
            }
            other => panic!("{filter}: expected SUBACK, got {other:?}"),
        }
    }
    // The connection is still usable.
    c.send(&Packet::PingReq).await;
    assert_eq!(c.recv().await, Packet::PingResp);
    c.disconnect().await;
    assert_serves(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Packet identifiers and receive maximum

/// Publishes QoS 2 with packet id 7 twice before PUBREL: without DUP the second is refused with
/// PUBREC 0x91, with DUP it is acknowledged as a retransmission; either way the subscriber gets
/// the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_packet_id_reuse_before_pubrel() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for (protocol, dup, expected) in [
        (V5, false, ReasonCode::PACKET_IDENTIFIER_IN_USE),
        (V5, true, ReasonCode::SUCCESS),
        (V3_1_1, false, ReasonCode::SUCCESS),
        (V3_1_1, true, ReasonCode::SUCCESS),
    ] {
        let case = format!("{protocol:?} dup={dup}");
        let topic = format!("reuse/{}", cid("t"));
        let mut sub = Client::v5(addr, &cid("reuse-sub")).await;
        sub.subscribe(1, &topic, QoS::ExactlyOnce).await;
        let (mut publ, _) = Client::connect(addr, protocol, &cid("reuse-pub"), 0).await;

        publ.send(&qos2(&topic, 7, b"first", false)).await;
        let (raw, _) = publ.recv_frame().await;
        assert_eq!(&raw[..], &[0x50, 0x02, 0x00, 0x07], "{case}: first PUBREC");

        publ.send(&qos2(&topic, 7, b"second", dup)).await;
        let (raw, _) = publ.recv_frame().await;
        if expected == ReasonCode::SUCCESS {
            assert_eq!(&raw[..], &[0x50, 0x02, 0x00, 0x07], "{case}: second PUBREC");
        } else {
            assert_eq!(
                &raw[..],
                &[0x50, 0x03, 0x00, 0x07, expected.0],
                "{case}: second PUBREC"
            );
        }

        // The subscriber gets "first" once and nothing else.
        match sub.recv().await {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"first", "{case}");
                assert_eq!(p.qos, QoS::ExactlyOnce);
                sub.send(&Packet::PubRec(PubAck::new(p.packet_id))).await;
                assert_eq!(
                    sub.recv().await,
                    Packet::PubRel(PubAck::new(p.packet_id)),
                    "{case}"
                );
                sub.send(&Packet::PubComp(PubAck::new(p.packet_id))).await;
            }
            other => panic!("{case}: expected PUBLISH, got {other:?}"),
        }
        sub.expect_silence(Duration::from_millis(300)).await;

        // PUBREL releases id 7; it can then carry a new message.
        publ.send(&Packet::PubRel(PubAck::new(7))).await;
        let (raw, _) = publ.recv_frame().await;
        assert_eq!(&raw[..], &[0x70, 0x02, 0x00, 0x07], "{case}: PUBCOMP");
        publ.send(&qos2(&topic, 7, b"third", false)).await;
        assert_eq!(publ.recv().await, Packet::PubRec(PubAck::new(7)), "{case}");
        match sub.recv().await {
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"third", "{case}"),
            other => panic!("{case}: expected PUBLISH, got {other:?}"),
        }
        publ.disconnect().await;
        drop(sub);
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_exceeded() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let addr = server.local_addr();
    let topic = "recvmax/t";

    let (mut c, ack) = Client::connect(addr, V5, &cid("recvmax"), 0).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for id in 1..=3 {
        c.send(&qos2(topic, id, b"x", false)).await;
    }
    loop {
        match c.recv().await {
            // The first two may be acknowledged before the third is seen.
            Packet::PubRec(r) if r.packet_id <= 2 && r.code == ReasonCode::SUCCESS => {}
            Packet::Disconnect(d) => {
                assert_eq!(d.code, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                break;
            }
            other => panic!("expected DISCONNECT 0x93, got {other:?}"),
        }
    }
    c.expect_closed().await;

    // Control: completing one exchange frees its slot.
    let mut c = Client::v5(addr, &cid("recvmax-ok")).await;
    for id in 1..=2 {
        c.send(&qos2(topic, id, b"x", false)).await;
        assert_eq!(c.recv().await, Packet::PubRec(PubAck::new(id)));
    }
    c.send(&Packet::PubRel(PubAck::new(1))).await;
    assert_eq!(c.recv().await, Packet::PubComp(PubAck::new(1)));
    c.send(&qos2(topic, 3, b"x", false)).await;
    assert_eq!(c.recv().await, Packet::PubRec(PubAck::new(3)));
    c.disconnect().await;

    assert_serves(&server).await;
    server.shutdown().await;
}

/// Refusing a reused packet id with PUBREC 0x91 must not free the receive-maximum slot that
/// the original (still unreleased) message with that id occupies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_survives_packet_id_reuse() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let addr = server.local_addr();
    let topic = "recvmax/reuse";
    let mut c = Client::v5(addr, &cid("recvmax-reuse")).await;
    for id in 1..=2 {
        c.send(&qos2(topic, id, b"x", false)).await;
        assert_eq!(c.recv().await, Packet::PubRec(PubAck::new(id)));
    }
    c.send(&qos2(topic, 1, b"again", false)).await;
    assert_eq!(
        c.recv().await,
        Packet::PubRec(PubAck::with_code(1, ReasonCode::PACKET_IDENTIFIER_IN_USE))
    );
    // Ids 1 and 2 still await PUBREL: a third message exceeds the receive maximum of 2.
    c.send(&qos2(topic, 3, b"x", false)).await;
    c.expect_disconnect(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED)
        .await;
    assert_serves(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// CONNECT refusals and timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_gets_connack_1() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for level in [6, 0, 2, 255] {
        let mut c = Client::tcp(addr, V3_1_1, &format!("level-{level}")).await;
        c.send_raw(&raw_connect(level, b"level")).await;
        let (raw, _) = c.recv_frame().await;
        assert_eq!(&raw[..], &[0x20, 0x02, 0x00, 0x01], "level {level}");
        c.expect_closed().await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connect_within_handshake_timeout() {
    let server = start(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let addr = server.local_addr();
    let silent = async {
        let mut c = Client::tcp(addr, V3_1_1, "silent").await;
        let started = Instant::now();
        c.expect_closed().await;
        started.elapsed()
    };
    // A slow CONNECT (one byte every 100 ms) does not extend the deadline.
    let trickle = async {
        let mut c = Client::tcp(addr, V3_1_1, "trickle").await;
        let started = Instant::now();
        let connect = encode(&connect_packet(V3_1_1, &cid("trickle"), 60), V3_1_1);
        for &b in &connect[..connect.len() - 1] {
            c.send_raw_lossy(&[b]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_millis(600) {
                break;
            }
        }
        c.expect_closed().await;
        started.elapsed()
    };
    let (silent, trickle) = tokio::join!(silent, trickle);
    for (name, took) in [("silent", silent), ("trickle", trickle)] {
        assert!(
            took >= Duration::from_millis(200) && took <= Duration::from_secs(3),
            "{name}: closed after {took:?}"
        );
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_timeout() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let in_window = |name: &str, took: Duration| {
        assert!(
            took >= Duration::from_millis(1200) && took <= Duration::from_secs(3),
            "{name}: closed after {took:?}"
        );
    };
    let v5 = async {
        let (mut c, _) = Client::connect(addr, V5, &cid("ka-v5"), 1).await;
        let started = Instant::now();
        c.expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT).await;
        in_window("v5", started.elapsed());
    };
    let v3 = async {
        let (mut c, _) = Client::connect(addr, V3_1_1, &cid("ka-v3"), 1).await;
        let started = Instant::now();
        c.expect_closed().await;
        in_window("v3", started.elapsed());
    };
    // Trickling the body of a PUBLISH is not activity: only complete packets count.
    let trickle = async {
        let (mut c, _) = Client::connect(addr, V5, &cid("ka-trickle"), 1).await;
        let started = Instant::now();
        let mut header = vec![0x30];
        put_varint(&mut header, 200);
        c.send_raw(&header).await;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if started.elapsed() > Duration::from_millis(1300) {
                break;
            }
            c.send_raw_lossy(b"x").await;
        }
        c.expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT).await;
        in_window("trickle", started.elapsed());
    };
    // Control: PINGREQ every 500 ms keeps the connection open well past 1.5 s.
    let pinging = async {
        let (mut c, _) = Client::connect(addr, V5, &cid("ka-ping"), 1).await;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.send(&Packet::PingReq).await;
            assert_eq!(c.recv().await, Packet::PingResp);
        }
        c.disconnect().await;
    };
    tokio::join!(v5, v3, trickle, pinging);
    assert_serves(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Resource exhaustion

/// 20,000 QoS 0 messages of 1 KiB, then a QoS 1 marker.
const FLOOD_COUNT: usize = 20_000;
const FLOOD_SIZE: usize = 1024;
/// The stalled subscriber's socket receive buffer (so the kernel holds little for it).
const STALLED_RCVBUF: u32 = 8 * 1024;

/// What [`flood_with_stalled_subscriber`] observed.
struct Flood {
    /// QoS 0 messages the normal subscriber received.
    normal_received: usize,
    /// `metrics().dropped_qos0` after the flood.
    dropped_qos0: u64,
    /// Messages the server still held for the stalled subscriber (read after the flood).
    stalled_backlog: usize,
}

/// A subscriber that never reads, a normal subscriber and a publisher flooding both. Checks that
/// the publisher keeps being served (its final QoS 1 PUBLISH is acknowledged) and that the
/// normal subscriber gets the final message; then reads what the server kept for the stalled
/// subscriber.
async fn flood_with_stalled_subscriber(server: &ferry_broker::Server) -> Flood {
    let addr = server.local_addr();
    let topic = format!("flood/{}", cid("t"));

    // The stalled subscriber subscribes, then does not read until the flood is over.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(STALLED_RCVBUF).unwrap();
    let stream = tokio::time::timeout(TIMEOUT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut stalled = Client::from_stream(stream, V3_1_1, "stalled");
    stalled
        .send(&connect_packet(V3_1_1, &cid("stalled"), 0))
        .await;
    assert!(matches!(stalled.recv().await, Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS));
    stalled.subscribe(1, &topic, QoS::AtMostOnce).await;

    // The normal subscriber (QoS 1, so the final marker cannot be dropped) counts the QoS 0
    // messages until the marker.
    let mut normal = Client::v3(addr, &cid("normal")).await;
    normal.subscribe(1, &topic, QoS::AtLeastOnce).await;
    let reader = tokio::spawn(async move {
        let mut received = 0usize;
        loop {
            match normal.recv().await {
                Packet::Publish(p) if p.qos == QoS::AtMostOnce => {
                    assert_eq!(p.payload.len(), FLOOD_SIZE);
                    received += 1;
                }
                Packet::Publish(p) => {
                    assert_eq!(&p.payload[..], b"last");
                    normal.send(&Packet::PubAck(PubAck::new(p.packet_id))).await;
                    return (received, normal);
                }
                other => panic!("normal subscriber: unexpected {other:?}"),
            }
        }
    });

    let mut publ = Client::v3(addr, &cid("flooder")).await;
    let mut flood = Vec::with_capacity(FLOOD_COUNT * (FLOOD_SIZE + 64));
    let mut payload = vec![b'p'; FLOOD_SIZE];
    for i in 0..FLOOD_COUNT {
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        flood.extend(encode(
            &publish(&topic, QoS::AtMostOnce, 0, &payload),
            V3_1_1,
        ));
    }
    let started = Instant::now();
    for chunk in flood.chunks(256 * 1024) {
        publ.send_raw(chunk).await;
    }
    publ.send(&publish(&topic, QoS::AtLeastOnce, 1, b"last"))
        .await;
    assert_eq!(publ.recv().await, Packet::PubAck(PubAck::new(1)));

    let (normal_received, normal) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("normal subscriber got the final message in time")
        .expect("normal subscriber task");
    let dropped_qos0 = server.metrics().dropped_qos0.load(Ordering::Relaxed);
    let flood_took = started.elapsed();

    // What the server kept for the stalled subscriber: read it all now.
    let mut stalled_backlog = 0usize;
    while let Some(packet) = stalled.try_recv(Duration::from_secs(1)).await {
        match packet {
            Packet::Publish(p) if p.payload.len() == FLOOD_SIZE || &p.payload[..] == b"last" => {
                stalled_backlog += 1
            }
            other => panic!("stalled subscriber: unexpected {other:?}"),
        }
    }
    eprintln!(
        "flood of {FLOOD_COUNT} took {flood_took:?}; normal subscriber got {normal_received} \
         QoS 0 messages; dropped_qos0 = {dropped_qos0}; stalled subscriber backlog = \
         {stalled_backlog} messages"
    );
    assert!(normal_received > 0);
    // Nothing is dropped that was not meant for one of the two subscribers.
    assert!(dropped_qos0 <= 2 * FLOOD_COUNT as u64, "{dropped_qos0}");

    publ.disconnect().await;
    normal.disconnect().await;
    stalled.disconnect().await;
    Flood {
        normal_received,
        dropped_qos0,
        stalled_backlog,
    }
}

/// The publisher and a normal subscriber keep working while another subscriber never reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_never_reads_does_not_stall_others() {
    let server = start(|_| {}).await;
    flood_with_stalled_subscriber(&server).await;
    assert_serves(&server).await;
    server.shutdown().await;
}

/// A subscriber that never reads loses its own QoS 0 traffic (counted in `dropped_qos0`)
/// instead of making the server buffer it: what the server holds for it is bounded by the
/// outbox limit, the write high-water mark and the kernel's socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_never_reads_is_bounded() {
    const OUTBOX_QOS0_LIMIT: usize = 1000;
    let server = start(|c| c.outbox_qos0_limit = OUTBOX_QOS0_LIMIT).await;
    let flood = flood_with_stalled_subscriber(&server).await;
    // Generous: two outbox batches, the 256 KiB write high-water mark, and a kernel send
    // buffer of up to 4 MiB (Linux's default tcp_wmem maximum) plus the 8 KiB receive buffer.
    let bound = 2 * OUTBOX_QOS0_LIMIT + (256 * 1024 + 4 * 1024 * 1024 + 16 * 1024) / FLOOD_SIZE;
    assert!(
        flood.stalled_backlog <= bound,
        "the server held {} messages ({} KiB) for a subscriber that never reads (bound {bound}); \
         dropped_qos0 = {}",
        flood.stalled_backlog,
        flood.stalled_backlog * FLOOD_SIZE / 1024,
        flood.dropped_qos0
    );
    let normal_dropped = (FLOOD_COUNT - flood.normal_received) as u64;
    assert!(
        flood.dropped_qos0 > normal_dropped,
        "the stalled subscriber's messages were not dropped (dropped_qos0 = {}, of which {} \
         were the normal subscriber's)",
        flood.dropped_qos0,
        normal_dropped
    );
    assert_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_fresh_connection() {
    let server = start(|c| c.handshake_timeout = Duration::from_secs(1)).await;
    let addr = server.local_addr();

    let mut inputs: Vec<(String, Vec<u8>)> = vec![
        ("zeros".into(), vec![0; 64]),
        ("ones".into(), vec![0xff; 64]),
        (
            "http".into(),
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        (
            "tls-client-hello".into(),
            vec![
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
            ],
        ),
    ];
    // Deterministic pseudo-random bytes (xorshift64*), several seeds and lengths.
    for seed in 1..=16u64 {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let len = 16 + (seed as usize * 257) % 4000;
        let bytes = (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect();
        inputs.push((format!("random-{seed}"), bytes));
    }
    let cases = inputs.into_iter().map(|(name, bytes)| async move {
        let mut c = Client::tcp(addr, V3_1_1, &name).await;
        c.send_raw_lossy(&bytes).await;
        c.expect_closed().await
    });
    for took in join_all(cases).await {
        assert!(took <= Duration::from_secs(3), "closed after {took:?}");
    }
    assert_serves(&server).await;
    server.shutdown().await;
}

/// Runs futures concurrently, each on its own task (no `futures` crate needed).
async fn join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("case task"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The server's answers respect the client's limits

/// A v5 client that set Maximum Packet Size must never get a bigger packet (MQTT 5
/// §3.1.2.11.4, [MQTT-3.1.2-24]); a DISCONNECT must drop its Reason String to fit
/// ([MQTT-3.1.2-25]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_respects_client_maximum_packet_size() {
    const CLIENT_MAX: u32 = 20;
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let connect = |id: &str| {
        let mut p = connect_packet(V5, id, 0);
        if let Packet::Connect(c) = &mut p {
            c.properties = ferry_codec::Props {
                maximum_packet_size: Some(CLIENT_MAX),
                ..Default::default()
            }
            .into();
        }
        p
    };
    let cases: [(Vec<u8>, ReasonCode); 2] = [
        // Refused by the core (wildcard in topic name).
        (
            encode(&publish("a/#", QoS::AtMostOnce, 0, b""), V5),
            ReasonCode::TOPIC_NAME_INVALID,
        ),
        // Refused by the connection driver (malformed UTF-8).
        (raw_publish(V5, b"\xff", b""), ReasonCode::MALFORMED_PACKET),
    ];
    for (bytes, code) in cases {
        let (mut c, ack) = Client::connect_with(addr, connect(&cid("smallmax"))).await;
        let connack_len = encode(&Packet::ConnAck(ack), V5).len();
        assert!(connack_len <= CLIENT_MAX as usize);
        c.send_raw(&bytes).await;
        let (raw, packet) = c.recv_frame().await;
        match packet {
            Packet::Disconnect(d) => assert_eq!(d.code, code),
            other => panic!("expected DISCONNECT, got {other:?}"),
        }
        assert!(
            raw.len() <= CLIENT_MAX as usize,
            "DISCONNECT of {} bytes sent to a client with maximum packet size {CLIENT_MAX}: \
             {raw:02x?}",
            raw.len()
        );
        c.expect_closed().await;
    }
    assert_serves(&server).await;
    server.shutdown().await;
}
