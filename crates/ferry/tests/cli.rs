//! The `ferry` binary as a user runs it: configuration errors, start-up line, graceful stop.

use bytes::BytesMut;
use ferry_codec::{decode, Connect, Packet, Protocol, ReasonCode};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn run_with_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, toml).unwrap();
    let out = ferry()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--queue-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_is_refused_with_the_key_named() {
    let (ok, err) = run_with_config("[mqtt]\nmax_qos = 7\n");
    assert!(!ok);
    assert!(err.contains("mqtt.max_qos"), "{err}");

    let (ok, err) = run_with_config("[mqtt]\nlisten_port = 1\n");
    assert!(!ok);
    assert!(err.contains("listen_port"), "{err}");

    let (ok, err) = run_with_config(
        "[[acl.rules]]\npermission = \"deny\"\naction = \"read\"\nfilter = \"a\"\n",
    );
    assert!(!ok);
    assert!(err.contains("acl.rules[0].action"), "{err}");

    let out = ferry()
        .args(["serve", "--config", "/nonexistent/ferry.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = ferry()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--queue-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-level", "warn", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let mut api = String::new();
    stdout.read_line(&mut api).unwrap();
    assert!(
        api.starts_with("ferry: api listening on http://127.0.0.1:"),
        "{api:?}"
    );
    let mut queue = String::new();
    stdout.read_line(&mut queue).unwrap();
    assert!(
        queue.starts_with("ferry: queue listening on 127.0.0.1:"),
        "{queue:?}"
    );
    let mut key = String::new();
    stdout.read_line(&mut key).unwrap();
    assert!(key.starts_with("ferry: admin key created"), "{key:?}");
    // The admin key is left for `ferry ctl`, readable only by its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin-key.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let addr = line
        .trim()
        .strip_prefix("ferry: mqtt listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();

    // An MQTT 3.1.1 CONNECT gets a successful CONNACK.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = BytesMut::new();
    Packet::Connect(Box::new(Connect {
        protocol: Protocol::V3_1_1,
        clean_start: true,
        keep_alive: 30,
        client_id: "cli-test".into(),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }))
    .encode(Protocol::V3_1_1, &mut buf)
    .unwrap();
    stream.write_all(&buf).unwrap();
    let mut rbuf = BytesMut::new();
    let ack = loop {
        if let Some(p) = decode(&mut rbuf, Protocol::V3_1_1, 1024).unwrap() {
            break p;
        }
        let mut chunk = [0u8; 64];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before CONNACK");
        rbuf.extend_from_slice(&chunk[..n]);
    };
    match ack {
        Packet::ConnAck(a) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(15) {
            child.kill().unwrap();
            panic!("ferry did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    // The client saw the connection close.
    let mut rest = [0u8; 16];
    assert_eq!(stream.read(&mut rest).unwrap_or(0), 0);
}
