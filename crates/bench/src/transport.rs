//! How a connection reaches the broker: TCP, TLS, WebSocket or WebSocket over TLS, optionally
//! from a chosen local address.

use crate::client::Io;
use crate::error::Failure;
use crate::ws::WsStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Transport {
    pub fn parse(s: &str) -> Result<Transport, String> {
        match s {
            "tcp" | "mqtt" => Ok(Transport::Tcp),
            "tls" | "mqtts" | "ssl" => Ok(Transport::Tls),
            "ws" => Ok(Transport::Ws),
            "wss" => Ok(Transport::Wss),
            _ => Err(format!(
                "unknown transport {s:?} (expected tcp, tls, ws or wss)"
            )),
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        })
    }
}

/// TLS settings of a target.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM file with the certificate authorities to trust.
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate (a benchmark against a self-signed broker).
    pub insecure: bool,
    /// Name to verify the certificate against (default: the host).
    pub server_name: Option<String>,
}

/// The broker's address and how to speak to it, resolved once for all connections.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
    pub transport: Transport,
    /// WebSocket path.
    pub ws_path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    pub fn new(
        host: &str,
        port: u16,
        transport: Transport,
        ws_path: &str,
        tls: &TlsOptions,
    ) -> anyhow::Result<Target> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| anyhow::anyhow!("cannot resolve {host}:{port}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{host}:{port} resolves to no address"))?;
        anyhow::ensure!(
            ws_path.starts_with('/'),
            "the WebSocket path must start with '/', not {ws_path:?}"
        );
        let tls = if transport.uses_tls() {
            let name = tls.server_name.clone().unwrap_or_else(|| host.to_string());
            let name = ServerName::try_from(name.clone())
                .map_err(|_| anyhow::anyhow!("invalid TLS server name {name:?}"))?;
            Some((TlsConnector::from(Arc::new(client_config(tls)?)), name))
        } else {
            anyhow::ensure!(
                tls.ca_file.is_none() && !tls.insecure,
                "--cafile and --insecure need --transport tls or wss"
            );
            None
        };
        Ok(Target {
            host: host.to_string(),
            port,
            addr,
            transport,
            ws_path: ws_path.to_string(),
            tls,
        })
    }
}

/// Opens the transport: TCP connection (from `bind`), then TLS and the WebSocket handshake.
pub(crate) async fn open(target: &Target, bind: Option<IpAddr>) -> Result<Io, Failure> {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(connect_failure)?;
    if let Some(ip) = bind {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| Failure::new("bind failed", format!("{ip}: {e}")))?;
    }
    let stream: TcpStream = socket.connect(target.addr).await.map_err(connect_failure)?;
    stream.set_nodelay(true).map_err(connect_failure)?;
    let host = format!("{}:{}", target.host, target.port);
    match (&target.tls, target.transport) {
        (None, Transport::Tcp) => Ok(Io::Tcp(stream)),
        (None, _) => {
            let ws = WsStream::handshake(stream, &host, &target.ws_path).await?;
            Ok(Io::Stream(Box::new(ws)))
        }
        (Some((connector, name)), transport) => {
            let tls = connector
                .connect(name.clone(), stream)
                .await
                .map_err(|e| Failure::new("tls handshake", e.to_string()))?;
            if transport == Transport::Wss {
                let ws = WsStream::handshake(tls, &host, &target.ws_path).await?;
                Ok(Io::Stream(Box::new(ws)))
            } else {
                Ok(Io::Stream(Box::new(tls)))
            }
        }
    }
}

fn connect_failure(e: io::Error) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused",
        io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => "no free local port",
        io::ErrorKind::TimedOut => "connect timeout",
        _ if e.raw_os_error() == Some(24) => "too many open files",
        _ => "connect failed",
    };
    Failure::new(kind, e.to_string())
}

fn client_config(opts: &TlsOptions) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth()
    } else {
        let Some(path) = &opts.ca_file else {
            anyhow::bail!("TLS needs --cafile (the broker's CA certificate) or --insecure");
        };
        builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth()
    };
    Ok(config)
}

fn load_roots(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| anyhow::anyhow!("bad PEM in {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("bad certificate in {}: {e}", path.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", path.display());
    Ok(roots)
}

/// `--insecure`: any certificate is accepted, but handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
