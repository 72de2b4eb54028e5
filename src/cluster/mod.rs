//! The cluster bridge: BROADCAST and targeted sends across several cport
//! servers through NATS (only with the `cluster` feature).
//!
//! cport invents no cluster protocol: every node holds one NATS connection
//! and publishes on three subjects under a prefix (`cport` unless
//! configured):
//!
//! - `PREFIX.b` — each local BROADCAST, published once; every other node
//!   delivers it to its own clients;
//! - `PREFIX.n.NODE` — targeted sends to a connection of node `NODE`;
//! - `PREFIX.hb` — a heartbeat a second, naming the node (the dashboard's
//!   list of nodes heard from);
//! - `PREFIX.s` — messages from a service to its peers on the other nodes
//!   ([`Cluster::publish`], [`Cluster::set_receiver`]), e.g. the chat
//!   example's room membership.
//!
//! The NATS client runs on a thread of its own (a small single-threaded
//! tokio runtime). The engine's workers never wait for it: a worker hands
//! a message over with a non-blocking push into a bounded queue, and
//! incoming messages wait in another bounded queue until the delivery
//! thread ([`Cluster::run_delivery`]) hands them to the engine. A full
//! queue drops the message, counts it, and logs at most once a second.
//!
//! The semantics (at most once, per-sender order, what is counted when
//! NATS goes away) are in docs/CLUSTER.md.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;

use crate::frame::{self, Frame};
use crate::server::{
    ClusterNode, ClusterSnapshot, ClusterSource, ConnId, EngineRef, MAX_NODE, Observer,
};

/// Default subject prefix.
pub const DEFAULT_SUBJECT: &str = "cport";
/// Default bound of each queue (messages).
pub const DEFAULT_QUEUE: usize = 65_536;

/// How often a node says it is alive (and measures the NATS round trip).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long leaves the list of nodes.
const FORGET_NODE: Duration = Duration::from_secs(30);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

const MAGIC: u8 = 0xC1;
const KIND_BROADCAST: u8 = 1;
const KIND_SEND: u8 = 2;
const KIND_HEARTBEAT: u8 = 3;
const KIND_SERVICE: u8 = 4;
/// magic, kind, node (u16), incarnation (u64), sequence (u64), target (u64).
const HEADER: usize = 28;

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`, `tls://host:port`); several
    /// seed servers of one NATS cluster may be given.
    pub servers: Vec<String>,
    /// Subject prefix: nodes with the same prefix form one cluster.
    pub subject: String,
    /// This node's name, unique in the cluster; its node number (the top
    /// 12 bits of its connections' cluster-wide ids) is derived from it.
    pub node_name: String,
    /// NATS token.
    pub token: Option<String>,
    /// NATS user and password.
    pub user_password: Option<(String, String)>,
    /// NATS credentials file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the NATS server with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse a NATS connection without TLS.
    pub require_tls: bool,
    /// Bound of each queue (to NATS, from NATS), in messages.
    pub queue: usize,
    /// Largest frame body delivered from other nodes (the server's --max-frame).
    pub max_frame: u32,
}

impl ClusterConfig {
    /// A configuration with the defaults: prefix `cport`, 65,536-message queues.
    pub fn new(servers: Vec<String>, node_name: String) -> ClusterConfig {
        ClusterConfig {
            servers,
            subject: DEFAULT_SUBJECT.into(),
            node_name,
            token: None,
            user_password: None,
            creds: None,
            tls_ca: None,
            tls_cert: None,
            require_tls: false,
            queue: DEFAULT_QUEUE,
            max_frame: frame::DEFAULT_MAX_FRAME,
        }
    }

    fn check(&self) -> io::Result<()> {
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if self.servers.is_empty() {
            return bad("give at least one NATS server URL".into());
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !self.subject.split('.').all(token_ok) {
            return bad(format!(
                "subject prefix {:?}: dot-separated words of letters, digits, '-' and '_'",
                self.subject
            ));
        }
        let name_ok = |c: char| c.is_alphanumeric() || "-_.:@".contains(c);
        if self.node_name.is_empty()
            || self.node_name.len() > 128
            || !self.node_name.chars().all(name_ok)
        {
            return bad(format!(
                "node name {:?}: 1 to 128 letters, digits, '-', '_', '.', ':' or '@'",
                self.node_name
            ));
        }
        if self.queue == 0 {
            return bad("the queue bound must be at least 1".into());
        }
        let files = self
            .creds
            .iter()
            .chain(self.tls_ca.iter())
            .chain(self.tls_cert.iter().flat_map(|(c, k)| [c, k].into_iter()));
        for f in files {
            std::fs::metadata(f).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot read {}: {e}", f.display()))
            })?;
        }
        Ok(())
    }
}

/// The node number of a node name (1 to [`MAX_NODE`]): FNV-1a, so every
/// node computes the same number for a name.
pub fn node_number(name: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % MAX_NODE as u64) as u16 + 1
}

/// Counts what happens at most once a second in the log.
#[derive(Debug)]
struct RateLog {
    what: &'static str,
    pending: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl RateLog {
    fn new(what: &'static str) -> RateLog {
        RateLog {
            what,
            pending: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// Counts one; logs the count if the last line is a second old. Never
    /// waits for the lock: a thread that finds it taken leaves the log to
    /// the holder.
    fn hit(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        *last = Some(now);
        let n = self.pending.swap(0, Ordering::Relaxed);
        tracing::warn!("cluster: {n} message(s) dropped: {}", self.what);
    }
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    delivered: AtomicU64,
    drop_out_full: AtomicU64,
    drop_in_full: AtomicU64,
    drop_disconnected: AtomicU64,
    drop_publish_error: AtomicU64,
    lost_gap: AtomicU64,
    duplicate: AtomicU64,
    malformed: AtomicU64,
    gone: AtomicU64,
    no_cluster_id: AtomicU64,
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

enum Out {
    /// A BROADCAST frame (its complete wire encoding).
    Broadcast(Bytes),
    /// Bytes for connection `to` (a cluster-wide id) of another node.
    Send(u64, Bytes),
    /// A message for the service on every other node.
    Service(Bytes),
}

enum In {
    Broadcast(Frame),
    Send(ConnId, Bytes),
    Service(u16, Bytes),
}

/// What a service runs for each message from its peers on other nodes:
/// the engine, the origin's node number, the bytes.
pub type Receiver = Arc<dyn Fn(EngineRef<'_>, u16, Bytes) + Send + Sync>;

#[derive(Debug)]
struct State {
    up: bool,
    reason: Option<String>,
}

#[derive(Debug)]
struct Peer {
    name: String,
    heard: Instant,
}

struct Inner {
    cfg: ClusterConfig,
    node: u16,
    /// Tells this run of the node from an earlier one with the same name.
    incarnation: u64,
    out_tx: tokio::sync::mpsc::Sender<Out>,
    in_rx: Mutex<mpsc::Receiver<In>>,
    in_depth: AtomicU64,
    state: Mutex<State>,
    /// Last round trip in microseconds (`u64::MAX`: none yet).
    rtt_us: AtomicU64,
    peers: Mutex<HashMap<u16, Peer>>,
    receiver: Mutex<Option<Receiver>>,
    n: Counters,
    stop: AtomicBool,
    /// Wakes the NATS thread to stop, even mid-publish to a stalled NATS.
    stop_wake: tokio::sync::Notify,
    out_full_log: RateLog,
    in_full_log: RateLog,
    disconnected_log: RateLog,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node_name", &self.cfg.node_name)
            .field("node", &self.node)
            .finish()
    }
}

impl Inner {
    /// Records the bridge's state; logs every change.
    fn set_state(&self, up: bool, reason: Option<String>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.up == up && st.reason == reason {
            return;
        }
        if up {
            tracing::info!(
                "cluster: up (node {} #{}, subject {}.*)",
                self.cfg.node_name,
                self.node,
                self.cfg.subject
            );
        } else {
            tracing::warn!(
                "cluster: degraded ({}); serving local clients",
                reason.as_deref().unwrap_or("unknown")
            );
        }
        st.up = up;
        st.reason = reason;
    }

    fn snapshot(&self) -> ClusterSnapshot {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = &self.n;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let dropped = [
            ("queue_full_out", g(&n.drop_out_full)),
            ("queue_full_in", g(&n.drop_in_full)),
            ("disconnected", g(&n.drop_disconnected)),
            ("publish_error", g(&n.drop_publish_error)),
            ("lost_in_transit", g(&n.lost_gap)),
            ("duplicate", g(&n.duplicate)),
            ("malformed", g(&n.malformed)),
            ("connection_gone", g(&n.gone)),
            ("no_cluster_id", g(&n.no_cluster_id)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let now = Instant::now();
        let mut nodes: Vec<ClusterNode> = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(node, p)| ClusterNode {
                name: p.name.clone(),
                node: *node,
                last_heard_s: now.duration_since(p.heard).as_secs_f64(),
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let limit = self.cfg.queue as u64;
        let rtt = g(&self.rtt_us);
        ClusterSnapshot {
            node_name: self.cfg.node_name.clone(),
            node: self.node,
            state: if st.up { "up" } else { "degraded" }.into(),
            reason: st.reason.clone(),
            servers: self.cfg.servers.clone(),
            published: g(&n.published),
            sent: g(&n.sent),
            received: g(&n.received),
            delivered: g(&n.delivered),
            dropped,
            queue_out: limit.saturating_sub(self.out_tx.capacity() as u64),
            queue_in: g(&self.in_depth),
            queue_limit: limit,
            rtt_us: (rtt != u64::MAX).then_some(rtt),
            nodes,
        }
    }

    fn push_out(&self, m: Out) -> bool {
        match self.out_tx.try_send(m) {
            Ok(()) => true,
            Err(_) => {
                inc(&self.n.drop_out_full);
                self.out_full_log.hit();
                false
            }
        }
    }
}

#[derive(Debug)]
struct Source(Arc<Inner>);

impl ClusterSource for Source {
    fn cluster_snapshot(&self) -> ClusterSnapshot {
        self.0.snapshot()
    }
}

/// A node's bridge to the cluster. Handlers hold it (in an `Arc`) and call
/// [`broadcast`](Self::broadcast) and [`send`](Self::send); one thread runs
/// [`run_delivery`](Self::run_delivery) with the engine's handle.
pub struct Cluster {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Cluster {
    /// Starts the bridge: checks the configuration, then connects to NATS
    /// on a thread of its own and returns at once. Until NATS is reached
    /// the node is degraded and serves its own clients; it keeps trying
    /// with a backoff (at most 2 s between attempts).
    pub fn start(cfg: ClusterConfig) -> io::Result<Cluster> {
        cfg.check()?;
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(cfg.queue);
        let (in_tx, in_rx) = mpsc::sync_channel(cfg.queue);
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32);
        let inner = Arc::new(Inner {
            node: node_number(&cfg.node_name),
            state: Mutex::new(State {
                up: false,
                reason: Some(format!("connecting to NATS at {}", cfg.servers.join(", "))),
            }),
            cfg,
            incarnation,
            out_tx,
            in_rx: Mutex::new(in_rx),
            in_depth: AtomicU64::new(0),
            rtt_us: AtomicU64::new(u64::MAX),
            peers: Mutex::new(HashMap::new()),
            receiver: Mutex::new(None),
            n: Counters::default(),
            stop: AtomicBool::new(false),
            stop_wake: tokio::sync::Notify::new(),
            out_full_log: RateLog::new("the queue to NATS is full (NATS slow or unreachable)"),
            in_full_log: RateLog::new("the queue from NATS is full (delivery behind)"),
            disconnected_log: RateLog::new("not connected to NATS"),
        });
        tracing::warn!(
            "cluster: degraded (connecting to NATS at {}); serving local clients",
            inner.cfg.servers.join(", ")
        );
        let thread = {
            let inner = inner.clone();
            thread::Builder::new()
                .name("cport-cluster".into())
                .spawn(move || nats_thread(inner, out_rx, in_tx))?
        };
        Ok(Cluster {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// This node's number.
    pub fn node(&self) -> u16 {
        self.inner.node
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.cfg.node_name
    }

    /// Connection `id`'s cluster-wide id: what the BROADCAST frames of
    /// every node carry as its sender id, and what [`send`](Self::send)
    /// takes. (The raw id for a connection past the 2^24th slot of a port,
    /// which has no cluster-wide id.)
    pub fn id_of(&self, id: ConnId) -> u64 {
        id.cluster_id(self.inner.node).unwrap_or(id.raw())
    }

    /// The BROADCAST of connection `from`: delivered now to every local
    /// connection (sender included) and published once for the other
    /// nodes. The sender id in the frame is `from`'s cluster-wide id.
    /// Never waits: if the queue to NATS is full, the other nodes miss
    /// this one (counted as `queue_full_out`). Returns the local recipients.
    pub fn broadcast(&self, engine: EngineRef<'_>, from: ConnId, body: &[u8]) -> usize {
        let Some(sender) = from.cluster_id(self.inner.node) else {
            inc(&self.inner.n.no_cluster_id);
            return engine.broadcast(from.raw(), body);
        };
        let mut b = Vec::with_capacity(8 + body.len());
        b.extend_from_slice(&sender.to_be_bytes());
        b.extend_from_slice(body);
        let f = Frame::new(frame::cmd::BROADCAST, &b);
        let n = engine.broadcast_frame(f.clone());
        self.inner.push_out(Out::Broadcast(f.into_wire()));
        n
    }

    /// Queues `bytes` on connection `to` (a cluster-wide id from
    /// [`id_of`](Self::id_of) or a BROADCAST's sender id), on whichever
    /// node it is. Bytes from one caller to one connection arrive in
    /// order. Returns false if `to` is a local connection that is gone,
    /// not a cluster-wide id, or the queue to NATS is full; true means
    /// queued, not delivered (at most once, see docs/CLUSTER.md).
    pub fn send(&self, engine: EngineRef<'_>, to: u64, bytes: Bytes) -> bool {
        let (node, id) = ConnId::from_cluster_id(to);
        if node == 0 {
            return false;
        }
        if node == self.inner.node {
            return engine.send(id, bytes);
        }
        self.inner.push_out(Out::Send(to, bytes))
    }

    /// Publishes `bytes` for the service on every other node, whose
    /// [receiver](Self::set_receiver) gets them on its delivery thread: the
    /// way for a handler to tell its peers what they need to know (e.g.
    /// who is in which room). At most once, in order per node; false if
    /// the queue to NATS is full.
    pub fn publish(&self, bytes: Bytes) -> bool {
        self.inner.push_out(Out::Service(bytes))
    }

    /// Sets what runs for each [`publish`](Self::publish) of another node,
    /// on the delivery thread (it must not block). It should not hold the
    /// handler that holds this bridge strongly (use a `Weak`), or neither
    /// is ever freed.
    pub fn set_receiver(&self, f: Receiver) {
        *self
            .inner
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Delivers what has come from other nodes, waiting up to `wait` for
    /// the first message. Returns the messages delivered.
    pub fn deliver(&self, engine: EngineRef<'_>, wait: Duration) -> usize {
        let rx = self.inner.in_rx.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        let mut next = rx.recv_timeout(wait).ok();
        while let Some(m) = next {
            self.inner.in_depth.fetch_sub(1, Ordering::Relaxed);
            match m {
                In::Broadcast(f) => {
                    engine.broadcast_frame(f);
                    inc(&self.inner.n.delivered);
                }
                In::Send(id, bytes) => {
                    if engine.send(id, bytes) {
                        inc(&self.inner.n.delivered);
                    } else {
                        inc(&self.inner.n.gone);
                    }
                }
                In::Service(node, bytes) => {
                    let f = self
                        .inner
                        .receiver
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    if let Some(f) = f {
                        f(engine, node, bytes);
                        inc(&self.inner.n.delivered);
                    }
                }
            }
            n += 1;
            next = if n % 4096 == 0 {
                None
            } else {
                rx.try_recv().ok()
            };
        }
        n
    }

    /// Delivers what comes from other nodes until [`stop`](Self::stop).
    /// Run it on a thread of its own that borrows the engine, e.g. in a
    /// [`std::thread::scope`].
    pub fn run_delivery(&self, engine: EngineRef<'_>) {
        while !self.inner.stop.load(Ordering::Relaxed) {
            self.deliver(engine, Duration::from_millis(100));
        }
    }

    /// The bridge's state and counters.
    pub fn snapshot(&self) -> ClusterSnapshot {
        self.inner.snapshot()
    }

    /// Makes the engine's snapshots (STATS, `/stats`, `/metrics`, the
    /// dashboard) carry this bridge's state.
    pub fn attach(&self, observer: &Observer) {
        observer.set_cluster(Arc::new(Source(self.inner.clone())));
    }

    /// Stops delivering and disconnects from NATS (after publishing what is
    /// queued, for up to a second). Idempotent.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        self.inner.stop_wake.notify_one();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn header(kind: u8, node: u16, incarnation: u64, seq: u64, target: u64, extra: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(HEADER + extra);
    b.put_u8(MAGIC);
    b.put_u8(kind);
    b.put_u16(node);
    b.put_u64(incarnation);
    b.put_u64(seq);
    b.put_u64(target);
    b
}

struct Parsed {
    kind: u8,
    node: u16,
    incarnation: u64,
    seq: u64,
    target: u64,
    rest: Bytes,
}

fn parse(p: &Bytes) -> Option<Parsed> {
    if p.len() < HEADER || p[0] != MAGIC {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap_or_default());
    Some(Parsed {
        kind: p[1],
        node: u16::from_be_bytes([p[2], p[3]]),
        incarnation: u64_at(4),
        seq: u64_at(12),
        target: u64_at(20),
        rest: p.slice(HEADER..),
    })
}

fn nats_thread(
    inner: Arc<Inner>,
    out_rx: tokio::sync::mpsc::Receiver<Out>,
    in_tx: mpsc::SyncSender<In>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            inner.set_state(false, Some(format!("cannot start the NATS client: {e}")));
            return;
        }
    };
    rt.block_on(run(inner, out_rx, in_tx));
    rt.shutdown_timeout(Duration::from_secs(1));
}

async fn options(inner: &Arc<Inner>) -> Result<async_nats::ConnectOptions, String> {
    let cfg = &inner.cfg;
    let mut o = match &cfg.creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(t) = &cfg.token {
        o = o.token(t.clone());
    }
    if let Some((u, p)) = &cfg.user_password {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(ca) = &cfg.tls_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let Some((c, k)) = &cfg.tls_cert {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    if cfg.require_tls {
        o = o.require_tls(true);
    }
    let servers = cfg.servers.join(", ");
    let (i1, i2) = (inner.clone(), inner.clone());
    Ok(o.name(format!("cport {}", cfg.node_name))
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(5))
        .subscription_capacity(cfg.queue.max(1024))
        .reconnect_delay_callback(move |attempts| {
            if attempts > 1 {
                i1.set_state(
                    false,
                    Some(format!("cannot reach NATS at {servers}; retrying")),
                );
            }
            let ms = 50u64.saturating_mul(1 << attempts.min(10));
            Duration::from_millis(ms).min(MAX_BACKOFF)
        })
        .event_callback(move |ev| {
            let inner = i2.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => inner.set_state(true, None),
                    async_nats::Event::Disconnected => inner.set_state(
                        false,
                        Some("lost the connection to NATS; reconnecting".into()),
                    ),
                    async_nats::Event::Closed => {
                        inner.set_state(false, Some("the NATS connection was closed".into()))
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!("cluster: NATS server error: {e}");
                        let s = e.to_string();
                        if s.to_ascii_lowercase().contains("authori") {
                            inner.set_state(false, Some(format!("NATS refused us: {s}")));
                        }
                    }
                    other => tracing::debug!("cluster: NATS event: {other}"),
                }
            }
        }))
}

async fn run(
    inner: Arc<Inner>,
    mut out_rx: tokio::sync::mpsc::Receiver<Out>,
    in_tx: mpsc::SyncSender<In>,
) {
    let opts = match options(&inner).await {
        Ok(o) => o,
        Err(e) => return inner.set_state(false, Some(e)),
    };
    let client = match opts.connect(inner.cfg.servers.clone()).await {
        Ok(c) => c,
        Err(e) => return inner.set_state(false, Some(format!("NATS: {e}"))),
    };
    let prefix = inner.cfg.subject.clone();
    let bcast_subject = format!("{prefix}.b");
    let hb_subject = format!("{prefix}.hb");
    let mut subs = Vec::new();
    let service_subject = format!("{prefix}.s");
    for s in [
        bcast_subject.clone(),
        format!("{prefix}.n.{}", inner.node),
        hb_subject.clone(),
        service_subject.clone(),
    ] {
        match client.subscribe(s.clone()).await {
            Ok(sub) => subs.push(sub),
            Err(e) => return inner.set_state(false, Some(format!("cannot subscribe to {s}: {e}"))),
        }
    }
    let mut tasks = Vec::new();
    for sub in subs {
        let (inner, in_tx) = (inner.clone(), in_tx.clone());
        tasks.push(tokio::spawn(receive(inner, sub, in_tx)));
    }
    {
        let (inner, client, hb_subject) = (inner.clone(), client.clone(), hb_subject.clone());
        tasks.push(tokio::spawn(heartbeat(inner, client, hb_subject)));
    }
    let mut seq = 0u64;
    loop {
        let m = tokio::select! {
            m = out_rx.recv() => m,
            _ = inner.stop_wake.notified() => break,
        };
        let Some(m) = m else { break };
        if client.connection_state() != async_nats::connection::State::Connected {
            inc(&inner.n.drop_disconnected);
            inner.disconnected_log.hit();
            continue;
        }
        let (subject, payload, counter) = match m {
            Out::Broadcast(wire) => {
                seq += 1;
                let mut b = header(
                    KIND_BROADCAST,
                    inner.node,
                    inner.incarnation,
                    seq,
                    0,
                    wire.len(),
                );
                b.put_slice(&wire);
                (bcast_subject.clone(), b.freeze(), &inner.n.published)
            }
            Out::Send(to, bytes) => {
                let node = ConnId::from_cluster_id(to).0;
                let mut b = header(KIND_SEND, inner.node, inner.incarnation, 0, to, bytes.len());
                b.put_slice(&bytes);
                (format!("{prefix}.n.{node}"), b.freeze(), &inner.n.sent)
            }
            Out::Service(bytes) => {
                let mut b = header(
                    KIND_SERVICE,
                    inner.node,
                    inner.incarnation,
                    0,
                    0,
                    bytes.len(),
                );
                b.put_slice(&bytes);
                (service_subject.clone(), b.freeze(), &inner.n.sent)
            }
        };
        // A stalled NATS holds the publish (its buffers are full): that is
        // the backpressure that fills our queue. Stopping still goes.
        let r = tokio::select! {
            r = client.publish(subject, payload) => r,
            _ = inner.stop_wake.notified() => break,
        };
        match r {
            Ok(()) => inc(counter),
            Err(e) => {
                inc(&inner.n.drop_publish_error);
                tracing::debug!("cluster: publish failed: {e}");
            }
        }
    }
    // Publish what is left (bounded by the flush timeout), then go.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    for t in tasks {
        t.abort();
    }
}

/// Every second: say we are alive, measure the round trip, forget nodes
/// long silent.
async fn heartbeat(inner: Arc<Inner>, client: async_nats::Client, subject: String) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        let name = inner.cfg.node_name.as_bytes();
        let mut b = header(
            KIND_HEARTBEAT,
            inner.node,
            inner.incarnation,
            0,
            0,
            name.len(),
        );
        b.put_slice(name);
        let t = Instant::now();
        if client.publish(subject.clone(), b.freeze()).await.is_ok()
            && let Ok(Ok(())) = tokio::time::timeout(HEARTBEAT, client.flush()).await
        {
            inner
                .rtt_us
                .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        let now = Instant::now();
        inner
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, p| now.duration_since(p.heard) < FORGET_NODE);
    }
}

/// Takes one subscription's messages: checks them, drops duplicates and
/// counts gaps (per origin node and run), and queues them for delivery.
async fn receive(inner: Arc<Inner>, mut sub: async_nats::Subscriber, in_tx: mpsc::SyncSender<In>) {
    // Origin node -> (incarnation, last sequence number delivered).
    let mut last: HashMap<u16, (u64, u64)> = HashMap::new();
    while let Some(msg) = sub.next().await {
        let Some(p) = parse(&msg.payload) else {
            inc(&inner.n.malformed);
            continue;
        };
        if p.node == inner.node && p.incarnation == inner.incarnation {
            continue; // our own (no_echo should have kept it from us)
        }
        let m = match p.kind {
            KIND_HEARTBEAT => {
                let name = String::from_utf8_lossy(&p.rest).into_owned();
                if p.node == inner.node {
                    inner.set_state(
                        false,
                        Some(format!(
                            "node number {} is also used by node {name:?}; give each node its own --node-name",
                            p.node
                        )),
                    );
                }
                inner
                    .peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        p.node,
                        Peer {
                            name,
                            heard: Instant::now(),
                        },
                    );
                continue;
            }
            KIND_BROADCAST => {
                let ok = Frame::from_wire(p.rest).filter(|f| {
                    f.cmd() == frame::cmd::BROADCAST
                        && f.body_len() >= 8
                        && f.body_len() <= 8 + inner.cfg.max_frame as usize
                        && ConnId::from_cluster_id(u64::from_be_bytes(
                            f.wire()[frame::HEADER_LEN..frame::HEADER_LEN + 8]
                                .try_into()
                                .unwrap_or_default(),
                        ))
                        .0 == p.node
                });
                let Some(f) = ok else {
                    inc(&inner.n.malformed);
                    continue;
                };
                let e = last.entry(p.node).or_insert((p.incarnation, 0));
                if e.0 != p.incarnation {
                    *e = (p.incarnation, 0);
                }
                if p.seq <= e.1 {
                    inc(&inner.n.duplicate);
                    continue;
                }
                if e.1 != 0 && p.seq > e.1 + 1 {
                    inner
                        .n
                        .lost_gap
                        .fetch_add(p.seq - e.1 - 1, Ordering::Relaxed);
                }
                e.1 = p.seq;
                In::Broadcast(f)
            }
            KIND_SEND => {
                let (node, id) = ConnId::from_cluster_id(p.target);
                if node != inner.node {
                    inc(&inner.n.malformed);
                    continue;
                }
                In::Send(id, p.rest)
            }
            KIND_SERVICE => In::Service(p.node, p.rest),
            _ => {
                inc(&inner.n.malformed);
                continue;
            }
        };
        inc(&inner.n.received);
        inner.in_depth.fetch_add(1, Ordering::Relaxed);
        if in_tx.try_send(m).is_err() {
            inner.in_depth.fetch_sub(1, Ordering::Relaxed);
            inc(&inner.n.drop_in_full);
            inner.in_full_log.hit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_numbers_are_in_range_and_stable() {
        for name in ["a", "b", "node-1", "host:9001", ""] {
            let n = node_number(name);
            assert!((1..=MAX_NODE).contains(&n), "{name}: {n}");
            assert_eq!(n, node_number(name));
        }
        assert_ne!(node_number("a"), node_number("b"));
    }

    #[test]
    fn headers_round_trip() {
        let mut b = header(KIND_SEND, 7, 42, 9, 1234, 3);
        b.put_slice(b"abc");
        let p = parse(&b.freeze()).unwrap();
        assert_eq!(
            (p.kind, p.node, p.incarnation, p.seq, p.target),
            (KIND_SEND, 7, 42, 9, 1234)
        );
        assert_eq!(&p.rest[..], b"abc");
        assert!(parse(&Bytes::from_static(b"short")).is_none());
    }

    #[test]
    fn cluster_ids_round_trip() {
        let id = ConnId::from_cluster_id((5u64 << 52) | (3 << 46) | (77 << 24) | 12);
        assert_eq!(id.0, 5);
        assert_eq!(
            id.1.cluster_id(5),
            Some((5u64 << 52) | (3 << 46) | (77 << 24) | 12)
        );
        assert_eq!(id.1.cluster_id(0), None);
    }
}
