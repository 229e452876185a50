//! [`Writer`]: group commit on one writer thread.
//!
//! Submitters put batches on a bounded queue (a `VecDeque` under a mutex, at most
//! `queue_capacity` batches). The writer thread takes *everything* queued at once, concatenates
//! the ops into one [`Engine::apply`] (one write batch, one fsync under [`Durability::Sync`]) and
//! then calls each batch's `done` in queue order with the result. While it writes and fsyncs,
//! new batches queue up and become the next merged commit, so the number of fsyncs adapts to the
//! load: one per batch when idle, one per queue-full under pressure.
//!
//! Room in the queue is waited for on a condition variable by [`Writer::submit`] (it blocks the
//! calling thread) and with a waker by [`Writer::commit`] (it does not block an async runtime).

use crate::{Durability, Engine, Op, StoreError};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Counters of a [`Writer`], for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches queued and not yet taken by the writer thread.
    pub queue_depth: usize,
    /// The most batches the queue holds.
    pub queue_capacity: usize,
    /// Batches committed (or failed), in total.
    pub batches: u64,
    /// Ops in those batches.
    pub ops: u64,
    /// Merged commits (calls of [`Engine::apply`]); `batches / commits` is the merge factor.
    pub commits: u64,
    /// Merged commits made under [`Durability::Sync`], each ending with one fsync.
    pub fsyncs: u64,
    /// Merged commits that failed (every batch in them got the error).
    pub failed_commits: u64,
    /// The most batches merged into one commit.
    pub max_merged: u64,
    /// Duration of the last merged commit (write, plus fsync under `Sync`).
    pub last_commit_latency: Duration,
    /// Duration of the last merged commit that ended with an fsync (zero under `Async`).
    pub last_fsync_latency: Duration,
}

/// Group commit: ONE writer thread fed by a bounded queue. Batches that arrive while a
/// write+fsync is in progress are merged into the next single apply + single fsync; each
/// submitter is told when its batch is durable.
///
/// Dropping the writer (or [`Writer::stop`]) commits what is queued and stops the thread.
pub struct Writer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    durability: Durability,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a batch is queued or the writer is stopping.
    not_empty: Condvar,
    /// Signalled when the writer has emptied the queue or is stopping.
    not_full: Condvar,
    capacity: usize,
    counters: Counters,
}

struct State {
    queue: VecDeque<Pending>,
    stopping: bool,
    /// Async submitters waiting for room in the queue.
    waiters: Vec<Waker>,
}

struct Pending {
    ops: Vec<Op>,
    done: Done,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    failed_commits: AtomicU64,
    max_merged: AtomicU64,
    last_commit_nanos: AtomicU64,
    last_fsync_nanos: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `pending` if there is room; `Err(pending)` back if the queue is full.
    fn try_push(&self, state: &mut State, pending: Pending) -> Result<(), Pending> {
        if state.queue.len() >= self.capacity {
            return Err(pending);
        }
        state.queue.push_back(pending);
        self.not_empty.notify_one();
        Ok(())
    }

    fn begin_stop(&self) {
        let waiters = {
            let mut state = self.lock();
            state.stopping = true;
            std::mem::take(&mut state.waiters)
        };
        self.not_empty.notify_all();
        self.not_full.notify_all();
        waiters.into_iter().for_each(Waker::wake);
    }
}

impl Writer {
    /// Starts the writer thread. `queue_capacity` (at least 1) bounds the batches waiting to be
    /// committed; submitters wait while it is full.
    pub fn start(engine: Arc<dyn Engine>, durability: Durability, queue_capacity: usize) -> Writer {
        let capacity = queue_capacity.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity.min(4096)),
                stopping: false,
                waiters: Vec::new(),
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            counters: Counters::default(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || {
                run(
                    &thread_shared,
                    engine.as_ref(),
                    durability == Durability::Sync,
                )
            });
        let thread = match thread {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!(error = %e, "store: cannot start the writer thread");
                shared.begin_stop();
                None
            }
        };
        Writer {
            shared,
            thread: Mutex::new(thread),
            durability,
        }
    }

    /// The durability the writer commits with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Queues a batch; `done` runs on the writer thread with the result once applied (and
    /// fsynced under `Sync`). Blocks while the queue is full (bounded back-pressure), so call it
    /// from a plain thread, not from an async task (use [`Writer::commit`] there). Errors, without
    /// calling `done`, if the writer stopped or the batch is invalid ([`StoreError::InvalidOp`]).
    ///
    /// `done` should be quick (it delays the next commit); a panic in it is caught.
    pub fn submit(
        &self,
        ops: Vec<Op>,
        done: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
    ) -> Result<(), StoreError> {
        crate::fjall_engine::validate(&ops)?;
        let mut pending = Pending { ops, done };
        let mut state = self.shared.lock();
        loop {
            if state.stopping {
                return Err(StoreError::Stopped);
            }
            match self.shared.try_push(&mut state, pending) {
                Ok(()) => return Ok(()),
                Err(p) => pending = p,
            }
            state = self
                .shared
                .not_full
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Async convenience: queue the batch (waiting for room without blocking the thread) and
    /// wait until it is durable. Dropping the future before the batch is queued queues nothing;
    /// after that, the batch is committed anyway.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        crate::fjall_engine::validate(&ops)?;
        let slot = Arc::new(Slot::default());
        let completer = Completer(slot.clone());
        let pending = Pending {
            ops,
            done: Box::new(move |result| completer.complete(result)),
        };
        Enqueue {
            shared: &self.shared,
            pending: Some(pending),
        }
        .await?;
        Outcome(slot).await
    }

    /// Queue depth and counters, for metrics.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        let nanos = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        WriterStats {
            queue_depth: self.shared.lock().queue.len(),
            queue_capacity: self.shared.capacity,
            batches: c.batches.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            failed_commits: c.failed_commits.load(Ordering::Relaxed),
            max_merged: c.max_merged.load(Ordering::Relaxed),
            last_commit_latency: nanos(&c.last_commit_nanos),
            last_fsync_latency: nanos(&c.last_fsync_nanos),
        }
    }

    /// Commits what is queued (and under `Async` fsyncs it), then stops the thread (also on
    /// Drop). Submissions after this fail with [`StoreError::Stopped`].
    pub fn stop(self) {
        self.shutdown();
    }

    fn shutdown(&self) {
        self.shared.begin_stop();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("store: the writer thread panicked");
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The writer thread.
fn run(shared: &Shared, engine: &dyn Engine, sync: bool) {
    let counters = &shared.counters;
    // The error last logged, so that a failing disk is logged once rather than per commit.
    let mut failing: Option<StoreError> = None;
    loop {
        let (taken, waiters) = {
            let mut state = shared.lock();
            while state.queue.is_empty() && !state.stopping {
                state = shared
                    .not_empty
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if state.queue.is_empty() {
                break; // stopping, and everything queued is committed
            }
            let taken = std::mem::take(&mut state.queue);
            (taken, std::mem::take(&mut state.waiters))
        };
        shared.not_full.notify_all();
        waiters.into_iter().for_each(Waker::wake);

        let batches = taken.len();
        let mut ops = Vec::with_capacity(taken.iter().map(|p| p.ops.len()).sum());
        let mut dones = Vec::with_capacity(batches);
        for pending in taken {
            ops.extend(pending.ops);
            dones.push(pending.done);
        }

        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| engine.apply(&ops, sync)))
            .unwrap_or_else(|_| Err(StoreError::Io("the store engine panicked".into())));
        let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);

        counters
            .batches
            .fetch_add(batches as u64, Ordering::Relaxed);
        counters.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        counters.commits.fetch_add(1, Ordering::Relaxed);
        counters
            .max_merged
            .fetch_max(batches as u64, Ordering::Relaxed);
        counters.last_commit_nanos.store(elapsed, Ordering::Relaxed);
        if sync {
            counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            counters.last_fsync_nanos.store(elapsed, Ordering::Relaxed);
        }
        match &result {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("store: writes succeed again");
                }
            }
            Err(e) => {
                counters.failed_commits.fetch_add(1, Ordering::Relaxed);
                let same_kind = failing
                    .as_ref()
                    .is_some_and(|f| std::mem::discriminant(f) == std::mem::discriminant(e));
                if !same_kind {
                    tracing::error!(error = %e, batches, "store: commit failed; nothing of it was acknowledged");
                    failing = Some(e.clone());
                }
            }
        }
        drop(ops);

        for done in dones {
            let result = result.clone();
            if catch_unwind(AssertUnwindSafe(move || done(result))).is_err() {
                tracing::error!("store: a commit callback panicked");
            }
        }
    }
    if !sync {
        // Stopping under Async: make everything written so far durable.
        let flushed = catch_unwind(AssertUnwindSafe(|| engine.apply(&[], true)))
            .unwrap_or_else(|_| Err(StoreError::Io("the store engine panicked".into())));
        if let Err(e) = flushed {
            tracing::error!(error = %e, "store: final sync at stop failed");
        }
    }
}

/// Waits for room in the queue and queues the batch.
struct Enqueue<'a> {
    shared: &'a Shared,
    pending: Option<Pending>,
}

impl Future for Enqueue<'_> {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = self.shared;
        let Some(pending) = self.pending.take() else {
            return Poll::Ready(Ok(()));
        };
        let mut state = shared.lock();
        if state.stopping {
            return Poll::Ready(Err(StoreError::Stopped));
        }
        match shared.try_push(&mut state, pending) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(pending) => {
                if !state.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    state.waiters.push(cx.waker().clone());
                }
                drop(state);
                self.pending = Some(pending);
                Poll::Pending
            }
        }
    }
}

/// A one-shot result cell between the writer thread and an awaiting [`Writer::commit`].
#[derive(Default)]
struct Slot {
    inner: Mutex<SlotInner>,
}

#[derive(Default)]
struct SlotInner {
    result: Option<Result<(), StoreError>>,
    filled: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn set(&self, result: Result<(), StoreError>) {
        let waker = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if inner.filled {
                return;
            }
            inner.filled = true;
            inner.result = Some(result);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Fills the slot; if dropped without doing so (the batch was never committed), fills it with
/// [`StoreError::Stopped`] so that the waiting future cannot hang.
struct Completer(Arc<Slot>);

impl Completer {
    fn complete(self, result: Result<(), StoreError>) {
        self.0.set(result);
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.0.set(Err(StoreError::Stopped));
    }
}

struct Outcome(Arc<Slot>);

impl Future for Outcome {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.0.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.result.take() {
            Some(result) => Poll::Ready(result),
            None => {
                if !inner
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    inner.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}
