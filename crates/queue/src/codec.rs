//! Keys and values of the queue in `Space::Queue`.
//!
//! | key | value |
//! |---|---|
//! | `T` ns `\0` topic | topic id (u64), created ms (u64) |
//! | `M` topic-id offset | the message (see [`encode_message`]) |
//! | `X` topic-id offset | store ms (u64), tag hash (u64): the in-memory index, rebuilt at start |
//! | `G` topic-id group | cursor (u64), next handle sequence (u64) |
//! | `I` topic-id group `\0` offset | attempt (u32), visible-at ms (u64), handle sequence (u64) |
//!
//! Integers are big-endian, so keys sort by offset. Topic ids are never reused, so the keys of a
//! deleted topic never mix with those of a topic created later under the same name.

use crate::model::{Message, QueueError};
use bytes::Bytes;
use std::collections::BTreeMap;

pub const TOPIC: u8 = b'T';
pub const MSG: u8 = b'M';
pub const INDEX: u8 = b'X';
pub const GROUP: u8 = b'G';
pub const INFLIGHT: u8 = b'I';

pub fn topic_key(ns: &str, topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + ns.len() + topic.len());
    k.push(TOPIC);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k
}

pub fn parse_topic_key(key: &[u8]) -> Option<(String, String)> {
    let rest = key.strip_prefix(&[TOPIC])?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let ns = std::str::from_utf8(&rest[..nul]).ok()?;
    let topic = std::str::from_utf8(&rest[nul + 1..]).ok()?;
    Some((ns.to_string(), topic.to_string()))
}

pub fn prefix(kind: u8, topic_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(kind);
    k.extend_from_slice(&topic_id.to_be_bytes());
    k
}

pub fn offset_key(kind: u8, topic_id: u64, offset: u64) -> Vec<u8> {
    let mut k = prefix(kind, topic_id);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

pub fn group_key(topic_id: u64, group: &str) -> Vec<u8> {
    let mut k = prefix(GROUP, topic_id);
    k.extend_from_slice(group.as_bytes());
    k
}

pub fn inflight_prefix(topic_id: u64, group: &str) -> Vec<u8> {
    let mut k = prefix(INFLIGHT, topic_id);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k
}

pub fn inflight_key(topic_id: u64, group: &str, offset: u64) -> Vec<u8> {
    let mut k = inflight_prefix(topic_id, group);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The group and offset of an `I` key (after its 9-byte prefix).
pub fn parse_inflight_key(key: &[u8]) -> Option<(String, u64)> {
    if key.len() < 9 + 1 + 8 {
        return None;
    }
    let body = &key[9..];
    let (group, off) = body.split_at(body.len() - 9);
    if off[0] != 0 {
        return None;
    }
    let group = std::str::from_utf8(group).ok()?.to_string();
    Some((group, u64_at(&off[1..], 0)?))
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
}

pub fn two_u64(a: u64, b: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&a.to_be_bytes());
    v.extend_from_slice(&b.to_be_bytes());
    v
}

pub fn inflight_value(attempt: u32, visible_at: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&attempt.to_be_bytes());
    v.extend_from_slice(&visible_at.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

/// A tag's 64-bit FNV-1a hash for the in-memory index; 0 means "no tag" and 1 "unusable".
pub fn tag_hash(tag: Option<&str>) -> u64 {
    let Some(tag) = tag else { return 0 };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    if h < 2 {
        h + 2
    } else {
        h
    }
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64, QueueError> {
        let v = u64_at(self.b, self.at).ok_or_else(corrupt)?;
        self.at += 8;
        Ok(v)
    }
    fn u32(&mut self) -> Result<u32, QueueError> {
        let v = u32_at(self.b, self.at).ok_or_else(corrupt)?;
        self.at += 4;
        Ok(v)
    }
    fn str(&mut self) -> Result<String, QueueError> {
        let n = self.u32()? as usize;
        let s = self.b.get(self.at..self.at + n).ok_or_else(corrupt)?;
        self.at += n;
        String::from_utf8(s.to_vec()).map_err(|_| corrupt())
    }
}

fn corrupt() -> QueueError {
    QueueError::Store(ferry_store::StoreError::Corrupt(
        "queue: a stored message is truncated".into(),
    ))
}

const MESSAGE_VERSION: u8 = 1;

/// A message record: version, store ms, born ms, id, tag flag + tag, born host, keys,
/// properties, then the body to the end.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + m.body.len() + m.id.len());
    v.push(MESSAGE_VERSION);
    v.extend_from_slice(&m.store_timestamp_ms.to_be_bytes());
    v.extend_from_slice(&m.born_timestamp_ms.to_be_bytes());
    put_str(&mut v, &m.id);
    match &m.tag {
        Some(t) => {
            v.push(1);
            put_str(&mut v, t);
        }
        None => v.push(0),
    }
    put_str(&mut v, &m.born_host);
    v.extend_from_slice(&(m.keys.len() as u32).to_be_bytes());
    for k in &m.keys {
        put_str(&mut v, k);
    }
    v.extend_from_slice(&(m.properties.len() as u32).to_be_bytes());
    for (k, val) in &m.properties {
        put_str(&mut v, k);
        put_str(&mut v, val);
    }
    v.extend_from_slice(&m.body);
    v
}

pub fn decode_message(topic: &str, offset: u64, b: &[u8]) -> Result<Message, QueueError> {
    if b.first() != Some(&MESSAGE_VERSION) {
        return Err(QueueError::Store(ferry_store::StoreError::Corrupt(
            "queue: unknown message record version".into(),
        )));
    }
    let mut r = Reader { b, at: 1 };
    let store_timestamp_ms = r.u64()?;
    let born_timestamp_ms = r.u64()?;
    let id = r.str()?;
    let has_tag = *b.get(r.at).ok_or_else(corrupt)?;
    r.at += 1;
    let tag = if has_tag == 1 { Some(r.str()?) } else { None };
    let born_host = r.str()?;
    let nkeys = r.u32()? as usize;
    let mut keys = Vec::with_capacity(nkeys.min(64));
    for _ in 0..nkeys {
        keys.push(r.str()?);
    }
    let nprops = r.u32()? as usize;
    let mut properties = BTreeMap::new();
    for _ in 0..nprops {
        let k = r.str()?;
        let v = r.str()?;
        properties.insert(k, v);
    }
    let body = Bytes::copy_from_slice(&b[r.at..]);
    Ok(Message {
        id,
        topic: topic.to_string(),
        tag,
        keys,
        properties,
        body,
        born_host,
        born_timestamp_ms,
        store_timestamp_ms,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let mut properties = BTreeMap::new();
        properties.insert("a".into(), "1".into());
        let m = Message {
            id: "ID".into(),
            topic: "t".into(),
            tag: Some("tag".into()),
            keys: vec!["k1".into(), "k2".into()],
            properties,
            body: Bytes::from_static(b"hello"),
            born_host: "h".into(),
            born_timestamp_ms: 5,
            store_timestamp_ms: 7,
            offset: 9,
        };
        let enc = encode_message(&m);
        assert_eq!(decode_message("t", 9, &enc).unwrap(), m);
        assert!(decode_message("t", 9, &enc[..10]).is_err());
    }

    #[test]
    fn keys_parse_back() {
        assert_eq!(
            parse_topic_key(&topic_key("ns", "top")),
            Some(("ns".into(), "top".into()))
        );
        assert_eq!(
            parse_inflight_key(&inflight_key(3, "g1", 77)),
            Some(("g1".into(), 77))
        );
    }
}
