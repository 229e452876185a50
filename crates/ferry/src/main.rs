//! The `ferry` binary: `ferry serve` runs the broker; `ferry bench` runs a load generator
//! against one.

mod bench;
mod config;
mod ctl;
mod datadir;

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
    /// Measure a running broker (Ferry or another) with a built-in load generator.
    Bench(bench::BenchArgs),
    /// Manage a running Ferry (instances, topics, groups, keys, tokens, clients) over its API.
    Ctl(ctl::CtlArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(short, long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT/TCP listen address (overrides mqtt.listen).
    #[arg(long, env = "FERRY_LISTEN")]
    listen: Option<SocketAddr>,
    /// MQTT/TLS listen address (overrides mqtt.tls_listen; the certificate is mqtt.tls_cert
    /// and mqtt.tls_key, else a self-signed one).
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket listen address (overrides mqtt.ws_listen; path mqtt.ws_path).
    #[arg(long)]
    ws_listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS listen address (overrides mqtt.wss_listen).
    #[arg(long)]
    wss_listen: Option<SocketAddr>,
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
    /// Data directory (overrides data_dir; default ./ferry-data).
    #[arg(long, env = "FERRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// REST / cloud RPC API listen address (overrides api.listen).
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// RocketMQ 5 gRPC queue listen address (overrides queue.listen).
    #[arg(long)]
    queue_listen: Option<SocketAddr>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench::run(args),
        Command::Ctl(args) => ctl::run(args),
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
    if let Some(v) = args.tls_listen {
        file.mqtt.tls_listen = Some(v);
    }
    if let Some(v) = args.ws_listen {
        file.mqtt.ws_listen = Some(v);
    }
    if let Some(v) = args.wss_listen {
        file.mqtt.wss_listen = Some(v);
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
    if let Some(v) = args.data_dir {
        file.data_dir = Some(v);
    }
    if let Some(v) = args.api_listen {
        file.api.listen = v;
    }
    if let Some(v) = args.queue_listen {
        file.queue.listen = v;
    }
    let queue_config = file.queue.to_config()?;
    let runtime_config = file.to_runtime()?;
    let data_dir = file
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(datadir::DEFAULT_DIR));
    datadir::ensure(&data_dir)?;
    let durability = file.durability()?;
    let store_dir = data_dir.join("store");
    let engine: std::sync::Arc<dyn ferry_store::Engine> = std::sync::Arc::new(
        ferry_store::FjallEngine::open(&store_dir)
            .with_context(|| format!("cannot open the store in {}", store_dir.display()))?,
    );
    let meta = std::sync::Arc::new(
        ferry_meta::Meta::with_store(std::sync::Arc::new(ferry_broker::persist::MetaDocuments {
            engine: engine.clone(),
        }))
        .map_err(|e| anyhow::anyhow!("cannot load the metadata: {e}"))?,
    );
    let now = ferry_meta::now_ms();
    if meta.instance(&runtime_config.default_instance).is_err() {
        meta.create_instance(
            &runtime_config.default_instance,
            "default",
            ferry_meta::Profile::Standard,
            None,
            now,
        )
        .map_err(|e| anyhow::anyhow!("default instance: {e}"))?;
    }
    for inst in &file.instances {
        if meta.instance(&inst.id).is_err() {
            meta.create_instance(&inst.id, &inst.name, inst.profile, None, now)
                .map_err(|e| anyhow::anyhow!("instances: {e}"))?;
        }
    }
    let new_key = datadir::admin_key(&data_dir, &meta)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // With the LIFO slot, of two connection tasks woken by the same poll the later one runs
    // first, so a PUBLISH can overtake a SUBSCRIBE that reached the server before it. FIFO
    // keeps arrival order across clients. (Needs `--cfg tokio_unstable`, set in
    // .cargo/config.toml; without it the default scheduling is used.)
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    // Tasks a worker runs between checks for new socket events (tokio's default is 61). With
    // thousands of connections ready at once, checking less often lets each worker finish
    // more of what is ready first. 61 -> 256 (`ferry bench scenario`, 3 runs each, same
    // binary): p2p 100 pairs QoS 1 0.75M -> 0.79-0.87M msg/s with p99 85 -> 15 ms. 256 ->
    // 2048: a message to 1,000 subscribers wakes 1,000 connection tasks, and a check in the
    // middle of them queued the PUBACKs of the first subscribers ahead of the deliveries
    // to the rest (seen in syscall traces: ~640 of the 1,000 PUBACK reads came before the
    // last delivery; with 2048, 2). Fixed-rate fan-out p99 (20 msg/s, 6 runs each) 15.3 ->
    // 13.9 ms; saturated throughput unchanged or higher in 10 of 12 `bench/compare`
    // scenarios. `FERRY_EVENT_INTERVAL` overrides it.
    let event_interval = std::env::var("FERRY_EVENT_INTERVAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    builder.event_interval(event_interval);
    let runtime = builder.build().context("cannot start the async runtime")?;
    let default_instance = runtime_config.default_instance.clone();
    runtime.block_on(async move {
        let listen = runtime_config.listen;
        let writer =
            std::sync::Arc::new(ferry_store::Writer::start(engine.clone(), durability, 64));
        // The embedded queue shares the broker's store and group-commit writer. `queue` is the
        // handle other parts of `serve` (the rules) use.
        let queue = ferry_queue::Queue::open(
            Some(ferry_queue::QueueStore {
                engine: engine.clone(),
                writer: writer.clone(),
            }),
            queue_config,
        )
        .map_err(|e| anyhow::anyhow!("cannot open the queue: {e}"))?;
        let persistence = std::sync::Arc::new(ferry_broker::persist::Persistence {
            writer,
            engine,
            sync: durability == ferry_store::Durability::Sync,
            clock: ferry_broker::persist::Clock::now(),
        });
        // The rules see the broker's status events and outflow publishes from the start; their
        // inflow consumers run once the broker is up.
        let rules = ferry_rules::Rules::new(meta.clone(), queue.clone());
        let hooks: std::sync::Arc<dyn ferry_broker::Hooks> = rules.clone();
        let server = ferry_broker::Server::start_with_hooks(
            runtime_config,
            meta.clone(),
            Some(persistence),
            Some(hooks),
        )
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
        rules.start(server.control()).await;
        let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
        let mut api_task = None;
        let mut api_url = None;
        if file.api.enabled {
            let listener = tokio::net::TcpListener::bind(file.api.listen)
                .await
                .with_context(|| format!("cannot listen on {} (api.listen)", file.api.listen))?;
            let url = format!("http://{}", listener.local_addr()?);
            datadir::write_endpoint(&data_dir, &url)?;
            let rules = rules.clone();
            let state = ferry_admin::AdminState {
                meta: meta.clone(),
                control: server.control(),
                rules_changed: Some(std::sync::Arc::new(move |instance: String| {
                    let rules = rules.clone();
                    Box::pin(async move { rules.reload(Some(&instance)).await })
                })),
            };
            api_task = Some(tokio::spawn(ferry_admin::serve(listener, state, async {
                let _ = api_stopped.await;
            })));
            api_url = Some(url);
        }
        let mut queue_server = None;
        if file.queue.enabled {
            let qs = ferry_queue::QueueServer::start(
                queue.clone(),
                meta.clone(),
                ferry_queue::ServerConfig {
                    listen: file.queue.listen,
                    allow_anonymous: file.queue.allow_anonymous,
                    default_namespace: default_instance.clone(),
                    tls: file.queue.tls(),
                },
            )
            .await
            .with_context(|| format!("cannot listen on {} (queue.listen)", file.queue.listen))?;
            queue_server = Some(qs);
        }
        // Machine-readable lines on stdout, so scripts and tests can find the ports.
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "ferry: mqtt listening on {}", server.local_addr())?;
            for (name, addr) in [
                ("mqtt-tls", server.tls_addr()),
                ("mqtt-ws", server.ws_addr()),
                ("mqtt-wss", server.wss_addr()),
            ] {
                if let Some(addr) = addr {
                    writeln!(out, "ferry: {name} listening on {addr}")?;
                }
            }
            if let Some(url) = &api_url {
                writeln!(out, "ferry: api listening on {url}")?;
            }
            if let Some(qs) = &queue_server {
                writeln!(out, "ferry: queue listening on {}", qs.local_addr())?;
            }
            if let Some((key, path)) = &new_key {
                writeln!(
                    out,
                    "ferry: admin key created (shown once, saved in {}): id {} secret {}",
                    path.display(),
                    key.access_key_id,
                    key.secret
                )?;
            }
            out.flush()?;
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop_api.send(());
        if let Some(task) = api_task {
            let _ = task.await;
        }
        if let Some(qs) = queue_server {
            qs.shutdown().await;
        }
        drop(queue);
        rules.stop();
        server.shutdown().await;
        // The connections just closed reported their `tcpclean`: append them before the queue
        // and the store stop.
        if !rules.drain_status(std::time::Duration::from_secs(5)).await {
            tracing::warn!("status events still unwritten at shutdown");
        }
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
