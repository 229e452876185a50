//! `ferry-bench` over TLS, WebSocket and WebSocket over TLS, against a real in-process Ferry
//! with its TLS, WebSocket and WSS listeners (a self-signed certificate from rcgen): the bench's
//! clients and Ferry's server ends check each other. When Debian's Mosquitto is installed, the
//! TLS client is also checked against Mosquitto's own TLS listener (its websockets listener is
//! not built into Debian's package).

use ferry_bench::{
    run, Auth, Common, Plan, PubSpec, Report, SubSpec, Target, TlsOptions, Transport,
};
use ferry_broker::{Config, Server, TlsListener};
use ferry_codec::{Protocol, QoS};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
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
    fn server_config(&self) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
    }
}

/// Ferry with all its listeners on 127.0.0.1:0: TCP, TLS, WebSocket and WebSocket over TLS
/// (the last two on `/mqtt`), the TLS ones with `cert`.
async fn ferry_with(cert: &Cert) -> Server {
    let tls = || {
        Some(TlsListener::new(
            "127.0.0.1:0".parse().unwrap(),
            cert.server_config(),
        ))
    };
    Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: tls(),
        ws: Some("127.0.0.1:0".parse().unwrap()),
        wss: tls(),
        ..Default::default()
    })
    .await
    .expect("server starts")
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
    let cert = Cert::new();
    let server = ferry_with(&cert).await;
    let front = server.tls_addr().unwrap();
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
    let cert = Cert::new();
    let other = Cert::new();
    let server = ferry_with(&cert).await;
    let front = server.tls_addr().unwrap();
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
    let server = ferry_with(&Cert::new()).await;
    let front = server.ws_addr().unwrap();
    let r = run(plan(front, Transport::Ws, TlsOptions::default(), "ws"))
        .await
        .unwrap();
    assert_eq!(r.transport, "ws");
    assert_complete(&r);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls() {
    let cert = Cert::new();
    let server = ferry_with(&cert).await;
    let front = server.wss_addr().unwrap();
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
