//! MQTT over WebSocket at the byte level: the opening handshake and its refusals, frames cut
//! anywhere, control frames, and what a client must not send. A raw client written here
//! (masks its frames as RFC 6455 asks) against a real server.

mod common;

use common::{connect_packet, encode, publish, start, subscribe, TIMEOUT};
use ferry_broker::Server;
use ferry_codec::{decode, Packet, Protocol, QoS};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn ws_server() -> Server {
    start(|c| {
        c.ws = Some("127.0.0.1:0".parse().unwrap());
        c.handshake_timeout = Duration::from_secs(2);
    })
    .await
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `req` and reads the HTTP answer's head; the stream is left after it.
async fn http(server: &Server, req: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(server.ws_addr().unwrap()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut b))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(n, 1, "closed before the end of the answer: {head:?}");
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

/// A client frame: final, masked with a fixed key.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame: (opcode, payload). Server frames are never masked.
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h[1] & 0x80, 0, "a server frame is not masked");
        let len = match h[1] & 0x7F {
            126 => s.read_u16().await.unwrap() as usize,
            127 => s.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await.unwrap();
        (h[0] & 0x0F, p)
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("a frame in time")
}

/// Reads MQTT packets out of binary frames until one is complete.
async fn read_packet(s: &mut TcpStream, buf: &mut bytes::BytesMut) -> Packet {
    loop {
        if let Some(p) = decode(buf, Protocol::V5, 1 << 20).unwrap() {
            return p;
        }
        let (op, payload) = read_frame(s).await;
        assert_eq!(op, 2, "binary frames only");
        buf.extend_from_slice(&payload);
    }
}

async fn expect_closed(s: &mut TcpStream) {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(TIMEOUT, s.read(&mut b)).await {
            Err(_) => panic!("still open"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_answers_with_the_accept_key_and_the_mqtt_subprotocol() {
    let server = ws_server().await;
    let (_, head) = http(
        &server,
        &request("/mqtt", "Sec-WebSocket-Protocol: other, mqtt\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // RFC 6455 §1.3's example key and answer.
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    assert!(head.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{head}");
    // No subprotocol offered: served without one; MQTT 3.1's name is accepted too.
    let (_, head) = http(&server, &request("/mqtt?x=1", "")).await;
    assert!(
        head.starts_with("HTTP/1.1 101 ") && !head.contains("Sec-WebSocket-Protocol"),
        "{head}"
    );
    let (_, head) = http(
        &server,
        &request("/mqtt", "Sec-WebSocket-Protocol: mqttv3.1\r\n"),
    )
    .await;
    assert!(
        head.contains("Sec-WebSocket-Protocol: mqttv3.1\r\n"),
        "{head}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_get_an_http_error_and_are_closed() {
    let server = ws_server().await;
    let cases = [
        (request("/other", ""), "404"),
        (request("/mqtt", "").replacen("GET", "POST", 1), "405"),
        (
            request("/mqtt", "").replace("Upgrade: websocket\r\n", ""),
            "426",
        ),
        (
            request("/mqtt", "").replace("Version: 13", "Version: 8"),
            "426",
        ),
        (request("/mqtt", "").replace(KEY, "short"), "400"),
        (
            request("/mqtt", "Sec-WebSocket-Protocol: chat, superchat\r\n"),
            "400",
        ),
        ("NOT HTTP AT ALL\r\n\r\n".to_string(), "400"),
    ];
    for (req, code) in cases {
        let (mut s, head) = http(&server, &req).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {code} ")),
            "{req:?} -> {head}"
        );
        expect_closed(&mut s).await;
    }
    // A request that never ends is cut at the handshake timeout.
    let mut s = TcpStream::connect(server.ws_addr().unwrap()).await.unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\n").await.unwrap();
    expect_closed(&mut s).await;
    common::assert_serves(&server).await;
    server.shutdown().await;
}

/// MQTT packets in frames cut at every place: several packets in one frame, one packet over
/// several frames, continuation frames, a ping in between; the answers come back in binary
/// frames and the ping gets its pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_cross_frames_cut_anywhere() {
    let server = ws_server().await;
    let (mut s, head) = http(&server, &request("/mqtt", "")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut bytes = encode(&connect_packet(Protocol::V5, "ws-cut", 0), Protocol::V5);
    bytes.extend(encode(
        &subscribe(1, "ws/t", QoS::AtLeastOnce),
        Protocol::V5,
    ));
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
    bytes.extend(encode(
        &publish("ws/t", QoS::AtLeastOnce, 2, &big),
        Protocol::V5,
    ));
    // Frames of 1, 2, 3, ... bytes, each sent in two writes, a ping after the third.
    let mut wire = Vec::new();
    let (mut at, mut size, mut first) = (0, 1, true);
    while at < bytes.len() {
        let end = (at + size).min(bytes.len());
        wire.extend(frame(if first { 2 } else { 0 }, &bytes[at..end]));
        if size == 3 {
            wire.extend(frame(0x9, b"are you there"));
        }
        first = false;
        at = end;
        size += 1;
    }
    for piece in wire.chunks(997) {
        s.write_all(piece).await.unwrap();
    }
    let mut buf = bytes::BytesMut::new();
    let (op, payload) = read_frame(&mut s).await;
    assert_eq!((op, payload.as_slice()), (0xA, &b"are you there"[..]));
    let got: Vec<Packet> = [
        read_packet(&mut s, &mut buf).await,
        read_packet(&mut s, &mut buf).await,
        read_packet(&mut s, &mut buf).await,
        read_packet(&mut s, &mut buf).await,
    ]
    .into();
    assert!(matches!(got[0], Packet::ConnAck(_)), "{:?}", got[0]);
    assert!(matches!(got[1], Packet::SubAck(_)), "{:?}", got[1]);
    let delivered = got.iter().find_map(|p| match p {
        Packet::Publish(p) => Some(p.payload.to_vec()),
        _ => None,
    });
    assert_eq!(delivered.as_deref(), Some(&big[..]));
    assert!(got
        .iter()
        .any(|p| matches!(p, Packet::PubAck(a) if a.packet_id == 2)));

    // A close frame is answered with a close frame, then the connection ends.
    s.write_all(&frame(0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let (op, payload) = read_frame(&mut s).await;
    assert_eq!((op, payload), (0x8, 1000u16.to_be_bytes().to_vec()));
    expect_closed(&mut s).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_unmasked_frames_close_the_connection() {
    let server = ws_server().await;
    let connect = encode(&connect_packet(Protocol::V5, "ws-text", 0), Protocol::V5);
    let mut unmasked = vec![0x82, connect.len() as u8];
    unmasked.extend(&connect);
    for bad in [frame(0x1, &connect), unmasked, frame(0x3, b"?")] {
        let (mut s, head) = http(&server, &request("/mqtt", "")).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        s.write_all(&bad).await.unwrap();
        expect_closed(&mut s).await;
    }
    common::assert_serves(&server).await;
    server.shutdown().await;
}
