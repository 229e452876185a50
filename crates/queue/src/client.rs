//! [`QueueClient`]: send / receive / ack, implemented by the embedded queue bound to one namespace
//! ([`LocalQueue`]) and by [`RemoteQueue`], a RocketMQ 5 gRPC client for an external server
//! (another Ferry, or a RocketMQ proxy).

use crate::engine::Queue;
use crate::model::*;
use crate::pb;
use crate::pb::messaging_service_client::MessagingServiceClient;
use crate::service::{sign, Code};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// A boxed future (keeps [`QueueClient`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the rules need from a queue, local or remote.
pub trait QueueClient: Send + Sync {
    /// Sends one message; `Ok` once the server stored it.
    fn send(&self, msg: NewMessage) -> BoxFuture<'_, Result<Sent, QueueError>>;
    /// Receives (pops) messages for a consumer group.
    fn receive(&self, req: ReceiveRequest) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>>;
    /// Acknowledges one delivery.
    fn ack<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        receipt_handle: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
}

/// The embedded queue bound to one namespace (instance id).
#[derive(Clone)]
pub struct LocalQueue {
    pub queue: Queue,
    pub namespace: String,
}

impl Queue {
    /// This queue as a [`QueueClient`] of namespace `ns`.
    pub fn client(&self, ns: &str) -> LocalQueue {
        LocalQueue {
            queue: self.clone(),
            namespace: ns.to_string(),
        }
    }
}

impl QueueClient for LocalQueue {
    fn send(&self, msg: NewMessage) -> BoxFuture<'_, Result<Sent, QueueError>> {
        Box::pin(self.queue.send(&self.namespace, msg))
    }
    fn receive(&self, req: ReceiveRequest) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>> {
        Box::pin(self.queue.receive(&self.namespace, req))
    }
    fn ack<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        receipt_handle: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(
            self.queue
                .ack(&self.namespace, group, topic, receipt_handle),
        )
    }
}

/// Where and as whom a [`RemoteQueue`] connects.
#[derive(Clone, Debug)]
pub struct RemoteQueueConfig {
    /// `http://host:port` (plaintext gRPC).
    pub endpoint: String,
    /// AccessKey id and secret; `None`: anonymous (an empty `Credential=`).
    pub access_key: Option<(String, String)>,
    /// `x-mq-namespace` (instance id); empty for the server's default.
    pub namespace: String,
    /// Timeout of each call other than long polling.
    pub request_timeout: Duration,
}

/// A RocketMQ 5 gRPC client.
#[derive(Clone)]
pub struct RemoteQueue {
    client: MessagingServiceClient<Channel>,
    cfg: RemoteQueueConfig,
    client_id: String,
    endpoints: pb::Endpoints,
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        resource_namespace: String::new(),
        name: name.to_string(),
    })
}

fn remote_err(s: Option<pb::Status>, what: &str) -> QueueError {
    let s = s.unwrap_or(pb::Status {
        code: Code::InternalError as i32,
        message: format!("{what}: the server sent no status"),
    });
    let msg = format!("{what}: {} ({})", s.message, s.code);
    match Code::try_from(s.code) {
        Ok(Code::TopicNotFound) => QueueError::TopicNotFound(s.message),
        Ok(Code::InvalidReceiptHandle) => QueueError::InvalidReceiptHandle(s.message),
        Ok(Code::IllegalFilterExpression) => QueueError::IllegalFilter(s.message),
        Ok(Code::NotImplemented) => QueueError::NotImplemented(s.message),
        Ok(Code::BadRequest) => QueueError::BadRequest(s.message),
        _ => QueueError::Internal(msg),
    }
}

fn is_ok(s: &Option<pb::Status>) -> bool {
    s.as_ref().is_some_and(|s| s.code == Code::Ok as i32)
}

fn grpc_err(what: &str, e: tonic::Status) -> QueueError {
    QueueError::Internal(format!("{what}: {e}"))
}

impl RemoteQueue {
    /// A client that connects on first use (and reconnects as needed).
    pub fn new(cfg: RemoteQueueConfig) -> Result<RemoteQueue, QueueError> {
        let endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| QueueError::BadRequest(format!("endpoint {:?}: {e}", cfg.endpoint)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let uri = endpoint.uri().clone();
        let host = uri.host().unwrap_or("127.0.0.1").to_string();
        let port = uri.port_u16().unwrap_or(8081);
        let scheme = if host.parse::<std::net::Ipv4Addr>().is_ok() {
            pb::AddressScheme::IPv4
        } else if host.parse::<std::net::Ipv6Addr>().is_ok() {
            pb::AddressScheme::IPv6
        } else {
            pb::AddressScheme::DomainName
        };
        let client = MessagingServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(64 * 1024 * 1024);
        Ok(RemoteQueue {
            client,
            cfg,
            client_id: format!("ferry@{}", new_message_id()),
            endpoints: pb::Endpoints {
                scheme: scheme as i32,
                addresses: vec![pb::Address {
                    host,
                    port: i32::from(port),
                }],
            },
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Wraps a request with the SDK metadata and signature.
    fn request<T>(&self, body: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(body);
        req.set_timeout(timeout);
        let date = date_time(SystemClock.now_ms());
        let md = req.metadata_mut();
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = v.parse() {
                md.insert(k, v);
            }
        };
        put("x-mq-client-id", &self.client_id);
        put("x-mq-language", "RUST");
        put("x-mq-protocol", "v2");
        put("x-mq-client-version", env!("CARGO_PKG_VERSION"));
        put("x-mq-namespace", &self.cfg.namespace);
        put("x-mq-date-time", &date);
        let (id, sig) = match &self.cfg.access_key {
            Some((id, secret)) => (id.as_str(), sign(secret, &date)),
            None => ("", String::new()),
        };
        put(
            "authorization",
            &format!(
                "MQv2-HMAC-SHA1 Credential={id}, SignedHeaders=x-mq-date-time, Signature={sig}"
            ),
        );
        req
    }

    /// QueryRoute: checks the topic exists (or is created) on the server.
    pub async fn query_route(&self, topic: &str) -> Result<(), QueueError> {
        let req = self.request(
            pb::QueryRouteRequest {
                topic: resource(topic),
                endpoints: Some(self.endpoints.clone()),
            },
            self.cfg.request_timeout,
        );
        let resp = self
            .client
            .clone()
            .query_route(req)
            .await
            .map_err(|e| grpc_err("QueryRoute", e))?
            .into_inner();
        if is_ok(&resp.status) {
            Ok(())
        } else {
            Err(remote_err(resp.status, "QueryRoute"))
        }
    }
}

/// `x-mq-date-time` as the Java SDK writes it: `yyyyMMdd'T'HHmmss'Z'` (UTC).
pub fn date_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let mut y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    if m <= 2 {
        y += 1;
    }
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

impl QueueClient for RemoteQueue {
    fn send(&self, msg: NewMessage) -> BoxFuture<'_, Result<Sent, QueueError>> {
        Box::pin(async move {
            let id = msg
                .message_id
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(new_message_id);
            let born = if msg.born_timestamp_ms == 0 {
                SystemClock.now_ms()
            } else {
                msg.born_timestamp_ms
            };
            let m = pb::Message {
                topic: resource(&msg.topic),
                user_properties: msg.properties.into_iter().collect(),
                system_properties: Some(pb::SystemProperties {
                    tag: msg.tag,
                    keys: msg.keys,
                    message_id: id.clone(),
                    body_encoding: pb::Encoding::Identity as i32,
                    message_type: pb::MessageType::Normal as i32,
                    born_timestamp: Some(prost_types::Timestamp {
                        seconds: (born / 1000) as i64,
                        nanos: ((born % 1000) * 1_000_000) as i32,
                    }),
                    born_host: msg.born_host,
                    ..Default::default()
                }),
                body: msg.body.to_vec(),
            };
            let req = self.request(
                pb::SendMessageRequest { messages: vec![m] },
                self.cfg.request_timeout,
            );
            let resp = self
                .client
                .clone()
                .send_message(req)
                .await
                .map_err(|e| grpc_err("SendMessage", e))?
                .into_inner();
            let entry = resp.entries.into_iter().next();
            match entry {
                Some(e) if is_ok(&e.status) => Ok(Sent {
                    message_id: if e.message_id.is_empty() {
                        id
                    } else {
                        e.message_id
                    },
                    offset: e.offset.max(0) as u64,
                }),
                Some(e) => Err(remote_err(e.status, "SendMessage")),
                None => Err(remote_err(resp.status, "SendMessage")),
            }
        })
    }

    fn receive(&self, r: ReceiveRequest) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>> {
        Box::pin(async move {
            use pb::receive_message_response::Content;
            let expression = match &r.filter {
                Filter::All => "*".to_string(),
                Filter::Tags(t) => t.join("||"),
            };
            let to_pb = |d: Duration| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            };
            let body = pb::ReceiveMessageRequest {
                group: resource(&r.group),
                message_queue: Some(pb::MessageQueue {
                    topic: resource(&r.topic),
                    id: 0,
                    permission: pb::Permission::ReadWrite as i32,
                    broker: Some(pb::Broker {
                        name: String::new(),
                        id: 0,
                        endpoints: Some(self.endpoints.clone()),
                    }),
                    accept_message_types: vec![],
                }),
                filter_expression: Some(pb::FilterExpression {
                    r#type: pb::FilterType::Tag as i32,
                    expression,
                }),
                batch_size: r.max_messages.clamp(1, 1024) as i32,
                invisible_duration: Some(to_pb(r.invisible)),
                auto_renew: false,
                long_polling_timeout: Some(to_pb(r.wait)),
                attempt_id: None,
            };
            let req = self.request(body, r.wait + self.cfg.request_timeout);
            let mut stream = self
                .client
                .clone()
                .receive_message(req)
                .await
                .map_err(|e| grpc_err("ReceiveMessage", e))?
                .into_inner();
            let mut out = Vec::new();
            while let Some(frame) = stream
                .message()
                .await
                .map_err(|e| grpc_err("ReceiveMessage", e))?
            {
                match frame.content {
                    Some(Content::Status(s)) => {
                        if s.code != Code::Ok as i32 && s.code != Code::MessageNotFound as i32 {
                            return Err(remote_err(Some(s), "ReceiveMessage"));
                        }
                    }
                    Some(Content::Message(m)) => {
                        if let Some(d) = from_pb_message(m) {
                            out.push(d);
                        }
                    }
                    Some(Content::DeliveryTimestamp(_)) | None => {}
                }
            }
            Ok(out)
        })
    }

    fn ack<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        receipt_handle: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let req = self.request(
                pb::AckMessageRequest {
                    group: resource(group),
                    topic: resource(topic),
                    entries: vec![pb::AckMessageEntry {
                        message_id: String::new(),
                        receipt_handle: receipt_handle.to_string(),
                    }],
                },
                self.cfg.request_timeout,
            );
            let resp = self
                .client
                .clone()
                .ack_message(req)
                .await
                .map_err(|e| grpc_err("AckMessage", e))?
                .into_inner();
            match resp.entries.into_iter().next() {
                Some(e) if is_ok(&e.status) => Ok(()),
                Some(e) => Err(remote_err(e.status, "AckMessage")),
                None => Err(remote_err(resp.status, "AckMessage")),
            }
        })
    }
}

fn from_pb_message(m: pb::Message) -> Option<Delivery> {
    let sp = m.system_properties?;
    let ms = |t: &Option<prost_types::Timestamp>| {
        t.as_ref().map_or(0, |t| {
            (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
        })
    };
    Some(Delivery {
        receipt_handle: sp.receipt_handle.clone()?,
        delivery_attempt: sp.delivery_attempt.unwrap_or(1).max(1) as u32,
        message: Message {
            id: sp.message_id,
            topic: m.topic.map(|t| t.name).unwrap_or_default(),
            tag: sp.tag,
            keys: sp.keys,
            properties: m.user_properties.into_iter().collect(),
            body: m.body.into(),
            born_host: sp.born_host,
            born_timestamp_ms: ms(&sp.born_timestamp),
            store_timestamp_ms: ms(&sp.store_timestamp),
            offset: sp.queue_offset.unwrap_or(0).max(0) as u64,
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_time_is_utc_basic_format() {
        assert_eq!(super::date_time(0), "19700101T000000Z");
        assert_eq!(super::date_time(1_700_000_000_000), "20231114T221320Z");
    }
}
