//! Counters shared between the router, the connections and whoever reports them.

use std::sync::atomic::AtomicU64;

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// QoS 0 messages dropped because a subscriber's outbox was full.
    pub dropped_qos0: AtomicU64,
    /// QoS 1/2 messages dropped because a session's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Messages not sent because they exceed the client's maximum packet size.
    pub dropped_too_large: AtomicU64,
    /// Messages dropped because their message expiry interval ran out while queued.
    pub dropped_expired: AtomicU64,
    pub sessions: AtomicU64,
    pub retained: AtomicU64,
    /// Connections closed for malformed or hostile input.
    pub protocol_errors: AtomicU64,
    /// Offline messages evicted because an instance reached its cap.
    pub offline_evicted: AtomicU64,
    /// Queued messages on disk, all instances.
    pub offline_messages: AtomicU64,
    /// Instance alarm events.
    pub alarms: crate::alarms::Alarms,
}
