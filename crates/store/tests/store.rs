//! Tests of the engines (the same bodies run on `MemoryEngine` and `FjallEngine`), the FORMAT
//! checks, the group-commit writer, and a crash test that SIGKILLs a committing child process.

use ferry_codec::ReasonCode;
use ferry_store::{
    Durability, Engine, FjallEngine, KeyValue, MemoryEngine, Op, Space, StoreError, Writer,
    FORMAT_FILE,
};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

fn put(space: Space, key: &str, value: &str) -> Op {
    Op::put(space, key, value)
}

fn del(space: Space, key: &str) -> Op {
    Op::delete(space, key)
}

fn get(e: &dyn Engine, space: Space, key: &str) -> Option<String> {
    e.get(space, key.as_bytes())
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap())
}

fn keys(page: &[KeyValue]) -> Vec<String> {
    page.iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// Runs `body` on a memory engine and on a fjall engine in a fresh directory.
fn on_both_engines(body: impl Fn(&dyn Engine)) {
    body(&MemoryEngine::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = FjallEngine::open(dir.path()).unwrap();
    body(&engine);
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Engines

#[test]
fn put_get_delete_on_both_engines() {
    on_both_engines(|e| {
        assert_eq!(get(e, Space::Meta, "a"), None);
        e.apply(
            &[put(Space::Meta, "a", "1"), put(Space::Retained, "a", "2")],
            true,
        )
        .unwrap();
        assert_eq!(get(e, Space::Meta, "a").as_deref(), Some("1"));
        assert_eq!(get(e, Space::Retained, "a").as_deref(), Some("2"));
        assert_eq!(get(e, Space::Sessions, "a"), None, "spaces are separate");
        e.apply(&[put(Space::Meta, "a", "3")], false).unwrap();
        assert_eq!(get(e, Space::Meta, "a").as_deref(), Some("3"));
        e.apply(
            &[del(Space::Meta, "a"), del(Space::Meta, "never-there")],
            true,
        )
        .unwrap();
        assert_eq!(get(e, Space::Meta, "a"), None);
        assert_eq!(get(e, Space::Retained, "a").as_deref(), Some("2"));
        // Binary keys and values, an empty value.
        e.apply(
            &[
                Op::put(Space::Messages, vec![0u8, 0xFF, 7], vec![]),
                Op::put(Space::Messages, vec![0xFF], vec![0u8; 3]),
            ],
            true,
        )
        .unwrap();
        assert_eq!(e.get(Space::Messages, &[0, 0xFF, 7]).unwrap(), Some(vec![]));
        assert_eq!(
            e.get(Space::Messages, &[0xFF]).unwrap(),
            Some(vec![0, 0, 0])
        );
        // An empty apply is fine (and with sync makes earlier writes durable).
        e.apply(&[], true).unwrap();
        e.apply(&[], false).unwrap();
    });
}

#[test]
fn scan_and_count_with_pagination_on_both_engines() {
    on_both_engines(|e| {
        let mut ops = Vec::new();
        for i in 0..25 {
            ops.push(put(
                Space::Sessions,
                &format!("s/c1/{i:03}"),
                &format!("v{i}"),
            ));
        }
        ops.push(put(Space::Sessions, "s/c0", "before"));
        ops.push(put(Space::Sessions, "s/c1", "exact prefix"));
        ops.push(put(Space::Sessions, "s/c2/000", "after"));
        ops.push(put(Space::Meta, "s/c1/x", "other space"));
        e.apply(&ops, true).unwrap();

        assert_eq!(e.count(Space::Sessions, b"s/c1/").unwrap(), 25);
        assert_eq!(e.count(Space::Sessions, b"s/c1").unwrap(), 26);
        assert_eq!(e.count(Space::Sessions, b"s/").unwrap(), 28);
        assert_eq!(e.count(Space::Sessions, b"").unwrap(), 28);
        assert_eq!(e.count(Space::Sessions, b"nothing").unwrap(), 0);
        assert_eq!(e.count(Space::Meta, b"s/c1/").unwrap(), 1);

        // Pages of 10 over 25 entries, each starting after the last key of the previous page.
        let mut all = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        let mut pages = 0;
        loop {
            let page = e
                .scan(Space::Sessions, b"s/c1/", after.as_deref(), 10)
                .unwrap();
            pages += 1;
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 10);
            after = Some(page.last().unwrap().0.clone());
            all.extend(page);
        }
        assert_eq!(pages, 4);
        let expected: Vec<String> = (0..25).map(|i| format!("s/c1/{i:03}")).collect();
        assert_eq!(keys(&all), expected);
        assert_eq!(all[7].1, b"v7");

        // `after` in the middle, before the prefix, past it, and between keys.
        let page = e
            .scan(Space::Sessions, b"s/c1/", Some(b"s/c1/022"), 10)
            .unwrap();
        assert_eq!(keys(&page), ["s/c1/023", "s/c1/024"]);
        let page = e.scan(Space::Sessions, b"s/c1/", Some(b"a"), 2).unwrap();
        assert_eq!(keys(&page), ["s/c1/000", "s/c1/001"]);
        let page = e.scan(Space::Sessions, b"s/c1/", Some(b"t"), 2).unwrap();
        assert!(page.is_empty());
        let page = e
            .scan(Space::Sessions, b"s/c1/", Some(b"s/c1/0055"), 2)
            .unwrap();
        assert_eq!(keys(&page), ["s/c1/006", "s/c1/007"]);
        assert!(e.scan(Space::Sessions, b"s/", None, 0).unwrap().is_empty());
        let page = e.scan(Space::Sessions, b"", None, 100).unwrap();
        assert_eq!(page.len(), 28);
        assert_eq!(keys(&page[..2]), ["s/c0", "s/c1"]);

        // Prefixes ending in 0xFF bytes.
        e.apply(
            &[
                Op::put(Space::Retained, vec![1, 0xFF], vec![1]),
                Op::put(Space::Retained, vec![1, 0xFF, 0xFF, 3], vec![2]),
                Op::put(Space::Retained, vec![2], vec![3]),
            ],
            true,
        )
        .unwrap();
        assert_eq!(e.count(Space::Retained, &[1, 0xFF]).unwrap(), 2);
        assert_eq!(e.count(Space::Retained, &[1]).unwrap(), 2);
        let page = e
            .scan(Space::Retained, &[1, 0xFF], Some(&[1, 0xFF]), 5)
            .unwrap();
        assert_eq!(page, vec![(vec![1, 0xFF, 0xFF, 3], vec![2])]);
    });
}

#[test]
fn batches_are_ordered_and_atomic_on_both_engines() {
    on_both_engines(|e| {
        // Later ops on the same key win.
        e.apply(
            &[
                put(Space::Meta, "k", "1"),
                put(Space::Meta, "k", "2"),
                put(Space::Meta, "gone", "x"),
                del(Space::Meta, "gone"),
                del(Space::Meta, "back"),
                put(Space::Meta, "back", "yes"),
                put(Space::Retained, "k", "other space"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(get(e, Space::Meta, "k").as_deref(), Some("2"));
        assert_eq!(get(e, Space::Meta, "gone"), None);
        assert_eq!(get(e, Space::Meta, "back").as_deref(), Some("yes"));
        assert_eq!(get(e, Space::Retained, "k").as_deref(), Some("other space"));

        // A batch with an op that cannot be stored writes nothing.
        let err = e
            .apply(
                &[
                    put(Space::Meta, "half", "1"),
                    Op::put(Space::Meta, Vec::new(), "v"),
                ],
                true,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidOp(_)), "{err}");
        let err = e
            .apply(
                &[
                    put(Space::Meta, "half", "1"),
                    Op::delete(Space::Meta, vec![b'k'; 70_000]),
                ],
                true,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidOp(_)), "{err}");
        assert_eq!(get(e, Space::Meta, "half"), None);
        // Reads of such keys simply find nothing.
        assert_eq!(e.get(Space::Meta, b"").unwrap(), None);
        // And the engine still works.
        e.apply(&[put(Space::Meta, "after", "ok")], true).unwrap();
        assert_eq!(get(e, Space::Meta, "after").as_deref(), Some("ok"));
    });
}

#[test]
fn fjall_reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = FjallEngine::open(dir.path()).unwrap();
        e.apply(
            &[
                put(Space::Meta, "inst/default", "{}"),
                put(Space::Retained, "t/1", "r"),
            ],
            true,
        )
        .unwrap();
        e.apply(
            &[
                put(Space::Sessions, "s/1", "a"),
                put(Space::Sessions, "s/1", "b"),
                del(Space::Retained, "t/1"),
            ],
            false,
        )
        .unwrap();
        let mut ops = Vec::new();
        for i in 0..5000 {
            ops.push(Op::put(
                Space::Messages,
                format!("m/{i:06}"),
                vec![b'x'; 200],
            ));
        }
        e.apply(&ops, true).unwrap();
        e.apply(&[del(Space::Messages, "m/000000")], false).unwrap();
    }
    let e = FjallEngine::open(dir.path()).unwrap();
    assert_eq!(get(&e, Space::Meta, "inst/default").as_deref(), Some("{}"));
    assert_eq!(get(&e, Space::Retained, "t/1"), None);
    assert_eq!(get(&e, Space::Sessions, "s/1").as_deref(), Some("b"));
    assert_eq!(e.count(Space::Messages, b"m/").unwrap(), 4999);
    assert_eq!(
        e.get(Space::Messages, b"m/004999").unwrap(),
        Some(vec![b'x'; 200])
    );
    assert!(e.disk_space() > 0);
    // A second handle on the same directory is refused while this one is open.
    let err = FjallEngine::open(dir.path()).err().expect("locked");
    assert!(err.to_string().contains("in use"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// FORMAT

#[test]
fn format_file_is_written_and_checked() {
    let base = tempfile::tempdir().unwrap();

    // A directory that does not exist yet is created, with its FORMAT file.
    let dir = base.path().join("a/b/store");
    drop(FjallEngine::open(&dir).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join(FORMAT_FILE)).unwrap(),
        "ferry-store 1\n"
    );
    drop(FjallEngine::open(&dir).unwrap());

    // An existing empty directory too.
    let empty = base.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    drop(FjallEngine::open(&empty).unwrap());
    assert!(empty.join(FORMAT_FILE).exists());

    // A newer version is refused, saying what was found and what this build supports.
    std::fs::write(dir.join(FORMAT_FILE), "ferry-store 2\n").unwrap();
    let err = FjallEngine::open(&dir).err().expect("refused");
    match &err {
        StoreError::UnsupportedFormat { found, supported } => {
            assert!(found.contains("format version 2"), "{found}");
            assert_eq!(*supported, 1);
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("format version 2") && msg.contains("newer"),
        "{msg}"
    );
    assert!(msg.contains("supports store format 1"), "{msg}");
    assert_eq!(err.reason_code(), ReasonCode::UNSPECIFIED_ERROR);

    // Unknown contents.
    std::fs::write(dir.join(FORMAT_FILE), "sled 0.34\n").unwrap();
    let msg = FjallEngine::open(&dir).err().expect("refused").to_string();
    assert!(msg.contains("unrecognised contents \"sled 0.34\""), "{msg}");

    // Back to the right version: the data is still readable.
    std::fs::write(dir.join(FORMAT_FILE), "ferry-store 1\n").unwrap();
    drop(FjallEngine::open(&dir).unwrap());

    // A non-empty directory without a FORMAT file is not taken over.
    let other = base.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("admin-key.json"), "{}").unwrap();
    let err = FjallEngine::open(&other).err().expect("refused");
    assert!(matches!(err, StoreError::UnsupportedFormat { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("no FORMAT file") && msg.contains("admin-key.json"),
        "{msg}"
    );
    assert!(!other.join(FORMAT_FILE).exists());
    assert!(!other.join("fjall").exists());
}

// ---------------------------------------------------------------------------------------------
// Writer

/// A memory engine whose `apply` waits while the gate is closed.
#[derive(Default)]
struct Gated {
    inner: MemoryEngine,
    closed: Mutex<bool>,
    cv: Condvar,
    entered: AtomicUsize,
}

impl Gated {
    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.cv.notify_all();
    }

    fn wait_entered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.entered.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "writer never called apply");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Engine for Gated {
    fn apply(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            let (c, timeout) = self
                .cv
                .wait_timeout(closed, Duration::from_secs(20))
                .unwrap();
            closed = c;
            assert!(!timeout.timed_out(), "gate never opened");
        }
        drop(closed);
        self.inner.apply(ops, sync)
    }
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(space, key)
    }
    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(space, prefix, after, limit)
    }
    fn count(&self, space: Space, prefix: &[u8]) -> Result<u64, StoreError> {
        self.inner.count(space, prefix)
    }
}

type Results = Arc<Mutex<Vec<(usize, Result<(), StoreError>)>>>;

fn recorder(results: &Results, i: usize) -> Box<dyn FnOnce(Result<(), StoreError>) + Send> {
    let results = results.clone();
    Box::new(move |r| results.lock().unwrap().push((i, r)))
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn group_commit_merges_concurrent_submitters() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FjallEngine::open(dir.path()).unwrap());
    let writer = Writer::start(engine.clone(), Durability::Sync, 256);
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let out_of_order = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (writer, ok, failed, out_of_order) = (&writer, &ok, &failed, &out_of_order);
            s.spawn(move || {
                // Each thread's callbacks must come in its submission order.
                let next = Arc::new(AtomicUsize::new(0));
                for i in 0..PER_THREAD {
                    let ops = vec![Op::put(
                        Space::Messages,
                        format!("t{t}/{i:05}"),
                        format!("{t}:{i}"),
                    )];
                    let (ok, failed, out_of_order, next) = (
                        ok.clone(),
                        failed.clone(),
                        out_of_order.clone(),
                        next.clone(),
                    );
                    writer
                        .submit(
                            ops,
                            Box::new(move |r| {
                                if next.fetch_add(1, Ordering::SeqCst) != i {
                                    out_of_order.fetch_add(1, Ordering::SeqCst);
                                }
                                match r {
                                    Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                                    Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                                };
                            }),
                        )
                        .unwrap();
                }
            });
        }
    });
    wait_for("all callbacks", Duration::from_secs(60), || {
        ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) == THREADS * PER_THREAD
    });
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert_eq!(out_of_order.load(Ordering::SeqCst), 0);
    let stats = writer.stats();
    println!("group commit stats: {stats:?}");
    assert_eq!(stats.batches, (THREADS * PER_THREAD) as u64);
    assert_eq!(stats.ops, (THREADS * PER_THREAD) as u64);
    assert_eq!(stats.fsyncs, stats.commits);
    assert!(
        stats.fsyncs * 4 < stats.batches,
        "expected far fewer fsyncs than batches: {stats:?}"
    );
    assert!(stats.max_merged > 1 && stats.max_merged <= 256, "{stats:?}");
    assert_eq!(stats.queue_depth, 0);
    writer.stop();
    drop(engine);

    let engine = FjallEngine::open(dir.path()).unwrap();
    assert_eq!(
        engine.count(Space::Messages, b"t").unwrap(),
        (THREADS * PER_THREAD) as u64
    );
    for t in 0..THREADS {
        assert_eq!(
            engine
                .count(Space::Messages, format!("t{t}/").as_bytes())
                .unwrap(),
            PER_THREAD as u64
        );
        assert_eq!(
            get(&engine, Space::Messages, &format!("t{t}/00999")),
            Some(format!("{t}:999"))
        );
    }
}

#[test]
fn callbacks_run_in_submission_order_and_the_queue_is_bounded() {
    let engine = Arc::new(Gated::default());
    let writer = Writer::start(engine.clone(), Durability::Sync, 4);
    let results: Results = Arc::default();

    engine.close();
    writer
        .submit(vec![put(Space::Meta, "k0", "0")], recorder(&results, 0))
        .unwrap();
    engine.wait_entered(1); // the writer holds batch 0 and waits in apply
    for i in 1..=4 {
        writer
            .submit(
                vec![put(Space::Meta, &format!("k{i}"), "v")],
                recorder(&results, i),
            )
            .unwrap();
    }
    assert_eq!(writer.stats().queue_depth, 4);

    // The queue is full: the next submitter waits until the writer takes the queue.
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            writer
                .submit(vec![put(Space::Meta, "k5", "v")], recorder(&results, 5))
                .unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "submit did not block"
        );
        assert_eq!(writer.stats().queue_depth, 4);
        engine.open();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("submit unblocked");
    });
    wait_for("six callbacks", Duration::from_secs(10), || {
        results.lock().unwrap().len() == 6
    });
    let results = results.lock().unwrap();
    let order: Vec<usize> = results.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, [0, 1, 2, 3, 4, 5]);
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    let stats = writer.stats();
    // Batch 0 alone, 1..=4 merged, then 5 (possibly merged with nothing).
    assert_eq!(stats.batches, 6);
    assert!(stats.commits <= 3, "{stats:?}");
    assert_eq!(stats.max_merged, 4);
    assert_eq!(engine.inner.count(Space::Meta, b"k").unwrap(), 6);
}

#[test]
fn a_failed_commit_fails_every_merged_submitter() {
    let engine = Arc::new(Gated::default());
    let writer = Writer::start(engine.clone(), Durability::Sync, 64);
    let results: Results = Arc::default();

    // Batch 0 is applied alone (and succeeds); 1..=10 queue up behind it and are merged into
    // one apply that fails on a full disk.
    engine.close();
    writer
        .submit(vec![put(Space::Retained, "a", "0")], recorder(&results, 0))
        .unwrap();
    engine.wait_entered(1);
    engine.inner.fail_writes(Some(StoreError::DiskFull(
        "no space left on device (os error 28)".into(),
    )));
    for i in 1..=10 {
        writer
            .submit(
                vec![
                    put(Space::Retained, &format!("b{i}"), "v"),
                    put(Space::Meta, &format!("m{i}"), "v"),
                ],
                recorder(&results, i),
            )
            .unwrap();
    }
    engine.open();
    wait_for("eleven callbacks", Duration::from_secs(10), || {
        results.lock().unwrap().len() == 11
    });
    {
        let results = results.lock().unwrap();
        // Batch 0 hit the failure too (it was armed while it waited at the gate).
        for (i, r) in results.iter() {
            let err = r.as_ref().expect_err("nothing acknowledged on a full disk");
            assert!(err.is_disk_full(), "batch {i}: {err}");
            assert_eq!(err.reason_code(), ReasonCode::QUOTA_EXCEEDED);
        }
    }
    assert_eq!(engine.inner.count(Space::Retained, b"").unwrap(), 0);
    assert_eq!(engine.inner.count(Space::Meta, b"").unwrap(), 0);
    let stats = writer.stats();
    assert_eq!(stats.commits, 2, "{stats:?}");
    assert_eq!(stats.failed_commits, 2);

    // Once space is back, commits succeed again.
    engine.inner.fail_writes(None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(writer.commit(vec![put(Space::Retained, "c", "v")]))
        .unwrap();
    assert_eq!(
        get(&engine.inner, Space::Retained, "c").as_deref(),
        Some("v")
    );
    // An invalid batch is refused up front and does not disturb the others.
    let err = rt
        .block_on(writer.commit(vec![Op::put(Space::Meta, "", "v")]))
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidOp(_)));
    let err = writer
        .submit(vec![Op::delete(Space::Meta, "")], Box::new(|_| {}))
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidOp(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_commit_waits_for_room_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FjallEngine::open(dir.path()).unwrap());
    // A small queue and many more concurrent committers than it holds.
    let writer = Arc::new(Writer::start(engine.clone(), Durability::Sync, 8));
    let mut tasks = Vec::new();
    for i in 0..500u32 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            writer
                .commit(vec![Op::put(
                    Space::Sessions,
                    format!("x/{i:04}"),
                    i.to_be_bytes().to_vec(),
                )])
                .await
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("commit finished")
            .unwrap()
            .unwrap();
    }
    // Everything acknowledged is readable.
    assert_eq!(engine.count(Space::Sessions, b"x/").unwrap(), 500);
    let stats = writer.stats();
    assert_eq!(stats.batches, 500);
    assert!(stats.max_merged <= 8, "{stats:?}");
    println!("async commit stats: {stats:?}");
}

#[test]
fn stop_commits_what_is_queued() {
    let engine = Arc::new(Gated::default());
    let writer = Writer::start(engine.clone(), Durability::Async, 100);
    let results: Results = Arc::default();
    engine.close();
    writer
        .submit(vec![put(Space::Meta, "q0", "v")], recorder(&results, 0))
        .unwrap();
    engine.wait_entered(1);
    for i in 1..50 {
        writer
            .submit(
                vec![put(Space::Meta, &format!("q{i}"), "v")],
                recorder(&results, i),
            )
            .unwrap();
    }
    let opener = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            engine.open();
        })
    };
    writer.stop();
    opener.join().unwrap();
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(engine.inner.count(Space::Meta, b"q").unwrap(), 50);
    // Async asks for a sync only once, when stopping.
    assert_eq!(engine.inner.syncs(), 1);
    assert_eq!(engine.inner.applies(), 3);
}

// ---------------------------------------------------------------------------------------------
// Crash test: a child process commits numbered batches and prints each number once its batch is
// reported done; the parent SIGKILLs it at a random moment and checks that every printed number
// is in the store, and that no batch is half there.

const CHILD_DIR: &str = "FERRY_STORE_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "FERRY_STORE_CRASH_CHILD_ROUND";
const CHILD_MODE: &str = "FERRY_STORE_CRASH_CHILD_MODE";
const MARK: &str = "COMMITTED:";

/// (durability, paced) per round. Burst rounds: 4 submitters as fast as the writer takes them,
/// so the kill lands mid-commit. Paced rounds: one submitter that waits for each commit and then
/// idles a millisecond, so the kill usually lands between commits, when a write that only sat in
/// a user-space buffer would be lost. Async rounds too: a kill of the process (unlike power
/// loss) must not lose an acknowledged write under Async either.
const ROUNDS: [(Durability, bool); 8] = [
    (Durability::Sync, false),
    (Durability::Sync, true),
    (Durability::Sync, false),
    (Durability::Sync, true),
    (Durability::Sync, false),
    (Durability::Sync, true),
    (Durability::Async, false),
    (Durability::Async, true),
];

fn crash_key(round: usize, n: u64) -> String {
    format!("r{round:02}/{n:012}")
}

fn crash_ops(round: usize, n: u64) -> Vec<Op> {
    let key = crash_key(round, n);
    vec![
        Op::put(
            Space::Messages,
            key.clone(),
            vec![b'p'; 100 + (n % 200) as usize],
        ),
        Op::put(Space::Sessions, key, n.to_string()),
    ]
}

fn print_committed(n: u64) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARK}{n}").unwrap();
    out.flush().unwrap();
}

/// The child role; does nothing unless started by `sigkill_never_loses_a_committed_batch`.
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let round: usize = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
    let (durability, paced) = ROUNDS[round];
    assert_eq!(
        std::env::var(CHILD_MODE).unwrap(),
        format!("{durability:?}/{paced}")
    );
    let engine = Arc::new(FjallEngine::open(Path::new(&dir)).unwrap());
    let writer = Writer::start(engine, durability, 64);
    let deadline = Instant::now() + Duration::from_secs(30); // in case nobody kills us
    if paced {
        let (tx, rx) = mpsc::channel();
        for n in 0.. {
            if Instant::now() > deadline {
                break;
            }
            let tx = tx.clone();
            writer
                .submit(crash_ops(round, n), Box::new(move |r| tx.send(r).unwrap()))
                .unwrap();
            rx.recv().unwrap().expect("commit");
            print_committed(n);
            std::thread::sleep(Duration::from_millis(1));
        }
        return;
    }
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    writer
                        .submit(
                            crash_ops(round, n),
                            Box::new(move |r| {
                                r.expect("commit");
                                print_committed(n);
                            }),
                        )
                        .unwrap();
                }
            });
        }
    });
}

#[test]
fn sigkill_never_loses_a_committed_batch() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut report = Vec::new();
    for (round, &(durability, paced)) in ROUNDS.iter().enumerate() {
        let mut child = Command::new(&exe)
            .args([
                "crash_writer_child",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ROUND, round.to_string())
            .env(CHILD_MODE, format!("{durability:?}/{paced}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let committed = Arc::new(Mutex::new(Vec::<u64>::new()));
        let reader = {
            let committed = committed.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    // Only whole lines count: a line cut by the kill proves nothing.
                    if !line.ends_with('\n') {
                        break;
                    }
                    if let Some(pos) = line.find(MARK) {
                        let n = line[pos + MARK.len()..].trim_end().parse::<u64>().unwrap();
                        committed.lock().unwrap().push(n);
                    }
                }
            })
        };
        // Wait for the first commits, then kill at a random moment 0..600 ms later.
        wait_for("the child's first commit", Duration::from_secs(60), || {
            !committed.lock().unwrap().is_empty()
        });
        let delay = Duration::from_millis(random_u64() % 600);
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child was killed");
        reader.join().unwrap();
        let committed = committed.lock().unwrap().clone();

        let engine = FjallEngine::open(dir.path()).unwrap();
        let missing: Vec<u64> = committed
            .iter()
            .copied()
            .filter(|&n| {
                let key = crash_key(round, n);
                engine
                    .get(Space::Messages, key.as_bytes())
                    .unwrap()
                    .is_none()
                    || get(&engine, Space::Sessions, &key) != Some(n.to_string())
            })
            .collect();
        assert!(
            missing.is_empty(),
            "round {round} ({durability:?}, paced {paced}): acknowledged batches lost: {missing:?}"
        );
        // Atomicity: every batch is wholly there or wholly absent, also the unacknowledged ones
        // (the store may hold batches that were written but not yet reported done).
        let prefix = format!("r{round:02}/");
        let in_messages = engine.count(Space::Messages, prefix.as_bytes()).unwrap();
        let in_sessions = engine.count(Space::Sessions, prefix.as_bytes()).unwrap();
        assert_eq!(
            in_messages, in_sessions,
            "round {round}: a batch is half there"
        );
        let stored = engine
            .scan(Space::Sessions, prefix.as_bytes(), None, usize::MAX)
            .unwrap();
        for (key, _) in &stored {
            assert!(
                engine.get(Space::Messages, key).unwrap().is_some(),
                "round {round}: batch {} is half there",
                String::from_utf8_lossy(key)
            );
        }
        assert!(in_messages >= committed.len() as u64);
        report.push(format!(
            "round {round} ({durability:?}, {}): killed {} ms after the first commit; \
             {} acknowledged, all present; {} stored",
            if paced { "paced" } else { "burst" },
            delay.as_millis(),
            committed.len(),
            in_messages
        ));
    }
    println!("{}", report.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// A real full disk: a small tmpfs (needs root and mount(2); skipped where unavailable).

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_writes_with_quota_exceeded_and_recovers() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("skipped: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mount(mnt.clone());
    let store = mnt.join("store");
    let engine = FjallEngine::open(&store).unwrap();
    engine
        .apply(&[put(Space::Meta, "before", "1")], true)
        .unwrap();

    // Fill the file system.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
    }
    // Incompressible (fjall compresses large journal entries with lz4).
    let mut x = random_u64() | 1;
    let big: Vec<u8> = (0..256 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let err = engine
        .apply(
            &[
                put(Space::Meta, "k1", "small"),
                Op::put(Space::Retained, "big", big.clone()),
            ],
            true,
        )
        .unwrap_err();
    assert!(err.is_disk_full(), "{err:?}");
    assert_eq!(err.reason_code(), ReasonCode::QUOTA_EXCEEDED);
    println!("full disk: {err}");
    // Reads still work; further writes fail fast with the same kind of error.
    assert_eq!(get(&engine, Space::Meta, "before").as_deref(), Some("1"));
    let err = engine
        .apply(&[put(Space::Meta, "k2", "v")], true)
        .unwrap_err();
    assert!(err.is_disk_full(), "{err:?}");

    // Free the space: after the back-off, the engine reopens the store and writes work again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.apply(
            &[
                put(Space::Meta, "k3", "v"),
                Op::put(Space::Retained, "big2", big.clone()),
            ],
            true,
        ) {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "writes never recovered: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_eq!(get(&engine, Space::Meta, "before").as_deref(), Some("1"));
    assert_eq!(get(&engine, Space::Meta, "k3").as_deref(), Some("v"));
    assert_eq!(
        get(&engine, Space::Meta, "k1"),
        None,
        "the failed batch was not applied"
    );
    assert_eq!(engine.get(Space::Retained, b"big").unwrap(), None);
    drop(engine);
    let engine = FjallEngine::open(&store).unwrap();
    assert_eq!(get(&engine, Space::Meta, "k3").as_deref(), Some("v"));
    assert_eq!(get(&engine, Space::Meta, "k1"), None);
    drop(engine);
}

#[test]
fn fjall_flushed_tables_survive_reopen() {
    // Small memtables, so the data goes through flushes to on-disk tables (and compactions).
    let dir = tempfile::tempdir().unwrap();
    let options = ferry_store::FjallOptions {
        cache_bytes: 1 << 20,
        memtable_bytes: 1 << 20,
    };
    {
        let e = FjallEngine::open_with(dir.path(), options).unwrap();
        for chunk in 0..40u32 {
            let ops: Vec<Op> = (0..500u32)
                .map(|i| {
                    Op::put(
                        Space::Messages,
                        format!("q/{chunk:03}/{i:04}"),
                        vec![chunk as u8; 300],
                    )
                })
                .collect();
            e.apply(&ops, chunk % 2 == 0).unwrap();
        }
        // Delete half of it again.
        for chunk in 0..20u32 {
            let ops: Vec<Op> = (0..500u32)
                .map(|i| Op::delete(Space::Messages, format!("q/{chunk:03}/{i:04}")))
                .collect();
            e.apply(&ops, true).unwrap();
        }
        assert_eq!(e.count(Space::Messages, b"q/").unwrap(), 10_000);
    }
    let e = FjallEngine::open_with(dir.path(), options).unwrap();
    assert_eq!(e.count(Space::Messages, b"q/").unwrap(), 10_000);
    assert_eq!(e.get(Space::Messages, b"q/019/0000").unwrap(), None);
    assert_eq!(
        e.get(Space::Messages, b"q/039/0499").unwrap(),
        Some(vec![39u8; 300])
    );
    let page = e
        .scan(Space::Messages, b"q/", Some(b"q/019/0499"), 2)
        .unwrap();
    assert_eq!(keys(&page), ["q/020/0000", "q/020/0001"]);
}
