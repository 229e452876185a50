//! `apache.rocketmq.v2.MessagingService` over the [`Queue`]: authentication (`MQv2-HMAC-SHA1`
//! against the namespace's AccessKeys), the Telemetry settings the SDKs need, long polling bounded
//! by the client's `grpc-timeout`, and the mapping of queue results onto RocketMQ status codes.
//! Business results travel in `Status{code, message}` with gRPC status OK.

use crate::engine::Queue;
use crate::model::*;
use crate::pb;
use ferry_meta::{KeyPermission, Meta};
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Streaming};

pub use pb::Code;

type GrpcResult<T> = Result<Response<T>, tonic::Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// The longest a ReceiveMessage long poll waits (also what the consumer settings announce).
pub const LONG_POLLING: Duration = Duration::from_secs(20);
/// Invisibility of push-consumer deliveries (`auto_renew`), renewed while the client lives.
pub const AUTO_RENEW: Duration = Duration::from_secs(60);

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct MessagingService {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    meta: Arc<Meta>,
    default_namespace: String,
    allow_anonymous: bool,
    /// Live telemetry streams per client id.
    clients: Mutex<HashMap<String, usize>>,
}

/// Who is calling, once authenticated.
#[derive(Debug)]
struct Caller {
    client_id: String,
    ns: String,
    publish: bool,
    subscribe: bool,
}

fn status(code: Code, message: impl Into<String>) -> pb::Status {
    pb::Status {
        code: code as i32,
        message: message.into(),
    }
}

fn ok() -> Option<pb::Status> {
    Some(status(Code::Ok, "OK"))
}

/// The RocketMQ code for a queue error.
pub fn error_code(e: &QueueError) -> Code {
    match e {
        QueueError::TopicNotFound(_) => Code::TopicNotFound,
        QueueError::IllegalTopic(_) => Code::IllegalTopic,
        QueueError::IllegalGroup(_) => Code::IllegalConsumerGroup,
        QueueError::IllegalFilter(_) => Code::IllegalFilterExpression,
        QueueError::InvalidReceiptHandle(_) => Code::InvalidReceiptHandle,
        QueueError::BodyTooLarge { .. } => Code::MessageBodyTooLarge,
        QueueError::BadRequest(_) => Code::BadRequest,
        QueueError::NotImplemented(_) => Code::NotImplemented,
        QueueError::Store(_) | QueueError::Internal(_) => Code::InternalError,
    }
}

fn err_status(e: &QueueError) -> pb::Status {
    status(error_code(e), e.to_string())
}

fn meta_str<'a>(md: &'a MetadataMap, key: &str) -> Option<&'a str> {
    md.get(key).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn to_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::from_secs(d.seconds as u64) + Duration::from_nanos(d.nanos as u64))
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}

/// `grpc-timeout`: an integer and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Hex HMAC-SHA1 of `msg` with `key`, lower case.
pub fn sign(key: &str, msg: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(msg.as_bytes());
    hex(&mac.finalize().into_bytes(), false)
}

fn hex(b: &[u8], upper: bool) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        if upper {
            s.push_str(&format!("{x:02X}"));
        } else {
            s.push_str(&format!("{x:02x}"));
        }
    }
    s
}

/// The `Credential=` and `Signature=` parts of an `authorization` value.
fn parse_authorization(v: &str) -> Option<(String, String)> {
    let rest = v.trim().strip_prefix("MQv2-HMAC-SHA1")?;
    let mut cred = None;
    let mut sig = String::new();
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(c) = part.strip_prefix("Credential=") {
            cred = Some(c.split('/').next().unwrap_or("").trim().to_string());
        } else if let Some(s) = part.strip_prefix("Signature=") {
            sig = s.trim().to_string();
        }
    }
    Some((cred?, sig))
}

impl MessagingService {
    /// `allow_anonymous`: whether calls without an AccessKey are served (in the default
    /// namespace only).
    pub fn new(
        queue: Queue,
        meta: Arc<Meta>,
        default_namespace: String,
        allow_anonymous: bool,
    ) -> MessagingService {
        MessagingService {
            inner: Arc::new(Inner {
                queue,
                meta,
                default_namespace,
                allow_anonymous,
                clients: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the client has a live telemetry stream.
    pub fn client_alive(&self, client_id: &str) -> bool {
        self.clients().get(client_id).is_some_and(|n| *n > 0)
    }

    /// Renews the invisibility of live push consumers' deliveries (call every few seconds).
    pub fn renew(&self) -> usize {
        let alive: std::collections::HashSet<String> = self
            .clients()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(c, _)| c.clone())
            .collect();
        self.inner
            .queue
            .renew_auto(&|c| alive.contains(c), Duration::from_secs(20), AUTO_RENEW)
    }

    fn authenticate(&self, md: &MetadataMap) -> Result<Caller, pb::Status> {
        let client_id = match meta_str(md, "x-mq-client-id") {
            Some(c) if !c.is_empty() => c.to_string(),
            _ => {
                return Err(status(
                    Code::ClientIdRequired,
                    "the x-mq-client-id header is required",
                ))
            }
        };
        let ns = match meta_str(md, "x-mq-namespace") {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => self.inner.default_namespace.clone(),
        };
        if self.inner.meta.instance(&ns).is_err() {
            return Err(status(
                Code::NotFound,
                format!("namespace {ns:?} is not an instance of this Ferry server"),
            ));
        }
        let cred = meta_str(md, "authorization").and_then(parse_authorization);
        match cred {
            Some((key_id, signature)) if !key_id.is_empty() => {
                let keys = self.inner.meta.keys(&ns).unwrap_or_default();
                let Some(key) = keys.into_iter().find(|k| k.access_key_id == key_id) else {
                    return Err(status(
                        Code::Unauthorized,
                        format!("AccessKey {key_id:?} does not exist in instance {ns:?}"),
                    ));
                };
                let Some(date) = meta_str(md, "x-mq-date-time") else {
                    return Err(status(
                        Code::Unauthorized,
                        "the x-mq-date-time header is required with a signature",
                    ));
                };
                let expected = sign(&key.secret, date);
                if !ferry_meta::auth::secrets_equal(&expected, &signature.to_ascii_lowercase()) {
                    return Err(status(
                        Code::Unauthorized,
                        format!("the signature of AccessKey {key_id:?} does not match"),
                    ));
                }
                Ok(Caller {
                    client_id,
                    ns,
                    publish: key.permission != KeyPermission::SubOnly,
                    subscribe: key.permission != KeyPermission::PubOnly,
                })
            }
            Some(_) | None => {
                if !self.inner.allow_anonymous {
                    return Err(status(
                        Code::Unauthorized,
                        "anonymous access is not allowed on this listener: use an AccessKey of \
                         the instance (queue.allow_anonymous)",
                    ));
                }
                if ns != self.inner.default_namespace {
                    return Err(status(
                        Code::Unauthorized,
                        format!("anonymous clients may use the default instance only, not {ns:?}"),
                    ));
                }
                Ok(Caller {
                    client_id,
                    ns,
                    publish: true,
                    subscribe: true,
                })
            }
        }
    }

    fn check_pub(c: &Caller) -> Result<(), pb::Status> {
        if c.publish {
            Ok(())
        } else {
            Err(status(
                Code::Forbidden,
                "this AccessKey may not send (SubOnly)",
            ))
        }
    }

    fn check_sub(c: &Caller) -> Result<(), pb::Status> {
        if c.subscribe {
            Ok(())
        } else {
            Err(status(
                Code::Forbidden,
                "this AccessKey may not consume (PubOnly)",
            ))
        }
    }

    /// The topic of a route query, created when the queue auto-creates topics.
    fn route_topic(&self, ns: &str, topic: &str) -> Result<(), pb::Status> {
        let q = &self.inner.queue;
        if !valid_name(topic) {
            return Err(err_status(&QueueError::IllegalTopic(topic.into())));
        }
        if q.topic_exists(ns, topic) {
            return Ok(());
        }
        if q.config().auto_create_topics {
            q.create_topic(ns, topic).map_err(|e| err_status(&e))
        } else {
            Err(err_status(&QueueError::TopicNotFound(topic.into())))
        }
    }

    fn server_settings(&self, ns: &str, s: pb::Settings) -> pb::Settings {
        let cfg = self.inner.queue.config();
        let client_type = s.client_type.unwrap_or(0);
        let mut out = pb::Settings {
            client_type: s.client_type,
            access_point: s.access_point.clone(),
            request_timeout: s.request_timeout,
            user_agent: s.user_agent.clone(),
            metric: Some(pb::Metric {
                on: false,
                endpoints: None,
            }),
            ..Default::default()
        };
        if client_type == pb::ClientType::Producer as i32 {
            let topics = match s.pub_sub {
                Some(pb::settings::PubSub::Publishing(p)) => p.topics,
                _ => Vec::new(),
            };
            out.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: 3,
                strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(
                    pb::ExponentialBackoff {
                        initial: Some(pb_duration(Duration::from_millis(10))),
                        max: Some(pb_duration(Duration::from_secs(1))),
                        multiplier: 2.0,
                    },
                )),
            });
            out.pub_sub = Some(pb::settings::PubSub::Publishing(pb::Publishing {
                topics,
                max_body_size: cfg.max_body_size.min(i32::MAX as usize) as i32,
                validate_message_type: false,
            }));
        } else if client_type == pb::ClientType::PushConsumer as i32
            || client_type == pb::ClientType::SimpleConsumer as i32
        {
            let (group, subs) = match s.pub_sub {
                Some(pb::settings::PubSub::Subscription(sub)) => (sub.group, sub.subscriptions),
                _ => (None, Vec::new()),
            };
            if let Some(g) = &group {
                for e in &subs {
                    if let Some(t) = &e.topic {
                        // A group exists from the moment a consumer subscribes, so messages
                        // sent after the consumer started are its (RocketMQ starts at the end).
                        if let Err(e) = self.inner.queue.ensure_group(
                            ns,
                            &g.name,
                            &t.name,
                            self.inner.queue.default_start_for(&t.name),
                        ) {
                            tracing::debug!("queue: subscription of {:?}: {e}", g.name);
                        }
                    }
                }
            }
            let steps = [
                1u64, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600,
                7200,
            ];
            out.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: cfg.max_attempts.min(i32::MAX as u32) as i32,
                strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(
                    pb::CustomizedBackoff {
                        next: steps
                            .iter()
                            .map(|s| pb_duration(Duration::from_secs(*s)))
                            .collect(),
                    },
                )),
            });
            out.pub_sub = Some(pb::settings::PubSub::Subscription(pb::Subscription {
                group,
                subscriptions: subs,
                fifo: Some(false),
                receive_batch_size: Some(32),
                long_polling_timeout: Some(pb_duration(LONG_POLLING)),
            }));
        }
        out
    }

    fn endpoints_or_default(e: Option<pb::Endpoints>, md_host: Option<&str>) -> pb::Endpoints {
        match e {
            Some(e) if !e.addresses.is_empty() => e,
            _ => {
                let (host, port) = md_host
                    .and_then(|h| h.rsplit_once(':'))
                    .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
                    .unwrap_or_else(|| ("127.0.0.1".into(), 8081));
                pb::Endpoints {
                    scheme: pb::AddressScheme::IPv4 as i32,
                    addresses: vec![pb::Address { host, port }],
                }
            }
        }
    }

    fn message_queue(topic: &str, id: i32, endpoints: pb::Endpoints) -> pb::MessageQueue {
        pb::MessageQueue {
            topic: Some(pb::Resource {
                resource_namespace: String::new(),
                name: topic.to_string(),
            }),
            id,
            permission: pb::Permission::ReadWrite as i32,
            broker: Some(pb::Broker {
                name: "ferry".into(),
                id: 0,
                endpoints: Some(endpoints),
            }),
            accept_message_types: vec![
                pb::MessageType::Normal as i32,
                pb::MessageType::Fifo as i32,
                pb::MessageType::Delay as i32,
                pb::MessageType::Transaction as i32,
            ],
        }
    }

    fn to_new_message(m: pb::Message) -> Result<NewMessage, QueueError> {
        let topic = m.topic.map(|t| t.name).unwrap_or_default();
        let sp = m.system_properties.unwrap_or_default();
        if sp.message_type == pb::MessageType::Delay as i32 || sp.delivery_timestamp.is_some() {
            return Err(QueueError::NotImplemented(
                "delay (timed) messages are not supported by Ferry's queue".into(),
            ));
        }
        if sp.message_type == pb::MessageType::Transaction as i32 {
            return Err(QueueError::NotImplemented(
                "transactional messages are not supported by Ferry's queue".into(),
            ));
        }
        if sp.message_type == pb::MessageType::Fifo as i32 || sp.message_group.is_some() {
            return Err(QueueError::NotImplemented(
                "FIFO messages (message groups) are not supported by Ferry's queue".into(),
            ));
        }
        if sp.body_encoding == pb::Encoding::Gzip as i32 {
            return Err(QueueError::NotImplemented(
                "gzip-encoded bodies are not supported by Ferry's queue".into(),
            ));
        }
        Ok(NewMessage {
            topic,
            tag: sp.tag.filter(|t| !t.is_empty()),
            keys: sp.keys,
            properties: m.user_properties.into_iter().collect(),
            body: m.body.into(),
            message_id: Some(sp.message_id).filter(|s| !s.is_empty()),
            born_host: sp.born_host,
            born_timestamp_ms: sp.born_timestamp.as_ref().map(timestamp_ms).unwrap_or(0),
        })
    }

    /// A delivery as the SDKs expect it (see the contract's "Messages delivered").
    pub fn to_pb_message(d: &Delivery, store_host: &str, invisible: Duration) -> pb::Message {
        let m = &d.message;
        let digest = hex(&Md5::digest(&m.body), true);
        pb::Message {
            topic: Some(pb::Resource {
                resource_namespace: String::new(),
                name: m.topic.clone(),
            }),
            user_properties: m.properties.clone().into_iter().collect(),
            system_properties: Some(pb::SystemProperties {
                tag: m.tag.clone(),
                keys: m.keys.clone(),
                message_id: m.id.clone(),
                body_digest: Some(pb::Digest {
                    r#type: pb::DigestType::Md5 as i32,
                    checksum: digest,
                }),
                body_encoding: pb::Encoding::Identity as i32,
                message_type: pb::MessageType::Normal as i32,
                born_timestamp: Some(timestamp(m.born_timestamp_ms)),
                born_host: m.born_host.clone(),
                store_timestamp: Some(timestamp(m.store_timestamp_ms)),
                store_host: store_host.to_string(),
                delivery_timestamp: None,
                receipt_handle: Some(d.receipt_handle.clone()),
                queue_id: 0,
                queue_offset: Some(m.offset.min(i64::MAX as u64) as i64),
                invisible_duration: Some(pb_duration(invisible)),
                delivery_attempt: Some(d.delivery_attempt.min(i32::MAX as u32) as i32),
                message_group: None,
                trace_context: None,
            }),
            body: m.body.to_vec(),
        }
    }
}

fn one<T: Send + 'static>(item: T) -> BoxStream<T> {
    Box::pin(tokio_stream::iter(vec![Ok(item)]))
}

fn resource_name(r: &Option<pb::Resource>) -> String {
    r.as_ref().map(|r| r.name.clone()).unwrap_or_default()
}

/// The overall status of per-entry results: OK when all are, the single code when all failed
/// alike, MULTIPLE_RESULTS otherwise.
fn overall(entries: &[Option<pb::Status>]) -> pb::Status {
    let codes: Vec<i32> = entries
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.code))
        .collect();
    if codes.iter().all(|c| *c == Code::Ok as i32) {
        return status(Code::Ok, "OK");
    }
    if codes.windows(2).all(|w| w[0] == w[1]) {
        if let Some(Some(s)) = entries.first() {
            return s.clone();
        }
    }
    status(Code::MultipleResults, "some entries failed; see each entry")
}

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for MessagingService {
    async fn query_route(
        &self,
        req: Request<pb::QueryRouteRequest>,
    ) -> GrpcResult<pb::QueryRouteResponse> {
        tracing::debug!("queue: rpc query_route");
        let md = req.metadata().clone();
        let r = req.into_inner();
        let caller = match self.authenticate(&md) {
            Ok(c) => c,
            Err(s) => {
                return Ok(Response::new(pb::QueryRouteResponse {
                    status: Some(s),
                    message_queues: vec![],
                }))
            }
        };
        let topic = resource_name(&r.topic);
        if let Err(s) = self.route_topic(&caller.ns, &topic) {
            return Ok(Response::new(pb::QueryRouteResponse {
                status: Some(s),
                message_queues: vec![],
            }));
        }
        let endpoints = Self::endpoints_or_default(r.endpoints, None);
        Ok(Response::new(pb::QueryRouteResponse {
            status: ok(),
            message_queues: vec![Self::message_queue(&topic, 0, endpoints)],
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> GrpcResult<pb::HeartbeatResponse> {
        tracing::debug!("queue: rpc heartbeat");
        let s = match self.authenticate(req.metadata()) {
            Ok(_) => ok(),
            Err(s) => Some(s),
        };
        Ok(Response::new(pb::HeartbeatResponse { status: s }))
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> GrpcResult<pb::SendMessageResponse> {
        tracing::debug!("queue: rpc send_message");
        let caller = match self
            .authenticate(req.metadata())
            .and_then(|c| Self::check_pub(&c).map(|_| c))
        {
            Ok(c) => c,
            Err(s) => {
                return Ok(Response::new(pb::SendMessageResponse {
                    status: Some(s),
                    entries: vec![],
                }))
            }
        };
        let r = req.into_inner();
        if r.messages.is_empty() {
            return Ok(Response::new(pb::SendMessageResponse {
                status: Some(status(Code::BadRequest, "no message to send")),
                entries: vec![],
            }));
        }
        let mut entries = Vec::with_capacity(r.messages.len());
        for m in r.messages {
            let client_id = m
                .system_properties
                .as_ref()
                .map(|s| s.message_id.clone())
                .unwrap_or_default();
            let result = match Self::to_new_message(m) {
                Ok(nm) => self.inner.queue.send(&caller.ns, nm).await,
                Err(e) => Err(e),
            };
            entries.push(match result {
                Ok(sent) => pb::SendResultEntry {
                    status: ok(),
                    message_id: sent.message_id,
                    transaction_id: String::new(),
                    offset: sent.offset.min(i64::MAX as u64) as i64,
                },
                Err(e) => pb::SendResultEntry {
                    status: Some(err_status(&e)),
                    message_id: client_id,
                    transaction_id: String::new(),
                    offset: 0,
                },
            });
        }
        let statuses: Vec<_> = entries.iter().map(|e| e.status.clone()).collect();
        Ok(Response::new(pb::SendMessageResponse {
            status: Some(overall(&statuses)),
            entries,
        }))
    }

    async fn query_assignment(
        &self,
        req: Request<pb::QueryAssignmentRequest>,
    ) -> GrpcResult<pb::QueryAssignmentResponse> {
        tracing::debug!("queue: rpc query_assignment");
        let md = req.metadata().clone();
        let r = req.into_inner();
        let fail = |s| {
            Ok(Response::new(pb::QueryAssignmentResponse {
                status: Some(s),
                assignments: vec![],
            }))
        };
        let caller = match self
            .authenticate(&md)
            .and_then(|c| Self::check_sub(&c).map(|_| c))
        {
            Ok(c) => c,
            Err(s) => return fail(s),
        };
        let topic = resource_name(&r.topic);
        if let Err(s) = self.route_topic(&caller.ns, &topic) {
            return fail(s);
        }
        let endpoints = Self::endpoints_or_default(r.endpoints, None);
        Ok(Response::new(pb::QueryAssignmentResponse {
            status: ok(),
            assignments: vec![pb::Assignment {
                message_queue: Some(Self::message_queue(&topic, -1, endpoints)),
            }],
        }))
    }

    type ReceiveMessageStream = BoxStream<pb::ReceiveMessageResponse>;

    async fn receive_message(
        &self,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> GrpcResult<Self::ReceiveMessageStream> {
        tracing::debug!("queue: rpc receive_message");
        use pb::receive_message_response::Content;
        let md = req.metadata().clone();
        let r = req.into_inner();
        let fail = |s: pb::Status| {
            Ok(Response::new(one(pb::ReceiveMessageResponse {
                content: Some(Content::Status(s)),
            })))
        };
        let caller = match self
            .authenticate(&md)
            .and_then(|c| Self::check_sub(&c).map(|_| c))
        {
            Ok(c) => c,
            Err(s) => return fail(s),
        };
        let group = resource_name(&r.group);
        let topic = r
            .message_queue
            .as_ref()
            .map(|q| resource_name(&q.topic))
            .unwrap_or_default();
        let filter = match &r.filter_expression {
            None => Filter::All,
            Some(f) if f.r#type == pb::FilterType::Sql as i32 => {
                return fail(status(
                    Code::NotImplemented,
                    "SQL92 filters are not supported by Ferry's queue; use TAG filters",
                ))
            }
            Some(f) => match Filter::parse_tag(&f.expression) {
                Ok(f) => f,
                Err(e) => return fail(err_status(&e)),
            },
        };
        let invisible = match (&r.invisible_duration, r.auto_renew) {
            (Some(d), _) => match to_duration(d) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    return fail(status(
                        Code::IllegalInvisibleTime,
                        "invisible_duration must be positive",
                    ))
                }
            },
            (None, true) => AUTO_RENEW,
            (None, false) => {
                return fail(status(
                    Code::IllegalInvisibleTime,
                    "invisible_duration is required without auto_renew",
                ))
            }
        };
        let mut wait = r
            .long_polling_timeout
            .as_ref()
            .and_then(to_duration)
            .unwrap_or(LONG_POLLING)
            .min(Duration::from_secs(60));
        if let Some(t) = meta_str(&md, "grpc-timeout").and_then(parse_grpc_timeout) {
            // Answer before the client gives up: leave a margin for the reply to travel.
            let margin = (t / 10).clamp(Duration::from_millis(100), Duration::from_secs(2));
            wait = wait.min(t.saturating_sub(margin));
        }
        let batch = if r.batch_size <= 0 {
            32
        } else {
            (r.batch_size as usize).min(1024)
        };
        let request = ReceiveRequest {
            group,
            topic,
            filter,
            max_messages: batch,
            invisible,
            wait,
            auto_renew_client: r.auto_renew.then(|| caller.client_id.clone()),
        };
        let deliveries = match self.inner.queue.receive(&caller.ns, request).await {
            Ok(d) => d,
            Err(e) => return fail(err_status(&e)),
        };
        let mut frames = Vec::with_capacity(deliveries.len() + 2);
        frames.push(Ok(pb::ReceiveMessageResponse {
            content: Some(Content::Status(if deliveries.is_empty() {
                status(Code::MessageNotFound, "no new message")
            } else {
                status(Code::Ok, "OK")
            })),
        }));
        let host = &self.inner.queue.config().store_host;
        for d in &deliveries {
            frames.push(Ok(pb::ReceiveMessageResponse {
                content: Some(Content::Message(Self::to_pb_message(d, host, invisible))),
            }));
        }
        frames.push(Ok(pb::ReceiveMessageResponse {
            content: Some(Content::DeliveryTimestamp(timestamp(
                self.inner.queue.now_ms(),
            ))),
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(frames))))
    }

    async fn ack_message(
        &self,
        req: Request<pb::AckMessageRequest>,
    ) -> GrpcResult<pb::AckMessageResponse> {
        tracing::debug!("queue: rpc ack_message");
        let md = req.metadata().clone();
        let r = req.into_inner();
        let caller = match self
            .authenticate(&md)
            .and_then(|c| Self::check_sub(&c).map(|_| c))
        {
            Ok(c) => c,
            Err(s) => {
                return Ok(Response::new(pb::AckMessageResponse {
                    status: Some(s),
                    entries: vec![],
                }))
            }
        };
        let group = resource_name(&r.group);
        let topic = resource_name(&r.topic);
        let mut entries = Vec::with_capacity(r.entries.len());
        for e in r.entries {
            let result = self
                .inner
                .queue
                .ack(&caller.ns, &group, &topic, &e.receipt_handle)
                .await;
            entries.push(pb::AckMessageResultEntry {
                message_id: e.message_id,
                receipt_handle: e.receipt_handle,
                status: Some(match result {
                    Ok(()) => status(Code::Ok, "OK"),
                    Err(e) => err_status(&e),
                }),
            });
        }
        let statuses: Vec<_> = entries.iter().map(|e| e.status.clone()).collect();
        let st = if statuses.is_empty() {
            status(Code::BadRequest, "no entry to acknowledge")
        } else {
            overall(&statuses)
        };
        Ok(Response::new(pb::AckMessageResponse {
            status: Some(st),
            entries,
        }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> GrpcResult<pb::ForwardMessageToDeadLetterQueueResponse> {
        tracing::debug!("queue: rpc forward_message_to_dead_letter_queue");
        let md = req.metadata().clone();
        let r = req.into_inner();
        let s = match self
            .authenticate(&md)
            .and_then(|c| Self::check_sub(&c).map(|_| c))
        {
            Err(s) => s,
            Ok(c) => match self
                .inner
                .queue
                .forward_to_dead_letter(
                    &c.ns,
                    &resource_name(&r.group),
                    &resource_name(&r.topic),
                    &r.receipt_handle,
                )
                .await
            {
                Ok(()) => status(Code::Ok, "OK"),
                Err(e) => err_status(&e),
            },
        };
        Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
            status: Some(s),
        }))
    }

    async fn end_transaction(
        &self,
        _req: Request<pb::EndTransactionRequest>,
    ) -> GrpcResult<pb::EndTransactionResponse> {
        Ok(Response::new(pb::EndTransactionResponse {
            status: Some(status(
                Code::NotImplemented,
                "transactional messages are not supported by Ferry's queue",
            )),
        }))
    }

    type TelemetryStream = BoxStream<pb::TelemetryCommand>;

    async fn telemetry(
        &self,
        req: Request<Streaming<pb::TelemetryCommand>>,
    ) -> GrpcResult<Self::TelemetryStream> {
        tracing::debug!("queue: rpc telemetry");
        let caller = match self.authenticate(req.metadata()) {
            Ok(c) => c,
            Err(s) => {
                return Ok(Response::new(one(pb::TelemetryCommand {
                    status: Some(s),
                    command: None,
                })))
            }
        };
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let svc = self.clone();
        let client = caller.client_id.clone();
        *svc.clients().entry(client.clone()).or_insert(0) += 1;
        tokio::spawn(async move {
            loop {
                let cmd = tokio::select! {
                    m = incoming.message() => m,
                    _ = tx.closed() => break,
                };
                match cmd {
                    Ok(Some(cmd)) => {
                        let reply = match cmd.command {
                            Some(pb::telemetry_command::Command::Settings(s)) => {
                                let can = match s.client_type {
                                    Some(t) if t == pb::ClientType::Producer as i32 => {
                                        caller.publish
                                    }
                                    Some(t)
                                        if t == pb::ClientType::PushConsumer as i32
                                            || t == pb::ClientType::SimpleConsumer as i32 =>
                                    {
                                        caller.subscribe
                                    }
                                    _ => true,
                                };
                                let settings = svc.server_settings(&caller.ns, s);
                                pb::TelemetryCommand {
                                    status: Some(if can {
                                        status(Code::Ok, "OK")
                                    } else {
                                        status(
                                            Code::Forbidden,
                                            "this AccessKey does not allow this client type",
                                        )
                                    }),
                                    command: Some(pb::telemetry_command::Command::Settings(
                                        settings,
                                    )),
                                }
                            }
                            // Results of commands Ferry never sends: nothing to answer.
                            None => continue,
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let mut clients = svc.clients();
            if let Some(n) = clients.get_mut(&client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    clients.remove(&client);
                    drop(clients);
                    svc.inner.queue.forget_client(&client);
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn notify_client_termination(
        &self,
        req: Request<pb::NotifyClientTerminationRequest>,
    ) -> GrpcResult<pb::NotifyClientTerminationResponse> {
        tracing::debug!("queue: rpc notify_client_termination");
        let s = match self.authenticate(req.metadata()) {
            Ok(c) => {
                self.inner.queue.forget_client(&c.client_id);
                status(Code::Ok, "OK")
            }
            Err(s) => s,
        };
        Ok(Response::new(pb::NotifyClientTerminationResponse {
            status: Some(s),
        }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> GrpcResult<pb::ChangeInvisibleDurationResponse> {
        tracing::debug!("queue: rpc change_invisible_duration");
        let md = req.metadata().clone();
        let r = req.into_inner();
        let fail = |s| {
            Ok(Response::new(pb::ChangeInvisibleDurationResponse {
                status: Some(s),
                receipt_handle: String::new(),
            }))
        };
        let c = match self
            .authenticate(&md)
            .and_then(|c| Self::check_sub(&c).map(|_| c))
        {
            Ok(c) => c,
            Err(s) => return fail(s),
        };
        let Some(d) = r.invisible_duration.as_ref().and_then(to_duration) else {
            return fail(status(
                Code::IllegalInvisibleTime,
                "invisible_duration is required and may not be negative",
            ));
        };
        match self
            .inner
            .queue
            .change_invisible(
                &c.ns,
                &resource_name(&r.group),
                &resource_name(&r.topic),
                &r.receipt_handle,
                d,
            )
            .await
        {
            Ok(h) => Ok(Response::new(pb::ChangeInvisibleDurationResponse {
                status: ok(),
                receipt_handle: h,
            })),
            Err(e) => fail(err_status(&e)),
        }
    }

    type PullMessageStream = BoxStream<pb::UnimplementedResponse>;

    async fn pull_message(
        &self,
        _req: Request<pb::Unimplemented>,
    ) -> GrpcResult<Self::PullMessageStream> {
        Ok(Response::new(one(pb::UnimplementedResponse {
            status: Some(not_built("PullMessage")),
        })))
    }

    async fn update_offset(
        &self,
        _req: Request<pb::Unimplemented>,
    ) -> GrpcResult<pb::UnimplementedResponse> {
        Ok(Response::new(pb::UnimplementedResponse {
            status: Some(not_built("UpdateOffset")),
        }))
    }

    async fn get_offset(
        &self,
        _req: Request<pb::Unimplemented>,
    ) -> GrpcResult<pb::UnimplementedResponse> {
        Ok(Response::new(pb::UnimplementedResponse {
            status: Some(not_built("GetOffset")),
        }))
    }

    async fn query_offset(
        &self,
        _req: Request<pb::Unimplemented>,
    ) -> GrpcResult<pb::UnimplementedResponse> {
        Ok(Response::new(pb::UnimplementedResponse {
            status: Some(not_built("QueryOffset")),
        }))
    }

    async fn recall_message(
        &self,
        _req: Request<pb::Unimplemented>,
    ) -> GrpcResult<pb::RecallMessageResponse> {
        Ok(Response::new(pb::RecallMessageResponse {
            status: Some(not_built("RecallMessage")),
            message_id: String::new(),
        }))
    }
}

fn not_built(rpc: &str) -> pb::Status {
    status(
        Code::NotImplemented,
        format!("{rpc} is not implemented by Ferry's queue"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_header_parses() {
        let v = "MQv2-HMAC-SHA1 Credential=AK/2024/x, SignedHeaders=x-mq-date-time, Signature=AB12";
        assert_eq!(parse_authorization(v), Some(("AK".into(), "AB12".into())));
        let anon = "MQv2-HMAC-SHA1 Credential=, SignedHeaders=x-mq-date-time, Signature=";
        assert_eq!(
            parse_authorization(anon),
            Some((String::new(), String::new()))
        );
        assert_eq!(parse_authorization("Basic xyz"), None);
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_grpc_timeout("2500m"),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn hmac_sha1_matches_a_known_vector() {
        // RFC 2202 test case 2.
        assert_eq!(
            sign("Jefe", "what do ya want for nothing?"),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }
}
