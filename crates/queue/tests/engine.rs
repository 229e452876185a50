//! The queue engine without sockets: filters, invisibility, redelivery, the dead-letter queue,
//! change-invisible, long-poll wake-up, group start, restart recovery, retention.

use bytes::Bytes;
use ferry_queue::*;
use ferry_store::{Durability, Engine, FjallEngine, MemoryEngine, Writer};
use std::sync::Arc;
use std::time::Duration;

const NS: &str = "default";

fn msg(topic: &str, body: &str, tag: Option<&str>) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        tag: tag.map(str::to_string),
        body: Bytes::from(body.to_string()),
        born_host: "test".into(),
        born_timestamp_ms: 1,
        ..NewMessage::default()
    }
}

fn memory_queue(config: QueueConfig) -> (Queue, Arc<ManualClock>) {
    let clock = ManualClock::new(1_000_000);
    (
        Queue::open_with_clock(None, config, clock.clone()).unwrap(),
        clock,
    )
}

fn req(group: &str, topic: &str, max: usize, invisible_secs: u64) -> ReceiveRequest {
    ReceiveRequest {
        invisible: Duration::from_secs(invisible_secs),
        ..ReceiveRequest::new(group, topic, max)
    }
}

fn bodies(d: &[Delivery]) -> Vec<String> {
    d.iter()
        .map(|d| String::from_utf8(d.message.body.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn send_receive_ack_and_message_fields() {
    let (q, _) = memory_queue(QueueConfig::default());
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    let mut m = msg("t", "hello", Some("a"));
    m.keys = vec!["k".into()];
    m.properties.insert("p".into(), "v".into());
    m.message_id = Some("MID".into());
    let sent = q.send(NS, m).await.unwrap();
    assert_eq!(sent.message_id, "MID");
    assert_eq!(sent.offset, 0);
    let got = q.receive(NS, req("g", "t", 10, 30)).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.delivery_attempt, 1);
    assert_eq!(d.message.id, "MID");
    assert_eq!(d.message.tag.as_deref(), Some("a"));
    assert_eq!(d.message.keys, vec!["k".to_string()]);
    assert_eq!(d.message.properties.get("p").map(String::as_str), Some("v"));
    assert_eq!(d.message.body, Bytes::from_static(b"hello"));
    q.ack(NS, "g", "t", &d.receipt_handle).await.unwrap();
    // A used handle is refused.
    assert!(matches!(
        q.ack(NS, "g", "t", &d.receipt_handle).await,
        Err(QueueError::InvalidReceiptHandle(_))
    ));
    assert!(q
        .receive(NS, req("g", "t", 10, 30))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(q.topics(NS)[0].messages, 1);
}

#[tokio::test]
async fn tag_filters() {
    assert_eq!(Filter::parse_tag("*").unwrap(), Filter::All);
    assert_eq!(Filter::parse_tag("").unwrap(), Filter::All);
    assert_eq!(
        Filter::parse_tag("a || b||c").unwrap(),
        Filter::Tags(vec!["a".into(), "b".into(), "c".into()])
    );
    assert!(matches!(
        Filter::parse_tag("a|||b"),
        Err(QueueError::IllegalFilter(_))
    ));
    assert!(matches!(
        Filter::parse_tag("a||"),
        Err(QueueError::IllegalFilter(_))
    ));
    let (q, _) = memory_queue(QueueConfig::default());
    q.ensure_group(NS, "ab", "t", Start::End).unwrap();
    q.ensure_group(NS, "all", "t", Start::End).unwrap();
    for (b, t) in [
        ("1", Some("a")),
        ("2", Some("b")),
        ("3", Some("c")),
        ("4", None),
    ] {
        q.send(NS, msg("t", b, t)).await.unwrap();
    }
    let mut r = req("ab", "t", 10, 30);
    r.filter = Filter::parse_tag("a||b").unwrap();
    assert_eq!(bodies(&q.receive(NS, r).await.unwrap()), vec!["1", "2"]);
    let got = q.receive(NS, req("all", "t", 10, 30)).await.unwrap();
    assert_eq!(bodies(&got), vec!["1", "2", "3", "4"]);
}

#[tokio::test]
async fn clustering_shares_a_group_and_every_group_sees_all() {
    let (q, _) = memory_queue(QueueConfig::default());
    q.ensure_group(NS, "g1", "t", Start::End).unwrap();
    q.ensure_group(NS, "g2", "t", Start::End).unwrap();
    for i in 0..4 {
        q.send(NS, msg("t", &i.to_string(), None)).await.unwrap();
    }
    let a = q.receive(NS, req("g1", "t", 2, 30)).await.unwrap();
    let b = q.receive(NS, req("g1", "t", 10, 30)).await.unwrap();
    assert_eq!(bodies(&a), vec!["0", "1"]);
    assert_eq!(bodies(&b), vec!["2", "3"]);
    let c = q.receive(NS, req("g2", "t", 10, 30)).await.unwrap();
    assert_eq!(c.len(), 4);
}

#[tokio::test]
async fn invisibility_ends_in_a_redelivery_with_the_next_attempt() {
    let (q, clock) = memory_queue(QueueConfig::default());
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    q.send(NS, msg("t", "x", None)).await.unwrap();
    let first = q.receive(NS, req("g", "t", 1, 10)).await.unwrap();
    assert_eq!(first[0].delivery_attempt, 1);
    clock.advance(Duration::from_secs(9));
    assert!(q
        .receive(NS, req("g", "t", 1, 10))
        .await
        .unwrap()
        .is_empty());
    clock.advance(Duration::from_secs(2));
    let second = q.receive(NS, req("g", "t", 1, 10)).await.unwrap();
    assert_eq!(second[0].delivery_attempt, 2);
    assert_eq!(second[0].message.offset, first[0].message.offset);
    // The first handle died when the message became visible again.
    assert!(matches!(
        q.ack(NS, "g", "t", &first[0].receipt_handle).await,
        Err(QueueError::InvalidReceiptHandle(_))
    ));
    q.ack(NS, "g", "t", &second[0].receipt_handle)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    assert!(q
        .receive(NS, req("g", "t", 1, 10))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn change_invisible_gives_a_new_handle() {
    let (q, clock) = memory_queue(QueueConfig::default());
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    q.send(NS, msg("t", "x", None)).await.unwrap();
    let d = q.receive(NS, req("g", "t", 1, 10)).await.unwrap().remove(0);
    let h2 = q
        .change_invisible(NS, "g", "t", &d.receipt_handle, Duration::from_secs(100))
        .await
        .unwrap();
    assert_ne!(h2, d.receipt_handle);
    assert!(q.ack(NS, "g", "t", &d.receipt_handle).await.is_err());
    clock.advance(Duration::from_secs(50));
    assert!(q
        .receive(NS, req("g", "t", 1, 10))
        .await
        .unwrap()
        .is_empty());
    let h3 = q
        .change_invisible(NS, "g", "t", &h2, Duration::from_secs(1))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(2));
    assert!(q.ack(NS, "g", "t", &h3).await.is_err());
    let again = q.receive(NS, req("g", "t", 1, 10)).await.unwrap();
    assert_eq!(again[0].delivery_attempt, 2);
    assert!(matches!(
        q.ack(NS, "g", "t", "garbage").await,
        Err(QueueError::InvalidReceiptHandle(_))
    ));
}

#[tokio::test]
async fn dead_letter_queue_after_max_attempts() {
    let (q, clock) = memory_queue(QueueConfig {
        max_attempts: 2,
        ..QueueConfig::default()
    });
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    let mut m = msg("t", "poison", Some("x"));
    m.message_id = Some("P1".into());
    q.send(NS, m).await.unwrap();
    for attempt in 1..=2 {
        let d = q.receive(NS, req("g", "t", 1, 5)).await.unwrap();
        assert_eq!(d[0].delivery_attempt, attempt);
        clock.advance(Duration::from_secs(6));
    }
    assert!(q.receive(NS, req("g", "t", 1, 5)).await.unwrap().is_empty());
    assert_eq!(q.inflight(NS, "g", "t"), 0);
    // A consumer of the DLQ topic (a new group) reads it from the beginning.
    let dlq = q
        .receive(NS, req("dlq-reader", "%DLQ%g", 10, 30))
        .await
        .unwrap();
    assert_eq!(bodies(&dlq), vec!["poison"]);
    assert_eq!(dlq[0].message.id, "P1");
    assert_eq!(dlq[0].message.tag.as_deref(), Some("x"));
    assert_eq!(
        dlq[0]
            .message
            .properties
            .get("ORIGIN_TOPIC")
            .map(String::as_str),
        Some("t")
    );
}

#[tokio::test]
async fn long_poll_wakes_up_on_a_new_message() {
    let (q, _) = memory_queue(QueueConfig::default());
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    let q2 = q.clone();
    let started = std::time::Instant::now();
    let waiter = tokio::spawn(async move {
        let mut r = req("g", "t", 10, 30);
        r.wait = Duration::from_secs(10);
        q2.receive(NS, r).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    q.send(NS, msg("t", "wake", None)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken well before the 10 s long poll ends")
        .unwrap()
        .unwrap();
    assert_eq!(bodies(&got), vec!["wake"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    // With nothing to deliver, a short long poll answers empty when it ends.
    let mut r = req("g", "t", 10, 30);
    r.wait = Duration::from_millis(200);
    let t = std::time::Instant::now();
    assert!(q.receive(NS, r).await.unwrap().is_empty());
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn new_groups_start_at_the_end_unless_told_otherwise() {
    let (q, _) = memory_queue(QueueConfig::default());
    q.create_topic(NS, "t").unwrap();
    q.send(NS, msg("t", "old", None)).await.unwrap();
    assert!(q
        .receive(NS, req("late", "t", 10, 30))
        .await
        .unwrap()
        .is_empty());
    q.ensure_group(NS, "early", "t", Start::Beginning).unwrap();
    q.send(NS, msg("t", "new", None)).await.unwrap();
    assert_eq!(
        bodies(&q.receive(NS, req("late", "t", 10, 30)).await.unwrap()),
        vec!["new"]
    );
    assert_eq!(
        bodies(&q.receive(NS, req("early", "t", 10, 30)).await.unwrap()),
        vec!["old", "new"]
    );
}

#[tokio::test]
async fn unknown_topics_without_auto_create_and_bad_names() {
    let (q, _) = memory_queue(QueueConfig {
        auto_create_topics: false,
        ..QueueConfig::default()
    });
    assert!(matches!(
        q.send(NS, msg("nope", "x", None)).await,
        Err(QueueError::TopicNotFound(_))
    ));
    assert!(matches!(
        q.create_topic(NS, "bad topic"),
        Err(QueueError::IllegalTopic(_))
    ));
    q.create_topic(NS, "t").unwrap();
    q.create_topic(NS, "t").unwrap();
    assert!(matches!(
        q.ensure_group(NS, "bad group", "t", Start::End),
        Err(QueueError::IllegalGroup(_))
    ));
    let big = NewMessage {
        body: Bytes::from(vec![0u8; 5 * 1024 * 1024]),
        ..msg("t", "", None)
    };
    assert!(matches!(
        q.send(NS, big).await,
        Err(QueueError::BodyTooLarge { .. })
    ));
    q.delete_topic(NS, "t").unwrap();
    assert!(q.topics(NS).is_empty());
    assert!(matches!(
        q.delete_topic(NS, "t"),
        Err(QueueError::TopicNotFound(_))
    ));
}

async fn restart_recovery(engine: Arc<dyn Engine>) {
    let clock = ManualClock::new(1_000_000);
    let open = |engine: &Arc<dyn Engine>| {
        let writer = Arc::new(Writer::start(engine.clone(), Durability::Sync, 64));
        Queue::open_with_clock(
            Some(QueueStore {
                engine: engine.clone(),
                writer,
            }),
            QueueConfig::default(),
            clock.clone(),
        )
        .unwrap()
    };
    let q = open(&engine);
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    // A group made by a receive that found nothing starts at the end of the topic, and still
    // does after a restart.
    let fresh = q.receive(NS, req("fresh", "t", 10, 10)).await.unwrap();
    assert!(fresh.is_empty());
    for i in 0..4 {
        q.send(NS, msg("t", &format!("m{i}"), None)).await.unwrap();
    }
    let got = q.receive(NS, req("g", "t", 3, 10)).await.unwrap();
    assert_eq!(bodies(&got), vec!["m0", "m1", "m2"]);
    q.ack(NS, "g", "t", &got[0].receipt_handle).await.unwrap();
    let h = q
        .change_invisible(
            NS,
            "g",
            "t",
            &got[1].receipt_handle,
            Duration::from_secs(100),
        )
        .await
        .unwrap();
    drop(q);

    let q = open(&engine);
    assert_eq!(q.topics(NS)[0].messages, 4);
    let fresh = q.receive(NS, req("fresh", "t", 10, 10)).await.unwrap();
    assert_eq!(bodies(&fresh), vec!["m0", "m1", "m2", "m3"]);
    // Still in flight and invisible: m3 (never delivered) comes first.
    let now = q.receive(NS, req("g", "t", 10, 10)).await.unwrap();
    assert_eq!(bodies(&now), vec!["m3"]);
    // The handle of m1 survived the restart.
    assert!(q.ack(NS, "g", "t", &h).await.is_ok());
    clock.advance(Duration::from_secs(11));
    let again = q.receive(NS, req("g", "t", 10, 10)).await.unwrap();
    assert_eq!(bodies(&again), vec!["m2", "m3"]);
    assert_eq!(again[0].delivery_attempt, 2);
    // Offsets continue after a restart.
    let sent = q.send(NS, msg("t", "m4", None)).await.unwrap();
    assert_eq!(sent.offset, 4);
}

#[tokio::test]
async fn restart_recovery_on_memory_engine() {
    restart_recovery(Arc::new(MemoryEngine::new())).await;
}

#[tokio::test]
async fn restart_recovery_on_fjall() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).unwrap());
        restart_recovery(engine).await;
    }
}

#[tokio::test]
async fn retention_sweep_removes_expired_messages() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let writer = Arc::new(Writer::start(engine.clone(), Durability::Sync, 64));
    let clock = ManualClock::new(1_000_000);
    let q = Queue::open_with_clock(
        Some(QueueStore {
            engine: engine.clone(),
            writer,
        }),
        QueueConfig {
            retention: Duration::from_secs(3600),
            sweep_batch: 2,
            ..QueueConfig::default()
        },
        clock.clone(),
    )
    .unwrap();
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    for i in 0..3 {
        q.send(NS, msg("t", &i.to_string(), None)).await.unwrap();
    }
    let got = q.receive(NS, req("g", "t", 1, 10_000)).await.unwrap();
    assert_eq!(q.sweep().await.unwrap(), 0);
    clock.advance(Duration::from_secs(1800));
    q.send(NS, msg("t", "fresh", None)).await.unwrap();
    clock.advance(Duration::from_secs(1801));
    // Bounded: two per sweep.
    assert_eq!(q.sweep().await.unwrap(), 2);
    assert_eq!(q.sweep().await.unwrap(), 1);
    assert_eq!(q.sweep().await.unwrap(), 0);
    let info = &q.topics(NS)[0];
    assert_eq!(
        (info.messages, info.first_offset, info.next_offset),
        (1, 3, 4)
    );
    assert_eq!(q.inflight(NS, "g", "t"), 0);
    assert!(q.ack(NS, "g", "t", &got[0].receipt_handle).await.is_err());
    assert_eq!(
        bodies(&q.receive(NS, req("g", "t", 10, 10)).await.unwrap()),
        vec!["fresh"]
    );
    // The store holds the one message left (body and index entry) only.
    assert_eq!(engine.count(ferry_store::Space::Queue, b"M").unwrap(), 1);
}

#[tokio::test]
async fn local_queue_is_a_queue_client() {
    let (q, _) = memory_queue(QueueConfig::default());
    let client: Box<dyn QueueClient> = Box::new(q.client(NS));
    q.ensure_group(NS, "g", "t", Start::End).unwrap();
    client.send(msg("t", "via trait", None)).await.unwrap();
    let got = client.receive(req("g", "t", 10, 30)).await.unwrap();
    assert_eq!(bodies(&got), vec!["via trait"]);
    client.ack("g", "t", &got[0].receipt_handle).await.unwrap();
}
