//! The engine's watch thread: the work that must never run on a worker.
//!
//! - **Process figures.** The resident memory behind STATS, `/stats` and
//!   `/metrics` is read from `/proc` (a file read) once a second here and
//!   cached, so answering STATS costs the same with ten connections or
//!   twenty thousand. (CPU time is read when asked: one system call that
//!   costs nothing per connection or descriptor.)
//! - **Worker stalls.** Each worker writes the time it took a batch of
//!   completions from its port, and what it is handling, into its own slot
//!   (relaxed stores, on a cache line of its own), and clears the time
//!   when it goes back to the port. This thread looks at the slots every
//!   few tens of milliseconds: a worker away from its port for longer than
//!   the stall threshold (100 ms by default) is counted once per stall
//!   (`worker_stalls` in STATS and `/metrics`) and logged, at most once a
//!   second, with the worker, the completion it is handling and the
//!   connection.
//! - **Memory after a burst.** Once the load has dropped and the bytes
//!   queued for sending have fallen far from their peak (a burst of unread
//!   replies drained or dropped) or connections have left, the allocator is
//!   asked to give its free pages back to the operating system
//!   (`malloc_trim` with glibc), at most every few seconds. Not while the
//!   load lasts: the trim holds the allocator's locks while it walks its
//!   free lists, and the workers allocate. After a trim each worker, woken
//!   for it, returns the free top of its own arena, which the trim cannot
//!   (`port::sys::trim_thread_heap`). (`cport server` also makes
//!   glibc keep less free memory in the first place, see
//!   `port::sys::limit_heap_retention`.) See docs/reliability/hostile.md
//!   for the figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::op::Outcome;
use crate::server::ConnId;
use crate::server::engine::Shared;

/// What a worker is handling, as stored in its slot.
pub(crate) mod doing {
    pub(crate) const RECEIVE: u64 = 1;
    pub(crate) const SEND: u64 = 2;
    pub(crate) const FILE_SEND: u64 = 3;
    pub(crate) const CONNECT: u64 = 4;
    pub(crate) const POSTED: u64 = 5;
    pub(crate) const ACCEPT: u64 = 6;
    pub(crate) const TIMER: u64 = 7;
    pub(crate) const OTHER: u64 = 8;
}

fn doing_name(d: u64) -> &'static str {
    match d {
        doing::RECEIVE => "a receive (decoding, on_frame/on_data)",
        doing::SEND => "a send completion",
        doing::FILE_SEND => "a file send completion",
        doing::CONNECT => "a connect (on_open)",
        doing::POSTED => "a posted value (on_posted, an inbox)",
        doing::ACCEPT => "an accept (on_open)",
        doing::TIMER => "a timer (on_timer, idle or flush checks)",
        doing::OTHER => "a completion",
        _ => "nothing recorded",
    }
}

/// The kind of work a completion's outcome leads to.
pub(crate) fn doing_of(o: &Outcome) -> u64 {
    match o {
        Outcome::Received(_) | Outcome::ReceivedMulti { .. } => doing::RECEIVE,
        Outcome::Sent { .. } => doing::SEND,
        Outcome::SentFile { .. } => doing::FILE_SEND,
        Outcome::Connected { .. } => doing::CONNECT,
        Outcome::Posted(_) => doing::POSTED,
        Outcome::Accepted { .. } => doing::ACCEPT,
        Outcome::Timer(_) => doing::TIMER,
        _ => doing::OTHER,
    }
}

/// One worker's slot, on cache lines of its own.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot {
    /// Nanoseconds since the engine started (plus one) at which the worker
    /// took its current batch; 0 while it waits on its port.
    since: AtomicU64,
    /// The completion key it is handling.
    key: AtomicU64,
    /// What it is doing (see [`doing`]).
    doing: AtomicU64,
}

/// The stall threshold used when none is configured.
pub const DEFAULT_STALL_THRESHOLD: Duration = Duration::from_millis(100);

/// The watch state an engine shares with its workers.
#[derive(Debug)]
pub(crate) struct Watch {
    slots: Box<[Slot]>,
    names: Vec<String>,
    started: Instant,
    stall_after: Duration,
    stalls: AtomicU64,
    /// Resident memory in bytes at the last sample (0: unknown).
    rss: AtomicU64,
    /// Bumped after each trim: each worker then returns its own arena's
    /// free top (see `port::sys::trim_thread_heap`).
    trims: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Watch {
    /// Watch state for workers named `names` (index = worker index).
    pub(crate) fn new(names: Vec<String>, started: Instant, stall_after: Duration) -> Watch {
        Watch {
            slots: names.iter().map(|_| Slot::default()).collect(),
            names,
            started,
            stall_after,
            stalls: AtomicU64::new(0),
            rss: AtomicU64::new(crate::port::sys::process_rss().unwrap_or(0)),
            trims: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64 + 1
    }

    /// Worker `w` took a batch from its port.
    #[inline]
    pub(crate) fn begin(&self, w: usize) {
        if let Some(s) = self.slots.get(w) {
            s.since.store(self.now_ns(), Ordering::Relaxed);
        }
    }

    /// Worker `w` is handling `what` for completion key `key`.
    #[inline]
    pub(crate) fn doing(&self, w: usize, key: u64, what: u64) {
        if let Some(s) = self.slots.get(w) {
            s.key.store(key, Ordering::Relaxed);
            s.doing.store(what, Ordering::Relaxed);
        }
    }

    /// Worker `w` goes back to its port.
    #[inline]
    pub(crate) fn end(&self, w: usize) {
        if let Some(s) = self.slots.get(w) {
            s.since.store(0, Ordering::Relaxed);
        }
    }

    /// Called by a worker after each batch: returns its arena's free top
    /// when a trim happened since it last looked (`seen`).
    #[inline]
    pub(crate) fn after_batch(&self, seen: &mut u64) {
        let t = self.trims.load(Ordering::Relaxed);
        if t != *seen {
            *seen = t;
            crate::port::sys::trim_thread_heap();
        }
    }

    /// Stalls counted so far.
    pub(crate) fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// Resident memory at the last sample, if it could be read.
    pub(crate) fn rss(&self) -> Option<u64> {
        let r = self.rss.load(Ordering::Relaxed);
        (r != 0).then_some(r)
    }

    /// Ends [`run`]: called once, by the engine's shutdown.
    pub(crate) fn stop(&self) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Sleeps up to `d`; true once stopped.
    fn sleep(&self, d: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if *stop {
            return true;
        }
        let (stop, _) = self
            .wake
            .wait_timeout(stop, d)
            .unwrap_or_else(|e| e.into_inner());
        *stop
    }
}

/// How the watch thread decides to give free memory back: once the
/// completion rate has fallen to a quarter of its peak and the memory is
/// known to be free (queued replies drained, connections closed) or
/// resident memory grew while the rate fell further, at most every few
/// seconds (the last reason less often while trims find little to give
/// back).
#[derive(Debug)]
struct Trim {
    /// Since the last trim: most bytes queued for sending, most
    /// connections open, most completions in one tick.
    peak_queued: usize,
    peak_open: u64,
    peak_rate: u64,
    completions: u64,
    /// The least resident memory seen at start or after a trim.
    floor: u64,
    /// The last trim was for drained replies or closed connections: one
    /// more once those figures have stopped moving, for what was freed
    /// after it (connections still closing, queues still draining).
    follow_up: bool,
    /// Queued bytes and open connections at the last tick.
    was: (usize, u64),
    last: Instant,
    /// Wait at least this long before trimming for quiet growth.
    every: Duration,
}

/// Bytes of queued replies that must have drained before a trim is worth it.
const TRIM_DRAINED: usize = 16 << 20;
/// Growth of resident memory over its least that a quiet engine tries to
/// give back.
const TRIM_GROWN: u64 = 32 << 20;
const TRIM_EVERY_MIN: Duration = Duration::from_secs(2);
const TRIM_EVERY_MAX: Duration = Duration::from_secs(60);

impl Trim {
    fn new(shared: &Shared, rss: u64) -> Trim {
        Trim {
            peak_queued: 0,
            peak_open: 0,
            peak_rate: 0,
            completions: shared.stats.completions_total(),
            floor: rss,
            follow_up: false,
            was: (0, 0),
            last: Instant::now(),
            every: TRIM_EVERY_MIN,
        }
    }

    /// Called about once a second with the resident memory just read.
    fn tick(&mut self, shared: &Shared, watch: &Watch, rss: u64) {
        let queued = shared.queued_total.load(Ordering::Relaxed);
        let open = shared.stats.open();
        let total = shared.stats.completions_total();
        let rate = total.wrapping_sub(self.completions);
        self.completions = total;
        self.peak_queued = self.peak_queued.max(queued);
        self.peak_open = self.peak_open.max(open);
        self.peak_rate = self.peak_rate.max(rate);
        let drained = self.peak_queued.saturating_sub(queued) >= TRIM_DRAINED
            && queued <= self.peak_queued / 4;
        let left = self.peak_open.saturating_sub(open) >= (self.peak_open / 4).max(16);
        // Not while replies pile up unread: that memory is in use.
        let quiet = rss >= self.floor + TRIM_GROWN
            && rate <= self.peak_rate / 8
            && queued <= self.peak_queued / 4;
        let settled = self.follow_up && self.was == (queued, open);
        self.was = (queued, open);
        // Whatever the reason, not while the load lasts: the workers would
        // wait for the allocator's locks.
        if rate > self.peak_rate / 4 {
            return;
        }
        // Replies drained and connections gone free memory for certain:
        // those trim every few seconds at most. Growth while quiet may be
        // memory in use: that trims less often each time it finds little.
        let wait = if drained || left || settled {
            TRIM_EVERY_MIN
        } else {
            self.every
        };
        if !(drained || left || quiet || settled) || self.last.elapsed() < wait {
            return;
        }
        let t = Instant::now();
        let released = crate::port::sys::trim_heap();
        let took = t.elapsed();
        watch.trims.fetch_add(1, Ordering::Relaxed);
        shared.wake_workers();
        // The workers return their arenas' tops as they wake.
        std::thread::sleep(Duration::from_millis(50));
        let after = crate::port::sys::process_rss().unwrap_or(rss);
        watch.rss.store(after, Ordering::Relaxed);
        let gave = rss.saturating_sub(after);
        tracing::debug!(
            "load dropped (queued replies drained: {drained}, connections left: {left}, quiet: {quiet}, settled: {settled}); \
             gave {} MiB of free memory back to the system in {took:?} (resident {} MiB)",
            gave >> 20,
            after >> 20
        );
        self.every = if released && gave >= (8 << 20) {
            TRIM_EVERY_MIN
        } else {
            (self.every * 2).min(TRIM_EVERY_MAX)
        };
        self.last = Instant::now();
        self.follow_up = drained || left;
        self.peak_queued = queued;
        self.peak_open = open;
        self.peak_rate = rate;
        self.floor = self.floor.min(after);
    }
}

/// The watch thread's loop, until [`Watch::stop`].
pub(crate) fn run(shared: Arc<Shared>) {
    let watch = &shared.watch;
    // Often enough to see a stall soon after it passes the threshold.
    let tick = (watch.stall_after / 2).clamp(Duration::from_millis(10), Duration::from_millis(50));
    let mut counted = vec![0u64; watch.slots.len()];
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    let mut next_sample = Instant::now() + Duration::from_secs(1);
    let mut trim = Trim::new(&shared, watch.rss.load(Ordering::Relaxed));
    let stall_ns = watch.stall_after.as_nanos() as u64;
    while !watch.sleep(tick) {
        let now = watch.now_ns();
        for (w, s) in watch.slots.iter().enumerate() {
            let since = s.since.load(Ordering::Relaxed);
            if since == 0 || counted[w] == since || now.saturating_sub(since) < stall_ns {
                continue;
            }
            counted[w] = since;
            let n = watch.stalls.fetch_add(1, Ordering::Relaxed) + 1;
            if last_log.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                unlogged += 1;
                continue;
            }
            last_log = Some(Instant::now());
            let key = s.key.load(Ordering::Relaxed);
            let what = doing_name(s.doing.load(Ordering::Relaxed));
            let conn = if key >> 62 == 0 && key != 0 {
                format!("connection {}", ConnId(key))
            } else {
                "no connection".to_string()
            };
            let more = if unlogged > 0 {
                format!("; {unlogged} more not logged")
            } else {
                String::new()
            };
            unlogged = 0;
            tracing::warn!(
                "worker {} stalled: away from its port for {} ms (threshold {} ms), handling {what} on {conn}; {n} stall(s) so far{more}",
                watch.names[w],
                (now - since) / 1_000_000,
                watch.stall_after.as_millis()
            );
        }
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + Duration::from_secs(1);
            if let Some(rss) = crate::port::sys::process_rss() {
                watch.rss.store(rss, Ordering::Relaxed);
                trim.tick(&shared, watch, rss);
            }
        }
    }
}
