//! Backends: where the completion port meets the operating system.
//!
//! # The contract every backend meets
//!
//! A backend is a module with a type `Backend` that has these `pub(crate)`
//! functions, and nothing above this module knows which one runs:
//!
//! - `Backend::new(&PortConfig) -> io::Result<Backend>`
//! - `name(&self) -> &'static str` — "uring", "poll" or "iocp".
//! - `associate(&self, &Socket) -> io::Result<()>` — make a socket usable on
//!   this port (IOCP: CreateIoCompletionPort; io_uring: nothing).
//! - `submit(&self, key: u64, op: Op) -> io::Result<OpId>` — take ownership
//!   of an operation and queue it. The op's buffers, socket references and
//!   addresses stay owned by the backend until the completion carrying them
//!   back has been produced by `wait`; an op that fails to queue is dropped
//!   without ever reaching the kernel.
//! - `cancel(&self, id: OpId) -> io::Result<()>` — ask for an early
//!   completion. The target still completes exactly once (with an error if
//!   it was cancelled), and only then is its memory released.
//! - `flush(&self) -> io::Result<()>` — hand queued submissions to the
//!   kernel. Called only from the port's own worker threads (see
//!   docs/DESIGN.md: on io_uring the thread that enters the kernel owns the
//!   request).
//! - `wait(&self, timeout, &mut VecDeque<Completion>) -> io::Result<()>` —
//!   submit what is queued, block until at least one completion, `wake`, or
//!   the timeout, then move every available completion into the queue. Only
//!   one thread at a time calls it (the port's leader).
//! - `wake(&self)` — make a concurrent `wait` return soon, from any thread.
//! - `outstanding(&self) -> usize` — operations submitted and not yet
//!   completed; `bufs_leased(&self) -> usize` — pooled buffers lent out.
//! - `ring_stats(&self) -> RingStats` — how the kernel's queues coped with
//!   their limits (backends without such queues report zeros).
//!
//! Dropping a backend cancels whatever is still in flight and waits for it;
//! memory the kernel might still write is leaked rather than freed.
//!
//! On Linux two backends meet it: `uring/` (io_uring, true completions)
//! and `poll/` (epoll readiness turned into completions in the backend).
//! On Windows one does: `iocp/` (I/O completion ports, the classic IOCP articles' own API).
//! `Backend` here is the one the port holds: an enum over them that
//! delegates every call, chosen once per port from
//! [`PortConfig::backend`](crate::port::PortConfig). On Linux `Auto` takes
//! io_uring when the kernel lets us set up a ring with every opcode cport
//! uses, and otherwise falls back to poll, logging (once per process) which
//! runs and why; on Windows `Auto` is IOCP.
//!
//! # Native ports (an addition for IOCP)
//!
//! A backend whose kernel object *is* a completion port shared by many
//! threads says so with `native() -> true` and adds two functions:
//!
//! - `get(&self, timeout, max, &mut VecDeque<Completion>)` — like `wait`,
//!   but callable from every worker thread at once (IOCP:
//!   GetQueuedCompletionStatusEx), taking at most `max` completions; the
//!   kernel then applies the concurrency limit and the LIFO wake-up itself.
//! - `post(&self, key, value) -> io::Result<()>` — queue
//!   `Outcome::Posted(value)` in the kernel port (PostQueuedCompletionStatus).
//!
//! The port then skips its own leader/follower scheduling and ready queue.
//! Backends that are not native never see these two calls.
//!
//! OS helpers that are not part of the port (process CPU and memory,
//! returning free heap memory,
//! descriptor limits, socket options, opening files beneath a directory,
//! the raw error codes the layers above compare against, in [`errno`])
//! live here too, so that nothing above `sys` says `cfg(target_os)`.

#[cfg(target_os = "linux")]
mod poll;
#[cfg(target_os = "linux")]
mod uring;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::{
    ProcessUsage, accept_queue_len, ephemeral_port_range, errno, fd_hard_limit, fd_limit,
    is_escape, is_loop, limit_heap_retention, machine_cpu, open_beneath, open_dir, process_cpu,
    process_cpu_rss_of, process_rss, process_usage, process_usage_of, raise_fd_limit, sched_cpu_of,
    set_bind_address_no_port, set_keepalive, set_notsent_lowat, trim_heap, trim_thread_heap,
};
#[cfg(target_os = "linux")]
use linux::{map_pages, unmap_pages};

#[cfg(windows)]
mod iocp;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows::{map_pages, unmap_pages};

/// The error `open_beneath` gives for a path that names something other
/// than a regular file (a FIFO, socket, device or directory), which it
/// refuses without reading from it.
#[derive(Debug)]
struct NotRegular(&'static str);

impl std::fmt::Display for NotRegular {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "is {}, not a regular file", self.0)
    }
}

impl std::error::Error for NotRegular {}

/// A [`NotRegular`] error; `kind` says what the path names ("a FIFO").
fn not_regular(kind: &'static str) -> io::Error {
    let k = if kind == "a directory" {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    io::Error::new(k, NotRegular(kind))
}

/// Whether an error from `open_beneath` means the path names something
/// other than a regular file (its kind is `IsADirectory` for a directory).
pub fn is_not_regular(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<NotRegular>())
}

/// The receive pool the poll and IOCP backends share.
mod pool;
#[cfg(windows)]
pub use windows::{
    ProcessUsage, accept_queue_len, ephemeral_port_range, errno, fd_hard_limit, fd_limit,
    is_escape, is_loop, limit_heap_retention, machine_cpu, open_beneath, open_dir, process_cpu,
    process_cpu_rss_of, process_rss, process_usage, process_usage_of, raise_fd_limit, sched_cpu_of,
    set_bind_address_no_port, set_keepalive, set_notsent_lowat, trim_heap, trim_thread_heap,
};

use std::collections::VecDeque;
use std::io;
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::Socket;

use crate::op::{Completion, Op, OpId};
use crate::port::{BackendKind, PortConfig};

/// The backend a port runs on.
#[derive(Debug)]
// One per port, so the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    /// io_uring.
    #[cfg(target_os = "linux")]
    Uring(uring::Backend),
    /// epoll.
    #[cfg(target_os = "linux")]
    Poll(poll::Backend),
    /// Windows I/O completion port.
    #[cfg(windows)]
    Iocp(iocp::Backend),
}

/// Once `Auto` fell back to poll, later `Auto` ports do not probe again, so
/// the ports of one engine agree.
#[cfg(target_os = "linux")]
static AUTO_FELL_BACK: AtomicBool = AtomicBool::new(false);
/// The one log line about `Auto`'s choice has been written.
#[cfg(target_os = "linux")]
static AUTO_LOGGED: AtomicBool = AtomicBool::new(false);

macro_rules! delegate {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            #[cfg(target_os = "linux")]
            Backend::Uring($b) => $e,
            #[cfg(target_os = "linux")]
            Backend::Poll($b) => $e,
            #[cfg(windows)]
            Backend::Iocp($b) => $e,
        }
    };
}

/// The error for a backend this operating system does not have.
fn not_here(kind: BackendKind) -> io::Error {
    let hint = if cfg!(windows) {
        "use --backend auto or iocp"
    } else {
        "use --backend auto, uring or poll"
    };
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "backend '{kind}' does not run on {} ({hint})",
            std::env::consts::OS
        ),
    )
}

impl Backend {
    #[cfg(windows)]
    pub(crate) fn new(cfg: &PortConfig) -> io::Result<Backend> {
        match cfg.backend {
            BackendKind::Auto | BackendKind::Iocp => iocp::Backend::new(cfg).map(Backend::Iocp),
            other => Err(not_here(other)),
        }
    }

    #[cfg(target_os = "linux")]
    pub(crate) fn new(cfg: &PortConfig) -> io::Result<Backend> {
        match cfg.backend {
            BackendKind::Iocp => Err(not_here(BackendKind::Iocp)),
            BackendKind::Poll => poll::Backend::new(cfg).map(Backend::Poll),
            BackendKind::Uring => uring::Backend::new(cfg)
                .map(Backend::Uring)
                .map_err(|e| io::Error::new(e.kind(), format!("io_uring is unavailable: {e}"))),
            BackendKind::Auto => {
                if AUTO_FELL_BACK.load(Ordering::Relaxed) {
                    return poll::Backend::new(cfg).map(Backend::Poll);
                }
                match uring::Backend::new(cfg) {
                    Ok(b) => {
                        if !AUTO_LOGGED.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                "completion backend: uring (io_uring set up with every opcode cport uses)"
                            );
                        }
                        Ok(Backend::Uring(b))
                    }
                    Err(e) => {
                        AUTO_FELL_BACK.store(true, Ordering::Relaxed);
                        let b = poll::Backend::new(cfg)?;
                        if !AUTO_LOGGED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                "completion backend: poll (epoll), because io_uring is unavailable: {e}"
                            );
                        }
                        Ok(Backend::Poll(b))
                    }
                }
            }
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        delegate!(self, b => b.name())
    }

    pub(crate) fn make_direct(&self, socket: Socket) -> crate::op::Sock {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Uring(b) => b.make_direct(socket),
            #[allow(unreachable_patterns)]
            _ => crate::op::Sock::Os(std::sync::Arc::new(socket)),
        }
    }

    pub(crate) fn direct_capacity(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Uring(b) => b.direct_capacity(),
            #[allow(unreachable_patterns)]
            _ => 0,
        }
    }

    /// Whether this backend is a native port (see the module docs).
    pub(crate) fn native(&self) -> bool {
        match self {
            #[cfg(windows)]
            Backend::Iocp(_) => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Native ports only: takes up to `max` completions, from any number
    /// of threads at once.
    pub(crate) fn get(
        &self,
        timeout: Option<Duration>,
        max: usize,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        match self {
            #[cfg(windows)]
            Backend::Iocp(b) => b.get(timeout, max, out),
            #[allow(unreachable_patterns)]
            _ => {
                let _ = (timeout, max, out);
                Err(io::Error::from(io::ErrorKind::Unsupported))
            }
        }
    }

    /// Native ports only: queues `Outcome::Posted(value)` with `key`.
    pub(crate) fn post(&self, key: u64, value: u64) -> io::Result<()> {
        match self {
            #[cfg(windows)]
            Backend::Iocp(b) => b.post(key, value),
            #[allow(unreachable_patterns)]
            _ => {
                let _ = (key, value);
                Err(io::Error::from(io::ErrorKind::Unsupported))
            }
        }
    }

    pub(crate) fn associate(&self, socket: &Socket) -> io::Result<()> {
        delegate!(self, b => b.associate(socket))
    }

    pub(crate) fn submit(&self, key: u64, op: Op) -> io::Result<OpId> {
        delegate!(self, b => b.submit(key, op))
    }

    pub(crate) fn cancel(&self, id: OpId) -> io::Result<()> {
        delegate!(self, b => b.cancel(id))
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        delegate!(self, b => b.flush())
    }

    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        delegate!(self, b => b.wait(timeout, out))
    }

    pub(crate) fn wake(&self) {
        delegate!(self, b => b.wake())
    }

    pub(crate) fn outstanding(&self) -> usize {
        delegate!(self, b => b.outstanding())
    }

    pub(crate) fn bufs_leased(&self) -> usize {
        delegate!(self, b => b.bufs_leased())
    }

    pub(crate) fn ring_stats(&self) -> crate::port::RingStats {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Uring(b) => b.ring_stats(),
            #[allow(unreachable_patterns)]
            _ => crate::port::RingStats::default(),
        }
    }
}
