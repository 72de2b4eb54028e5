//! The poll backend: epoll readiness turned into completions, for machines
//! where io_uring is unavailable (a container's seccomp profile, the
//! `kernel.io_uring_disabled` sysctl, an old kernel).
//!
//! Owns one epoll instance, an eventfd in it that wakes the leader, the
//! table of operations in flight (a slab of boxes, as on io_uring, plus
//! which socket side each occupies and a deadline set for timers), and the
//! receive pool. It gives the same completions as the io_uring backend:
//! nothing above `sys` can tell them apart except by
//! [`name`](Backend::name).
//!
//! # How readiness becomes a completion
//!
//! `submit` (any thread) only records the operation:
//!
//! - a receive or an accept arms read interest on its socket at once
//!   (`epoll_ctl` is thread-safe, and the kernel reports a socket that is
//!   already readable, so a leader inside `epoll_wait` is woken by the
//!   kernel itself);
//! - a send, a connect and a close go on a queue for the leader to *try*
//!   first, because a socket is nearly always writable: a send then costs
//!   one `sendmsg` and no `epoll_ctl`. Only if the kernel says `EAGAIN`
//!   (or `EINPROGRESS` for a connect) is write interest armed;
//! - a timer goes into a deadline set that bounds the leader's wait.
//!
//! `wait` (the port's leader, one thread at a time) calls `epoll_wait`,
//! then does all the I/O: takes the operations whose socket is ready and
//! those queued, performs them *outside* the table lock (so submitters on
//! other threads never wait for a syscall of the leader's), and turns each
//! result into a completion. A receive takes a pool chunk only then, when
//! the socket is readable, so an idle connection holds no buffer. A result
//! of `EAGAIN` (a spurious wake-up) puts the operation back to wait.
//!
//! # Triggering: one-shot
//!
//! Every socket is registered `EPOLLONESHOT`: an event disarms the socket
//! until the leader re-arms it with the interest of whatever operations are
//! still waiting on it. Chosen over the alternatives because:
//!
//! - **level-triggered** would report a readable socket again and again
//!   while no receive is posted (the engine posts the next receive only
//!   after handling the last one, on another thread perhaps), so interest
//!   would have to be removed after every completion: two `epoll_ctl` per
//!   operation instead of one;
//! - **edge-triggered** needs no `epoll_ctl` at all, but an edge that
//!   arrives while no operation waits must be remembered in user space and
//!   a later submission must then hand the operation to the leader itself,
//!   waking it across threads; the kernel no longer does that wake-up for
//!   us, and every lost-edge race is ours to get right;
//! - **one-shot** costs one `epoll_ctl` per receive (at submission) and
//!   none per send that succeeds at once; an event is delivered to one
//!   `epoll_wait` only, and a submission that arms a socket which is
//!   already ready is reported by the kernel to the leader in `epoll_wait`.
//!   Re-arming happens under the table lock from the current set of
//!   waiting operations, so the interest the kernel holds is always that of
//!   the last state written; a stale or duplicate event only makes the
//!   leader try an operation that then says `EAGAIN`.
//!
//! Events carry the descriptor number, and the table knows a socket by its
//! number. Ops hold their socket by `Arc`, and an op's entry leaves the
//! table before the op's reference to its socket is dropped, so a number
//! cannot be closed and reused for a new socket while the table still has
//! an operation on it. An event for a number whose operations are all gone
//! finds nothing to do.
//!
//! # Cancellation
//!
//! `cancel` marks the operation and queues the cancel for the leader, which
//! completes the target with `ECANCELED` (a timer with
//! `ErrorKind::Interrupted`) unless it completed first; as on io_uring the
//! target completes exactly once and a stale id matches nothing. A close is
//! not cancellable (it runs at the leader's next pass anyway).
//!
//! # Waking the leader
//!
//! A submission from a worker thread is handed over at that worker's next
//! `flush` or `wait`, as on io_uring: `flush` writes the eventfd if work is
//! queued while a leader sleeps in `epoll_wait`. The port itself calls
//! `wake` for submissions from other threads.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::{SockAddr, Socket};

use crate::buf::RecvBuf;
use crate::op::{Completion, MAX_SEND_BUFS, Op, OpId, Outcome, Sock};
use crate::port::PortConfig;

use super::pool::Pool;

/// Event data of the wake-up eventfd (socket events carry their descriptor).
const WAKE_TOKEN: u64 = u64::MAX;
/// Events taken from the kernel per `epoll_wait`.
const MAX_EVENTS: usize = 256;
/// Connections accepted per readiness event before the listener is re-armed
/// (and other sockets get their turn).
const ACCEPT_BATCH: usize = 64;

/// Which side of its socket an operation occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Receive or accept: waits for read readiness.
    Read,
    /// Send or connect: waits for write readiness.
    Write,
    /// Close or timer: no readiness involved.
    None,
}

/// Where an operation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// On the queue for the leader to try (send, connect, close).
    Queued,
    /// Waiting for readiness (interest armed) or for its deadline (timer).
    Waiting,
    /// Taken by the leader, which is doing its I/O outside the lock.
    Busy,
}

/// One operation in flight.
struct InFlight {
    /// The completion key given at submission.
    key: u64,
    /// The slot's generation (the high half of the `OpId`).
    generation: u32,
    /// The socket whose side the operation occupies (-1 for `Side::None`).
    fd: RawFd,
    /// Which side of `fd`.
    side: Side,
    /// Where it is in its life.
    stage: Stage,
    /// `cancel` was called; the leader completes it with `ECANCELED`.
    cancelled: bool,
    /// A connect whose `connect(2)` already returned `EINPROGRESS`.
    connecting: bool,
    /// A timer's deadline (its key in `Table::timers` with the op id).
    deadline: Option<Instant>,
    /// The operation, owning socket and buffers; `None` while `Busy`.
    op: Option<Op>,
    /// Submitted as [`Op::RecvMulti`]: run as a single receive whose
    /// outcome says the receive ended (`more == false`).
    multi: bool,
}

/// The outcome of a finished op, as the kind it was submitted as.
fn as_submitted(multi: bool, outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Received(result) if multi => Outcome::ReceivedMulti {
            result,
            more: false,
        },
        o => o,
    }
}

/// The operations waiting on one socket: at most one per side.
#[derive(Debug, Default)]
struct FdOps {
    /// Slab index of the receive or accept.
    read: Option<usize>,
    /// Slab index of the send or connect.
    write: Option<usize>,
}

/// Work for the leader's next pass.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Try a queued operation.
    Start(OpId),
    /// Complete an operation with `ECANCELED` unless it completed already.
    Cancel(OpId),
}

/// Everything behind the backend's lock.
struct Table {
    /// Operations in flight, by slot.
    ops: Slab<Box<InFlight>>,
    /// Generation given to the next operation (never 0).
    next_gen: u32,
    /// Operations per socket, by descriptor.
    fds: HashMap<RawFd, FdOps>,
    /// Work for the leader.
    queue: VecDeque<Work>,
    /// Timers, earliest first: (deadline, raw op id).
    timers: BTreeSet<(Instant, u64)>,
}

/// An operation taken out of the table for the leader to perform.
struct Task {
    idx: usize,
    id: OpId,
    key: u64,
    connecting: bool,
    op: Op,
}

/// What performing an operation came to.
enum Attempt {
    /// It finished with this outcome.
    Done(Outcome),
    /// Not ready after all: it waits again (`connecting` for a connect in
    /// progress).
    Again { op: Op, connecting: bool },
}

/// The result of one task: accepted connections (a multishot accept that
/// stays armed) and how the operation ended or whether it waits again.
struct Performed {
    idx: usize,
    id: OpId,
    key: u64,
    accepted: Vec<Socket>,
    attempt: Attempt,
    /// The op's socket, kept open until its entry has left the table: if
    /// the op held the last reference, closing it earlier would free the
    /// descriptor number for a new socket while the table still says an
    /// operation occupies it.
    hold: Option<Arc<Socket>>,
}

/// The epoll completion backend.
pub(crate) struct Backend {
    /// The epoll instance.
    epoll: OwnedFd,
    /// Written by `wake`; level-triggered in the epoll set.
    eventfd: OwnedFd,
    /// Operations, sockets, the leader's queue and the timers.
    table: Mutex<Table>,
    /// Receive chunks.
    pool: Arc<Pool>,
    /// Operations submitted and not yet completed.
    outstanding: AtomicUsize,
    /// The leader is in (or about to enter) `epoll_wait`.
    in_wait: AtomicBool,
    /// Work was queued (or a timer added) since the leader last looked.
    queued: AtomicBool,
    /// The eventfd was written and the leader has not drained it yet.
    woken: AtomicBool,
    /// The leader's event buffer.
    events: Mutex<Vec<libc::epoll_event>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("poll::Backend")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

fn cancelled_error() -> io::Error {
    io::Error::from_raw_os_error(libc::ECANCELED)
}

/// The outcome of an operation cancelled before it completed, handing back
/// what it owned.
fn cancelled(op: Op) -> Outcome {
    op.into_failed(cancelled_error)
}

/// Milliseconds for `epoll_wait`, rounded up so that a wait never ends
/// before its deadline (which would spin until it passes).
fn timeout_ms(d: Duration) -> i32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    ms.min(i32::MAX as u128) as i32
}

impl Table {
    fn entry(&mut self, id: OpId) -> Option<(usize, &mut InFlight)> {
        let idx = (id.0 & 0xFFFF_FFFF) as usize;
        let generation = (id.0 >> 32) as u32;
        match self.ops.get_mut(idx) {
            Some(e) if e.generation == generation => Some((idx, e)),
            _ => None,
        }
    }

    /// Removes operation `idx` from the table (and from its socket's sides
    /// and the timers); returns its entry.
    fn remove(&mut self, idx: usize, id: OpId) -> Box<InFlight> {
        let e = self.ops.remove(idx);
        if e.side != Side::None
            && let Some(f) = self.fds.get_mut(&e.fd)
        {
            match e.side {
                Side::Read if f.read == Some(idx) => f.read = None,
                Side::Write if f.write == Some(idx) => f.write = None,
                _ => {}
            }
            if f.read.is_none() && f.write.is_none() {
                self.fds.remove(&e.fd);
            }
        }
        if let Some(d) = e.deadline {
            self.timers.remove(&(d, id.0));
        }
        e
    }

    /// The readiness the operations waiting on `fd` need.
    fn interest(&self, fd: RawFd) -> u32 {
        let Some(f) = self.fds.get(&fd) else {
            return 0;
        };
        let mut ev = 0;
        if f.read.is_some() {
            ev |= libc::EPOLLIN as u32;
        }
        if let Some(w) = f.write
            && self.ops.get(w).is_some_and(|e| e.stage == Stage::Waiting)
        {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }

    /// Takes operation `idx` out for the leader to perform.
    fn take(&mut self, idx: usize) -> Option<Task> {
        let e = self.ops.get_mut(idx)?;
        let op = e.op.take()?;
        e.stage = Stage::Busy;
        Some(Task {
            idx,
            id: OpId(((e.generation as u64) << 32) | idx as u64),
            key: e.key,
            connecting: e.connecting,
            op,
        })
    }
}

impl Backend {
    pub(crate) fn new(cfg: &PortConfig) -> io::Result<Backend> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the
        // result is checked before it is wrapped.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before it is wrapped.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let backend = Backend {
            epoll,
            eventfd,
            table: Mutex::new(Table {
                ops: Slab::new(),
                next_gen: 1,
                fds: HashMap::new(),
                queue: VecDeque::new(),
                timers: BTreeSet::new(),
            }),
            pool: Arc::new(Pool::new(cfg.recv_bufs, cfg.recv_buf_size)?),
            outstanding: AtomicUsize::new(0),
            in_wait: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            events: Mutex::new(vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS]),
        };
        // The eventfd stays level-triggered: readable until the leader
        // drains it, so a wake-up is never lost between two waits.
        backend.ctl(
            libc::EPOLL_CTL_ADD,
            backend.eventfd.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE_TOKEN,
        )?;
        Ok(backend)
    }

    pub(crate) fn name(&self) -> &'static str {
        "poll"
    }

    /// Makes the socket nonblocking (the leader must never block in a
    /// syscall) and registers it, disarmed, so that arming it later is a
    /// single `EPOLL_CTL_MOD`.
    pub(crate) fn associate(&self, socket: &Socket) -> io::Result<()> {
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        match self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            libc::EPOLLONESHOT as u32,
            fd as u64,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` is a valid epoll_event on our stack for the duration
        // of the call; the kernel copies it.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Arms `fd` (one-shot) for `events`; registers it first if it never was
    /// (a socket submitted without `associate`, or a reused number).
    fn arm(&self, fd: RawFd, events: u32) -> io::Result<()> {
        let ev = events | libc::EPOLLONESHOT as u32;
        match self.ctl(libc::EPOLL_CTL_MOD, fd, ev, fd as u64) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.ctl(libc::EPOLL_CTL_ADD, fd, ev, fd as u64)
            }
            r => r,
        }
    }

    pub(crate) fn submit(&self, key: u64, op: Op) -> io::Result<OpId> {
        // Readiness has no multishot receive: run it as a single one.
        let (op, multi) = match op {
            Op::RecvMulti { socket } => (Op::Recv { socket }, true),
            op => (op, false),
        };
        if let Op::Recv { socket } | Op::Send { socket, .. } | Op::SendFile { socket, .. } = &op
            && socket.os().is_none()
        {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the poll backend has no registered-file (direct) sockets",
            ));
        }
        let (side, fd) = match &op {
            Op::Accept { listener } => (Side::Read, listener.as_raw_fd()),
            Op::Recv { socket } | Op::RecvMulti { socket } => (Side::Read, sock_fd(socket)),
            Op::Send { socket, bufs } => {
                if bufs.is_empty() || bufs.len() > MAX_SEND_BUFS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a send carries 1 to MAX_SEND_BUFS buffers",
                    ));
                }
                (Side::Write, sock_fd(socket))
            }
            Op::SendFile { socket, .. } => (Side::Write, sock_fd(socket)),
            Op::Connect { socket, .. } => (Side::Write, socket.as_raw_fd()),
            Op::Close { .. } | Op::Timeout { .. } | Op::Shutdown { .. } => (Side::None, -1),
        };
        // Receives and sends pass MSG_DONTWAIT, but accept4 and connect have
        // no such flag: a listener shared by two ports must not block the
        // leader that loses the race for a connection.
        match &op {
            Op::Accept { listener: s }
            | Op::Connect { socket: s, .. }
            | Op::SendFile {
                socket: Sock::Os(s),
                ..
            } => s.set_nonblocking(true)?,
            _ => {}
        }
        let mut t = self.lock();
        if side != Side::None {
            let f = t.fds.get(&fd);
            let busy = match side {
                Side::Read => f.is_some_and(|f| f.read.is_some()),
                _ => f.is_some_and(|f| f.write.is_some()),
            };
            if busy {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    match side {
                        Side::Read => {
                            "a receive or accept is already in flight on this socket (poll backend)"
                        }
                        _ => "a send or connect is already in flight on this socket (poll backend)",
                    },
                ));
            }
        }
        let generation = t.next_gen;
        t.next_gen = t.next_gen.wrapping_add(1).max(1);
        let stage = match op {
            Op::Accept { .. } | Op::Recv { .. } | Op::Timeout { .. } => Stage::Waiting,
            _ => Stage::Queued,
        };
        let deadline = match op {
            Op::Timeout { after } => Some(Instant::now() + after),
            _ => None,
        };
        let idx = t.ops.insert(Box::new(InFlight {
            key,
            generation,
            fd,
            side,
            stage,
            cancelled: false,
            connecting: false,
            deadline,
            op: Some(op),
            multi,
        }));
        let id = OpId(((generation as u64) << 32) | idx as u64);
        match side {
            Side::Read => t.fds.entry(fd).or_default().read = Some(idx),
            Side::Write => t.fds.entry(fd).or_default().write = Some(idx),
            Side::None => {}
        }
        if side == Side::Read {
            let interest = t.interest(fd);
            if let Err(e) = self.arm(fd, interest) {
                t.remove(idx, id);
                return Err(e);
            }
        }
        if stage == Stage::Queued {
            t.queue.push_back(Work::Start(id));
            self.queued.store(true, Ordering::SeqCst);
        }
        if let Some(d) = deadline {
            t.timers.insert((d, id.0));
            // The leader may be sleeping past this deadline.
            self.queued.store(true, Ordering::SeqCst);
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    pub(crate) fn cancel(&self, id: OpId) -> io::Result<()> {
        let mut t = self.lock();
        if let Some((_, e)) = t.entry(id)
            && !matches!(e.op, Some(Op::Close { .. }))
            && !e.cancelled
        {
            e.cancelled = true;
            t.queue.push_back(Work::Cancel(id));
            self.queued.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Hands work queued by this worker to a leader asleep in `epoll_wait`.
    pub(crate) fn flush(&self) -> io::Result<()> {
        // Pairs with `wait`: the leader stores `in_wait` and then reads
        // `queued`; a submitter stores `queued` and then (here) reads
        // `in_wait`. With sequential consistency at least one of the two
        // sees the other's store, so queued work is never left behind a
        // sleeping leader.
        if self.queued.load(Ordering::SeqCst) && self.in_wait.load(Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        self.in_wait.store(true, Ordering::SeqCst);
        let ms = if self.queued.load(Ordering::SeqCst) {
            0
        } else {
            let next_timer = self.lock().timers.first().map(|(d, _)| *d);
            let now = Instant::now();
            let until_timer = next_timer.map(|d| d.saturating_duration_since(now));
            match (timeout, until_timer) {
                (Some(a), Some(b)) => timeout_ms(a.min(b)),
                (Some(a), None) => timeout_ms(a),
                (None, Some(b)) => timeout_ms(b),
                (None, None) => -1,
            }
        };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `events` is a buffer of MAX_EVENTS initialised entries that
        // nobody else uses while we hold its lock; the kernel writes at most
        // that many.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                MAX_EVENTS as i32,
                ms,
            )
        };
        self.in_wait.store(false, Ordering::SeqCst);
        let n = if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
            0
        } else {
            n as usize
        };
        let mut ready = Vec::with_capacity(n);
        let mut woken = false;
        for ev in &events[..n] {
            let (data, bits) = (ev.u64, ev.events);
            if data == WAKE_TOKEN {
                woken = true;
            } else {
                ready.push((data as RawFd, bits));
            }
        }
        drop(events);
        if woken {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes into a local array from our own
            // nonblocking eventfd.
            unsafe {
                libc::read(self.eventfd.as_raw_fd(), v.as_mut_ptr().cast(), 8);
            }
            // Cleared only after draining. Cleared before, a `wake` landing
            // between the two would write a count that this read swallows
            // and leave the flag set with the eventfd empty: every later
            // `wake` would be skipped. Cleared after, a `wake` in between
            // is skipped, but this leader has not gone back to sleep and
            // looks at the table and the port's queue next.
            self.woken.store(false, Ordering::SeqCst);
        }
        self.process(&ready, out);
        Ok(())
    }

    /// The leader's pass: take what is ready or queued, perform it outside
    /// the lock, then record the results and re-arm what still waits.
    fn process(&self, ready: &[(RawFd, u32)], out: &mut VecDeque<Completion>) {
        let mut tasks = Vec::new();
        {
            let mut t = self.lock();
            self.queued.store(false, Ordering::SeqCst);
            let readable =
                (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32;
            let writable = (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32;
            for &(fd, bits) in ready {
                let Some(f) = t.fds.get(&fd) else {
                    continue;
                };
                let (r, w) = (f.read, f.write);
                if bits & readable != 0
                    && let Some(idx) = r
                    && t.ops[idx].stage == Stage::Waiting
                {
                    tasks.extend(t.take(idx));
                }
                if bits & writable != 0
                    && let Some(idx) = w
                    && t.ops[idx].stage == Stage::Waiting
                {
                    tasks.extend(t.take(idx));
                }
            }
            let work = std::mem::take(&mut t.queue);
            for w in work {
                match w {
                    Work::Start(id) => {
                        if let Some((idx, e)) = t.entry(id)
                            && e.stage == Stage::Queued
                        {
                            tasks.extend(t.take(idx));
                        }
                    }
                    Work::Cancel(id) => {
                        // A busy target (taken just above) is completed as
                        // cancelled after its attempt, unless it finished.
                        if let Some((idx, e)) = t.entry(id)
                            && e.stage != Stage::Busy
                        {
                            let e = t.remove(idx, id);
                            self.outstanding.fetch_sub(1, Ordering::Relaxed);
                            if let Some(op) = e.op {
                                out.push_back(Completion {
                                    key: e.key,
                                    op: Some(id),
                                    outcome: as_submitted(e.multi, cancelled(op)),
                                });
                            }
                        }
                    }
                }
            }
            let now = Instant::now();
            while let Some(&(due, raw)) = t.timers.first() {
                if due > now {
                    break;
                }
                let id = OpId(raw);
                let idx = (raw & 0xFFFF_FFFF) as usize;
                let e = t.remove(idx, id);
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                out.push_back(Completion {
                    key: e.key,
                    op: Some(id),
                    outcome: Outcome::Timer(Ok(())),
                });
            }
        }
        if tasks.is_empty() && ready.is_empty() {
            return;
        }
        let done: Vec<Performed> = tasks.into_iter().map(|t| self.perform(t)).collect();
        // Dropped after the lock (below): the last reference closes a socket.
        let mut holds = Vec::with_capacity(done.len());
        let mut t = self.lock();
        let mut rearm: Vec<RawFd> = ready.iter().map(|&(fd, _)| fd).collect();
        for p in done {
            let id = p.id;
            holds.push(p.hold);
            for s in p.accepted {
                out.push_back(Completion {
                    key: p.key,
                    op: Some(id),
                    outcome: Outcome::Accepted {
                        result: Ok(s),
                        more: true,
                    },
                });
            }
            let outcome = match p.attempt {
                Attempt::Done(o) => o,
                Attempt::Again { op, connecting } => {
                    let e = &mut t.ops[p.idx];
                    if e.cancelled {
                        cancelled(op)
                    } else {
                        e.op = Some(op);
                        e.stage = Stage::Waiting;
                        e.connecting = connecting;
                        rearm.push(e.fd);
                        continue;
                    }
                }
            };
            let e = t.remove(p.idx, id);
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            out.push_back(Completion {
                key: p.key,
                op: Some(id),
                outcome: as_submitted(e.multi, outcome),
            });
        }
        rearm.sort_unstable();
        rearm.dedup();
        for fd in rearm {
            let interest = t.interest(fd);
            if interest == 0 {
                continue;
            }
            if let Err(e) = self.arm(fd, interest) {
                // Cannot wait on this socket any more: complete what waits
                // on it with the error rather than leave it hanging.
                tracing::error!(fd, "cannot re-arm a socket in epoll: {e}");
                self.fail_fd(&mut t, fd, &e, out);
            }
        }
        drop(t);
        drop(holds);
    }

    /// Completes every operation waiting on `fd` with `err`.
    fn fail_fd(&self, t: &mut Table, fd: RawFd, err: &io::Error, out: &mut VecDeque<Completion>) {
        let waiting: Vec<usize> = match t.fds.get(&fd) {
            Some(f) => [f.read, f.write]
                .into_iter()
                .flatten()
                .filter(|&idx| t.ops[idx].stage == Stage::Waiting)
                .collect(),
            None => return,
        };
        for idx in waiting {
            let id = OpId(((t.ops[idx].generation as u64) << 32) | idx as u64);
            let e = t.remove(idx, id);
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            let Some(op) = e.op else { continue };
            let outcome = as_submitted(
                e.multi,
                op.into_failed(|| io::Error::new(err.kind(), err.to_string())),
            );
            out.push_back(Completion {
                key: e.key,
                op: Some(id),
                outcome,
            });
        }
    }

    /// Performs one operation (the leader, outside the lock).
    fn perform(&self, task: Task) -> Performed {
        let Task {
            idx,
            id,
            key,
            connecting,
            op,
        } = task;
        let mut accepted = Vec::new();
        let hold = match &op {
            Op::Recv { socket }
            | Op::RecvMulti { socket }
            | Op::Send { socket, .. }
            | Op::SendFile { socket, .. } => socket.os().cloned(),
            Op::Connect { socket, .. } => Some(socket.clone()),
            Op::Accept { listener } => Some(listener.clone()),
            Op::Shutdown { socket, .. } => socket.os().cloned(),
            Op::Close { .. } | Op::Timeout { .. } => None,
        };
        let attempt = match op {
            Op::Recv {
                socket: Sock::Os(socket),
            } => self.recv(socket),
            Op::Accept { listener } => accept(listener, &mut accepted),
            Op::Send {
                socket: Sock::Os(socket),
                bufs,
            } => send(socket, bufs),
            Op::SendFile {
                socket: Sock::Os(socket),
                file,
                offset,
                len,
                copy,
            } => send_file(socket, file, offset, len, copy),
            Op::Connect { socket, addr } => connect(socket, addr, connecting),
            // Refused at submit: poll never holds direct sockets (and a
            // multishot receive was turned into a single one there).
            op @ (Op::Recv { .. }
            | Op::RecvMulti { .. }
            | Op::Send { .. }
            | Op::SendFile { .. }) => Attempt::Done(cancelled(op)),
            Op::Shutdown { socket, how } => Attempt::Done(Outcome::Shut(match socket.os() {
                Some(s) => s.shutdown(how),
                None => Err(io::Error::from(io::ErrorKind::Unsupported)),
            })),
            Op::Close { socket } => {
                let fd = socket.into_raw_fd();
                // SAFETY: the op owned the only reference to this socket,
                // and `into_raw_fd` gave up ownership: nothing else closes
                // or uses the descriptor.
                let r = unsafe { libc::close(fd) };
                // Linux frees the descriptor even when close reports EINTR.
                let e = io::Error::last_os_error();
                Attempt::Done(Outcome::Closed(
                    if r < 0 && e.raw_os_error() != Some(libc::EINTR) {
                        Err(e)
                    } else {
                        Ok(())
                    },
                ))
            }
            // Timers never become tasks: they complete in `process`.
            op @ Op::Timeout { .. } => Attempt::Again {
                op,
                connecting: false,
            },
        };
        Performed {
            idx,
            id,
            key,
            accepted,
            attempt,
            hold,
        }
    }

    /// Receives into a pool chunk taken now that the socket is readable.
    fn recv(&self, socket: Arc<Socket>) -> Attempt {
        let flags = libc::MSG_DONTWAIT;
        let Some(mut chunk) = self.pool.take() else {
            // Pool empty. Only report it if there really is something to
            // read; the engine retries later, as with io_uring's ENOBUFS.
            let mut probe = [MaybeUninit::<u8>::uninit(); 1];
            return loop {
                match socket.recv_with_flags(&mut probe, flags | libc::MSG_PEEK) {
                    Ok(0) => break Attempt::Done(Outcome::Received(Ok(RecvBuf::eof()))),
                    Ok(_) => {
                        break Attempt::Done(Outcome::Received(Err(io::Error::from_raw_os_error(
                            libc::ENOBUFS,
                        ))));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        break Attempt::Again {
                            op: Op::Recv {
                                socket: Sock::Os(socket),
                            },
                            connecting: false,
                        };
                    }
                    Err(e) => break Attempt::Done(Outcome::Received(Err(e))),
                }
            };
        };
        loop {
            match socket.recv_with_flags(chunk.buf(), flags) {
                // EOF: the chunk goes back to the pool.
                Ok(0) => return Attempt::Done(Outcome::Received(Ok(RecvBuf::eof()))),
                Ok(n) => return Attempt::Done(Outcome::Received(Ok(chunk.into_recv_buf(n)))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Attempt::Again {
                        op: Op::Recv {
                            socket: Sock::Os(socket),
                        },
                        connecting: false,
                    };
                }
                Err(e) => return Attempt::Done(Outcome::Received(Err(e))),
            }
        }
    }

    pub(crate) fn wake(&self) {
        if self.woken.swap(true, Ordering::SeqCst) {
            return; // written and not drained yet: the leader will wake
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our own eventfd.
        unsafe {
            libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub(crate) fn bufs_leased(&self) -> usize {
        self.pool.leased()
    }
}

/// Accepts up to [`ACCEPT_BATCH`] connections. The accept stays armed
/// (`Again`) until an error ends it, as io_uring's multishot accept does.
fn accept(listener: Arc<Socket>, accepted: &mut Vec<Socket>) -> Attempt {
    while accepted.len() < ACCEPT_BATCH {
        // SAFETY: null address pointers are allowed (we do not want the peer
        // address here); the listener descriptor is kept open by the op.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new descriptor that nothing else
            // owns.
            accepted.push(unsafe { Socket::from_raw_fd(fd) });
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => break,
            // EMFILE, ENFILE, ENOBUFS, ...: end the accept with the error;
            // the engine decides whether to back off before re-arming.
            _ => {
                return Attempt::Done(Outcome::Accepted {
                    result: Err(e),
                    more: false,
                });
            }
        }
    }
    Attempt::Again {
        op: Op::Accept { listener },
        connecting: false,
    }
}

/// One gathered, nonblocking `sendmsg`. A short write completes with the
/// count (the caller resumes); `EAGAIN` waits for write readiness.
fn send(socket: Arc<Socket>, bufs: Vec<bytes::Bytes>) -> Attempt {
    let mut iov = [IoSlice::new(&[]); MAX_SEND_BUFS];
    for (slot, b) in iov.iter_mut().zip(&bufs) {
        *slot = IoSlice::new(b);
    }
    let n = bufs.len().min(MAX_SEND_BUFS);
    loop {
        match socket.send_vectored_with_flags(&iov[..n], libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) {
            Ok(sent) => {
                return Attempt::Done(Outcome::Sent {
                    result: Ok(sent),
                    bufs,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Attempt::Again {
                    op: Op::Send {
                        socket: Sock::Os(socket),
                        bufs,
                    },
                    connecting: false,
                };
            }
            Err(e) => {
                return Attempt::Done(Outcome::Sent {
                    result: Err(e),
                    bufs,
                });
            }
        }
    }
}

/// The descriptor of an ordinary socket (direct ones are refused at submit).
fn sock_fd(s: &Sock) -> RawFd {
    s.os().map_or(-1, |s| s.as_raw_fd())
}

/// Most bytes one file send moves.
const FILE_CHUNK: usize = 1 << 20;

/// Sends up to `len` bytes of `file` from `offset`: zero-copy with
/// `sendfile(2)`, or (`copy`) read into a buffer and sent. The socket is
/// nonblocking, so a full socket buffer means waiting for EPOLLOUT.
fn send_file(
    socket: Arc<Socket>,
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
    copy: bool,
) -> Attempt {
    let chunk = len.min(FILE_CHUNK);
    loop {
        let r = if copy {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; chunk];
            match file.read_at(&mut buf, offset) {
                Ok(0) => Ok(0),
                Ok(n) => socket.send_with_flags(&buf[..n], libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT),
                Err(e) => Err(e),
            }
        } else {
            let mut off = offset as libc::off_t;
            // SAFETY: both descriptors are alive (the op holds their
            // owners) and `off` is a local the kernel updates.
            let n =
                unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, chunk) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        };
        match r {
            Ok(n) => {
                return Attempt::Done(Outcome::SentFile {
                    result: Ok(n),
                    file,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Attempt::Again {
                    op: Op::SendFile {
                        socket: Sock::Os(socket),
                        file,
                        offset,
                        len,
                        copy,
                    },
                    connecting: false,
                };
            }
            Err(e) => {
                return Attempt::Done(Outcome::SentFile {
                    result: Err(e),
                    file,
                });
            }
        }
    }
}

/// Starts a nonblocking connect, or (`connecting`) checks on one that the
/// kernel reported writable.
fn connect(socket: Arc<Socket>, addr: std::net::SocketAddr, connecting: bool) -> Attempt {
    let result = if !connecting {
        match socket.connect(&SockAddr::from(addr)) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINPROGRESS) | Some(libc::EALREADY) | Some(libc::EINTR)
                ) =>
            {
                return Attempt::Again {
                    op: Op::Connect { socket, addr },
                    connecting: true,
                };
            }
            Err(e) => Err(e),
        }
    } else {
        match socket.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            // No error: connected, unless the wake-up was spurious and the
            // handshake is still going.
            Ok(None) => match socket.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                    return Attempt::Again {
                        op: Op::Connect { socket, addr },
                        connecting: true,
                    };
                }
                Err(e) => Err(e),
            },
        }
    };
    Attempt::Done(Outcome::Connected { result, socket })
}

impl Drop for Backend {
    /// Nothing of an operation is ever in the kernel's hands between two
    /// syscalls of the leader, so dropping the table frees every operation
    /// (closing sockets whose last reference it held) with nothing to wait
    /// for; leased receive buffers keep the pool alive until they drop.
    fn drop(&mut self) {
        let t = self.table.get_mut().unwrap_or_else(|e| e.into_inner());
        if !t.ops.is_empty() {
            tracing::debug!(
                operations = t.ops.len(),
                "poll port dropped with operations in flight; they are dropped with it"
            );
        }
        t.ops.clear();
        t.fds.clear();
        t.queue.clear();
        t.timers.clear();
    }
}
