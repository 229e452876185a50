//! A bare MQTT connection over `ferry-codec`: packets are encoded into one write buffer and
//! written in large batches, and read with a large buffer, so one syscall carries many messages.

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ferry_codec::{decode, Connect, Packet, Protocol, ReasonCode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Free space kept in the read buffer before each read.
const READ_BUF: usize = 256 * 1024;
/// Encoded bytes gathered before writing stops taking new messages.
pub(crate) const WRITE_BATCH: usize = 64 * 1024;
/// Frames are not size-checked: the broker is trusted to send what it may.
const MAX_PACKET: u32 = u32::MAX;

/// What [`Client::step`] saw.
pub(crate) enum Step {
    /// Bytes arrived in `rbuf`: decode them with [`Client::try_decode`].
    Read,
    /// Some of `wbuf` was written, or a PINGREQ was queued.
    Wrote,
    /// The deadline passed with nothing read or written.
    Idle,
}

pub(crate) struct Client {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Encoded packets not yet written.
    pub wbuf: BytesMut,
    protocol: Protocol,
    /// Set when an MQTT 5 broker imposed a keep-alive (Server Keep Alive): PINGREQ this often.
    ping_every: Option<Duration>,
    next_ping: Option<Instant>,
}

impl Client {
    /// Opens a TCP connection, sends a CONNECT without keep-alive and waits for a successful
    /// CONNACK. With `session_expiry`, the session is persistent (MQTT 3: clean session 0;
    /// MQTT 5: that session expiry interval); otherwise it is a clean session.
    pub async fn connect(
        host: &str,
        port: u16,
        protocol: Protocol,
        client_id: &str,
        session_expiry: Option<u32>,
    ) -> Result<Client> {
        let stream = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        stream.set_nodelay(true)?;
        let mut client = Client {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUF),
            wbuf: BytesMut::with_capacity(2 * WRITE_BATCH),
            protocol,
            ping_every: None,
            next_ping: None,
        };
        let mut properties = ferry_codec::Properties::default();
        if protocol.is_v5() {
            properties.session_expiry_interval = session_expiry;
        }
        client.push(&Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: session_expiry.is_none(),
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties,
        })))?;
        client.flush().await?;
        match client.recv().await? {
            Packet::ConnAck(ack) if ack.code == ReasonCode::SUCCESS => {
                client.ping_every = ack
                    .properties
                    .server_keep_alive
                    .filter(|&secs| secs > 0)
                    .map(|secs| Duration::from_secs(u64::from(secs)) / 2);
                client.next_ping = client.ping_every.map(|every| Instant::now() + every);
                Ok(client)
            }
            Packet::ConnAck(ack) => bail!("connection refused: {}", ack.code),
            other => bail!("expected CONNACK, got {}", other.packet_type().name()),
        }
    }

    /// Appends `packet` to the write buffer.
    pub fn push(&mut self, packet: &Packet) -> Result<()> {
        packet
            .encode(self.protocol, &mut self.wbuf)
            .context("cannot encode packet")
    }

    /// Writes the whole write buffer.
    pub async fn flush(&mut self) -> Result<()> {
        self.stream.write_all_buf(&mut self.wbuf).await?;
        Ok(())
    }

    /// Takes one complete packet off the read buffer, if there is one.
    pub fn try_decode(&mut self) -> Result<Option<Packet>> {
        decode(&mut self.rbuf, self.protocol, MAX_PACKET).context("malformed packet from broker")
    }

    /// Reads until one packet is complete.
    pub async fn recv(&mut self) -> Result<Packet> {
        loop {
            if let Some(packet) = self.try_decode()? {
                return Ok(packet);
            }
            self.reserve();
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    /// Waits for the next thing to happen: a read, a (partial) write of `wbuf` when it is not
    /// empty, the keep-alive ping timer, or `deadline`.
    pub async fn step(&mut self, deadline: Instant) -> Result<Step> {
        self.reserve();
        let (mut rd, mut wr) = self.stream.split();
        let ping_at = self.next_ping;
        tokio::select! {
            res = rd.read_buf(&mut self.rbuf) => {
                if res? == 0 {
                    bail!("broker closed the connection");
                }
                Ok(Step::Read)
            }
            res = wr.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => {
                res?;
                Ok(Step::Wrote)
            }
            _ = sleep_until(ping_at), if ping_at.is_some() => {
                self.push(&Packet::PingReq)?;
                self.next_ping = self.ping_every.map(|every| Instant::now() + every);
                Ok(Step::Wrote)
            }
            _ = tokio::time::sleep_until(deadline.into()) => Ok(Step::Idle),
        }
    }

    /// Sends DISCONNECT after whatever is still buffered, and closes the write side. Bounded in
    /// time: a broker that stopped reading cannot hold the run.
    pub async fn disconnect(mut self) {
        if self.push(&Packet::Disconnect(Default::default())).is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.flush().await?;
            self.stream.shutdown().await?;
            anyhow::Ok(())
        })
        .await;
    }

    fn reserve(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < READ_BUF / 4 {
            self.rbuf.reserve(READ_BUF);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
