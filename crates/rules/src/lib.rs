//! Ferry's rules (§6.2): the bridge between MQTT and the server-side queue.
//!
//! - **inflow** (queue topic → MQTT parent topic): one consumer task per enabled rule reads the
//!   queue topic as consumer group `ferry-rule-<name>` (long polling), publishes each message
//!   to MQTT through the broker's [`Control`] and acknowledges it only after the broker has
//!   stored it for every persistent session it reached: at-least-once across restarts.
//! - **outflow** (MQTT parent topic → queue topic): the broker core hands client publishes
//!   under an outflow parent to [`Rules`] (as [`Hooks::outflow`]); the publisher's PUBACK /
//!   PUBREC waits until the queue has stored them.
//! - **status** (Group ID → queue topic): the connection driver reports `connect`,
//!   `disconnect` and `tcpclean` ([`Hooks::status`]); a task appends them, in order, tagged
//!   with the event type.
//!
//! A rule's queue side is the embedded queue, or an external RocketMQ 5 endpoint
//! ([`ferry_queue::RemoteQueue`]). Rules live in the metadata ([`ferry_meta::Meta`]); after a
//! change the management API calls [`Rules::reload`], which takes effect at once.
//!
//! `mapping.rs` holds the property mapping of §6.2, both ways.

pub mod mapping;

use ferry_broker::hooks::HookFuture;
use ferry_broker::{Control, Hooks, StatusEvent};
use ferry_core::Outflow;
use ferry_meta::{Meta, Rule, RuleType};
use ferry_queue::{
    Filter, NewMessage, Queue, QueueClient, ReceiveRequest, RemoteQueue, RemoteQueueConfig, Start,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Status events waiting to be appended; beyond this they are dropped and counted.
const STATUS_QUEUE: usize = 65_536;
/// Messages an inflow consumer asks for at once.
const INFLOW_BATCH: usize = 32;
/// How long an inflow consumer's receive waits for a message (long polling).
const INFLOW_WAIT: Duration = Duration::from_secs(20);

/// The consumer group an inflow rule reads with.
pub fn inflow_group(rule: &str) -> String {
    format!("ferry-rule-{rule}")
}

/// Counters of the rules.
#[derive(Debug, Default)]
pub struct RuleStats {
    pub inflow_published: AtomicU64,
    /// Inflow messages that can never become MQTT messages (bad properties): acknowledged
    /// and logged.
    pub inflow_unmappable: AtomicU64,
    pub outflow_appended: AtomicU64,
    pub status_appended: AtomicU64,
    /// Status events dropped: the append queue was full, or the append failed.
    pub status_dropped: AtomicU64,
}

/// Where an enabled outflow or status rule appends.
struct Target {
    rule: String,
    topic: String,
    client: Arc<dyn QueueClient>,
}

#[derive(Default)]
struct Snapshot {
    /// (instance, parent topic) → outflow target.
    outflow: HashMap<(String, String), Target>,
    /// (instance, Group ID) → status target.
    status: HashMap<(String, String), Target>,
}

type RemoteKey = (String, Option<String>, String);

/// An inflow rule as started, and its consumer task.
type Running = (Rule, JoinHandle<()>);

/// The rules engine.
pub struct Rules {
    meta: Arc<Meta>,
    queue: Queue,
    control: OnceLock<Control>,
    snapshot: RwLock<Arc<Snapshot>>,
    status_tx: mpsc::Sender<StatusEvent>,
    status_rx: Mutex<Option<mpsc::Receiver<StatusEvent>>>,
    /// (instance, rule name) → the rule as started and its consumer task.
    inflow: Mutex<HashMap<(String, String), Running>>,
    remotes: Mutex<HashMap<RemoteKey, Arc<RemoteQueue>>>,
    stats: Arc<RuleStats>,
    /// Status events reported and not yet appended (or given up): counted before they enter
    /// the channel, so [`Rules::drain_status`] never sees an event in neither place.
    status_pending: AtomicU64,
}

impl Rules {
    /// The engine over `meta`'s rules and the embedded `queue`. Nothing runs until
    /// [`Rules::start`]; status events and outflow publishes are taken from the start.
    pub fn new(meta: Arc<Meta>, queue: Queue) -> Arc<Rules> {
        let (status_tx, status_rx) = mpsc::channel(STATUS_QUEUE);
        let rules = Arc::new(Rules {
            meta,
            queue,
            control: OnceLock::new(),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            status_tx,
            status_rx: Mutex::new(Some(status_rx)),
            inflow: Mutex::new(HashMap::new()),
            remotes: Mutex::new(HashMap::new()),
            stats: Arc::new(RuleStats::default()),
            status_pending: AtomicU64::new(0),
        });
        rules.rebuild();
        rules
    }

    pub fn stats(&self) -> &RuleStats {
        &self.stats
    }

    /// Starts the status appender and the inflow consumers; `control` publishes inflow
    /// messages. Call once, on the runtime, after the broker started.
    pub async fn start(self: &Arc<Self>, control: Control) {
        let _ = self.control.set(control);
        if let Some(rx) = self.status_rx.lock().expect("rules lock").take() {
            tokio::spawn(status_loop(self.clone(), rx));
        }
        self.reload(None).await;
    }

    /// Applies the rules as they are now in the metadata: outflow and status targets at once,
    /// inflow consumers started and stopped, and the brokers of `instance` (all instances if
    /// `None`) told which parent topics have outflow rules.
    pub async fn reload(self: &Arc<Self>, instance: Option<&str>) {
        self.rebuild();
        self.sync_inflow();
        let Some(control) = self.control.get() else {
            return;
        };
        let instances: Vec<String> = match instance {
            Some(i) => vec![i.to_string()],
            None => self.meta.instances().into_iter().map(|i| i.id).collect(),
        };
        for i in instances {
            if let Err(e) = control.refresh_outflow(&i).await {
                warn!(instance = i, error = %e, "rules: cannot update the outflow topics");
            }
        }
    }

    /// Stops every inflow consumer.
    pub fn stop(&self) {
        for (_, (_, task)) in self.inflow.lock().expect("rules lock").drain() {
            task.abort();
        }
    }

    /// Waits (at most `limit`) until every status event reported so far is appended: call it
    /// after the broker shut down, so the `tcpclean` events of the connections it closed are
    /// not lost. Returns whether everything was appended in time.
    pub async fn drain_status(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.status_pending.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("rules lock").clone()
    }

    /// The queue a rule's queue side is on.
    fn client(&self, instance: &str, rule: &Rule) -> Result<Arc<dyn QueueClient>, String> {
        let Some(remote) = &rule.remote else {
            return Ok(Arc::new(self.queue.client(instance)));
        };
        let endpoint = if remote.endpoint.starts_with("http://") {
            remote.endpoint.clone()
        } else {
            format!("http://{}", remote.endpoint)
        };
        let key = (
            endpoint.clone(),
            remote.access_key_id.clone(),
            remote.namespace.clone(),
        );
        let mut remotes = self.remotes.lock().expect("rules lock");
        if let Some(r) = remotes.get(&key) {
            return Ok(r.clone());
        }
        let client = RemoteQueue::new(RemoteQueueConfig {
            endpoint,
            access_key: remote
                .access_key_id
                .clone()
                .map(|id| (id, remote.access_key_secret.clone())),
            namespace: remote.namespace.clone(),
            request_timeout: Duration::from_secs(10),
        })
        .map_err(|e| e.to_string())?;
        let client = Arc::new(client);
        remotes.insert(key, client.clone());
        Ok(client)
    }

    /// Rebuilds the outflow and status targets from the metadata.
    fn rebuild(&self) {
        let mut snap = Snapshot::default();
        for (instance, rule) in self.meta.all_rules() {
            if !rule.enabled || rule.rule_type == RuleType::Inflow {
                continue;
            }
            if rule.remote.is_none() {
                if let Err(e) = self.queue.create_topic(&instance, &rule.target) {
                    warn!(instance, rule = rule.name, error = %e, "rules: cannot create the queue topic");
                }
            }
            let client = match self.client(&instance, &rule) {
                Ok(c) => c,
                Err(e) => {
                    warn!(instance, rule = rule.name, error = %e, "rules: bad remote endpoint");
                    continue;
                }
            };
            let target = Target {
                rule: rule.name.clone(),
                topic: rule.target.clone(),
                client,
            };
            let key = (instance, rule.source.clone());
            match rule.rule_type {
                RuleType::Outflow => snap.outflow.insert(key, target),
                RuleType::Status => snap.status.insert(key, target),
                RuleType::Inflow => None,
            };
        }
        *self.snapshot.write().expect("rules lock") = Arc::new(snap);
    }

    /// Starts the consumers of enabled inflow rules and stops those of rules that are gone,
    /// disabled or changed.
    fn sync_inflow(self: &Arc<Self>) {
        let Some(control) = self.control.get().cloned() else {
            return;
        };
        let wanted: HashMap<(String, String), Rule> = self
            .meta
            .all_rules()
            .into_iter()
            .filter(|(_, r)| r.enabled && r.rule_type == RuleType::Inflow)
            .map(|(i, r)| ((i, r.name.clone()), r))
            .collect();
        let mut running = self.inflow.lock().expect("rules lock");
        running.retain(|key, (rule, task)| {
            let keep = wanted.get(key) == Some(rule) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, rule) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let (instance, _) = key.clone();
            let client = match self.client(&instance, &rule) {
                Ok(c) => c,
                Err(e) => {
                    warn!(instance, rule = rule.name, error = %e, "rules: bad remote endpoint");
                    continue;
                }
            };
            if rule.remote.is_none() {
                let group = inflow_group(&rule.name);
                let ready = self
                    .queue
                    .create_topic(&instance, &rule.source)
                    .and_then(|()| {
                        self.queue
                            .ensure_group(&instance, &group, &rule.source, Start::End)
                    });
                if let Err(e) = ready {
                    warn!(instance, rule = rule.name, error = %e, "rules: cannot prepare the queue topic");
                }
            }
            info!(
                instance,
                rule = rule.name,
                source = rule.source,
                target = rule.target,
                "inflow rule running"
            );
            let task = tokio::spawn(inflow_loop(
                instance,
                rule.clone(),
                client,
                control.clone(),
                self.stats.clone(),
            ));
            running.insert(key, (rule, task));
        }
    }
}

impl Hooks for Rules {
    fn wants_status(&self, instance: &str, client_id: &str) -> bool {
        let Some(group) = mapping::group_of(client_id) else {
            return false;
        };
        self.snapshot()
            .status
            .contains_key(&(instance.to_string(), group.to_string()))
    }

    fn status(&self, event: StatusEvent) {
        // The broker asked `wants_status` first; a rule removed since is skipped when the
        // event is appended (`status_loop` looks the rule up again).
        self.status_pending.fetch_add(1, Ordering::AcqRel);
        if self.status_tx.try_send(event).is_err() {
            self.status_pending.fetch_sub(1, Ordering::AcqRel);
            let n = self.stats.status_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                warn!(
                    dropped = n + 1,
                    "rules: status events dropped (the append queue is full)"
                );
            }
        }
    }

    fn outflow_parents(&self, instance: &str) -> Vec<String> {
        self.snapshot()
            .outflow
            .keys()
            .filter(|(i, _)| i == instance)
            .map(|(_, parent)| parent.clone())
            .collect()
    }

    fn outflow(&self, instance: &str, messages: Vec<Outflow>) -> HookFuture {
        let snap = self.snapshot();
        let now = ferry_meta::now_ms();
        let mut sends: Vec<(Arc<dyn QueueClient>, NewMessage)> = Vec::with_capacity(messages.len());
        for o in &messages {
            let parent = o.msg.topic.split('/').next().unwrap_or_default();
            // A rule disabled since the core looked: nothing to append.
            if let Some(t) = snap
                .outflow
                .get(&(instance.to_string(), parent.to_string()))
            {
                sends.push((
                    t.client.clone(),
                    mapping::outflow_message(parent, &t.topic, o, now),
                ));
            }
        }
        let stats = self.stats.clone();
        Box::pin(async move {
            for r in send_in_order(sends).await {
                r.map_err(|e| e.to_string())?;
                stats.outflow_appended.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    }
}

/// Sends each message to its queue, all at once but in order: the sends are polled in order,
/// so the embedded queue gives them offsets in that order.
async fn send_in_order(
    mut sends: Vec<(Arc<dyn QueueClient>, NewMessage)>,
) -> Vec<Result<ferry_queue::Sent, ferry_queue::QueueError>> {
    futures_util::future::join_all(
        sends
            .iter_mut()
            .map(|(client, msg)| client.send(std::mem::take(msg))),
    )
    .await
}

/// Appends status events to their rules' queue topics, in order.
async fn status_loop(rules: Arc<Rules>, mut rx: mpsc::Receiver<StatusEvent>) {
    let mut events = Vec::with_capacity(256);
    while rx.recv_many(&mut events, 256).await > 0 {
        let taken = events.len() as u64;
        let snap = rules.snapshot();
        let mut rule_names = Vec::new();
        let mut sends: Vec<(Arc<dyn QueueClient>, NewMessage)> = Vec::new();
        for e in events.drain(..) {
            let Some(group) = mapping::group_of(&e.client_id) else {
                continue;
            };
            if let Some(t) = snap.status.get(&(e.instance.clone(), group.to_string())) {
                rule_names.push(t.rule.clone());
                sends.push((t.client.clone(), mapping::status_message(&t.topic, &e)));
            }
        }
        for (rule, r) in rule_names.iter().zip(send_in_order(sends).await) {
            match r {
                Ok(_) => {
                    rules.stats.status_appended.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    rules.stats.status_dropped.fetch_add(1, Ordering::Relaxed);
                    warn!(rule, error = %e, "rules: cannot append a status event");
                }
            }
        }
        rules.status_pending.fetch_sub(taken, Ordering::AcqRel);
    }
}

/// One inflow rule's consumer: queue → MQTT, acknowledging each message once the broker has
/// it.
async fn inflow_loop(
    instance: String,
    rule: Rule,
    client: Arc<dyn QueueClient>,
    control: Control,
    stats: Arc<RuleStats>,
) {
    let group = inflow_group(&rule.name);
    let filter = Filter::parse_tag(&rule.tag_filter).unwrap_or(Filter::All);
    let mut backoff = Duration::from_millis(500);
    loop {
        let request = ReceiveRequest {
            group: group.clone(),
            topic: rule.source.clone(),
            filter: filter.clone(),
            max_messages: INFLOW_BATCH,
            invisible: mapping::INFLOW_INVISIBLE,
            wait: INFLOW_WAIT,
            auto_renew_client: None,
        };
        let deliveries = match client.receive(request).await {
            Ok(d) => {
                backoff = Duration::from_millis(500);
                d
            }
            Err(e) => {
                warn!(instance, rule = rule.name, error = %e, "inflow: cannot receive; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        for d in deliveries {
            let ack = match mapping::inflow_publish(&rule.target, &d.message) {
                Ok(publish) => match control.publish(&instance, publish).await {
                    Ok(_) => {
                        stats.inflow_published.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Err(e) => {
                        // Not acknowledged: the queue delivers it again once its invisibility
                        // ends (and moves it to the dead-letter topic after its last attempt).
                        warn!(instance, rule = rule.name, message_id = d.message.id, error = %e, "inflow: cannot publish; it will be redelivered");
                        false
                    }
                },
                Err(e) => {
                    stats.inflow_unmappable.fetch_add(1, Ordering::Relaxed);
                    warn!(instance, rule = rule.name, message_id = d.message.id, error = %e, "inflow: message dropped, it cannot become an MQTT message");
                    true
                }
            };
            if ack {
                if let Err(e) = client.ack(&group, &rule.source, &d.receipt_handle).await {
                    warn!(instance, rule = rule.name, error = %e, "inflow: cannot acknowledge; the message may come again");
                }
            }
        }
    }
}
