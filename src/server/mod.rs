//! Servers: connections on completion ports, handlers, and the built-in
//! services.
//!
//! [`Engine`] is the machinery (ports, workers, connection tables, send
//! queues, shutdown); [`Handler`] is what a service implements;
//! [`Services`] is cport's own service (ECHO, PING, STATS; raw echo).

mod conn;
mod engine;
mod handler;
mod services;
mod stats;
mod watch;

use std::fmt;
use std::time::Duration;

pub use engine::{
    DEFAULT_BROADCAST_RATE, DEFAULT_FILE_COPY_BELOW, DEFAULT_FRAME_MIN_RATE, DEFAULT_FRAME_TIMEOUT,
    Engine, EngineConfig, EngineRef, MAX_NODE, MAX_POST_VALUE, Protocol,
};
pub use handler::{CloseInfo, Ctx, Handler, MAX_TIMER_VALUE};
pub use services::Services;
pub use stats::{
    COMMANDS, CloseReason, ClusterNode, ClusterSnapshot, ClusterSource, CommandCounts, ERROR_KINDS,
    EVENT_LOG_LEN, Event, LatencyBucket, LatencySnapshot, Observer, Stats, StatsSnapshot,
};
pub use watch::DEFAULT_STALL_THRESHOLD;

/// Identity of a connection: its port, its slot in that port's table, and
/// the slot's generation, so an id never names a later connection that
/// reused the slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub(crate) u64);

impl ConnId {
    /// The raw value (also the completion key of the connection's operations).
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}.{}",
            self.port(),
            self.0 & 0xFFFF_FFFF,
            (self.0 >> 32) & 0xFF_FFFF
        )
    }
}

/// What an engine did over its life, given by [`Engine::shutdown`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Connections accepted.
    pub connections_served: u64,
    /// Outgoing connections made.
    pub connections_connected: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Operations still in flight when the workers stopped (must be 0).
    pub outstanding_ops: u64,
    /// Pooled buffers still lent out when the workers stopped (must be 0).
    pub outstanding_bufs: u64,
    /// Connections still in the tables when the workers stopped (must be 0).
    pub connections_left: u64,
    /// Times a worker stayed away from its port for longer than the stall
    /// threshold (should be 0).
    pub worker_stalls: u64,
    /// How long the engine ran.
    pub uptime: Duration,
    /// Name of the backend the ports ran on ("uring", "poll", "iocp").
    pub backend: String,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections_served={} connections_connected={} bytes_in={} bytes_out={} frames_in={} frames_out={} outstanding_ops={} outstanding_bufs={} connections_left={} worker_stalls={} uptime_s={:.1} backend={}",
            self.connections_served,
            self.connections_connected,
            self.bytes_in,
            self.bytes_out,
            self.frames_in,
            self.frames_out,
            self.outstanding_ops,
            self.outstanding_bufs,
            self.connections_left,
            self.worker_stalls,
            self.uptime.as_secs_f64(),
            self.backend
        )
    }
}
