//! One task per connection: reads and decodes frames, runs them through the per-connection
//! state machine ([`ferry_core::Connection`]), forwards them to the router, and writes what the
//! router puts in the connection's [`Outbox`].
//!
//! The task is a hand-written future ([`ConnTask`]) rather than an `async fn` with a `select!`:
//! an idle connection is then just this struct — the socket, two small buffers, one timer and
//! the state machine — with no select state or pending sub-futures kept for good. The rare
//! asynchronous steps (waiting for the router to accept a CONNECT, waiting for room in the
//! router's queue, applying an uploaded token, the final flush) run as boxed futures that exist
//! only while they are needed.
//!
//! Reading pauses while more than [`WRITE_HIGH_WATER`] bytes wait to be written, so a client
//! that never reads cannot make the server buffer its answers without bound.

use crate::outbox::Outbox;
use crate::router::{Acks, RouterMsg};
use crate::Shared;
use bytes::{Buf, Bytes, BytesMut};
use ferry_codec::{
    decode, ByteStr, ConnAck, Connect, DecodeError, Disconnect, Packet, Protocol, PubAck, Publish,
    QoS, ReasonCode,
};
use ferry_core::conn::{Inbound, Violation};
use ferry_core::{Accepted, ClientGrant, ConnId, Connection, Permissions};
use ferry_meta::auth::{HeldToken, TokenType};
use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Sleep;
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
/// What a busy connection reserves in its own read buffer for each read.
const READ_CHUNK: usize = 4096;

thread_local! {
    /// Where a quiet connection reads: one buffer per worker thread. What arrived is copied into
    /// a read buffer of exactly its size, so a quiet connection reads any packet in one system
    /// call and holds no buffer while it waits. (A fixed small buffer of its own cost a
    /// second read for every packet larger than it, and an allocation per poll.) A read that
    /// fills this switches the connection to reading `READ_CHUNK`s into its own buffer, with
    /// no copy, until it is quiet again.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}
/// A connection that wrote nothing for this long gives its write buffer back (at its next
/// event, typically a PINGREQ).
const WRITE_IDLE: Duration = Duration::from_secs(1);
/// How often a Token-mode connection re-checks its tokens (revocation, expiry).
const TOKEN_CHECK: Duration = Duration::from_secs(1);
/// The expiry notice goes out this long before a token expires (§2).
const TOKEN_EXPIRY_NOTICE_MS: u64 = 5 * 60 * 1000;
/// Packets taken from the outbox per lock.
const OUTBOX_BATCH: usize = 64;
/// A PUBLISH payload at least this large is written from the message's own buffer (one
/// vectored write with the packet's head) instead of being copied into the write buffer.
const SHARE_PAYLOAD: usize = 1024;
/// Buffers one vectored write takes at most.
const MAX_SLICES: usize = 64;

/// What a connection holds only while output flows, behind one pointer: an idle connection
/// gives it back (see `release_idle_buffers`), so its task stays within a smaller allocation.
struct Out {
    wbuf: BytesMut,
    /// Written before `wbuf`: runs of the write buffer frozen when a large payload was queued
    /// after them, and those payloads (shared with the message: a fan-out does not copy them
    /// once per subscriber).
    parts: VecDeque<Bytes>,
    /// Bytes in `parts`.
    parts_len: usize,
    /// Reused between outbox drains.
    batch: Vec<Packet>,
    /// When something was last written: the buffers are kept while output flows.
    last_write: Instant,
}

impl Out {
    fn new() -> Box<Out> {
        Box::new(Out {
            wbuf: BytesMut::new(),
            parts: VecDeque::new(),
            parts_len: 0,
            batch: Vec::new(),
            last_write: Instant::now(),
        })
    }

    /// Bytes waiting to be written.
    fn queued(&self) -> usize {
        self.wbuf.len() + self.parts_len
    }
}

/// The packet type of PUBACK (the high nibble of a frame's first byte).
const PUBACK_TYPE: u8 = 4;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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

/// What a finished asynchronous step hands back to the driver.
enum Resumed {
    /// A packet that had to wait for room in the router's queue is queued.
    Sent,
    /// The router accepted the CONNECT.
    Connected(Box<Connected>),
    /// The router refused the CONNECT: the CONNACK and the close are in the outbox.
    Refused,
    /// An uploaded token's rights apply: acknowledge its PUBLISH.
    Applied { qos: QoS, packet_id: u16 },
    /// The router is gone (shutdown).
    Closed,
}

struct Connected {
    accepted: Accepted,
    router: mpsc::Sender<RouterMsg>,
    instance: Arc<str>,
    tokens: Vec<HeldToken>,
}

/// What a connection needs until its CONNECT is accepted, behind one pointer.
struct Handshake {
    /// Resolves when the server shuts down.
    stop: BoxFuture<()>,
    peer: SocketAddr,
}

/// What only some connections need once connected (status events, Token mode), behind one
/// pointer.
struct Extra {
    instance: Arc<str>,
    peer: SocketAddr,
    /// For status events (§5): the client id (the channel id derives from the connection id).
    status: Option<ByteStr>,
    tokens: Option<Box<Tokens>>,
}

/// A Token-mode connection's tokens: made with at least one, and an upload only adds or
/// replaces, so never empty.
struct Tokens {
    /// Re-checked every second.
    held: Vec<HeldToken>,
    expiry_noticed: Vec<bool>,
    next_check: Option<Instant>,
    /// QoS 2 packet ids of `$SYS/uploadToken` messages answered here, awaiting PUBREL.
    local_qos2: Vec<u16>,
}

/// What handling buffered input came to.
enum Flow {
    /// Every complete frame is handled, or an asynchronous step started; true if any was.
    Continue(bool),
    /// The task used up its cooperative budget; it has been scheduled again.
    Yield,
    End(End),
}

/// What moving packets from the outbox came to.
enum Drained {
    Nothing,
    Moved,
    /// The router closed the connection.
    Closed,
}

struct Driver<S> {
    io: S,
    conn: Connection,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    rbuf: BytesMut,
    /// The write side, while output flows.
    out: Option<Box<Out>>,
    /// The instance's router, once CONNECT was accepted.
    router: Option<mpsc::Sender<RouterMsg>>,
    /// Until the CONNECT is accepted.
    handshake: Option<Box<Handshake>>,
    extra: Option<Box<Extra>>,
    /// The asynchronous step in progress; input waits until it is done.
    pending: Option<BoxFuture<Resumed>>,
    id: ConnId,
    registered: bool,
    /// Whether the last read filled the space it had (more is probably waiting).
    busy: bool,
    /// Bytes were written since the last flush (a no-op for TCP, needed by TLS streams).
    unflushed: bool,
}

/// The driver holds one of the server's connection slots (taken by the accept loop), given
/// back here, however the task ends.
impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        self.shared.slots.add_permits(1);
    }
}

/// What a connection task is doing.
// The driver inline is the point: boxing it would cost an allocation per connection.
#[allow(clippy::large_enum_variant)]
enum Stage<S> {
    Running(Driver<S>),
    /// The connection ended: the flush and close.
    Closing(BoxFuture<()>),
    Done,
}

pin_project_lite::pin_project! {
    /// The future of one connection's task.
    pub(crate) struct ConnTask<S> {
        stage: Stage<S>,
        // The one timer of the connection: handshake, keep-alive and token deadlines. Set to
        // the earliest deadline; a later one leaves it alone (it fires early, finds nothing
        // due, and is set again).
        #[pin]
        timer: Sleep,
        // The connection's tracing span; none when it is disabled (no cost per connection).
        span: Option<Box<tracing::Span>>,
    }
}

impl<S> ConnTask<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(crate) fn new(
        stream: S,
        peer: SocketAddr,
        id: ConnId,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
        span: tracing::Span,
    ) -> Self {
        let limits = &shared.config.limits;
        let now = Instant::now();
        let conn = Connection::new(
            now,
            shared.config.handshake_timeout,
            limits.max_packet_size,
            limits.receive_maximum,
            limits.topic_alias_maximum,
        );
        let first_deadline = conn
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(3600));
        let driver = Driver {
            io: stream,
            conn,
            outbox: Arc::new(Outbox::new(shared.config.outbox_qos0_limit)),
            shared,
            rbuf: BytesMut::new(),
            out: None,
            router: None,
            handshake: Some(Box::new(Handshake {
                stop: Box::pin(async move {
                    let mut shutdown = shutdown;
                    let _ = shutdown.changed().await;
                }),
                peer,
            })),
            extra: None,
            pending: None,
            id,
            registered: false,
            busy: false,
            unflushed: false,
        };
        ConnTask {
            stage: Stage::Running(driver),
            timer: tokio::time::sleep_until(tokio::time::Instant::from_std(first_deadline)),
            span: (!span.is_disabled()).then(|| Box::new(span)),
        }
    }
}

impl<S> Future for ConnTask<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let _entered = this.span.as_ref().map(|s| s.enter());
        if let Stage::Running(driver) = this.stage {
            let end = ready!(driver.poll_run(cx, this.timer.as_mut()));
            let Stage::Running(driver) = std::mem::replace(this.stage, Stage::Done) else {
                unreachable!("the stage was Running")
            };
            *this.stage = Stage::Closing(Box::pin(driver.finish(end)));
        }
        match this.stage {
            Stage::Closing(closing) => {
                ready!(closing.as_mut().poll(cx));
                *this.stage = Stage::Done;
                Poll::Ready(())
            }
            _ => Poll::Ready(()),
        }
    }
}

impl<S> Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Makes all the progress there is: the pending step, outbox → socket, socket → router,
    /// the timer. Returns `Pending` once nothing moves (every source has the waker).
    fn poll_run(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<End> {
        loop {
            let mut progress = false;
            if let (Some(handshake), None) = (&mut self.handshake, &self.pending) {
                if handshake.stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Shutdown);
                }
            }
            if let Some(step) = &mut self.pending {
                if let Poll::Ready(resumed) = step.as_mut().poll(cx) {
                    self.pending = None;
                    if let Some(end) = self.resume(resumed) {
                        return Poll::Ready(end);
                    }
                    progress = true;
                }
            }
            // Output first (after a CONNECT, the CONNACK precedes any answer to what follows).
            match self.drain_outbox(cx) {
                Drained::Closed => return Poll::Ready(End::ByRouter),
                Drained::Moved => progress = true,
                Drained::Nothing => {}
            }
            match self.poll_output(cx) {
                Err(()) => return Poll::Ready(End::Io),
                Ok(wrote) => progress |= wrote,
            }
            // Input, unless a step is in progress or output is backed up.
            if self.pending.is_none() && self.queued() < WRITE_HIGH_WATER {
                match self.process(cx) {
                    Flow::End(end) => return Poll::Ready(end),
                    Flow::Yield => return Poll::Pending,
                    Flow::Continue(handled) => progress |= handled,
                }
                if self.pending.is_none() && self.queued() < WRITE_HIGH_WATER {
                    match self.poll_input(cx) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(End::Io),
                        Poll::Ready(Ok(_)) => progress = true,
                        Poll::Pending => {}
                    }
                }
            }
            match self.poll_timer(cx, timer.as_mut()) {
                Err(end) => return Poll::Ready(end),
                Ok(fired) => progress |= fired,
            }
            if !progress {
                break;
            }
        }
        self.release_idle_buffers();
        Poll::Pending
    }

    /// Reads what the socket has into the read buffer: through the thread's [`SCRATCH`]
    /// while the connection is quiet and has no partial packet, else straight into its own
    /// buffer.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if !self.busy && self.rbuf.is_empty() {
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.try_borrow_mut().ok()?;
                let mut buf = ReadBuf::new(&mut scratch);
                Some(match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        self.busy = n == READ_CHUNK;
                        self.rbuf = BytesMut::from(buf.filled());
                        Poll::Ready(Ok(n))
                    }
                    other => other.map_ok(|()| 0),
                })
            });
            if let Some(read) = read {
                return read;
            }
        }
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let spare = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        self.busy = n == spare;
        Poll::Ready(Ok(n))
    }

    /// Writes the write buffer to the socket; `Ok(true)` if anything was written, `Err` when
    /// the socket failed.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let mut wrote = false;
        if let Some(out) = self.out.as_deref_mut() {
            while out.parts_len > 0 {
                // The shared parts in order, then the write buffer if every part fits in.
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut k = 0;
                for part in out.parts.iter().take(MAX_SLICES - 1) {
                    slices[k] = IoSlice::new(part);
                    k += 1;
                }
                if k == out.parts.len() && !out.wbuf.is_empty() {
                    slices[k] = IoSlice::new(&out.wbuf);
                    k += 1;
                }
                match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..k]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
                    Poll::Ready(Ok(mut n)) => {
                        wrote = true;
                        while n > 0 {
                            let Some(front) = out.parts.front_mut() else {
                                out.wbuf.advance(n);
                                break;
                            };
                            let m = n.min(front.len());
                            front.advance(m);
                            out.parts_len -= m;
                            n -= m;
                            if front.is_empty() {
                                out.parts.pop_front();
                            }
                        }
                    }
                    Poll::Pending => break,
                }
            }
            while out.parts_len == 0 && !out.wbuf.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &out.wbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
                    Poll::Ready(Ok(n)) => {
                        out.wbuf.advance(n);
                        wrote = true;
                    }
                    Poll::Pending => break,
                }
            }
            if wrote {
                self.unflushed = true;
                out.last_write = Instant::now();
            }
        }
        if self.queued() == 0 && self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => {}
            }
        }
        Ok(wrote)
    }

    /// Keeps the timer at the earliest deadline and handles it when it fires; `Ok(true)` if it
    /// fired.
    fn poll_timer(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
    ) -> Result<bool, End> {
        let Some(deadline) = self.deadline() else {
            return Ok(false);
        };
        // A later deadline (every packet moves the keep-alive one) leaves the timer alone: it
        // fires early, finds nothing due, and is set again.
        let deadline = tokio::time::Instant::from_std(deadline);
        if timer.is_elapsed() || deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        if timer.poll(cx).is_pending() {
            return Ok(false);
        }
        let now = Instant::now();
        let tokens = self.extra.as_mut().and_then(|x| x.tokens.as_mut());
        if let Some(t) = tokens.filter(|t| t.next_check.is_some_and(|at| at <= now)) {
            t.next_check = Some(now + TOKEN_CHECK);
            if self.check_tokens() {
                return Err(End::Violation);
            }
        }
        if let Err(v) = self.conn.handle_timeout(now) {
            debug!(reason = v.reason, "closing");
            self.violation(v);
            return Err(End::Violation);
        }
        Ok(true)
    }

    /// The earliest protocol or token-check deadline.
    fn deadline(&mut self) -> Option<Instant> {
        let token_check = self.tokens().map(|t| {
            *t.next_check
                .get_or_insert_with(|| Instant::now() + TOKEN_CHECK)
        });
        match (self.conn.poll_timeout(), token_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives back the buffers once everything in them was consumed and the connection is
    /// quiet, so an idle connection holds next to no buffer memory. Once everything is
    /// written, the write side goes at once after light traffic (the last outbox drain took a
    /// few packets, and kept no batch: a CONNACK, a PINGRESP, one message), else after
    /// [`WRITE_IDLE`] without a write (while heavier output flows it is kept).
    fn release_idle_buffers(&mut self) {
        if self.rbuf.is_empty() && !self.busy {
            self.rbuf = BytesMut::new();
        }
        if let Some(out) = &self.out {
            if out.queued() == 0
                && !self.unflushed
                && (out.batch.capacity() == 0 || out.last_write.elapsed() > WRITE_IDLE)
            {
                self.out = None;
            }
        }
    }

    /// Decodes and handles every complete frame in the read buffer, until one starts an
    /// asynchronous step or the output backs up.
    fn process(&mut self, cx: &mut Context<'_>) -> Flow {
        // PUBACKs in a row go to the router as one message (a subscriber acknowledges what one
        // read brought it in one go), sent before anything else from this connection.
        let mut acks = Acks::default();
        let flow = self.process_frames(cx, &mut acks);
        let sent = self.send_acks(cx, &mut acks);
        match flow {
            Flow::End(_) => flow,
            _ => sent.unwrap_or(flow),
        }
    }

    /// Sends the PUBACKs gathered so far, if any. `Some` if the connection must stop
    /// processing: the router is gone, or the task used up its budget.
    fn send_acks(&mut self, cx: &mut Context<'_>, acks: &mut Acks) -> Option<Flow> {
        if acks.is_empty() {
            return None;
        }
        let msg = RouterMsg::Acks {
            conn: self.id,
            ids: std::mem::take(acks),
        };
        self.send_to_router(cx, msg)
    }

    /// Queues `msg` for the router; if its queue is full, the send becomes the pending step.
    /// `Some` if the connection must stop processing: the router is gone, or the task used up
    /// its budget.
    fn send_to_router(&mut self, cx: &mut Context<'_>, msg: RouterMsg) -> Option<Flow> {
        debug_assert!(self.pending.is_none(), "one pending step at a time");
        let Some(router) = &self.router else {
            return Some(Flow::End(End::Shutdown));
        };
        match router.try_send(msg) {
            // Counts against the task's cooperative budget as `send` would, so a fast
            // publisher yields to the connections that write its messages out instead of
            // flooding them.
            Ok(()) => match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(restore) => {
                    restore.made_progress();
                    None
                }
                Poll::Pending => Some(Flow::Yield),
            },
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let router = router.clone();
                self.pending = Some(Box::pin(async move {
                    match router.send(msg).await {
                        Ok(()) => Resumed::Sent,
                        Err(_) => Resumed::Closed,
                    }
                }));
                None
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Some(Flow::End(End::Shutdown)),
        }
    }

    fn process_frames(&mut self, cx: &mut Context<'_>, acks: &mut Acks) -> Flow {
        // One clock read per batch of frames, not per packet.
        let mut now = None;
        let mut handled = false;
        while self.pending.is_none() && self.queued() < WRITE_HIGH_WATER {
            // Anything but a PUBACK keeps its place behind the PUBACKs before it: they go
            // first (and if that has to wait, it waits in the read buffer).
            if !acks.is_empty() && self.rbuf.first().is_some_and(|b| b >> 4 != PUBACK_TYPE) {
                if let Some(flow) = self.send_acks(cx, acks) {
                    return flow;
                }
                if self.pending.is_some() {
                    break;
                }
            }
            let packet = match decode(
                &mut self.rbuf,
                self.conn.protocol(),
                self.conn.max_packet_size(),
            ) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.decode_error(e);
                    return Flow::End(End::Violation);
                }
            };
            handled = true;
            trace!(?packet, "received");
            let now = *now.get_or_insert_with(Instant::now);
            let inbound = match self.conn.on_packet(packet, now) {
                Ok(i) => i,
                Err(v) => {
                    self.violation(v);
                    return Flow::End(End::Violation);
                }
            };
            match inbound {
                Inbound::Forward(Packet::PubAck(ack)) => {
                    acks.push(ack.packet_id);
                    if acks.is_full() {
                        if let Some(flow) = self.send_acks(cx, acks) {
                            return flow;
                        }
                    }
                }
                Inbound::Connect(connect) => {
                    if let Some(end) = self.on_connect(connect) {
                        return Flow::End(end);
                    }
                }
                Inbound::Forward(Packet::Publish(p))
                    if self.has_tokens() && p.topic.as_str() == "$SYS/uploadToken" =>
                {
                    if let Some(end) = self.upload_token(p) {
                        return Flow::End(end);
                    }
                }
                Inbound::Forward(Packet::PubRel(rel)) if self.answered_here(rel.packet_id) => {
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
                    if let Some(flow) = self.send_to_router(cx, msg) {
                        return flow;
                    }
                }
                Inbound::Reply(packet) => self.write(packet),
            }
        }
        Flow::Continue(handled)
    }

    fn tokens(&mut self) -> Option<&mut Tokens> {
        self.extra.as_mut()?.tokens.as_deref_mut()
    }

    fn has_tokens(&self) -> bool {
        self.extra.as_ref().is_some_and(|x| x.tokens.is_some())
    }

    /// Whether `packet_id` is a QoS 2 `$SYS/uploadToken` answered here (then forgets it).
    fn answered_here(&mut self, packet_id: u16) -> bool {
        let Some(t) = self.tokens() else {
            return false;
        };
        let before = t.local_qos2.len();
        t.local_qos2.retain(|&id| id != packet_id);
        t.local_qos2.len() != before
    }

    /// Applies what a finished asynchronous step says.
    fn resume(&mut self, resumed: Resumed) -> Option<End> {
        match resumed {
            Resumed::Sent | Resumed::Refused => None,
            Resumed::Closed => Some(End::Shutdown),
            Resumed::Connected(c) => {
                let Connected {
                    accepted,
                    router,
                    instance,
                    tokens,
                } = *c;
                tracing::Span::current().record("client_id", accepted.client_id.as_str());
                debug!(
                    keep_alive = accepted.keep_alive,
                    instance = &*instance,
                    "connected"
                );
                self.conn.accepted(accepted.keep_alive);
                self.registered = true;
                let peer = self.handshake.take().map(|h| h.peer);
                self.router = Some(router);
                let hooks = self.shared.instances.hooks.is_some();
                if let (Some(peer), true) = (peer, hooks || !tokens.is_empty()) {
                    self.extra = Some(Box::new(Extra {
                        instance,
                        peer,
                        status: hooks.then_some(accepted.client_id),
                        tokens: (!tokens.is_empty()).then(|| {
                            Box::new(Tokens {
                                expiry_noticed: vec![false; tokens.len()],
                                held: tokens,
                                next_check: None,
                                local_qos2: Vec::new(),
                            })
                        }),
                    }));
                }
                self.status_event(crate::StatusKind::Connect);
                None
            }
            Resumed::Applied { qos, packet_id } => {
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => self.write(Packet::PubAck(PubAck::new(packet_id))),
                    QoS::ExactlyOnce => {
                        if let Some(t) = self.tokens() {
                            t.local_qos2.push(packet_id);
                        }
                        self.write(Packet::PubRec(PubAck::new(packet_id)));
                    }
                }
                None
            }
        }
    }

    /// Authenticates a CONNECT, picks its instance and hands it to that instance's router (the
    /// verdict comes back as a [`Resumed`]).
    fn on_connect(&mut self, connect: Box<Connect>) -> Option<End> {
        let shared = self.shared.clone();
        let peer = self.handshake.as_ref()?.peer;
        let ip = peer.ip();
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
        let (router, limits, instance) = match shared.instances.router(&instance) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "instance unavailable");
                return Some(self.refuse(ReasonCode::NOT_AUTHORIZED));
            }
        };
        self.conn.set_max_packet_size(limits.max_packet_size);
        let (reply, answer) = oneshot::channel();
        let msg = RouterMsg::Connect {
            conn: self.id,
            connect,
            grant: ClientGrant {
                permissions,
                peer: Some(peer),
            },
            outbox: self.outbox.clone(),
            reply,
        };
        // Mostly the router's channel has room: then only the wait for the verdict is boxed
        // (small), not a send's state too (many connections are at this step during a ramp).
        let full = match router.try_send(msg) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(msg)) => Some(msg),
            Err(mpsc::error::TrySendError::Closed(_)) => return Some(End::Shutdown),
        };
        let verdict = move |v: Result<Option<Accepted>, _>, router| match v {
            Ok(Some(accepted)) => Resumed::Connected(Box::new(Connected {
                accepted,
                router,
                instance,
                tokens,
            })),
            Ok(None) => Resumed::Refused,
            Err(_) => Resumed::Closed,
        };
        self.pending = Some(match full {
            None => Box::pin(async move { verdict(answer.await, router) }),
            Some(msg) => Box::pin(async move {
                if router.send(msg).await.is_err() {
                    return Resumed::Closed;
                }
                verdict(answer.await, router)
            }),
        });
        None
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
    fn upload_token(&mut self, p: Publish) -> Option<End> {
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
        let x = self.extra.as_mut()?;
        let held = match meta.upload_token(&x.instance, kind, &token, ferry_meta::now_ms()) {
            Ok(h) => h,
            Err(e) => return Some(self.token_invalid(e.token_code.unwrap_or(1), kind.as_str())),
        };
        let t = x.tokens.as_mut()?;
        match t.held.iter().position(|t| t.kind == kind) {
            Some(i) => {
                t.held[i] = held;
                t.expiry_noticed[i] = false;
            }
            None => {
                t.held.push(held);
                t.expiry_noticed.push(false);
            }
        }
        let permissions = ferry_meta::auth::token_permissions(&t.held);
        let router = self.router.clone()?;
        let (done, applied) = oneshot::channel();
        let msg = RouterMsg::SetPermissions {
            conn: self.id,
            permissions,
            done,
        };
        let (qos, packet_id) = (p.qos, p.packet_id);
        self.pending = Some(Box::pin(async move {
            if router.send(msg).await.is_err() || applied.await.is_err() {
                return Resumed::Closed;
            }
            Resumed::Applied { qos, packet_id }
        }));
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
        self.write(Packet::Publish(Publish {
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
        let Some(x) = &mut self.extra else {
            return false;
        };
        let Some(t) = &mut x.tokens else {
            return false;
        };
        let mut notices = Vec::new();
        let mut invalid = None;
        for (held, noticed) in t.held.iter().zip(t.expiry_noticed.iter_mut()) {
            let kind = held.kind.as_str();
            if let Err(e) = meta.token_status(&x.instance, held, now) {
                invalid = Some((e.token_code.unwrap_or(1), kind));
                break;
            }
            if !*noticed && held.expire_at.saturating_sub(now) <= TOKEN_EXPIRY_NOTICE_MS {
                *noticed = true;
                notices.push(format!(
                    "{{\"expireTime\":{},\"type\":\"{kind}\"}}",
                    held.expire_at
                ));
            }
        }
        for body in notices {
            self.system_message("$SYS/tokenExpireNotice", body);
        }
        match invalid {
            Some((code, kind)) => {
                self.token_invalid(code, kind);
                true
            }
            None => false,
        }
    }

    /// Encodes `packet` into the write buffer after the connection's outbound processing.
    fn write(&mut self, mut packet: Packet) {
        self.conn.on_outbound(&mut packet);
        trace!(?packet, "sending");
        let protocol = self.conn.protocol();
        let out = self.out();
        let result = match &packet {
            Packet::Publish(p) if p.payload.len() >= SHARE_PAYLOAD => {
                let payload = p.payload.clone();
                packet.encode_head(protocol, &mut out.wbuf).map(|()| {
                    // Everything buffered so far, this packet's head, then its payload.
                    let head = out.wbuf.split().freeze();
                    out.parts_len += head.len() + payload.len();
                    out.parts.push_back(head);
                    out.parts.push_back(payload);
                })
            }
            _ => packet.encode(protocol, &mut out.wbuf),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot encode outgoing packet");
        }
    }

    /// Bytes waiting to be written.
    fn queued(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.queued())
    }

    /// The write side, set up when the first output since the last release needs it.
    fn out(&mut self) -> &mut Out {
        self.out.get_or_insert_with(Out::new)
    }

    /// Moves packets from the outbox into the write buffer while it is below the high-water
    /// mark. A close is honoured even when the buffer is full: the connection is going away and
    /// whatever is queued is dropped. When the outbox is left empty it keeps the waker.
    fn drain_outbox(&mut self, cx: &mut Context<'_>) -> Drained {
        let mut batch = self
            .out
            .as_mut()
            .map(|o| std::mem::take(&mut o.batch))
            .unwrap_or_default();
        let mut moved = false;
        let result = loop {
            if self.queued() >= WRITE_HIGH_WATER {
                // Woken again by the socket once it takes more.
                break if self.outbox.is_closing() {
                    Drained::Closed
                } else if moved {
                    Drained::Moved
                } else {
                    Drained::Nothing
                };
            }
            let close = self.outbox.take(&mut batch, OUTBOX_BATCH, cx.waker());
            let taken = batch.len();
            moved |= taken > 0;
            for packet in batch.drain(..) {
                self.write(packet);
            }
            if let Some(disconnect) = close {
                if let (Some(d), true) = (disconnect, self.conn.protocol().is_v5()) {
                    self.write(Packet::Disconnect(d));
                }
                break Drained::Closed;
            }
            if taken < OUTBOX_BATCH {
                if taken <= 4 {
                    // Light traffic: keep no batch memory on an idle connection.
                    batch = Vec::new();
                }
                break if moved {
                    Drained::Moved
                } else {
                    Drained::Nothing
                };
            }
        };
        if batch.capacity() > 0 {
            self.out().batch = batch;
        }
        result
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
            let _ = ack.encode(Protocol::V3_1_1, &mut self.out().wbuf);
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
        let (Some(hooks), Some(x)) = (&self.shared.instances.hooks, &self.extra) else {
            return;
        };
        let Some(client_id) = &x.status else {
            return;
        };
        if !hooks.wants_status(&x.instance, client_id.as_str()) {
            return;
        }
        hooks.status(crate::StatusEvent {
            instance: x.instance.to_string(),
            client_id: client_id.to_string(),
            channel_id: crate::hooks::channel_id_hex(crate::hooks::channel_id(self.id)),
            kind,
            time_ms: ferry_meta::now_ms(),
            client_ip: x.peer.to_string(),
        });
    }

    /// Tells the router if it still knows us, flushes what is left, and closes gracefully.
    async fn finish(mut self, end: End) {
        debug!(?end, "connection closing");
        // A CONNECT the router is still deciding on: wait for the verdict, so that a
        // connection the router registered is also unregistered.
        if let Some(step) = self.pending.take() {
            if let Resumed::Connected(c) = step.await {
                self.registered = true;
                self.router = Some(c.router);
            }
        }
        self.status_event(crate::StatusKind::TcpClean);
        if let (true, false, Some(router)) =
            (self.registered, matches!(end, End::ByRouter), &self.router)
        {
            let _ = router.send(RouterMsg::Lost { conn: self.id }).await;
        }
        if !matches!(end, End::Io) {
            let io = &mut self.io;
            let out = self.out.take();
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
                if let Some(mut out) = out {
                    for mut part in out.parts.drain(..) {
                        io.write_all_buf(&mut part).await?;
                    }
                    io.write_all_buf(&mut out.wbuf).await?;
                }
                io.shutdown().await
            })
            .await;
            // Discard what the client still sends until it closes too (or LINGER passes).
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = io.read(&mut sink).await {
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

#[cfg(test)]
mod tests {
    /// An idle connection is mostly this future, inside tokio's task cell, which is a multiple
    /// of 128 bytes: with tokio 1.54 (and `tokio_unstable`) a future of up to 400 bytes makes
    /// a 512-byte cell, 408 bytes a 640-byte one (measured by the allocation sizes of spawned
    /// futures of each size). Keep it from growing back unnoticed.
    #[test]
    fn the_connection_task_stays_small() {
        let size = std::mem::size_of::<super::ConnTask<tokio::net::TcpStream>>();
        eprintln!(
            "ConnTask<TcpStream>: {size} bytes; Driver: {}; Connection: {}",
            std::mem::size_of::<super::Driver<tokio::net::TcpStream>>(),
            std::mem::size_of::<ferry_core::Connection>()
        );
        assert!(size <= 400, "ConnTask<TcpStream> is {size} bytes");
    }
}
