//! Ferry's MQTT load generator (`ferry bench`). It speaks MQTT through `ferry-codec` directly
//! (no client library), so it can drive any broker, Ferry or another, with many clients per
//! process at little CPU per message.
//!
//! - [`run::run`] runs a [`run::Plan`]: subscribers, idle connections and publishers, with topic
//!   patterns (`%i`), QoS 0/1/2, payload size, count / duration / rate per publisher, connection
//!   ramp rate, source addresses, authentication (including the cloud's Signature mode), over
//!   TCP, TLS, WebSocket or WSS. Its [`Report`] holds connections, messages sent / received /
//!   lost, throughput, latency percentiles (HDR histogram, from a timestamp in the payload) and
//!   errors by kind.
//! - [`pubsub`]: the first, single-pair scenario (one publisher → one subscriber), kept for
//!   `bench/quick-compare.sh` and `bench/durability.sh`.
//!
//! How it stays cheap: packets are encoded into one buffer per connection and written in
//! batches of tens of kilobytes; read buffers grow while reads fill them (and stay small on idle
//! connections); run it under a current-thread Tokio runtime pinned to a core to keep it away
//! from the broker.

mod client;
pub mod error;
pub mod pubsub;
pub mod report;
pub mod run;
pub mod transport;
mod ws;

pub use client::ConnectOptions;
pub use error::Failure;
pub use pubsub::{run_pubsub, PubSubOptions};
pub use report::Report;
pub use run::{run, Auth, Common, Plan, PubSpec, SubSpec};
pub use transport::{Target, TlsOptions, Transport};
