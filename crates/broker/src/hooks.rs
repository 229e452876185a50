//! [`Hooks`]: how the rules (`ferry-rules`) see the MQTT side without the broker knowing about
//! rules or the queue — client status events (§5) and client publishes under parent topics
//! with an outflow rule.

use ferry_core::Outflow;
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that [`Hooks`] stays object-safe.
pub type HookFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// A status event's type (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// The CONNECT was accepted.
    Connect,
    /// The client sent DISCONNECT (emitted before its `TcpClean`).
    Disconnect,
    /// The connection closed, for any reason; once per channel.
    TcpClean,
}

impl StatusKind {
    /// The event type as the contract writes it (also the queue message's tag).
    pub fn as_str(self) -> &'static str {
        match self {
            StatusKind::Connect => "connect",
            StatusKind::Disconnect => "disconnect",
            StatusKind::TcpClean => "tcpclean",
        }
    }
}

/// One client status event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEvent {
    pub instance: String,
    pub client_id: String,
    /// 32 lowercase hex characters, unique per TCP connection.
    pub channel_id: String,
    pub kind: StatusKind,
    /// Epoch milliseconds.
    pub time_ms: u64,
    /// `ip:port` of the client.
    pub client_ip: String,
}

/// What the broker reports to the rules.
pub trait Hooks: Send + Sync + 'static {
    /// A status event. Must not block: queue it and return.
    fn status(&self, event: StatusEvent);

    /// The parent topics of `instance` whose client publishes go to the queue.
    fn outflow_parents(&self, instance: &str) -> Vec<String>;

    /// Client publishes under outflow parents, in order; the future resolves once they are
    /// stored in the queue (the publishers' acknowledgements wait for it). An error closes
    /// the waiting publishers' connections (v5: DISCONNECT 0x80), so nothing unstored is
    /// acknowledged.
    fn outflow(&self, instance: &str, messages: Vec<Outflow>) -> HookFuture;
}

/// A fresh channel id: 32 lowercase hex characters.
pub fn new_channel_id() -> String {
    let raw: [u8; 16] = ferry_meta::random_bytes();
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
