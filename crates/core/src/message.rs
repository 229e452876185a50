//! An application message as the broker holds it between publisher and subscribers.

use bytes::Bytes;
use ferry_codec::{ByteStr, Properties, Publish, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A PUBLISH a client sent under a parent topic that has an outflow rule, handed to the
/// runtime ([`crate::Broker::drain_outflow`]) to be appended to the server-side queue; the
/// publisher's acknowledgement waits for that ([`crate::Output::SendDurable`]).
#[derive(Debug, Clone)]
pub struct Outflow {
    pub client_id: ByteStr,
    /// The CONNECT's clean session (v3) / clean start (v5) flag.
    pub clean_start: bool,
    pub msg: SharedMessage,
    /// The message expiry interval the publisher set (seconds), for the queue's properties.
    pub expiry_interval: Option<u32>,
}

/// One published message. Shared (`Arc`) by every subscriber it fans out to, so the payload is
/// never copied per subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The properties passed through to subscribers (payload format, content type, response
    /// topic, correlation data, user properties). Topic alias, subscription identifiers and
    /// message expiry are per delivery and not kept here.
    pub properties: Properties,
    /// When the message expires (MQTT 5 message expiry interval), if ever.
    pub expires_at: Option<Instant>,
    /// Client id of the publisher, for no-local; empty for messages the server made.
    pub publisher: ByteStr,
}

impl Message {
    /// Builds a message from a received PUBLISH whose topic alias has been resolved.
    pub fn from_publish(publish: Publish, publisher: ByteStr, now: Instant) -> Message {
        let mut properties = publish.properties;
        let mut expires_at = None;
        if let Some(p) = properties.get_mut() {
            expires_at = p
                .message_expiry_interval
                .take()
                .map(|secs| now + Duration::from_secs(u64::from(secs)));
            p.topic_alias = None;
            p.subscription_identifiers.clear();
        }
        if properties.is_empty() {
            // Nothing left to pass on: do not keep an empty allocation per message.
            properties = Properties::default();
        }
        Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            expires_at,
            publisher,
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds left before expiry, rounded up, as sent to a subscriber (§3.3.2.3.3).
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX).max(1)
        })
    }
}

pub type SharedMessage = Arc<Message>;
