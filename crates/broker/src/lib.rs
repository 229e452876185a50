//! Ferry's MQTT runtime around the sans-I/O core.
//!
//! Where things are:
//! - [`server`]: [`Server::start`] binds the TCP listener (and the TLS, WebSocket and WSS ones
//!   when configured), spawns the router task and one task per connection; [`Server::shutdown`] stops accepting, sends DISCONNECT 0x8B and drains.
//! - `instances`: one router task per instance, started on first use.
//! - `router`: the task that owns an instance's [`ferry_core::Broker`] and dispatches its
//!   outputs.
//! - [`control`]: [`Control`], the management APIs' handle (client queries, kick, publish).
//! - `logins`: failed-login rate limiting per source address.
//! - [`persist`]: encoding of the core's store operations for the embedded store, restore at
//!   start-up, and the metadata documents.
//! - `ws`: MQTT over WebSocket (the opening handshake and the framing, as a byte stream).
//! - `connection`: the per-connection driver (read, decode, [`ferry_core::Connection`], write).
//! - [`outbox`]: the bounded router → connection queue (QoS 0 overflow is dropped and counted).
//! - [`auth`]: user name / password authentication of the default listener.
//! - [`hooks`]: [`Hooks`], what the rules see: status events and outflow publishes.
//! - [`metrics`]: the counters.
//! - [`alarms`]: instance alarm events (offline messages evicted at the cap).
//!
//! Connections talk to the router over one bounded channel; the router never waits on a
//! connection. Every queue is bounded.

pub mod alarms;
pub mod auth;
mod connection;
pub mod control;
pub mod hooks;
mod instances;
mod logins;
pub mod metrics;
pub mod outbox;
pub mod persist;
mod router;
pub mod server;
mod ws;

pub use auth::{Authenticator, User};
pub use control::{ClientView, Control, ControlError, PublishRequest};
pub use hooks::{Hooks, StatusEvent, StatusKind};
pub use instances::instance_limits;
pub use metrics::Metrics;
pub use server::{Config, Server, TlsListener};

/// What every connection task shares.
pub(crate) struct Shared {
    /// Connection slots (`max_connections`): each connection's driver holds one and gives it
    /// back when dropped.
    pub slots: tokio::sync::Semaphore,
    pub config: Config,
    pub instances: std::sync::Arc<instances::Instances>,
    pub metrics: std::sync::Arc<Metrics>,
    pub failed_logins: logins::FailedLogins,
    pub started: (std::time::Instant, std::time::SystemTime),
    /// The id of the next accepted connection, all listeners together.
    pub next_conn_id: std::sync::atomic::AtomicU64,
}
