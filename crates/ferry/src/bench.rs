//! `ferry bench`: load generators run against a broker (see the `ferry-bench` crate).

use anyhow::{Context, Result};
use clap::{value_parser, Subcommand};
use ferry_bench::{run_pubsub, PubSubOptions};
use ferry_codec::{Protocol, QoS};
use std::io::Write;
use std::time::Duration;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// One publisher → one subscriber on one topic: throughput, loss and latency.
    Pubsub(PubSubArgs),
}

#[derive(clap::Args)]
struct PubSubArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker MQTT/TCP port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Messages to publish.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Payload size in bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// QoS of the publishes and of the subscription.
    #[arg(long, default_value_t = 0, value_parser = value_parser!(u8).range(0..=2))]
    qos: u8,
    /// MQTT protocol level: 3 (3.1), 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4, value_parser = value_parser!(u8).range(3..=5))]
    protocol: u8,
    /// Unacknowledged QoS 1/2 messages the publisher keeps in flight.
    #[arg(long, default_value_t = 64, value_parser = value_parser!(u16).range(1..=60_000))]
    inflight: u16,
    /// Give up after this many seconds without progress.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Topic to publish to (default: a unique one).
    #[arg(long)]
    topic: Option<String>,
    /// The subscriber keeps a persistent session (clean session 0 / session expiry 600 s).
    #[arg(long)]
    persistent: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let Scenario::Pubsub(a) = args.scenario;
    let opts = PubSubOptions {
        host: a.host,
        port: a.port,
        count: a.count,
        size: a.size,
        qos: QoS::from_u8(a.qos)?,
        protocol: match a.protocol {
            3 => Protocol::V3_1,
            4 => Protocol::V3_1_1,
            _ => Protocol::V5,
        },
        inflight: a.inflight,
        timeout: Duration::try_from_secs_f64(a.timeout).context("invalid --timeout")?,
        topic: a.topic,
        persistent: a.persistent,
    };
    // One thread: publisher and subscriber are two futures on it, so the load generator uses one
    // core (pin it with taskset to keep it off the broker's).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(run_pubsub(&opts))?;
    // Written rather than printed: a closed stdout is an error here, not a panic.
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    Ok(())
}
