//! The queue's vocabulary: configuration, messages, requests, errors.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Settings of the embedded queue.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// How long a stored message is kept (3 days by default), acknowledged or not.
    pub retention: Duration,
    /// Deliveries of one message to one group before it goes to `%DLQ%<group>` (17, as the
    /// consumer settings Ferry sends tell the SDKs).
    pub max_attempts: u32,
    /// Whether sending to (or receiving from) an unknown topic creates it.
    pub auto_create_topics: bool,
    /// Where a consumer group that did not exist starts reading.
    pub default_start: Start,
    /// The largest message body accepted, in bytes.
    pub max_body_size: usize,
    /// Messages removed per topic by one retention sweep.
    pub sweep_batch: usize,
    /// The `store_host` reported in delivered messages.
    pub store_host: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retention: Duration::from_secs(3 * 24 * 3600),
            max_attempts: 17,
            auto_create_topics: true,
            default_start: Start::End,
            max_body_size: 4 * 1024 * 1024,
            sweep_batch: 1000,
            store_host: "ferry".into(),
        }
    }
}

/// Where a new consumer group starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Start {
    /// At the end of the topic: only messages sent after the group was created (RocketMQ).
    #[default]
    End,
    /// At the oldest message still kept.
    Beginning,
}

/// The durable store the queue writes into (the broker's engine and group-commit writer).
#[derive(Clone)]
pub struct QueueStore {
    pub engine: Arc<dyn ferry_store::Engine>,
    pub writer: Arc<ferry_store::Writer>,
}

/// A message to send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewMessage {
    pub topic: String,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub body: Bytes,
    /// The client's message id; one is generated when `None` (or empty).
    pub message_id: Option<String>,
    pub born_host: String,
    pub born_timestamp_ms: u64,
}

/// What a successful send stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub message_id: String,
    pub offset: u64,
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub topic: String,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub body: Bytes,
    pub born_host: String,
    pub born_timestamp_ms: u64,
    pub store_timestamp_ms: u64,
    pub offset: u64,
}

/// One delivery of a message to a consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message: Message,
    /// Identifies this delivery; valid until the message is visible again or acknowledged.
    pub receipt_handle: String,
    /// 1 for the first delivery to this group.
    pub delivery_attempt: u32,
}

/// A receive (pop) request.
#[derive(Clone, Debug)]
pub struct ReceiveRequest {
    pub group: String,
    pub topic: String,
    pub filter: Filter,
    /// At most this many messages (1 if 0).
    pub max_messages: usize,
    /// How long delivered messages stay invisible to the group.
    pub invisible: Duration,
    /// Long polling: how long to wait for a message when none is ready (0 = answer at once).
    pub wait: Duration,
    /// Push consumers: the client id whose live telemetry stream keeps renewing the
    /// invisibility (see [`crate::Queue::renew_auto`]).
    pub auto_renew_client: Option<String>,
}

impl ReceiveRequest {
    /// A request for up to `max` messages of any tag, invisible for 30 s, no long polling.
    pub fn new(group: &str, topic: &str, max: usize) -> ReceiveRequest {
        ReceiveRequest {
            group: group.into(),
            topic: topic.into(),
            filter: Filter::All,
            max_messages: max,
            invisible: Duration::from_secs(30),
            wait: Duration::ZERO,
            auto_renew_client: None,
        }
    }
}

/// A server-side message filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `*` (or an empty expression): every message.
    All,
    /// `a||b||c`: messages whose tag is one of these.
    Tags(Vec<String>),
}

impl Filter {
    /// Parses a TAG expression: `*`, empty, or tags separated by `||`.
    pub fn parse_tag(expr: &str) -> Result<Filter, QueueError> {
        let expr = expr.trim();
        if expr.is_empty() || expr == "*" {
            return Ok(Filter::All);
        }
        let mut tags = Vec::new();
        for part in expr.split("||") {
            let tag = part.trim();
            if tag.is_empty() {
                return Err(QueueError::IllegalFilter(format!(
                    "{expr:?}: empty tag between '||'"
                )));
            }
            if tag == "*" {
                return Ok(Filter::All);
            }
            if tag.contains('|') {
                return Err(QueueError::IllegalFilter(format!(
                    "{expr:?}: tags are separated by '||'"
                )));
            }
            tags.push(tag.to_string());
        }
        Ok(Filter::Tags(tags))
    }

    /// Whether a message with `tag` passes.
    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            Filter::All => true,
            Filter::Tags(tags) => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }
}

/// Information on a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    /// Messages kept (acknowledged or not).
    pub messages: u64,
    /// Offset of the oldest message kept.
    pub first_offset: u64,
    /// Offset the next message will get.
    pub next_offset: u64,
    /// Consumer groups that have read from the topic.
    pub groups: Vec<String>,
}

/// A queue failure; the gRPC service maps each to a RocketMQ status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error(
        "illegal topic name {0:?}: 1 to 127 characters of letters, digits, '%', '|', '-', '_'"
    )]
    IllegalTopic(String),
    #[error("illegal consumer group name {0:?}: 1 to 127 characters of letters, digits, '%', '|', '-', '_'")]
    IllegalGroup(String),
    #[error("illegal filter expression: {0}")]
    IllegalFilter(String),
    #[error("invalid receipt handle: {0}")]
    InvalidReceiptHandle(String),
    #[error("message body of {size} bytes is over the limit of {max} bytes")]
    BodyTooLarge { size: usize, max: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not implemented: {0}")]
    NotImplemented(String),
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The time source of the queue: milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(start_ms)))
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Topic and group names: what RocketMQ accepts (`^[%|a-zA-Z0-9_-]{1,127}$`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'|' | b'-' | b'_'))
}

/// A new message id: 32 upper-case hex digits (random).
pub fn new_message_id() -> String {
    let mut buf = [0u8; 16];
    if getrandom::getrandom(&mut buf).is_err() {
        let t = SystemClock.now_ms().to_be_bytes();
        buf[..8].copy_from_slice(&t);
    }
    let mut s = String::with_capacity(32);
    for b in buf {
        s.push_str(&format!("{b:02X}"));
    }
    s
}
