//! One connection: its receive state machine, send queue and close
//! sequence (the seeds' per-handle context).
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;

use crate::frame::{self, Decoder};
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
/// Internal timer: check whether the connection has been idle too long.
const IDLE_TIMER: u64 = u64::MAX - 3;
/// Internal timer: a closing connection took too long to flush.
const FLUSH_TIMER: u64 = u64::MAX - 4;
/// Posted value: the connection's inbox has something.
pub(crate) const INBOX_POST: u64 = u64::MAX;
/// Posted value: close the connection (from `EngineRef::close`).
pub(crate) const CLOSE_POST: u64 = u64::MAX - 1;
/// A broadcast recipient with more than this queued is dropped when the
/// engine is over its total queue cap.
const BACKLOG_WHEN_OVER_CAP: usize = 64 * 1024;

/// File replies a connection may have queued (each holds an open file)
/// before it stops being read: a client pipelining FILE requests without
/// reading cannot make the server hold thousands of descriptors.
const MAX_FILES_QUEUED: usize = 16;

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
    pub(crate) st: Mutex<ConnState>,
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
    /// File replies queued or in flight (each holds an open file).
    files_queued: usize,
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
}

impl ConnState {
    pub(crate) fn new(max_frame: u32, connecting: bool) -> ConnState {
        ConnState {
            connecting,
            was_open: false,
            admitted: false,
            decoder: Decoder::new(max_frame),
            sendq: VecDeque::new(),
            file_inflight: None,
            files_queued: 0,
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
            last_activity: Instant::now(),
            flush_deadline: false,
            bytes_in: 0,
            bytes_out: 0,
            user: None,
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
        shared
            .queued_total
            .fetch_add(bytes.len(), Ordering::Relaxed);
        self.sendq.push_back(Chunk::Bytes(bytes));
    }

    /// Queues `len` bytes of `file` from `offset`, sent zero-copy after
    /// everything queued before. File bytes take no memory, so they do not
    /// count toward the queue limits.
    pub(crate) fn enqueue_file(&mut self, file: Arc<File>, offset: u64, len: usize) {
        if self.closing.is_some() && !self.draining || len == 0 {
            return;
        }
        self.files_queued += 1;
        self.sendq.push_back(Chunk::File { file, offset, len });
    }

    /// Whether the connection must stop taking requests until it drains.
    fn must_hold(&self, shared: &Shared) -> bool {
        self.queued > shared.max_send_queue || self.files_queued >= MAX_FILES_QUEUED
    }

    /// Forgets `n` queued bytes that will never be sent (or were sent).
    fn unqueue(&mut self, shared: &Shared, n: usize) {
        let n = n.min(self.queued);
        self.queued -= n;
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
        let mut dropped = 0;
        for c in self.sendq.drain(..) {
            dropped += c.memory();
            if let Chunk::File { .. } = c {
                self.files_queued -= 1;
            }
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
            decode_frames(shared, conn, st);
        }
    }
}

/// Handles the complete frames in the decoder, in order, until it holds no
/// complete frame, the connection closes, or it must hold back: its send
/// queue is over the limit or it has `MAX_FILES_QUEUED` file replies
/// waiting (each holds an open file). Frames left in the decoder are
/// handled by `progress` once the connection drains. Returns the number
/// handled.
fn decode_frames(shared: &Shared, conn: &Conn, st: &mut ConnState) -> usize {
    let mut n = 0;
    loop {
        if st.closing.is_some() || st.must_hold(shared) {
            return n;
        }
        match st.decoder.decode() {
            Ok(Some(f)) => {
                n += 1;
                shared.stats.frame_in(f.cmd(), f.body_len());
                let h = shared.handler.clone();
                h.on_frame(&mut Ctx { conn, st, shared }, f);
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
            deliver_inbox(shared, st, f);
        }
    }
    // Sending.
    if st.send_op.is_none() && !st.sendq.is_empty() && !st.shut && !st.connecting {
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
    } else if st.paused && st.queued <= limit / 2 && st.files_queued < MAX_FILES_QUEUED / 2 {
        st.paused = false;
        // Requests that arrived before the pause come first.
        if shared.protocol == Protocol::Framed && decode_frames(shared, conn, st) > 0 {
            return progress(shared, conn, st);
        }
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
    st.sendq.clear();
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
            // Put back what the kernel did not take, in order.
            let mut skip = n;
            let mut rest: Vec<Bytes> = Vec::new();
            for mut b in bufs {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                if skip > 0 {
                    b = b.slice(skip..);
                    skip = 0;
                }
                rest.push(b);
            }
            if st.shut || (st.closing.is_some() && !st.draining) {
                let dropped: usize = rest.iter().map(|b| b.len()).sum();
                st.unqueue(shared, dropped);
                return;
            }
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
            let dropped: usize = bufs.iter().map(|b| b.len()).sum();
            st.unqueue(shared, dropped);
            let reason = CloseReason::from_error(&e);
            st.close(shared, reason, CloseMode::Abort, Some(e.to_string()));
        }
    }
}

/// A file send completed with `result`.
pub(crate) fn on_sent_file(shared: &Shared, st: &mut ConnState, result: io::Result<usize>) {
    st.send_op = None;
    let Some((file, offset, len)) = st.file_inflight.take() else {
        return;
    };
    match result {
        Ok(0) if len > 0 => {
            st.files_queued -= 1;
            // The file shrank under us: the frame header promised bytes we
            // cannot send, so the stream cannot be continued.
            st.close(
                shared,
                CloseReason::Error,
                CloseMode::Abort,
                Some("file shrank while being sent".into()),
            );
        }
        Ok(n) => {
            st.bytes_out += n as u64;
            shared.stats.bytes_out(n);
            st.last_activity = Instant::now();
            if n < len && !st.shut && (st.closing.is_none() || st.draining) {
                st.sendq.push_front(Chunk::File {
                    file,
                    offset: offset + n as u64,
                    len: len - n,
                });
                return; // the same file reply, still queued
            }
            st.files_queued -= 1;
        }
        Err(e) => {
            st.files_queued -= 1;
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
        shared.stats.error_sent(frame::code::SLOW_CONSUMER);
        st.abort_queue(shared);
        st.enqueue(
            shared,
            frame::error_frame(
                frame::code::SLOW_CONSUMER,
                "slow consumer: send queue over its limit",
            )
            .into_wire(),
        );
        st.close(
            shared,
            CloseReason::SlowConsumer,
            CloseMode::Flush { linger: false },
            None,
        );
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

/// Arms the idle check of a newly opened connection.
pub(crate) fn start_idle_timer(shared: &Shared, conn: &Conn, st: &mut ConnState) {
    if let Some(t) = shared.idle_timeout {
        st.last_activity = Instant::now();
        let _ = st.set_timer(conn, shared, t, IDLE_TIMER);
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
        FLUSH_TIMER if st.draining || st.linger => {
            tracing::debug!(conn = %conn.id, "flush timed out; aborting");
            st.close(shared, CloseReason::Local, CloseMode::Abort, None);
        }
        IDLE_TIMER => {
            let Some(limit) = shared.idle_timeout else {
                return;
            };
            if st.closing.is_some() {
                return;
            }
            // One timer per connection, re-armed lazily: activity only
            // moves `last_activity`, and the timer checks it when it fires.
            let idle = st.last_activity.elapsed();
            if idle >= limit {
                let mut ctx = Ctx { conn, st, shared };
                ctx.send_error(
                    frame::code::IDLE_TIMEOUT,
                    &format!(
                        "idle timeout: nothing sent or received for {}s",
                        limit.as_secs_f64()
                    ),
                );
            } else {
                let _ = st.set_timer(conn, shared, limit - idle, IDLE_TIMER);
            }
        }
        _ => {}
    }
}
