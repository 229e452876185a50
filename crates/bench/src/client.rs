//! A bare MQTT connection over `ferry-codec`: packets are encoded into one write buffer and
//! written in large batches, and read with a buffer that grows while reads fill it, so one
//! syscall carries many messages while an idle connection stays small.
//!
//! The transport is plain TCP (read straight into the buffer), or any byte stream (TLS,
//! WebSocket) behind [`Io::Stream`].

use crate::error::Failure;
use crate::transport::{self, Target};
use bytes::{Buf, BytesMut};
use ferry_codec::{decode, Connect, Packet, Properties, Protocol, PubAck, QoS, ReasonCode};
use std::future::{poll_fn, Future};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Smallest and largest read size; the size doubles while reads fill it.
const READ_MIN: usize = 2 * 1024;
const READ_MAX: usize = 256 * 1024;
/// Encoded bytes gathered before writing stops taking new messages.
pub(crate) const WRITE_BATCH: usize = 64 * 1024;
/// Frames are not size-checked: the broker is trusted to send what it may.
const MAX_PACKET: u32 = u32::MAX;

/// A byte stream other than plain TCP.
pub(crate) trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

pub(crate) enum Io {
    Tcp(TcpStream),
    Stream(Box<dyn AsyncIo>),
}

/// What [`Client::step`] saw.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Bytes arrived in the read buffer: decode them with [`Client::try_decode`].
    Read,
    /// Some of `wbuf` was written, or a PINGREQ was queued.
    Wrote,
    /// The deadline passed with nothing read or written.
    Idle,
}

/// How to open a session.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub protocol: Protocol,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// Seconds; 0 = no keep-alive (unless an MQTT 5 broker imposes one).
    pub keep_alive: u16,
    /// `Some`: a persistent session (MQTT 3: clean session 0; MQTT 5: this session expiry).
    pub session_expiry: Option<u32>,
    /// Local address to connect from (several 127.0.0.x get past the ephemeral-port limit).
    pub bind: Option<IpAddr>,
}

pub(crate) struct Client {
    io: Io,
    rbuf: BytesMut,
    read_size: usize,
    /// Encoded packets not yet written.
    pub wbuf: BytesMut,
    protocol: Protocol,
    /// PINGREQ after this long without writing anything (keep-alive).
    ping_every: Option<Duration>,
    next_ping: Option<Instant>,
    /// Unanswered PINGREQs: two in a row mean the broker is gone.
    pings_unanswered: u32,
    /// The one timer for the ping and the caller's deadline, set to the earlier of the two. A
    /// later time leaves it alone (it fires early, finds nothing due, and is set again): a
    /// fresh timer per step cost a timer-wheel insert and removal per message received.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Client {
    /// Connects, sends CONNECT and waits for a successful CONNACK, all within `timeout`.
    pub async fn connect(
        target: &Target,
        opts: &ConnectOptions,
        timeout: Duration,
    ) -> Result<Client, Failure> {
        match tokio::time::timeout(timeout, Self::connect_inner(target, opts)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::new(
                "connect timeout",
                format!("no CONNACK within {timeout:?}"),
            )),
        }
    }

    async fn connect_inner(target: &Target, opts: &ConnectOptions) -> Result<Client, Failure> {
        let io = transport::open(target, opts.bind).await?;
        let mut client = Client {
            io,
            rbuf: BytesMut::new(),
            read_size: READ_MIN,
            wbuf: BytesMut::new(),
            protocol: opts.protocol,
            ping_every: None,
            next_ping: None,
            pings_unanswered: 0,
            timer: None,
        };
        let mut properties = Properties::default();
        if opts.protocol.is_v5() {
            properties.make_mut().session_expiry_interval = opts.session_expiry;
        }
        client.push(&Packet::Connect(Box::new(Connect {
            protocol: opts.protocol,
            clean_start: opts.session_expiry.is_none(),
            keep_alive: opts.keep_alive,
            client_id: opts.client_id.as_str().into(),
            will: None,
            username: opts.username.as_deref().map(Into::into),
            password: opts.password.clone().map(Into::into),
            properties,
        })))?;
        client.flush().await?;
        match client.recv().await? {
            Packet::ConnAck(ack) if ack.code == ReasonCode::SUCCESS => {
                let secs = ack.properties.server_keep_alive.unwrap_or(opts.keep_alive);
                if secs > 0 {
                    // Well inside the interval, so the broker never sees us late.
                    client.ping_every = Some(Duration::from_secs(u64::from(secs)) * 3 / 4);
                    client.next_ping = client.ping_every.map(|every| Instant::now() + every);
                }
                Ok(client)
            }
            Packet::ConnAck(ack) => Err(connack_failure(ack.code)),
            other => Err(Failure::new(
                "protocol error",
                format!("expected CONNACK, got {}", other.packet_type().name()),
            )),
        }
    }

    /// Appends `packet` to the write buffer.
    pub fn push(&mut self, packet: &Packet) -> Result<(), Failure> {
        packet
            .encode(self.protocol, &mut self.wbuf)
            .map_err(|e| Failure::new("encode", e.to_string()))
    }

    /// Queues what a received PUBLISH needs in answer: PUBACK (QoS 1) or PUBREC (QoS 2).
    pub fn acknowledge(&mut self, qos: QoS, packet_id: u16) -> Result<(), Failure> {
        match qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => self.push(&Packet::PubAck(PubAck::new(packet_id))),
            QoS::ExactlyOnce => self.push(&Packet::PubRec(PubAck::new(packet_id))),
        }
    }

    /// Writes the whole write buffer.
    pub async fn flush(&mut self) -> Result<(), Failure> {
        while !self.wbuf.is_empty() {
            let Client { io, wbuf, .. } = self;
            poll_fn(|cx| poll_write(io, cx, wbuf))
                .await
                .map_err(io_failure)?;
        }
        let io = &mut self.io;
        poll_fn(|cx| poll_flush(io, cx)).await.map_err(io_failure)
    }

    /// Takes one complete packet off the read buffer, if there is one.
    pub fn try_decode(&mut self) -> Result<Option<Packet>, Failure> {
        let packet = decode(&mut self.rbuf, self.protocol, MAX_PACKET)
            .map_err(|e| Failure::new("malformed packet", e.to_string()))?;
        if matches!(packet, Some(Packet::PingResp)) {
            self.pings_unanswered = 0;
        }
        Ok(packet)
    }

    /// Reads until one packet is complete.
    pub async fn recv(&mut self) -> Result<Packet, Failure> {
        loop {
            if let Some(packet) = self.try_decode()? {
                return Ok(packet);
            }
            let Client {
                io,
                rbuf,
                read_size,
                ..
            } = self;
            let n = poll_fn(|cx| poll_read(io, cx, rbuf, *read_size))
                .await
                .map_err(io_failure)?;
            if n == 0 {
                return Err(closed());
            }
        }
    }

    /// Waits for the next thing to happen: a read, a (partial) write of `wbuf` when it is not
    /// empty, the keep-alive ping timer, or `deadline` (if any).
    pub async fn step(&mut self, deadline: Option<Instant>) -> Result<Step, Failure> {
        let step = poll_fn(|cx| self.poll_step(cx, deadline)).await?;
        if step == Step::Wrote {
            if let Some(every) = self.ping_every {
                self.next_ping = Some(Instant::now() + every);
            }
        }
        Ok(step)
    }

    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Option<Instant>,
    ) -> Poll<Result<Step, Failure>> {
        let mut wrote = false;
        if !self.wbuf.is_empty() {
            match poll_write(&mut self.io, cx, &mut self.wbuf) {
                Poll::Ready(Ok(())) => wrote = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io_failure(e))),
                Poll::Pending => {}
            }
        }
        // TLS and WebSocket streams buffer: push out what they hold.
        if self.wbuf.is_empty() {
            if let Poll::Ready(Err(e)) = poll_flush(&mut self.io, cx) {
                return Poll::Ready(Err(io_failure(e)));
            }
        }
        match poll_read(&mut self.io, cx, &mut self.rbuf, self.read_size) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(closed())),
            Poll::Ready(Ok(n)) => {
                if n >= self.read_size && self.read_size < READ_MAX {
                    self.read_size *= 2;
                }
                return Poll::Ready(Ok(Step::Read));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(io_failure(e))),
            Poll::Pending if wrote => return Poll::Ready(Ok(Step::Wrote)),
            Poll::Pending => {}
        }
        loop {
            let Some(at) = earliest(self.next_ping, deadline) else {
                return Poll::Pending;
            };
            let at = tokio::time::Instant::from_std(at);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.is_elapsed() || at < timer.deadline() {
                timer.as_mut().reset(at);
            }
            ready!(timer.as_mut().poll(cx));
            let now = Instant::now();
            if self.next_ping.is_some_and(|t| t <= now) {
                if self.pings_unanswered >= 2 {
                    return Poll::Ready(Err(Failure::new(
                        "keep-alive timeout",
                        "two PINGREQs unanswered",
                    )));
                }
                self.pings_unanswered += 1;
                self.push(&Packet::PingReq)?;
                return Poll::Ready(Ok(Step::Wrote));
            }
            if deadline.is_some_and(|t| t <= now) {
                return Poll::Ready(Ok(Step::Idle));
            }
            // Nothing due yet (a timer woken early): set it again.
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
            let io = &mut self.io;
            poll_fn(|cx| poll_shutdown(io, cx))
                .await
                .map_err(io_failure)
        })
        .await;
    }
}

/// Reads at most `size` bytes into `buf`'s spare room.
fn poll_read(
    io: &mut Io,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    size: usize,
) -> Poll<io::Result<usize>> {
    match io {
        Io::Tcp(stream) => {
            if buf.capacity() - buf.len() < size / 2 {
                buf.reserve(size);
            }
            // Through tokio's `AsyncRead`, which takes a read that did not fill the buffer as
            // "drained" and waits for the next event: no second read to find the socket empty.
            tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
        }
        Io::Stream(stream) => {
            let len = buf.len();
            buf.resize(len + size, 0);
            let mut read = ReadBuf::new(&mut buf[len..]);
            let res = Pin::new(stream).poll_read(cx, &mut read);
            let n = read.filled().len();
            buf.truncate(len + n);
            match res {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        }
    }
}

/// Writes some of `buf` (and drops what was written from it).
fn poll_write(io: &mut Io, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<()>> {
    let n = match io {
        Io::Tcp(stream) => ready!(Pin::new(stream).poll_write(cx, buf))?,
        Io::Stream(stream) => ready!(Pin::new(stream).poll_write(cx, buf))?,
    };
    if n == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    buf.advance(n);
    Poll::Ready(Ok(()))
}

fn poll_flush(io: &mut Io, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    match io {
        Io::Tcp(_) => Poll::Ready(Ok(())),
        Io::Stream(stream) => Pin::new(stream).poll_flush(cx),
    }
}

fn poll_shutdown(io: &mut Io, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    match io {
        Io::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
        Io::Stream(stream) => Pin::new(stream).poll_shutdown(cx),
    }
}

fn closed() -> Failure {
    Failure::new("closed by broker", "the broker closed the connection")
}

pub(crate) fn io_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => closed(),
        io::ErrorKind::ConnectionReset => Failure::new("connection reset", e.to_string()),
        io::ErrorKind::BrokenPipe => Failure::new("connection reset", e.to_string()),
        io::ErrorKind::ConnectionRefused => Failure::new("connection refused", e.to_string()),
        _ => Failure::new("i/o error", e.to_string()),
    }
}

/// A refused CONNACK, by kind: authentication problems are told apart from the rest.
fn connack_failure(code: ReasonCode) -> Failure {
    let kind = match code {
        ReasonCode::BAD_USER_NAME_OR_PASSWORD | ReasonCode::NOT_AUTHORIZED => "auth refused",
        ReasonCode::SERVER_UNAVAILABLE | ReasonCode::SERVER_BUSY | ReasonCode::QUOTA_EXCEEDED => {
            "server busy"
        }
        _ => "connack refused",
    };
    Failure::new(kind, format!("CONNACK {code}"))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::{Client, ConnectOptions, Step};
    use crate::transport::{Target, TlsOptions, Transport};
    use ferry_codec::Protocol;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// A broker that accepts the CONNECT (CONNACK, MQTT 3.1.1), then answers nothing but, if
    /// `pong`, PINGREQs (40 ms late): every byte it gets afterwards is passed on to the test.
    async fn silent_broker(pong: bool) -> (Target, mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let n = socket.read(&mut buf).await.unwrap();
            assert_eq!(buf[0], 0x10, "CONNECT first ({n} bytes)");
            socket.write_all(&[0x20, 2, 0, 0]).await.unwrap();
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if pong && buf[..n] == [0xC0, 0] {
                            // Late enough that the client's step is waiting on its timer.
                            tokio::time::sleep(Duration::from_millis(40)).await;
                            socket.write_all(&[0xD0, 0]).await.unwrap();
                        }
                        let _ = tx.send(buf[..n].to_vec());
                    }
                }
            }
        });
        let target = Target::new(
            "127.0.0.1",
            port,
            Transport::Tcp,
            "/mqtt",
            &TlsOptions::default(),
        )
        .unwrap();
        (target, rx)
    }

    async fn connect(target: &Target, keep_alive: u16) -> Client {
        let opts = ConnectOptions {
            protocol: Protocol::V3_1_1,
            client_id: "timer-test".into(),
            username: None,
            password: None,
            keep_alive,
            session_expiry: None,
            bind: None,
        };
        Client::connect(target, &opts, Duration::from_secs(5))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_step_ends_idle_at_its_deadline_and_a_later_deadline_is_kept() {
        let (target, _rx) = silent_broker(true).await;
        let mut client = connect(&target, 0).await;
        // (deadline, then the next step's deadline): after a step that ends idle, and after
        // steps that set the timer for the first deadline and end with a read before it (the
        // timer then fires for the earlier time, or is set earlier).
        for (first_ms, next_ms, after_read) in
            [(100, 300, false), (100, 300, true), (20_000, 50, true)]
        {
            let first = Some(Instant::now() + Duration::from_millis(first_ms));
            if after_read {
                client.push(&ferry_codec::Packet::PingReq).unwrap();
                assert_eq!(client.step(first).await.unwrap(), Step::Wrote);
                assert_eq!(client.step(first).await.unwrap(), Step::Read);
                let pong = client.try_decode().unwrap();
                assert_eq!(pong, Some(ferry_codec::Packet::PingResp));
            } else {
                assert_eq!(client.step(first).await.unwrap(), Step::Idle);
            }
            let start = Instant::now();
            let next = Duration::from_millis(next_ms);
            assert_eq!(client.step(Some(start + next)).await.unwrap(), Step::Idle);
            let took = start.elapsed();
            assert!(
                took >= next && took < next + Duration::from_secs(2),
                "{took:?}"
            );
        }
    }

    #[tokio::test]
    async fn pings_go_out_on_time_without_a_deadline_and_two_unanswered_end_the_client() {
        let (target, mut rx) = silent_broker(false).await;
        // Keep-alive 1 s: a PINGREQ every 750 ms.
        let mut client = connect(&target, 1).await;
        let start = Instant::now();
        // A deadline before the ping, then none: the ping still comes at its time.
        let step = client.step(Some(start + Duration::from_millis(100))).await;
        assert_eq!(step.unwrap(), Step::Idle);
        for n in 1..=2 {
            let step = client.step(None).await.unwrap();
            assert_eq!(step, Step::Wrote, "ping {n} queued");
            // The PINGREQ is written by the next step; the broker never answers.
            let deadline = Instant::now() + Duration::from_millis(50);
            while client.step(Some(deadline)).await.unwrap() != Step::Idle {}
            let got = rx.recv().await.unwrap();
            assert_eq!(got, vec![0xC0, 0], "PINGREQ {n}");
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(4),
            "{elapsed:?}"
        );
        let err = client.step(None).await.unwrap_err();
        assert_eq!(err.kind, "keep-alive timeout");
    }
}
