//! Clients on the same engine as the server: a synchronous [`Session`] for
//! one connection (the interactive client), and [`run_messages`], the classic IOCP articles'
//! client window — C connections each sending a message N times every T,
//! verifying every echo byte for byte and timing every round trip.
//! [`Latency`] (the round-trip histogram) and [`engine_config`] are shared
//! with `cport stress`.

mod latency;

pub use latency::{Latency, Percentiles};

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{Frame, cmd};
use crate::port::BackendKind;
use crate::server::{
    CloseInfo, CloseReason, ConnId, Ctx, Engine, EngineConfig, EngineRef, Handler,
};

/// The engine settings of a client: one port with one worker, frames of
/// any size accepted from the server (a FILE reply can be up to 4 GiB - 1),
/// and no idle timeout (a client is not the side that times peers out).
pub fn engine_config(backend: BackendKind) -> EngineConfig {
    let mut cfg = EngineConfig {
        workers: 1,
        ports: 1,
        max_frame: u32::MAX,
        idle_timeout: None,
        frame_timeout: None,
        ..EngineConfig::default()
    };
    cfg.port.backend = backend;
    cfg
}

/// When connection `i` (0-based) of a ramp at `rate` connects per second
/// that began at `start` is due (`rate` 0: at once).
pub(crate) fn ramp_due(start: Instant, i: u64, rate: f64) -> Instant {
    if rate <= 0.0 {
        return start;
    }
    start + Duration::from_secs_f64(i as f64 / rate)
}

enum SessionEvent {
    Open,
    Frame(Frame),
    Closed(CloseInfo),
}

struct SessionHandler {
    tx: Mutex<Sender<SessionEvent>>,
}

impl SessionHandler {
    fn send(&self, e: SessionEvent) {
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(e);
    }
}

impl Handler for SessionHandler {
    fn on_open(&self, _ctx: &mut Ctx<'_>) {
        self.send(SessionEvent::Open);
    }
    fn on_frame(&self, _ctx: &mut Ctx<'_>, frame: Frame) {
        self.send(SessionEvent::Frame(frame));
    }
    fn on_close(
        &self,
        _engine: EngineRef<'_>,
        info: &CloseInfo,
        _data: Option<Box<dyn Any + Send>>,
    ) {
        self.send(SessionEvent::Closed(info.clone()));
    }
}

/// One framed connection used request by request from the calling thread.
pub struct Session {
    engine: Engine,
    id: ConnId,
    rx: Receiver<SessionEvent>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

fn closed_error(info: &CloseInfo) -> io::Error {
    let kind = match info.reason {
        CloseReason::ConnectFailed => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(
        kind,
        format!(
            "connection closed ({}{})",
            info.reason.name(),
            info.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    )
}

impl Session {
    /// Connects to `addr`, waiting at most `timeout`.
    pub fn connect(
        addr: SocketAddr,
        mut cfg: EngineConfig,
        timeout: Duration,
    ) -> io::Result<Session> {
        cfg.ports = 1;
        cfg.workers = 1;
        let (tx, rx) = mpsc::channel();
        let engine = Engine::start(cfg, Arc::new(SessionHandler { tx: Mutex::new(tx) }))?;
        let id = engine.connect(addr)?;
        match rx.recv_timeout(timeout) {
            Ok(SessionEvent::Open) => Ok(Session { engine, id, rx }),
            Ok(SessionEvent::Closed(info)) => Err(closed_error(&info)),
            Ok(SessionEvent::Frame(_)) => Err(io::Error::other("frame before connect")),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection to {addr} within {timeout:?}"),
            )),
        }
    }

    /// Sends `frame` and waits for the next frame from the server, returning
    /// it with the round-trip time.
    pub fn request(&mut self, frame: Frame, timeout: Duration) -> io::Result<(Frame, Duration)> {
        let start = Instant::now();
        if !self.engine.handle().send(self.id, frame.into_wire()) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection is closed",
            ));
        }
        match self.rx.recv_timeout(timeout) {
            Ok(SessionEvent::Frame(f)) => Ok((f, start.elapsed())),
            Ok(SessionEvent::Closed(info)) => Err(closed_error(&info)),
            Ok(SessionEvent::Open) => Err(io::Error::other("unexpected open event")),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::other("engine stopped")),
        }
    }

    /// Closes the connection and stops the engine.
    pub fn close(mut self) {
        self.engine.handle().close(self.id);
        self.engine.shutdown(Duration::from_secs(1));
    }
}

/// The classic IOCP articles' client window: what to send, how often, on how many connections.
#[derive(Debug, Clone)]
pub struct MessagesConfig {
    /// Server address.
    pub addr: SocketAddr,
    /// Concurrent connections.
    pub connections: usize,
    /// Messages per connection.
    pub count: u64,
    /// Pause between a reply and the next message.
    pub interval: Duration,
    /// Body of each ECHO frame.
    pub message: Bytes,
    /// Connects started per second (0: all at once).
    pub connect_rate: u64,
    /// Give up on a reply after this long.
    pub reply_timeout: Duration,
}

/// Something a [`run_messages`] run reports as it happens.
#[derive(Debug, Clone)]
pub enum MessageEvent {
    /// A verified echo came back.
    Reply {
        /// Index of the connection (0-based, in connect order).
        conn: usize,
        /// Message number, 1-based.
        seq: u64,
        /// Body bytes.
        bytes: usize,
        /// Round-trip time.
        rtt: Duration,
        /// Whether the echo matched byte for byte.
        ok: bool,
    },
    /// A connection ended before its messages were all answered.
    Failed {
        /// Index of the connection.
        conn: usize,
        /// Why.
        reason: String,
    },
}

/// The totals of a [`run_messages`] run.
#[derive(Debug, Clone, Default)]
pub struct MessagesReport {
    /// Connections that opened.
    pub opened: u64,
    /// Connections that failed (to connect or before finishing), by reason.
    pub failed: BTreeMap<String, u64>,
    /// Messages sent.
    pub sent: u64,
    /// Replies received.
    pub received: u64,
    /// Replies that did not match what was sent.
    pub mismatches: u64,
    /// Round-trip times in microseconds: p50, p90, p99, max.
    pub rtt_us: [u64; 4],
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl MessagesReport {
    /// Failed connections in all.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

struct ConnLoad {
    index: usize,
    sent: u64,
    received: u64,
    sent_at: Instant,
}

struct Totals {
    report: MessagesReport,
    latency: Latency,
    done: usize,
}

struct MessagesHandler {
    cfg: MessagesConfig,
    expected: Bytes,
    totals: Mutex<Totals>,
    events: Mutex<Sender<MessageEvent>>,
}

const TIMER_NEXT: u64 = 1;
const TIMER_REPLY: u64 = 2;

impl MessagesHandler {
    fn send_next(&self, ctx: &mut Ctx<'_>) {
        let Some(st) = ctx.data_mut::<ConnLoad>() else {
            return;
        };
        st.sent += 1;
        st.sent_at = Instant::now();
        let seq = st.sent;
        ctx.send(self.expected.clone());
        let _ = ctx.set_timer(self.cfg.reply_timeout, TIMER_REPLY + (seq << 8));
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report
            .sent += 1;
    }

    fn emit(&self, e: MessageEvent) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(e);
    }
}

impl Handler for MessagesHandler {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report
            .opened += 1;
        if self.cfg.count == 0 {
            ctx.close();
            return;
        }
        self.send_next(ctx);
    }

    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        let ok = frame.wire() == &self.expected;
        let Some(st) = ctx.data_mut::<ConnLoad>() else {
            return;
        };
        st.received += 1;
        let rtt = st.sent_at.elapsed();
        let (index, seq, done) = (st.index, st.received, st.received >= self.cfg.count);
        {
            let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            t.report.received += 1;
            if !ok {
                t.report.mismatches += 1;
            }
            t.latency.record(rtt);
        }
        self.emit(MessageEvent::Reply {
            conn: index,
            seq,
            bytes: frame.body_len(),
            rtt,
            ok,
        });
        if done || !ok {
            ctx.close();
        } else if self.cfg.interval.is_zero() {
            self.send_next(ctx);
        } else {
            let _ = ctx.set_timer(self.cfg.interval, TIMER_NEXT);
        }
    }

    fn on_timer(&self, ctx: &mut Ctx<'_>, value: u64) {
        if value == TIMER_NEXT {
            self.send_next(ctx);
        } else if value & 0xFF == TIMER_REPLY {
            let seq = value >> 8;
            if ctx.data_mut::<ConnLoad>().is_some_and(|s| s.received < seq) {
                ctx.abort();
            }
        }
    }

    fn on_close(
        &self,
        _engine: EngineRef<'_>,
        info: &CloseInfo,
        data: Option<Box<dyn Any + Send>>,
    ) {
        let st = data.and_then(|d| d.downcast::<ConnLoad>().ok());
        let complete = st.as_ref().is_some_and(|s| s.received >= self.cfg.count);
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.done += 1;
        if !complete {
            let reason = match (&info.reason, &st) {
                (CloseReason::Local, Some(s)) if s.received < s.sent => "reply timeout".to_string(),
                (r, _) => r.name().to_string(),
            };
            *t.report.failed.entry(reason.clone()).or_default() += 1;
            drop(t);
            self.emit(MessageEvent::Failed {
                conn: st.map_or(usize::MAX, |s| s.index),
                reason: match &info.error {
                    Some(e) => format!("{reason}: {e}"),
                    None => reason,
                },
            });
        }
    }
}

/// Runs the classic IOCP articles' client window: opens `connections` connections, each
/// sends `message` as an ECHO frame `count` times, waiting `interval` after
/// each verified reply. Calls `on_event` for every reply and failure from
/// the calling thread; returns the totals when every connection is done.
pub fn run_messages(
    cfg: MessagesConfig,
    engine_cfg: EngineConfig,
    mut on_event: impl FnMut(&MessageEvent),
) -> io::Result<MessagesReport> {
    let (tx, rx) = mpsc::channel();
    let handler = Arc::new(MessagesHandler {
        expected: Frame::from_parts(cmd::ECHO, cfg.message.clone()).into_wire(),
        cfg: cfg.clone(),
        totals: Mutex::new(Totals {
            report: MessagesReport::default(),
            latency: Latency::new(),
            done: 0,
        }),
        events: Mutex::new(tx),
    });
    let mut engine = Engine::start(engine_cfg, handler.clone())?;
    let start = Instant::now();
    for i in 0..cfg.connections {
        let due = ramp_due(start, i as u64, cfg.connect_rate as f64);
        while let Some(wait) = due.checked_duration_since(Instant::now()) {
            drain(&rx, &mut on_event, wait);
        }
        let load = ConnLoad {
            index: i,
            sent: 0,
            received: 0,
            sent_at: Instant::now(),
        };
        match engine.connect_with(cfg.addr, load) {
            Ok(_) => {}
            Err(e) => {
                let mut t = handler.totals.lock().unwrap_or_else(|e| e.into_inner());
                *t.report.failed.entry("connect_failed".into()).or_default() += 1;
                t.done += 1;
                drop(t);
                on_event(&MessageEvent::Failed {
                    conn: i,
                    reason: format!("connect_failed: {e}"),
                });
            }
        }
    }
    loop {
        drain(&rx, &mut on_event, Duration::from_millis(50));
        let done = handler
            .totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .done;
        if done >= cfg.connections {
            break;
        }
    }
    engine.shutdown(Duration::from_secs(1));
    drain(&rx, &mut on_event, Duration::ZERO);
    let t = handler.totals.lock().unwrap_or_else(|e| e.into_inner());
    let mut report = t.report.clone();
    let p = t.latency.percentiles();
    report.rtt_us = [p.p50, p.p90, p.p99, p.max];
    report.elapsed = start.elapsed();
    Ok(report)
}

fn drain(rx: &Receiver<MessageEvent>, on_event: &mut impl FnMut(&MessageEvent), wait: Duration) {
    match rx.recv_timeout(wait) {
        Ok(e) => on_event(&e),
        Err(_) => return,
    }
    while let Ok(e) = rx.try_recv() {
        on_event(&e);
    }
}
