//! The IOCP backend: Windows I/O completion ports, the API the classic IOCP articles are
//! written against, used natively (no readiness emulation).
//!
//! Owns one kernel completion port (CreateIoCompletionPort with the port's
//! concurrency value as NumberOfConcurrentThreads), the table of operations
//! in flight, the receive pool, the Winsock extension functions (AcceptEx,
//! GetAcceptExSockaddrs, ConnectEx, TransmitFile, loaded once per process
//! with `WSAIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER)`), and a timer thread
//! started on the first timer. It must not touch anything above `sys`.
//!
//! # A native port
//!
//! Unlike io_uring and epoll, the kernel object here *is* the completion
//! port of the classic IOCP articles, so this backend is `native` (see `sys`): every worker
//! thread sits in `GetQueuedCompletionStatusEx` at once, the kernel wakes
//! the most recent waiter first and lets at most NumberOfConcurrentThreads
//! of them run, and `post` is `PostQueuedCompletionStatus`. The engine's
//! exit packets at shutdown are such posts, one per worker; a worker whose
//! batch holds several gives the extra ones back, and one that misses its
//! packet leaves by its own 250 ms exit check (both in the engine).
//!
//! # Packets and the per-operation header
//!
//! Every socket is associated with the port under one completion key,
//! [`KEY_IO`]. Each operation in flight is a [`Entry`] in a slab of boxes
//! (so its address never moves); the entry starts with a `#[repr(C)]`
//! [`Header`] whose first field is the `OVERLAPPED` handed to the kernel.
//! A packet with `KEY_IO` therefore carries a pointer to the header, which
//! holds the slab index, the generation and which of the entry's
//! `OVERLAPPED`s completed. Posted packets carry the user's key and value
//! (the value in the `lpOverlapped` field, never dereferenced); the few keys
//! this backend reserves are escaped, so any `u64` key can be posted.
//!
//! The entry owns the operation (socket, buffers, file) and is freed only
//! when the kernel has handed its packet back, so the kernel never writes
//! into freed memory. Cancellation is `CancelIoEx` on the operation's own
//! `OVERLAPPED`; the operation still completes (with
//! `ERROR_OPERATION_ABORTED`) and only then is the entry released.
//!
//! # How each operation maps onto IOCP
//!
//! - **Accept** (multishot on io_uring): [`ACCEPTS`] `AcceptEx` calls are
//!   kept posted per listener and port, each with a socket created in
//!   advance and no receive data (so a connection that sends nothing is
//!   still accepted). Each completion yields one `Accepted { more: true }`
//!   after `SO_UPDATE_ACCEPT_CONTEXT` and `GetAcceptExSockaddrs`, and the
//!   same `OVERLAPPED` is posted again with a fresh socket. The operation
//!   ends (`more: false`) when it is cancelled or when no `AcceptEx` could
//!   be posted again (e.g. out of sockets), like a multishot accept that
//!   the kernel terminates.
//! - **Recv** (pooled): a zero-byte `WSARecv` waits for data without
//!   pinning a buffer; when it completes, a non-blocking `recv` reads into
//!   a chunk taken from the pool only then. A spurious wake-up posts the
//!   zero-byte receive again. An empty pool with data waiting completes
//!   with `WSAENOBUFS`, which the engine retries, as on io_uring.
//! - **Send**: one overlapped `WSASend` with a `WSABUF` per buffer.
//! - **SendFile**: `TransmitFile` with the offset in the `OVERLAPPED`
//!   (zero-copy), or for `copy` the bytes read into a buffer the entry owns
//!   and one `WSASend`.
//! - **Connect**: `ConnectEx` (binding to the wildcard address first when
//!   the socket is not bound) then `SO_UPDATE_CONNECT_CONTEXT`.
//! - **Shutdown**, **Close**: done at once in `submit`; their completion is
//!   posted to the port so that it arrives like any other.
//! - **Timeout**: the timer thread posts the entry's packet when it is due;
//!   cancelling removes it from the timer set and posts it at once.
//!
//! # One socket, one port
//!
//! A handle belongs to one completion port for life. A listener shared by
//! several ports is associated with the first; `AcceptEx` calls posted by
//! another port complete on that first port, which sees a header that is
//! not its own and forwards the packet home (`PostQueuedCompletionStatus`
//! with [`KEY_FORWARD`] and the same `OVERLAPPED`, whose status the kernel
//! wrote into it).
//!
//! # Errors
//!
//! A failed overlapped operation leaves an NTSTATUS in the `OVERLAPPED`;
//! it is turned into a Win32 code and the codes of abnormal disconnects
//! (`ERROR_NETNAME_DELETED`, `ERROR_CONNECTION_ABORTED`, ...) into their
//! Winsock twins, so that `io::ErrorKind` says `ConnectionReset` exactly
//! where ECONNRESET would on Linux.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::mem::{MaybeUninit, size_of};
use std::os::windows::io::{AsRawHandle, AsRawSocket};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_CONNECTION_ABORTED, ERROR_CONNECTION_REFUSED, ERROR_HOST_UNREACHABLE,
    ERROR_INVALID_PARAMETER, ERROR_NETNAME_DELETED, ERROR_NETWORK_UNREACHABLE,
    ERROR_NO_SYSTEM_RESOURCES, ERROR_NOT_ENOUGH_MEMORY, ERROR_OPERATION_ABORTED,
    ERROR_PORT_UNREACHABLE, ERROR_REQUEST_ABORTED, ERROR_SEM_TIMEOUT, ERROR_UNEXP_NET_ERR,
    GetLastError, HANDLE, INVALID_HANDLE_VALUE, NTSTATUS, RtlNtStatusToDosError, WAIT_TIMEOUT,
};
use windows_sys::Win32::Networking::WinSock::{
    LPFN_ACCEPTEX, LPFN_CONNECTEX, LPFN_GETACCEPTEXSOCKADDRS, LPFN_TRANSMITFILE, MSG_PEEK,
    SIO_GET_EXTENSION_FUNCTION_POINTER, SO_UPDATE_ACCEPT_CONTEXT, SO_UPDATE_CONNECT_CONTEXT,
    SOCKADDR, SOCKADDR_STORAGE, SOCKET, SOCKET_ERROR, SOL_SOCKET, WSA_IO_PENDING, WSABUF,
    WSAECONNABORTED, WSAECONNREFUSED, WSAECONNRESET, WSAEHOSTUNREACH, WSAENETUNREACH, WSAENOBUFS,
    WSAETIMEDOUT, WSAGetLastError, WSAID_ACCEPTEX, WSAID_CONNECTEX, WSAID_GETACCEPTEXSOCKADDRS,
    WSAID_TRANSMITFILE, WSAIoctl, WSARecv, WSASend, setsockopt,
};
use windows_sys::Win32::System::IO::{
    CancelIoEx, CreateIoCompletionPort, GetQueuedCompletionStatusEx, OVERLAPPED, OVERLAPPED_ENTRY,
    PostQueuedCompletionStatus,
};
use windows_sys::core::GUID;

use crate::buf::RecvBuf;
use crate::op::{Completion, MAX_SEND_BUFS, Op, OpId, Outcome, Sock};
use crate::port::PortConfig;

use super::pool::Pool;

/// Completion key of every socket associated with a port: its packets
/// carry a pointer to an operation's [`Header`].
const KEY_IO: usize = usize::MAX;
/// Key of a packet that `wake` posts; it carries nothing.
const KEY_WAKE: usize = usize::MAX - 1;
/// Key of a packet forwarded home by the port its socket belongs to.
const KEY_FORWARD: usize = usize::MAX - 2;
/// Key of a user post whose own key is one of these four reserved values;
/// the byte count says which (`usize::MAX - n`).
const KEY_ESCAPED: usize = usize::MAX - 3;
/// `AcceptEx` calls kept posted per listener and port (the classic IOCP articles' N
/// pre-posted accepts).
pub(crate) const ACCEPTS: usize = 16;
/// Most completions one `GetQueuedCompletionStatusEx` takes.
const MAX_ENTRIES: usize = 64;
/// Most bytes one `TransmitFile` sends (the engine resumes from there).
const FILE_CHUNK: usize = 16 << 20;
/// Most bytes one copying file send reads.
const COPY_CHUNK: usize = 1 << 20;
/// Bytes for one address in an `AcceptEx` buffer (the documented minimum:
/// the largest address plus 16).
const ADDR_LEN: usize = size_of::<SOCKADDR_STORAGE>() + 16;
/// `Header::sub` of an entry's own `OVERLAPPED` (an accept's sub-packets
/// are numbered from 0).
const OWN: u32 = u32::MAX;

/// The part of every packet the kernel sees. `#[repr(C)]` with the
/// `OVERLAPPED` first: the kernel is handed `&mut header.ovl` and gives the
/// same address back in `OVERLAPPED_ENTRY::lpOverlapped`, which is then
/// cast back to `*const Header` (see [`Backend::packet`]).
#[repr(C)]
struct Header {
    /// Written by the kernel while the operation runs (status, bytes).
    ovl: OVERLAPPED,
    /// The backend whose table holds the entry (`Arc::as_ptr` of its
    /// `Shared`), so that a port it does not belong to can send it home.
    home: *const Shared,
    /// Slab index of the entry.
    idx: u32,
    /// Generation of the entry (the high half of its `OpId`).
    generation: u32,
    /// [`OWN`], or which of an accept's `AcceptEx` calls this is.
    sub: u32,
}

impl Header {
    fn new(home: *const Shared, idx: u32, generation: u32, sub: u32) -> Header {
        Header {
            // SAFETY: OVERLAPPED is plain old data; all-zero is how every
            // overlapped call wants it.
            ovl: unsafe { std::mem::zeroed() },
            home,
            idx,
            generation,
            sub,
        }
    }

    /// Clears what the kernel wrote, before the `OVERLAPPED` is used again.
    fn reset(&mut self, offset: u64) {
        // SAFETY: as in `new`.
        self.ovl = unsafe { std::mem::zeroed() };
        self.ovl.Anonymous.Anonymous.Offset = offset as u32;
        self.ovl.Anonymous.Anonymous.OffsetHigh = (offset >> 32) as u32;
    }

    /// What the kernel wrote when the operation finished: status, bytes.
    fn result(&self) -> io::Result<usize> {
        let status = self.ovl.Internal as NTSTATUS;
        if status < 0 {
            // SAFETY: a pure conversion function.
            let code = unsafe { RtlNtStatusToDosError(status) };
            Err(win_error(code))
        } else {
            Ok(self.ovl.InternalHigh)
        }
    }
}

/// One `AcceptEx` kept posted: its header, the socket created for it, and
/// the buffer the kernel writes both addresses into.
#[repr(C)]
struct AcceptIo {
    /// First, as for every packet (see [`Header`]).
    hdr: Header,
    /// The socket the next connection is accepted into.
    socket: Option<Socket>,
    /// Local then remote address, written by the kernel.
    addrs: [u8; 2 * ADDR_LEN],
    /// Posted and not yet completed.
    pending: bool,
}

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The kernel (or the timer thread) holds it; a packet will come.
    Kernel,
    /// Its packet came; a worker is finishing it outside the table lock.
    Busy,
}

/// One operation in flight. `#[repr(C)]` with the header first, so a
/// pointer to the header of an entry's own `OVERLAPPED` is one to the entry.
#[repr(C)]
struct Entry {
    /// First (see [`Header`]).
    hdr: Header,
    /// The completion key given at submission.
    key: u64,
    stage: Stage,
    /// `cancel` was called.
    cancelled: bool,
    /// The operation, owning socket, buffers and file.
    op: Option<Op>,
    /// A send's buffer descriptors, pointing into the op's `Bytes`.
    wsabufs: Vec<WSABUF>,
    /// A copying file send's bytes (owned here while `WSASend` reads them).
    copied: Vec<u8>,
    /// Flags for `WSARecv` (in and out; must outlive the call).
    recv_flags: u32,
    /// The outcome of an operation done in `submit` (shutdown, close, a
    /// call that failed at once), delivered when its posted packet comes.
    ready: Option<Outcome>,
    /// An accept's posted `AcceptEx` calls. Boxed: the kernel holds their
    /// addresses, which must not move when the `Vec` grows.
    #[allow(clippy::vec_box)]
    accepts: Vec<Box<AcceptIo>>,
    /// The last error that ended one of them, reported when the last ends.
    accept_error: Option<io::Error>,
    /// Submitted as `RecvMulti`: run as one receive whose outcome says the
    /// receive ended (`ReceivedMulti { more: false }`).
    multi: bool,
}

/// The Winsock extension functions, loaded once per process.
#[derive(Clone, Copy)]
struct Ext {
    accept_ex: LPFN_ACCEPTEX,
    get_accept_ex_sockaddrs: LPFN_GETACCEPTEXSOCKADDRS,
    connect_ex: LPFN_CONNECTEX,
    transmit_file: LPFN_TRANSMITFILE,
}

static EXT: OnceLock<Result<Ext, String>> = OnceLock::new();

/// Loads one extension function through `WSAIoctl` on `s`.
fn load_ext<F>(s: SOCKET, guid: GUID) -> io::Result<Option<F>> {
    let mut f: Option<F> = None;
    let mut bytes = 0u32;
    // SAFETY: the input is a live GUID, the output a live `Option<fn>` of
    // the size we pass (a nullable function pointer, as the call writes).
    let rc = unsafe {
        WSAIoctl(
            s,
            SIO_GET_EXTENSION_FUNCTION_POINTER,
            (&guid as *const GUID).cast(),
            size_of::<GUID>() as u32,
            (&mut f as *mut Option<F>).cast(),
            size_of::<Option<F>>() as u32,
            &mut bytes,
            ptr::null_mut(),
            None,
        )
    };
    if rc == SOCKET_ERROR {
        return Err(last_wsa_error());
    }
    Ok(f)
}

fn ext() -> io::Result<Ext> {
    EXT.get_or_init(|| {
        let load = || -> io::Result<Ext> {
            // Creating a socket also initialises Winsock (socket2 calls
            // WSAStartup once).
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            let raw = s.as_raw_socket() as SOCKET;
            let missing = |what: &str| io::Error::other(format!("Winsock has no {what}"));
            Ok(Ext {
                accept_ex: Some(load_ext(raw, WSAID_ACCEPTEX)?.ok_or_else(|| missing("AcceptEx"))?),
                get_accept_ex_sockaddrs: Some(
                    load_ext(raw, WSAID_GETACCEPTEXSOCKADDRS)?
                        .ok_or_else(|| missing("GetAcceptExSockaddrs"))?,
                ),
                connect_ex: Some(
                    load_ext(raw, WSAID_CONNECTEX)?.ok_or_else(|| missing("ConnectEx"))?,
                ),
                transmit_file: Some(
                    load_ext(raw, WSAID_TRANSMITFILE)?.ok_or_else(|| missing("TransmitFile"))?,
                ),
            })
        };
        load().map_err(|e| format!("cannot load the Winsock extension functions: {e}"))
    })
    .clone()
    .map_err(io::Error::other)
}

/// A Win32 or Winsock error code as an `io::Error`, with the codes of
/// abnormal disconnects turned into their Winsock twins (see the module
/// docs), so that `ErrorKind` classifies them as on Linux.
fn win_error(code: u32) -> io::Error {
    let wsa = match code {
        ERROR_NETNAME_DELETED | ERROR_UNEXP_NET_ERR => WSAECONNRESET,
        ERROR_CONNECTION_ABORTED | ERROR_REQUEST_ABORTED => WSAECONNABORTED,
        ERROR_CONNECTION_REFUSED | ERROR_PORT_UNREACHABLE => WSAECONNREFUSED,
        ERROR_SEM_TIMEOUT => WSAETIMEDOUT,
        ERROR_NETWORK_UNREACHABLE => WSAENETUNREACH,
        ERROR_HOST_UNREACHABLE => WSAEHOSTUNREACH,
        ERROR_NO_SYSTEM_RESOURCES | ERROR_NOT_ENOUGH_MEMORY => WSAENOBUFS,
        other => other as i32,
    };
    io::Error::from_raw_os_error(wsa)
}

fn last_wsa_error() -> io::Error {
    // SAFETY: reads this thread's last Winsock error.
    win_error(unsafe { WSAGetLastError() } as u32)
}

fn cancelled_error() -> io::Error {
    io::Error::from_raw_os_error(ERROR_OPERATION_ABORTED as i32)
}

/// A raw handle that may cross threads: the port handle and pointers the
/// timer thread posts.
#[derive(Clone, Copy)]
struct PortHandle(HANDLE);
// SAFETY: a completion port handle may be used from any thread; the value
// is only an identifier.
unsafe impl Send for PortHandle {}
// SAFETY: as above.
unsafe impl Sync for PortHandle {}

/// The timer set, shared with the timer thread.
#[derive(Default)]
struct Timers {
    /// Pending timers: (deadline, raw op id) -> address of the entry's
    /// header, posted when due.
    due: BTreeMap<(Instant, u64), usize>,
    /// The backend is going away: the thread ends.
    stop: bool,
}

/// What the timer thread and the backend share.
struct TimerShared {
    state: Mutex<Timers>,
    changed: Condvar,
}

impl TimerShared {
    fn lock(&self) -> MutexGuard<'_, Timers> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything behind the backend's lock.
struct Table {
    /// Operations in flight, by slot.
    ops: Slab<Box<Entry>>,
    /// Generation given to the next operation (never 0).
    next_gen: u32,
}

/// The backend's state; `Backend` holds it by `Arc` so that a packet
/// forwarded by another port finds it by the pointer in its header.
struct Shared {
    /// The kernel completion port.
    port: PortHandle,
    table: Mutex<Table>,
    pool: Arc<Pool>,
    /// Operations submitted and not yet completed.
    outstanding: AtomicUsize,
    timers: Arc<TimerShared>,
    /// The timer thread, started with the first timer.
    timer_thread: Mutex<Option<JoinHandle<()>>>,
}

/// The IOCP completion backend.
pub(crate) struct Backend {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("iocp::Backend")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

/// Milliseconds for `GetQueuedCompletionStatusEx`, rounded up so that a
/// wait never ends before its deadline.
fn timeout_ms(d: Option<Duration>) -> u32 {
    match d {
        None => u32::MAX, // INFINITE
        Some(d) => d.as_nanos().div_ceil(1_000_000).min(u32::MAX as u128 - 1) as u32,
    }
}

fn op_id(idx: u32, generation: u32) -> OpId {
    OpId(((generation as u64) << 32) | idx as u64)
}

/// The raw socket of an ordinary socket (direct ones do not exist here).
fn raw(s: &Socket) -> SOCKET {
    s.as_raw_socket() as SOCKET
}

/// Cancels the kernel operation on `s` that uses `ovl` (a no-op if it
/// already completed).
fn cancel_io(s: SOCKET, ovl: *const OVERLAPPED) {
    // SAFETY: `ovl` belongs to an entry the kernel still holds (the caller
    // holds the table lock and saw it `Kernel`), so it is valid; a
    // completed operation makes the call fail with ERROR_NOT_FOUND, which
    // is what we want.
    unsafe { CancelIoEx(s as HANDLE, ovl) };
}

impl Table {
    fn entry(&mut self, id: OpId) -> Option<&mut Entry> {
        let idx = (id.0 & 0xFFFF_FFFF) as usize;
        let generation = (id.0 >> 32) as u32;
        match self.ops.get_mut(idx) {
            Some(e) if e.hdr.generation == generation => Some(e),
            _ => None,
        }
    }
}

impl Backend {
    pub(crate) fn new(cfg: &PortConfig) -> io::Result<Backend> {
        ext()?;
        let concurrency = cfg.concurrency.clamp(1, u32::MAX as usize) as u32;
        // SAFETY: creating a new port: no handle is read, the result is
        // checked.
        let port = unsafe {
            CreateIoCompletionPort(INVALID_HANDLE_VALUE, ptr::null_mut(), 0, concurrency)
        };
        if port.is_null() {
            return Err(io::Error::last_os_error());
        }
        let port = PortHandle(port);
        let pool = match Pool::new(cfg.recv_bufs, cfg.recv_buf_size) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                // SAFETY: the port handle was created above and is unused.
                unsafe { CloseHandle(port.0) };
                return Err(e);
            }
        };
        Ok(Backend {
            sh: Arc::new(Shared {
                port,
                table: Mutex::new(Table {
                    ops: Slab::new(),
                    next_gen: 1,
                }),
                pool,
                outstanding: AtomicUsize::new(0),
                timers: Arc::new(TimerShared {
                    state: Mutex::new(Timers::default()),
                    changed: Condvar::new(),
                }),
                timer_thread: Mutex::new(None),
            }),
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        "iocp"
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.sh.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Associates the socket with the port (CreateIoCompletionPort) and
    /// makes it non-blocking, for the `recv` that follows a zero-byte
    /// `WSARecv` (overlapped calls are not affected). A socket already
    /// associated, with this port or another (a listener shared by several
    /// ports), is left as it is: its packets are forwarded home.
    pub(crate) fn associate(&self, socket: &Socket) -> io::Result<()> {
        socket.set_nonblocking(true)?;
        // SAFETY: the socket handle is owned by `socket` for the call; the
        // port handle lives as long as `self`.
        let h = unsafe { CreateIoCompletionPort(raw(socket) as HANDLE, self.sh.port.0, KEY_IO, 0) };
        if h.is_null() {
            // SAFETY: reads this thread's last error.
            let e = unsafe { GetLastError() };
            if e != ERROR_INVALID_PARAMETER {
                return Err(win_error(e));
            }
        }
        Ok(())
    }

    /// Posts `hdr`'s packet to this port, so that an operation finished in
    /// `submit` (or by the timer) completes through the port like any other.
    fn post_packet(port: PortHandle, hdr: *const Header) -> io::Result<()> {
        // SAFETY: `hdr` points to a header the table holds until this very
        // packet is dequeued; the kernel only carries the pointer.
        let ok = unsafe { PostQueuedCompletionStatus(port.0, 0, KEY_IO, hdr.cast()) };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn submit(&self, key: u64, op: Op) -> io::Result<OpId> {
        if let Op::Recv { socket }
        | Op::RecvMulti { socket }
        | Op::Send { socket, .. }
        | Op::SendFile { socket, .. } = &op
            && socket.os().is_none()
        {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the iocp backend has no registered-file (direct) sockets",
            ));
        }
        if let Op::Send { bufs, .. } = &op
            && (bufs.is_empty() || bufs.len() > MAX_SEND_BUFS)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a send carries 1 to MAX_SEND_BUFS buffers",
            ));
        }
        // No multishot receive on IOCP: one zero-byte WSARecv, then one
        // read, then the receive ends and the engine posts the next.
        let (op, multi) = match op {
            Op::RecvMulti { socket } => (Op::Recv { socket }, true),
            op => (op, false),
        };
        let ext = ext()?;
        let mut t = self.lock();
        let generation = t.next_gen;
        t.next_gen = t.next_gen.wrapping_add(1).max(1);
        let slot = t.ops.vacant_entry();
        let idx = slot.key() as u32;
        let id = op_id(idx, generation);
        let home = Arc::as_ptr(&self.sh);
        let e = slot.insert(Box::new(Entry {
            hdr: Header::new(home, idx, generation, OWN),
            key,
            stage: Stage::Kernel,
            cancelled: false,
            op: Some(op),
            wsabufs: Vec::new(),
            copied: Vec::new(),
            recv_flags: 0,
            ready: None,
            accepts: Vec::new(),
            accept_error: None,
            multi,
        }));
        let started = match e.op.as_ref().map(Op::kind) {
            Some(crate::op::OpKind::Accept) => self.start_accepts(e, &ext),
            Some(crate::op::OpKind::Timeout) => {
                let Some(Op::Timeout { after }) = &e.op else {
                    unreachable!()
                };
                let due = Instant::now() + *after;
                let at = &e.hdr as *const Header as usize;
                self.start_timer(due, id, at)
            }
            _ => self.start(e, &ext),
        };
        match started {
            Ok(()) => {}
            Err(err) => {
                // Nothing reached the kernel: the op is dropped here.
                let e = t.ops.remove(idx as usize);
                drop(t);
                drop(e);
                return Err(err);
            }
        }
        self.sh.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Starts (or, after a spurious wake-up, restarts) the kernel side of a
    /// socket operation, shutdown or close. An error that the kernel
    /// reports at once becomes the op's outcome, posted to the port; only a
    /// failure to post is returned.
    fn start(&self, e: &mut Entry, ext: &Ext) -> io::Result<()> {
        e.hdr.reset(0);
        e.stage = Stage::Kernel;
        let ovl: *mut OVERLAPPED = &mut e.hdr.ovl;
        let r: io::Result<()> = match e.op.as_mut().expect("a started entry holds its op") {
            Op::Recv { socket } => {
                let s = raw(socket.os().expect("checked in submit"));
                // Zero bytes: completes when data (or EOF, or an error) is
                // there, without a buffer pinned meanwhile.
                let buf = WSABUF {
                    len: 0,
                    buf: ptr::null_mut(),
                };
                e.recv_flags = 0;
                // SAFETY: the WSABUF is read during the call only; the
                // flags and the OVERLAPPED live in the boxed entry until
                // its packet is dequeued.
                let rc =
                    unsafe { WSARecv(s, &buf, 1, ptr::null_mut(), &mut e.recv_flags, ovl, None) };
                overlapped_result(rc)
            }
            Op::Send { socket, bufs } => {
                let s = raw(socket.os().expect("checked in submit"));
                e.wsabufs = bufs
                    .iter()
                    .map(|b| WSABUF {
                        len: b.len() as u32,
                        buf: b.as_ptr().cast_mut(),
                    })
                    .collect();
                // SAFETY: the WSABUFs point into `Bytes` the entry owns
                // (their memory does not move with the `Vec`), and they and
                // the OVERLAPPED live in the boxed entry until its packet is
                // dequeued; WSASend only reads the buffers.
                let rc = unsafe {
                    WSASend(
                        s,
                        e.wsabufs.as_ptr(),
                        e.wsabufs.len() as u32,
                        ptr::null_mut(),
                        0,
                        ovl,
                        None,
                    )
                };
                overlapped_result(rc)
            }
            Op::SendFile {
                socket,
                file,
                offset,
                len,
                copy,
            } => {
                let s = raw(socket.os().expect("checked in submit"));
                if *copy {
                    use std::os::windows::fs::FileExt;
                    let mut buf = vec![0u8; (*len).min(COPY_CHUNK)];
                    match file.seek_read(&mut buf, *offset) {
                        Ok(n) if n > 0 => {
                            buf.truncate(n);
                            e.copied = buf;
                            e.wsabufs = vec![WSABUF {
                                len: e.copied.len() as u32,
                                buf: e.copied.as_mut_ptr(),
                            }];
                            // SAFETY: as for Send: the buffer is owned by
                            // the boxed entry until its packet is dequeued.
                            let rc = unsafe {
                                WSASend(s, e.wsabufs.as_ptr(), 1, ptr::null_mut(), 0, ovl, None)
                            };
                            overlapped_result(rc)
                        }
                        Ok(_) => {
                            e.ready = Some(Outcome::SentFile {
                                result: Ok(0),
                                file: file.clone(),
                            });
                            Ok(())
                        }
                        Err(err) => {
                            e.ready = Some(Outcome::SentFile {
                                result: Err(err),
                                file: file.clone(),
                            });
                            Ok(())
                        }
                    }
                } else {
                    e.hdr.reset(*offset);
                    let n = (*len).min(FILE_CHUNK) as u32;
                    let transmit = ext.transmit_file.expect("loaded in ext()");
                    // SAFETY: the file handle is kept open by the `Arc<File>`
                    // the entry owns; the OVERLAPPED (whose Offset says where
                    // in the file to start) lives in the boxed entry until
                    // its packet is dequeued.
                    let ok = unsafe {
                        transmit(
                            s,
                            file.as_raw_handle(),
                            n,
                            0,
                            &mut e.hdr.ovl,
                            ptr::null(),
                            0,
                        )
                    };
                    if ok != 0 {
                        Ok(())
                    } else {
                        overlapped_result(SOCKET_ERROR)
                    }
                }
            }
            Op::Connect { socket, addr } => {
                let s = raw(socket);
                // ConnectEx wants a bound socket.
                if socket.local_addr().is_err() {
                    let any: std::net::SocketAddr = if addr.is_ipv6() {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    } else {
                        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                    };
                    if let Err(err) = socket.bind(&any.into()) {
                        e.ready = Some(Outcome::Connected {
                            result: Err(err),
                            socket: socket.clone(),
                        });
                    }
                }
                if e.ready.is_some() {
                    Ok(())
                } else {
                    let to = SockAddr::from(*addr);
                    let connect = ext.connect_ex.expect("loaded in ext()");
                    // SAFETY: the address is read during the call only;
                    // the OVERLAPPED lives in the boxed entry until its
                    // packet is dequeued.
                    let ok = unsafe {
                        connect(
                            s,
                            to.as_ptr().cast::<SOCKADDR>(),
                            to.len(),
                            ptr::null(),
                            0,
                            ptr::null_mut(),
                            ovl,
                        )
                    };
                    if ok != 0 {
                        Ok(())
                    } else {
                        overlapped_result(SOCKET_ERROR)
                    }
                }
            }
            Op::Shutdown { socket, how } => {
                let r = match socket.os() {
                    Some(s) => s.shutdown(*how),
                    None => Err(io::Error::from(io::ErrorKind::Unsupported)),
                };
                e.ready = Some(Outcome::Shut(r));
                Ok(())
            }
            Op::Close { .. } => {
                // closesocket, now: the op held the only reference.
                drop(e.op.take());
                e.ready = Some(Outcome::Closed(Ok(())));
                Ok(())
            }
            Op::Accept { .. } | Op::Timeout { .. } => unreachable!("started elsewhere"),
            Op::RecvMulti { .. } => unreachable!("made a Recv in submit"),
        };
        if let Err(err) = r {
            // Failed at once: no packet will come from the kernel.
            let op = e.op.take().expect("a started entry holds its op");
            e.ready = Some(op.into_failed(|| copy_error(&err)));
        }
        if e.ready.is_some() {
            Self::post_packet(self.sh.port, &e.hdr)?;
        }
        Ok(())
    }

    /// Posts the `AcceptEx` calls of a new accept.
    fn start_accepts(&self, e: &mut Entry, ext: &Ext) -> io::Result<()> {
        let Some(Op::Accept { listener }) = &e.op else {
            unreachable!()
        };
        let listener = listener.clone();
        for sub in 0..ACCEPTS as u32 {
            let mut a = Box::new(AcceptIo {
                hdr: Header::new(e.hdr.home, e.hdr.idx, e.hdr.generation, sub),
                socket: None,
                addrs: [0; 2 * ADDR_LEN],
                pending: false,
            });
            match post_accept(&listener, &mut a, ext) {
                Ok(()) => e.accepts.push(a),
                Err(err) => {
                    if e.accepts.is_empty() {
                        // Not one could be posted: the submission fails.
                        return Err(err);
                    }
                    tracing::warn!("posted only {sub} of {ACCEPTS} AcceptEx calls: {err}");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Arms a timer; the timer thread posts the entry's packet when due.
    fn start_timer(&self, due: Instant, id: OpId, at: usize) -> io::Result<()> {
        let mut thread = self
            .sh
            .timer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if thread.is_none() {
            let timers = self.sh.timers.clone();
            let port = self.sh.port;
            *thread = Some(
                std::thread::Builder::new()
                    .name("cport-iocp-timer".into())
                    .spawn(move || timer_main(timers, port))?,
            );
        }
        drop(thread);
        let mut st = self.sh.timers.lock();
        st.due.insert((due, id.0), at);
        self.sh.timers.changed.notify_one();
        Ok(())
    }

    pub(crate) fn cancel(&self, id: OpId) -> io::Result<()> {
        let mut t = self.lock();
        let Some(e) = t.entry(id) else {
            return Ok(()); // completed already
        };
        if e.cancelled {
            return Ok(());
        }
        e.cancelled = true;
        if e.stage != Stage::Kernel || e.ready.is_some() {
            // A worker finishing it sees the flag; a posted outcome is on
            // its way.
            return Ok(());
        }
        match &e.op {
            Some(Op::Accept { listener }) => {
                for a in e.accepts.iter().filter(|a| a.pending) {
                    cancel_io(raw(listener), &a.hdr.ovl);
                }
            }
            Some(Op::Recv { socket } | Op::Send { socket, .. } | Op::SendFile { socket, .. }) => {
                if let Some(s) = socket.os() {
                    cancel_io(raw(s), &e.hdr.ovl);
                }
            }
            Some(Op::Connect { socket, .. }) => cancel_io(raw(socket), &e.hdr.ovl),
            Some(Op::Timeout { .. }) => {
                let mut st = self.sh.timers.lock();
                let key = st.due.iter().find(|(k, _)| k.1 == id.0).map(|(k, _)| *k);
                if let Some(k) = key {
                    // Ours to post, not the timer thread's: it completes now.
                    st.due.remove(&k);
                    drop(st);
                    Self::post_packet(self.sh.port, &e.hdr)?;
                }
            }
            Some(Op::Shutdown { .. } | Op::Close { .. } | Op::RecvMulti { .. }) | None => {}
        }
        Ok(())
    }

    /// Submissions go straight to the kernel: nothing is batched.
    pub(crate) fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// The leader-style wait of the backend contract: `get` with room for a
    /// full batch.
    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        self.get(timeout, MAX_ENTRIES, out)
    }

    /// Takes up to `max` completions (GetQueuedCompletionStatusEx), from
    /// any number of threads at once. Returns when at least one completion
    /// was produced, a `wake` packet came, or the timeout passed. Packets
    /// that produce nothing (a forwarded packet, a receive posted again
    /// after a spurious wake-up) do not end the wait.
    pub(crate) fn get(
        &self,
        timeout: Option<Duration>,
        max: usize,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let max = max.clamp(1, MAX_ENTRIES);
        let mut entries = [OVERLAPPED_ENTRY {
            lpCompletionKey: 0,
            lpOverlapped: ptr::null_mut(),
            Internal: 0,
            dwNumberOfBytesTransferred: 0,
        }; MAX_ENTRIES];
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let mut n = 0u32;
            // SAFETY: `entries` is a live array of at least `max` entries
            // that the kernel fills; `n` is a live local.
            let ok = unsafe {
                GetQueuedCompletionStatusEx(
                    self.sh.port.0,
                    entries.as_mut_ptr(),
                    max as u32,
                    &mut n,
                    timeout_ms(remaining),
                    0,
                )
            };
            if ok == 0 {
                // SAFETY: reads this thread's last error.
                let e = unsafe { GetLastError() };
                if e == WAIT_TIMEOUT {
                    return Ok(());
                }
                return Err(io::Error::from_raw_os_error(e as i32));
            }
            let before = out.len();
            let mut woken = false;
            for entry in &entries[..n as usize] {
                self.packet(entry, out, &mut woken);
            }
            if out.len() > before || woken || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
        }
    }

    /// Turns one dequeued packet into completions.
    fn packet(&self, entry: &OVERLAPPED_ENTRY, out: &mut VecDeque<Completion>, woken: &mut bool) {
        let key = entry.lpCompletionKey;
        let value = entry.lpOverlapped as usize as u64;
        match key {
            KEY_WAKE => *woken = true,
            KEY_ESCAPED => out.push_back(Completion {
                key: (usize::MAX - entry.dwNumberOfBytesTransferred as usize) as u64,
                op: None,
                outcome: Outcome::Posted(value),
            }),
            KEY_IO | KEY_FORWARD => {
                // The pointer the kernel hands back is the address of an
                // `OVERLAPPED` that is the first field of a `#[repr(C)]`
                // `Header` (of an `Entry` or an `AcceptIo`), so it is the
                // header's address too.
                let hdr = entry.lpOverlapped as *const Header;
                // SAFETY: only this backend (or a port sharing a listener
                // with it) puts packets with these keys in a port, always
                // with a header that stays allocated until its packet is
                // handled here; `home`, `idx`, `generation` and `sub` are
                // written before the operation starts and never after.
                let (home, idx, generation, sub) =
                    unsafe { ((*hdr).home, (*hdr).idx, (*hdr).generation, (*hdr).sub) };
                if !ptr::eq(home, Arc::as_ptr(&self.sh)) {
                    // A listener's AcceptEx of another port completed on
                    // ours (the listener belongs to this port): send it home.
                    // SAFETY: `home` is the `Shared` of a live backend: a
                    // backend with operations in flight is never freed (see
                    // `Drop`), and the header is one of those operations.
                    let home_port = unsafe { (*home).port };
                    // SAFETY: the pointer is carried, not dereferenced, by
                    // the kernel.
                    let ok = unsafe {
                        PostQueuedCompletionStatus(home_port.0, 0, KEY_FORWARD, hdr.cast())
                    };
                    if ok == 0 {
                        tracing::error!(
                            "cannot forward a packet to its port: {}",
                            io::Error::last_os_error()
                        );
                    }
                    return;
                }
                self.complete(idx, generation, sub, out);
            }
            _ => out.push_back(Completion {
                key: key as u64,
                op: None,
                outcome: Outcome::Posted(value),
            }),
        }
    }

    /// The packet of entry `idx` (its own `OVERLAPPED`, or accept `sub`)
    /// came back.
    fn complete(&self, idx: u32, generation: u32, sub: u32, out: &mut VecDeque<Completion>) {
        let id = op_id(idx, generation);
        let mut t = self.lock();
        let Some(e) = t.entry(id) else {
            tracing::error!(idx, "a completion packet for no operation in flight");
            return;
        };
        if sub != OWN {
            self.accept_done(&mut t, id, sub as usize, out);
            return;
        }
        if let Some(outcome) = e.ready.take() {
            self.finish(&mut t, id, outcome, out);
            return;
        }
        let result = e.hdr.result();
        let cancelled = e.cancelled;
        let Some(op) = e.op.take() else {
            tracing::error!(idx, "a completion for an operation already finished");
            return;
        };
        let outcome = match op {
            Op::Timeout { .. } if cancelled => op.into_failed(cancelled_error),
            Op::Timeout { .. } => Outcome::Timer(Ok(())),
            Op::Recv { socket } => match result {
                Ok(_) if cancelled => Outcome::Received(Err(cancelled_error())),
                Ok(_) => {
                    // Data (or EOF) is waiting: read it outside the lock.
                    e.stage = Stage::Busy;
                    drop(t);
                    let got = self.recv(&socket);
                    t = self.lock();
                    let e = t.entry(id).expect("a busy entry stays in the table");
                    match got {
                        Some(r) if !e.cancelled => Outcome::Received(r),
                        Some(r) => {
                            drop(r); // the chunk goes back to the pool
                            Outcome::Received(Err(cancelled_error()))
                        }
                        None if e.cancelled => Outcome::Received(Err(cancelled_error())),
                        None => {
                            // Spurious: wait for data again.
                            e.op = Some(Op::Recv { socket });
                            let ext = ext().expect("loaded when the port was made");
                            if let Err(err) = self.start(e, &ext) {
                                tracing::error!("cannot post a receive again: {err}");
                                let op = e.op.take();
                                let o = op.map_or(Outcome::Received(Err(err)), |op| {
                                    op.into_failed(|| io::Error::other("cannot post a receive"))
                                });
                                self.finish(&mut t, id, o, out);
                            }
                            return;
                        }
                    }
                }
                Err(err) => Outcome::Received(Err(err)),
            },
            Op::Send { bufs, .. } => Outcome::Sent {
                result: if cancelled && result.is_err() {
                    Err(cancelled_error())
                } else {
                    result
                },
                bufs,
            },
            Op::SendFile { file, .. } => Outcome::SentFile { result, file },
            Op::Connect { socket, .. } => {
                let result = result.and_then(|_| {
                    // Makes getpeername, shutdown and the rest work on a
                    // socket connected by ConnectEx.
                    // SAFETY: no option value; the socket is owned by the op.
                    let rc = unsafe {
                        setsockopt(
                            raw(&socket),
                            SOL_SOCKET,
                            SO_UPDATE_CONNECT_CONTEXT,
                            ptr::null(),
                            0,
                        )
                    };
                    if rc == SOCKET_ERROR {
                        Err(last_wsa_error())
                    } else {
                        Ok(())
                    }
                });
                Outcome::Connected { result, socket }
            }
            op @ (Op::Shutdown { .. }
            | Op::Close { .. }
            | Op::Accept { .. }
            | Op::RecvMulti { .. }) => {
                // Their outcome is always `ready` (accepts come as subs).
                op.into_failed(|| io::Error::other("unexpected completion"))
            }
        };
        self.finish(&mut t, id, outcome, out);
    }

    /// Removes entry `id` and emits its final completion.
    fn finish(&self, t: &mut Table, id: OpId, outcome: Outcome, out: &mut VecDeque<Completion>) {
        let idx = (id.0 & 0xFFFF_FFFF) as usize;
        let e = t.ops.remove(idx);
        self.sh.outstanding.fetch_sub(1, Ordering::Relaxed);
        let outcome = match outcome {
            Outcome::Received(result) if e.multi => Outcome::ReceivedMulti {
                result,
                more: false,
            },
            o => o,
        };
        out.push_back(Completion {
            key: e.key,
            op: Some(id),
            outcome,
        });
    }

    /// Reads what a completed zero-byte receive announced, into a pool
    /// chunk taken now. `None`: nothing after all (post the receive again).
    fn recv(&self, socket: &Sock) -> Option<io::Result<RecvBuf>> {
        let s = socket.os()?;
        let Some(mut chunk) = self.sh.pool.take() else {
            // Pool empty: report it only if there really is something to
            // read; the engine retries later, as with io_uring's ENOBUFS.
            let mut probe = [MaybeUninit::<u8>::uninit(); 1];
            return match s.recv_with_flags(&mut probe, MSG_PEEK) {
                Ok(0) => Some(Ok(RecvBuf::eof())),
                Ok(_) => Some(Err(io::Error::from_raw_os_error(WSAENOBUFS))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => Some(Err(normalize(e))),
            };
        };
        loop {
            return match s.recv(chunk.buf()) {
                Ok(0) => Some(Ok(RecvBuf::eof())),
                Ok(n) => Some(Ok(chunk.into_recv_buf(n))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => Some(Err(normalize(e))),
            };
        }
    }

    /// One of an accept's `AcceptEx` calls completed.
    fn accept_done(&self, t: &mut Table, id: OpId, sub: usize, out: &mut VecDeque<Completion>) {
        let e = t.entry(id).expect("checked by the caller");
        let Some(Op::Accept { listener }) = &e.op else {
            tracing::error!("an AcceptEx packet for an operation that is no accept");
            return;
        };
        let listener = listener.clone();
        let key = e.key;
        let cancelled = e.cancelled;
        let Some(a) = e.accepts.get_mut(sub) else {
            return;
        };
        a.pending = false;
        let result = a.hdr.result();
        let mut repost = !cancelled;
        match result {
            Ok(_) => {
                let socket = a.socket.take().expect("a posted AcceptEx holds its socket");
                match finish_accept(&listener, &socket, &a.addrs) {
                    Ok(()) => out.push_back(Completion {
                        key,
                        op: Some(id),
                        outcome: Outcome::Accepted {
                            result: Ok(socket),
                            more: true,
                        },
                    }),
                    Err(err) => tracing::debug!("accepted connection unusable: {err}"),
                }
            }
            Err(err) if err.raw_os_error() == Some(ERROR_OPERATION_ABORTED as i32) => {
                repost = false;
                a.socket = None;
            }
            Err(err) => {
                // The pending connection went away before we took it
                // (ERROR_NETNAME_DELETED and kin): not the server's fault.
                a.socket = None;
                if !matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) {
                    out.push_back(Completion {
                        key,
                        op: Some(id),
                        outcome: Outcome::Accepted {
                            result: Err(err),
                            more: true,
                        },
                    });
                }
            }
        }
        if repost {
            let ext = ext().expect("loaded when the port was made");
            if let Err(err) = post_accept(&listener, a, &ext) {
                e.accept_error = Some(err);
            }
        }
        if e.accepts.iter().any(|a| a.pending) {
            return;
        }
        // The last AcceptEx of this accept is done: it ends.
        let err = e.accept_error.take().unwrap_or_else(cancelled_error);
        self.finish(
            t,
            id,
            Outcome::Accepted {
                result: Err(err),
                more: false,
            },
            out,
        );
        // The last `more: true` outcomes precede this one in `out`.
    }

    pub(crate) fn wake(&self) {
        // SAFETY: a packet with no OVERLAPPED; the port lives as long as self.
        unsafe { PostQueuedCompletionStatus(self.sh.port.0, 0, KEY_WAKE, ptr::null()) };
    }

    /// Queues `Outcome::Posted(value)` with `key` in the kernel port. The
    /// value travels in the `lpOverlapped` field and is never dereferenced.
    pub(crate) fn post(&self, key: u64, value: u64) -> io::Result<()> {
        let k = key as usize;
        let (k, bytes) = if k >= KEY_ESCAPED {
            (KEY_ESCAPED, (usize::MAX - k) as u32)
        } else {
            (k, 0)
        };
        // SAFETY: the "OVERLAPPED" is a value the kernel only carries; our
        // `packet` never dereferences it for these keys.
        let ok = unsafe {
            PostQueuedCompletionStatus(
                self.sh.port.0,
                bytes,
                k,
                value as usize as *const OVERLAPPED,
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.sh.outstanding.load(Ordering::Relaxed)
    }

    pub(crate) fn bufs_leased(&self) -> usize {
        self.sh.pool.leased()
    }
}

/// An `io::Error` from std (socket2) with abnormal-disconnect codes
/// normalised like the kernel's (see [`win_error`]).
fn normalize(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => win_error(code as u32),
        None => e,
    }
}

/// `Ok` if an overlapped call is running (it returned 0, or SOCKET_ERROR
/// with WSA_IO_PENDING): its packet will come.
fn overlapped_result(rc: i32) -> io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: reads this thread's last Winsock error.
    let e = unsafe { WSAGetLastError() };
    if e == WSA_IO_PENDING {
        Ok(())
    } else {
        Err(win_error(e as u32))
    }
}

/// A copy of `e` that keeps its raw OS code (which the layers above
/// compare) when it has one.
fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Posts one `AcceptEx` on `listener` with a freshly created socket.
fn post_accept(listener: &Socket, a: &mut AcceptIo, ext: &Ext) -> io::Result<()> {
    let domain = match listener.local_addr()?.as_socket() {
        Some(std::net::SocketAddr::V6(_)) => Domain::IPV6,
        _ => Domain::IPV4,
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    a.hdr.reset(0);
    let accept = ext.accept_ex.expect("loaded in ext()");
    let mut bytes = 0u32;
    // SAFETY: both sockets are live; the address buffer and the OVERLAPPED
    // live in the boxed AcceptIo, which its entry keeps until this call's
    // packet is dequeued. No receive data (0), so a connection that sends
    // nothing completes the accept at once.
    let ok = unsafe {
        accept(
            raw(listener),
            raw(&socket),
            a.addrs.as_mut_ptr().cast(),
            0,
            ADDR_LEN as u32,
            ADDR_LEN as u32,
            &mut bytes,
            &mut a.hdr.ovl,
        )
    };
    if ok == 0 {
        overlapped_result(SOCKET_ERROR)?;
    }
    a.socket = Some(socket);
    a.pending = true;
    Ok(())
}

/// After an `AcceptEx`: gives the socket its listener's properties (so
/// getpeername, shutdown and the rest work) and reads both addresses
/// with GetAcceptExSockaddrs.
fn finish_accept(listener: &Socket, socket: &Socket, addrs: &[u8; 2 * ADDR_LEN]) -> io::Result<()> {
    let l = raw(listener);
    // SAFETY: the option value is the listener's SOCKET, read during the
    // call; both sockets are live.
    let rc = unsafe {
        setsockopt(
            raw(socket),
            SOL_SOCKET,
            SO_UPDATE_ACCEPT_CONTEXT,
            (&l as *const SOCKET).cast(),
            size_of::<SOCKET>() as i32,
        )
    };
    if rc == SOCKET_ERROR {
        return Err(last_wsa_error());
    }
    if tracing::enabled!(tracing::Level::TRACE) {
        let ext = ext()?;
        let get = ext.get_accept_ex_sockaddrs.expect("loaded in ext()");
        let (mut local, mut remote): (*mut SOCKADDR, *mut SOCKADDR) =
            (ptr::null_mut(), ptr::null_mut());
        let (mut llen, mut rlen) = (0i32, 0i32);
        // SAFETY: `addrs` is the buffer AcceptEx filled with the same
        // sizes; the out-pointers point into it afterwards.
        unsafe {
            get(
                addrs.as_ptr().cast(),
                0,
                ADDR_LEN as u32,
                ADDR_LEN as u32,
                &mut local,
                &mut llen,
                &mut remote,
                &mut rlen,
            )
        };
        let read = |p: *mut SOCKADDR, len: i32| -> Option<std::net::SocketAddr> {
            if p.is_null() || len <= 0 || len as usize > size_of::<SOCKADDR_STORAGE>() {
                return None;
            }
            // SAFETY: `p` points to `len` bytes of an address inside `addrs`.
            let (_, a) = unsafe {
                SockAddr::try_init(|storage, l| {
                    ptr::copy_nonoverlapping(p.cast::<u8>(), storage.cast::<u8>(), len as usize);
                    *l = len;
                    Ok(())
                })
            }
            .ok()?;
            a.as_socket()
        };
        tracing::trace!(local = ?read(local, llen), peer = ?read(remote, rlen), "AcceptEx");
    }
    Ok(())
}

/// The timer thread: posts each timer's packet when it is due.
fn timer_main(timers: Arc<TimerShared>, port: PortHandle) {
    let mut st = timers.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        while let Some((&(due, raw_id), &at)) = st.due.first_key_value() {
            if due > now {
                break;
            }
            st.due.remove(&(due, raw_id));
            // Removed under the lock: this thread, not `cancel`, posts it.
            if let Err(e) = Backend::post_packet(port, at as *const Header) {
                tracing::error!("cannot post a timer's completion: {e}");
            }
        }
        let wait = st
            .due
            .first_key_value()
            .map(|(&(due, _), _)| due.saturating_duration_since(Instant::now()));
        st = match wait {
            Some(d) => {
                timers
                    .changed
                    .wait_timeout(st, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => timers.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

impl Drop for Backend {
    /// Cancels what is in flight and takes the packets back (at most 2 s);
    /// what the kernel still holds after that is leaked with the port, so
    /// that it never writes into freed memory.
    fn drop(&mut self) {
        {
            let mut st = self.sh.timers.lock();
            st.stop = true;
            self.sh.timers.changed.notify_all();
        }
        if let Some(t) = self
            .sh
            .timer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
        let ids: Vec<OpId> = self
            .lock()
            .ops
            .iter()
            .map(|(i, e)| op_id(i as u32, e.hdr.generation))
            .collect();
        if !ids.is_empty() {
            tracing::debug!(
                operations = ids.len(),
                "iocp port dropped with operations in flight; cancelling them"
            );
        }
        // Timers the thread never posted: post them now (cancelled).
        let unposted: Vec<usize> = {
            let mut st = self.sh.timers.lock();
            std::mem::take(&mut st.due).into_values().collect()
        };
        for at in unposted {
            let _ = Self::post_packet(self.sh.port, at as *const Header);
        }
        for id in ids {
            let _ = self.cancel(id);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut sink = VecDeque::new();
        while !self.lock().ops.is_empty() && Instant::now() < deadline {
            let _ = self.get(Some(Duration::from_millis(50)), MAX_ENTRIES, &mut sink);
            sink.clear();
        }
        let mut t = self.lock();
        if t.ops.is_empty() {
            // SAFETY: nothing of ours is in the kernel's hands any more;
            // the handle is closed once.
            unsafe { CloseHandle(self.sh.port.0) };
        } else {
            tracing::warn!(
                operations = t.ops.len(),
                "iocp port dropped with operations the kernel still holds; leaking them"
            );
            // Keep the entries, the pool and the port alive for good: the
            // kernel may still write into them.
            let ops = std::mem::take(&mut t.ops);
            std::mem::forget(ops);
            std::mem::forget(self.sh.clone());
        }
    }
}

// SAFETY: the raw pointers in headers and entries point into memory owned
// by the backend (its boxed entries, the buffers they own) and are used
// under the table lock or by the kernel; the port handle is thread-safe.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}
