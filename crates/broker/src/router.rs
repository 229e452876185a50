//! The router task: owns an instance's [`Broker`] core, takes connection events from one
//! bounded channel, and dispatches the core's outputs to the connections' outboxes.
//! Connections never touch the core directly, so the core needs no locks and stays
//! deterministic.
//!
//! With a store, the router also hands the core's store operations to the group-commit writer
//! after each batch of events, and holds back the answers that promise something stored
//! ([`Output::SendDurable`]: PUBACK / PUBREC of a message queued for a persistent session or
//! retained, SUBACK, …) until the writer reports that batch durable. Everything behind a held
//! answer on the same connection is held too, so a connection's packets keep their order. If
//! the write fails, nothing held is sent: those connections are closed (v5: DISCONNECT with
//! the store's reason code, 0x97 for a full disk, else 0x80), so no client is told that
//! something unwritten was stored.

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::persist::Persistence;
use ferry_codec::{Connect, Disconnect, Packet};
use ferry_core::hash::HashMap;
use ferry_core::offline::EvictRequest;
use ferry_core::{Accepted, Broker, ClientGrant, ConnId, Output, Permissions, Stats};
use ferry_store::StoreError;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

/// A management operation run on an instance's broker core.
pub type Operation = Box<dyn FnOnce(&mut Broker, Instant) + Send>;

// The `Packet` variant is the common one and the largest; boxing it would allocate per message.
#[allow(clippy::large_enum_variant)]
pub enum RouterMsg {
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        grant: ClientGrant,
        outbox: Arc<Outbox>,
        reply: oneshot::Sender<Option<Accepted>>,
    },
    Packet {
        conn: ConnId,
        packet: Packet,
    },
    /// PUBACKs in a row from one connection.
    Acks {
        conn: ConnId,
        ids: Acks,
    },
    /// New permissions for a connection (a token uploaded on `$SYS/uploadToken`); `done`
    /// answers once they apply.
    SetPermissions {
        conn: ConnId,
        permissions: Permissions,
        done: oneshot::Sender<()>,
    },
    /// Runs a management operation on the broker core (queries, kick, publish); the closure
    /// answers through its own channel.
    Run(Operation),
    /// Answers once everything the core wrote for the messages before this one is durable
    /// (e.g. a management publish to persistent sessions), or with the store's error.
    Barrier {
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// The connection ended without the core having closed it.
    Lost {
        conn: ConnId,
    },
    /// Close every connection with DISCONNECT 0x8B, write what is pending, and stop.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// The packet ids of up to [`Acks::MAX`] PUBACKs in a row from one connection, in order.
/// Inline, so a run costs the router queue one message and no allocation.
#[derive(Default)]
pub struct Acks {
    len: u8,
    ids: [u16; Acks::MAX],
}

impl Acks {
    pub const MAX: usize = 32;

    /// Adds `id`; false (and nothing added) when full.
    pub fn push(&mut self, id: u16) -> bool {
        let Some(slot) = self.ids.get_mut(usize::from(self.len)) else {
            return false;
        };
        *slot = id;
        self.len += 1;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        usize::from(self.len) == Self::MAX
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.ids[..usize::from(self.len)]
    }
}

/// Where client publishes under outflow parents go.
pub struct Outflow {
    pub instance: String,
    pub hooks: Option<Arc<dyn crate::Hooks>>,
}

/// The instance's link to the store.
pub struct StoreLink {
    pub persistence: Arc<Persistence>,
    pub instance: String,
    /// How long queued messages wait for an offline session (the instance's setting).
    pub retention: Option<std::time::Duration>,
}

/// Sessions whose offline messages one call of `run_evictions` looks at.
const EVICTION_ROUNDS: usize = 256;

/// How often the retention sweep looks at the next page of an instance's stored messages.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// After a turn of at most [`FEW_EVENTS`] events, the outputs handed to the outboxes before
/// the router lets the connections it woke run; the rest follow right after them. A message
/// to 1,000 subscribers wakes 1,000 connection tasks: handing all of them out first kept
/// every delivery waiting ~0.3 ms for the last hand-out.
const HAND_OUT: usize = 64;

/// A turn of more events (a loaded router) hands everything out at once, so that each
/// connection writes all the turn gave it in one go. Splitting those turns too cost
/// saturated p2p QoS 1 ~15% of its throughput (more, smaller writes).
const FEW_EVENTS: usize = 4;

/// Results of submitted store batches, in submission order.
type Commit = (u64, Result<(), StoreError>);

struct Router {
    outboxes: HashMap<ConnId, Arc<Outbox>>,
    metrics: Arc<Metrics>,
    seen: Seen,
    store: Option<StoreLink>,
    commit_tx: mpsc::Sender<Commit>,
    /// Answers waiting for their store batch, in order: (batch, output).
    held: VecDeque<(u64, Output)>,
    /// Per connection: how many held outputs, and the batch of the last one.
    held_conns: HashMap<ConnId, (usize, u64)>,
    /// The number the next submitted batch will get.
    next_batch: u64,
    /// The last batch submitted.
    submitted: u64,
    /// The last batch reported durable (or failed).
    committed: u64,
    /// Loads of spilled messages waiting for a batch to be durable: (batch, request).
    loads: Vec<(u64, ferry_core::persist::LoadRequest)>,
    /// Evictions of offline messages waiting for a batch to be durable: (batch, request).
    evictions: Vec<(u64, EvictRequest)>,
    /// Where the retention sweep continues.
    sweep_cursor: Option<Vec<u8>>,
    /// Outputs to hand to the outboxes, in order (a buffer kept between turns);
    /// [`HAND_OUT`] go before the router yields, the rest after it, before any new event.
    ready: VecDeque<Output>,
    outflow: Outflow,
    /// Batches submitted and not yet done: parts outstanding (store write, outflow append)
    /// and the first error. Batches are released in order, once all their parts are done.
    parts: std::collections::BTreeMap<u64, (u8, Result<(), StoreError>)>,
    /// Barriers waiting for a batch: (batch, answer).
    barriers: Vec<(u64, oneshot::Sender<Result<(), StoreError>>)>,
    /// Barriers that arrived in this turn, placed once the turn's batch is submitted.
    new_barriers: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

pub async fn run(
    mut broker: Broker,
    mut rx: mpsc::Receiver<RouterMsg>,
    metrics: Arc<Metrics>,
    store: Option<StoreLink>,
    outflow: Outflow,
) {
    let (commit_tx, mut commit_rx) = mpsc::channel::<Commit>(1024);
    let mut r = Router {
        outboxes: HashMap::default(),
        metrics,
        seen: Seen::default(),
        store,
        commit_tx,
        held: VecDeque::new(),
        held_conns: HashMap::default(),
        next_batch: 1,
        submitted: 0,
        committed: 0,
        loads: Vec::new(),
        evictions: Vec::new(),
        sweep_cursor: None,
        ready: VecDeque::new(),
        outflow,
        parts: std::collections::BTreeMap::new(),
        barriers: Vec::new(),
        new_barriers: Vec::new(),
    };
    // A restored instance may hold more than its cap (the cap was lowered meanwhile).
    broker.enforce_offline_cap();
    r.take_loads(&mut broker);
    let sweeping = r.store.as_ref().is_some_and(|s| s.retention.is_some());
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(256);
    loop {
        // Everything queued goes to the outboxes before the next event.
        r.hand_out(usize::MAX);
        let deadline = broker.poll_timeout();
        tokio::select! {
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return;
                }
            }
            Some((n, result)) = commit_rx.recv() => {
                r.part_done(&mut broker, n, result);
                continue;
            }
            _ = std::future::ready(()), if r.evictions_ready() => {
                // Evictions left over from a bounded round: go on between other events.
                r.run_evictions(&mut broker);
                continue;
            }
            _ = sweep.tick(), if sweeping => {
                r.sweep(&mut broker);
                r.take_loads(&mut broker);
                continue;
            }
            _ = sleep_until(deadline) => {
                broker.handle_timeout(Instant::now());
                r.dispatch(&mut broker);
                r.submit(&mut broker);
                r.take_loads(&mut broker);
                continue;
            }
        }
        let now = Instant::now();
        let events = batch.len();
        for msg in batch.drain(..) {
            match msg {
                RouterMsg::Connect {
                    conn,
                    connect,
                    grant,
                    outbox,
                    reply,
                } => {
                    r.outboxes.insert(conn, outbox);
                    let accepted = broker.connect_with(conn, *connect, grant, now);
                    // Outputs (CONNACK first) must reach the outbox before the driver resumes.
                    r.dispatch(&mut broker);
                    r.hand_out(usize::MAX);
                    let _ = reply.send(accepted);
                }
                RouterMsg::Packet { conn, packet } => broker.handle(conn, packet, now),
                RouterMsg::Acks { conn, ids } => broker.handle_acks(conn, ids.as_slice(), now),
                RouterMsg::SetPermissions {
                    conn,
                    permissions,
                    done,
                } => {
                    broker.set_permissions(conn, permissions);
                    let _ = done.send(());
                }
                RouterMsg::Run(operation) => operation(&mut broker, now),
                RouterMsg::Barrier { done } => r.new_barriers.push(done),
                RouterMsg::Lost { conn } => {
                    broker.connection_lost(conn, now);
                    r.outboxes.remove(&conn);
                }
                RouterMsg::Shutdown { done } => {
                    broker.shutdown(now);
                    r.dispatch(&mut broker);
                    r.submit(&mut broker);
                    // Let the last batches become durable so their answers go out.
                    while r.committed < r.submitted {
                        match commit_rx.recv().await {
                            Some((n, result)) => r.part_done(&mut broker, n, result),
                            None => break,
                        }
                    }
                    r.hand_out(usize::MAX);
                    let _ = done.send(());
                    return;
                }
            }
        }
        if broker.poll_timeout().is_some_and(|t| t <= now) {
            broker.handle_timeout(now);
        }
        r.dispatch(&mut broker);
        r.submit(&mut broker);
        r.take_loads(&mut broker);
        if events <= FEW_EVENTS && r.ready.len() > HAND_OUT {
            // A fan-out: its first part goes now, and the connections it woke write before
            // the router hands out the rest (at the top of the loop).
            r.hand_out(HAND_OUT);
            requeue().await;
        }
    }
}

/// Yields once, to the back of the worker's run queue: the tasks woken before run first
/// (`tokio::task::yield_now` would also wait for the next check of the sockets).
fn requeue() -> impl std::future::Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// What this router last added to the shared metrics (several routers, one per instance, add
/// to the same counters).
#[derive(Default)]
struct Seen {
    stats: Stats,
    sessions: u64,
    retained: u64,
    offline: u64,
}

fn output_conn(output: &Output) -> ConnId {
    match output {
        Output::Send { conn, .. }
        | Output::SendDurable { conn, .. }
        | Output::Close { conn, .. } => *conn,
    }
}

impl Router {
    fn evictions_ready(&self) -> bool {
        self.evictions.iter().any(|(b, _)| *b <= self.committed)
    }

    fn holding(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.persistence.sync)
    }

    fn hold(&mut self, batch: u64, output: Output) {
        let conn = output_conn(&output);
        let entry = self.held_conns.entry(conn).or_insert((0, batch));
        entry.0 += 1;
        entry.1 = entry.1.max(batch);
        self.held.push_back((batch, output));
    }

    /// Queues (or holds) the core's outputs.
    fn dispatch(&mut self, broker: &mut Broker) {
        let holding = self.holding();
        for output in broker.drain_output() {
            let conn = output_conn(&output);
            if holding {
                if let Output::SendDurable { .. } = output {
                    let batch = self.next_batch;
                    self.hold(batch, output);
                    continue;
                }
                if let Some(&(_, last)) = self.held_conns.get(&conn) {
                    // Behind a held answer on the same connection: keep the order.
                    self.hold(last, output);
                    continue;
                }
            }
            self.deliver(output);
        }
        self.update_metrics(broker);
    }

    /// Queues `output` for the outboxes, behind what is queued already.
    fn deliver(&mut self, output: Output) {
        self.ready.push_back(output);
    }

    /// Hands up to `max` queued outputs to the outboxes, waking their connections.
    fn hand_out(&mut self, max: usize) {
        for _ in 0..max {
            let Some(output) = self.ready.pop_front() else {
                break;
            };
            self.send(output);
        }
        if self.ready.is_empty() && self.ready.capacity() > 4096 {
            self.ready = VecDeque::new(); // after a burst, do not keep its memory
        }
    }

    fn send(&mut self, output: Output) {
        match output {
            Output::Send { conn, packet } | Output::SendDurable { conn, packet } => {
                if let Some(outbox) = self.outboxes.get(&conn) {
                    if !outbox.push(packet) {
                        self.metrics.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Output::Close { conn, disconnect } => {
                if let Some(outbox) = self.outboxes.remove(&conn) {
                    outbox.close(disconnect);
                }
            }
        }
    }

    /// Hands the core's store operations to the writer and its outflow publishes to the
    /// rules, as one batch: what waits for the batch is released when both are done.
    fn submit(&mut self, broker: &mut Broker) {
        let outflow: Vec<_> = broker.drain_outflow().collect();
        let Some(link) = &self.store else {
            // No store, nothing is held: the appends just go.
            self.append_outflow(outflow, None);
            for done in self.new_barriers.drain(..) {
                let _ = done.send(Ok(()));
            }
            return;
        };
        let ops: Vec<_> = broker.drain_store_ops().collect();
        if ops.is_empty() && outflow.is_empty() {
            // Nothing new: barriers wait for what was submitted before them.
            let batch = self.submitted;
            for done in std::mem::take(&mut self.new_barriers) {
                if batch <= self.committed {
                    let _ = done.send(Ok(()));
                } else {
                    self.barriers.push((batch, done));
                }
            }
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.submitted = batch;
        for done in std::mem::take(&mut self.new_barriers) {
            self.barriers.push((batch, done));
        }
        let mut parts = 0u8;
        let mut failed = None;
        if !ops.is_empty() {
            parts += 1;
            let tx = self.commit_tx.clone();
            let result = link.persistence.encode(&link.instance, ops).and_then(|kv| {
                link.persistence.writer.submit(
                    kv,
                    Box::new(move |result| {
                        // The writer is a plain thread; the channel is deep enough never to
                        // fill.
                        let _ = tx.blocking_send((batch, result));
                    }),
                )
            });
            if let Err(e) = result {
                failed = Some(e);
            }
        }
        if self.append_outflow(outflow, Some(batch)) {
            parts += 1;
        }
        self.parts.insert(batch, (parts, Ok(())));
        if let Some(e) = failed {
            self.part_done(broker, batch, Err(e));
        } else if parts == 0 {
            self.part_done(broker, batch, Ok(()));
        }
    }

    /// Hands client publishes under outflow parents to the rules; with `batch`, the result is
    /// reported as a part of that batch. Returns whether an append was started.
    fn append_outflow(&self, outflow: Vec<ferry_core::Outflow>, batch: Option<u64>) -> bool {
        let Some(hooks) = &self.outflow.hooks else {
            return false;
        };
        if outflow.is_empty() {
            return false;
        }
        let append = hooks.outflow(&self.outflow.instance, outflow);
        let tx = self.commit_tx.clone();
        tokio::spawn(async move {
            let result = append.await.map_err(|e| {
                error!(error = %e, "outflow: cannot append to the queue");
                StoreError::Io(format!("outflow to the queue: {e}"))
            });
            if let Some(batch) = batch {
                let _ = tx.send((batch, result)).await;
            }
        });
        true
    }

    /// One part of a batch is done; batches whose parts are all done are released, in order.
    fn part_done(&mut self, broker: &mut Broker, batch: u64, result: Result<(), StoreError>) {
        if let Some(entry) = self.parts.get_mut(&batch) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.1.is_ok() {
                entry.1 = result;
            }
        }
        while let Some(entry) = self.parts.first_entry() {
            if entry.get().0 > 0 {
                break;
            }
            let (done, (_, result)) = entry.remove_entry();
            self.release(broker, done, result);
        }
    }

    /// Takes the core's load and eviction requests; each runs once everything written before
    /// it is durable (a read must see the writes that spilled the messages).
    fn take_loads(&mut self, broker: &mut Broker) {
        let requests: Vec<_> = broker.drain_loads().collect();
        for request in requests {
            self.loads.push((self.submitted, request));
        }
        if !self.loads.is_empty() {
            self.run_loads(broker);
        }
        let requests: Vec<_> = broker.drain_evictions().collect();
        for request in requests {
            self.evictions.push((self.submitted, request));
        }
        if !self.evictions.is_empty() {
            self.run_evictions(broker);
        }
    }

    /// Carries out the evictions whose writes are durable: the oldest offline messages of the
    /// instance go until it is back under its cap (at most [`EVICTION_ROUNDS`] sessions per
    /// call; the rest continue at the next one).
    fn run_evictions(&mut self, broker: &mut Broker) {
        self.evict_rounds(broker);
        self.update_metrics(broker);
    }

    fn evict_rounds(&mut self, broker: &mut Broker) {
        let Some(link) = &self.store else {
            self.evictions.clear();
            return;
        };
        let persistence = link.persistence.clone();
        let instance = link.instance.clone();
        let mut rounds = 0;
        while rounds < EVICTION_ROUNDS {
            let committed = self.committed;
            let Some(i) = self.evictions.iter().position(|(b, _)| *b <= committed) else {
                return;
            };
            let (_, request) = self.evictions.swap_remove(i);
            rounds += 1;
            match persistence.evict(
                &instance,
                &request.client_id,
                request.after_seq,
                request.below_seq,
                request.max,
            ) {
                Ok(eviction) => {
                    if !eviction.deletes.is_empty() {
                        if let Err(e) = persistence
                            .writer
                            .submit(eviction.deletes, Box::new(|_| {}))
                        {
                            error!(error = %e, "cannot delete evicted offline messages");
                        }
                    }
                    broker.evicted(
                        &request.client_id,
                        eviction.deleted,
                        eviction.last_deleted,
                        eviction.next_head,
                    );
                }
                Err(e) => {
                    error!(error = %e, client_id = %request.client_id, "cannot read offline messages to evict");
                    // Try again after the next commit.
                    self.evictions.push((self.submitted + 1, request));
                    return;
                }
            }
            let requests: Vec<_> = broker.drain_evictions().collect();
            for request in requests {
                self.evictions.push((self.submitted, request));
            }
        }
    }

    fn run_loads(&mut self, broker: &mut Broker) {
        let Some(link) = &self.store else {
            self.loads.clear();
            return;
        };
        let persistence = link.persistence.clone();
        let instance = link.instance.clone();
        let retention_ms = link.retention.map(|r| r.as_millis() as u64);
        loop {
            let committed = self.committed;
            let (ready, waiting): (Vec<_>, Vec<_>) =
                self.loads.drain(..).partition(|(b, _)| *b <= committed);
            self.loads = waiting;
            if ready.is_empty() {
                return;
            }
            for (_, request) in ready {
                match persistence.load(
                    &instance,
                    &request.client_id,
                    request.after_seq,
                    request.limit,
                    retention_ms,
                ) {
                    Ok((messages, stale)) => {
                        broker.loaded(&request.client_id, request.limit, messages, Instant::now());
                        self.forget(broker, stale);
                    }
                    Err(e) => {
                        error!(error = %e, client_id = %request.client_id, "cannot read queued messages")
                    }
                }
            }
            self.dispatch(broker);
            self.submit(broker);
            let requests: Vec<_> = broker.drain_loads().collect();
            for request in requests {
                self.loads.push((self.submitted, request));
            }
        }
    }

    /// Deletes queued messages whose retention passed (nothing waits for these writes); they
    /// stop counting towards the instance's cap.
    fn forget(&mut self, broker: &mut Broker, stale: Vec<ferry_store::Op>) {
        let Some(link) = &self.store else {
            return;
        };
        if stale.is_empty() {
            return;
        }
        let mut per_client: HashMap<&str, u64> = HashMap::default();
        for op in &stale {
            if let Some(client) = link.persistence.message_client(&link.instance, op.key()) {
                *per_client.entry(client).or_default() += 1;
            }
        }
        for (client, n) in per_client {
            broker.discarded_offline(client, n);
        }
        if let Err(e) = link.persistence.writer.submit(stale, Box::new(|_| {})) {
            error!(error = %e, "cannot delete expired offline messages");
        }
    }

    /// One bounded step of the retention sweep, for sessions that never come back.
    fn sweep(&mut self, broker: &mut Broker) {
        let Some(link) = &self.store else {
            return;
        };
        let Some(retention) = link.retention else {
            return;
        };
        match link.persistence.sweep_step(
            &link.instance,
            self.sweep_cursor.as_deref(),
            retention.as_millis() as u64,
        ) {
            Ok((stale, next)) => {
                self.sweep_cursor = next;
                self.forget(broker, stale);
            }
            Err(e) => error!(error = %e, "retention sweep failed"),
        }
    }

    /// A batch is durable (or failed): send (or refuse) what waited for it, and run the loads
    /// that waited for it.
    fn release(&mut self, broker: &mut Broker, batch: u64, result: Result<(), StoreError>) {
        self.committed = self.committed.max(batch);
        let mut i = 0;
        while i < self.barriers.len() {
            if self.barriers[i].0 <= batch {
                let (_, done) = self.barriers.swap_remove(i);
                let _ = done.send(result.clone());
            } else {
                i += 1;
            }
        }
        self.release_held(batch, result);
        if !self.loads.is_empty() {
            self.run_loads(broker);
        }
        if !self.evictions.is_empty() {
            self.run_evictions(broker);
        }
    }

    fn release_held(&mut self, batch: u64, result: Result<(), StoreError>) {
        if let Err(e) = &result {
            error!(error = %e, "store write failed; closing the connections waiting for it");
        }
        let mut failed: Vec<ConnId> = Vec::new();
        while self.held.front().is_some_and(|(b, _)| *b <= batch) {
            let (_, output) = self.held.pop_front().expect("front exists");
            let conn = output_conn(&output);
            if let Some(entry) = self.held_conns.get_mut(&conn) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    self.held_conns.remove(&conn);
                }
            }
            match &result {
                Ok(()) => self.deliver(output),
                Err(_) if failed.contains(&conn) => {}
                Err(e) => {
                    failed.push(conn);
                    // Behind what is queued for the connection already.
                    self.deliver(Output::Close {
                        conn,
                        disconnect: Some(Disconnect {
                            code: e.reason_code(),
                            properties: ferry_codec::Props {
                                reason_string: Some("the store could not write".into()),
                                ..Default::default()
                            }
                            .into(),
                        }),
                    });
                }
            }
        }
    }

    fn update_metrics(&mut self, broker: &Broker) {
        let metrics = &self.metrics;
        let seen = &mut self.seen;
        let stats = broker.stats();
        let add = |counter: &std::sync::atomic::AtomicU64, now: u64, before: u64| {
            if now != before {
                counter.fetch_add(now.wrapping_sub(before), Ordering::Relaxed);
            }
        };
        add(
            &metrics.messages_received,
            stats.messages_received,
            seen.stats.messages_received,
        );
        add(
            &metrics.messages_sent,
            stats.messages_sent,
            seen.stats.messages_sent,
        );
        add(
            &metrics.dropped_queue_full,
            stats.dropped_queue_full,
            seen.stats.dropped_queue_full,
        );
        add(
            &metrics.dropped_too_large,
            stats.dropped_too_large,
            seen.stats.dropped_too_large,
        );
        add(
            &metrics.dropped_expired,
            stats.dropped_expired,
            seen.stats.dropped_expired,
        );
        add(
            &metrics.offline_evicted,
            stats.evicted_offline,
            seen.stats.evicted_offline,
        );
        if stats.evicted_offline > seen.stats.evicted_offline {
            let instance = self.store.as_ref().map_or("", |s| s.instance.as_str());
            let evicted = stats.evicted_offline - seen.stats.evicted_offline;
            metrics.alarms.raise(
                instance,
                crate::alarms::AlarmKind::OfflineMessagesEvicted,
                evicted,
                format!(
                    "offline messages evicted (oldest first): the instance holds its cap of {} queued messages",
                    broker.limits().max_offline_messages
                ),
            );
        }
        seen.stats = stats.clone();
        let offline = broker.offline_messages();
        if offline != seen.offline {
            if offline > seen.offline {
                metrics
                    .offline_messages
                    .fetch_add(offline - seen.offline, Ordering::Relaxed);
            } else {
                metrics
                    .offline_messages
                    .fetch_sub(seen.offline - offline, Ordering::Relaxed);
            }
            seen.offline = offline;
        }
        let sessions = broker.session_count() as u64;
        add(&metrics.sessions, sessions, seen.sessions);
        seen.sessions = sessions;
        let retained = broker.retained_count() as u64;
        add(&metrics.retained, retained, seen.retained);
        seen.retained = retained;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_codec::{Properties, Protocol, Publish, QoS, SubOptions, Subscribe};
    use ferry_core::{Acl, Limits};
    use std::task::{Poll, Waker};

    const SUBSCRIBERS: usize = 200;

    async fn connect(tx: &mpsc::Sender<RouterMsg>, conn: ConnId) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(10_000));
        let (reply, accepted) = oneshot::channel();
        let connect = Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: format!("c{conn}").into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        tx.send(RouterMsg::Connect {
            conn,
            connect: Box::new(connect),
            grant: ClientGrant::default(),
            outbox: outbox.clone(),
            reply,
        })
        .await
        .unwrap();
        assert!(accepted.await.unwrap().is_some());
        outbox
    }

    /// The packets queued for `outbox` (taken, so the next call sees only newer ones).
    fn taken(outbox: &Outbox) -> Vec<Packet> {
        let mut out = Vec::new();
        outbox.take(&mut out, usize::MAX, Waker::noop());
        out
    }

    /// Takes what `outbox` has into `into` until `done(into)`, sleeping on the outbox between
    /// tries (this task is then woken by the next push).
    async fn take_until(outbox: &Outbox, into: &mut Vec<Packet>, done: fn(&[Packet]) -> bool) {
        std::future::poll_fn(|cx| {
            outbox.take(into, usize::MAX, cx.waker());
            if done(into) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn publishes(packets: &[Packet]) -> Vec<Vec<u8>> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p.payload.to_vec()),
                _ => None,
            })
            .collect()
    }

    /// A message to many subscribers: the first connections are woken (and can write) before
    /// the router hands the message to the rest, every subscriber still gets every message in
    /// order, and nothing waits for a new event to go out.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_fan_out_wakes_its_first_connections_before_handing_out_the_rest() {
        // A spawned task, not the test's own future: tasks woken on this thread run in the
        // order they were woken (the runtime polls its own future only between batches).
        tokio::spawn(fan_out()).await.unwrap();
    }

    async fn fan_out() {
        let (tx, rx) = mpsc::channel(1024);
        let metrics = Arc::new(Metrics::default());
        let outflow = Outflow {
            instance: String::new(),
            hooks: None,
        };
        let router = tokio::spawn(run(
            Broker::new(Limits::default(), Acl::default()),
            rx,
            metrics,
            None,
            outflow,
        ));
        let mut outboxes = Vec::new();
        for conn in 0..SUBSCRIBERS as ConnId {
            let outbox = connect(&tx, conn).await;
            let subscribe = Subscribe {
                packet_id: 1,
                filters: vec![(
                    "t".into(),
                    SubOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                )],
                properties: Properties::default(),
            };
            tx.send(RouterMsg::Packet {
                conn,
                packet: Packet::Subscribe(subscribe),
            })
            .await
            .unwrap();
            outboxes.push(outbox);
        }
        let publisher = SUBSCRIBERS as ConnId;
        connect(&tx, publisher).await;
        // Wait for the SUBACKs (and clear the CONNACKs), registering this task with the first
        // subscriber's outbox.
        let first = outboxes[0].clone();
        take_until(&first, &mut Vec::new(), |got| {
            got.iter().any(|p| matches!(p, Packet::SubAck(_)))
        })
        .await;
        for outbox in &outboxes[1..] {
            while !taken(outbox).iter().any(|p| matches!(p, Packet::SubAck(_))) {
                tokio::task::yield_now().await;
            }
        }
        for (i, payload) in [b"one", b"two"].iter().enumerate() {
            let publish = Publish {
                qos: QoS::AtLeastOnce,
                packet_id: i as u16 + 1,
                topic: "t".into(),
                payload: bytes::Bytes::from_static(*payload),
                ..Default::default()
            };
            tx.send(RouterMsg::Packet {
                conn: publisher,
                packet: Packet::Publish(publish),
            })
            .await
            .unwrap();
        }
        // Woken by the first subscriber's delivery: the router has yielded after its first
        // part of the hand-out, so the last subscriber has nothing yet.
        let mut got: Vec<Vec<Packet>> = vec![Vec::new(); SUBSCRIBERS];
        take_until(&first, &mut got[0], |got| !got.is_empty()).await;
        assert!(
            taken(&outboxes[SUBSCRIBERS - 1]).is_empty(),
            "the rest of the fan-out waits until the first connections ran"
        );
        // The rest follow without another event reaching the router.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        for (i, outbox) in outboxes.iter().enumerate() {
            got[i].extend(taken(outbox));
            assert_eq!(
                publishes(&got[i]),
                vec![b"one".to_vec(), b"two".to_vec()],
                "subscriber {i}"
            );
        }
        drop(tx);
        router.await.unwrap();
    }
}
