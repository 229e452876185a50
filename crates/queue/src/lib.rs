//! Ferry's embedded server-side queue, speaking the RocketMQ 5 gRPC protocol.
//!
//! - `model.rs`: configuration, messages, requests, errors, clocks.
//! - `engine.rs`: [`Queue`], the state machine and its persistence (`codec.rs` has the keys).
//! - `service.rs`: the `apache.rocketmq.v2.MessagingService` gRPC service (auth, telemetry,
//!   long polling) and `server.rs` its listener (TLS and plaintext on one port).
//! - `client.rs`: [`QueueClient`], implemented by the embedded queue and by [`RemoteQueue`], a
//!   RocketMQ 5 gRPC client.

mod client;
mod codec;
mod engine;
mod model;
mod server;
mod service;

pub mod pb {
    //! Generated from `proto/ferry_rocketmq.proto`.
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("apache.rocketmq.v2");
}

pub use client::{BoxFuture, LocalQueue, QueueClient, RemoteQueue, RemoteQueueConfig};
pub use engine::Queue;
pub use model::*;
pub use server::{serve, tls_server_config, QueueServer, ServerConfig, TlsFiles};
pub use service::{Code, MessagingService};
