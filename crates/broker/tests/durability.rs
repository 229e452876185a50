//! Durability over real sockets: persistent sessions, their queued messages and retained
//! messages survive a restart on the same store, and a failed store write is never
//! acknowledged.

mod common;

use common::{cid, Client};
use ferry_broker::persist::{Clock, Persistence};
use ferry_broker::{Config, Server};
use ferry_codec::{Packet, Protocol, QoS, ReasonCode};
use ferry_meta::{InstanceSettings, Meta, Profile};
use ferry_store::{Durability, Engine, FjallEngine, MemoryEngine, StoreError, Writer};
use std::sync::Arc;

async fn start(engine: Arc<dyn Engine>) -> Server {
    start_with(engine, InstanceSettings::for_profile(Profile::Standard)).await
}

async fn start_with(engine: Arc<dyn Engine>, settings: InstanceSettings) -> Server {
    let meta = Arc::new(Meta::new());
    meta.create_instance("default", "default", Profile::Standard, Some(settings), 0)
        .unwrap();
    let persistence = Arc::new(Persistence {
        writer: std::sync::Arc::new(Writer::start(engine.clone(), Durability::Sync, 16)),
        engine,
        sync: true,
        clock: Clock::now(),
    });
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    Server::start_with_store(config, meta, Some(persistence))
        .await
        .expect("server starts")
}

/// A v3.1.1 CONNECT with clean session 0.
async fn persistent(addr: std::net::SocketAddr, id: &str) -> (Client, bool) {
    let packet = Packet::Connect(Box::new(ferry_codec::Connect {
        protocol: Protocol::V3_1_1,
        clean_start: false,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }));
    let (client, ack) = Client::connect_with(addr, packet).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    (client, ack.session_present)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_queues_and_retained_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).unwrap());
    let server = start(engine).await;
    let addr = server.local_addr();
    let sub_id = cid("durable-sub");
    let (mut sub, present) = persistent(addr, &sub_id).await;
    assert!(!present);
    sub.subscribe(1, "dur/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publisher = Client::v3(addr, &cid("durable-pub")).await;
    for i in 1..=5u16 {
        publisher
            .send(&common::publish(
                "dur/x",
                QoS::AtLeastOnce,
                i,
                format!("m{i}").as_bytes(),
            ))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(a) if a.packet_id == i));
    }
    let mut retained = common::publish("dur/r", QoS::AtLeastOnce, 9, b"kept");
    if let Packet::Publish(p) = &mut retained {
        p.retain = true;
    }
    publisher.send(&retained).await;
    assert!(matches!(publisher.recv().await, Packet::PubAck(a) if a.packet_id == 9));
    server.shutdown().await;

    // A new server on the same store.
    let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).unwrap());
    let server = start(engine).await;
    let (mut sub, present) = persistent(server.local_addr(), &sub_id).await;
    assert!(present, "the session survived");
    let mut got = Vec::new();
    while got.len() < 6 {
        match sub.recv().await {
            Packet::Publish(p) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                sub.send(&Packet::PubAck(ferry_codec::PubAck::new(p.packet_id)))
                    .await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, vec!["m1", "m2", "m3", "m4", "m5", "kept"]);
    let mut fresh = Client::v3(server.local_addr(), &cid("fresh")).await;
    fresh.subscribe(1, "dur/r", QoS::AtMostOnce).await;
    assert!(
        matches!(fresh.recv().await, Packet::Publish(p) if p.retain && &p.payload[..] == b"kept")
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_write_is_never_acknowledged() {
    let memory = Arc::new(MemoryEngine::new());
    let engine: Arc<dyn Engine> = memory.clone();
    let server = start(engine).await;
    let addr = server.local_addr();
    let (mut sub, _) = persistent(addr, &cid("full-sub")).await;
    sub.subscribe(1, "full/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    memory.fail_writes(Some(StoreError::DiskFull("no space left on device".into())));
    let mut publisher = Client::v5(addr, &cid("full-pub")).await;
    publisher
        .send(&common::publish("full/x", QoS::AtLeastOnce, 1, b"lost?"))
        .await;
    // No PUBACK: the connection is closed with 0x97 (quota exceeded: the disk is full).
    publisher
        .expect_disconnect(ReasonCode::QUOTA_EXCEEDED)
        .await;
    publisher.expect_closed().await;

    // Messages that need no storing still flow, and storing works again once space is back.
    memory.fail_writes(None);
    let mut publisher = Client::v5(addr, &cid("full-pub2")).await;
    publisher
        .send(&common::publish("full/x", QoS::AtLeastOnce, 2, b"stored"))
        .await;
    assert!(
        matches!(publisher.recv().await, Packet::PubAck(a) if a.packet_id == 2 && a.code == ReasonCode::SUCCESS)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_older_than_the_retention_are_dropped() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let settings = InstanceSettings {
        offline_retention_secs: 1,
        ..InstanceSettings::for_profile(Profile::Standard)
    };
    let server = start_with(engine, settings).await;
    let addr = server.local_addr();
    let sub_id = cid("retention-sub");
    let (mut sub, _) = persistent(addr, &sub_id).await;
    sub.subscribe(1, "ret/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = Client::v3(addr, &cid("retention-pub")).await;
    for i in 1..=3u16 {
        publisher
            .send(&common::publish("ret/x", QoS::AtLeastOnce, i, b"old"))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    publisher
        .send(&common::publish("ret/x", QoS::AtLeastOnce, 4, b"fresh"))
        .await;
    assert!(matches!(publisher.recv().await, Packet::PubAck(_)));

    let (mut sub, present) = persistent(addr, &sub_id).await;
    assert!(present);
    match sub.recv().await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"fresh", "the old ones expired"),
        other => panic!("unexpected {other:?}"),
    }
    sub.expect_silence(std::time::Duration::from_millis(300))
        .await;
    server.shutdown().await;
}

/// Reconnects `id` and takes its queued messages (acknowledging each) until it goes quiet.
async fn drain_queue(addr: std::net::SocketAddr, id: &str) -> Vec<String> {
    let (mut sub, present) = persistent(addr, id).await;
    assert!(present);
    let mut got = Vec::new();
    while let Some(packet) = sub.try_recv(std::time::Duration::from_millis(500)).await {
        if let Packet::Publish(p) = packet {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
            sub.send(&Packet::PubAck(ferry_codec::PubAck::new(p.packet_id)))
                .await;
        }
    }
    sub.disconnect().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_cap_evicts_the_oldest_first_counts_and_raises_an_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).unwrap());
    let settings = InstanceSettings {
        max_offline_messages: 50,
        ..InstanceSettings::for_profile(Profile::Standard)
    };
    let server = start_with(engine.clone(), settings).await;
    let addr = server.local_addr();
    for id in ["cap-a", "cap-b"] {
        let (mut sub, _) = persistent(addr, id).await;
        sub.subscribe(1, &format!("cap/{id}"), QoS::AtLeastOnce)
            .await;
        sub.disconnect().await;
    }
    // 30 to a, then 60 alternating, then 30 to b: 120 in all, 70 over the cap.
    let mut publisher = Client::v3(addr, &cid("cap-pub")).await;
    let mut order = Vec::new();
    for i in 0..120u16 {
        let to = match i {
            0..=29 => "cap-a",
            30..=89 if i % 2 == 0 => "cap-a",
            30..=89 => "cap-b",
            _ => "cap-b",
        };
        let payload = format!("{to}-{i}");
        publisher
            .send(&common::publish(
                &format!("cap/{to}"),
                QoS::AtLeastOnce,
                i + 1,
                payload.as_bytes(),
            ))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
        order.push((to, payload));
    }
    // Evictions run behind the writes; wait for the count to settle.
    let metrics = server.metrics();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metrics
        .offline_evicted
        .load(std::sync::atomic::Ordering::Relaxed)
        < 70
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        metrics
            .offline_messages
            .load(std::sync::atomic::Ordering::Relaxed),
        50
    );
    assert_eq!(
        metrics
            .offline_evicted
            .load(std::sync::atomic::Ordering::Relaxed),
        70
    );
    let alarms = metrics.alarms.list(Some("default"));
    assert_eq!(alarms.len(), 1, "one alarm event: {alarms:?}");
    assert_eq!(alarms[0].count, 70);
    assert_eq!(
        alarms[0].kind,
        ferry_broker::alarms::AlarmKind::OfflineMessagesEvicted
    );
    let kept = &order[70..];
    for id in ["cap-a", "cap-b"] {
        let expected: Vec<String> = kept
            .iter()
            .filter(|(to, _)| *to == id)
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(
            drain_queue(addr, id).await,
            expected,
            "{id}: the newest, in order"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_cap_applies_to_what_was_stored_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).unwrap());
    let server = start(engine.clone()).await;
    let addr = server.local_addr();
    let (mut sub, _) = persistent(addr, "lower-sub").await;
    sub.subscribe(1, "lower/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = Client::v3(addr, &cid("lower-pub")).await;
    for i in 1..=40u16 {
        publisher
            .send(&common::publish(
                "lower/x",
                QoS::AtLeastOnce,
                i,
                format!("m{i}").as_bytes(),
            ))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    }
    publisher.disconnect().await;
    server.shutdown().await;

    let settings = InstanceSettings {
        max_offline_messages: 15,
        ..InstanceSettings::for_profile(Profile::Standard)
    };
    let server = start_with(engine, settings).await;
    let addr = server.local_addr();
    let expected: Vec<String> = (26..=40).map(|i| format!("m{i}")).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server
        .metrics()
        .offline_evicted
        .load(std::sync::atomic::Ordering::Relaxed)
        < 25
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(drain_queue(addr, "lower-sub").await, expected);
    server.shutdown().await;
}
