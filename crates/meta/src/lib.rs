//! Ferry's tenancy metadata and the cloud's authentication schemes.
//!
//! Where things are:
//! - [`model`]: instances (with their `cloud` / `standard` profile settings), parent topics,
//!   Group IDs, AccessKeys, device credentials, tokens and admin keys.
//! - [`validate`]: the naming rules of the product contract (§1), each error naming the field
//!   and the rule.
//! - [`registry`]: [`Meta`], the in-memory registry of all of it (thread-safe; reads are cheap),
//!   with the operations the management APIs call.
//! - [`auth`]: the Signature, Token and DeviceCredential schemes (§2): parsing the user name,
//!   computing HMAC-SHA1 passwords, checking tokens, and the [`Permissions`] a connection gets.
//! - [`error`]: [`MetaError`], which carries the cloud's error code (`InstanceNotFound`,
//!   `GroupIdAlreadyExsited`, …) and maps to an HTTP status.
//!
//! Times are wall-clock milliseconds since the Unix epoch, passed in by the caller.

pub mod auth;
pub mod error;
pub mod model;
pub mod registry;
pub mod validate;

pub use auth::{AuthMode, Authenticated, Permissions};
pub use error::{ErrorKind, MetaError};
pub use model::*;
pub use registry::{Meta, MetaStore};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the operating system's random number generator");
    b
}
