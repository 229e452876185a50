//! One router task (and one [`Broker`] core) per instance, started when the instance is first
//! used. Nothing is shared between two instances' cores, so nothing can cross between them.

use crate::hooks::Hooks;
use crate::metrics::Metrics;
use crate::persist::Persistence;
use crate::router::{self, RouterMsg, StoreLink};
use ferry_core::{Acl, Broker, Limits, TopicPolicy};
use ferry_meta::{validate, InstanceSettings, Meta, MetaError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The cloud profile's topic rules: the first level is a created parent topic, and the whole
/// topic follows the naming rules.
struct CloudTopics {
    meta: Arc<Meta>,
    instance: String,
    min_len: usize,
    max_len: usize,
}

impl TopicPolicy for CloudTopics {
    fn allows(&self, topic: &str, is_filter: bool) -> bool {
        let parent = topic.split('/').next().unwrap_or_default();
        self.meta.has_topic(&self.instance, parent)
            && validate::cloud_topic(topic, self.min_len, self.max_len, is_filter).is_ok()
    }
}

/// The limits of one instance: the server's, narrowed by the instance's settings.
pub fn instance_limits(base: &Limits, s: &InstanceSettings) -> Limits {
    let narrower = |base: u32, own: u32| if own == 0 { base } else { base.min(own) };
    Limits {
        max_packet_size: narrower(base.max_packet_size, s.max_packet_size),
        max_keep_alive: if s.max_keep_alive == 0 {
            base.max_keep_alive
        } else if base.max_keep_alive == 0 {
            s.max_keep_alive
        } else {
            base.max_keep_alive.min(s.max_keep_alive)
        },
        max_client_id_len: base.max_client_id_len.min(s.max_client_id_len as usize),
        max_subscriptions_per_client: s.max_subscriptions_per_client as usize,
        max_payload_size: s.max_payload_size,
        p2p: s.p2p,
        max_offline_messages: s.max_offline_messages,
        ..base.clone()
    }
}

/// An instance's router, its limits, and its id (shared, not copied per connection).
pub(crate) type Route = (mpsc::Sender<RouterMsg>, Limits, Arc<str>);

pub(crate) struct Instances {
    pub meta: Arc<Meta>,
    /// Where clients without a cloud user name land; it cannot be deleted.
    pub default_instance: String,
    base: Limits,
    acl: Acl,
    router_queue: usize,
    pub metrics: Arc<Metrics>,
    /// Per instance: its router, its limits, and its id as the connections keep it.
    routers: Mutex<HashMap<String, Route>>,
    persistence: Option<Arc<Persistence>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The rules' view of the MQTT side, if rules run.
    pub hooks: Option<Arc<dyn Hooks>>,
}

impl Instances {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        meta: Arc<Meta>,
        default_instance: String,
        base: Limits,
        acl: Acl,
        router_queue: usize,
        metrics: Arc<Metrics>,
        persistence: Option<Arc<Persistence>>,
        hooks: Option<Arc<dyn Hooks>>,
    ) -> Self {
        Instances {
            meta,
            default_instance,
            base,
            acl,
            router_queue,
            metrics,
            routers: Mutex::new(HashMap::new()),
            persistence,
            tasks: Mutex::new(Vec::new()),
            hooks,
        }
    }

    /// The router of `instance` and its limits, started on first use.
    pub fn router(&self, instance: &str) -> Result<Route, MetaError> {
        let mut routers = self.routers.lock().expect("instances lock");
        if let Some((tx, limits, id)) = routers.get(instance) {
            if !tx.is_closed() {
                return Ok((tx.clone(), limits.clone(), id.clone()));
            }
        }
        let info = self.meta.instance(instance)?;
        let limits = instance_limits(&self.base, &info.settings);
        let mut broker = Broker::new(limits.clone(), self.acl.clone());
        if info.settings.require_parent_topic {
            broker = broker.with_policy(Arc::new(CloudTopics {
                meta: self.meta.clone(),
                instance: instance.to_string(),
                min_len: info.settings.topic_min_len as usize,
                max_len: info.settings.topic_max_len as usize,
            }));
        }
        let store = match &self.persistence {
            Some(p) => {
                broker = broker.with_persistence();
                let stats = p.restore(instance, &mut broker).map_err(|e| {
                    MetaError::internal(format!("cannot restore instance {instance:?}: {e}"))
                })?;
                tracing::info!(
                    instance,
                    sessions = stats.sessions,
                    messages = stats.messages,
                    retained = stats.retained,
                    orphans = stats.orphans,
                    "restored from the store"
                );
                Some(StoreLink {
                    persistence: p.clone(),
                    instance: instance.to_string(),
                    retention: (info.settings.offline_retention_secs > 0).then(|| {
                        std::time::Duration::from_secs(info.settings.offline_retention_secs)
                    }),
                })
            }
            None => None,
        };
        if let Some(hooks) = &self.hooks {
            broker.set_outflow_parents(hooks.outflow_parents(instance));
        }
        let (tx, rx) = mpsc::channel(self.router_queue);
        let task = tokio::spawn(router::run(
            broker,
            rx,
            self.metrics.clone(),
            store,
            router::Outflow {
                instance: instance.to_string(),
                hooks: self.hooks.clone(),
            },
        ));
        self.tasks.lock().expect("instances lock").push(task);
        let id: Arc<str> = instance.into();
        routers.insert(
            instance.to_string(),
            (tx.clone(), limits.clone(), id.clone()),
        );
        Ok((tx, limits, id))
    }

    /// Stops one instance's router (after the instance was deleted): its clients are
    /// disconnected (v5: DISCONNECT 0x8B) and its sessions dropped.
    pub async fn stop(&self, instance: &str) {
        let router = self
            .routers
            .lock()
            .expect("instances lock")
            .remove(instance)
            .map(|(tx, ..)| tx);
        if let Some(tx) = router {
            let (done, wait) = oneshot::channel();
            if tx.send(RouterMsg::Shutdown { done }).await.is_ok() {
                let _ = wait.await;
            }
        }
    }

    /// Stops every router: each closes its connections with DISCONNECT 0x8B.
    pub async fn shutdown(&self) {
        let routers: Vec<_> = self
            .routers
            .lock()
            .expect("instances lock")
            .drain()
            .map(|(_, (tx, ..))| tx)
            .collect();
        for tx in routers {
            let (done, wait) = oneshot::channel();
            if tx.send(RouterMsg::Shutdown { done }).await.is_ok() {
                let _ = wait.await;
            }
        }
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .expect("instances lock")
            .drain(..)
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}
