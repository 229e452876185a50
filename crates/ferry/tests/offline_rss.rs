//! Offline messages live on disk, not in memory (issue 4, "What must be shown", second bullet).
//!
//! The real `ferry serve` binary with its on-disk store (`durability = "sync"`) gets 10,000
//! persistent MQTT 3.1.1 sessions (clean session 0), each subscribed at QoS 1 to its own topic
//! and then disconnected. Publishers then send 1,000,000 numbered QoS 1 messages (override with
//! `FERRY_RSS_MESSAGES`), message k to session k % 10,000, and every PUBACK must arrive. The
//! broker's resident memory (VmRSS, sampled every 20 ms) may grow by at most [`RSS_BOUND_MB`]
//! MiB over the baseline taken once the sessions exist, while publishing and just after; a
//! broker that kept the messages in memory would exceed the bound several times over.
//! Then every session reconnects (session present = 1) and must receive exactly its messages,
//! in order, none lost; duplicates are counted and reported. The admin API's client views must
//! show the whole backlog queued before the drain and nothing queued or in flight after it.
//!
//! Run with `cargo test -p ferry --test offline_rss --release -- --nocapture` for the figures.

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_codec::{
    decode, Connect, Disconnect, Packet, Protocol, PubAck, Publish, QoS, ReasonCode, SubOptions,
    Subscribe,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Persistent sessions, one topic each.
const SESSIONS: usize = 10_000;
/// Messages published in total unless `FERRY_RSS_MESSAGES` says otherwise.
const DEFAULT_MESSAGES: u64 = 1_000_000;
/// Connections open at once while creating and draining sessions (the broker and this process
/// may each hold at most 20,000 files).
const CONCURRENT_SESSIONS: usize = 500;
/// Publisher connections, each with its own inflight window.
const PUBLISHERS: u64 = 4;
const PUBLISH_WINDOW: u16 = 256;
const PAYLOAD_LEN: usize = 64;
/// Allowed growth of the broker's RSS over the baseline, while publishing and just after it.
///
/// Measured on the reference machine (2 cores): release build 60 MiB for 1,000,000 messages,
/// 69 MiB for 3,000,000, 29 MiB for 100,000; debug build 87 MiB for 1,000,000 (its flushes lag
/// more, so more memtables wait). The store's memory is bounded by design: 32 MiB of block
/// cache, and per space one active plus at most 4 sealed 16 MiB memtables before fjall stalls
/// writes (80 MiB for the messages space): 112 MiB in the worst case, leaving 48 MiB for the
/// write path's buffers and allocator slack. Holding the messages in memory instead would cost
/// at least 1,000,000 × (520-byte `Message` + `Arc` header + 48-byte `Delivery`) ≈ 560 MiB,
/// before the topic and payload bytes: 3.5 times the bound.
const RSS_BOUND_MB: u64 = 160;
/// Longest silence tolerated on any connection.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each phase as a whole.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_PACKET: u32 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The broker process

struct Broker {
    child: Child,
    /// Kept open: the broker's stdout must not become a broken pipe.
    _stdout: BufReader<ChildStdout>,
    addr: String,
    api: String,
    log: PathBuf,
}

impl Broker {
    fn start(root: &Path) -> Result<Broker> {
        let data = root.join("data");
        let log = root.join("broker.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--queue-listen", "127.0.0.1:0"])
            .args(["--log-level", "warn", "--max-connections", "30000"])
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start ferry")?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut lines = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            lines.push(line.trim().to_string());
        }
        let addr = lines[0]
            .strip_prefix("ferry: mqtt listening on ")
            .ok_or_else(|| anyhow!("unexpected first line {:?}", lines[0]))?
            .to_string();
        let api = lines[1]
            .strip_prefix("ferry: api listening on ")
            .ok_or_else(|| anyhow!("unexpected second line {:?}", lines[1]))?
            .to_string();
        Ok(Broker {
            child,
            _stdout: stdout,
            addr,
            api,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!("{} lines, last:\n{}", lines.len(), lines[from..].join("\n"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples the broker's RSS every 20 ms and keeps the highest value seen since the last
/// [`Sampler::take_peak`].
struct Sampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kib(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 client over ferry-codec

struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    /// Connects and returns the connection with CONNACK's session-present flag.
    async fn open(addr: &str, client_id: &str, clean: bool) -> Result<(Conn, bool)> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: BytesMut::with_capacity(1024),
        };
        conn.queue(&Packet::Connect(Box::new(Connect {
            protocol: Protocol::V3_1_1,
            clean_start: clean,
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        })))?;
        conn.flush().await?;
        match conn.next().await? {
            Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS => Ok((conn, a.session_present)),
            other => bail!("{client_id}: expected a successful CONNACK, got {other:?}"),
        }
    }

    fn queue(&mut self, packet: &Packet) -> Result<()> {
        packet.encode(Protocol::V3_1_1, &mut self.wbuf)?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(&self.wbuf))
                .await
                .context("write timed out")??;
            self.wbuf.clear();
        }
        Ok(())
    }

    fn try_decode(&mut self) -> Result<Option<Packet>> {
        Ok(decode(&mut self.rbuf, Protocol::V3_1_1, MAX_PACKET)?)
    }

    /// Reads more bytes; fails on end of stream or after [`IO_TIMEOUT`] of silence.
    async fn fill(&mut self) -> Result<()> {
        let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read_buf(&mut self.rbuf))
            .await
            .context("read timed out")??;
        ensure!(n > 0, "connection closed by the broker");
        Ok(())
    }

    async fn next(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    /// Sends DISCONNECT and waits for the broker to close the connection, so that the session
    /// is offline when this returns. Returns the packets that arrived meanwhile.
    async fn disconnect(mut self) -> Result<Vec<Packet>> {
        self.queue(&Packet::Disconnect(Disconnect::default()))?;
        self.flush().await?;
        let mut late = Vec::new();
        loop {
            while let Some(p) = self.try_decode()? {
                late.push(p);
            }
            let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read_buf(&mut self.rbuf))
                .await
                .context("no close after DISCONNECT")?
                .unwrap_or(0);
            if n == 0 {
                return Ok(late);
            }
        }
    }
}

fn topic(i: usize) -> String {
    format!("rss/{i}")
}

/// Runs `job(i)` for every session with at most [`CONCURRENT_SESSIONS`] at once.
async fn for_each_session<T, F, Fut>(job: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(SESSIONS);
    let mut next = 0;
    while next < SESSIONS || !set.is_empty() {
        while next < SESSIONS && set.len() < CONCURRENT_SESSIONS {
            let fut = job(next);
            let i = next;
            set.spawn(async move { fut.await.with_context(|| format!("session rss-{i}")) });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            out.push(done??);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Phases

async fn create_session(addr: String, i: usize) -> Result<()> {
    let (mut conn, present) = Conn::open(&addr, &format!("rss-{i}"), false).await?;
    ensure!(!present, "session present on the first connection");
    conn.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            topic(i).into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }))?;
    conn.flush().await?;
    match conn.next().await? {
        Packet::SubAck(a) if a.packet_id == 1 && a.codes == [ReasonCode::GRANTED_QOS_1] => {}
        other => bail!("expected SUBACK granting QoS 1, got {other:?}"),
    }
    let late = conn.disconnect().await?;
    ensure!(late.is_empty(), "unexpected packets {late:?}");
    Ok(())
}

/// One publisher: messages `first, first + PUBLISHERS, …` below `total`, with at most
/// [`PUBLISH_WINDOW`] unacknowledged. Returns the number of PUBACKs.
async fn publisher(addr: String, first: u64, total: u64, acked: Arc<AtomicU64>) -> Result<u64> {
    let (conn, _) = Conn::open(&addr, &format!("rss-pub-{first}"), true).await?;
    let Conn {
        stream,
        rbuf,
        wbuf: _,
    } = conn;
    let (mut rd, mut wr) = stream.into_split();
    let count = if first < total {
        (total - 1 - first) / PUBLISHERS + 1
    } else {
        0
    };
    // Free packet ids: the writer takes one per PUBLISH, the reader gives it back on PUBACK.
    let (ids_tx, mut ids_rx) = mpsc::channel::<u16>(usize::from(PUBLISH_WINDOW));
    for id in 1..=PUBLISH_WINDOW {
        ids_tx.try_send(id).expect("room");
    }
    let in_flight: Arc<Vec<AtomicBool>> = Arc::new(
        (0..=PUBLISH_WINDOW)
            .map(|_| AtomicBool::new(false))
            .collect(),
    );

    let flags = in_flight.clone();
    let reader = tokio::spawn(async move {
        let mut rbuf = rbuf;
        let mut got = 0u64;
        while got < count {
            while let Some(p) = decode(&mut rbuf, Protocol::V3_1_1, MAX_PACKET)? {
                match p {
                    Packet::PubAck(a) => {
                        let slot = flags
                            .get(usize::from(a.packet_id))
                            .ok_or_else(|| anyhow!("PUBACK for unknown id {}", a.packet_id))?;
                        ensure!(
                            slot.swap(false, Ordering::AcqRel),
                            "PUBACK for id {} not in flight",
                            a.packet_id
                        );
                        ensure!(a.code == ReasonCode::SUCCESS, "PUBACK {:?}", a.code);
                        got += 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                        ids_tx.send(a.packet_id).await?;
                    }
                    other => bail!("publisher got {other:?}"),
                }
            }
            if got == count {
                break;
            }
            let n = tokio::time::timeout(IO_TIMEOUT, rd.read_buf(&mut rbuf))
                .await
                .map_err(|_| anyhow!("no PUBACK for {IO_TIMEOUT:?} ({got} of {count})"))??;
            ensure!(
                n > 0,
                "publisher connection closed ({got} of {count} acked)"
            );
        }
        Ok::<u64, anyhow::Error>(got)
    });

    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut payload = BytesMut::with_capacity(PAYLOAD_LEN);
    let mut k = first;
    while k < total {
        let id = match ids_rx.try_recv() {
            Ok(id) => id,
            Err(_) => {
                if !wbuf.is_empty() {
                    wr.write_all(&wbuf).await?;
                    wbuf.clear();
                }
                match tokio::time::timeout(IO_TIMEOUT, ids_rx.recv()).await {
                    Ok(Some(id)) => id,
                    // The reader stopped: its error is the one to report.
                    Ok(None) => break,
                    Err(_) => bail!("publisher window stuck for {IO_TIMEOUT:?}"),
                }
            }
        };
        in_flight[usize::from(id)].store(true, Ordering::Release);
        payload.put_u64(k);
        payload.put_bytes(b'.', PAYLOAD_LEN - 8);
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic((k % SESSIONS as u64) as usize).into(),
            packet_id: id,
            payload: payload.split().freeze(),
            properties: Default::default(),
        })
        .encode(Protocol::V3_1_1, &mut wbuf)?;
        if wbuf.len() >= 32 * 1024 {
            wr.write_all(&wbuf).await?;
            wbuf.clear();
        }
        k += PUBLISHERS;
    }
    if !wbuf.is_empty() {
        wr.write_all(&wbuf).await?;
    }
    let got = reader.await??;
    wr.write_all(&disconnect_bytes()).await?;
    Ok(got)
}

fn disconnect_bytes() -> Bytes {
    let mut b = BytesMut::new();
    Packet::Disconnect(Disconnect::default())
        .encode(Protocol::V3_1_1, &mut b)
        .expect("encode");
    b.freeze()
}

#[derive(Default, Debug)]
struct DrainStats {
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    missing: u64,
    unexpected: Vec<String>,
}

/// Reconnects session `i`, takes and acknowledges every message, checks that exactly the
/// messages `i, i + SESSIONS, …` below `total` arrived.
async fn drain_session(addr: String, i: usize, total: u64) -> Result<DrainStats> {
    let expected = if (i as u64) < total {
        ((total - 1 - i as u64) / SESSIONS as u64 + 1) as usize
    } else {
        0
    };
    let (mut conn, present) = Conn::open(&addr, &format!("rss-{i}"), false).await?;
    ensure!(present, "session present = 0 on reconnect");
    let mut tally = Tally::new(i, total, expected);
    loop {
        while let Some(p) = conn.try_decode()? {
            if let Some(id) = tally.record(p) {
                conn.queue(&Packet::PubAck(PubAck::new(id)))?;
            }
        }
        conn.flush().await?;
        if tally.distinct == expected {
            break;
        }
        conn.fill().await.with_context(|| {
            format!(
                "{} of {expected} messages received, waiting for more",
                tally.distinct
            )
        })?;
    }
    // Anything that still arrives before the close is a duplicate or a stray (its PUBACK can
    // no longer be sent; the API check after the drain shows it as still in flight).
    for p in conn.disconnect().await? {
        tally.record(p);
    }
    tally.stats.missing = tally.seen.iter().filter(|&&c| c == 0).count() as u64;
    Ok(tally.stats)
}

/// What one session received.
struct Tally {
    session: usize,
    total: u64,
    topic: String,
    /// Deliveries per expected message (index = sequence number / SESSIONS).
    seen: Vec<u8>,
    distinct: usize,
    last: Option<usize>,
    stats: DrainStats,
}

impl Tally {
    fn new(session: usize, total: u64, expected: usize) -> Tally {
        Tally {
            session,
            total,
            topic: topic(session),
            seen: vec![0; expected],
            distinct: 0,
            last: None,
            stats: DrainStats::default(),
        }
    }

    /// Records one packet; returns the packet id to acknowledge.
    fn record(&mut self, p: Packet) -> Option<u16> {
        let stats = &mut self.stats;
        let Packet::Publish(p) = p else {
            stats.unexpected.push(format!("{p:?}"));
            return None;
        };
        if p.qos != QoS::AtLeastOnce || p.topic.as_str() != self.topic {
            stats
                .unexpected
                .push(format!("qos {:?} topic {}", p.qos, p.topic.as_str()));
        }
        stats.received += 1;
        let mut body = p.payload.clone();
        if body.len() != PAYLOAD_LEN {
            stats
                .unexpected
                .push(format!("payload of {} bytes", body.len()));
            return Some(p.packet_id);
        }
        let seq = body.get_u64();
        if seq % SESSIONS as u64 != self.session as u64 || seq >= self.total {
            stats.unexpected.push(format!("sequence number {seq}"));
            return Some(p.packet_id);
        }
        let idx = (seq / SESSIONS as u64) as usize;
        if self.seen[idx] > 0 {
            stats.duplicates += 1;
        } else {
            self.distinct += 1;
            if self.last.is_some_and(|l| idx < l) {
                stats.out_of_order += 1;
            }
            self.last = Some(idx);
        }
        self.seen[idx] = self.seen[idx].saturating_add(1);
        Some(p.packet_id)
    }
}

// ---------------------------------------------------------------------------------------------
// The admin API's view of the sessions

struct Api {
    base: String,
    auth: String,
}

impl Api {
    fn new(broker: &Broker, root: &Path) -> Result<Api> {
        let key: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("data/admin-key.json"))?)?;
        let id = key["access_key_id"].as_str().context("key id")?;
        let secret = key["access_key_secret"].as_str().context("key secret")?;
        use base64::Engine as _;
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        );
        Ok(Api {
            base: broker.api.clone(),
            auth,
        })
    }

    /// Sums over the `rss-*` client views: (sessions, online, queued, inflight).
    fn totals(&self) -> Result<(u64, u64, u64, u64)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut resp = agent
            .get(format!("{}/api/v1/instances/default/clients", self.base))
            .header("Authorization", &self.auth)
            .call()?;
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_string()?;
        let views: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        let mut t = (0, 0, 0, 0);
        for v in views {
            if !v["client_id"]
                .as_str()
                .is_some_and(|c| c.starts_with("rss-") && !c.starts_with("rss-pub-"))
            {
                continue;
            }
            t.0 += 1;
            t.1 += u64::from(v["online"].as_bool().unwrap_or(false));
            t.2 += v["queued"].as_u64().unwrap_or(0);
            t.3 += v["inflight"].as_u64().unwrap_or(0);
        }
        Ok(t)
    }
}

// ---------------------------------------------------------------------------------------------

fn message_count() -> u64 {
    match std::env::var("FERRY_RSS_MESSAGES") {
        Ok(v) => v.trim().parse().expect("FERRY_RSS_MESSAGES: a number"),
        Err(_) => DEFAULT_MESSAGES,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sessions_keep_their_messages_on_disk_and_drain() {
    let root = tempfile::tempdir().unwrap();
    let broker = Broker::start(root.path()).unwrap();
    let result = run(&broker, root.path()).await;
    if let Err(e) = result {
        panic!("{e:#}\nbroker log: {}", broker.log_tail());
    }
}

async fn run(broker: &Broker, root: &Path) -> Result<()> {
    let total = message_count();
    let pid = broker.pid();
    let addr = broker.addr.clone();
    let api = Api::new(broker, root)?;
    let sampler = Sampler::start(pid);
    let started = Instant::now();

    // 1. The sessions: subscribed, then offline.
    let t = Instant::now();
    tokio::time::timeout(
        PHASE_TIMEOUT,
        for_each_session(|i| create_session(addr.clone(), i)),
    )
    .await
    .context("creating the sessions timed out")??;
    let setup_time = t.elapsed();
    let (sessions, online, queued, _) = api.totals()?;
    ensure!(
        sessions == SESSIONS as u64 && online == 0 && queued == 0,
        "after setup the API shows {sessions} sessions, {online} online, {queued} queued"
    );
    // Let allocations from the connection burst settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = status_kib(pid, "VmRSS");
    sampler.take_peak();

    // 2. Publish.
    let t = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let mut pubs = JoinSet::new();
    for first in 0..PUBLISHERS {
        pubs.spawn(publisher(addr.clone(), first, total, acked.clone()));
    }
    let progress = {
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                eprintln!(
                    "offline_rss: {} acked, broker RSS {:.0} MiB",
                    acked.load(Ordering::Relaxed),
                    mib(status_kib(pid, "VmRSS"))
                );
            }
        })
    };
    let publish = tokio::time::timeout(PHASE_TIMEOUT, async {
        let mut sum = 0;
        while let Some(r) = pubs.join_next().await {
            sum += r??;
        }
        Ok::<u64, anyhow::Error>(sum)
    })
    .await;
    progress.abort();
    let puback_count = publish.context("publishing timed out")??;
    let publish_time = t.elapsed();
    ensure!(
        puback_count == total,
        "{puback_count} PUBACKs for {total} messages"
    );
    let peak_publish = sampler.take_peak().max(status_kib(pid, "VmRSS"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_publish = status_kib(pid, "VmRSS");
    let peak_publish = peak_publish.max(sampler.take_peak());
    let disk = dir_size(&root.join("data"));
    let (_, online, queued, inflight) = api.totals()?;
    ensure!(
        online == 0 && queued + inflight == total,
        "after publishing the API shows {online} online, {queued} queued, {inflight} inflight \
         for {total} messages"
    );

    // 3. Drain.
    let t = Instant::now();
    let stats = tokio::time::timeout(
        PHASE_TIMEOUT,
        for_each_session(|i| drain_session(addr.clone(), i, total)),
    )
    .await
    .context("draining timed out")??;
    let drain_time = t.elapsed();
    let peak_drain = sampler.take_peak();
    let after_drain = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    let (_, online, queued, inflight) = api.totals()?;

    let mut sum = DrainStats::default();
    for s in stats {
        sum.received += s.received;
        sum.duplicates += s.duplicates;
        sum.out_of_order += s.out_of_order;
        sum.missing += s.missing;
        sum.unexpected.extend(s.unexpected);
    }
    let growth = peak_publish.saturating_sub(baseline);
    eprintln!(
        "offline_rss summary:\n\
         \x20 sessions {SESSIONS}, messages {total} ({PAYLOAD_LEN}-byte payloads), \
         {PUBLISHERS} publishers x window {PUBLISH_WINDOW}\n\
         \x20 setup {:.1} s; publish {:.1} s ({:.0} msg/s); drain {:.1} s ({:.0} msg/s)\n\
         \x20 broker RSS: baseline {:.1} MiB, after publish {:.1} MiB, peak while publishing \
         {:.1} MiB (growth {:.1} MiB, bound {RSS_BOUND_MB} MiB), peak while draining {:.1} MiB, \
         after drain {:.1} MiB, VmHWM {:.1} MiB\n\
         \x20 data dir after publish: {:.1} MiB\n\
         \x20 drained: {} received, {} duplicates, {} out of order, {} missing, {} unexpected; \
         API after drain: {online} online, {queued} queued, {inflight} inflight\n\
         \x20 total {:.1} s",
        setup_time.as_secs_f64(),
        publish_time.as_secs_f64(),
        total as f64 / publish_time.as_secs_f64(),
        drain_time.as_secs_f64(),
        sum.received as f64 / drain_time.as_secs_f64(),
        mib(baseline),
        mib(after_publish),
        mib(peak_publish),
        mib(growth),
        mib(peak_drain),
        mib(after_drain),
        mib(hwm),
        disk as f64 / (1024.0 * 1024.0),
        sum.received,
        sum.duplicates,
        sum.out_of_order,
        sum.missing,
        sum.unexpected.len(),
        started.elapsed().as_secs_f64(),
    );

    ensure!(
        sum.unexpected.is_empty(),
        "unexpected deliveries (first 10): {:?}",
        &sum.unexpected[..sum.unexpected.len().min(10)]
    );
    ensure!(sum.missing == 0, "{} messages lost", sum.missing);
    ensure!(
        sum.out_of_order == 0,
        "{} messages delivered out of order",
        sum.out_of_order
    );
    ensure!(
        online == 0 && queued == 0 && inflight == 0,
        "after the drain the API shows {online} online, {queued} queued, {inflight} inflight"
    );
    ensure!(
        growth < RSS_BOUND_MB * 1024,
        "broker RSS grew by {:.1} MiB while holding {total} offline messages (bound \
         {RSS_BOUND_MB} MiB)",
        mib(growth)
    );
    Ok(())
}
