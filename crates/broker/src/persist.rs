//! The broker's side of durability: encoding the core's [`StoreOp`]s as keys and values of
//! the embedded store, decoding them back at start-up, and the metadata store.
//!
//! Keys start with the instance id and a 0 byte (client ids and topics cannot contain U+0000),
//! so every instance's data is a key range of its own:
//! - sessions: `instance 0 client_id` → session record
//! - messages: `instance 0 client_id 0 seq(u64 BE)` → stored message (ordered by seq)
//! - retained: `instance 0 topic` → message
//! - metadata: the documents of [`ferry_meta::MetaStore`], keyed by name.

use bytes::{Buf, BufMut, Bytes};
use ferry_codec::{ByteStr, QoS, RetainHandling, SubOptions};
use ferry_core::persist::{MessageState, SessionRecord, StoreOp, StoredMessage};
use ferry_core::session::Delivery;
use ferry_core::{Message, Subscription};
use ferry_store::{Engine, Op, Space, StoreError, Writer};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const FORMAT: u8 = 1;
/// Stored messages: format 2 adds when the message was stored (for offline retention).
const MESSAGE_FORMAT: u8 = 2;

/// Converts between the core's `Instant`s and wall-clock milliseconds (stored).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    instant: Instant,
    wall_ms: u64,
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            instant: Instant::now(),
            wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    pub fn to_wall(&self, at: Instant) -> u64 {
        if at >= self.instant {
            self.wall_ms + (at - self.instant).as_millis() as u64
        } else {
            self.wall_ms
                .saturating_sub((self.instant - at).as_millis() as u64)
        }
    }

    pub fn to_instant(&self, wall_ms: u64) -> Instant {
        if wall_ms >= self.wall_ms {
            self.instant + Duration::from_millis(wall_ms - self.wall_ms)
        } else {
            self.instant
                .checked_sub(Duration::from_millis(self.wall_ms - wall_ms))
                .unwrap_or(self.instant)
        }
    }
}

fn prefix(instance: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(instance.len() + 1);
    k.extend_from_slice(instance.as_bytes());
    k.push(0);
    k
}

fn session_key(instance: &str, client_id: &str) -> Vec<u8> {
    let mut k = prefix(instance);
    k.extend_from_slice(client_id.as_bytes());
    k
}

fn messages_prefix(instance: &str, client_id: &str) -> Vec<u8> {
    let mut k = session_key(instance, client_id);
    k.push(0);
    k
}

fn message_key(instance: &str, client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = messages_prefix(instance, client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Entries read per store scan.
const PAGE: usize = 4096;

/// Calls `f` with every entry of `space` under `prefix`, in key order, a page at a time.
fn for_each(
    engine: &dyn Engine,
    space: Space,
    prefix: &[u8],
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = engine.scan(space, prefix, after.as_deref(), PAGE)?;
        let full = page.len() == PAGE;
        after = page.last().map(|(k, _)| k.clone());
        for (key, value) in page {
            f(key, value)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// The sequence number at the end of a message key.
fn key_seq(key: &[u8], prefix_len: usize) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key[prefix_len..]
        .try_into()
        .map_err(|_| StoreError::Corrupt("stored message key".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

// -----------------------------------------------------------------------------------------
// Binary encoding

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    b.put_u32(s.len() as u32);
    b.put_slice(s);
}

fn put_opt(b: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => {
            b.put_u8(1);
            put_str(b, s);
        }
        None => b.put_u8(0),
    }
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), StoreError> {
        if self.0.remaining() < n {
            return Err(StoreError::Corrupt("stored record is truncated".into()));
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, StoreError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, StoreError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn string(&mut self) -> Result<ByteStr, StoreError> {
        ByteStr::from_utf8(self.bytes()?)
            .map_err(|_| StoreError::Corrupt("stored string is not UTF-8".into()))
    }
    fn opt_bytes(&mut self) -> Result<Option<Bytes>, StoreError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.bytes()?),
        })
    }
    fn opt_string(&mut self) -> Result<Option<ByteStr>, StoreError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.string()?),
        })
    }
}

fn qos(v: u8) -> Result<QoS, StoreError> {
    QoS::from_u8(v).map_err(|_| StoreError::Corrupt(format!("stored QoS {v}")))
}

fn encode_message(msg: &Message, clock: &Clock, out: &mut Vec<u8>) {
    put_str(out, msg.topic.as_bytes());
    put_str(out, &msg.payload);
    out.put_u8(msg.qos as u8);
    out.put_u8(u8::from(msg.retain));
    put_str(out, msg.publisher.as_bytes());
    out.put_u64(msg.expires_at.map_or(0, |t| clock.to_wall(t).max(1)));
    let p = &msg.properties;
    out.put_u8(p.payload_format_indicator.map_or(0xff, |v| v));
    put_opt(out, p.content_type.as_ref().map(|s| s.as_bytes().as_ref()));
    put_opt(
        out,
        p.response_topic.as_ref().map(|s| s.as_bytes().as_ref()),
    );
    put_opt(out, p.correlation_data.as_deref());
    out.put_u32(p.user_properties.len() as u32);
    for (k, v) in &p.user_properties {
        put_str(out, k.as_bytes());
        put_str(out, v.as_bytes());
    }
}

fn decode_message(r: &mut Reader, clock: &Clock) -> Result<Message, StoreError> {
    let topic = r.string()?;
    let payload = r.bytes()?;
    let qos = qos(r.u8()?)?;
    let retain = r.u8()? != 0;
    let publisher = r.string()?;
    let expires = r.u64()?;
    let mut properties = ferry_codec::Props::default();
    let pfi = r.u8()?;
    properties.payload_format_indicator = (pfi != 0xff).then_some(pfi);
    properties.content_type = r.opt_string()?;
    properties.response_topic = r.opt_string()?;
    properties.correlation_data = r.opt_bytes()?;
    let n = r.u32()?;
    for _ in 0..n {
        let k = r.string()?;
        let v = r.string()?;
        properties.user_properties.push((k, v));
    }
    Ok(Message {
        topic,
        payload,
        qos,
        retain,
        properties: properties.into(),
        expires_at: (expires != 0).then(|| clock.to_instant(expires)),
        publisher,
    })
}

/// `stored_at` is wall-clock milliseconds.
pub fn encode_stored(m: &StoredMessage, stored_at: u64, clock: &Clock) -> Vec<u8> {
    let d = &m.delivery;
    let mut out = Vec::with_capacity(72 + d.msg.payload.len());
    out.put_u8(MESSAGE_FORMAT);
    out.put_u8(match m.state {
        MessageState::Queued => 0,
        MessageState::Published => 1,
        MessageState::Released => 2,
    });
    out.put_u64(stored_at);
    out.put_u16(m.packet_id);
    out.put_u8(d.qos as u8);
    out.put_u8(u8::from(d.retain));
    out.put_u32(d.sub_ids.len() as u32);
    for id in &d.sub_ids {
        out.put_u32(*id);
    }
    encode_message(&d.msg, clock, &mut out);
    out
}

pub fn decode_stored(raw: Vec<u8>, seq: u64, clock: &Clock) -> Result<StoredMessage, StoreError> {
    let mut r = Reader(Bytes::from(raw));
    let format = r.u8()?;
    if format != FORMAT && format != MESSAGE_FORMAT {
        return Err(StoreError::Corrupt("unknown stored message format".into()));
    }
    let state = match r.u8()? {
        0 => MessageState::Queued,
        1 => MessageState::Published,
        2 => MessageState::Released,
        s => return Err(StoreError::Corrupt(format!("stored message state {s}"))),
    };
    if format == MESSAGE_FORMAT {
        r.u64()?; // stored_at: read by `stale_queued`
    }
    let packet_id = r.u16()?;
    let qos = qos(r.u8()?)?;
    let retain = r.u8()? != 0;
    let n = r.u32()?;
    let mut sub_ids = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        sub_ids.push(r.u32()?);
    }
    let msg = decode_message(&mut r, clock)?;
    Ok(StoredMessage {
        delivery: Delivery {
            msg: Arc::new(msg),
            qos,
            retain,
            sub_ids,
            seq,
        },
        state,
        packet_id,
    })
}

/// Whether a raw stored message is a queued one older than `retention_ms` at `now_ms`.
fn stale_queued(raw: &[u8], retention_ms: Option<u64>, now_ms: u64) -> bool {
    let Some(retention) = retention_ms else {
        return false;
    };
    if raw.len() < 10 || raw[0] != MESSAGE_FORMAT || raw[1] != 0 {
        return false;
    }
    let stored_at = u64::from_be_bytes(raw[2..10].try_into().expect("8 bytes"));
    stored_at.saturating_add(retention) < now_ms
}

fn encode_retained(msg: &Message, clock: &Clock) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + msg.payload.len());
    out.put_u8(FORMAT);
    encode_message(msg, clock, &mut out);
    out
}

fn decode_retained(raw: Vec<u8>, clock: &Clock) -> Result<Message, StoreError> {
    let mut r = Reader(Bytes::from(raw));
    if r.u8()? != FORMAT {
        return Err(StoreError::Corrupt("unknown stored retained format".into()));
    }
    decode_message(&mut r, clock)
}

fn encode_session(s: &SessionRecord, clock: &Clock) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.put_u8(FORMAT);
    out.put_u32(s.expiry_interval);
    out.put_u64(s.disconnected_at.map_or(0, |t| clock.to_wall(t).max(1)));
    out.put_u32(s.subscriptions.len() as u32);
    for (filter, sub) in &s.subscriptions {
        put_str(&mut out, filter.as_bytes());
        let o = sub.options;
        out.put_u8(o.qos as u8);
        out.put_u8(
            u8::from(o.no_local)
                | (u8::from(o.retain_as_published) << 1)
                | ((o.retain_handling as u8) << 2),
        );
        out.put_u32(sub.id.unwrap_or(0));
    }
    out.put_u32(s.incoming_qos2.len() as u32);
    for id in &s.incoming_qos2 {
        out.put_u16(*id);
    }
    out
}

fn decode_session(
    client_id: ByteStr,
    raw: Vec<u8>,
    clock: &Clock,
) -> Result<SessionRecord, StoreError> {
    let mut r = Reader(Bytes::from(raw));
    if r.u8()? != FORMAT {
        return Err(StoreError::Corrupt("unknown stored session format".into()));
    }
    let expiry_interval = r.u32()?;
    let disconnected = r.u64()?;
    let n = r.u32()?;
    let mut subscriptions = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        let filter = r.string()?;
        let qos = qos(r.u8()?)?;
        let flags = r.u8()?;
        let id = r.u32()?;
        let retain_handling = match (flags >> 2) & 3 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscribe,
            _ => RetainHandling::Never,
        };
        subscriptions.push((
            filter,
            Subscription {
                options: SubOptions {
                    qos,
                    no_local: flags & 1 != 0,
                    retain_as_published: flags & 2 != 0,
                    retain_handling,
                },
                id: (id != 0).then_some(id),
            },
        ));
    }
    let n = r.u32()?;
    let mut incoming_qos2 = Vec::with_capacity(n.min(65_535) as usize);
    for _ in 0..n {
        incoming_qos2.push(r.u16()?);
    }
    Ok(SessionRecord {
        client_id,
        expiry_interval,
        disconnected_at: (disconnected != 0).then(|| clock.to_instant(disconnected)),
        subscriptions,
        incoming_qos2,
    })
}

// -----------------------------------------------------------------------------------------
// The store of one server

/// The embedded store and its group-commit writer, shared by every instance's router.
pub struct Persistence {
    pub engine: Arc<dyn Engine>,
    /// Shared with the embedded queue, so both commit in the same groups.
    pub writer: Arc<Writer>,
    /// Acknowledgements wait for durability (`durability = "sync"`).
    pub sync: bool,
    pub clock: Clock,
}

impl Persistence {
    /// The store operations for `ops` of `instance`'s core. Deleting a session also deletes its
    /// stored messages (found by a prefix scan of what is already written; messages still in
    /// flight to the writer for a deleted session are removed at the next start-up).
    pub fn encode(&self, instance: &str, ops: Vec<StoreOp>) -> Result<Vec<Op>, StoreError> {
        let mut out = Vec::with_capacity(ops.len());
        let now_ms = self.clock.to_wall(Instant::now());
        for op in ops {
            match op {
                StoreOp::Session(record) => out.push(Op::Put {
                    space: Space::Sessions,
                    key: session_key(instance, &record.client_id),
                    value: encode_session(&record, &self.clock),
                }),
                StoreOp::SessionDeleted { client_id } => {
                    out.push(Op::Delete {
                        space: Space::Sessions,
                        key: session_key(instance, &client_id),
                    });
                    let prefix = messages_prefix(instance, &client_id);
                    for_each(self.engine.as_ref(), Space::Messages, &prefix, |key, _| {
                        out.push(Op::Delete {
                            space: Space::Messages,
                            key,
                        });
                        Ok(())
                    })?;
                }
                StoreOp::Message {
                    client_id,
                    seq,
                    message,
                } => out.push(Op::Put {
                    space: Space::Messages,
                    key: message_key(instance, &client_id, seq),
                    value: encode_stored(&message, now_ms, &self.clock),
                }),
                StoreOp::MessageDeleted { client_id, seq } => out.push(Op::Delete {
                    space: Space::Messages,
                    key: message_key(instance, &client_id, seq),
                }),
                StoreOp::Retained(msg) => out.push(Op::Put {
                    space: Space::Retained,
                    key: session_key(instance, &msg.topic),
                    value: encode_retained(&msg, &self.clock),
                }),
                StoreOp::RetainedDeleted { topic } => out.push(Op::Delete {
                    space: Space::Retained,
                    key: session_key(instance, &topic),
                }),
            }
        }
        Ok(out)
    }

    /// Loads `instance`'s stored sessions (with their messages, in order) and retained messages
    /// into `broker`. Messages whose session record is gone are deleted.
    pub fn restore(
        &self,
        instance: &str,
        broker: &mut ferry_core::Broker,
    ) -> Result<RestoreStats, StoreError> {
        let now = Instant::now();
        let mut stats = RestoreStats::default();
        let pfx = prefix(instance);
        let engine = self.engine.as_ref();
        let mut restored = std::collections::HashSet::new();
        for_each(engine, Space::Sessions, &pfx, |key, value| {
            let client = ByteStr::from_utf8(Bytes::copy_from_slice(&key[pfx.len()..]))
                .map_err(|_| StoreError::Corrupt("stored client id is not UTF-8".into()))?;
            let record = decode_session(client.clone(), value, &self.clock)?;
            let mprefix = messages_prefix(instance, &client);
            // In-flight messages are decoded; queued ones are only counted (they stay on disk
            // until the client is back).
            let mut messages = Vec::new();
            let mut queued = 0u64;
            let mut next_seq = 1u64;
            for_each(engine, Space::Messages, &mprefix, |mkey, mval| {
                let seq = key_seq(&mkey, mprefix.len())?;
                next_seq = next_seq.max(seq + 1);
                if mval.get(1) == Some(&0) {
                    queued += 1;
                } else {
                    messages.push((seq, decode_stored(mval, seq, &self.clock)?));
                }
                Ok(())
            })?;
            stats.sessions += 1;
            stats.messages += messages.len() + queued as usize;
            broker.restore_session(record, messages, queued, next_seq, now);
            restored.insert(key[pfx.len()..].to_vec());
            Ok(())
        })?;
        // Messages without a session (its deletion raced their writing) go.
        let mut orphans = Vec::new();
        for_each(engine, Space::Messages, &pfx, |key, _| {
            let rest = &key[pfx.len()..];
            if let Some(split) = rest.iter().position(|&b| b == 0) {
                if !restored.contains(&rest[..split]) {
                    orphans.push(Op::Delete {
                        space: Space::Messages,
                        key,
                    });
                }
            }
            Ok(())
        })?;
        stats.orphans = orphans.len();
        if !orphans.is_empty() {
            self.engine.apply(&orphans, true)?;
        }
        for_each(engine, Space::Retained, &pfx, |_, value| {
            broker.restore_retained(decode_retained(value, &self.clock)?);
            stats.retained += 1;
            Ok(())
        })?;
        Ok(stats)
    }
}

/// What [`Persistence::load`] read: the messages (by position) and the deletions of queued
/// messages whose retention passed.
pub type Loaded = (Vec<(u64, StoredMessage)>, Vec<Op>);

impl Persistence {
    /// Up to `limit` stored messages of a session after position `after_seq`, in order;
    /// fewer only when there are no more. Queued messages older than `retention_ms` are
    /// skipped and returned as deletions for the caller to write.
    pub fn load(
        &self,
        instance: &str,
        client_id: &str,
        after_seq: u64,
        limit: usize,
        retention_ms: Option<u64>,
    ) -> Result<Loaded, StoreError> {
        let prefix = messages_prefix(instance, client_id);
        let now_ms = self.clock.to_wall(Instant::now());
        let mut after = message_key(instance, client_id, after_seq);
        let mut fresh = Vec::new();
        let mut stale = Vec::new();
        loop {
            let page = self
                .engine
                .scan(Space::Messages, &prefix, Some(&after), limit)?;
            let full = page.len() == limit;
            for (key, value) in page {
                after.clone_from(&key);
                if stale_queued(&value, retention_ms, now_ms) {
                    stale.push(Op::Delete {
                        space: Space::Messages,
                        key,
                    });
                    continue;
                }
                let seq = key_seq(&key, prefix.len())?;
                fresh.push((seq, decode_stored(value, seq, &self.clock)?));
                if fresh.len() == limit {
                    return Ok((fresh, stale));
                }
            }
            if !full {
                return Ok((fresh, stale));
            }
        }
    }

    /// One bounded step of the retention sweep over an instance's stored messages: looks at
    /// up to [`PAGE`] of them after `cursor` and returns the deletions of queued messages older
    /// than `retention_ms`, and where to continue (`None`: start over next time).
    pub fn sweep_step(
        &self,
        instance: &str,
        cursor: Option<&[u8]>,
        retention_ms: u64,
    ) -> Result<(Vec<Op>, Option<Vec<u8>>), StoreError> {
        let now_ms = self.clock.to_wall(Instant::now());
        let page = self
            .engine
            .scan(Space::Messages, &prefix(instance), cursor, PAGE)?;
        let next = (page.len() == PAGE)
            .then(|| page.last().map(|(k, _)| k.clone()))
            .flatten();
        let deletes = page
            .into_iter()
            .filter(|(_, value)| stale_queued(value, Some(retention_ms), now_ms))
            .map(|(key, _)| Op::Delete {
                space: Space::Messages,
                key,
            })
            .collect();
        Ok((deletes, next))
    }
}

/// What [`Persistence::evict`] did: the deletions to write, how many, the position of the last
/// one, and the oldest queued message left (`None`: none).
#[derive(Debug, Default)]
pub struct Eviction {
    pub deletes: Vec<Op>,
    pub deleted: u64,
    pub last_deleted: u64,
    pub next_head: Option<u64>,
}

impl Persistence {
    /// Carries out a core [`EvictRequest`](ferry_core::offline::EvictRequest): the queued
    /// messages of `client_id` after `after_seq` and up to `below_seq`, at most `max`, oldest
    /// first (in-flight ones stay).
    pub fn evict(
        &self,
        instance: &str,
        client_id: &str,
        after_seq: u64,
        below_seq: u64,
        max: u64,
    ) -> Result<Eviction, StoreError> {
        let prefix = messages_prefix(instance, client_id);
        let mut after = message_key(instance, client_id, after_seq);
        let mut out = Eviction::default();
        let page_size = (max.min(PAGE as u64) as usize).max(16);
        loop {
            let page = self
                .engine
                .scan(Space::Messages, &prefix, Some(&after), page_size)?;
            let full = page.len() == page_size;
            for (key, value) in page {
                after.clone_from(&key);
                if value.get(1) != Some(&0) {
                    continue; // in flight: not an offline message
                }
                let seq = key_seq(&key, prefix.len())?;
                if seq > below_seq || out.deleted >= max {
                    out.next_head = Some(seq);
                    return Ok(out);
                }
                out.deletes.push(Op::Delete {
                    space: Space::Messages,
                    key,
                });
                out.deleted += 1;
                out.last_deleted = seq;
            }
            if !full {
                return Ok(out);
            }
        }
    }

    /// The client id of a stored message's key (for counting what the retention sweep
    /// deleted), if `key` is one of `instance`'s.
    pub fn message_client<'k>(&self, instance: &str, key: &'k [u8]) -> Option<&'k str> {
        let rest = key.strip_prefix(prefix(instance).as_slice())?;
        let end = rest.len().checked_sub(9)?;
        std::str::from_utf8(&rest[..end]).ok()
    }
}

/// What a restore found.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestoreStats {
    pub sessions: usize,
    pub messages: usize,
    pub retained: usize,
    pub orphans: usize,
}

/// [`ferry_meta::MetaStore`] over the embedded store: one document per key in the `Meta`
/// space, each write durable before it returns.
pub struct MetaDocuments {
    pub engine: Arc<dyn Engine>,
}

impl ferry_meta::MetaStore for MetaDocuments {
    fn put(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
        self.engine
            .apply(
                &[Op::Put {
                    space: Space::Meta,
                    key: key.as_bytes().to_vec(),
                    value,
                }],
                true,
            )
            .map_err(|e| e.to_string())
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        self.engine
            .apply(
                &[Op::Delete {
                    space: Space::Meta,
                    key: key.as_bytes().to_vec(),
                }],
                true,
            )
            .map_err(|e| e.to_string())
    }

    fn load(&self) -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut out = Vec::new();
        for_each(self.engine.as_ref(), Space::Meta, b"", |key, value| {
            out.push((String::from_utf8_lossy(&key).into_owned(), value));
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let clock = Clock::now();
        let msg = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: ferry_codec::Props {
                content_type: Some("text/plain".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
                payload_format_indicator: Some(1),
                ..Default::default()
            }
            .into(),
            expires_at: Some(clock.to_instant(clock.wall_ms + 5000)),
            publisher: "pub".into(),
        };
        let stored = StoredMessage {
            delivery: Delivery {
                msg: Arc::new(msg.clone()),
                qos: QoS::AtLeastOnce,
                retain: false,
                sub_ids: vec![3, 4],
                seq: 9,
            },
            state: MessageState::Released,
            packet_id: 77,
        };
        let back = decode_stored(encode_stored(&stored, 123, &clock), 9, &clock).unwrap();
        assert_eq!(back.state, MessageState::Released);
        assert_eq!(back.packet_id, 77);
        assert_eq!(back.delivery.sub_ids, vec![3, 4]);
        assert_eq!(*back.delivery.msg, msg);
        let record = SessionRecord {
            client_id: "c".into(),
            expiry_interval: 60,
            disconnected_at: Some(clock.to_instant(clock.wall_ms + 10)),
            subscriptions: vec![(
                "x/#".into(),
                Subscription {
                    options: SubOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: false,
                        retain_handling: RetainHandling::Never,
                    },
                    id: Some(5),
                },
            )],
            incoming_qos2: vec![1, 2],
        };
        assert_eq!(
            decode_session("c".into(), encode_session(&record, &clock), &clock).unwrap(),
            record
        );
        assert!(
            decode_stored(vec![9, 9], 1, &clock).is_err(),
            "unknown format"
        );
        assert!(
            decode_stored(vec![FORMAT, 0], 1, &clock).is_err(),
            "truncated"
        );
    }
}
