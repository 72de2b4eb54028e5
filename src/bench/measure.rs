//! One measurement: a load against one running server.
//!
//! Traffic loads run on `stress` (raw echo or ECHO frames, every byte
//! verified) and are measured over a steady window: it opens at the
//! first progress report a warm-up after every connection has opened (or
//! failed), and closes at the first one a `duration` later, when the
//! bench stops the load. Requests, bytes and the server's CPU time
//! (utime + stime from `/proc/PID/stat`) are all taken over that same
//! window. The `threads` load is the other kind of client: one blocking
//! OS thread per connection (write the message, read the echo, repeat),
//! measured over a window the same way. The server's CPU time is its
//! threads' time on a CPU from `/proc/PID/task/*/schedstat` (the process's
//! clock-tick counters in `/proc/PID/stat` where schedstat is missing);
//! the machine's CPU time (`/proc/stat`) is taken over the same window,
//! since on loopback the kernel's network work lands on whichever task
//! runs. The idle loads hold plain connections open (after one echo
//! each, for `idle-echo`) and read the server's resident memory.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bench::{BenchConfig, LoadKind, LoadSpec};
use crate::frame;
use crate::port::sys;
use crate::stress::{self, Mode, Progress, RunOptions, ServerWatch, StressConfig};

/// What one measurement found. Figures that do not apply to its load
/// (latency for the idle load, ...) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Echoes per second over the window.
    pub req_per_s: Option<f64>,
    /// Echoed megabytes (10^6) per second received back by the client
    /// (framed servers: frame headers included).
    pub mb_per_s: Option<f64>,
    /// Round-trip latency, median, µs (over the whole run).
    pub p50_us: Option<f64>,
    /// Round-trip latency, 99th percentile, µs.
    pub p99_us: Option<f64>,
    /// Server CPU time (its threads' time on a CPU) per echo, µs.
    pub cpu_us_per_req: Option<f64>,
    /// The whole machine's non-idle CPU time per echo, µs: client, server
    /// and the kernel's network work together.
    #[serde(default)]
    pub machine_us_per_req: Option<f64>,
    /// Server resident memory added per idle connection, bytes: (RSS
    /// holding the connections - RSS before) / connections. Idle loads
    /// only: under traffic the RSS is mostly pools and socket buffers
    /// warmed up, not per connection.
    pub rss_per_conn: Option<f64>,
    /// Server resident memory at the end of the window, bytes (traffic
    /// loads).
    pub rss_bytes: Option<f64>,
}

/// One measurement: figures plus what went wrong, if anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Load name.
    pub load: String,
    /// Server name.
    pub server: String,
    /// Round (0-based).
    pub round: usize,
    /// The figures.
    pub figures: Figures,
    /// Seconds the figures were taken over (traffic loads).
    pub window_s: f64,
    /// Connections that opened.
    pub opened: u64,
    /// Connections that failed, echoes lost or wrong.
    pub errors: u64,
    /// What went wrong or is worth knowing ("3 connections failed: refused").
    pub notes: Vec<String>,
}

impl Measurement {
    fn new(load: &LoadSpec, server: &str, round: usize) -> Measurement {
        Measurement {
            load: load.name.clone(),
            server: server.to_string(),
            round,
            figures: Figures::default(),
            window_s: 0.0,
            opened: 0,
            errors: 0,
            notes: Vec::new(),
        }
    }
}

/// A point of the window: when, echoes and bytes back so far, server CPU,
/// machine CPU.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    received: u64,
    bytes_in: u64,
    cpu: Duration,
    machine: Option<Duration>,
    rss: u64,
}

impl Mark {
    /// Reads the server's CPU and RSS and the machine's CPU now; `None`
    /// if the server is gone.
    fn take(pid: u32, received: u64, bytes_in: u64) -> Option<Mark> {
        let (stat_cpu, rss) = sys::process_cpu_rss_of(pid)?;
        Some(Mark {
            at: Instant::now(),
            received,
            bytes_in,
            cpu: sys::sched_cpu_of(pid).unwrap_or(stat_cpu),
            machine: sys::machine_cpu().map(|(busy, _)| busy),
            rss,
        })
    }

    /// The figures of the window from `a` to `b`, into `m`; false if no
    /// echo happened in it.
    fn window(a: &Mark, b: &Mark, m: &mut Measurement) -> bool {
        if b.received <= a.received {
            return false;
        }
        let dt = b.at.duration_since(a.at).as_secs_f64();
        let reqs = (b.received - a.received) as f64;
        m.window_s = dt;
        m.figures.req_per_s = Some(reqs / dt);
        m.figures.mb_per_s = Some((b.bytes_in - a.bytes_in) as f64 / dt / 1e6);
        m.figures.cpu_us_per_req = Some(b.cpu.saturating_sub(a.cpu).as_secs_f64() * 1e6 / reqs);
        m.figures.machine_us_per_req = match (a.machine, b.machine) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x).as_secs_f64() * 1e6 / reqs),
            _ => None,
        };
        m.figures.rss_bytes = Some(b.rss as f64);
        true
    }
}

/// Runs a traffic load (pingpong or flood) against the server at `addr`
/// (process `pid`); `on_progress` sees the stress progress.
#[allow(clippy::too_many_arguments)]
pub(crate) fn traffic(
    cfg: &BenchConfig,
    load: &LoadSpec,
    server: &str,
    raw: bool,
    addr: SocketAddr,
    pid: u32,
    round: usize,
    stop: &Arc<AtomicBool>,
    mut on_progress: impl FnMut(&Progress),
) -> io::Result<Measurement> {
    let mut m = Measurement::new(load, server, round);
    let (mode, conns, size) = match load.kind {
        LoadKind::Pingpong { conns, size } => (Mode::Pingpong, conns, size),
        LoadKind::Flood { conns, size } => (Mode::Flood, conns, size),
        LoadKind::Idle { .. } | LoadKind::Threads { .. } => {
            unreachable!("not a stress load")
        }
    };
    // The window starts `warmup` after every connection has opened (or
    // failed) and lasts `duration`; then this run's own stop flag ends the
    // load. Making thousands of connections on a busy machine takes a
    // while, so the run's bound allows for it.
    let allowance = Duration::from_secs(10) + Duration::from_millis(2) * conns as u32;
    let scfg = StressConfig {
        targets: vec![addr],
        connections: conns,
        mode,
        size,
        window: cfg.window,
        duration: Some(allowance + cfg.warmup + cfg.duration),
        seed: 1 + round as u64,
        threads: cfg.client_threads,
        backend: cfg.client_backend,
        raw,
        ..StressConfig::default()
    };
    let ours = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        stop: ours.clone(),
        worker: cfg.worker.clone(),
        server: ServerWatch::Off,
    };
    let mut settled_at: Option<Instant> = None;
    let mut start: Option<Mark> = None;
    let mut end: Option<Mark> = None;
    let report = stress::run(&scfg, &opts, |p| {
        on_progress(p);
        if stop.load(Ordering::Relaxed) {
            ours.store(true, Ordering::SeqCst);
        }
        if ours.load(Ordering::Relaxed) || p.open + p.failed < conns {
            return;
        }
        let now = Instant::now();
        let settled = *settled_at.get_or_insert(now);
        if now.duration_since(settled) < cfg.warmup {
            return;
        }
        let Some(mark) = Mark::take(pid, p.received, p.bytes_in) else {
            return;
        };
        match start {
            None => start = Some(mark),
            Some(a) => {
                end = Some(mark);
                if now.duration_since(a.at) >= cfg.duration {
                    ours.store(true, Ordering::SeqCst);
                }
            }
        }
    })?;
    m.opened = report.connections.opened;
    // Echoes still in flight when this bench stopped the load are not the
    // server's fault; failed connections and wrong echoes are.
    m.errors = report.connections.failed + report.messages.mismatches;
    for (reason, n) in &report.connections.failed_by_reason {
        m.notes.push(format!("{n} connection(s) failed: {reason}"));
    }
    if report.messages.mismatches > 0 {
        m.notes.push(format!(
            "{} echo(es) did not match",
            report.messages.mismatches
        ));
    }
    let lat = report.latency_us;
    if lat.count > 0 {
        m.figures.p50_us = Some(lat.p50 as f64);
        m.figures.p99_us = Some(lat.p99 as f64);
    }
    match (start, end) {
        (Some(a), Some(b)) if Mark::window(&a, &b, &mut m) => {}
        _ => m.notes.push(format!(
            "no steady window ({} of {conns} connections opened within {:?}, {} echoes): no rates",
            m.opened,
            allowance + cfg.warmup,
            report.messages.received
        )),
    }
    if stop.load(Ordering::Relaxed) {
        m.notes.push("interrupted".into());
    }
    Ok(m)
}

/// The message a warm-up connection sends, as the server's protocol wants
/// it; an echo (raw, or cport's ECHO frame) sends the same bytes back.
fn warmup_message(raw: bool) -> Vec<u8> {
    echo_message(raw, b"cport bench warm-up")
}

/// `body` as one echo request: the bytes themselves for a raw echo
/// server, an ECHO frame for a framed one; either way the reply is the
/// same bytes.
fn echo_message(raw: bool, body: &[u8]) -> Vec<u8> {
    if raw {
        body.to_vec()
    } else {
        let mut m = frame::encode_header(frame::cmd::ECHO, body.len() as u32).to_vec();
        m.extend_from_slice(body);
        m
    }
}

/// A `size`-byte body that differs from connection to connection, so an
/// echo sent to the wrong connection is caught.
fn body_for(conn: u64, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(conn.wrapping_mul(7)) as u8
        })
        .collect()
}

/// What one client thread of the `threads` load saw.
#[derive(Debug, Default)]
struct ThreadResult {
    /// Round-trip latencies, µs.
    latency: Option<hdrhistogram::Histogram<u64>>,
    /// Why the connection failed or stopped early, if it did.
    error: Option<String>,
    /// The echo came back different.
    mismatch: bool,
}

/// Counters the client threads of the `threads` load share with the
/// measuring thread.
#[derive(Debug, Default)]
struct ThreadShared {
    /// Connections made.
    opened: std::sync::atomic::AtomicU64,
    /// Connections that could not be made.
    failed: std::sync::atomic::AtomicU64,
    /// Echoes completed, all threads.
    echoes: std::sync::atomic::AtomicU64,
    /// Bytes received back, all threads.
    bytes_in: std::sync::atomic::AtomicU64,
    /// Set when the load is over.
    done: AtomicBool,
}

/// One client thread: connect, then write the message, read the echo,
/// check it, repeat until told to stop. Blocking calls with timeouts, so
/// a server that stops answering ends the thread instead of hanging it.
fn client_thread(addr: SocketAddr, msg: Vec<u8>, shared: Arc<ThreadShared>) -> ThreadResult {
    let timeout = Duration::from_secs(5);
    let mut r = ThreadResult::default();
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            r.error = Some(format!("connect: {e}"));
            return r;
        }
    };
    shared.opened.fetch_add(1, Ordering::Relaxed);
    let setup = s
        .set_nodelay(true)
        .and_then(|_| s.set_read_timeout(Some(timeout)))
        .and_then(|_| s.set_write_timeout(Some(timeout)));
    if let Err(e) = setup {
        r.error = Some(format!("socket options: {e}"));
        return r;
    }
    // The bounds are constants hdrhistogram accepts (1 µs to 60 s, 3
    // significant digits).
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .expect("valid histogram bounds");
    let mut back = vec![0u8; msg.len()];
    while !shared.done.load(Ordering::Relaxed) {
        let t = Instant::now();
        if let Err(e) = s.write_all(&msg).and_then(|_| s.read_exact(&mut back)) {
            if !shared.done.load(Ordering::Relaxed) {
                r.error = Some(e.to_string());
            }
            break;
        }
        if back != msg {
            r.mismatch = true;
            break;
        }
        let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
        shared.echoes.fetch_add(1, Ordering::Relaxed);
        shared
            .bytes_in
            .fetch_add(msg.len() as u64, Ordering::Relaxed);
    }
    r.latency = Some(hist);
    r
}

/// Runs the `threads` load: one blocking client thread per connection.
/// The window opens a warm-up after every connection has opened (or
/// failed) and lasts the bench's duration; the server's CPU, the
/// machine's CPU and the echoes are read at both ends of it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn threads(
    cfg: &BenchConfig,
    load: &LoadSpec,
    server: &str,
    raw: bool,
    addr: SocketAddr,
    pid: u32,
    round: usize,
    stop: &AtomicBool,
    mut on_opened: impl FnMut(u64),
) -> io::Result<Measurement> {
    let mut m = Measurement::new(load, server, round);
    let LoadKind::Threads { conns, size } = load.kind else {
        unreachable!("not a threads load");
    };
    let shared = Arc::new(ThreadShared::default());
    let mut handles = Vec::with_capacity(conns as usize);
    for c in 0..conns {
        let msg = echo_message(raw, &body_for(c, size));
        let sh = shared.clone();
        let h = std::thread::Builder::new()
            .name("bench-client".into())
            .stack_size(128 * 1024)
            .spawn(move || client_thread(addr, msg, sh));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                shared.done.store(true, Ordering::SeqCst);
                m.errors += 1;
                m.notes
                    .push(format!("could not start client thread {c} of {conns}: {e}"));
                break;
            }
        }
    }
    let allowance = Duration::from_secs(10) + Duration::from_millis(2) * conns as u32;
    let deadline = Instant::now() + allowance;
    let settled = |sh: &ThreadShared| {
        sh.opened.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed)
            >= handles.len() as u64
    };
    while !settled(&shared) && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        on_opened(shared.opened.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(50));
    }
    on_opened(shared.opened.load(Ordering::Relaxed));
    let sleep_unless_stopped = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    };
    let mark = || {
        Mark::take(
            pid,
            shared.echoes.load(Ordering::Relaxed),
            shared.bytes_in.load(Ordering::Relaxed),
        )
    };
    let mut window = None;
    if settled(&shared) {
        sleep_unless_stopped(cfg.warmup);
        let a = mark();
        sleep_unless_stopped(cfg.duration);
        let b = mark();
        window = a.zip(b);
    }
    shared.done.store(true, Ordering::SeqCst);
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .expect("valid histogram bounds");
    let (mut errors, mut mismatches) = (Vec::new(), 0u64);
    for h in handles {
        let r = h.join().unwrap_or_else(|_| ThreadResult {
            error: Some("client thread panicked".into()),
            ..ThreadResult::default()
        });
        if let Some(l) = &r.latency {
            let _ = latency.add(l);
        }
        if let Some(e) = r.error {
            errors.push(e);
        }
        mismatches += r.mismatch as u64;
    }
    m.opened = shared.opened.load(Ordering::Relaxed);
    m.errors += errors.len() as u64 + mismatches;
    if let Some(e) = errors.first() {
        m.notes
            .push(format!("{} connection(s) failed, e.g.: {e}", errors.len()));
    }
    if mismatches > 0 {
        m.notes.push(format!("{mismatches} echo(es) did not match"));
    }
    if !latency.is_empty() {
        m.figures.p50_us = Some(latency.value_at_quantile(0.5) as f64);
        m.figures.p99_us = Some(latency.value_at_quantile(0.99) as f64);
    }
    match window {
        Some((a, b)) if Mark::window(&a, &b, &mut m) => {}
        _ => m.notes.push(format!(
            "no steady window ({} of {conns} connections opened within {allowance:?}): no rates",
            m.opened
        )),
    }
    if stop.load(Ordering::Relaxed) {
        m.notes.push("interrupted".into());
    }
    Ok(m)
}

/// RSS of `pid` once it stops moving (two reads 200 ms apart within
/// 0.5 %), or the last read after `within`.
fn settled_rss(pid: u32, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    let mut last = sys::process_cpu_rss_of(pid)?.1;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = sys::process_cpu_rss_of(pid)?.1;
        if (now as f64 - last as f64).abs() <= last as f64 * 0.005 || Instant::now() >= deadline {
            return Some(now);
        }
        last = now;
    }
}

/// Connections and echoes of the pool warm-up before an `idle-echo`
/// baseline: 8 × 4,096 echoes of 512 B cycle through receive pools of
/// up to 32,768 buffers.
const WARM_CONNS: u64 = 8;
const WARM_ECHOES: u64 = 4096;

/// Writes `msg`, reads as many bytes back into `back` and checks they are
/// the same.
fn echo_checked(s: &mut TcpStream, msg: &[u8], back: &mut Vec<u8>) -> io::Result<()> {
    back.resize(msg.len(), 0);
    s.write_all(msg)?;
    s.read_exact(back)?;
    if back[..] != *msg {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the echo came back different",
        ));
    }
    Ok(())
}

fn warm_pools(raw: bool, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut conns = Vec::new();
    for c in 0..WARM_CONNS {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        conns.push((s, echo_message(raw, &body_for(c, 512))));
    }
    let mut back = Vec::new();
    for _ in 0..WARM_ECHOES {
        for (s, msg) in &mut conns {
            echo_checked(s, msg, &mut back)?;
        }
    }
    Ok(())
}

/// Holds `conns` idle connections to the server and reads its RSS: the
/// server's memory per idle connection. One echo first, on a connection
/// of its own, so that memory set up lazily on the first request is in
/// the baseline; then the connections, made one by one; then a wait
/// until the server has accepted them all (its accept queue is empty)
/// and its RSS settles.
#[allow(clippy::too_many_arguments)]
pub(crate) fn idle(
    load: &LoadSpec,
    server: &str,
    raw: bool,
    addr: SocketAddr,
    pid: u32,
    round: usize,
    stop: &AtomicBool,
    mut on_opened: impl FnMut(u64),
) -> io::Result<Measurement> {
    let mut m = Measurement::new(load, server, round);
    let LoadKind::Idle { conns, echo } = load.kind else {
        unreachable!("a traffic load is not idle");
    };
    let timeout = Duration::from_secs(5);
    {
        let msg = warmup_message(raw);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(&msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)
            .map_err(|e| io::Error::new(e.kind(), format!("warm-up echo: {e}")))?;
        if got != msg {
            m.notes.push("warm-up echo came back different".into());
            m.errors += 1;
        }
    }
    if echo {
        // Receive pools hand their buffers out in turn, so 10,000 first
        // echoes touch pool pages that any traffic would touch: memory of
        // the server, not of its idle connections. Warm the pools before
        // the baseline (several connections, so every port of a per-core
        // server sees traffic).
        warm_pools(raw, addr, timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("pool warm-up: {e}")))?;
    }
    let base = settled_rss(pid, Duration::from_secs(2))
        .ok_or_else(|| io::Error::other("cannot read the server's RSS"))?;
    let mut held: Vec<TcpStream> = Vec::with_capacity(conns as usize);
    let mut failures = 0u64;
    let mut first_error = None;
    // With `echo`, each connection does one 512-byte echo before it goes
    // idle, checked byte for byte.
    let mut back = Vec::new();
    let mut echo_once = |s: &mut TcpStream, i: u64| -> io::Result<()> {
        s.set_read_timeout(Some(timeout))?;
        echo_checked(s, &echo_message(raw, &body_for(i, 512)), &mut back)
    };
    for i in 0..conns {
        if stop.load(Ordering::Relaxed) {
            m.notes.push("interrupted".into());
            break;
        }
        let made = TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
            if echo {
                echo_once(&mut s, i)?;
            }
            Ok(s)
        });
        match made {
            Ok(s) => held.push(s),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
                if failures >= 10 {
                    break;
                }
            }
        }
        if i % 500 == 499 {
            on_opened(held.len() as u64);
        }
    }
    on_opened(held.len() as u64);
    // Accepted by the server: its accept queue drains to empty.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sys::accept_queue_len(addr.port()).is_some_and(|n| n > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let full = settled_rss(pid, Duration::from_secs(5))
        .ok_or_else(|| io::Error::other("the server died holding the connections"))?;
    m.opened = held.len() as u64;
    m.errors += failures;
    if let Some(e) = first_error {
        m.notes
            .push(format!("{failures} connection(s) failed, e.g.: {e}"));
    }
    if m.opened > 0 {
        m.figures.rss_per_conn = Some((full as f64 - base as f64) / m.opened as f64);
    }
    drop(held);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_differ_between_connections() {
        assert_eq!(body_for(3, 512).len(), 512);
        assert_ne!(body_for(0, 64), body_for(1, 64));
        assert_eq!(echo_message(true, b"abc"), b"abc");
    }

    #[test]
    fn warmup_messages_fit_the_protocol() {
        let raw = warmup_message(true);
        let framed = warmup_message(false);
        assert_eq!(framed.len(), frame::HEADER_LEN + raw.len());
        assert_eq!(
            frame::parse_header(framed[..8].try_into().unwrap()),
            (raw.len() as u32, frame::cmd::ECHO)
        );
    }
}
