//! One measurement: a load against one running server.
//!
//! Traffic loads run on `stress` (raw echo or ECHO frames, every byte
//! verified) and are measured over a steady window: it opens at the
//! first progress report a warm-up after every connection has opened (or
//! failed), and closes at the first one a `duration` later, when the
//! bench stops the load. Requests, bytes and the server's CPU time
//! (utime + stime from `/proc/PID/stat`) are all taken over that same
//! window. The idle load holds plain
//! connections open and reads the server's resident memory.

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
    /// Server CPU time (user + system) per echo, µs.
    pub cpu_us_per_req: Option<f64>,
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

/// A point of the window: when, echoes and bytes back so far, server CPU.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    received: u64,
    bytes_in: u64,
    cpu: Duration,
    rss: u64,
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
        LoadKind::Idle { .. } => unreachable!("idle is not a traffic load"),
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
        let Some((cpu, rss)) = sys::process_cpu_rss_of(pid) else {
            return;
        };
        let mark = Mark {
            at: now,
            received: p.received,
            bytes_in: p.bytes_in,
            cpu,
            rss,
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
        (Some(a), Some(b)) if b.received > a.received => {
            let dt = b.at.duration_since(a.at).as_secs_f64();
            let reqs = (b.received - a.received) as f64;
            m.window_s = dt;
            m.figures.req_per_s = Some(reqs / dt);
            m.figures.mb_per_s = Some((b.bytes_in - a.bytes_in) as f64 / dt / 1e6);
            m.figures.cpu_us_per_req = Some(b.cpu.saturating_sub(a.cpu).as_secs_f64() * 1e6 / reqs);
            m.figures.rss_bytes = Some(b.rss as f64);
        }
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
    let body = b"cport bench warm-up";
    if raw {
        body.to_vec()
    } else {
        let mut m = frame::encode_header(frame::cmd::ECHO, body.len() as u32).to_vec();
        m.extend_from_slice(body);
        m
    }
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
    let LoadKind::Idle { conns } = load.kind else {
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
    let base = settled_rss(pid, Duration::from_secs(2))
        .ok_or_else(|| io::Error::other("cannot read the server's RSS"))?;
    let mut held: Vec<TcpStream> = Vec::with_capacity(conns as usize);
    let mut failures = 0u64;
    let mut first_error = None;
    for i in 0..conns {
        if stop.load(Ordering::Relaxed) {
            m.notes.push("interrupted".into());
            break;
        }
        match TcpStream::connect_timeout(&addr, timeout) {
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
