//! The router task: owns the [`Broker`] core, takes connection events from one bounded channel,
//! and dispatches the core's outputs to the connections' outboxes. Connections never touch the
//! core directly, so the core needs no locks and stays deterministic.

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use ferry_codec::{Connect, Packet};
use ferry_core::{Accepted, Broker, ConnId, Output};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

// The `Packet` variant is the common one and the largest; boxing it would allocate per message.
#[allow(clippy::large_enum_variant)]
pub enum RouterMsg {
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        outbox: Arc<Outbox>,
        reply: oneshot::Sender<Option<Accepted>>,
    },
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
    let mut batch = Vec::with_capacity(256);
    loop {
        let deadline = broker.poll_timeout();
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = sleep_until(deadline) => {
                broker.handle_timeout(Instant::now());
                dispatch(&mut broker, &mut outboxes, &metrics);
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
                    outbox,
                    reply,
                } => {
                    outboxes.insert(conn, outbox);
                    let accepted = broker.connect(conn, *connect, now);
                    // Outputs (CONNACK first) must reach the outbox before the driver resumes.
                    dispatch(&mut broker, &mut outboxes, &metrics);
                    let _ = reply.send(accepted);
                }
                RouterMsg::Packet { conn, packet } => broker.handle(conn, packet, now),
                RouterMsg::Lost { conn } => {
                    broker.connection_lost(conn, now);
                    outboxes.remove(&conn);
                }
                RouterMsg::Shutdown { done } => {
                    broker.shutdown(now);
                    dispatch(&mut broker, &mut outboxes, &metrics);
                    let _ = done.send(());
                    return;
                }
            }
        }
        if broker.poll_timeout().is_some_and(|t| t <= now) {
            broker.handle_timeout(now);
        }
        dispatch(&mut broker, &mut outboxes, &metrics);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

fn dispatch(broker: &mut Broker, outboxes: &mut HashMap<ConnId, Arc<Outbox>>, metrics: &Metrics) {
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
    metrics
        .messages_received
        .store(stats.messages_received, Ordering::Relaxed);
    metrics
        .messages_sent
        .store(stats.messages_sent, Ordering::Relaxed);
    metrics
        .dropped_queue_full
        .store(stats.dropped_queue_full, Ordering::Relaxed);
    metrics
        .sessions
        .store(broker.session_count() as u64, Ordering::Relaxed);
    metrics
        .retained
        .store(broker.retained_count() as u64, Ordering::Relaxed);
}
