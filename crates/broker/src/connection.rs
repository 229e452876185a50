//! One task per connection: reads and decodes frames, runs them through the per-connection
//! state machine ([`ferry_core::Connection`]), forwards them to the router, and writes what the
//! router puts in the connection's [`Outbox`].
//!
//! Reading pauses while more than [`WRITE_HIGH_WATER`] bytes wait to be written, so a client
//! that never reads cannot make the server buffer its answers without bound.

use crate::outbox::Outbox;
use crate::router::RouterMsg;
use crate::Shared;
use bytes::BytesMut;
use ferry_codec::{
    decode, ConnAck, DecodeError, Disconnect, Packet, Properties, Protocol, ReasonCode,
};
use ferry_core::conn::{Inbound, Violation};
use ferry_core::{ConnId, Connection};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tracing::{debug, trace};

/// Stop reading from a client, and stop taking packets from its outbox, while this much output
/// is waiting for it. The outbox then fills and drops QoS 0 traffic for this client only.
pub const WRITE_HIGH_WATER: usize = 256 * 1024;
/// How long a closing connection may take to flush its last bytes.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection keeps reading (and discarding) what the client still sends,
/// so that unread input does not make the kernel reset the connection before the client has
/// read our last packets (e.g. the DISCONNECT that says why).
const LINGER: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 4096;
/// Packets taken from the outbox per lock.
const OUTBOX_BATCH: usize = 64;

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The router closed it (DISCONNECT handled, takeover, refusal, shutdown).
    ByRouter,
    /// The peer closed the socket or an I/O error happened.
    Io,
    /// We closed it for a protocol violation or a timeout.
    Violation,
    /// Server shutdown before the client finished its CONNECT.
    Shutdown,
}

struct Driver<W> {
    id: ConnId,
    conn: Connection,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    wr: W,
    wbuf: BytesMut,
    /// Reused between outbox drains.
    batch: Vec<Packet>,
    registered: bool,
    peer: SocketAddr,
}

pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    id: ConnId,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let limits = &shared.config.limits;
    let conn = Connection::new(
        Instant::now(),
        shared.config.handshake_timeout,
        limits.max_packet_size,
        limits.receive_maximum,
        limits.topic_alias_maximum,
    );
    let mut d = Driver {
        id,
        conn,
        outbox: Arc::new(Outbox::new(shared.config.outbox_qos0_limit)),
        shared,
        wr,
        wbuf: BytesMut::new(),
        batch: Vec::new(),
        registered: false,
        peer,
    };
    let mut rbuf = BytesMut::new();
    let end = loop {
        let deadline = d.conn.poll_timeout();
        let can_read = d.wbuf.len() < WRITE_HIGH_WATER;
        if can_read && rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            res = rd.read_buf(&mut rbuf), if can_read => {
                match res {
                    Ok(0) | Err(_) => break End::Io,
                    Ok(_) => {}
                }
                if let Some(end) = d.on_readable(&mut rbuf).await {
                    break end;
                }
            }
            res = d.wr.write_buf(&mut d.wbuf), if !d.wbuf.is_empty() => {
                if res.is_err() {
                    break End::Io;
                }
                // Room again: take what the outbox kept while the write buffer was full.
                if d.wbuf.len() < WRITE_HIGH_WATER && d.drain_outbox() {
                    break End::ByRouter;
                }
            }
            _ = d.outbox.ready() => {
                if d.drain_outbox() {
                    break End::ByRouter;
                }
            }
            _ = sleep_until(deadline) => {
                if let Err(v) = d.conn.handle_timeout(Instant::now()) {
                    debug!(reason = v.reason, "closing");
                    d.violation(v);
                    break End::Violation;
                }
            }
            _ = shutdown.changed(), if !d.registered => break End::Shutdown,
        }
        // Reclaim the read buffer once everything in it was consumed, so an idle connection
        // holds no buffer memory.
        if rbuf.is_empty() && rbuf.capacity() > 4 * READ_CHUNK {
            rbuf = BytesMut::new();
        }
    };
    d.finish(end, rd).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

impl<W: AsyncWrite + Unpin> Driver<W> {
    /// Decodes and handles every complete frame in `rbuf`; `Some` ends the connection.
    async fn on_readable(&mut self, rbuf: &mut BytesMut) -> Option<End> {
        loop {
            let packet = match decode(rbuf, self.conn.protocol(), self.conn.max_packet_size()) {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(e) => {
                    self.decode_error(e);
                    return Some(End::Violation);
                }
            };
            trace!(?packet, "received");
            let inbound = match self.conn.on_packet(packet, Instant::now()) {
                Ok(i) => i,
                Err(v) => {
                    self.violation(v);
                    return Some(End::Violation);
                }
            };
            match inbound {
                Inbound::Connect(connect) => {
                    if let Err(code) = self.shared.config.auth.check(&connect) {
                        debug!(?code, "authentication failed");
                        self.write(Packet::ConnAck(ConnAck {
                            code,
                            ..Default::default()
                        }));
                        return Some(End::Violation);
                    }
                    let (reply, accepted) = oneshot::channel();
                    let msg = RouterMsg::Connect {
                        conn: self.id,
                        connect,
                        outbox: self.outbox.clone(),
                        reply,
                    };
                    if self.shared.router.send(msg).await.is_err() {
                        return Some(End::Shutdown);
                    }
                    match accepted.await {
                        Ok(Some(a)) => {
                            tracing::Span::current().record("client_id", a.client_id.as_str());
                            debug!(keep_alive = a.keep_alive, "connected");
                            self.conn.accepted(a.keep_alive);
                            self.registered = true;
                        }
                        // Refused: the CONNACK and the close are in the outbox.
                        Ok(None) => {}
                        Err(_) => return Some(End::Shutdown),
                    }
                }
                Inbound::Forward(packet) => {
                    let msg = RouterMsg::Packet {
                        conn: self.id,
                        packet,
                    };
                    if self.shared.router.send(msg).await.is_err() {
                        return Some(End::Shutdown);
                    }
                }
                Inbound::Reply(packet) => self.write(packet),
            }
        }
    }

    /// Encodes `packet` into the write buffer after the connection's outbound processing.
    fn write(&mut self, mut packet: Packet) {
        self.conn.on_outbound(&mut packet);
        trace!(?packet, "sending");
        if let Err(e) = packet.encode(self.conn.protocol(), &mut self.wbuf) {
            tracing::warn!(error = %e, "cannot encode outgoing packet");
        }
    }

    /// Moves packets from the outbox into the write buffer while it is below the high-water
    /// mark; true when the router closed the connection (a close is honoured even when the
    /// buffer is full: the connection is going away and whatever is queued is dropped).
    fn drain_outbox(&mut self) -> bool {
        let mut batch = std::mem::take(&mut self.batch);
        let closed = loop {
            if self.wbuf.len() >= WRITE_HIGH_WATER {
                break self.outbox.is_closing();
            }
            let close = self.outbox.take(&mut batch, OUTBOX_BATCH);
            let taken = batch.len();
            for packet in batch.drain(..) {
                self.write(packet);
            }
            if let Some(disconnect) = close {
                if let (Some(d), true) = (disconnect, self.conn.protocol().is_v5()) {
                    self.write(Packet::Disconnect(d));
                }
                break true;
            }
            if taken < OUTBOX_BATCH {
                break false;
            }
        };
        self.batch = batch;
        closed
    }

    fn violation(&mut self, v: Violation) {
        self.shared
            .metrics
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        debug!(code = ?v.code, reason = v.reason, "protocol violation");
        if self.conn.protocol().is_v5() && self.conn.is_connected() {
            self.write(Packet::Disconnect(Disconnect {
                code: v.code,
                properties: Properties {
                    reason_string: Some(v.reason.into()),
                    ..Default::default()
                },
            }));
        }
    }

    fn decode_error(&mut self, e: DecodeError) {
        self.shared
            .metrics
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        debug!(error = %e, "malformed input");
        let code = e.reason_code();
        if self.conn.is_connected() {
            if self.conn.protocol().is_v5() {
                self.write(Packet::Disconnect(Disconnect {
                    code,
                    properties: Properties {
                        reason_string: Some(e.to_string().into()),
                        ..Default::default()
                    },
                }));
            }
        } else if code == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
            // MQTT 3.1.1 §3.1.2.2: answer an unknown protocol level with return code 1.
            let ack = Packet::ConnAck(ConnAck {
                code,
                ..Default::default()
            });
            let _ = ack.encode(Protocol::V3_1_1, &mut self.wbuf);
        }
    }

    /// Tells the router if it still knows us, flushes what is left, and closes gracefully.
    async fn finish<R: AsyncRead + Unpin>(mut self, end: End, mut rd: R) {
        debug!(?end, peer = %self.peer, "connection closing");
        if self.registered && !matches!(end, End::ByRouter) {
            let _ = self
                .shared
                .router
                .send(RouterMsg::Lost { conn: self.id })
                .await;
        }
        if !matches!(end, End::Io) {
            let wr = &mut self.wr;
            let wbuf = &mut self.wbuf;
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
                wr.write_all_buf(wbuf).await?;
                wr.shutdown().await
            })
            .await;
            // Discard what the client still sends until it closes too (or LINGER passes).
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}
