//! The router task: owns the [`Broker`] core, takes connection events from one bounded channel,
//! and dispatches the core's outputs to the connections' outboxes. Connections never touch the
//! core directly, so the core needs no locks and stays deterministic.

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use ferry_codec::{Connect, Packet};
use ferry_core::{Accepted, Broker, ClientGrant, ConnId, Output, Permissions, Stats};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

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
    Packet {
        conn: ConnId,
        packet: Packet,
    },
    /// The connection ended without the core having closed it.
    Lost {
        conn: ConnId,
    },
    /// Close every connection with DISCONNECT 0x8B and stop.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

pub async fn run(mut broker: Broker, mut rx: mpsc::Receiver<RouterMsg>, metrics: Arc<Metrics>) {
    let mut outboxes: HashMap<ConnId, Arc<Outbox>> = HashMap::new();
    let mut seen = Seen::default();
    let mut batch = Vec::with_capacity(256);
    loop {
        let deadline = broker.poll_timeout();
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = sleep_until(deadline) => {
                broker.handle_timeout(Instant::now());
                dispatch(&mut broker, &mut outboxes, &metrics, &mut seen);
                continue;
            }
        };
        if received == 0 {
            return;
        }
        let now = Instant::now();
        for msg in batch.drain(..) {
            match msg {
                RouterMsg::Connect {
                    conn,
                    connect,
                    grant,
                    outbox,
                    reply,
                } => {
                    outboxes.insert(conn, outbox);
                    let accepted = broker.connect_with(conn, *connect, grant, now);
                    // Outputs (CONNACK first) must reach the outbox before the driver resumes.
                    dispatch(&mut broker, &mut outboxes, &metrics, &mut seen);
                    let _ = reply.send(accepted);
                }
                RouterMsg::Packet { conn, packet } => broker.handle(conn, packet, now),
                RouterMsg::SetPermissions {
                    conn,
                    permissions,
                    done,
                } => {
                    broker.set_permissions(conn, permissions);
                    let _ = done.send(());
                }
                RouterMsg::Run(operation) => operation(&mut broker, now),
                RouterMsg::Lost { conn } => {
                    broker.connection_lost(conn, now);
                    outboxes.remove(&conn);
                }
                RouterMsg::Shutdown { done } => {
                    broker.shutdown(now);
                    dispatch(&mut broker, &mut outboxes, &metrics, &mut seen);
                    let _ = done.send(());
                    return;
                }
            }
        }
        if broker.poll_timeout().is_some_and(|t| t <= now) {
            broker.handle_timeout(now);
        }
        dispatch(&mut broker, &mut outboxes, &metrics, &mut seen);
    }
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
}

fn dispatch(
    broker: &mut Broker,
    outboxes: &mut HashMap<ConnId, Arc<Outbox>>,
    metrics: &Metrics,
    seen: &mut Seen,
) {
    for output in broker.drain_output() {
        match output {
            Output::Send { conn, packet } => {
                if let Some(outbox) = outboxes.get(&conn) {
                    if !outbox.push(packet) {
                        metrics.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Output::Close { conn, disconnect } => {
                if let Some(outbox) = outboxes.remove(&conn) {
                    outbox.close(disconnect);
                }
            }
        }
    }
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
    seen.stats = stats.clone();
    let sessions = broker.session_count() as u64;
    add(&metrics.sessions, sessions, seen.sessions);
    seen.sessions = sessions;
    let retained = broker.retained_count() as u64;
    add(&metrics.retained, retained, seen.retained);
    seen.retained = retained;
}
