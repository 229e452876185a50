//! Persistence in the core, on a virtual clock: the store operations it emits, the answers
//! that wait for durability, offline queues kept on disk only and read back on reconnect.

mod common;

use common::*;
use ferry_codec::{Packet, QoS};
use ferry_core::persist::{MessageState, StoreOp, StoredMessage};
use ferry_core::{Acl, Broker, Limits, Output};
use std::collections::BTreeMap;
use std::time::Instant;

fn persistent_broker() -> Broker {
    Broker::new(Limits::default(), Acl::default()).with_persistence()
}

/// Applies store ops to a map of (client, seq) → message, like the runtime's store would.
fn apply(store: &mut BTreeMap<(String, u64), StoredMessage>, b: &mut Broker) -> usize {
    let mut n = 0;
    for op in b.drain_store_ops() {
        n += 1;
        match op {
            StoreOp::Message {
                client_id,
                seq,
                message,
            } => {
                store.insert((client_id.to_string(), seq), message);
            }
            StoreOp::MessageDeleted { client_id, seq } => {
                store.remove(&(client_id.to_string(), seq));
            }
            StoreOp::SessionDeleted { client_id } => {
                store.retain(|(c, _), _| c != client_id.as_str());
            }
            _ => {}
        }
    }
    n
}

/// Answers the core's loads from the map and acknowledges what `conn` receives until nothing
/// more comes; the payloads in arrival order.
fn take_all(
    store: &mut BTreeMap<(String, u64), StoredMessage>,
    b: &mut Broker,
    conn: ferry_core::ConnId,
    now: Instant,
) -> Vec<String> {
    let mut received = Vec::new();
    for _ in 0..1000 {
        let requests: Vec<_> = b.drain_loads().collect();
        for request in &requests {
            let messages: Vec<(u64, StoredMessage)> = store
                .range((request.client_id.to_string(), request.after_seq + 1)..)
                .take_while(|((c, _), _)| c == request.client_id.as_str())
                .take(request.limit)
                .map(|((_, seq), m)| (*seq, m.clone()))
                .collect();
            b.loaded(&request.client_id, request.limit, messages, now);
        }
        let publishes = publishes_to(&drain(b), conn);
        if publishes.is_empty() && requests.is_empty() {
            break;
        }
        for p in publishes {
            received.push(String::from_utf8_lossy(&p.payload).into_owned());
            b.handle(conn, puback(p.packet_id), now);
        }
        apply(store, b);
    }
    received
}

#[test]
fn acknowledgements_of_stored_messages_wait_for_durability() {
    let t0 = Instant::now();
    let mut b = persistent_broker();
    let mut store = BTreeMap::new();
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    apply(&mut store, &mut b);
    b.connection_lost(1, t0);
    apply(&mut store, &mut b);
    online(&mut b, 2, v5("pub"), t0);
    // Reaches a stored session: the PUBACK waits.
    b.handle(2, pub_packet("t", "x", QoS::AtLeastOnce, 1), t0);
    let out = drain(&mut b);
    assert!(matches!(
        out.as_slice(),
        [Output::SendDurable {
            conn: 2,
            packet: Packet::PubAck(_)
        }]
    ));
    assert_eq!(apply(&mut store, &mut b), 1);
    assert_eq!(store.len(), 1);
    // Reaches nobody stored: the PUBACK goes at once.
    b.handle(2, pub_packet("other", "y", QoS::AtLeastOnce, 2), t0);
    assert!(matches!(
        drain(&mut b).as_slice(),
        [Output::Send {
            conn: 2,
            packet: Packet::PubAck(_)
        }]
    ));
    assert_eq!(apply(&mut store, &mut b), 0);
}

#[test]
fn offline_queues_live_on_disk_and_come_back_in_order() {
    let t0 = Instant::now();
    let mut b = persistent_broker();
    let mut store = BTreeMap::new();
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    b.connection_lost(1, t0);
    online(&mut b, 2, v3("pub", true), t0);
    for i in 0..600u16 {
        b.handle(
            2,
            pub_packet("t", &format!("m{i}"), QoS::AtLeastOnce, i + 1),
            t0,
        );
    }
    drain(&mut b);
    apply(&mut store, &mut b);
    assert_eq!(store.len(), 600, "every queued message is stored");
    let info = b.client_info("sub").unwrap();
    assert_eq!(info.queued, 600);
    assert!(
        b.drain_loads().next().is_none(),
        "nothing is read while offline"
    );

    // Back online: the core asks for the spilled messages, a window at a time.
    let (ack, _) = online(&mut b, 1, v3("sub", false), t0);
    assert!(ack.session_present);
    let received = take_all(&mut store, &mut b, 1, t0);
    let expected: Vec<String> = (0..600).map(|i| format!("m{i}")).collect();
    assert_eq!(received.len(), 600);
    assert_eq!(received, expected, "in order, once each");
    assert!(store.is_empty(), "acknowledged messages leave the store");
}

#[test]
fn restored_sessions_keep_inflight_in_memory_and_queued_on_disk() {
    let t0 = Instant::now();
    let mut b = persistent_broker();
    let mut store = BTreeMap::new();
    subscriber(&mut b, 1, v3("sub", false), "t", QoS::AtLeastOnce, t0);
    online(&mut b, 2, v3("pub", true), t0);
    b.handle(2, pub_packet("t", "inflight", QoS::AtLeastOnce, 1), t0);
    drain(&mut b);
    b.connection_lost(1, t0);
    b.handle(2, pub_packet("t", "queued", QoS::AtLeastOnce, 2), t0);
    drain(&mut b);
    let mut record = None;
    for op in b.drain_store_ops() {
        match op {
            StoreOp::Session(r) if r.client_id.as_str() == "sub" => record = Some(r),
            StoreOp::Message {
                client_id,
                seq,
                message,
            } => {
                store.insert((client_id.to_string(), seq), message);
            }
            _ => {}
        }
    }
    let record = record.expect("session stored");
    assert_eq!(record.subscriptions.len(), 1);
    let states: Vec<_> = store.values().map(|m| m.state).collect();
    assert_eq!(states, vec![MessageState::Published, MessageState::Queued]);

    // A new core restores it: the in-flight message is resent first (DUP), the queued one is
    // read back after.
    let mut b2 = persistent_broker();
    let inflight: Vec<_> = store
        .iter()
        .filter(|(_, m)| m.state != MessageState::Queued)
        .map(|((_, s), m)| (*s, m.clone()))
        .collect();
    b2.restore_session(record, inflight, 1, 3, t0);
    let (ack, rest) = online(&mut b2, 7, v3("sub", false), t0);
    assert!(ack.session_present);
    let first = publishes_to(&rest, 7);
    assert_eq!(first.len(), 1);
    assert!(first[0].dup);
    assert_eq!(&first[0].payload[..], b"inflight");
    let request = b2
        .drain_loads()
        .next()
        .expect("asks for the queued message");
    let queued: Vec<_> = store
        .iter()
        .filter(|((_, s), _)| *s > request.after_seq)
        .map(|((_, s), m)| (*s, m.clone()))
        .collect();
    b2.loaded("sub", request.limit, queued, t0);
    assert_eq!(payloads_to(&drain(&mut b2), 7), vec!["queued"]);
}

#[test]
fn a_mass_of_expiring_sessions_is_worked_off_in_bounded_steps() {
    let t0 = Instant::now();
    let mut b = Broker::new(Limits::default(), Acl::default());
    let n = 3 * ferry_core::broker::MAX_TIMERS_PER_CALL as u64 + 5;
    for i in 0..n {
        online(&mut b, i, v5_persistent(&format!("c{i}"), 10), t0);
        b.connection_lost(i, t0);
    }
    drain(&mut b);
    assert_eq!(b.session_count() as u64, n);
    let due = at(t0, 10);
    let mut calls = 0;
    while b.poll_timeout().is_some_and(|t| t <= due) {
        let before = b.session_count();
        b.handle_timeout(due);
        assert!(before - b.session_count() <= ferry_core::broker::MAX_TIMERS_PER_CALL);
        calls += 1;
        assert!(calls < 100, "makes progress");
    }
    assert_eq!(calls, 4);
    assert_eq!(b.session_count(), 0);
}

/// Runs the core's eviction requests against the map, like the runtime does with the store.
fn run_evictions(store: &mut BTreeMap<(String, u64), StoredMessage>, b: &mut Broker) -> usize {
    let mut rounds = 0;
    loop {
        apply(store, b);
        let requests: Vec<_> = b.drain_evictions().collect();
        if requests.is_empty() {
            return rounds;
        }
        for r in requests {
            rounds += 1;
            let client = r.client_id.to_string();
            let keys: Vec<(u64, MessageState)> = store
                .range((client.clone(), r.after_seq + 1)..)
                .take_while(|((c, _), _)| *c == client)
                .map(|((_, seq), m)| (*seq, m.state))
                .collect();
            let (mut deleted, mut last, mut head) = (0, 0, None);
            for (seq, state) in keys {
                if state != MessageState::Queued {
                    continue;
                }
                if seq <= r.below_seq && deleted < r.max {
                    store.remove(&(client.clone(), seq));
                    deleted += 1;
                    last = seq;
                } else {
                    head = Some(seq);
                    break;
                }
            }
            b.evicted(&r.client_id, deleted, last, head);
        }
    }
}

#[test]
fn the_offline_cap_evicts_the_oldest_messages_of_the_instance_first() {
    let t0 = Instant::now();
    let limits = Limits {
        max_offline_messages: 100,
        ..Limits::default()
    };
    let mut b = Broker::new(limits, Acl::default()).with_persistence();
    let mut store = BTreeMap::new();
    for (conn, name) in [(1, "a"), (2, "b"), (3, "c")] {
        subscriber(&mut b, conn, v3(name, false), name, QoS::AtLeastOnce, t0);
        b.connection_lost(conn, t0);
    }
    online(&mut b, 9, v3("pub", true), t0);
    // 180 messages: 60 to a, then a, b, c in turn, then 30 to c. The runtime answers
    // evictions only every 25 publishes (they wait for the disk), so most requests ask for
    // many messages at once and must stop at the next session's oldest message.
    let mut order: Vec<(String, String)> = Vec::new();
    for i in 0..180u16 {
        let to = match i {
            0..=59 => "a",
            60..=149 => ["a", "b", "c"][usize::from(i % 3)],
            _ => "c",
        };
        let payload = format!("{to}{i}");
        b.handle(9, pub_packet(to, &payload, QoS::AtLeastOnce, i + 1), t0);
        drain(&mut b);
        apply(&mut store, &mut b);
        if i % 25 == 24 {
            run_evictions(&mut store, &mut b);
        }
        order.push((to.to_string(), payload));
    }
    run_evictions(&mut store, &mut b);
    assert_eq!(b.offline_messages(), 100);
    assert_eq!(store.len(), 100, "the store holds the cap");
    assert_eq!(b.stats().evicted_offline, 80, "every eviction is counted");
    // Exactly the newest 100 are left.
    let kept: Vec<(String, String)> = order[80..].to_vec();
    let mut left: Vec<(u64, String, String)> = store
        .iter()
        .map(|((c, seq), m)| {
            let payload = String::from_utf8_lossy(&m.delivery.msg.payload).into_owned();
            (*seq, c.clone(), payload)
        })
        .collect();
    left.sort();
    let left: Vec<(String, String)> = left.into_iter().map(|(_, c, p)| (c, p)).collect();
    assert_eq!(left, kept, "oldest first, across sessions");
    // Each client gets its survivors, in order.
    for (conn, name) in [(1, "a"), (2, "b"), (3, "c")] {
        online(&mut b, conn, v3(name, false), t0);
        let received = take_all(&mut store, &mut b, conn, t0);
        let expected: Vec<String> = kept
            .iter()
            .filter(|(c, _)| c == name)
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(received, expected, "{name} gets what was kept, in order");
    }
    assert_eq!(b.offline_messages(), 0);
}

#[test]
fn publishes_under_an_outflow_parent_go_to_the_queue_before_they_are_acknowledged() {
    let t0 = Instant::now();
    let mut b = Broker::new(Limits::default(), Acl::default());
    b.set_outflow_parents(["TopicA".to_string()]);
    online(&mut b, 1, v3("GID_x@@@dev1", false), t0);
    subscriber(&mut b, 2, v5("watcher"), "#", QoS::AtLeastOnce, t0);
    b.handle(
        1,
        pub_packet("TopicA/testMq4Iot", "r1", QoS::AtLeastOnce, 7),
        t0,
    );
    let out = drain(&mut b);
    assert!(
        out.iter().any(|o| matches!(o, Output::SendDurable { conn: 1, packet: Packet::PubAck(a) } if a.packet_id == 7)),
        "the PUBACK waits for the queue: {out:?}"
    );
    assert_eq!(
        publishes_to(&out, 2).len(),
        1,
        "MQTT subscribers get it as usual"
    );
    let outflow: Vec<_> = b.drain_outflow().collect();
    assert_eq!(outflow.len(), 1);
    assert_eq!(outflow[0].client_id.as_str(), "GID_x@@@dev1");
    assert!(!outflow[0].clean_start);
    assert_eq!(outflow[0].msg.topic.as_str(), "TopicA/testMq4Iot");

    // Other parents, and QoS 0, are not held; QoS 0 still goes to the queue.
    b.handle(1, pub_packet("TopicB/x", "r2", QoS::AtLeastOnce, 8), t0);
    let out = drain(&mut b);
    assert!(out.iter().any(
        |o| matches!(o, Output::Send { conn: 1, packet: Packet::PubAck(a) } if a.packet_id == 8)
    ));
    assert_eq!(b.drain_outflow().count(), 0);
    b.handle(1, pub_packet("TopicA", "r3", QoS::AtMostOnce, 0), t0);
    drain(&mut b);
    assert_eq!(
        b.drain_outflow().count(),
        1,
        "the parent itself is under the parent"
    );
    // Once the rule is gone, nothing goes to the queue.
    b.set_outflow_parents(Vec::<String>::new());
    b.handle(1, pub_packet("TopicA/y", "r4", QoS::AtLeastOnce, 9), t0);
    drain(&mut b);
    assert_eq!(b.drain_outflow().count(), 0, "no rule any more");
}
