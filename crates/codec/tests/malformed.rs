//! Malformed input: one hand-written frame per way a frame can be wrong, each checked for the
//! exact `DecodeError` and the reason code the server closes the connection with; and a check
//! that no input at all makes the decoder panic.

use bytes::BytesMut;
use ferry_codec::{decode, peek_frame, DecodeError, Packet, Protocol, ReasonCode};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use DecodeError::*;
use Protocol::{V3_1, V3_1_1, V5};

const MALFORMED: ReasonCode = ReasonCode::MALFORMED_PACKET;
const PROTOCOL_ERROR: ReasonCode = ReasonCode::PROTOCOL_ERROR;
const MAX: u32 = 1 << 20;

/// Wraps `body` in a fixed header with first byte `first`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "tests use one-byte remaining lengths");
    let mut f = vec![first, body.len() as u8];
    f.extend_from_slice(body);
    f
}

/// A length-prefixed string or binary field.
fn s(data: &[u8]) -> Vec<u8> {
    let mut f = (data.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(data);
    f
}

/// A property block: its length, then `props`.
fn props(p: &[u8]) -> Vec<u8> {
    assert!(p.len() < 128);
    let mut f = vec![p.len() as u8];
    f.extend_from_slice(p);
    f
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decodes `bytes` with `protocol` and returns the error, failing the test on success.
fn error(bytes: &[u8], protocol: Protocol) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, protocol, MAX) {
        Err(e) => e,
        Ok(p) => panic!("{bytes:02x?} decoded as {p:?} for {protocol:?}"),
    }
}

/// Asserts that `bytes` fails with exactly `expected`, answered with `code`, for each protocol.
#[track_caller]
fn assert_error(bytes: &[u8], protocols: &[Protocol], expected: DecodeError, code: ReasonCode) {
    for &protocol in protocols {
        let e = error(bytes, protocol);
        assert_eq!(e, expected, "{bytes:02x?} with {protocol:?}");
        assert_eq!(e.reason_code(), code, "reason code of {e:?}");
    }
}

const ALL: &[Protocol] = &[V3_1, V3_1_1, V5];
const V3: &[Protocol] = &[V3_1, V3_1_1];
const ONLY_V5: &[Protocol] = &[V5];

/// The start of a valid CONNECT body: protocol name and level, then `flags` and keep alive 60.
fn connect_header(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
    cat(&[&s(name), &[level, flags, 0x00, 0x3c]])
}

fn connect_v4(flags: u8, rest: &[u8]) -> Vec<u8> {
    frame(0x10, &cat(&[&connect_header(b"MQTT", 4, flags), rest]))
}

fn connect_v5(flags: u8, properties: &[u8], rest: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[&connect_header(b"MQTT", 5, flags), &props(properties), rest]),
    )
}

/// A v5 QoS 0 PUBLISH to "t" with `properties`.
fn publish_v5(properties: &[u8]) -> Vec<u8> {
    frame(0x30, &cat(&[&s(b"t"), &props(properties)]))
}

// ---------------------------------------------------------------------------------------------
// Fixed header

#[test]
fn remaining_length_of_five_bytes() {
    assert_error(
        &[0x30, 0x80, 0x80, 0x80, 0x80],
        ALL,
        MalformedLength,
        MALFORMED,
    );
    assert_error(
        &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ALL,
        MalformedLength,
        MALFORMED,
    );
    assert_eq!(
        peek_frame(&[0x30, 0x80, 0x80, 0x80, 0x80], MAX),
        Err(MalformedLength)
    );
    // Four bytes is the most there can be, and three continuation bytes still need a fourth.
    assert_eq!(peek_frame(&[0x30, 0x80, 0x80, 0x80], MAX), Ok(None));
    assert_eq!(
        peek_frame(&[0x30, 0xff, 0xff, 0xff, 0x7f], u32::MAX),
        Ok(Some(5 + 268_435_455))
    );
}

#[test]
fn frame_above_the_maximum_packet_size_is_refused_from_its_fixed_header() {
    // A PUBLISH announcing 1,000 bytes of body; only its fixed header has arrived.
    for protocol in ALL {
        let mut buf = BytesMut::from(&[0x30, 0xe8, 0x07][..]);
        let e = decode(&mut buf, *protocol, 100).unwrap_err();
        assert_eq!(
            e,
            PacketTooLarge {
                size: 1003,
                max: 100
            }
        );
        assert_eq!(e.reason_code(), ReasonCode::PACKET_TOO_LARGE);
        assert_eq!(e.reason_code().0, 0x95);
        assert_eq!(buf.len(), 3, "nothing is consumed");
    }
    // The largest remaining length, against the default limit of a broker.
    assert_error(
        &[0x30, 0xff, 0xff, 0xff, 0x7f],
        ALL,
        PacketTooLarge {
            size: 268_435_460,
            max: MAX,
        },
        ReasonCode::PACKET_TOO_LARGE,
    );
    // The size includes the fixed header: a 2-byte PINGREQ is too large for a limit of 1.
    let mut buf = BytesMut::from(&[0xc0][..]);
    assert_eq!(decode(&mut buf, V5, 1), Ok(None));
    buf.extend_from_slice(&[0x00]);
    assert_eq!(
        decode(&mut buf, V5, 1),
        Err(PacketTooLarge { size: 2, max: 1 })
    );
    assert_eq!(decode(&mut buf, V5, 2), Ok(Some(Packet::PingReq)));
}

#[test]
fn reserved_packet_types() {
    assert_error(&[0x00, 0x00], ALL, InvalidPacketType(0), MALFORMED);
    // AUTH exists only in MQTT 5.
    assert_error(&[0xf0, 0x00], V3, InvalidPacketType(15), MALFORMED);
}

#[test]
fn bad_fixed_header_flags() {
    let cases: &[(u8, &[u8], &str, u8)] = &[
        (0x60, &[0x00, 0x01], "PUBREL", 0b0000),
        (0x63, &[0x00, 0x01], "PUBREL", 0b0011),
        (
            0x80,
            &cat(&[&[0x00, 0x01], &s(b"a"), &[0x00]]),
            "SUBSCRIBE",
            0,
        ),
        (
            0x8a,
            &cat(&[&[0x00, 0x01], &s(b"a"), &[0x00]]),
            "SUBSCRIBE",
            0b1010,
        ),
        (0xa0, &cat(&[&[0x00, 0x01], &s(b"a")]), "UNSUBSCRIBE", 0),
        (
            0xa3,
            &cat(&[&[0x00, 0x01], &s(b"a")]),
            "UNSUBSCRIBE",
            0b0011,
        ),
        (0xc1, &[], "PINGREQ", 0b0001),
        (0xc2, &[], "PINGREQ", 0b0010),
        (0xd8, &[], "PINGRESP", 0b1000),
        (0x42, &[0x00, 0x01], "PUBACK", 0b0010),
        (0x51, &[0x00, 0x01], "PUBREC", 0b0001),
        (0x72, &[0x00, 0x01], "PUBCOMP", 0b0010),
        (0x92, &[0x00, 0x01, 0x00], "SUBACK", 0b0010),
        (0xb2, &[0x00, 0x01], "UNSUBACK", 0b0010),
        (0x21, &[0x00, 0x00], "CONNACK", 0b0001),
        (0xe2, &[], "DISCONNECT", 0b0010),
    ];
    for &(first, body, packet, flags) in cases {
        // The flags are checked before the body, so the 3.x bodies serve for MQTT 5 as well.
        assert_error(
            &frame(first, body),
            ALL,
            InvalidFlags { packet, flags },
            MALFORMED,
        );
    }
    let connect = connect_v4(0x02, &s(b"c"));
    let mut bad = connect.clone();
    bad[0] = 0x11;
    assert_error(
        &bad,
        ALL,
        InvalidFlags {
            packet: "CONNECT",
            flags: 1,
        },
        MALFORMED,
    );
    assert_error(
        &[0xf1, 0x00],
        ONLY_V5,
        InvalidFlags {
            packet: "AUTH",
            flags: 1,
        },
        MALFORMED,
    );
    // CONNACK's acknowledge flags: only bit 0 (session present) is defined.
    assert_error(
        &frame(0x20, &[0x02, 0x00]),
        V3,
        InvalidFlags {
            packet: "CONNACK",
            flags: 0x02,
        },
        MALFORMED,
    );
}

// ---------------------------------------------------------------------------------------------
// PUBLISH

#[test]
fn publish_qos_3() {
    for first in [0x36, 0x37, 0x3e] {
        assert_error(
            &frame(first, &cat(&[&s(b"t"), &[0x00, 0x01]])),
            ALL,
            InvalidQoS,
            MALFORMED,
        );
    }
}

#[test]
fn dup_on_qos_0() {
    assert_error(&frame(0x38, &s(b"t")), ALL, DupOnQoS0, MALFORMED);
    assert_error(&frame(0x39, &s(b"t")), ALL, DupOnQoS0, MALFORMED);
}

#[test]
fn zero_packet_identifier() {
    // PUBLISH QoS 1 and 2.
    assert_error(
        &frame(0x32, &cat(&[&s(b"t"), &[0x00, 0x00]])),
        V3,
        ZeroPacketId,
        PROTOCOL_ERROR,
    );
    assert_error(
        &frame(0x34, &cat(&[&s(b"t"), &[0x00, 0x00], &props(&[])])),
        ONLY_V5,
        ZeroPacketId,
        PROTOCOL_ERROR,
    );
    // The acknowledgements.
    for first in [0x40, 0x50, 0x62, 0x70, 0xb0] {
        assert_error(
            &frame(first, &[0x00, 0x00]),
            ALL,
            ZeroPacketId,
            PROTOCOL_ERROR,
        );
    }
    assert_error(
        &frame(0x90, &[0x00, 0x00, 0x00]),
        V3,
        ZeroPacketId,
        PROTOCOL_ERROR,
    );
    assert_error(
        &frame(0x82, &cat(&[&[0x00, 0x00], &s(b"a"), &[0x00]])),
        V3,
        ZeroPacketId,
        PROTOCOL_ERROR,
    );
    assert_error(
        &frame(0xa2, &cat(&[&[0x00, 0x00], &s(b"a")])),
        V3,
        ZeroPacketId,
        PROTOCOL_ERROR,
    );
}

#[test]
fn invalid_utf8_in_topic() {
    for bad in [
        &[0xc3, 0x28][..],         // a lead byte followed by ASCII
        &[0xc0, 0x80],             // overlong encoding of U+0000
        &[0xed, 0xa0, 0x80],       // a UTF-16 surrogate (U+D800)
        &[0xf4, 0x90, 0x80, 0x80], // above U+10FFFF
        &[b'a', 0xff],
        &[0xe2, 0x82], // truncated sequence
    ] {
        assert_error(&frame(0x30, &s(bad)), V3, InvalidUtf8, MALFORMED);
        assert_error(
            &frame(0x30, &cat(&[&s(bad), &props(&[])])),
            ONLY_V5,
            InvalidUtf8,
            MALFORMED,
        );
    }
}

#[test]
fn null_character_in_strings() {
    assert_error(&frame(0x30, &s(b"a\0b")), V3, NullCharacter, MALFORMED);
    assert_error(
        &frame(0x30, &cat(&[&s(b"\0"), &props(&[])])),
        ONLY_V5,
        NullCharacter,
        MALFORMED,
    );
    // In a topic filter, a client identifier and a string property too.
    assert_error(
        &frame(0x82, &cat(&[&[0x00, 0x01], &s(b"a/\0"), &[0x00]])),
        V3,
        NullCharacter,
        MALFORMED,
    );
    assert_error(&connect_v4(0x02, &s(b"c\0")), ALL, NullCharacter, MALFORMED);
    assert_error(
        &publish_v5(&cat(&[&[0x03], &s(b"text/\0")])),
        ONLY_V5,
        NullCharacter,
        MALFORMED,
    );
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE, SUBACK, UNSUBSCRIBE

#[test]
fn subscribe_without_filters() {
    assert_error(
        &frame(0x82, &[0x00, 0x01]),
        V3,
        NoTopicFilters("SUBSCRIBE"),
        PROTOCOL_ERROR,
    );
    assert_error(
        &frame(0x82, &[0x00, 0x01, 0x00]),
        ONLY_V5,
        NoTopicFilters("SUBSCRIBE"),
        PROTOCOL_ERROR,
    );
    assert_error(
        &frame(0xa2, &[0x00, 0x01]),
        V3,
        NoTopicFilters("UNSUBSCRIBE"),
        PROTOCOL_ERROR,
    );
    assert_error(
        &frame(0xa2, &[0x00, 0x01, 0x00]),
        ONLY_V5,
        NoTopicFilters("UNSUBSCRIBE"),
        PROTOCOL_ERROR,
    );
}

fn subscribe_v5(options: u8) -> Vec<u8> {
    frame(
        0x82,
        &cat(&[&[0x00, 0x01], &props(&[]), &s(b"a/#"), &[options]]),
    )
}

fn subscribe_v3(options: u8) -> Vec<u8> {
    frame(0x82, &cat(&[&[0x00, 0x01], &s(b"a/#"), &[options]]))
}

#[test]
fn retain_handling_3() {
    assert_error(
        &subscribe_v5(0x30),
        ONLY_V5,
        InvalidRetainHandling,
        PROTOCOL_ERROR,
    );
    assert_error(
        &subscribe_v5(0x3e),
        ONLY_V5,
        InvalidRetainHandling,
        PROTOCOL_ERROR,
    );
}

#[test]
fn reserved_subscription_option_bits() {
    for options in [0x40, 0x80, 0xc1] {
        assert_error(
            &subscribe_v5(options),
            ONLY_V5,
            InvalidSubscriptionOptions,
            MALFORMED,
        );
    }
    // In 3.x everything above the QoS is reserved.
    for options in [0x04, 0x08, 0x10, 0x20, 0x80] {
        assert_error(
            &subscribe_v3(options),
            V3,
            InvalidSubscriptionOptions,
            MALFORMED,
        );
    }
}

#[test]
fn subscription_qos_3() {
    assert_error(&subscribe_v5(0x03), ONLY_V5, InvalidQoS, MALFORMED);
    assert_error(&subscribe_v3(0x03), V3, InvalidQoS, MALFORMED);
}

#[test]
fn invalid_v3_return_codes() {
    // CONNACK return codes above 5.
    for code in [6, 0x80, 0xff] {
        assert_error(
            &frame(0x20, &[0x00, code]),
            V3,
            InvalidReasonCode {
                packet: "CONNACK",
                code,
            },
            MALFORMED,
        );
    }
    // SUBACK return codes other than 0, 1, 2 and 0x80.
    for code in [0x03, 0x10, 0x81, 0xff] {
        assert_error(
            &frame(0x90, &[0x00, 0x01, 0x00, code]),
            V3,
            InvalidReasonCode {
                packet: "SUBACK",
                code,
            },
            MALFORMED,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

#[test]
fn unknown_property() {
    for id in [0x00, 0x04, 0x0a, 0x2b, 0x7f] {
        assert_error(
            &publish_v5(&[id, 0x00]),
            ONLY_V5,
            UnknownProperty(id),
            MALFORMED,
        );
    }
    // An identifier that needs two bytes.
    assert_error(
        &publish_v5(&[0x80, 0x01, 0x00]),
        ONLY_V5,
        UnknownProperty(0x80),
        MALFORMED,
    );
    assert_error(
        &publish_v5(&[0x80, 0x02, 0x00]),
        ONLY_V5,
        UnknownProperty(0xff),
        MALFORMED,
    );
}

#[test]
fn property_not_allowed_in_packet() {
    // Topic alias in CONNECT.
    assert_error(
        &connect_v5(0x02, &[0x23, 0x00, 0x01], &s(b"c")),
        ONLY_V5,
        PropertyNotAllowed {
            property: 0x23,
            packet: "CONNECT",
        },
        MALFORMED,
    );
    // Session expiry interval in PUBLISH.
    assert_error(
        &publish_v5(&[0x11, 0x00, 0x00, 0x00, 0x01]),
        ONLY_V5,
        PropertyNotAllowed {
            property: 0x11,
            packet: "PUBLISH",
        },
        MALFORMED,
    );
    // Will delay interval in CONNECT's own properties, session expiry in the will's.
    assert_error(
        &connect_v5(0x02, &[0x18, 0x00, 0x00, 0x00, 0x01], &s(b"c")),
        ONLY_V5,
        PropertyNotAllowed {
            property: 0x18,
            packet: "CONNECT",
        },
        MALFORMED,
    );
    assert_error(
        &connect_v5(
            0x06,
            &[],
            &cat(&[
                &s(b"c"),
                &props(&[0x11, 0x00, 0x00, 0x00, 0x01]),
                &s(b"w"),
                &s(b""),
            ]),
        ),
        ONLY_V5,
        PropertyNotAllowed {
            property: 0x11,
            packet: "will properties",
        },
        MALFORMED,
    );
    // Reason string in UNSUBSCRIBE, subscription identifier in UNSUBSCRIBE.
    for p in [&cat(&[&[0x1f], &s(b"r")])[..], &[0x0b, 0x01]] {
        assert_error(
            &frame(0xa2, &cat(&[&[0x00, 0x01], &props(p), &s(b"a")])),
            ONLY_V5,
            PropertyNotAllowed {
                property: p[0],
                packet: "UNSUBSCRIBE",
            },
            MALFORMED,
        );
    }
    // Maximum QoS in a PUBACK.
    assert_error(
        &frame(0x40, &cat(&[&[0x00, 0x01, 0x00], &props(&[0x24, 0x01])])),
        ONLY_V5,
        PropertyNotAllowed {
            property: 0x24,
            packet: "PUBACK",
        },
        MALFORMED,
    );
}

#[test]
fn duplicate_property() {
    assert_error(
        &connect_v5(0x02, &[0x21, 0x00, 0x01, 0x21, 0x00, 0x02], &s(b"c")),
        ONLY_V5,
        DuplicateProperty(0x21),
        PROTOCOL_ERROR,
    );
    assert_error(
        &publish_v5(&cat(&[&[0x03], &s(b"a"), &[0x03], &s(b"a")])),
        ONLY_V5,
        DuplicateProperty(0x03),
        PROTOCOL_ERROR,
    );
    // Subscription identifier may repeat in PUBLISH but not in SUBSCRIBE.
    assert_error(
        &frame(
            0x82,
            &cat(&[
                &[0x00, 0x01],
                &props(&[0x0b, 0x01, 0x0b, 0x02]),
                &s(b"a"),
                &[0x00],
            ]),
        ),
        ONLY_V5,
        DuplicateProperty(0x0b),
        PROTOCOL_ERROR,
    );
    let mut ok = BytesMut::from(&publish_v5(&[0x0b, 0x01, 0x0b, 0x02])[..]);
    match decode(&mut ok, V5, MAX).unwrap().unwrap() {
        Packet::Publish(p) => assert_eq!(p.properties.subscription_identifiers, vec![1, 2]),
        other => panic!("{other:?}"),
    }
    // User properties may repeat anywhere.
    let user = cat(&[&[0x26], &s(b"k"), &s(b"v")]);
    let mut ok = BytesMut::from(&publish_v5(&cat(&[&user, &user]))[..]);
    assert!(decode(&mut ok, V5, MAX).is_ok());
}

#[test]
fn invalid_property_value() {
    let cases: &[(&[u8], u8)] = &[
        (&[0x21, 0x00, 0x00], 0x21),             // receive maximum 0
        (&[0x27, 0x00, 0x00, 0x00, 0x00], 0x27), // maximum packet size 0
        (&[0x17, 0x02], 0x17),                   // request problem information 2
        (&[0x19, 0xff], 0x19),                   // request response information 255
    ];
    for &(p, id) in cases {
        assert_error(
            &connect_v5(0x02, p, &s(b"c")),
            ONLY_V5,
            InvalidPropertyValue(id),
            PROTOCOL_ERROR,
        );
    }
    let cases: &[(&[u8], u8)] = &[
        (&[0x01, 0x02], 0x01),       // payload format indicator 2
        (&[0x23, 0x00, 0x00], 0x23), // topic alias 0
        (&[0x0b, 0x00], 0x0b),       // subscription identifier 0
    ];
    for &(p, id) in cases {
        assert_error(
            &publish_v5(p),
            ONLY_V5,
            InvalidPropertyValue(id),
            PROTOCOL_ERROR,
        );
    }
    for (id, value) in [(0x24, 2), (0x25, 2), (0x28, 3), (0x29, 2), (0x2a, 0x80)] {
        assert_error(
            &frame(0x20, &cat(&[&[0x00, 0x00], &props(&[id, value])])),
            ONLY_V5,
            InvalidPropertyValue(id),
            PROTOCOL_ERROR,
        );
    }
}

#[test]
fn properties_are_ignored_in_mqtt_3() {
    // A v5 PUBLISH read as 3.1.1: the property bytes are payload.
    let mut buf = BytesMut::from(&publish_v5(&[0x23, 0x00, 0x00])[..]);
    match decode(&mut buf, V3_1_1, MAX).unwrap().unwrap() {
        Packet::Publish(p) => {
            assert_eq!(&p.payload[..], &[0x03, 0x23, 0x00, 0x00]);
            assert!(p.properties.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// CONNECT

#[test]
fn connect_reserved_flag() {
    assert_error(
        &connect_v4(0x03, &s(b"c")),
        ALL,
        ConnectReservedFlag,
        MALFORMED,
    );
    assert_error(
        &connect_v5(0x01, &[], &s(b"c")),
        ALL,
        ConnectReservedFlag,
        MALFORMED,
    );
}

#[test]
fn will_flags_without_will() {
    for flags in [0x08, 0x10, 0x20, 0x28] {
        assert_error(
            &connect_v4(flags, &s(b"c")),
            ALL,
            InvalidWillFlags,
            MALFORMED,
        );
    }
    // Will QoS 3 with a will.
    assert_error(
        &connect_v4(0x1c, &cat(&[&s(b"c"), &s(b"w"), &s(b"m")])),
        ALL,
        InvalidQoS,
        MALFORMED,
    );
}

#[test]
fn password_without_username() {
    assert_error(
        &connect_v4(0x40, &cat(&[&s(b"c"), &s(b"pw")])),
        ALL,
        PasswordWithoutUsername,
        MALFORMED,
    );
    let v31 = frame(
        0x10,
        &cat(&[&connect_header(b"MQIsdp", 3, 0x40), &s(b"c"), &s(b"pw")]),
    );
    assert_error(&v31, ALL, PasswordWithoutUsername, MALFORMED);
    // MQTT 5 allows it.
    let mut buf = BytesMut::from(&connect_v5(0x40, &[], &cat(&[&s(b"c"), &s(b"pw")]))[..]);
    match decode(&mut buf, V3_1_1, MAX).unwrap().unwrap() {
        Packet::Connect(c) => {
            assert_eq!(c.protocol, V5);
            assert_eq!(c.username, None);
            assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_protocol_name() {
    for name in [&b"MQTX"[..], b"mqtt", b"", b"MQIsdpX"] {
        let bytes = frame(0x10, &cat(&[&connect_header(name, 4, 0x02), &s(b"c")]));
        assert_error(
            &bytes,
            ALL,
            InvalidProtocolName(String::from_utf8(name.to_vec()).unwrap()),
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        );
    }
}

#[test]
fn unsupported_protocol_level() {
    for (name, level) in [
        (&b"MQTT"[..], 6),
        (b"MQTT", 3),
        (b"MQTT", 0),
        (b"MQIsdp", 4),
    ] {
        let bytes = frame(0x10, &cat(&[&connect_header(name, level, 0x02), &s(b"c")]));
        let e = error(&bytes, V5);
        assert_eq!(e, UnsupportedProtocolLevel(level));
        assert_eq!(e.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
        assert_eq!(e.reason_code().0, 0x84);
    }
}

// ---------------------------------------------------------------------------------------------
// Length mismatches

#[test]
fn trailing_bytes() {
    assert_error(&[0xc0, 0x01, 0x00], ALL, TrailingBytes(1), MALFORMED);
    assert_error(&[0xd0, 0x02, 0x00, 0x00], ALL, TrailingBytes(2), MALFORMED);
    // 3.x acknowledgements and DISCONNECT have fixed sizes.
    assert_error(
        &[0x40, 0x03, 0x00, 0x01, 0x00],
        V3,
        TrailingBytes(1),
        MALFORMED,
    );
    assert_error(&[0xe0, 0x01, 0x00], V3, TrailingBytes(1), MALFORMED);
    assert_error(
        &[0xb0, 0x03, 0x00, 0x01, 0x00],
        V3,
        TrailingBytes(1),
        MALFORMED,
    );
    assert_error(
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        V3,
        TrailingBytes(1),
        MALFORMED,
    );
    // After the properties of a v5 PUBACK and DISCONNECT, or after a complete CONNECT.
    assert_error(
        &frame(0x40, &[0x00, 0x01, 0x10, 0x00, 0xaa]),
        ONLY_V5,
        TrailingBytes(1),
        MALFORMED,
    );
    assert_error(
        &frame(0xe0, &[0x00, 0x00, 0xaa, 0xbb]),
        ONLY_V5,
        TrailingBytes(2),
        MALFORMED,
    );
    assert_error(
        &frame(0xf0, &[0x18, 0x00, 0xaa]),
        ONLY_V5,
        TrailingBytes(1),
        MALFORMED,
    );
    assert_error(
        &connect_v4(0x02, &cat(&[&s(b"c"), &[0x00]])),
        ALL,
        TrailingBytes(1),
        MALFORMED,
    );
}

#[test]
fn truncated_fields() {
    let cases: &[(&[u8], &[Protocol], &str)] = &[
        (&[0x40, 0x01, 0x00], ALL, "packet identifier"),
        (&[0x40, 0x00], ALL, "packet identifier"),
        (&[0x20, 0x00], ALL, "CONNACK flags"),
        (&[0x20, 0x01, 0x00], ALL, "CONNACK code"),
        (&[0x20, 0x02, 0x00, 0x00], ONLY_V5, "property length"),
        (&[0x30, 0x01, 0x00], ALL, "topic name"),
        (&[0x30, 0x03, 0x00, 0x05, b'a'], ALL, "topic name"),
        (&[0x32, 0x03, 0x00, 0x01, b'a'], ALL, "packet identifier"),
        (&[0x30, 0x03, 0x00, 0x01, b'a'], ONLY_V5, "property length"),
        (
            &[0x30, 0x05, 0x00, 0x01, b'a', 0x05, 0x01],
            ONLY_V5,
            "properties",
        ),
        (
            &[0x30, 0x05, 0x00, 0x01, b'a', 0x01, 0x01],
            ONLY_V5,
            "property",
        ),
        (
            &[0x30, 0x06, 0x00, 0x01, b'a', 0x02, 0x02, 0x00],
            ONLY_V5,
            "property",
        ),
        (
            &[0x30, 0x06, 0x00, 0x01, b'a', 0x02, 0x0b, 0x80],
            ONLY_V5,
            "property",
        ),
        (
            &[0x30, 0x05, 0x00, 0x01, b'a', 0x01, 0x80],
            ONLY_V5,
            "property identifier",
        ),
        (
            &[0x30, 0x04, 0x00, 0x01, b'a', 0x80],
            ONLY_V5,
            "property length",
        ),
        (&[0x82, 0x02, 0x00, 0x01], ONLY_V5, "property length"),
        (
            &[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
            V3,
            "subscription options",
        ),
        (&[0x82, 0x04, 0x00, 0x01, 0x00, 0x01], V3, "topic filter"),
        (&[0x82, 0x03, 0x00, 0x01, 0x00], V3, "topic filter"),
        (&[0xa2, 0x03, 0x00, 0x01, 0x00], V3, "topic filter"),
        (&[0x10, 0x00], ALL, "protocol name"),
        (
            &[0x10, 0x06, 0x00, 0x04, b'M', b'Q', b'T', b'T'],
            ALL,
            "protocol level",
        ),
        (
            &[0x10, 0x07, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04],
            ALL,
            "connect flags",
        ),
        (
            &[
                0x10, 0x09, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00,
            ],
            ALL,
            "keep alive",
        ),
    ];
    for &(bytes, protocols, what) in cases {
        assert_error(bytes, protocols, Truncated(what), MALFORMED);
    }
    // CONNECT fields after the header.
    assert_error(
        &connect_v4(0x02, &[0x00]),
        ALL,
        Truncated("client identifier"),
        MALFORMED,
    );
    assert_error(
        &connect_v5(0x02, &[], &[]),
        ALL,
        Truncated("client identifier"),
        MALFORMED,
    );
    assert_error(
        &frame(0x10, &connect_header(b"MQTT", 5, 0x02)),
        ALL,
        Truncated("property length"),
        MALFORMED,
    );
    assert_error(
        &connect_v4(0x06, &s(b"c")),
        ALL,
        Truncated("will topic"),
        MALFORMED,
    );
    assert_error(
        &connect_v4(0x06, &cat(&[&s(b"c"), &s(b"w"), &[0x00, 0x02, b'x']])),
        ALL,
        Truncated("will payload"),
        MALFORMED,
    );
    assert_error(
        &connect_v5(0x06, &[], &s(b"c")),
        ALL,
        Truncated("property length"),
        MALFORMED,
    );
    assert_error(
        &connect_v4(0x82, &s(b"c")),
        ALL,
        Truncated("user name"),
        MALFORMED,
    );
    assert_error(
        &connect_v4(0xc2, &cat(&[&s(b"c"), &s(b"u"), &[0x00]])),
        ALL,
        Truncated("password"),
        MALFORMED,
    );
    // A user property with its key but not its value.
    assert_error(
        &publish_v5(&cat(&[&[0x26], &s(b"k")])),
        ONLY_V5,
        Truncated("property"),
        MALFORMED,
    );
}

#[test]
fn every_error_has_the_documented_reason_code() {
    let malformed = [
        MalformedLength,
        InvalidPacketType(0),
        InvalidFlags {
            packet: "PUBREL",
            flags: 0,
        },
        Truncated("x"),
        TrailingBytes(1),
        InvalidUtf8,
        NullCharacter,
        ConnectReservedFlag,
        InvalidWillFlags,
        PasswordWithoutUsername,
        InvalidQoS,
        DupOnQoS0,
        InvalidSubscriptionOptions,
        UnknownProperty(0),
        PropertyNotAllowed {
            property: 0x23,
            packet: "CONNECT",
        },
        InvalidReasonCode {
            packet: "CONNACK",
            code: 6,
        },
    ];
    for e in malformed {
        assert_eq!(e.reason_code(), MALFORMED, "{e:?}");
    }
    for e in [
        ZeroPacketId,
        NoTopicFilters("SUBSCRIBE"),
        InvalidRetainHandling,
        DuplicateProperty(0x21),
        InvalidPropertyValue(0x21),
    ] {
        assert_eq!(e.reason_code(), PROTOCOL_ERROR, "{e:?}");
    }
    for e in [InvalidProtocolName("x".into()), UnsupportedProtocolLevel(6)] {
        assert_eq!(
            e.reason_code(),
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            "{e:?}"
        );
    }
    assert_eq!(
        PacketTooLarge { size: 2, max: 1 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
}

// ---------------------------------------------------------------------------------------------
// No input panics

/// Decodes frames off `bytes` until the decoder needs more or fails. Returns how many decoded.
fn drain(bytes: &[u8], protocol: Protocol, max: u32) -> usize {
    let mut buf = BytesMut::from(bytes);
    let mut n = 0;
    loop {
        let before = buf.len();
        match decode(&mut buf, protocol, max) {
            Ok(Some(_)) => {
                assert!(buf.len() < before, "a decoded frame consumes bytes");
                n += 1;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumes nothing");
                return n;
            }
            Err(_) => return n,
        }
    }
}

/// Valid frames to mutate: a v5 CONNECT with will and properties, a v5 PUBLISH with properties,
/// a v5 SUBSCRIBE, a 3.1.1 CONNECT and a v5 CONNACK.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        connect_v5(
            0xee,
            &cat(&[
                &[0x11, 0, 0, 0, 10, 0x21, 0, 5],
                &[0x26],
                &s(b"k"),
                &s(b"v"),
            ]),
            &cat(&[
                &s(b"cid"),
                &props(&[0x18, 0, 0, 0, 1, 0x01, 0x01]),
                &s(b"will"),
                &s(b"msg"),
                &s(b"user"),
                &s(b"pw"),
            ]),
        ),
        frame(
            0x3b,
            &cat(&[
                &s(b"a/b"),
                &[0x00, 0x07],
                &props(&cat(&[
                    &[0x01, 0x01, 0x0b, 0x81, 0x01, 0x23, 0x00, 0x02, 0x03],
                    &s(b"ct"),
                ])),
                b"payload",
            ]),
        ),
        subscribe_v5(0x2e),
        connect_v4(
            0xc6,
            &cat(&[&s(b"c"), &s(b"w"), &s(b"m"), &s(b"u"), &s(b"p")]),
        ),
        frame(
            0x20,
            &cat(&[&[0x01, 0x00], &props(&[0x24, 0x01, 0x27, 0, 0, 1, 0])]),
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn random_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..96),
        protocol in select(ALL.to_vec()),
        max in 0u32..128,
    ) {
        drain(&bytes, protocol, max);
        drain(&bytes, protocol, MAX);
    }

    /// Random bytes behind a plausible fixed header reach the body decoders more often.
    #[test]
    fn random_bodies_never_panic(
        first in any::<u8>(),
        body in vec(any::<u8>(), 0..96),
        protocol in select(ALL.to_vec()),
    ) {
        let mut bytes = vec![first, body.len() as u8];
        bytes.extend_from_slice(&body);
        drain(&bytes, protocol, MAX);
    }

    #[test]
    fn mutated_frames_never_panic(
        seed in select(seeds()),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        protocol in select(ALL.to_vec()),
    ) {
        let mut bytes = seed.clone();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        drain(&bytes, protocol, MAX);
        // The same frame with its remaining length fixed up to what is left after a cut.
        let end = 2 + cut.index(bytes.len() - 1);
        let mut cut_bytes = bytes[..end.min(bytes.len())].to_vec();
        cut_bytes[1] = (cut_bytes.len() - 2) as u8;
        drain(&cut_bytes, protocol, MAX);
    }
}

#[test]
fn the_seeds_are_valid() {
    for seed in seeds() {
        for protocol in ALL {
            let expect = if seed[0] >> 4 == 1 || protocol.is_v5() {
                1
            } else {
                // The v5 CONNACK and PUBLISH/SUBSCRIBE forms are not valid 3.x frames.
                continue;
            };
            assert_eq!(drain(&seed, *protocol, MAX), expect, "{seed:02x?}");
        }
    }
}
