//! `ferry-bench` against a real Ferry server started in-process on 127.0.0.1:0: the counts of
//! every mode and scenario, runs that stop by themselves, and failures reported by kind.

use ferry_bench::{run, Auth, Common, Plan, PubSpec, Report, SubSpec, Target, Transport};
use ferry_broker::{Config, Server};
use ferry_codec::{Protocol, QoS};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

async fn server(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    tweak(&mut config);
    Server::start(config).await.expect("server starts")
}

fn common(addr: SocketAddr, tag: &str) -> Common {
    Common {
        target: Target::new(
            "127.0.0.1",
            addr.port(),
            Transport::Tcp,
            "/mqtt",
            &Default::default(),
        )
        .unwrap(),
        protocol: Protocol::V3_1_1,
        client_id: format!("t-{tag}-{}-%i", std::process::id()),
        auth: Auth::Anonymous,
        keep_alive: 30,
        session_expiry: None,
        bind: Vec::new(),
        connect_rate: 0.0,
        connect_concurrency: 64,
        timeout: Duration::from_secs(5),
        progress: false,
        start_index: 0,
    }
}

fn pubs(clients: u64, topic: &str, qos: QoS, count: u64) -> PubSpec {
    PubSpec {
        clients,
        topic: topic.into(),
        qos,
        size: 64,
        count: Some(count),
        duration: None,
        rate: None,
        inflight: 32,
        retain: false,
    }
}

fn subs(clients: u64, filter: &str, qos: QoS, group: Option<&str>) -> SubSpec {
    SubSpec {
        clients,
        filter: filter.into(),
        qos,
        group: group.map(Into::into),
    }
}

fn scenario(addr: SocketAddr, name: &str, sub: SubSpec, publ: PubSpec, copies: u64) -> Plan {
    Plan {
        name: name.into(),
        common: common(addr, name),
        subs: Some(sub),
        pubs: Some(publ),
        idle: 0,
        copies: Some(copies),
        hold: None,
        stop_after: None,
    }
}

/// Every message sent arrived exactly as often as expected, nothing failed.
fn assert_complete(r: &Report, sent: u64, copies: u64) {
    assert!(r.errors.is_empty(), "errors: {:?}", r.error_examples);
    assert_eq!(r.messages.sent, sent, "{r}");
    assert_eq!(r.messages.expected, Some(sent * copies), "{r}");
    assert_eq!(r.messages.received, sent * copies, "{r}");
    assert_eq!(r.messages.lost, Some(0), "{r}");
    assert_eq!(r.messages.duplicates, Some(0), "{r}");
    assert_eq!(r.latency_us.count, sent * copies, "{r}");
    assert!(
        r.latency_us.p50 > 0.0 && r.latency_us.p50 <= r.latency_us.p999,
        "{r}"
    );
    assert!(r.messages.throughput > 0.0, "{r}");
    assert_eq!(r.connections.failed, 0, "{r}");
    assert_eq!(r.connections.dropped, 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_opens_holds_and_closes_every_connection() {
    let server = server(|_| {}).await;
    let started = Instant::now();
    let r = run(Plan {
        name: "conn".into(),
        common: Common {
            connect_rate: 500.0,
            ..common(server.local_addr(), "conn")
        },
        subs: None,
        pubs: None,
        idle: 100,
        copies: None,
        hold: Some(Duration::from_millis(300)),
        stop_after: None,
    })
    .await
    .unwrap();
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.connections.attempted, 100);
    assert_eq!(r.connections.connected, 100);
    assert_eq!(r.connections.up_at_end, 100);
    assert_eq!(r.connections.failed + r.connections.dropped, 0);
    // 100 connections at 500/s take about 0.2 s: the ramp rate is honoured.
    assert!(r.connections.ramp_secs >= 0.15, "{r}");
    assert!(
        r.connections.connect_rate > 0.0 && r.connections.connect_rate < 700.0,
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // They all disconnected at the end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_qos1_delivers_every_message_once() {
    let server = server(|_| {}).await;
    let addr = server.local_addr();
    let r = run(scenario(
        addr,
        "p2p",
        subs(10, "p2p-qos1/%i", QoS::AtLeastOnce, None),
        pubs(10, "p2p-qos1/%i", QoS::AtLeastOnce, 300),
        1,
    ))
    .await
    .unwrap();
    assert_complete(&r, 3000, 1);
    assert_eq!(r.messages.acked, 3000);
    assert_eq!(r.connections.connected, 20);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_qos2_over_mqtt5_delivers_every_message_once() {
    let server = server(|_| {}).await;
    let mut plan = scenario(
        server.local_addr(),
        "p2p-v5",
        subs(4, "p2p-qos2/%i", QoS::ExactlyOnce, None),
        pubs(4, "p2p-qos2/%i", QoS::ExactlyOnce, 200),
        1,
    );
    plan.common.protocol = Protocol::V5;
    let r = run(plan).await.unwrap();
    assert_complete(&r, 800, 1);
    assert_eq!(r.messages.acked, 800);
    assert_eq!(r.protocol, 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_qos1_reaches_every_subscriber() {
    let server = server(|_| {}).await;
    let r = run(scenario(
        server.local_addr(),
        "fan-out",
        subs(25, "fanout/all", QoS::AtLeastOnce, None),
        pubs(1, "fanout/all", QoS::AtLeastOnce, 400),
        25,
    ))
    .await
    .unwrap();
    assert_complete(&r, 400, 25);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_qos1_reaches_the_wildcard_subscriber() {
    // 40 publishers outrun one subscriber: the broker queues for it (beyond its default of
    // 1,000 queued messages it would drop them, and the bench would count them lost).
    let server = server(|c| c.limits.max_queued_messages = 100_000).await;
    let r = run(scenario(
        server.local_addr(),
        "fan-in",
        subs(1, "fanin/+", QoS::AtLeastOnce, None),
        pubs(40, "fanin/%i", QoS::AtLeastOnce, 50),
        1,
    ))
    .await
    .unwrap();
    assert_complete(&r, 2000, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_gets_each_message_once() {
    let server = server(|_| {}).await;
    let r = run(scenario(
        server.local_addr(),
        "shared",
        subs(5, "shared/+", QoS::AtLeastOnce, Some("g1")),
        pubs(40, "shared/%i", QoS::AtLeastOnce, 50),
        1,
    ))
    .await
    .unwrap();
    assert_complete(&r, 2000, 1);
    assert_eq!(r.connections.subscribed, 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_p2p_counts_add_up() {
    let server = server(|_| {}).await;
    let r = run(scenario(
        server.local_addr(),
        "p2p-qos0",
        subs(5, "p2p-qos0/%i", QoS::AtMostOnce, None),
        pubs(5, "p2p-qos0/%i", QoS::AtMostOnce, 2000),
        1,
    ))
    .await
    .unwrap();
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.messages.sent, 10_000);
    // QoS 0 may drop under load; whatever was not received is counted as lost.
    assert_eq!(
        r.messages.received + r.messages.lost.unwrap(),
        r.messages.sent,
        "{r}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_in_separate_runs_meet_and_sub_stops_at_its_count() {
    let server = server(|_| {}).await;
    let addr = server.local_addr();
    let sub = tokio::spawn(run(Plan {
        name: "sub".into(),
        common: common(addr, "sub"),
        subs: Some(subs(3, "split/%i", QoS::AtLeastOnce, None)),
        pubs: None,
        idle: 0,
        copies: None,
        hold: Some(Duration::from_secs(30)),
        stop_after: Some(1500),
    }));
    // Publish only once all three subscriptions exist (bounded wait).
    let control = server.control();
    for i in 0..3 {
        let topic = format!("split/{i}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.subscribers_of("default", &topic).await.unwrap_or(0) == 0 {
            assert!(
                Instant::now() < deadline,
                "the subscribers never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let p = run(Plan {
        name: "pub".into(),
        common: common(addr, "pub"),
        subs: None,
        pubs: Some(pubs(3, "split/%i", QoS::AtLeastOnce, 500)),
        idle: 0,
        copies: None,
        hold: None,
        stop_after: None,
    })
    .await
    .unwrap();
    assert!(p.errors.is_empty(), "{p}");
    assert_eq!(p.messages.sent, 1500);
    assert_eq!(p.messages.acked, 1500);
    let started = Instant::now();
    let s = sub.await.unwrap().unwrap();
    assert!(s.errors.is_empty(), "{s}");
    assert_eq!(s.messages.received, 1500, "{s}");
    assert_eq!(s.latency_us.count, 1500);
    // It stopped at its count, long before its 30 s hold.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(s.elapsed_secs < 10.0, "{s}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_by_duration_and_rate_stops_by_itself() {
    let server = server(|_| {}).await;
    let started = Instant::now();
    let mut publ = pubs(2, "timed/%i", QoS::AtLeastOnce, 0);
    publ.count = None;
    publ.duration = Some(Duration::from_millis(1000));
    publ.rate = Some(100.0);
    let r = run(scenario(
        server.local_addr(),
        "timed",
        subs(2, "timed/%i", QoS::AtLeastOnce, None),
        publ,
        1,
    ))
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // 2 publishers × 100/s × 1 s.
    assert!((170..=210).contains(&r.messages.sent), "{r}");
    assert_complete(&r, r.messages.sent, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_reported_by_kind() {
    // A port that was just free: nobody listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let r = run(scenario(
        port,
        "refused",
        subs(3, "x/%i", QoS::AtLeastOnce, None),
        pubs(3, "x/%i", QoS::AtLeastOnce, 10),
        1,
    ))
    .await
    .unwrap();
    assert_eq!(r.errors.get("connection refused"), Some(&6), "{r}");
    assert_eq!(r.connections.failed, 6);
    assert_eq!(r.connections.connected, 0);
    assert_eq!(r.messages.sent, 0);
    assert!(!r.is_clean());
    assert!(r.to_string().contains("connection refused: 6"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_reported_by_kind() {
    let server = server(|c| {
        c.auth = ferry_broker::Authenticator {
            allow_anonymous: false,
            users: vec![ferry_broker::User {
                name: "bench".into(),
                password: "right".into(),
            }],
        };
    })
    .await;
    let addr = server.local_addr();
    let mut plan = Plan {
        name: "conn".into(),
        common: common(addr, "auth"),
        subs: None,
        pubs: None,
        idle: 4,
        copies: None,
        hold: Some(Duration::from_millis(100)),
        stop_after: None,
    };
    plan.common.auth = Auth::Password {
        username: "bench".into(),
        password: Some("wrong".into()),
    };
    let r = run(plan.clone()).await.unwrap();
    assert_eq!(r.errors.get("auth refused"), Some(&4), "{r}");
    assert_eq!(r.connections.connected, 0);

    plan.common.auth = Auth::Password {
        username: "bench".into(),
        password: Some("right".into()),
    };
    let r = run(plan).await.unwrap();
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.connections.connected, 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_mode_logs_in_to_a_cloud_instance() {
    use ferry_meta::{KeyPermission, Meta, Profile};
    let meta = std::sync::Arc::new(Meta::new());
    let now = ferry_meta::now_ms();
    meta.create_instance("default", "default", Profile::Standard, None, now)
        .unwrap();
    meta.create_instance("mqtt-bench", "bench", Profile::Cloud, None, now)
        .unwrap();
    meta.create_topic("mqtt-bench", "Bench", now).unwrap();
    meta.create_group("mqtt-bench", "GID_bench", now).unwrap();
    let key = meta
        .create_key("mqtt-bench", KeyPermission::Full, Vec::new(), now)
        .unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = Server::start_with_meta(config, meta).await.unwrap();
    let mut plan = scenario(
        server.local_addr(),
        "signature",
        subs(3, "Bench/sig/%i", QoS::AtLeastOnce, None),
        pubs(3, "Bench/sig/%i", QoS::AtLeastOnce, 100),
        1,
    );
    plan.common.client_id = "GID_bench@@@dev-%i".into();
    plan.common.auth = Auth::Signature {
        access_key_id: key.access_key_id.clone(),
        access_key_secret: key.secret.clone(),
        instance_id: "mqtt-bench".into(),
    };
    let r = run(plan.clone()).await.unwrap();
    assert_complete(&r, 300, 1);

    plan.common.auth = Auth::Signature {
        access_key_id: key.access_key_id,
        access_key_secret: "not-the-secret".into(),
        instance_id: "mqtt-bench".into(),
    };
    let r = run(plan).await.unwrap();
    // Every subscriber and every publisher.
    assert_eq!(r.errors.get("auth refused"), Some(&6), "{r}");
    assert_eq!(r.connections.connected, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_source_addresses_are_used_in_turn() {
    let server = server(|_| {}).await;
    let mut plan = scenario(
        server.local_addr(),
        "bind",
        subs(4, "bind/%i", QoS::AtLeastOnce, None),
        pubs(4, "bind/%i", QoS::AtLeastOnce, 50),
        1,
    );
    plan.common.bind = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    let r = run(plan).await.unwrap();
    assert_complete(&r, 200, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_summary_carries_the_counts() {
    let server = server(|_| {}).await;
    let r = run(scenario(
        server.local_addr(),
        "json",
        subs(2, "json/%i", QoS::AtLeastOnce, None),
        pubs(2, "json/%i", QoS::AtLeastOnce, 100),
        1,
    ))
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(v["scenario"], "json");
    assert_eq!(v["messages"]["sent"], 200);
    assert_eq!(v["messages"]["received"], 200);
    assert_eq!(v["messages"]["lost"], 0);
    assert_eq!(v["connections"]["connected"], 4);
    for q in ["p50", "p90", "p99", "p999"] {
        assert!(v["latency_us"][q].as_f64().unwrap() > 0.0);
    }
    assert!(v["errors"].as_object().unwrap().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_plans_are_refused_with_a_message() {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut plan = scenario(
        addr,
        "bad",
        subs(1, "x", QoS::AtMostOnce, None),
        pubs(1, "x", QoS::AtMostOnce, 10),
        1,
    );
    plan.pubs.as_mut().unwrap().size = 4;
    let e = run(plan.clone()).await.unwrap_err().to_string();
    assert!(e.contains("payload size"), "{e}");

    plan.pubs.as_mut().unwrap().size = 64;
    plan.common.client_id = "same-id".into();
    let e = run(plan).await.unwrap_err().to_string();
    assert!(e.contains("%i"), "{e}");
}
