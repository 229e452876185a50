//! The gRPC listener: TLS and plaintext on one port, told apart by the first byte (0x16 starts a
//! TLS handshake), as a RocketMQ proxy does. TLS uses rustls (ring) with the configured
//! certificate, or a self-signed one generated at start.

use crate::engine::Queue;
use crate::pb::messaging_service_server::MessagingServiceServer;
use crate::service::MessagingService;
use ferry_meta::Meta;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Certificate and key files (PEM).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Settings of the gRPC listener.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Whether clients without an AccessKey are served (default instance only). `None`: only
    /// when the listener is bound to a loopback address (as `auth.allow_anonymous`).
    pub allow_anonymous: Option<bool>,
    /// The instance of clients that send an empty `x-mq-namespace`.
    pub default_namespace: String,
    /// The TLS certificate; `None`: a self-signed one is generated at start.
    pub tls: Option<TlsFiles>,
}

/// A running gRPC listener.
pub struct QueueServer {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    service: MessagingService,
}

impl QueueServer {
    /// Binds, then serves in the background until [`QueueServer::shutdown`]; also runs the
    /// queue's maintenance (retention sweep) and the push consumers' auto-renewal.
    pub async fn start(
        queue: Queue,
        meta: Arc<Meta>,
        cfg: ServerConfig,
    ) -> io::Result<QueueServer> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        let anonymous = cfg
            .allow_anonymous
            .unwrap_or_else(|| local_addr.ip().is_loopback());
        let acceptor = tls_acceptor(cfg.tls.as_ref())?;
        let service = MessagingService::new(queue.clone(), meta, cfg.default_namespace, anonymous);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = service.clone();
        let task = tokio::spawn(async move {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let maint_q = queue.clone();
            let mut rx1 = rx.clone();
            let maintenance = tokio::spawn(async move {
                maint_q
                    .run_maintenance(async move {
                        let _ = rx1.changed().await;
                    })
                    .await
            });
            let renew_svc = svc.clone();
            let mut rx2 = rx.clone();
            let renewal = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = rx2.changed() => return,
                        _ = tick.tick() => { renew_svc.renew(); }
                    }
                }
            });
            serve(listener, svc, acceptor, async move {
                let _ = stopped.await;
            })
            .await;
            let _ = tx.send(true);
            let _ = maintenance.await;
            let _ = renewal.await;
        });
        Ok(QueueServer {
            local_addr,
            stop: Some(stop),
            task,
            service,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn service(&self) -> &MessagingService {
        &self.service
    }

    /// Stops accepting, ends the connections, waits for the tasks.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// The TLS acceptor (HTTP/2 by ALPN) from PEM files, or with a fresh self-signed certificate.
pub fn tls_acceptor(files: Option<&TlsFiles>) -> io::Result<TlsAcceptor> {
    let mut config = tls_server_config(files, "queue")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A TLS server configuration (rustls, ring) from PEM files, or with a fresh self-signed
/// certificate for `localhost` and `127.0.0.1`. `section` names the configuration section in
/// errors (`<section>.tls_cert`). Also used for the MQTT TLS listener.
pub fn tls_server_config(
    files: Option<&TlsFiles>,
    section: &str,
) -> io::Result<rustls::ServerConfig> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let (certs, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match files {
        Some(f) => {
            let certs = CertificateDer::pem_file_iter(&f.cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("{section}.tls_cert {}: {e}", f.cert.display())))?;
            if certs.is_empty() {
                return Err(bad(format!(
                    "{section}.tls_cert {}: no certificate",
                    f.cert.display()
                )));
            }
            let key = PrivateKeyDer::from_pem_file(&f.key)
                .map_err(|e| bad(format!("{section}.tls_key {}: {e}", f.key.display())))?;
            (certs, key)
        }
        None => {
            let ck = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .map_err(|e| bad(format!("cannot generate a self-signed certificate: {e}")))?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
            (vec![ck.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(format!("{section}: TLS certificate/key: {e}")))
}

/// Serves gRPC on `listener` until `shutdown` resolves; each connection is TLS or plaintext by
/// its first byte.
pub async fn serve(
    listener: TcpListener,
    service: MessagingService,
    acceptor: TlsAcceptor,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Io>>(64);
    let accept = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("queue: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let io =
                    tokio::time::timeout(Duration::from_secs(10), sniff(stream, peer, acceptor))
                        .await;
                match io {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("queue: connection from {peer}: {e}"),
                    Err(_) => tracing::debug!("queue: connection from {peer}: handshake timeout"),
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(
            MessagingServiceServer::new(service)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept.abort();
    if let Err(e) = result {
        tracing::error!("queue: gRPC server: {e}");
    }
}

async fn sniff(stream: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor) -> io::Result<Io> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a byte",
        ));
    }
    if first[0] == 0x16 {
        let tls = acceptor.accept(stream).await?;
        Ok(Io::Tls(Box::new(tls), peer))
    } else {
        Ok(Io::Plain(stream, peer))
    }
}

/// A plaintext or TLS connection.
pub enum Io {
    Plain(TcpStream, SocketAddr),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, SocketAddr),
}

impl tonic::transport::server::Connected for Io {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Io::Plain(_, p) | Io::Tls(_, p) => Some(*p),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s, _) => s.is_write_vectored(),
            Io::Tls(s, _) => s.is_write_vectored(),
        }
    }
}
