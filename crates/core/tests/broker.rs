//! Behaviour of the `Broker` state machine, driven through its public API with a virtual clock.

mod common;

use common::*;
use ferry_codec::{
    ConnAck, Disconnect, Packet, Properties, Protocol, PubAck, Publish, QoS, ReasonCode,
    RetainHandling, SubAck, SubOptions, UnsubAck, Unsubscribe,
};
use ferry_core::{
    Acl, AclAction, AclRule, Broker, Limits, MemorySessions, Message, Output, Session,
    SessionRegistry,
};
use std::collections::HashSet;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// The default stores (`Broker::new`). The other tests run on `common::TestSessions` because of
// the bug these show.

#[test]
fn memory_sessions_find_by_client_id() {
    let mut sessions = MemorySessions::default();
    sessions.insert(Session::new(7, "client-a".into()));
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions.find("client-a"), Some(7));
    // The root cause: a `HashMap<ByteStr, _>` looked up through `Borrow<str>`.
    let mut map = std::collections::HashMap::new();
    map.insert(ferry_codec::ByteStr::from("k"), 1);
    assert_eq!(map.get("k"), Some(&1));
}

#[test]
fn default_stores_resume_a_persistent_session() {
    let t0 = Instant::now();
    let mut b = Broker::new(Limits::default(), Acl::default());
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    b.connection_lost(1, at(t0, 1));
    online(&mut b, 2, v3("pub", true), at(t0, 2));
    b.handle(2, pub_packet("t", "queued", QoS::AtLeastOnce, 1), at(t0, 2));
    drain(&mut b);
    let (ack, rest) = online(&mut b, 3, v3("sub", false), at(t0, 3));
    assert!(ack.session_present);
    assert_eq!(payloads_to(&rest, 3), vec!["queued"]);
    assert_eq!(b.session_count(), 2);
}

#[test]
fn default_stores_take_over_a_connection_with_the_same_client_id() {
    let t0 = Instant::now();
    let mut b = Broker::new(Limits::default(), Acl::default());
    subscriber(&mut b, 1, v5("c"), "t", QoS::AtMostOnce, t0);
    assert!(b.connect(2, v5("c"), at(t0, 1)).is_some());
    let out = drain(&mut b);
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            disconnect: Some(Disconnect {
                code: ReasonCode::SESSION_TAKEN_OVER,
                properties: Properties::default(),
            }),
        }
    );
    assert_eq!(b.connection_count(), 1);
    assert_eq!(b.session_count(), 1);
    // The clean-start session of the old connection and its subscription are gone.
    assert_eq!(b.subscription_count(), 0);
}

#[test]
fn default_stores_serve_a_clean_session() {
    let t0 = Instant::now();
    let mut b = Broker::new(Limits::default(), Acl::default());
    subscriber(&mut b, 1, v5("sub"), "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, retained("t", "x", QoS::AtLeastOnce, 1), t0);
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 1), vec!["x"]);
    assert_eq!(b.retained_count(), 1);
    b.handle(1, disconnect(ReasonCode::SUCCESS), t0);
    drain(&mut b);
    assert_eq!(b.session_count(), 1);
    assert_eq!(b.subscription_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// CONNECT / CONNACK

#[test]
fn v311_connect_gets_plain_connack() {
    let t0 = Instant::now();
    let mut b = broker();
    let accepted = b.connect(1, v3("c1", true), t0).expect("accepted");
    assert_eq!(accepted.client_id, "c1");
    assert_eq!(accepted.keep_alive, 60);
    assert_eq!(
        drain(&mut b),
        vec![Output::Send {
            conn: 1,
            packet: Packet::ConnAck(ConnAck {
                session_present: false,
                code: ReasonCode::SUCCESS,
                properties: Properties::default(),
            }),
        }]
    );
    assert_eq!(b.connection_count(), 1);
    assert_eq!(b.session_count(), 1);
}

#[test]
fn v5_connack_advertises_limits() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        receive_maximum: 10,
        max_packet_size: 5000,
        topic_alias_maximum: 7,
        ..Limits::default()
    });
    let accepted = b.connect(1, v5("c1"), t0).expect("accepted");
    assert_eq!(accepted.client_id, "c1");
    assert_eq!(accepted.keep_alive, 60);
    assert_eq!(
        drain(&mut b),
        vec![Output::Send {
            conn: 1,
            packet: Packet::ConnAck(ConnAck {
                session_present: false,
                code: ReasonCode::SUCCESS,
                properties: ferry_codec::Props {
                    receive_maximum: Some(10),
                    maximum_packet_size: Some(5000),
                    topic_alias_maximum: Some(7),
                    ..Default::default()
                }
                .into(),
            }),
        }]
    );
}

#[test]
fn v5_connack_advertises_reduced_qos_retain_and_capped_session_expiry() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_qos: QoS::AtLeastOnce,
        retain_available: false,
        max_session_expiry: 100,
        ..Limits::default()
    });
    let (ack, _) = online(&mut b, 1, v5_persistent("c1", 1000), t0);
    assert_eq!(ack.properties.maximum_qos, Some(1));
    assert_eq!(ack.properties.retain_available, Some(0));
    assert_eq!(ack.properties.session_expiry_interval, Some(100));
    // Without a cap, the requested expiry is not echoed.
    let (ack, _) = online(&mut b, 2, v5_persistent("c2", 50), t0);
    assert_eq!(ack.properties.session_expiry_interval, None);
}

#[test]
fn v5_empty_client_id_gets_assigned_identifier() {
    let t0 = Instant::now();
    let mut b = broker();
    let a1 = b.connect(1, v5(""), t0).expect("accepted");
    let out = drain(&mut b);
    let [Output::Send {
        conn: 1,
        packet: Packet::ConnAck(ack),
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    let assigned = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    assert!(!assigned.is_empty());
    assert_eq!(assigned, a1.client_id);

    let a2 = b.connect(2, v5(""), t0).expect("accepted");
    assert_ne!(a1.client_id, a2.client_id, "assigned ids must be unique");
    assert_eq!(
        b.connection_count(),
        2,
        "the second client must not take over the first"
    );
    let out = drain(&mut b);
    assert!(closes(&out).is_empty());
}

#[test]
fn v5_non_empty_client_id_gets_no_assigned_identifier() {
    let t0 = Instant::now();
    let mut b = broker();
    let (ack, _) = online(&mut b, 1, v5("given"), t0);
    assert_eq!(ack.properties.assigned_client_identifier, None);
}

#[test]
fn v311_empty_client_id_with_clean_session_0_is_refused() {
    let t0 = Instant::now();
    let mut b = broker();
    assert_eq!(b.connect(1, v3("", false), t0), None);
    let out = drain(&mut b);
    assert_eq!(
        out,
        vec![
            Output::Send {
                conn: 1,
                packet: Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    properties: Properties::default(),
                }),
            },
            Output::Close {
                conn: 1,
                disconnect: None
            },
        ]
    );
    assert_eq!(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID.0, 0x85);
    assert_eq!(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID.to_v3_connack(), 2);
    assert_eq!(b.connection_count(), 0);
    assert_eq!(b.session_count(), 0);
}

#[test]
fn v311_empty_client_id_with_clean_session_1_is_accepted() {
    let t0 = Instant::now();
    let mut b = broker();
    let accepted = b.connect(1, v3("", true), t0).expect("accepted");
    assert!(!accepted.client_id.is_empty());
    let out = drain(&mut b);
    assert_eq!(
        out,
        vec![Output::Send {
            conn: 1,
            packet: Packet::ConnAck(ConnAck::default()),
        }]
    );
}

#[test]
fn v5_server_keep_alive_caps_larger_and_zero_keep_alive() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_keep_alive: 30,
        ..Limits::default()
    });
    for (conn, asked, enforced, advertised) in [
        (1, 100, 30, Some(30)),
        (2, 0, 30, Some(30)),
        (3, 20, 20, None),
        (4, 30, 30, None),
    ] {
        let mut c = v5(&format!("c{conn}"));
        c.keep_alive = asked;
        let accepted = b.connect(conn, c, t0).expect("accepted");
        assert_eq!(accepted.keep_alive, enforced, "keep-alive {asked}");
        let out = drain(&mut b);
        let Some(Output::Send {
            packet: Packet::ConnAck(ack),
            ..
        }) = out.first()
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            ack.properties.server_keep_alive, advertised,
            "keep-alive {asked}"
        );
    }
}

#[test]
fn no_keep_alive_ceiling_keeps_the_clients_value() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("c");
    c.keep_alive = 0;
    assert_eq!(b.connect(1, c, t0).expect("accepted").keep_alive, 0);
    let out = drain(&mut b);
    let Some(Output::Send {
        packet: Packet::ConnAck(ack),
        ..
    }) = out.first()
    else {
        panic!("{out:?}")
    };
    assert_eq!(ack.properties.server_keep_alive, None);
}

/// An MQTT 3.1.1 client cannot be told a Server Keep Alive: silently enforcing a shorter
/// keep-alive than it asked for (or one when it asked for none) gets a well-behaved client
/// disconnected for a keep-alive timeout it never knew about.
#[test]
fn v311_keep_alive_is_not_silently_shortened() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_keep_alive: 30,
        ..Limits::default()
    });
    for (conn, asked) in [(1, 600), (2, 0)] {
        let mut c = v3(&format!("c{conn}"), true);
        c.keep_alive = asked;
        let accepted = b.connect(conn, c, t0);
        let out = drain(&mut b);
        match accepted {
            // Either keep the client's keep-alive ...
            Some(a) => assert_eq!(
                a.keep_alive, asked,
                "keep-alive {asked} enforced as {}",
                a.keep_alive
            ),
            // ... or refuse the connection openly (what Mosquitto does).
            None => assert!(matches!(
                out.first(),
                Some(Output::Send { packet: Packet::ConnAck(ack), .. }) if ack.code.is_error()
            )),
        }
    }
}

#[test]
fn enhanced_authentication_is_refused() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("c");
    c.properties.make_mut().authentication_method = Some("SCRAM-SHA-1".into());
    assert_eq!(b.connect(1, c, t0), None);
    let out = drain(&mut b);
    let [Output::Send {
        packet: Packet::ConnAck(ack),
        ..
    }, Output::Close {
        conn: 1,
        disconnect: None,
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(ack.code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert_eq!(b.connection_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// QoS 0 / 1 / 2

#[test]
fn qos0_publish_is_delivered_without_acknowledgement() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub"), "t/#", QoS::AtMostOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("t/a", "hello", QoS::AtMostOnce, 0), t0);
    let out = drain(&mut b);
    assert_eq!(
        out,
        vec![Output::Send {
            conn: 1,
            packet: pub_packet("t/a", "hello", QoS::AtMostOnce, 0),
        }]
    );
    assert_eq!(b.stats().messages_received, 1);
    assert_eq!(b.stats().messages_sent, 1);
}

#[test]
fn qos1_publish_is_acknowledged_and_delivered_at_qos1() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub"), "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("t", "m", QoS::AtLeastOnce, 7), t0);
    let out = drain(&mut b);
    assert_eq!(sent_to(&out, 2), vec![puback(7)]);
    let delivered = publishes_to(&out, 1);
    assert_eq!(delivered.len(), 1);
    let p = &delivered[0];
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_ne!(p.packet_id, 0);
    assert!(!p.dup);
    assert_eq!(
        *p,
        Publish {
            packet_id: p.packet_id,
            ..publish("t", "m", QoS::AtLeastOnce, 0)
        }
    );
    // The subscriber's PUBACK ends the exchange: nothing goes out.
    b.handle(1, puback(p.packet_id), t0);
    assert_eq!(drain(&mut b), vec![]);
}

#[test]
fn qos2_inbound_flow_delivers_once() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub"), "t", QoS::AtMostOnce, t0);
    online(&mut b, 2, v5("pub"), t0);

    b.handle(2, pub_packet("t", "once", QoS::ExactlyOnce, 9), t0);
    let out = drain(&mut b);
    assert_eq!(sent_to(&out, 2), vec![pubrec(9)]);
    assert_eq!(payloads_to(&out, 1), vec!["once"]);

    // The publisher did not see the PUBREC and retransmits with DUP.
    let mut again = publish("t", "once", QoS::ExactlyOnce, 9);
    again.dup = true;
    b.handle(2, Packet::Publish(again), at(t0, 1));
    let out = drain(&mut b);
    assert_eq!(sent_to(&out, 2), vec![pubrec(9)], "PUBREC again");
    assert!(publishes_to(&out, 1).is_empty(), "delivered twice: {out:?}");
    assert_eq!(b.stats().messages_received, 1);

    b.handle(2, pubrel(9), at(t0, 2));
    assert_eq!(
        drain(&mut b),
        vec![Output::Send {
            conn: 2,
            packet: Packet::PubComp(PubAck::with_code(9, ReasonCode::SUCCESS)),
        }]
    );

    // After PUBREL the id is free again: a new message with it is a new message.
    b.handle(2, pub_packet("t", "second", QoS::ExactlyOnce, 9), at(t0, 3));
    let out = drain(&mut b);
    assert_eq!(sent_to(&out, 2), vec![pubrec(9)]);
    assert_eq!(payloads_to(&out, 1), vec!["second"]);
}

#[test]
fn qos2_retransmission_survives_reconnect_without_redelivery() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub"), "t", QoS::AtMostOnce, t0);
    online(&mut b, 2, v3("pub", false), t0);
    b.handle(2, pub_packet("t", "x", QoS::ExactlyOnce, 5), t0);
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 1), vec!["x"]);
    b.connection_lost(2, at(t0, 1));
    drain(&mut b);
    online(&mut b, 3, v3("pub", false), at(t0, 2));
    let mut again = publish("t", "x", QoS::ExactlyOnce, 5);
    again.dup = true;
    b.handle(3, Packet::Publish(again), at(t0, 2));
    let out = drain(&mut b);
    assert_eq!(sent_to(&out, 3), vec![pubrec(5)]);
    assert!(publishes_to(&out, 1).is_empty(), "delivered twice: {out:?}");
    b.handle(3, pubrel(5), at(t0, 3));
    assert_eq!(sent_to(&drain(&mut b), 3), vec![pubcomp(5)]);
}

#[test]
fn qos2_outbound_flow() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("sub");
    // A window of one shows when the slot is freed.
    c.properties.make_mut().receive_maximum = Some(1);
    subscriber(&mut b, 1, c, "t", QoS::ExactlyOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("t", "a", QoS::ExactlyOnce, 1), t0);
    b.handle(2, pub_packet("t", "b", QoS::ExactlyOnce, 2), t0);
    let out = drain(&mut b);
    let sent = publishes_to(&out, 1);
    assert_eq!(sent.len(), 1, "{out:?}");
    assert_eq!(sent[0].qos, QoS::ExactlyOnce);
    assert_eq!(sent[0].payload, "a");
    let id = sent[0].packet_id;
    assert_ne!(id, 0);

    b.handle(1, pubrec(id), at(t0, 1));
    assert_eq!(
        drain(&mut b),
        vec![Output::Send {
            conn: 1,
            packet: pubrel(id),
        }],
        "PUBREC gets PUBREL and does not free the slot"
    );
    // A repeated PUBREC gets the PUBREL again.
    b.handle(1, pubrec(id), at(t0, 1));
    assert_eq!(sent_to(&drain(&mut b), 1), vec![pubrel(id)]);

    b.handle(1, pubcomp(id), at(t0, 2));
    let out = drain(&mut b);
    let sent = publishes_to(&out, 1);
    assert_eq!(sent.len(), 1, "PUBCOMP frees the slot: {out:?}");
    assert_eq!(sent[0].payload, "b");
    assert_ne!(sent[0].packet_id, id);
}

#[test]
fn qos_is_downgraded_to_the_subscription() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("s0"), "t", QoS::AtMostOnce, t0);
    subscriber(&mut b, 2, v5("s1"), "t", QoS::AtLeastOnce, t0);
    subscriber(&mut b, 3, v5("s2"), "t", QoS::ExactlyOnce, t0);
    online(&mut b, 9, v5("pub"), t0);

    b.handle(9, pub_packet("t", "q2", QoS::ExactlyOnce, 1), t0);
    let out = drain(&mut b);
    let qos = |c| {
        publishes_to(&out, c)
            .iter()
            .map(|p| (p.qos, p.packet_id == 0))
            .collect::<Vec<_>>()
    };
    assert_eq!(qos(1), vec![(QoS::AtMostOnce, true)]);
    assert_eq!(qos(2), vec![(QoS::AtLeastOnce, false)]);
    assert_eq!(qos(3), vec![(QoS::ExactlyOnce, false)]);

    b.handle(9, pub_packet("t", "q1", QoS::AtLeastOnce, 2), t0);
    let out = drain(&mut b);
    let qos = |c| {
        publishes_to(&out, c)
            .iter()
            .map(|p| p.qos)
            .collect::<Vec<_>>()
    };
    assert_eq!(qos(1), vec![QoS::AtMostOnce]);
    assert_eq!(qos(2), vec![QoS::AtLeastOnce]);
    assert_eq!(qos(3), vec![QoS::AtLeastOnce], "never upgraded");
}

#[test]
fn subscription_qos_is_capped_by_max_qos() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_qos: QoS::AtLeastOnce,
        ..Limits::default()
    });
    online(&mut b, 1, v5("s"), t0);
    b.handle(1, subscribe(3, "t", QoS::ExactlyOnce), t0);
    assert_eq!(
        sent_to(&drain(&mut b), 1),
        vec![Packet::SubAck(SubAck {
            packet_id: 3,
            codes: vec![ReasonCode::GRANTED_QOS_1],
            properties: Properties::default(),
        })]
    );
}

#[test]
fn pubrel_for_unknown_id_gets_pubcomp_0x92_on_v5_and_success_on_v3() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("a"), t0);
    online(&mut b, 2, v3("b", true), t0);
    b.handle(1, pubrel(42), t0);
    b.handle(2, pubrel(42), t0);
    assert_eq!(
        drain(&mut b),
        vec![
            Output::Send {
                conn: 1,
                packet: Packet::PubComp(PubAck::with_code(
                    42,
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                )),
            },
            Output::Send {
                conn: 2,
                packet: Packet::PubComp(PubAck::with_code(42, ReasonCode::SUCCESS)),
            },
        ]
    );
    assert_eq!(ReasonCode::PACKET_IDENTIFIER_NOT_FOUND.0, 0x92);
}

#[test]
fn pubrec_for_unknown_id_gets_pubrel_0x92_on_v5() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("a"), t0);
    b.handle(1, pubrec(17), t0);
    assert_eq!(
        sent_to(&drain(&mut b), 1),
        vec![Packet::PubRel(PubAck::with_code(
            17,
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        ))]
    );
}

#[test]
fn pingreq_gets_pingresp() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("a"), t0);
    b.handle(1, Packet::PingReq, t0);
    assert_eq!(
        drain(&mut b),
        vec![Output::Send {
            conn: 1,
            packet: Packet::PingResp
        }]
    );
}

// ---------------------------------------------------------------------------------------------
// Packet identifiers and the inflight window

#[test]
fn client_receive_maximum_limits_messages_in_flight() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("sub");
    c.properties.make_mut().receive_maximum = Some(2);
    subscriber(&mut b, 1, c, "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    for (i, payload) in ["m1", "m2", "m3"].into_iter().enumerate() {
        b.handle(
            2,
            pub_packet("t", payload, QoS::AtLeastOnce, i as u16 + 1),
            t0,
        );
    }
    let out = drain(&mut b);
    // The publisher's messages are all acknowledged regardless of the subscriber's window.
    assert_eq!(sent_to(&out, 2), vec![puback(1), puback(2), puback(3)]);
    assert_eq!(payloads_to(&out, 1), vec!["m1", "m2"]);
    let first = publishes_to(&out, 1);
    let (id1, id2) = (first[0].packet_id, first[1].packet_id);
    assert!(id1 != 0 && id2 != 0 && id1 != id2, "ids {id1} {id2}");

    // An ack for an id that is not in flight frees nothing.
    b.handle(1, puback(id1.wrapping_add(id2).wrapping_add(100)), t0);
    assert!(publishes_to(&drain(&mut b), 1).is_empty());

    b.handle(1, puback(id2), at(t0, 1));
    let out = drain(&mut b);
    let third = publishes_to(&out, 1);
    assert_eq!(third.len(), 1, "{out:?}");
    assert_eq!(third[0].payload, "m3");
    assert_ne!(third[0].packet_id, 0);
    assert_ne!(
        third[0].packet_id, id1,
        "id of a message still in flight reused"
    );
}

#[test]
fn max_inflight_caps_the_window() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_inflight: 3,
        ..Limits::default()
    });
    subscriber(&mut b, 1, v3("sub", true), "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    for i in 1..=5u16 {
        b.handle(
            2,
            pub_packet("t", &format!("m{i}"), QoS::AtLeastOnce, i),
            t0,
        );
    }
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 1), vec!["m1", "m2", "m3"]);
    let ids: HashSet<u16> = publishes_to(&out, 1).iter().map(|p| p.packet_id).collect();
    assert_eq!(ids.len(), 3);
    assert!(!ids.contains(&0));
}

#[test]
fn a_run_of_pubacks_does_what_the_pubacks_one_by_one_do() {
    // Two brokers in the same state; one gets the PUBACKs one by one, the other as one run
    // (an unknown id, a repeated one and one out of order among them).
    let t0 = Instant::now();
    let setup = || {
        let mut b = broker_with(Limits {
            max_inflight: 3,
            ..Limits::default()
        });
        subscriber(&mut b, 1, v3("sub", true), "t", QoS::AtLeastOnce, t0);
        online(&mut b, 2, v5("pub"), t0);
        for i in 1..=8u16 {
            b.handle(
                2,
                pub_packet("t", &format!("m{i}"), QoS::AtLeastOnce, i),
                t0,
            );
        }
        let out = drain(&mut b);
        let ids: Vec<u16> = publishes_to(&out, 1).iter().map(|p| p.packet_id).collect();
        assert_eq!(payloads_to(&out, 1), vec!["m1", "m2", "m3"]);
        (b, ids)
    };
    let (mut one, ids) = setup();
    let (mut run, same_ids) = setup();
    assert_eq!(ids, same_ids);
    let acks = [ids[1], 999, ids[0], ids[1]];
    for &id in &acks {
        one.handle(1, puback(id), at(t0, 1));
    }
    run.handle_acks(1, &acks, at(t0, 1));
    let (a, b) = (drain(&mut one), drain(&mut run));
    assert_eq!(a, b);
    // Two acknowledged, so two more go out; the third stays in flight.
    assert_eq!(payloads_to(&b, 1), vec!["m4", "m5"]);
    let next: Vec<u16> = publishes_to(&b, 1).iter().map(|p| p.packet_id).collect();
    run.handle_acks(1, &[ids[2], next[0], next[1]], at(t0, 2));
    assert_eq!(payloads_to(&drain(&mut run), 1), vec!["m6", "m7", "m8"]);
    // A connection the broker does not know is ignored.
    run.handle_acks(42, &[1, 2], at(t0, 3));
    assert!(drain(&mut run).is_empty());
}

#[test]
fn packet_ids_stay_unique_and_non_zero_across_wrap_around() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("sub");
    c.properties.make_mut().receive_maximum = Some(2);
    subscriber(&mut b, 1, c, "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    // The first message stays unacknowledged for the whole test.
    b.handle(2, pub_packet("t", "stuck", QoS::AtLeastOnce, 1), t0);
    let out = drain(&mut b);
    let stuck = publishes_to(&out, 1)[0].packet_id;
    assert_ne!(stuck, 0);
    let mut seen_wrap = false;
    let mut last = stuck;
    for _ in 0..70_000u32 {
        b.handle(2, pub_packet("t", "y", QoS::AtLeastOnce, 2), t0);
        let out = drain(&mut b);
        let p = publishes_to(&out, 1);
        assert_eq!(p.len(), 1, "{out:?}");
        let id = p[0].packet_id;
        assert_ne!(id, 0, "packet id 0 used");
        assert_ne!(id, stuck, "packet id of a message in flight reused");
        if id < last {
            seen_wrap = true;
        }
        last = id;
        b.handle(1, puback(id), t0);
        drain(&mut b);
    }
    assert!(seen_wrap, "the counter never wrapped");
}

// ---------------------------------------------------------------------------------------------
// Session resumption

#[test]
fn v311_session_resumes_with_inflight_then_queued_messages_in_order() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v3("sub", false), t0);
    b.handle(
        1,
        subscribe_with(
            1,
            &[
                ("q1/#", opts(QoS::AtLeastOnce)),
                ("q2/#", opts(QoS::ExactlyOnce)),
            ],
            None,
        ),
        t0,
    );
    assert_eq!(
        sent_to(&drain(&mut b), 1),
        vec![Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::GRANTED_QOS_2],
            properties: Properties::default(),
        })]
    );
    online(&mut b, 2, v3("pub", true), t0);

    b.handle(2, pub_packet("q1/a", "m1", QoS::AtLeastOnce, 1), t0);
    b.handle(2, pub_packet("q1/a", "m2", QoS::AtLeastOnce, 2), t0);
    b.handle(2, pub_packet("q2/a", "m3", QoS::ExactlyOnce, 3), t0);
    b.handle(2, pubrel(3), t0);
    b.handle(2, pub_packet("q1/a", "m4", QoS::AtLeastOnce, 4), t0);
    let out = drain(&mut b);
    let sent = publishes_to(&out, 1);
    assert_eq!(sent.len(), 4);
    let ids: Vec<u16> = sent.iter().map(|p| p.packet_id).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4, "ids {ids:?}");
    // m3 (QoS 2) is received: PUBREC → PUBREL, now waiting for PUBCOMP. m4 is acknowledged.
    b.handle(1, pubrec(ids[2]), t0);
    assert_eq!(sent_to(&drain(&mut b), 1), vec![pubrel(ids[2])]);
    b.handle(1, puback(ids[3]), t0);
    assert_eq!(drain(&mut b), vec![]);

    b.connection_lost(1, at(t0, 10));
    assert_eq!(drain(&mut b), vec![], "no will, nothing to send");
    assert_eq!(b.session_count(), 2);

    b.handle(2, pub_packet("q1/b", "m5", QoS::AtLeastOnce, 5), at(t0, 20));
    b.handle(2, pub_packet("q2/b", "m6", QoS::ExactlyOnce, 6), at(t0, 21));
    b.handle(2, pubrel(6), at(t0, 21));
    b.handle(2, pub_packet("q1/c", "m7", QoS::AtLeastOnce, 7), at(t0, 22));
    let out = drain(&mut b);
    assert!(sent_to(&out, 1).is_empty());
    assert_eq!(
        sent_to(&out, 2),
        vec![puback(5), pubrec(6), pubcomp(6), puback(7)]
    );

    let (ack, rest) = online(&mut b, 3, v3("sub", false), at(t0, 30));
    assert!(ack.session_present);
    assert!(
        rest.iter()
            .all(|o| matches!(o, Output::Send { conn: 3, .. })),
        "{rest:?}"
    );
    let packets = sent_to(&rest, 3);
    assert_eq!(packets.len(), 6, "{packets:?}");
    let dup = |topic: &str, payload: &str, qos, id| {
        let mut p = publish(topic, payload, qos, id);
        p.dup = true;
        Packet::Publish(p)
    };
    assert_eq!(packets[0], dup("q1/a", "m1", QoS::AtLeastOnce, ids[0]));
    assert_eq!(packets[1], dup("q1/a", "m2", QoS::AtLeastOnce, ids[1]));
    assert_eq!(packets[2], pubrel(ids[2]));
    let queued: Vec<Publish> = packets[3..]
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.clone(),
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect();
    let new_ids: Vec<u16> = queued.iter().map(|p| p.packet_id).collect();
    assert_eq!(
        queued[0],
        publish("q1/b", "m5", QoS::AtLeastOnce, new_ids[0])
    );
    assert_eq!(
        queued[1],
        publish("q2/b", "m6", QoS::ExactlyOnce, new_ids[1])
    );
    assert_eq!(
        queued[2],
        publish("q1/c", "m7", QoS::AtLeastOnce, new_ids[2])
    );
    let in_flight: HashSet<u16> = [ids[0], ids[1], ids[2]]
        .into_iter()
        .chain(new_ids.iter().copied())
        .collect();
    assert_eq!(
        in_flight.len(),
        6,
        "ids must be unique among messages in flight: {in_flight:?}"
    );
    assert!(!in_flight.contains(&0));

    // Completing everything leaves nothing more to send.
    b.handle(3, puback(ids[0]), at(t0, 31));
    b.handle(3, puback(ids[1]), at(t0, 31));
    b.handle(3, pubcomp(ids[2]), at(t0, 31));
    b.handle(3, puback(new_ids[0]), at(t0, 31));
    b.handle(3, pubrec(new_ids[1]), at(t0, 31));
    b.handle(3, puback(new_ids[2]), at(t0, 31));
    assert_eq!(sent_to(&drain(&mut b), 3), vec![pubrel(new_ids[1])]);
}

#[test]
fn resumed_session_keeps_subscriptions() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    b.connection_lost(1, at(t0, 1));
    let (ack, rest) = online(&mut b, 2, v3("sub", false), at(t0, 2));
    assert!(ack.session_present);
    assert!(rest.is_empty());
    online(&mut b, 3, v3("pub", true), at(t0, 2));
    b.handle(3, pub_packet("t", "live", QoS::AtLeastOnce, 1), at(t0, 3));
    assert_eq!(payloads_to(&drain(&mut b), 2), vec!["live"]);
}

#[test]
fn clean_session_discards_the_session() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    b.connection_lost(1, at(t0, 1));
    online(&mut b, 2, v3("pub", true), t0);
    b.handle(2, pub_packet("t", "queued", QoS::AtLeastOnce, 1), at(t0, 2));
    drain(&mut b);

    let (ack, rest) = online(&mut b, 3, v3("sub", true), at(t0, 3));
    assert!(!ack.session_present);
    assert!(
        rest.is_empty(),
        "queued messages of the old session sent: {rest:?}"
    );
    assert_eq!(b.subscription_count(), 0);
    b.handle(2, pub_packet("t", "after", QoS::AtLeastOnce, 2), at(t0, 4));
    let out = drain(&mut b);
    assert!(
        sent_to(&out, 3).is_empty(),
        "subscription survived clean session: {out:?}"
    );
}

#[test]
fn v5_clean_start_discards_the_session() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 3600),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    b.connection_lost(1, at(t0, 1));
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("t", "queued", QoS::AtLeastOnce, 1), at(t0, 2));
    drain(&mut b);
    let mut c = v5_persistent("sub", 3600);
    c.clean_start = true;
    let (ack, rest) = online(&mut b, 3, c, at(t0, 3));
    assert!(!ack.session_present);
    assert!(rest.is_empty(), "{rest:?}");
    b.handle(2, pub_packet("t", "after", QoS::AtLeastOnce, 2), at(t0, 4));
    assert!(sent_to(&drain(&mut b), 3).is_empty());
}

#[test]
fn v5_session_is_kept_until_expiry_then_removed() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 60),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    online(&mut b, 2, v5("pub"), t0);
    b.connection_lost(1, at(t0, 10));
    assert_eq!(b.poll_timeout(), Some(at(t0, 70)));
    b.handle(
        2,
        pub_packet("t", "queued", QoS::AtLeastOnce, 1),
        at(t0, 20),
    );
    drain(&mut b);

    b.handle_timeout(at_ms(t0, 69_999));
    assert_eq!(b.session_count(), 2, "session ended before its expiry");
    assert_eq!(b.subscription_count(), 1);

    b.handle_timeout(at(t0, 70));
    assert_eq!(b.session_count(), 1, "only the publisher's session is left");
    assert_eq!(b.subscription_count(), 0);
    assert_eq!(drain(&mut b), vec![]);

    b.handle(
        2,
        pub_packet("t", "nobody", QoS::AtLeastOnce, 2),
        at(t0, 71),
    );
    assert_eq!(sent_to(&drain(&mut b), 2), vec![puback(2)]);
    assert_eq!(
        b.session_count(),
        1,
        "a publish must not resurrect the session"
    );

    let (ack, rest) = online(&mut b, 3, v5_persistent("sub", 60), at(t0, 72));
    assert!(!ack.session_present);
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn v5_session_resumed_before_expiry_gets_queued_messages() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 60),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    online(&mut b, 2, v5("pub"), t0);
    b.connection_lost(1, at(t0, 10));
    b.handle(
        2,
        pub_packet("t", "queued", QoS::AtLeastOnce, 1),
        at(t0, 20),
    );
    drain(&mut b);
    let (ack, rest) = online(&mut b, 3, v5_persistent("sub", 60), at(t0, 69));
    assert!(ack.session_present);
    assert_eq!(payloads_to(&rest, 3), vec!["queued"]);
    // The old expiry timer must not end the resumed session.
    b.handle_timeout(at(t0, 70));
    assert_eq!(b.session_count(), 2);
    b.handle(2, pub_packet("t", "live", QoS::AtMostOnce, 0), at(t0, 71));
    assert_eq!(payloads_to(&drain(&mut b), 3), vec!["live"]);
    // Disconnected again: expiry counts from the new disconnect.
    b.connection_lost(3, at(t0, 100));
    b.handle_timeout(at(t0, 159));
    assert_eq!(b.session_count(), 2);
    b.handle_timeout(at(t0, 160));
    assert_eq!(b.session_count(), 1);
}

#[test]
fn v5_session_expiry_0_ends_the_session_at_disconnect() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub"), "t", QoS::AtLeastOnce, t0);
    assert_eq!(b.session_count(), 1);
    b.handle(1, disconnect(ReasonCode::SUCCESS), at(t0, 1));
    assert_eq!(
        drain(&mut b),
        vec![Output::Close {
            conn: 1,
            disconnect: None
        }]
    );
    assert_eq!(b.session_count(), 0);
    assert_eq!(b.subscription_count(), 0);
    assert_eq!(b.connection_count(), 0);
    assert_eq!(b.poll_timeout(), None);
}

#[test]
fn v5_disconnect_can_shorten_session_expiry_to_zero() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 600),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    let mut d = Disconnect::default();
    d.properties.make_mut().session_expiry_interval = Some(0);
    b.handle(1, Packet::Disconnect(d), at(t0, 1));
    assert_eq!(closes(&drain(&mut b)), vec![(1, None)]);
    assert_eq!(b.session_count(), 0);
}

#[test]
fn v5_disconnect_can_change_a_nonzero_session_expiry() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 600),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    let mut d = Disconnect::default();
    d.properties.make_mut().session_expiry_interval = Some(5);
    b.handle(1, Packet::Disconnect(d), at(t0, 10));
    drain(&mut b);
    assert_eq!(b.poll_timeout(), Some(at(t0, 15)));
    b.handle_timeout(at(t0, 15));
    assert_eq!(b.session_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Will

fn will_watcher(b: &mut Broker, t0: Instant) {
    subscriber(b, 9, v5("watcher"), "will/#", QoS::AtLeastOnce, t0);
}

fn with_will(mut c: ferry_codec::Connect, delay: Option<u32>) -> ferry_codec::Connect {
    let mut w = will("will/c", "gone", QoS::AtLeastOnce);
    w.properties.make_mut().will_delay_interval = delay;
    c.will = Some(w);
    c
}

#[test]
fn will_is_published_when_the_connection_is_lost() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), None), t0);
    b.connection_lost(1, at(t0, 5));
    let out = drain(&mut b);
    let p = publishes_to(&out, 9);
    assert_eq!(p.len(), 1, "{out:?}");
    assert_eq!(
        p[0],
        Publish {
            packet_id: p[0].packet_id,
            ..publish("will/c", "gone", QoS::AtLeastOnce, 0)
        }
    );
    assert_eq!(b.connection_count(), 1);
}

#[test]
fn v311_will_is_published_when_the_connection_is_lost() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    let mut c = v3("c", true);
    c.will = Some(will("will/c", "v3 gone", QoS::AtMostOnce));
    online(&mut b, 1, c, t0);
    b.connection_lost(1, at(t0, 5));
    assert_eq!(payloads_to(&drain(&mut b), 9), vec!["v3 gone"]);
}

#[test]
fn will_is_not_published_on_a_normal_disconnect() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), None), t0);
    b.handle(1, disconnect(ReasonCode::SUCCESS), at(t0, 5));
    assert_eq!(
        drain(&mut b),
        vec![Output::Close {
            conn: 1,
            disconnect: None
        }]
    );
    // Nor later.
    b.connection_lost(1, at(t0, 6));
    b.handle_timeout(at(t0, 1000));
    assert_eq!(drain(&mut b), vec![]);
}

#[test]
fn will_is_not_published_on_a_normal_v311_disconnect_of_a_persistent_session() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    let mut c = v3("c", false);
    c.will = Some(will("will/c", "gone", QoS::AtLeastOnce));
    online(&mut b, 1, c, t0);
    b.handle(1, disconnect(ReasonCode::SUCCESS), at(t0, 5));
    let out = drain(&mut b);
    assert!(publishes_to(&out, 9).is_empty(), "{out:?}");
}

#[test]
fn will_is_published_on_disconnect_with_will_message() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), None), t0);
    b.handle(1, disconnect(ReasonCode::DISCONNECT_WITH_WILL), at(t0, 5));
    let out = drain(&mut b);
    assert_eq!(closes(&out), vec![(1, None)]);
    assert_eq!(payloads_to(&out, 9), vec!["gone"]);
}

#[test]
fn will_properties_pass_through_without_the_delay() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    let mut c = with_will(v5_persistent("c", 100), Some(0));
    let w = c.will.as_mut().unwrap();
    w.properties.make_mut().content_type = Some("text/plain".into());
    w.properties.make_mut().user_properties = vec![("k".into(), "v".into())];
    online(&mut b, 1, c, t0);
    b.connection_lost(1, at(t0, 1));
    let p = publishes_to(&drain(&mut b), 9);
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].properties,
        ferry_codec::Props {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }
        .into()
    );
}

#[test]
fn retained_will_is_stored() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("c");
    let mut w = will("will/c", "offline", QoS::AtLeastOnce);
    w.retain = true;
    c.will = Some(w);
    online(&mut b, 1, c, t0);
    b.connection_lost(1, at(t0, 1));
    assert_eq!(b.retained_count(), 1);
    online(&mut b, 2, v5("late"), at(t0, 2));
    b.handle(2, subscribe(1, "will/#", QoS::AtLeastOnce), at(t0, 2));
    let p = publishes_to(&drain(&mut b), 2);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].payload, "offline");
    assert!(p[0].retain);
}

/// The Message Expiry Interval of a will is the lifetime of the will *message*; it starts when
/// the will is published (MQTT 5 §3.1.3.2.4), not when the client connected.
#[test]
fn will_message_expiry_counts_from_publication() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    let mut c = with_will(v5("c"), None);
    c.will
        .as_mut()
        .unwrap()
        .properties
        .make_mut()
        .message_expiry_interval = Some(30);
    online(&mut b, 1, c, t0);
    b.connection_lost(1, at(t0, 100));
    let p = publishes_to(&drain(&mut b), 9);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].properties.message_expiry_interval, Some(30));
}

#[test]
fn will_delay_publishes_only_after_the_delay() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5_persistent("c", 100), Some(30)), t0);
    b.connection_lost(1, at(t0, 10));
    assert_eq!(drain(&mut b), vec![], "published before the delay");
    assert_eq!(b.poll_timeout(), Some(at(t0, 40)));
    b.handle_timeout(at_ms(t0, 39_999));
    assert_eq!(drain(&mut b), vec![]);
    b.handle_timeout(at(t0, 40));
    assert_eq!(payloads_to(&drain(&mut b), 9), vec!["gone"]);
    // Exactly once.
    b.handle_timeout(at(t0, 200));
    assert_eq!(drain(&mut b), vec![]);
    assert_eq!(
        b.session_count(),
        1,
        "the client's session expired at t0+110"
    );
}

#[test]
fn will_delay_is_cancelled_by_a_reconnect() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5_persistent("c", 100), Some(30)), t0);
    b.connection_lost(1, at(t0, 10));
    let (ack, _) = online(&mut b, 2, v5_persistent("c", 100), at(t0, 20));
    assert!(ack.session_present);
    b.handle_timeout(at(t0, 40));
    b.handle_timeout(at(t0, 1000));
    let out = drain(&mut b);
    assert!(
        publishes_to(&out, 9).is_empty(),
        "cancelled will published: {out:?}"
    );
}

#[test]
fn will_is_published_at_session_end_when_expiry_is_shorter_than_delay() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5_persistent("c", 10), Some(30)), t0);
    b.connection_lost(1, at(t0, 5));
    assert_eq!(drain(&mut b), vec![]);
    assert_eq!(b.poll_timeout(), Some(at(t0, 15)));
    b.handle_timeout(at(t0, 14));
    assert_eq!(drain(&mut b), vec![]);
    b.handle_timeout(at(t0, 15));
    assert_eq!(payloads_to(&drain(&mut b), 9), vec!["gone"]);
    assert_eq!(b.session_count(), 1);
    b.handle_timeout(at(t0, 35));
    assert_eq!(drain(&mut b), vec![], "will published twice");
}

#[test]
fn will_with_delay_and_session_expiry_0_is_published_at_once() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), Some(30)), t0);
    b.connection_lost(1, at(t0, 5));
    assert_eq!(payloads_to(&drain(&mut b), 9), vec!["gone"]);
}

// ---------------------------------------------------------------------------------------------
// Session takeover

#[test]
fn v5_takeover_closes_the_old_connection_with_0x8e_and_publishes_its_will() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), None), t0);
    assert!(b.connect(2, v5("c"), at(t0, 1)).is_some());
    let out = drain(&mut b);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            disconnect: Some(Disconnect {
                code: ReasonCode::SESSION_TAKEN_OVER,
                properties: Properties::default(),
            }),
        }
    );
    assert_eq!(payloads_to(&out, 9), vec!["gone"]);
    assert!(
        matches!(&out[2], Output::Send { conn: 2, packet: Packet::ConnAck(a) } if a.code == ReasonCode::SUCCESS)
    );
    assert_eq!(ReasonCode::SESSION_TAKEN_OVER.0, 0x8E);
    assert_eq!(b.connection_count(), 2);
    // The old connection is forgotten: its late packets and loss do nothing.
    b.handle(1, Packet::PingReq, at(t0, 2));
    b.connection_lost(1, at(t0, 2));
    assert_eq!(drain(&mut b), vec![]);
    assert_eq!(b.connection_count(), 2);
}

#[test]
fn v311_takeover_closes_without_disconnect_and_keeps_the_session() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    let mut c = v3("c", false);
    c.will = Some(will("will/c", "v3 gone", QoS::AtLeastOnce));
    online(&mut b, 1, c, t0);
    b.handle(1, subscribe(1, "t", QoS::AtLeastOnce), t0);
    drain(&mut b);
    assert!(b.connect(2, v3("c", false), at(t0, 1)).is_some());
    let out = drain(&mut b);
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            disconnect: None
        }
    );
    assert_eq!(payloads_to(&out, 9), vec!["v3 gone"]);
    let Some(Output::Send {
        conn: 2,
        packet: Packet::ConnAck(ack),
    }) = out.last()
    else {
        panic!("{out:?}")
    };
    assert!(ack.session_present);
    // The subscription moved to the new connection.
    online(&mut b, 3, v3("pub", true), at(t0, 2));
    b.handle(3, pub_packet("t", "x", QoS::AtLeastOnce, 1), at(t0, 2));
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 2), vec!["x"]);
    assert!(sent_to(&out, 1).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Retained messages

#[test]
fn retained_message_is_stored_delivered_on_subscribe_and_cleared() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("pub"), t0);
    b.handle(1, retained("r/a", "kept", QoS::AtLeastOnce, 1), t0);
    assert_eq!(sent_to(&drain(&mut b), 1), vec![puback(1)]);
    assert_eq!(b.retained_count(), 1);

    online(&mut b, 2, v5("sub"), at(t0, 1));
    b.handle(2, subscribe(5, "r/+", QoS::AtLeastOnce), at(t0, 1));
    let out = sent_to(&drain(&mut b), 2);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        out[0],
        Packet::SubAck(SubAck {
            packet_id: 5,
            codes: vec![ReasonCode::GRANTED_QOS_1],
            properties: Properties::default(),
        }),
        "SUBACK comes before the retained message"
    );
    let Packet::Publish(p) = &out[1] else {
        panic!("{out:?}")
    };
    let mut expected = publish("r/a", "kept", QoS::AtLeastOnce, p.packet_id);
    expected.retain = true;
    assert_eq!(*p, expected);
    assert_ne!(p.packet_id, 0);

    // A newer retained message replaces it.
    b.handle(1, retained("r/a", "newer", QoS::AtMostOnce, 0), at(t0, 2));
    drain(&mut b);
    assert_eq!(b.retained_count(), 1);

    // An empty retained payload clears it.
    b.handle(1, retained("r/a", "", QoS::AtMostOnce, 0), at(t0, 3));
    drain(&mut b);
    assert_eq!(b.retained_count(), 0);
    online(&mut b, 3, v5("late"), at(t0, 4));
    b.handle(3, subscribe(1, "r/#", QoS::AtLeastOnce), at(t0, 4));
    let out = sent_to(&drain(&mut b), 3);
    assert_eq!(out.len(), 1, "cleared retained message delivered: {out:?}");
}

#[test]
fn retained_message_qos_is_downgraded_on_subscribe() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("pub"), t0);
    b.handle(1, retained("r", "x", QoS::ExactlyOnce, 1), t0);
    drain(&mut b);
    online(&mut b, 2, v3("sub", true), t0);
    b.handle(2, subscribe(1, "r", QoS::AtMostOnce), t0);
    let p = publishes_to(&drain(&mut b), 2);
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].qos, p[0].packet_id, p[0].retain),
        (QoS::AtMostOnce, 0, true)
    );
}

#[test]
fn retain_handling_0_1_2() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("pub"), t0);
    b.handle(1, retained("r", "x", QoS::AtMostOnce, 0), t0);
    drain(&mut b);
    online(&mut b, 2, v5("sub"), t0);
    let with = |rh| SubOptions {
        retain_handling: rh,
        ..opts(QoS::AtMostOnce)
    };
    let count = |b: &mut Broker| publishes_to(&drain(b), 2).len();

    // 0: on every subscribe, also when it already exists.
    b.handle(
        2,
        subscribe_with(1, &[("r", with(RetainHandling::OnSubscribe))], None),
        t0,
    );
    assert_eq!(count(&mut b), 1);
    b.handle(
        2,
        subscribe_with(2, &[("r", with(RetainHandling::OnSubscribe))], None),
        t0,
    );
    assert_eq!(count(&mut b), 1);

    // 1: only if the subscription is new.
    b.handle(
        2,
        subscribe_with(3, &[("r", with(RetainHandling::OnNewSubscribe))], None),
        t0,
    );
    assert_eq!(
        count(&mut b),
        0,
        "retain handling 1 on an existing subscription"
    );
    b.handle(
        2,
        subscribe_with(4, &[("#", with(RetainHandling::OnNewSubscribe))], None),
        t0,
    );
    assert_eq!(count(&mut b), 1, "retain handling 1 on a new subscription");
    b.handle(
        2,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 5,
            filters: vec!["#".into()],
            properties: Properties::default(),
        }),
        t0,
    );
    assert_eq!(
        sent_to(&drain(&mut b), 2),
        vec![Packet::UnsubAck(UnsubAck {
            packet_id: 5,
            codes: vec![ReasonCode::SUCCESS],
            properties: Properties::default(),
        })]
    );
    b.handle(
        2,
        subscribe_with(6, &[("#", with(RetainHandling::OnNewSubscribe))], None),
        t0,
    );
    assert_eq!(count(&mut b), 1, "new again after UNSUBSCRIBE");

    // 2: never.
    b.handle(
        2,
        subscribe_with(7, &[("r/#", with(RetainHandling::Never))], None),
        t0,
    );
    assert_eq!(count(&mut b), 0);
}

#[test]
fn retain_as_published_on_normal_delivery() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("rap"), t0);
    b.handle(
        1,
        subscribe_with(
            1,
            &[(
                "t",
                SubOptions {
                    retain_as_published: true,
                    ..opts(QoS::AtMostOnce)
                },
            )],
            None,
        ),
        t0,
    );
    drain(&mut b);
    subscriber(&mut b, 2, v5("plain5"), "t", QoS::AtMostOnce, t0);
    subscriber(&mut b, 3, v3("plain3", true), "t", QoS::AtMostOnce, t0);
    online(&mut b, 4, v5("pub"), t0);

    b.handle(4, retained("t", "r", QoS::AtMostOnce, 0), t0);
    let out = drain(&mut b);
    let flags = |c| {
        publishes_to(&out, c)
            .iter()
            .map(|p| p.retain)
            .collect::<Vec<_>>()
    };
    assert_eq!(flags(1), vec![true], "retain as published");
    assert_eq!(flags(2), vec![false]);
    assert_eq!(flags(3), vec![false]);

    b.handle(4, pub_packet("t", "n", QoS::AtMostOnce, 0), t0);
    let out = drain(&mut b);
    assert!(!publishes_to(&out, 1)[0].retain);
}

#[test]
fn shared_subscriptions_get_no_retained_messages() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("pub"), t0);
    b.handle(1, retained("t", "r", QoS::AtLeastOnce, 1), t0);
    drain(&mut b);
    online(&mut b, 2, v5("sub"), t0);
    b.handle(2, subscribe(1, "$share/g/t", QoS::AtLeastOnce), t0);
    assert_eq!(
        sent_to(&drain(&mut b), 2),
        vec![Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![ReasonCode::GRANTED_QOS_1],
            properties: Properties::default(),
        })]
    );
}

#[test]
fn retained_messages_are_not_matched_by_wildcards_on_dollar_topics() {
    let t0 = Instant::now();
    let mut b = broker();
    b.publish(
        Message {
            topic: "$SYS/uptime".into(),
            payload: bytes("1"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            expires_at: None,
            publisher: "".into(),
        },
        t0,
    );
    assert_eq!(b.retained_count(), 1);
    online(&mut b, 1, v5("sub"), t0);
    b.handle(1, subscribe(1, "#", QoS::AtMostOnce), t0);
    assert!(publishes_to(&drain(&mut b), 1).is_empty());
    b.handle(1, subscribe(2, "$SYS/#", QoS::AtMostOnce), t0);
    assert_eq!(payloads_to(&drain(&mut b), 1), vec!["1"]);
}

// ---------------------------------------------------------------------------------------------
// Message expiry

#[test]
fn expired_queued_message_is_not_delivered_on_reconnect() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 3600),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    b.connection_lost(1, at(t0, 1));
    online(&mut b, 2, v5("pub"), t0);
    let mut short = publish("t", "short", QoS::AtLeastOnce, 1);
    short.properties.make_mut().message_expiry_interval = Some(10);
    let mut long = publish("t", "long", QoS::AtLeastOnce, 2);
    long.properties.make_mut().message_expiry_interval = Some(100);
    b.handle(2, Packet::Publish(short), at(t0, 5));
    b.handle(2, Packet::Publish(long), at(t0, 5));
    drain(&mut b);

    let (ack, rest) = online(&mut b, 3, v5_persistent("sub", 3600), at(t0, 20));
    assert!(ack.session_present);
    let p = publishes_to(&rest, 3);
    assert_eq!(p.len(), 1, "{rest:?}");
    assert_eq!(p[0].payload, "long");
    assert_eq!(
        p[0].properties.message_expiry_interval,
        Some(85),
        "remaining interval"
    );
    assert_eq!(b.stats().dropped_expired, 1);
}

#[test]
fn delivered_message_carries_the_remaining_expiry_interval() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("live"), "t", QoS::AtMostOnce, t0);
    subscriber(&mut b, 3, v3("live3", true), "t", QoS::AtMostOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    let mut p = publish("t", "x", QoS::AtMostOnce, 0);
    p.retain = true;
    p.properties.make_mut().message_expiry_interval = Some(60);
    b.handle(2, Packet::Publish(p), t0);
    let out = drain(&mut b);
    assert_eq!(
        publishes_to(&out, 1)[0].properties.message_expiry_interval,
        Some(60)
    );
    assert_eq!(
        publishes_to(&out, 3)[0].properties,
        Properties::default(),
        "v3 gets no properties"
    );

    // The retained copy, 20.5 s later: 39.5 s left, rounded up.
    online(&mut b, 4, v5("late"), t0);
    b.handle(4, subscribe(1, "t", QoS::AtMostOnce), at_ms(t0, 20_500));
    let out = drain(&mut b);
    assert_eq!(
        publishes_to(&out, 4)[0].properties.message_expiry_interval,
        Some(40)
    );

    // Expired: no longer retained for new subscribers.
    online(&mut b, 5, v5("later"), t0);
    b.handle(5, subscribe(1, "t", QoS::AtMostOnce), at(t0, 60));
    assert!(publishes_to(&drain(&mut b), 5).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Subscription identifiers, no-local, properties

#[test]
fn overlapping_subscriptions_give_one_copy_with_all_identifiers_and_max_qos() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("sub"), t0);
    b.handle(
        1,
        subscribe_with(1, &[("a/+", opts(QoS::AtMostOnce))], Some(1)),
        t0,
    );
    b.handle(
        1,
        subscribe_with(2, &[("a/#", opts(QoS::AtLeastOnce))], Some(2)),
        t0,
    );
    drain(&mut b);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("a/b", "x", QoS::ExactlyOnce, 1), t0);
    let out = drain(&mut b);
    let p = publishes_to(&out, 1);
    assert_eq!(p.len(), 1, "one copy per session: {out:?}");
    assert_eq!(p[0].qos, QoS::AtLeastOnce);
    let mut ids = p[0].properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);

    // A topic only one of them matches carries only that one's id.
    b.handle(2, pub_packet("a/b/c", "y", QoS::ExactlyOnce, 2), t0);
    let p = publishes_to(&drain(&mut b), 1);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].properties.subscription_identifiers, vec![2]);
}

#[test]
fn retained_message_carries_the_subscription_identifier() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("pub"), t0);
    b.handle(1, retained("r", "x", QoS::AtMostOnce, 0), t0);
    online(&mut b, 2, v5("sub"), t0);
    b.handle(
        2,
        subscribe_with(1, &[("r", opts(QoS::AtMostOnce))], Some(77)),
        t0,
    );
    let p = publishes_to(&drain(&mut b), 2);
    assert_eq!(p[0].properties.subscription_identifiers, vec![77]);
}

#[test]
fn no_local_subscriber_does_not_get_its_own_messages() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("me"), t0);
    b.handle(
        1,
        subscribe_with(
            1,
            &[(
                "chat",
                SubOptions {
                    no_local: true,
                    ..opts(QoS::AtLeastOnce)
                },
            )],
            None,
        ),
        t0,
    );
    drain(&mut b);
    subscriber(&mut b, 2, v5("other"), "chat", QoS::AtLeastOnce, t0);

    b.handle(1, pub_packet("chat", "mine", QoS::AtLeastOnce, 1), t0);
    let out = drain(&mut b);
    assert_eq!(
        sent_to(&out, 1),
        vec![puback(1)],
        "own message delivered: {out:?}"
    );
    assert_eq!(payloads_to(&out, 2), vec!["mine"]);

    b.handle(2, pub_packet("chat", "theirs", QoS::AtLeastOnce, 1), t0);
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 1), vec!["theirs"]);
    assert_eq!(
        payloads_to(&out, 2),
        vec!["theirs"],
        "without no-local a client gets its own"
    );
}

#[test]
fn without_no_local_a_subscriber_gets_its_own_messages() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("me"), "chat", QoS::AtMostOnce, t0);
    b.handle(1, pub_packet("chat", "mine", QoS::AtMostOnce, 0), t0);
    assert_eq!(payloads_to(&drain(&mut b), 1), vec!["mine"]);
}

#[test]
fn application_properties_pass_through_to_v5_subscribers() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub5"), "req", QoS::AtMostOnce, t0);
    subscriber(&mut b, 2, v3("sub3", true), "req", QoS::AtMostOnce, t0);
    online(&mut b, 3, v5("pub"), t0);
    let props: ferry_codec::Properties = ferry_codec::Props {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("resp/1".into()),
        correlation_data: Some(bytes("corr-42")),
        user_properties: vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ],
        ..Default::default()
    }
    .into();
    let mut p = publish("req", "{}", QoS::AtMostOnce, 0);
    p.properties = props.clone();
    // A resolved inbound alias must not leak to subscribers.
    p.properties.make_mut().topic_alias = Some(3);
    b.handle(3, Packet::Publish(p), t0);
    let out = drain(&mut b);
    assert_eq!(publishes_to(&out, 1)[0].properties, props);
    assert_eq!(publishes_to(&out, 2)[0].properties, Properties::default());
}

// ---------------------------------------------------------------------------------------------
// Shared subscriptions

#[test]
fn shared_subscription_members_alternate_and_normal_subscriber_gets_all() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("m1"), "$share/g/t", QoS::AtLeastOnce, t0);
    subscriber(&mut b, 2, v5("m2"), "$share/g/t", QoS::AtLeastOnce, t0);
    subscriber(&mut b, 3, v5("all"), "t", QoS::AtLeastOnce, t0);
    online(&mut b, 4, v5("pub"), t0);
    let mut receivers = Vec::new();
    for i in 0..6u16 {
        b.handle(
            4,
            retained("t", &format!("m{i}"), QoS::AtLeastOnce, i + 1),
            t0,
        );
        let out = drain(&mut b);
        let got1 = publishes_to(&out, 1);
        let got2 = publishes_to(&out, 2);
        assert_eq!(
            got1.len() + got2.len(),
            1,
            "exactly one member per message: {out:?}"
        );
        for p in got1.iter().chain(&got2) {
            assert!(!p.retain, "shared delivery carries retain");
        }
        receivers.push(if got1.is_empty() { 2 } else { 1 });
        assert_eq!(payloads_to(&out, 3), vec![format!("m{i}")]);
        for (c, p) in [(1, got1), (2, got2)] {
            for p in p {
                b.handle(c, puback(p.packet_id), t0);
            }
        }
        for p in publishes_to(&out, 3) {
            b.handle(3, puback(p.packet_id), t0);
        }
        drain(&mut b);
    }
    for w in receivers.windows(2) {
        assert_ne!(w[0], w[1], "members do not alternate: {receivers:?}");
    }
}

#[test]
fn shared_subscription_prefers_connected_members() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("m1", 3600),
        "$share/g/t",
        QoS::AtLeastOnce,
        t0,
    );
    subscriber(&mut b, 2, v5("m2"), "$share/g/t", QoS::AtLeastOnce, t0);
    b.connection_lost(1, at(t0, 1));
    online(&mut b, 3, v5("pub"), t0);
    for i in 1..=4u16 {
        b.handle(
            3,
            pub_packet("t", &format!("m{i}"), QoS::AtLeastOnce, i),
            at(t0, 2),
        );
    }
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 2), vec!["m1", "m2", "m3", "m4"]);
    // Nothing was queued for the offline member.
    let (_, rest) = online(&mut b, 4, v5_persistent("m1", 3600), at(t0, 3));
    assert!(rest.is_empty(), "{rest:?}");
}

/// MQTT 5 §4.8.2: "if a Client has a Shared Subscription and a Non-shared Subscription and a
/// message matches both of them, the Client will receive a copy of the message by virtue of it
/// having the Non-shared Subscription. A second copy of the message will be delivered to one of
/// the subscribers to the Shared Subscription."
#[test]
fn shared_and_non_shared_subscription_of_one_client_give_two_copies() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("c"), t0);
    b.handle(
        1,
        subscribe_with(1, &[("t", opts(QoS::AtMostOnce))], Some(1)),
        t0,
    );
    b.handle(
        1,
        subscribe_with(2, &[("$share/g/t", opts(QoS::AtMostOnce))], Some(2)),
        t0,
    );
    drain(&mut b);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("t", "x", QoS::AtMostOnce, 0), t0);
    let p = publishes_to(&drain(&mut b), 1);
    assert_eq!(p.len(), 2, "{p:?}");
    let mut ids: Vec<Vec<u32>> = p
        .iter()
        .map(|p| p.properties.subscription_identifiers.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, vec![vec![1], vec![2]]);
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("c"), t0);
    b.handle(
        1,
        subscribe_with(
            1,
            &[(
                "$share/g/t",
                SubOptions {
                    no_local: true,
                    ..opts(QoS::AtMostOnce)
                },
            )],
            None,
        ),
        t0,
    );
    let out = drain(&mut b);
    let [Output::Close {
        conn: 1,
        disconnect: Some(d),
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(d.code, ReasonCode::PROTOCOL_ERROR);
    assert_eq!(b.connection_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Maximum packet size

/// The largest payload for which the PUBLISH `b` would send to a v5 client stays within `max`.
fn payload_len_for(max: usize, topic: &str, qos: QoS) -> usize {
    let mut n = 0;
    loop {
        let p = Publish {
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 1 },
            payload: vec![b'x'; n + 1].into(),
            ..publish(topic, "", qos, 0)
        };
        if Packet::Publish(p).encoded_len(Protocol::V5) > max {
            return n;
        }
        n += 1;
    }
}

#[test]
fn message_larger_than_the_clients_maximum_packet_size_is_not_sent() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("small");
    c.properties.make_mut().maximum_packet_size = Some(64);
    subscriber(&mut b, 1, c, "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let fits = payload_len_for(64, "t", qos);
        let dropped_before = b.stats().dropped_too_large;
        let mut p = publish("t", "", qos, if qos == QoS::AtMostOnce { 0 } else { 3 });
        p.payload = vec![b'a'; fits].into();
        b.handle(2, Packet::Publish(p.clone()), t0);
        let out = drain(&mut b);
        let got = publishes_to(&out, 1);
        assert_eq!(
            got.len(),
            1,
            "{qos:?}: a message of exactly the maximum size is sent"
        );
        assert_eq!(
            Packet::Publish(got[0].clone()).encoded_len(Protocol::V5),
            64
        );
        if qos == QoS::AtLeastOnce {
            b.handle(1, puback(got[0].packet_id), t0);
            drain(&mut b);
        }

        p.payload = vec![b'a'; fits + 1].into();
        b.handle(2, Packet::Publish(p), t0);
        let out = drain(&mut b);
        assert!(
            publishes_to(&out, 1).is_empty(),
            "{qos:?}: too large message sent: {out:?}"
        );
        assert_eq!(b.stats().dropped_too_large, dropped_before + 1);
        if qos == QoS::AtLeastOnce {
            assert_eq!(
                sent_to(&out, 2),
                vec![puback(3)],
                "the publisher still gets its PUBACK"
            );
        }
    }
    // A too-large QoS 1 message does not occupy the window.
    b.handle(2, pub_packet("t", "small", QoS::AtLeastOnce, 4), t0);
    assert_eq!(payloads_to(&drain(&mut b), 1), vec!["small"]);
}

/// A resumed session retransmits its unacknowledged messages; a retransmission above the new
/// connection's Maximum Packet Size must be discarded like any other too-large PUBLISH
/// (MQTT 5 §3.1.2.11.4: "behave as if it had completed sending").
#[test]
fn retransmission_on_resume_respects_the_new_maximum_packet_size() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(
        &mut b,
        1,
        v5_persistent("sub", 3600),
        "t",
        QoS::AtLeastOnce,
        t0,
    );
    online(&mut b, 2, v5("pub"), t0);
    let mut big = publish("t", "", QoS::AtLeastOnce, 1);
    big.payload = vec![b'b'; 200].into();
    b.handle(2, Packet::Publish(big), t0);
    assert_eq!(
        publishes_to(&drain(&mut b), 1).len(),
        1,
        "in flight, unacknowledged"
    );
    b.connection_lost(1, at(t0, 1));

    let mut small = v5_persistent("sub", 3600);
    small.properties.make_mut().maximum_packet_size = Some(64);
    let (ack, rest) = online(&mut b, 3, small, at(t0, 2));
    assert!(ack.session_present);
    for o in &rest {
        if let Output::Send { packet, .. } = o {
            let len = packet.encoded_len(Protocol::V5);
            assert!(
                len <= 64,
                "{len}-byte packet sent to a client with a 64-byte maximum"
            );
        }
    }
    // And the slot it held is free: a small message goes out.
    b.handle(2, pub_packet("t", "small", QoS::AtLeastOnce, 2), at(t0, 3));
    assert_eq!(payloads_to(&drain(&mut b), 3), vec!["small"]);
}

// ---------------------------------------------------------------------------------------------
// Queue limit

#[test]
fn offline_queue_keeps_max_queued_messages_and_counts_the_rest() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_queued_messages: 3,
        ..Limits::default()
    });
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    b.connection_lost(1, at(t0, 1));
    online(&mut b, 2, v3("pub", true), t0);
    for i in 1..=5u16 {
        b.handle(
            2,
            pub_packet("t", &format!("m{i}"), QoS::AtLeastOnce, i),
            at(t0, 2),
        );
    }
    drain(&mut b);
    assert_eq!(b.stats().dropped_queue_full, 2);
    let (_, rest) = online(&mut b, 3, v3("sub", false), at(t0, 3));
    assert_eq!(payloads_to(&rest, 3), vec!["m1", "m2", "m3"]);
}

#[test]
fn online_queue_beyond_the_window_is_limited_too() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_queued_messages: 2,
        ..Limits::default()
    });
    let mut c = v5("sub");
    c.properties.make_mut().receive_maximum = Some(1);
    subscriber(&mut b, 1, c, "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v5("pub"), t0);
    for i in 1..=5u16 {
        b.handle(
            2,
            pub_packet("t", &format!("m{i}"), QoS::AtLeastOnce, i),
            t0,
        );
    }
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 1), vec!["m1"]);
    assert_eq!(
        b.stats().dropped_queue_full,
        2,
        "1 in flight + 2 queued, 2 dropped"
    );
    let mut got = Vec::new();
    let mut last = publishes_to(&out, 1)[0].packet_id;
    for _ in 0..3 {
        b.handle(1, puback(last), t0);
        let p = publishes_to(&drain(&mut b), 1);
        if p.is_empty() {
            break;
        }
        last = p[0].packet_id;
        got.push(String::from_utf8(p[0].payload.to_vec()).unwrap());
    }
    assert_eq!(got, vec!["m2", "m3"]);
}

#[test]
fn unsubscribe_stops_delivery() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 1, v5("sub"), "t/+", QoS::AtMostOnce, t0);
    b.handle(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec!["t/+".into(), "never".into()],
            properties: Properties::default(),
        }),
        t0,
    );
    assert_eq!(
        sent_to(&drain(&mut b), 1),
        vec![Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        })]
    );
    assert_eq!(b.subscription_count(), 0);
    online(&mut b, 2, v5("pub"), t0);
    b.handle(2, pub_packet("t/a", "x", QoS::AtMostOnce, 0), t0);
    assert_eq!(drain(&mut b), vec![]);
}

// ---------------------------------------------------------------------------------------------
// ACL

fn acl() -> Acl {
    Acl {
        rules: vec![
            AclRule {
                allow: false,
                action: AclAction::Subscribe,
                filter: "secret/#".into(),
                user: None,
            },
            AclRule {
                allow: false,
                action: AclAction::Publish,
                filter: "ro/#".into(),
                user: None,
            },
        ],
        default_allow: true,
    }
}

#[test]
fn denied_subscribe_gets_suback_0x87() {
    let t0 = Instant::now();
    let mut b = broker_acl(Limits::default(), acl());
    online(&mut b, 1, v5("c5"), t0);
    b.handle(
        1,
        subscribe_with(
            1,
            &[
                ("secret/x", opts(QoS::AtLeastOnce)),
                ("open", opts(QoS::AtLeastOnce)),
            ],
            None,
        ),
        t0,
    );
    assert_eq!(
        sent_to(&drain(&mut b), 1),
        vec![Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![ReasonCode::NOT_AUTHORIZED, ReasonCode::GRANTED_QOS_1],
            properties: Properties::default(),
        })]
    );
    assert_eq!(ReasonCode::NOT_AUTHORIZED.0, 0x87);
    online(&mut b, 2, v3("c3", true), t0);
    b.handle(2, subscribe(9, "secret/#", QoS::AtMostOnce), t0);
    let out = sent_to(&drain(&mut b), 2);
    let [Packet::SubAck(ack)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(ack.codes[0].to_v3_suback(), 0x80);
    assert_eq!(b.subscription_count(), 1, "only `open`");

    // The denied subscription receives nothing.
    b.publish(
        Message {
            topic: "secret/x".into(),
            payload: bytes("s"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
            expires_at: None,
            publisher: "".into(),
        },
        t0,
    );
    assert_eq!(drain(&mut b), vec![]);
}

#[test]
fn denied_publish_gets_puback_0x87_on_v5_and_is_not_routed() {
    let t0 = Instant::now();
    let mut b = broker_acl(Limits::default(), acl());
    subscriber(&mut b, 9, v5("watch"), "#", QoS::AtLeastOnce, t0);
    online(&mut b, 1, v5("c"), t0);
    b.handle(1, pub_packet("ro/x", "no", QoS::AtLeastOnce, 3), t0);
    b.handle(1, pub_packet("ro/x", "no", QoS::ExactlyOnce, 4), t0);
    b.handle(1, retained("ro/x", "no", QoS::AtMostOnce, 0), t0);
    let out = drain(&mut b);
    assert_eq!(
        out,
        vec![
            Output::Send {
                conn: 1,
                packet: Packet::PubAck(PubAck::with_code(3, ReasonCode::NOT_AUTHORIZED)),
            },
            Output::Send {
                conn: 1,
                packet: Packet::PubRec(PubAck::with_code(4, ReasonCode::NOT_AUTHORIZED)),
            },
        ]
    );
    assert_eq!(b.retained_count(), 0);
    assert_eq!(b.connection_count(), 2);
}

#[test]
fn denied_publish_closes_a_v311_connection() {
    let t0 = Instant::now();
    let mut b = broker_acl(Limits::default(), acl());
    subscriber(&mut b, 9, v5("watch"), "#", QoS::AtLeastOnce, t0);
    let mut c = v3("c", true);
    c.will = Some(will("will/c", "gone", QoS::AtMostOnce));
    online(&mut b, 1, c, t0);
    b.handle(1, pub_packet("ro/x", "no", QoS::AtLeastOnce, 3), t0);
    let out = drain(&mut b);
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            disconnect: None
        }
    );
    assert!(sent_to(&out, 1).is_empty(), "{out:?}");
    assert_eq!(
        payloads_to(&out, 9),
        vec!["gone"],
        "only the will reaches the watcher"
    );
    assert_eq!(b.connection_count(), 1);
}

#[test]
fn will_topic_denied_by_acl_refuses_the_connect() {
    let t0 = Instant::now();
    let mut b = broker_acl(Limits::default(), acl());
    let mut c = v5("c");
    c.will = Some(will("ro/will", "x", QoS::AtMostOnce));
    assert_eq!(b.connect(1, c, t0), None);
    let out = drain(&mut b);
    assert!(
        matches!(&out[0], Output::Send { packet: Packet::ConnAck(a), .. } if a.code == ReasonCode::NOT_AUTHORIZED)
    );
    assert_eq!(
        out[1],
        Output::Close {
            conn: 1,
            disconnect: None
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Protocol errors

#[test]
fn publish_with_wildcard_topic_closes_with_0x90() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, v5("c5"), t0);
    online(&mut b, 2, v3("c3", true), t0);
    b.handle(1, pub_packet("a/+", "x", QoS::AtMostOnce, 0), t0);
    b.handle(2, pub_packet("a/#", "x", QoS::AtMostOnce, 0), t0);
    let out = drain(&mut b);
    let c = closes(&out);
    assert_eq!(c.len(), 2, "{out:?}");
    assert_eq!(c[0].0, 1);
    let d = c[0].1.as_ref().expect("v5 gets a DISCONNECT");
    assert_eq!(d.code, ReasonCode::TOPIC_NAME_INVALID);
    assert_eq!(d.code.0, 0x90);
    assert!(
        d.properties.reason_string.is_some(),
        "problem information requested by default"
    );
    assert_eq!(c[1], (2, None));
    assert_eq!(b.connection_count(), 0);
}

#[test]
fn no_reason_string_when_problem_information_is_not_requested() {
    let t0 = Instant::now();
    let mut b = broker();
    let mut c = v5("c");
    c.properties.make_mut().request_problem_information = Some(0);
    online(&mut b, 1, c, t0);
    b.handle(1, pub_packet("a/+", "x", QoS::AtMostOnce, 0), t0);
    let out = drain(&mut b);
    assert_eq!(
        out,
        vec![Output::Close {
            conn: 1,
            disconnect: Some(Disconnect {
                code: ReasonCode::TOPIC_NAME_INVALID,
                properties: Properties::default(),
            }),
        }]
    );
}

#[test]
fn second_connect_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), None), t0);
    b.handle(1, Packet::Connect(Box::new(v5("c"))), t0);
    let out = drain(&mut b);
    let c = closes(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(c[0].0, 1);
    assert_eq!(
        c[0].1.as_ref().map(|d| d.code),
        Some(ReasonCode::PROTOCOL_ERROR)
    );
    assert_eq!(
        payloads_to(&out, 9),
        vec!["gone"],
        "a protocol error publishes the will"
    );
}

#[test]
fn server_only_packets_from_a_client_are_protocol_errors() {
    let t0 = Instant::now();
    let mut b = broker();
    for (conn, packet) in [
        (1, Packet::ConnAck(ConnAck::default())),
        (2, Packet::SubAck(SubAck::default())),
        (3, Packet::UnsubAck(UnsubAck::default())),
        (4, Packet::PingResp),
    ] {
        online(&mut b, conn, v5(&format!("c{conn}")), t0);
        b.handle(conn, packet, t0);
        let out = drain(&mut b);
        assert_eq!(closes(&out).len(), 1, "{out:?}");
        assert_eq!(
            closes(&out)[0].1.as_ref().unwrap().code,
            ReasonCode::PROTOCOL_ERROR
        );
    }
}

#[test]
fn disconnect_raising_session_expiry_from_0_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut b = broker();
    will_watcher(&mut b, t0);
    online(&mut b, 1, with_will(v5("c"), None), t0);
    let mut d = Disconnect::default();
    d.properties.make_mut().session_expiry_interval = Some(100);
    b.handle(1, Packet::Disconnect(d), at(t0, 1));
    let out = drain(&mut b);
    let c = closes(&out);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(
        c[0].1.as_ref().map(|d| d.code),
        Some(ReasonCode::PROTOCOL_ERROR)
    );
    assert_eq!(
        payloads_to(&out, 9),
        vec!["gone"],
        "the DISCONNECT was not a normal one"
    );
    assert_eq!(
        b.session_count(),
        1,
        "the session (expiry 0) ended; only the watcher's is left"
    );
}

#[test]
fn qos_above_maximum_is_refused() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        max_qos: QoS::AtLeastOnce,
        ..Limits::default()
    });
    online(&mut b, 1, v5("c"), t0);
    b.handle(1, pub_packet("t", "x", QoS::ExactlyOnce, 1), t0);
    let c = closes(&drain(&mut b));
    assert_eq!(
        c[0].1.as_ref().map(|d| d.code),
        Some(ReasonCode::QOS_NOT_SUPPORTED)
    );
}

#[test]
fn retain_when_unavailable_is_refused() {
    let t0 = Instant::now();
    let mut b = broker_with(Limits {
        retain_available: false,
        ..Limits::default()
    });
    online(&mut b, 1, v5("c"), t0);
    b.handle(1, retained("t", "x", QoS::AtMostOnce, 0), t0);
    let c = closes(&drain(&mut b));
    assert_eq!(
        c[0].1.as_ref().map(|d| d.code),
        Some(ReasonCode::RETAIN_NOT_SUPPORTED)
    );
    assert_eq!(b.retained_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn shutdown_disconnects_every_connection_with_0x8b_and_publishes_no_will() {
    let t0 = Instant::now();
    let mut b = broker();
    online(&mut b, 1, with_will(v5("a"), None), t0);
    online(&mut b, 2, with_will(v5("b"), None), t0);
    let mut c = v3("c", true);
    c.will = Some(will("will/c", "gone", QoS::AtMostOnce));
    online(&mut b, 3, c, t0);
    subscriber(&mut b, 4, v5("watcher"), "will/#", QoS::AtMostOnce, t0);
    b.shutdown(at(t0, 1));
    let out = drain(&mut b);
    assert!(
        out.iter().all(|o| matches!(o, Output::Close { .. })),
        "only closes: {out:?}"
    );
    let mut c = closes(&out);
    c.sort_by_key(|(conn, _)| *conn);
    let shutting_down = Some(Disconnect {
        code: ReasonCode::SERVER_SHUTTING_DOWN,
        properties: Properties::default(),
    });
    assert_eq!(
        c,
        vec![
            (1, shutting_down.clone()),
            (2, shutting_down.clone()),
            (3, None),
            (4, shutting_down),
        ]
    );
    assert_eq!(ReasonCode::SERVER_SHUTTING_DOWN.0, 0x8B);
    assert_eq!(b.connection_count(), 0);
}

#[test]
fn poll_timeout_is_none_without_timers() {
    let t0 = Instant::now();
    let mut b = broker();
    assert_eq!(b.poll_timeout(), None);
    online(&mut b, 1, v5("c"), t0);
    assert_eq!(b.poll_timeout(), None);
    b.handle_timeout(at(t0, 1_000_000));
    assert_eq!(drain(&mut b), vec![]);
}
