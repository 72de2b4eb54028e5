//! The user's side of a connection: the [`Handler`] callbacks and the
//! [`Ctx`] they act through.
//!
//! A handler is called on a worker thread with the connection locked, so
//! callbacks for one connection never run at the same time and arrive in
//! order. Callbacks must not block: the worker is the port's.
//!
//! # Writing a service
//!
//! One handler value serves every connection of an engine, on every
//! worker: state that belongs to one connection goes in the connection
//! ([`Ctx::set_data`]), state shared between connections goes in the
//! handler behind a lock of its own.
//!
//! A callback acts on *its* connection through its [`Ctx`]. To reach
//! *another* connection, append what it should get to a queue in the
//! handler and [`EngineRef::post`] it a wake-up: its
//! [`on_posted`](Handler::on_posted) then runs on a worker of its own
//! port, with only that connection locked. Do not call
//! [`EngineRef::send`] or [`EngineRef::close`] from a callback: they lock
//! the target connection while the callback holds its own, which deadlocks
//! when two callbacks do it to each other (or one does it to itself).
//!
//! `examples/chat.rs` is a complete service written this way: per-connection
//! state, mailboxes woken by `post`, a timer per connection.

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::frame::{self, Frame};
use crate::server::conn::{CloseMode, Conn, ConnState};
use crate::server::engine::Shared;
use crate::server::stats::CloseReason;
use crate::server::{ConnId, EngineRef};

/// The largest value [`Ctx::set_timer`] takes; the values above are the
/// engine's own timers.
pub const MAX_TIMER_VALUE: u64 = u64::MAX - 17;

/// Callbacks of a service, as HP-Socket users write them. Every method has
/// a default that does nothing, so a handler implements only what it uses.
///
/// For one connection: `on_open` comes first; then `on_frame`/`on_data`,
/// `on_posted` and `on_timer`, one at a time, with the connection locked;
/// once the connection is closing (by either side) none of those runs
/// again; `on_close` comes last, exactly once. A connection refused at the
/// connection limit gets `on_close` without `on_open`.
pub trait Handler: Send + Sync + 'static {
    /// A connection was accepted (server) or connected (client). The place
    /// to attach per-connection data and arm timers.
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        let _ = ctx;
    }
    /// A complete frame arrived (framed protocol).
    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        let _ = (ctx, frame);
    }
    /// Bytes arrived (raw protocol), in order, in whatever pieces TCP gave.
    fn on_data(&self, ctx: &mut Ctx<'_>, data: &[u8]) {
        let _ = (ctx, data);
    }
    /// A value posted to this connection with [`EngineRef::post`], run on
    /// a worker of this connection's port.
    ///
    /// Not called if the connection started closing (or was gone) before
    /// the value was dequeued: the value is then dropped, so anything the
    /// value refers to must be cleaned up in [`on_close`](Self::on_close).
    /// With one worker per port, values run in the order posted; when
    /// several workers share a port, two values may run in either order, so
    /// carry ordered data in a queue of your own and use the value as a
    /// wake-up.
    fn on_posted(&self, ctx: &mut Ctx<'_>, value: u64) {
        let _ = (ctx, value);
    }
    /// A timer set with [`Ctx::set_timer`] fired, with the value it was
    /// set with. Timers fire once; set another to repeat. Not called once
    /// the connection is closing.
    fn on_timer(&self, ctx: &mut Ctx<'_>, value: u64) {
        let _ = (ctx, value);
    }
    /// The connection is gone; called exactly once per opened or attempted
    /// connection. `data` is what was set with [`Ctx::set_data`] (`None`
    /// if nothing was, e.g. when `on_open` never ran).
    ///
    /// By now the connection is out of the table (a [`EngineRef::post`] to
    /// it returns false) and its timers are cancelled. This runs with the
    /// connection still locked, on whichever thread finished it: a worker,
    /// or the thread calling
    /// [`Engine::shutdown`](crate::server::Engine::shutdown). `engine` lets
    /// it tell other connections ([`EngineRef::post`], [`EngineRef::send`]),
    /// which never lock them, so this is safe.
    fn on_close(&self, engine: EngineRef<'_>, info: &CloseInfo, data: Option<Box<dyn Any + Send>>) {
        let _ = (engine, info, data);
    }
}

/// What a handler learns when a connection ends.
#[derive(Debug, Clone)]
pub struct CloseInfo {
    /// The connection.
    pub id: ConnId,
    /// Its peer, when known.
    pub peer: Option<SocketAddr>,
    /// Why it ended.
    pub reason: CloseReason,
    /// The error behind the reason, if any.
    pub error: Option<String>,
    /// Bytes received on it.
    pub bytes_in: u64,
    /// Bytes sent on it.
    pub bytes_out: u64,
}

/// A handler's view of one connection during a callback.
pub struct Ctx<'a> {
    pub(crate) conn: &'a Conn,
    pub(crate) st: &'a mut ConnState,
    pub(crate) shared: &'a Shared,
}

impl fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx").field("id", &self.conn.id).finish()
    }
}

impl Ctx<'_> {
    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.conn.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.conn.peer
    }

    /// The local address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.conn.local
    }

    /// Queues bytes to send, after everything queued before. Sent when the
    /// callback returns, gathered with other queued buffers. `Bytes` is
    /// reference-counted: the same buffer may be queued on many connections
    /// without a copy.
    pub fn send(&mut self, bytes: Bytes) {
        self.st.enqueue(self.shared, bytes);
    }

    /// Queues a frame to send.
    pub fn send_frame(&mut self, frame: Frame) {
        self.shared.stats.frame_out(frame.cmd(), frame.body_len());
        self.st.enqueue(self.shared, frame.into_wire());
    }

    /// Queues `len` bytes of `file` from `offset`, sent after what is queued
    /// before without passing through user memory (zero-copy where the
    /// backend can). The caller sends whatever header announces them.
    pub fn send_file(&mut self, file: std::sync::Arc<std::fs::File>, offset: u64, len: usize) {
        self.st.enqueue_file(self.shared, file, offset, len);
    }

    /// Takes one of the engine's file reply places
    /// ([`EngineConfig::max_file_replies`](crate::server::EngineConfig::max_file_replies))
    /// for a file this frame's handler is about to open and
    /// [`send_file`](Self::send_file); a place not used by the end of the
    /// callback goes back. False when every place is taken: then hand the
    /// frame back with [`defer_until_file_place`](Self::defer_until_file_place)
    /// instead of opening anything. This bounds the descriptors (and
    /// pipes) file replies hold however many clients request files and do
    /// not read.
    pub fn reserve_file(&mut self) -> bool {
        if self.st.file_reserved {
            return true;
        }
        self.st.file_reserved = self.shared.take_file_place_or_wait(self.conn.id);
        if !self.st.file_reserved {
            // In line: `take_file_place_or_wait` queued this connection.
            self.st.file_wait = true;
        }
        self.st.file_reserved
    }

    /// Hands frame `f` back after [`reserve_file`](Self::reserve_file)
    /// found no place: it is passed to `on_frame` again when a file reply
    /// ends somewhere, before any later frame of this connection, which is
    /// not read meanwhile (backpressure, as for a full send queue).
    pub fn defer_until_file_place(&mut self, f: Frame) {
        if !self.st.file_wait {
            // Not in line (no `reserve_file` failed): retry at once.
            self.st.file_wait = !self.shared.take_file_place_or_wait(self.conn.id);
            if !self.st.file_wait {
                self.shared.release_file_place();
            }
        }
        self.st.deferred = Some(f);
    }

    /// Sends an ERROR frame; a fatal code (see
    /// [`frame::code::is_fatal`]) also closes the connection once the error
    /// has been sent. Other codes, including a service's own, leave the
    /// connection open.
    pub fn send_error(&mut self, code: u32, message: &str) {
        let reason = match code {
            frame::code::FRAME_TOO_LARGE => CloseReason::FrameTooLarge,
            frame::code::BUSY => CloseReason::Busy,
            frame::code::IDLE_TIMEOUT => CloseReason::IdleTimeout,
            frame::code::SLOW_CONSUMER => CloseReason::SlowConsumer,
            _ => CloseReason::Local,
        };
        self.send_error_as(code, message, reason);
    }

    /// Like [`send_error`](Self::send_error), counting a close for a fatal
    /// code as `reason`.
    pub(crate) fn send_error_as(&mut self, code: u32, message: &str, reason: CloseReason) {
        self.shared.stats.error_sent(code);
        self.shared.stats.event_error(
            Some(self.conn.id),
            self.conn.peer,
            frame::code::name(code),
            message,
        );
        self.send_frame(frame::error_frame(code, message));
        if frame::code::is_fatal(code) {
            self.st
                .close(self.shared, reason, CloseMode::Flush { linger: true }, None);
        }
    }

    /// Closes the connection after what is queued has been sent.
    pub fn close(&mut self) {
        self.st.close(
            self.shared,
            CloseReason::Local,
            CloseMode::Flush { linger: true },
            None,
        );
    }

    /// Closes the connection now, dropping what is queued. The way to drop
    /// a peer that does not read: [`close`](Self::close) would wait for it
    /// to take what is queued.
    pub fn abort(&mut self) {
        self.st
            .close(self.shared, CloseReason::Local, CloseMode::Abort, None);
    }

    /// Whether the connection is closing (no more callbacks but `on_close`).
    pub fn is_closing(&self) -> bool {
        self.st.is_closing()
    }

    /// Bytes queued and not yet acknowledged by the kernel. The engine stops
    /// reading a connection whose queue passes
    /// [`EngineConfig::max_send_queue`](crate::server::EngineConfig::max_send_queue),
    /// but nothing limits what *other* connections queue on it: a service
    /// that fans out should check this and drop peers that fall behind.
    pub fn queued_bytes(&self) -> usize {
        self.st.queued
    }

    /// Sends a BROADCAST frame (cmd 2, body = this connection's id as u64
    /// big-endian + `body`) to every connection of the engine, this one
    /// included. The frame is built once and shared by every recipient's
    /// queue, never copied per client. Each recipient gets a sender's
    /// broadcasts in the order they were made. Returns the recipients.
    ///
    /// Broadcasting has a budget per connection
    /// ([`EngineConfig::max_broadcast_rate`](crate::server::EngineConfig::max_broadcast_rate)
    /// and `broadcast_burst`): once it is spent, this connection is not read
    /// until it refills. Likewise while a recipient has over half its send
    /// queue limit waiting, for up to 2 s; recipients still that far
    /// behind then are dropped as slow consumers. A fast sender is slowed
    /// down to what its recipients take, rather than the recipients dropped.
    pub fn broadcast(&mut self, body: &[u8]) -> usize {
        let mut b = Vec::with_capacity(8 + body.len());
        b.extend_from_slice(&self.conn.id.raw().to_be_bytes());
        b.extend_from_slice(body);
        let frame = Frame::new(frame::cmd::BROADCAST, &b);
        let (n, congested) = self.shared.broadcast(frame.into_wire());
        self.st.broadcast_made(self.shared, self.conn, congested);
        n
    }

    /// Calls [`Handler::on_timer`] with `value` after `after`, once.
    ///
    /// A timer costs one entry in its port's timer queue until it fires or
    /// the connection closes (which cancels it); there is no handle to
    /// cancel it earlier, so a handler that re-arms a timer must recognise
    /// and ignore stale ones itself (e.g. by a generation in `value`).
    /// Values from `u64::MAX - 16` up are reserved for the engine's own
    /// timers and must not be used.
    pub fn set_timer(&mut self, after: Duration, value: u64) -> io::Result<()> {
        if value > MAX_TIMER_VALUE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("timer value {value} is reserved for the engine (max {MAX_TIMER_VALUE})"),
            ));
        }
        self.st.set_timer(self.conn, self.shared, after, value)
    }

    /// Attaches a value to the connection (the classic IOCP articles' per-handle context),
    /// replacing any earlier one. It comes back to [`Handler::on_close`].
    pub fn set_data<T: Any + Send>(&mut self, data: T) {
        self.st.user = Some(Box::new(data));
    }

    /// The value attached with [`set_data`](Self::set_data), if it is a `T`.
    pub fn data_mut<T: Any + Send>(&mut self) -> Option<&mut T> {
        self.st.user.as_mut()?.downcast_mut::<T>()
    }

    /// The engine this connection belongs to: for [`EngineRef::post`] to
    /// other connections and for stats. Not for [`EngineRef::send`] or
    /// [`EngineRef::close`], which would lock a second connection from
    /// inside this one's callback (see the module docs).
    pub fn engine(&self) -> EngineRef<'_> {
        EngineRef {
            shared: self.shared,
        }
    }
}
