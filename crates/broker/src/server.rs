//! The MQTT listeners (TCP; TLS, WebSocket and WebSocket over TLS when configured), the
//! instances' router tasks, and graceful shutdown.

use crate::auth::Authenticator;
use crate::control::Control;
use crate::instances::Instances;
use crate::metrics::Metrics;
use crate::persist::Persistence;
use crate::{connection, Shared};
use ferry_core::{Acl, Limits};
use ferry_meta::{Meta, Profile};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn};

/// Everything the runtime needs to serve MQTT.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// MQTT over TLS (port 8883 by convention); off when `None`.
    pub tls: Option<TlsListener>,
    /// MQTT over WebSocket (port 8083 by convention); off when `None`.
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (port 8084 by convention); off when `None`.
    pub wss: Option<TlsListener>,
    /// The HTTP path of the WebSocket listeners.
    pub ws_path: String,
    /// The server-wide limits; an instance's settings can narrow them.
    pub limits: Limits,
    /// Server-wide topic ACL, applied in every instance.
    pub acl: Acl,
    /// The listener's own users, for clients whose user name is not `<Mode>|<Key>|<Instance>`.
    pub auth: Authenticator,
    /// A connection must complete its CONNECT within this time.
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// Packets queued for one connection beyond which QoS 0 publishes to it are dropped.
    pub outbox_qos0_limit: usize,
    /// Depth of the channel from connections to an instance's router.
    pub router_queue: usize,
    /// How long shutdown waits for connections to flush and close.
    pub shutdown_grace: Duration,
    /// The instance of clients whose user name is not `<Mode>|<Key>|<InstanceId>`.
    pub default_instance: String,
    /// Failed logins per source address within a minute before further attempts from it are
    /// refused without checking (0 = no limit).
    pub max_failed_logins_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls: None,
            ws: None,
            wss: None,
            ws_path: "/mqtt".into(),
            limits: Limits::default(),
            acl: Acl::default(),
            auth: Authenticator {
                allow_anonymous: true,
                users: Vec::new(),
            },
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            outbox_qos0_limit: 1000,
            router_queue: 4096,
            shutdown_grace: Duration::from_secs(10),
            default_instance: "default".into(),
            max_failed_logins_per_minute: 20,
        }
    }
}

/// The TLS listener: its address and the acceptor holding the certificate and key.
#[derive(Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    pub fn new(listen: SocketAddr, config: tokio_rustls::rustls::ServerConfig) -> Self {
        TlsListener {
            listen,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// How a listener's connections speak MQTT.
#[derive(Clone)]
enum Transport {
    Tcp,
    Tls(tokio_rustls::TlsAcceptor),
    /// WebSocket on this path.
    Ws(Arc<str>),
    Wss(tokio_rustls::TlsAcceptor, Arc<str>),
}

impl Transport {
    fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws(_) => "ws",
            Transport::Wss(..) => "wss",
        }
    }
}

/// A connection's byte stream once its transport's handshakes are done.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    /// Every listener's transport name and address, TCP first.
    addrs: Vec<(&'static str, SocketAddr)>,
    shared: Arc<Shared>,
    stop_accepting: watch::Sender<bool>,
    accept: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds the listener and starts serving, with fresh metadata holding only the default
    /// instance (profile `standard`).
    pub async fn start(config: Config) -> io::Result<Server> {
        let meta = Arc::new(Meta::new());
        meta.create_instance(
            &config.default_instance,
            "default",
            Profile::Standard,
            None,
            ferry_meta::now_ms(),
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Self::start_with_meta(config, meta).await
    }

    /// Binds the listener and starts serving the instances of `meta`, in memory.
    pub async fn start_with_meta(config: Config, meta: Arc<Meta>) -> io::Result<Server> {
        Self::start_with_store(config, meta, None).await
    }

    /// Binds the listener and starts serving the instances of `meta`; with `persistence`,
    /// persistent sessions and retained messages are stored and restored at start.
    pub async fn start_with_store(
        config: Config,
        meta: Arc<Meta>,
        persistence: Option<Arc<Persistence>>,
    ) -> io::Result<Server> {
        Self::start_with_hooks(config, meta, persistence, None).await
    }

    /// [`Server::start_with_store`], reporting status events and outflow publishes to `hooks`
    /// (the rules).
    pub async fn start_with_hooks(
        config: Config,
        meta: Arc<Meta>,
        persistence: Option<Arc<Persistence>>,
        hooks: Option<Arc<dyn crate::Hooks>>,
    ) -> io::Result<Server> {
        meta.instance(&config.default_instance).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("default instance: {e}"),
            )
        })?;
        let listener = listen(config.listen)?;
        let local_addr = listener.local_addr()?;
        // The other listeners, bound before anything starts.
        let path: Arc<str> = config.ws_path.as_str().into();
        let mut others = Vec::new();
        if let Some(t) = &config.tls {
            others.push((listen(t.listen)?, Transport::Tls(t.acceptor.clone())));
        }
        if let Some(addr) = config.ws {
            others.push((listen(addr)?, Transport::Ws(path.clone())));
        }
        if let Some(t) = &config.wss {
            others.push((listen(t.listen)?, Transport::Wss(t.acceptor.clone(), path)));
        }
        let mut addrs = vec![("tcp", local_addr)];
        for (listener, transport) in &others {
            addrs.push((transport.name(), listener.local_addr()?));
        }
        let metrics = Arc::new(Metrics::default());
        let instances = Arc::new(Instances::new(
            meta,
            config.default_instance.clone(),
            config.limits.clone(),
            config.acl.clone(),
            config.router_queue,
            metrics.clone(),
            persistence.clone(),
            hooks,
        ));
        if persistence.is_some() {
            // Stored sessions must exist (and queue messages) before their clients come back.
            for instance in instances.meta.instances() {
                instances
                    .router(&instance.id)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
        }
        let shared = Arc::new(Shared {
            slots: Semaphore::new(config.max_connections),
            config,
            instances,
            metrics,
            failed_logins: Default::default(),
            started: (Instant::now(), SystemTime::now()),
            next_conn_id: AtomicU64::new(1),
        });
        let (stop_accepting, stop_rx) = watch::channel(false);
        // Forget tokens a day after they expired, so the registry does not grow without bound.
        let meta = shared.instances.meta.clone();
        let mut purge_stop = stop_rx.clone();
        tokio::spawn(async move {
            const DAY_MS: u64 = 24 * 3600 * 1000;
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        meta.purge_expired_tokens(ferry_meta::now_ms().saturating_sub(DAY_MS));
                    }
                    _ = purge_stop.changed() => return,
                }
            }
        });
        // Unconstrained by tokio's cooperative budget: whenever the accept loop runs it takes
        // every pending connection, as an event loop would, instead of yielding after a few
        // and leaving the rest to overflow the listen queue while thousands of connection
        // tasks run (a SYN dropped there costs the client a 1 s retransmission).
        let spawn_loop = |listener, tls| {
            let accept = accept_loop(listener, tls, shared.clone(), stop_rx.clone());
            tokio::spawn(tokio::task::unconstrained(accept))
        };
        let mut accept = vec![spawn_loop(listener, Transport::Tcp)];
        accept.extend(others.into_iter().map(|(l, t)| spawn_loop(l, t)));
        for (transport, addr) in &addrs {
            info!(%addr, transport, "mqtt listener started");
        }
        Ok(Server {
            local_addr,
            addrs,
            shared,
            stop_accepting,
            accept,
        })
    }

    /// The address of the MQTT/TCP listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn addr(&self, transport: &str) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(t, _)| *t == transport)
            .map(|(_, a)| *a)
    }

    /// The address of the MQTT/TLS listener, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addr("tls")
    }

    /// The address of the MQTT over WebSocket listener, if there is one.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.addr("ws")
    }

    /// The address of the MQTT over WebSocket over TLS listener, if there is one.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.addr("wss")
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// A handle for the management APIs.
    pub fn control(&self) -> Control {
        Control {
            instances: self.shared.instances.clone(),
            started: self.shared.started,
        }
    }

    /// The metadata the server authenticates against.
    pub fn meta(&self) -> Arc<Meta> {
        self.shared.instances.meta.clone()
    }

    /// Stops accepting, sends every client DISCONNECT 0x8B (v5), and waits (up to the grace
    /// period) for the connections to flush and close.
    pub async fn shutdown(self) {
        let _ = self.stop_accepting.send(true);
        for accept in self.accept {
            let _ = accept.await;
        }
        self.shared.instances.shutdown().await;
        let max = self.shared.config.max_connections as u32;
        let drained = tokio::time::timeout(
            self.shared.config.shutdown_grace,
            self.shared.slots.acquire_many(max),
        )
        .await;
        if drained.is_err() {
            warn!("connections still open after the shutdown grace period");
        }
        info!("shut down");
    }
}

/// How many connections the kernel may hold for us before we accept them (capped by
/// `net.core.somaxconn`). Mosquitto gets by with 100 because it accepts between every batch of
/// events; a burst of clients connecting at once needs more room here.
const LISTEN_BACKLOG: u32 = 4096;
/// Connections accepted in a row before the accept loop lets other tasks run.
const ACCEPT_BURST: u64 = 1024;

/// Binds the MQTT listener (address reuse on, as for any server that restarts).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    // Linux copies TCP_NODELAY to every accepted socket: one system call per connection
    // fewer (elsewhere it is set on each accepted socket as well).
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections on `listener` until `stop`. Except on plain TCP, each connection first
/// does its transport's handshakes (TLS, the WebSocket upgrade), in its own task.
async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut burst = ACCEPT_BURST;
    loop {
        // Outside the cooperative budget, a never-ending flood of connections (admitted or
        // refused) would keep this loop from ever giving the worker back: it yields every
        // ACCEPT_BURST turns.
        burst -= 1;
        if burst == 0 {
            burst = ACCEPT_BURST;
            tokio::task::yield_now().await;
        }
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = shared.slots.try_acquire() else {
            warn!(%peer, "connection limit reached, refusing");
            drop(stream);
            continue;
        };
        // Given back when the connection's driver is dropped.
        permit.forget();
        if !cfg!(target_os = "linux") {
            let _ = stream.set_nodelay(true);
        }
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, %peer, client_id = tracing::field::Empty);
        if let Transport::Tcp = transport {
            let task =
                connection::ConnTask::new(stream, peer, id, shared.clone(), stop.clone(), span);
            tokio::spawn(task);
        } else {
            let (transport, shared, stop) = (transport.clone(), shared.clone(), stop.clone());
            tokio::spawn(async move {
                let timeout = shared.config.handshake_timeout;
                // Boxed: the handshakes' state (a TLS handshake's is large) would otherwise
                // size this task for as long as the connection lives.
                let upgrade = Box::pin(handshake(&transport, stream, timeout, stop.clone()));
                match upgrade.await {
                    // Boxed: one driver for every such transport, and their state (TLS's is
                    // large) only on the connections that use them.
                    Ok(io) => connection::ConnTask::new(io, peer, id, shared, stop, span).await,
                    Err(why) => {
                        debug!(%peer, error = %why, "transport handshake failed");
                        // No driver was made: give its slot back here.
                        shared.slots.add_permits(1);
                        shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
}

/// The server side of the transport's handshakes (TLS, the WebSocket upgrade), within the
/// handshake timeout and until shutdown.
async fn handshake(
    transport: &Transport,
    stream: TcpStream,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> io::Result<Box<dyn Io>> {
    let upgrade = async {
        Ok::<Box<dyn Io>, io::Error>(match transport {
            Transport::Tcp => Box::new(stream),
            Transport::Tls(tls) => Box::new(tls.accept(stream).await?),
            Transport::Ws(path) => Box::new(crate::ws::accept(stream, path).await?),
            Transport::Wss(tls, path) => {
                Box::new(crate::ws::accept(tls.accept(stream).await?, path).await?)
            }
        })
    };
    tokio::select! {
        res = tokio::time::timeout(timeout, upgrade) => {
            res.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
        }
        _ = stop.changed() => Err(io::Error::other("shutting down")),
    }
}
