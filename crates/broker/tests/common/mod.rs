//! Helpers for the `ferry-broker` integration tests: start a real server on an ephemeral port,
//! talk raw bytes to it over TCP, decode its answers with `ferry_codec`, and check that it still
//! serves well-behaved clients. Every read is bounded by a timeout so no test can hang.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use ferry_broker::{Config, Server};
use ferry_codec::{
    decode, peek_frame, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, PubAck,
    Publish, QoS, ReasonCode, SubOptions, Subscribe,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client's byte stream: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The bound on every single read (and on "is it closed yet").
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts a server on 127.0.0.1:0 after `tweak` adjusted the default configuration.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    tweak(&mut config);
    Server::start(config).await.expect("server starts")
}

/// A client id unique within this test process.
pub fn cid(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Appends a variable byte integer.
pub fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

/// A raw frame: first byte, remaining length, body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    put_varint(&mut f, body.len() as u32);
    f.extend_from_slice(body);
    f
}

/// A length-prefixed string or binary field.
pub fn field(data: &[u8]) -> Vec<u8> {
    let mut f = (data.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(data);
    f
}

/// Encodes `packet` for `protocol`.
pub fn encode(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut buf = BytesMut::new();
    packet.encode(protocol, &mut buf).expect("encodable");
    buf.to_vec()
}

pub fn connect_packet(protocol: Protocol, client_id: &str, keep_alive: u16) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: true,
        keep_alive,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }))
}

pub fn publish(topic: &str, qos: QoS, packet_id: u16, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: topic.into(),
        packet_id,
        payload: Bytes::copy_from_slice(payload),
        ..Default::default()
    })
}

pub fn subscribe(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                ..Default::default()
            },
        )],
        properties: Properties::default(),
    })
}

/// A raw client (over TCP or TLS) that speaks `protocol` when it decodes the server's answers.
pub struct Client {
    pub stream: Box<dyn Io>,
    pub protocol: Protocol,
    rbuf: BytesMut,
    name: String,
}

impl Client {
    /// A bare TCP connection (nothing sent yet); answers are decoded as `protocol`.
    pub async fn tcp(addr: SocketAddr, protocol: Protocol, name: &str) -> Client {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("{name}: TCP connect timed out"))
            .unwrap_or_else(|e| panic!("{name}: TCP connect failed: {e}"));
        Self::from_stream(stream, protocol, name)
    }

    /// Wraps an already connected stream (nothing sent yet).
    pub fn from_stream(stream: TcpStream, protocol: Protocol, name: &str) -> Client {
        stream.set_nodelay(true).unwrap();
        Self::over(Box::new(stream), protocol, name)
    }

    /// Wraps any connected byte stream, e.g. a TLS session (nothing sent yet).
    pub fn over(stream: Box<dyn Io>, protocol: Protocol, name: &str) -> Client {
        Client {
            stream,
            protocol,
            rbuf: BytesMut::new(),
            name: name.to_string(),
        }
    }

    /// Sends `connect` on this (fresh) connection and reads the (successful) CONNACK.
    pub async fn handshake(&mut self, connect: &Packet) -> ConnAck {
        self.send(connect).await;
        match self.recv().await {
            Packet::ConnAck(ack) => {
                assert_eq!(
                    ack.code,
                    ReasonCode::SUCCESS,
                    "{}: CONNACK {ack:?}",
                    self.name
                );
                ack
            }
            other => panic!("{}: expected CONNACK, got {other:?}", self.name),
        }
    }

    /// Connects with `client_id` and keep-alive 0, and returns the client and its CONNACK
    /// (which must be a success).
    pub async fn connect(
        addr: SocketAddr,
        protocol: Protocol,
        client_id: &str,
        keep_alive: u16,
    ) -> (Client, ConnAck) {
        Self::connect_with(addr, connect_packet(protocol, client_id, keep_alive)).await
    }

    /// Sends `connect` and reads the (successful) CONNACK.
    pub async fn connect_with(addr: SocketAddr, connect: Packet) -> (Client, ConnAck) {
        let Packet::Connect(c) = &connect else {
            panic!("not a CONNECT: {connect:?}");
        };
        let mut client = Client::tcp(addr, c.protocol, c.client_id.as_str()).await;
        let ack = client.handshake(&connect).await;
        (client, ack)
    }

    pub async fn v5(addr: SocketAddr, client_id: &str) -> Client {
        Self::connect(addr, Protocol::V5, client_id, 0).await.0
    }

    pub async fn v3(addr: SocketAddr, client_id: &str) -> Client {
        Self::connect(addr, Protocol::V3_1_1, client_id, 0).await.0
    }

    pub async fn send(&mut self, packet: &Packet) {
        let bytes = encode(packet, self.protocol);
        self.send_raw(&bytes).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("{}: write timed out", self.name))
            .unwrap_or_else(|e| panic!("{}: write failed: {e}", self.name));
    }

    /// Writes `bytes` ignoring errors (the server may already have closed).
    pub async fn send_raw_lossy(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes)).await;
    }

    /// The next packet and its exact bytes, or `None` if nothing complete arrived within
    /// `wait`. Panics if the connection closes or the bytes do not decode.
    pub async fn try_recv_frame(&mut self, wait: Duration) -> Option<(Bytes, Packet)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(size) = peek_frame(&self.rbuf, u32::MAX)
                .unwrap_or_else(|e| panic!("{}: undecodable header: {e}", self.name))
            {
                if self.rbuf.len() >= size {
                    let raw = Bytes::copy_from_slice(&self.rbuf[..size]);
                    let packet = decode(&mut self.rbuf, self.protocol, u32::MAX)
                        .unwrap_or_else(|e| panic!("{}: undecodable {raw:02x?}: {e}", self.name))
                        .expect("complete frame");
                    return Some((raw, packet));
                }
            }
            self.rbuf.reserve(64 * 1024);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return None,
                Ok(Ok(0)) => panic!(
                    "{}: connection closed while waiting for a packet (buffered: {:02x?})",
                    self.name,
                    &self.rbuf[..]
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: read error while waiting for a packet: {e}", self.name),
            }
        }
    }

    pub async fn try_recv(&mut self, wait: Duration) -> Option<Packet> {
        self.try_recv_frame(wait).await.map(|(_, p)| p)
    }

    /// The next packet and its bytes; panics after [`TIMEOUT`].
    pub async fn recv_frame(&mut self) -> (Bytes, Packet) {
        match self.try_recv_frame(TIMEOUT).await {
            Some(x) => x,
            None => panic!("{}: no packet within {TIMEOUT:?}", self.name),
        }
    }

    pub async fn recv(&mut self) -> Packet {
        self.recv_frame().await.1
    }

    /// Asserts that nothing arrives for `wait` (and the connection stays open).
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(p) = self.try_recv(wait).await {
            panic!("{}: expected nothing, got {p:?}", self.name);
        }
    }

    /// Asserts that the server closes the connection (EOF or reset) within [`TIMEOUT`] without
    /// sending anything (more); returns how long it took.
    pub async fn expect_closed(&mut self) -> Duration {
        let started = Instant::now();
        assert!(
            self.rbuf.is_empty(),
            "{}: unexpected bytes before close: {:02x?}",
            self.name,
            &self.rbuf[..]
        );
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(TIMEOUT, self.stream.read(&mut buf)).await {
            Err(_) => panic!("{}: connection still open after {TIMEOUT:?}", self.name),
            Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
            Ok(Ok(n)) => panic!(
                "{}: expected the connection to close, got {:02x?}",
                self.name,
                &buf[..n]
            ),
        }
    }

    /// Expects exactly a DISCONNECT with `code` (MQTT 5), then the close.
    pub async fn expect_disconnect(&mut self, code: ReasonCode) -> Disconnect {
        match self.recv().await {
            Packet::Disconnect(d) => {
                assert_eq!(d.code, code, "{}: DISCONNECT {d:?}", self.name);
                self.expect_closed().await;
                d
            }
            other => panic!("{}: expected DISCONNECT {code:?}, got {other:?}", self.name),
        }
    }

    /// Subscribes to one filter and checks the SUBACK grants `qos`.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) {
        self.send(&subscribe(packet_id, filter, qos)).await;
        match self.recv().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                assert_eq!(ack.codes, vec![ReasonCode(qos as u8)], "{}", self.name);
            }
            other => panic!("{}: expected SUBACK, got {other:?}", self.name),
        }
    }

    /// Sends a clean DISCONNECT and waits for the server to close.
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Disconnect::default())).await;
        self.expect_closed().await;
    }
}

/// Checks that the server still serves a well-behaved client: a fresh MQTT 5 client connects,
/// subscribes at QoS 1, publishes QoS 1 to itself, and gets both the PUBACK and its message.
pub async fn assert_serves(server: &Server) {
    let addr = server.local_addr();
    let id = cid("health");
    let topic = format!("health/{id}");
    let mut c = Client::v5(addr, &id).await;
    c.subscribe(1, &topic, QoS::AtLeastOnce).await;
    c.send(&publish(&topic, QoS::AtLeastOnce, 2, b"still alive"))
        .await;
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        match c.recv().await {
            Packet::PubAck(a) if a.packet_id == 2 && !acked => {
                assert_eq!(a.code, ReasonCode::SUCCESS);
                acked = true;
            }
            Packet::Publish(p) if !delivered => {
                assert_eq!(p.topic.as_str(), topic);
                assert_eq!(&p.payload[..], b"still alive");
                assert_eq!(p.qos, QoS::AtLeastOnce);
                c.send(&Packet::PubAck(PubAck::new(p.packet_id))).await;
                delivered = true;
            }
            other => panic!("health check: unexpected {other:?}"),
        }
    }
    c.disconnect().await;
}
