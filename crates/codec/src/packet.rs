//! Packets: structs, the frame decoder and the encoder.

use crate::io::{field_len, put_binary, put_varint, read_varint, varint_len, Reader};
use crate::properties::Context;
use crate::{ByteStr, DecodeError, EncodeError, Properties, ReasonCode, MAX_VARINT};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol level a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1, level 4.
    V3_1_1,
    /// MQTT 5.0, level 5.
    V5,
}

impl Protocol {
    pub fn level(self) -> u8 {
        match self {
            Protocol::V3_1 => 3,
            Protocol::V3_1_1 => 4,
            Protocol::V5 => 5,
        }
    }
    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }
}

/// Quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Result<QoS, DecodeError> {
        match v {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(DecodeError::InvalidQoS),
        }
    }
}

/// Packet types (§2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    pub(crate) fn name_of(t: u8) -> &'static str {
        match t {
            1 => "CONNECT",
            2 => "CONNACK",
            3 => "PUBLISH",
            4 => "PUBACK",
            5 => "PUBREC",
            6 => "PUBREL",
            7 => "PUBCOMP",
            8 => "SUBSCRIBE",
            9 => "SUBACK",
            10 => "UNSUBSCRIBE",
            11 => "UNSUBACK",
            12 => "PINGREQ",
            13 => "PINGRESP",
            14 => "DISCONNECT",
            15 => "AUTH",
            _ => "reserved packet type",
        }
    }
    pub fn name(self) -> &'static str {
        Self::name_of(self as u8)
    }
}

/// A will message carried in CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    /// Clean Session (3.x) or Clean Start (5.0).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: ByteStr,
    pub will: Option<Will>,
    pub username: Option<ByteStr>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// The MQTT 5 reason code; for 3.x it is mapped to a return code on encode.
    pub code: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in MQTT 5 when a topic alias stands for it.
    pub topic: ByteStr,
    /// 0 for QoS 0.
    pub packet_id: u16,
    pub payload: Bytes,
    pub properties: Properties,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PubAck {
    pub packet_id: u16,
    pub code: ReasonCode,
    pub properties: Properties,
}

impl PubAck {
    pub fn new(packet_id: u16) -> Self {
        PubAck {
            packet_id,
            ..Default::default()
        }
    }
    pub fn with_code(packet_id: u16, code: ReasonCode) -> Self {
        PubAck {
            packet_id,
            code,
            properties: Properties::default(),
        }
    }
}

/// Retain handling subscription option (MQTT 5 §3.8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// Send retained messages at subscribe time.
    #[default]
    OnSubscribe = 0,
    /// Send them only if the subscription did not already exist.
    OnNewSubscribe = 1,
    /// Never send them.
    Never = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubOptions {
    fn to_byte(self) -> u8 {
        self.qos as u8
            | (u8::from(self.no_local) << 2)
            | (u8::from(self.retain_as_published) << 3)
            | ((self.retain_handling as u8) << 4)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Subscribe {
    pub packet_id: u16,
    pub filters: Vec<(ByteStr, SubOptions)>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SubAck {
    pub packet_id: u16,
    /// One per filter: the granted QoS or a failure code (MQTT 5 codes; mapped for 3.x).
    pub codes: Vec<ReasonCode>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<ByteStr>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnsubAck {
    pub packet_id: u16,
    /// One per filter in MQTT 5; not sent in 3.x.
    pub codes: Vec<ReasonCode>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub code: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Auth {
    pub code: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubAck),
    PubRel(PubAck),
    PubComp(PubAck),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Looks at the fixed header at the front of `buf`. Returns `Ok(None)` while the header is
/// incomplete, else the total frame size (header + remaining length). A frame above
/// `max_packet_size` is refused here, before its body is buffered.
pub fn peek_frame(buf: &[u8], max_packet_size: u32) -> Result<Option<usize>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((remaining, len_bytes)) = read_varint(&buf[1..])? else {
        return Ok(None);
    };
    let size = 1 + len_bytes + remaining as usize;
    if size > max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(Some(size))
}

/// Takes one packet off the front of `buf`. `Ok(None)` means more bytes are needed (nothing is
/// consumed). `protocol` is the connection's protocol; a CONNECT carries its own.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(size) = peek_frame(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    let first = frame.get_u8();
    let (_, len_bytes) = read_varint(&frame)?.expect("header was complete");
    frame.advance(len_bytes);
    decode_body(first, frame, protocol).map(Some)
}

fn expect_flags(first: u8, expected: u8, packet: &'static str) -> Result<(), DecodeError> {
    let flags = first & 0x0f;
    if flags != expected {
        return Err(DecodeError::InvalidFlags { packet, flags });
    }
    Ok(())
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    let id = r.u16("packet identifier")?;
    if id == 0 {
        return Err(DecodeError::ZeroPacketId);
    }
    Ok(id)
}

fn decode_body(first: u8, body: Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
    let ptype = first >> 4;
    let mut r = Reader::new(body);
    let v5 = protocol.is_v5();
    let packet = match ptype {
        1 => {
            expect_flags(first, 0, "CONNECT")?;
            Packet::Connect(Box::new(decode_connect(&mut r)?))
        }
        2 => {
            expect_flags(first, 0, "CONNACK")?;
            let flags = r.u8("CONNACK flags")?;
            if flags & 0xfe != 0 {
                return Err(DecodeError::InvalidFlags {
                    packet: "CONNACK",
                    flags,
                });
            }
            let code = r.u8("CONNACK code")?;
            let (code, properties) = if v5 {
                (
                    ReasonCode(code),
                    Properties::decode(&mut r, Context::Packet(2))?,
                )
            } else {
                (v3_connack_to_reason(code)?, Properties::default())
            };
            Packet::ConnAck(ConnAck {
                session_present: flags & 1 == 1,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(first, &mut r, v5)?),
        4 => {
            expect_flags(first, 0, "PUBACK")?;
            Packet::PubAck(decode_ack(&mut r, v5, 4)?)
        }
        5 => {
            expect_flags(first, 0, "PUBREC")?;
            Packet::PubRec(decode_ack(&mut r, v5, 5)?)
        }
        6 => {
            expect_flags(first, 0b0010, "PUBREL")?;
            Packet::PubRel(decode_ack(&mut r, v5, 6)?)
        }
        7 => {
            expect_flags(first, 0, "PUBCOMP")?;
            Packet::PubComp(decode_ack(&mut r, v5, 7)?)
        }
        8 => {
            expect_flags(first, 0b0010, "SUBSCRIBE")?;
            let packet_id = packet_id(&mut r)?;
            let properties = if v5 {
                Properties::decode(&mut r, Context::Packet(8))?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string("topic filter")?;
                let opts = r.u8("subscription options")?;
                let reserved = if v5 { 0xc0 } else { 0xfc };
                if opts & reserved != 0 {
                    return Err(DecodeError::InvalidSubscriptionOptions);
                }
                let retain_handling = match (opts >> 4) & 3 {
                    0 => RetainHandling::OnSubscribe,
                    1 => RetainHandling::OnNewSubscribe,
                    2 => RetainHandling::Never,
                    _ => return Err(DecodeError::InvalidRetainHandling),
                };
                filters.push((
                    filter,
                    SubOptions {
                        qos: QoS::from_u8(opts & 3)?,
                        no_local: opts & 4 != 0,
                        retain_as_published: opts & 8 != 0,
                        retain_handling,
                    },
                ));
            }
            if filters.is_empty() {
                return Err(DecodeError::NoTopicFilters("SUBSCRIBE"));
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        }
        9 => {
            expect_flags(first, 0, "SUBACK")?;
            let packet_id = packet_id(&mut r)?;
            let properties = if v5 {
                Properties::decode(&mut r, Context::Packet(9))?
            } else {
                Properties::default()
            };
            let codes = r.rest().iter().map(|&c| ReasonCode(c)).collect::<Vec<_>>();
            if !v5 {
                // MQTT 3.1.1 §3.9.3: 0x00, 0x01, 0x02 and 0x80 are the only return codes.
                if let Some(bad) = codes.iter().find(|c| !matches!(c.0, 0 | 1 | 2 | 0x80)) {
                    return Err(DecodeError::InvalidReasonCode {
                        packet: "SUBACK",
                        code: bad.0,
                    });
                }
            }
            Packet::SubAck(SubAck {
                packet_id,
                codes,
                properties,
            })
        }
        10 => {
            expect_flags(first, 0b0010, "UNSUBSCRIBE")?;
            let packet_id = packet_id(&mut r)?;
            let properties = if v5 {
                Properties::decode(&mut r, Context::Packet(10))?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while !r.is_empty() {
                filters.push(r.string("topic filter")?);
            }
            if filters.is_empty() {
                return Err(DecodeError::NoTopicFilters("UNSUBSCRIBE"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        }
        11 => {
            expect_flags(first, 0, "UNSUBACK")?;
            let packet_id = packet_id(&mut r)?;
            let (properties, codes) = if v5 {
                let p = Properties::decode(&mut r, Context::Packet(11))?;
                (p, r.rest().iter().map(|&c| ReasonCode(c)).collect())
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                codes,
                properties,
            })
        }
        12 => {
            expect_flags(first, 0, "PINGREQ")?;
            Packet::PingReq
        }
        13 => {
            expect_flags(first, 0, "PINGRESP")?;
            Packet::PingResp
        }
        14 => {
            expect_flags(first, 0, "DISCONNECT")?;
            let mut d = Disconnect::default();
            if v5 && !r.is_empty() {
                d.code = ReasonCode(r.u8("reason code")?);
                if !r.is_empty() {
                    d.properties = Properties::decode(&mut r, Context::Packet(14))?;
                }
            }
            Packet::Disconnect(d)
        }
        15 if v5 => {
            expect_flags(first, 0, "AUTH")?;
            let mut a = Auth::default();
            if !r.is_empty() {
                a.code = ReasonCode(r.u8("reason code")?);
                if !r.is_empty() {
                    a.properties = Properties::decode(&mut r, Context::Packet(15))?;
                }
            }
            Packet::Auth(a)
        }
        other => return Err(DecodeError::InvalidPacketType(other)),
    };
    r.finish()?;
    Ok(packet)
}

fn v3_connack_to_reason(code: u8) -> Result<ReasonCode, DecodeError> {
    Ok(match code {
        0 => ReasonCode::SUCCESS,
        1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        3 => ReasonCode::SERVER_UNAVAILABLE,
        4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        5 => ReasonCode::NOT_AUTHORIZED,
        code => {
            return Err(DecodeError::InvalidReasonCode {
                packet: "CONNACK",
                code,
            })
        }
    })
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.string("protocol name")?;
    let level = r.u8("protocol level")?;
    let protocol = match (name.as_str(), level) {
        ("MQTT", 4) => Protocol::V3_1_1,
        ("MQTT", 5) => Protocol::V5,
        ("MQIsdp", 3) => Protocol::V3_1,
        ("MQTT", l) | ("MQIsdp", l) => return Err(DecodeError::UnsupportedProtocolLevel(l)),
        (other, _) => return Err(DecodeError::InvalidProtocolName(other.to_string())),
    };
    let flags = r.u8("connect flags")?;
    if flags & 1 != 0 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_u8((flags >> 3) & 3)?;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::InvalidWillFlags);
    }
    if password_flag && !username_flag && protocol != Protocol::V5 {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if protocol.is_v5() {
        Properties::decode(r, Context::Packet(1))?
    } else {
        Properties::default()
    };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if protocol.is_v5() {
            Properties::decode(r, Context::Will)?
        } else {
            Properties::default()
        };
        let topic = r.string("will topic")?;
        let payload = r.binary("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary("password")?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_publish(first: u8, r: &mut Reader, v5: bool) -> Result<Publish, DecodeError> {
    let dup = first & 0x08 != 0;
    let qos = QoS::from_u8((first >> 1) & 3)?;
    let retain = first & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupOnQoS0);
    }
    let topic = r.string("topic name")?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r)?
    };
    let properties = if v5 {
        Properties::decode(r, Context::Packet(3))?
    } else {
        Properties::default()
    };
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
        properties,
    })
}

fn decode_ack(r: &mut Reader, v5: bool, ptype: u8) -> Result<PubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut ack = PubAck::new(packet_id);
    if v5 && !r.is_empty() {
        ack.code = ReasonCode(r.u8("reason code")?);
        if !r.is_empty() {
            ack.properties = Properties::decode(r, Context::Packet(ptype))?;
        }
    }
    Ok(ack)
}

// ---------------------------------------------------------------------------------------------
// Encoding

impl Packet {
    /// Size of the remaining-length part (everything after the fixed header).
    fn body_len(&self, protocol: Protocol) -> usize {
        let v5 = protocol.is_v5();
        let props = |p: &Properties| if v5 { p.encoded_len() } else { 0 };
        match self {
            Packet::Connect(c) => {
                let name_len = if c.protocol == Protocol::V3_1 { 8 } else { 6 };
                let cv5 = c.protocol.is_v5();
                let mut n = name_len + 1 + 1 + 2 + field_len(c.client_id.as_bytes());
                if cv5 {
                    n += c.properties.encoded_len();
                }
                if let Some(w) = &c.will {
                    if cv5 {
                        n += w.properties.encoded_len();
                    }
                    n += field_len(w.topic.as_bytes()) + field_len(&w.payload);
                }
                n += c.username.as_ref().map_or(0, |u| field_len(u.as_bytes()));
                n += c.password.as_ref().map_or(0, |p| field_len(p));
                n
            }
            Packet::ConnAck(a) => 2 + props(&a.properties),
            Packet::Publish(p) => {
                field_len(p.topic.as_bytes())
                    + if p.qos == QoS::AtMostOnce { 0 } else { 2 }
                    + props(&p.properties)
                    + p.payload.len()
            }
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                if !v5 || (a.code == ReasonCode::SUCCESS && a.properties.is_empty()) {
                    2
                } else if a.properties.is_empty() {
                    3
                } else {
                    3 + a.properties.encoded_len()
                }
            }
            Packet::Subscribe(s) => {
                2 + props(&s.properties)
                    + s.filters
                        .iter()
                        .map(|(f, _)| field_len(f.as_bytes()) + 1)
                        .sum::<usize>()
            }
            Packet::SubAck(s) => 2 + props(&s.properties) + s.codes.len(),
            Packet::Unsubscribe(u) => {
                2 + props(&u.properties)
                    + u.filters
                        .iter()
                        .map(|f| field_len(f.as_bytes()))
                        .sum::<usize>()
            }
            Packet::UnsubAck(u) => {
                if v5 {
                    2 + u.properties.encoded_len() + u.codes.len()
                } else {
                    2
                }
            }
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(d) => {
                if !v5 || (d.code == ReasonCode::SUCCESS && d.properties.is_empty()) {
                    0
                } else if d.properties.is_empty() {
                    1
                } else {
                    1 + d.properties.encoded_len()
                }
            }
            Packet::Auth(a) => {
                if a.code == ReasonCode::SUCCESS && a.properties.is_empty() {
                    0
                } else {
                    1 + a.properties.encoded_len()
                }
            }
        }
    }

    /// The full encoded size in bytes (fixed header included) for `protocol`.
    pub fn encoded_len(&self, protocol: Protocol) -> usize {
        let body = self.body_len(protocol);
        1 + varint_len(body as u32) + body
    }

    /// Appends the encoded packet to `buf`. For a CONNECT, its own protocol is used. On error
    /// nothing is appended (`buf` is left as it was).
    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_parts(protocol, buf, true)
    }

    /// Like [`Packet::encode`], but a PUBLISH's payload is left out: what is appended is the
    /// packet up to its payload (the length in the fixed header counts the payload), so
    /// writing it followed by `payload` is the whole packet without copying the payload.
    /// Other packets are encoded whole.
    pub fn encode_head(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_parts(protocol, buf, false)
    }

    fn encode_parts(
        &self,
        protocol: Protocol,
        buf: &mut BytesMut,
        payload: bool,
    ) -> Result<(), EncodeError> {
        let start = buf.len();
        let result = self.encode_unchecked(protocol, buf, payload);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    fn encode_unchecked(
        &self,
        protocol: Protocol,
        buf: &mut BytesMut,
        with_payload: bool,
    ) -> Result<(), EncodeError> {
        let protocol = match self {
            Packet::Connect(c) => c.protocol,
            _ => protocol,
        };
        let v5 = protocol.is_v5();
        match self {
            Packet::Auth(_) if !v5 => return Err(EncodeError::NotInProtocol("AUTH")),
            // MQTT 3.1.1 §3.1.2.9 (and 3.1): no password without a user name.
            Packet::Connect(c) if !v5 && c.password.is_some() && c.username.is_none() => {
                return Err(EncodeError::NotInProtocol("password without user name"))
            }
            _ => {}
        }
        let body = self.body_len(protocol);
        if body > MAX_VARINT as usize {
            return Err(EncodeError::TooLarge(body));
        }
        let payload = match self {
            Packet::Publish(p) if !with_payload => p.payload.len(),
            _ => 0,
        };
        buf.reserve(1 + varint_len(body as u32) + body - payload);
        let first: u8 = match self {
            Packet::Publish(p) => {
                0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
            }
            Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => {
                ((self.packet_type() as u8) << 4) | 0b0010
            }
            _ => (self.packet_type() as u8) << 4,
        };
        buf.put_u8(first);
        put_varint(buf, body as u32);
        match self {
            Packet::Connect(c) => {
                let (name, level) = match c.protocol {
                    Protocol::V3_1 => ("MQIsdp", 3),
                    Protocol::V3_1_1 => ("MQTT", 4),
                    Protocol::V5 => ("MQTT", 5),
                };
                put_binary(buf, name.as_bytes(), "protocol name")?;
                buf.put_u8(level);
                let mut flags = 0u8;
                if c.clean_start {
                    flags |= 0x02;
                }
                if let Some(w) = &c.will {
                    flags |= 0x04 | ((w.qos as u8) << 3);
                    if w.retain {
                        flags |= 0x20;
                    }
                }
                if c.password.is_some() {
                    flags |= 0x40;
                }
                if c.username.is_some() {
                    flags |= 0x80;
                }
                buf.put_u8(flags);
                buf.put_u16(c.keep_alive);
                if v5 {
                    c.properties.encode(buf)?;
                }
                put_binary(buf, c.client_id.as_bytes(), "client identifier")?;
                if let Some(w) = &c.will {
                    if v5 {
                        w.properties.encode(buf)?;
                    }
                    put_binary(buf, w.topic.as_bytes(), "will topic")?;
                    put_binary(buf, &w.payload, "will payload")?;
                }
                if let Some(u) = &c.username {
                    put_binary(buf, u.as_bytes(), "user name")?;
                }
                if let Some(p) = &c.password {
                    put_binary(buf, p, "password")?;
                }
            }
            Packet::ConnAck(a) => {
                buf.put_u8(u8::from(a.session_present));
                if v5 {
                    buf.put_u8(a.code.0);
                    a.properties.encode(buf)?;
                } else {
                    buf.put_u8(a.code.to_v3_connack());
                }
            }
            Packet::Publish(p) => {
                put_binary(buf, p.topic.as_bytes(), "topic name")?;
                if p.qos != QoS::AtMostOnce {
                    buf.put_u16(p.packet_id);
                }
                if v5 {
                    p.properties.encode(buf)?;
                }
                if with_payload {
                    buf.put_slice(&p.payload);
                }
            }
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                buf.put_u16(a.packet_id);
                if body >= 3 {
                    buf.put_u8(a.code.0);
                }
                if body > 3 {
                    a.properties.encode(buf)?;
                }
            }
            Packet::Subscribe(s) => {
                buf.put_u16(s.packet_id);
                if v5 {
                    s.properties.encode(buf)?;
                }
                for (f, o) in &s.filters {
                    put_binary(buf, f.as_bytes(), "topic filter")?;
                    // MQTT 3 has only the QoS; its other option bits are reserved.
                    buf.put_u8(if v5 { o.to_byte() } else { o.qos as u8 });
                }
            }
            Packet::SubAck(s) => {
                buf.put_u16(s.packet_id);
                if v5 {
                    s.properties.encode(buf)?;
                    buf.extend(s.codes.iter().map(|c| c.0));
                } else {
                    buf.extend(s.codes.iter().map(|c| c.to_v3_suback()));
                }
            }
            Packet::Unsubscribe(u) => {
                buf.put_u16(u.packet_id);
                if v5 {
                    u.properties.encode(buf)?;
                }
                for f in &u.filters {
                    put_binary(buf, f.as_bytes(), "topic filter")?;
                }
            }
            Packet::UnsubAck(u) => {
                buf.put_u16(u.packet_id);
                if v5 {
                    u.properties.encode(buf)?;
                    buf.extend(u.codes.iter().map(|c| c.0));
                }
            }
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(Disconnect { code, properties })
            | Packet::Auth(Auth { code, properties }) => {
                if body >= 1 {
                    buf.put_u8(code.0);
                }
                if body > 1 {
                    properties.encode(buf)?;
                }
            }
        }
        Ok(())
    }
}
