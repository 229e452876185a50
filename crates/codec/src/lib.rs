//! Ferry's MQTT wire codec: every packet of MQTT 3.1 (protocol level 3), 3.1.1 (4) and 5.0 (5),
//! decoded from and encoded to `bytes` buffers.
//!
//! Where things are:
//! - [`packet`] holds the packet structs ([`Packet`], [`Publish`], [`Connect`], …), their
//!   decoders and encoders. [`decode`] takes one frame off the front of a read buffer; it looks at
//!   the fixed header first and refuses a frame above the maximum packet size before any of its
//!   body has been buffered.
//! - [`properties`] holds the MQTT 5 property set and the table of which property may appear in
//!   which packet.
//! - [`reason`] holds the MQTT 5 reason codes and their MQTT 3 equivalents.
//! - [`bytestr`] holds [`ByteStr`], a validated UTF-8 string that is a slice of the frame.
//! - [`error`] holds [`DecodeError`], which knows the reason code to answer malformed input with.
//! - [`ws`] holds WebSocket frame headers, for MQTT over WebSocket (server and client sides).
//!
//! Decoding is zero-copy: topic names, client ids, payloads and binary properties are
//! reference-counted slices of the received frame, so forwarding a message copies no payload.

pub mod bytestr;
pub mod error;
mod io;
pub mod packet;
pub mod properties;
pub mod reason;
pub mod ws;

pub use bytestr::ByteStr;
pub use error::{DecodeError, EncodeError};
pub use packet::{
    decode, peek_frame, Auth, ConnAck, Connect, Disconnect, Packet, PacketType, Protocol, PubAck,
    Publish, QoS, RetainHandling, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe, Will,
};
pub use properties::{Properties, Props};
pub use reason::ReasonCode;

/// The largest value a variable byte integer can hold (268,435,455): the protocol's upper bound
/// for a remaining length.
pub const MAX_VARINT: u32 = 268_435_455;
