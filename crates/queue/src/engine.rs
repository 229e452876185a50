//! The queue engine: topics, consumer groups, invisibility, redelivery, the dead-letter queue,
//! retention, durability.
//!
//! State lives in one [`State`] behind a mutex: per namespace, per topic, an index of the kept
//! messages (16 bytes each: store time and tag hash) and the consumer groups (a cursor and the
//! deliveries in flight). Bodies are in the store only (`Space::Queue`, see `codec.rs`) and are
//! read back per delivery; without a store the queue uses a private `MemoryEngine`.
//!
//! A send gets its offset under the lock, is committed through the shared group-commit writer
//! outside it, and becomes visible to consumers once it and every earlier offset of the topic
//! have been committed (`Topic::pending`), so a consumer never sees a message that could still
//! be lost. Group cursors and in-flight records are written before a receive answers, so
//! acknowledgements, attempts and positions survive a restart (at-least-once: a crash between
//! the two can only cause a redelivery).

use crate::codec::{self, GROUP, INDEX, INFLIGHT, MSG, TOPIC};
use crate::model::*;
use ferry_store::{Engine, MemoryEngine, Op, Space, Writer};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

const PAGE: usize = 1024;
/// Index entries one receive looks at past non-matching messages before answering.
const SCAN_BUDGET: usize = 65_536;
/// Tag hash marking a message whose commit failed (never delivered).
const DEAD: u64 = 1;

/// The embedded queue. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    config: QueueConfig,
    clock: Arc<dyn Clock>,
    engine: Arc<dyn Engine>,
    writer: Option<Arc<Writer>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    namespaces: HashMap<String, HashMap<String, Topic>>,
    next_topic_id: u64,
}

struct Topic {
    id: u64,
    /// Offset of `index[0]`.
    first: u64,
    index: VecDeque<Idx>,
    /// Offsets assigned but not yet committed.
    pending: BTreeSet<u64>,
    groups: HashMap<String, Group>,
    notify: Arc<Notify>,
}

#[derive(Clone, Copy)]
struct Idx {
    store_ms: u64,
    tag: u64,
}

#[derive(Default)]
struct Group {
    cursor: u64,
    seq: u64,
    inflight: BTreeMap<u64, Inflight>,
}

struct Inflight {
    attempt: u32,
    visible_at: u64,
    seq: u64,
    auto_renew: Option<Arc<str>>,
}

impl Topic {
    fn new(id: u64) -> Topic {
        Topic {
            id,
            first: 0,
            index: VecDeque::new(),
            pending: BTreeSet::new(),
            groups: HashMap::new(),
            notify: Arc::new(Notify::new()),
        }
    }
    fn next(&self) -> u64 {
        self.first + self.index.len() as u64
    }
    /// Creates `group` at `start` unless it exists, and stores where it starts (so a group
    /// that received nothing yet still starts there after a restart).
    fn add_group(&mut self, group: &str, start: Start, ops: &mut Vec<Op>) {
        if self.groups.contains_key(group) {
            return;
        }
        let cursor = match start {
            Start::End => self.next(),
            Start::Beginning => self.first,
        };
        self.groups.insert(
            group.to_string(),
            Group {
                cursor,
                ..Group::default()
            },
        );
        ops.push(Op::put(
            Space::Queue,
            codec::group_key(self.id, group),
            codec::two_u64(cursor, 0),
        ));
    }
    /// Offsets below this are committed (or failed) and may be delivered.
    fn visible_limit(&self) -> u64 {
        self.pending.first().copied().unwrap_or_else(|| self.next())
    }
}

fn handle(offset: u64, seq: u64) -> String {
    format!("fq1-{offset:x}-{seq:x}")
}

fn parse_handle(h: &str) -> Result<(u64, u64), QueueError> {
    let bad =
        || QueueError::InvalidReceiptHandle(format!("{h:?} is not a receipt handle of Ferry"));
    let rest = h.strip_prefix("fq1-").ok_or_else(bad)?;
    let (off, seq) = rest.split_once('-').ok_or_else(bad)?;
    Ok((
        u64::from_str_radix(off, 16).map_err(|_| bad())?,
        u64::from_str_radix(seq, 16).map_err(|_| bad())?,
    ))
}

fn filter_hashes(f: &Filter) -> Option<Vec<u64>> {
    match f {
        Filter::All => None,
        Filter::Tags(t) => Some(t.iter().map(|t| codec::tag_hash(Some(t))).collect()),
    }
}

fn idx_matches(hashes: &Option<Vec<u64>>, idx: Idx) -> bool {
    if idx.tag == DEAD {
        return false;
    }
    match hashes {
        None => true,
        Some(h) => idx.tag != 0 && h.contains(&idx.tag),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX / 4)) as u64
}

/// What one pass of receive found.
struct Pass {
    deliveries: Vec<Delivery>,
    dead_letters: Vec<Message>,
    ops: Vec<Op>,
    /// The earliest time a message in flight for the group becomes visible again.
    next_visible: Option<u64>,
    notify: Arc<Notify>,
}

impl Queue {
    /// Opens the queue, restoring topics, groups and deliveries in flight from the store.
    pub fn open(store: Option<QueueStore>, config: QueueConfig) -> Result<Queue, QueueError> {
        Queue::open_with_clock(store, config, Arc::new(SystemClock))
    }

    /// [`Queue::open`] with a chosen clock (tests use [`ManualClock`]).
    pub fn open_with_clock(
        store: Option<QueueStore>,
        config: QueueConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Queue, QueueError> {
        let (engine, writer): (Arc<dyn Engine>, _) = match store {
            Some(s) => (s.engine, Some(s.writer)),
            None => (Arc::new(MemoryEngine::new()), None),
        };
        let state = restore(engine.as_ref())?;
        Ok(Queue {
            inner: Arc::new(Inner {
                config,
                clock,
                engine,
                writer,
                state: Mutex::new(state),
            }),
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// Where a new group of `topic` starts: the configured default, except on dead-letter
    /// topics (`%DLQ%...`), which are read from the beginning (they are looked at afterwards).
    pub fn default_start_for(&self, topic: &str) -> Start {
        if topic.starts_with("%DLQ%") {
            Start::Beginning
        } else {
            self.inner.config.default_start
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `ops` and waits until durable. Runs in its own task so that a dropped caller
    /// cannot leave a batch half-handled.
    async fn persist(&self, ops: Vec<Op>) -> Result<(), QueueError> {
        if ops.is_empty() {
            return Ok(());
        }
        match &self.inner.writer {
            Some(w) => {
                let w = w.clone();
                tokio::spawn(async move { w.commit(ops).await })
                    .await
                    .map_err(|e| QueueError::Internal(format!("commit task: {e}")))?
                    .map_err(QueueError::Store)
            }
            None => self
                .inner
                .engine
                .apply(&ops, false)
                .map_err(QueueError::Store),
        }
    }

    /// Queues `ops` without waiting (for the synchronous admin calls).
    fn persist_nowait(&self, ops: Vec<Op>) -> Result<(), QueueError> {
        if ops.is_empty() {
            return Ok(());
        }
        match &self.inner.writer {
            Some(w) => w
                .submit(
                    ops,
                    Box::new(|r| {
                        if let Err(e) = r {
                            tracing::error!("queue: cannot store a change: {e}");
                        }
                    }),
                )
                .map_err(QueueError::Store),
            None => self
                .inner
                .engine
                .apply(&ops, false)
                .map_err(QueueError::Store),
        }
    }

    fn topic_mut<'a>(
        &self,
        st: &'a mut State,
        ns: &str,
        topic: &str,
        create: bool,
        ops: &mut Vec<Op>,
    ) -> Result<&'a mut Topic, QueueError> {
        if !valid_name(topic) {
            return Err(QueueError::IllegalTopic(topic.into()));
        }
        let exists = st.namespaces.get(ns).is_some_and(|m| m.contains_key(topic));
        if !exists {
            if !create {
                return Err(QueueError::TopicNotFound(topic.into()));
            }
            let id = st.next_topic_id;
            st.next_topic_id += 1;
            ops.push(Op::put(
                Space::Queue,
                codec::topic_key(ns, topic),
                codec::two_u64(id, self.now_ms()),
            ));
            st.namespaces
                .entry(ns.to_string())
                .or_default()
                .insert(topic.to_string(), Topic::new(id));
        }
        Ok(st
            .namespaces
            .get_mut(ns)
            .and_then(|m| m.get_mut(topic))
            .expect("present"))
    }

    /// Creates a topic (no error if it exists).
    pub fn create_topic(&self, ns: &str, topic: &str) -> Result<(), QueueError> {
        let mut ops = Vec::new();
        {
            let mut st = self.lock();
            self.topic_mut(&mut st, ns, topic, true, &mut ops)?;
        }
        self.persist_nowait(ops)
    }

    /// Whether the topic exists.
    pub fn topic_exists(&self, ns: &str, topic: &str) -> bool {
        self.lock()
            .namespaces
            .get(ns)
            .is_some_and(|m| m.contains_key(topic))
    }

    /// Deletes a topic, its messages and its groups.
    pub fn delete_topic(&self, ns: &str, topic: &str) -> Result<(), QueueError> {
        let removed = {
            let mut st = self.lock();
            st.namespaces.get_mut(ns).and_then(|m| m.remove(topic))
        };
        let Some(t) = removed else {
            return Err(QueueError::TopicNotFound(topic.into()));
        };
        t.notify.notify_waiters();
        self.persist_nowait(vec![Op::delete(Space::Queue, codec::topic_key(ns, topic))])?;
        self.purge_topic_keys(t.id)
    }

    /// Removes every key of a (deleted) topic id, page by page.
    fn purge_topic_keys(&self, id: u64) -> Result<(), QueueError> {
        for kind in [MSG, INDEX, GROUP, INFLIGHT] {
            let prefix = codec::prefix(kind, id);
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self
                    .inner
                    .engine
                    .scan(Space::Queue, &prefix, after.as_deref(), PAGE)?;
                if page.is_empty() {
                    break;
                }
                after = page.last().map(|(k, _)| k.clone());
                let ops = page
                    .into_iter()
                    .map(|(k, _)| Op::delete(Space::Queue, k))
                    .collect();
                self.persist_nowait(ops)?;
            }
        }
        Ok(())
    }

    /// Topics of a namespace, by name.
    pub fn topics(&self, ns: &str) -> Vec<TopicInfo> {
        let st = self.lock();
        let mut out: Vec<TopicInfo> = st
            .namespaces
            .get(ns)
            .map(|m| {
                m.iter()
                    .map(|(name, t)| {
                        let mut groups: Vec<String> = t.groups.keys().cloned().collect();
                        groups.sort();
                        TopicInfo {
                            name: name.clone(),
                            messages: t.index.len() as u64,
                            first_offset: t.first,
                            next_offset: t.next(),
                            groups,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Removes everything of a namespace (its instance was deleted).
    pub fn delete_namespace(&self, ns: &str) {
        let removed = self.lock().namespaces.remove(ns);
        for (name, t) in removed.into_iter().flatten() {
            t.notify.notify_waiters();
            let r = self
                .persist_nowait(vec![Op::delete(Space::Queue, codec::topic_key(ns, &name))])
                .and_then(|_| self.purge_topic_keys(t.id));
            if let Err(e) = r {
                tracing::error!("queue: deleting topic {name:?} of {ns:?}: {e}");
            }
        }
    }

    /// Creates a consumer group of a topic starting at `start` (no change if it exists).
    pub fn ensure_group(
        &self,
        ns: &str,
        group: &str,
        topic: &str,
        start: Start,
    ) -> Result<(), QueueError> {
        if !valid_name(group) {
            return Err(QueueError::IllegalGroup(group.into()));
        }
        let auto = self.inner.config.auto_create_topics;
        let mut ops = Vec::new();
        {
            let mut st = self.lock();
            let t = self.topic_mut(&mut st, ns, topic, auto, &mut ops)?;
            t.add_group(group, start, &mut ops);
        }
        self.persist_nowait(ops)
    }

    /// Stores a message; `Ok` once it is durable (as the writer's durability promises).
    pub async fn send(&self, ns: &str, msg: NewMessage) -> Result<Sent, QueueError> {
        let cfg = &self.inner.config;
        if msg.body.len() > cfg.max_body_size {
            return Err(QueueError::BodyTooLarge {
                size: msg.body.len(),
                max: cfg.max_body_size,
            });
        }
        if let Some(tag) = &msg.tag {
            if tag.contains("||") || tag.trim().is_empty() {
                return Err(QueueError::BadRequest(format!(
                    "illegal message tag {tag:?}: it may not be blank or contain '||'"
                )));
            }
        }
        let id = match &msg.message_id {
            Some(id) if !id.is_empty() => id.clone(),
            _ => new_message_id(),
        };
        let now = self.now_ms();
        let tag = msg.tag.clone().filter(|t| !t.is_empty());
        let mut ops = Vec::new();
        let (topic_id, offset, notify) = {
            let mut st = self.lock();
            let t = self.topic_mut(&mut st, ns, &msg.topic, cfg.auto_create_topics, &mut ops)?;
            let offset = t.next();
            let record = Message {
                id: id.clone(),
                topic: msg.topic.clone(),
                tag: tag.clone(),
                keys: msg.keys,
                properties: msg.properties,
                body: msg.body,
                born_host: msg.born_host,
                born_timestamp_ms: msg.born_timestamp_ms,
                store_timestamp_ms: now,
                offset,
            };
            let tag_hash = codec::tag_hash(tag.as_deref());
            t.index.push_back(Idx {
                store_ms: now,
                tag: tag_hash,
            });
            t.pending.insert(offset);
            ops.push(Op::put(
                Space::Queue,
                codec::offset_key(MSG, t.id, offset),
                codec::encode_message(&record),
            ));
            ops.push(Op::put(
                Space::Queue,
                codec::offset_key(INDEX, t.id, offset),
                codec::two_u64(now, tag_hash),
            ));
            (t.id, offset, t.notify.clone())
        };
        let result = self.persist(ops).await;
        {
            let mut st = self.lock();
            if let Some(t) = st
                .namespaces
                .get_mut(ns)
                .and_then(|m| m.get_mut(&msg.topic))
                .filter(|t| t.id == topic_id)
            {
                t.pending.remove(&offset);
                if result.is_err() {
                    if let Some(i) = offset.checked_sub(t.first) {
                        if let Some(idx) = t.index.get_mut(i as usize) {
                            idx.tag = DEAD;
                        }
                    }
                }
            }
        }
        notify.notify_waiters();
        result?;
        Ok(Sent {
            message_id: id,
            offset,
        })
    }

    /// Receives up to `req.max_messages`, waiting up to `req.wait` for one (long polling).
    pub async fn receive(
        &self,
        ns: &str,
        req: ReceiveRequest,
    ) -> Result<Vec<Delivery>, QueueError> {
        if !valid_name(&req.group) {
            return Err(QueueError::IllegalGroup(req.group.clone()));
        }
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            let pass = self.receive_pass(ns, &req)?;
            let notified = pass.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.persist(pass.ops).await?;
            for m in pass.dead_letters {
                self.to_dead_letter(ns, &req.group, m).await?;
            }
            if !pass.deliveries.is_empty() {
                return Ok(pass.deliveries);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(v) = pass.next_visible {
                let wait = Duration::from_millis(v.saturating_sub(self.now_ms()).max(1));
                until = until.min(now + wait);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn receive_pass(&self, ns: &str, req: &ReceiveRequest) -> Result<Pass, QueueError> {
        let cfg = &self.inner.config;
        let max = req.max_messages.clamp(1, 1024);
        let now = self.now_ms();
        let visible_at = now.saturating_add(ms(req.invisible).max(1));
        let hashes = filter_hashes(&req.filter);
        let renew: Option<Arc<str>> = req.auto_renew_client.as_deref().map(Arc::from);
        let mut ops = Vec::new();
        let mut st = self.lock();
        let t = self.topic_mut(&mut st, ns, &req.topic, cfg.auto_create_topics, &mut ops)?;
        let tid = t.id;
        let notify = t.notify.clone();
        // Stored with this pass.
        t.add_group(&req.group, self.default_start_for(&req.topic), &mut ops);
        let first = t.first;
        let limit = t.visible_limit();
        let mut picked: Vec<(u64, u32, u64)> = Vec::new(); // offset, attempt, seq
        let mut dead: Vec<u64> = Vec::new();
        let mut next_visible = None;
        {
            let g = t.groups.get_mut(&req.group).expect("inserted");
            // 1. Redeliveries: messages in flight whose invisibility ended.
            let due: Vec<u64> = g
                .inflight
                .iter()
                .filter(|(_, f)| f.visible_at <= now)
                .map(|(o, _)| *o)
                .collect();
            for off in due {
                if picked.len() >= max {
                    break;
                }
                let f = g.inflight.get_mut(&off).expect("present");
                let idx = (off >= first)
                    .then(|| t.index.get((off - first) as usize).copied())
                    .flatten();
                let Some(idx) = idx else {
                    g.inflight.remove(&off);
                    ops.push(Op::delete(
                        Space::Queue,
                        codec::inflight_key(tid, &req.group, off),
                    ));
                    continue;
                };
                if f.attempt >= cfg.max_attempts {
                    g.inflight.remove(&off);
                    ops.push(Op::delete(
                        Space::Queue,
                        codec::inflight_key(tid, &req.group, off),
                    ));
                    dead.push(off);
                    continue;
                }
                if !idx_matches(&hashes, idx) {
                    // Subscription changed: the message no longer concerns this group.
                    g.inflight.remove(&off);
                    ops.push(Op::delete(
                        Space::Queue,
                        codec::inflight_key(tid, &req.group, off),
                    ));
                    continue;
                }
                g.seq += 1;
                f.attempt += 1;
                f.seq = g.seq;
                f.visible_at = visible_at;
                f.auto_renew = renew.clone();
                picked.push((off, f.attempt, f.seq));
            }
            // 2. New messages from the cursor.
            let mut off = g.cursor.max(first);
            let mut scanned = 0;
            while picked.len() < max && off < limit && scanned < SCAN_BUDGET {
                let idx = t.index[(off - first) as usize];
                scanned += 1;
                if idx_matches(&hashes, idx) && !g.inflight.contains_key(&off) {
                    g.seq += 1;
                    g.inflight.insert(
                        off,
                        Inflight {
                            attempt: 1,
                            visible_at,
                            seq: g.seq,
                            auto_renew: renew.clone(),
                        },
                    );
                    picked.push((off, 1, g.seq));
                }
                off += 1;
            }
            if off != g.cursor || !picked.is_empty() {
                g.cursor = off;
                ops.push(Op::put(
                    Space::Queue,
                    codec::group_key(tid, &req.group),
                    codec::two_u64(g.cursor, g.seq),
                ));
            }
        }
        // Read the bodies.
        let mut deliveries = Vec::with_capacity(picked.len());
        let mut drop_offsets = Vec::new();
        for (off, attempt, seq) in picked {
            match self.read_message(tid, &req.topic, off) {
                Ok(Some(m)) if req.filter.matches(m.tag.as_deref()) => {
                    ops.push(Op::put(
                        Space::Queue,
                        codec::inflight_key(tid, &req.group, off),
                        codec::inflight_value(attempt, visible_at, seq),
                    ));
                    deliveries.push(Delivery {
                        message: m,
                        receipt_handle: handle(off, seq),
                        delivery_attempt: attempt,
                    });
                }
                Ok(_) => drop_offsets.push(off),
                Err(e) => {
                    tracing::error!("queue: cannot read message {off} of {:?}: {e}", req.topic);
                    drop_offsets.push(off);
                }
            }
        }
        let mut dead_letters = Vec::new();
        for off in dead {
            if let Ok(Some(m)) = self.read_message(tid, &req.topic, off) {
                dead_letters.push(m);
            }
        }
        let g = t.groups.get_mut(&req.group).expect("inserted");
        for off in drop_offsets {
            g.inflight.remove(&off);
            ops.push(Op::delete(
                Space::Queue,
                codec::inflight_key(tid, &req.group, off),
            ));
        }
        if deliveries.is_empty() {
            next_visible = g.inflight.values().map(|f| f.visible_at).min();
        }
        Ok(Pass {
            deliveries,
            dead_letters,
            ops,
            next_visible,
            notify,
        })
    }

    fn read_message(&self, tid: u64, topic: &str, off: u64) -> Result<Option<Message>, QueueError> {
        match self
            .inner
            .engine
            .get(Space::Queue, &codec::offset_key(MSG, tid, off))?
        {
            Some(v) => codec::decode_message(topic, off, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Copies a message into `%DLQ%<group>` (a normal topic of the namespace).
    async fn to_dead_letter(&self, ns: &str, group: &str, m: Message) -> Result<(), QueueError> {
        let dlq = format!("%DLQ%{group}");
        if dlq.len() > 127 {
            tracing::warn!("queue: dead-letter topic name {dlq:?} too long; message dropped");
            return Ok(());
        }
        let mut ops = Vec::new();
        {
            let mut st = self.lock();
            self.topic_mut(&mut st, ns, &dlq, true, &mut ops)?;
        }
        self.persist(ops).await?;
        let mut properties = m.properties;
        properties
            .entry("ORIGIN_TOPIC".into())
            .or_insert_with(|| m.topic.clone());
        self.send(
            ns,
            NewMessage {
                topic: dlq,
                tag: m.tag,
                keys: m.keys,
                properties,
                body: m.body,
                message_id: Some(m.id),
                born_host: m.born_host,
                born_timestamp_ms: m.born_timestamp_ms,
            },
        )
        .await
        .map(|_| ())
    }

    /// Finds the delivery a handle names, checking that it is still valid.
    fn with_delivery<R>(
        &self,
        ns: &str,
        group: &str,
        topic: &str,
        receipt_handle: &str,
        f: impl FnOnce(u64, &mut Group, u64, u64) -> R,
    ) -> Result<R, QueueError> {
        let (off, seq) = parse_handle(receipt_handle)?;
        let now = self.now_ms();
        let mut st = self.lock();
        let t = st
            .namespaces
            .get_mut(ns)
            .and_then(|m| m.get_mut(topic))
            .ok_or_else(|| QueueError::TopicNotFound(topic.into()))?;
        let tid = t.id;
        let g = t.groups.get_mut(group).ok_or_else(|| {
            QueueError::InvalidReceiptHandle(format!("group {group:?} has no message in flight"))
        })?;
        match g.inflight.get(&off) {
            Some(fl) if fl.seq == seq && fl.visible_at > now => Ok(f(tid, g, off, now)),
            _ => Err(QueueError::InvalidReceiptHandle(format!(
                "{receipt_handle:?} is expired or was already used (the message became visible \
                 again or was acknowledged)"
            ))),
        }
    }

    /// Acknowledges a delivery: the group is done with the message.
    pub async fn ack(
        &self,
        ns: &str,
        group: &str,
        topic: &str,
        receipt_handle: &str,
    ) -> Result<(), QueueError> {
        let op = self.with_delivery(ns, group, topic, receipt_handle, |tid, g, off, _| {
            g.inflight.remove(&off);
            Op::delete(Space::Queue, codec::inflight_key(tid, group, off))
        })?;
        self.persist(vec![op]).await
    }

    /// Makes a delivered message invisible for `d` from now; returns the new receipt handle
    /// (the old one is no longer valid).
    pub async fn change_invisible(
        &self,
        ns: &str,
        group: &str,
        topic: &str,
        receipt_handle: &str,
        d: Duration,
    ) -> Result<String, QueueError> {
        let (op, h) =
            self.with_delivery(ns, group, topic, receipt_handle, |tid, g, off, now| {
                g.seq += 1;
                let seq = g.seq;
                let fl = g.inflight.get_mut(&off).expect("checked");
                fl.seq = seq;
                fl.visible_at = now.saturating_add(ms(d));
                fl.auto_renew = None;
                (
                    Op::put(
                        Space::Queue,
                        codec::inflight_key(tid, group, off),
                        codec::inflight_value(fl.attempt, fl.visible_at, seq),
                    ),
                    handle(off, seq),
                )
            })?;
        self.persist(vec![op]).await?;
        // Long polls of the group wait for the old deadline: let them look again.
        self.wake(ns, topic);
        Ok(h)
    }

    fn wake(&self, ns: &str, topic: &str) {
        let notify = self
            .lock()
            .namespaces
            .get(ns)
            .and_then(|m| m.get(topic))
            .map(|t| t.notify.clone());
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }

    /// Moves a delivered message to `%DLQ%<group>` at once (FIFO push consumers ask for it).
    pub async fn forward_to_dead_letter(
        &self,
        ns: &str,
        group: &str,
        topic: &str,
        receipt_handle: &str,
    ) -> Result<(), QueueError> {
        let (tid, off, op) =
            self.with_delivery(ns, group, topic, receipt_handle, |tid, g, off, _| {
                g.inflight.remove(&off);
                (
                    tid,
                    off,
                    Op::delete(Space::Queue, codec::inflight_key(tid, group, off)),
                )
            })?;
        if let Some(m) = self.read_message(tid, topic, off)? {
            self.to_dead_letter(ns, group, m).await?;
        }
        self.persist(vec![op]).await
    }

    /// Push consumers: extends by `extend` the invisibility of every delivery made with
    /// `auto_renew` whose client is `alive` and that would become visible within `within`.
    /// Returns how many were renewed. (Not persisted: after a restart the old deadline holds,
    /// which can only cause an early redelivery.)
    pub fn renew_auto(
        &self,
        alive: &dyn Fn(&str) -> bool,
        within: Duration,
        extend: Duration,
    ) -> usize {
        let now = self.now_ms();
        let horizon = now.saturating_add(ms(within));
        let mut n = 0;
        let mut st = self.lock();
        for topics in st.namespaces.values_mut() {
            for t in topics.values_mut() {
                for g in t.groups.values_mut() {
                    for fl in g.inflight.values_mut() {
                        let Some(c) = &fl.auto_renew else { continue };
                        if fl.visible_at > now && fl.visible_at <= horizon && alive(c) {
                            fl.visible_at = now.saturating_add(ms(extend));
                            n += 1;
                        }
                    }
                }
            }
        }
        n
    }

    /// Stops auto-renewing the deliveries of a client (it went away).
    pub fn forget_client(&self, client: &str) {
        let mut st = self.lock();
        for topics in st.namespaces.values_mut() {
            for t in topics.values_mut() {
                for g in t.groups.values_mut() {
                    for fl in g.inflight.values_mut() {
                        if fl.auto_renew.as_deref() == Some(client) {
                            fl.auto_renew = None;
                        }
                    }
                }
            }
        }
    }

    /// Retention: removes up to `sweep_batch` expired messages per topic (oldest first), and
    /// the deliveries in flight that pointed at them. Returns how many messages were removed.
    pub async fn sweep(&self) -> Result<usize, QueueError> {
        let cfg = &self.inner.config;
        let cutoff = self.now_ms().saturating_sub(ms(cfg.retention));
        let mut ops = Vec::new();
        let mut removed = 0;
        {
            let mut st = self.lock();
            for topics in st.namespaces.values_mut() {
                for t in topics.values_mut() {
                    let mut n = 0;
                    while n < cfg.sweep_batch {
                        let Some(front) = t.index.front() else { break };
                        if front.store_ms >= cutoff || t.pending.contains(&t.first) {
                            break;
                        }
                        t.index.pop_front();
                        ops.push(Op::delete(
                            Space::Queue,
                            codec::offset_key(MSG, t.id, t.first),
                        ));
                        ops.push(Op::delete(
                            Space::Queue,
                            codec::offset_key(INDEX, t.id, t.first),
                        ));
                        t.first += 1;
                        n += 1;
                    }
                    if n == 0 {
                        continue;
                    }
                    removed += n;
                    let first = t.first;
                    for (name, g) in t.groups.iter_mut() {
                        let gone: Vec<u64> = g.inflight.range(..first).map(|(o, _)| *o).collect();
                        for off in gone {
                            g.inflight.remove(&off);
                            ops.push(Op::delete(
                                Space::Queue,
                                codec::inflight_key(t.id, name, off),
                            ));
                        }
                    }
                }
            }
        }
        self.persist(ops).await?;
        Ok(removed)
    }

    /// Runs the background duties until `stop` resolves: the retention sweep (every 10 s) and
    /// nothing else; auto-renewal is driven by the gRPC service, which knows the live clients.
    pub async fn run_maintenance(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {
                    loop {
                        match self.sweep().await {
                            Ok(n) if n >= self.inner.config.sweep_batch => tokio::task::yield_now().await,
                            Ok(_) => break,
                            Err(e) => { tracing::error!("queue: retention sweep: {e}"); break }
                        }
                    }
                }
            }
        }
    }

    /// Deliveries in flight for a group (tests, metrics).
    pub fn inflight(&self, ns: &str, group: &str, topic: &str) -> usize {
        self.lock()
            .namespaces
            .get(ns)
            .and_then(|m| m.get(topic))
            .and_then(|t| t.groups.get(group))
            .map_or(0, |g| g.inflight.len())
    }
}

/// Rebuilds the state from the store: topics, the index of each, groups, deliveries in flight.
fn restore(engine: &dyn Engine) -> Result<State, QueueError> {
    let mut st = State::default();
    let mut by_id: HashMap<u64, (String, String)> = HashMap::new();
    scan_all(engine, &[TOPIC], |k, v| {
        if let (Some((ns, topic)), Some(id)) = (codec::parse_topic_key(k), codec::u64_at(v, 0)) {
            st.next_topic_id = st.next_topic_id.max(id + 1);
            by_id.insert(id, (ns.clone(), topic.clone()));
            st.namespaces
                .entry(ns)
                .or_default()
                .insert(topic, Topic::new(id));
        }
    })?;
    for (id, (ns, name)) in &by_id {
        let t = st
            .namespaces
            .get_mut(ns)
            .and_then(|m| m.get_mut(name))
            .expect("inserted");
        let mut first_seen = true;
        scan_all(engine, &codec::prefix(INDEX, *id), |k, v| {
            let Some(off) = codec::u64_at(k, 9) else {
                return;
            };
            let store_ms = codec::u64_at(v, 0).unwrap_or(0);
            let tag = codec::u64_at(v, 8).unwrap_or(0);
            if first_seen {
                t.first = off;
                first_seen = false;
            }
            // Offsets are contiguous; a gap (a failed commit) is filled with dead entries.
            while t.next() < off {
                t.index.push_back(Idx {
                    store_ms,
                    tag: DEAD,
                });
            }
            if t.next() == off {
                t.index.push_back(Idx { store_ms, tag });
            }
        })?;
        scan_all(engine, &codec::prefix(GROUP, *id), |k, v| {
            let Ok(group) = std::str::from_utf8(&k[9..]) else {
                return;
            };
            t.groups.insert(
                group.to_string(),
                Group {
                    cursor: codec::u64_at(v, 0).unwrap_or(0),
                    seq: codec::u64_at(v, 8).unwrap_or(0),
                    inflight: BTreeMap::new(),
                },
            );
        })?;
        scan_all(engine, &codec::prefix(INFLIGHT, *id), |k, v| {
            let Some((group, off)) = codec::parse_inflight_key(k) else {
                return;
            };
            let (Some(attempt), Some(visible_at), Some(seq)) = (
                codec::u32_at(v, 0),
                codec::u64_at(v, 4),
                codec::u64_at(v, 12),
            ) else {
                return;
            };
            let g = t.groups.entry(group).or_default();
            g.seq = g.seq.max(seq);
            g.inflight.insert(
                off,
                Inflight {
                    attempt,
                    visible_at,
                    seq,
                    auto_renew: None,
                },
            );
        })?;
        // A group's cursor may have been written before its last deliveries' records: never
        // hand out a delivered offset twice as new.
        for g in t.groups.values_mut() {
            if let Some((&last, _)) = g.inflight.last_key_value() {
                g.cursor = g.cursor.max(last + 1);
            }
        }
    }
    Ok(st)
}

fn scan_all(
    engine: &dyn Engine,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), QueueError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = engine.scan(Space::Queue, prefix, after.as_deref(), PAGE)?;
        if page.is_empty() {
            return Ok(());
        }
        for (k, v) in &page {
            f(k, v);
        }
        after = page.last().map(|(k, _)| k.clone());
    }
}
