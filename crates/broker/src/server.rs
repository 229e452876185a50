//! The TCP listener, the router task, and graceful shutdown.

use crate::auth::Authenticator;
use crate::metrics::Metrics;
use crate::router::{self, RouterMsg};
use crate::{connection, Shared};
use ferry_core::{Acl, Broker, Limits};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};

/// Everything the runtime needs to serve MQTT.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub limits: Limits,
    pub acl: Acl,
    pub auth: Authenticator,
    /// A connection must complete its CONNECT within this time.
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// Packets queued for one connection beyond which QoS 0 publishes to it are dropped.
    pub outbox_qos0_limit: usize,
    /// Depth of the channel from connections to the router.
    pub router_queue: usize,
    /// How long shutdown waits for connections to flush and close.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
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
        }
    }
}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop_accepting: watch::Sender<bool>,
    accept: JoinHandle<()>,
    router: JoinHandle<()>,
    slots: Arc<Semaphore>,
}

impl Server {
    /// Binds the listener and starts serving.
    pub async fn start(config: Config) -> io::Result<Server> {
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let (router_tx, router_rx) = mpsc::channel(config.router_queue);
        let metrics = Arc::new(Metrics::default());
        let broker = Broker::new(config.limits.clone(), config.acl.clone());
        let router = tokio::spawn(router::run(broker, router_rx, metrics.clone()));
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let shared = Arc::new(Shared {
            config,
            router: router_tx,
            metrics,
        });
        let (stop_accepting, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            slots.clone(),
            stop_rx,
        ));
        info!(addr = %local_addr, "mqtt listener started");
        Ok(Server {
            local_addr,
            shared,
            stop_accepting,
            accept,
            router,
            slots,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Stops accepting, sends every client DISCONNECT 0x8B (v5), and waits (up to the grace
    /// period) for the connections to flush and close.
    pub async fn shutdown(self) {
        let _ = self.stop_accepting.send(true);
        let _ = self.accept.await;
        let (done, wait) = oneshot::channel();
        if self
            .shared
            .router
            .send(RouterMsg::Shutdown { done })
            .await
            .is_ok()
        {
            let _ = wait.await;
        }
        let max = self.shared.config.max_connections as u32;
        let drained = tokio::time::timeout(
            self.shared.config.shutdown_grace,
            self.slots.acquire_many(max),
        )
        .await;
        if drained.is_err() {
            warn!("connections still open after the shutdown grace period");
        }
        let _ = self.router.await;
        info!("shut down");
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_id: u64 = 1;
    loop {
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "connection limit reached, refusing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, %peer, client_id = tracing::field::Empty);
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(
            async move {
                connection::run(stream, peer, id, shared, stop).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}
