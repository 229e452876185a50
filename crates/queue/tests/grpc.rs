//! The gRPC service on 127.0.0.1:0 with Ferry's own tonic client and `RemoteQueue`: auth
//! failures, CLIENT_ID_REQUIRED, NOT_IMPLEMENTED answers, TLS and plaintext on one port.

use bytes::Bytes;
use ferry_meta::{KeyPermission, Meta, Profile};
use ferry_queue::pb;
use ferry_queue::pb::messaging_service_client::MessagingServiceClient;
use ferry_queue::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Server {
    server: QueueServer,
    meta: Arc<Meta>,
}

async fn start(allow_anonymous: Option<bool>) -> Server {
    let meta = Arc::new(Meta::new());
    meta.create_instance("default", "default", Profile::Standard, None, 0)
        .unwrap();
    meta.create_instance("other", "other", Profile::Standard, None, 0)
        .unwrap();
    let queue = Queue::open(None, QueueConfig::default()).unwrap();
    let server = QueueServer::start(
        queue,
        meta.clone(),
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_anonymous,
            default_namespace: "default".into(),
            tls: None,
        },
    )
    .await
    .unwrap();
    Server { server, meta }
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.server.local_addr())
    }
    async fn client(&self) -> MessagingServiceClient<tonic::transport::Channel> {
        MessagingServiceClient::connect(self.url()).await.unwrap()
    }
    fn remote(&self, ns: &str, key: Option<(String, String)>) -> RemoteQueue {
        RemoteQueue::new(RemoteQueueConfig {
            endpoint: self.url(),
            access_key: key,
            namespace: ns.into(),
            request_timeout: Duration::from_secs(5),
        })
        .unwrap()
    }
    fn key(&self, ns: &str, p: KeyPermission) -> (String, String) {
        let k = self.meta.create_key(ns, p, vec![], 0).unwrap();
        (k.access_key_id, k.secret)
    }
}

fn with_md<T>(body: T, md: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    for (k, v) in md {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r
}

fn new_msg(topic: &str, body: &str) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        tag: Some("tg".into()),
        body: Bytes::from(body.to_string()),
        born_host: "h".into(),
        ..NewMessage::default()
    }
}

fn code(s: &Option<pb::Status>) -> i32 {
    s.as_ref().map_or(0, |s| s.code)
}

fn receive_req(group: &str, topic: &str, wait: Duration) -> ReceiveRequest {
    ReceiveRequest {
        wait,
        ..ReceiveRequest::new(group, topic, 16)
    }
}

#[tokio::test]
async fn remote_queue_round_trip_against_the_server() {
    let s = start(None).await;
    let r = s.remote("", None);
    r.query_route("rt").await.unwrap();
    // The group exists from its first receive (it starts at the end).
    assert!(r
        .receive(receive_req("g", "rt", Duration::ZERO))
        .await
        .unwrap()
        .is_empty());
    let sent = r.send(new_msg("rt", "over grpc")).await.unwrap();
    let got = r
        .receive(receive_req("g", "rt", Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, sent.message_id);
    assert_eq!(got[0].message.body, Bytes::from_static(b"over grpc"));
    assert_eq!(got[0].message.tag.as_deref(), Some("tg"));
    assert_eq!(got[0].delivery_attempt, 1);
    r.ack("g", "rt", &got[0].receipt_handle).await.unwrap();
    assert!(matches!(
        r.ack("g", "rt", &got[0].receipt_handle).await,
        Err(QueueError::InvalidReceiptHandle(_))
    ));
    s.server.shutdown().await;
}

#[tokio::test]
async fn access_keys_and_permissions() {
    let s = start(Some(false)).await;
    let full = s.key("other", KeyPermission::Full);
    let pub_only = s.key("other", KeyPermission::PubOnly);
    let sub_only = s.key("other", KeyPermission::SubOnly);
    // Full key in its namespace.
    let r = s.remote("other", Some(full.clone()));
    r.receive(receive_req("g", "t", Duration::ZERO))
        .await
        .unwrap();
    r.send(new_msg("t", "x")).await.unwrap();
    assert_eq!(
        r.receive(receive_req("g", "t", Duration::ZERO))
            .await
            .unwrap()
            .len(),
        1
    );
    // Wrong secret, unknown key, key of another namespace.
    let err = s
        .remote("other", Some((full.0.clone(), "wrong".into())))
        .send(new_msg("t", "x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("40100"), "{err}");
    let err = s
        .remote("other", Some(("LTAInope".into(), "x".into())))
        .send(new_msg("t", "x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("40100"), "{err}");
    let err = s
        .remote("default", Some(full.clone()))
        .send(new_msg("t", "x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("40100"), "{err}");
    // PubOnly may send, not receive; SubOnly the reverse.
    let p = s.remote("other", Some(pub_only));
    p.send(new_msg("t", "x")).await.unwrap();
    let err = p
        .receive(receive_req("g", "t", Duration::ZERO))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("40300"), "{err}");
    let sub = s.remote("other", Some(sub_only));
    sub.receive(receive_req("g", "t", Duration::ZERO))
        .await
        .unwrap();
    let err = sub.send(new_msg("t", "x")).await.unwrap_err();
    assert!(err.to_string().contains("40300"), "{err}");
    // Anonymous is refused on this server.
    let err = s
        .remote("", None)
        .send(new_msg("t", "x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("40100"), "{err}");
    s.server.shutdown().await;
}

#[tokio::test]
async fn client_id_is_required_and_unknown_namespaces_are_named() {
    let s = start(None).await;
    let mut c = s.client().await;
    let resp = c
        .heartbeat(with_md(pb::HeartbeatRequest::default(), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&resp.status), pb::Code::ClientIdRequired as i32);
    let resp = c
        .heartbeat(with_md(
            pb::HeartbeatRequest::default(),
            &[("x-mq-client-id", "c1"), ("x-mq-namespace", "nowhere")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&resp.status), pb::Code::NotFound as i32);
    assert!(resp.status.unwrap().message.contains("nowhere"));
    let resp = c
        .heartbeat(with_md(
            pb::HeartbeatRequest::default(),
            &[("x-mq-client-id", "c1")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&resp.status), pb::Code::Ok as i32);
    s.server.shutdown().await;
}

#[tokio::test]
async fn unbuilt_rpcs_and_sql_filters_answer_not_implemented() {
    let s = start(None).await;
    let mut c = s.client().await;
    let md = [("x-mq-client-id", "c1")];
    let resp = c
        .end_transaction(with_md(pb::EndTransactionRequest::default(), &md))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&resp.status), pb::Code::NotImplemented as i32);
    let resp = c
        .update_offset(with_md(pb::Unimplemented::default(), &md))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&resp.status), pb::Code::NotImplemented as i32);
    let mut stream = c
        .receive_message(with_md(
            pb::ReceiveMessageRequest {
                group: Some(pb::Resource {
                    name: "g".into(),
                    ..Default::default()
                }),
                message_queue: Some(pb::MessageQueue {
                    topic: Some(pb::Resource {
                        name: "t".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                filter_expression: Some(pb::FilterExpression {
                    r#type: pb::FilterType::Sql as i32,
                    expression: "a > 1".into(),
                }),
                invisible_duration: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                ..Default::default()
            },
            &md,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    match first.content {
        Some(pb::receive_message_response::Content::Status(st)) => {
            assert_eq!(st.code, pb::Code::NotImplemented as i32)
        }
        other => panic!("expected a status, got {other:?}"),
    }
    s.server.shutdown().await;
}

#[tokio::test]
async fn telemetry_answers_every_settings() {
    let s = start(None).await;
    let mut c = s.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("x-mq-client-id", "tele".parse().unwrap());
    let settings = |t: pb::ClientType| pb::TelemetryCommand {
        status: None,
        command: Some(pb::telemetry_command::Command::Settings(pb::Settings {
            client_type: Some(t as i32),
            ..Default::default()
        })),
    };
    tx.send(settings(pb::ClientType::Producer)).await.unwrap();
    let mut out = c.telemetry(req).await.unwrap().into_inner();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(code(&first.status), pb::Code::Ok as i32);
    let Some(pb::telemetry_command::Command::Settings(ps)) = first.command else {
        panic!("no settings")
    };
    let Some(pb::settings::PubSub::Publishing(p)) = ps.pub_sub else {
        panic!("no publishing")
    };
    assert!(p.max_body_size > 0);
    assert_eq!(ps.backoff_policy.unwrap().max_attempts, 3);
    tx.send(settings(pb::ClientType::SimpleConsumer))
        .await
        .unwrap();
    let second = out.message().await.unwrap().unwrap();
    let Some(pb::telemetry_command::Command::Settings(cs)) = second.command else {
        panic!("no settings")
    };
    let Some(pb::settings::PubSub::Subscription(sub)) = cs.pub_sub else {
        panic!("no subscription")
    };
    assert_eq!(sub.receive_batch_size, Some(32));
    assert_eq!(sub.long_polling_timeout.unwrap().seconds, 20);
    assert_eq!(cs.backoff_policy.unwrap().max_attempts, 17);
    assert!(s.server.service().client_alive("tele"));
    drop(tx);
    drop(out);
    s.server.shutdown().await;
}

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn tls_and_plaintext_share_the_port() {
    let s = start(None).await;
    let addr = s.server.local_addr();
    // TLS (as the Java SDK connects): handshake with the self-signed certificate, ALPN h2,
    // then the HTTP/2 preface is answered with the server's SETTINGS frame.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], 0x4, "an HTTP/2 SETTINGS frame over TLS");
    // Plaintext gRPC on the same port.
    let r = s.remote("", None);
    r.send(new_msg("t", "plain")).await.unwrap();
    s.server.shutdown().await;
}
