//! Decode and encode errors.

use crate::reason::ReasonCode;
use thiserror::Error;

/// Why a frame could not be decoded. Each error knows the MQTT 5 reason code the server answers
/// with (in a DISCONNECT, or a CONNACK while the connection is being set up); after any of them
/// the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("remaining length is not a valid variable byte integer (more than 4 bytes)")]
    MalformedLength,
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: usize, max: u32 },
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    #[error("invalid fixed-header flags {flags:#06b} for {packet}")]
    InvalidFlags { packet: &'static str, flags: u8 },
    #[error("packet ends before {0} is complete")]
    Truncated(&'static str),
    #[error("{0} unexpected bytes after the end of the packet")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("unsupported protocol name {0:?}")]
    InvalidProtocolName(String),
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("CONNECT reserved flag is set")]
    ConnectReservedFlag,
    #[error("will QoS or will retain set without the will flag")]
    InvalidWillFlags,
    #[error("password flag set without username flag (MQTT 3.1.1)")]
    PasswordWithoutUsername,
    #[error("invalid QoS 3")]
    InvalidQoS,
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DupOnQoS0,
    #[error("packet identifier 0")]
    ZeroPacketId,
    #[error("{0} without any topic filter")]
    NoTopicFilters(&'static str),
    #[error("reserved bits set in subscription options")]
    InvalidSubscriptionOptions,
    #[error("retain handling 3 is not a valid value")]
    InvalidRetainHandling,
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u8),
    #[error("property {property:#04x} is not allowed in {packet}")]
    PropertyNotAllowed { property: u8, packet: &'static str },
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    #[error("property {0:#04x} has an invalid value")]
    InvalidPropertyValue(u8),
    #[error("invalid reason code {code:#04x} in {packet}")]
    InvalidReasonCode { packet: &'static str, code: u8 },
}

impl DecodeError {
    /// The MQTT 5 reason code to close the connection with.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            InvalidProtocolName(_) | UnsupportedProtocolLevel(_) => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | ZeroPacketId
            | NoTopicFilters(_)
            | InvalidRetainHandling => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("packet of {0} bytes is larger than the protocol allows")]
    TooLarge(usize),
    #[error("{0} is longer than 65,535 bytes")]
    FieldTooLong(&'static str),
    #[error("{0} cannot be expressed in this protocol version")]
    NotInProtocol(&'static str),
}
