//! Property tests: every packet the codec can build survives encode → decode unchanged, for each
//! protocol level, with `encoded_len` agreeing with the bytes written and the decoder handling
//! partial and back-to-back frames.

use bytes::{Bytes, BytesMut};
use ferry_codec::{
    decode, peek_frame, Auth, ConnAck, Connect, DecodeError, Disconnect, EncodeError, Packet,
    Properties, Protocol, PubAck, Publish, QoS, ReasonCode, RetainHandling, SubAck, SubOptions,
    Subscribe, UnsubAck, Unsubscribe, Will, MAX_VARINT,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

const NO_LIMIT: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------------
// Which property may appear where (MQTT 5 §2.2.2.2), written out independently of the codec's
// own table. Bit 0 stands for the will properties of CONNECT, bit n for packet type n.

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
const UNSUBSCRIBE: u16 = 1 << 10;
const UNSUBACK: u16 = 1 << 11;
const DISCONNECT: u16 = 1 << 14;
const AUTH: u16 = 1 << 15;

/// Clears every property that `ctx` does not allow. Subscription identifiers may repeat only in
/// PUBLISH.
fn restrict(p: Properties, ctx: u16) -> Properties {
    let mut p = p.into_props();
    fn keep<T>(slot: &mut Option<T>, ctx: u16, allowed: u16) {
        if ctx & allowed == 0 {
            *slot = None;
        }
    }
    let acks = PUBACK | PUBREC | PUBREL | PUBCOMP;
    let message = PUBLISH | WILL;
    keep(&mut p.payload_format_indicator, ctx, message);
    keep(&mut p.message_expiry_interval, ctx, message);
    keep(&mut p.content_type, ctx, message);
    keep(&mut p.response_topic, ctx, message);
    keep(&mut p.correlation_data, ctx, message);
    if ctx & (PUBLISH | SUBSCRIBE) == 0 {
        p.subscription_identifiers.clear();
    } else if ctx == SUBSCRIBE {
        p.subscription_identifiers.truncate(1);
    }
    keep(
        &mut p.session_expiry_interval,
        ctx,
        CONNECT | CONNACK | DISCONNECT,
    );
    keep(&mut p.assigned_client_identifier, ctx, CONNACK);
    keep(&mut p.server_keep_alive, ctx, CONNACK);
    keep(&mut p.authentication_method, ctx, CONNECT | CONNACK | AUTH);
    keep(&mut p.authentication_data, ctx, CONNECT | CONNACK | AUTH);
    keep(&mut p.request_problem_information, ctx, CONNECT);
    keep(&mut p.will_delay_interval, ctx, WILL);
    keep(&mut p.request_response_information, ctx, CONNECT);
    keep(&mut p.response_information, ctx, CONNACK);
    keep(&mut p.server_reference, ctx, CONNACK | DISCONNECT);
    keep(
        &mut p.reason_string,
        ctx,
        CONNACK | acks | SUBACK | UNSUBACK | DISCONNECT | AUTH,
    );
    keep(&mut p.receive_maximum, ctx, CONNECT | CONNACK);
    keep(&mut p.topic_alias_maximum, ctx, CONNECT | CONNACK);
    keep(&mut p.topic_alias, ctx, PUBLISH);
    keep(&mut p.maximum_qos, ctx, CONNACK);
    keep(&mut p.retain_available, ctx, CONNACK);
    // User properties are allowed everywhere that has properties.
    keep(&mut p.maximum_packet_size, ctx, CONNECT | CONNACK);
    keep(&mut p.wildcard_subscription_available, ctx, CONNACK);
    keep(&mut p.subscription_identifier_available, ctx, CONNACK);
    keep(&mut p.shared_subscription_available, ctx, CONNACK);
    p.into()
}

// ---------------------------------------------------------------------------------------------
// Field strategies

/// An MQTT string: any Unicode scalar values except U+0000.
fn string() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..8).prop_map(|cs| cs.into_iter().filter(|&c| c != '\0').collect())
}

fn bstr() -> impl Strategy<Value = ferry_codec::ByteStr> {
    string().prop_map(ferry_codec::ByteStr::from)
}

fn nonempty_bstr() -> impl Strategy<Value = ferry_codec::ByteStr> {
    string().prop_map(|s| if s.is_empty() { "a/b".into() } else { s.into() })
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn flag() -> impl Strategy<Value = u8> {
    0u8..=1
}

fn packet_id() -> impl Strategy<Value = u16> {
    1u16..=u16::MAX
}

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    any::<u8>().prop_map(ReasonCode)
}

fn opt<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    prop::option::weighted(0.3, s)
}

/// Every property with a valid value, each present with some probability; `restrict` then
/// keeps the ones a packet allows.
fn any_properties() -> impl Strategy<Value = Properties> {
    let message = (
        opt(flag()),
        opt(any::<u32>()),
        opt(bstr()),
        opt(bstr()),
        opt(binary()),
        vec(1..=MAX_VARINT, 0..3),
    );
    let session = (
        opt(any::<u32>()),
        opt(bstr()),
        opt(any::<u16>()),
        opt(bstr()),
        opt(binary()),
        opt(flag()),
    );
    let misc = (
        opt(any::<u32>()),
        opt(flag()),
        opt(bstr()),
        opt(bstr()),
        opt(bstr()),
        opt(1..=u16::MAX),
    );
    let limits = (
        opt(any::<u16>()),
        opt(1..=u16::MAX),
        opt(flag()),
        opt(flag()),
        vec((bstr(), bstr()), 0..3),
        opt(1..=u32::MAX),
    );
    let avail = (opt(flag()), opt(flag()), opt(flag()));
    (message, session, misc, limits, avail).prop_map(|(m, s, x, l, a)| {
        ferry_codec::Props {
            payload_format_indicator: m.0,
            message_expiry_interval: m.1,
            content_type: m.2,
            response_topic: m.3,
            correlation_data: m.4,
            subscription_identifiers: m.5,
            session_expiry_interval: s.0,
            assigned_client_identifier: s.1,
            server_keep_alive: s.2,
            authentication_method: s.3,
            authentication_data: s.4,
            request_problem_information: s.5,
            will_delay_interval: x.0,
            request_response_information: x.1,
            response_information: x.2,
            server_reference: x.3,
            reason_string: x.4,
            receive_maximum: x.5,
            topic_alias_maximum: l.0,
            topic_alias: l.1,
            maximum_qos: l.2,
            retain_available: l.3,
            user_properties: l.4,
            maximum_packet_size: l.5,
            wildcard_subscription_available: a.0,
            subscription_identifier_available: a.1,
            shared_subscription_available: a.2,
        }
        .into()
    })
}

/// Properties valid in `ctx` for a v5 packet, none otherwise.
fn properties(protocol: Protocol, ctx: u16) -> BoxedStrategy<Properties> {
    if protocol.is_v5() {
        any_properties().prop_map(move |p| restrict(p, ctx)).boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    select(vec![Protocol::V3_1, Protocol::V3_1_1, Protocol::V5])
}

// ---------------------------------------------------------------------------------------------
// Packet strategies, one per packet type. Each builds the form that `protocol` can carry.

fn connect(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let will = (
        bstr(),
        binary(),
        qos(),
        any::<bool>(),
        properties(protocol, WILL),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        bstr(),
        opt(will),
        opt(bstr()),
        opt(binary()),
        properties(protocol, CONNECT),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // MQTT 3.x forbids a password without a user name.
                let password = if protocol.is_v5() || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

/// The CONNACK codes an MQTT 3 return code decodes to.
const V3_CONNACK_CODES: [ReasonCode; 6] = [
    ReasonCode::SUCCESS,
    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
    ReasonCode::SERVER_UNAVAILABLE,
    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
    ReasonCode::NOT_AUTHORIZED,
];

fn connack(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let code = if protocol.is_v5() {
        reason().boxed()
    } else {
        select(V3_CONNACK_CODES.to_vec()).boxed()
    };
    (any::<bool>(), code, properties(protocol, CONNACK)).prop_map(
        |(session_present, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties,
            })
        },
    )
}

fn publish(protocol: Protocol) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        bstr(),
        packet_id(),
        binary(),
        properties(protocol, PUBLISH),
    )
        .prop_map(|(qos, dup, retain, topic, id, payload, properties)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: if at_most_once { 0 } else { id },
                payload,
                properties,
            })
        })
}

fn puback_like(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let code = if protocol.is_v5() {
        prop_oneof![Just(ReasonCode::SUCCESS), reason()].boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    };
    (0..4usize, packet_id(), code).prop_flat_map(move |(kind, packet_id, code)| {
        let ctx = [PUBACK, PUBREC, PUBREL, PUBCOMP][kind];
        properties(protocol, ctx).prop_map(move |properties| {
            let ack = PubAck {
                packet_id,
                code,
                properties,
            };
            match kind {
                0 => Packet::PubAck(ack),
                1 => Packet::PubRec(ack),
                2 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        })
    })
}

fn sub_options(protocol: Protocol) -> BoxedStrategy<SubOptions> {
    if protocol.is_v5() {
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            select(vec![
                RetainHandling::OnSubscribe,
                RetainHandling::OnNewSubscribe,
                RetainHandling::Never,
            ]),
        )
            .prop_map(
                |(qos, no_local, retain_as_published, retain_handling)| SubOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                },
            )
            .boxed()
    } else {
        qos()
            .prop_map(|qos| SubOptions {
                qos,
                ..SubOptions::default()
            })
            .boxed()
    }
}

fn subscribe(protocol: Protocol) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        vec((nonempty_bstr(), sub_options(protocol)), 1..4),
        properties(protocol, SUBSCRIBE),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn suback(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let code = if protocol.is_v5() {
        reason().boxed()
    } else {
        select(vec![
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::SUCCESS,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::UNSPECIFIED_ERROR,
        ])
        .boxed()
    };
    (packet_id(), vec(code, 1..5), properties(protocol, SUBACK)).prop_map(
        |(packet_id, codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                codes,
                properties,
            })
        },
    )
}

fn unsubscribe(protocol: Protocol) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        vec(nonempty_bstr(), 1..4),
        properties(protocol, UNSUBSCRIBE),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn unsuback(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let codes = if protocol.is_v5() {
        vec(reason(), 0..5).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (packet_id(), codes, properties(protocol, UNSUBACK)).prop_map(
        |(packet_id, codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                codes,
                properties,
            })
        },
    )
}

fn disconnect(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let code = if protocol.is_v5() {
        prop_oneof![Just(ReasonCode::SUCCESS), reason()].boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    };
    (code, properties(protocol, DISCONNECT))
        .prop_map(|(code, properties)| Packet::Disconnect(Disconnect { code, properties }))
}

fn auth() -> impl Strategy<Value = Packet> {
    (
        prop_oneof![Just(ReasonCode::SUCCESS), reason()],
        properties(Protocol::V5, AUTH),
    )
        .prop_map(|(code, properties)| Packet::Auth(Auth { code, properties }))
}

/// Any packet that `protocol` can carry.
fn packet(protocol: Protocol) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(protocol),
        connack(protocol),
        publish(protocol),
        puback_like(protocol),
        subscribe(protocol),
        suback(protocol),
        unsubscribe(protocol),
        unsuback(protocol),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(protocol),
    ];
    if protocol.is_v5() {
        prop_oneof![10 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

fn protocol_and_packet() -> impl Strategy<Value = (Protocol, Packet)> {
    protocol().prop_flat_map(|protocol| (Just(protocol), packet(protocol)))
}

fn protocol_and_two_packets() -> impl Strategy<Value = (Protocol, Packet, Packet)> {
    protocol().prop_flat_map(|protocol| (Just(protocol), packet(protocol), packet(protocol)))
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn encode(packet: &Packet, protocol: Protocol) -> BytesMut {
    let mut buf = BytesMut::new();
    packet
        .encode(protocol, &mut buf)
        .unwrap_or_else(|e| panic!("encoding {packet:?} for {protocol:?}: {e}"));
    buf
}

/// The protocol a frame carrying `packet` is read with: a CONNECT carries its own.
fn wire_protocol(packet: &Packet, protocol: Protocol) -> Protocol {
    match packet {
        Packet::Connect(c) => c.protocol,
        _ => protocol,
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn encode_then_decode_gives_the_same_packet((protocol, packet) in protocol_and_packet()) {
        let mut buf = encode(&packet, protocol);
        let decoded = decode(&mut buf, protocol, NO_LIMIT).unwrap();
        prop_assert_eq!(decoded, Some(packet));
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
    }

    #[test]
    fn encoded_len_matches_bytes_written((protocol, packet) in protocol_and_packet()) {
        let buf = encode(&packet, protocol);
        prop_assert_eq!(packet.encoded_len(wire_protocol(&packet, protocol)), buf.len());
        prop_assert_eq!(peek_frame(&buf, NO_LIMIT).unwrap(), Some(buf.len()));
    }

    #[test]
    fn encode_appends_to_what_is_already_buffered(
        (protocol, packet) in protocol_and_packet(),
        prefix in vec(any::<u8>(), 0..8),
    ) {
        let mut buf = BytesMut::from(&prefix[..]);
        packet.encode(protocol, &mut buf).unwrap();
        prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&buf[prefix.len()..], &encode(&packet, protocol)[..]);
    }

    #[test]
    fn the_head_then_the_payload_is_the_whole_packet(
        (protocol, packet) in protocol_and_packet(),
        prefix in vec(any::<u8>(), 0..8),
    ) {
        let mut buf = BytesMut::from(&prefix[..]);
        packet.encode_head(protocol, &mut buf).unwrap();
        if let Packet::Publish(p) = &packet {
            buf.extend_from_slice(&p.payload);
        }
        prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&buf[prefix.len()..], &encode(&packet, protocol)[..]);
    }

    #[test]
    fn a_partial_frame_needs_more_bytes_and_consumes_nothing(
        (protocol, packet) in protocol_and_packet(),
    ) {
        let frame = encode(&packet, protocol).freeze();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            prop_assert_eq!(decode(&mut buf, protocol, NO_LIMIT), Ok(None), "prefix of {}", cut);
            prop_assert_eq!(&buf[..], &frame[..cut]);
        }
    }

    #[test]
    fn a_frame_arriving_in_pieces_decodes_once_complete(
        (protocol, packet) in protocol_and_packet(),
        chunk in 1usize..8,
    ) {
        let frame = encode(&packet, protocol).freeze();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for piece in frame.chunks(chunk) {
            buf.extend_from_slice(piece);
            if let Some(p) = decode(&mut buf, protocol, NO_LIMIT).unwrap() {
                decoded.push(p);
            }
        }
        prop_assert_eq!(decoded, vec![packet]);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn two_frames_back_to_back_decode_in_order(
        (protocol, first, second) in protocol_and_two_packets(),
    ) {
        let mut buf = encode(&first, protocol);
        buf.extend_from_slice(&encode(&second, protocol));
        let second_len = second.encoded_len(wire_protocol(&second, protocol));
        prop_assert_eq!(decode(&mut buf, protocol, NO_LIMIT).unwrap(), Some(first));
        prop_assert_eq!(buf.len(), second_len);
        prop_assert_eq!(decode(&mut buf, protocol, NO_LIMIT).unwrap(), Some(second));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode(&mut buf, protocol, NO_LIMIT), Ok(None));
    }

    #[test]
    fn max_packet_size_is_inclusive((protocol, packet) in protocol_and_packet()) {
        let frame = encode(&packet, protocol);
        let size = frame.len();
        let mut buf = frame.clone();
        prop_assert_eq!(decode(&mut buf, protocol, size as u32).unwrap(), Some(packet));
        let mut buf = frame.clone();
        prop_assert_eq!(
            decode(&mut buf, protocol, size as u32 - 1),
            Err(DecodeError::PacketTooLarge { size, max: size as u32 - 1 })
        );
        prop_assert_eq!(buf.len(), size, "a refused frame is not consumed");
    }

    /// Encoding a packet built with MQTT 5 fields for MQTT 3 drops what 3.x cannot carry
    /// (properties, reason codes, subscription options other than QoS) and maps the codes it
    /// can; AUTH does not exist in 3.x and is refused.
    #[test]
    fn v3_encoding_drops_v5_only_fields(
        packet in packet(Protocol::V5),
        protocol in select(vec![Protocol::V3_1, Protocol::V3_1_1]),
    ) {
        if matches!(packet, Packet::Connect(_)) {
            // A CONNECT is always encoded for its own protocol level.
            return Ok(());
        }
        let mut buf = BytesMut::new();
        let result = packet.encode(protocol, &mut buf);
        if let Packet::Auth(_) = packet {
            prop_assert!(matches!(result, Err(EncodeError::NotInProtocol(_))), "{:?}", result);
            prop_assert!(buf.is_empty(), "nothing is written for a refused packet");
            return Ok(());
        }
        result.unwrap();
        prop_assert_eq!(packet.encoded_len(protocol), buf.len());
        let decoded = decode(&mut buf, protocol, NO_LIMIT).unwrap();
        prop_assert_eq!(decoded, Some(as_v3(packet)));
        prop_assert!(buf.is_empty());
    }
}

/// What an MQTT 3 peer receives for `packet`.
fn as_v3(packet: Packet) -> Packet {
    let none = Properties::default;
    match packet {
        Packet::ConnAck(a) => Packet::ConnAck(ConnAck {
            session_present: a.session_present,
            code: V3_CONNACK_CODES[usize::from(a.code.to_v3_connack())],
            properties: none(),
        }),
        Packet::Publish(p) => Packet::Publish(Publish {
            properties: none(),
            ..p
        }),
        Packet::PubAck(a) => Packet::PubAck(PubAck::new(a.packet_id)),
        Packet::PubRec(a) => Packet::PubRec(PubAck::new(a.packet_id)),
        Packet::PubRel(a) => Packet::PubRel(PubAck::new(a.packet_id)),
        Packet::PubComp(a) => Packet::PubComp(PubAck::new(a.packet_id)),
        Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            packet_id: s.packet_id,
            filters: s
                .filters
                .into_iter()
                .map(|(f, o)| {
                    (
                        f,
                        SubOptions {
                            qos: o.qos,
                            ..SubOptions::default()
                        },
                    )
                })
                .collect(),
            properties: none(),
        }),
        Packet::SubAck(s) => Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            codes: s
                .codes
                .iter()
                .map(|c| ReasonCode(c.to_v3_suback()))
                .collect(),
            properties: none(),
        }),
        Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            properties: none(),
            ..u
        }),
        Packet::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            ..UnsubAck::default()
        }),
        Packet::Disconnect(_) => Packet::Disconnect(Disconnect::default()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// A few fixed frames, to pin the wire format itself and not only its self-consistency.

#[test]
fn known_frames() {
    let cases: Vec<(Protocol, Packet, &[u8])> = vec![
        (Protocol::V3_1_1, Packet::PingReq, &[0xc0, 0x00]),
        (Protocol::V5, Packet::PingResp, &[0xd0, 0x00]),
        (
            Protocol::V3_1_1,
            Packet::Disconnect(Disconnect::default()),
            &[0xe0, 0x00],
        ),
        (
            Protocol::V5,
            Packet::Disconnect(Disconnect::default()),
            &[0xe0, 0x00],
        ),
        (
            Protocol::V5,
            Packet::Disconnect(Disconnect {
                code: ReasonCode::DISCONNECT_WITH_WILL,
                properties: Properties::default(),
            }),
            &[0xe0, 0x01, 0x04],
        ),
        (
            Protocol::V3_1_1,
            Packet::PubRel(PubAck::new(0x1234)),
            &[0x62, 0x02, 0x12, 0x34],
        ),
        (
            Protocol::V5,
            Packet::PubAck(PubAck::with_code(7, ReasonCode::NO_MATCHING_SUBSCRIBERS)),
            &[0x40, 0x03, 0x00, 0x07, 0x10],
        ),
        (
            Protocol::V3_1_1,
            Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                retain: true,
                dup: true,
                topic: "a/b".into(),
                packet_id: 10,
                payload: Bytes::from_static(b"hi"),
                properties: Properties::default(),
            }),
            &[
                0x3b, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0a, b'h', b'i',
            ],
        ),
        (
            Protocol::V5,
            Packet::Publish(Publish {
                topic: "t".into(),
                properties: ferry_codec::Props {
                    topic_alias: Some(3),
                    ..Default::default()
                }
                .into(),
                ..Publish::default()
            }),
            &[0x30, 0x07, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x03],
        ),
        (
            Protocol::V3_1_1,
            Packet::SubAck(SubAck {
                packet_id: 1,
                codes: vec![
                    ReasonCode::GRANTED_QOS_1,
                    ReasonCode::NOT_AUTHORIZED,
                    ReasonCode::SUCCESS,
                ],
                properties: Properties::default(),
            }),
            &[0x90, 0x05, 0x00, 0x01, 0x01, 0x80, 0x00],
        ),
        (
            Protocol::V3_1_1,
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: ReasonCode::BANNED,
                properties: Properties::default(),
            }),
            &[0x20, 0x02, 0x01, 0x05],
        ),
        (
            Protocol::V3_1_1,
            Packet::Connect(Box::new(Connect {
                protocol: Protocol::V3_1_1,
                clean_start: true,
                keep_alive: 60,
                client_id: "c".into(),
                will: None,
                username: Some("u".into()),
                password: Some(Bytes::from_static(b"p")),
                properties: Properties::default(),
            })),
            &[
                0x10, 0x13, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2, 0x00, 0x3c, 0x00, 0x01,
                b'c', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
            ],
        ),
        (
            Protocol::V3_1,
            Packet::Connect(Box::new(Connect {
                protocol: Protocol::V3_1,
                clean_start: false,
                keep_alive: 0,
                client_id: "".into(),
                will: Some(Will {
                    topic: "w".into(),
                    payload: Bytes::new(),
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    properties: Properties::default(),
                }),
                username: None,
                password: None,
                properties: Properties::default(),
            })),
            &[
                0x10, 0x13, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x34, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x01, b'w', 0x00, 0x00,
            ],
        ),
    ];
    for (protocol, packet, wire) in cases {
        let buf = encode(&packet, protocol);
        assert_eq!(&buf[..], wire, "encoding {packet:?}");
        assert_eq!(packet.encoded_len(protocol), wire.len());
        let mut buf = BytesMut::from(wire);
        let decoded = decode(&mut buf, protocol, NO_LIMIT).unwrap().unwrap();
        let expected = if protocol.is_v5() {
            packet
        } else {
            as_v3(packet)
        };
        assert_eq!(decoded, expected);
    }
}

#[test]
fn a_large_publish_uses_a_multi_byte_remaining_length() {
    for len in [120usize, 121, 122, 16_380, 16_384, 2_097_200] {
        let packet = Packet::Publish(Publish {
            topic: "t".into(),
            payload: Bytes::from(vec![0x5a; len]),
            ..Publish::default()
        });
        let buf = encode(&packet, Protocol::V5);
        assert_eq!(buf.len(), packet.encoded_len(Protocol::V5));
        let mut buf2 = buf.clone();
        assert_eq!(
            decode(&mut buf2, Protocol::V5, NO_LIMIT).unwrap(),
            Some(packet)
        );
        // A buffer holding only the fixed header is refused at once when the frame is too big.
        let header_len = buf.len() - (len + 4);
        let mut header = BytesMut::from(&buf[..header_len]);
        assert!(matches!(
            decode(&mut header, Protocol::V5, 100),
            Err(DecodeError::PacketTooLarge { .. })
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Packets that cannot be encoded are refused without leaving a partial frame behind.

fn assert_refused(packet: Packet, protocol: Protocol, expected: EncodeError) {
    let mut buf = BytesMut::from(&b"earlier frame"[..]);
    assert_eq!(packet.encode(protocol, &mut buf), Err(expected));
    assert_eq!(&buf[..], b"earlier frame");
}

#[test]
fn a_string_longer_than_65535_bytes_is_refused() {
    let long: ferry_codec::ByteStr = "x".repeat(65_536).into();
    assert_refused(
        Packet::Publish(Publish {
            topic: long.clone(),
            ..Publish::default()
        }),
        Protocol::V3_1_1,
        EncodeError::FieldTooLong("topic name"),
    );
    assert_refused(
        Packet::Publish(Publish {
            topic: "t".into(),
            properties: ferry_codec::Props {
                user_properties: vec![("k".into(), long.clone())],
                ..Default::default()
            }
            .into(),
            ..Publish::default()
        }),
        Protocol::V5,
        EncodeError::FieldTooLong("user property"),
    );
    assert_refused(
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec!["a".into(), long],
            properties: Properties::default(),
        }),
        Protocol::V5,
        EncodeError::FieldTooLong("topic filter"),
    );
}

#[test]
fn a_subscription_identifier_above_the_varint_range_is_refused() {
    let props: Properties = ferry_codec::Props {
        subscription_identifiers: vec![MAX_VARINT + 1],
        ..Default::default()
    }
    .into();
    assert_refused(
        Packet::Publish(Publish {
            topic: "t".into(),
            properties: props.clone(),
            ..Publish::default()
        }),
        Protocol::V5,
        EncodeError::NotInProtocol("subscription identifier above 268,435,455"),
    );
    // The largest one is fine.
    let packet = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("a".into(), SubOptions::default())],
        properties: ferry_codec::Props {
            subscription_identifiers: vec![MAX_VARINT],
            ..Default::default()
        }
        .into(),
    });
    let mut buf = encode(&packet, Protocol::V5);
    assert_eq!(buf.len(), packet.encoded_len(Protocol::V5));
    assert_eq!(
        decode(&mut buf, Protocol::V5, NO_LIMIT).unwrap(),
        Some(packet)
    );
}

#[test]
fn auth_is_refused_in_mqtt_3() {
    for protocol in [Protocol::V3_1, Protocol::V3_1_1] {
        assert_refused(
            Packet::Auth(Auth::default()),
            protocol,
            EncodeError::NotInProtocol("AUTH"),
        );
    }
}

#[test]
fn a_password_without_user_name_is_refused_in_mqtt_3() {
    for protocol in [Protocol::V3_1, Protocol::V3_1_1] {
        let connect = Connect {
            protocol,
            clean_start: true,
            keep_alive: 0,
            client_id: "c".into(),
            will: None,
            username: None,
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties::default(),
        };
        assert_refused(
            Packet::Connect(Box::new(connect)),
            Protocol::V5,
            EncodeError::NotInProtocol("password without user name"),
        );
    }
}
