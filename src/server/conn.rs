//! One connection: its receive state machine, send queue and close
//! sequence (the classic IOCP articles' per-handle context).
//!
//! Invariants, all under the connection's lock:
//! - at most one receive and one send are in flight (`recv_op`, `send_op`),
//!   so bytes are never reordered whatever worker runs a completion;
//! - the socket is shut down only by [`progress`], and the connection is
//!   removed from the table only when neither a receive, a send nor a
//!   connect is in flight — so no completion can still need its buffers;
//! - a completion that finds the connection gone (slot empty or reused with
//!   another generation) is dropped by the engine, its buffers freed.

use std::any::Any;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;

use crate::frame::{self, Decoder, Frame};
use crate::op::{MAX_SEND_BUFS, Op, OpId, Sock};
use crate::server::engine::{Protocol, Shared, TimerKey};
use crate::server::handler::{CloseInfo, Ctx};
use crate::server::stats::CloseReason;
use crate::server::{ConnId, EngineRef};

/// Timer values at or above this are the engine's own.
pub(crate) const INTERNAL_TIMER: u64 = u64::MAX - 16;
/// Internal timer: the lingering close is over.
const LINGER_TIMER: u64 = u64::MAX - 1;
/// Internal timer: retry a receive that found the buffer pool empty.
const RECV_RETRY_TIMER: u64 = u64::MAX - 2;
/// Internal timer: check whether the connection has been idle too long, or
/// a frame under way is past its deadline.
const CHECK_TIMER: u64 = u64::MAX - 3;
/// Internal timer: a closing connection took too long to flush.
const FLUSH_TIMER: u64 = u64::MAX - 4;
/// Internal timer: check whether a file reply has stalled.
const FILE_STALL_TIMER: u64 = u64::MAX - 5;
/// A file reply that made no progress for this long (its client does not
/// read) is dropped when other requests wait for a file reply place, so
/// clients that never read cannot keep every place, and FILE, from the
/// others.
const FILE_STALL: Duration = Duration::from_secs(3);
/// Internal timer: a connection held back after broadcasting looks whether
/// it may be read again.
const BROADCAST_TIMER: u64 = u64::MAX - 6;
/// Posted value: the connection's inbox has something.
pub(crate) const INBOX_POST: u64 = u64::MAX;
/// Posted value: close the connection (from `EngineRef::close`).
pub(crate) const CLOSE_POST: u64 = u64::MAX - 1;
/// Posted value: a file reply place was freed for this waiting connection.
pub(crate) const FILE_WAKE_POST: u64 = u64::MAX - 2;
/// Posted value: a broadcaster waited too long on this connection's
/// backlog; drop it as a slow consumer if it is still behind.
pub(crate) const SLOW_POST: u64 = u64::MAX - 3;
/// How long a broadcaster is held back by recipients over half their send
/// queue limit; those still over it then are dropped as slow consumers.
const BROADCAST_STALL: Duration = Duration::from_secs(2);
/// How often a broadcaster held back by backlogged recipients looks again.
const BROADCAST_RECHECK: Duration = Duration::from_millis(10);
/// A broadcast recipient with more than this queued is dropped when the
/// engine is over its total queue cap.
const BACKLOG_WHEN_OVER_CAP: usize = 64 * 1024;

/// Most bytes one gathered send carries.
const MAX_SEND_BYTES: usize = 1 << 20;

/// One item of a send queue.
pub(crate) enum Chunk {
    /// Bytes in memory (shared, e.g. a broadcast frame, or owned).
    Bytes(Bytes),
    /// A segment of a file, sent without passing through our memory.
    File {
        /// The open file.
        file: Arc<File>,
        /// Where the segment starts.
        offset: u64,
        /// Its length.
        len: usize,
    },
}

impl Chunk {
    /// Bytes of memory this item holds in the queue.
    fn memory(&self) -> usize {
        match self {
            Chunk::Bytes(b) => b.len(),
            Chunk::File { .. } => 0,
        }
    }
}

/// How a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseMode {
    /// Send what is queued first; with `linger`, then half-close and read
    /// (discarding) until the peer closes or the linger time passes, so the
    /// peer sees our last bytes instead of a reset.
    Flush { linger: bool },
    /// Drop what is queued and shut the socket now.
    Abort,
}

/// A connection: identity, socket and locked state.
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) socket: Sock,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) local: Option<SocketAddr>,
    /// Accepted by a listener (false: connected by a client).
    #[allow(dead_code)]
    pub(crate) accepted: bool,
    /// Broadcast frames for this connection, pushed by other connections'
    /// callbacks. A leaf lock: never held while taking another, so any
    /// callback may push to any inbox without risking a deadlock.
    pub(crate) inbox: Mutex<Vec<Bytes>>,
    /// The inbox has frames and a wake-up was posted (or is being handled).
    pub(crate) inbox_pending: AtomicBool,
    /// What other connections' broadcasts read without taking the lock.
    pub(crate) hint: Arc<ConnHint>,
    pub(crate) st: Mutex<ConnState>,
}

/// A connection's state that broadcasters read without its lock.
#[derive(Debug, Default)]
pub(crate) struct ConnHint {
    /// Bytes waiting to be sent to the connection: in its inbox and in its
    /// send queue.
    pub(crate) backlog: AtomicUsize,
    /// The connection is closing (its backlog holds no one back).
    pub(crate) closing: AtomicBool,
}
/// Send queue entries an idle connection keeps room for.
const SENDQ_KEEP: usize = 1024;

/// The mutable part of a connection.
pub(crate) struct ConnState {
    pub(crate) connecting: bool,
    pub(crate) was_open: bool,
    /// Holds a place under the connection limit (`Shared::admitted`).
    pub(crate) admitted: bool,
    decoder: Decoder,
    sendq: VecDeque<Chunk>,
    /// The file segment of the send in flight, when it is a file send.
    file_inflight: Option<(Arc<File>, u64, usize)>,
    /// File replies queued or in flight (each holds an open file and a
    /// place under `Shared::max_file_replies`). At most one: a connection
    /// with a file reply in progress is not read until it is sent, so a
    /// client pipelining FILE requests without reading holds one file.
    files_queued: usize,
    /// A file reply place taken by the frame being handled
    /// (`Ctx::reserve_file`) and not yet used by `enqueue_file`.
    pub(crate) file_reserved: bool,
    /// A frame handed back to wait for a file reply place
    /// (`Ctx::defer_until_file_place`), handled again before any later one.
    pub(crate) deferred: Option<Frame>,
    /// Waiting in `Shared::file_waiters` (or woken and not yet retried).
    pub(crate) file_wait: bool,
    /// When the file reply in progress last moved (started or sent bytes).
    file_progress: Instant,
    /// The file-stall check is armed.
    file_stall_armed: bool,
    pub(crate) queued: usize,
    pub(crate) send_op: Option<OpId>,
    /// The multishot receive, armed until it ends (EOF, error, empty pool
    /// or cancel).
    pub(crate) recv_op: Option<OpId>,
    /// `recv_op` was cancelled because reading must stop; its final
    /// completion (`ECANCELED`) is expected, not an error.
    recv_cancelled: bool,
    pub(crate) connect_op: Option<OpId>,
    /// Keys of this connection's armed timers in its port's timer queue.
    timers: Vec<TimerKey>,
    read_eof: bool,
    /// Reading paused because the send queue is over its limit.
    paused: bool,
    /// Waiting to retry a receive that found the buffer pool empty.
    retry_wait: bool,
    closing: Option<(CloseReason, Option<String>)>,
    draining: bool,
    linger: bool,
    shut: bool,
    pub(crate) finalized: bool,
    /// When bytes last arrived or a send last made progress (for the idle
    /// timeout: a connection receiving a long reply is not idle).
    last_activity: Instant,
    /// The flush deadline of a closing connection is armed.
    flush_deadline: bool,
    bytes_in: u64,
    bytes_out: u64,
    pub(crate) user: Option<Box<dyn Any + Send>>,
    hint: Arc<ConnHint>,
    /// The idle/frame check timer, when armed (its key holds its due time).
    check_key: Option<TimerKey>,
    /// When the frame under way began (its first byte arrived), if one is.
    frame_started: Option<Instant>,
    /// Bytes of the frame under way received so far.
    frame_bytes: u64,
    /// Broadcasts this connection may make now (a token bucket).
    bcast_tokens: f64,
    bcast_refilled: Instant,
    /// Not read until its broadcast budget refills or the recipients it
    /// fed catch up.
    bcast_hold: bool,
    /// Since when recipients over half their queue limit hold it back.
    bcast_congested: Option<Instant>,
    /// A `BROADCAST_TIMER` is armed.
    bcast_timer: bool,
    /// The front of `sendq` is the rest of a frame partly sent.
    front_mid_frame: bool,
    /// The send in flight begins with the rest of a frame partly sent.
    inflight_mid_frame: bool,
    /// Dropped as a slow consumer while a send was in flight: when it
    /// completes, keep only the rest of a frame it left partly sent.
    trim_inflight: bool,
}

impl ConnState {
    pub(crate) fn new(shared: &Shared, hint: Arc<ConnHint>, connecting: bool) -> ConnState {
        let now = Instant::now();
        ConnState {
            connecting,
            was_open: false,
            admitted: false,
            decoder: Decoder::new(shared.max_frame),
            sendq: VecDeque::new(),
            file_inflight: None,
            files_queued: 0,
            file_reserved: false,
            deferred: None,
            file_wait: false,
            file_progress: Instant::now(),
            file_stall_armed: false,
            queued: 0,
            send_op: None,
            recv_op: None,
            recv_cancelled: false,
            connect_op: None,
            timers: Vec::new(),
            read_eof: false,
            paused: false,
            retry_wait: false,
            closing: None,
            draining: false,
            linger: false,
            shut: false,
            finalized: false,
            last_activity: now,
            flush_deadline: false,
            bytes_in: 0,
            bytes_out: 0,
            user: None,
            hint,
            check_key: None,
            frame_started: None,
            frame_bytes: 0,
            bcast_tokens: shared.broadcast_burst as f64,
            bcast_refilled: now,
            bcast_hold: false,
            bcast_congested: None,
            bcast_timer: false,
            front_mid_frame: false,
            inflight_mid_frame: false,
            trim_inflight: false,
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    pub(crate) fn enqueue(&mut self, shared: &Shared, bytes: Bytes) {
        if self.closing.is_some() && !self.draining || bytes.is_empty() {
            return;
        }
        self.queued += bytes.len();
        self.hint.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
        shared
            .queued_total
            .fetch_add(bytes.len(), Ordering::Relaxed);
        self.sendq.push_back(Chunk::Bytes(bytes));
    }

    /// Queues `len` bytes of `file` from `offset`, sent zero-copy after
    /// everything queued before. File bytes take no memory, so they do not
    /// count toward the queue limits.
    pub(crate) fn enqueue_file(
        &mut self,
        shared: &Shared,
        file: Arc<File>,
        offset: u64,
        len: usize,
    ) {
        if self.closing.is_some() && !self.draining || len == 0 {
            return;
        }
        if !std::mem::take(&mut self.file_reserved) {
            // Not reserved by the handler: counted all the same.
            shared.file_replies.fetch_add(1, Ordering::AcqRel);
        }
        self.files_queued += 1;
        self.file_progress = Instant::now();
        self.sendq.push_back(Chunk::File { file, offset, len });
    }

    /// A file reply ended (sent, failed or dropped): its place is free.
    fn file_done(&mut self, shared: &Shared) {
        self.files_queued -= 1;
        shared.release_file_place();
    }

    /// Whether the connection must stop taking requests until it drains:
    /// its send queue is over the limit, a file reply is in progress, or a
    /// request waits for a file reply place.
    fn must_hold(&self, shared: &Shared) -> bool {
        self.queued > shared.max_send_queue
            || self.files_queued > 0
            || self.file_wait
            || self.bcast_hold
    }

    /// Forgets `n` queued bytes that will never be sent (or were sent).
    fn unqueue(&mut self, shared: &Shared, n: usize) {
        let n = n.min(self.queued);
        self.queued -= n;
        self.hint.backlog.fetch_sub(n, Ordering::Relaxed);
        shared.queued_total.fetch_sub(n, Ordering::Relaxed);
    }

    /// Records the decision to close; [`progress`] carries it out. The first
    /// reason wins; an abort overrides a flush in progress.
    pub(crate) fn close(
        &mut self,
        shared: &Shared,
        reason: CloseReason,
        mode: CloseMode,
        error: Option<String>,
    ) {
        self.hint.closing.store(true, Ordering::Relaxed);
        match (&self.closing, mode) {
            (None, CloseMode::Flush { linger }) => {
                self.closing = Some((reason, error));
                self.draining = true;
                self.linger = linger;
            }
            (None, CloseMode::Abort) => {
                self.closing = Some((reason, error));
                self.abort_queue(shared);
            }
            (Some(_), CloseMode::Abort) => self.abort_queue(shared),
            (Some(_), CloseMode::Flush { .. }) => {}
        }
    }

    /// Drops everything queued but not yet handed to the kernel. What an
    /// in-flight send still carries is forgotten when it completes.
    fn abort_queue(&mut self, shared: &Shared) {
        self.draining = false;
        self.linger = false;
        self.front_mid_frame = false;
        let mut dropped = 0;
        let mut files = 0;
        for c in self.sendq.drain(..) {
            dropped += c.memory();
            if let Chunk::File { .. } = c {
                files += 1;
            }
        }
        for _ in 0..files {
            self.file_done(shared);
        }
        self.unqueue(shared, dropped);
    }

    pub(crate) fn set_timer(
        &mut self,
        conn: &Conn,
        shared: &Shared,
        after: Duration,
        value: u64,
    ) -> io::Result<()> {
        let key = shared.add_timer(conn.id, after, value);
        self.timers.push(key);
        Ok(())
    }

    /// Forgets a timer that fired; false if it was not this connection's.
    pub(crate) fn take_timer(&mut self, key: TimerKey) -> bool {
        match self.timers.iter().position(|k| *k == key) {
            Some(i) => {
                self.timers.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Whether the engine is not reading this connection now, for reasons
    /// of its own (its replies are not read, the engine is over its queue
    /// cap, its broadcast budget is spent): a frame under way is then not
    /// the peer's to finish.
    fn not_read(&self, shared: &Shared) -> bool {
        self.paused
            || self.retry_wait
            || self.must_hold(shared)
            || (self.queued > 0
                && shared.queued_total.load(Ordering::Relaxed) > shared.max_queued_total)
    }

    /// When the frame under way must be complete, if one is.
    fn frame_deadline(&self, shared: &Shared) -> Option<Instant> {
        let (limit, start) = (shared.frame_timeout?, self.frame_started?);
        let earned = match shared.frame_min_rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(self.frame_bytes as f64 / rate as f64),
        };
        Some(start + limit + earned)
    }

    /// Keeps track of the frame under way after `arrived` bytes came in
    /// and `decoded` frames were handled; `restart` starts its deadline
    /// afresh (the engine held the connection until now).
    fn frame_progress(
        &mut self,
        shared: &Shared,
        conn: &Conn,
        decoded: usize,
        arrived: usize,
        restart: bool,
    ) {
        if shared.frame_timeout.is_none() {
            return;
        }
        if self.decoder.buffered() == 0 {
            self.frame_started = None;
            return;
        }
        if decoded > 0 || restart || self.frame_started.is_none() {
            // A frame began in what arrived (or the clock starts again).
            self.frame_started = Some(Instant::now());
            self.frame_bytes = self.decoder.buffered() as u64;
            arm_check(shared, conn, self);
        } else {
            self.frame_bytes += arrived as u64;
        }
    }

    /// Drops what is queued and not yet begun, keeping the rest of a frame
    /// partly sent (so the stream stays whole frames), and queues ERROR 7
    /// after it; the connection then closes once that is sent. Bytes of a
    /// send in flight that the kernel has not taken are trimmed the same
    /// way when it completes.
    fn drop_as_slow_consumer(&mut self, shared: &Shared) {
        shared.stats.error_sent(frame::code::SLOW_CONSUMER);
        let mut keep = 0;
        let file_in_front = matches!(self.sendq.front(), Some(Chunk::File { .. }));
        if self.front_mid_frame || file_in_front {
            keep = 1;
            // A frame header, then its file.
            if !file_in_front && matches!(self.sendq.get(1), Some(Chunk::File { .. })) {
                keep = 2;
            }
        }
        // A file at the front follows a header that is sent or in flight:
        // the send in flight is then left whole.
        self.trim_inflight =
            self.send_op.is_some() && self.file_inflight.is_none() && !file_in_front;
        let mut dropped = 0;
        for c in self.sendq.drain(keep.min(self.sendq.len())..) {
            dropped += c.memory();
            if let Chunk::File { .. } = c {
                self.files_queued -= 1;
            }
        }
        self.unqueue(shared, dropped);
        self.enqueue(
            shared,
            frame::error_frame(
                frame::code::SLOW_CONSUMER,
                "slow consumer: send queue over its limit",
            )
            .into_wire(),
        );
        self.close(
            shared,
            CloseReason::SlowConsumer,
            CloseMode::Flush { linger: false },
            None,
        );
    }

    /// Adds what the broadcast budget earned since it was last looked at.
    fn refill(&mut self, shared: &Shared, now: Instant) {
        let rate = shared.max_broadcast_rate as f64;
        let earned = now.duration_since(self.bcast_refilled).as_secs_f64() * rate;
        self.bcast_tokens = (self.bcast_tokens + earned).min(shared.broadcast_burst as f64);
        self.bcast_refilled = now;
    }

    /// Tokens the budget must hold before a held connection is read again:
    /// a twentieth of a second's worth, so that a sender at its limit is
    /// paused and resumed at most twenty times a second.
    fn resume_tokens(shared: &Shared) -> f64 {
        (shared.max_broadcast_rate as f64 / 20.0).clamp(1.0, shared.broadcast_burst as f64)
    }

    /// This connection broadcast a message; `congested`: a recipient has
    /// over half its send queue limit waiting. Holds the connection (it is
    /// not read) while its budget is spent or until the recipients catch
    /// up: backpressure on the sender rather than dropping the recipients.
    pub(crate) fn broadcast_made(&mut self, shared: &Shared, conn: &Conn, congested: bool) {
        let now = Instant::now();
        if shared.max_broadcast_rate > 0 {
            self.refill(shared, now);
            self.bcast_tokens -= 1.0;
            if self.bcast_tokens < 1.0 {
                self.bcast_hold = true;
            }
        }
        if congested {
            self.bcast_congested.get_or_insert(now);
            self.bcast_hold = true;
        } else {
            self.bcast_congested = None;
        }
        if self.bcast_hold {
            self.arm_broadcast_timer(shared, conn);
        }
    }

    fn arm_broadcast_timer(&mut self, shared: &Shared, conn: &Conn) {
        if self.bcast_timer {
            return;
        }
        let after = if self.bcast_congested.is_some() {
            BROADCAST_RECHECK
        } else {
            let need = Self::resume_tokens(shared) - self.bcast_tokens;
            Duration::from_secs_f64(need.max(0.0) / shared.max_broadcast_rate.max(1) as f64)
        };
        self.bcast_timer = true;
        let _ = self.set_timer(conn, shared, after, BROADCAST_TIMER);
    }

    /// A held broadcaster looks whether it may be read again.
    fn broadcast_recheck(&mut self, shared: &Shared, conn: &Conn) {
        self.bcast_timer = false;
        if !self.bcast_hold {
            return;
        }
        let now = Instant::now();
        if let Some(since) = self.bcast_congested {
            let soft = shared.max_send_queue / 2;
            if now.duration_since(since) >= BROADCAST_STALL {
                // Still behind after all this time: those are slow
                // consumers, not readers catching up.
                let n = shared.backlogged(soft, true);
                tracing::debug!(conn = %conn.id, recipients = n, "broadcaster waited too long on slow recipients");
                self.bcast_congested = None;
            } else if shared.backlogged(soft / 2, false) == 0 {
                self.bcast_congested = None;
            }
        }
        let budget_ok = shared.max_broadcast_rate == 0 || {
            self.refill(shared, now);
            self.bcast_tokens >= Self::resume_tokens(shared)
        };
        if budget_ok && self.bcast_congested.is_none() {
            self.bcast_hold = false;
        } else {
            self.arm_broadcast_timer(shared, conn);
        }
    }
}

/// Handles bytes received on an open connection.
pub(crate) fn on_received(shared: &Shared, conn: &Conn, st: &mut ConnState, data: &[u8]) {
    st.bytes_in += data.len() as u64;
    st.last_activity = Instant::now();
    shared.stats.bytes_in(data.len());
    if st.closing.is_some() {
        return; // lingering: discard
    }
    match shared.protocol {
        Protocol::Raw => {
            let h = shared.handler.clone();
            h.on_data(&mut Ctx { conn, st, shared }, data);
        }
        Protocol::Framed => {
            st.decoder.feed(data);
            let n = decode_frames(shared, conn, st);
            st.frame_progress(shared, conn, n, data.len(), false);
        }
    }
}

/// Handles the complete frames in the decoder, in order, until it holds no
/// complete frame, the connection closes, or it must hold back: its send
/// queue is over the limit, a file reply is in progress (each holds an
/// open file) or a request waits for a file reply place. Frames left in
/// the decoder are handled by `progress` once the connection drains. A
/// frame deferred for a file reply place comes before them. Returns the
/// number handled.
fn decode_frames(shared: &Shared, conn: &Conn, st: &mut ConnState) -> usize {
    let mut n = 0;
    loop {
        if st.closing.is_some() || st.must_hold(shared) {
            return n;
        }
        if let Some(f) = st.deferred.take() {
            n += 1;
            handle_frame(shared, conn, st, f);
            continue;
        }
        match st.decoder.decode() {
            Ok(Some(f)) => {
                n += 1;
                shared.stats.frame_in(f.cmd(), f.body_len());
                handle_frame(shared, conn, st, f);
            }
            Ok(None) => return n,
            Err(e) => {
                tracing::debug!(conn = %conn.id, peer = ?conn.peer, "{e}");
                let mut ctx = Ctx { conn, st, shared };
                ctx.send_error(frame::code::FRAME_TOO_LARGE, &e.to_string());
                return n;
            }
        }
    }
}

/// Runs the handler on one frame; a file reply place it reserved and did
/// not use goes back.
fn handle_frame(shared: &Shared, conn: &Conn, st: &mut ConnState, f: Frame) {
    let h = shared.handler.clone();
    h.on_frame(&mut Ctx { conn, st, shared }, f);
    if std::mem::take(&mut st.file_reserved) {
        shared.release_file_place();
    }
}

/// A file reply place was freed and this connection was first in line.
pub(crate) fn on_file_wake(shared: &Shared, st: &mut ConnState) {
    if st.file_wait
        && st.deferred.is_some()
        && st.closing.is_none()
        && st.queued <= shared.max_send_queue / 2
    {
        // `progress` lets the deferred frame be handled again; if the place
        // is gone by then, it waits in line again.
        st.file_wait = false;
    } else {
        // Nothing to retry here: pass the place on.
        st.file_wait = false;
        shared.wake_file_waiter();
    }
}

/// Carries a connection forward after any event: starts the next send,
/// re-arms the receive, executes a close decision, and finalises the
/// connection once nothing is in flight. Call with the lock held.
pub(crate) fn progress(shared: &Shared, conn: &Conn, st: &mut ConnState) {
    if st.finalized {
        return;
    }
    let port = shared.port_of(conn.id);
    if conn.inbox_pending.swap(false, Ordering::AcqRel) {
        let frames = std::mem::take(&mut *conn.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for f in frames {
            st.hint.backlog.fetch_sub(f.len(), Ordering::Relaxed);
            deliver_inbox(shared, st, f);
        }
    }
    // Sending.
    if st.send_op.is_none() && !st.sendq.is_empty() && !st.shut && !st.connecting {
        st.inflight_mid_frame = std::mem::take(&mut st.front_mid_frame);
        let op = match st.sendq.pop_front() {
            Some(Chunk::File { file, offset, len }) => {
                st.file_inflight = Some((file.clone(), offset, len));
                Op::SendFile {
                    socket: conn.socket.clone(),
                    file,
                    offset,
                    len,
                    copy: len < shared.file_copy_below,
                }
            }
            Some(Chunk::Bytes(first)) => {
                // Gather the queued buffers up to the next file segment.
                let mut bytes = first.len();
                let mut bufs = vec![first];
                while let Some(Chunk::Bytes(b)) = st.sendq.front() {
                    if bufs.len() == MAX_SEND_BUFS || bytes + b.len() > MAX_SEND_BYTES {
                        break;
                    }
                    bytes += b.len();
                    let Some(Chunk::Bytes(b)) = st.sendq.pop_front() else {
                        unreachable!()
                    };
                    bufs.push(b);
                }
                Op::Send {
                    socket: conn.socket.clone(),
                    bufs,
                }
            }
            None => unreachable!("checked non-empty"),
        };
        match port.submit(conn.id.key(), op) {
            Ok(id) => st.send_op = Some(id),
            Err(e) => st.close(
                shared,
                CloseReason::Error,
                CloseMode::Abort,
                Some(e.to_string()),
            ),
        }
    }
    // Backpressure: stop reading while the peer does not read our replies,
    // or while the whole engine is over its queue cap and this connection
    // has replies waiting (its own send completion re-evaluates this).
    let limit = shared.max_send_queue;
    if !st.paused && st.must_hold(shared) {
        st.paused = true;
    } else if st.paused && !st.must_hold(shared) && st.queued <= limit / 2 {
        st.paused = false;
        // Requests that arrived before the pause come first.
        if shared.protocol == Protocol::Framed {
            let n = decode_frames(shared, conn, st);
            // The time held was not the peer's: its frame's clock restarts.
            st.frame_progress(shared, conn, n, 0, true);
            if n > 0 {
                return progress(shared, conn, st);
            }
        }
    }
    if st.files_queued > 0 && !st.file_stall_armed && st.closing.is_none() {
        st.file_stall_armed = true;
        let after = FILE_STALL
            .saturating_sub(st.file_progress.elapsed())
            .max(Duration::from_millis(100));
        let _ = st.set_timer(conn, shared, after, FILE_STALL_TIMER);
    }
    let over_cap =
        st.queued > 0 && shared.queued_total.load(Ordering::Relaxed) > shared.max_queued_total;
    // Closing.
    if st.closing.is_some() {
        if !st.flush_deadline && (st.draining || st.linger) {
            // A peer that never reads must not hold a closing connection.
            st.flush_deadline = true;
            let _ = st.set_timer(conn, shared, shared.flush_timeout, FLUSH_TIMER);
        }
        if st.draining && st.sendq.is_empty() && st.send_op.is_none() {
            st.draining = false;
            if st.linger && !st.read_eof && !st.shut {
                shutdown_sock(shared, conn, Shutdown::Write);
                if st
                    .set_timer(conn, shared, shared.linger, LINGER_TIMER)
                    .is_err()
                {
                    st.linger = false;
                }
            } else {
                st.linger = false;
            }
        }
        if !st.draining && !st.linger && !st.shut {
            st.shut = true;
            shutdown_sock(shared, conn, Shutdown::Both);
            if let Some(op) = st.connect_op {
                let _ = port.cancel(op);
            }
            // On IOCP a shutdown leaves a pending send pending (a pending
            // receive is cancelled below, as whenever reading stops).
            if port.shutdown_leaves_ops()
                && let Some(op) = st.send_op
            {
                let _ = port.cancel(op);
            }
        }
    }
    // Receiving: one receive in flight while open (or lingering).
    let want_recv = !st.connecting
        && !st.read_eof
        && !st.shut
        && !st.paused
        && !over_cap
        && !st.retry_wait
        && (st.closing.is_none() || st.linger);
    if let (false, Some(op), false) = (want_recv, st.recv_op, st.recv_cancelled) {
        // Stop reading: what arrives before the cancel lands is still
        // handled (it is bounded by the socket's receive buffer).
        st.recv_cancelled = true;
        let _ = port.cancel(op);
    }
    if want_recv && st.recv_op.is_none() {
        // A single receive at a time. The port's multishot receive
        // (`Op::RecvMulti`) saved ~4 % CPU per echo on one-worker ports, but
        // with it the soak test (`soak::soak`) saw a connection time out
        // that should have seen its peer's data or end: 2 runs of 2 at
        // first, 1 of 17 later (CPU hogs beside) (0 of many without it). It
        // stays off until that is understood (docs/PERFORMANCE.md).
        let op = Op::Recv {
            socket: conn.socket.clone(),
        };
        match port.submit(conn.id.key(), op) {
            Ok(id) => st.recv_op = Some(id),
            Err(e) => {
                st.close(
                    shared,
                    CloseReason::Error,
                    CloseMode::Abort,
                    Some(e.to_string()),
                );
                return progress(shared, conn, st);
            }
        }
    }
    if st.closing.is_some()
        && st.recv_op.is_none()
        && st.send_op.is_none()
        && st.connect_op.is_none()
        && !st.draining
        && (!st.linger || st.read_eof)
    {
        if !st.shut {
            st.shut = true;
            shutdown_sock(shared, conn, Shutdown::Both);
        }
        finalize(shared, conn, st);
    }
}

/// Shuts the connection's socket: a system call on a descriptor, an
/// operation on a registered-file slot (which keeps the slot from being
/// reused until it ran).
fn shutdown_sock(shared: &Shared, conn: &Conn, how: Shutdown) {
    match &conn.socket {
        Sock::Os(s) => {
            let _ = s.shutdown(how);
        }
        Sock::Direct(_) => {
            let op = Op::Shutdown {
                socket: conn.socket.clone(),
                how,
            };
            if let Err(e) = shared.port_of(conn.id).submit(conn.id.key(), op) {
                tracing::warn!(conn = %conn.id, "cannot shut down a registered socket: {e}");
            }
        }
    }
}

/// The connection's end: out of the table, timers cancelled, `on_close`.
fn finalize(shared: &Shared, conn: &Conn, st: &mut ConnState) {
    st.finalized = true;
    for key in st.timers.drain(..) {
        shared.cancel_timer(conn.id, key);
    }
    shared.remove_conn(conn.id);
    if std::mem::take(&mut st.admitted) {
        shared.admitted.fetch_sub(1, Ordering::AcqRel);
    }
    let (reason, error) = st.closing.take().unwrap_or((CloseReason::Local, None));
    shared.stats.closed(reason, st.was_open);
    shared.stats.event_disconnect(
        conn.id,
        conn.peer,
        reason,
        error.as_deref(),
        (st.bytes_in, st.bytes_out),
    );
    tracing::debug!(
        conn = %conn.id,
        peer = ?conn.peer,
        reason = reason.name(),
        error = error.as_deref().unwrap_or(""),
        bytes_in = st.bytes_in,
        bytes_out = st.bytes_out,
        "disconnect"
    );
    let info = CloseInfo {
        id: conn.id,
        peer: conn.peer,
        reason,
        error,
        bytes_in: st.bytes_in,
        bytes_out: st.bytes_out,
    };
    let files = st
        .sendq
        .drain(..)
        .filter(|c| matches!(c, Chunk::File { .. }))
        .count();
    for _ in 0..files {
        st.file_done(shared);
    }
    if std::mem::take(&mut st.file_reserved) {
        shared.release_file_place();
    }
    // A connection that waited for a file reply place, or was woken for
    // one it will not use now, must not take the wake-up with it.
    if st.deferred.take().is_some() && !shared.forget_file_waiter(conn.id) {
        shared.wake_file_waiter();
    }
    let left = st.queued;
    st.unqueue(shared, left);
    let user = st.user.take();
    shared.handler.on_close(EngineRef { shared }, &info, user);
    shared.conn_closed();
}

/// A send completed with `result`, handing back `bufs`.
pub(crate) fn on_sent(
    shared: &Shared,
    st: &mut ConnState,
    result: io::Result<usize>,
    bufs: Vec<Bytes>,
) {
    st.send_op = None;
    match result {
        Ok(n) => {
            st.bytes_out += n as u64;
            shared.stats.bytes_out(n);
            if n > 0 {
                st.last_activity = Instant::now();
            }
            st.unqueue(shared, n);
            // Put back what the kernel did not take, in order. The first
            // buffer put back is the rest of a frame begun if the kernel
            // took part of it, or if it already was one.
            let mut skip = n;
            let mut rest: Vec<Bytes> = Vec::new();
            let mut mid_frame = false;
            for (i, mut b) in bufs.into_iter().enumerate() {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                if rest.is_empty() {
                    mid_frame = skip > 0 || (i == 0 && st.inflight_mid_frame);
                }
                if skip > 0 {
                    b = b.slice(skip..);
                    skip = 0;
                }
                rest.push(b);
            }
            if std::mem::take(&mut st.trim_inflight) {
                // Dropped as a slow consumer meanwhile: of what the kernel
                // did not take, only the rest of a frame begun goes before
                // the ERROR frame.
                let keep = usize::from(mid_frame);
                let dropped: usize = rest.drain(keep.min(rest.len())..).map(|b| b.len()).sum();
                st.unqueue(shared, dropped);
            }
            if st.shut || (st.closing.is_some() && !st.draining) {
                let dropped: usize = rest.iter().map(|b| b.len()).sum();
                st.unqueue(shared, dropped);
                return;
            }
            st.front_mid_frame = mid_frame && !rest.is_empty();
            for b in rest.into_iter().rev() {
                st.sendq.push_front(Chunk::Bytes(b));
            }
            // A burst of pipelined replies left a large ring behind: give
            // it back rather than hold it for the connection's life.
            if st.sendq.is_empty() && st.sendq.capacity() > SENDQ_KEEP {
                st.sendq = VecDeque::new();
            }
        }
        Err(e) => {
            st.trim_inflight = false;
            let dropped: usize = bufs.iter().map(|b| b.len()).sum();
            st.unqueue(shared, dropped);
            let reason = CloseReason::from_error(&e);
            st.close(shared, reason, CloseMode::Abort, Some(e.to_string()));
        }
    }
}

/// A file send completed with `result`.
pub(crate) fn on_sent_file(
    shared: &Shared,
    conn: &Conn,
    st: &mut ConnState,
    result: io::Result<usize>,
) {
    st.send_op = None;
    let Some((file, offset, len)) = st.file_inflight.take() else {
        return;
    };
    match result {
        Ok(0) if len > 0 => {
            st.file_done(shared);
            // The file shrank under us: the frame header promised bytes we
            // cannot send, so the stream cannot be continued. Everything
            // sent was read from the file; the peer sees the reply cut
            // short by the close, never padded.
            shared.stats.file_truncated();
            tracing::debug!(
                conn = %conn.id,
                peer = ?conn.peer,
                offset,
                missing = len,
                "file shrank while being sent; closing the connection"
            );
            st.close(
                shared,
                CloseReason::Error,
                CloseMode::Abort,
                Some(format!(
                    "file shrank while being sent ({len} bytes short at offset {offset})"
                )),
            );
        }
        Ok(n) => {
            st.bytes_out += n as u64;
            shared.stats.bytes_out(n);
            st.last_activity = Instant::now();
            st.file_progress = st.last_activity;
            if n < len && !st.shut && (st.closing.is_none() || st.draining) {
                st.sendq.push_front(Chunk::File {
                    file,
                    offset: offset + n as u64,
                    len: len - n,
                });
                return; // the same file reply, still queued
            }
            st.file_done(shared);
        }
        Err(e) => {
            st.file_done(shared);
            let reason = CloseReason::from_error(&e);
            st.close(shared, reason, CloseMode::Abort, Some(e.to_string()));
        }
    }
}

/// Queues bytes from the inbox (a broadcast, or `EngineRef::send`), or
/// drops this connection as a slow consumer when it is too far behind.
fn deliver_inbox(shared: &Shared, st: &mut ConnState, frame: Bytes) {
    if st.closing.is_some() {
        return;
    }
    let over_own = st.queued + frame.len() > shared.max_send_queue;
    let over_total = st.queued > BACKLOG_WHEN_OVER_CAP
        && shared.queued_total.load(Ordering::Relaxed) > shared.max_queued_total;
    if over_own || over_total {
        tracing::info!(
            queued = st.queued,
            frame = frame.len(),
            limit = shared.max_send_queue,
            queued_total = shared.queued_total.load(Ordering::Relaxed),
            "slow consumer dropped"
        );
        st.drop_as_slow_consumer(shared);
        return;
    }
    shared.stats.wire_out(&frame);
    st.enqueue(shared, frame);
}

/// A receive completed (Ok with an empty buffer is EOF).
pub(crate) fn on_recv_done(
    shared: &Shared,
    conn: &Conn,
    st: &mut ConnState,
    result: io::Result<crate::buf::RecvBuf>,
    more: bool,
) {
    let mut cancelled = false;
    if !more {
        st.recv_op = None;
        cancelled = std::mem::take(&mut st.recv_cancelled);
    }
    match result {
        Ok(buf) if !buf.is_empty() => on_received(shared, conn, st, &buf),
        Ok(_) => {
            st.read_eof = true;
            st.close(
                shared,
                CloseReason::PeerClosed,
                CloseMode::Flush { linger: false },
                None,
            );
        }
        // We stopped reading on purpose; `progress` re-arms when it may.
        Err(e) if cancelled && e.raw_os_error() == Some(crate::port::sys::errno::ECANCELED) => {}
        Err(e) if e.raw_os_error() == Some(crate::port::sys::errno::ENOBUFS) => {
            // The pool is empty for a moment: try again shortly instead of
            // spinning.
            tracing::debug!(conn = %conn.id, "receive buffer pool exhausted; retrying");
            if st
                .set_timer(conn, shared, Duration::from_millis(5), RECV_RETRY_TIMER)
                .is_ok()
            {
                st.retry_wait = true;
            } else {
                st.close(
                    shared,
                    CloseReason::Error,
                    CloseMode::Abort,
                    Some(e.to_string()),
                );
            }
        }
        Err(e) => {
            st.read_eof = true;
            let reason = CloseReason::from_error(&e);
            st.close(shared, reason, CloseMode::Abort, Some(e.to_string()));
        }
    }
}

/// A broadcaster gave up waiting on this connection's backlog: drop it as
/// a slow consumer if it is still over half its send queue limit.
pub(crate) fn slow_consumer_check(shared: &Shared, st: &mut ConnState) {
    let backlog = st.hint.backlog.load(Ordering::Relaxed);
    if st.closing.is_some() || backlog <= shared.max_send_queue / 2 {
        return;
    }
    tracing::info!(
        queued = st.queued,
        backlog,
        limit = shared.max_send_queue,
        "slow consumer dropped: held a broadcaster back for {}s",
        BROADCAST_STALL.as_secs_f64()
    );
    st.drop_as_slow_consumer(shared);
}

/// Arms the idle and frame checks of a newly opened connection.
pub(crate) fn start_check_timer(shared: &Shared, conn: &Conn, st: &mut ConnState) {
    st.last_activity = Instant::now();
    arm_check(shared, conn, st);
}

/// When the check timer must fire: the idle deadline or the deadline of
/// the frame under way, whichever is first.
fn check_due(shared: &Shared, st: &ConnState) -> Option<Instant> {
    let idle = shared.idle_timeout.map(|t| st.last_activity + t);
    match (idle, st.frame_deadline(shared)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Arms the connection's one check timer for when it is next due, unless
/// it is armed for that time or earlier: activity only moves deadlines
/// later, so the timer fires early and re-arms itself for the rest. Only a
/// frame beginning can bring the due time forward, and then the timer is
/// moved (still one entry per connection).
fn arm_check(shared: &Shared, conn: &Conn, st: &mut ConnState) {
    let Some(due) = check_due(shared, st) else {
        return;
    };
    if let Some(key) = st.check_key {
        if key.0 <= due {
            return;
        }
        shared.cancel_timer(conn.id, key);
        st.take_timer(key);
        st.check_key = None;
    }
    let after = due.saturating_duration_since(Instant::now());
    if st.set_timer(conn, shared, after, CHECK_TIMER).is_ok() {
        st.check_key = st.timers.last().copied();
    }
}

/// An internal timer fired.
pub(crate) fn on_internal_timer(shared: &Shared, conn: &Conn, st: &mut ConnState, value: u64) {
    match value {
        LINGER_TIMER => {
            st.linger = false;
        }
        RECV_RETRY_TIMER => {
            st.retry_wait = false;
        }
        FILE_STALL_TIMER => {
            st.file_stall_armed = false;
            // `progress` re-arms it while a file reply is in progress.
            if st.files_queued > 0
                && st.closing.is_none()
                && st.file_progress.elapsed() >= FILE_STALL
                && shared.file_waiting()
            {
                tracing::debug!(
                    conn = %conn.id,
                    peer = ?conn.peer,
                    "file reply not read for {FILE_STALL:?} while FILE requests wait; dropping"
                );
                st.close(
                    shared,
                    CloseReason::SlowConsumer,
                    CloseMode::Abort,
                    Some(format!(
                        "file reply not read for {}s while other FILE requests waited",
                        FILE_STALL.as_secs()
                    )),
                );
            }
        }
        FLUSH_TIMER if st.draining || st.linger => {
            tracing::debug!(conn = %conn.id, "flush timed out; aborting");
            st.close(shared, CloseReason::Local, CloseMode::Abort, None);
        }
        BROADCAST_TIMER => st.broadcast_recheck(shared, conn),
        CHECK_TIMER => {
            st.check_key = None;
            if st.closing.is_some() {
                return;
            }
            // One timer per connection, re-armed lazily: activity only
            // moves `last_activity`, and the timer checks it when it fires.
            let now = Instant::now();
            if let Some(deadline) = st.frame_deadline(shared)
                && deadline <= now
            {
                if st.not_read(shared) {
                    // Held by the engine, not slow: the clock restarts.
                    st.frame_started = Some(now);
                    st.frame_bytes = 0;
                } else {
                    let began = st.frame_started.map_or(0.0, |t| (now - t).as_secs_f64());
                    let message = format!(
                        "frame timeout: a frame begun {began:.1}s ago is still incomplete \
                         ({} bytes received)",
                        st.frame_bytes
                    );
                    tracing::debug!(conn = %conn.id, peer = ?conn.peer, "{message}");
                    let mut ctx = Ctx { conn, st, shared };
                    ctx.send_error_as(
                        frame::code::IDLE_TIMEOUT,
                        &message,
                        CloseReason::FrameTimeout,
                    );
                    return;
                }
            }
            if let Some(limit) = shared.idle_timeout
                && now.duration_since(st.last_activity) >= limit
            {
                let mut ctx = Ctx { conn, st, shared };
                ctx.send_error(
                    frame::code::IDLE_TIMEOUT,
                    &format!(
                        "idle timeout: nothing sent or received for {}s",
                        limit.as_secs_f64()
                    ),
                );
                return;
            }
            arm_check(shared, conn, st);
        }
        _ => {}
    }
}
