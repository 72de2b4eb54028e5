//! The io_uring backend: true completion-based I/O on Linux.
//!
//! Owns one ring, the table of operations in flight (each a `Box` whose
//! address never moves, so the pointers inside its SQE stay valid), the
//! provided-buffer ring receives draw from, and an eventfd that wakes a
//! thread blocked in `io_uring_enter`.
//!
//! Threading: any thread may push SQEs (under `sq`), but only the port's
//! worker threads enter the kernel (`flush`, `wait`), because io_uring runs a
//! request's task work in, and cancels it with, the task that submitted it.
//! Only the leader (one thread at a time, enforced by the port) reaps CQEs.

mod bufring;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;
use socket2::{SockAddr, Socket};

use crate::buf::RecvBuf;
use crate::op::{Completion, DirectSocket, DirectTable, MAX_SEND_BUFS, Op, OpId, Outcome, Sock};
use crate::port::{PortConfig, RingStats};

use bufring::BufRing;

/// user_data of the eventfd poll that wakes the leader.
const WAKE_UD: u64 = u64::MAX;
/// user_data of cancel requests; their own completions carry nothing.
const CANCEL_UD: u64 = u64::MAX - 1;
/// Buffer group id of the provided-buffer ring.
const BGID: u16 = 0;
/// Marks the first stage (file into pipe or buffer) of a file send in
/// `user_data`; slots stay below 2^31.
const STAGE1: u64 = 1 << 31;
/// Most bytes one file send moves (one pipe or buffer fill).
const FILE_CHUNK: usize = 1 << 20;
/// A file send whose socket takes its chunk slowly completes with what it
/// sent once it has run this long, so the engine sees the reply progress
/// (its idle and stall checks) even for a reader slower than a chunk per
/// second; the rest is read from the file again by the next send.
const FILE_REPORT_AFTER: Duration = Duration::from_millis(500);

/// Builds an SQE on a connected socket, whether it is a descriptor or a
/// registered-file slot (the crate's target trait is sealed, so each case
/// is built on its own).
macro_rules! on_sock {
    ($sock:expr, $t:ident => $build:expr) => {
        match $sock {
            Sock::Os(s) => {
                let $t = types::Fd(s.as_raw_fd());
                $build
            }
            Sock::Direct(d) => {
                let $t = types::Fixed(d.slot());
                $build
            }
        }
    };
}

/// The ring's registered-file table: slots that hold sockets without a
/// process descriptor (io_uring direct descriptors).
struct FileTable {
    /// A duplicate of the ring's descriptor, so the table can update the
    /// ring for as long as any `DirectSocket` lives, even after the backend.
    ring: OwnedFd,
    free: Mutex<Vec<u32>>,
    size: u32,
}

/// `IORING_REGISTER_FILES_UPDATE` of the kernel ABI.
const IORING_REGISTER_FILES_UPDATE: libc::c_uint = 6;

/// `struct io_uring_files_update` of the kernel ABI.
#[repr(C)]
struct FilesUpdate {
    offset: u32,
    resv: u32,
    fds: u64,
}

impl FileTable {
    /// Puts `fd` (or -1: empty) in `slot`.
    fn update(&self, slot: u32, fd: RawFd) -> io::Result<()> {
        let fds = [fd];
        let up = FilesUpdate {
            offset: slot,
            resv: 0,
            fds: fds.as_ptr() as u64,
        };
        // SAFETY: IORING_REGISTER_FILES_UPDATE reads one `io_uring_files_update`
        // and the one-element fd array it points to, both alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring.as_raw_fd(),
                IORING_REGISTER_FILES_UPDATE,
                &up as *const FilesUpdate,
                1,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl DirectTable for FileTable {
    fn release(&self, slot: u32) {
        // Emptying the slot drops the table's reference; the socket closes
        // once no operation in flight still uses it.
        if let Err(e) = self.update(slot, -1) {
            tracing::error!(slot, "cannot release a registered socket: {e}");
            return; // leak the slot rather than reuse one still holding a socket
        }
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot);
    }
}

/// Per-operation memory the kernel reads through pointers in the SQE. Lives
/// inside the operation's `Box`, so it never moves while in flight.
enum Scratch {
    None,
    /// A gathered send's header; its iovecs are in `InFlight::iov`.
    Msg(libc::msghdr),
    Addr(Box<SockAddr>),
    Time(types::Timespec),
    File(Box<FileXfer>),
}

/// A file send in progress: the file is first moved into a pipe (splice)
/// or a buffer (copy), then from there to the socket, resuming until the
/// chunk is out.
struct FileXfer {
    /// Read and write ends of the pipe (zero-copy); `None` when copying.
    pipe: Option<(OwnedFd, OwnedFd)>,
    /// The copy buffer (empty when splicing).
    buf: Vec<u8>,
    /// Where the unsent bytes start in `buf`.
    off: usize,
    /// Bytes in the pipe or buffer not yet sent.
    in_hand: usize,
    /// Bytes sent to the socket so far.
    sent: usize,
    /// When the op started.
    started: Instant,
}

/// One operation in flight: the op (owning buffers and socket) and its scratch.
///
/// Boxes are recycled (see `Ops::spare`), so the hot path allocates no
/// per-operation memory: a finished op leaves its box, with the capacity
/// of its iovec vector, for the next one.
struct InFlight {
    key: u64,
    generation: u32,
    op: Op,
    scratch: Scratch,
    /// A gathered send's iovecs (`Scratch::Msg` points here).
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `Scratch::Msg` and `iov` point only into this
// same `InFlight` (its iovec vector) and into `Bytes` owned by `op`; moving
// the box between threads moves nothing they point to.
unsafe impl Send for InFlight {}

/// What a recycled box holds in place of an op: owns nothing.
const VACANT: Op = Op::Timeout {
    after: Duration::ZERO,
};

/// Most finished-op boxes kept for reuse.
const SPARE_MAX: usize = 1024;

struct Ops {
    slab: Slab<Box<InFlight>>,
    next_gen: u32,
    /// Boxes of finished ops, ready for the next submissions (boxes, not
    /// values: reusing the allocation is the point).
    #[allow(clippy::vec_box)]
    spare: Vec<Box<InFlight>>,
}

impl Ops {
    /// Takes a finished op's box out of the slab: hands back its op and
    /// keeps the box (emptied) for reuse.
    fn retire(&mut self, idx: usize) -> (u64, Op) {
        let mut b = self.slab.remove(idx);
        let key = b.key;
        let op = std::mem::replace(&mut b.op, VACANT);
        b.scratch = Scratch::None;
        b.iov.clear();
        if self.spare.len() < SPARE_MAX {
            self.spare.push(b);
        }
        (key, op)
    }
}

/// The io_uring completion backend.
pub(crate) struct Backend {
    ring: IoUring,
    /// Serialises pushes to the submission queue (the kernel's SQ is
    /// single-producer), and holds the entries that found it full, in
    /// order, until a worker hands them to the kernel (see `push`).
    sq: Mutex<VecDeque<squeue::Entry>>,
    ops: Mutex<Ops>,
    outstanding: AtomicUsize,
    bufs: Arc<BufRing>,
    eventfd: OwnedFd,
    /// Registered-file table for direct sockets, if set up.
    files: Option<Arc<FileTable>>,
    /// The kernel has multishot receive (Linux 6.0); without it a
    /// `RecvMulti` runs as a single receive.
    multishot_recv: bool,
    /// The reaped-CQE batch, kept for reuse.
    reaped: Mutex<Vec<(u64, i32, u32)>>,
    /// The kernel's count of dropped completions, as last seen by the leader.
    cq_overflow: AtomicU64,
    /// Reaps that found the completion queue full.
    cq_full: AtomicU64,
    /// Pushes that found the submission queue full.
    sq_full: AtomicU64,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("uring::Backend")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

impl Backend {
    pub(crate) fn new(cfg: &PortConfig) -> io::Result<Backend> {
        let (entries, cq_entries) = ring_sizes(cfg)?;
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries).setup_submit_all();
        if cfg.single_worker {
            // The one worker is either running (and enters the kernel soon)
            // or waiting in the kernel, so task work need not interrupt it.
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        let ring = builder
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(cq_entries).build(entries))
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup failed: {e}")))?;
        probe(&ring)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before it is wrapped.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        // Provided-buffer rings and multishot accept both came with Linux
        // 5.19 and the probe cannot see the multishot flag; this
        // registration failing is how an older kernel shows.
        let bufs = Arc::new(
            BufRing::new(&ring, BGID, cfg.recv_bufs, cfg.recv_buf_size).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot register a provided-buffer ring (Linux 5.19 or newer): {e}"),
                )
            })?,
        );
        let files = if cfg.direct_files > 0 {
            match file_table(&ring, cfg.direct_files) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::info!("no registered-file table ({e}); connections use descriptors");
                    None
                }
            }
        } else {
            None
        };
        let backend = Backend {
            ring,
            sq: Mutex::new(VecDeque::new()),
            ops: Mutex::new(Ops {
                slab: Slab::new(),
                next_gen: 1,
                spare: Vec::new(),
            }),
            outstanding: AtomicUsize::new(0),
            bufs,
            eventfd,
            files,
            multishot_recv: super::linux::kernel_at_least(6, 0),
            reaped: Mutex::new(Vec::new()),
            cq_overflow: AtomicU64::new(0),
            cq_full: AtomicU64::new(0),
            sq_full: AtomicU64::new(0),
        };
        backend.arm_wake()?;
        Ok(backend)
    }

    pub(crate) fn name(&self) -> &'static str {
        "uring"
    }

    pub(crate) fn associate(&self, _socket: &Socket) -> io::Result<()> {
        Ok(())
    }

    /// Moves a connected socket into the registered-file table when it has
    /// room, closing its process descriptor; otherwise keeps it as it is.
    pub(crate) fn make_direct(&self, socket: Socket) -> Sock {
        let Some(t) = &self.files else {
            return Sock::Os(Arc::new(socket));
        };
        let Some(slot) = t.free.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            return Sock::Os(Arc::new(socket));
        };
        match t.update(slot, socket.as_raw_fd()) {
            Ok(()) => {
                drop(socket); // the table holds the socket now
                Sock::Direct(Arc::new(DirectSocket {
                    slot,
                    table: t.clone(),
                }))
            }
            Err(e) => {
                tracing::debug!("cannot register a socket: {e}");
                t.free.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
                Sock::Os(Arc::new(socket))
            }
        }
    }

    /// Slots in the registered-file table (0 without one).
    pub(crate) fn direct_capacity(&self) -> usize {
        self.files.as_ref().map_or(0, |t| t.size as usize)
    }

    fn arm_wake(&self) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(self.eventfd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(WAKE_UD);
        self.push(&sqe)
    }

    /// Pushes one SQE. If the queue is full (or entries already wait
    /// behind it), the entry waits in the backlog, in order, until a worker
    /// moves it into the ring in `flush` or `wait`. The pushing thread
    /// never enters the kernel itself: io_uring ties a request to the task
    /// that submits it and cancels it when that task exits, so a passing
    /// thread that submitted a full queue would take every queued request
    /// down with it when it ends (test:
    /// `a_full_submission_queue_is_not_submitted_by_a_passing_thread`).
    fn push(&self, sqe: &squeue::Entry) -> io::Result<()> {
        let mut backlog = self.sq.lock().unwrap_or_else(|e| e.into_inner());
        if backlog.is_empty() {
            // SAFETY: `sq` is held, so this is the only submission-queue
            // handle alive; the SQE's pointers are into a boxed `InFlight`
            // (or nothing) that stays alive until its completion is reaped.
            let pushed = unsafe {
                let mut sq = self.ring.submission_shared();
                let r = sq.push(sqe).is_ok();
                sq.sync();
                r
            };
            if pushed {
                return Ok(());
            }
        }
        self.sq_full.fetch_add(1, Ordering::Relaxed);
        backlog.push_back(sqe.clone());
        Ok(())
    }

    /// Moves the backlog into the ring, submitting whenever the ring is
    /// full. Worker threads only (they are the tasks that own requests).
    fn drain_backlog(&self, backlog: &mut VecDeque<squeue::Entry>) -> io::Result<()> {
        for _ in 0..1_000_000 {
            if backlog.is_empty() {
                return Ok(());
            }
            // SAFETY: the caller holds `sq`, so this is the only
            // submission-queue handle; the entries point into boxed
            // `InFlight`s that live until their completions are reaped.
            unsafe {
                let mut sq = self.ring.submission_shared();
                while let Some(e) = backlog.front() {
                    if sq.push(e).is_err() {
                        break;
                    }
                    backlog.pop_front();
                }
                sq.sync();
            }
            if backlog.is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The kernel cannot take more now: the rest waits for the
                // next `flush` or `wait`.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(crate) fn submit(&self, key: u64, op: Op) -> io::Result<OpId> {
        let (idx, generation) = {
            let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            let generation = ops.next_gen;
            ops.next_gen = ops.next_gen.wrapping_add(1).max(1);
            let inflight = match ops.spare.pop() {
                Some(mut b) => {
                    b.key = key;
                    b.generation = generation;
                    b.op = op;
                    b
                }
                None => Box::new(InFlight {
                    key,
                    generation,
                    op,
                    scratch: Scratch::None,
                    iov: Vec::new(),
                }),
            };
            let entry = ops.slab.vacant_entry();
            let idx = entry.key();
            // Build the SQE while the box is already at its final address.
            let boxed = entry.insert(inflight);
            let ud = ((generation as u64) << 32) | idx as u64;
            let sqe = match build_sqe(boxed, &self.bufs, self.multishot_recv, ud) {
                Ok(s) => s,
                Err(e) => {
                    ops.retire(idx);
                    return Err(e);
                }
            };
            drop(ops);
            if let Err(e) = self.push(&sqe) {
                let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
                ops.retire(idx);
                return Err(e);
            }
            (idx, generation)
        };
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(OpId(((generation as u64) << 32) | idx as u64))
    }

    pub(crate) fn cancel(&self, id: OpId) -> io::Result<()> {
        let sqe = opcode::AsyncCancel::new(id.0).build().user_data(CANCEL_UD);
        self.push(&sqe)
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        let mut backlog = self.sq.lock().unwrap_or_else(|e| e.into_inner());
        self.drain_backlog(&mut backlog)?;
        // SAFETY: `sq` is held, so this is the only submission-queue handle.
        if unsafe { self.ring.submission_shared().is_empty() } {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY) | Some(libc::EINTR) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        {
            let mut backlog = self.sq.lock().unwrap_or_else(|e| e.into_inner());
            self.drain_backlog(&mut backlog)?;
        }
        let res = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        Ok(())
    }

    /// Moves every available CQE into `out`. Leader only.
    fn reap(&self, out: &mut VecDeque<Completion>) {
        // The batch vector is kept between reaps (leader only, so the lock
        // is never contended).
        let mut raw = std::mem::take(&mut *self.reaped.lock().unwrap_or_else(|e| e.into_inner()));
        // SAFETY: the port lets only its leader call `wait`, so this is the
        // only completion-queue handle alive.
        unsafe {
            let mut cq = self.ring.completion_shared();
            cq.sync();
            if cq.is_full() {
                // Completions beyond this wait in the kernel's overflow
                // list; the next `io_uring_enter` moves them in.
                self.cq_full.fetch_add(1, Ordering::Relaxed);
            }
            self.cq_overflow
                .store(u64::from(cq.overflow()), Ordering::Relaxed);
            for cqe in &mut cq {
                raw.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
        }
        if raw.is_empty() {
            *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) = raw;
            return;
        }
        let mut rearm_wake = false;
        let mut next_stages: Vec<squeue::Entry> = Vec::new();
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        for &(ud, res, flags) in &raw {
            match ud {
                WAKE_UD => {
                    let mut v = [0u8; 8];
                    // SAFETY: reading 8 bytes into a local array from our own
                    // nonblocking eventfd.
                    unsafe {
                        libc::read(self.eventfd.as_raw_fd(), v.as_mut_ptr().cast(), 8);
                    }
                    if !cqueue::more(flags) {
                        rearm_wake = true;
                    }
                }
                CANCEL_UD => {}
                _ => {
                    let stage1 = ud & STAGE1 != 0;
                    let ud = ud & !STAGE1;
                    let idx = (ud & 0xFFFF_FFFF) as usize;
                    let generation = (ud >> 32) as u32;
                    let known = ops
                        .slab
                        .get(idx)
                        .is_some_and(|e| e.generation == generation);
                    if !known {
                        tracing::error!(ud, "completion for an unknown operation; ignored");
                        continue;
                    }
                    let id = OpId(ud);
                    if matches!(ops.slab[idx].op, Op::SendFile { .. }) {
                        match file_step(&mut ops.slab[idx], stage1, res, ud) {
                            FileStep::Next(sqe) => next_stages.push(sqe),
                            FileStep::Done(result) => {
                                let (key, op) = ops.retire(idx);
                                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                                let Op::SendFile { file, .. } = op else {
                                    unreachable!()
                                };
                                out.push_back(Completion {
                                    key,
                                    op: Some(id),
                                    outcome: Outcome::SentFile { result, file },
                                });
                            }
                        }
                        continue;
                    }
                    if cqueue::more(flags) {
                        // A multishot accept or receive stays armed: keep
                        // the op.
                        let key = ops.slab[idx].key;
                        let outcome = match ops.slab[idx].op {
                            Op::RecvMulti { .. } => Outcome::ReceivedMulti {
                                result: self.received(res, flags),
                                more: true,
                            },
                            _ => Outcome::Accepted {
                                result: accepted(res),
                                more: true,
                            },
                        };
                        out.push_back(Completion {
                            key,
                            op: Some(id),
                            outcome,
                        });
                        continue;
                    }
                    let (key, op) = ops.retire(idx);
                    self.outstanding.fetch_sub(1, Ordering::Relaxed);
                    let outcome = self.finish(op, res, flags);
                    out.push_back(Completion {
                        key,
                        op: Some(id),
                        outcome,
                    });
                }
            }
        }
        drop(ops);
        raw.clear();
        *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) = raw;
        for sqe in next_stages {
            // The op stays in the slab, so its pipe or buffer stays alive.
            if let Err(e) = self.push(&sqe) {
                tracing::error!("cannot continue a file send: {e}");
            }
        }
        if rearm_wake && let Err(e) = self.arm_wake() {
            tracing::error!("cannot re-arm the port's wake-up poll: {e}");
        }
    }

    /// Turns a final CQE into the outcome, handing back what the op owned.
    fn finish(&self, op: Op, res: i32, flags: u32) -> Outcome {
        match op {
            Op::Accept { .. } => Outcome::Accepted {
                result: accepted(res),
                more: false,
            },
            Op::Recv { .. } => Outcome::Received(self.received(res, flags)),
            Op::RecvMulti { .. } => Outcome::ReceivedMulti {
                result: self.received(res, flags),
                more: false,
            },
            Op::Send { bufs, .. } => Outcome::Sent {
                result: if res < 0 {
                    Err(errno(res))
                } else {
                    Ok(res as usize)
                },
                bufs,
            },
            Op::Connect { socket, .. } => Outcome::Connected {
                result: if res < 0 { Err(errno(res)) } else { Ok(()) },
                socket,
            },
            Op::SendFile { file, .. } => Outcome::SentFile {
                result: Err(io::Error::other("file send ended early")),
                file,
            },
            Op::Shutdown { .. } => Outcome::Shut(if res < 0 { Err(errno(res)) } else { Ok(()) }),
            Op::Close { socket } => {
                // The kernel closed the descriptor; don't close it again.
                let _ = socket.into_raw_fd();
                Outcome::Closed(if res < 0 { Err(errno(res)) } else { Ok(()) })
            }
            Op::Timeout { .. } => Outcome::Timer(match res {
                0 => Ok(()),
                r if r == -libc::ETIME => Ok(()),
                r if r == -libc::ECANCELED => Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "timer cancelled",
                )),
                r => Err(errno(r)),
            }),
        }
    }

    /// A receive's result: the pooled buffer the kernel picked (leased to
    /// the caller), EOF as an empty buffer, or the error.
    fn received(&self, res: i32, flags: u32) -> io::Result<RecvBuf> {
        let buf = cqueue::buffer_select(flags).map(|bid| {
            self.bufs.lent();
            RecvBuf::new(self.bufs.clone(), bid as u32, res.max(0) as usize)
        });
        if res < 0 {
            drop(buf);
            Err(errno(res))
        } else if res == 0 {
            drop(buf);
            Ok(RecvBuf::eof())
        } else {
            buf.ok_or_else(|| io::Error::other("receive completed without a buffer"))
        }
    }

    pub(crate) fn wake(&self) {
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
        self.bufs.leased()
    }

    pub(crate) fn ring_stats(&self) -> RingStats {
        RingStats {
            cq_overflow: self.cq_overflow.load(Ordering::Relaxed),
            cq_full: self.cq_full.load(Ordering::Relaxed),
            sq_full: self.sq_full.load(Ordering::Relaxed),
        }
    }
}

/// The environment variable that overrides ring sizes (`SQ` or `SQ:CQ`),
/// for tests of full queues.
const RING_ENTRIES_ENV: &str = "CPORT_RING_ENTRIES";

/// Submission- and completion-queue sizes: `CPORT_RING_ENTRIES` if set,
/// else the config (the completion queue four times the submission queue
/// unless given). The kernel rounds both up to powers of two and needs the
/// completion queue at least as large.
fn ring_sizes(cfg: &PortConfig) -> io::Result<(u32, u32)> {
    let (sq, cq) = match std::env::var(RING_ENTRIES_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_ring_entries(v.trim()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{RING_ENTRIES_ENV}={v:?} is not valid: write SQ or SQ:CQ, \
                     e.g. 8:16 (1 to 32768 entries each)"
                ),
            )
        })?,
        _ => (cfg.entries, cfg.cq_entries),
    };
    let sq = sq.clamp(1, 32768);
    let cq = if cq == 0 { sq * 4 } else { cq.clamp(sq, 65536) };
    Ok((sq, cq))
}

fn parse_ring_entries(v: &str) -> Option<(u32, u32)> {
    let (sq, cq) = match v.split_once(':') {
        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        None => (v.parse().ok()?, 0),
    };
    let ok = |n: u32| (1..=32768).contains(&n);
    (ok(sq) && (cq == 0 || ok(cq))).then_some((sq, cq))
}

/// Checks, with IORING_REGISTER_PROBE, that the kernel knows every opcode
/// cport submits; a kernel that lacks one would fail those operations at
/// run time instead of at start.
fn probe(ring: &IoUring) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot probe io_uring opcodes: {e}")))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::Connect::CODE, "connect"),
        (opcode::Close::CODE, "close"),
        (opcode::Timeout::CODE, "timeout"),
        (opcode::PollAdd::CODE, "poll_add"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the kernel's io_uring lacks opcodes: {}",
                missing.join(", ")
            ),
        ))
    }
}

fn accepted(res: i32) -> io::Result<Socket> {
    if res < 0 {
        Err(errno(res))
    } else {
        // SAFETY: a successful accept CQE carries a new descriptor that
        // nothing else owns.
        Ok(unsafe { Socket::from_raw_fd(res as RawFd) })
    }
}

/// Builds the SQE for an op already at its final (boxed) address.
fn build_sqe(
    f: &mut InFlight,
    bufs: &BufRing,
    multishot_recv: bool,
    ud: u64,
) -> io::Result<squeue::Entry> {
    let sqe = match &f.op {
        Op::Accept { listener } => opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build(),
        Op::Recv { socket } => {
            on_sock!(socket, t => opcode::Recv::new(t, std::ptr::null_mut(), bufs.buf_size())
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT))
        }
        Op::RecvMulti { socket } if multishot_recv => {
            on_sock!(socket, t => opcode::RecvMulti::new(t, BGID).build())
        }
        // Before Linux 6.0: one receive, finished as `more == false`.
        Op::RecvMulti { socket } => {
            on_sock!(socket, t => opcode::Recv::new(t, std::ptr::null_mut(), bufs.buf_size())
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT))
        }
        Op::Shutdown { socket, how } => {
            let how = match how {
                std::net::Shutdown::Read => libc::SHUT_RD,
                std::net::Shutdown::Write => libc::SHUT_WR,
                std::net::Shutdown::Both => libc::SHUT_RDWR,
            };
            on_sock!(socket, t => opcode::Shutdown::new(t, how).build())
        }
        Op::Send { socket, bufs } => {
            if bufs.is_empty() || bufs.len() > MAX_SEND_BUFS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a send carries 1 to MAX_SEND_BUFS buffers",
                ));
            }
            if let [b] = bufs.as_slice() {
                // One buffer: a plain send, no header for the kernel to copy.
                let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
                return Ok(on_sock!(socket, t => opcode::Send::new(t, b.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build())
                .user_data(ud));
            }
            f.iov.clear();
            f.iov.extend(bufs.iter().map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            }));
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iov = f.iov.as_mut_ptr();
            hdr.msg_iovlen = f.iov.len() as _;
            f.scratch = Scratch::Msg(hdr);
            let Scratch::Msg(hdr) = &f.scratch else {
                unreachable!()
            };
            let hdr = hdr as *const _;
            on_sock!(socket, t => opcode::SendMsg::new(t, hdr)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build())
        }
        Op::Connect { socket, addr } => {
            f.scratch = Scratch::Addr(Box::new(SockAddr::from(*addr)));
            let Scratch::Addr(sa) = &f.scratch else {
                unreachable!()
            };
            opcode::Connect::new(types::Fd(socket.as_raw_fd()), sa.as_ptr().cast(), sa.len())
                .build()
        }
        Op::SendFile {
            file,
            offset,
            len,
            copy,
            ..
        } => {
            let chunk = (*len).clamp(1, FILE_CHUNK);
            let fd = types::Fd(file.as_raw_fd());
            let sqe = if *copy {
                f.scratch = Scratch::File(Box::new(FileXfer {
                    pipe: None,
                    buf: vec![0u8; chunk],
                    off: 0,
                    in_hand: 0,
                    sent: 0,
                    started: Instant::now(),
                }));
                let Scratch::File(x) = &mut f.scratch else {
                    unreachable!()
                };
                opcode::Read::new(fd, x.buf.as_mut_ptr(), chunk as u32)
                    .offset(*offset)
                    .build()
            } else {
                let (r, w) = pipe(chunk)?;
                let w_fd = types::Fd(w.as_raw_fd());
                f.scratch = Scratch::File(Box::new(FileXfer {
                    pipe: Some((r, w)),
                    buf: Vec::new(),
                    off: 0,
                    in_hand: 0,
                    sent: 0,
                    started: Instant::now(),
                }));
                opcode::Splice::new(fd, *offset as i64, w_fd, -1, chunk as u32).build()
            };
            return Ok(sqe.user_data(ud | STAGE1));
        }
        Op::Close { socket } => opcode::Close::new(types::Fd(socket.as_raw_fd())).build(),
        Op::Timeout { after } => {
            f.scratch = Scratch::Time(
                types::Timespec::new()
                    .sec(after.as_secs())
                    .nsec(after.subsec_nanos()),
            );
            let Scratch::Time(ts) = &f.scratch else {
                unreachable!()
            };
            opcode::Timeout::new(ts as *const _).build()
        }
    };
    Ok(sqe.user_data(ud))
}

/// Sets up a sparse registered-file table of `want` slots (at most the
/// descriptor limit, which the kernel enforces for the table too).
fn file_table(ring: &IoUring, want: u32) -> io::Result<FileTable> {
    let limit = crate::port::sys::fd_limit()
        .unwrap_or(1024)
        .min(u32::MAX as u64) as u32;
    let size = want.min(limit).max(1);
    ring.submitter().register_files_sparse(size)?;
    // SAFETY: dup of the ring's own descriptor, checked below.
    let fd = unsafe { libc::fcntl(ring.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FileTable {
        // SAFETY: a fresh duplicate nobody else owns.
        ring: unsafe { OwnedFd::from_raw_fd(fd) },
        free: Mutex::new((0..size).rev().collect()),
        size,
    })
}

/// A pipe for splicing, grown to `size` bytes when the system allows.
fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Best effort: a larger pipe moves more per splice; the default 64 KiB
    // still works.
    // SAFETY: fcntl on our own descriptor with an integer argument.
    unsafe {
        libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
    }
    Ok((r, w))
}

/// What a file send does after one of its stages completed.
enum FileStep {
    /// Submit this next stage; the op stays in flight.
    Next(squeue::Entry),
    /// The op is complete.
    Done(io::Result<usize>),
}

/// Advances a file send after a CQE of `stage1` (file into pipe/buffer) or
/// of the second stage (pipe/buffer to socket).
fn file_step(f: &mut InFlight, stage1: bool, res: i32, ud: u64) -> FileStep {
    let Op::SendFile { socket, .. } = &f.op else {
        return FileStep::Done(Err(io::Error::other("not a file send")));
    };
    let socket = socket.clone();
    let Scratch::File(x) = &mut f.scratch else {
        return FileStep::Done(Err(io::Error::other("file send without state")));
    };
    if res < 0 {
        return FileStep::Done(if x.sent > 0 {
            Ok(x.sent)
        } else {
            Err(errno(res))
        });
    }
    let n = res as usize;
    if stage1 {
        if n == 0 {
            return FileStep::Done(Ok(0)); // the file is shorter than asked
        }
        x.in_hand = n;
        x.off = 0;
    } else {
        if n == 0 {
            return FileStep::Done(Ok(x.sent));
        }
        x.sent += n;
        x.in_hand -= n.min(x.in_hand);
        x.off += n;
        if x.in_hand == 0 || x.started.elapsed() >= FILE_REPORT_AFTER {
            return FileStep::Done(Ok(x.sent));
        }
    }
    let (in_hand, data) = (x.in_hand as u32, x.buf[x.off.min(x.buf.len())..].as_ptr());
    let sqe = match &x.pipe {
        Some((r, _)) => {
            let r = types::Fd(r.as_raw_fd());
            on_sock!(&socket, t => opcode::Splice::new(r, -1, t, -1, in_hand).build())
        }
        None => on_sock!(&socket, t => opcode::Send::new(t, data, in_hand)
            .flags(libc::MSG_NOSIGNAL)
            .build()),
    };
    FileStep::Next(sqe.user_data(ud))
}

impl Drop for Backend {
    /// Cancels everything still in flight and reaps until the kernel has
    /// given every operation back. Whatever the kernel still holds after the
    /// deadline is leaked, never freed under it.
    fn drop(&mut self) {
        if self.outstanding() > 0 {
            let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_UD);
            let _ = self.push(&sqe);
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut sink = VecDeque::new();
            while self.outstanding() > 0 && Instant::now() < deadline {
                let _ = self.wait(Some(Duration::from_millis(50)), &mut sink);
                sink.clear();
            }
        }
        if self.outstanding() > 0 {
            tracing::error!(
                outstanding = self.outstanding(),
                "operations still owned by the kernel at port drop; their memory is leaked"
            );
            let ops = std::mem::replace(
                self.ops.get_mut().unwrap_or_else(|e| e.into_inner()),
                Ops {
                    slab: Slab::new(),
                    next_gen: 1,
                    spare: Vec::new(),
                },
            );
            std::mem::forget(ops);
            self.bufs.leak_on_drop();
        }
    }
}
