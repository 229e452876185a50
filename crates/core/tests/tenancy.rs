//! The cloud-service behaviour of the core on a virtual clock: P2P messages, per-connection
//! permissions, instance topic rules, subscription and payload limits, kick and queries.

mod common;

use common::*;
use ferry_codec::{Packet, QoS, ReasonCode};
use ferry_core::{Broker, ClientGrant, Grant, Limits, Permissions, TopicPolicy};
use std::sync::Arc;
use std::time::Instant;

fn cloud_limits() -> Limits {
    Limits {
        p2p: true,
        max_subscriptions_per_client: 3,
        max_payload_size: 16,
        ..Limits::default()
    }
}

fn connect_with(
    b: &mut Broker,
    conn: u64,
    connect: ferry_codec::Connect,
    perms: Permissions,
    t: Instant,
) {
    let grant = ClientGrant {
        permissions: perms,
        peer: Some(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            40000 + conn as u16,
        ))),
    };
    assert!(b.connect_with(conn, connect, grant, t).is_some());
    drain(b);
}

#[test]
fn p2p_reaches_only_the_addressed_client_without_a_subscription() {
    let t0 = Instant::now();
    let mut b = broker_with(cloud_limits());
    online(&mut b, 1, v5("GID_test@@@a"), t0);
    subscriber(
        &mut b,
        2,
        v5("GID_test@@@b"),
        "TopicA/#",
        QoS::AtLeastOnce,
        t0,
    );
    online(&mut b, 3, v5("GID_test@@@sender"), t0);
    b.handle(
        3,
        pub_packet("TopicA/p2p/GID_test@@@a", "hi", QoS::AtLeastOnce, 1),
        t0,
    );
    let out = drain(&mut b);
    assert_eq!(payloads_to(&out, 1), vec!["hi"]);
    assert_eq!(publishes_to(&out, 1)[0].qos, QoS::AtLeastOnce);
    assert!(
        payloads_to(&out, 2).is_empty(),
        "a wildcard subscriber must not see P2P"
    );
    // To an unknown client: nobody gets it, the publisher still gets its PUBACK.
    b.handle(
        3,
        pub_packet("TopicA/p2p/nobody", "x", QoS::AtLeastOnce, 2),
        t0,
    );
    let out = drain(&mut b);
    assert!(payloads_to(&out, 1).is_empty() && payloads_to(&out, 2).is_empty());
    assert!(matches!(sent_to(&out, 3).as_slice(), [Packet::PubAck(a)] if a.packet_id == 2));
}

#[test]
fn p2p_is_ordinary_routing_when_switched_off() {
    let t0 = Instant::now();
    let mut b = broker();
    subscriber(&mut b, 2, v5("b"), "TopicA/#", QoS::AtMostOnce, t0);
    online(&mut b, 3, v5("s"), t0);
    b.handle(3, pub_packet("TopicA/p2p/a", "hi", QoS::AtMostOnce, 0), t0);
    assert_eq!(payloads_to(&drain(&mut b), 2), vec!["hi"]);
}

#[test]
fn permissions_limit_publish_and_subscribe() {
    let t0 = Instant::now();
    let mut b = broker_with(cloud_limits());
    let read_only = Permissions {
        publish: Grant::Nothing,
        subscribe: Grant::Filters(vec!["TopicA/#".into()]),
    };
    connect_with(&mut b, 1, v5("r5"), read_only.clone(), t0);
    connect_with(&mut b, 2, v3("r3", true), read_only, t0);
    b.handle(1, subscribe(1, "TopicB/x", QoS::AtMostOnce), t0);
    b.handle(1, subscribe(2, "TopicA/+", QoS::AtMostOnce), t0);
    let out = drain(&mut b);
    let codes: Vec<_> = sent_to(&out, 1)
        .into_iter()
        .filter_map(|p| match p {
            Packet::SubAck(a) => Some(a.codes[0]),
            _ => None,
        })
        .collect();
    assert_eq!(codes, vec![ReasonCode::NOT_AUTHORIZED, ReasonCode::SUCCESS]);
    // v5: PUBACK 0x87; v3: the connection is closed.
    b.handle(1, pub_packet("TopicA/x", "no", QoS::AtLeastOnce, 3), t0);
    let out = drain(&mut b);
    assert!(
        matches!(sent_to(&out, 1).as_slice(), [Packet::PubAck(a)] if a.code == ReasonCode::NOT_AUTHORIZED)
    );
    b.handle(2, pub_packet("TopicA/x", "no", QoS::AtLeastOnce, 1), t0);
    assert_eq!(closes(&drain(&mut b)), vec![(2, None)]);
}

#[test]
fn set_permissions_applies_at_once() {
    let t0 = Instant::now();
    let mut b = broker();
    let nothing = Permissions {
        publish: Grant::Nothing,
        subscribe: Grant::Nothing,
    };
    connect_with(&mut b, 1, v5("t"), nothing, t0);
    subscriber(&mut b, 2, v5("s"), "a/#", QoS::AtMostOnce, t0);
    b.set_permissions(
        1,
        Permissions {
            publish: Grant::Filters(vec!["a/#".into()]),
            subscribe: Grant::Nothing,
        },
    );
    b.handle(1, pub_packet("a/b", "now", QoS::AtMostOnce, 0), t0);
    assert_eq!(payloads_to(&drain(&mut b), 2), vec!["now"]);
}

struct OnlyParent(&'static str);

impl TopicPolicy for OnlyParent {
    fn allows(&self, topic: &str, _is_filter: bool) -> bool {
        topic.split('/').next() == Some(self.0)
    }
}

#[test]
fn topic_policy_refuses_unknown_parents() {
    let t0 = Instant::now();
    let mut b = broker().with_policy(Arc::new(OnlyParent("TopicA")));
    online(&mut b, 1, v5("c"), t0);
    b.handle(1, subscribe(1, "Other/#", QoS::AtMostOnce), t0);
    b.handle(1, pub_packet("Other/x", "x", QoS::AtLeastOnce, 2), t0);
    b.handle(1, pub_packet("TopicA/x", "x", QoS::AtLeastOnce, 3), t0);
    let out = sent_to(&drain(&mut b), 1);
    assert!(matches!(&out[0], Packet::SubAck(a) if a.codes == vec![ReasonCode::NOT_AUTHORIZED]));
    assert!(matches!(&out[1], Packet::PubAck(a) if a.code == ReasonCode::NOT_AUTHORIZED));
    assert!(matches!(&out[2], Packet::PubAck(a) if a.code == ReasonCode::SUCCESS));
}

#[test]
fn subscription_limit_and_payload_limit() {
    let t0 = Instant::now();
    let mut b = broker_with(cloud_limits());
    online(&mut b, 1, v5("c"), t0);
    for (i, f) in ["a/1", "a/2", "a/3", "a/4"].iter().enumerate() {
        b.handle(1, subscribe(i as u16 + 1, f, QoS::AtMostOnce), t0);
    }
    // Re-subscribing to an existing filter does not count as a new one.
    b.handle(1, subscribe(9, "a/1", QoS::AtLeastOnce), t0);
    let codes: Vec<_> = sent_to(&drain(&mut b), 1)
        .into_iter()
        .filter_map(|p| match p {
            Packet::SubAck(a) => Some(a.codes[0]),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            ReasonCode::SUCCESS,
            ReasonCode::SUCCESS,
            ReasonCode::SUCCESS,
            ReasonCode::QUOTA_EXCEEDED,
            ReasonCode::GRANTED_QOS_1
        ]
    );
    b.handle(
        1,
        pub_packet("a/1", &"x".repeat(17), QoS::AtMostOnce, 0),
        t0,
    );
    let out = drain(&mut b);
    assert!(
        matches!(closes(&out).as_slice(), [(1, Some(d))] if d.code == ReasonCode::PACKET_TOO_LARGE)
    );
}

#[test]
fn kick_and_queries() {
    let t0 = Instant::now();
    let mut b = broker();
    let grant = ClientGrant {
        permissions: Permissions::full(),
        peer: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 5555))),
    };
    assert!(b.connect_with(1, v5("GID_test@@@d1"), grant, t0).is_some());
    b.handle(1, subscribe(1, "x/#", QoS::AtLeastOnce), at(t0, 2));
    drain(&mut b);
    subscriber(
        &mut b,
        2,
        v3("GID_test@@@d2", false),
        "x/y",
        QoS::AtMostOnce,
        t0,
    );
    drain(&mut b);
    let info = b.client_info("GID_test@@@d1").unwrap();
    assert!(info.online);
    assert_eq!(info.peer.as_deref(), Some("127.0.0.1:5555"));
    assert_eq!(
        info.subscriptions,
        vec![("x/#".to_string(), QoS::AtLeastOnce)]
    );
    assert_eq!(info.last_activity, Some(at(t0, 2)));
    assert_eq!(b.online_in_group("GID_test"), 2);
    assert_eq!(b.subscribers_of("x/y"), 2);
    assert_eq!(b.subscribers_of("x/z"), 1);
    assert!(b.kick("GID_test@@@d2", at(t0, 3)));
    assert!(matches!(closes(&drain(&mut b)).as_slice(), [(2, None)]));
    assert!(!b.kick("GID_test@@@d2", at(t0, 3)), "already offline");
    let d2 = b.client_info("GID_test@@@d2").unwrap();
    assert!(!d2.online, "a persistent session stays, offline");
    assert_eq!(d2.last_activity, Some(at(t0, 3)));
    assert_eq!(b.online_in_group("GID_test"), 1);
    assert!(b.kick("GID_test@@@d1", at(t0, 4)));
    let out = drain(&mut b);
    assert!(
        matches!(closes(&out).as_slice(), [(1, Some(d))] if d.code == ReasonCode::ADMINISTRATIVE_ACTION)
    );
    assert!(
        b.client_info("GID_test@@@d1").is_none(),
        "clean session ended"
    );
}
