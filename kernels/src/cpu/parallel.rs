//! Fork-join for calls that last only microseconds, on the backend's own threads.
//!
//! A call splits its work into `n` numbered tasks. The calling thread works through them itself, and the helper
//! threads (`threads − 1` workers of the backend's rayon pool) claim tasks from the same atomic counter. The caller
//! never waits for a helper to *start*: it waits only for tasks a helper has already claimed. A helper that arrives
//! late finds no task left and returns without touching the caller's data.
//!
//! Between calls a helper spins for a short while ([`SPIN_BEFORE_PARK`]) before it parks: a decode step issues a
//! matmul every few microseconds, and waking a parked thread costs a futex call on the caller's side and tens of
//! microseconds of latency, both measured as several percent of a decode step with rayon's own job queue.
//!
//! When the machine has more runnable threads than cores, a helper can be preempted in the middle of a task and the
//! caller then waits a scheduler time slice for it. A call that waited for a helper much longer than it worked
//! itself suspends parallel execution for a while (10 ms, doubling up to 1 s while it keeps happening), so an
//! overloaded machine gets single-threaded speed instead of far less.
//!
//! Which thread runs a task never changes what the task computes, so results do not depend on the thread count.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling for the next call before it parks.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(200);

/// A wait for helpers longer than this (and longer than the caller's own work) counts as a stall.
const STALL: Duration = Duration::from_micros(200);

/// First and longest suspension of parallel execution after stalls.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Task body with its lifetime erased; only dereferenced for a claimed task, while the caller waits in [`Pool::run`].
type TaskFn = dyn Fn(usize) + Sync;

struct Job {
    /// Next task index to claim; indices `>= n` mean "nothing left".
    next: AtomicUsize,
    /// Claimed tasks that have finished (normally or by panicking).
    done: AtomicUsize,
    n: usize,
    f: *const TaskFn,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `f` points to a `Sync` closure and is only called for claimed tasks while the owning `Pool::run` call is
// still waiting for those tasks to finish, so sharing the pointer between threads is sound.
unsafe impl Send for Job {}
// SAFETY: as above; every other field is itself `Sync`.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none are left; returns early after a panic (recorded for the caller).
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: task `i < n` is claimed and not yet counted in `done`, so `Pool::run` is still waiting and the
            // closure behind `f` is alive.
            let f = unsafe { &*self.f };
            let result = panic::catch_unwind(AssertUnwindSafe(|| f(i)));
            let failed = result.is_err();
            if let Err(payload) = result {
                self.panic.lock().get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
            if failed {
                return;
            }
        }
    }
}

/// State shared by the caller and the helpers.
#[derive(Default)]
struct Shared {
    /// Bumped after each new job is published in `current`.
    epoch: AtomicU64,
    current: Mutex<Option<Arc<Job>>>,
    /// Helpers parked on `wake` (changed under `parked_lock`).
    parked: AtomicUsize,
    parked_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

impl Shared {
    /// Body of each helper thread: wait for a job, help with it, repeat until shutdown.
    fn helper_loop(&self) {
        let mut seen = self.epoch.load(Ordering::SeqCst);
        while self.wait_for_work(&mut seen) {
            let job = self.current.lock().clone();
            if let Some(job) = job {
                job.work();
            }
        }
    }

    /// Waits until the epoch moves past `seen` (true) or the pool shuts down (false): spinning first, then parked.
    fn wait_for_work(&self, seen: &mut u64) -> bool {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return false;
            }
            let epoch = self.epoch.load(Ordering::SeqCst);
            if epoch != *seen {
                *seen = epoch;
                return true;
            }
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(128) || start.elapsed() < SPIN_BEFORE_PARK {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = self.parked_lock.lock();
            self.parked.fetch_add(1, Ordering::SeqCst);
            // Checked after announcing the park: a publisher that missed the announcement bumped the epoch first.
            while self.epoch.load(Ordering::SeqCst) == *seen && !self.shutdown.load(Ordering::Acquire) {
                self.wake.wait(&mut guard);
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Makes `job` the current one and wakes parked helpers.
    fn publish(&self, job: &Arc<Job>) {
        *self.current.lock() = Some(Arc::clone(job));
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) > 0 {
            let _guard = self.parked_lock.lock();
            self.wake.notify_all();
        }
    }

    fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _guard = self.parked_lock.lock();
        self.wake.notify_all();
    }
}

/// The compute threads of one backend: the caller plus `threads − 1` helpers living on a private rayon pool.
pub(crate) struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    /// Time base of `serial_until`.
    origin: Instant,
    /// Nanoseconds after `origin` until which calls run on the caller alone (after a stall).
    serial_until: AtomicU64,
    /// Length of the next suspension, in nanoseconds (0 after a clean parallel call).
    backoff: AtomicU64,
    /// Owns the helper threads; each runs [`Shared::helper_loop`] until the pool is dropped.
    workers: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of `threads` compute threads in total (at least 1); the calling thread counts as one of them.
    pub(crate) fn new(threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared::default());
        let workers = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads - 1)
                .thread_name(|i| format!("shardline-cpu-{i}"))
                .build()?;
            let s = Arc::clone(&shared);
            pool.spawn_broadcast(move |_| s.helper_loop());
            Some(pool)
        } else {
            None
        };
        Ok(Self::with(threads, shared, workers))
    }

    /// A pool that computes on the calling thread only.
    pub(crate) fn single() -> Self {
        Self::with(1, Arc::new(Shared::default()), None)
    }

    fn with(threads: usize, shared: Arc<Shared>, workers: Option<rayon::ThreadPool>) -> Self {
        let (origin, serial_until, backoff) = (Instant::now(), AtomicU64::new(0), AtomicU64::new(0));
        Self { threads, shared, origin, serial_until, backoff, workers }
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Whether parallel calls are suspended after a recent stall.
    fn suspended(&self) -> bool {
        let until = self.serial_until.load(Ordering::Relaxed);
        until != 0 && self.now_ns() < until
    }

    /// Records how a parallel call went: a stall suspends parallel calls, with a growing suspension.
    fn record(&self, own: Duration, waited: Duration) {
        if waited > STALL && waited > own {
            let b = self.backoff.load(Ordering::Relaxed);
            let next = (2 * b).clamp(BACKOFF_MIN.as_nanos() as u64, BACKOFF_MAX.as_nanos() as u64);
            self.backoff.store(next, Ordering::Relaxed);
            self.serial_until.store(self.now_ns() + next, Ordering::Relaxed);
        } else if waited < STALL {
            self.backoff.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0) .. f(n − 1)`, each exactly once, spread over the compute threads; returns when all have finished.
    /// A panic in any task is re-raised here after every claimed task has finished.
    pub(crate) fn run(&self, n: usize, f: impl Fn(usize) + Sync) {
        if self.workers.is_none() || n <= 1 || self.suspended() {
            (0..n).for_each(f);
            return;
        }
        let f_ref: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: only the lifetime is erased. The pointer is dereferenced only for claimed tasks, and this function
        // does not return (or unwind) before `done` counts every claimed task, so `f` outlives every use.
        let f_ptr: *const TaskFn = unsafe { std::mem::transmute(f_ref) };
        let job = Arc::new(Job {
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            n,
            f: f_ptr,
            panic: Mutex::new(None),
        });
        let start = Instant::now();
        self.shared.publish(&job);
        job.work();
        let own = start.elapsed();
        // Stop further claims (a no-op unless the caller stopped early after a panic), then wait for claimed tasks.
        let claimed = job.next.fetch_add(n, Ordering::AcqRel).min(n);
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < claimed {
            // A helper still busy after a few microseconds may have been preempted: let it have this core.
            if spins < 1 << 8 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        self.record(own, start.elapsed() - own);
        let payload = job.panic.lock().take();
        if let Some(payload) = payload {
            panic::resume_unwind(payload);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

impl Pool {
    /// Runs `f` once for each item, spread over the compute threads (items are typically disjoint `&mut` chunks).
    pub(crate) fn run_each<T: Send>(&self, items: Vec<T>, f: impl Fn(T) + Sync) {
        if self.threads == 1 || items.len() <= 1 {
            items.into_iter().for_each(f);
            return;
        }
        let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|x| Mutex::new(Some(x))).collect();
        self.run(slots.len(), |i| {
            let item = slots[i].lock().take();
            if let Some(item) = item {
                f(item);
            }
        });
    }

    /// Splits `rows` rows of `width` values into chunks for the pool: one chunk when the whole op is smaller than
    /// `serial_elems` (a fork costs about a microsecond), otherwise about four per thread.
    pub(crate) fn row_chunks(&self, rows: usize, width: usize, serial_elems: usize) -> Vec<std::ops::Range<usize>> {
        let parts = if rows * width <= serial_elems { 1 } else { self.threads * 4 };
        split_range(rows, parts, 1)
    }
}

/// What an op needs to run: the backend's threads and whether its loops may use AVX2.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exec<'a> {
    pub pool: &'a Pool,
    pub avx2: bool,
}

/// Splits `0..len` into `parts` contiguous ranges whose boundaries are multiples of `align` (except the end).
pub(crate) fn split_range(len: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let parts = parts.clamp(1, units.max(1));
    (0..parts)
        .map(|p| {
            let a = (units * p / parts * align).min(len);
            let b = (units * (p + 1) / parts * align).min(len);
            a..b
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// Cuts `data` (rows of `width`) into the given consecutive row ranges, starting at row 0 (rows after the last range
/// are left out).
pub(crate) fn split_mut<'a, T>(
    mut data: &'a mut [T],
    chunks: &[std::ops::Range<usize>],
    width: usize,
) -> Vec<(std::ops::Range<usize>, &'a mut [T])> {
    let mut out = Vec::with_capacity(chunks.len());
    for range in chunks {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(range.len() * width);
        out.push((range.clone(), head));
        data = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_task_once() {
        let pool = Pool::new(3).unwrap();
        for n in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn panics_reach_the_caller() {
        let pool = Pool::new(2).unwrap();
        let r = panic::catch_unwind(AssertUnwindSafe(|| pool.run(8, |i| assert!(i != 5, "task five"))));
        assert!(r.is_err());
        pool.run(4, |_| {});
    }

    #[test]
    fn split_covers_the_range() {
        for (len, parts, align) in [(10, 3, 4), (576, 4, 4), (3, 8, 4), (0, 2, 1), (49152, 16, 4)] {
            let r = split_range(len, parts, align);
            assert_eq!(r.first().map_or(0, |r| r.start), 0);
            assert_eq!(r.last().map_or(0, |r| r.end), len);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].end % align, 0);
            }
        }
    }
}
