//! Backends: where the completion port meets the operating system.
//!
//! # The contract every backend meets
//!
//! A backend is a type `Backend` with these `pub(crate)` functions, and
//! nothing above this module knows which one runs:
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
//!
//! Dropping a backend cancels whatever is still in flight and waits for it;
//! memory the kernel might still write is leaked rather than freed.
//!
//! OS helpers that are not part of the port (process CPU and memory) live
//! here too, so that nothing above `sys` says `cfg(target_os)`.

#[cfg(target_os = "linux")]
mod uring;
#[cfg(target_os = "linux")]
pub(crate) use uring::Backend;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::{
    ProcessUsage, fd_limit, is_escape, open_beneath, process_usage, raise_fd_limit, set_keepalive,
};
