//! Session state that outlives a network connection (MQTT 5 §4.1): subscriptions, messages in
//! flight to the client and queued for it, QoS 2 messages received and not yet released, the
//! packet identifier counter, and the expiry.

use crate::hash::{HashMap, HashSet};
use crate::message::{Message, SharedMessage};
use crate::trie::{SessionId, Subscription};
use ferry_codec::{ByteStr, QoS};
use hashbrown::HashTable;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A message on its way to one session, with the per-subscriber QoS, retain flag and
/// subscription identifiers.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: SharedMessage,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Position in the session's stored message log; 0 when not stored.
    pub seq: u64,
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Clone, Debug)]
pub struct Inflight {
    pub packet_id: u16,
    pub delivery: Delivery,
    pub state: OutState,
}

/// A will message as received in CONNECT. Its message expiry interval counts from when it is
/// published, not from the CONNECT.
#[derive(Clone, Debug)]
pub struct Will {
    pub msg: Message,
    pub expiry_interval: Option<u32>,
    /// MQTT 5 will delay interval, in seconds.
    pub delay: u32,
}

impl Will {
    /// The message to route, with its expiry starting `now`.
    pub fn publish(&self, now: Instant) -> SharedMessage {
        let mut msg = self.msg.clone();
        msg.expires_at = self
            .expiry_interval
            .map(|secs| now + Duration::from_secs(u64::from(secs)));
        Arc::new(msg)
    }
}

/// The will a disconnected session will publish when `at` arrives (MQTT 5 will delay).
#[derive(Clone, Debug)]
pub struct PendingWill {
    pub will: Will,
    pub at: Instant,
}

/// A set of packet ids that is one null pointer until the first id arrives (most sessions
/// never receive QoS 2).
#[derive(Debug, Clone, Default)]
pub struct PacketIds(Option<Box<HashSet<u16>>>);

impl PacketIds {
    pub fn contains(&self, id: &u16) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(id))
    }

    /// True if `id` was not in the set.
    pub fn insert(&mut self, id: u16) -> bool {
        self.0.get_or_insert_with(Default::default).insert(id)
    }

    /// True if `id` was in the set; the set's memory goes once it is empty.
    pub fn remove(&mut self, id: &u16) -> bool {
        let Some(set) = &mut self.0 else {
            return false;
        };
        let removed = set.remove(id);
        if set.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn iter(&self) -> impl Iterator<Item = &u16> {
        self.0.iter().flat_map(|s| s.iter())
    }
}

impl FromIterator<u16> for PacketIds {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let set: HashSet<u16> = iter.into_iter().collect();
        PacketIds((!set.is_empty()).then(|| Box::new(set)))
    }
}

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub client_id: ByteStr,
    /// The live connection, if any.
    pub conn: Option<u64>,
    /// Raw filter as subscribed (`$share/…` included) → options.
    pub subscriptions: HashMap<ByteStr, Subscription>,
    /// Sent and unacknowledged, in send order.
    pub inflight: VecDeque<Inflight>,
    /// Waiting for room in the inflight window (or for the client to come back).
    pub pending: VecDeque<Delivery>,
    /// QoS 2 packet ids received (PUBREC sent) and not yet released by PUBREL.
    pub incoming_qos2: PacketIds,
    next_packet_id: u16,
    /// Whether an id in flight may have been allocated before the counter last wrapped (or
    /// came from the store): only then must a new id be checked against those in flight.
    ids_may_repeat: bool,
    /// Seconds the session outlives its connection; `u32::MAX` = never expires.
    pub expiry_interval: u32,
    /// Boxed: rare, and a whole message inline in every session otherwise.
    pub pending_will: Option<Box<PendingWill>>,
    /// When the last connection ended.
    pub disconnected_at: Option<Instant>,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
    /// The next position in the stored message log (persistent sessions).
    pub next_seq: u64,
    /// Stored sessions: how many queued messages are only on disk.
    pub spilled: u64,
    /// Stored sessions: every queued message up to this position is in memory or done.
    pub loaded_through: u64,
    /// Stored sessions: the highest position put on disk only; while `loaded_through` is below
    /// it, new messages queue behind on disk too, so order is kept.
    pub spilled_through: u64,
    /// Loads in a row that found nothing to load (a guard against waiting forever).
    pub empty_loads: u8,
    /// A load of spilled messages was asked for and has not come back yet.
    pub load_requested: bool,
    /// Stored sessions: at most the position of the oldest queued message on disk (see
    /// `offline.rs`).
    pub spill_head: u64,
    /// Stored sessions: queued messages up to this position were evicted (the cap).
    pub evicted_through: u64,
}

impl Session {
    pub fn new(id: SessionId, client_id: ByteStr) -> Self {
        Session {
            id,
            client_id,
            conn: None,
            subscriptions: HashMap::default(),
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            incoming_qos2: PacketIds::default(),
            next_packet_id: 1,
            ids_may_repeat: false,
            expiry_interval: 0,
            pending_will: None,
            disconnected_at: None,
            dropped: 0,
            next_seq: 1,
            spilled: 0,
            loaded_through: 0,
            spilled_through: 0,
            empty_loads: 0,
            load_requested: false,
            spill_head: 0,
            evicted_through: 0,
        }
    }

    /// Allocates a packet identifier not used by any message in flight. The caller keeps the
    /// inflight window below 65,535, so one is always free.
    pub fn next_packet_id(&mut self) -> u16 {
        if self.inflight.is_empty() {
            self.ids_may_repeat = false;
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            // Until the counter wraps, every id in flight was taken from it earlier, so is
            // below `id`: no search of the window needed (it cost ~6% of the broker's CPU in a
            // QoS 1 fan-out).
            let fresh = !self.ids_may_repeat;
            if id == u16::MAX {
                self.ids_may_repeat = true;
            }
            if fresh || !self.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    /// Marks the ids in flight as not taken from this session's counter (restored from the
    /// store), so new ids are checked against them.
    pub fn ids_from_elsewhere(&mut self) {
        self.ids_may_repeat = true;
    }

    /// Gives back the memory of queues that grew for a backlog and are empty again, so an idle
    /// session costs what an idle session costs.
    pub fn release_idle_memory(&mut self) {
        const KEEP: usize = 16;
        if self.pending.is_empty() && self.pending.capacity() > KEEP {
            self.pending = VecDeque::new();
        }
        if self.inflight.is_empty() && self.inflight.capacity() > KEEP {
            self.inflight = VecDeque::new();
        }
    }

    /// When the session ends if no connection takes it up again: derived from when the last
    /// connection ended, not stored. `None` while connected or when it never expires.
    pub fn expires_at(&self) -> Option<Instant> {
        if self.conn.is_some() || self.expiry_interval == u32::MAX {
            return None;
        }
        let after = Duration::from_secs(u64::from(self.expiry_interval));
        self.disconnected_at.map(|at| at + after)
    }

    /// Index of the inflight entry with `packet_id`; acks mostly arrive in order, so the search
    /// usually stops at the front.
    pub fn find_inflight(&self, packet_id: u16) -> Option<usize> {
        self.inflight.iter().position(|i| i.packet_id == packet_id)
    }
}

/// Where sessions are kept. The broker core calls it from one task; the in-memory
/// implementation is [`MemorySessions`]; a persistent one writes through to the store.
pub trait SessionRegistry: Send {
    fn get(&self, id: SessionId) -> Option<&Session>;
    fn get_mut(&mut self, id: SessionId) -> Option<&mut Session>;
    fn find(&self, client_id: &str) -> Option<SessionId>;
    fn insert(&mut self, session: Session);
    fn remove(&mut self, id: SessionId) -> Option<Session>;
    fn len(&self) -> usize;
    /// Client ids of all sessions.
    fn client_ids(&self) -> Vec<String>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sessions in memory, indexed by id and by client id.
#[derive(Default, Debug)]
pub struct MemorySessions {
    /// Boxed: a session is a few hundred bytes, and a table of them inline would carry up to
    /// twice that per session in free slots.
    by_id: HashMap<SessionId, Box<Session>>,
    /// Session ids by client id. The table holds only the ids (8-byte slots) and compares
    /// client ids through `by_id`, instead of a second handle on every client id (40-byte
    /// slots, up to twice over in a growing table). Invariant: every id in it is in `by_id`.
    by_client: HashTable<SessionId>,
    hasher: foldhash::fast::RandomState,
}

impl MemorySessions {
    fn hash(&self, client_id: &str) -> u64 {
        self.hasher.hash_one(client_id)
    }
}

impl SessionRegistry for MemorySessions {
    fn get(&self, id: SessionId) -> Option<&Session> {
        self.by_id.get(&id).map(|s| &**s)
    }
    fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.by_id.get_mut(&id).map(|s| &mut **s)
    }
    fn find(&self, client_id: &str) -> Option<SessionId> {
        let by_id = &self.by_id;
        let same = |sid: &SessionId| by_id.get(sid).is_some_and(|s| s.client_id == client_id);
        self.by_client.find(self.hash(client_id), same).copied()
    }
    fn insert(&mut self, session: Session) {
        let hash = self.hash(session.client_id.as_str());
        let (by_id, hasher) = (&self.by_id, &self.hasher);
        let client_id = session.client_id.as_str();
        let same = |sid: &SessionId| by_id.get(sid).is_some_and(|s| s.client_id == client_id);
        match self.by_client.find_mut(hash, same) {
            // A new session for a client id that had one: the id now names the new one.
            Some(slot) => *slot = session.id,
            None => {
                let rehash = |sid: &SessionId| {
                    by_id
                        .get(sid)
                        .map_or(0, |s| hasher.hash_one(s.client_id.as_str()))
                };
                self.by_client.insert_unique(hash, session.id, rehash);
            }
        }
        self.by_id.insert(session.id, Box::new(session));
    }
    fn remove(&mut self, id: SessionId) -> Option<Session> {
        let s = self.by_id.remove(&id)?;
        let hash = self.hash(s.client_id.as_str());
        if let Ok(entry) = self.by_client.find_entry(hash, |&sid| sid == id) {
            entry.remove();
        }
        Some(*s)
    }
    fn len(&self) -> usize {
        self.by_id.len()
    }
    fn client_ids(&self) -> Vec<String> {
        let sessions = self.by_client.iter().filter_map(|sid| self.by_id.get(sid));
        sessions.map(|s| s.client_id.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use ferry_codec::QoS;
    use std::sync::Arc;

    #[test]
    fn sessions_are_found_by_client_id_across_growth_takeover_and_removal() {
        let mut reg = MemorySessions::default();
        for i in 0..5_000u64 {
            reg.insert(Session::new(
                i,
                ByteStr::from(format!("client-{i}").as_str()),
            ));
        }
        assert_eq!(reg.len(), 5_000);
        for i in (0..5_000u64).step_by(7) {
            assert_eq!(reg.find(&format!("client-{i}")), Some(i));
        }
        assert_eq!(reg.find("client-5000"), None);
        // A new session for a client id that had one takes the name over; removing the old
        // one leaves the new one findable; removing the new one forgets the name.
        reg.insert(Session::new(9_000, ByteStr::from("client-3")));
        assert_eq!(reg.find("client-3"), Some(9_000));
        assert!(reg.remove(3).is_some());
        assert_eq!(reg.find("client-3"), Some(9_000));
        assert!(reg.remove(9_000).is_some());
        assert_eq!(reg.find("client-3"), None);
        assert!(reg.remove(9_000).is_none());
        for i in (0..5_000u64).filter(|i| i % 2 == 0) {
            assert!(reg.remove(i).is_some());
        }
        assert_eq!(reg.find("client-4"), None);
        assert_eq!(reg.find("client-5"), Some(5));
        let mut ids = reg.client_ids();
        ids.sort();
        // The odd ids but 3.
        assert_eq!(ids.len(), 2_499);
        assert!(ids.contains(&"client-4999".to_string()));
    }

    fn inflight(packet_id: u16) -> Inflight {
        let msg = Arc::new(Message {
            topic: "t".into(),
            payload: Default::default(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: ByteStr::new(),
        });
        Inflight {
            packet_id,
            delivery: Delivery {
                msg,
                qos: QoS::AtLeastOnce,
                retain: false,
                sub_ids: Vec::new(),
                seq: 0,
            },
            state: OutState::Published,
        }
    }

    #[test]
    fn packet_ids_never_repeat_one_in_flight_across_the_wrap_and_a_restore() {
        let mut s = Session::new(1, "c".into());
        // A message stays in flight while the counter goes all the way round.
        let stuck = s.next_packet_id();
        s.inflight.push_back(inflight(stuck));
        for _ in 0..(u32::from(u16::MAX) * 2) {
            let id = s.next_packet_id();
            assert_ne!(id, stuck, "an id in flight was handed out again");
            assert_ne!(id, 0);
        }
        // Restored from the store: the ids in flight are not the counter's.
        let mut r = Session::new(2, "r".into());
        r.inflight.push_back(inflight(1));
        r.inflight.push_back(inflight(3));
        r.ids_from_elsewhere();
        let ids: Vec<u16> = (0..3).map(|_| r.next_packet_id()).collect();
        assert_eq!(ids, vec![2, 4, 5]);
        // Once nothing is in flight, any id is free again and no search is needed.
        r.inflight.clear();
        assert_eq!(r.next_packet_id(), 6);
    }
}
