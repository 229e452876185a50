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

/// A server, a v3 subscriber to `{name}/t` and a publisher.
async fn relay(name: &str) -> (ferry_broker::Server, Client, Client) {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut sub = Client::v3(addr, &cid(&format!("{name}-sub"))).await;
    sub.subscribe(1, &format!("{name}/t"), ferry_codec::QoS::AtMostOnce)
        .await;
    let publisher = Client::v3(addr, &cid(&format!("{name}-pub"))).await;
    (server, sub, publisher)
}

/// `count` payloads, payload `i` of `sizes[i % len]` bytes in a pattern of its own.
fn payloads(sizes: &[usize], count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            (0..sizes[i % sizes.len()])
                .map(|j| (i * 31 + j * 7) as u8)
                .collect()
        })
        .collect()
}

/// The QoS 0 PUBLISHes of `payloads` to `topic`, encoded back to back.
fn encode_all(topic: &str, payloads: &[Vec<u8>]) -> Vec<u8> {
    use ferry_codec::QoS;
    let mut bytes = Vec::new();
    for p in payloads {
        let packet = common::publish(topic, QoS::AtMostOnce, 0, p);
        bytes.extend(common::encode(&packet, Protocol::V3_1_1));
    }
    bytes
}

/// Every payload arrives whole and in order, and nothing after them.
async fn expect_payloads(sub: &mut Client, payloads: &[Vec<u8>]) {
    for (i, want) in payloads.iter().enumerate() {
        match sub.recv().await {
            ferry_codec::Packet::Publish(p) => {
                assert_eq!(p.payload.len(), want.len(), "message {i}: length");
                assert!(p.payload[..] == want[..], "message {i}: content");
            }
            other => panic!("message {i}: expected PUBLISH, got {other:?}"),
        }
    }
    sub.expect_silence(Duration::from_millis(200)).await;
}

/// A quiet connection reads through a buffer shared by the worker thread and keeps only what
/// arrived; a read that fills it switches the connection to its own buffer. Packets that
/// arrive in pieces of every size around that switch (1 byte, across frame boundaries, exactly
/// the shared buffer, one more), with pauses so each piece is a read of its own, must still
/// arrive whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_arriving_in_pieces_of_any_size_are_read_whole_and_in_order() {
    let (server, mut sub, mut publisher) = relay("piece").await;
    let messages = payloads(&[3, 4_090, 4_096, 9_000, 60, 0, 100], 40);
    let bytes = encode_all("piece/t", &messages);
    let pieces = [1usize, 4_095, 4_096, 4_097, 2, 37, 8_192, 5, 12_000];
    let (mut at, mut k) = (0, 0);
    while at < bytes.len() {
        let n = pieces[k % pieces.len()].min(bytes.len() - at);
        publisher.send_raw(&bytes[at..at + n]).await;
        at += n;
        k += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    expect_payloads(&mut sub, &messages).await;
    server.shutdown().await;
}

/// Large payloads are written from the message's own buffer, next to small packets copied into
/// the write buffer. A subscriber that does not read for a while makes the socket take them
/// piecemeal (partial vectored writes); every message must still arrive whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_small_messages_arrive_whole_and_in_order_through_partial_writes() {
    let (server, mut sub, mut publisher) = relay("big").await;
    // ~15 MB: more than the kernel's socket buffers take while the subscriber is not reading.
    let messages = payloads(&[10, 5_000, 1_024, 1_023, 200_000, 3, 150_000], 300);
    publisher.send_raw(&encode_all("big/t", &messages)).await;
    // Not reading yet: the server's writes to this subscriber fill the socket and stop part-way.
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect_payloads(&mut sub, &messages).await;
    server.shutdown().await;
}
