//! [`Control`]: what the management APIs ask of the running broker — client queries, kicking a
//! client, publishing a message — executed on the instance's router task.

use crate::instances::Instances;
use crate::router::RouterMsg;
use bytes::Bytes;
use ferry_codec::{ByteStr, Protocol, QoS};
use ferry_core::{Broker, Message};
use ferry_meta::MetaError;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// A client (session) as the management API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    pub client_id: String,
    pub online: bool,
    /// `ip:port` of the live connection.
    pub address: Option<String>,
    /// MQTT protocol level of the live connection (3, 4 or 5).
    pub protocol_level: Option<u8>,
    /// Epoch milliseconds of the last packet (online) or of the disconnect (offline).
    pub last_activity_ms: Option<u64>,
    /// Topic filter and granted QoS (0, 1, 2).
    pub subscriptions: Vec<(String, u8)>,
    pub inflight: usize,
    pub queued: usize,
}

/// A message to publish through the management API.
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// Seconds.
    pub message_expiry_interval: Option<u32>,
    /// Deliver to this client only, without a subscription (the queue's P2P inflow).
    pub p2p_target: Option<String>,
    /// With `p2p_target`: only if the client is connected now (nothing queued for it).
    pub online_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("the broker is shutting down")]
    Unavailable,
    #[error("{0}")]
    Invalid(String),
    #[error("the store could not write: {0}")]
    Store(String),
}

/// A handle on the running broker for the management APIs. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    pub(crate) instances: Arc<Instances>,
    /// Anchors `Instant`s to wall-clock time.
    pub(crate) started: (Instant, SystemTime),
}

impl Control {
    async fn run<T: Send + 'static>(
        &self,
        instance: &str,
        f: impl FnOnce(&mut Broker, Instant) -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let (tx, ..) = self.instances.router(instance)?;
        let (reply, answer) = oneshot::channel();
        let op = Box::new(move |b: &mut Broker, now: Instant| {
            let _ = reply.send(f(b, now));
        });
        tx.send(RouterMsg::Run(op))
            .await
            .map_err(|_| ControlError::Unavailable)?;
        answer.await.map_err(|_| ControlError::Unavailable)
    }

    fn epoch_ms(&self, at: Instant) -> u64 {
        let (i0, t0) = self.started;
        let t = if at >= i0 {
            t0 + (at - i0)
        } else {
            t0 - (i0 - at)
        };
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn view(&self, info: ferry_core::ClientInfo) -> ClientView {
        ClientView {
            client_id: info.client_id,
            online: info.online,
            address: info.peer,
            protocol_level: info.protocol.map(Protocol::level),
            last_activity_ms: info.last_activity.map(|t| self.epoch_ms(t)),
            subscriptions: info
                .subscriptions
                .into_iter()
                .map(|(f, q)| (f, q as u8))
                .collect(),
            inflight: info.inflight,
            queued: info.queued,
        }
    }

    /// The session of `client_id` in `instance`, if there is one.
    pub async fn client(
        &self,
        instance: &str,
        client_id: &str,
    ) -> Result<Option<ClientView>, ControlError> {
        let id = client_id.to_string();
        let info = self.run(instance, move |b, _| b.client_info(&id)).await?;
        Ok(info.map(|i| self.view(i)))
    }

    /// Every session of `instance`, sorted by client id.
    pub async fn clients(&self, instance: &str) -> Result<Vec<ClientView>, ControlError> {
        let infos = self
            .run(instance, |b, _| {
                let mut ids = b.client_ids();
                ids.sort();
                ids.iter()
                    .filter_map(|id| b.client_info(id))
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(infos.into_iter().map(|i| self.view(i)).collect())
    }

    /// Connected clients of a group (`<group_id>@@@…`).
    pub async fn online_in_group(
        &self,
        instance: &str,
        group_id: &str,
    ) -> Result<usize, ControlError> {
        let g = group_id.to_string();
        self.run(instance, move |b, _| b.online_in_group(&g)).await
    }

    /// Sessions subscribed to a filter matching `topic`.
    pub async fn subscribers_of(&self, instance: &str, topic: &str) -> Result<usize, ControlError> {
        ferry_core::topic::validate_name(topic)
            .map_err(|e| ControlError::Invalid(format!("topic {topic:?}: {e}")))?;
        let t = topic.to_string();
        self.run(instance, move |b, _| b.subscribers_of(&t)).await
    }

    /// Disconnects `client_id` (v5: DISCONNECT 0x98). Returns whether it was online.
    pub async fn kick(&self, instance: &str, client_id: &str) -> Result<bool, ControlError> {
        let id = client_id.to_string();
        self.run(instance, move |b, now| b.kick(&id, now)).await
    }

    /// The instance's alarm events (offline messages evicted at its cap, …), oldest first.
    pub fn alarms(&self, instance: &str) -> Vec<crate::alarms::Alarm> {
        self.instances.metrics.alarms.list(Some(instance))
    }

    /// The process-wide counters (all instances), as `/metrics` exports them.
    pub fn metrics(&self) -> &crate::Metrics {
        &self.instances.metrics
    }

    /// How long the broker has been running.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.0.elapsed()
    }

    /// The instance of clients without a cloud user name.
    pub fn default_instance(&self) -> &str {
        &self.instances.default_instance
    }

    /// Deletes an instance: its metadata goes, its clients are disconnected and its sessions
    /// and retained messages dropped. The default instance cannot be deleted.
    pub async fn delete_instance(&self, instance: &str) -> Result<(), ControlError> {
        if instance == self.instances.default_instance {
            return Err(ControlError::Invalid(format!(
                "instance {instance:?} is the default instance and cannot be deleted"
            )));
        }
        self.instances.meta.delete_instance(instance)?;
        self.instances.stop(instance).await;
        Ok(())
    }

    /// Answers once what the instance's core stored so far is durable.
    async fn barrier(&self, instance: &str) -> Result<(), ControlError> {
        let (tx, ..) = self.instances.router(instance)?;
        let (done, answer) = oneshot::channel();
        tx.send(RouterMsg::Barrier { done })
            .await
            .map_err(|_| ControlError::Unavailable)?;
        answer
            .await
            .map_err(|_| ControlError::Unavailable)?
            .map_err(|e| ControlError::Store(e.to_string()))
    }

    /// Updates which parent topics of `instance` have an outflow rule (asks the hooks).
    pub async fn refresh_outflow(&self, instance: &str) -> Result<(), ControlError> {
        let Some(hooks) = self.instances.hooks.clone() else {
            return Ok(());
        };
        let parents = hooks.outflow_parents(instance);
        self.run(instance, move |b, _| b.set_outflow_parents(parents))
            .await
    }

    /// Publishes a message as the server; returns its message id once the message is stored
    /// for every persistent session it reached (durability = sync).
    pub async fn publish(
        &self,
        instance: &str,
        req: PublishRequest,
    ) -> Result<String, ControlError> {
        ferry_core::topic::validate_name(&req.topic)
            .map_err(|e| ControlError::Invalid(format!("topic {:?}: {e}", req.topic)))?;
        let qos = match req.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => {
                return Err(ControlError::Invalid(format!(
                    "qos: must be 0, 1 or 2, got {q}"
                )))
            }
        };
        let id: [u8; 16] = ferry_meta::random_bytes();
        let msg_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        self.run(instance, move |b, now| {
            let p2p_target = req.p2p_target;
            let online_only = req.online_only;
            let properties = ferry_codec::Props {
                user_properties: req
                    .user_properties
                    .into_iter()
                    .map(|(k, v)| (ByteStr::from(k), ByteStr::from(v)))
                    .collect(),
                content_type: req.content_type.map(ByteStr::from),
                ..Default::default()
            }
            .into();
            let msg = Message {
                topic: ByteStr::from(req.topic),
                payload: req.payload,
                qos,
                retain: req.retain,
                properties,
                expires_at: req
                    .message_expiry_interval
                    .map(|s| now + std::time::Duration::from_secs(u64::from(s))),
                publisher: ByteStr::new(),
            };
            match p2p_target {
                Some(target) => {
                    b.publish_to(&target, msg, online_only, now);
                }
                None => b.publish(msg, now),
            }
        })
        .await?;
        self.barrier(instance).await?;
        Ok(msg_id)
    }
}
