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
    /// A status event, one that [`Hooks::wants_status`] accepted. Must not block: queue it and
    /// return.
    fn status(&self, event: StatusEvent);

    /// Whether a status event of this client would be used: when not, the broker does not
    /// build it (every connect and disconnect asks).
    fn wants_status(&self, instance: &str, client_id: &str) -> bool {
        let _ = (instance, client_id);
        true
    }

    /// The parent topics of `instance` whose client publishes go to the queue.
    fn outflow_parents(&self, instance: &str) -> Vec<String>;

    /// Client publishes under outflow parents, in order; the future resolves once they are
    /// stored in the queue (the publishers' acknowledgements wait for it). An error closes
    /// the waiting publishers' connections (v5: DISCONNECT 0x80), so nothing unstored is
    /// acknowledged.
    fn outflow(&self, instance: &str, messages: Vec<Outflow>) -> HookFuture;
}

/// The channel id of connection `conn` (connection ids are unique within a server): a keyed
/// bijective mix of it, so it is unique among the server's connections and, keyed by a random
/// value drawn at start, across restarts with overwhelming probability. Derived, not stored:
/// nothing per connection, no system call.
pub(crate) fn channel_id(conn: u64) -> u128 {
    use std::sync::OnceLock;
    static KEY: OnceLock<[u64; 2]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let raw: [u8; 16] = ferry_meta::random_bytes();
        let (a, b) = raw.split_at(8);
        [
            u64::from_le_bytes(a.try_into().expect("8 bytes")),
            u64::from_le_bytes(b.try_into().expect("8 bytes")),
        ]
    });
    // splitmix64's finaliser is a bijection, so distinct ids give distinct low halves.
    let hi = mix(key[0].wrapping_add(conn));
    let lo = mix(key[1] ^ conn);
    (u128::from(hi) << 64) | u128::from(lo)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A channel id as the status events carry it: 32 lowercase hex characters.
pub(crate) fn channel_id_hex(id: u128) -> String {
    format!("{id:032x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn channel_ids_are_unique_and_32_hex() {
        let mut seen = std::collections::HashSet::new();
        for conn in 0..10_000 {
            let hex = super::channel_id_hex(super::channel_id(conn));
            assert_eq!(super::channel_id(conn), super::channel_id(conn), "stable");
            assert_eq!(hex.len(), 32);
            assert!(hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(seen.insert(hex));
        }
    }
}
