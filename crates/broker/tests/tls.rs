//! MQTT over TLS: the TLS listener next to the TCP one, on one broker. Real TLS (rustls, with
//! a certificate made here by rcgen that the clients trust), real sockets, raw MQTT packets.

mod common;

use common::{cid, connect_packet, encode, publish, start, Client, TIMEOUT};
use ferry_broker::{Config, Server, TlsListener};
use ferry_codec::{Packet, Protocol, PubAck, QoS, ReasonCode};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// A server certificate and a client that trusts it.
struct Pki {
    server: rustls::ServerConfig,
    client: tokio_rustls::TlsConnector,
}

fn pki() -> Pki {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pki {
        server,
        client: tokio_rustls::TlsConnector::from(Arc::new(client)),
    }
}

/// A server with a TCP and a TLS listener, both on 127.0.0.1:0.
async fn start_tls(pki: &Pki, tweak: impl FnOnce(&mut Config)) -> Server {
    let tls = TlsListener::new("127.0.0.1:0".parse().unwrap(), pki.server.clone());
    start(|c| {
        c.tls = Some(tls);
        tweak(c);
    })
    .await
}

/// A TLS connection to the server's TLS listener, handshake done, nothing sent yet.
async fn tls_client(server: &Server, pki: &Pki, protocol: Protocol, name: &str) -> Client {
    let addr = server.tls_addr().expect("a TLS listener");
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    tcp.set_nodelay(true).unwrap();
    let host = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(TIMEOUT, pki.client.connect(host, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    Client::over(Box::new(tls), protocol, name)
}

/// A connected MQTT client over TLS.
async fn tls_connected(server: &Server, pki: &Pki, protocol: Protocol, client_id: &str) -> Client {
    let mut c = tls_client(server, pki, protocol, client_id).await;
    c.handshake(&connect_packet(protocol, client_id, 0)).await;
    c
}

/// Reads (and ignores, e.g. a TLS alert) until the server closes; how long that took.
async fn wait_for_close(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {TIMEOUT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Publishes at QoS 1 and waits for the PUBACK.
async fn publish_acked(c: &mut Client, topic: &str, id: u16, payload: &[u8]) {
    c.send(&publish(topic, QoS::AtLeastOnce, id, payload)).await;
    match c.recv().await {
        Packet::PubAck(a) => assert_eq!((a.packet_id, a.code), (id, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK {id}, got {other:?}"),
    }
}

/// Receives one QoS 1 message, acknowledges it, and returns its topic and payload.
async fn receive_acked(c: &mut Client) -> (String, Vec<u8>) {
    match c.recv().await {
        Packet::Publish(p) => {
            assert_eq!(p.qos, QoS::AtLeastOnce);
            c.send(&Packet::PubAck(PubAck::new(p.packet_id))).await;
            (p.topic.to_string(), p.payload.to_vec())
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Payloads from empty to larger than a TLS record (16 KiB) several times over.
fn payloads() -> Vec<Vec<u8>> {
    [0usize, 1, 100, 16_384, 16_385, 100_000]
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tcp_clients_exchange_messages_both_ways() {
    let pki = pki();
    let server = start_tls(&pki, |_| {}).await;
    assert_ne!(server.tls_addr(), Some(server.local_addr()));
    let mut tls_sub = tls_connected(&server, &pki, Protocol::V5, &cid("tls-sub")).await;
    tls_sub.subscribe(1, "x/tls", QoS::AtLeastOnce).await;
    let mut tcp_sub = Client::v3(server.local_addr(), &cid("tcp-sub")).await;
    tcp_sub.subscribe(1, "x/tcp", QoS::AtLeastOnce).await;
    let mut tcp_pub = Client::v5(server.local_addr(), &cid("tcp-pub")).await;
    let mut tls_pub = tls_connected(&server, &pki, Protocol::V3_1_1, &cid("tls-pub")).await;

    for (i, payload) in payloads().iter().enumerate() {
        let id = i as u16 + 1;
        publish_acked(&mut tcp_pub, "x/tls", id, payload).await;
        assert_eq!(
            receive_acked(&mut tls_sub).await,
            ("x/tls".to_string(), payload.clone()),
            "TCP -> TLS, {} bytes",
            payload.len()
        );
        publish_acked(&mut tls_pub, "x/tcp", id, payload).await;
        assert_eq!(
            receive_acked(&mut tcp_sub).await,
            ("x/tcp".to_string(), payload.clone()),
            "TLS -> TCP, {} bytes",
            payload.len()
        );
    }
    assert_eq!(server.metrics().connections.load(Ordering::Relaxed), 4);

    // Shutdown reaches the TLS clients as it does the TCP ones.
    let shutdown = tokio::spawn(server.shutdown());
    tls_sub
        .expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes")
        .unwrap();
}

/// Thousands of packets in one write each way: what TLS decrypts ahead of the broker's reads
/// must be read too, though no more bytes arrive on the socket to wake the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_packets_cross_tls_whole_and_in_order() {
    const N: usize = 3000;
    let pki = pki();
    let server = start_tls(&pki, |c| c.outbox_qos0_limit = 10 * N).await;
    let mut tls_sub = tls_connected(&server, &pki, Protocol::V5, &cid("burst-tls-sub")).await;
    tls_sub.subscribe(1, "b/tls", QoS::AtMostOnce).await;
    let mut tcp_sub = Client::v5(server.local_addr(), &cid("burst-tcp-sub")).await;
    tcp_sub.subscribe(1, "b/tcp", QoS::AtMostOnce).await;
    let mut tcp_pub = Client::v5(server.local_addr(), &cid("burst-tcp-pub")).await;
    let mut tls_pub = tls_connected(&server, &pki, Protocol::V5, &cid("burst-tls-pub")).await;

    let burst = |topic: &str| -> Vec<u8> {
        let mut bytes = Vec::new();
        for i in 0..N {
            let payload = format!("{i:06}-").repeat(1 + i % 150);
            bytes.extend(encode(
                &publish(topic, QoS::AtMostOnce, 0, payload.as_bytes()),
                Protocol::V5,
            ));
        }
        bytes
    };
    let to_tls = burst("b/tls");
    let to_tcp = burst("b/tcp");
    let sending = async {
        tcp_pub.send_raw(&to_tls).await;
        tls_pub.send_raw(&to_tcp).await;
        tls_pub.stream.flush().await.unwrap();
    };
    let receiving = async {
        for sub in [&mut tls_sub, &mut tcp_sub] {
            for i in 0..N {
                match sub.recv().await {
                    Packet::Publish(p) => {
                        assert_eq!(p.payload, format!("{i:06}-").repeat(1 + i % 150), "#{i}")
                    }
                    other => panic!("#{i}: expected PUBLISH, got {other:?}"),
                }
            }
        }
    };
    tokio::join!(sending, receiving);
    server.shutdown().await;
}

/// A client that speaks plain MQTT to the TLS port, and one that says nothing at all, are
/// closed, and their connection slots are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_close_the_connection_and_free_its_slot() {
    let pki = pki();
    let server = start_tls(&pki, |c| {
        c.max_connections = 1;
        c.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = server.tls_addr().unwrap();

    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(&encode(
            &connect_packet(Protocol::V5, "plain", 0),
            Protocol::V5,
        ))
        .await
        .unwrap();
    wait_for_close(&mut plain).await;

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let took = wait_for_close(&mut silent).await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );

    // With max_connections = 1, this works only if both slots came back.
    let deadline = Instant::now() + TIMEOUT;
    while server.metrics().connections.load(Ordering::Relaxed) != 0 {
        assert!(
            Instant::now() < deadline,
            "connections never went back to 0"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = tls_connected(&server, &pki, Protocol::V5, &cid("after")).await;
    c.subscribe(1, "after/t", QoS::AtMostOnce).await;
    assert_eq!(server.metrics().connections.load(Ordering::Relaxed), 1);
    server.shutdown().await;
}
