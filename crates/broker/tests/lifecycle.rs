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
