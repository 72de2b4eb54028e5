//! `cport stress --mode broadcast`: connections spread over one or more
//! servers (the nodes of a cluster), each taking turns to send BROADCAST
//! frames at a set total rate, every connection checking what it gets.
//!
//! Every connection, sender included, must get every broadcast exactly
//! once, and each sender's broadcasts in the order sent: a broadcast body
//! carries the sender's index and a sequence number, and a receiver
//! accepts only the next number of each sender. Whatever else arrives
//! (a repeat, a gap, a body that is not ours, a sender id that changes) is
//! counted as an error and fails the run. The report gives deliveries per
//! second cluster-wide and the delivery latency (send to receipt, both in
//! this process, so one clock).
//!
//! Connections first prove they are registered on their server (a PING
//! answered) before the first broadcast, so none can miss one by arriving
//! late. One process; bounded in time (connect timeout, the duration, a
//! drain of at most 10 s).

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::frame::{Frame, cmd};
use crate::port::BackendKind;
use crate::server::{CloseInfo, ConnId, Ctx, Engine, Handler};

/// What a broadcast run does.
#[derive(Debug, Clone)]
pub struct BroadcastConfig {
    /// Servers; connection `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Connections in all.
    pub connections: u64,
    /// Broadcasts per second over all connections (taking turns).
    pub rate: f64,
    /// Body bytes of each BROADCAST (at least 16).
    pub size: usize,
    /// How long broadcasts are sent.
    pub duration: Duration,
    /// A connection not open and answering after this long fails the run.
    pub connect_timeout: Duration,
    /// Worker threads (one port each).
    pub threads: usize,
    /// Backend of the client's ports.
    pub backend: BackendKind,
}

/// What a broadcast run saw.
#[derive(Debug, Clone, Default)]
pub struct BroadcastReport {
    /// Connections that were open and answering when sending began.
    pub ready: u64,
    /// Broadcasts sent.
    pub sent: u64,
    /// Deliveries expected (every connection gets every broadcast).
    pub expected: u64,
    /// Deliveries that arrived.
    pub delivered: u64,
    /// Repeats, gaps, foreign bodies, changed sender ids.
    pub errors: u64,
    /// The first few errors, described.
    pub error_samples: Vec<String>,
    /// From the first broadcast sent to the last delivery.
    pub elapsed: Duration,
    /// Delivery latency percentiles (50, 99, 99.9, max), microseconds.
    pub latency_us: [f64; 4],
    /// Connections lost during the run.
    pub closed: u64,
}

impl BroadcastReport {
    /// Every connection got every broadcast exactly once, in order.
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.delivered == self.expected && self.closed == 0 && self.sent > 0
    }

    /// Deliveries per second over the run.
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }

    /// The report as text.
    pub fn text(&self, cfg: &BroadcastConfig) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "broadcast: {} server(s), {} connections ({} ready), {}-byte bodies, {:.0} broadcasts/s for {:.1}s",
            cfg.targets.len(),
            cfg.connections,
            self.ready,
            cfg.size,
            cfg.rate,
            cfg.duration.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "sent {} broadcasts; deliveries expected {}, delivered {} in {:.2}s: {:.0} deliveries/s cluster-wide",
            self.sent,
            self.expected,
            self.delivered,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
        let [p50, p99, p999, max] = self.latency_us;
        let _ = writeln!(
            s,
            "delivery latency: p50 {:.2}ms p99 {:.2}ms p99.9 {:.2}ms max {:.2}ms",
            p50 / 1e3,
            p99 / 1e3,
            p999 / 1e3,
            max / 1e3
        );
        if self.ok() {
            let _ = writeln!(
                s,
                "verified: every connection got every broadcast exactly once, in order"
            );
        } else {
            let _ = writeln!(
                s,
                "FAILED: {} error(s), {} of {} deliveries, {} connection(s) lost",
                self.errors, self.delivered, self.expected, self.closed
            );
            for e in &self.error_samples {
                let _ = writeln!(s, "  {e}");
            }
        }
        s
    }
}

const LAT_BUCKETS: usize = 1024;

/// Most connections of a broadcast run: every connection keeps the last
/// sequence number of every sender, so memory grows with the square
/// (10,000 connections: 400 MB).
pub const MAX_CONNECTIONS: u64 = 10_000;

/// Log-linear histogram of nanoseconds: 16 steps per power of two.
fn lat_index(ns: u64) -> usize {
    if ns < 16 {
        return ns as usize;
    }
    let p = 63 - ns.leading_zeros() as usize;
    let sub = ((ns >> (p - 4)) & 15) as usize;
    ((p - 3) * 16 + sub).min(LAT_BUCKETS - 1)
}

fn lat_value(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let p = i / 16 + 3;
    ((16 + (i % 16)) as u64) << (p - 4)
}

/// One connection's view.
struct Client {
    index: u32,
    /// Sequence number of the last broadcast sent.
    sent: u32,
    /// Per sender index: the last sequence number received.
    last: Vec<u32>,
}

struct Shared {
    n: usize,
    size: usize,
    start: Instant,
    ready: AtomicU64,
    closed: AtomicU64,
    opened: AtomicU64,
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    samples: std::sync::Mutex<Vec<String>>,
    /// Per sender index: its sender id as first seen (0: not yet).
    ids: Vec<AtomicU64>,
    /// Per sender index: broadcasts it sent.
    sent_by: Vec<AtomicU32>,
    last_delivery_ns: AtomicU64,
    lat: Vec<AtomicU64>,
    ending: AtomicBool,
}

impl Shared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < 10 {
            s.push(what);
        }
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

struct Load(Arc<Shared>);

const POST_SEND: u64 = 1;

impl Handler for Load {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        ctx.send_frame(Frame::new(cmd::PING, b"ready?"));
    }

    fn on_frame(&self, ctx: &mut Ctx<'_>, f: Frame) {
        let sh = &self.0;
        match f.cmd() {
            cmd::PONG => {
                sh.ready.fetch_add(1, Ordering::Relaxed);
            }
            cmd::BROADCAST => {
                let now = sh.now_ns();
                let b = f.body();
                let Some(c) = ctx.data_mut::<Client>() else {
                    return;
                };
                let me = c.index;
                if b.len() != 8 + sh.size {
                    return sh.error(format!("connection {me}: a {}-byte broadcast", b.len()));
                }
                let id = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
                let from = u32::from_be_bytes(b[8..12].try_into().unwrap_or_default()) as usize;
                let seq = u32::from_be_bytes(b[12..16].try_into().unwrap_or_default());
                let t = u64::from_be_bytes(b[16..24].try_into().unwrap_or_default());
                if from >= sh.n {
                    return sh.error(format!("connection {me}: sender index {from} out of range"));
                }
                if seq != c.last[from] + 1 {
                    let last = c.last[from];
                    c.last[from] = c.last[from].max(seq);
                    return sh.error(format!(
                        "connection {me}: from sender {from} got #{seq} after #{last} (a {})",
                        if seq <= last {
                            "repeat or reorder"
                        } else {
                            "gap"
                        }
                    ));
                }
                c.last[from] = seq;
                match sh.ids[from].compare_exchange(0, id, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {}
                    Err(old) if old == id => {}
                    Err(old) => {
                        sh.error(format!("sender {from} seen with ids {old:#x} and {id:#x}"))
                    }
                }
                sh.delivered.fetch_add(1, Ordering::Relaxed);
                sh.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
                sh.lat[lat_index(now.saturating_sub(t))].fetch_add(1, Ordering::Relaxed);
            }
            other => sh.error(format!("unexpected frame cmd {other:#x}")),
        }
    }

    fn on_posted(&self, ctx: &mut Ctx<'_>, value: u64) {
        if value != POST_SEND {
            return;
        }
        let sh = self.0.clone();
        let Some(c) = ctx.data_mut::<Client>() else {
            return;
        };
        c.sent += 1;
        let mut body = vec![0u8; sh.size];
        body[..4].copy_from_slice(&c.index.to_be_bytes());
        body[4..8].copy_from_slice(&c.sent.to_be_bytes());
        body[8..16].copy_from_slice(&sh.now_ns().to_be_bytes());
        sh.sent_by[c.index as usize].fetch_add(1, Ordering::Relaxed);
        sh.sent.fetch_add(1, Ordering::Relaxed);
        ctx.send_frame(Frame::new(cmd::BROADCAST, &body));
    }

    fn on_close(
        &self,
        _engine: crate::server::EngineRef<'_>,
        info: &CloseInfo,
        _data: Option<Box<dyn std::any::Any + Send>>,
    ) {
        if !self.0.ending.load(Ordering::Relaxed) {
            self.0.closed.fetch_add(1, Ordering::Relaxed);
            self.0.error(format!(
                "a connection closed during the run: {:?}",
                info.reason
            ));
        }
    }
}

/// Runs the load; an error only for what stops it from starting.
pub fn run_broadcast(cfg: &BroadcastConfig) -> io::Result<BroadcastReport> {
    let bad = |m: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, m.to_string()));
    if cfg.targets.is_empty() {
        return bad("give at least one --connect ADDR");
    }
    if cfg.size < 16 {
        return bad("--size must be at least 16 in broadcast mode (index, sequence, time)");
    }
    if !cfg.rate.is_finite() || cfg.rate <= 0.0 {
        return bad("--rate must be above 0");
    }
    if cfg.connections == 0 || cfg.connections > MAX_CONNECTIONS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "--connections must be 1 to {MAX_CONNECTIONS} in broadcast mode (each connection tracks every sender: 4 bytes a pair)"
            ),
        ));
    }
    crate::port::sys::raise_fd_limit();
    let n = cfg.connections as usize;
    let sh = Arc::new(Shared {
        n,
        size: cfg.size,
        start: Instant::now(),
        ready: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        opened: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        samples: std::sync::Mutex::new(Vec::new()),
        ids: (0..n).map(|_| AtomicU64::new(0)).collect(),
        sent_by: (0..n).map(|_| AtomicU32::new(0)).collect(),
        last_delivery_ns: AtomicU64::new(0),
        lat: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        ending: AtomicBool::new(false),
    });
    let mut ecfg = crate::client::engine_config(cfg.backend);
    ecfg.workers = cfg.threads.max(1);
    ecfg.ports = cfg.threads.max(1);
    ecfg.keepalive = None;
    ecfg.idle_timeout = None;
    ecfg.max_send_queue = 64 << 20;
    let mut engine = Engine::start(ecfg, Arc::new(Load(sh.clone())))?;
    let mut ids: Vec<ConnId> = Vec::with_capacity(n);
    for i in 0..n {
        let target = cfg.targets[i % cfg.targets.len()];
        let c = Client {
            index: i as u32,
            sent: 0,
            last: vec![0; n],
        };
        ids.push(engine.connect_with(target, c)?);
        // Keep the connects in flight bounded.
        let start = Instant::now();
        while (i as u64 + 1)
            .saturating_sub(sh.opened.load(Ordering::Relaxed) + sh.closed.load(Ordering::Relaxed))
            > 500
            && start.elapsed() < cfg.connect_timeout
        {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let deadline = Instant::now() + cfg.connect_timeout;
    while sh.ready.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        if sh.closed.load(Ordering::Relaxed) > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let mut report = BroadcastReport {
        ready: sh.ready.load(Ordering::Relaxed),
        ..BroadcastReport::default()
    };
    if report.ready == n as u64 {
        let t0 = Instant::now();
        let t0_ns = sh.now_ns();
        let h = engine.handle();
        let mut next = 0usize;
        let mut posted = 0u64;
        while t0.elapsed() < cfg.duration {
            let due = (t0.elapsed().as_secs_f64() * cfg.rate) as u64;
            while posted < due {
                h.post(ids[next], POST_SEND);
                next = (next + 1) % n;
                posted += 1;
            }
            thread::sleep(Duration::from_millis(1));
        }
        // Wait for the posts to be sent, then for every delivery (bounded).
        let drain = Instant::now() + Duration::from_secs(10);
        while Instant::now() < drain {
            let sent = sh.sent.load(Ordering::Relaxed);
            if sent == posted && sh.delivered.load(Ordering::Relaxed) >= sent * n as u64 {
                break;
            }
            if sh.closed.load(Ordering::Relaxed) > 0 {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        report.sent = sh.sent.load(Ordering::Relaxed);
        report.expected = report.sent * n as u64;
        report.delivered = sh.delivered.load(Ordering::Relaxed);
        let end = sh.last_delivery_ns.load(Ordering::Relaxed).max(t0_ns + 1);
        report.elapsed = Duration::from_nanos(end - t0_ns);
    } else {
        sh.error(format!(
            "only {} of {n} connections were open and answering after {:?}",
            report.ready, cfg.connect_timeout
        ));
    }
    // Stragglers past the drain are errors too: give them a moment to show.
    thread::sleep(Duration::from_millis(200));
    sh.ending.store(true, Ordering::Relaxed);
    engine.shutdown(Duration::from_millis(500));
    let counts: Vec<u64> = sh.lat.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let total: u64 = counts.iter().sum();
    let pct = |q: f64| -> f64 {
        if total == 0 {
            return 0.0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return lat_value(i) as f64 / 1e3;
            }
        }
        0.0
    };
    let max = counts
        .iter()
        .rposition(|c| *c > 0)
        .map_or(0.0, |i| lat_value(i) as f64 / 1e3);
    report.latency_us = [pct(0.5), pct(0.99), pct(0.999), max];
    report.delivered = sh.delivered.load(Ordering::Relaxed);
    report.errors = sh.errors.load(Ordering::Relaxed);
    report.closed = sh.closed.load(Ordering::Relaxed);
    report.error_samples = sh.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_monotonic_and_close() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1000,
            12345,
            1 << 20,
            5_000_000_000,
        ] {
            let i = lat_index(ns);
            assert!(i >= last);
            last = i;
            let v = lat_value(i);
            assert!(
                v <= ns && (ns - v) as f64 <= ns as f64 / 16.0 + 1.0,
                "{ns} -> {v}"
            );
        }
    }
}
