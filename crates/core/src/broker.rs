//! The broker core: one state machine that owns the sessions, the subscription trie and the
//! retained messages of a tenant, and turns packets from connections into packets for
//! connections. It does no I/O and reads no clock: every input carries `now`, every output is
//! queued in [`Broker::drain_output`], and [`Broker::poll_timeout`] says when
//! [`Broker::handle_timeout`] must next run. The runtime (the `broker` crate) drives it from
//! one task; tests drive it with a virtual clock.
//!
//! What is per connection rather than per session (keep-alive, topic aliases, the inbound
//! receive maximum) lives in [`crate::conn::Connection`], next to the socket.

use crate::acl::{Acl, Action, Grant, Permissions, TopicPolicy};
use crate::hash::{HashMap, HashSet};
use crate::message::{Message, Outflow, SharedMessage};
use crate::offline::{EvictRequest, OfflineIndex};
use crate::persist::{LoadRequest, MessageState, SessionRecord, StoreOp, StoredMessage};
use crate::retained::{MemoryRetained, RetainedStore};
use crate::session::{
    Delivery, Inflight, MemorySessions, OutState, PendingWill, Session, SessionRegistry, Will,
};
use crate::topic;
use crate::trie::{Match, SessionId, Subscription, SubscriptionTree};
use ferry_codec::{
    ByteStr, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, PubAck, Publish, QoS,
    ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The broker's outputs as [`Effects`], borrowed field by field so that a session borrowed from
/// `$broker.sessions` can be used beside them (a method would borrow the whole broker).
macro_rules! effects {
    ($broker:ident) => {
        Effects {
            out: &mut $broker.out,
            stats: &mut $broker.stats,
            store_ops: &mut $broker.store_ops,
            seq_clock: &mut $broker.seq_clock,
            persistent: $broker.persistent,
        }
    };
}

/// Identifies one network connection; allocated by the runtime.
pub type ConnId = u64;

/// Limits and feature switches of the broker core.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest packet the server accepts (advertised to v5 clients).
    pub max_packet_size: u32,
    /// Keep-alive ceiling in seconds; a client asking for more (or for 0) gets this value as
    /// Server Keep Alive (v5). 0 = no ceiling.
    pub max_keep_alive: u16,
    /// How many QoS 1/2 PUBLISH a client may have unacknowledged towards the server.
    pub receive_maximum: u16,
    /// Ceiling of QoS 1/2 messages in flight towards one client.
    pub max_inflight: u16,
    /// Messages queued per session beyond the inflight window; more are dropped and counted.
    pub max_queued_messages: usize,
    /// Topic aliases a client may use towards the server.
    pub topic_alias_maximum: u16,
    /// Ceiling on the session expiry interval, in seconds.
    pub max_session_expiry: u32,
    pub retain_available: bool,
    pub max_qos: QoS,
    /// Longest client id accepted.
    pub max_client_id_len: usize,
    /// Subscriptions one session may hold; 0 = unlimited. Beyond it SUBSCRIBE gets 0x97.
    pub max_subscriptions_per_client: usize,
    /// Largest PUBLISH payload; 0 = only the packet size limits it. Beyond it the connection is
    /// closed (v5: DISCONNECT 0x95).
    pub max_payload_size: u32,
    /// Whether `<parent>/p2p/<clientId>` goes to that client only, without a subscription.
    pub p2p: bool,
    /// Queued messages on disk for all persistent sessions together; beyond it the oldest are
    /// evicted (counted in [`Stats::evicted_offline`]). Only with persistence.
    pub max_offline_messages: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024,
            max_keep_alive: 0,
            receive_maximum: 1024,
            max_inflight: 64,
            max_queued_messages: 1000,
            topic_alias_maximum: 64,
            max_session_expiry: u32::MAX,
            retain_available: true,
            max_qos: QoS::ExactlyOnce,
            max_client_id_len: 65_535,
            max_subscriptions_per_client: 0,
            max_payload_size: 0,
            p2p: false,
            max_offline_messages: 1_000_000,
        }
    }
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Write `packet` to connection `conn`.
    Send { conn: ConnId, packet: Packet },
    /// Write `packet` to `conn` once every [`StoreOp`] emitted so far is durable (an
    /// acknowledgement that promises something stored). Without persistence, same as `Send`.
    SendDurable { conn: ConnId, packet: Packet },
    /// Write the DISCONNECT (if any), flush, and close `conn`. The core has already forgotten
    /// the connection.
    Close {
        conn: ConnId,
        disconnect: Option<Disconnect>,
    },
}

/// What the runtime learns from an accepted CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub client_id: ByteStr,
    /// Keep-alive to enforce, in seconds (after the server ceiling).
    pub keep_alive: u16,
}

/// Counters the runtime exports as metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub messages_received: u64,
    pub messages_sent: u64,
    pub dropped_queue_full: u64,
    pub dropped_too_large: u64,
    pub dropped_expired: u64,
    /// Offline messages deleted because the instance's cap was reached (oldest first).
    pub evicted_offline: u64,
}

/// Per-connection facts the core needs.
#[derive(Debug)]
struct ConnState {
    session: SessionId,
    protocol: Protocol,
    user: Option<ByteStr>,
    /// Boxed: most connections have none.
    will: Option<Box<Will>>,
    /// The client's maximum packet size.
    max_packet_size: u32,
    /// The outbound inflight window for this connection.
    window: usize,
    /// Whether the CONNECT set session expiry 0 (v5 forbids raising it at DISCONNECT then).
    zero_expiry_at_connect: bool,
    clean_start: bool,
    problem_info: bool,
    /// What the client's credentials allow; `None` is everything (most clients), without two
    /// grants inline in every connection.
    permissions: Option<Box<Permissions>>,
    peer: Option<SocketAddr>,
    /// When the core last handled a packet from this connection.
    last_activity: Instant,
}

/// Everything allowed: what a connection without its own permissions gets.
static FULL: Permissions = Permissions {
    publish: Grant::All,
    subscribe: Grant::All,
};

fn boxed_unless_full(permissions: Permissions) -> Option<Box<Permissions>> {
    let full = matches!(
        (&permissions.publish, &permissions.subscribe),
        (Grant::All, Grant::All)
    );
    (!full).then(|| Box::new(permissions))
}

impl ConnState {
    fn permissions(&self) -> &Permissions {
        self.permissions.as_deref().unwrap_or(&FULL)
    }

    fn link(&self, conn: ConnId) -> Link {
        Link {
            conn,
            protocol: self.protocol,
            max_packet_size: self.max_packet_size,
            window: self.window,
        }
    }
}

/// What the runtime learned about a client before its CONNECT reaches the core.
#[derive(Debug, Clone, Default)]
pub struct ClientGrant {
    /// What the client's credentials allow (on top of the ACL).
    pub permissions: Permissions,
    /// The peer address, for queries.
    pub peer: Option<SocketAddr>,
}

/// A session as the management API sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub online: bool,
    pub peer: Option<String>,
    pub protocol: Option<Protocol>,
    /// Last packet handled (online) or when the connection ended (offline).
    pub last_activity: Option<Instant>,
    /// Raw filter (shared ones as `$share/…`) and granted QoS, sorted by filter.
    pub subscriptions: Vec<(String, QoS)>,
    pub inflight: usize,
    pub queued: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    SessionExpiry(SessionId),
    WillDelay(SessionId),
}

pub struct Broker {
    limits: Limits,
    acl: Acl,
    policy: Option<Arc<dyn TopicPolicy>>,
    /// Emit [`StoreOp`]s for persistent sessions and retained messages.
    persistent: bool,
    store_ops: Vec<StoreOp>,
    loads: Vec<LoadRequest>,
    evictions: Vec<EvictRequest>,
    offline: OfflineIndex,
    /// Parent topics (first topic levels) with an outflow rule, and what was published under
    /// them since the runtime last looked.
    outflow_parents: HashSet<String>,
    outflow: Vec<Outflow>,
    /// The next stored-message position; one counter for all sessions, so positions order
    /// messages by when they were queued (see `offline.rs`).
    seq_clock: u64,
    sessions: Box<dyn SessionRegistry>,
    retained: Box<dyn RetainedStore>,
    subscriptions: SubscriptionTree,
    /// Boxed, like the sessions: no table slack of a whole `ConnState` per connection.
    conns: HashMap<ConnId, Box<ConnState>>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    out: Vec<Output>,
    next_session: SessionId,
    next_assigned: u64,
    stats: Stats,
    matches: Vec<Match>,
}

fn v5_disconnect(code: ReasonCode, reason: Option<&str>) -> Disconnect {
    Disconnect {
        code,
        properties: ferry_codec::Props {
            reason_string: reason.map(ByteStr::from),
            ..Default::default()
        }
        .into(),
    }
}

impl Broker {
    pub fn new(limits: Limits, acl: Acl) -> Self {
        Self::with_stores(
            limits,
            acl,
            Box::<MemorySessions>::default(),
            Box::<MemoryRetained>::default(),
        )
    }

    pub fn with_stores(
        limits: Limits,
        acl: Acl,
        sessions: Box<dyn SessionRegistry>,
        retained: Box<dyn RetainedStore>,
    ) -> Self {
        Broker {
            limits,
            acl,
            policy: None,
            persistent: false,
            store_ops: Vec::new(),
            loads: Vec::new(),
            evictions: Vec::new(),
            offline: OfflineIndex::default(),
            outflow_parents: HashSet::default(),
            outflow: Vec::new(),
            seq_clock: 1,
            sessions,
            retained,
            subscriptions: SubscriptionTree::new(),
            conns: HashMap::default(),
            timers: BinaryHeap::new(),
            out: Vec::new(),
            next_session: 1,
            next_assigned: 1,
            stats: Stats::default(),
            matches: Vec::new(),
        }
    }

    /// Adds instance topic rules (the cloud profile's parent topics and naming rules).
    pub fn with_policy(mut self, policy: Arc<dyn TopicPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Turns persistence on: the core emits [`StoreOp`]s ([`Broker::drain_store_ops`]).
    pub fn with_persistence(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Loads of spilled messages asked for so far.
    pub fn drain_loads(&mut self) -> std::vec::Drain<'_, LoadRequest> {
        self.loads.drain(..)
    }

    /// The parent topics whose client publishes go to the server-side queue (outflow rules).
    pub fn set_outflow_parents(&mut self, parents: impl IntoIterator<Item = String>) {
        self.outflow_parents = parents.into_iter().collect();
    }

    /// Client publishes under an outflow parent since the last call, in order. Their
    /// acknowledgements were emitted as [`Output::SendDurable`]: the runtime releases them once
    /// these are stored in the queue (and the store ops are durable).
    pub fn drain_outflow(&mut self) -> std::vec::Drain<'_, Outflow> {
        self.outflow.drain(..)
    }

    /// Evictions of offline messages asked for so far (see [`EvictRequest`]).
    pub fn drain_evictions(&mut self) -> std::vec::Drain<'_, EvictRequest> {
        self.evictions.drain(..)
    }

    /// Queued messages on disk (all persistent sessions), as the core counts them.
    pub fn offline_messages(&self) -> u64 {
        self.offline.total
    }

    /// Store operations emitted so far, in order.
    pub fn drain_store_ops(&mut self) -> std::vec::Drain<'_, StoreOp> {
        self.store_ops.drain(..)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Outputs produced so far, in order.
    pub fn drain_output(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// When [`Broker::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    fn send(&mut self, conn: ConnId, packet: Packet) {
        self.out.push(Output::Send { conn, packet });
    }

    // -----------------------------------------------------------------------------------------
    // Connect

    /// Handles an authenticated CONNECT on a new connection: queues the CONNACK (and the resumed
    /// session's messages) or a refusing CONNACK followed by a close.
    pub fn connect(&mut self, conn: ConnId, connect: Connect, now: Instant) -> Option<Accepted> {
        self.connect_with(conn, connect, ClientGrant::default(), now)
    }

    /// [`Broker::connect`] for a client whose credentials grant `grant.permissions`.
    pub fn connect_with(
        &mut self,
        conn: ConnId,
        connect: Connect,
        grant: ClientGrant,
        now: Instant,
    ) -> Option<Accepted> {
        let ops_before = self.store_ops.len();
        let protocol = connect.protocol;
        let v5 = protocol.is_v5();
        let refuse = |b: &mut Self, code: ReasonCode, reason: &str| {
            let mut ack = ConnAck {
                session_present: false,
                code,
                properties: Properties::default(),
            };
            if v5 {
                ack.properties.make_mut().reason_string = Some(reason.into());
            }
            b.send(conn, Packet::ConnAck(ack));
            b.out.push(Output::Close {
                conn,
                disconnect: None,
            });
            None
        };
        if connect.properties.authentication_method.is_some() {
            return refuse(
                self,
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                "enhanced authentication is not supported",
            );
        }
        if connect.client_id.len() > self.limits.max_client_id_len {
            return refuse(
                self,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                "client id too long",
            );
        }
        let max_ka = self.limits.max_keep_alive;
        if !v5 && max_ka > 0 && connect.keep_alive > max_ka {
            // MQTT 3 has no Server Keep Alive to announce a lower value, so a keep-alive above
            // the ceiling is refused openly (as Mosquitto does) rather than shortened in secret.
            // Keep-alive 0 (no keep-alive) stays accepted for MQTT 3 clients.
            return refuse(
                self,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                "keep alive above the server maximum",
            );
        }
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // MQTT 3.1.1 §3.1.3-8: an empty client id needs clean session = 1.
                return refuse(
                    self,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "empty client id needs clean session",
                );
            }
            let id = ByteStr::from(format!("ferry-{:016x}", self.next_assigned));
            self.next_assigned += 1;
            assigned = Some(id.clone());
            id
        } else {
            // A copy: a slice would keep the whole read buffer of the CONNECT alive for as long
            // as the session lives.
            ByteStr::from(connect.client_id.as_str())
        };
        if let Some(will) = &connect.will {
            if topic::validate_name(&will.topic).is_err() {
                return refuse(self, ReasonCode::TOPIC_NAME_INVALID, "invalid will topic");
            }
            if will.retain && !self.limits.retain_available {
                return refuse(
                    self,
                    ReasonCode::RETAIN_NOT_SUPPORTED,
                    "retain not supported",
                );
            }
            if will.qos > self.limits.max_qos {
                return refuse(
                    self,
                    ReasonCode::QOS_NOT_SUPPORTED,
                    "will QoS not supported",
                );
            }
            if !self
                .acl
                .check(connect.username.as_deref(), Action::Publish, &will.topic)
                || !grant.permissions.publish.allows(&will.topic)
                || !self.policy_allows(&will.topic, false)
            {
                return refuse(
                    self,
                    ReasonCode::NOT_AUTHORIZED,
                    "will topic not authorized",
                );
            }
        }

        // Session expiry: v3 clean session = 0 means a session that never expires.
        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = requested_expiry.min(self.limits.max_session_expiry);

        // Take over an existing connection with the same client id.
        let existing = self.sessions.find(&client_id);
        if let Some(sid) = existing {
            if let Some(old) = self.sessions.get(sid).and_then(|s| s.conn) {
                let old_v5 = self.conns.get(&old).is_some_and(|c| c.protocol.is_v5());
                self.out.push(Output::Close {
                    conn: old,
                    disconnect: old_v5.then(|| v5_disconnect(ReasonCode::SESSION_TAKEN_OVER, None)),
                });
                self.detach(old, true, now);
            }
        }
        let existing = self.sessions.find(&client_id);
        let (sid, session_present) = match existing {
            Some(sid) if !connect.clean_start => (sid, true),
            Some(sid) => {
                self.end_session(sid, now);
                (self.create_session(client_id.clone()), false)
            }
            None => (self.create_session(client_id.clone()), false),
        };
        let session = self.sessions.get_mut(sid).expect("session exists");
        session.conn = Some(conn);
        let spilled = session.spilled;
        self.offline_changed(sid, spilled);
        let session = self.sessions.get_mut(sid).expect("session exists");
        session.expiry_interval = expiry;
        // A reconnect before the will delay passed cancels the will (§3.1.3.2.2).
        session.pending_will = None;

        let will = connect.will.as_ref().map(|w| {
            let mut props = w.properties.clone();
            let (delay, expiry_interval) = match props.get_mut() {
                Some(p) => (
                    p.will_delay_interval.take().unwrap_or(0),
                    p.message_expiry_interval.take(),
                ),
                None => (0, None),
            };
            let msg = Message::from_publish(
                Publish {
                    dup: false,
                    qos: w.qos,
                    retain: w.retain,
                    topic: w.topic.clone(),
                    packet_id: 0,
                    payload: w.payload.clone(),
                    properties: props,
                },
                client_id.clone(),
                now,
            );
            Will {
                msg,
                expiry_interval,
                delay,
            }
        });
        let client_receive_max = connect.properties.receive_maximum.unwrap_or(u16::MAX);
        let window = usize::from(client_receive_max.min(self.limits.max_inflight).max(1));
        self.conns.insert(
            conn,
            Box::new(ConnState {
                session: sid,
                protocol,
                user: connect.username.as_deref().map(ByteStr::from),
                will: will.map(Box::new),
                max_packet_size: connect.properties.maximum_packet_size.unwrap_or(u32::MAX),
                window,
                zero_expiry_at_connect: requested_expiry == 0,
                clean_start: connect.clean_start,
                problem_info: connect.properties.request_problem_information != Some(0),
                permissions: boxed_unless_full(grant.permissions),
                peer: grant.peer,
                last_activity: now,
            }),
        );

        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        if v5 && max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
            keep_alive = max_ka;
            server_keep_alive = Some(max_ka);
        }
        let mut ack = ConnAck {
            session_present,
            code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        };
        if v5 {
            let p = ack.properties.make_mut();
            p.assigned_client_identifier = assigned;
            p.server_keep_alive = server_keep_alive;
            if expiry != requested_expiry {
                p.session_expiry_interval = Some(expiry);
            }
            if self.limits.receive_maximum != u16::MAX {
                p.receive_maximum = Some(self.limits.receive_maximum);
            }
            p.maximum_packet_size = Some(self.limits.max_packet_size);
            p.topic_alias_maximum = Some(self.limits.topic_alias_maximum);
            if self.limits.max_qos != QoS::ExactlyOnce {
                p.maximum_qos = Some(self.limits.max_qos as u8);
            }
            if !self.limits.retain_available {
                p.retain_available = Some(0);
            }
        }
        self.save_session(sid);
        if self.store_ops.len() == ops_before {
            self.send(conn, Packet::ConnAck(ack));
        } else {
            // The session (or the end of the previous one) is being stored: confirm it after.
            self.out.push(Output::SendDurable {
                conn,
                packet: Packet::ConnAck(ack),
            });
        }
        if session_present {
            self.resume(sid, conn, now);
        }
        Some(Accepted {
            client_id,
            keep_alive,
        })
    }

    fn create_session(&mut self, client_id: ByteStr) -> SessionId {
        let sid = self.next_session;
        self.next_session += 1;
        self.sessions.insert(Session::new(sid, client_id));
        sid
    }

    /// Retransmits what was in flight (PUBLISH with DUP, PUBREL) and then the queue.
    fn resume(&mut self, sid: SessionId, conn: ConnId, now: Instant) {
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        let link = state.link(conn);
        let protocol = link.protocol;
        let Some(session) = self.sessions.get_mut(sid) else {
            return;
        };
        let mut packets = Vec::with_capacity(session.inflight.len());
        let mut too_large = Vec::new();
        for inflight in &session.inflight {
            packets.push(match inflight.state {
                OutState::Published => {
                    let mut p = build_publish(&inflight.delivery, protocol, now);
                    p.packet_id = inflight.packet_id;
                    p.dup = true;
                    let packet = Packet::Publish(p);
                    // The new connection may allow less than the old one: such a message is
                    // discarded as if delivered (§3.1.2.11.4).
                    if link.too_large(&packet) {
                        too_large.push(inflight.packet_id);
                        continue;
                    }
                    packet
                }
                OutState::Released => Packet::PubRel(PubAck::new(inflight.packet_id)),
            });
        }
        if !too_large.is_empty() {
            let client_id = session.client_id.clone();
            let mut seqs = Vec::new();
            session.inflight.retain(|i| {
                let keep = !too_large.contains(&i.packet_id);
                if !keep {
                    seqs.push(i.delivery.seq);
                }
                keep
            });
            self.stats.dropped_too_large += too_large.len() as u64;
            for seq in seqs {
                self.forget_message(&client_id, seq);
            }
        }
        for packet in packets {
            self.send(conn, packet);
        }
        self.flush(sid, now);
    }

    // -----------------------------------------------------------------------------------------
    // Packets from a connected client

    /// Handles a packet from connection `conn` after its CONNECT was accepted. PINGREQ, AUTH
    /// and topic aliases are dealt with by [`crate::conn::Connection`] before this.
    pub fn handle(&mut self, conn: ConnId, packet: Packet, now: Instant) {
        self.answering(conn, |broker| broker.handle_packet(conn, packet, now));
    }

    /// Handles a run of PUBACKs from `conn` with these packet ids, in order: the same as
    /// [`Broker::handle`] with a PUBACK for each, with one lookup of the connection and its
    /// session, and one refill of the inflight window at the end.
    pub fn handle_acks(&mut self, conn: ConnId, ids: &[u16], now: Instant) {
        self.answering(conn, |broker| {
            let Some(state) = broker.conns.get_mut(&conn) else {
                return;
            };
            state.last_activity = now;
            let sid = state.session;
            broker.acked(sid, ids);
            broker.flush(sid, now);
        });
    }

    /// Runs `handle` for a packet (or packets) from `conn`; if it stored something, the answers
    /// to `conn` wait until that is durable.
    fn answering(&mut self, conn: ConnId, handle: impl FnOnce(&mut Self)) {
        let ops_before = self.store_ops.len();
        let outflow_before = self.outflow.len();
        let out_before = self.out.len();
        handle(self);
        if self.store_ops.len() > ops_before || self.outflow.len() > outflow_before {
            // What this packet changed is being stored: the answers to it wait for that.
            for output in &mut self.out[out_before..] {
                if let Output::Send { conn: c, packet } = output {
                    if *c == conn {
                        let packet = std::mem::replace(packet, Packet::PingResp);
                        *output = Output::SendDurable { conn, packet };
                    }
                }
            }
        }
    }

    fn handle_packet(&mut self, conn: ConnId, packet: Packet, now: Instant) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        state.last_activity = now;
        let sid = state.session;
        let v5 = state.protocol.is_v5();
        match packet {
            Packet::Publish(p) => self.handle_publish(conn, p, now),
            Packet::PubAck(ack) => {
                self.acked(sid, &[ack.packet_id]);
                self.flush(sid, now);
            }
            Packet::PubRec(rec) => {
                let mut reply = None;
                let persistent = self.persistent;
                if let Some(s) = self.sessions.get_mut(sid) {
                    match s.find_inflight(rec.packet_id) {
                        Some(i) if s.inflight[i].delivery.qos == QoS::ExactlyOnce => {
                            let stored = persistent && s.inflight[i].delivery.seq != 0;
                            if rec.code.is_error() {
                                // The receiver refused it: the exchange ends here.
                                let removed = s.inflight.remove(i).expect("index found");
                                if stored {
                                    self.store_ops.push(StoreOp::MessageDeleted {
                                        client_id: s.client_id.clone(),
                                        seq: removed.delivery.seq,
                                    });
                                }
                            } else {
                                s.inflight[i].state = OutState::Released;
                                if stored {
                                    self.store_ops.push(StoreOp::Message {
                                        client_id: s.client_id.clone(),
                                        seq: s.inflight[i].delivery.seq,
                                        message: StoredMessage {
                                            delivery: s.inflight[i].delivery.clone(),
                                            state: MessageState::Released,
                                            packet_id: rec.packet_id,
                                        },
                                    });
                                }
                                reply = Some(PubAck::new(rec.packet_id));
                            }
                        }
                        _ => {
                            reply = Some(PubAck::with_code(
                                rec.packet_id,
                                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                            ))
                        }
                    }
                }
                if let Some(mut rel) = reply {
                    if !v5 {
                        rel.code = ReasonCode::SUCCESS;
                    }
                    self.send(conn, Packet::PubRel(rel));
                }
                self.flush(sid, now);
            }
            Packet::PubRel(rel) => {
                let known = self
                    .sessions
                    .get_mut(sid)
                    .is_some_and(|s| s.incoming_qos2.remove(&rel.packet_id));
                if known {
                    self.save_session(sid);
                }
                let code = if known || !v5 {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send(
                    conn,
                    Packet::PubComp(PubAck::with_code(rel.packet_id, code)),
                );
            }
            Packet::PubComp(comp) => {
                let mut done = None;
                if let Some(s) = self.sessions.get_mut(sid) {
                    if let Some(i) = s.find_inflight(comp.packet_id) {
                        if s.inflight[i].state == OutState::Released {
                            let removed = s.inflight.remove(i).expect("index found");
                            done = Some((s.client_id.clone(), removed.delivery.seq));
                        }
                    }
                }
                if let Some((client_id, seq)) = done {
                    self.forget_message(&client_id, seq);
                }
                self.flush(sid, now);
            }
            Packet::Subscribe(sub) => self.handle_subscribe(conn, sub, now),
            Packet::Unsubscribe(unsub) => self.handle_unsubscribe(conn, unsub),
            Packet::Disconnect(d) => self.handle_disconnect(conn, d, now),
            Packet::PingReq => self.send(conn, Packet::PingResp),
            Packet::Connect(_) => {
                self.protocol_error(conn, ReasonCode::PROTOCOL_ERROR, "second CONNECT", now)
            }
            Packet::Auth(_) => self.protocol_error(
                conn,
                ReasonCode::PROTOCOL_ERROR,
                "AUTH without enhanced authentication",
                now,
            ),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => self
                .protocol_error(
                    conn,
                    ReasonCode::PROTOCOL_ERROR,
                    "packet type only a server may send",
                    now,
                ),
        }
    }

    /// PUBACKs for these packet ids: their QoS 1 messages leave the inflight window (and the
    /// store). An id not in flight as QoS 1 is ignored.
    fn acked(&mut self, sid: SessionId, ids: &[u16]) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        for &id in ids {
            let Some(i) = s.find_inflight(id) else {
                continue;
            };
            let entry = &s.inflight[i];
            if entry.state != OutState::Published || entry.delivery.qos != QoS::AtLeastOnce {
                continue;
            }
            let removed = if i == 0 {
                s.inflight.pop_front()
            } else {
                s.inflight.remove(i)
            };
            let seq = removed.expect("index found").delivery.seq;
            effects!(self).forget(&s.client_id, seq);
        }
    }

    /// Closes `conn` for a protocol violation: v5 gets a DISCONNECT with `code`, the will is
    /// published.
    pub fn protocol_error(&mut self, conn: ConnId, code: ReasonCode, reason: &str, now: Instant) {
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        let disconnect = state.protocol.is_v5().then(|| {
            let with_reason = state.problem_info;
            v5_disconnect(code, with_reason.then_some(reason))
        });
        self.out.push(Output::Close { conn, disconnect });
        self.detach(conn, true, now);
    }

    fn handle_publish(&mut self, conn: ConnId, publish: Publish, now: Instant) {
        let state = &self.conns[&conn];
        let sid = state.session;
        let v5 = state.protocol.is_v5();
        if let Err(e) = topic::validate_name(&publish.topic) {
            return self.protocol_error(conn, e.reason_code(false), &e.to_string(), now);
        }
        if publish.qos > self.limits.max_qos {
            return self.protocol_error(
                conn,
                ReasonCode::QOS_NOT_SUPPORTED,
                "QoS not supported",
                now,
            );
        }
        if publish.retain && !self.limits.retain_available {
            return self.protocol_error(
                conn,
                ReasonCode::RETAIN_NOT_SUPPORTED,
                "retain not supported",
                now,
            );
        }
        if self.limits.max_payload_size > 0
            && publish.payload.len() > self.limits.max_payload_size as usize
        {
            return self.protocol_error(
                conn,
                ReasonCode::PACKET_TOO_LARGE,
                "payload above the instance's maximum",
                now,
            );
        }
        let allowed = self
            .acl
            .check(state.user.as_deref(), Action::Publish, &publish.topic)
            && state.permissions().publish.allows(&publish.topic)
            && self.policy_allows(&publish.topic, false);
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        if !allowed {
            // MQTT 3 has no way to refuse a PUBLISH but closing the connection.
            if !v5 {
                return self.protocol_error(
                    conn,
                    ReasonCode::NOT_AUTHORIZED,
                    "not authorized",
                    now,
                );
            }
            let ack = PubAck::with_code(packet_id, ReasonCode::NOT_AUTHORIZED);
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.send(conn, Packet::PubAck(ack)),
                QoS::ExactlyOnce => self.send(conn, Packet::PubRec(ack)),
            }
            return;
        }
        if qos == QoS::ExactlyOnce {
            let session = self.sessions.get_mut(sid).expect("connected session");
            if session.incoming_qos2.contains(&packet_id) {
                // A retransmission (or a reused id) of a message already received: acknowledge
                // again without delivering twice (§4.3.3).
                let code = if publish.dup || !v5 {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_IN_USE
                };
                self.send(conn, Packet::PubRec(PubAck::with_code(packet_id, code)));
                return;
            }
            session.incoming_qos2.insert(packet_id);
            self.save_session(sid);
        }
        let client_id = self
            .sessions
            .get(sid)
            .expect("connected session")
            .client_id
            .clone();
        let expiry_interval = publish.properties.message_expiry_interval;
        let msg = Arc::new(Message::from_publish(publish, client_id, now));
        self.stats.messages_received += 1;
        if !self.outflow_parents.is_empty() {
            let parent = msg.topic.split('/').next().unwrap_or_default();
            if self.outflow_parents.contains(parent) {
                self.outflow.push(Outflow {
                    client_id: msg.publisher.clone(),
                    clean_start: self.conns[&conn].clean_start,
                    msg: msg.clone(),
                    expiry_interval,
                });
            }
        }
        self.publish_shared(msg, now);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(conn, Packet::PubAck(PubAck::new(packet_id))),
            QoS::ExactlyOnce => self.send(conn, Packet::PubRec(PubAck::new(packet_id))),
        }
    }

    /// Publishes a message made by the server (or the runtime) as if a client had sent it.
    pub fn publish(&mut self, msg: Message, now: Instant) {
        self.publish_shared(Arc::new(msg), now);
    }

    /// Sends a message made by the server to one client only, without a subscription (P2P
    /// from the queue's inflow rules; the client sees `msg.topic`). With `online_only`, a
    /// client that is not connected does not get it (nothing is queued). Returns whether the
    /// client has a session.
    pub fn publish_to(
        &mut self,
        client_id: &str,
        msg: Message,
        online_only: bool,
        now: Instant,
    ) -> bool {
        let Some(sid) = self.sessions.find(client_id) else {
            return false;
        };
        if online_only && self.sessions.get(sid).is_some_and(|s| s.conn.is_none()) {
            return true;
        }
        let msg = Arc::new(msg);
        let delivery = Delivery {
            qos: msg.qos,
            msg,
            retain: false,
            sub_ids: Vec::new(),
            seq: 0,
        };
        self.deliver(sid, delivery, now);
        true
    }

    /// Updates the retained index for a retained message, then routes it.
    fn publish_shared(&mut self, msg: SharedMessage, now: Instant) {
        if msg.retain {
            if msg.payload.is_empty() {
                if self.retained.remove(&msg.topic) && self.persistent {
                    self.store_ops.push(StoreOp::RetainedDeleted {
                        topic: msg.topic.clone(),
                    });
                }
            } else {
                self.retained.insert(msg.clone());
                if self.persistent {
                    self.store_ops.push(StoreOp::Retained(msg.clone()));
                }
            }
        }
        self.route(msg, now);
    }

    /// Fans `msg` out to every matching session: one copy per session, with the highest QoS of
    /// its matching subscriptions and all their subscription identifiers.
    fn route(&mut self, msg: SharedMessage, now: Instant) {
        if self.limits.p2p {
            if let Some(target) = p2p_target(&msg.topic) {
                // A P2P message reaches that client only, at the published QoS, without a
                // subscription; an unknown client id means nobody.
                if let Some(sid) = self.sessions.find(target) {
                    let delivery = Delivery {
                        qos: msg.qos,
                        msg: msg.clone(),
                        retain: false,
                        sub_ids: Vec::new(),
                        seq: 0,
                    };
                    self.deliver(sid, delivery, now);
                }
                return;
            }
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        {
            let sessions = &self.sessions;
            let online = |sid: SessionId| sessions.get(sid).is_some_and(|s| s.conn.is_some());
            self.subscriptions
                .matches(&msg.topic, &online, &mut matches);
        }
        // One copy per session for its ordinary subscriptions (§3.3.4), and a separate one for
        // each shared subscription it was picked for (§4.8.2).
        // Subscribers of one filter come out sorted already (the common case costs one pass).
        let key = |m: &Match| (m.session, m.shared);
        if !matches.is_sorted_by_key(key) {
            matches.sort_unstable_by_key(key);
        }
        let mut i = 0;
        while i < matches.len() {
            let sid = matches[i].session;
            let shared = matches[i].shared;
            let mut j = i;
            let mut qos = QoS::AtMostOnce;
            let mut retain = false;
            let mut sub_ids = Vec::new();
            let mut any = false;
            // Ordinary matches merge; each shared match stays alone (two groups picking the
            // same session give two copies).
            while j < matches.len()
                && matches[j].session == sid
                && matches[j].shared == shared
                && (!shared || j == i)
            {
                let m = &matches[j];
                j += 1;
                if m.sub.options.no_local
                    && !m.shared
                    && self
                        .sessions
                        .get(sid)
                        .is_some_and(|s| s.client_id == msg.publisher)
                {
                    continue;
                }
                any = true;
                qos = qos.max(m.sub.options.qos);
                retain |= m.sub.options.retain_as_published && !m.shared && msg.retain;
                if let Some(id) = m.sub.id {
                    sub_ids.push(id);
                }
            }
            i = j;
            if any {
                let delivery = Delivery {
                    qos: qos.min(msg.qos),
                    msg: msg.clone(),
                    retain,
                    sub_ids,
                    seq: 0,
                };
                self.deliver(sid, delivery, now);
            }
        }
        self.matches = matches;
    }

    /// Hands one delivery to a session: straight out if the window allows, else queued.
    fn deliver(&mut self, sid: SessionId, delivery: Delivery, now: Instant) {
        let max_queued = self.limits.max_queued_messages;
        let Some(session) = self.sessions.get_mut(sid) else {
            return;
        };
        let stored = self.persistent && session.expiry_interval > 0;
        if stored
            && delivery.qos != QoS::AtMostOnce
            && (session.conn.is_none()
                || session.loaded_through < session.spilled_through
                || session.pending.len() >= SPILL_WINDOW)
        {
            // A stored session keeps at most a window of queued messages in memory; the rest
            // (everything while it is offline) lives only on disk until there is room.
            let delivery = store_queued(
                session,
                delivery,
                true,
                &mut self.store_ops,
                &mut self.seq_clock,
            );
            let old = session.spilled;
            if old == 0 {
                session.spill_head = delivery.seq;
            }
            session.spilled += 1;
            session.spilled_through = delivery.seq;
            let online = session.conn.is_some();
            self.offline_changed(sid, old);
            if online {
                self.request_load(sid);
            } else {
                self.enforce_offline_cap();
            }
            return;
        }
        let Some(conn) = session.conn else {
            if delivery.qos == QoS::AtMostOnce {
                return;
            }
            if session.pending.len() >= max_queued {
                session.dropped += 1;
                self.stats.dropped_queue_full += 1;
                return;
            }
            let delivery = store_queued(
                session,
                delivery,
                stored,
                &mut self.store_ops,
                &mut self.seq_clock,
            );
            session.pending.push_back(delivery);
            return;
        };
        let state = &self.conns[&conn];
        if delivery.qos == QoS::AtMostOnce {
            let publish = build_publish(&delivery, state.protocol, now);
            self.emit_publish(conn, publish);
            return;
        }
        let link = state.link(conn);
        if session.inflight.len() < link.window && session.pending.is_empty() {
            let mut fx = effects!(self);
            start_inflight(session, link, delivery, now, &mut fx);
        } else if session.pending.len() >= max_queued {
            session.dropped += 1;
            self.stats.dropped_queue_full += 1;
        } else {
            let delivery = store_queued(
                session,
                delivery,
                stored,
                &mut self.store_ops,
                &mut self.seq_clock,
            );
            session.loaded_through = session.loaded_through.max(delivery.seq);
            session.pending.push_back(delivery);
        }
    }

    fn emit_publish(&mut self, conn: ConnId, publish: Publish) {
        let packet = Packet::Publish(publish);
        if self.conns[&conn].link(conn).too_large(&packet) {
            self.stats.dropped_too_large += 1;
            return;
        }
        self.stats.messages_sent += 1;
        self.send(conn, packet);
    }

    /// Moves queued messages into the inflight window while there is room.
    fn flush(&mut self, sid: SessionId, now: Instant) {
        let Some(session) = self.sessions.get_mut(sid) else {
            return;
        };
        let Some(link) = session
            .conn
            .and_then(|conn| Some(self.conns.get(&conn)?.link(conn)))
        else {
            return;
        };
        let mut fx = effects!(self);
        while session.inflight.len() < link.window {
            let Some(delivery) = session.pending.pop_front() else {
                session.release_idle_memory();
                if session.loaded_through < session.spilled_through {
                    self.request_load(sid);
                }
                return;
            };
            if delivery.msg.is_expired(now) {
                fx.stats.dropped_expired += 1;
                fx.forget(&session.client_id, delivery.seq);
                continue;
            }
            start_inflight(session, link, delivery, now, &mut fx);
        }
    }

    fn handle_subscribe(&mut self, conn: ConnId, sub: Subscribe, now: Instant) {
        let state = &self.conns[&conn];
        let sid = state.session;
        let v5 = state.protocol.is_v5();
        let user = state.user.clone();
        let sub_id = sub.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut retained_for = Vec::new();
        for (raw, options) in sub.filters {
            let parsed = match topic::parse_filter(&raw) {
                Ok(p) => p,
                Err(_) => {
                    codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if parsed.share_group.is_some() && options.no_local && v5 {
                return self.protocol_error(
                    conn,
                    ReasonCode::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                    now,
                );
            }
            let permitted = self.conns[&conn]
                .permissions()
                .subscribe
                .allows(parsed.filter);
            if !self
                .acl
                .check(user.as_deref(), Action::Subscribe, parsed.filter)
                || !permitted
                || !self.policy_allows(parsed.filter, true)
            {
                codes.push(ReasonCode::NOT_AUTHORIZED);
                continue;
            }
            let max_subs = self.limits.max_subscriptions_per_client;
            if max_subs > 0 {
                let session = self.sessions.get(sid).expect("connected session");
                if session.subscriptions.len() >= max_subs
                    && !session.subscriptions.contains_key(raw.as_str())
                {
                    codes.push(ReasonCode::QUOTA_EXCEEDED);
                    continue;
                }
            }
            let mut options = options;
            options.qos = options.qos.min(self.limits.max_qos);
            let subscription = Subscription {
                options,
                id: sub_id,
            };
            let is_new =
                self.subscriptions
                    .insert(parsed.filter, parsed.share_group, sid, subscription);
            if let Some(s) = self.sessions.get_mut(sid) {
                s.subscriptions.insert(raw.clone(), subscription);
            }
            codes.push(ReasonCode(options.qos as u8));
            let send_retained = match options.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscribe => is_new,
                RetainHandling::Never => false,
            };
            if send_retained && parsed.share_group.is_none() {
                retained_for.push((parsed.filter.to_string(), subscription));
            }
        }
        self.save_session(sid);
        self.send(
            conn,
            Packet::SubAck(SubAck {
                packet_id: sub.packet_id,
                codes,
                properties: Properties::default(),
            }),
        );
        let mut found = Vec::new();
        for (filter, subscription) in retained_for {
            found.clear();
            self.retained.matching(&filter, now, &mut found);
            for msg in found.drain(..) {
                let delivery = Delivery {
                    qos: msg.qos.min(subscription.options.qos),
                    retain: true,
                    sub_ids: subscription.id.into_iter().collect(),
                    msg,
                    seq: 0,
                };
                self.deliver(sid, delivery, now);
            }
        }
    }

    fn handle_unsubscribe(&mut self, conn: ConnId, unsub: Unsubscribe) {
        let sid = self.conns[&conn].session;
        let mut codes = Vec::with_capacity(unsub.filters.len());
        for raw in unsub.filters {
            let code = match topic::parse_filter(&raw) {
                Err(_) => ReasonCode::TOPIC_FILTER_INVALID,
                Ok(parsed) => {
                    let removed = self
                        .subscriptions
                        .remove(parsed.filter, parsed.share_group, sid);
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.subscriptions.remove(raw.as_str());
                    }
                    if removed {
                        ReasonCode::SUCCESS
                    } else {
                        ReasonCode::NO_SUBSCRIPTION_EXISTED
                    }
                }
            };
            codes.push(code);
        }
        self.save_session(sid);
        self.send(
            conn,
            Packet::UnsubAck(UnsubAck {
                packet_id: unsub.packet_id,
                codes,
                properties: Properties::default(),
            }),
        );
    }

    fn handle_disconnect(&mut self, conn: ConnId, d: Disconnect, now: Instant) {
        let state = self.conns.get_mut(&conn).expect("connected");
        if let Some(expiry) = d.properties.session_expiry_interval {
            if state.zero_expiry_at_connect && expiry != 0 {
                return self.protocol_error(
                    conn,
                    ReasonCode::PROTOCOL_ERROR,
                    "session expiry raised from 0 at DISCONNECT",
                    now,
                );
            }
            let capped = expiry.min(self.limits.max_session_expiry);
            if let Some(s) = self.sessions.get_mut(state.session) {
                s.expiry_interval = capped;
            }
        }
        let publish_will = d.code == ReasonCode::DISCONNECT_WITH_WILL;
        self.out.push(Output::Close {
            conn,
            disconnect: None,
        });
        self.detach(conn, publish_will, now);
    }

    // -----------------------------------------------------------------------------------------
    // Connection end, session end, timers

    /// The network connection closed (or was closed by the runtime: keep-alive timeout, I/O
    /// error, malformed packet) without a DISCONNECT the core has seen: the will is published.
    pub fn connection_lost(&mut self, conn: ConnId, now: Instant) {
        self.detach(conn, true, now);
    }

    /// Forgets `conn`; the session stays (until it expires) or ends now.
    fn detach(&mut self, conn: ConnId, publish_will: bool, now: Instant) {
        let Some(state) = self.conns.remove(&conn) else {
            return;
        };
        let sid = state.session;
        let Some(session) = self.sessions.get_mut(sid) else {
            return;
        };
        if session.conn != Some(conn) {
            return;
        }
        session.conn = None;
        session.disconnected_at = Some(now);
        let old_spilled = session.spilled;
        if self.persistent && session.expiry_interval > 0 && !session.pending.is_empty() {
            // Offline, its queue lives on disk only.
            let first = session.pending.front().map_or(0, |d| d.seq);
            let last = session.pending.back().map_or(0, |d| d.seq);
            // Everything in memory comes before what is on disk.
            session.spill_head = if old_spilled == 0 {
                first
            } else {
                session.spill_head.min(first)
            };
            session.spilled += session.pending.len() as u64;
            session.loaded_through = session.loaded_through.min(first.saturating_sub(1));
            session.spilled_through = session.spilled_through.max(last);
            session.pending.clear();
        }
        session.release_idle_memory();
        session.load_requested = false;
        let expiry = session.expiry_interval;
        let mut will_now = None;
        if let (true, Some(will)) = (publish_will, state.will) {
            if will.delay == 0 || expiry == 0 {
                will_now = Some(will);
            } else {
                let at = now + Duration::from_secs(u64::from(will.delay.min(expiry)));
                session.pending_will = Some(Box::new(PendingWill { will: *will, at }));
                self.timers.push(Reverse((at, Timer::WillDelay(sid))));
            }
        }
        self.offline_changed(sid, old_spilled);
        self.enforce_offline_cap();
        if expiry == 0 {
            self.end_session(sid, now);
        } else {
            if expiry != u32::MAX {
                // When `Session::expires_at` says, as the session's disconnect time is now.
                let at = now + Duration::from_secs(u64::from(expiry));
                self.timers.push(Reverse((at, Timer::SessionExpiry(sid))));
            }
            self.save_session(sid);
        }
        if let Some(will) = will_now {
            let msg = will.publish(now);
            self.publish_shared(msg, now);
        }
    }

    /// Removes a session and its subscriptions; a pending will is published first.
    fn end_session(&mut self, sid: SessionId, now: Instant) {
        let Some(session) = self.sessions.remove(sid) else {
            return;
        };
        self.offline.set(sid, None);
        self.offline.total = self.offline.total.saturating_sub(session.spilled);
        if self.persistent {
            self.store_ops.push(StoreOp::SessionDeleted {
                client_id: session.client_id.clone(),
            });
        }
        for raw in session.subscriptions.keys() {
            if let Ok(parsed) = topic::parse_filter(raw) {
                self.subscriptions
                    .remove(parsed.filter, parsed.share_group, sid);
            }
        }
        if let Some(pending) = session.pending_will {
            let msg = pending.will.publish(now);
            self.publish_shared(msg, now);
        }
    }

    /// Runs the timers that are due, at most [`MAX_TIMERS_PER_CALL`] of them: a mass of
    /// sessions expiring together is worked off over several calls (`poll_timeout` stays due),
    /// so it never stalls the broker.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut budget = MAX_TIMERS_PER_CALL;
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now || budget == 0 {
                break;
            }
            budget -= 1;
            self.timers.pop();
            match timer {
                Timer::SessionExpiry(sid) => {
                    let due = self
                        .sessions
                        .get(sid)
                        .is_some_and(|s| s.expires_at().is_some_and(|e| e <= now));
                    if due {
                        self.end_session(sid, now);
                    }
                }
                Timer::WillDelay(sid) => {
                    let will = self.sessions.get_mut(sid).and_then(|s| {
                        if s.pending_will.as_ref().is_some_and(|w| w.at <= now) {
                            s.pending_will.take()
                        } else {
                            None
                        }
                    });
                    if let Some(pending) = will {
                        let msg = pending.will.publish(now);
                        self.publish_shared(msg, now);
                    }
                }
            }
        }
    }

    /// Stores the persistent part of a session (if it is persistent).
    fn save_session(&mut self, sid: SessionId) {
        if !self.persistent {
            return;
        }
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        if s.expiry_interval == 0 {
            return;
        }
        let mut subscriptions: Vec<_> = s
            .subscriptions
            .iter()
            .map(|(f, sub)| (f.clone(), *sub))
            .collect();
        subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut incoming_qos2: Vec<u16> = s.incoming_qos2.iter().copied().collect();
        incoming_qos2.sort_unstable();
        self.store_ops.push(StoreOp::Session(SessionRecord {
            client_id: s.client_id.clone(),
            expiry_interval: s.expiry_interval,
            disconnected_at: if s.conn.is_some() {
                None
            } else {
                s.disconnected_at
            },
            subscriptions,
            incoming_qos2,
        }));
    }

    /// A stored message was delivered, refused or dropped: it leaves the store.
    fn forget_message(&mut self, client_id: &ByteStr, seq: u64) {
        effects!(self).forget(client_id, seq);
    }

    /// Re-files a session in the offline index after its count of messages on disk changed
    /// from `old_spilled` (or it connected or went offline).
    fn offline_changed(&mut self, sid: SessionId, old_spilled: u64) {
        let Some(session) = self.sessions.get(sid) else {
            return;
        };
        self.offline.total = self
            .offline
            .total
            .saturating_sub(old_spilled)
            .saturating_add(session.spilled);
        let head = (session.conn.is_none() && session.spilled > 0)
            .then_some(session.spill_head.max(session.evicted_through + 1));
        self.offline.set(sid, head);
    }

    /// Asks for an eviction if the instance holds more offline messages than its cap (one
    /// request at a time; [`Broker::evicted`] asks again). Called by the runtime after a
    /// restore; the core calls it whenever messages go to disk.
    pub fn enforce_offline_cap(&mut self) {
        let cap = self.limits.max_offline_messages;
        if !self.persistent || self.offline.outstanding.is_some() || self.offline.total <= cap {
            return;
        }
        let Some((sid, below)) = self.offline.oldest() else {
            return;
        };
        let Some(session) = self.sessions.get(sid) else {
            self.offline.set(sid, None);
            return;
        };
        self.offline.outstanding = Some((sid, session.spilled_through));
        self.evictions.push(EvictRequest {
            client_id: session.client_id.clone(),
            after_seq: session.loaded_through.max(session.evicted_through),
            below_seq: below,
            max: self.offline.total - cap,
        });
    }

    /// The answer to an [`EvictRequest`]: `deleted` queued messages are gone from disk, and
    /// the session's oldest queued message still there is at `next_head` (`None`: none).
    pub fn evicted(
        &mut self,
        client_id: &str,
        deleted: u64,
        last_deleted: u64,
        next_head: Option<u64>,
    ) {
        let outstanding = self.offline.outstanding.take();
        self.stats.evicted_offline += deleted;
        if let (Some(sid), Some((asked, through))) = (self.sessions.find(client_id), outstanding) {
            if sid == asked {
                let session = self.sessions.get_mut(sid).expect("found");
                let old = session.spilled;
                session.spilled = session.spilled.saturating_sub(deleted);
                session.evicted_through = session.evicted_through.max(last_deleted);
                match next_head {
                    Some(head) => session.spill_head = head,
                    None if session.spilled_through <= through => {
                        // Nothing queued is left on disk (a count above zero was stale:
                        // the retention sweep deleted messages meanwhile).
                        session.spilled = 0;
                        session.loaded_through =
                            session.loaded_through.max(session.spilled_through);
                    }
                    None => session.spill_head = through + 1,
                }
                self.offline_changed(sid, old);
            }
        }
        self.enforce_offline_cap();
    }

    /// Queued messages of `client_id` that the runtime deleted from disk on its own (their
    /// retention passed): they no longer count towards the cap.
    pub fn discarded_offline(&mut self, client_id: &str, count: u64) {
        if let Some(sid) = self.sessions.find(client_id) {
            let session = self.sessions.get_mut(sid).expect("found");
            let old = session.spilled;
            session.spilled = session.spilled.saturating_sub(count);
            self.offline_changed(sid, old);
        }
    }

    fn request_load(&mut self, sid: SessionId) {
        let Some(session) = self.sessions.get_mut(sid) else {
            return;
        };
        if session.load_requested
            || session.loaded_through >= session.spilled_through
            || session.conn.is_none()
        {
            return;
        }
        session.load_requested = true;
        self.loads.push(LoadRequest {
            client_id: session.client_id.clone(),
            after_seq: session.loaded_through,
            limit: SPILL_WINDOW,
        });
    }

    /// The answer to a [`LoadRequest`]: queued messages read back from the store, in order.
    /// Fewer than asked for means none are left on disk.
    pub fn loaded(
        &mut self,
        client_id: &str,
        limit: usize,
        messages: Vec<(u64, StoredMessage)>,
        now: Instant,
    ) {
        let Some(sid) = self.sessions.find(client_id) else {
            return;
        };
        let session = self.sessions.get_mut(sid).expect("found");
        session.load_requested = false;
        if session.conn.is_none() {
            // Went offline meanwhile: it stays on disk.
            return;
        }
        let short = messages.len() < limit;
        let old_spilled = session.spilled;
        let mut found = 0;
        for (seq, stored) in messages {
            if seq <= session.loaded_through || seq > session.spilled_through {
                continue;
            }
            session.loaded_through = seq;
            if stored.state != MessageState::Queued {
                continue;
            }
            found += 1;
            session.spilled = session.spilled.saturating_sub(1);
            let mut delivery = stored.delivery;
            delivery.seq = seq;
            session.pending.push_back(delivery);
        }
        if short && found == 0 {
            // Nothing (more) readable: normally the rest is still on its way to the disk and
            // the next load finds it; if loads keep coming back empty, what is missing is gone.
            session.empty_loads += 1;
            if session.empty_loads >= 3 {
                session.loaded_through = session.spilled_through;
                session.spilled = 0;
            }
        } else {
            session.empty_loads = 0;
        }
        self.offline_changed(sid, old_spilled);
        self.flush(sid, now);
    }

    /// Rebuilds a stored persistent session at start-up (disconnected). `messages` are its
    /// stored messages in `seq` order. Sessions whose expiry passed while the server was down
    /// end at once.
    /// `messages` are the session's in-flight messages (and any queued ones the caller chose to
    /// decode); `queued` counts queued messages left on disk, and `next_seq` is one past the
    /// highest stored position.
    pub fn restore_session(
        &mut self,
        record: SessionRecord,
        messages: Vec<(u64, StoredMessage)>,
        queued: u64,
        next_seq: u64,
        now: Instant,
    ) {
        let sid = self.create_session(record.client_id.clone());
        let disconnected_at = record.disconnected_at.unwrap_or(now);
        let session = self.sessions.get_mut(sid).expect("just created");
        // Its in-flight ids come from the store, not from this session's counter.
        session.ids_from_elsewhere();
        session.expiry_interval = record.expiry_interval;
        session.disconnected_at = Some(disconnected_at);
        session.incoming_qos2 = record.incoming_qos2.into_iter().collect();
        session.next_seq = messages.last().map_or(1, |(seq, _)| seq + 1).max(next_seq);
        self.seq_clock = self.seq_clock.max(session.next_seq);
        session.spilled = queued;
        // Unknown until the first eviction looks: 1 is a lower bound.
        session.spill_head = 1;
        session.loaded_through = 0;
        // Queued messages come after every in-flight one, so the highest stored position is
        // the last queued one.
        session.spilled_through = if queued > 0 { session.next_seq - 1 } else { 0 };
        for (seq, stored) in messages {
            let mut delivery = stored.delivery;
            delivery.seq = seq;
            match stored.state {
                MessageState::Queued => {
                    // Queued messages stay on disk until the client is back.
                    session.spilled += 1;
                    session.spilled_through = session.spilled_through.max(seq);
                }
                state => session.inflight.push_back(Inflight {
                    packet_id: stored.packet_id,
                    delivery,
                    state: if state == MessageState::Released {
                        OutState::Released
                    } else {
                        OutState::Published
                    },
                }),
            }
        }
        for (raw, sub) in &record.subscriptions {
            if let Ok(parsed) = topic::parse_filter(raw) {
                self.subscriptions
                    .insert(parsed.filter, parsed.share_group, sid, *sub);
                session.subscriptions.insert(raw.clone(), *sub);
            }
        }
        if record.expiry_interval != u32::MAX {
            let at = disconnected_at + Duration::from_secs(u64::from(record.expiry_interval));
            self.timers.push(Reverse((at, Timer::SessionExpiry(sid))));
        }
        self.offline_changed(sid, 0);
    }

    /// Puts back a stored retained message at start-up.
    pub fn restore_retained(&mut self, msg: Message) {
        self.retained.insert(Arc::new(msg));
    }

    fn policy_allows(&self, topic: &str, is_filter: bool) -> bool {
        // P2P topics are addressed to a client, not subscribed to; the parent still counts.
        self.policy
            .as_ref()
            .is_none_or(|p| p.allows(topic, is_filter))
    }

    /// Replaces a connection's permissions (a token uploaded on `$SYS/uploadToken`).
    pub fn set_permissions(&mut self, conn: ConnId, permissions: Permissions) {
        if let Some(state) = self.conns.get_mut(&conn) {
            state.permissions = boxed_unless_full(permissions);
        }
    }

    /// Closes the connection of `client_id` (v5: DISCONNECT 0x98 administrative action); the
    /// will is published. Returns whether it was connected.
    pub fn kick(&mut self, client_id: &str, now: Instant) -> bool {
        let Some(conn) = self
            .sessions
            .find(client_id)
            .and_then(|sid| self.sessions.get(sid))
            .and_then(|s| s.conn)
        else {
            return false;
        };
        let v5 = self.conns[&conn].protocol.is_v5();
        self.out.push(Output::Close {
            conn,
            disconnect: v5.then(|| v5_disconnect(ReasonCode::ADMINISTRATIVE_ACTION, None)),
        });
        self.detach(conn, true, now);
        true
    }

    /// The session of `client_id`, online or not.
    pub fn client_info(&self, client_id: &str) -> Option<ClientInfo> {
        let session = self.sessions.get(self.sessions.find(client_id)?)?;
        let conn = session.conn.and_then(|c| self.conns.get(&c));
        let mut subscriptions: Vec<(String, QoS)> = session
            .subscriptions
            .iter()
            .map(|(f, s)| (f.to_string(), s.options.qos))
            .collect();
        subscriptions.sort();
        Some(ClientInfo {
            client_id: session.client_id.to_string(),
            online: conn.is_some(),
            peer: conn.and_then(|c| c.peer.map(|p| p.to_string())),
            protocol: conn.map(|c| c.protocol),
            last_activity: conn.map(|c| c.last_activity).or(session.disconnected_at),
            subscriptions,
            inflight: session.inflight.len(),
            queued: session.pending.len() + session.spilled as usize,
        })
    }

    /// Client ids of every session.
    pub fn client_ids(&self) -> Vec<String> {
        self.sessions.client_ids()
    }

    /// Connected clients whose id is `<group_id>@@@…`.
    pub fn online_in_group(&self, group_id: &str) -> usize {
        self.conns
            .values()
            .filter_map(|c| self.sessions.get(c.session))
            .filter(|s| {
                s.client_id
                    .split_once("@@@")
                    .is_some_and(|(g, _)| g == group_id)
            })
            .count()
    }

    /// Sessions with a subscription matching `topic` (shared groups count their members).
    pub fn subscribers_of(&self, topic: &str) -> usize {
        let mut count = 0;
        for id in self.sessions.client_ids() {
            let Some(session) = self
                .sessions
                .find(&id)
                .and_then(|sid| self.sessions.get(sid))
            else {
                continue;
            };
            let hit = session
                .subscriptions
                .keys()
                .any(|raw| topic::parse_filter(raw).is_ok_and(|p| topic::matches(p.filter, topic)));
            count += usize::from(hit);
        }
        count
    }

    /// Closes every connection with v5 DISCONNECT 0x8B (server shutting down). Wills are not
    /// published: the clients did nothing wrong.
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            let v5 = self.conns[&conn].protocol.is_v5();
            self.out.push(Output::Close {
                conn,
                disconnect: v5.then(|| v5_disconnect(ReasonCode::SERVER_SHUTTING_DOWN, None)),
            });
            self.detach(conn, false, now);
        }
    }
}

/// Timers run per [`Broker::handle_timeout`] call.
pub const MAX_TIMERS_PER_CALL: usize = 1024;

/// Queued messages a connected stored session keeps in memory; more wait on disk.
const SPILL_WINDOW: usize = 256;

/// Gives a delivery queued for a stored session its log position and stores it.
fn store_queued(
    session: &mut Session,
    mut delivery: Delivery,
    stored: bool,
    ops: &mut Vec<StoreOp>,
    clock: &mut u64,
) -> Delivery {
    if stored {
        if delivery.seq == 0 {
            delivery.seq = next_position(clock, session);
        }
        ops.push(StoreOp::Message {
            client_id: session.client_id.clone(),
            seq: delivery.seq,
            message: StoredMessage {
                delivery: delivery.clone(),
                state: MessageState::Queued,
                packet_id: 0,
            },
        });
    }
    delivery
}

/// What sending to a live connection needs to know about it.
#[derive(Clone, Copy)]
struct Link {
    conn: ConnId,
    protocol: Protocol,
    max_packet_size: u32,
    /// The outbound inflight window.
    window: usize,
}

impl Link {
    /// Whether `packet` is larger than the client accepts: it is not sent (§3.1.2.11.4).
    fn too_large(&self, packet: &Packet) -> bool {
        self.max_packet_size != u32::MAX
            && packet.encoded_len(self.protocol) > self.max_packet_size as usize
    }
}

/// The parts of the broker a delivery writes to, borrowed apart from the session it is for
/// (one lookup of the session and connection for a whole refill of the window).
struct Effects<'a> {
    out: &'a mut Vec<Output>,
    stats: &'a mut Stats,
    store_ops: &'a mut Vec<StoreOp>,
    seq_clock: &'a mut u64,
    persistent: bool,
}

impl Effects<'_> {
    /// A stored message was delivered, refused or dropped: it leaves the store.
    fn forget(&mut self, client_id: &ByteStr, seq: u64) {
        if self.persistent && seq != 0 {
            self.store_ops.push(StoreOp::MessageDeleted {
                client_id: client_id.clone(),
                seq,
            });
        }
    }
}

/// Sends a QoS 1/2 delivery with a fresh packet id and records it in flight. A message larger
/// than the client's maximum packet size is dropped instead (§3.1.2.11.4).
fn start_inflight(
    session: &mut Session,
    link: Link,
    mut delivery: Delivery,
    now: Instant,
    fx: &mut Effects<'_>,
) {
    let mut packet = Packet::Publish(build_publish(&delivery, link.protocol, now));
    if link.too_large(&packet) {
        fx.stats.dropped_too_large += 1;
        fx.forget(&session.client_id, delivery.seq);
        return;
    }
    let packet_id = session.next_packet_id();
    if let Packet::Publish(p) = &mut packet {
        p.packet_id = packet_id;
    }
    if fx.persistent && session.expiry_interval > 0 {
        if delivery.seq == 0 {
            delivery.seq = next_position(fx.seq_clock, session);
            session.loaded_through = session.loaded_through.max(delivery.seq);
        }
        fx.store_ops.push(StoreOp::Message {
            client_id: session.client_id.clone(),
            seq: delivery.seq,
            message: StoredMessage {
                delivery: delivery.clone(),
                state: MessageState::Published,
                packet_id,
            },
        });
    }
    session.inflight.push_back(Inflight {
        packet_id,
        delivery,
        state: OutState::Published,
    });
    fx.stats.messages_sent += 1;
    fx.out.push(Output::Send {
        conn: link.conn,
        packet,
    });
}

/// The next stored-message position: from the core-wide counter, and never below the
/// session's own next position (so a session's positions only grow, also across restarts).
fn next_position(clock: &mut u64, session: &mut Session) -> u64 {
    let seq = (*clock).max(session.next_seq);
    *clock = seq + 1;
    session.next_seq = seq + 1;
    seq
}

/// The client id of a P2P topic `<parent>/p2p/<clientId>`.
pub fn p2p_target(topic: &str) -> Option<&str> {
    let (_, rest) = topic.split_once('/')?;
    let target = rest.strip_prefix("p2p/")?;
    (!target.is_empty()).then_some(target)
}

/// The PUBLISH for one delivery (packet id filled in by the caller for QoS 1/2).
fn build_publish(d: &Delivery, protocol: Protocol, now: Instant) -> Publish {
    let properties = if protocol.is_v5() {
        // Shares nothing but allocates only when there is something to say.
        let mut p = d.msg.properties.clone();
        if let Some(expiry) = d.msg.remaining_expiry(now) {
            p.make_mut().message_expiry_interval = Some(expiry);
        }
        if !d.sub_ids.is_empty() {
            p.make_mut().subscription_identifiers = d.sub_ids.clone();
        }
        p
    } else {
        Properties::default()
    };
    Publish {
        dup: false,
        qos: d.qos,
        retain: d.retain,
        topic: d.msg.topic.clone(),
        packet_id: 0,
        payload: d.msg.payload.clone(),
        properties,
    }
}
