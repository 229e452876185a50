//! The cloud-compatible RPC API over real HTTP: a broker and the management API on 127.0.0.1
//! ephemeral ports, requests signed here (with a signer written independently of the server's),
//! MQTT clients speaking raw packets. Every network wait is bounded.

use bytes::BytesMut;
use ferry_admin::AdminState;
use ferry_broker::{Config, Server};
use ferry_codec::{decode, Connect, Packet, Properties, Protocol, QoS, SubOptions, Subscribe};
use ferry_meta::{AdminKey, Meta, Profile};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(5);
const CLOUD: &str = "mqtt-cloud";

struct Env {
    meta: Arc<Meta>,
    key: AdminKey,
    api: SocketAddr,
    mqtt: SocketAddr,
    server: Option<Server>,
    stop_api: Option<oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Env {
    async fn start() -> Env {
        let meta = Arc::new(Meta::new());
        meta.create_instance("default", "default", Profile::Standard, None, 0)
            .unwrap();
        meta.create_instance(CLOUD, "Cloud", Profile::Cloud, None, 0)
            .unwrap();
        let key = meta.create_admin_key(0).unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        let server = Server::start_with_meta(config, meta.clone())
            .await
            .expect("broker starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = listener.local_addr().unwrap();
        let state = AdminState {
            meta: meta.clone(),
            control: server.control(),
            rules_changed: None,
        };
        let (stop_api, stopped) = oneshot::channel::<()>();
        let api_task = tokio::spawn(ferry_admin::serve(listener, state, async {
            let _ = stopped.await;
        }));
        Env {
            meta,
            key,
            api,
            mqtt: server.local_addr(),
            server: Some(server),
            stop_api: Some(stop_api),
            api_task: Some(api_task),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop_api.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.api_task.take() {
            let _ = tokio::time::timeout(TIMEOUT, t).await;
        }
        if let Some(s) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), s.shutdown()).await;
        }
    }

    /// A signed POST with `params` in the query string.
    async fn call(&self, params: &[(&str, &str)]) -> (u16, Value) {
        let signed = Signed::new(&self.key.access_key_id, &self.key.secret, params);
        self.send(&signed.request("POST")).await
    }

    async fn send(&self, raw: &str) -> (u16, Value) {
        http(self.api, raw).await
    }
}

// ------------------------------------------------------------------------------------------
// The client side of the signature, written from the algorithm's description.

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn iso8601(epoch_secs: i64) -> String {
    let days = epoch_secs.div_euclid(86_400);
    let secs = epoch_secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn nonce() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "test-{}-{}-{}",
        std::process::id(),
        now_secs(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A request's parameters with the common ones and the signature.
struct Signed {
    params: Vec<(String, String)>,
}

impl Signed {
    fn new(key_id: &str, secret: &str, params: &[(&str, &str)]) -> Signed {
        Self::with(key_id, secret, params, "POST", now_secs(), &nonce())
    }

    fn with(
        key_id: &str,
        secret: &str,
        params: &[(&str, &str)],
        method: &str,
        at_secs: i64,
        nonce: &str,
    ) -> Signed {
        let mut all: Vec<(String, String)> = vec![
            ("Format".into(), "JSON".into()),
            ("Version".into(), "2020-04-20".into()),
            ("AccessKeyId".into(), key_id.into()),
            ("SignatureMethod".into(), "HMAC-SHA1".into()),
            ("SignatureVersion".into(), "1.0".into()),
            ("SignatureType".into(), String::new()),
            ("SignatureNonce".into(), nonce.into()),
            ("Timestamp".into(), iso8601(at_secs)),
            ("RegionId".into(), "cn-hangzhou".into()),
        ];
        for (k, v) in params {
            all.retain(|(name, _)| name != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut sorted = all.clone();
        sorted.sort();
        let canonical = sorted
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let sts = format!("{method}&%2F&{}", encode(&canonical));
        let signature = ferry_meta::auth::hmac_sha1_base64(&format!("{secret}&"), &sts);
        all.push(("Signature".into(), signature));
        Signed { params: all }
    }

    fn query(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    fn set(&mut self, name: &str, value: &str) {
        for (k, v) in &mut self.params {
            if k == name {
                *v = value.to_string();
            }
        }
    }

    fn request(&self, method: &str) -> String {
        format!(
            "{method} /?{} HTTP/1.1\r\nHost: ferry.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.query()
        )
    }
}

/// Sends one raw HTTP/1.1 request; returns the status and the JSON body.
async fn http(addr: SocketAddr, raw: &str) -> (u16, Value) {
    let work = async {
        let mut s = TcpStream::connect(addr).await.expect("API connect");
        s.write_all(raw.as_bytes()).await.expect("API write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("API read");
        buf
    };
    let buf = tokio::time::timeout(TIMEOUT, work)
        .await
        .expect("API answered in time");
    let text = String::from_utf8(buf).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "JSON answer: {head}"
    );
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let rid = json["RequestId"]
        .as_str()
        .expect("every answer has RequestId");
    assert_eq!(rid.len(), 36, "UUID-shaped RequestId: {rid}");
    assert!(rid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    (status, json)
}

fn code(v: &Value) -> &str {
    v["Code"].as_str().unwrap_or("")
}

// ------------------------------------------------------------------------------------------
// A raw MQTT client.

struct Mqtt {
    stream: TcpStream,
    buf: BytesMut,
}

impl Mqtt {
    async fn connect(addr: SocketAddr, client_id: &str, user: Option<(&str, &str)>) -> Mqtt {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("MQTT connect in time")
            .expect("MQTT connect");
        let mut c = Mqtt {
            stream,
            buf: BytesMut::new(),
        };
        c.send(Packet::Connect(Box::new(Connect {
            protocol: Protocol::V3_1_1,
            clean_start: true,
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: user.map(|(u, _)| u.into()),
            password: user.map(|(_, p)| bytes::Bytes::copy_from_slice(p.as_bytes())),
            properties: Properties::default(),
        })))
        .await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(
                    ack.code,
                    ferry_codec::ReasonCode::SUCCESS,
                    "{client_id}: CONNACK {ack:?}"
                )
            }
            other => panic!("{client_id}: expected CONNACK, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.encode(Protocol::V3_1_1, &mut out).unwrap();
        tokio::time::timeout(TIMEOUT, self.stream.write_all(&out))
            .await
            .expect("MQTT write in time")
            .expect("MQTT write");
    }

    /// The next packet, or `None` once the server closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, Protocol::V3_1_1, 1 << 20).unwrap() {
                return Some(p);
            }
            let n = tokio::time::timeout(TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("MQTT read in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.into(),
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_signed_request_is_accepted() {
    let env = Env::start().await;
    let (status, v) = env.call(&[("Action", "ListInstances")]).await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<&str> = v["Instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["InstanceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default", CLOUD]);
    assert_eq!(v["Instances"][1]["InstanceStatus"], 5);
    assert_eq!(v["Success"], "true");

    // GET works the same way (the method is part of what is signed).
    let signed = Signed::with(
        &env.key.access_key_id,
        &env.key.secret,
        &[("Action", "ListInstances")],
        "GET",
        now_secs(),
        &nonce(),
    );
    let (status, v) = env.send(&signed.request("GET")).await;
    assert_eq!(status, 200, "{v}");

    // Parameters in a form body count, and are covered by the signature.
    let signed = Signed::new(
        &env.key.access_key_id,
        &env.key.secret,
        &[("Action", "ListGroupId"), ("InstanceId", CLOUD)],
    );
    let body = signed.query();
    let raw = format!(
        "POST / HTTP/1.1\r\nHost: ferry.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, v) = env.send(&raw).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["Data"], serde_json::json!([]));
    env.stop().await;
}

#[tokio::test]
async fn bad_signatures_and_keys_are_refused() {
    let env = Env::start().await;
    let params = [("Action", "ListInstances")];

    let wrong = Signed::new(&env.key.access_key_id, "not-the-secret", &params);
    let (status, v) = env.send(&wrong.request("POST")).await;
    assert_eq!((status, code(&v)), (400, "SignatureDoesNotMatch"), "{v}");
    assert!(
        v["Message"]
            .as_str()
            .unwrap()
            .contains("string to sign is:POST&%2F&"),
        "the cloud's message with the server's string to sign: {v}"
    );
    assert_eq!(v["HostId"], "ferry.test");

    // Signed for GET, sent as POST.
    let get = Signed::with(
        &env.key.access_key_id,
        &env.key.secret,
        &params,
        "GET",
        now_secs(),
        &nonce(),
    );
    let (status, v) = env.send(&get.request("POST")).await;
    assert_eq!((status, code(&v)), (400, "SignatureDoesNotMatch"), "{v}");

    // A parameter changed after signing.
    let mut tampered = Signed::new(
        &env.key.access_key_id,
        &env.key.secret,
        &[
            ("Action", "CreateGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_one"),
        ],
    );
    tampered.set("GroupId", "GID_two");
    let (status, v) = env.send(&tampered.request("POST")).await;
    assert_eq!((status, code(&v)), (400, "SignatureDoesNotMatch"), "{v}");
    assert!(env.meta.groups(CLOUD).unwrap().is_empty());

    let unknown = Signed::new("FERRYNOSUCHKEY", &env.key.secret, &params);
    let (status, v) = env.send(&unknown.request("POST")).await;
    assert_eq!(
        (status, code(&v)),
        (404, "InvalidAccessKeyId.NotFound"),
        "{v}"
    );

    // A deleted admin key stops working.
    let other = env.meta.create_admin_key(0).unwrap();
    let (status, _) = env
        .send(&Signed::new(&other.access_key_id, &other.secret, &params).request("POST"))
        .await;
    assert_eq!(status, 200);
    env.meta.delete_admin_key(&other.access_key_id).unwrap();
    let (status, v) = env
        .send(&Signed::new(&other.access_key_id, &other.secret, &params).request("POST"))
        .await;
    assert_eq!(
        (status, code(&v)),
        (404, "InvalidAccessKeyId.NotFound"),
        "{v}"
    );

    // No signature at all.
    let raw = "POST /?Action=ListInstances&Version=2020-04-20 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (status, v) = env.send(raw).await;
    assert_eq!((status, code(&v)), (400, "MissingParameter"), "{v}");

    // Another signature method.
    let mut sha256 = Signed::new(&env.key.access_key_id, &env.key.secret, &params);
    sha256.set("SignatureMethod", "HMAC-SHA256");
    let (status, v) = env.send(&sha256.request("POST")).await;
    assert_eq!((status, code(&v)), (400, "IncompleteSignature"), "{v}");
    env.stop().await;
}

#[tokio::test]
async fn a_replayed_nonce_is_refused() {
    let env = Env::start().await;
    let signed = Signed::new(
        &env.key.access_key_id,
        &env.key.secret,
        &[
            ("Action", "CreateGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_replay"),
        ],
    );
    let raw = signed.request("POST");
    let (status, v) = env.send(&raw).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = env.send(&raw).await;
    assert_eq!((status, code(&v)), (400, "SignatureNonceUsed"), "{v}");
    // The same nonce in a freshly signed, different request is still refused.
    let again = Signed::with(
        &env.key.access_key_id,
        &env.key.secret,
        &[("Action", "ListInstances")],
        "POST",
        now_secs(),
        signed
            .params
            .iter()
            .find(|(k, _)| k == "SignatureNonce")
            .map(|(_, v)| v.as_str())
            .unwrap(),
    );
    let (status, v) = env.send(&again.request("POST")).await;
    assert_eq!((status, code(&v)), (400, "SignatureNonceUsed"), "{v}");
    env.stop().await;
}

#[tokio::test]
async fn timestamps_outside_the_window_are_refused() {
    let env = Env::start().await;
    let params = [("Action", "ListInstances")];
    for skew in [-20 * 60, 20 * 60] {
        let signed = Signed::with(
            &env.key.access_key_id,
            &env.key.secret,
            &params,
            "POST",
            now_secs() + skew,
            &nonce(),
        );
        let (status, v) = env.send(&signed.request("POST")).await;
        assert_eq!(
            (status, code(&v)),
            (400, "InvalidTimeStamp.Expired"),
            "skew {skew}s: {v}"
        );
    }
    // Within the window is fine.
    let signed = Signed::with(
        &env.key.access_key_id,
        &env.key.secret,
        &params,
        "POST",
        now_secs() - 10 * 60,
        &nonce(),
    );
    assert_eq!(env.send(&signed.request("POST")).await.0, 200);
    let mut bad = Signed::new(&env.key.access_key_id, &env.key.secret, &params);
    bad.set("Timestamp", "yesterday");
    let (status, v) = env.send(&bad.request("POST")).await;
    assert_eq!((status, code(&v)), (400, "InvalidTimeStamp.Format"), "{v}");
    env.stop().await;
}

#[tokio::test]
async fn version_action_and_instance_errors() {
    let env = Env::start().await;
    let (status, v) = env
        .call(&[("Action", "ListInstances"), ("Version", "2019-12-11")])
        .await;
    assert_eq!((status, code(&v)), (400, "InvalidVersion"), "{v}");
    let (status, v) = env.call(&[("Action", "DescribeNothing")]).await;
    assert_eq!((status, code(&v)), (404, "InvalidAction.NotFound"), "{v}");
    let (status, v) = env
        .call(&[("Action", "ListGroupId"), ("InstanceId", "mqtt-nope")])
        .await;
    assert_eq!((status, code(&v)), (404, "InstanceNotFound"), "{v}");
    let (status, v) = env.call(&[("Action", "ListGroupId")]).await;
    assert_eq!((status, code(&v)), (400, "ParameterCheckFailed"), "{v}");
    assert!(v["Message"].as_str().unwrap().contains("InstanceId"));
    for action in [
        "QueryMqttTraceDevice",
        "QueryMqttTraceMessageOfClient",
        "QueryMqttTraceMessagePublish",
        "QueryMqttTraceMessageSubscribe",
    ] {
        let (status, v) = env.call(&[("Action", action), ("InstanceId", CLOUD)]).await;
        assert_eq!(
            (status, code(&v)),
            (501, "UnsupportedOperation"),
            "{action}: {v}"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn groups_credentials_and_tokens() {
    let env = Env::start().await;
    let (status, v) = env
        .call(&[
            ("Action", "CreateGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_dev"),
        ])
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = env
        .call(&[
            ("Action", "CreateGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_dev"),
        ])
        .await;
    assert_eq!((status, code(&v)), (400, "GroupIdAlreadyExsited"), "{v}");
    let (status, v) = env
        .call(&[
            ("Action", "CreateGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "bad"),
        ])
        .await;
    assert_eq!((status, code(&v)), (400, "ParameterCheckFailed"), "{v}");
    let (_, v) = env
        .call(&[("Action", "ListGroupId"), ("InstanceId", CLOUD)])
        .await;
    assert_eq!(v["Data"][0]["GroupId"], "GID_dev");
    assert_eq!(v["Data"][0]["InstanceId"], CLOUD);
    assert_eq!(v["Data"][0]["IndependentNaming"], true);
    assert!(v["Data"][0]["CreateTime"].is_u64());

    // Device credentials, and a client connecting with one.
    let cid = "GID_dev@@@device1";
    let (status, v) = env
        .call(&[
            ("Action", "RegisterDeviceCredential"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!(status, 200, "{v}");
    let cred = &v["DeviceCredential"];
    assert_eq!(cred["ClientId"], cid);
    assert_eq!(cred["InstanceId"], CLOUD);
    let key_id = cred["DeviceAccessKeyId"].as_str().unwrap().to_string();
    let secret = cred["DeviceAccessKeySecret"].as_str().unwrap().to_string();
    let (_, v) = env
        .call(&[
            ("Action", "GetDeviceCredential"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!(
        v["DeviceCredential"]["DeviceAccessKeySecret"],
        secret.as_str()
    );
    let user = format!("DeviceCredential|{key_id}|{CLOUD}");
    let password = ferry_meta::auth::hmac_sha1_base64(&secret, cid);
    let mut device = Mqtt::connect(env.mqtt, cid, Some((&user, &password))).await;
    let (_, v) = env
        .call(&[
            ("Action", "QuerySessionByClientId"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!(v["OnlineStatus"], true, "{v}");

    for i in 2..=4 {
        let id = format!("GID_dev@@@device{i}");
        env.call(&[
            ("Action", "RegisterDeviceCredential"),
            ("InstanceId", CLOUD),
            ("ClientId", &id),
        ])
        .await;
    }
    let (_, v) = env
        .call(&[
            ("Action", "ListDeviceCredentialClientId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_dev"),
            ("PageSize", "3"),
        ])
        .await;
    let list = &v["DeviceCredentialClientIdList"];
    assert_eq!(list["Total"], "4", "{v}");
    assert_eq!(list["ClientIdList"].as_array().unwrap().len(), 3);
    let next = list["NextToken"]
        .as_str()
        .expect("more to come")
        .to_string();
    let (_, v) = env
        .call(&[
            ("Action", "ListDeviceCredentialClientId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_dev"),
            ("PageSize", "3"),
            ("NextToken", &next),
        ])
        .await;
    assert_eq!(
        v["DeviceCredentialClientIdList"]["ClientIdList"],
        serde_json::json!(["GID_dev@@@device4"])
    );
    assert!(v["DeviceCredentialClientIdList"].get("NextToken").is_none());

    let (_, v) = env
        .call(&[
            ("Action", "RefreshDeviceCredential"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_ne!(
        v["DeviceCredential"]["DeviceAccessKeySecret"],
        secret.as_str()
    );
    let (status, _) = env
        .call(&[
            ("Action", "UnRegisterDeviceCredential"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!(status, 200);
    let (status, v) = env
        .call(&[
            ("Action", "GetDeviceCredential"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!((status, code(&v)), (404, "DeviceCredentialNotFound"), "{v}");

    // CloseConnection disconnects the device; a second one finds nobody.
    let (status, v) = env
        .call(&[
            ("Action", "CloseConnection"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["Success"], true);
    loop {
        match device.recv().await {
            None => break,
            Some(Packet::Disconnect(_)) => continue,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    let (_, v) = env
        .call(&[
            ("Action", "QuerySessionByClientId"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!(v["OnlineStatus"], false, "{v}");
    let (status, v) = env
        .call(&[
            ("Action", "CloseConnection"),
            ("InstanceId", CLOUD),
            ("ClientId", cid),
        ])
        .await;
    assert_eq!((status, code(&v)), (404, "ClientNotFound"), "{v}");

    let (status, _) = env
        .call(&[
            ("Action", "DeleteGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_dev"),
        ])
        .await;
    assert_eq!(status, 200);
    let (status, v) = env
        .call(&[
            ("Action", "DeleteGroupId"),
            ("InstanceId", CLOUD),
            ("GroupId", "GID_dev"),
        ])
        .await;
    assert_eq!((status, code(&v)), (404, "GroupIdNotFound"), "{v}");

    // Tokens.
    let expire = ((now_secs() + 3600) * 1000).to_string();
    let (status, v) = env
        .call(&[
            ("Action", "ApplyToken"),
            ("InstanceId", CLOUD),
            ("Resources", "TopicA/#,TopicB/+"),
            ("Actions", "R,W"),
            ("ExpireTime", &expire),
        ])
        .await;
    assert_eq!(status, 200, "{v}");
    let token = v["Token"].as_str().unwrap().to_string();
    let stored = env.meta.token(CLOUD, &token).unwrap();
    assert_eq!(stored.resources, ["TopicA/#", "TopicB/+"]);
    let (_, v) = env
        .call(&[
            ("Action", "QueryToken"),
            ("InstanceId", CLOUD),
            ("Token", &token),
        ])
        .await;
    assert_eq!(v["TokenStatus"], true, "{v}");
    let (status, _) = env
        .call(&[
            ("Action", "RevokeToken"),
            ("InstanceId", CLOUD),
            ("Token", &token),
        ])
        .await;
    assert_eq!(status, 200);
    let (_, v) = env
        .call(&[
            ("Action", "QueryToken"),
            ("InstanceId", CLOUD),
            ("Token", &token),
        ])
        .await;
    assert_eq!(v["TokenStatus"], false, "{v}");
    let (_, v) = env
        .call(&[
            ("Action", "QueryToken"),
            ("InstanceId", CLOUD),
            ("Token", "forged"),
        ])
        .await;
    assert_eq!(v["TokenStatus"], false, "{v}");
    let (status, v) = env
        .call(&[
            ("Action", "ApplyToken"),
            ("InstanceId", CLOUD),
            ("Resources", "TopicA/#"),
            ("Actions", "X"),
            ("ExpireTime", &expire),
        ])
        .await;
    assert_eq!((status, code(&v)), (400, "ParameterCheckFailed"), "{v}");
    env.stop().await;
}

#[tokio::test]
async fn sessions_and_messages() {
    let env = Env::start().await;
    let mut sub = Mqtt::connect(env.mqtt, "rpc-sub", None).await;
    sub.subscribe("rpc/#").await;

    let (status, v) = env
        .call(&[
            ("Action", "SendMessage"),
            ("InstanceId", "default"),
            ("MqttTopic", "rpc/hello"),
            ("Payload", "héllo wörld & more=stuff"),
        ])
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(!v["MsgId"].as_str().unwrap().is_empty());
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic.as_str(), "rpc/hello");
            assert_eq!(&p.payload[..], "héllo wörld & more=stuff".as_bytes());
        }
        other => panic!("expected the message, got {other:?}"),
    }

    let mut ids: Vec<(String, String)> = vec![("ClientIdList.1".into(), "rpc-sub".into())];
    ids.push(("ClientIdList.2".into(), "nobody".into()));
    let mut params: Vec<(&str, &str)> = vec![
        ("Action", "BatchQuerySessionByClientIds"),
        ("InstanceId", "default"),
    ];
    params.extend(ids.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let (status, v) = env.call(&params).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["OnlineStatusList"],
        serde_json::json!([
            {"ClientId": "rpc-sub", "OnlineStatus": true},
            {"ClientId": "nobody", "OnlineStatus": false},
        ])
    );
    // More than ten ids.
    let many: Vec<(String, String)> = (1..=11)
        .map(|i| (format!("ClientIdList.{i}"), format!("c{i}")))
        .collect();
    let mut params: Vec<(&str, &str)> = vec![
        ("Action", "BatchQuerySessionByClientIds"),
        ("InstanceId", "default"),
    ];
    params.extend(many.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let (status, v) = env.call(&params).await;
    assert_eq!((status, code(&v)), (400, "ParameterCheckFailed"), "{v}");

    // A cloud instance checks the parent topic.
    let (status, v) = env
        .call(&[
            ("Action", "SendMessage"),
            ("InstanceId", CLOUD),
            ("MqttTopic", "NoParent/x"),
            ("Payload", "p"),
        ])
        .await;
    assert_eq!((status, code(&v)), (404, "TopicNotFound"), "{v}");
    env.meta.create_topic(CLOUD, "TopicA", 0).unwrap();
    let (status, v) = env
        .call(&[
            ("Action", "SendMessage"),
            ("InstanceId", CLOUD),
            ("MqttTopic", "TopicA/x"),
            ("Payload", "p"),
        ])
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = env
        .call(&[
            ("Action", "SendMessage"),
            ("InstanceId", "default"),
            ("MqttTopic", "bad/#"),
            ("Payload", "p"),
        ])
        .await;
    assert_eq!((status, code(&v)), (400, "ParameterCheckFailed"), "{v}");
    env.stop().await;
}

// ------------------------------------------------------------------------------------------
// Signature version 3 (ACS3-HMAC-SHA256), as the cloud's newer SDKs send it.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A version 3 request: query parameters, `x-acs-*` headers, `Authorization`.
fn acs3_request(
    env: &Env,
    secret: &str,
    action: &str,
    query: &[(&str, &str)],
    nonce: &str,
    at_secs: i64,
) -> String {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let payload = hex(&Sha256::digest(b""));
    let host = env.api.to_string();
    let date = iso8601(at_secs);
    let mut headers = [
        ("host", host.as_str()),
        ("x-acs-action", action),
        ("x-acs-version", "2020-04-20"),
        ("x-acs-date", date.as_str()),
        ("x-acs-signature-nonce", nonce),
        ("x-acs-content-sha256", payload.as_str()),
    ];
    headers.sort();
    let mut sorted: Vec<(String, String)> =
        query.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    sorted.sort();
    let canonical_query = sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request =
        format!("POST\n/\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload}");
    let string_to_sign = format!(
        "ACS3-HMAC-SHA256\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(string_to_sign.as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    let mut raw = format!("POST /?{canonical_query} HTTP/1.1\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str(&format!(
        "authorization: ACS3-HMAC-SHA256 Credential={},SignedHeaders={signed_headers},Signature={signature}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        env.key.access_key_id
    ));
    raw
}

#[tokio::test]
async fn signature_version_3_is_accepted_and_checked() {
    let env = Env::start().await;
    let secret = env.key.secret.clone();
    let params = [("InstanceId", CLOUD), ("GroupId", "GID_acs3")];
    let n = nonce();
    let raw = acs3_request(&env, &secret, "CreateGroupId", &params, &n, now_secs());
    let (status, v) = env.send(&raw).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(env.meta.groups(CLOUD).unwrap()[0].group_id, "GID_acs3");
    // Replayed.
    let (status, v) = env.send(&raw).await;
    assert_eq!((status, code(&v)), (400, "SignatureNonceUsed"), "{v}");
    // Wrong secret.
    let raw = acs3_request(
        &env,
        "nope",
        "ListGroupId",
        &[("InstanceId", CLOUD)],
        &nonce(),
        now_secs(),
    );
    let (status, v) = env.send(&raw).await;
    assert_eq!((status, code(&v)), (400, "SignatureDoesNotMatch"), "{v}");
    // A query parameter changed after signing.
    let raw = acs3_request(
        &env,
        &secret,
        "ListGroupId",
        &[("InstanceId", CLOUD)],
        &nonce(),
        now_secs(),
    )
    .replace("InstanceId=mqtt-cloud", "InstanceId=default");
    let (status, v) = env.send(&raw).await;
    assert_eq!((status, code(&v)), (400, "SignatureDoesNotMatch"), "{v}");
    // Stale.
    let raw = acs3_request(
        &env,
        &secret,
        "ListGroupId",
        &[("InstanceId", CLOUD)],
        &nonce(),
        now_secs() - 3600,
    );
    let (status, v) = env.send(&raw).await;
    assert_eq!((status, code(&v)), (400, "InvalidTimeStamp.Expired"), "{v}");
    // A body that is not the one hashed.
    let raw = acs3_request(
        &env,
        &secret,
        "ListGroupId",
        &[("InstanceId", CLOUD)],
        &nonce(),
        now_secs(),
    )
    .replace("content-length: 0\r\n", "content-length: 3\r\n")
        + "a=b";
    let (status, v) = env.send(&raw).await;
    assert_eq!((status, code(&v)), (400, "SignatureDoesNotMatch"), "{v}");
    // Fine again.
    let raw = acs3_request(
        &env,
        &secret,
        "ListGroupId",
        &[("InstanceId", CLOUD)],
        &nonce(),
        now_secs(),
    );
    let (status, v) = env.send(&raw).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["Data"][0]["GroupId"], "GID_acs3");
    env.stop().await;
}
