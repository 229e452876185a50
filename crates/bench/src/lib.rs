//! Ferry's MQTT load generator. It speaks MQTT through `ferry-codec` directly (no client
//! library), so it can drive any broker, Ferry or another, and costs little CPU per message.
//!
//! Scenarios:
//! - [`pubsub`]: one publisher → one subscriber on one topic, at QoS 0, 1 or 2. Reports
//!   messages sent and received, throughput (received messages per second, from the first send
//!   to the last receipt) and end-to-end latency percentiles.
//!
//! Every run stops on its own: when all messages arrived, or after a given time without
//! progress.
//!
//! How it stays cheap: packets are encoded into one buffer and written in batches of tens of
//! kilobytes, reads use a large buffer, and publisher and subscriber run as two futures on one
//! thread (run it under a current-thread Tokio runtime and pin it to a core to keep it away from
//! the broker).

mod client;
pub mod pubsub;

pub use pubsub::{run_pubsub, PubSubOptions, Report};
