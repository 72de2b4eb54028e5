//! Operations: the portable vocabulary of work handed to a completion port.
//!
//! This module owns the *shape* of an operation and of its result. An [`Op`]
//! is a plain value that owns everything the kernel will touch while the
//! operation runs: the socket (by `Arc`, so its descriptor cannot be closed
//! and reused underneath the kernel), the buffers to send, the address to
//! connect to. Submitting an `Op` moves it into the port; the port keeps it
//! until the completion is reaped and then hands every owned value back in
//! the [`Outcome`] — the classic IOCP articles' OVERLAPPED + per-IO context, without raw
//! pointers for the user to keep alive.
//!
//! Nothing here is platform specific; how each operation is expressed to
//! the kernel lives beside the backend (`port/sys/*`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use socket2::Socket;

use crate::buf::RecvBuf;

/// Identity of one submitted operation: a slot in the port's table of
/// in-flight operations plus that slot's generation, so a stale id (for an
/// operation that already completed and whose slot was reused) never
/// matches a newer operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId(pub(crate) u64);

impl OpId {
    /// The raw 64-bit value (slot in the low half, generation in the high half).
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// A connected socket as operations see it: an ordinary descriptor, or a
/// slot in the port's registered-file table (an io_uring *direct
/// descriptor*), which holds the socket without using a process descriptor,
/// so one process can hold more connections than its descriptor limit.
#[derive(Clone)]
pub enum Sock {
    /// An ordinary descriptor.
    Os(Arc<Socket>),
    /// A registered-file slot; the socket closes when the last clone of
    /// the `Arc` (the connection's and its operations') is dropped.
    Direct(Arc<DirectSocket>),
}

impl fmt::Debug for Sock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sock::Os(s) => write!(f, "Sock::Os({s:?})"),
            Sock::Direct(d) => write!(f, "Sock::Direct({})", d.slot),
        }
    }
}

impl Sock {
    /// The ordinary socket, if this is one.
    pub fn os(&self) -> Option<&Arc<Socket>> {
        match self {
            Sock::Os(s) => Some(s),
            Sock::Direct(_) => None,
        }
    }
}

/// A socket held in a port's registered-file table.
pub struct DirectSocket {
    pub(crate) slot: u32,
    pub(crate) table: Arc<dyn DirectTable>,
}

impl DirectSocket {
    /// The slot in the port's registered-file table.
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl fmt::Debug for DirectSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirectSocket({})", self.slot)
    }
}

impl Drop for DirectSocket {
    fn drop(&mut self) {
        self.table.release(self.slot);
    }
}

/// How a backend takes a registered-file slot back (unregistering the
/// socket, which closes it once no operation uses it).
pub(crate) trait DirectTable: Send + Sync {
    fn release(&self, slot: u32);
}

/// Most buffers one gathered send may carry (one `sendmsg`/`WSASend`).
pub const MAX_SEND_BUFS: usize = 64;

/// An operation to run on a completion port. Every variant owns what the
/// kernel may read or write until the completion comes back.
pub enum Op {
    /// Accept connections on a listening socket. On io_uring this is a
    /// multishot accept: one submission yields a completion per accepted
    /// connection until it ends (then `more == false` and it must be posted
    /// again) — the classic IOCP articles' pre-posted AcceptEx, always outstanding.
    Accept {
        /// The listening socket.
        listener: Arc<Socket>,
    },
    /// Receive into a buffer taken from the port's pool at the moment data
    /// arrives, so an idle connection pins no receive buffer.
    Recv {
        /// The connected socket.
        socket: Sock,
    },
    /// Receive repeatedly: one submission yields an
    /// [`Outcome::ReceivedMulti`] per arrival, each in a pooled buffer,
    /// until it ends (`more == false`: EOF, an error, an empty pool, or a
    /// cancel). On io_uring this is a multishot receive, so a busy
    /// connection costs no submission per read; backends without one run
    /// it as a single receive that ends after its first completion.
    /// Cancel it to stop reading.
    RecvMulti {
        /// The connected socket.
        socket: Sock,
    },
    /// Send several buffers in one gathered send (`sendmsg` with an iovec
    /// per buffer). The completion may report fewer bytes than queued; the
    /// caller resumes with the rest.
    Send {
        /// The connected socket.
        socket: Sock,
        /// Buffers sent in order; at most [`MAX_SEND_BUFS`].
        bufs: Vec<Bytes>,
    },
    /// Connect a socket to a peer.
    Connect {
        /// The socket to connect (created, not yet connected).
        socket: Arc<Socket>,
        /// Where to connect.
        addr: SocketAddr,
    },
    /// Send up to `len` bytes of `file` from `offset` to a socket. With
    /// `copy == false` the bytes go zero-copy (io_uring: splice through a
    /// pipe; Windows: TransmitFile); with `copy == true` they are read into a
    /// buffer and sent, the path zero-copy is measured against. Completes
    /// with the bytes sent, which may be fewer than `len`; the caller
    /// resumes from there.
    SendFile {
        /// The connected socket.
        socket: Sock,
        /// The file to send from.
        file: Arc<std::fs::File>,
        /// Where in the file to start.
        offset: u64,
        /// How many bytes at most.
        len: usize,
        /// Read and send instead of zero-copy.
        copy: bool,
    },
    /// Shut down one or both directions of a connected socket (on a direct
    /// socket this is the only way; the op keeps the socket, so its slot
    /// cannot be reused before the shutdown ran).
    Shutdown {
        /// The connected socket.
        socket: Sock,
        /// Which directions.
        how: std::net::Shutdown,
    },
    /// Close a socket asynchronously. The port takes the only reference.
    Close {
        /// The socket to close.
        socket: Socket,
    },
    /// Complete after a delay (a timer on the port).
    Timeout {
        /// How long until the completion.
        after: Duration,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())
    }
}

impl Op {
    /// The kind of this operation.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Accept { .. } => OpKind::Accept,
            Op::Recv { .. } => OpKind::Recv,
            Op::RecvMulti { .. } => OpKind::RecvMulti,
            Op::Send { .. } => OpKind::Send,
            Op::SendFile { .. } => OpKind::SendFile,
            Op::Connect { .. } => OpKind::Connect,
            Op::Shutdown { .. } => OpKind::Shutdown,
            Op::Close { .. } => OpKind::Close,
            Op::Timeout { .. } => OpKind::Timeout,
        }
    }

    /// The outcome of this operation when it ended with the error `err()`
    /// (or was cancelled) before doing its work, handing back what it
    /// owned. Backends that complete operations themselves (poll, IOCP)
    /// build failed and cancelled completions with it.
    ///
    /// A close cannot fail this way: dropping its socket closes it, which is
    /// what was asked. A timer's outcome is `Interrupted`, whatever `err`.
    pub(crate) fn into_failed(self, err: impl Fn() -> io::Error) -> Outcome {
        match self {
            Op::Accept { .. } => Outcome::Accepted {
                result: Err(err()),
                more: false,
            },
            Op::Recv { .. } => Outcome::Received(Err(err())),
            Op::RecvMulti { .. } => Outcome::ReceivedMulti {
                result: Err(err()),
                more: false,
            },
            Op::Send { bufs, .. } => Outcome::Sent {
                result: Err(err()),
                bufs,
            },
            Op::SendFile { file, .. } => Outcome::SentFile {
                result: Err(err()),
                file,
            },
            Op::Shutdown { .. } => Outcome::Shut(Err(err())),
            Op::Connect { socket, .. } => Outcome::Connected {
                result: Err(err()),
                socket,
            },
            Op::Close { socket } => {
                drop(socket);
                Outcome::Closed(Ok(()))
            }
            Op::Timeout { .. } => Outcome::Timer(Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "timer cancelled",
            ))),
        }
    }
}

/// The kind of an operation, for accounting and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`Op::Accept`].
    Accept,
    /// [`Op::Recv`].
    Recv,
    /// [`Op::RecvMulti`].
    RecvMulti,
    /// [`Op::Send`].
    Send,
    /// [`Op::SendFile`].
    SendFile,
    /// [`Op::Connect`].
    Connect,
    /// [`Op::Shutdown`].
    Shutdown,
    /// [`Op::Close`].
    Close,
    /// [`Op::Timeout`].
    Timeout,
}

impl OpKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Accept => "accept",
            OpKind::Recv => "recv",
            OpKind::RecvMulti => "recv_multi",
            OpKind::Send => "send",
            OpKind::SendFile => "send_file",
            OpKind::Connect => "connect",
            OpKind::Shutdown => "shutdown",
            OpKind::Close => "close",
            OpKind::Timeout => "timeout",
        }
    }
}

/// The result of a completed operation, handing back everything the
/// operation owned.
pub enum Outcome {
    /// One accepted connection (or an accept error). `more` says whether the
    /// accept is still armed; when false it must be submitted again.
    Accepted {
        /// The new connection.
        result: io::Result<Socket>,
        /// Whether the multishot accept stays armed.
        more: bool,
    },
    /// Received bytes in a pooled buffer; an empty buffer means the peer
    /// closed its sending side (EOF).
    Received(io::Result<RecvBuf>),
    /// One arrival of an [`Op::RecvMulti`] (as [`Outcome::Received`]);
    /// `more` says whether the receive stays armed. The last one
    /// (`more == false`) may carry data, EOF or the error that ended it.
    ReceivedMulti {
        /// Bytes received, EOF (empty), or the error.
        result: io::Result<RecvBuf>,
        /// Whether the receive stays armed.
        more: bool,
    },
    /// A send finished: bytes written, and the buffers back.
    Sent {
        /// Bytes the kernel accepted.
        result: io::Result<usize>,
        /// The buffers the operation owned, in order.
        bufs: Vec<Bytes>,
    },
    /// A file send finished: bytes sent, and the file back.
    SentFile {
        /// Bytes sent to the socket.
        result: io::Result<usize>,
        /// The file the operation owned.
        file: Arc<std::fs::File>,
    },
    /// A connect finished; the socket comes back either way.
    Connected {
        /// Whether the connection was made.
        result: io::Result<()>,
        /// The socket the operation owned.
        socket: Arc<Socket>,
    },
    /// A shutdown finished.
    Shut(io::Result<()>),
    /// A close finished.
    Closed(io::Result<()>),
    /// A timer fired (`Ok`) or was cancelled (`Err` with `ErrorKind::Interrupted`).
    Timer(io::Result<()>),
    /// A completion posted by [`crate::port::CompletionPort::post`].
    Posted(u64),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted { result, more } => f
                .debug_struct("Accepted")
                .field("ok", &result.is_ok())
                .field("more", more)
                .finish(),
            Outcome::Received(r) => f
                .debug_tuple("Received")
                .field(&r.as_ref().map(|b| b.len()))
                .finish(),
            Outcome::ReceivedMulti { result, more } => f
                .debug_struct("ReceivedMulti")
                .field("len", &result.as_ref().map(|b| b.len()))
                .field("more", more)
                .finish(),
            Outcome::Sent { result, bufs } => f
                .debug_struct("Sent")
                .field("result", result)
                .field("bufs", &bufs.len())
                .finish(),
            Outcome::SentFile { result, .. } => f.debug_tuple("SentFile").field(result).finish(),
            Outcome::Connected { result, .. } => f.debug_tuple("Connected").field(result).finish(),
            Outcome::Shut(r) => f.debug_tuple("Shut").field(r).finish(),
            Outcome::Closed(r) => f.debug_tuple("Closed").field(r).finish(),
            Outcome::Timer(r) => f.debug_tuple("Timer").field(r).finish(),
            Outcome::Posted(v) => f.debug_tuple("Posted").field(v).finish(),
        }
    }
}

/// One completion taken from a port: the key given at submission (the
/// per-handle context), the operation it completes, and its outcome.
#[derive(Debug)]
pub struct Completion {
    /// The key the operation was submitted with (or the posted key).
    pub key: u64,
    /// The operation this completes; `None` for posted completions.
    pub op: Option<OpId>,
    /// What happened.
    pub outcome: Outcome,
}
