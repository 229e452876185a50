//! The bounded queue from the router task to one connection's writer.
//!
//! The router never waits on a connection: it pushes and moves on. QoS 0 publishes beyond the
//! limit are dropped and counted (a slow subscriber loses its own QoS 0 traffic and nothing
//! else); QoS 1/2 publishes are already bounded by the session's inflight window, and
//! acknowledgements are bounded because the connection stops reading from a client that does not
//! read its own answers.

use ferry_codec::{Disconnect, Packet, QoS};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Waker;

/// Kept small: there is one per connection. Dropped QoS 0 publishes are counted by the caller.
struct State {
    packets: VecDeque<Packet>,
    /// The connection's task, waiting for packets (registered when it left the queue empty).
    waker: Option<Waker>,
    /// Set when the router closed the connection: the DISCONNECT to send last, if any (boxed:
    /// once per connection, and a pointer is smaller than an optional packet).
    close: Option<Box<Option<Disconnect>>>,
    qos0_limit: u32,
}

/// A drain of at most this many packets that empties the queue counts as light traffic.
const LIGHT: usize = 4;

pub struct Outbox {
    state: Mutex<State>,
}

impl Outbox {
    pub fn new(qos0_limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State {
                packets: VecDeque::new(),
                waker: None,
                close: None,
                qos0_limit: u32::try_from(qos0_limit).unwrap_or(u32::MAX),
            }),
        }
    }

    /// Queues `packet`; returns false if it was a QoS 0 publish dropped for lack of room.
    pub fn push(&self, packet: Packet) -> bool {
        let waker = {
            let mut state = self.state.lock().expect("outbox lock");
            if state.close.is_some() {
                return true;
            }
            if let Packet::Publish(p) = &packet {
                if p.qos == QoS::AtMostOnce && state.packets.len() >= state.qos0_limit as usize {
                    return false;
                }
            }
            state.packets.push_back(packet);
            // Only the first packet into an empty queue wakes the task: it takes them all.
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Asks the writer to send `disconnect` (if any) after what is queued, then close.
    pub fn close(&self, disconnect: Option<Disconnect>) {
        let waker = {
            let mut state = self.state.lock().expect("outbox lock");
            state.close = Some(Box::new(disconnect));
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Moves up to `max` queued packets into `out`. Once the queue is empty and the router has
    /// closed the connection, returns the close (with the DISCONNECT to send, if any); when the
    /// queue is left empty otherwise, `waker` is woken by the next push or close.
    pub fn take(
        &self,
        out: &mut Vec<Packet>,
        max: usize,
        waker: &Waker,
    ) -> Option<Option<Disconnect>> {
        let mut state = self.state.lock().expect("outbox lock");
        let n = state.packets.len().min(max);
        out.extend(state.packets.drain(..n));
        if !state.packets.is_empty() {
            return None;
        }
        if n <= LIGHT {
            // Light traffic: an idle connection keeps no queue memory.
            state.packets = VecDeque::new();
        }
        if state.close.is_none() && !state.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.waker = Some(waker.clone());
        }
        state.close.as_deref().cloned()
    }

    /// Whether the router has closed the connection.
    pub fn is_closing(&self) -> bool {
        self.state.lock().expect("outbox lock").close.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::Outbox;
    use ferry_codec::{Packet, Publish, QoS};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn qos0() -> Packet {
        Packet::Publish(Publish::default())
    }

    #[test]
    fn one_wake_per_drain_qos0_beyond_the_limit_dropped_and_close_last() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let outbox = Outbox::new(2);
        let mut out = Vec::new();
        // Nothing queued: the waker is kept; the next push wakes it once, later ones do not.
        assert_eq!(outbox.take(&mut out, 64, &waker), None);
        assert!(outbox.push(qos0()));
        assert!(outbox.push(Packet::PingResp));
        assert!(
            !outbox.push(qos0()),
            "a QoS 0 publish beyond the limit is dropped"
        );
        let qos1 = Publish {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        assert!(
            outbox.push(Packet::Publish(qos1)),
            "QoS 1 is never dropped here"
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(outbox.take(&mut out, 64, &waker), None);
        assert_eq!(out.len(), 3);
        // Closing wakes the task, and the close comes once the queue is empty.
        outbox.push(Packet::PingResp);
        outbox.close(None);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        out.clear();
        assert_eq!(outbox.take(&mut out, 64, &waker), Some(None));
        assert_eq!(out, vec![Packet::PingResp]);
        assert!(outbox.push(qos0()), "pushes after the close are ignored");
        assert!(outbox.is_closing());
    }

    /// One per connection: kept within a 96-byte allocation with its `Arc` counts.
    #[test]
    fn an_outbox_stays_small() {
        assert!(
            std::mem::size_of::<Outbox>() <= 72,
            "{}",
            std::mem::size_of::<Outbox>()
        );
    }
}
