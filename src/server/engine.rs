//! The engine: completion ports, their worker threads, the connection
//! tables, listeners, and shutdown. Servers and clients are both engines;
//! a server adds listeners, a client adds outgoing connects.
//!
//! Each port has its own connection table (a slab; a slot's generation is in
//! the connection id), so with one port per worker nothing is shared between
//! workers but the counters.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::frame;
use crate::op::{Completion, Op, OpId, Outcome};
use crate::port::{CompletionPort, PortConfig};
use crate::server::conn::{
    self, CLOSE_POST, CloseMode, Conn, ConnHint, ConnState, FILE_WAKE_POST, INBOX_POST,
    INTERNAL_TIMER, SLOW_POST,
};
use crate::server::handler::{Ctx, Handler};
use crate::server::stats::{self, CloseReason, Observer, Stats, StatsSnapshot};
use crate::server::watch::{self, Watch};
use crate::server::{ConnId, Summary};

/// Wire protocol of an engine's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Length-prefixed frames (the README's "Wire protocol").
    Framed,
    /// Bytes as they come.
    Raw,
}

impl Protocol {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Framed => "framed",
            Protocol::Raw => "raw",
        }
    }
}

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Worker threads in all (spread evenly over the ports).
    pub workers: usize,
    /// Completion ports.
    pub ports: usize,
    /// Protocol of every connection.
    pub protocol: Protocol,
    /// Largest accepted frame body.
    pub max_frame: u32,
    /// Per-connection send queue limit; over it the connection stops being read.
    pub max_send_queue: usize,
    /// Connection limit; over it a new connection gets ERROR 5 and is closed.
    pub max_conns: usize,
    /// How long a closing connection waits for its peer after our last bytes.
    pub linger: Duration,
    /// How long a closing connection may take to send what it has queued
    /// before it is aborted (a peer that never reads cannot hold it open).
    pub flush_timeout: Duration,
    /// A connection that sends nothing for this long gets ERROR 6 and is
    /// closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// A frame that has begun (framed protocol) must be complete within
    /// this, plus one second per `frame_min_rate` bytes of it received so
    /// far, or the connection gets ERROR 6 and is closed (`None`: never).
    /// Time the engine itself is not reading the connection does not count.
    pub frame_timeout: Option<Duration>,
    /// Bytes per second a frame under way earns beyond `frame_timeout`
    /// (0: a flat deadline).
    pub frame_min_rate: u32,
    /// BROADCASTs per second one connection may make, beyond
    /// `broadcast_burst`; over it the connection is not read until its
    /// budget refills (0: no limit).
    pub max_broadcast_rate: u32,
    /// Broadcasts a connection may make at once before `max_broadcast_rate`
    /// applies.
    pub broadcast_burst: u32,
    /// TCP keepalive idle time for every connection (`None`: off).
    pub keepalive: Option<Duration>,
    /// Cap on bytes queued for sending over all connections; over it,
    /// connections with something queued stop being read and broadcast
    /// recipients with a backlog are dropped as slow consumers.
    pub max_queued_total: usize,
    /// File segments shorter than this are read into memory and sent; longer
    /// ones are sent zero-copy (0: always zero-copy; `usize::MAX`, the
    /// default: never). Zero-copy hands the socket references to the
    /// file's page cache: if the file is truncated while they are queued,
    /// the kernel zeroes them in place and the peer receives zeros that were
    /// never in the file (docs/DESIGN.md, "A file truncated while it is
    /// sent"). Only for files that are replaced by rename, never truncated.
    pub file_copy_below: usize,
    /// File replies (each an open file, and a pipe while it is spliced)
    /// that may be in progress at once over all connections; a FILE request
    /// over it waits, its connection not read, until one ends (see
    /// [`Ctx::reserve_file`](crate::server::Ctx::reserve_file)).
    pub max_file_replies: usize,
    /// Cap on the bytes each connection's socket holds unsent
    /// (`TCP_NOTSENT_LOWAT` on Linux; `None`: the kernel's send buffer).
    /// With a cap, a reply to a slow reader shows progress every so many
    /// bytes the peer takes, instead of not at all while a multi-megabyte
    /// send buffer drains, so a stalled reply can be told from a slow one.
    pub notsent_lowat: Option<u32>,
    /// A worker away from its port for longer than this while handling
    /// completions is counted as stalled (`worker_stalls`) and logged.
    pub stall_threshold: Duration,
    /// Settings of each port (its `concurrency` is set from the workers).
    pub port: PortConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        EngineConfig {
            workers: cores,
            ports: 1,
            protocol: Protocol::Framed,
            max_frame: frame::DEFAULT_MAX_FRAME,
            max_send_queue: 4 << 20,
            max_conns: usize::MAX,
            linger: Duration::from_secs(1),
            flush_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(60)),
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
            frame_min_rate: DEFAULT_FRAME_MIN_RATE,
            max_broadcast_rate: DEFAULT_BROADCAST_RATE,
            broadcast_burst: DEFAULT_BROADCAST_RATE,
            keepalive: Some(Duration::from_secs(30)),
            max_queued_total: 1 << 30,
            file_copy_below: usize::MAX,
            max_file_replies: 1024,
            notsent_lowat: None,
            stall_threshold: watch::DEFAULT_STALL_THRESHOLD,
            port: PortConfig::default(),
        }
    }
}

// Completion keys: 2-bit tag, 6-bit port, 24-bit generation, 32-bit slot.
const TAG_SHIFT: u32 = 62;
const TAG_CONN: u64 = 0;
const TAG_LISTENER: u64 = 1;
const TAG_CTRL: u64 = 2;
const PORT_SHIFT: u32 = 56;
const MAX_PORTS: usize = 64;
/// 22 bits of generation (of the 24 the key has room for), so that a
/// cluster-wide id (see [`ConnId::cluster_id`]) carries it whole.
const GEN_MASK: u32 = 0x3F_FFFF;
/// Cluster-wide ids: 12-bit node, 6-bit port, 22-bit generation, 24-bit slot.
const CLUSTER_NODE_SHIFT: u32 = 52;
const CLUSTER_PORT_SHIFT: u32 = 46;
const CLUSTER_GEN_SHIFT: u32 = 24;
const CLUSTER_SLOT_MASK: u64 = 0xFF_FFFF;
/// The largest node number a cluster-wide id carries.
pub const MAX_NODE: u16 = 0xFFF;
/// Listener keys with this bit are the accept back-off timer.
const LISTENER_TIMER: u64 = 1 << 32;
const CTRL_EXIT: u64 = 1;
const CTRL_TIMERS: u64 = 2;
const CTRL_WAKE: u64 = 3;

impl ConnId {
    pub(crate) fn new(port: usize, generation: u32, slot: usize) -> ConnId {
        ConnId(
            (TAG_CONN << TAG_SHIFT)
                | ((port as u64) << PORT_SHIFT)
                | (((generation & GEN_MASK) as u64) << 32)
                | slot as u64,
        )
    }
    pub(crate) fn key(self) -> u64 {
        self.0
    }

    /// This connection's id across a cluster of servers: node number
    /// `node` (1 to [`MAX_NODE`]) and the connection, packed in a `u64`.
    /// `None` if `node` is out of range, or for a slot past 2^24 (more
    /// than 16 million connections on one port).
    pub fn cluster_id(self, node: u16) -> Option<u64> {
        if node == 0 || node > MAX_NODE || self.slot() as u64 > CLUSTER_SLOT_MASK {
            return None;
        }
        let generation = (self.0 >> 32) & GEN_MASK as u64;
        Some(
            ((node as u64) << CLUSTER_NODE_SHIFT)
                | ((self.port() as u64) << CLUSTER_PORT_SHIFT)
                | (generation << CLUSTER_GEN_SHIFT)
                | self.slot() as u64,
        )
    }

    /// The node number and connection a cluster-wide id names (the
    /// inverse of [`cluster_id`](Self::cluster_id)); node 0 for a value
    /// that is not a cluster-wide id.
    pub fn from_cluster_id(id: u64) -> (u16, ConnId) {
        let node = (id >> CLUSTER_NODE_SHIFT) as u16;
        let port = ((id >> CLUSTER_PORT_SHIFT) & 0x3F) as usize;
        let generation = ((id >> CLUSTER_GEN_SHIFT) & GEN_MASK as u64) as u32;
        let slot = (id & CLUSTER_SLOT_MASK) as usize;
        (node, ConnId::new(port, generation, slot))
    }
    pub(crate) fn port(self) -> usize {
        ((self.0 >> PORT_SHIFT) & 0x3F) as usize
    }
    fn slot(self) -> usize {
        (self.0 & 0xFFFF_FFFF) as usize
    }
}

struct Slot {
    conn: Arc<Conn>,
}

/// A timer's place in its port's queue: when it is due, and a sequence
/// number that makes the key unique.
pub(crate) type TimerKey = (Instant, u64);

struct PortCtx {
    port: CompletionPort,
    conns: Mutex<slab::Slab<Slot>>,
    next_gen: AtomicU32,
    workers: usize,
    /// Connection timers of this port, earliest first. Workers fire what is
    /// due after each batch and never wait in the kernel past the earliest,
    /// so an armed timer costs one map entry and nothing per tick.
    timers: Mutex<BTreeMap<TimerKey, (ConnId, u64)>>,
    timer_seq: AtomicU64,
    /// Nanoseconds since engine start at which the last worker to wait will
    /// wake up by itself; a timer due earlier wakes it.
    wait_until: AtomicU64,
}

struct Listener {
    socket: Arc<Socket>,
    addr: SocketAddr,
    /// The armed accept of each port, if any.
    accepts: Vec<Option<OpId>>,
    /// Per port: the current back-off after running out of descriptors
    /// (zero when accepting normally).
    backoff: Vec<Duration>,
}

/// The state every worker shares.
pub(crate) struct Shared {
    ports: Vec<PortCtx>,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) protocol: Protocol,
    pub(crate) max_frame: u32,
    pub(crate) max_send_queue: usize,
    pub(crate) max_conns: AtomicUsize,
    /// Connections holding a place under `max_conns` (accepted and admitted,
    /// or connected out), taken with one `fetch_add` so two workers
    /// accepting at once cannot both see the last place as taken.
    pub(crate) admitted: AtomicUsize,
    pub(crate) linger: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) frame_timeout: Option<Duration>,
    pub(crate) frame_min_rate: u32,
    pub(crate) max_broadcast_rate: u32,
    pub(crate) broadcast_burst: u32,
    keepalive: Option<Duration>,
    pub(crate) max_queued_total: usize,
    /// File segments shorter than this are read and sent; longer ones go
    /// zero-copy.
    pub(crate) file_copy_below: usize,
    /// Most file replies in progress at once (`EngineConfig::max_file_replies`).
    pub(crate) max_file_replies: usize,
    notsent_lowat: Option<u32>,
    /// File replies in progress (reserved, queued or being sent).
    pub(crate) file_replies: AtomicUsize,
    /// Connections waiting for a file reply place, in arrival order; each
    /// is woken with `FILE_WAKE_POST` when a place frees.
    pub(crate) file_waiters: Mutex<VecDeque<ConnId>>,
    /// Bytes queued for sending over all connections (a broadcast buffer
    /// counts once per recipient, although its memory is shared).
    pub(crate) queued_total: AtomicUsize,
    pub(crate) stats: Stats,
    /// Worker stalls and the process figures (see `watch`).
    pub(crate) watch: Watch,
    listeners: Mutex<Vec<Listener>>,
    stopping: AtomicBool,
    exiting: AtomicBool,
    /// Some listener is backing off after EMFILE/ENFILE.
    accept_paused: AtomicBool,
    next_port: AtomicUsize,
    started: Instant,
    workers: usize,
    last_accept_log: Mutex<Option<Instant>>,
}

/// A running engine: ports, workers, connections.
pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
    summary: Option<Summary>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("ports", &self.shared.ports.len())
            .field("workers", &self.shared.workers)
            .finish()
    }
}

/// With `--file-send auto`, below this size a file is read and sent rather
/// than spliced (see docs/DESIGN.md for the measurement behind it).
pub const DEFAULT_FILE_COPY_BELOW: usize = 1 << 20;

/// Default [`EngineConfig::frame_timeout`]: a frame begun must be complete
/// within 10 s plus a second per KiB received (docs/DESIGN.md).
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`EngineConfig::frame_min_rate`]: 1 KiB/s.
pub const DEFAULT_FRAME_MIN_RATE: u32 = 1024;

/// Default [`EngineConfig::max_broadcast_rate`] (and burst): 1,000
/// broadcasts a second per connection.
pub const DEFAULT_BROADCAST_RATE: u32 = 1000;

/// The largest value [`EngineRef::post`] carries; the values above are the
/// engine's own.
pub const MAX_POST_VALUE: u64 = u64::MAX - 32;

/// A borrowed handle on a running engine, usable from handlers and from
/// other threads.
///
/// It borrows the [`Engine`] (from [`Engine::handle`]) or the callback's
/// connection (from [`Ctx::engine`]), so a handler cannot keep one: the
/// engine owns the handler. A thread that must post outside any callback
/// borrows one from the `Engine`, e.g. in a [`std::thread::scope`].
#[derive(Clone, Copy)]
pub struct EngineRef<'a> {
    pub(crate) shared: &'a Shared,
}

impl fmt::Debug for EngineRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineRef")
    }
}

impl EngineRef<'_> {
    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }

    /// Queues `value` to connection `id`'s [`Handler::on_posted`], run on a
    /// worker of its port (the classic IOCP articles' `PostQueuedCompletionStatus`).
    /// Returns false if the connection is gone or `value` is above
    /// [`MAX_POST_VALUE`].
    ///
    /// It does not lock the target connection, only the port's connection
    /// table for a look-up, so it is safe from any callback and any thread:
    /// the way for one connection's callback to hand work to another.
    /// True means queued, not delivered: if the connection starts closing
    /// first, the value is dropped (see [`Handler::on_posted`]). A [`ConnId`]
    /// never names a later connection, so a value never reaches the wrong one.
    pub fn post(&self, id: ConnId, value: u64) -> bool {
        if value > MAX_POST_VALUE
            || id.port() >= self.shared.ports.len()
            || self.shared.lookup(id).is_none()
        {
            return false;
        }
        self.shared.ports[id.port()].port.post(id.key(), value);
        true
    }

    /// Queues bytes on connection `id`, after what its own callbacks and
    /// earlier calls queued. Returns false if the connection is gone.
    ///
    /// Like [`post`](Self::post) it never locks connection `id`: the bytes
    /// go into the connection's inbox (a leaf lock) and its worker moves
    /// them to the send queue, so it is safe from any callback and any
    /// thread. Bytes sent to one connection from one caller arrive in
    /// order. A connection whose send queue is over its limit is dropped
    /// as a slow consumer (ERROR 7), as for broadcasts.
    pub fn send(&self, id: ConnId, bytes: bytes::Bytes) -> bool {
        self.shared.send_to(id, bytes)
    }

    /// Sends a BROADCAST frame (cmd 2, body = `sender` as u64 big-endian +
    /// `body`) to every connection of the engine, as
    /// [`Ctx::broadcast`] does with the calling connection's id; here the
    /// caller names the sender (e.g. a cluster-wide id). Safe from any
    /// callback and any thread. Returns the recipients.
    pub fn broadcast(&self, sender: u64, body: &[u8]) -> usize {
        let mut b = Vec::with_capacity(8 + body.len());
        b.extend_from_slice(&sender.to_be_bytes());
        b.extend_from_slice(body);
        self.broadcast_frame(frame::Frame::new(frame::cmd::BROADCAST, &b))
    }

    /// Queues one frame, built once and shared (never copied per
    /// recipient), on every connection of the engine. Safe from any
    /// callback and any thread. Returns the recipients.
    pub fn broadcast_frame(&self, frame: frame::Frame) -> usize {
        self.shared.broadcast(frame.into_wire()).0
    }

    /// Closes connection `id` after its queued bytes are sent. Returns false
    /// if the connection is gone. Safe from any callback and any thread.
    pub fn close(&self, id: ConnId) -> bool {
        if id.port() >= self.shared.ports.len() || self.shared.lookup(id).is_none() {
            return false;
        }
        self.shared.ports[id.port()].port.post(id.key(), CLOSE_POST);
        true
    }

    /// Counts a frame sent by other means than `Ctx::send_frame` (e.g. a
    /// header followed by a file).
    pub fn count_frame_out(&self) {
        self.shared.stats.frame_out(0, 0);
    }

    /// Like [`count_frame_out`](Self::count_frame_out), for a frame of
    /// command `cmd` with a `body_len`-byte body (counted by command).
    pub fn count_frame_out_of(&self, cmd: u32, body_len: usize) {
        self.shared.stats.frame_out(cmd, body_len);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.stats.open()
    }
}

impl Engine {
    /// Starts an engine: creates the ports and their worker threads. One
    /// `handler` serves every connection, on every worker.
    pub fn start(cfg: EngineConfig, handler: Arc<dyn Handler>) -> io::Result<Engine> {
        if cfg.ports == 0 || cfg.ports > MAX_PORTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--ports must be between 1 and {MAX_PORTS}"),
            ));
        }
        if cfg.workers < cfg.ports {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--workers must be at least --ports (every port needs a worker)",
            ));
        }
        let mut ports = Vec::with_capacity(cfg.ports);
        for i in 0..cfg.ports {
            let workers = cfg.workers / cfg.ports + usize::from(i < cfg.workers % cfg.ports);
            let mut pc = cfg.port.clone();
            pc.concurrency = workers;
            pc.single_worker = workers == 1;
            let port = CompletionPort::new(&pc)?;
            ports.push(PortCtx {
                port,
                conns: Mutex::new(slab::Slab::new()),
                next_gen: AtomicU32::new(1),
                workers,
                timers: Mutex::new(BTreeMap::new()),
                timer_seq: AtomicU64::new(0),
                wait_until: AtomicU64::new(u64::MAX),
            });
        }
        let names: Vec<String> = ports
            .iter()
            .enumerate()
            .flat_map(|(p, pc)| (0..pc.workers).map(move |w| format!("p{p}w{w}")))
            .collect();
        let started = Instant::now();
        let shared = Arc::new(Shared {
            watch: Watch::new(names, started, cfg.stall_threshold),
            ports,
            handler,
            protocol: cfg.protocol,
            max_frame: cfg.max_frame,
            max_send_queue: cfg.max_send_queue,
            max_conns: AtomicUsize::new(cfg.max_conns),
            admitted: AtomicUsize::new(0),
            linger: cfg.linger,
            flush_timeout: cfg.flush_timeout,
            idle_timeout: cfg.idle_timeout,
            frame_timeout: cfg.frame_timeout,
            frame_min_rate: cfg.frame_min_rate,
            max_broadcast_rate: cfg.max_broadcast_rate,
            broadcast_burst: cfg.broadcast_burst.max(1),
            keepalive: cfg.keepalive,
            max_queued_total: cfg.max_queued_total,
            file_copy_below: cfg.file_copy_below,
            max_file_replies: cfg.max_file_replies.max(1),
            notsent_lowat: cfg.notsent_lowat,
            file_replies: AtomicUsize::new(0),
            file_waiters: Mutex::new(VecDeque::new()),
            queued_total: AtomicUsize::new(0),
            stats: Stats::new(cfg.workers),
            listeners: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            exiting: AtomicBool::new(false),
            accept_paused: AtomicBool::new(false),
            next_port: AtomicUsize::new(0),
            started,
            workers: cfg.workers,
            last_accept_log: Mutex::new(None),
        });
        let mut threads = Vec::new();
        for p in 0..shared.ports.len() {
            for w in 0..shared.ports[p].workers {
                let s = shared.clone();
                let index = threads.len();
                let t = thread::Builder::new()
                    .name(format!("cport-p{p}w{w}"))
                    .spawn(move || worker_main(s, p, index))?;
                threads.push(t);
            }
        }
        let s = shared.clone();
        let watcher = thread::Builder::new()
            .name("cport-watch".into())
            .spawn(move || watch::run(s))?;
        Ok(Engine {
            shared,
            threads,
            watcher: Some(watcher),
            summary: None,
        })
    }

    /// A handle for sending, posting and reading stats.
    pub fn handle(&self) -> EngineRef<'_> {
        EngineRef {
            shared: &self.shared,
        }
    }

    /// Registered-file slots over all ports: connections the engine can
    /// hold without process descriptors.
    pub fn direct_capacity(&self) -> usize {
        self.shared
            .ports
            .iter()
            .map(|p| p.port.direct_capacity())
            .sum()
    }

    /// A handle on the counters and the event log that any thread may keep
    /// (the admin endpoint's).
    pub fn observer(&self) -> Observer {
        Observer {
            shared: self.shared.clone(),
        }
    }

    /// Changes the connection limit.
    pub fn set_max_conns(&self, n: usize) {
        self.shared.max_conns.store(n, Ordering::Relaxed);
    }

    /// Name of the backend running the ports.
    pub fn backend(&self) -> &'static str {
        self.shared.ports[0].port.backend()
    }

    /// Starts listening on `addr` with accepts armed on every port.
    /// Returns the bound address (useful with port 0).
    pub fn listen(&self, addr: SocketAddr, backlog: i32) -> io::Result<SocketAddr> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(SockProtocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        let bound = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no IP address"))?;
        let socket = Arc::new(socket);
        let mut ls = self.shared.lock_listeners();
        let idx = ls.len();
        ls.push(Listener {
            socket,
            addr: bound,
            accepts: vec![None; self.shared.ports.len()],
            backoff: vec![Duration::ZERO; self.shared.ports.len()],
        });
        for p in 0..self.shared.ports.len() {
            self.shared.ports[p].port.associate(&ls[idx].socket)?;
            self.shared.arm_accept(&mut ls, p, idx)?;
        }
        Ok(bound)
    }

    /// Addresses being listened on.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .lock_listeners()
            .iter()
            .map(|l| l.addr)
            .collect()
    }

    /// Opens an outgoing connection; its handler's `on_open` (or `on_close`
    /// with [`CloseReason::ConnectFailed`]) follows on a worker.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<ConnId> {
        self.shared.connect(addr, None, None)
    }

    /// Like [`connect`](Self::connect), with the connection's user data
    /// (see [`Ctx::data_mut`]) in place before any callback runs.
    pub fn connect_with<T: std::any::Any + Send>(
        &self,
        addr: SocketAddr,
        data: T,
    ) -> io::Result<ConnId> {
        self.shared.connect(addr, None, Some(Box::new(data)))
    }

    /// Like [`connect_with`](Self::connect_with), with the socket bound to
    /// `local` before it connects: the way to spread connections over
    /// several source addresses (127.0.0.2, 127.0.0.3, ...) when one
    /// (source, destination) pair would run out of ephemeral ports. With
    /// port 0 in `local` the kernel picks the source port at connect time,
    /// per destination (`IP_BIND_ADDRESS_NO_PORT` on Linux), so each source
    /// address gives a full ephemeral range to every destination. A failed
    /// bind (e.g. an address not on this host) is returned here, before
    /// any callback.
    pub fn connect_from_with<T: std::any::Any + Send>(
        &self,
        local: SocketAddr,
        addr: SocketAddr,
        data: T,
    ) -> io::Result<ConnId> {
        self.shared.connect(addr, Some(local), Some(Box::new(data)))
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }

    /// Graceful shutdown: stop accepting; let every connection flush what is
    /// queued for up to `grace`; then shut the rest; wait for every
    /// operation to come back; stop the workers. Returns the final summary.
    pub fn shutdown(&mut self, grace: Duration) -> Summary {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        let sh = &self.shared;
        {
            let mut ls = sh.lock_listeners();
            sh.stopping.store(true, Ordering::SeqCst);
            for l in ls.iter_mut() {
                for (p, a) in l.accepts.iter_mut().enumerate() {
                    if let Some(op) = a.take() {
                        let _ = sh.ports[p].port.cancel(op);
                    }
                }
            }
        }
        sh.close_all(CloseMode::Flush { linger: false });
        let deadline = Instant::now() + grace;
        while sh.conn_count() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if sh.conn_count() > 0 {
            sh.close_all(CloseMode::Abort);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while (sh.conn_count() > 0 || sh.outstanding() > 0) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let snapshot = sh.snapshot();
        sh.exiting.store(true, Ordering::SeqCst);
        for pc in &sh.ports {
            for _ in 0..pc.workers {
                pc.port.post(TAG_CTRL << TAG_SHIFT, CTRL_EXIT);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        sh.watch.stop();
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
        sh.lock_listeners().clear();
        let summary = Summary {
            connections_served: snapshot.connections_accepted,
            connections_connected: snapshot.connections_connected,
            bytes_in: snapshot.bytes_in,
            bytes_out: snapshot.bytes_out,
            frames_in: snapshot.frames_in,
            frames_out: snapshot.frames_out,
            outstanding_ops: sh.outstanding() as u64,
            outstanding_bufs: sh.bufs_leased() as u64,
            connections_left: sh.conn_count() as u64,
            worker_stalls: sh.watch.stalls(),
            uptime: sh.started.elapsed(),
            backend: sh.ports[0].port.backend().to_string(),
        };
        self.summary = Some(summary.clone());
        summary
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.summary.is_none() {
            self.shutdown(Duration::from_millis(500));
        }
    }
}

fn worker_main(shared: Arc<Shared>, p: usize, index: usize) {
    let mut worker = shared.ports[p].port.worker();
    let mut batch = Vec::with_capacity(32);
    stats::set_worker_shard(index);
    let mut trims_seen = 0;
    loop {
        let timeout = shared.next_timeout(p);
        shared.watch.end(index);
        let r = worker.get_many(&mut batch, 32, Some(timeout));
        shared.watch.begin(index);
        shared.stats.completions(index, batch.len());
        shared.ports[p]
            .wait_until
            .store(u64::MAX, Ordering::Relaxed);
        if let Err(e) = r {
            tracing::error!(port = p, "completion port wait failed: {e}");
            thread::sleep(Duration::from_millis(10));
        }
        let mut exit = 0;
        for c in batch.drain(..) {
            if c.key >> TAG_SHIFT == TAG_CTRL && matches!(c.outcome, Outcome::Posted(CTRL_EXIT)) {
                exit += 1;
                continue;
            }
            shared
                .watch
                .doing(index, c.key, watch::doing_of(&c.outcome));
            shared.dispatch(p, c);
        }
        shared.fire_timers(p, index);
        shared.watch.after_batch(&mut trims_seen);
        if exit > 0 {
            // Took more than one exit packet: give the others back so every
            // worker gets its own (the classic IOCP articles' pitfall).
            for _ in 1..exit {
                shared.ports[p].port.post(TAG_CTRL << TAG_SHIFT, CTRL_EXIT);
            }
            break;
        }
        // A worker that missed its packet still exits.
        if shared.exiting.load(Ordering::SeqCst) && shared.outstanding_on(p) == 0 {
            break;
        }
    }
}

impl Shared {
    fn lock_file_waiters(&self) -> MutexGuard<'_, VecDeque<ConnId>> {
        self.file_waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a file reply place if one is free.
    pub(crate) fn try_take_file_place(&self) -> bool {
        self.file_replies
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_file_replies).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes a file reply place for connection `id`, or (none free) puts
    /// it in the waiting line: false. The second try is made under the
    /// line's lock, and a place is released before the line is looked at
    /// (`release_file_place`), so a place freed meanwhile is either taken
    /// here or wakes this connection: no wake-up is lost.
    pub(crate) fn take_file_place_or_wait(&self, id: ConnId) -> bool {
        if self.try_take_file_place() {
            return true;
        }
        let mut w = self.lock_file_waiters();
        if self.try_take_file_place() {
            return true;
        }
        w.push_back(id);
        false
    }

    /// Whether some connection waits for a file reply place.
    pub(crate) fn file_waiting(&self) -> bool {
        !self.lock_file_waiters().is_empty()
    }

    /// Gives a file reply place back and wakes the first waiting connection.
    pub(crate) fn release_file_place(&self) {
        self.file_replies.fetch_sub(1, Ordering::AcqRel);
        self.wake_file_waiter();
    }

    /// Wakes the first connection still open in the waiting line, if any.
    pub(crate) fn wake_file_waiter(&self) {
        let mut w = self.lock_file_waiters();
        while let Some(id) = w.pop_front() {
            if self.lookup(id).is_some() {
                self.ports[id.port()].port.post(id.key(), FILE_WAKE_POST);
                return;
            }
        }
    }

    /// Takes connection `id` out of the waiting line; false if it was not
    /// in it (it was woken, or never waited).
    pub(crate) fn forget_file_waiter(&self, id: ConnId) -> bool {
        let mut w = self.lock_file_waiters();
        let before = w.len();
        w.retain(|x| *x != id);
        w.len() != before
    }

    /// Wakes every worker once (a completion that does nothing).
    pub(crate) fn wake_workers(&self) {
        for pc in &self.ports {
            for _ in 0..pc.workers {
                pc.port.post(TAG_CTRL << TAG_SHIFT, CTRL_WAKE);
            }
        }
    }

    /// Puts `bytes` in connection `id`'s inbox and wakes its worker.
    pub(crate) fn send_to(&self, id: ConnId, bytes: bytes::Bytes) -> bool {
        let Some(conn) = self.lookup(id) else {
            return false;
        };
        conn.hint.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
        conn.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bytes);
        if !conn.inbox_pending.swap(true, Ordering::AcqRel) {
            self.ports[id.port()].port.post(id.key(), INBOX_POST);
        }
        true
    }

    /// Puts one shared frame in every connection's inbox and wakes each
    /// recipient's worker. Safe from inside any callback: inbox locks are
    /// leaves. Returns the number of recipients, and whether one of them
    /// (not closing) has more than half its send queue limit waiting: the
    /// sender is then held back until it drains (see
    /// [`ConnState::broadcast_made`]).
    pub(crate) fn broadcast(&self, frame: bytes::Bytes) -> (usize, bool) {
        let mut n = 0;
        let mut congested = false;
        let soft = self.max_send_queue / 2;
        for (p, pc) in self.ports.iter().enumerate() {
            let conns = self.lock_conns(p);
            for (_, slot) in conns.iter() {
                let c = &slot.conn;
                let before = c.hint.backlog.fetch_add(frame.len(), Ordering::Relaxed);
                congested |= before > soft && !c.hint.closing.load(Ordering::Relaxed);
                c.inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(frame.clone());
                if !c.inbox_pending.swap(true, Ordering::AcqRel) {
                    pc.port.post(c.id.key(), INBOX_POST);
                }
                n += 1;
            }
        }
        (n, congested)
    }

    /// Connections not closing with more than `over` bytes waiting to be
    /// sent to them. With `drop`, each of those over `over` is also told to
    /// drop itself as a slow consumer if it still is one when it looks.
    pub(crate) fn backlogged(&self, over: usize, drop: bool) -> usize {
        let mut n = 0;
        for (p, pc) in self.ports.iter().enumerate() {
            let conns = self.lock_conns(p);
            for (_, slot) in conns.iter() {
                let h: &ConnHint = &slot.conn.hint;
                if h.backlog.load(Ordering::Relaxed) > over && !h.closing.load(Ordering::Relaxed) {
                    n += 1;
                    if drop {
                        pc.port.post(slot.conn.id.key(), SLOW_POST);
                    }
                }
            }
        }
        n
    }

    fn lock_timers(&self, p: usize) -> MutexGuard<'_, BTreeMap<TimerKey, (ConnId, u64)>> {
        self.ports[p]
            .timers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Arms a timer for connection `id`; returns its key.
    pub(crate) fn add_timer(&self, id: ConnId, after: Duration, value: u64) -> TimerKey {
        let p = id.port();
        let pc = &self.ports[p];
        let due = Instant::now() + after;
        let key = (due, pc.timer_seq.fetch_add(1, Ordering::Relaxed));
        self.lock_timers(p).insert(key, (id, value));
        let due_ns = due.duration_since(self.started).as_nanos() as u64;
        if due_ns < pc.wait_until.load(Ordering::Relaxed) {
            // A worker sleeps past this deadline: a posted completion brings
            // it back to fire timers and wait again with the new deadline.
            pc.wait_until.store(due_ns, Ordering::Relaxed);
            pc.port.post(TAG_CTRL << TAG_SHIFT, CTRL_TIMERS);
        }
        key
    }

    pub(crate) fn cancel_timer(&self, id: ConnId, key: TimerKey) {
        self.lock_timers(id.port()).remove(&key);
    }

    /// How long a worker of port `p` may wait: until the earliest timer,
    /// and at most 250 ms (so exit checks run).
    fn next_timeout(&self, p: usize) -> Duration {
        let cap = Duration::from_millis(250);
        let now = Instant::now();
        let t = match self.lock_timers(p).first_key_value() {
            Some(((due, _), _)) => due.saturating_duration_since(now).min(cap),
            None => cap,
        };
        let until = (now + t).duration_since(self.started).as_nanos() as u64;
        self.ports[p].wait_until.store(until, Ordering::Relaxed);
        t
    }

    /// Runs the handlers of every timer of port `p` that is due, on
    /// worker `w`.
    fn fire_timers(&self, p: usize, w: usize) {
        let now = Instant::now();
        for _ in 0..4096 {
            let next = {
                let mut t = self.lock_timers(p);
                match t.first_key_value() {
                    Some((k, _)) if k.0 <= now => t.pop_first(),
                    _ => None,
                }
            };
            let Some((key, (id, value))) = next else {
                return;
            };
            let Some(conn) = self.lookup(id) else {
                continue;
            };
            self.watch.doing(w, id.key(), watch::doing::TIMER);
            let mut st = conn.st.lock().unwrap_or_else(|e| e.into_inner());
            if st.finalized || !st.take_timer(key) {
                continue;
            }
            if value >= INTERNAL_TIMER {
                conn::on_internal_timer(self, &conn, &mut st, value);
            } else if !st.is_closing() {
                let h = self.handler.clone();
                h.on_timer(
                    &mut Ctx {
                        conn: &conn,
                        st: &mut st,
                        shared: self,
                    },
                    value,
                );
            }
            conn::progress(self, &conn, &mut st);
        }
    }

    fn lock_listeners(&self) -> MutexGuard<'_, Vec<Listener>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_conns(&self, p: usize) -> MutexGuard<'_, slab::Slab<Slot>> {
        self.ports[p]
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn port_of(&self, id: ConnId) -> &CompletionPort {
        &self.ports[id.port()].port
    }

    fn outstanding(&self) -> usize {
        self.ports.iter().map(|p| p.port.outstanding()).sum()
    }

    fn outstanding_on(&self, p: usize) -> usize {
        self.ports[p].port.outstanding()
    }

    fn bufs_leased(&self) -> usize {
        self.ports.iter().map(|p| p.port.bufs_leased()).sum()
    }

    fn conn_count(&self) -> usize {
        (0..self.ports.len())
            .map(|p| self.lock_conns(p).len())
            .sum()
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot {
            backend: self.ports[0].port.backend().to_string(),
            protocol: self.protocol.name().to_string(),
            ports: self.ports.len(),
            workers: self.workers,
            outstanding_ops: self.outstanding() as u64,
            bufs_leased: self.bufs_leased() as u64,
            uptime_s: self.started.elapsed().as_secs_f64(),
            send_queue_bytes: self.queued_total.load(Ordering::Relaxed) as u64,
            file_replies: self.file_replies.load(Ordering::Relaxed) as u64,
            file_replies_waiting: self.lock_file_waiters().len() as u64,
            ..StatsSnapshot::default()
        };
        let names: Vec<String> = (0..self.ports.len())
            .flat_map(|p| (0..self.ports[p].workers).map(move |w| format!("p{p}w{w}")))
            .collect();
        self.stats.fill(&mut s, &names);
        for p in &self.ports {
            let r = p.port.ring_stats();
            s.cq_overflow += r.cq_overflow;
            s.cq_full += r.cq_full;
            s.sq_full += r.sq_full;
        }
        // Nothing here may cost more with more connections or descriptors,
        // or read a file: a worker answers STATS with it. The CPU clock is
        // one system call; the resident memory is sampled by the watch
        // thread.
        s.cpu_s = crate::port::sys::process_cpu().map(|c| c.as_secs_f64());
        s.rss_bytes = self.watch.rss();
        s.worker_stalls = self.watch.stalls();
        s.cluster = self.stats.cluster_snapshot();
        s
    }

    fn lookup(&self, id: ConnId) -> Option<Arc<Conn>> {
        let p = id.port();
        if p >= self.ports.len() {
            return None;
        }
        let conns = self.lock_conns(p);
        let slot = conns.get(id.slot())?;
        (slot.conn.id == id).then(|| slot.conn.clone())
    }

    pub(crate) fn remove_conn(&self, id: ConnId) {
        let mut conns = self.lock_conns(id.port());
        if conns.get(id.slot()).is_some_and(|s| s.conn.id == id) {
            conns.remove(id.slot());
        }
    }

    fn close_all(&self, mode: CloseMode) {
        for p in 0..self.ports.len() {
            let conns: Vec<Arc<Conn>> = self
                .lock_conns(p)
                .iter()
                .map(|(_, s)| s.conn.clone())
                .collect();
            for c in conns {
                let mut st = c.st.lock().unwrap_or_else(|e| e.into_inner());
                if st.finalized {
                    continue;
                }
                st.close(self, CloseReason::Shutdown, mode, None);
                conn::progress(self, &c, &mut st);
            }
        }
    }

    /// Arms the accept of listener `idx` on port `p` unless stopping.
    /// Called with the listener table locked.
    fn arm_accept(&self, ls: &mut [Listener], p: usize, idx: usize) -> io::Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let key = (TAG_LISTENER << TAG_SHIFT) | ((p as u64) << PORT_SHIFT) | idx as u64;
        let op = self.ports[p].port.submit(
            key,
            Op::Accept {
                listener: ls[idx].socket.clone(),
            },
        )?;
        ls[idx].accepts[p] = Some(op);
        Ok(())
    }

    fn insert_conn(
        &self,
        p: usize,
        socket: Socket,
        accepted: bool,
        connecting: bool,
    ) -> io::Result<Arc<Conn>> {
        let _ = socket.set_tcp_nodelay(true);
        if let Some(idle) = self.keepalive {
            let _ = crate::port::sys::set_keepalive(&socket, idle);
        }
        if let Some(bytes) = self.notsent_lowat {
            let _ = crate::port::sys::set_notsent_lowat(&socket, bytes);
        }
        self.ports[p].port.associate(&socket)?;
        let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        // An accepted socket moves into the port's registered-file table
        // when there is one, so it holds no process descriptor.
        let socket = if accepted {
            self.ports[p].port.make_direct(socket)
        } else {
            crate::op::Sock::Os(Arc::new(socket))
        };
        let generation = self.ports[p].next_gen.fetch_add(1, Ordering::Relaxed) & GEN_MASK;
        let hint = Arc::new(ConnHint::default());
        let mut conns = self.lock_conns(p);
        let entry = conns.vacant_entry();
        let id = ConnId::new(p, generation, entry.key());
        let conn = Arc::new(Conn {
            id,
            socket,
            peer,
            local,
            accepted,
            inbox: Mutex::new(Vec::new()),
            inbox_pending: AtomicBool::new(false),
            hint: hint.clone(),
            st: Mutex::new(ConnState::new(self, hint, connecting)),
        });
        entry.insert(Slot { conn: conn.clone() });
        Ok(conn)
    }

    fn connect(
        &self,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        user: Option<Box<dyn std::any::Any + Send>>,
    ) -> io::Result<ConnId> {
        let p = self.next_port.fetch_add(1, Ordering::Relaxed) % self.ports.len();
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(SockProtocol::TCP),
        )?;
        if let Some(local) = local {
            if local.port() == 0 {
                crate::port::sys::set_bind_address_no_port(&socket)?;
            }
            socket.bind(&local.into())?;
        }
        let conn = self.insert_conn(p, socket, false, true)?;
        let mut st = conn.st.lock().unwrap_or_else(|e| e.into_inner());
        st.user = user;
        match self.ports[p].port.submit(
            conn.id.key(),
            Op::Connect {
                socket: match &conn.socket {
                    crate::op::Sock::Os(s) => s.clone(),
                    crate::op::Sock::Direct(_) => {
                        unreachable!("connecting sockets are not registered")
                    }
                },
                addr,
            },
        ) {
            Ok(op) => {
                st.connect_op = Some(op);
                Ok(conn.id)
            }
            Err(e) => {
                st.connecting = false;
                st.close(
                    self,
                    CloseReason::ConnectFailed,
                    CloseMode::Abort,
                    Some(e.to_string()),
                );
                conn::progress(self, &conn, &mut st);
                Err(e)
            }
        }
    }

    fn dispatch(&self, p: usize, c: Completion) {
        match c.key >> TAG_SHIFT {
            TAG_CONN => self.dispatch_conn(ConnId(c.key), c),
            TAG_LISTENER => self.dispatch_listener(p, c),
            _ => {}
        }
    }

    fn dispatch_listener(&self, p: usize, c: Completion) {
        let idx = (c.key & 0xFFFF_FFFF) as usize;
        let timer = c.key & LISTENER_TIMER != 0;
        match c.outcome {
            Outcome::Timer(_) if timer => {
                let mut ls = self.lock_listeners();
                // Unless a closing connection already resumed it.
                if idx < ls.len()
                    && ls[idx].accepts[p].is_none()
                    && let Err(e) = self.arm_accept(&mut ls, p, idx)
                {
                    tracing::error!("cannot re-arm accept: {e}");
                }
            }
            Outcome::Accepted { result, more } => {
                let mut scarce = false;
                match result {
                    Ok(socket) => {
                        if self.accept_paused.load(Ordering::Relaxed) {
                            self.reset_backoff(p, idx);
                        }
                        self.accepted(p, socket)
                    }
                    Err(e) if e.raw_os_error() == Some(crate::port::sys::errno::ECANCELED) => {}
                    Err(e) => {
                        self.stats.accept_error();
                        scarce = matches!(
                            e.raw_os_error(),
                            Some(crate::port::sys::errno::EMFILE)
                                | Some(crate::port::sys::errno::ENFILE)
                                | Some(crate::port::sys::errno::ENOBUFS)
                                | Some(crate::port::sys::errno::ENOMEM)
                        );
                        self.log_accept_error(&e);
                    }
                }
                if !more {
                    let mut ls = self.lock_listeners();
                    if idx >= ls.len() {
                        return;
                    }
                    ls[idx].accepts[p] = None;
                    if self.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let r = if scarce {
                        // Out of descriptors: wait before accepting again
                        // (100 ms doubling to 1 s) instead of spinning on
                        // the same error; a closing connection resumes early.
                        let b = &mut ls[idx].backoff[p];
                        *b = (*b * 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
                        let after = *b;
                        self.accept_paused.store(true, Ordering::Relaxed);
                        self.ports[p]
                            .port
                            .submit(c.key | LISTENER_TIMER, Op::Timeout { after })
                            .map(drop)
                    } else {
                        self.arm_accept(&mut ls, p, idx)
                    };
                    if let Err(e) = r {
                        tracing::error!("cannot re-arm accept: {e}");
                    }
                }
            }
            _ => {}
        }
    }

    /// An accept succeeded: the listener's back-off is over.
    fn reset_backoff(&self, p: usize, idx: usize) {
        let mut ls = self.lock_listeners();
        if let Some(l) = ls.get_mut(idx) {
            l.backoff[p] = Duration::ZERO;
        }
        let any = ls.iter().any(|l| l.backoff.iter().any(|b| !b.is_zero()));
        self.accept_paused.store(any, Ordering::Relaxed);
    }

    /// A connection closed: a descriptor is free, so a listener backing off
    /// after EMFILE tries again now instead of at the end of its back-off.
    pub(crate) fn conn_closed(&self) {
        if !self.accept_paused.load(Ordering::Relaxed) {
            return;
        }
        let mut ls = self.lock_listeners();
        for idx in 0..ls.len() {
            for p in 0..self.ports.len() {
                if ls[idx].accepts[p].is_none()
                    && !ls[idx].backoff[p].is_zero()
                    && let Err(e) = self.arm_accept(&mut ls, p, idx)
                {
                    tracing::error!("cannot re-arm accept: {e}");
                }
            }
        }
    }

    fn log_accept_error(&self, e: &io::Error) {
        let mut last = self
            .last_accept_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            tracing::warn!("accept failed: {e}");
            self.stats
                .event_error(None, None, "accept_failed", &e.to_string());
        }
    }

    fn accepted(&self, accepting_port: usize, socket: Socket) {
        if self.stopping.load(Ordering::SeqCst) {
            return; // dropping the socket closes it
        }
        // Every port arms an accept on the same listener, but one ring tends
        // to win nearly every connection. Nothing ties a socket to the ring
        // that accepted it, so spread new connections over the ports: the
        // load (and the registered-file slots) is shared evenly.
        let p = if self.ports.len() > 1 {
            self.next_port.fetch_add(1, Ordering::Relaxed) % self.ports.len()
        } else {
            accepting_port
        };
        let conn = match self.insert_conn(p, socket, true, false) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot set up an accepted connection: {e}");
                return;
            }
        };
        self.stats.opened(true);
        let mut st = conn.st.lock().unwrap_or_else(|e| e.into_inner());
        st.was_open = true;
        tracing::debug!(conn = %conn.id, peer = ?conn.peer, "connect");
        self.stats.event_connect(conn.id, conn.peer);
        // Take a place first, then look at how many were taken before: the
        // check and the count are one atomic step, so concurrent accepts on
        // several workers admit exactly `max_conns`.
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        let over = before >= self.max_conns.load(Ordering::Relaxed);
        if over {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
        } else {
            st.admitted = true;
        }
        let mut ctx = Ctx {
            conn: &conn,
            st: &mut st,
            shared: self,
        };
        if over {
            ctx.send_error(frame::code::BUSY, "server busy: connection limit reached");
        } else {
            let h = self.handler.clone();
            h.on_open(&mut ctx);
            conn::start_check_timer(self, &conn, &mut st);
        }
        conn::progress(self, &conn, &mut st);
    }

    fn dispatch_conn(&self, id: ConnId, c: Completion) {
        let Some(conn) = self.lookup(id) else {
            // The connection is gone (or its slot reused): the outcome and
            // whatever it hands back are dropped here.
            self.stats.late();
            return;
        };
        let mut st = conn.st.lock().unwrap_or_else(|e| e.into_inner());
        if st.finalized {
            self.stats.late();
            return;
        }
        // Request handling is timed from here to the replies' submission.
        let timed = match c.outcome {
            Outcome::Received(_) | Outcome::ReceivedMulti { .. } => self.stats.clock(),
            _ => None,
        };
        match c.outcome {
            Outcome::Received(r) => conn::on_recv_done(self, &conn, &mut st, r, false),
            Outcome::ReceivedMulti { result, more } => {
                conn::on_recv_done(self, &conn, &mut st, result, more)
            }
            Outcome::Sent { result, bufs } => conn::on_sent(self, &mut st, result, bufs),
            Outcome::SentFile { result, .. } => conn::on_sent_file(self, &conn, &mut st, result),
            Outcome::Connected { result, .. } => {
                st.connect_op = None;
                st.connecting = false;
                match result {
                    Ok(()) if !st.is_closing() => {
                        self.stats.opened(false);
                        st.was_open = true;
                        self.admitted.fetch_add(1, Ordering::AcqRel);
                        st.admitted = true;
                        conn::start_check_timer(self, &conn, &mut st);
                        let h = self.handler.clone();
                        h.on_open(&mut Ctx {
                            conn: &conn,
                            st: &mut st,
                            shared: self,
                        });
                    }
                    Ok(()) => {}
                    Err(e) => st.close(
                        self,
                        CloseReason::ConnectFailed,
                        CloseMode::Abort,
                        Some(e.to_string()),
                    ),
                }
            }
            Outcome::Posted(INBOX_POST) => {} // `progress` drains the inbox
            Outcome::Posted(FILE_WAKE_POST) => conn::on_file_wake(self, &mut st),
            Outcome::Posted(SLOW_POST) => conn::slow_consumer_check(self, &mut st),
            Outcome::Posted(CLOSE_POST) => st.close(
                self,
                CloseReason::Local,
                CloseMode::Flush { linger: true },
                None,
            ),
            Outcome::Posted(v) => {
                if !st.is_closing() {
                    let h = self.handler.clone();
                    h.on_posted(
                        &mut Ctx {
                            conn: &conn,
                            st: &mut st,
                            shared: self,
                        },
                        v,
                    );
                }
            }
            Outcome::Accepted { .. }
            | Outcome::Closed(_)
            | Outcome::Timer(_)
            | Outcome::Shut(_) => {}
        }
        conn::progress(self, &conn, &mut st);
        if let Some(t) = timed {
            self.stats.handled(t);
        }
    }
}
