//! The load engine behind `ferry bench conn | pub | sub | scenario`: many clients in one
//! process, one task each, sharing counters.
//!
//! A run goes: subscribers connect (at the ramp rate) and subscribe; idle connections open;
//! publishers connect, then all start at once and publish (by count, duration and rate); then
//! the run drains (waits until every expected copy arrived, or nothing arrived for 2 s) or
//! holds (for `conn` and `sub`), and stops every client. Each phase is bounded, so a run always ends on its own.
//!
//! The first 8 bytes of every payload are the send time (nanoseconds since the Unix epoch,
//! big-endian), so subscribers measure end-to-end latency even in another process.

use crate::client::{Client, ConnectOptions, Step, WRITE_BATCH};
use crate::error::Failure;
use crate::report::{ConnStats, Latency, MsgStats, Report};
use crate::transport::Target;
use anyhow::{ensure, Result};
use bytes::Bytes;
use ferry_codec::{Packet, Protocol, PubAck, Publish, QoS, SubOptions, Subscribe};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// The bytes of the payload that carry the send timestamp.
pub const STAMP: usize = 8;
/// Latencies a subscriber gathers before adding them to the shared histogram.
const LATENCY_BATCH: usize = 1024;

/// How clients log in.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    /// A user name, and a password if given.
    Password {
        username: String,
        password: Option<String>,
    },
    /// The cloud's Signature mode: user name `Signature|<AccessKeyId>|<InstanceId>`, password
    /// Base64(HMAC-SHA1(AccessKey secret, client id)).
    Signature {
        access_key_id: String,
        access_key_secret: String,
        instance_id: String,
    },
}

/// What every client of a run shares.
#[derive(Clone)]
pub struct Common {
    pub target: Target,
    pub protocol: Protocol,
    /// Client id pattern; `%i` is the client's number (subscribers first, then idle clients,
    /// then publishers, from `start_index`).
    pub client_id: String,
    pub auth: Auth,
    /// Keep-alive in seconds (0: none); clients PINGREQ within it.
    pub keep_alive: u16,
    /// Persistent sessions with this expiry (MQTT 3: clean session 0).
    pub session_expiry: Option<u32>,
    /// Local addresses to connect from, in turn.
    pub bind: Vec<IpAddr>,
    /// New connections per second (0: as fast as possible).
    pub connect_rate: f64,
    /// Connections being set up at once.
    pub connect_concurrency: usize,
    /// Bound on a connect, a SUBACK, and on a run without progress.
    pub timeout: Duration,
    /// Show a live progress line on stderr (when it is a terminal).
    pub progress: bool,
    pub start_index: u64,
}

#[derive(Clone, Debug)]
pub struct PubSpec {
    pub clients: u64,
    /// Topic pattern; `%i` is the publisher's number (from 0).
    pub topic: String,
    pub qos: QoS,
    /// Payload size in bytes, at least [`STAMP`].
    pub size: usize,
    /// Messages per publisher.
    pub count: Option<u64>,
    /// Publishing time per publisher.
    pub duration: Option<Duration>,
    /// Messages per second per publisher.
    pub rate: Option<f64>,
    /// Unacknowledged QoS 1/2 messages per publisher.
    pub inflight: u16,
    pub retain: bool,
}

#[derive(Clone, Debug)]
pub struct SubSpec {
    pub clients: u64,
    /// Topic filter pattern; `%i` is the subscriber's number (from 0).
    pub filter: String,
    pub qos: QoS,
    /// Subscribe as `$share/<group>/<filter>`.
    pub group: Option<String>,
}

/// One run.
#[derive(Clone)]
pub struct Plan {
    pub name: String,
    pub common: Common,
    pub subs: Option<SubSpec>,
    pub pubs: Option<PubSpec>,
    /// Connections that only connect and keep alive.
    pub idle: u64,
    /// Copies the subscribers get of each published message (point-to-point 1, fan-out N),
    /// when known: the run then drains until all arrived and reports losses.
    pub copies: Option<u64>,
    /// How long connections are held once all are up (`conn`, `sub`).
    pub hold: Option<Duration>,
    /// `sub`: stop once this many messages arrived in all.
    pub stop_after: Option<u64>,
}

impl Plan {
    fn validate(&self) -> Result<()> {
        let c = &self.common;
        ensure!(
            c.connect_concurrency > 0,
            "connect concurrency must be at least 1"
        );
        ensure!(
            c.connect_rate >= 0.0 && c.connect_rate.is_finite(),
            "the connect rate must be a positive number"
        );
        ensure!(!c.timeout.is_zero(), "the timeout must be above 0");
        ensure!(
            c.client_id.contains("%i") || self.clients() <= 1,
            "the client id pattern {:?} has no %i: {} clients would share one id",
            c.client_id,
            self.clients()
        );
        if let Some(p) = &self.pubs {
            ensure!(
                p.size >= STAMP,
                "payload size must be at least {STAMP} bytes (the send timestamp)"
            );
            ensure!(p.inflight > 0, "inflight must be at least 1");
            ensure!(p.count != Some(0), "count must be at least 1");
            ensure!(
                p.count.is_some() || p.duration.is_some(),
                "publishers need a count or a duration"
            );
            if let Some(rate) = p.rate {
                ensure!(
                    rate > 0.0 && rate.is_finite(),
                    "the message rate must be above 0"
                );
            }
            ensure!(!p.topic.is_empty(), "the topic must not be empty");
        }
        if let Some(s) = &self.subs {
            ensure!(!s.filter.is_empty(), "the topic filter must not be empty");
        }
        ensure!(self.clients() > 0, "nothing to run: no clients");
        Ok(())
    }

    fn clients(&self) -> u64 {
        self.subs.as_ref().map_or(0, |s| s.clients)
            + self.pubs.as_ref().map_or(0, |p| p.clients)
            + self.idle
    }

    fn connect_options(&self, number: u64) -> ConnectOptions {
        let c = &self.common;
        let client_id = expand(&c.client_id, c.start_index + number);
        let (username, password) = match &c.auth {
            Auth::Anonymous => (None, None),
            Auth::Password { username, password } => (
                Some(username.clone()),
                password.as_ref().map(|p| p.as_bytes().to_vec()),
            ),
            Auth::Signature {
                access_key_id,
                access_key_secret,
                instance_id,
            } => (
                Some(format!("Signature|{access_key_id}|{instance_id}")),
                Some(
                    ferry_meta::auth::hmac_sha1_base64(access_key_secret, &client_id).into_bytes(),
                ),
            ),
        };
        ConnectOptions {
            protocol: c.protocol,
            client_id,
            username,
            password,
            keep_alive: c.keep_alive,
            session_expiry: c.session_expiry,
            bind: (!c.bind.is_empty()).then(|| c.bind[(number as usize) % c.bind.len()]),
        }
    }
}

/// Replaces `%i` with `n`.
pub fn expand(pattern: &str, n: u64) -> String {
    if pattern.contains("%i") {
        pattern.replace("%i", &n.to_string())
    } else {
        pattern.to_string()
    }
}

/// Nanoseconds since the Unix epoch, read through a monotonic clock.
struct Clock {
    start: Instant,
    epoch_ns: u64,
}

impl Clock {
    fn new() -> Clock {
        let epoch_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Clock {
            start: Instant::now(),
            epoch_ns,
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch_ns + self.start.elapsed().as_nanos() as u64
    }
}

/// Counters every client task updates.
struct Shared {
    clock: Clock,
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    up: AtomicU64,
    dropped: AtomicU64,
    /// Clients of the current phase that connected (and subscribed) or failed.
    settled: AtomicU64,
    subscribed: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    first_attempt: AtomicU64,
    last_connack: AtomicU64,
    first_send: AtomicU64,
    last_send: AtomicU64,
    last_receive: AtomicU64,
    /// Per kind: count and the first detail seen.
    errors: Mutex<BTreeMap<&'static str, (u64, String)>>,
    latency: Mutex<Histogram<u64>>,
}

impl Shared {
    fn new() -> Result<Shared> {
        Ok(Shared {
            clock: Clock::new(),
            attempted: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            up: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            first_attempt: AtomicU64::new(u64::MAX),
            last_connack: AtomicU64::new(0),
            first_send: AtomicU64::new(u64::MAX),
            last_send: AtomicU64::new(0),
            last_receive: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            // 1 ns to 1 hour, 3 significant digits.
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000_000, 3)?),
        })
    }

    fn error(&self, failure: Failure) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let entry = errors.entry(failure.kind).or_insert((0, failure.detail));
        entry.0 += 1;
    }

    fn record_latencies(&self, batch: &mut Vec<u64>) {
        let mut hist = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for &ns in batch.iter() {
            hist.saturating_record(ns.max(1));
        }
        batch.clear();
    }
}

/// Runs `plan` to its end. Errors only for invalid plans; what goes wrong with connections is
/// counted in the report's `errors`.
pub async fn run(plan: Plan) -> Result<Report> {
    plan.validate()?;
    let plan = Arc::new(plan);
    let shared = Arc::new(Shared::new()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = plan.common.progress.then(|| spawn_progress(&plan, &shared));
    let started = Instant::now();
    let mut handles = Vec::new();
    let mut number = 0u64;

    // Subscribers first, all subscribed (or failed) before anything is published.
    if let Some(subs) = &plan.subs {
        let n = subs.clients;
        let (first, p) = (number, plan.clone());
        let (sh, stop) = (shared.clone(), stop_rx.clone());
        handles.extend(
            launch(&plan, &shared, n, move |i, permit| {
                subscriber(sh.clone(), p.clone(), i, first + i, permit, stop.clone())
            })
            .await,
        );
        settle(&shared, n).await;
        number += n;
    }
    if plan.idle > 0 {
        let n = plan.idle;
        let (first, p) = (number, plan.clone());
        let (sh, stop) = (shared.clone(), stop_rx.clone());
        handles.extend(
            launch(&plan, &shared, n, move |i, permit| {
                idle(sh.clone(), p.clone(), first + i, permit, stop.clone())
            })
            .await,
        );
        settle(&shared, n).await;
        number += n;
    }
    let ramp_done_ns = shared.last_connack.load(Relaxed);

    if let Some(pubs) = &plan.pubs {
        let n = pubs.clients;
        let (first, p) = (number, plan.clone());
        let (sh, stop) = (shared.clone(), stop_rx.clone());
        // Publishers connect first and start together, so their ramp is not part of the
        // measured throughput.
        let (go_tx, go_rx) = watch::channel(false);
        let publishers = launch(&plan, &shared, n, move |i, permit| {
            let go = go_rx.clone();
            publisher(
                sh.clone(),
                p.clone(),
                i,
                first + i,
                permit,
                go,
                stop.clone(),
            )
        })
        .await;
        settle(&shared, n).await;
        let _ = go_tx.send(true);
        for handle in publishers {
            let _ = handle.await;
        }
        if plan.subs.is_some() {
            drain(&plan, &shared).await;
        }
    } else {
        hold(&plan, &shared).await;
    }

    let up_at_end = shared.up.load(Relaxed);
    let _ = stop_tx.send(true);
    // Every client answers the stop at once and its DISCONNECT is bounded (2 s).
    let joined = tokio::time::timeout(Duration::from_secs(10), async {
        for handle in &mut handles {
            let _ = handle.await;
        }
    })
    .await;
    if joined.is_err() {
        for handle in &handles {
            handle.abort();
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(report(&plan, &shared, up_at_end, ramp_done_ns, started))
}

/// Starts `n` client tasks at the plan's connect rate, with at most `connect_concurrency`
/// connecting at once (a task holds its permit until its CONNACK).
async fn launch<F, Fut>(plan: &Plan, shared: &Shared, n: u64, mut make: F) -> Vec<JoinHandle<()>>
where
    F: FnMut(u64, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    shared.settled.store(0, Relaxed);
    let permits = Arc::new(Semaphore::new(plan.common.connect_concurrency));
    let rate = plan.common.connect_rate;
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n as usize);
    for i in 0..n {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        handles.push(tokio::spawn(make(i, permit)));
    }
    handles
}

/// Waits until `n` clients of the phase settled. Bounded: each settles within its timeouts.
async fn settle(shared: &Shared, n: u64) {
    while shared.settled.load(Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After the publishers: waits until every expected copy arrived, or nothing arrived for the
/// timeout (at most 2 s: what a broker still holds after that it has dropped).
async fn drain(plan: &Plan, shared: &Shared) {
    let idle = plan.common.timeout.min(Duration::from_secs(2));
    let mut last = shared.received.load(Relaxed);
    let mut last_change = Instant::now();
    loop {
        let received = shared.received.load(Relaxed);
        if let Some(copies) = plan.copies {
            let expected = shared.sent.load(Relaxed).saturating_mul(copies);
            if received >= expected {
                return;
            }
        }
        if received != last {
            last = received;
            last_change = Instant::now();
        } else if last_change.elapsed() >= idle {
            return;
        }
        if shared.subscribed.load(Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `conn` / `sub`: holds the connections for the hold time, or until `stop_after` messages
/// arrived, or every connection is gone.
async fn hold(plan: &Plan, shared: &Shared) {
    let until = Instant::now() + plan.hold.unwrap_or(Duration::ZERO);
    while Instant::now() < until {
        if plan
            .stop_after
            .is_some_and(|n| shared.received.load(Relaxed) >= n)
        {
            return;
        }
        if shared.up.load(Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects client `number`; counts the outcome.
async fn open(
    shared: &Shared,
    plan: &Plan,
    number: u64,
    permit: OwnedSemaphorePermit,
) -> Option<Client> {
    shared.attempted.fetch_add(1, Relaxed);
    shared
        .first_attempt
        .fetch_min(shared.clock.now_ns(), Relaxed);
    let opts = plan.connect_options(number);
    let result = Client::connect(&plan.common.target, &opts, plan.common.timeout).await;
    drop(permit);
    match result {
        Ok(client) => {
            shared.connected.fetch_add(1, Relaxed);
            shared.up.fetch_add(1, Relaxed);
            shared
                .last_connack
                .fetch_max(shared.clock.now_ns(), Relaxed);
            Some(client)
        }
        Err(failure) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(failure);
            None
        }
    }
}

/// Ends a connection that was up: DISCONNECT when it ended well, counted as dropped otherwise.
async fn close(shared: &Shared, client: Client, result: Result<(), Failure>) {
    shared.up.fetch_sub(1, Relaxed);
    match result {
        Ok(()) => client.disconnect().await,
        Err(failure) => {
            shared.dropped.fetch_add(1, Relaxed);
            shared.error(failure);
        }
    }
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

async fn idle(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    number: u64,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let client = open(&shared, &plan, number, permit).await;
    shared.settled.fetch_add(1, Relaxed);
    let Some(mut client) = client else { return };
    let result = async {
        while !stopped(&stop) {
            tokio::select! {
                step = client.step(None) => {
                    step?;
                    while let Some(packet) = client.try_decode()? {
                        if let Packet::Disconnect(d) = packet {
                            return Err(Failure::new("disconnected by broker", d.code.to_string()));
                        }
                    }
                }
                _ = stop.changed() => {}
            }
        }
        Ok(())
    }
    .await;
    close(&shared, client, result).await;
}

async fn subscriber(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    index: u64,
    number: u64,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let Some(spec) = plan.subs.as_ref() else {
        return;
    };
    let Some(mut client) = open(&shared, &plan, number, permit).await else {
        shared.settled.fetch_add(1, Relaxed);
        return;
    };
    let filter = expand(&spec.filter, index);
    let filter = match &spec.group {
        Some(group) => format!("$share/{group}/{filter}"),
        None => filter,
    };
    let subscribed = tokio::time::timeout(
        plan.common.timeout,
        subscribe(&mut client, &filter, spec.qos),
    )
    .await
    .unwrap_or_else(|_| Err(Failure::new("subscribe timeout", "no SUBACK in time")));
    if subscribed.is_ok() {
        shared.subscribed.fetch_add(1, Relaxed);
    }
    shared.settled.fetch_add(1, Relaxed);
    let result = match subscribed {
        Ok(()) => receive(&shared, &mut client, &mut stop).await,
        Err(failure) => Err(failure),
    };
    close(&shared, client, result).await;
}

async fn subscribe(client: &mut Client, filter: &str, qos: QoS) -> Result<(), Failure> {
    client.push(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }))?;
    client.flush().await?;
    loop {
        match client.recv().await? {
            Packet::SubAck(ack) if ack.packet_id == 1 => {
                return match ack.codes.first() {
                    Some(code) if !code.is_error() => Ok(()),
                    Some(code) => Err(Failure::new(
                        "subscribe refused",
                        format!("{filter}: SUBACK {code}"),
                    )),
                    None => Err(Failure::new("protocol error", "empty SUBACK")),
                };
            }
            Packet::Disconnect(d) => {
                return Err(Failure::new("disconnected by broker", d.code.to_string()))
            }
            _ => {}
        }
    }
}

/// Receives (and acknowledges) publishes until the run stops.
async fn receive(
    shared: &Shared,
    client: &mut Client,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Failure> {
    let mut latencies = Vec::new();
    let result = async {
        while !stopped(stop) {
            let step = tokio::select! {
                step = client.step(None) => step?,
                _ = stop.changed() => continue,
            };
            if step != Step::Read {
                continue;
            }
            // One clock read per read: the messages in it arrived together.
            let now = shared.clock.now_ns();
            let mut n = 0;
            while let Some(packet) = client.try_decode()? {
                match packet {
                    Packet::Publish(p) => {
                        n += 1;
                        if let Some(stamp) = p.payload.get(..STAMP) {
                            let sent = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
                            if latencies.capacity() == 0 {
                                latencies.reserve_exact(LATENCY_BATCH);
                            }
                            latencies.push(now.saturating_sub(sent));
                            if latencies.len() >= LATENCY_BATCH {
                                shared.record_latencies(&mut latencies);
                            }
                        }
                        client.acknowledge(p.qos, p.packet_id)?;
                    }
                    Packet::PubRel(rel) => {
                        client.push(&Packet::PubComp(PubAck::new(rel.packet_id)))?
                    }
                    Packet::Disconnect(d) => {
                        return Err(Failure::new("disconnected by broker", d.code.to_string()))
                    }
                    _ => {}
                }
            }
            if n > 0 {
                shared.received.fetch_add(n, Relaxed);
                shared.last_receive.fetch_max(now, Relaxed);
            }
        }
        Ok(())
    }
    .await;
    shared.record_latencies(&mut latencies);
    result
}

async fn publisher(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    index: u64,
    number: u64,
    permit: OwnedSemaphorePermit,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(spec) = plan.pubs.as_ref() else {
        return;
    };
    let Some(mut client) = open(&shared, &plan, number, permit).await else {
        shared.settled.fetch_add(1, Relaxed);
        return;
    };
    shared.settled.fetch_add(1, Relaxed);
    // Bounded: the run says go once every publisher connected or failed.
    while !*go.borrow_and_update() {
        if go.changed().await.is_err() {
            break;
        }
    }
    let topic = expand(&spec.topic, index);
    let result = publish(
        &shared,
        &mut client,
        spec,
        phase(spec, index),
        plan.common.protocol,
        plan.common.timeout,
        topic,
        &mut stop,
    )
    .await;
    close(&shared, client, result).await;
}

/// When paced publisher `index` sends its first message, after the start: the publishers
/// spread evenly over one interval, so N publishers at r messages per second offer a steady
/// N·r per second, not bursts of N every 1/r seconds. Zero without a rate.
fn phase(spec: &PubSpec, index: u64) -> Duration {
    match spec.rate {
        Some(rate) if spec.clients > 1 => {
            Duration::from_secs_f64((index % spec.clients) as f64 / spec.clients as f64 / rate)
        }
        _ => Duration::ZERO,
    }
}

/// Publishes by count, duration and rate (the first message `phase` after the start, then one
/// every 1/rate on a fixed schedule: a late message does not shift the ones after it), keeping
/// the write buffer topped up to [`WRITE_BATCH`] bytes and, at QoS 1/2, at most `inflight`
/// messages unacknowledged; then waits for the last acknowledgements.
#[allow(clippy::too_many_arguments)]
async fn publish(
    shared: &Shared,
    client: &mut Client,
    spec: &PubSpec,
    phase: Duration,
    protocol: Protocol,
    timeout: Duration,
    topic: String,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Failure> {
    let acked = spec.qos != QoS::AtMostOnce;
    let window = if acked {
        u64::from(spec.inflight)
    } else {
        u64::MAX
    };
    let count = spec.count.unwrap_or(u64::MAX);
    let end = spec.duration.map(|d| Instant::now() + d);
    let interval = spec.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut due = Instant::now() + phase;
    // Every message is this packet with its own packet id; the timestamp is written into the
    // encoded bytes afterwards, so no payload is built per message.
    let mut packet = Packet::Publish(Publish {
        qos: spec.qos,
        retain: spec.retain,
        topic: topic.into(),
        payload: Bytes::from(vec![0u8; spec.size]),
        ..Default::default()
    });
    let mut ids = PacketIds::new(acked);
    let mut sent = 0u64;
    let mut done = false;
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        if !done && (sent >= count || end.is_some_and(|e| now >= e) || stopped(stop)) {
            done = true;
        }
        if !done {
            let mut batch = 0u64;
            let mut stamp = 0u64;
            while sent + batch < count && ids.in_use < window && client.wbuf.len() < WRITE_BATCH {
                if let Some(interval) = interval {
                    if due > now {
                        break;
                    }
                    due += interval;
                }
                if let (true, Packet::Publish(p)) = (acked, &mut packet) {
                    p.packet_id = ids.take();
                }
                client.push(&packet)?;
                stamp = shared.clock.now_ns();
                let at = client.wbuf.len() - spec.size;
                client.wbuf[at..at + STAMP].copy_from_slice(&stamp.to_be_bytes());
                if sent + batch == 0 {
                    shared.first_send.fetch_min(stamp, Relaxed);
                }
                batch += 1;
            }
            if batch > 0 {
                sent += batch;
                shared.sent.fetch_add(batch, Relaxed);
                shared.last_send.fetch_max(stamp, Relaxed);
                last_progress = now;
            } else if interval.is_some() && ids.in_use < window && client.wbuf.is_empty() {
                // Waiting for the rate, not for the broker.
                last_progress = now;
            }
        }
        if done && ids.in_use == 0 && client.wbuf.is_empty() {
            return Ok(());
        }
        let mut deadline = last_progress + timeout;
        if !done {
            if interval.is_some() {
                deadline = deadline.min(due);
            }
            if let Some(end) = end {
                deadline = deadline.min(end);
            }
        }
        let step = tokio::select! {
            step = client.step(Some(deadline)) => step?,
            _ = stop.changed(), if !done => continue,
        };
        match step {
            Step::Idle => {
                if Instant::now() >= last_progress + timeout {
                    // What is still buffered never reached the broker.
                    if !client.wbuf.is_empty() && !acked {
                        let len = packet.encoded_len(protocol).max(1);
                        let unsent = (client.wbuf.len().div_ceil(len) as u64).min(sent);
                        shared.sent.fetch_sub(unsent, Relaxed);
                    }
                    return Err(if ids.in_use > 0 {
                        Failure::new(
                            "ack timeout",
                            format!("{} messages unacknowledged after {timeout:?}", ids.in_use),
                        )
                    } else {
                        Failure::new("write stalled", format!("no progress for {timeout:?}"))
                    });
                }
            }
            Step::Wrote => last_progress = Instant::now(),
            Step::Read => {
                let mut acks = 0;
                while let Some(packet) = client.try_decode()? {
                    match packet {
                        // A stray or repeated acknowledgement is no progress. An error code
                        // ends the QoS 2 flow at PUBREC.
                        Packet::PubAck(ack) | Packet::PubComp(ack)
                            if ids.release(ack.packet_id) =>
                        {
                            acks += 1;
                            if ack.code.is_error() {
                                shared.error(Failure::new(
                                    "publish refused",
                                    format!("PUBACK {}", ack.code),
                                ));
                            }
                        }
                        Packet::PubRec(ack)
                            if ack.code.is_error() && ids.release(ack.packet_id) =>
                        {
                            acks += 1;
                            shared.error(Failure::new(
                                "publish refused",
                                format!("PUBREC {}", ack.code),
                            ));
                        }
                        Packet::PubRec(ack) if ack.code.is_error() => {}
                        Packet::PubRec(ack) => {
                            client.push(&Packet::PubRel(PubAck::new(ack.packet_id)))?;
                        }
                        Packet::Disconnect(d) => {
                            return Err(Failure::new("disconnected by broker", d.code.to_string()))
                        }
                        _ => {}
                    }
                }
                if acks > 0 {
                    shared.acked.fetch_add(acks, Relaxed);
                }
                last_progress = Instant::now();
            }
        }
    }
}

/// Packet identifiers of a publisher's unacknowledged messages (a bitset: 8 KiB, and only at
/// QoS 1/2).
pub(crate) struct PacketIds {
    used: Vec<u64>,
    next: u16,
    pub in_use: u64,
}

impl PacketIds {
    pub fn new(needed: bool) -> Self {
        PacketIds {
            used: if needed { vec![0; 1024] } else { Vec::new() },
            next: 0,
            in_use: 0,
        }
    }

    /// A free identifier (the window is far below 65,535, so one is always found).
    pub fn take(&mut self) -> u16 {
        loop {
            self.next = self.next.wrapping_add(1);
            let (word, bit) = (usize::from(self.next) / 64, self.next % 64);
            if self.next != 0 && self.used[word] & (1 << bit) == 0 {
                self.used[word] |= 1 << bit;
                self.in_use += 1;
                return self.next;
            }
        }
    }

    /// Frees `id`; false if it was not in use (a stray or repeated acknowledgement).
    pub fn release(&mut self, id: u16) -> bool {
        let (word, bit) = (usize::from(id) / 64, id % 64);
        let Some(slot) = self.used.get_mut(word) else {
            return false;
        };
        let was = *slot & (1 << bit) != 0;
        *slot &= !(1 << bit);
        self.in_use -= u64::from(was);
        was
    }
}

fn spawn_progress(plan: &Plan, shared: &Arc<Shared>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let total = plan.clients();
    let (bar2, shared) = (bar.clone(), shared.clone());
    tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64, 0u64);
        while !bar2.is_finished() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (sent, received) = (shared.sent.load(Relaxed), shared.received.load(Relaxed));
            let secs = last.0.elapsed().as_secs_f64().max(1e-3);
            bar2.set_message(format!(
                "conn {}/{} up {} failed {} | sent {} {}/s | recv {} {}/s | errors {}",
                shared.connected.load(Relaxed),
                total,
                shared.up.load(Relaxed),
                shared.failed.load(Relaxed),
                human(sent as f64),
                human(sent.saturating_sub(last.1) as f64 / secs),
                human(received as f64),
                human(received.saturating_sub(last.2) as f64 / secs),
                shared.dropped.load(Relaxed) + shared.failed.load(Relaxed),
            ));
            bar2.tick();
            last = (Instant::now(), sent, received);
        }
    });
    bar
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn report(
    plan: &Plan,
    shared: &Shared,
    up_at_end: u64,
    ramp_done_ns: u64,
    started: Instant,
) -> Report {
    let load = |a: &AtomicU64| a.load(Relaxed);
    let secs = |from: u64, to: u64| {
        if from == u64::MAX || to <= from {
            0.0
        } else {
            (to - from) as f64 / 1e9
        }
    };
    let per_sec = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let connected = load(&shared.connected);
    let first_attempt = load(&shared.first_attempt);
    // The ramp: from the first attempt to the last CONNACK before publishing began (or at all,
    // when there were no publishers).
    let ramp_end = if plan.subs.is_some() || plan.idle > 0 {
        ramp_done_ns
    } else {
        load(&shared.last_connack)
    };
    let ramp_secs = secs(first_attempt, ramp_end);
    let ramp_connected = if plan.pubs.is_some() && (plan.subs.is_some() || plan.idle > 0) {
        plan.subs.as_ref().map_or(0, |s| s.clients) + plan.idle
    } else {
        connected
    }
    .min(connected);

    let sent = load(&shared.sent);
    let received = load(&shared.received);
    let expected = match (&plan.pubs, &plan.subs, plan.copies) {
        (Some(_), Some(_), Some(copies)) => Some(sent.saturating_mul(copies)),
        _ => None,
    };
    let first_send = load(&shared.first_send);
    let send_secs = secs(first_send, load(&shared.last_send));
    let duration_secs = secs(first_send, load(&shared.last_receive));
    let hist = shared.latency.lock().unwrap_or_else(|e| e.into_inner());
    let q = |quantile: f64| {
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(quantile) as f64 / 1e3
        }
    };
    let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner());
    Report {
        scenario: plan.name.clone(),
        transport: plan.common.target.transport.to_string(),
        protocol: plan.common.protocol.level(),
        qos: plan
            .pubs
            .as_ref()
            .map(|p| p.qos as u8)
            .or(plan.subs.as_ref().map(|s| s.qos as u8))
            .unwrap_or(0),
        size: plan.pubs.as_ref().map_or(0, |p| p.size),
        publishers: plan.pubs.as_ref().map_or(0, |p| p.clients),
        subscribers: plan.subs.as_ref().map_or(0, |s| s.clients),
        idle: plan.idle,
        connections: ConnStats {
            attempted: load(&shared.attempted),
            connected,
            failed: load(&shared.failed),
            dropped: load(&shared.dropped),
            up_at_end,
            subscribed: load(&shared.subscribed),
            ramp_secs,
            connect_rate: per_sec(ramp_connected, ramp_secs),
        },
        messages: MsgStats {
            sent,
            acked: load(&shared.acked),
            received,
            expected,
            lost: expected.map(|e| e.saturating_sub(received)),
            duplicates: expected.map(|e| received.saturating_sub(e)),
            send_rate: per_sec(sent, send_secs),
            throughput: per_sec(received, duration_secs),
            duration_secs,
        },
        latency_us: Latency {
            count: hist.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: if hist.is_empty() {
                0.0
            } else {
                hist.max() as f64 / 1e3
            },
            mean: if hist.is_empty() {
                0.0
            } else {
                hist.mean() / 1e3
            },
        },
        errors: errors
            .iter()
            .map(|(k, (n, _))| (k.to_string(), *n))
            .collect(),
        error_examples: errors
            .iter()
            .map(|(k, (_, d))| (k.to_string(), d.clone()))
            .collect(),
        elapsed_secs: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_zero_and_ids_in_use() {
        let mut ids = PacketIds::new(true);
        ids.next = u16::MAX - 1;
        assert_eq!(ids.take(), u16::MAX);
        assert_eq!(ids.take(), 1);
        ids.next = u16::MAX - 1;
        assert_eq!(ids.take(), 2);
        assert_eq!(ids.in_use, 3);
        assert!(ids.release(1));
        assert!(!ids.release(1));
        assert_eq!(ids.in_use, 2);
        assert!(!PacketIds::new(false).release(7));
    }

    #[test]
    fn paced_publishers_spread_over_one_interval() {
        let spec = |clients, rate| PubSpec {
            clients,
            topic: "t".into(),
            qos: QoS::AtMostOnce,
            size: 64,
            count: Some(1),
            duration: None,
            rate,
            inflight: 1,
            retain: false,
        };
        // 4 publishers at 8/s: one every 31.25 ms, over the first 125 ms.
        let four = spec(4, Some(8.0));
        let phases: Vec<Duration> = (0..4).map(|i| phase(&four, i)).collect();
        let expected = [0, 31_250, 62_500, 93_750].map(Duration::from_micros);
        assert_eq!(phases, expected.to_vec());
        assert_eq!(phase(&spec(1, Some(8.0)), 0), Duration::ZERO);
        assert_eq!(phase(&spec(4, None), 3), Duration::ZERO);
    }

    #[test]
    fn patterns_expand() {
        assert_eq!(expand("bench/%i/x", 42), "bench/42/x");
        assert_eq!(expand("fixed", 42), "fixed");
    }
}
