//! Counters of an engine: connections, frames and bytes by command, errors
//! by kind, completions per worker, the latency of request handling, and a
//! bounded log of recent connection events. Read as a [`StatsSnapshot`]
//! (the STATS command's JSON and the admin endpoint's `/stats`).
//!
//! The counters sit on the data path, so they must cost next to nothing:
//! each worker thread counts into its own cache-line-aligned shard of
//! relaxed atomics (found through a thread-local index set when the worker
//! starts; other threads share one extra shard), and a snapshot sums the
//! shards. No lock is taken per frame. The latency histogram and the event
//! log are off until something asks for them ([`Observer::set_live`], done
//! by the admin endpoint): then each receive completion costs two clock
//! reads, and each connect, disconnect or error frame one short lock on the
//! event ring.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::frame::{self, cmd};
use crate::server::ConnId;
use crate::server::engine::Shared;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CloseReason {
    /// The peer closed its side (EOF).
    PeerClosed,
    /// The peer reset the connection or vanished (ECONNRESET, EPIPE,
    /// ETIMEDOUT, and EHOSTUNREACH/ENETUNREACH/ENETDOWN, which is how TCP
    /// reports giving up on a peer whose link died; ERROR_NETNAME_DELETED
    /// on Windows).
    Reset,
    /// A declared frame length was over the limit.
    FrameTooLarge,
    /// The connection limit was reached.
    Busy,
    /// The handler closed it.
    Local,
    /// The server is shutting down.
    Shutdown,
    /// A client connect failed.
    ConnectFailed,
    /// Nothing arrived for the idle timeout.
    IdleTimeout,
    /// A broadcast recipient fell too far behind.
    SlowConsumer,
    /// A frame begun was not complete within its deadline.
    FrameTimeout,
    /// Any other I/O error.
    Error,
}

impl CloseReason {
    /// Every reason, in a fixed order.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::PeerClosed,
        CloseReason::Reset,
        CloseReason::FrameTooLarge,
        CloseReason::Busy,
        CloseReason::Local,
        CloseReason::Shutdown,
        CloseReason::ConnectFailed,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::FrameTimeout,
        CloseReason::Error,
    ];

    /// snake_case name, as used in stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Reset => "reset",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::Busy => "busy",
            CloseReason::Local => "local",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::FrameTimeout => "frame_timeout",
            CloseReason::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Classifies an I/O error that ended a connection.
    pub fn from_error(e: &std::io::Error) -> CloseReason {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut | UnexpectedEof
            | NotConnected | HostUnreachable | NetworkUnreachable | NetworkDown => {
                CloseReason::Reset
            }
            _ => CloseReason::Error,
        }
    }
}

/// The commands counted one by one; every other command number is
/// counted as `other`.
pub const COMMANDS: [&str; 8] = [
    "echo",
    "broadcast",
    "ping",
    "pong",
    "file",
    "stats",
    "error",
    "other",
];

fn cmd_slot(c: u32) -> usize {
    match c {
        cmd::ECHO => 0,
        cmd::BROADCAST => 1,
        cmd::PING => 2,
        cmd::PONG => 3,
        cmd::FILE => 4,
        cmd::STATS => 5,
        cmd::ERROR => 6,
        _ => 7,
    }
}

/// Kinds of error counted in [`StatsSnapshot::errors`]: an ERROR frame
/// sent, by its code's name (`unknown_command`, `frame_too_large`, ...,
/// `other_code` for a service's own codes), a failed accept, and a
/// connection ended by a reset or another I/O error.
pub const ERROR_KINDS: [&str; 12] = [
    "other_code",
    "frame_too_large",
    "unknown_command",
    "not_found",
    "forbidden",
    "busy",
    "idle_timeout",
    "slow_consumer",
    "file_too_large",
    "accept_failed",
    "reset",
    "io_error",
];
const ERR_ACCEPT: usize = 9;
const ERR_RESET: usize = 10;
const ERR_IO: usize = 11;

/// Upper bounds of the latency histogram's buckets, in nanoseconds:
/// powers of two from 1 µs (1024 ns) to 134 ms, then +Inf.
const LAT_FIRST_SHIFT: u32 = 10;
const LAT_BUCKETS: usize = 18;

fn lat_bucket(ns: u64) -> usize {
    // ceil(log2(ns)) for ns >= 2, then shifted so 1024 ns is bucket 0.
    let log = 64 - ns.saturating_sub(1).leading_zeros();
    (log.saturating_sub(LAT_FIRST_SHIFT) as usize).min(LAT_BUCKETS)
}

/// One worker's counters, on cache lines of their own so that workers never
/// write to the same line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard {
    accepted: AtomicU64,
    connected: AtomicU64,
    /// Connections that had opened and then closed (with `accepted` and
    /// `connected` gives the open count; a connection may open on one
    /// shard and close on another, so only the sum means anything).
    closed_open: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    frames_in: [AtomicU64; 8],
    frame_bytes_in: [AtomicU64; 8],
    frames_out: [AtomicU64; 8],
    frame_bytes_out: [AtomicU64; 8],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: [AtomicU64; 12],
    late_completions: AtomicU64,
    file_truncated: AtomicU64,
    completions: AtomicU64,
    /// Latency buckets (not cumulative), the last one +Inf.
    latency: [AtomicU64; LAT_BUCKETS + 1],
    latency_sum_ns: AtomicU64,
}

thread_local! {
    /// The shard of the engine worker running on this thread.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Makes the calling thread count into shard `i` (a worker's index).
pub(crate) fn set_worker_shard(i: usize) {
    SHARD.with(|s| s.set(i));
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

fn sum<'a>(it: impl Iterator<Item = &'a AtomicU64>) -> u64 {
    it.fold(0u64, |acc, a| acc.wrapping_add(a.load(Ordering::Relaxed)))
}

/// Live counters.
#[derive(Debug)]
pub struct Stats {
    /// One per worker, plus one for every other thread.
    shards: Box<[Shard]>,
    /// Latency histogram and event log are recorded.
    live: AtomicBool,
    /// What reports the cluster bridge's state into every snapshot, if any.
    cluster: Mutex<Option<Arc<dyn ClusterSource>>>,
    events: Mutex<EventRing>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::new(1)
    }
}

/// One recorded event: a connection opened or closed, or an error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// Position in the log, from 1; increases by one per event.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// `connect`, `disconnect` or `error`.
    pub kind: &'static str,
    /// Connection id, when the event concerns one.
    pub conn: Option<String>,
    /// The peer's address, when known.
    pub peer: Option<String>,
    /// Close reason, error kind, or nothing.
    pub reason: Option<String>,
    /// Free text: the error message, bytes moved by a closed connection.
    pub detail: String,
}

/// How many recent events are kept.
pub const EVENT_LOG_LEN: usize = 1000;

#[derive(Debug, Default)]
struct EventRing {
    next_seq: u64,
    ring: VecDeque<Event>,
}

impl Stats {
    /// Counters for an engine with `workers` worker threads.
    pub(crate) fn new(workers: usize) -> Stats {
        Stats {
            shards: (0..workers + 1).map(|_| Shard::default()).collect(),
            live: AtomicBool::new(false),
            cluster: Mutex::new(None),
            events: Mutex::new(EventRing {
                next_seq: 1,
                ring: VecDeque::new(),
            }),
        }
    }

    pub(crate) fn cluster_snapshot(&self) -> Option<ClusterSnapshot> {
        let source = self
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        source.map(|c| c.cluster_snapshot())
    }

    fn shard(&self) -> &Shard {
        let last = self.shards.len() - 1;
        let i = SHARD.with(|s| s.get());
        &self.shards[i.min(last)]
    }

    pub(crate) fn opened(&self, accepted: bool) {
        let s = self.shard();
        add(if accepted { &s.accepted } else { &s.connected }, 1);
    }

    pub(crate) fn closed(&self, reason: CloseReason, was_open: bool) {
        let s = self.shard();
        add(&s.closed[reason.index()], 1);
        if was_open {
            add(&s.closed_open, 1);
        }
        match reason {
            CloseReason::Reset => add(&s.errors[ERR_RESET], 1),
            CloseReason::Error => add(&s.errors[ERR_IO], 1),
            _ => {}
        }
    }

    /// A frame of command `c` with a `body_len`-byte body arrived.
    pub(crate) fn frame_in(&self, c: u32, body_len: usize) {
        let s = self.shard();
        let i = cmd_slot(c);
        add(&s.frames_in[i], 1);
        add(&s.frame_bytes_in[i], (frame::HEADER_LEN + body_len) as u64);
    }

    /// A frame of command `c` with a `body_len`-byte body was queued.
    pub(crate) fn frame_out(&self, c: u32, body_len: usize) {
        let s = self.shard();
        let i = cmd_slot(c);
        add(&s.frames_out[i], 1);
        add(&s.frame_bytes_out[i], (frame::HEADER_LEN + body_len) as u64);
    }

    /// Encoded frame bytes were queued (a broadcast, `EngineRef::send`):
    /// counted by the command in their header.
    pub(crate) fn wire_out(&self, wire: &[u8]) {
        let c = match wire.get(4..8) {
            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        };
        let s = self.shard();
        let i = cmd_slot(c);
        add(&s.frames_out[i], 1);
        add(&s.frame_bytes_out[i], wire.len() as u64);
    }

    pub(crate) fn bytes_in(&self, n: usize) {
        add(&self.shard().bytes_in, n as u64);
    }

    pub(crate) fn bytes_out(&self, n: usize) {
        add(&self.shard().bytes_out, n as u64);
    }

    pub(crate) fn error_sent(&self, code: u32) {
        let i = if (1..=8).contains(&code) {
            code as usize
        } else {
            0
        };
        add(&self.shard().errors[i], 1);
    }

    pub(crate) fn accept_error(&self) {
        add(&self.shard().errors[ERR_ACCEPT], 1);
    }

    pub(crate) fn late(&self) {
        add(&self.shard().late_completions, 1);
    }

    /// A FILE reply ended early: the file was shorter than its header said.
    pub(crate) fn file_truncated(&self) {
        add(&self.shard().file_truncated, 1);
    }

    /// Worker `w` took `n` completions from its port.
    pub(crate) fn completions(&self, w: usize, n: usize) {
        let last = self.shards.len() - 1;
        add(&self.shards[w.min(last)].completions, n as u64);
    }

    /// Completions taken by every worker so far.
    pub(crate) fn completions_total(&self) -> u64 {
        sum(self.shards.iter().map(|s| &s.completions))
    }

    /// Whether the latency histogram and the event log are recorded.
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    /// The start of a timed request, when timing is on.
    pub(crate) fn clock(&self) -> Option<Instant> {
        self.is_live().then(Instant::now)
    }

    /// A request timed from `since` has been handled.
    pub(crate) fn handled(&self, since: Instant) {
        let ns = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let s = self.shard();
        add(&s.latency[lat_bucket(ns)], 1);
        add(&s.latency_sum_ns, ns);
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        let opened = sum(self.shards.iter().map(|s| &s.accepted))
            .wrapping_add(sum(self.shards.iter().map(|s| &s.connected)));
        opened.wrapping_sub(sum(self.shards.iter().map(|s| &s.closed_open)))
    }

    /// Records an event when the log is on; `make` runs only then.
    pub(crate) fn event(&self, make: impl FnOnce() -> Event) {
        if !self.is_live() {
            return;
        }
        let mut e = make();
        e.t_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut r = self.events.lock().unwrap_or_else(|e| e.into_inner());
        e.seq = r.next_seq;
        r.next_seq += 1;
        if r.ring.len() == EVENT_LOG_LEN {
            r.ring.pop_front();
        }
        r.ring.push_back(e);
    }

    pub(crate) fn event_connect(&self, id: ConnId, peer: Option<SocketAddr>) {
        self.event(|| Event {
            kind: "connect",
            conn: Some(id.to_string()),
            peer: peer.map(|p| p.to_string()),
            ..Event::blank()
        });
    }

    pub(crate) fn event_disconnect(
        &self,
        id: ConnId,
        peer: Option<SocketAddr>,
        reason: CloseReason,
        error: Option<&str>,
        bytes: (u64, u64),
    ) {
        self.event(|| Event {
            kind: "disconnect",
            conn: Some(id.to_string()),
            peer: peer.map(|p| p.to_string()),
            reason: Some(reason.name().to_string()),
            detail: match error {
                Some(e) if !e.is_empty() => format!("{e}; in {} B, out {} B", bytes.0, bytes.1),
                _ => format!("in {} B, out {} B", bytes.0, bytes.1),
            },
            ..Event::blank()
        });
    }

    pub(crate) fn event_error(
        &self,
        id: Option<ConnId>,
        peer: Option<SocketAddr>,
        kind: &str,
        message: &str,
    ) {
        self.event(|| Event {
            kind: "error",
            conn: id.map(|i| i.to_string()),
            peer: peer.map(|p| p.to_string()),
            reason: Some(kind.to_string()),
            detail: message.chars().take(200).collect(),
            ..Event::blank()
        });
    }

    /// Events after `after` (by `seq`), oldest first, at most `max`.
    pub(crate) fn events_since(&self, after: u64, max: usize) -> Vec<Event> {
        let r = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let skip = r.ring.iter().take_while(|e| e.seq <= after).count();
        let start = skip.max(r.ring.len().saturating_sub(max));
        r.ring.iter().skip(start).cloned().collect()
    }

    pub(crate) fn fill(&self, s: &mut StatsSnapshot, worker_names: &[String]) {
        let sh = &self.shards;
        let each = |f: fn(&Shard) -> &AtomicU64| sum(sh.iter().map(f));
        s.connections_open = self.open();
        s.connections_accepted = each(|x| &x.accepted);
        s.connections_connected = each(|x| &x.connected);
        s.closed = CloseReason::ALL
            .iter()
            .map(|r| {
                let i = r.index();
                (r.name().to_string(), sum(sh.iter().map(|x| &x.closed[i])))
            })
            .collect();
        s.commands = COMMANDS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let c = CommandCounts {
                    frames_in: sum(sh.iter().map(|x| &x.frames_in[i])),
                    bytes_in: sum(sh.iter().map(|x| &x.frame_bytes_in[i])),
                    frames_out: sum(sh.iter().map(|x| &x.frames_out[i])),
                    bytes_out: sum(sh.iter().map(|x| &x.frame_bytes_out[i])),
                };
                (name.to_string(), c)
            })
            .collect();
        s.frames_in = s.commands.values().map(|c| c.frames_in).sum();
        s.frames_out = s.commands.values().map(|c| c.frames_out).sum();
        s.bytes_in = each(|x| &x.bytes_in);
        s.bytes_out = each(|x| &x.bytes_out);
        s.errors = ERROR_KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), sum(sh.iter().map(|x| &x.errors[i]))))
            .collect();
        s.errors_sent = (0..=8).map(|i| sum(sh.iter().map(|x| &x.errors[i]))).sum();
        s.unknown_commands = s.errors["unknown_command"];
        s.accept_errors = s.errors["accept_failed"];
        s.late_completions = each(|x| &x.late_completions);
        s.file_truncated = each(|x| &x.file_truncated);
        s.completions = worker_names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.clone(),
                    sh[i.min(sh.len() - 1)].completions.load(Ordering::Relaxed),
                )
            })
            .collect();
        let mut cumulative = 0;
        let buckets = (0..=LAT_BUCKETS)
            .map(|b| {
                cumulative += sum(sh.iter().map(|x| &x.latency[b]));
                let le_s = if b == LAT_BUCKETS {
                    f64::INFINITY
                } else {
                    (1u64 << (LAT_FIRST_SHIFT as usize + b)) as f64 / 1e9
                };
                (le_s, cumulative)
            })
            .collect::<Vec<_>>();
        s.latency = LatencySnapshot {
            recorded: self.is_live(),
            count: cumulative,
            sum_s: each(|x| &x.latency_sum_ns) as f64 / 1e9,
            buckets: buckets
                .into_iter()
                .map(|(le_s, count)| LatencyBucket {
                    le_s: le_s.is_finite().then_some(le_s),
                    count,
                })
                .collect(),
        };
    }
}

impl Event {
    fn blank() -> Event {
        Event {
            seq: 0,
            t_ms: 0,
            kind: "",
            conn: None,
            peer: None,
            reason: None,
            detail: String::new(),
        }
    }
}

/// Frames and their bytes (header included) for one command.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct CommandCounts {
    /// Frames received.
    pub frames_in: u64,
    /// Their bytes, headers included.
    pub bytes_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Their bytes, headers included (a FILE reply counts its file).
    pub bytes_out: u64,
}

/// One bucket of the latency histogram: requests handled in at most
/// `le_s` seconds (cumulative, as in Prometheus).
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct LatencyBucket {
    /// Upper bound in seconds; `None` is +Inf.
    pub le_s: Option<f64>,
    /// Requests at or under it.
    pub count: u64,
}

/// Latency of request handling: from the worker taking a receive
/// completion to the replies it caused being queued and submitted (decode,
/// handler callbacks, send submission).
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Whether it is being recorded (only while the admin endpoint is on).
    pub recorded: bool,
    /// Requests timed.
    pub count: u64,
    /// Their total time in seconds.
    pub sum_s: f64,
    /// Cumulative buckets, powers of two from 1 µs, then +Inf.
    pub buckets: Vec<LatencyBucket>,
}

impl LatencySnapshot {
    /// Upper bound of the bucket holding quantile `q` (0..1), in seconds;
    /// `None` with no requests or when it is in the +Inf bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|b| b.count >= rank)
            .and_then(|b| b.le_s)
    }
}

/// A consistent-enough copy of the counters, plus engine facts.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StatsSnapshot {
    /// Backend running the ports.
    pub backend: String,
    /// Protocol served.
    pub protocol: String,
    /// Completion ports.
    pub ports: usize,
    /// Worker threads in all.
    pub workers: usize,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Outgoing connections made since start (clients).
    pub connections_connected: u64,
    /// Closed connections by reason.
    pub closed: BTreeMap<String, u64>,
    /// Frames received.
    pub frames_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Frames and frame bytes in and out by command (see [`COMMANDS`]).
    pub commands: BTreeMap<String, CommandCounts>,
    /// ERROR frames sent.
    pub errors_sent: u64,
    /// Frames with an unknown command.
    pub unknown_commands: u64,
    /// Failed accepts (other than cancellation).
    pub accept_errors: u64,
    /// Errors by kind (see [`ERROR_KINDS`]).
    pub errors: BTreeMap<String, u64>,
    /// Completions that arrived for a connection already gone (dropped).
    pub late_completions: u64,
    /// FILE replies cut short (connection closed) because the file shrank
    /// below the length announced in the reply's header.
    pub file_truncated: u64,
    /// Completions taken by each worker thread, by thread name (`p0w0`:
    /// port 0, worker 0).
    pub completions: BTreeMap<String, u64>,
    /// Bytes queued for sending over all connections now.
    pub send_queue_bytes: u64,
    /// FILE replies in progress now (each holds an open file).
    pub file_replies: u64,
    /// FILE requests waiting for a place under the bound on file replies
    /// in progress (their connections are not read meanwhile).
    pub file_replies_waiting: u64,
    /// Operations in flight in all ports.
    pub outstanding_ops: u64,
    /// Pooled receive buffers lent out in all ports.
    pub bufs_leased: u64,
    /// Completions the kernel dropped for a full completion queue, in all
    /// ports (io_uring's `cq_overflow`; must stay 0).
    pub cq_overflow: u64,
    /// Reaps that found a completion queue full (the rest waited in the
    /// kernel's overflow list, not lost).
    pub cq_full: u64,
    /// Submissions that found a submission queue full.
    pub sq_full: u64,
    /// Latency of request handling.
    pub latency: LatencySnapshot,
    /// Seconds since the engine started.
    pub uptime_s: f64,
    /// Process CPU time in seconds, when readable.
    pub cpu_s: Option<f64>,
    /// Process resident memory in bytes, when readable (sampled once a
    /// second, off the workers).
    pub rss_bytes: Option<u64>,
    /// Times a worker stayed away from its port for longer than the stall
    /// threshold (100 ms by default) while handling completions.
    pub worker_stalls: u64,
    /// The cluster bridge, when the server is in a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSnapshot>,
}

/// A cluster bridge's state, as STATS, `/metrics` and the dashboard show it
/// (docs/CLUSTER.md).
#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterSnapshot {
    /// This node's name.
    pub node_name: String,
    /// This node's number (the top bits of its connections' cluster-wide ids).
    pub node: u16,
    /// "up" or "degraded".
    pub state: String,
    /// Why it is degraded (`None` when up).
    pub reason: Option<String>,
    /// The NATS servers it was given.
    pub servers: Vec<String>,
    /// Local broadcasts published to the cluster.
    pub published: u64,
    /// Targeted sends published to other nodes.
    pub sent: u64,
    /// Messages received from other nodes.
    pub received: u64,
    /// Of those, delivered to local connections (broadcasts and targeted sends).
    pub delivered: u64,
    /// Messages dropped or lost, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Messages waiting to be published now.
    pub queue_out: u64,
    /// Messages received and waiting to be delivered now.
    pub queue_in: u64,
    /// Bound of each queue.
    pub queue_limit: u64,
    /// Last NATS round-trip time in microseconds.
    pub rtt_us: Option<u64>,
    /// The other nodes heard from, by name.
    pub nodes: Vec<ClusterNode>,
}

/// Another node of the cluster, as last heard from.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterNode {
    /// Its name.
    pub name: String,
    /// Its node number.
    pub node: u16,
    /// Seconds since it was last heard from.
    pub last_heard_s: f64,
}

/// Reports a [`ClusterSnapshot`] into an engine's snapshots (see
/// [`Observer::set_cluster`]).
pub trait ClusterSource: Send + Sync + std::fmt::Debug + 'static {
    /// The state now.
    fn cluster_snapshot(&self) -> ClusterSnapshot;
}

/// A handle on an engine's counters and event log that any thread may
/// keep, e.g. the admin endpoint's. It keeps the engine's shared state
/// alive, not its workers: after [`Engine::shutdown`](crate::server::Engine::shutdown)
/// it still reads the final counters.
#[derive(Clone)]
pub struct Observer {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Observer {
    /// Current counters (the STATS command's document).
    pub fn snapshot(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }

    /// Turns recording of the latency histogram and the event log on or off.
    pub fn set_live(&self, on: bool) {
        self.shared.stats.live.store(on, Ordering::Relaxed);
    }

    /// Makes every snapshot (STATS, `/stats`, `/metrics`, the dashboard)
    /// carry `source`'s cluster state.
    pub fn set_cluster(&self, source: Arc<dyn ClusterSource>) {
        *self
            .shared
            .stats
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Events after `after` (by [`Event::seq`]), oldest first, at most `max`
    /// (the newest ones when there are more).
    pub fn events_since(&self, after: u64, max: usize) -> Vec<Event> {
        self.shared.stats.events_since(after, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_from_1us() {
        assert_eq!(lat_bucket(0), 0);
        assert_eq!(lat_bucket(1024), 0);
        assert_eq!(lat_bucket(1025), 1);
        assert_eq!(lat_bucket(2048), 1);
        assert_eq!(lat_bucket(3000), 2);
        assert_eq!(lat_bucket(u64::MAX), LAT_BUCKETS);
    }

    #[test]
    fn shards_sum_and_open_count_crosses_shards() {
        let s = Stats::new(2);
        set_worker_shard(0);
        s.opened(true);
        s.opened(true);
        s.frame_in(cmd::ECHO, 10);
        set_worker_shard(1);
        s.closed(CloseReason::Reset, true);
        s.frame_out(cmd::ECHO, 10);
        s.wire_out(&frame::encode(cmd::BROADCAST, b"abc"));
        set_worker_shard(usize::MAX);
        s.error_sent(frame::code::UNKNOWN_COMMAND);
        s.error_sent(99);
        let mut snap = StatsSnapshot::default();
        s.fill(&mut snap, &["p0w0".into(), "p0w1".into()]);
        assert_eq!(snap.connections_open, 1);
        assert_eq!(snap.connections_accepted, 2);
        assert_eq!(snap.closed["reset"], 1);
        assert_eq!(snap.errors["reset"], 1);
        assert_eq!(snap.commands["echo"].frames_in, 1);
        assert_eq!(snap.commands["echo"].bytes_in, 18);
        assert_eq!(snap.commands["echo"].frames_out, 1);
        assert_eq!(snap.commands["broadcast"].bytes_out, 11);
        assert_eq!(snap.frames_out, 2);
        assert_eq!(snap.errors_sent, 2);
        assert_eq!(snap.unknown_commands, 1);
        assert_eq!(snap.errors["other_code"], 1);
    }

    #[test]
    fn event_log_is_bounded_and_off_by_default() {
        let s = Stats::new(1);
        s.event_error(None, None, "x", "ignored");
        assert!(s.events_since(0, 10).is_empty());
        s.live.store(true, Ordering::Relaxed);
        for i in 0..EVENT_LOG_LEN + 5 {
            s.event_error(None, None, "x", &i.to_string());
        }
        let all = s.events_since(0, usize::MAX);
        assert_eq!(all.len(), EVENT_LOG_LEN);
        assert_eq!(all[0].seq, 6);
        let tail = s.events_since(all[all.len() - 3].seq, 10);
        assert_eq!(tail.len(), 2);
        assert_eq!(s.events_since(0, 3).len(), 3);
        assert_eq!(s.events_since(0, 3)[2].seq, (EVENT_LOG_LEN + 5) as u64);
    }

    #[test]
    fn quantile_reads_bucket_bounds() {
        let s = Stats::new(1);
        s.live.store(true, Ordering::Relaxed);
        let sh = &s.shards[0];
        add(&sh.latency[0], 90);
        add(&sh.latency[3], 10);
        let mut snap = StatsSnapshot::default();
        s.fill(&mut snap, &[]);
        let l = &snap.latency;
        assert_eq!(l.count, 100);
        assert_eq!(l.quantile(0.5), Some(1024e-9));
        assert_eq!(l.quantile(0.99), Some(8192e-9));
    }
}

// Linux errno values; the Windows codes are mapped by the IOCP backend.
#[cfg(all(test, target_os = "linux"))]
mod close_reason_tests {
    use super::CloseReason;
    use std::io::Error;

    /// A peer whose link died ends with EHOSTUNREACH (TCP's soft error when
    /// neighbour discovery fails) as often as with ETIMEDOUT: both are a
    /// vanished peer, not a server error (found by the fault tests).
    #[test]
    fn a_vanished_peer_is_a_reset() {
        for errno in [
            libc::ECONNRESET,
            libc::EPIPE,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ENETDOWN,
        ] {
            assert_eq!(
                CloseReason::from_error(&Error::from_raw_os_error(errno)),
                CloseReason::Reset,
                "errno {errno}"
            );
        }
        assert_eq!(
            CloseReason::from_error(&Error::from_raw_os_error(libc::EINVAL)),
            CloseReason::Error
        );
    }
}
