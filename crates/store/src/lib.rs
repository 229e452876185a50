//! Ferry's embedded on-disk store and its group-commit writer.
//!
//! Everything a user expects to survive a restart (metadata, persistent sessions, their
//! subscriptions and queued messages, retained messages) is kept in one store directory. This
//! crate knows nothing about MQTT: it stores byte keys and byte values in five *spaces*
//! ([`Space`]), and the broker decides what the keys mean.
//!
//! Where things are:
//!
//! - This file holds the shared vocabulary: [`Space`], [`Op`] (a put or a delete), [`Durability`],
//!   the [`Engine`] trait every storage backend implements, and [`StoreError`] with its mapping to
//!   an MQTT 5 reason code ([`StoreError::reason_code`]) and from `std::io::Error`
//!   ([`StoreError::from_io`]: a full disk becomes [`StoreError::DiskFull`]).
//! - `fjall_engine.rs` holds [`FjallEngine`], the real backend: one fjall database in the store
//!   directory with one keyspace per [`Space`]. It also owns the directory's `FORMAT` file
//!   (`ferry-store 1`), written when a new store is created and checked on every open, so that a
//!   store written by a newer or unknown version of ferry is refused with a clear message rather
//!   than misread. A batch of ops becomes one fjall write batch, so it is atomic across spaces;
//!   with `sync` the journal is fsynced before `apply` returns. After a write fails (for example
//!   on a full disk) fjall refuses all further writes; the engine then reopens the database on
//!   the next write, so writes resume once the operator has freed space.
//! - `memory.rs` holds [`MemoryEngine`], BTreeMaps behind a lock, for tests and for a broker run
//!   without a data directory. It can be told to fail writes ([`MemoryEngine::fail_writes`]) so
//!   that error paths can be tested without filling a disk.
//! - `writer.rs` holds [`Writer`], the group commit: one writer thread fed by a bounded queue.
//!   Whatever batches queue up while the thread is busy writing and fsyncing are merged into the
//!   next single [`Engine::apply`] (one write batch, one fsync), and each submitter is told, in
//!   submission order, when its batch is durable. If the merged apply fails, every submitter in it
//!   gets the error: nothing is acknowledged that was not written. (The converse does not hold:
//!   a batch whose fsync failed may have reached the journal and reappear after a restart, so a
//!   failed write must be treated as "maybe written", as MQTT's at-least-once redelivery does.)
//! - `tests/store.rs` runs the same test bodies on both engines and tests the FORMAT checks, the
//!   writer (merging, order, back-pressure, failures), a real full disk on a small tmpfs (when
//!   the test may mount one), and a crash test that SIGKILLs a committing child process at random
//!   moments and checks that every acknowledged batch is on disk, whole. `examples/commit_bench.rs`
//!   measures commits per second under `Sync` and `Async`.
//!
//! Durability: under [`Durability::Sync`] a batch is reported done only after the journal has
//! been fsynced, so it survives `kill -9` and power loss. Under [`Durability::Async`] a batch is
//! reported done once it has been written to the journal file (handed to the operating system),
//! without waiting for an fsync: it survives a crash or `kill -9` of ferry itself, but an
//! operating-system crash or power loss can lose the last moments of acknowledged writes (what
//! the kernel had not yet written back, typically up to some tens of seconds). fjall fsyncs its
//! journal on its own when it rotates it and when the store is closed, and [`Writer::stop`]
//! fsyncs under `Async` too.

mod fjall_engine;
mod memory;
mod writer;

pub use fjall_engine::{FjallEngine, FjallOptions, FORMAT_FILE, FORMAT_NAME, FORMAT_VERSION};
pub use memory::MemoryEngine;
pub use writer::{Writer, WriterStats};

use ferry_codec::ReasonCode;

/// A separate key space of the store (one fjall keyspace each). Keys in different spaces never
/// collide; a batch may touch several spaces and is still atomic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Metadata: instances, parent topics, groups, keys, credentials, tokens, rules.
    Meta,
    /// Retained messages.
    Retained,
    /// Persistent sessions, their subscriptions and packet-id state.
    Sessions,
    /// Queued and inflight messages of persistent sessions.
    Messages,
    /// The embedded server-side queue (RocketMQ-compatible): topics, messages, consumer groups.
    Queue,
}

impl Space {
    /// Every space, in a fixed order.
    pub const ALL: [Space; 5] = [
        Space::Meta,
        Space::Retained,
        Space::Sessions,
        Space::Messages,
        Space::Queue,
    ];

    /// The name of the space on disk (the fjall keyspace name).
    pub fn name(self) -> &'static str {
        match self {
            Space::Meta => "meta",
            Space::Retained => "retained",
            Space::Sessions => "sessions",
            Space::Messages => "messages",
            Space::Queue => "queue",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Space::Meta => 0,
            Space::Retained => 1,
            Space::Sessions => 2,
            Space::Messages => 3,
            Space::Queue => 4,
        }
    }
}

/// One write in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets `key` to `value` (replacing any earlier value).
    Put {
        space: Space,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Removes `key` (no error if it is absent).
    Delete { space: Space, key: Vec<u8> },
}

impl Op {
    /// A put.
    pub fn put(space: Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            space,
            key: key.into(),
            value: value.into(),
        }
    }

    /// A delete.
    pub fn delete(space: Space, key: impl Into<Vec<u8>>) -> Op {
        Op::Delete {
            space,
            key: key.into(),
        }
    }

    /// The space the op writes to.
    pub fn space(&self) -> Space {
        match self {
            Op::Put { space, .. } | Op::Delete { space, .. } => *space,
        }
    }

    /// The key the op writes.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// When a committed batch is reported done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// After the journal has been fsynced: survives `kill -9` and power loss.
    Sync,
    /// After the write has reached the journal file, without waiting for an fsync: survives a
    /// crash of the process, but an OS crash or power loss can lose the last moments of writes.
    Async,
}

/// A key and its value, as returned by [`Engine::scan`].
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A storage backend. Implementations must be safe to call from many threads at once.
pub trait Engine: Send + Sync + 'static {
    /// Applies all ops atomically (one write batch), in order (a later op on the same key wins);
    /// when `sync`, durable on disk on return. An empty `ops` with `sync` makes every earlier
    /// write durable.
    fn apply(&self, ops: &[Op], sync: bool) -> Result<(), StoreError>;

    /// The value stored under `key`, if any.
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Entries whose key starts with `prefix`, in key order, starting after `after` (exclusive)
    /// if given, at most `limit`. Pass the last key of one page as `after` to get the next.
    ///
    /// On fjall (an LSM tree) deleted keys stay as tombstones until compaction, and a scan from
    /// the start of a prefix steps over them: after 200,000 deletes under one prefix, a scan of
    /// its first 10 live entries took ~50 ms, while the same scan with `after` set to the last
    /// deleted key took ~10 µs. So drain queues with a remembered cursor passed as `after`, not
    /// by rescanning from the prefix.
    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// Number of entries with the prefix (may iterate; used at start-up and in tests).
    fn count(&self, space: Space, prefix: &[u8]) -> Result<u64, StoreError>;
}

/// A store failure. Cloneable so that one failed group commit can be reported to every
/// submitter in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The disk (or the user's quota) is full; nothing of the failed operation was acknowledged.
    #[error("store: disk full: {0}")]
    DiskFull(String),
    /// Any other I/O failure.
    #[error("store: I/O error: {0}")]
    Io(String),
    /// The data on disk is damaged or not what was expected.
    #[error("store: data corrupt: {0}")]
    Corrupt(String),
    /// The store directory was written by another (newer or unknown) format version.
    #[error(
        "store: unsupported format: found {found}; this build of ferry supports \
         store format {supported} only"
    )]
    UnsupportedFormat { found: String, supported: u32 },
    /// The batch cannot be stored (an empty key, a key over 65,535 bytes or a value over
    /// 4 GiB); nothing was written. A bug in the caller rather than a store failure.
    #[error("store: invalid op: {0}")]
    InvalidOp(String),
    /// The writer has been stopped.
    #[error("store: writer stopped")]
    Stopped,
}

impl StoreError {
    /// The MQTT 5 reason code to answer a client with when its operation failed on this error:
    /// `0x97 Quota exceeded` for a full disk, `0x80 Unspecified error` otherwise.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            StoreError::DiskFull(_) => ReasonCode::QUOTA_EXCEEDED,
            _ => ReasonCode::UNSPECIFIED_ERROR,
        }
    }

    /// Maps an I/O error: no space left on the device (or quota exceeded) becomes
    /// [`StoreError::DiskFull`], anything else [`StoreError::Io`]; `context` says what was being
    /// done and is prefixed to the message.
    pub fn from_io(context: &str, err: &std::io::Error) -> StoreError {
        let msg = if context.is_empty() {
            err.to_string()
        } else {
            format!("{context}: {err}")
        };
        if is_disk_full(err) {
            StoreError::DiskFull(msg)
        } else {
            StoreError::Io(msg)
        }
    }

    /// Whether this is [`StoreError::DiskFull`].
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull(_))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(err: std::io::Error) -> StoreError {
        StoreError::from_io("", &err)
    }
}

/// ENOSPC (28 on Linux and the BSDs) or a quota error.
fn is_disk_full(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded
    ) || err.raw_os_error() == Some(28)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_disk_full_or_io() {
        let full = std::io::Error::from_raw_os_error(28);
        assert!(StoreError::from_io("write", &full).is_disk_full());
        let kind = std::io::Error::new(std::io::ErrorKind::StorageFull, "full");
        assert!(StoreError::from(kind).is_disk_full());
        let other = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "nope");
        let e = StoreError::from_io("open", &other);
        assert_eq!(e, StoreError::Io("open: nope".into()));
        assert_eq!(e.reason_code(), ReasonCode::UNSPECIFIED_ERROR);
        assert_eq!(
            StoreError::DiskFull("x".into()).reason_code(),
            ReasonCode::QUOTA_EXCEEDED
        );
    }
}
