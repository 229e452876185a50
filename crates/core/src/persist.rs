//! What the broker core asks the store to keep. The core does no I/O: with persistence on it
//! emits [`StoreOp`]s (drained by the runtime, which writes them in order, batched) and marks
//! the answers that must wait until those writes are durable ([`crate::Output::SendDurable`]).
//! At start-up the runtime hands the stored state back through [`crate::Broker::restore_session`]
//! and [`crate::Broker::restore_retained`].
//!
//! Only persistent sessions (session expiry > 0; MQTT 3 clean session = 0) and retained
//! messages are stored; clean sessions stay in memory.

use crate::message::SharedMessage;
use crate::session::Delivery;
use crate::trie::Subscription;
use ferry_codec::ByteStr;
use std::time::Instant;

/// The persistent part of a session, written whole on every change.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub client_id: ByteStr,
    /// Seconds; `u32::MAX` = never expires.
    pub expiry_interval: u32,
    /// When its connection ended; `None` while connected.
    pub disconnected_at: Option<Instant>,
    /// Raw filter (`$share/…` included) and options, sorted by filter.
    pub subscriptions: Vec<(ByteStr, Subscription)>,
    /// QoS 2 packet ids received and not yet released.
    pub incoming_qos2: Vec<u16>,
}

/// Where a stored outgoing message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Waiting for room in the inflight window or for the client.
    Queued,
    /// Sent with `packet_id`, waiting for PUBACK / PUBREC.
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub delivery: Delivery,
    pub state: MessageState,
    /// 0 while queued.
    pub packet_id: u16,
}

#[derive(Debug, Clone)]
pub enum StoreOp {
    Session(SessionRecord),
    /// The session ended: its record and all its messages go.
    SessionDeleted {
        client_id: ByteStr,
    },
    /// A message for a persistent session, new or in a new state; `seq` orders a session's
    /// messages.
    Message {
        client_id: ByteStr,
        seq: u64,
        message: StoredMessage,
    },
    MessageDeleted {
        client_id: ByteStr,
        seq: u64,
    },
    Retained(SharedMessage),
    RetainedDeleted {
        topic: ByteStr,
    },
}

/// A request to read a stored session's spilled messages back into memory: those after
/// `after_seq`, at most `limit`, in order. The runtime answers with
/// [`crate::Broker::loaded`] once everything written before the request is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRequest {
    pub client_id: ByteStr,
    pub after_seq: u64,
    pub limit: usize,
}
