//! MQTT over WebSocket, server side (RFC 6455): the opening handshake (HTTP/1.1 upgrade on the
//! configured path, subprotocol `mqtt`), then a byte stream whose reads are the payloads of the
//! client's binary frames and whose writes go out as binary frames. The connection task sees it
//! as any other stream.
//!
//! Reading unmasks payload bytes as they arrive (a frame is never held whole); pings are
//! answered with pongs, a close frame is answered and ends the stream, a text frame or an
//! unmasked frame is an error. Every write becomes one frame, buffered until the socket takes
//! it; a new write waits until the previous frame is out, so at most one frame is buffered.
//! Both buffers are given back when empty, and reads go through the stack, so an idle
//! connection holds no buffer.

use base64::Engine as _;
use bytes::{Buf, BufMut, BytesMut};
use ferry_codec::ws::{
    apply_mask, parse_header, put_header, GUID, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING,
    OP_PONG, OP_TEXT,
};
use sha1::{Digest, Sha1};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The largest opening handshake request we read.
const MAX_REQUEST: usize = 8 * 1024;
const READ_CHUNK: usize = 4096;

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Reads the client's opening handshake on `io`, answers it, and returns the WebSocket stream.
/// A request that is not a WebSocket upgrade to `path` gets an HTTP error answer and `Err`.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    path: &str,
) -> io::Result<WsStream<S>> {
    let mut raw = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if raw.len() > MAX_REQUEST {
            return Err(refuse(&mut io, 431, "Request Header Fields Too Large", "").await);
        }
        if io.read_buf(&mut raw).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the WebSocket handshake",
            ));
        }
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    raw.advance(end);
    let answer = match Request::parse(&head).and_then(|r| r.answer(path)) {
        Ok(answer) => answer,
        Err((code, reason, extra)) => return Err(refuse(&mut io, code, reason, extra).await),
    };
    io.write_all(answer.as_bytes()).await?;
    io.flush().await?;
    Ok(WsStream {
        inner: io,
        rx: raw,
        frame: None,
        tx: BytesMut::new(),
        eof: false,
        close_sent: false,
    })
}

/// Answers an unacceptable handshake with `code` and returns the error for the log.
async fn refuse<S: AsyncWrite + Unpin>(
    io: &mut S,
    code: u16,
    reason: &str,
    extra_headers: &str,
) -> io::Error {
    let body = format!("{reason}\n");
    let answer = format!(
        "HTTP/1.1 {code} {reason}\r\n{extra_headers}Content-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(answer.as_bytes()).await;
    let _ = io.flush().await;
    invalid(format!("WebSocket handshake refused: {code} {reason}"))
}

/// The parts of the opening handshake request we check.
struct Request<'a> {
    method: &'a str,
    target: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

type Refusal = (u16, &'static str, &'static str);

impl<'a> Request<'a> {
    fn parse(head: &'a str) -> Result<Self, Refusal> {
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, target) = match (first.next(), first.next(), first.next()) {
            (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => (m, t),
            _ => return Err((400, "Bad Request", "")),
        };
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        Ok(Request {
            method,
            target,
            headers,
        })
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// Whether a comma-separated header lists `token` (case-insensitive).
    fn lists(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// The 101 answer, or why not.
    fn answer(&self, path: &str) -> Result<String, Refusal> {
        if self.method != "GET" {
            return Err((405, "Method Not Allowed", "Allow: GET\r\n"));
        }
        if self.target.split('?').next() != Some(path) {
            return Err((404, "Not Found", ""));
        }
        if !self.lists("Upgrade", "websocket") || !self.lists("Connection", "upgrade") {
            return Err((426, "Upgrade Required", "Upgrade: websocket\r\n"));
        }
        if self.header("Sec-WebSocket-Version") != Some("13") {
            return Err((426, "Upgrade Required", "Sec-WebSocket-Version: 13\r\n"));
        }
        let key = self
            .header("Sec-WebSocket-Key")
            .filter(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .is_ok_and(|b| b.len() == 16)
            })
            .ok_or((400, "Bad Request", ""))?;
        // MQTT over WebSocket names its subprotocol `mqtt` (MQTT 3.1 clients: `mqttv3.1`). A
        // client that offers others only is refused; one that offers none is served.
        let protocol = match self.header("Sec-WebSocket-Protocol") {
            None => None,
            Some(_) => Some(
                ["mqtt", "mqttv3.1"]
                    .into_iter()
                    .find(|p| self.lists("Sec-WebSocket-Protocol", p))
                    .ok_or((400, "Bad Request", ""))?,
            ),
        };
        let accept = base64::engine::general_purpose::STANDARD
            .encode(Sha1::digest(format!("{key}{GUID}").as_bytes()));
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n"
        );
        if let Some(p) = protocol {
            answer.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        answer.push_str("\r\n");
        Ok(answer)
    }
}

/// The data frame being read: payload bytes left, its mask, and where in the mask we are.
struct Frame {
    left: u64,
    mask: [u8; 4],
    at: usize,
}

/// A WebSocket connection as a byte stream of MQTT.
pub(crate) struct WsStream<S> {
    inner: S,
    /// Bytes read from `inner` and not yet parsed.
    rx: BytesMut,
    frame: Option<Frame>,
    /// Framed bytes not yet written to `inner`.
    tx: BytesMut,
    /// The client closed (a close frame) or the stream failed: reads end.
    eof: bool,
    close_sent: bool,
}

/// Appends a server frame (never masked) with `payload` to `out`.
fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    put_header(out, opcode, payload.len(), None);
    out.put_slice(payload);
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Writes the buffered frames; `Ready(Ok)` once all are out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.tx))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.advance(n);
        }
        if self.tx.capacity() > 0 {
            self.tx = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Handles the control frame or starts the data frame whose header is at the front of
    /// `rx`; `Ok(false)` if the frame (header, or a control frame's payload) is incomplete.
    fn take_header(&mut self) -> io::Result<bool> {
        let Some(h) = parse_header(&self.rx) else {
            return Ok(false);
        };
        if h.rsv != 0 {
            return Err(invalid("WebSocket frame with reserved bits set"));
        }
        let Some(mask) = h.mask else {
            return Err(invalid("unmasked WebSocket frame from a client"));
        };
        match h.opcode {
            OP_BINARY | OP_CONTINUATION => {
                self.rx.advance(h.size);
                self.frame = (h.len > 0).then_some(Frame {
                    left: h.len,
                    mask,
                    at: 0,
                });
                Ok(true)
            }
            OP_TEXT => Err(invalid(
                "WebSocket text frame: MQTT travels in binary frames",
            )),
            OP_CLOSE | OP_PING | OP_PONG => {
                if h.len > 125 || !h.fin {
                    return Err(invalid("malformed WebSocket control frame"));
                }
                let end = h.size + h.len as usize;
                if self.rx.len() < end {
                    return Ok(false);
                }
                let mut payload = self.rx[h.size..end].to_vec();
                apply_mask(&mut payload, mask, 0);
                self.rx.advance(end);
                match h.opcode {
                    OP_PING => put_frame(&mut self.tx, OP_PONG, &payload),
                    OP_CLOSE => {
                        if !self.close_sent {
                            // Echo the status code, as the RFC asks.
                            put_frame(&mut self.tx, OP_CLOSE, &payload[..payload.len().min(2)]);
                            self.close_sent = true;
                        }
                        self.eof = true;
                    }
                    _ => {}
                }
                Ok(true)
            }
            other => Err(invalid(format!("WebSocket frame with opcode {other:#x}"))),
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
            if let Some(frame) = &mut this.frame {
                let n = (this.rx.len() as u64).min(frame.left) as usize;
                let n = n.min(buf.remaining());
                if n > 0 {
                    let out = buf.initialize_unfilled_to(n);
                    out.copy_from_slice(&this.rx[..n]);
                    apply_mask(out, frame.mask, frame.at);
                    buf.advance(n);
                    this.rx.advance(n);
                    frame.at = (frame.at + n) % 4;
                    frame.left -= n as u64;
                    if frame.left == 0 {
                        this.frame = None;
                    }
                    return Poll::Ready(Ok(()));
                }
            } else if !this.eof && this.take_header()? {
                if !this.tx.is_empty() {
                    // A pong or the close answer: sent now if the socket takes it, else
                    // with the next write or flush.
                    let _ = this.poll_send(cx)?;
                }
                continue;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rx.is_empty() && this.rx.capacity() > 0 {
                this.rx = BytesMut::new(); // nothing buffered: hold no memory while idle
            }
            // Read through the stack, so that a connection waiting for data holds no buffer.
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
            this.rx.extend_from_slice(read.filled());
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        let len = bufs.iter().map(|b| b.len()).sum();
        if len > 0 {
            put_header(&mut this.tx, OP_BINARY, len, None);
            for b in bufs {
                this.tx.put_slice(b);
            }
            // Out now if the socket takes it; what it does not is sent before the next write.
            let _ = this.poll_send(cx)?;
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            put_frame(&mut this.tx, OP_CLOSE, &1000u16.to_be_bytes());
            this.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
