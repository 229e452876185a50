//! The REST API over real HTTP: a real broker (`ferry_broker::Server`) and the admin app
//! (`ferry_admin::serve`) on 127.0.0.1 port 0, a small HTTP/1.1 client over a tokio
//! `TcpStream`, and raw MQTT clients built on `ferry_codec`.
//!
//! Every answer of the API is checked against the OpenAPI document the server serves: the
//! status must be documented for the operation and the body must match its schema.

use base64::Engine;
use bytes::{Bytes, BytesMut};
use ferry_admin::AdminState;
use ferry_broker::{Config, Server};
use ferry_codec::{
    decode, Connect, Packet, Properties, Protocol, PubAck, QoS, ReasonCode, SubOptions, Subscribe,
};
use ferry_meta::{now_ms, Meta, Profile};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The bound on every network wait.
const TIMEOUT: Duration = Duration::from_secs(10);

// ----------------------------------------------------------------------------------------
// HTTP client

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error answer with `status` and `code`; returns its message.
    fn error(&self, status: u16, code: &str) -> String {
        let v = self.json();
        assert_eq!(
            (self.status, v["code"].as_str().unwrap_or_default()),
            (status, code),
            "{v}"
        );
        v["message"].as_str().expect("message").to_string()
    }
}

fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = find_subslice(data, b"\r\n").expect("chunk size line");
        let size_str = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
            .expect("chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One request on a fresh connection (`Connection: close`), the whole answer read to EOF.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect to the API");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method == "POST" || method == "PATCH" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        s.write_all(&bytes).await.expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read answer");
        raw
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: timed out"));
    let head_end = find_subslice(&raw, b"\r\n\r\n").expect("end of the head");
    let head = std::str::from_utf8(&raw[..head_end]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else if let Some((_, len)) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        rest[..len.parse::<usize>().unwrap()].to_vec()
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

// ----------------------------------------------------------------------------------------
// Checking answers against the OpenAPI document

/// A minimal validator for the subset of JSON Schema the document uses.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/components/schemas/").expect("local ref");
        let target = &doc["components"]["schemas"][name];
        assert!(!target.is_null(), "{r} undefined");
        return validate(doc, target, v, at);
    }
    if v.is_null() {
        return if schema["nullable"] == json!(true) {
            Ok(())
        } else {
            Err(format!("{at}: null but not nullable"))
        };
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            return Err(format!("{at}: {v} not in {options:?}"));
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let obj = v.as_object().ok_or(format!("{at}: not an object: {v}"))?;
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let req = req.as_str().unwrap();
                if !obj.contains_key(req) {
                    return Err(format!("{at}: missing required {req}"));
                }
            }
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(doc, s, val, &format!("{at}.{k}"))?,
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            return Err(format!("{at}: undocumented property {k}"))
                        }
                        Some(s @ Value::Object(_)) => validate(doc, s, val, &format!("{at}.{k}"))?,
                        _ => {}
                    },
                }
            }
            Ok(())
        }
        Some("array") => {
            let arr = v.as_array().ok_or(format!("{at}: not an array: {v}"))?;
            for (i, item) in arr.iter().enumerate() {
                validate(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("string") if !v.is_string() => Err(format!("{at}: not a string: {v}")),
        Some("integer") if !(v.is_u64() || v.is_i64()) => Err(format!("{at}: not an integer: {v}")),
        Some("boolean") if !v.is_boolean() => Err(format!("{at}: not a boolean: {v}")),
        _ => Ok(()),
    }
}

/// The documented (template, method) an actual path matches; literal segments beat
/// parameters.
fn match_template<'a>(doc: &'a Value, method: &str, path: &str) -> Option<(String, &'a Value)> {
    let path = path.split('?').next().unwrap();
    let segs: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, String, &Value)> = None;
    for (template, item) in doc["paths"].as_object().unwrap() {
        let tsegs: Vec<&str> = template.split('/').collect();
        if tsegs.len() != segs.len() {
            continue;
        }
        let mut literal = 0;
        let ok = tsegs.iter().zip(&segs).all(|(t, s)| {
            if t.starts_with('{') {
                true
            } else {
                literal += 1;
                t == s
            }
        });
        if !ok {
            continue;
        }
        if let Some(op) = item.get(method.to_ascii_lowercase()) {
            let better = match &best {
                Some((l, _, _)) => literal > *l,
                None => true,
            };
            if better {
                best = Some((literal, template.clone(), op));
            }
        }
    }
    best.map(|(_, t, op)| (t, op))
}

/// Checks an answer against the document: documented status, body matching its schema.
fn check_against_doc(doc: &Value, method: &str, path: &str, resp: &Resp) {
    let Some((template, op)) = match_template(doc, method, path) else {
        return;
    };
    let documented = &op["responses"][resp.status.to_string()];
    assert!(
        !documented.is_null(),
        "{method} {template}: status {} is not documented (body {})",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    match documented["content"]["application/json"]["schema"] {
        Value::Null => assert!(
            resp.body.is_empty(),
            "{method} {template}: {} has an undocumented body",
            resp.status
        ),
        ref schema => {
            assert_eq!(
                resp.header("content-type"),
                Some("application/json"),
                "{method} {template}"
            );
            if let Err(e) = validate(doc, schema, &resp.json(), "$") {
                panic!("{method} {template} -> {}: {e}", resp.status);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// The environment: broker + admin app

struct Env {
    api: SocketAddr,
    mqtt: SocketAddr,
    auth: String,
    admin_id: String,
    doc: Value,
    meta: Arc<Meta>,
    server: Option<Server>,
    stop_api: Option<oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Env {
    async fn start() -> Env {
        let meta = Arc::new(Meta::new());
        meta.create_instance("default", "default", Profile::Standard, None, now_ms())
            .unwrap();
        let key = meta.create_admin_key(now_ms()).unwrap();
        let server = Server::start_with_meta(
            Config {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            },
            meta.clone(),
        )
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
        let api_task = tokio::spawn(ferry_admin::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        let doc_resp = http(api, "GET", "/api/v1/openapi.json", &[], None).await;
        assert_eq!(doc_resp.status, 200);
        let doc = doc_resp.json();
        Env {
            api,
            mqtt: server.local_addr(),
            auth: basic(&key.access_key_id, &key.secret),
            admin_id: key.access_key_id,
            doc,
            meta,
            server: Some(server),
            stop_api: Some(stop_api),
            api_task: Some(api_task),
        }
    }

    /// A raw request (any headers), checked against the document.
    async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let r = http(self.api, method, path, headers, body).await;
        check_against_doc(&self.doc, method, path, &r);
        r
    }

    /// An authenticated request with an optional JSON body, checked against the document.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        let mut headers = vec![("Authorization", self.auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        self.raw(method, path, &headers, body.as_deref().map(str::as_bytes))
            .await
    }

    async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Resp {
        self.call("POST", path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> Resp {
        self.call("DELETE", path, None).await
    }

    async fn stop(mut self) {
        let _ = self.stop_api.take().unwrap().send(());
        let task = self.api_task.take().unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("admin app stops")
            .unwrap()
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            self.server.take().unwrap().shutdown(),
        )
        .await
        .expect("broker stops");
    }
}

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ----------------------------------------------------------------------------------------
// A raw MQTT 5 client

struct Mqtt {
    stream: TcpStream,
    buf: BytesMut,
}

impl Mqtt {
    async fn connect(addr: SocketAddr, client_id: &str) -> Mqtt {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("mqtt connect timed out")
            .expect("mqtt connect");
        let mut m = Mqtt {
            stream,
            buf: BytesMut::new(),
        };
        m.send(Packet::Connect(Box::new(Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })))
        .await;
        match m.recv().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ReasonCode::SUCCESS, "{ack:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        m
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.encode(Protocol::V5, &mut out).expect("encodable");
        tokio::time::timeout(TIMEOUT, self.stream.write_all(&out))
            .await
            .expect("mqtt write timed out")
            .expect("mqtt write");
    }

    /// The next packet, or `None` at EOF.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, Protocol::V5, 1 << 20).expect("decodable") {
                return Some(p);
            }
            let n = tokio::time::timeout(TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("mqtt read timed out")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.into(),
                SubOptions {
                    qos,
                    ..Default::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) => assert_eq!(ack.codes, vec![ReasonCode(qos as u8)]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

// ----------------------------------------------------------------------------------------
// Tests

/// The document and the router describe the same routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    let env = Env::start().await;
    let doc = &env.doc;
    assert_eq!(
        doc["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["basicAuth"],
        json!({"type": "http", "scheme": "basic", "description": doc["components"]["securitySchemes"]["basicAuth"]["description"]})
    );
    for name in [
        "Instance",
        "InstanceSettings",
        "ParentTopic",
        "Group",
        "AccessKey",
        "DeviceCredential",
        "Token",
        "ClientView",
        "Error",
    ] {
        assert!(doc["components"]["schemas"].get(name).is_some(), "{name}");
    }

    // The document's operations are exactly the route table's.
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{method} {path}: summary"
            );
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            // Every path parameter is documented.
            let params: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(params, in_path, "{method} {path}");
            documented.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    let table: BTreeSet<(String, String)> = ferry_admin::rest::operations()
        .iter()
        .map(|o| (o.method.as_str().to_string(), o.path.to_string()))
        .collect();
    assert_eq!(documented, table);
    assert_eq!(documented.len(), 38, "the contract has 38 operations");

    // Every documented operation is served: with credentials it is neither 405 nor an unknown
    // route; without them, every one but the document answers 401.
    for (method, template) in &documented {
        let path = template
            .split('/')
            .map(|s| if s.starts_with('{') { "nosuch-x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let path = if template.ends_with("/subscribers") {
            format!("{path}?topic=a/b")
        } else {
            path
        };
        let body = (method == "POST" || method == "PATCH").then(|| json!({}));
        let r = env.call(method, &path, body).await;
        assert_ne!(r.status, 405, "{method} {path}");
        if r.status == 404 {
            assert_ne!(r.json()["code"], "RouteNotFound", "{method} {path}");
        }
        let anon = env.raw(method, &path, &[], None).await;
        if template == "/api/v1/openapi.json" {
            assert_eq!(anon.status, 200);
        } else {
            anon.error(401, "Unauthorized");
        }
    }

    // Every method served on a documented path is documented: the others answer 405 (JSON,
    // with Allow), and paths outside the document answer a JSON 404.
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for template in paths {
        let path = template.replace('{', "x").replace('}', "");
        let allowed: BTreeSet<&str> = documented
            .iter()
            .filter(|(_, p)| p == template)
            .map(|(m, _)| m.as_str())
            .collect();
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if allowed.contains(method) {
                continue;
            }
            let r = env.call(method, &path, None).await;
            r.error(405, "MethodNotAllowed");
            let allow: BTreeSet<&str> = r.header("allow").unwrap().split(", ").collect();
            assert_eq!(allow, allowed, "{template}");
        }
    }
    for path in [
        "/api/v1/nope",
        "/api/v1/instances/default/nope",
        "/api/v1/instances/default/groups/GID_x/online/x",
    ] {
        env.get(path).await.error(404, "RouteNotFound");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication() {
    let env = Env::start().await;
    let path = "/api/v1/instances";
    let r = env.raw("GET", path, &[], None).await;
    r.error(401, "Unauthorized");
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    let secret = env.meta.admin_secret(&env.admin_id).unwrap();
    for bad in [
        basic(&env.admin_id, "wrong"),
        basic(&env.admin_id, &format!("{secret}x")),
        basic("FERRYNOSUCH", &secret),
        basic("", ""),
        format!("Bearer {secret}"),
        "Basic !!!notbase64".to_string(),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("no-colon")
        ),
    ] {
        env.raw("GET", path, &[("Authorization", &bad)], None)
            .await
            .error(401, "Unauthorized");
    }
    // Authentication comes before the body and the path are looked at.
    env.raw(
        "POST",
        "/api/v1/instances/nosuch/groups",
        &[("Content-Type", "application/json")],
        Some(b"{"),
    )
    .await
    .error(401, "Unauthorized");
    let ok = env
        .raw(
            "GET",
            path,
            &[("Authorization", &basic(&env.admin_id, &secret))],
            None,
        )
        .await;
    assert_eq!(ok.status, 200);
    // The scheme name is case-insensitive.
    let lower = basic(&env.admin_id, &secret).replacen("Basic", "basic", 1);
    assert_eq!(
        env.raw("GET", path, &[("Authorization", &lower)], None)
            .await
            .status,
        200
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances() {
    let env = Env::start().await;
    let list = env.get("/api/v1/instances").await;
    assert_eq!(list.status, 200);
    let list = list.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], "default");
    assert_eq!(list[0]["profile"], "standard");

    // Create with partial settings merged over the profile defaults.
    let r = env
        .post(
            "/api/v1/instances",
            json!({"id": "cloud-1", "name": "Cloud one", "profile": "cloud", "settings": {"max_keep_alive": 60}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let inst = r.json();
    assert_eq!(
        keys_of(&inst),
        set(&["id", "name", "profile", "settings", "created_at"])
    );
    assert_eq!(inst["profile"], "cloud");
    assert_eq!(inst["name"], "Cloud one");
    assert_eq!(inst["settings"]["max_keep_alive"], 60);
    assert_eq!(inst["settings"]["require_parent_topic"], true);
    assert_eq!(inst["settings"]["max_subscriptions_per_client"], 30);
    assert_eq!(inst["settings"]["max_offline_messages"], 1_000_000);
    // No alarm yet; an unknown instance has none to list.
    let alarms = env.get("/api/v1/instances/cloud-1/alarms").await;
    assert_eq!(alarms.status, 200);
    assert_eq!(alarms.json(), json!([]));
    assert_eq!(env.get("/api/v1/instances/nope/alarms").await.status, 404);
    let created = inst["created_at"].as_u64().unwrap();
    assert!(created.abs_diff(now_ms()) < 60_000);

    // Name defaults to the id; no settings = profile defaults.
    let r = env
        .post(
            "/api/v1/instances",
            json!({"id": "std-2", "profile": "standard"}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["name"], "std-2");
    assert_eq!(r.json()["settings"]["require_parent_topic"], false);

    let got = env.get("/api/v1/instances/cloud-1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), inst);
    assert_eq!(
        env.get("/api/v1/instances")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // PATCH merges over the current settings.
    let r = env
        .call(
            "PATCH",
            "/api/v1/instances/cloud-1",
            Some(json!({"settings": {"p2p": false, "max_parent_topics": 3}})),
        )
        .await;
    assert_eq!(r.status, 200);
    let patched = r.json();
    assert_eq!(patched["settings"]["p2p"], false);
    assert_eq!(patched["settings"]["max_parent_topics"], 3);
    assert_eq!(patched["settings"]["max_keep_alive"], 60);
    assert_eq!(env.get("/api/v1/instances/cloud-1").await.json(), patched);

    // Errors.
    let m = env
        .call(
            "PATCH",
            "/api/v1/instances/cloud-1",
            Some(json!({"settings": {"max_keep_alive": "soon"}})),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("max_keep_alive"), "{m}");
    let m = env
        .call(
            "PATCH",
            "/api/v1/instances/cloud-1",
            Some(json!({"settings": {"no_such_setting": 1}})),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("no_such_setting"), "{m}");
    let m = env
        .call("PATCH", "/api/v1/instances/cloud-1", Some(json!({})))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("settings"), "{m}");
    env.call(
        "PATCH",
        "/api/v1/instances/nosuch",
        Some(json!({"settings": {}})),
    )
    .await
    .error(404, "InstanceNotFound");
    env.post(
        "/api/v1/instances",
        json!({"id": "cloud-1", "profile": "cloud"}),
    )
    .await
    .error(409, "InstanceAlreadyExisted");
    let m = env
        .post(
            "/api/v1/instances",
            json!({"id": "Bad_Id", "profile": "cloud"}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("InstanceId"), "{m}");
    let m = env
        .post(
            "/api/v1/instances",
            json!({"id": "okid", "profile": "mega"}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("profile") && m.contains("mega"), "{m}");
    let m = env
        .post("/api/v1/instances", json!({"id": "okid"}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("profile"), "{m}");
    env.get("/api/v1/instances/nosuch")
        .await
        .error(404, "InstanceNotFound");

    // Delete.
    let r = env.delete("/api/v1/instances/cloud-1").await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    env.get("/api/v1/instances/cloud-1")
        .await
        .error(404, "InstanceNotFound");
    env.delete("/api/v1/instances/cloud-1")
        .await
        .error(404, "InstanceNotFound");
    let m = env
        .delete("/api/v1/instances/default")
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("default"), "{m}");
    assert_eq!(env.get("/api/v1/instances/default").await.status, 200);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_topics() {
    let env = Env::start().await;
    let base = "/api/v1/instances/default/topics";
    assert_eq!(env.get(base).await.json(), json!([]));
    let r = env.post(base, json!({"name": "sensors"})).await;
    assert_eq!(r.status, 201);
    let t = r.json();
    assert_eq!(keys_of(&t), set(&["name", "created_at"]));
    assert_eq!(t["name"], "sensors");
    let list = env.get(base).await.json();
    assert_eq!(list, json!([t]));
    env.post(base, json!({"name": "SENSORS"}))
        .await
        .error(409, "TopicAlreadyExisted");
    let m = env
        .post(base, json!({"name": "a/b"}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("ParentTopic"), "{m}");
    env.post("/api/v1/instances/nosuch/topics", json!({"name": "x"}))
        .await
        .error(404, "InstanceNotFound");
    assert_eq!(env.delete(&format!("{base}/sensors")).await.status, 204);
    env.delete(&format!("{base}/sensors"))
        .await
        .error(404, "TopicNotFound");
    assert_eq!(env.get(base).await.json(), json!([]));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_request_errors() {
    let env = Env::start().await;
    let base = "/api/v1/instances/default/groups";
    let r = env.post(base, json!({"group_id": "GID_test"})).await;
    assert_eq!(r.status, 201);
    let g = r.json();
    assert_eq!(keys_of(&g), set(&["group_id", "created_at"]));
    assert_eq!(g["group_id"], "GID_test");
    assert_eq!(env.get(base).await.json(), json!([g]));
    env.post(base, json!({"group_id": "GID_test"}))
        .await
        .error(409, "GroupIdAlreadyExsited");
    let m = env
        .post(base, json!({"group_id": "nogid"}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("GroupId"), "{m}");
    env.get("/api/v1/instances/nosuch/groups")
        .await
        .error(404, "InstanceNotFound");

    // Online count of an existing group with nobody connected; an unknown group is 404.
    let r = env.get(&format!("{base}/GID_test/online")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"group_id": "GID_test", "online_count": 0}));
    env.get(&format!("{base}/GID_nosuch/online"))
        .await
        .error(404, "GroupIdNotFound");
    env.get("/api/v1/instances/nosuch/groups/GID_test/online")
        .await
        .error(404, "InstanceNotFound");

    // Malformed requests: each a 400 naming the problem.
    let auth = env.auth.clone();
    let json_ct = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let m = env
        .raw("POST", base, &json_ct, Some(b"{"))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("request body"), "{m}");
    let m = env
        .raw("POST", base, &json_ct, Some(b""))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("empty"), "{m}");
    let m = env
        .raw("POST", base, &json_ct, Some(b"[1]"))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("request body"), "{m}");
    let m = env
        .raw("POST", base, &json_ct, Some(br#"{"group_id": "GID_a"} x"#))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("trailing"), "{m}");
    let m = env
        .post(base, json!({"group": "GID_x"}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("group"), "{m}");
    let m = env
        .post(base, json!({}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("missing field `group_id`"), "{m}");
    let m = env
        .post(base, json!({"group_id": 5}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("group_id") && m.contains("invalid type"), "{m}");
    let m = env
        .raw(
            "POST",
            base,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "text/plain"),
            ],
            Some(br#"{"group_id":"GID_plain"}"#),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("Content-Type"), "{m}");
    // No content type at all is accepted.
    let r = env
        .raw(
            "POST",
            base,
            &[("Authorization", auth.as_str())],
            Some(br#"{"group_id":"GID_noct"}"#),
        )
        .await;
    assert_eq!(r.status, 201);
    // A path value that is not UTF-8.
    let m = env
        .get("/api/v1/instances/%FF%FE/groups")
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("path") && m.contains("instance"), "{m}");

    assert_eq!(env.delete(&format!("{base}/GID_test")).await.status, 204);
    env.delete(&format!("{base}/GID_test"))
        .await
        .error(404, "GroupIdNotFound");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_keys() {
    let env = Env::start().await;
    let base = "/api/v1/instances/default/keys";
    let r = env
        .post(
            base,
            json!({"permission": "pub-only", "topic_filters": ["a/#"]}),
        )
        .await;
    assert_eq!(r.status, 201);
    let k = r.json();
    assert_eq!(
        keys_of(&k),
        set(&[
            "access_key_id",
            "access_key_secret",
            "permission",
            "topic_filters",
            "created_at"
        ])
    );
    assert_eq!(k["permission"], "pub-only");
    assert_eq!(k["topic_filters"], json!(["a/#"]));
    let secret = k["access_key_secret"].as_str().unwrap();
    assert!(secret.len() >= 16);
    let r = env.post(base, json!({"permission": "full"})).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["topic_filters"], json!([]));

    // The list never shows a secret.
    let list = env.get(base).await;
    assert!(!String::from_utf8_lossy(&list.body).contains(secret));
    let list = list.json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    for key in list.as_array().unwrap() {
        assert_eq!(
            keys_of(key),
            set(&["access_key_id", "permission", "topic_filters", "created_at"])
        );
    }
    let m = env
        .post(base, json!({"permission": "everything"}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("permission"), "{m}");
    let m = env
        .post(
            base,
            json!({"permission": "full", "topic_filters": ["a/#/b"]}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("TopicFilters"), "{m}");
    env.get("/api/v1/instances/nosuch/keys")
        .await
        .error(404, "InstanceNotFound");
    let id = k["access_key_id"].as_str().unwrap();
    assert_eq!(env.delete(&format!("{base}/{id}")).await.status, 204);
    env.delete(&format!("{base}/{id}"))
        .await
        .error(404, "AccessKeyNotFound");
    assert_eq!(env.get(base).await.json().as_array().unwrap().len(), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_credentials() {
    let env = Env::start().await;
    let base = "/api/v1/instances/default/credentials";
    assert_eq!(env.get(base).await.json(), json!({"client_ids": []}));
    let r = env.post(base, json!({"client_id": "GID_x@@@dev1"})).await;
    assert_eq!(r.status, 201);
    let c = r.json();
    assert_eq!(
        keys_of(&c),
        set(&[
            "client_id",
            "device_access_key_id",
            "device_access_key_secret",
            "created_at",
            "updated_at"
        ])
    );
    assert_eq!(c["client_id"], "GID_x@@@dev1");
    let got = env.get(&format!("{base}/GID_x@@@dev1")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), c);
    // Percent-encoded path values are decoded.
    assert_eq!(
        env.get(&format!("{base}/GID_x%40%40%40dev1")).await.json(),
        c
    );
    assert_eq!(
        env.get(base).await.json(),
        json!({"client_ids": ["GID_x@@@dev1"]})
    );

    let r = env
        .call("POST", &format!("{base}/GID_x@@@dev1/refresh"), None)
        .await;
    assert_eq!(r.status, 200);
    let refreshed = r.json();
    assert_eq!(refreshed["device_access_key_id"], c["device_access_key_id"]);
    assert_ne!(
        refreshed["device_access_key_secret"],
        c["device_access_key_secret"]
    );
    assert!(refreshed["updated_at"].as_u64() >= c["updated_at"].as_u64());
    assert_eq!(
        env.get(&format!("{base}/GID_x@@@dev1")).await.json(),
        refreshed
    );

    env.post(base, json!({"client_id": ""}))
        .await
        .error(400, "ParameterCheckFailed");
    env.call("POST", &format!("{base}/nosuch/refresh"), None)
        .await
        .error(404, "DeviceCredentialNotFound");
    assert_eq!(
        env.delete(&format!("{base}/GID_x@@@dev1")).await.status,
        204
    );
    env.get(&format!("{base}/GID_x@@@dev1"))
        .await
        .error(404, "DeviceCredentialNotFound");
    env.delete(&format!("{base}/GID_x@@@dev1"))
        .await
        .error(404, "DeviceCredentialNotFound");
    env.get("/api/v1/instances/nosuch/credentials")
        .await
        .error(404, "InstanceNotFound");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifecycle() {
    let env = Env::start().await;
    let base = "/api/v1/instances/default/tokens";
    let r = env
        .post(
            base,
            json!({"resources": ["t/#", "u/+"], "actions": "R,W", "ttl_secs": 3600}),
        )
        .await;
    assert_eq!(r.status, 201);
    let t = r.json();
    assert_eq!(
        keys_of(&t),
        set(&[
            "token",
            "resources",
            "actions",
            "expire_at",
            "created_at",
            "revoked"
        ])
    );
    assert_eq!(t["resources"], json!(["t/#", "u/+"]));
    assert_eq!(t["actions"], "R,W");
    assert_eq!(t["revoked"], false);
    let created = t["created_at"].as_u64().unwrap();
    assert_eq!(t["expire_at"].as_u64().unwrap(), created + 3_600_000);
    let token = t["token"].as_str().unwrap();

    let got = env.get(&format!("{base}/{token}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), t);
    let r = env.delete(&format!("{base}/{token}")).await;
    assert_eq!(r.status, 204);
    let got = env.get(&format!("{base}/{token}")).await.json();
    assert_eq!(got["revoked"], true);
    assert_eq!(got["token"], t["token"]);

    // expire_at works too.
    let at = now_ms() + 600_000;
    let r = env
        .post(
            base,
            json!({"resources": ["t/1"], "actions": "R", "expire_at": at}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["expire_at"], at);
    assert_eq!(r.json()["actions"], "R");

    // Errors.
    let m = env
        .post(
            base,
            json!({"resources": ["t/1"], "actions": "X", "ttl_secs": 3600}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("actions"), "{m}");
    let m = env
        .post(
            base,
            json!({"resources": ["t/1"], "actions": "W", "ttl_secs": 3600, "expire_at": at}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("expire_at") && m.contains("ttl_secs"), "{m}");
    let m = env
        .post(base, json!({"resources": ["t/1"], "actions": "W"}))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("ttl_secs"), "{m}");
    env.post(
        base,
        json!({"resources": ["t/1"], "actions": "W", "ttl_secs": 5}),
    )
    .await
    .error(400, "ParameterCheckFailed");
    env.post(
        base,
        json!({"resources": [], "actions": "W", "ttl_secs": 3600}),
    )
    .await
    .error(400, "ParameterCheckFailed");
    env.get(&format!("{base}/nosuchtoken"))
        .await
        .error(404, "TokenNotFound");
    env.delete(&format!("{base}/nosuchtoken"))
        .await
        .error(404, "TokenNotFound");
    env.post(
        "/api/v1/instances/nosuch/tokens",
        json!({"resources": ["t/1"], "actions": "W", "ttl_secs": 3600}),
    )
    .await
    .error(404, "InstanceNotFound");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys() {
    let env = Env::start().await;
    let r = env.call("POST", "/api/v1/admin-keys", None).await;
    assert_eq!(r.status, 201);
    let k = r.json();
    assert_eq!(
        keys_of(&k),
        set(&["access_key_id", "access_key_secret", "created_at"])
    );
    let id = k["access_key_id"].as_str().unwrap();
    let secret = k["access_key_secret"].as_str().unwrap();
    // The new key works.
    let auth = basic(id, secret);
    let r = env
        .raw(
            "GET",
            "/api/v1/admin-keys",
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(!String::from_utf8_lossy(&r.body).contains(secret));
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    for key in list.as_array().unwrap() {
        assert_eq!(keys_of(key), set(&["access_key_id", "created_at"]));
    }
    // Delete it: it stops working.
    assert_eq!(
        env.delete(&format!("/api/v1/admin-keys/{id}")).await.status,
        204
    );
    env.raw(
        "GET",
        "/api/v1/admin-keys",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .error(401, "Unauthorized");
    env.delete(&format!("/api/v1/admin-keys/{id}"))
        .await
        .error(404, "AccessKeyNotFound");
    // The last key stays.
    env.delete(&format!("/api/v1/admin-keys/{}", env.admin_id))
        .await
        .error(409, "LastAdminKey");
    assert_eq!(env.get("/api/v1/admin-keys").await.status, 200);
    env.stop().await;
}

/// Client queries, publishing and kicking with a real MQTT client connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_subscribers_messages() {
    let env = Env::start().await;
    let inst = "/api/v1/instances/default";
    assert_eq!(
        env.post(&format!("{inst}/groups"), json!({"group_id": "GID_test"}))
            .await
            .status,
        201
    );
    assert_eq!(env.get(&format!("{inst}/clients")).await.json(), json!([]));

    let mut mqtt = Mqtt::connect(env.mqtt, "GID_test@@@dev1").await;
    mqtt.subscribe("t/#", QoS::AtLeastOnce).await;

    // The client list shows it online with its subscription.
    let list = env.get(&format!("{inst}/clients")).await;
    assert_eq!(list.status, 200);
    let list = list.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let c = &list[0];
    assert_eq!(
        keys_of(c),
        set(&[
            "client_id",
            "online",
            "address",
            "protocol_level",
            "last_activity",
            "subscriptions",
            "inflight",
            "queued"
        ])
    );
    assert_eq!(c["client_id"], "GID_test@@@dev1");
    assert_eq!(c["online"], true);
    assert_eq!(c["protocol_level"], 5);
    assert!(
        c["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{c}"
    );
    assert!(
        c["last_activity"].as_u64().unwrap().abs_diff(now_ms()) < 60_000,
        "{c}"
    );
    assert_eq!(c["subscriptions"], json!([{"filter": "t/#", "qos": 1}]));
    assert_eq!(c["inflight"], 0);
    assert_eq!(c["queued"], 0);
    let one = env.get(&format!("{inst}/clients/GID_test@@@dev1")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["subscriptions"], c["subscriptions"]);
    assert_eq!(one.json()["online"], true);
    env.get(&format!("{inst}/clients/nobody"))
        .await
        .error(404, "ClientNotFound");
    env.get("/api/v1/instances/nosuch/clients/GID_test@@@dev1")
        .await
        .error(404, "InstanceNotFound");
    env.get("/api/v1/instances/nosuch/clients")
        .await
        .error(404, "InstanceNotFound");

    // Online count per group, subscriber count per topic.
    assert_eq!(
        env.get(&format!("{inst}/groups/GID_test/online"))
            .await
            .json(),
        json!({"group_id": "GID_test", "online_count": 1})
    );
    assert_eq!(
        env.get(&format!("{inst}/subscribers?topic=t/x"))
            .await
            .json(),
        json!({"topic": "t/x", "subscriber_count": 1})
    );
    assert_eq!(
        env.get(&format!("{inst}/subscribers?topic=other"))
            .await
            .json(),
        json!({"topic": "other", "subscriber_count": 0})
    );
    // Percent-encoded query values are decoded.
    assert_eq!(
        env.get(&format!("{inst}/subscribers?topic=t%2Fy"))
            .await
            .json()["subscriber_count"],
        1
    );
    let m = env
        .get(&format!("{inst}/subscribers?topic=t/%23"))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("topic"), "{m}");
    let m = env
        .get(&format!("{inst}/subscribers"))
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("topic"), "{m}");
    env.get("/api/v1/instances/nosuch/subscribers?topic=t/x")
        .await
        .error(404, "InstanceNotFound");

    // Publishing through the API reaches the subscriber.
    let r = env
        .post(
            &format!("{inst}/messages"),
            json!({"topic": "t/x", "payload": "hello", "qos": 1, "user_properties": {"k": "v"}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let sent = r.json();
    assert_eq!(keys_of(&sent), set(&["msg_id"]));
    assert!(!sent["msg_id"].as_str().unwrap().is_empty());
    match mqtt.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic.as_str(), "t/x");
            assert_eq!(p.payload, Bytes::from_static(b"hello"));
            assert_eq!(p.qos, QoS::AtLeastOnce);
            let props: Vec<(String, String)> = p
                .properties
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_str().to_string()))
                .collect();
            assert_eq!(props, vec![("k".to_string(), "v".to_string())]);
            mqtt.send(Packet::PubAck(PubAck::new(p.packet_id))).await;
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    let r = env
        .post(
            &format!("{inst}/messages"),
            json!({"topic": "t/bin", "payload_base64": base64::engine::general_purpose::STANDARD.encode([0u8, 255, 7])}),
        )
        .await;
    assert_eq!(r.status, 201);
    match mqtt.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic.as_str(), "t/bin");
            assert_eq!(p.payload, Bytes::from_static(&[0, 255, 7]));
            assert_eq!(p.qos, QoS::AtMostOnce);
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    for (body, needle) in [
        (json!({"topic": "t/#", "payload": "x"}), "topic"),
        (json!({"topic": "", "payload": "x"}), "topic"),
        (json!({"topic": "t/x", "payload": "x", "qos": 3}), "qos"),
        (
            json!({"topic": "t/x", "payload": "x", "payload_base64": "eA=="}),
            "payload_base64",
        ),
        (
            json!({"topic": "t/x", "payload_base64": "***"}),
            "payload_base64",
        ),
        (json!({"payload": "x"}), "topic"),
    ] {
        let m = env
            .post(&format!("{inst}/messages"), body.clone())
            .await
            .error(400, "ParameterCheckFailed");
        assert!(m.contains(needle), "{body}: {m}");
    }
    env.post("/api/v1/instances/nosuch/messages", json!({"topic": "t/x"}))
        .await
        .error(404, "InstanceNotFound");

    // Kicking disconnects it (MQTT 5: DISCONNECT 0x98).
    let r = env.delete(&format!("{inst}/clients/GID_test@@@dev1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"kicked": true}));
    match mqtt.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode(0x98)),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(mqtt.recv().await.is_none(), "connection closed");
    assert_eq!(
        env.get(&format!("{inst}/groups/GID_test/online"))
            .await
            .json()["online_count"],
        0
    );
    let after = env.get(&format!("{inst}/clients/GID_test@@@dev1")).await;
    match after.status {
        404 => assert_eq!(after.json()["code"], "ClientNotFound"),
        200 => assert_eq!(after.json()["online"], false),
        s => panic!("unexpected status {s}"),
    }
    assert_eq!(
        env.delete(&format!("{inst}/clients/GID_test@@@dev1"))
            .await
            .json(),
        json!({"kicked": false})
    );
    env.stop().await;
}

/// A cloud instance checks message topics against its parent topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_instance_messages() {
    let env = Env::start().await;
    assert_eq!(
        env.post(
            "/api/v1/instances",
            json!({"id": "cloud-1", "profile": "cloud"})
        )
        .await
        .status,
        201
    );
    let base = "/api/v1/instances/cloud-1";
    let m = env
        .post(
            &format!("{base}/messages"),
            json!({"topic": "sensors/a", "payload": "x"}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("parent topic"), "{m}");
    assert_eq!(
        env.post(&format!("{base}/topics"), json!({"name": "sensors"}))
            .await
            .status,
        201
    );
    assert_eq!(
        env.post(
            &format!("{base}/messages"),
            json!({"topic": "sensors/a", "payload": "x"})
        )
        .await
        .status,
        201
    );
    let big = "x".repeat(64 * 1024 + 1);
    let m = env
        .post(
            &format!("{base}/messages"),
            json!({"topic": "sensors/a", "payload": big}),
        )
        .await
        .error(400, "ParameterCheckFailed");
    assert!(m.contains("max_payload_size"), "{m}");
    // Credentials on a cloud instance need an existing group.
    env.post(
        &format!("{base}/credentials"),
        json!({"client_id": "GID_none@@@d"}),
    )
    .await
    .error(404, "GroupIdNotFound");
    assert_eq!(env.get(&format!("{base}/clients")).await.json(), json!([]));
    env.stop().await;
}

/// The value of one sample (`series` as written: name and labels) in a `/metrics` answer.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `/metrics` serves the broker's live counters in the Prometheus text format, to an admin
/// key only, and counts what real MQTT clients do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_in_the_prometheus_text_format() {
    let env = Env::start().await;
    env.raw("GET", "/metrics", &[], None)
        .await
        .error(401, "Unauthorized");
    let r = env.call("POST", "/metrics", None).await;
    r.error(405, "MethodNotAllowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    let scrape = || async {
        let r = env.get("/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        String::from_utf8(r.body).expect("UTF-8")
    };
    // Waits (bounded) until the router has published its counters.
    let scrape_until = |series: &'static str, want: f64| async move {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let text = scrape().await;
            if sample(&text, series) == Some(want) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} never became {want}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    let text = scrape().await;
    assert_eq!(sample(&text, "ferry_connections"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ferry_messages_received_total"), Some(0.0));
    assert_eq!(
        sample(&text, "ferry_build_info{version=\"0.1.0\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "ferry_uptime_seconds").unwrap() > 0.0);

    let mut sub = Mqtt::connect(env.mqtt, "sub").await;
    sub.subscribe("m/#", QoS::AtMostOnce).await;
    let mut publisher = Mqtt::connect(env.mqtt, "pub").await;
    for i in 0..3u8 {
        publisher
            .send(Packet::Publish(ferry_codec::Publish {
                topic: "m/x".into(),
                payload: Bytes::from(vec![i]),
                ..Default::default()
            }))
            .await;
        match sub.recv().await {
            Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], &[i]),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let text = scrape_until("ferry_messages_sent_total", 3.0).await;
    assert_eq!(sample(&text, "ferry_messages_received_total"), Some(3.0));
    assert_eq!(sample(&text, "ferry_connections"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "ferry_sessions"), Some(2.0), "{text}");
    for reason in ["qos0_outbox_full", "queue_full", "too_large", "expired"] {
        let series = format!("ferry_messages_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
    }

    // A retained message, and a client that goes: the gauges follow.
    publisher
        .send(Packet::Publish(ferry_codec::Publish {
            topic: "m/r".into(),
            payload: Bytes::from_static(b"kept"),
            retain: true,
            ..Default::default()
        }))
        .await;
    scrape_until("ferry_retained_messages", 1.0).await;
    drop(publisher);
    scrape_until("ferry_connections", 1.0).await;
    drop(sub);
    env.stop().await;
}
