//! `ferry bench` as a script runs it: the real binary against a real Ferry (started in-process
//! on 127.0.0.1:0), `--json` output, exit codes, and clear messages for bad options.

use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A server on its own runtime thread, for as long as the value lives.
struct Broker {
    port: String,
    _runtime: tokio::runtime::Runtime,
}

fn broker() -> Broker {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(async {
        ferry_broker::Server::start(ferry_broker::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
    });
    let port = server.local_addr().port().to_string();
    // Kept alive on the runtime until the test ends.
    runtime.spawn(async move {
        let _server = server;
        std::future::pending::<()>().await
    });
    Broker {
        port,
        _runtime: runtime,
    }
}

#[test]
fn scenarios_report_counts_as_json() {
    let b = broker();
    for (kind, extra, sent, received) in [
        ("p2p", vec!["--pairs", "5"], 500, 500),
        ("fan-out", vec!["--subscribers", "10"], 100, 1000),
        ("fan-in", vec!["--publishers", "10"], 1000, 1000),
        (
            "shared",
            vec!["--publishers", "10", "--subscribers", "3"],
            1000,
            1000,
        ),
    ] {
        let mut args = vec![
            "scenario", kind, "-p", &b.port, "-q", "1", "-n", "100", "--json",
        ];
        args.extend(extra);
        let out = bench(&args);
        assert!(out.status.success(), "{kind}: {out:?}");
        let v = json(&out);
        assert_eq!(v["scenario"], kind);
        assert_eq!(v["messages"]["sent"], sent, "{kind}: {v}");
        assert_eq!(v["messages"]["received"], received, "{kind}: {v}");
        assert_eq!(v["messages"]["lost"], 0, "{kind}: {v}");
        assert!(v["errors"].as_object().unwrap().is_empty(), "{kind}: {v}");
    }
}

#[test]
fn conn_pub_and_sub_stop_by_themselves() {
    let b = broker();
    let started = Instant::now();
    let out = bench(&["conn", "-p", &b.port, "-c", "50", "-d", "0.3", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["connections"]["connected"], 50);
    assert_eq!(v["connections"]["up_at_end"], 50);

    // A subscriber process and publisher processes meet. The publishers go in rounds until
    // the subscriber, once subscribed, has its 400 messages and stops (bounded: 20 rounds).
    let sub = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "bench", "sub", "-p", &b.port, "-c", "2", "-t", "cli/%i", "-q", "1",
        ])
        .args(["-n", "400", "-d", "30", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sub_pid = sub.id();
    let finished = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
    };
    for _ in 0..20 {
        if finished(sub_pid) {
            break;
        }
        let out = bench(&[
            "pub", "-p", &b.port, "-c", "2", "-t", "cli/%i", "-q", "1", "-n", "100", "--json",
        ]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(json(&out)["messages"]["acked"], 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let received = json(&out)["messages"]["received"].as_u64().unwrap();
    assert!((400..=600).contains(&received), "{received}");

    // A publisher by duration alone.
    let out = bench(&["pub", "-p", &b.port, "-d", "0.5", "--rate", "100", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let sent = json(&out)["messages"]["sent"].as_u64().unwrap();
    assert!((40..=60).contains(&sent), "{sent}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_refused_connection_exits_non_zero_with_the_kind() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let out = bench(&["conn", "-p", &port, "-c", "3", "-d", "0", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(v["errors"]["connection refused"], 3);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connection refused"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_options_are_named() {
    for (args, expect) in [
        (vec!["pub", "-s", "4"], "payload size"),
        (vec!["pub", "--qos", "3"], "qos"),
        (vec!["conn", "--client-id", "fixed", "-c", "2"], "%i"),
        (vec!["conn", "--transport", "quic"], "unknown transport"),
        (vec!["conn", "--transport", "tls"], "--cafile"),
        (vec!["conn", "--access-key-id", "AK"], "Signature mode"),
        (
            vec!["scenario", "fan-out", "--pairs", "3"],
            "--pairs is for the p2p",
        ),
        (
            vec!["scenario", "p2p", "--publishers", "2", "--subscribers", "3"],
            "as many",
        ),
        (vec!["conn", "--timeout=-1"], "--timeout"),
    ] {
        let out = bench(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
