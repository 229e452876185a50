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
    decode, ByteStr, ConnAck, DecodeError, Disconnect, Packet, Protocol, PubAck, QoS, ReasonCode,
};
use ferry_core::conn::{Inbound, Violation};
use ferry_core::{ClientGrant, ConnId, Connection, Permissions};
use ferry_meta::auth::{HeldToken, TokenType};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
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
/// What an idle connection reserves to read into: enough for a PINGREQ or a small PUBLISH. A
/// read that fills it switches the connection to `READ_CHUNK`s until it is idle again, so an
/// idle connection holds a few dozen bytes of buffer, not kilobytes.
const READ_IDLE: usize = 64;
/// A connection that wrote nothing for this long gives its write buffer back (at its next
/// event, typically a PINGREQ).
const WRITE_IDLE: Duration = Duration::from_secs(1);
/// How often a Token-mode connection re-checks its tokens (revocation, expiry).
const TOKEN_CHECK: Duration = Duration::from_secs(1);
/// The expiry notice goes out this long before a token expires (§2).
const TOKEN_EXPIRY_NOTICE_MS: u64 = 5 * 60 * 1000;
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
    /// The instance's router, once CONNECT was accepted.
    router: Option<mpsc::Sender<RouterMsg>>,
    instance: String,
    /// Tokens held by a Token-mode connection, re-checked every second.
    tokens: Vec<HeldToken>,
    expiry_noticed: Vec<bool>,
    /// QoS 2 packet ids of `$SYS/uploadToken` messages answered here, awaiting PUBREL.
    local_qos2: Vec<u16>,
    /// For status events (§5), once the CONNECT was accepted: the client id and this
    /// connection's channel id.
    status: Option<(String, String)>,
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
        router: None,
        instance: String::new(),
        tokens: Vec::new(),
        expiry_noticed: Vec::new(),
        local_qos2: Vec::new(),
        status: None,
    };
    // Token-mode connections re-check their tokens every TOKEN_CHECK, on the same timer as
    // the protocol deadlines (no second timer per connection).
    let mut next_token_check: Option<Instant> = None;
    let mut rbuf = BytesMut::new();
    // Whether the last read filled the space it had (more is probably waiting).
    let mut busy = false;
    // When something was last written: the write buffer is kept while output flows.
    let mut last_write = Instant::now();
    let end = loop {
        if d.tokens.is_empty() {
            next_token_check = None;
        } else if next_token_check.is_none() {
            next_token_check = Some(Instant::now() + TOKEN_CHECK);
        }
        let deadline = match (d.conn.poll_timeout(), next_token_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let can_read = d.wbuf.len() < WRITE_HIGH_WATER;
        let want = if busy { READ_CHUNK } else { READ_IDLE };
        if can_read && rbuf.capacity() - rbuf.len() < want / 4 {
            rbuf.reserve(want);
        }
        let spare = rbuf.capacity() - rbuf.len();
        tokio::select! {
            res = rd.read_buf(&mut rbuf), if can_read => {
                match res {
                    Ok(0) | Err(_) => break End::Io,
                    Ok(n) => busy = n == spare,
                }
                if let Some(end) = d.on_readable(&mut rbuf).await {
                    break end;
                }
            }
            res = d.wr.write_buf(&mut d.wbuf), if !d.wbuf.is_empty() => {
                if res.is_err() {
                    break End::Io;
                }
                last_write = Instant::now();
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
                let now = Instant::now();
                if next_token_check.is_some_and(|at| at <= now) {
                    next_token_check = Some(now + TOKEN_CHECK);
                    if d.check_tokens() {
                        break End::Violation;
                    }
                }
                if let Err(v) = d.conn.handle_timeout(now) {
                    debug!(reason = v.reason, "closing");
                    d.violation(v);
                    break End::Violation;
                }
            }
            _ = shutdown.changed(), if !d.registered => break End::Shutdown,
        }
        // Give back the buffers once everything in them was consumed and the connection is
        // quiet, so an idle connection holds next to no buffer memory.
        if rbuf.is_empty() && !busy && rbuf.capacity() > READ_IDLE {
            rbuf = BytesMut::new();
        }
        if d.wbuf.is_empty() && d.wbuf.capacity() > READ_IDLE && last_write.elapsed() > WRITE_IDLE {
            d.wbuf = BytesMut::new();
        }
    };
    // Boxed: its linger buffer would otherwise sit in every connection task for good.
    Box::pin(d.finish(end, rd)).await;
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
        // One clock read per batch of frames, not per packet (again after any wait).
        let mut now = Instant::now();
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
            let inbound = match self.conn.on_packet(packet, now) {
                Ok(i) => i,
                Err(v) => {
                    self.violation(v);
                    return Some(End::Violation);
                }
            };
            match inbound {
                Inbound::Connect(connect) => {
                    // Boxed: once per connection, and it would make every connection's task
                    // carry its state for good.
                    if let Some(end) = Box::pin(self.on_connect(connect)).await {
                        return Some(end);
                    }
                    now = Instant::now();
                }
                Inbound::Forward(Packet::Publish(p))
                    if !self.tokens.is_empty() && p.topic.as_str() == "$SYS/uploadToken" =>
                {
                    if let Some(end) = Box::pin(self.upload_token(p)).await {
                        return Some(end);
                    }
                }
                Inbound::Forward(Packet::PubRel(rel))
                    if self.local_qos2.contains(&rel.packet_id) =>
                {
                    self.local_qos2.retain(|&id| id != rel.packet_id);
                    self.write(Packet::PubComp(PubAck::new(rel.packet_id)));
                }
                Inbound::Forward(packet) => {
                    if matches!(packet, Packet::Disconnect(_)) {
                        self.status_event(crate::StatusKind::Disconnect);
                    }
                    let msg = RouterMsg::Packet {
                        conn: self.id,
                        packet,
                    };
                    let Some(router) = &self.router else {
                        return Some(End::Shutdown);
                    };
                    // Mostly there is room; waiting for it is boxed so that the wait's state
                    // does not sit in every connection's task.
                    match router.try_send(msg) {
                        // Counts against the task's cooperative budget as `send` would, so a
                        // fast publisher yields to the connections that write its messages
                        // out instead of flooding them.
                        Ok(()) => tokio::task::consume_budget().await,
                        Err(mpsc::error::TrySendError::Full(msg)) => {
                            if Box::pin(router.send(msg)).await.is_err() {
                                return Some(End::Shutdown);
                            }
                            now = Instant::now();
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Some(End::Shutdown),
                    }
                }
                Inbound::Reply(packet) => self.write(packet),
            }
        }
    }

    /// Authenticates a CONNECT, picks its instance and hands it to that instance's router.
    async fn on_connect(&mut self, connect: Box<ferry_codec::Connect>) -> Option<End> {
        let shared = self.shared.clone();
        let ip = self.peer.ip();
        let now = Instant::now();
        let limit = shared.config.max_failed_logins_per_minute;
        if !shared.failed_logins.allowed(ip, limit, now) {
            debug!("too many failed logins from this address");
            return Some(self.refuse(ReasonCode::BANNED));
        }
        let meta = &shared.instances.meta;
        let username = connect.username.as_deref().unwrap_or_default();
        let password = connect.password.as_deref().unwrap_or_default();
        let cloud = meta.authenticate(username, password, &connect.client_id, ferry_meta::now_ms());
        let (instance, permissions, tokens) = match cloud {
            Some(Ok(a)) => (a.instance, a.permissions, a.tokens),
            Some(Err(e)) => {
                debug!(code = ?e.code, reason = %e.reason, "authentication failed");
                shared.failed_logins.record_failure(ip, now);
                return Some(self.refuse(e.code));
            }
            None => {
                if let Err(code) = shared.config.auth.check(&connect) {
                    debug!(?code, "authentication failed");
                    shared.failed_logins.record_failure(ip, now);
                    return Some(self.refuse(code));
                }
                let instance = shared.config.default_instance.clone();
                if let Err(e) = meta.check_client_id(&instance, &connect.client_id) {
                    debug!(reason = %e.reason, "client id refused");
                    return Some(self.refuse(e.code));
                }
                (instance, Permissions::full(), Vec::new())
            }
        };
        shared.failed_logins.record_success(ip);
        let (router, limits) = match shared.instances.router(&instance) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "instance unavailable");
                return Some(self.refuse(ReasonCode::NOT_AUTHORIZED));
            }
        };
        self.conn.set_max_packet_size(limits.max_packet_size);
        let (reply, accepted) = oneshot::channel();
        let msg = RouterMsg::Connect {
            conn: self.id,
            connect,
            grant: ClientGrant {
                permissions,
                peer: Some(self.peer.to_string()),
            },
            outbox: self.outbox.clone(),
            reply,
        };
        if router.send(msg).await.is_err() {
            return Some(End::Shutdown);
        }
        match accepted.await {
            Ok(Some(a)) => {
                tracing::Span::current().record("client_id", a.client_id.as_str());
                debug!(keep_alive = a.keep_alive, instance, "connected");
                self.conn.accepted(a.keep_alive);
                self.registered = true;
                self.router = Some(router);
                self.instance = instance;
                self.expiry_noticed = vec![false; tokens.len()];
                self.tokens = tokens;
                if self.shared.instances.hooks.is_some() {
                    self.status = Some((a.client_id.to_string(), crate::hooks::new_channel_id()));
                    self.status_event(crate::StatusKind::Connect);
                }
                None
            }
            // Refused: the CONNACK and the close are in the outbox.
            Ok(None) => None,
            Err(_) => Some(End::Shutdown),
        }
    }

    /// Answers a refused CONNECT.
    fn refuse(&mut self, code: ReasonCode) -> End {
        self.write(Packet::ConnAck(ConnAck {
            code,
            ..Default::default()
        }));
        End::Violation
    }

    /// `$SYS/uploadToken` from a Token-mode client: `{"token":"…","type":"R|W|RW"}` replaces
    /// that token type on this connection; the acknowledgement is sent once the new rights
    /// apply.
    async fn upload_token(&mut self, p: ferry_codec::Publish) -> Option<End> {
        #[derive(serde::Deserialize)]
        struct Upload {
            token: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let parsed: Option<(TokenType, String)> = serde_json::from_slice::<Upload>(&p.payload)
            .ok()
            .and_then(|u| Some((TokenType::parse(&u.kind)?, u.token)));
        let Some((kind, token)) = parsed else {
            return Some(self.token_invalid(1, "R"));
        };
        let meta = self.shared.instances.meta.clone();
        let held = match meta.upload_token(&self.instance, kind, &token, ferry_meta::now_ms()) {
            Ok(h) => h,
            Err(e) => return Some(self.token_invalid(e.token_code.unwrap_or(1), kind.as_str())),
        };
        match self.tokens.iter().position(|t| t.kind == kind) {
            Some(i) => {
                self.tokens[i] = held;
                self.expiry_noticed[i] = false;
            }
            None => {
                self.tokens.push(held);
                self.expiry_noticed.push(false);
            }
        }
        let (done, applied) = oneshot::channel();
        let msg = RouterMsg::SetPermissions {
            conn: self.id,
            permissions: ferry_meta::auth::token_permissions(&self.tokens),
            done,
        };
        let router = self.router.as_ref()?;
        if router.send(msg).await.is_err() || applied.await.is_err() {
            return Some(End::Shutdown);
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write(Packet::PubAck(PubAck::new(p.packet_id))),
            QoS::ExactlyOnce => {
                self.local_qos2.push(p.packet_id);
                self.write(Packet::PubRec(PubAck::new(p.packet_id)));
            }
        }
        None
    }

    /// Sends `$SYS/tokenInvalidNotice` and ends the connection.
    fn token_invalid(&mut self, code: u8, kind: &str) -> End {
        debug!(code, kind, "token invalid, disconnecting");
        let body = format!("{{\"code\":{code},\"type\":\"{kind}\"}}");
        self.system_message("$SYS/tokenInvalidNotice", body);
        self.violation(Violation {
            code: ReasonCode::NOT_AUTHORIZED,
            reason: "token invalid",
        });
        End::Violation
    }

    /// Writes a QoS 0 message from the server on a `$SYS/…` topic.
    fn system_message(&mut self, topic: &'static str, body: String) {
        self.write(Packet::Publish(ferry_codec::Publish {
            topic: ByteStr::from_static(topic),
            payload: body.into(),
            ..Default::default()
        }));
    }

    /// Re-checks held tokens: sends the expiry notice 5 minutes ahead, and on revocation or
    /// expiry the invalid notice followed by the disconnect. Returns true to end the connection.
    fn check_tokens(&mut self) -> bool {
        let now = ferry_meta::now_ms();
        let meta = self.shared.instances.meta.clone();
        for i in 0..self.tokens.len() {
            let held = self.tokens[i].clone();
            let kind = held.kind.as_str();
            if let Err(e) = meta.token_status(&self.instance, &held, now) {
                self.token_invalid(e.token_code.unwrap_or(1), kind);
                return true;
            }
            if !self.expiry_noticed[i]
                && held.expire_at.saturating_sub(now) <= TOKEN_EXPIRY_NOTICE_MS
            {
                self.expiry_noticed[i] = true;
                let body = format!("{{\"expireTime\":{},\"type\":\"{kind}\"}}", held.expire_at);
                self.system_message("$SYS/tokenExpireNotice", body);
            }
        }
        false
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
                if taken <= 4 {
                    // Light traffic: keep no batch memory on an idle connection.
                    batch = Vec::new();
                }
                break false;
            }
        };
        self.batch = batch;
        closed
    }

    fn violation(&mut self, v: Violation) {
        debug!(code = ?v.code, reason = v.reason, "protocol violation");
        self.refuse_input(v.code, v.reason.into());
    }

    fn decode_error(&mut self, e: DecodeError) {
        debug!(error = %e, "malformed input");
        let code = e.reason_code();
        if !self.conn.is_connected() && code == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
            // MQTT 3.1.1 §3.1.2.2: answer an unknown protocol level with return code 1.
            self.shared
                .metrics
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            let ack = Packet::ConnAck(ConnAck {
                code,
                ..Default::default()
            });
            let _ = ack.encode(Protocol::V3_1_1, &mut self.wbuf);
            return;
        }
        self.refuse_input(code, e.to_string().into());
    }

    /// Counts bad input and, on a connected MQTT 5 connection, says why in a DISCONNECT
    /// before the connection closes.
    fn refuse_input(&mut self, code: ReasonCode, reason: ByteStr) {
        self.shared
            .metrics
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        if self.conn.protocol().is_v5() && self.conn.is_connected() {
            self.write(Packet::Disconnect(Disconnect {
                code,
                properties: ferry_codec::Props {
                    reason_string: Some(reason),
                    ..Default::default()
                }
                .into(),
            }));
        }
    }

    /// Reports a status event of this connection to the rules.
    fn status_event(&self, kind: crate::StatusKind) {
        let (Some(hooks), Some((client_id, channel_id))) =
            (&self.shared.instances.hooks, &self.status)
        else {
            return;
        };
        hooks.status(crate::StatusEvent {
            instance: self.instance.clone(),
            client_id: client_id.clone(),
            channel_id: channel_id.clone(),
            kind,
            time_ms: ferry_meta::now_ms(),
            client_ip: self.peer.to_string(),
        });
    }

    /// Tells the router if it still knows us, flushes what is left, and closes gracefully.
    async fn finish<R: AsyncRead + Unpin>(mut self, end: End, mut rd: R) {
        debug!(?end, peer = %self.peer, "connection closing");
        self.status_event(crate::StatusKind::TcpClean);
        if let (true, false, Some(router)) =
            (self.registered, matches!(end, End::ByRouter), &self.router)
        {
            let _ = router.send(RouterMsg::Lost { conn: self.id }).await;
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
