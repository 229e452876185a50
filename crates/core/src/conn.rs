//! The per-connection state machine, kept next to the socket by the runtime: it enforces what
//! belongs to one network connection rather than to the session — the CONNECT handshake and its
//! timeout, keep-alive (1.5 × the interval), topic aliases in both directions and the inbound
//! receive maximum — and answers PINGREQ itself.

use crate::hash::HashMap;
use ferry_codec::{ByteStr, Connect, Packet, Protocol, QoS, ReasonCode};
use std::time::{Duration, Instant};

/// Why the connection must close; `code` is sent in a v5 DISCONNECT (or CONNACK before the
/// handshake completed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: ReasonCode,
    pub reason: &'static str,
}

fn violation(code: ReasonCode, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// What to do with a packet the client sent.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// The first packet: authenticate it and hand it to [`crate::Broker::connect`].
    Connect(Box<Connect>),
    /// Hand to [`crate::Broker::handle`].
    Forward(Packet),
    /// Write this answer straight back (PINGRESP).
    Reply(Packet),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for CONNECT.
    Handshake,
    /// CONNECT received, waiting for the broker's verdict.
    Connecting,
    Connected,
}

/// Topic aliases in force on a connection, in both directions.
#[derive(Debug, Default)]
struct Aliases {
    inbound: HashMap<u16, ByteStr>,
    outbound: HashMap<ByteStr, u16>,
}

#[derive(Debug)]
pub struct Connection {
    phase: Phase,
    protocol: Protocol,
    handshake_deadline: Instant,
    keep_alive: Option<Duration>,
    last_received: Instant,
    max_packet_size: u32,
    receive_maximum: u16,
    /// QoS 1/2 packet ids received and not yet acknowledged (PUBACK / PUBCOMP sent), each with
    /// whether a successful PUBREC went out for it.
    unacked_inbound: HashMap<u16, bool>,
    alias_in_max: u16,
    alias_out_max: u16,
    /// Allocated when the first topic alias is used (most connections never use one).
    aliases: Option<Box<Aliases>>,
    /// The client's maximum packet size: a new outbound alias must not push a packet over it.
    client_max_packet_size: u32,
}

impl Connection {
    /// A fresh connection: it must send CONNECT within `handshake_timeout`.
    pub fn new(
        now: Instant,
        handshake_timeout: Duration,
        max_packet_size: u32,
        receive_maximum: u16,
        topic_alias_maximum: u16,
    ) -> Self {
        Connection {
            phase: Phase::Handshake,
            protocol: Protocol::V3_1_1,
            handshake_deadline: now + handshake_timeout,
            keep_alive: None,
            last_received: now,
            max_packet_size,
            receive_maximum,
            unacked_inbound: HashMap::default(),
            alias_in_max: topic_alias_maximum,
            alias_out_max: 0,
            aliases: None,
            client_max_packet_size: u32::MAX,
        }
    }

    /// The protocol for decoding (3.1.1 until CONNECT says otherwise).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    /// Lowers (or sets) the inbound packet limit once the client's instance is known.
    pub fn set_max_packet_size(&mut self, max: u32) {
        self.max_packet_size = max;
    }

    pub fn is_connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// Classifies and checks one packet from the client.
    pub fn on_packet(&mut self, packet: Packet, now: Instant) -> Result<Inbound, Violation> {
        self.last_received = now;
        match self.phase {
            Phase::Handshake => {
                let Packet::Connect(connect) = packet else {
                    return Err(violation(
                        ReasonCode::PROTOCOL_ERROR,
                        "the first packet must be CONNECT",
                    ));
                };
                self.protocol = connect.protocol;
                self.alias_out_max = connect.properties.topic_alias_maximum.unwrap_or(0);
                self.client_max_packet_size =
                    connect.properties.maximum_packet_size.unwrap_or(u32::MAX);
                self.phase = Phase::Connecting;
                Ok(Inbound::Connect(connect))
            }
            Phase::Connecting | Phase::Connected => self.on_session_packet(packet),
        }
    }

    fn on_session_packet(&mut self, packet: Packet) -> Result<Inbound, Violation> {
        match packet {
            Packet::Publish(mut p) => {
                if let Some(alias) = p.properties.get_mut().and_then(|p| p.topic_alias.take()) {
                    if alias == 0 || alias > self.alias_in_max {
                        return Err(violation(
                            ReasonCode::TOPIC_ALIAS_INVALID,
                            "topic alias out of range",
                        ));
                    }
                    if p.topic.is_empty() {
                        match self.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                            Some(topic) => p.topic = topic.clone(),
                            None => {
                                return Err(violation(
                                    ReasonCode::PROTOCOL_ERROR,
                                    "unknown topic alias",
                                ))
                            }
                        }
                    } else {
                        let aliases = self.aliases.get_or_insert_with(Default::default);
                        aliases.inbound.insert(alias, p.topic.clone());
                    }
                } else if p.topic.is_empty() && self.protocol.is_v5() {
                    return Err(violation(
                        ReasonCode::PROTOCOL_ERROR,
                        "empty topic without a topic alias",
                    ));
                }
                if p.qos != QoS::AtMostOnce {
                    self.unacked_inbound.entry(p.packet_id).or_insert(false);
                    // MQTT 3 clients cannot learn the server's receive maximum, so it is only
                    // enforced on MQTT 5.
                    if self.protocol.is_v5()
                        && self.unacked_inbound.len() > usize::from(self.receive_maximum)
                    {
                        return Err(violation(
                            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                            "receive maximum exceeded",
                        ));
                    }
                }
                Ok(Inbound::Forward(Packet::Publish(p)))
            }
            Packet::PingReq => Ok(Inbound::Reply(Packet::PingResp)),
            Packet::Connect(_) => Err(violation(ReasonCode::PROTOCOL_ERROR, "second CONNECT")),
            Packet::Auth(_) => Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "enhanced authentication is not supported",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "packet type only a server may send",
                ))
            }
            other => Ok(Inbound::Forward(other)),
        }
    }

    /// The broker accepted the CONNECT; `keep_alive` is the interval to enforce, in seconds.
    pub fn accepted(&mut self, keep_alive: u16) {
        self.phase = Phase::Connected;
        self.keep_alive = (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive)));
    }

    /// Prepares a packet for the wire: assigns or applies an outbound topic alias to PUBLISH and
    /// releases the inbound receive-maximum slot when the acknowledgement goes out.
    pub fn on_outbound(&mut self, packet: &mut Packet) {
        match packet {
            Packet::Publish(p) if self.alias_out_max > 0 => {
                let outbound = &self.aliases.get_or_insert_with(Default::default).outbound;
                if let Some(&alias) = outbound.get(&p.topic) {
                    p.properties.make_mut().topic_alias = Some(alias);
                    p.topic = ByteStr::new();
                } else if outbound.len() < usize::from(self.alias_out_max) {
                    let alias = outbound.len() as u16 + 1;
                    p.properties.make_mut().topic_alias = Some(alias);
                    if self.fits(packet) {
                        let Packet::Publish(p) = packet else {
                            unreachable!()
                        };
                        let aliases = self.aliases.get_or_insert_with(Default::default);
                        aliases.outbound.insert(p.topic.clone(), alias);
                    } else if let Packet::Publish(p) = packet {
                        if let Some(props) = p.properties.get_mut() {
                            props.topic_alias = None;
                        }
                    }
                }
                return;
            }
            Packet::PubAck(a) | Packet::PubComp(a) => {
                self.unacked_inbound.remove(&a.packet_id);
            }
            Packet::PubRec(a) => {
                if a.code.is_error() {
                    // Refused: the exchange ends, unless this refuses a reused id whose first
                    // message was accepted and still holds its slot.
                    if self.unacked_inbound.get(&a.packet_id) == Some(&false) {
                        self.unacked_inbound.remove(&a.packet_id);
                    }
                } else if let Some(accepted) = self.unacked_inbound.get_mut(&a.packet_id) {
                    *accepted = true;
                }
            }
            _ => {}
        }
        self.trim_to_fit(packet);
    }

    fn fits(&self, packet: &Packet) -> bool {
        self.client_max_packet_size == u32::MAX
            || packet.encoded_len(self.protocol) <= self.client_max_packet_size as usize
    }

    /// Drops the reason string and user properties of an acknowledgement or DISCONNECT that
    /// would exceed the client's maximum packet size (MQTT 5 §3.1.2.11.4).
    fn trim_to_fit(&self, packet: &mut Packet) {
        if self.fits(packet) {
            return;
        }
        let properties = match packet {
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                &mut a.properties
            }
            Packet::SubAck(a) => &mut a.properties,
            Packet::UnsubAck(a) => &mut a.properties,
            Packet::Disconnect(d) => &mut d.properties,
            _ => return,
        };
        if let Some(p) = properties.get_mut() {
            p.reason_string = None;
            p.user_properties.clear();
        }
    }

    /// When [`Connection::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Handshake => Some(self.handshake_deadline),
            Phase::Connecting => None,
            Phase::Connected => self.keep_alive.map(|ka| self.last_received + ka + ka / 2),
        }
    }

    /// Fails once the handshake or keep-alive deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Violation> {
        match self.poll_timeout() {
            Some(deadline) if now >= deadline => Err(match self.phase {
                Phase::Handshake => {
                    violation(ReasonCode::MAXIMUM_CONNECT_TIME, "no CONNECT in time")
                }
                _ => violation(ReasonCode::KEEP_ALIVE_TIMEOUT, "keep alive timeout"),
            }),
            _ => Ok(()),
        }
    }
}
