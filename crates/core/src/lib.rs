//! Ferry's protocol core: everything MQTT means, with no sockets, clocks or disks.
//!
//! Where things are:
//! - [`topic`]: topic name and filter validation, matching, `$share/<group>/` parsing.
//! - [`trie`]: the subscription index ([`SubscriptionTree`]) with shared-subscription groups.
//! - [`retained`]: the [`RetainedStore`] trait and the in-memory retained index.
//! - [`message`]: the [`Message`] that fans out to subscribers (shared, never copied).
//! - [`session`]: [`Session`] state that outlives a connection and the [`SessionRegistry`] trait.
//! - [`broker`]: [`Broker`], the state machine that connects sessions, subscriptions and
//!   retained messages; the runtime feeds it packets and drains its outputs.
//! - [`conn`]: [`Connection`], the per-socket state machine (handshake timeout, keep-alive,
//!   topic aliases both ways, inbound receive maximum, packet size limits).
//! - [`acl`]: the topic ACL.
//! - [`offline`]: the per-instance cap on offline messages (oldest evicted first).
//!
//! Time is an input: every call that depends on it takes `now`, so tests run on a virtual
//! clock.

pub mod acl;
pub mod broker;
pub mod conn;
pub mod hash;
pub mod message;
pub mod offline;
pub mod persist;
pub mod retained;
pub mod session;
pub mod topic;
pub mod trie;

pub use acl::{Acl, AclAction, AclRule, Action, Grant, Permissions, TopicPolicy};
pub use broker::{Accepted, Broker, ClientGrant, ClientInfo, ConnId, Limits, Output, Stats};
pub use conn::Connection;
pub use message::{Message, Outflow, SharedMessage};
pub use retained::{MemoryRetained, RetainedStore};
pub use session::{MemorySessions, Session, SessionRegistry};
pub use trie::{SessionId, Subscription, SubscriptionTree};
