//! The `ferry` binary: `ferry serve` runs the broker.

mod config;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A self-hosted message queue for MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(short, long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT/TCP listen address (overrides mqtt.listen).
    #[arg(long, env = "FERRY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, env = "FERRY_LOG")]
    log_level: Option<String>,
    /// Largest packet accepted, in bytes (overrides mqtt.max_packet_size).
    #[arg(long)]
    max_packet_size: Option<u32>,
    /// Most concurrent connections (overrides mqtt.max_connections).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Keep-alive ceiling in seconds, 0 for none (overrides mqtt.max_keep_alive).
    #[arg(long)]
    max_keep_alive: Option<u16>,
    /// QoS 1/2 messages in flight per client (overrides mqtt.max_inflight).
    #[arg(long)]
    max_inflight: Option<u16>,
    /// Messages queued per session (overrides mqtt.max_queued_messages).
    #[arg(long)]
    max_queued_messages: Option<usize>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut file = match &args.config {
        Some(path) => config::File::load(path)?,
        None => config::File::default(),
    };
    if let Some(v) = args.listen {
        file.mqtt.listen = v;
    }
    if let Some(v) = args.max_packet_size {
        file.mqtt.max_packet_size = v;
    }
    if let Some(v) = args.max_connections {
        file.mqtt.max_connections = v;
    }
    if let Some(v) = args.max_keep_alive {
        file.mqtt.max_keep_alive = v;
    }
    if let Some(v) = args.max_inflight {
        file.mqtt.max_inflight = v;
    }
    if let Some(v) = args.max_queued_messages {
        file.mqtt.max_queued_messages = v;
    }
    let level = args
        .log_level
        .clone()
        .or_else(|| file.log_level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .with_context(|| format!("invalid log level {level:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime_config = file.to_runtime()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listen = runtime_config.listen;
        let server = ferry_broker::Server::start(runtime_config)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        // One machine-readable line on stdout, so scripts and tests can find the port.
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "ferry: mqtt listening on {}", server.local_addr())?;
            out.flush()?;
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
