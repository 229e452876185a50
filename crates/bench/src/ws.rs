//! A minimal WebSocket client (RFC 6455) for MQTT over WebSocket: the opening handshake with
//! subprotocol `mqtt`, then MQTT bytes in binary frames. Written here rather than pulled in:
//! the bench needs only this much, and its byte-stream shape (`AsyncRead + AsyncWrite`) lets the
//! MQTT client treat a WebSocket like any other stream.
//!
//! Outgoing frames are masked (clients must mask) with a key from a small generator; incoming
//! frames are unmasked binary or continuation frames, pings are answered, a close frame ends
//! the stream.

use crate::error::Failure;
use base64::Engine as _;
use bytes::{Buf, BufMut, BytesMut};
use ferry_codec::ws::{
    apply_mask, parse_header, put_header, GUID, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING,
    OP_PONG,
};
use sha1::{Digest, Sha1};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Framed bytes buffered before `poll_write` waits for the socket.
const OUT_LIMIT: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// The largest HTTP answer to the opening handshake we read.
const MAX_HANDSHAKE: usize = 16 * 1024;

pub(crate) struct WsStream<S> {
    inner: S,
    /// Raw bytes read from `inner`, not yet parsed.
    raw: BytesMut,
    /// Payload bytes of the current data frame still to hand out.
    payload_left: u64,
    /// Framed bytes not yet written to `inner`.
    out: BytesMut,
    /// The peer sent a close frame.
    closed: bool,
    rng: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Sends the opening handshake for `path` on `host` and checks the answer.
    pub async fn handshake(mut inner: S, host: &str, path: &str) -> Result<Self, Failure> {
        let mut rng = seed();
        let key = base64::engine::general_purpose::STANDARD.encode(
            (0..2)
                .flat_map(|_| next(&mut rng).to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        let fail = |e: io::Error| Failure::new("websocket handshake", e.to_string());
        inner.write_all(request.as_bytes()).await.map_err(fail)?;
        inner.flush().await.map_err(fail)?;
        let mut raw = BytesMut::with_capacity(1024);
        let end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if raw.len() > MAX_HANDSHAKE {
                return Err(Failure::new(
                    "websocket handshake",
                    "answer headers too long",
                ));
            }
            if inner.read_buf(&mut raw).await.map_err(fail)? == 0 {
                return Err(Failure::new(
                    "websocket handshake",
                    "connection closed during the handshake",
                ));
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        raw.advance(end);
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("101") {
            return Err(Failure::new(
                "websocket handshake",
                format!("expected 101 Switching Protocols, got {status:?}"),
            ));
        }
        let expected = base64::engine::general_purpose::STANDARD
            .encode(Sha1::digest(format!("{key}{GUID}").as_bytes()));
        let accept = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| value.trim().to_string())
        });
        if accept.as_deref() != Some(expected.as_str()) {
            return Err(Failure::new(
                "websocket handshake",
                "missing or wrong Sec-WebSocket-Accept",
            ));
        }
        Ok(WsStream {
            inner,
            raw,
            payload_left: 0,
            out: BytesMut::new(),
            closed: false,
            rng,
        })
    }

    /// Appends one masked frame carrying `payload`.
    fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = (next(&mut self.rng) as u32).to_be_bytes();
        put_header(&mut self.out, opcode, payload.len(), Some(mask));
        let start = self.out.len();
        self.out.put_slice(payload);
        apply_mask(&mut self.out[start..], mask, 0);
    }

    /// Writes buffered frames until none is left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Parses one frame header (and, for control frames, the payload) off `raw`. `Ok(false)`:
    /// more bytes are needed.
    fn parse_header(&mut self) -> io::Result<bool> {
        let Some(h) = parse_header(&self.raw) else {
            return Ok(false);
        };
        if h.mask.is_some() {
            return Err(invalid("masked frame from the server"));
        }
        match h.opcode {
            OP_CONTINUATION..=OP_BINARY => {
                self.raw.advance(h.size);
                self.payload_left = h.len;
                Ok(true)
            }
            OP_CLOSE..=OP_PONG => {
                let total = h.size + h.len as usize;
                if h.len > 125 {
                    return Err(invalid("control frame too long"));
                }
                if self.raw.len() < total {
                    return Ok(false);
                }
                let payload = self.raw[h.size..total].to_vec();
                self.raw.advance(total);
                match h.opcode {
                    OP_CLOSE => self.closed = true,
                    OP_PING => self.frame(OP_PONG, &payload),
                    _ => {}
                }
                Ok(true)
            }
            _ => Err(invalid("unknown frame opcode")),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            if this.payload_left > 0 && !this.raw.is_empty() {
                let n = (this.payload_left as usize)
                    .min(this.raw.len())
                    .min(buf.remaining());
                buf.put_slice(&this.raw[..n]);
                this.raw.advance(n);
                this.payload_left -= n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.payload_left == 0 && this.parse_header()? {
                // A pong may have been queued; send it along when the socket has room.
                let _ = this.poll_drain(cx)?;
                continue;
            }
            let len = this.raw.len();
            this.raw.resize(len + READ_CHUNK, 0);
            let mut read = ReadBuf::new(&mut this.raw[len..]);
            let res = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let n = read.filled().len();
            this.raw.truncate(len + n);
            ready!(res)?;
            if n == 0 {
                // End of stream without a close frame.
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() >= OUT_LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        this.frame(OP_BINARY, data);
        // Start writing now; what does not fit goes out on the next write or flush.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {what}"))
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 32)) | 1
}

/// xorshift64*: unpredictable enough for masking keys, which only stop proxy cache poisoning.
fn next(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
