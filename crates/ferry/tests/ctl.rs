//! `ferry ctl` as a user runs it: against a real `ferry serve` (temporary data directory,
//! port-0 listeners), checking outputs (table and `--json`) and exit codes.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    // The caller's environment must not redirect the commands under test.
    for var in [
        "FERRY_API",
        "FERRY_DATA_DIR",
        "FERRY_KEY_ID",
        "FERRY_KEY_SECRET",
        "FERRY_INSTANCE",
        "FERRY_CONFIG",
        "FERRY_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A `ferry serve` child with its own data directory; stopped with SIGTERM (by PID) on drop.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
    mqtt: String,
    api: String,
}

impl Server {
    fn start() -> Server {
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
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Read the four start-up lines on a thread, so a silent server cannot hang the test.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..4 {
                match lines.next() {
                    Some(Ok(line)) => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(20))
                .expect("ferry serve printed its start-up lines")
        };
        let mqtt = next();
        let api = next();
        let queue = next();
        assert!(queue.starts_with("ferry: queue listening on "), "{queue:?}");
        let key = next();
        let mqtt = mqtt
            .strip_prefix("ferry: mqtt listening on ")
            .unwrap_or_else(|| panic!("{mqtt:?}"))
            .to_string();
        let api = api
            .strip_prefix("ferry: api listening on ")
            .unwrap_or_else(|| panic!("{api:?}"))
            .to_string();
        assert!(key.starts_with("ferry: admin key created"), "{key:?}");
        Server {
            child,
            dir,
            mqtt,
            api,
        }
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ferry ctl --data-dir <dir> ARGS`.
    fn ctl(&self, args: &[&str]) -> Run {
        let mut cmd = ferry();
        cmd.arg("ctl")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args);
        Run::of(cmd)
    }

    /// `ferry ctl --data-dir <dir> --json ARGS`, expected to succeed; its JSON document.
    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let run = self.ctl(&full);
        run.ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("ferry ctl {args:?}: not JSON ({e}): {:?}", run.stdout))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One finished `ferry` command.
struct Run {
    args: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(mut cmd: Command) -> Run {
        let args = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let Output {
            status,
            stdout,
            stderr,
        } = wait_bounded(child, Duration::from_secs(30));
        Run {
            args,
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(&self) -> &Run {
        assert_eq!(
            self.code,
            Some(0),
            "ferry {} failed: stdout {:?} stderr {:?}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Expects exit code 1 and exactly one stderr line; returns that line.
    #[track_caller]
    fn fails(&self) -> &str {
        assert_eq!(
            self.code,
            Some(1),
            "ferry {}: expected exit code 1: stdout {:?} stderr {:?}",
            self.args,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line expected: {:?}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{:?}", self.stderr);
        assert_eq!(self.stdout, "", "nothing on stdout on failure");
        lines[0]
    }
}

/// Waits for `child` at most `limit`, killing it (by PID) if it takes longer.
fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The rows of a table after its header, split on whitespace.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The value of a `key: value` line.
fn field(text: &str, key: &str) -> String {
    let prefix = format!("{key}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key:?} line in {text:?}"))
        .trim()
        .to_string()
}

#[test]
fn groups_topics_and_keys() {
    let server = Server::start();

    let run = server.ctl(&["groups", "create", "GID_ctl"]);
    run.ok();
    assert_eq!(run.stdout, "created group GID_ctl\n");
    let err = server
        .ctl(&["groups", "create", "GID_ctl"])
        .fails()
        .to_string();
    assert!(
        err.starts_with("error: GroupIdAlreadyExsited: ") && err.ends_with("(HTTP 409)"),
        "{err}"
    );
    assert!(err.contains("GID_ctl"), "{err}");
    let err = server.ctl(&["groups", "create", "bad"]).fails().to_string();
    assert!(err.contains("(HTTP 400)"), "{err}");

    let run = server.ctl(&["groups", "list"]);
    run.ok();
    assert!(run.stdout.starts_with("GROUP_ID"), "{}", run.stdout);
    let listed = rows(&run.stdout);
    assert_eq!(listed.len(), 1, "{}", run.stdout);
    assert_eq!(listed[0][0], "GID_ctl");
    // Times are shown as UTC dates in tables.
    assert!(
        listed[0][1].ends_with('Z') && listed[0][1].contains('T'),
        "{listed:?}"
    );

    let json = server.ctl_json(&["groups", "list"]);
    let groups = json.as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["group_id"], "GID_ctl");
    assert!(groups[0]["created_at"].as_u64().unwrap() > 0);

    let run = server.ctl(&["groups", "online", "GID_ctl"]);
    run.ok();
    assert_eq!(field(&run.stdout, "online_count"), "0");

    server.ctl(&["groups", "delete", "GID_ctl"]).ok();
    assert_eq!(rows(&server.ctl(&["groups", "list"]).ok().stdout).len(), 0);
    let err = server
        .ctl(&["groups", "delete", "GID_ctl"])
        .fails()
        .to_string();
    assert!(err.ends_with("(HTTP 404)"), "{err}");

    // Parent topics.
    server.ctl(&["topics", "create", "fleet"]).ok();
    let run = server.ctl(&["topics", "list"]);
    run.ok();
    assert_eq!(rows(&run.stdout)[0][0], "fleet");
    server.ctl(&["topics", "delete", "fleet"]).ok();
    assert_eq!(server.ctl_json(&["topics", "list"]), Value::Array(vec![]));

    // AccessKeys: the secret only in the create output.
    let run = server.ctl(&[
        "keys",
        "create",
        "--permission",
        "pub-only",
        "--filter",
        "fleet/#",
        "--filter",
        "other/+",
    ]);
    run.ok();
    let id = field(&run.stdout, "access_key_id");
    let secret = field(&run.stdout, "access_key_secret");
    assert!(!secret.is_empty() && secret != "-");
    assert_eq!(field(&run.stdout, "permission"), "pub-only");
    assert_eq!(field(&run.stdout, "topic_filters"), "fleet/#,other/+");
    let run = server.ctl(&["keys", "list"]);
    run.ok();
    assert!(run.stdout.contains(&id), "{}", run.stdout);
    assert!(
        !run.stdout.contains(&secret),
        "secret listed: {}",
        run.stdout
    );
    let json = server.ctl_json(&["keys", "list"]);
    assert!(!json.to_string().contains(&secret));
    assert_eq!(json[0]["access_key_id"], Value::String(id.clone()));
    let created = server.ctl_json(&["keys", "create"]);
    assert_eq!(created["permission"], "full");
    assert!(created["access_key_secret"].as_str().unwrap().len() >= 16);
    server.ctl(&["keys", "delete", &id]).ok();
    assert_eq!(
        server.ctl_json(&["keys", "list"]).as_array().unwrap().len(),
        1
    );
}

#[test]
fn instances_credentials_and_tokens() {
    let server = Server::start();

    let run = server.ctl(&["instances", "list"]);
    run.ok();
    assert!(run.stdout.starts_with("ID"), "{}", run.stdout);
    assert!(rows(&run.stdout).iter().any(|r| r[0] == "default"));

    let run = server.ctl(&[
        "instances",
        "create",
        "cloud-x",
        "--profile",
        "cloud",
        "--name",
        "Cloud X",
    ]);
    run.ok();
    assert_eq!(field(&run.stdout, "id"), "cloud-x");
    assert_eq!(field(&run.stdout, "profile"), "cloud");
    assert!(run.stdout.contains("settings:"), "{}", run.stdout);
    let shown = server.ctl_json(&["instances", "show", "cloud-x"]);
    assert_eq!(shown["name"], "Cloud X");
    assert_eq!(shown["settings"]["max_subscriptions_per_client"], 30);
    let err = server
        .ctl(&["instances", "create", "cloud-x"])
        .fails()
        .to_string();
    assert!(err.ends_with("(HTTP 409)"), "{err}");
    let err = server
        .ctl(&["instances", "show", "nope-nope"])
        .fails()
        .to_string();
    assert!(err.ends_with("(HTTP 404)"), "{err}");

    // Resources of the instance are reached with -i.
    server
        .ctl(&["-i", "cloud-x", "groups", "create", "GID_cxx"])
        .ok();
    let listed = server.ctl_json(&["groups", "list", "--instance", "cloud-x"]);
    assert_eq!(listed[0]["group_id"], "GID_cxx");
    assert_eq!(server.ctl_json(&["groups", "list"]), Value::Array(vec![]));

    // Device credentials: secrets shown by register, show and refresh.
    let cid = "GID_cxx@@@dev1";
    let run = server.ctl(&["-i", "cloud-x", "credentials", "register", cid]);
    run.ok();
    let dc_id = field(&run.stdout, "device_access_key_id");
    let dc_secret = field(&run.stdout, "device_access_key_secret");
    assert!(dc_id.starts_with("DC."), "{dc_id}");
    let shown = server.ctl_json(&["-i", "cloud-x", "credentials", "show", cid]);
    assert_eq!(
        shown["device_access_key_secret"],
        Value::String(dc_secret.clone())
    );
    let refreshed = server.ctl_json(&["-i", "cloud-x", "credentials", "refresh", cid]);
    assert_ne!(
        refreshed["device_access_key_secret"],
        Value::String(dc_secret)
    );
    let run = server.ctl(&["-i", "cloud-x", "credentials", "list"]);
    run.ok();
    assert_eq!(run.stdout, format!("CLIENT_ID\n{cid}\n"));
    server
        .ctl(&["-i", "cloud-x", "credentials", "delete", cid])
        .ok();
    assert_eq!(
        server.ctl_json(&["-i", "cloud-x", "credentials", "list"])["client_ids"],
        Value::Array(vec![])
    );

    // Tokens.
    let token = server.ctl_json(&[
        "-i",
        "cloud-x",
        "tokens",
        "apply",
        "--resource",
        "fleet/#",
        "--actions",
        "R,W",
        "--ttl",
        "600",
    ]);
    let tok = token["token"].as_str().unwrap().to_string();
    assert_eq!(token["actions"], "R,W");
    assert_eq!(token["revoked"], false);
    let run = server.ctl(&["-i", "cloud-x", "tokens", "show", &tok]);
    run.ok();
    assert_eq!(field(&run.stdout, "revoked"), "false");
    assert_eq!(field(&run.stdout, "resources"), "fleet/#");
    server
        .ctl(&["-i", "cloud-x", "tokens", "revoke", &tok])
        .ok();
    let shown = server.ctl_json(&["-i", "cloud-x", "tokens", "show", &tok]);
    assert_eq!(shown["revoked"], true);
    // --ttl or --expire-at is required, not both: usage errors exit with 2.
    let run = server.ctl(&["tokens", "apply", "--resource", "a/#", "--actions", "R"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let run = server.ctl(&[
        "tokens",
        "apply",
        "--resource",
        "a/#",
        "--actions",
        "X",
        "--ttl",
        "60",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);

    let run = server.ctl(&["instances", "delete", "cloud-x"]);
    run.ok();
    assert_eq!(run.stdout, "deleted instance cloud-x\n");
    let err = server
        .ctl(&["-i", "cloud-x", "groups", "list"])
        .fails()
        .to_string();
    assert!(err.contains("(HTTP 404)"), "{err}");
}

/// Writes a v3.1.1 CONNECT (clean session) and returns the socket once CONNACK accepted it.
fn mqtt_connect(addr: &str, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    write_packet(&mut s, 0x10, &body);
    let (kind, connack) = read_packet(&mut s).expect("CONNACK");
    assert_eq!(kind, 0x20);
    assert_eq!(connack, vec![0, 0], "CONNACK refused");
    s
}

fn write_packet(s: &mut TcpStream, header: u8, body: &[u8]) {
    let mut packet = vec![header];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(body);
    s.write_all(&packet).unwrap();
}

/// One packet: (first byte, body); `None` when the server closed the connection.
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    if s.read(&mut first).ok()? == 0 {
        return None;
    }
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

#[test]
fn clients_subscribers_publish_and_kick() {
    let server = Server::start();
    let mut sock = mqtt_connect(&server.mqtt, "ctl-client-1");
    // SUBSCRIBE id 1, "ctl/+/x" QoS 1.
    let filter = b"ctl/+/x";
    let mut body = vec![0, 1, 0, filter.len() as u8];
    body.extend_from_slice(filter);
    body.push(1);
    write_packet(&mut sock, 0x82, &body);
    assert_eq!(read_packet(&mut sock), Some((0x90, vec![0, 1, 1])));

    let run = server.ctl(&["clients", "list"]);
    run.ok();
    assert!(run.stdout.starts_with("CLIENT_ID"), "{}", run.stdout);
    let row = rows(&run.stdout)
        .into_iter()
        .find(|r| r[0] == "ctl-client-1")
        .unwrap_or_else(|| panic!("client not listed: {}", run.stdout));
    assert_eq!(row[1], "true", "{row:?}");
    assert!(row.contains(&"ctl/+/x:1".to_string()), "{row:?}");

    let shown = server.ctl_json(&["clients", "show", "ctl-client-1"]);
    assert_eq!(shown["online"], true);
    assert_eq!(shown["protocol_level"], 4);
    assert_eq!(shown["subscriptions"][0]["filter"], "ctl/+/x");
    assert_eq!(shown["subscriptions"][0]["qos"], 1);
    let run = server.ctl(&["clients", "show", "ctl-client-1"]);
    run.ok();
    assert!(run.stdout.contains("  ctl/+/x  qos 1"), "{}", run.stdout);
    let err = server
        .ctl(&["clients", "show", "nobody"])
        .fails()
        .to_string();
    assert!(
        err.starts_with("error: ClientNotFound") && err.ends_with("(HTTP 404)"),
        "{err}"
    );

    let run = server.ctl(&["subscribers", "ctl/a/x"]);
    run.ok();
    assert_eq!(field(&run.stdout, "subscriber_count"), "1");
    assert_eq!(field(&run.stdout, "topic"), "ctl/a/x");
    assert_eq!(
        server.ctl_json(&["subscribers", "ctl/b/y"])["subscriber_count"],
        0
    );

    // A server-side publish reaches the subscriber.
    let run = server.ctl(&["publish", "ctl/a/x", "hello from ctl", "--qos", "1"]);
    run.ok();
    assert!(!field(&run.stdout, "msg_id").is_empty());
    let (kind, body) = read_packet(&mut sock).expect("PUBLISH");
    assert_eq!(kind & 0xf0, 0x30, "PUBLISH expected, got {kind:#x}");
    assert_eq!((kind >> 1) & 3, 1, "QoS 1");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    assert_eq!(&body[2..2 + topic_len], b"ctl/a/x");
    assert_eq!(&body[2 + topic_len + 2..], b"hello from ctl");
    let pid = [body[2 + topic_len], body[3 + topic_len]];
    write_packet(&mut sock, 0x40, &pid);

    let run = server.ctl(&["clients", "kick", "ctl-client-1"]);
    run.ok();
    assert_eq!(run.stdout, "kicked ctl-client-1\n");
    // The server closes the connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_packet(&mut sock).is_some() {
        assert!(Instant::now() < deadline, "still connected after the kick");
    }
    let run = server.ctl(&["clients", "kick", "ctl-client-1"]);
    run.ok();
    assert_eq!(run.stdout, "ctl-client-1 was not connected\n");
}

#[test]
fn admin_keys_and_explicit_credentials() {
    let server = Server::start();
    let run = server.ctl(&["admin-keys", "create"]);
    run.ok();
    let id = field(&run.stdout, "access_key_id");
    let secret = field(&run.stdout, "access_key_secret");
    let run = server.ctl(&["admin-keys", "list"]);
    run.ok();
    assert_eq!(rows(&run.stdout).len(), 2, "{}", run.stdout);
    assert!(!run.stdout.contains(&secret));

    // --api / --key-id / --key-secret instead of the data directory, and the same via env.
    let mut cmd = ferry();
    cmd.args([
        "ctl",
        "--api",
        &server.api,
        "--key-id",
        &id,
        "--key-secret",
        &secret,
    ])
    .args(["instances", "list"]);
    Run::of(cmd).ok();
    let mut cmd = ferry();
    cmd.env("FERRY_API", &server.api)
        .env("FERRY_KEY_ID", &id)
        .env("FERRY_KEY_SECRET", &secret)
        .env("FERRY_DATA_DIR", "/nonexistent/ferry-data")
        .args(["ctl", "--json", "instances", "list"]);
    let run = Run::of(cmd);
    run.ok();
    assert!(run.stdout.contains("\"default\""), "{}", run.stdout);

    server.ctl(&["admin-keys", "delete", &id]).ok();
    let mut cmd = ferry();
    cmd.args([
        "ctl",
        "--api",
        &server.api,
        "--key-id",
        &id,
        "--key-secret",
        &secret,
    ])
    .args(["instances", "list"]);
    let err = Run::of(cmd).fails().to_string();
    assert!(
        err.starts_with("error: Unauthorized") && err.ends_with("(HTTP 401)"),
        "{err}"
    );
}

#[test]
fn failures_are_one_clear_line() {
    // Nothing listens on port 1 of the loopback address.
    let mut cmd = ferry();
    cmd.args([
        "ctl",
        "--api",
        "http://127.0.0.1:1",
        "--key-id",
        "k",
        "--key-secret",
        "s",
    ])
    .args(["groups", "list"]);
    let err = Run::of(cmd).fails().to_string();
    assert_eq!(
        err,
        "error: cannot reach the Ferry API at http://127.0.0.1:1: connection refused"
    );

    // No admin key in the data directory.
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = ferry();
    cmd.arg("ctl")
        .arg("--data-dir")
        .arg(empty.path())
        .args(["groups", "list"]);
    let err = Run::of(cmd).fails().to_string();
    assert!(
        err.starts_with("error: no admin key: cannot read "),
        "{err}"
    );
    assert!(err.contains("admin-key.json"), "{err}");

    // Wrong secret against a live server.
    let server = Server::start();
    let mut cmd = ferry();
    cmd.args([
        "ctl",
        "--api",
        &server.api,
        "--key-id",
        "AK.nobody",
        "--key-secret",
        "x",
    ])
    .args(["groups", "list"]);
    let err = Run::of(cmd).fails().to_string();
    assert!(err.ends_with("(HTTP 401)"), "{err}");

    // Usage errors are clap's: exit code 2.
    let run = server.ctl(&["groups", "frobnicate"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let run = server.ctl(&["keys", "create", "--permission", "everything"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}
