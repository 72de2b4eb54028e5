//! The user's side of a connection: the [`Handler`] callbacks and the
//! [`Ctx`] they act through.
//!
//! A handler is called on a worker thread with the connection locked, so
//! callbacks for one connection never run at the same time and arrive in
//! order. Callbacks must not block: the worker is the port's.

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

/// Callbacks of a service, as HP-Socket users write them. Every method has
/// a default that does nothing, so a handler implements only what it uses.
pub trait Handler: Send + Sync + 'static {
    /// A connection was accepted (server) or connected (client).
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
    /// A value posted to this connection with [`EngineRef::post`].
    fn on_posted(&self, ctx: &mut Ctx<'_>, value: u64) {
        let _ = (ctx, value);
    }
    /// A timer set with [`Ctx::set_timer`] fired.
    fn on_timer(&self, ctx: &mut Ctx<'_>, value: u64) {
        let _ = (ctx, value);
    }
    /// The connection is gone; called exactly once per opened or attempted
    /// connection. `data` is what was set with [`Ctx::set_data`].
    fn on_close(&self, info: &CloseInfo, data: Option<Box<dyn Any + Send>>) {
        let _ = (info, data);
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
    /// callback returns, gathered with other queued buffers.
    pub fn send(&mut self, bytes: Bytes) {
        self.st.enqueue(self.shared, bytes);
    }

    /// Queues a frame to send.
    pub fn send_frame(&mut self, frame: Frame) {
        self.shared.stats.frame_out(frame.cmd());
        self.st.enqueue(self.shared, frame.into_wire());
    }

    /// Queues `len` bytes of `file` from `offset`, sent after what is queued
    /// before without passing through user memory (zero-copy where the
    /// backend can). The caller sends whatever header announces them.
    pub fn send_file(&mut self, file: std::sync::Arc<std::fs::File>, offset: u64, len: usize) {
        self.st.enqueue_file(file, offset, len);
    }

    /// Sends an ERROR frame; a fatal code also closes the connection once
    /// the error has been sent.
    pub fn send_error(&mut self, code: u32, message: &str) {
        self.shared.stats.error_sent(code);
        self.send_frame(frame::error_frame(code, message));
        if frame::code::is_fatal(code) {
            let reason = match code {
                frame::code::FRAME_TOO_LARGE => CloseReason::FrameTooLarge,
                frame::code::BUSY => CloseReason::Busy,
                frame::code::IDLE_TIMEOUT => CloseReason::IdleTimeout,
                frame::code::SLOW_CONSUMER => CloseReason::SlowConsumer,
                _ => CloseReason::Local,
            };
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

    /// Closes the connection now, dropping what is queued.
    pub fn abort(&mut self) {
        self.st
            .close(self.shared, CloseReason::Local, CloseMode::Abort, None);
    }

    /// Whether the connection is closing (no more callbacks but `on_close`).
    pub fn is_closing(&self) -> bool {
        self.st.is_closing()
    }

    /// Bytes queued and not yet acknowledged by the kernel.
    pub fn queued_bytes(&self) -> usize {
        self.st.queued
    }

    /// Sends a BROADCAST frame (cmd 2, body = this connection's id as u64
    /// big-endian + `body`) to every connection of the engine, this one
    /// included. The frame is built once and shared by every recipient's
    /// queue, never copied per client. Each recipient gets a sender's
    /// broadcasts in the order they were made. Returns the recipients.
    pub fn broadcast(&mut self, body: &[u8]) -> usize {
        let mut b = Vec::with_capacity(8 + body.len());
        b.extend_from_slice(&self.conn.id.raw().to_be_bytes());
        b.extend_from_slice(body);
        let frame = Frame::new(frame::cmd::BROADCAST, &b);
        self.shared.broadcast(frame.into_wire())
    }

    /// Calls [`Handler::on_timer`] with `value` after `after`.
    pub fn set_timer(&mut self, after: Duration, value: u64) -> io::Result<()> {
        self.st.set_timer(self.conn, self.shared, after, value)
    }

    /// Attaches a value to the connection (the seeds' per-handle context).
    pub fn set_data<T: Any + Send>(&mut self, data: T) {
        self.st.user = Some(Box::new(data));
    }

    /// The value attached with [`set_data`](Self::set_data), if it is a `T`.
    pub fn data_mut<T: Any + Send>(&mut self) -> Option<&mut T> {
        self.st.user.as_mut()?.downcast_mut::<T>()
    }

    /// The engine this connection belongs to.
    pub fn engine(&self) -> EngineRef<'_> {
        EngineRef {
            shared: self.shared,
        }
    }
}
