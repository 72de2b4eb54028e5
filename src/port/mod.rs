//! The completion port: the IOCP contract as a safe Rust type.
//!
//! A [`CompletionPort`] takes operations ([`Op`]) that own their buffers,
//! runs them on a backend (io_uring on Linux, or epoll where io_uring is
//! unavailable; IOCP on Windows; see [`BackendKind`]), and hands their completions
//! to any number of worker threads. It owns the policy the classic IOCP design gets from
//! the Windows kernel:
//!
//! - **Sharing one port among workers.** A ring has one completion consumer,
//!   so the workers take turns as *leader*: one thread at a time waits in the
//!   kernel and reaps a batch; the rest of the batch goes to a ready queue
//!   that other workers take from. When the leader leaves to process its
//!   completions and another worker is idle, that worker is woken to lead.
//! - **LIFO wake-up.** Idle workers wait on a stack; the most recently idle
//!   (warmest cache) is woken first, as GetQueuedCompletionStatus does.
//! - **Concurrency limit.** At most `concurrency` workers process completions
//!   at once (a worker counts from the moment `get` returns to it until it
//!   calls `get` again); the rest wait even if completions are ready.
//! - **Posting.** [`CompletionPort::post`] queues a custom completion from
//!   any thread (PostQueuedCompletionStatus).
//!
//! On Windows the backend is the kernel's own completion port, which does
//! all of this itself: the port is then *native* (see [`sys`]), every worker
//! waits in GetQueuedCompletionStatusEx at once, the concurrency limit is
//! the kernel port's, and `post` is PostQueuedCompletionStatus.
//!
//! What this module must not do: touch the OS. Everything platform specific
//! is behind [`sys`]'s backend contract. See docs/DESIGN.md for the life of
//! an operation and why only worker threads enter the kernel.

#[cfg(loom)]
mod model;
pub mod sys;

// The port's scheduling runs on the OS backend, or on a model kernel when
// loom checks it (`--cfg loom`, see `model`).
#[cfg(loom)]
use model::Backend;
#[cfg(not(loom))]
use sys::Backend;

use crate::sync::thread::{self, Thread};
use crate::sync::{Arc, AtomicBool, Mutex, MutexGuard, Ordering};
use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::marker::PhantomData;
// Counters of native ports only, which loom does not model.
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::op::{Completion, Op, OpId, Outcome};

/// Which backend a port runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// io_uring if the kernel allows it (set-up and every opcode cport
    /// uses), otherwise poll. The choice and its reason are logged once.
    #[default]
    Auto,
    /// io_uring, or an error saying why it is unavailable.
    Uring,
    /// epoll readiness turned into completions: works where io_uring is
    /// blocked (container seccomp profiles, `kernel.io_uring_disabled`, old
    /// kernels).
    Poll,
    /// Windows I/O completion ports (the default there; an error elsewhere).
    Iocp,
}

impl BackendKind {
    /// Lower-case name, as `--backend` spells it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Uring => "uring",
            BackendKind::Poll => "poll",
            BackendKind::Iocp => "iocp",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<BackendKind, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "uring" => Ok(BackendKind::Uring),
            "poll" => Ok(BackendKind::Poll),
            "iocp" => Ok(BackendKind::Iocp),
            other => Err(format!(
                "unknown backend '{other}' (use auto, uring, poll or iocp)"
            )),
        }
    }
}

/// How to build a port.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// The backend to run on (default: `Auto`).
    pub backend: BackendKind,
    /// At most this many workers process completions at once (default: cores).
    pub concurrency: usize,
    /// Submission-queue entries (the completion queue gets four times as
    /// many unless `cq_entries` says otherwise).
    pub entries: u32,
    /// Completion-queue entries (0: four times `entries`; at least
    /// `entries`). Small rings are for testing what happens when the queues
    /// fill up; the environment variable `CPORT_RING_ENTRIES=SQ[:CQ]`
    /// overrides both sizes for every io_uring port of a process.
    pub cq_entries: u32,
    /// Receive buffers in the pool (rounded up to a power of two).
    pub recv_bufs: u32,
    /// Size of each receive buffer in bytes.
    pub recv_buf_size: u32,
    /// Promise that exactly one thread will ever be this port's worker. The
    /// backend may then use cheaper kernel notification (io_uring
    /// `COOP_TASKRUN`), which would stall completions of operations
    /// submitted by a worker sleeping outside the kernel.
    pub single_worker: bool,
    /// Slots in a registered-file table for sockets held without a process
    /// descriptor (io_uring direct descriptors; at most the descriptor
    /// limit; 0: none). Ignored by backends without one.
    pub direct_files: u32,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            backend: BackendKind::Auto,
            concurrency: thread::available_parallelism().map_or(2, |n| n.get()),
            entries: 4096,
            cq_entries: 0,
            recv_bufs: 4096,
            recv_buf_size: 4096,
            single_worker: false,
            direct_files: 0,
        }
    }
}

/// Queue-limit counters of a port's backend (see
/// [`CompletionPort::ring_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Completions the kernel dropped because the completion queue and its
    /// overflow list were full (io_uring's `cq_overflow` counter). A dropped
    /// completion is a lost operation: this must stay 0.
    pub cq_overflow: u64,
    /// Times the leader found the completion queue full when it reaped:
    /// further completions then wait in the kernel's overflow list (not
    /// lost) until the next reap.
    pub cq_full: u64,
    /// Submissions that found the submission queue full and waited in the
    /// backend's own backlog until a worker could hand them over.
    pub sq_full: u64,
}

/// A completion port. Cheap to clone; all clones are the same port.
#[derive(Clone)]
pub struct CompletionPort {
    inner: Arc<Inner>,
}

struct Inner {
    sys: Backend,
    state: Mutex<State>,
    concurrency: usize,
    /// Native ports: posts the kernel refused wait in `state.ready`.
    has_ready: AtomicBool,
    /// Native ports: workers inside the kernel's wait, and workers between
    /// a `get` returning to them and their next `get` (for the counters
    /// only; the kernel port enforces the concurrency limit).
    native_idle: AtomicUsize,
    native_running: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Completions reaped (or posted) and not yet taken by a worker.
    ready: VecDeque<Completion>,
    /// Idle workers, most recent last (LIFO).
    waiters: Vec<Arc<Waiter>>,
    /// A worker is (about to be) waiting in the kernel.
    leader: bool,
    /// Workers between `get` returning to them and their next `get`.
    running: usize,
}

struct Waiter {
    thread: Thread,
    notified: AtomicBool,
}

crate::sync::thread_local! {
    /// The port whose worker runs on this thread (address of its `Inner`).
    static WORKER_OF: Cell<usize> = const { Cell::new(0) };
}

impl fmt::Debug for CompletionPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionPort")
            .field("backend", &self.backend())
            .field("concurrency", &self.inner.concurrency)
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl CompletionPort {
    /// Creates a port on the backend `config.backend` asks for.
    pub fn new(config: &PortConfig) -> io::Result<CompletionPort> {
        let sys = Backend::new(config)?;
        Ok(CompletionPort {
            inner: Arc::new(Inner {
                sys,
                state: Mutex::new(State::default()),
                concurrency: config.concurrency.max(1),
                has_ready: AtomicBool::new(false),
                native_idle: AtomicUsize::new(0),
                native_running: AtomicUsize::new(0),
            }),
        })
    }

    /// Name of the backend running this port ("uring", "poll", "iocp").
    pub fn backend(&self) -> &'static str {
        self.inner.sys.name()
    }

    /// The concurrency limit.
    pub fn concurrency(&self) -> usize {
        self.inner.concurrency
    }

    /// Turns an accepted or connected socket into what operations use: on
    /// a port with a registered-file table with room, the socket moves into
    /// the table and its process descriptor is closed; otherwise it stays an
    /// ordinary socket.
    pub fn make_direct(&self, socket: Socket) -> crate::op::Sock {
        self.inner.sys.make_direct(socket)
    }

    /// Slots in the port's registered-file table (0 without one).
    pub fn direct_capacity(&self) -> usize {
        self.inner.sys.direct_capacity()
    }

    /// Makes `socket` usable with this port. Each operation carries its own
    /// key (the per-handle context), given to [`submit`](Self::submit).
    pub fn associate(&self, socket: &Socket) -> io::Result<()> {
        self.inner.sys.associate(socket)
    }

    /// Submits an operation whose completion will carry `key`. The port owns
    /// the operation (and its buffers) until that completion is taken.
    ///
    /// From a worker thread of this port the submission is batched and
    /// reaches the kernel when the worker next calls `get`; from any other
    /// thread an idle worker is woken to hand it over.
    pub fn submit(&self, key: u64, op: Op) -> io::Result<OpId> {
        let id = self.inner.sys.submit(key, op)?;
        if !self.on_worker_thread() {
            self.kick();
        }
        Ok(id)
    }

    /// Asks for operation `id` to complete early. It still completes exactly
    /// once, with an error if it was cancelled; an id that already completed
    /// is ignored.
    pub fn cancel(&self, id: OpId) -> io::Result<()> {
        self.inner.sys.cancel(id)?;
        if !self.on_worker_thread() {
            self.kick();
        }
        Ok(())
    }

    /// Queues a custom completion `Outcome::Posted(value)` with `key`, from
    /// any thread (PostQueuedCompletionStatus).
    pub fn post(&self, key: u64, value: u64) {
        if self.inner.sys.native() {
            match self.inner.sys.post(key, value) {
                Ok(()) => return,
                Err(e) => {
                    // The kernel port could not take the packet (out of
                    // memory): queue it here, where `get_native` looks too.
                    tracing::warn!("cannot post to the completion port: {e}");
                    self.inner.lock().ready.push_back(Completion {
                        key,
                        op: None,
                        outcome: Outcome::Posted(value),
                    });
                    self.inner.has_ready.store(true, Ordering::Release);
                    self.inner.sys.wake();
                    return;
                }
            }
        }
        let mut st = self.inner.lock();
        st.ready.push_back(Completion {
            key,
            op: None,
            outcome: Outcome::Posted(value),
        });
        self.inner.notify(&mut st);
    }

    /// Whether a receive or send pending on a socket stays pending after
    /// `shutdown(Both)` of that socket (IOCP), so that closing must cancel
    /// it; on io_uring and epoll the shutdown itself ends it.
    pub fn shutdown_leaves_ops(&self) -> bool {
        self.inner.sys.native()
    }

    /// Operations submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.inner.sys.outstanding()
    }

    /// Pooled receive buffers currently lent out.
    pub fn bufs_leased(&self) -> usize {
        self.inner.sys.bufs_leased()
    }

    /// How the backend's kernel queues coped with their limits: completions
    /// the kernel dropped, and how often the completion queue was found
    /// full (always zero on backends without such queues).
    pub fn ring_stats(&self) -> RingStats {
        self.inner.sys.ring_stats()
    }

    /// Completions reaped or posted and not yet taken by a worker.
    pub fn queued(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// Workers idle in `get`: the leader waiting in the kernel plus those
    /// on the waiter stack.
    pub fn idle_workers(&self) -> usize {
        if self.inner.sys.native() {
            return self.inner.native_idle.load(Ordering::Relaxed);
        }
        let st = self.inner.lock();
        st.waiters.len() + usize::from(st.leader)
    }

    /// Workers between `get` returning to them and their next `get`.
    pub fn running_workers(&self) -> usize {
        if self.inner.sys.native() {
            return self.inner.native_running.load(Ordering::Relaxed);
        }
        self.inner.lock().running
    }

    /// Registers the calling thread as a worker of this port. A thread can
    /// be a worker of one port at a time; the returned value cannot leave
    /// the thread.
    pub fn worker(&self) -> Worker {
        WORKER_OF.with(|w| {
            assert_eq!(
                w.get(),
                0,
                "this thread is already a completion-port worker"
            );
            w.set(Arc::as_ptr(&self.inner) as usize);
        });
        Worker {
            port: self.clone(),
            running: false,
            batch: VecDeque::new(),
            waiter: Arc::new(Waiter {
                thread: thread::current(),
                notified: AtomicBool::new(false),
            }),
            _not_send: PhantomData,
        }
    }

    fn on_worker_thread(&self) -> bool {
        WORKER_OF.with(|w| w.get() == Arc::as_ptr(&self.inner) as usize)
    }

    /// Makes sure a worker will hand queued submissions to the kernel soon.
    fn kick(&self) {
        let mut st = self.inner.lock();
        if st.leader {
            drop(st);
            self.inner.sys.wake();
        } else if st.running < self.inner.concurrency
            && let Some(w) = st.waiters.pop()
        {
            w.wake();
        }
        // Otherwise every worker is running and flushes on its next `get`.
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After the state changed: wake whoever should act on it.
    fn notify(&self, st: &mut State) {
        if st.running >= self.concurrency {
            return;
        }
        if let Some(w) = st.waiters.pop() {
            // Ready work for it, or nobody in the kernel: it takes the work
            // or becomes the leader.
            if !st.ready.is_empty() || !st.leader {
                w.wake();
            } else {
                st.waiters.push(w);
            }
        } else if !st.ready.is_empty() && st.leader {
            // The only idle worker is in the kernel: bring it back.
            self.sys.wake();
        }
    }
}

impl Waiter {
    fn wake(&self) {
        self.notified.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// A worker thread's handle on a port: takes completions with `get`.
///
/// While the value lives the thread is one of the port's workers: its
/// submissions are batched until its next `get`, and it counts against the
/// concurrency limit from a `get` returning to its next `get` (or drop).
pub struct Worker {
    port: CompletionPort,
    running: bool,
    batch: VecDeque<Completion>,
    waiter: Arc<Waiter>,
    _not_send: PhantomData<*const ()>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.running)
            .finish()
    }
}

impl Worker {
    /// The port this worker serves.
    pub fn port(&self) -> &CompletionPort {
        &self.port
    }

    /// Waits for one completion, at most `timeout` (`None`: forever).
    /// `Ok(None)` means the timeout passed.
    pub fn get(&mut self, timeout: Option<Duration>) -> io::Result<Option<Completion>> {
        let mut v = Vec::with_capacity(1);
        self.get_many(&mut v, 1, timeout)?;
        Ok(v.pop())
    }

    /// Waits for completions and appends up to `max` of them to `out`;
    /// returns how many (0 when the timeout passed). Queued submissions of
    /// this thread reach the kernel here.
    pub fn get_many(
        &mut self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let inner = &*self.port.inner;
        let max = max.max(1);
        if inner.sys.native() {
            return self.get_native(out, max, timeout);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        // Hand over what this worker queued while it ran, whatever happens
        // next: a worker that takes its next completions straight from the
        // ready queue would otherwise leave them behind a leader asleep in
        // the kernel.
        let flushed = inner.sys.flush();
        let mut st = inner.lock();
        if self.running {
            self.running = false;
            st.running -= 1;
        }
        if let Err(e) = flushed {
            inner.notify(&mut st);
            return Err(e);
        }
        loop {
            if !st.ready.is_empty() && st.running < inner.concurrency {
                let n = max.min(st.ready.len());
                out.extend(st.ready.drain(..n));
                st.running += 1;
                self.running = true;
                inner.notify(&mut st);
                return Ok(n);
            }
            let now = Instant::now();
            let expired = deadline.is_some_and(|d| now >= d);
            if !st.leader && st.running < inner.concurrency && !expired {
                st.leader = true;
                drop(st);
                let remaining = deadline.map(|d| d.saturating_duration_since(now));
                let r = inner.sys.wait(remaining, &mut self.batch);
                st = inner.lock();
                st.leader = false;
                st.ready.append(&mut self.batch);
                if let Err(e) = r {
                    inner.notify(&mut st);
                    return Err(e);
                }
                continue;
            }
            if expired {
                return Ok(0);
            }
            // Follower: hand our batched submissions over, then sleep on the
            // LIFO stack until woken or the deadline.
            self.waiter.notified.store(false, Ordering::Relaxed);
            st.waiters.push(self.waiter.clone());
            drop(st);
            let flushed = inner.sys.flush();
            while !self.waiter.notified.load(Ordering::Acquire) {
                match deadline {
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            break;
                        }
                        thread::park_timeout(d - now);
                    }
                    None => thread::park(),
                }
            }
            st = inner.lock();
            if !self.waiter.notified.load(Ordering::Acquire) {
                st.waiters.retain(|w| !Arc::ptr_eq(w, &self.waiter));
            }
            flushed?;
        }
    }
}

impl Worker {
    /// `get_many` on a native port: every worker waits in the kernel at
    /// once, which applies the concurrency limit and wakes the most recent
    /// waiter first (IOCP does both), so there is no leader to elect here.
    fn get_native(
        &mut self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let inner = &*self.port.inner;
        if self.running {
            self.running = false;
            inner.native_running.fetch_sub(1, Ordering::Relaxed);
        }
        if inner.has_ready.load(Ordering::Acquire) {
            let mut st = inner.lock();
            let n = max.min(st.ready.len());
            out.extend(st.ready.drain(..n));
            if st.ready.is_empty() {
                inner.has_ready.store(false, Ordering::Release);
            }
            if n > 0 {
                self.running = true;
                inner.native_running.fetch_add(1, Ordering::Relaxed);
                return Ok(n);
            }
        }
        inner.native_idle.fetch_add(1, Ordering::Relaxed);
        let r = inner.sys.get(timeout, max, &mut self.batch);
        inner.native_idle.fetch_sub(1, Ordering::Relaxed);
        let n = self.batch.len();
        out.extend(self.batch.drain(..));
        if n > 0 {
            self.running = true;
            inner.native_running.fetch_add(1, Ordering::Relaxed);
        }
        r.map(|()| n)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let inner = &*self.port.inner;
        if inner.sys.native() {
            if self.running {
                inner.native_running.fetch_sub(1, Ordering::Relaxed);
            }
            WORKER_OF.with(|w| w.set(0));
            return;
        }
        let _ = inner.sys.flush();
        let mut st = inner.lock();
        if self.running {
            self.running = false;
            st.running -= 1;
        }
        st.waiters.retain(|w| !Arc::ptr_eq(w, &self.waiter));
        inner.notify(&mut st);
        drop(st);
        WORKER_OF.with(|w| w.set(0));
    }
}
