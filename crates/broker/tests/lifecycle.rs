//! Server lifecycle over real sockets: graceful shutdown and session takeover.

mod common;

use common::{cid, start, Client};
use ferry_codec::{Protocol, ReasonCode};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_disconnects_clients_with_0x8b_and_stops_accepting() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut v5 = Client::v5(addr, &cid("shut5")).await;
    let mut v3 = Client::v3(addr, &cid("shut3")).await;
    // A connection that never sent CONNECT is closed too.
    let mut silent = Client::tcp(addr, Protocol::V5, "silent").await;

    let shutdown = tokio::spawn(server.shutdown());
    v5.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    v5.expect_closed().await;
    v3.expect_closed().await;
    silent.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes within the grace period")
        .expect("shutdown task");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let id = cid("takeover");
    let mut first = Client::v5(addr, &id).await;
    let mut second = Client::v5(addr, &id).await;
    first
        .expect_disconnect(ReasonCode::SESSION_TAKEN_OVER)
        .await;
    first.expect_closed().await;
    // The new connection is the live one.
    second
        .subscribe(1, "takeover/t", ferry_codec::QoS::AtLeastOnce)
        .await;
    common::assert_serves(&server).await;
    server.shutdown().await;
}

/// A client may send packets right behind its CONNECT, in the same TCP segment: the CONNACK
/// must still be the first packet it gets back (a PINGRESP answered by the connection itself
/// once overtook the CONNACK that the router queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_pipelined_behind_connect_are_answered_after_the_connack() {
    use common::{connect_packet, encode, subscribe};
    use ferry_codec::{Packet, QoS};
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for protocol in [Protocol::V3_1_1, Protocol::V5] {
        let mut client = Client::tcp(addr, protocol, "pipelined").await;
        let mut bytes = encode(&connect_packet(protocol, &cid("pipe"), 30), protocol);
        bytes.extend(encode(&Packet::PingReq, protocol));
        bytes.extend(encode(&subscribe(7, "pipe/t", QoS::AtLeastOnce), protocol));
        bytes.extend(encode(&Packet::PingReq, protocol));
        client.send_raw(&bytes).await;
        let got: Vec<Packet> = [
            client.recv().await,
            client.recv().await,
            client.recv().await,
            client.recv().await,
        ]
        .into();
        assert!(
            matches!(&got[0], Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS),
            "{protocol:?}: first answer {:?}",
            got[0]
        );
        let pings = got.iter().filter(|p| matches!(p, Packet::PingResp)).count();
        let subacks = got
            .iter()
            .filter(|p| matches!(p, Packet::SubAck(_)))
            .count();
        assert_eq!((pings, subacks), (2, 1), "{protocol:?}: {got:?}");
    }
    server.shutdown().await;
}

/// A subscriber acknowledges what one read brought it in one write. The connection hands such
/// runs of PUBACKs to the router as one message: each must still free its slot in the
/// inflight window, and a packet behind them (here DISCONNECT) must not overtake them, or the
/// persistent session would get acknowledged messages again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_in_a_row_all_apply_before_what_follows_them() {
    use common::{connect_packet, encode, publish};
    use ferry_codec::{Disconnect, Packet, PubAck, QoS};
    const MESSAGES: usize = 150;
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let id = cid("acks");
    let persistent = |client_id: &str| {
        let mut c = connect_packet(Protocol::V3_1_1, client_id, 0);
        if let Packet::Connect(connect) = &mut c {
            connect.clean_start = false;
        }
        c
    };
    let (mut sub, _) = Client::connect_with(addr, persistent(&id)).await;
    sub.subscribe(1, "acks/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::v3(addr, &cid("acks-pub")).await;
    let mut bytes = Vec::new();
    for i in 0..MESSAGES {
        let payload = format!("m{i}");
        let p = publish(
            "acks/t",
            QoS::AtLeastOnce,
            (i + 1) as u16,
            payload.as_bytes(),
        );
        bytes.extend(encode(&p, Protocol::V3_1_1));
    }
    publisher.send_raw(&bytes).await;
    let mut received = Vec::new();
    let mut last_write = false;
    while !last_write {
        // Everything the window lets through, then all its PUBACKs in one write (more than one
        // run's worth when the window is larger than a run).
        let mut ids = Vec::new();
        while let Some(p) = sub.try_recv(Duration::from_millis(300)).await {
            let Packet::Publish(p) = p else {
                panic!("expected PUBLISH, got {p:?}");
            };
            received.push(String::from_utf8(p.payload.to_vec()).unwrap());
            ids.push(p.packet_id);
        }
        assert!(
            !ids.is_empty(),
            "nothing more after {} messages",
            received.len()
        );
        let mut acks = Vec::new();
        for id in ids {
            acks.extend(encode(&Packet::PubAck(PubAck::new(id)), Protocol::V3_1_1));
        }
        last_write = received.len() == MESSAGES;
        if last_write {
            acks.extend(encode(
                &Packet::Disconnect(Disconnect::default()),
                Protocol::V3_1_1,
            ));
        }
        sub.send_raw(&acks).await;
    }
    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(received, expected);
    sub.expect_closed().await;
    // Every message was acknowledged before the DISCONNECT: nothing comes again.
    let (mut again, ack) = Client::connect_with(addr, persistent(&id)).await;
    assert!(ack.session_present);
    again.expect_silence(Duration::from_millis(500)).await;
    server.shutdown().await;
}

/// Large payloads are written from the message's own buffer, next to small packets copied into
/// the write buffer. A subscriber that does not read for a while makes the socket take them
/// piecemeal (partial vectored writes); every message must still arrive whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_small_messages_arrive_whole_and_in_order_through_partial_writes() {
    use common::{encode, publish};
    use ferry_codec::{Packet, QoS};
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut sub = Client::v3(addr, &cid("big-sub")).await;
    sub.subscribe(1, "big/t", QoS::AtMostOnce).await;
    let mut publisher = Client::v3(addr, &cid("big-pub")).await;
    let sizes = [10usize, 5_000, 1_024, 1_023, 200_000, 3, 150_000];
    let payload = |i: usize| -> Vec<u8> {
        let size = sizes[i % sizes.len()];
        (0..size).map(|j| (i * 31 + j * 7) as u8).collect()
    };
    // ~15 MB: more than the kernel's socket buffers take while the subscriber is not reading.
    const MESSAGES: usize = 300;
    let mut bytes = Vec::new();
    for i in 0..MESSAGES {
        let p = publish("big/t", QoS::AtMostOnce, 0, &payload(i));
        bytes.extend(encode(&p, Protocol::V3_1_1));
    }
    publisher.send_raw(&bytes).await;
    // Not reading yet: the server's writes to this subscriber fill the socket and stop part-way.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for i in 0..MESSAGES {
        match sub.recv().await {
            Packet::Publish(p) => {
                assert_eq!(p.payload.len(), payload(i).len(), "message {i}: length");
                assert!(p.payload[..] == payload(i)[..], "message {i}: content");
            }
            other => panic!("message {i}: expected PUBLISH, got {other:?}"),
        }
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}
