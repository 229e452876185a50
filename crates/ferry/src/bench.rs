//! `ferry bench`: load generators run against a broker (see the `ferry-bench` crate).
//!
//! `conn`, `pub`, `sub` and `scenario` run many clients in one process; `pubsub` is the first
//! single-pair scenario. Each prints a summary (or `--json`), and exits non-zero when a
//! connection failed or broke (the summary says which kinds), after printing it.

use anyhow::{bail, ensure, Context, Result};
use clap::{value_parser, Subcommand, ValueEnum};
use ferry_bench::{
    run_pubsub, Auth, Common, Plan, PubSpec, PubSubOptions, Report, SubSpec, Target, TlsOptions,
    Transport,
};
use ferry_codec::{Protocol, QoS};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,
}

// Boxed: the arguments are large, and `ferry`'s command enum holds them.
#[derive(Subcommand)]
enum Mode {
    /// Open connections (at --connect-rate) and hold them with keep-alive pings: connection
    /// rate, connections held, failures by kind.
    Conn(Box<ConnArgs>),
    /// Publish from many clients (topic pattern with %i, count / duration / rate).
    Pub(Box<PubArgs>),
    /// Subscribe from many clients and measure what arrives (latency from the payload's
    /// timestamp, also across processes).
    Sub(Box<SubArgs>),
    /// Publishers and subscribers in one process, with loss accounting: point-to-point pairs,
    /// fan-out, fan-in, fan-in to a shared-subscription group.
    Scenario(Box<ScenarioArgs>),
    /// One publisher → one subscriber on one topic: throughput, loss and latency.
    Pubsub(Box<PubSubArgs>),
}

#[derive(clap::Args, Clone)]
struct CommonArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    /// Transport: tcp, tls, ws (WebSocket) or wss (WebSocket over TLS).
    #[arg(long, default_value = "tcp", value_parser = Transport::parse)]
    transport: Transport,
    /// WebSocket path (ws, wss).
    #[arg(long, default_value = "/mqtt")]
    ws_path: String,
    /// PEM file with the CA certificate(s) to trust (tls, wss).
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// Accept any server certificate (tls, wss).
    #[arg(long)]
    insecure: bool,
    /// Name to check the server certificate against (default: --host).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// MQTT protocol level: 3 (3.1), 4 (3.1.1) or 5.
    #[arg(short = 'V', long, default_value_t = 4, value_parser = value_parser!(u8).range(3..=5))]
    protocol: u8,
    /// Client id pattern; %i is the client's number (default: fb-<run id>-%i).
    #[arg(long)]
    client_id: Option<String>,
    /// First client number.
    #[arg(long, default_value_t = 0)]
    start_index: u64,
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Password (with --username).
    #[arg(short = 'P', long)]
    password: Option<String>,
    /// Signature mode: the AccessKey id (with --access-key-secret and --instance-id). User name
    /// Signature|<AccessKeyId>|<InstanceId>, password Base64(HMAC-SHA1(secret, client id)).
    #[arg(long)]
    access_key_id: Option<String>,
    /// Signature mode: the AccessKey secret.
    #[arg(long, env = "FERRY_BENCH_ACCESS_KEY_SECRET")]
    access_key_secret: Option<String>,
    /// Signature mode: the instance id.
    #[arg(long)]
    instance_id: Option<String>,
    /// Keep-alive in seconds (clients PINGREQ within it); 0 = none.
    #[arg(short, long, default_value_t = 60)]
    keep_alive: u16,
    /// Persistent sessions with this expiry in seconds (MQTT 3: clean session 0).
    #[arg(long)]
    session_expiry: Option<u32>,
    /// Local addresses to connect from, in turn (e.g. 127.0.0.1,127.0.0.2: past the
    /// ephemeral-port limit of one address).
    #[arg(long, value_delimiter = ',')]
    bind: Vec<IpAddr>,
    /// New connections per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 256, value_parser = value_parser!(u64).range(1..=100_000))]
    connect_concurrency: u64,
    /// Seconds: bound on a connect or SUBACK, and on a run without progress.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Worker threads (1: one thread, to pin with taskset).
    #[arg(long, default_value_t = 1, value_parser = value_parser!(u64).range(1..=256))]
    threads: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ConnArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Connections to open.
    #[arg(short, long, default_value_t = 1000)]
    clients: u64,
    /// Seconds to hold them once all are up.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
}

#[derive(clap::Args)]
struct PubOpts {
    /// QoS of the publishes.
    #[arg(short, long, default_value_t = 0, value_parser = value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload size in bytes (at least 8: the send timestamp).
    #[arg(short, long, default_value_t = 64)]
    size: usize,
    /// Messages per publisher.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Seconds of publishing (default 10 when there is no --count).
    #[arg(short, long)]
    duration: Option<f64>,
    /// Messages per second per publisher.
    #[arg(long, conflicts_with = "total_rate")]
    rate: Option<f64>,
    /// Messages per second over all publishers.
    #[arg(long)]
    total_rate: Option<f64>,
    /// Unacknowledged QoS 1/2 messages per publisher.
    #[arg(long, default_value_t = 64, value_parser = value_parser!(u16).range(1..=60_000))]
    inflight: u16,
    /// Publish with the retain flag.
    #[arg(long)]
    retain: bool,
}

#[derive(clap::Args)]
struct PubArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Publishers.
    #[arg(short, long, default_value_t = 1)]
    clients: u64,
    /// Topic pattern; %i is the publisher's number.
    #[arg(short, long, default_value = "ferry-bench/%i")]
    topic: String,
    #[command(flatten)]
    publish: PubOpts,
}

#[derive(clap::Args)]
struct SubArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Subscribers.
    #[arg(short, long, default_value_t = 1)]
    clients: u64,
    /// Topic filter pattern; %i is the subscriber's number.
    #[arg(short, long, default_value = "ferry-bench/%i")]
    topic: String,
    /// QoS of the subscriptions.
    #[arg(short, long, default_value_t = 0, value_parser = value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Subscribe in this shared-subscription group ($share/<group>/<filter>).
    #[arg(long)]
    group: Option<String>,
    /// Seconds to receive once all are subscribed.
    #[arg(short, long, default_value_t = 60.0)]
    duration: f64,
    /// Stop once this many messages arrived in all.
    #[arg(short = 'n', long)]
    count: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// N publishers → N subscribers, each pair on its own topic.
    P2p,
    /// Publishers → every one of N subscribers on one topic.
    FanOut,
    /// N publishers on their own topics → subscribers of a wildcard (each gets everything).
    FanIn,
    /// N publishers → one shared-subscription group of M subscribers (each message to one).
    Shared,
}

#[derive(clap::Args)]
struct ScenarioArgs {
    /// The scenario.
    #[arg(value_enum)]
    kind: Kind,
    #[command(flatten)]
    common: CommonArgs,
    /// Publishers (default: p2p 100, fan-out 1, fan-in and shared 1000).
    #[arg(long)]
    publishers: Option<u64>,
    /// Subscribers (default: p2p 100, fan-out 1000, fan-in 1, shared 10).
    #[arg(long)]
    subscribers: Option<u64>,
    /// p2p: pairs (sets both --publishers and --subscribers).
    #[arg(long, conflicts_with_all = ["publishers", "subscribers"])]
    pairs: Option<u64>,
    /// Shared-subscription group name.
    #[arg(long, default_value = "ferry-bench")]
    group: String,
    /// Topic prefix (default: ferry-bench/<run id>).
    #[arg(long)]
    topic_prefix: Option<String>,
    #[command(flatten)]
    publish: PubOpts,
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
    match args.mode {
        Mode::Pubsub(a) => pubsub(*a),
        Mode::Conn(a) => {
            let hold = secs(a.duration, "--duration")?;
            let plan = Plan {
                name: "conn".into(),
                common: common(&a.common, a.clients)?,
                subs: None,
                pubs: None,
                idle: a.clients,
                copies: None,
                hold: Some(hold),
                stop_after: None,
            };
            execute(plan, &a.common)
        }
        Mode::Pub(a) => {
            let plan = Plan {
                name: "pub".into(),
                common: common(&a.common, a.clients)?,
                subs: None,
                pubs: Some(pub_spec(&a.publish, a.clients, a.topic)?),
                idle: 0,
                copies: None,
                hold: None,
                stop_after: None,
            };
            execute(plan, &a.common)
        }
        Mode::Sub(a) => {
            let plan = Plan {
                name: "sub".into(),
                common: common(&a.common, a.clients)?,
                subs: Some(SubSpec {
                    clients: a.clients,
                    filter: a.topic,
                    qos: qos(a.qos)?,
                    group: a.group,
                }),
                pubs: None,
                idle: 0,
                copies: None,
                hold: Some(secs(a.duration, "--duration")?),
                stop_after: a.count,
            };
            execute(plan, &a.common)
        }
        Mode::Scenario(a) => {
            let (pubs_default, subs_default) = match a.kind {
                Kind::P2p => (100, 100),
                Kind::FanOut => (1, 1000),
                Kind::FanIn => (1000, 1),
                Kind::Shared => (1000, 10),
            };
            let (publishers, subscribers) = match a.pairs {
                Some(_) if a.kind != Kind::P2p => bail!("--pairs is for the p2p scenario"),
                Some(n) => (n, n),
                None => (
                    a.publishers.unwrap_or(pubs_default),
                    a.subscribers.unwrap_or(subs_default),
                ),
            };
            ensure!(
                publishers > 0 && subscribers > 0,
                "a scenario needs at least one publisher and one subscriber"
            );
            ensure!(
                a.kind != Kind::P2p || publishers == subscribers,
                "p2p needs as many publishers as subscribers"
            );
            let prefix = a
                .topic_prefix
                .clone()
                .unwrap_or_else(|| format!("ferry-bench/{}", run_id()));
            let sub_qos = qos(a.publish.qos)?;
            let (name, topic, filter, group, copies) = match a.kind {
                Kind::P2p => (
                    "p2p",
                    format!("{prefix}/p2p/%i"),
                    format!("{prefix}/p2p/%i"),
                    None,
                    1,
                ),
                Kind::FanOut => (
                    "fan-out",
                    format!("{prefix}/fanout"),
                    format!("{prefix}/fanout"),
                    None,
                    subscribers,
                ),
                Kind::FanIn => (
                    "fan-in",
                    format!("{prefix}/fanin/%i"),
                    format!("{prefix}/fanin/+"),
                    None,
                    subscribers,
                ),
                Kind::Shared => (
                    "shared",
                    format!("{prefix}/fanin/%i"),
                    format!("{prefix}/fanin/+"),
                    Some(a.group.clone()),
                    1,
                ),
            };
            let plan = Plan {
                name: name.into(),
                common: common(&a.common, publishers + subscribers)?,
                subs: Some(SubSpec {
                    clients: subscribers,
                    filter,
                    qos: sub_qos,
                    group,
                }),
                pubs: Some(pub_spec(&a.publish, publishers, topic)?),
                idle: 0,
                copies: Some(copies),
                hold: None,
                stop_after: None,
            };
            execute(plan, &a.common)
        }
    }
}

fn qos(q: u8) -> Result<QoS> {
    Ok(QoS::from_u8(q)?)
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid {what}: {s}"))
}

fn protocol(level: u8) -> Protocol {
    match level {
        3 => Protocol::V3_1,
        4 => Protocol::V3_1_1,
        _ => Protocol::V5,
    }
}

/// A short id unique to this run: process id and wall-clock time.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64 ^ (d.as_secs() << 30));
    format!(
        "{:x}",
        ((u64::from(std::process::id()) << 40) ^ nanos) & 0xffff_ffff_ffff
    )
}

fn common(a: &CommonArgs, clients: u64) -> Result<Common> {
    let target = Target::new(
        &a.host,
        a.port,
        a.transport,
        &a.ws_path,
        &TlsOptions {
            ca_file: a.cafile.clone(),
            insecure: a.insecure,
            server_name: a.tls_server_name.clone(),
        },
    )?;
    let auth = match (&a.access_key_id, &a.access_key_secret, &a.instance_id) {
        (None, None, None) => match (&a.username, &a.password) {
            (Some(username), password) => Auth::Password {
                username: username.clone(),
                password: password.clone(),
            },
            (None, Some(_)) => bail!("--password needs --username"),
            (None, None) => Auth::Anonymous,
        },
        (Some(id), Some(secret), Some(instance)) => {
            ensure!(
                a.username.is_none() && a.password.is_none(),
                "Signature mode (--access-key-id) makes the user name and password itself: \
                 leave out --username and --password"
            );
            Auth::Signature {
                access_key_id: id.clone(),
                access_key_secret: secret.clone(),
                instance_id: instance.clone(),
            }
        }
        _ => bail!(
            "Signature mode needs all of --access-key-id, --access-key-secret and --instance-id"
        ),
    };
    let client_id = match &a.client_id {
        Some(pattern) => pattern.clone(),
        None => format!("fb-{}-%i", run_id()),
    };
    ensure!(
        client_id.contains("%i") || clients <= 1,
        "--client-id {client_id:?} has no %i: {clients} clients would share one id"
    );
    Ok(Common {
        target,
        protocol: protocol(a.protocol),
        client_id,
        auth,
        keep_alive: a.keep_alive,
        session_expiry: a.session_expiry,
        bind: a.bind.clone(),
        connect_rate: a.connect_rate,
        connect_concurrency: a.connect_concurrency as usize,
        timeout: secs(a.timeout, "--timeout")?,
        progress: !a.quiet && !a.json,
        start_index: a.start_index,
    })
}

fn pub_spec(p: &PubOpts, clients: u64, topic: String) -> Result<PubSpec> {
    let duration = match (p.count, p.duration) {
        (None, None) => Some(Duration::from_secs(10)),
        (_, Some(d)) => Some(secs(d, "--duration")?),
        (Some(_), None) => None,
    };
    let rate = match (p.rate, p.total_rate) {
        (Some(r), _) => Some(r),
        (None, Some(total)) => Some(total / clients.max(1) as f64),
        (None, None) => None,
    };
    Ok(PubSpec {
        clients,
        topic,
        qos: qos(p.qos)?,
        size: p.size,
        count: p.count,
        duration,
        rate,
        inflight: p.inflight,
        retain: p.retain,
    })
}

fn execute(plan: Plan, a: &CommonArgs) -> Result<()> {
    let report = runtime(a.threads)?.block_on(ferry_bench::run(plan))?;
    print(&report, a.json)?;
    if !report.is_clean() {
        let kinds: Vec<&str> = report.errors.keys().map(String::as_str).collect();
        bail!("the run had errors: {}", kinds.join(", "));
    }
    Ok(())
}

fn runtime(threads: u64) -> Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads as usize);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print(report: &Report, json: bool) -> Result<()> {
    // Written rather than printed: a closed stdout is an error here, not a panic.
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(report)?)?;
    } else {
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    Ok(())
}

fn pubsub(a: PubSubArgs) -> Result<()> {
    let opts = PubSubOptions {
        host: a.host,
        port: a.port,
        count: a.count,
        size: a.size,
        qos: qos(a.qos)?,
        protocol: protocol(a.protocol),
        inflight: a.inflight,
        timeout: secs(a.timeout, "--timeout")?,
        topic: a.topic,
        persistent: a.persistent,
    };
    // One thread: publisher and subscriber are two futures on it, so the load generator uses one
    // core (pin it with taskset to keep it off the broker's).
    let report = runtime(1)?.block_on(run_pubsub(&opts))?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    Ok(())
}
