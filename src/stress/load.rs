//! One process's slice of a stress run: the [`Handler`] that drives every
//! connection (send, verify, time, schedule the next message), and the
//! driver thread that connects at the ramp rate, times out connects that
//! hang, and ends the run.
//!
//! Per-connection state lives in the connection ([`Ctx::set_data`]) and
//! is only touched by its callbacks. What the driver must see — whether a
//! connection is still connecting — is one atomic byte per connection,
//! moved by compare-and-swap so that a connect timeout and a late
//! `on_open` cannot both win. Totals are relaxed atomics; the histogram
//! and the failure table take a lock per event.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::{Latency, ramp_due};
use crate::frame::{self, Frame, cmd};
use crate::server::{CloseInfo, CloseReason, ConnId, Ctx, Engine, EngineRef, Handler};
use crate::stress::report::Counts;
use crate::stress::{Mode, Progress, StressConfig, content};

/// Connects in flight at once per process, whatever the ramp: a burst of
/// tens of thousands of SYNs would overflow the server's accept and SYN
/// queues and turn into retransmissions and timeouts that measure the
/// burst, not the server.
const MAX_PENDING_CONNECTS: u64 = 1000;
/// How often the driver reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long replies may drain after Ctrl-C.
const INTERRUPT_DRAIN: Duration = Duration::from_secs(1);
/// How long the engine's shutdown lets connections flush.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Which connections of the run this process makes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slice {
    /// Global index of the first (it keys the message contents and picks
    /// the destination and source address).
    pub(crate) first: u64,
    /// How many.
    pub(crate) count: u64,
    /// Connects per second for this process (0: as fast as allowed).
    pub(crate) ramp: f64,
}

// Connection states, one byte per connection of the slice.
const IDLE: u8 = 0;
const CONNECTING: u8 = 1;
const OPEN: u8 = 2;
const TIMED_OUT: u8 = 3;
const CLOSED: u8 = 4;

const TIMER_NEXT: u64 = 1;
const TIMER_WATCHDOG: u64 = 2;

/// Running totals, read by the driver for progress and end conditions.
#[derive(Default)]
struct Live {
    /// Connects issued and not yet open, failed or timed out.
    pending: AtomicU64,
    opened: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    failed: AtomicU64,
    /// Connections that finished their messages (interval mode) or ended.
    settled: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    lost: AtomicU64,
    mismatches: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    /// Messages sent and neither answered nor lost.
    outstanding: AtomicU64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

fn sub(a: &AtomicU64, n: u64) {
    a.fetch_sub(n, Ordering::Relaxed);
}

/// Failures by reason, one example message per reason, and ERROR frames
/// from the server by code name.
#[derive(Default)]
struct Failures {
    by_reason: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    server_errors: BTreeMap<String, u64>,
}

/// One connection's state, attached with `connect_with`.
struct ConnLoad {
    /// Global index (keys the contents).
    index: u64,
    /// Index in this slice (the state byte).
    slot: usize,
    /// Messages sent.
    sent: u64,
    /// Echoes received.
    received: u64,
    /// Send times of the messages not answered yet, oldest first (echoes
    /// come back in order on one connection).
    inflight: VecDeque<Instant>,
    /// When the last message was sent.
    last_send: Instant,
    /// A reply-timeout check is armed.
    watchdog: bool,
    /// Every message answered (interval mode).
    done: bool,
    /// Why the connection failed, when this side decided it.
    failure: Option<(&'static str, String)>,
    /// Raw mode: the bytes of the echo being received, until it is whole.
    partial: Vec<u8>,
}

struct Load {
    mode: Mode,
    /// Raw echo instead of ECHO frames.
    raw: bool,
    messages: u64,
    interval: Duration,
    size: usize,
    window: usize,
    reply_timeout: Duration,
    seed: u64,
    states: Vec<AtomicU8>,
    live: Live,
    /// False once the load stops: no new messages.
    sending: AtomicBool,
    failures: Mutex<Failures>,
    latency: Mutex<Latency>,
}

impl Load {
    fn fail(&self, reason: &str, detail: String) {
        add(&self.live.failed, 1);
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *f.by_reason.entry(reason.to_string()).or_default() += 1;
        f.examples.entry(reason.to_string()).or_insert(detail);
    }

    /// Leaves CONNECTING for `to`; true if this caller made the move.
    fn leave_connecting(&self, slot: usize, to: u8) -> bool {
        let ok = self.states[slot]
            .compare_exchange(CONNECTING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            sub(&self.live.pending, 1);
        }
        ok
    }

    /// A connect that failed before the engine took it (no descriptor,
    /// bind failed, ...): unless `on_close` already counted it.
    fn connect_error(&self, slot: usize, e: &io::Error) {
        if self.leave_connecting(slot, CLOSED) {
            // Before the connect is submitted, EADDRNOTAVAIL comes from
            // bind: the source address is not one of this host's. (Out of
            // ports, the connect itself fails later with the same code.)
            let reason = match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => "bad_source_address",
                errno => classify(errno, "connect_failed"),
            };
            self.fail(reason, e.to_string());
            add(&self.live.settled, 1);
        }
    }

    fn send_next(&self, ctx: &mut Ctx<'_>) {
        let (wire, arm) = {
            let Some(c) = ctx.data_mut::<ConnLoad>() else {
                return;
            };
            let seq = c.sent;
            c.sent += 1;
            let now = Instant::now();
            c.inflight.push_back(now);
            c.last_send = now;
            let arm = !c.watchdog;
            c.watchdog = true;
            let wire = if self.raw {
                content::echo_body(self.seed, c.index, seq, self.size)
            } else {
                content::echo_frame(self.seed, c.index, seq, self.size)
            };
            (wire, arm)
        };
        add(&self.live.sent, 1);
        add(&self.live.outstanding, 1);
        add(&self.live.bytes_out, wire.len() as u64);
        ctx.send(wire);
        if arm {
            let _ = ctx.set_timer(self.reply_timeout, TIMER_WATCHDOG);
        }
    }

    /// An echo came back whole on this connection; `body_ok(connection
    /// index, message number)` says whether it is the message sent.
    /// Records it, and sends the next message as the mode says.
    fn echo_received(&self, ctx: &mut Ctx<'_>, body_ok: impl FnOnce(u64, u64) -> bool) {
        let now = Instant::now();
        let Some(c) = ctx.data_mut::<ConnLoad>() else {
            return;
        };
        let Some(sent_at) = c.inflight.pop_front() else {
            // Nothing was asked: a frame we cannot match is a mismatch.
            add(&self.live.mismatches, 1);
            return;
        };
        let seq = c.received;
        c.received += 1;
        let ok = body_ok(c.index, seq);
        let (received, last_send, empty) = (c.received, c.last_send, c.inflight.is_empty());
        let done = self.mode == Mode::Interval && received >= self.messages;
        if done {
            c.done = true;
        }
        sub(&self.live.outstanding, 1);
        add(&self.live.received, 1);
        if !ok {
            add(&self.live.mismatches, 1);
        }
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(now.duration_since(sent_at));
        if done {
            add(&self.live.settled, 1);
            return;
        }
        if !self.sending.load(Ordering::Relaxed) {
            return;
        }
        match self.mode {
            Mode::Interval => {
                if empty {
                    let due = last_send + self.interval;
                    let _ = ctx.set_timer(due.saturating_duration_since(now), TIMER_NEXT);
                }
            }
            Mode::Pingpong | Mode::Flood => self.send_next(ctx),
        }
    }

    fn progress(&self) -> Progress {
        let l = &self.live;
        Progress {
            opened: get(&l.opened),
            open: get(&l.open),
            failed: get(&l.failed),
            sent: get(&l.sent),
            received: get(&l.received),
            mismatches: get(&l.mismatches),
            bytes_out: get(&l.bytes_out),
            bytes_in: get(&l.bytes_in),
            ..Progress::default()
        }
    }
}

impl Handler for Load {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        let Some(slot) = ctx.data_mut::<ConnLoad>().map(|c| c.slot) else {
            return;
        };
        if !self.leave_connecting(slot, OPEN) {
            // The driver timed this connect out first.
            ctx.abort();
            return;
        }
        add(&self.live.opened, 1);
        let open = self.live.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.live.peak_open.fetch_max(open, Ordering::Relaxed);
        if !self.sending.load(Ordering::Relaxed) {
            return;
        }
        match self.mode {
            Mode::Interval if self.messages == 0 => {
                if let Some(c) = ctx.data_mut::<ConnLoad>() {
                    c.done = true;
                }
                add(&self.live.settled, 1);
            }
            Mode::Interval | Mode::Pingpong => self.send_next(ctx),
            Mode::Flood => {
                for _ in 0..self.window {
                    self.send_next(ctx);
                }
            }
        }
    }

    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        add(&self.live.bytes_in, frame.wire().len() as u64);
        if frame.cmd() == cmd::ERROR {
            let (code, msg) = frame.error_parts().unwrap_or((0, "malformed".into()));
            let name = frame::code::name(code);
            {
                let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                *f.server_errors.entry(name.to_string()).or_default() += 1;
            }
            if let Some(c) = ctx.data_mut::<ConnLoad>()
                && c.failure.is_none()
            {
                let reason = if code == frame::code::BUSY {
                    "server_busy"
                } else {
                    "server_error"
                };
                c.failure = Some((reason, format!("ERROR {code} ({name}): {msg}")));
            }
            return;
        }
        self.echo_received(ctx, |index, seq| {
            frame.cmd() == cmd::ECHO
                && frame.body_len() == self.size
                && content::verify(self.seed, index, seq, &frame.body())
        });
    }

    fn on_data(&self, ctx: &mut Ctx<'_>, mut data: &[u8]) {
        // Raw mode: echoes come back in whatever pieces TCP makes; a
        // message is whole once `size` bytes of it are in.
        add(&self.live.bytes_in, data.len() as u64);
        while !data.is_empty() {
            let Some(c) = ctx.data_mut::<ConnLoad>() else {
                return;
            };
            if c.inflight.is_empty() {
                // Bytes nobody asked for: a mismatch, and the rest of
                // this piece cannot be matched either.
                add(&self.live.mismatches, 1);
                return;
            }
            let take = (self.size - c.partial.len()).min(data.len());
            c.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if c.partial.len() == self.size {
                let mut body = std::mem::take(&mut c.partial);
                self.echo_received(ctx, |index, seq| {
                    content::verify(self.seed, index, seq, &body)
                });
                body.clear();
                if let Some(c) = ctx.data_mut::<ConnLoad>() {
                    c.partial = body;
                }
            }
        }
    }

    fn on_timer(&self, ctx: &mut Ctx<'_>, value: u64) {
        match value {
            TIMER_NEXT if self.sending.load(Ordering::Relaxed) => self.send_next(ctx),
            TIMER_WATCHDOG => {
                let timeout = self.reply_timeout;
                let Some(c) = ctx.data_mut::<ConnLoad>() else {
                    return;
                };
                match c.inflight.front().map(|t| t.elapsed()) {
                    Some(age) if age >= timeout => {
                        c.failure = Some((
                            "reply_timeout",
                            format!("no echo within {timeout:?} (message {})", c.received + 1),
                        ));
                        ctx.abort();
                    }
                    Some(age) => {
                        let _ = ctx.set_timer(timeout - age, TIMER_WATCHDOG);
                    }
                    None => c.watchdog = false,
                }
            }
            _ => {}
        }
    }

    fn on_close(
        &self,
        _engine: EngineRef<'_>,
        info: &CloseInfo,
        data: Option<Box<dyn Any + Send>>,
    ) {
        let Some(c) = data.and_then(|d| d.downcast::<ConnLoad>().ok()) else {
            return;
        };
        let prev = self.states[c.slot].swap(CLOSED, Ordering::AcqRel);
        if prev == CONNECTING {
            sub(&self.live.pending, 1);
        }
        if prev == OPEN {
            sub(&self.live.open, 1);
        }
        let lost = c.inflight.len() as u64;
        sub(&self.live.outstanding, lost);
        add(&self.live.lost, lost);
        let errno = info.error.as_deref().and_then(os_error_in);
        let detail = || {
            format!(
                "{}{}",
                info.reason.name(),
                info.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )
        };
        let failure: Option<(&str, String)> = if prev != OPEN {
            Some(match (prev, info.reason) {
                (TIMED_OUT, _) => (
                    "connect_timeout",
                    "no connection within the connect timeout".to_string(),
                ),
                (_, CloseReason::Shutdown) => (
                    "not_connected",
                    "the run ended before the connection was made".to_string(),
                ),
                (_, r) => (classify(errno, connect_default(r)), detail()),
            })
        } else if let Some((reason, d)) = c.failure {
            Some((reason, d))
        } else {
            match info.reason {
                CloseReason::Shutdown if self.mode == Mode::Interval && !c.done => Some((
                    "unfinished",
                    format!(
                        "{} of {} messages answered when the run ended",
                        c.received, self.messages
                    ),
                )),
                CloseReason::Shutdown => None,
                CloseReason::PeerClosed => Some(("closed_by_server", detail())),
                r => Some((classify(errno, r.name()), detail())),
            }
        };
        if let Some((reason, d)) = failure {
            self.fail(reason, d);
        }
        if !c.done {
            add(&self.live.settled, 1);
        }
    }
}

fn connect_default(r: CloseReason) -> &'static str {
    match r {
        CloseReason::ConnectFailed => "connect_failed",
        r => r.name(),
    }
}

/// The OS error number in an error's text. The engine hands `on_close`
/// the error as text, and std writes OS errors as "... (os error N)".
fn os_error_in(text: &str) -> Option<i32> {
    let i = text.rfind("(os error ")?;
    text[i + "(os error ".len()..]
        .split(')')
        .next()?
        .parse()
        .ok()
}

/// A failure reason for an OS error, or `default` for others.
fn classify(errno: Option<i32>, default: &'static str) -> &'static str {
    match errno {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ETIMEDOUT) => "timed_out",
        Some(libc::ECONNRESET) | Some(libc::ECONNABORTED) => "reset",
        Some(libc::EPIPE) => "broken_pipe",
        Some(libc::EADDRNOTAVAIL) => "no_free_ports",
        Some(libc::EADDRINUSE) => "address_in_use",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "no_descriptors",
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "no_memory",
        _ => default,
    }
}

/// Runs `slice` of the connections of `cfg` in this process; returns its
/// counts. Calls `on_progress` every 250 ms from this thread. Ends when
/// the load is done (interval mode: every connection answered or failed;
/// all modes: every connection ended), at the end of the run time, or
/// when `stop` is set; then waits a bounded time for replies in flight
/// and shuts the engine down.
pub(crate) fn run_slice(
    cfg: &StressConfig,
    sources: &[IpAddr],
    slice: Slice,
    stop: &AtomicBool,
    mut on_progress: impl FnMut(&Progress),
) -> io::Result<Counts> {
    let load = Arc::new(Load {
        mode: cfg.mode,
        raw: cfg.raw,
        messages: cfg.messages,
        interval: cfg.interval,
        size: cfg.size,
        window: cfg.window,
        reply_timeout: cfg.reply_timeout,
        seed: cfg.seed,
        states: (0..slice.count).map(|_| AtomicU8::new(IDLE)).collect(),
        live: Live::default(),
        sending: AtomicBool::new(true),
        failures: Mutex::new(Failures::default()),
        latency: Mutex::new(Latency::new()),
    });
    let mut ecfg = crate::client::engine_config(cfg.backend);
    ecfg.workers = cfg.threads;
    ecfg.ports = cfg.threads;
    if cfg.raw {
        ecfg.protocol = crate::server::Protocol::Raw;
    }
    // Our own reply timeout reaps a silent server; keepalive would only add
    // a syscall per connect.
    ecfg.keepalive = None;
    let mut engine = Engine::start(ecfg, load.clone())?;
    let backend = engine.backend().to_string();

    let cpu_at_start = crate::port::sys::process_usage().map(|u| u.cpu);
    let start = Instant::now();
    let run_end = start + cfg.run_time();
    let count = slice.count;
    let mut next: u64 = 0;
    let mut pending: VecDeque<(Instant, usize, ConnId)> = VecDeque::new();
    let mut last_progress = start;
    let mut interrupted = false;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        if now >= run_end {
            break;
        }
        while next < count
            && get(&load.live.pending) < MAX_PENDING_CONNECTS
            && ramp_due(start, next, slice.ramp) <= now
        {
            let slot = next as usize;
            let (target, local) = cfg.endpoints(sources, slice.first + next);
            let data = ConnLoad {
                index: slice.first + next,
                slot,
                sent: 0,
                received: 0,
                inflight: VecDeque::new(),
                last_send: now,
                watchdog: false,
                done: false,
                failure: None,
                partial: Vec::new(),
            };
            load.states[slot].store(CONNECTING, Ordering::Release);
            add(&load.live.pending, 1);
            let r = match local {
                Some(l) => engine.connect_from_with(l, target, data),
                None => engine.connect_with(target, data),
            };
            match r {
                Ok(id) => pending.push_back((now + cfg.connect_timeout, slot, id)),
                Err(e) => load.connect_error(slot, &e),
            }
            next += 1;
        }
        while let Some(&(deadline, slot, id)) = pending.front() {
            if deadline > now {
                break;
            }
            pending.pop_front();
            if load.leave_connecting(slot, TIMED_OUT) {
                engine.handle().close(id);
            }
        }
        if next == count && get(&load.live.settled) >= count {
            break;
        }
        if now.duration_since(last_progress) >= PROGRESS_EVERY {
            last_progress = now;
            on_progress(&load.progress());
        }
        let nap = if next < count {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(10)
        };
        thread::sleep(nap);
    }

    // Stop: no new messages; rates are taken here, before the drain.
    load.sending.store(false, Ordering::SeqCst);
    let window = start.elapsed();
    let at_stop = load.progress();
    let drain = if interrupted {
        INTERRUPT_DRAIN
    } else {
        cfg.drain_time()
    };
    let drain_end = Instant::now() + drain;
    while get(&load.live.outstanding) > 0 && Instant::now() < drain_end {
        if !interrupted && stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        thread::sleep(Duration::from_millis(5));
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            on_progress(&load.progress());
        }
    }
    engine.shutdown(SHUTDOWN_GRACE);
    on_progress(&load.progress());

    let l = &load.live;
    let f = load.failures.lock().unwrap_or_else(|e| e.into_inner());
    let latency = load.latency.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Counts {
        requested: count,
        opened: get(&l.opened),
        peak_open: get(&l.peak_open),
        failed: f.by_reason.clone(),
        failure_examples: f.examples.clone(),
        server_errors: f.server_errors.clone(),
        sent: get(&l.sent),
        received: get(&l.received),
        lost: get(&l.lost),
        mismatches: get(&l.mismatches),
        bytes_out: get(&l.bytes_out),
        bytes_in: get(&l.bytes_in),
        received_at_stop: at_stop.received,
        bytes_in_at_stop: at_stop.bytes_in,
        bytes_out_at_stop: at_stop.bytes_out,
        window_s: window.as_secs_f64(),
        elapsed_s: start.elapsed().as_secs_f64(),
        latency: latency.to_counts(),
        interrupted,
        backend,
        cpu_s: match (cpu_at_start, crate::port::sys::process_usage()) {
            (Some(a), Some(b)) => b.cpu.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_are_read_from_error_text() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(os_error_in(&e.to_string()), Some(libc::ECONNREFUSED));
        assert_eq!(classify(os_error_in(&e.to_string()), "x"), "refused");
        assert_eq!(os_error_in("connection reset by peer"), None);
        assert_eq!(classify(Some(libc::EADDRNOTAVAIL), "x"), "no_free_ports");
        assert_eq!(classify(Some(libc::EMFILE), "x"), "no_descriptors");
        assert_eq!(classify(None, "x"), "x");
    }
}
