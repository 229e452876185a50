//! The per-instance cap on offline messages (product §3: at most `max_offline_messages` queued
//! messages per instance, oldest evicted first, every eviction counted).
//!
//! Offline messages live on disk only, so the core cannot look at them; it keeps just enough to
//! choose what goes:
//!
//! - every stored message gets its position (`seq`) from one counter per core
//!   ([`Broker`](crate::Broker) owns it), so positions order messages by the time they were
//!   queued across all sessions of the instance, not only within one session;
//! - per offline session with messages on disk, a lower bound of the position of its oldest one
//!   (`Session::spill_head`), kept in an ordered index here (a few dozen bytes per session, none
//!   per message);
//! - the total of queued messages on disk (`Σ Session::spilled`).
//!
//! When the total passes the cap the core asks the runtime ([`EvictRequest`]) to delete the
//! queued messages of the session with the oldest head that lie *at or below the next session's
//! head* — all of them are older than anything else queued in the instance, so eviction is
//! exactly oldest first. (Positions are unique, so a message of this session at the very
//! position of the next session's head bound is not that session's: the bound is below its
//! true head. Including it also guarantees progress when two bounds are equal.) The runtime answers with [`Broker::evicted`](crate::Broker::evicted): how many
//! it deleted and the session's new head, and the core asks again until the total is back under
//! the cap. A head that is only a lower bound is corrected by that answer.

use crate::hash::HashMap;
use crate::trie::SessionId;
use ferry_codec::ByteStr;
use std::collections::BTreeSet;

/// Delete up to `max` queued messages of a session positioned after `after_seq` and at or
/// below `below_seq`, oldest first; answered with [`crate::Broker::evicted`]. Run it only once
/// everything written before it is durable (it must see the messages it counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictRequest {
    pub client_id: ByteStr,
    pub after_seq: u64,
    pub below_seq: u64,
    pub max: u64,
}

/// The ordered heads of offline sessions with messages on disk, and their total.
#[derive(Debug, Default)]
pub(crate) struct OfflineIndex {
    heads: BTreeSet<(u64, SessionId)>,
    indexed: HashMap<SessionId, u64>,
    /// Queued messages on disk, all stored sessions of the instance.
    pub total: u64,
    /// The session an eviction request is out for (one at a time).
    pub outstanding: Option<(SessionId, u64)>,
}

impl OfflineIndex {
    /// Puts `sid` in the index at `head`, or takes it out (`None`).
    pub fn set(&mut self, sid: SessionId, head: Option<u64>) {
        let old = self.indexed.get(&sid).copied();
        if old == head {
            return;
        }
        if let Some(h) = old {
            self.heads.remove(&(h, sid));
            self.indexed.remove(&sid);
        }
        if let Some(h) = head {
            self.heads.insert((h, sid));
            self.indexed.insert(sid, h);
        }
    }

    /// The session with the oldest head, and the head of the one after it.
    pub fn oldest(&self) -> Option<(SessionId, u64)> {
        let mut it = self.heads.iter();
        let &(_, sid) = it.next()?;
        let below = it.next().map_or(u64::MAX, |&(h, _)| h);
        Some((sid, below))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_and_next_head() {
        let mut idx = OfflineIndex::default();
        assert_eq!(idx.oldest(), None);
        idx.set(1, Some(50));
        assert_eq!(idx.oldest(), Some((1, u64::MAX)));
        idx.set(2, Some(10));
        idx.set(3, Some(30));
        assert_eq!(idx.oldest(), Some((2, 30)));
        idx.set(2, Some(40));
        assert_eq!(idx.oldest(), Some((3, 40)));
        idx.set(3, None);
        assert_eq!(idx.oldest(), Some((2, 50)));
    }
}
