//! `ferry-bench` over TLS, WebSocket and WebSocket over TLS. Ferry has no TLS or WebSocket
//! listener yet, so these tests put small terminators in front of a real in-process Ferry: a
//! rustls server (self-signed certificate from rcgen) and a WebSocket server (RFC 6455
//! handshake and framing, written here), each passing the MQTT bytes through to Ferry's TCP
//! port. When Debian's Mosquitto is installed, the TLS client is also checked against
//! Mosquitto's own TLS listener (its websockets listener is not built into Debian's package).

use base64::Engine as _;
use bytes::{Buf, BufMut, BytesMut};
use ferry_bench::{
    run, Auth, Common, Plan, PubSpec, Report, SubSpec, Target, TlsOptions, Transport,
};
use ferry_broker::{Config, Server};
use ferry_codec::{Protocol, QoS};
use sha1::{Digest, Sha1};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

async fn ferry() -> Server {
    Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .expect("server starts")
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files.
struct Cert {
    dir: tempfile::TempDir,
    cert_pem: String,
    key_pem: String,
}

impl Cert {
    fn new() -> Cert {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = Cert {
            dir,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(c.cert_path(), &c.cert_pem).unwrap();
        std::fs::write(c.key_path(), &c.key_pem).unwrap();
        c
    }
    fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

#[derive(Clone, Copy)]
enum Front {
    Tls,
    Ws,
    Wss,
}

/// Listens on 127.0.0.1:0 and passes each connection, unwrapped, through to `backend`.
async fn terminator(front: Front, backend: SocketAddr, cert: Option<&Cert>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = cert.map(Cert::acceptor);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(back) = TcpStream::connect(backend).await else {
                    return;
                };
                match front {
                    Front::Tls => {
                        if let Ok(tls) = acceptor.unwrap().accept(stream).await {
                            pipe(tls, back).await;
                        }
                    }
                    Front::Ws => ws_serve(stream, back).await,
                    Front::Wss => {
                        if let Ok(tls) = acceptor.unwrap().accept(stream).await {
                            ws_serve(tls, back).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn pipe(mut a: impl AsyncRead + AsyncWrite + Unpin, mut b: TcpStream) {
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// A WebSocket server end: the handshake (subprotocol `mqtt`), then masked client frames are
/// unmasked into `back` and what `back` sends goes out in unmasked binary frames.
async fn ws_serve<S: AsyncRead + AsyncWrite + Unpin>(client: S, back: TcpStream) {
    let (mut cr, mut cw) = tokio::io::split(client);
    let mut buf = BytesMut::new();
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if cr.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end);
    let key = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    assert!(head
        .to_ascii_lowercase()
        .contains("sec-websocket-protocol: mqtt"));
    let accept = base64::engine::general_purpose::STANDARD.encode(Sha1::digest(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    if cw.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let (mut br, mut bw) = back.into_split();
    let up = async move {
        // Client frames → backend.
        loop {
            while let Some((payload, used)) = parse_masked(&buf) {
                buf.advance(used);
                if bw.write_all(&payload).await.is_err() {
                    return;
                }
            }
            if cr.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                let _ = bw.shutdown().await;
                return;
            }
        }
    };
    let down = async move {
        // Backend bytes → binary frames, cut at an arbitrary size to exercise reassembly.
        let mut chunk = vec![0u8; 3000];
        loop {
            let n = br.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                let _ = cw.write_all(&[0x88, 0]).await;
                return;
            }
            let mut frame = BytesMut::new();
            for part in chunk[..n].chunks(1000) {
                frame.put_u8(0x82);
                if part.len() < 126 {
                    frame.put_u8(part.len() as u8);
                } else {
                    frame.put_u8(126);
                    frame.put_u16(part.len() as u16);
                }
                frame.put_slice(part);
            }
            if cw.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}

/// One masked client frame off `buf`: its unmasked payload and the bytes it used.
fn parse_masked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0x80, "client frames must be masked");
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    at += 4;
    let data = buf.get(at..at + len)?;
    let payload = data
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    match buf[0] & 0x0f {
        0x0 | 0x2 => Some((payload, at + len)),
        // A close frame: nothing to forward.
        _ => Some((Vec::new(), at + len)),
    }
}

fn plan(addr: SocketAddr, transport: Transport, tls: TlsOptions, tag: &str) -> Plan {
    Plan {
        name: tag.into(),
        common: Common {
            target: Target::new("127.0.0.1", addr.port(), transport, "/mqtt", &tls).unwrap(),
            protocol: Protocol::V5,
            client_id: format!("tr-{tag}-{}-%i", std::process::id()),
            auth: Auth::Anonymous,
            keep_alive: 30,
            session_expiry: None,
            bind: Vec::new(),
            connect_rate: 0.0,
            connect_concurrency: 16,
            timeout: Duration::from_secs(5),
            progress: false,
            start_index: 0,
        },
        subs: Some(SubSpec {
            clients: 3,
            filter: format!("{tag}/%i"),
            qos: QoS::AtLeastOnce,
            group: None,
        }),
        pubs: Some(PubSpec {
            clients: 3,
            topic: format!("{tag}/%i"),
            qos: QoS::AtLeastOnce,
            size: 2000,
            count: Some(300),
            duration: None,
            rate: None,
            inflight: 16,
            retain: false,
        }),
        idle: 0,
        copies: Some(1),
        hold: None,
        stop_after: None,
    }
}

fn assert_complete(r: &Report) {
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.messages.sent, 900, "{r}");
    assert_eq!(r.messages.acked, 900, "{r}");
    assert_eq!(r.messages.received, 900, "{r}");
    assert_eq!(r.messages.lost, Some(0), "{r}");
}

fn trusting(cert: &Cert) -> TlsOptions {
    TlsOptions {
        ca_file: Some(cert.cert_path()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_trusted_ca_and_with_insecure() {
    let server = ferry().await;
    let cert = Cert::new();
    let front = terminator(Front::Tls, server.local_addr(), Some(&cert)).await;
    let r = run(plan(front, Transport::Tls, trusting(&cert), "tls"))
        .await
        .unwrap();
    assert_eq!(r.transport, "tls");
    assert_complete(&r);
    let insecure = TlsOptions {
        insecure: true,
        ..Default::default()
    };
    let r = run(plan(front, Transport::Tls, insecure, "tls-insecure"))
        .await
        .unwrap();
    assert_complete(&r);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_untrusted_certificate_is_a_handshake_error() {
    let server = ferry().await;
    let cert = Cert::new();
    let other = Cert::new();
    let front = terminator(Front::Tls, server.local_addr(), Some(&cert)).await;
    let r = run(plan(front, Transport::Tls, trusting(&other), "tls-bad"))
        .await
        .unwrap();
    assert_eq!(r.errors.get("tls handshake"), Some(&6), "{r}");
    assert_eq!(r.connections.connected, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn tls_options_are_checked() {
    let no_ca = Target::new("127.0.0.1", 1, Transport::Tls, "/", &TlsOptions::default());
    assert!(no_ca.err().unwrap().to_string().contains("--cafile"));
    let missing = TlsOptions {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..Default::default()
    };
    let e = Target::new("127.0.0.1", 1, Transport::Tls, "/", &missing);
    assert!(e.err().unwrap().to_string().contains("/nonexistent/ca.pem"));
    let e = Target::new("127.0.0.1", 1, Transport::Tcp, "/", &missing);
    assert!(e.err().unwrap().to_string().contains("tls"));
    let e = Target::new(
        "127.0.0.1",
        1,
        Transport::Ws,
        "mqtt",
        &TlsOptions::default(),
    );
    assert!(e.err().unwrap().to_string().contains("path"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket() {
    let server = ferry().await;
    let front = terminator(Front::Ws, server.local_addr(), None).await;
    let r = run(plan(front, Transport::Ws, TlsOptions::default(), "ws"))
        .await
        .unwrap();
    assert_eq!(r.transport, "ws");
    assert_complete(&r);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls() {
    let server = ferry().await;
    let cert = Cert::new();
    let front = terminator(Front::Wss, server.local_addr(), Some(&cert)).await;
    let r = run(plan(front, Transport::Wss, trusting(&cert), "wss"))
        .await
        .unwrap();
    assert_eq!(r.transport, "wss");
    assert_complete(&r);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_a_plain_mqtt_port_is_a_handshake_error() {
    let server = ferry().await;
    let r = run(plan(
        server.local_addr(),
        Transport::Ws,
        TlsOptions::default(),
        "ws-bad",
    ))
    .await
    .unwrap();
    assert_eq!(r.errors.get("websocket handshake"), Some(&6), "{r}");
    server.shutdown().await;
}

/// Mosquitto with a TLS listener (skipped, saying so, when Mosquitto is not installed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_against_mosquitto() {
    let mosquitto = std::env::var("MOSQUITTO").unwrap_or_else(|_| "/usr/sbin/mosquitto".into());
    if !std::path::Path::new(&mosquitto).exists() {
        eprintln!("skipped: {mosquitto} is not installed (apt-get install mosquitto)");
        return;
    }
    let cert = Cert::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = cert.dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\nallow_anonymous true\n\
             persistence false\nlog_dest none\n",
            cert.cert_path().display(),
            cert.key_path().display()
        ),
    )
    .unwrap();
    // Mosquitto started as root switches to its own user: let it read the files.
    for path in [
        cert.dir.path().to_path_buf(),
        cert.cert_path(),
        cert.key_path(),
        conf.clone(),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut child = tokio::process::Command::new(&mosquitto)
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut up = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "mosquitto did not start listening");
    let r = run(plan(addr, Transport::Tls, trusting(&cert), "mosq-tls")).await;
    // Stopped by its own handle (its PID), whatever the outcome.
    let _ = child.start_kill();
    let _ = child.wait().await;
    assert_complete(&r.unwrap());
}
