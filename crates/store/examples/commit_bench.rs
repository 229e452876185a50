//! Group-commit throughput: commits per second of 1-op batches from N concurrent submitters,
//! each waiting for its batch to be done before submitting the next (like a QoS 1 publisher
//! with an inflight window of one), under `Sync` and under `Async`, in one run.
//!
//! ```text
//! cargo run --release -p ferry-store --example commit_bench -- [--submitters 1,8,64] [--seconds 3] [--dir DIR]
//! ```
//!
//! Each measurement uses a fresh store in a temporary directory under `--dir` (default: the
//! system temporary directory, which should be on the disk you care about).

use ferry_store::{Durability, FjallEngine, Op, Space, Writer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

struct Args {
    submitters: Vec<usize>,
    seconds: f64,
    dir: std::path::PathBuf,
}

fn parse_args() -> Args {
    let mut args = Args {
        submitters: vec![1, 8, 64],
        seconds: 3.0,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--submitters" => {
                args.submitters = value
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse()
                            .unwrap_or_else(|_| usage("bad --submitters"))
                    })
                    .collect()
            }
            "--seconds" => args.seconds = value.parse().unwrap_or_else(|_| usage("bad --seconds")),
            "--dir" => args.dir = value.into(),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    args
}

fn usage(msg: &str) -> ! {
    eprintln!("{msg}\nusage: commit_bench [--submitters 1,8,64] [--seconds 3] [--dir DIR]");
    std::process::exit(2)
}

struct Outcome {
    commits: u64,
    elapsed: Duration,
    fsyncs: u64,
    merged_commits: u64,
    p50: Duration,
    p99: Duration,
}

fn run(dir: &std::path::Path, durability: Durability, submitters: usize, seconds: f64) -> Outcome {
    let store = tempfile::tempdir_in(dir).expect("temporary store directory");
    let engine = Arc::new(FjallEngine::open(store.path()).expect("open store"));
    let writer = Writer::start(engine, durability, 1024);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..submitters)
            .map(|t| {
                let (writer, stop) = (&writer, &stop);
                s.spawn(move || {
                    let (tx, rx) = mpsc::sync_channel(1);
                    let mut latencies = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("bench/{t:04}/{i:012}");
                        let ops = vec![Op::put(Space::Messages, key, vec![b'm'; 64])];
                        let tx = tx.clone();
                        let t0 = Instant::now();
                        writer
                            .submit(ops, Box::new(move |r| tx.send(r).expect("send")))
                            .expect("submit");
                        rx.recv().expect("done").expect("commit");
                        latencies.push(t0.elapsed());
                        i += 1;
                    }
                    latencies
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("submitter"))
            .collect()
    });
    let elapsed = started.elapsed();
    let stats = writer.stats();
    writer.stop();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Outcome {
        commits: latencies.len() as u64,
        elapsed,
        fsyncs: stats.fsyncs,
        merged_commits: stats.commits,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn main() {
    let args = parse_args();
    println!(
        "1-op batches, each submitter waits for its commit; {:.1} s per run; store under {}",
        args.seconds,
        args.dir.display()
    );
    println!(
        "{:>10}  {:>6}  {:>11}  {:>8}  {:>12}  {:>9}  {:>9}",
        "submitters", "mode", "commits/s", "fsyncs", "batches/apply", "p50", "p99"
    );
    let mut ratios = Vec::new();
    for &n in &args.submitters {
        let mut rates = [0.0f64; 2];
        for (slot, durability) in [Durability::Sync, Durability::Async]
            .into_iter()
            .enumerate()
        {
            let o = run(&args.dir, durability, n, args.seconds);
            let rate = o.commits as f64 / o.elapsed.as_secs_f64();
            rates[slot] = rate;
            println!(
                "{:>10}  {:>6}  {:>11.0}  {:>8}  {:>12.1}  {:>9.2?}  {:>9.2?}",
                n,
                format!("{durability:?}"),
                rate,
                o.fsyncs,
                o.commits as f64 / o.merged_commits.max(1) as f64,
                o.p50,
                o.p99
            );
        }
        ratios.push((n, rates[0] / rates[1]));
    }
    for (n, r) in ratios {
        println!("{n} submitters: Sync/Async throughput ratio {r:.2}");
    }
}
