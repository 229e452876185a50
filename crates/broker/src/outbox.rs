//! The bounded queue from the router task to one connection's writer.
//!
//! The router never waits on a connection: it pushes and moves on. QoS 0 publishes beyond the
//! limit are dropped and counted (a slow subscriber loses its own QoS 0 traffic and nothing
//! else); QoS 1/2 publishes are already bounded by the session's inflight window, and
//! acknowledgements are bounded because the connection stops reading from a client that does not
//! read its own answers.

use ferry_codec::{Disconnect, Packet, QoS};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct State {
    packets: VecDeque<Packet>,
    /// Set when the router closed the connection: the DISCONNECT to send last, if any.
    close: Option<Option<Disconnect>>,
}

/// A drain of at most this many packets that empties the queue counts as light traffic.
const LIGHT: usize = 4;

pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    qos0_limit: usize,
    dropped_qos0: AtomicU64,
}

impl Outbox {
    pub fn new(qos0_limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            qos0_limit,
            dropped_qos0: AtomicU64::new(0),
        }
    }

    /// Queues `packet`; returns false if it was a QoS 0 publish dropped for lack of room.
    pub fn push(&self, packet: Packet) -> bool {
        {
            let mut state = self.state.lock().expect("outbox lock");
            if state.close.is_some() {
                return true;
            }
            if let Packet::Publish(p) = &packet {
                if p.qos == QoS::AtMostOnce && state.packets.len() >= self.qos0_limit {
                    drop(state);
                    self.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
            state.packets.push_back(packet);
        }
        self.notify.notify_one();
        true
    }

    /// Asks the writer to send `disconnect` (if any) after what is queued, then close.
    pub fn close(&self, disconnect: Option<Disconnect>) {
        self.state.lock().expect("outbox lock").close = Some(disconnect);
        self.notify.notify_one();
    }

    /// Moves up to `max` queued packets into `out`. Once the queue is empty and the router has
    /// closed the connection, returns the close (with the DISCONNECT to send, if any).
    pub fn take(&self, out: &mut Vec<Packet>, max: usize) -> Option<Option<Disconnect>> {
        let mut state = self.state.lock().expect("outbox lock");
        let n = state.packets.len().min(max);
        out.extend(state.packets.drain(..n));
        if state.packets.is_empty() {
            if n <= LIGHT {
                // Light traffic: an idle connection keeps no queue memory.
                state.packets = VecDeque::new();
            }
            state.close.clone()
        } else {
            None
        }
    }

    /// Whether the router has closed the connection.
    pub fn is_closing(&self) -> bool {
        self.state.lock().expect("outbox lock").close.is_some()
    }

    pub async fn ready(&self) {
        self.notify.notified().await
    }

    pub fn dropped_qos0(&self) -> u64 {
        self.dropped_qos0.load(Ordering::Relaxed)
    }
}
