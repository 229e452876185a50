//! MQTT 5 properties (§2.2.2): one struct for all packets, plus the table of which property may
//! appear where. A property outside its packets is a Malformed Packet; a repeated one (other than
//! User Property, and Subscription Identifier in PUBLISH) is a Protocol Error.

use crate::io::{field_len, put_binary, put_varint, varint_len, Reader};
use crate::{ByteStr, DecodeError, EncodeError, MAX_VARINT};
use bytes::{BufMut, Bytes, BytesMut};

/// Where a property set is being read: a packet type (1–15), or the will properties of CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    Will,
    Packet(u8),
}

impl Context {
    fn bit(self) -> u16 {
        match self {
            Context::Will => 1,
            Context::Packet(t) => 1 << t,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Context::Will => "will properties",
            Context::Packet(t) => crate::packet::PacketType::name_of(t),
        }
    }
}

const WILL: u16 = 1;
const CONNECT: u16 = 1 << 1;
const CONNACK: u16 = 1 << 2;
const PUBLISH: u16 = 1 << 3;
const PUBACK: u16 = 1 << 4;
const PUBREC: u16 = 1 << 5;
const PUBREL: u16 = 1 << 6;
const PUBCOMP: u16 = 1 << 7;
const SUBSCRIBE: u16 = 1 << 8;
const SUBACK: u16 = 1 << 9;
const UNSUBACK: u16 = 1 << 11;
const DISCONNECT: u16 = 1 << 14;
const AUTH: u16 = 1 << 15;
const ALL: u16 = 0xffff;
const ACKS: u16 = PUBACK | PUBREC | PUBREL | PUBCOMP;

/// The packets each property identifier may appear in.
fn allowed_in(id: u8) -> Option<u16> {
    Some(match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => PUBLISH | WILL,
        0x0B => PUBLISH | SUBSCRIBE,
        0x11 => CONNECT | CONNACK | DISCONNECT,
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => CONNACK,
        0x15 | 0x16 => CONNECT | CONNACK | AUTH,
        0x17 | 0x19 => CONNECT,
        0x18 => WILL,
        0x1C => CONNACK | DISCONNECT,
        0x1F => CONNACK | ACKS | SUBACK | UNSUBACK | DISCONNECT | AUTH,
        0x21 | 0x22 | 0x27 => CONNECT | CONNACK,
        0x23 => PUBLISH,
        0x26 => ALL,
        _ => return None,
    })
}

/// The MQTT 5 property values of one packet. Absent properties are `None` / empty; what each
/// means is in §3 of the specification under the packet that carries it. Packets hold them as
/// [`Properties`], which allocates only when there are any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Props {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteStr>,
    pub response_topic: Option<ByteStr>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<ByteStr>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<ByteStr>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<ByteStr>,
    pub server_reference: Option<ByteStr>,
    pub reason_string: Option<ByteStr>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(ByteStr, ByteStr)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

fn set_once<T>(slot: &mut Option<T>, value: T, id: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(value);
    Ok(())
}

fn flag(value: u8, id: u8) -> Result<u8, DecodeError> {
    if value > 1 {
        return Err(DecodeError::InvalidPropertyValue(id));
    }
    Ok(value)
}

/// No properties (what an empty [`Properties`] dereferences to).
static NONE: Props = Props {
    payload_format_indicator: None,
    message_expiry_interval: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    subscription_identifiers: Vec::new(),
    session_expiry_interval: None,
    assigned_client_identifier: None,
    server_keep_alive: None,
    authentication_method: None,
    authentication_data: None,
    request_problem_information: None,
    will_delay_interval: None,
    request_response_information: None,
    response_information: None,
    server_reference: None,
    reason_string: None,
    receive_maximum: None,
    topic_alias_maximum: None,
    topic_alias: None,
    maximum_qos: None,
    retain_available: None,
    user_properties: Vec::new(),
    maximum_packet_size: None,
    wildcard_subscription_available: None,
    subscription_identifier_available: None,
    shared_subscription_available: None,
};

/// The properties of a packet: one pointer, and a heap allocation only when there are any
/// (MQTT 3 packets and most MQTT 5 ones have none). Reading goes through `Deref` to [`Props`];
/// writing through [`Properties::make_mut`] (allocates) or [`Properties::get_mut`] (only if
/// present). Keeping packets small matters: every packet moves through channels and queues by
/// value, and an inline property set made each PUBLISH and PUBACK ~400 bytes.
#[derive(Clone, Default)]
pub struct Properties(Option<Box<Props>>);

impl std::ops::Deref for Properties {
    type Target = Props;
    fn deref(&self) -> &Props {
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl From<Props> for Properties {
    fn from(p: Props) -> Properties {
        if p.is_empty() {
            Properties(None)
        } else {
            Properties(Some(Box::new(p)))
        }
    }
}

impl PartialEq for Properties {
    fn eq(&self, other: &Properties) -> bool {
        **self == **other
    }
}

impl Eq for Properties {}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Properties {
    /// Whether no property is present.
    pub fn is_empty(&self) -> bool {
        self.0.as_deref().is_none_or(Props::is_empty)
    }

    /// The values, to change them (allocates the set if there was none).
    pub fn make_mut(&mut self) -> &mut Props {
        self.0.get_or_insert_with(Default::default)
    }

    /// The values, to change them, if there are any (never allocates).
    pub fn get_mut(&mut self) -> Option<&mut Props> {
        self.0.as_deref_mut()
    }

    /// The values, owned.
    pub fn into_props(self) -> Props {
        self.0.map(|b| *b).unwrap_or_default()
    }

    pub(crate) fn decode(r: &mut Reader, ctx: Context) -> Result<Properties, DecodeError> {
        Props::decode(r, ctx).map(Properties::from)
    }
}

impl Props {
    pub fn is_empty(&self) -> bool {
        *self == NONE
    }

    /// Reads a property length and the properties that follow it.
    pub(crate) fn decode(r: &mut Reader, ctx: Context) -> Result<Props, DecodeError> {
        let len = r.varint("property length")? as usize;
        let mut r = Reader::new(r.take(len, "properties")?);
        let mut p = Props::default();
        while !r.is_empty() {
            // Identifiers are variable byte integers, but every defined one fits in one byte.
            let id32 = r.varint("property identifier")?;
            let id = u8::try_from(id32).map_err(|_| DecodeError::UnknownProperty(0xff))?;
            let allowed = allowed_in(id).ok_or(DecodeError::UnknownProperty(id))?;
            if allowed & ctx.bit() == 0 {
                return Err(DecodeError::PropertyNotAllowed {
                    property: id,
                    packet: ctx.name(),
                });
            }
            match id {
                0x01 => set_once(
                    &mut p.payload_format_indicator,
                    flag(r.u8("property")?, id)?,
                    id,
                )?,
                0x02 => set_once(&mut p.message_expiry_interval, r.u32("property")?, id)?,
                0x03 => set_once(&mut p.content_type, r.string("property")?, id)?,
                0x08 => set_once(&mut p.response_topic, r.string("property")?, id)?,
                0x09 => set_once(&mut p.correlation_data, r.binary("property")?, id)?,
                0x0B => {
                    let v = r.varint("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    if ctx == Context::Packet(8) && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::DuplicateProperty(id));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => set_once(&mut p.session_expiry_interval, r.u32("property")?, id)?,
                0x12 => set_once(&mut p.assigned_client_identifier, r.string("property")?, id)?,
                0x13 => set_once(&mut p.server_keep_alive, r.u16("property")?, id)?,
                0x15 => set_once(&mut p.authentication_method, r.string("property")?, id)?,
                0x16 => set_once(&mut p.authentication_data, r.binary("property")?, id)?,
                0x17 => set_once(
                    &mut p.request_problem_information,
                    flag(r.u8("property")?, id)?,
                    id,
                )?,
                0x18 => set_once(&mut p.will_delay_interval, r.u32("property")?, id)?,
                0x19 => set_once(
                    &mut p.request_response_information,
                    flag(r.u8("property")?, id)?,
                    id,
                )?,
                0x1A => set_once(&mut p.response_information, r.string("property")?, id)?,
                0x1C => set_once(&mut p.server_reference, r.string("property")?, id)?,
                0x1F => set_once(&mut p.reason_string, r.string("property")?, id)?,
                0x21 => {
                    let v = r.u16("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    set_once(&mut p.receive_maximum, v, id)?
                }
                0x22 => set_once(&mut p.topic_alias_maximum, r.u16("property")?, id)?,
                0x23 => {
                    let v = r.u16("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    set_once(&mut p.topic_alias, v, id)?
                }
                0x24 => set_once(&mut p.maximum_qos, flag(r.u8("property")?, id)?, id)?,
                0x25 => set_once(&mut p.retain_available, flag(r.u8("property")?, id)?, id)?,
                0x26 => {
                    let k = r.string("property")?;
                    let v = r.string("property")?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    set_once(&mut p.maximum_packet_size, v, id)?
                }
                0x28 => set_once(
                    &mut p.wildcard_subscription_available,
                    flag(r.u8("property")?, id)?,
                    id,
                )?,
                0x29 => set_once(
                    &mut p.subscription_identifier_available,
                    flag(r.u8("property")?, id)?,
                    id,
                )?,
                0x2A => set_once(
                    &mut p.shared_subscription_available,
                    flag(r.u8("property")?, id)?,
                    id,
                )?,
                _ => return Err(DecodeError::UnknownProperty(id)),
            }
        }
        Ok(p)
    }

    /// Size of the encoded properties, without the property-length prefix.
    pub fn body_len(&self) -> usize {
        let byte = |o: &Option<u8>| if o.is_some() { 2 } else { 0 };
        let short = |o: &Option<u16>| if o.is_some() { 3 } else { 0 };
        let long = |o: &Option<u32>| if o.is_some() { 5 } else { 0 };
        let s = |o: &Option<ByteStr>| o.as_ref().map_or(0, |v| 1 + field_len(v.as_bytes()));
        let b = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 1 + field_len(v));
        byte(&self.payload_format_indicator)
            + long(&self.message_expiry_interval)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self
                .subscription_identifiers
                .iter()
                .map(|&v| 1 + varint_len(v))
                .sum::<usize>()
            + long(&self.session_expiry_interval)
            + s(&self.assigned_client_identifier)
            + short(&self.server_keep_alive)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + byte(&self.request_problem_information)
            + long(&self.will_delay_interval)
            + byte(&self.request_response_information)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + short(&self.receive_maximum)
            + short(&self.topic_alias_maximum)
            + short(&self.topic_alias)
            + byte(&self.maximum_qos)
            + byte(&self.retain_available)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 1 + field_len(k.as_bytes()) + field_len(v.as_bytes()))
                .sum::<usize>()
            + long(&self.maximum_packet_size)
            + byte(&self.wildcard_subscription_available)
            + byte(&self.subscription_identifier_available)
            + byte(&self.shared_subscription_available)
    }

    /// Size with the property-length prefix.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body as u32) + body
    }

    pub(crate) fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        put_varint(buf, self.body_len() as u32);
        let byte = |buf: &mut BytesMut, id: u8, o: Option<u8>| {
            if let Some(v) = o {
                buf.put_u8(id);
                buf.put_u8(v);
            }
        };
        byte(buf, 0x01, self.payload_format_indicator);
        if let Some(v) = self.message_expiry_interval {
            buf.put_u8(0x02);
            buf.put_u32(v);
        }
        put_str(buf, 0x03, &self.content_type)?;
        put_str(buf, 0x08, &self.response_topic)?;
        put_bin(buf, 0x09, &self.correlation_data)?;
        for &v in &self.subscription_identifiers {
            if v > MAX_VARINT {
                return Err(EncodeError::NotInProtocol(
                    "subscription identifier above 268,435,455",
                ));
            }
            buf.put_u8(0x0B);
            put_varint(buf, v);
        }
        put_u32(buf, 0x11, self.session_expiry_interval);
        put_str(buf, 0x12, &self.assigned_client_identifier)?;
        put_u16(buf, 0x13, self.server_keep_alive);
        put_str(buf, 0x15, &self.authentication_method)?;
        put_bin(buf, 0x16, &self.authentication_data)?;
        byte(buf, 0x17, self.request_problem_information);
        put_u32(buf, 0x18, self.will_delay_interval);
        byte(buf, 0x19, self.request_response_information);
        put_str(buf, 0x1A, &self.response_information)?;
        put_str(buf, 0x1C, &self.server_reference)?;
        put_str(buf, 0x1F, &self.reason_string)?;
        put_u16(buf, 0x21, self.receive_maximum);
        put_u16(buf, 0x22, self.topic_alias_maximum);
        put_u16(buf, 0x23, self.topic_alias);
        byte(buf, 0x24, self.maximum_qos);
        byte(buf, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            buf.put_u8(0x26);
            put_binary(buf, k.as_bytes(), "user property")?;
            put_binary(buf, v.as_bytes(), "user property")?;
        }
        put_u32(buf, 0x27, self.maximum_packet_size);
        byte(buf, 0x28, self.wildcard_subscription_available);
        byte(buf, 0x29, self.subscription_identifier_available);
        byte(buf, 0x2A, self.shared_subscription_available);
        Ok(())
    }
}

fn put_u16(buf: &mut BytesMut, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        buf.put_u8(id);
        buf.put_u16(v);
    }
}

fn put_u32(buf: &mut BytesMut, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        buf.put_u8(id);
        buf.put_u32(v);
    }
}

fn put_str(buf: &mut BytesMut, id: u8, v: &Option<ByteStr>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        buf.put_u8(id);
        put_binary(buf, v.as_bytes(), "string property")?;
    }
    Ok(())
}

fn put_bin(buf: &mut BytesMut, id: u8, v: &Option<Bytes>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        buf.put_u8(id);
        put_binary(buf, v, "binary property")?;
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    use crate::{Packet, PubAck, Publish};

    /// Packets move by value through channels and queues; an inline property set once made
    /// each of them ~400 bytes.
    #[test]
    fn packets_stay_small() {
        assert_eq!(std::mem::size_of::<super::Properties>(), 8);
        assert!(
            std::mem::size_of::<Publish>() <= 96,
            "{}",
            std::mem::size_of::<Publish>()
        );
        assert!(
            std::mem::size_of::<PubAck>() <= 24,
            "{}",
            std::mem::size_of::<PubAck>()
        );
        assert!(
            std::mem::size_of::<Packet>() <= 104,
            "{}",
            std::mem::size_of::<Packet>()
        );
    }
}
