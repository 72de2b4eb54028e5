//! Counters of an engine: connections, frames, bytes, close reasons.
//! Updated with relaxed atomics from every worker; read as a [`StatsSnapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CloseReason {
    /// The peer closed its side (EOF).
    PeerClosed,
    /// The peer reset the connection or vanished (ECONNRESET, EPIPE,
    /// ETIMEDOUT, and EHOSTUNREACH/ENETUNREACH/ENETDOWN, which is how TCP
    /// reports giving up on a peer whose link died; ERROR_NETNAME_DELETED
    /// on Windows).
    Reset,
    /// A declared frame length was over the limit.
    FrameTooLarge,
    /// The connection limit was reached.
    Busy,
    /// The handler closed it.
    Local,
    /// The server is shutting down.
    Shutdown,
    /// A client connect failed.
    ConnectFailed,
    /// Nothing arrived for the idle timeout.
    IdleTimeout,
    /// A broadcast recipient fell too far behind.
    SlowConsumer,
    /// Any other I/O error.
    Error,
}

impl CloseReason {
    /// Every reason, in a fixed order.
    pub const ALL: [CloseReason; 10] = [
        CloseReason::PeerClosed,
        CloseReason::Reset,
        CloseReason::FrameTooLarge,
        CloseReason::Busy,
        CloseReason::Local,
        CloseReason::Shutdown,
        CloseReason::ConnectFailed,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Error,
    ];

    /// snake_case name, as used in stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Reset => "reset",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::Busy => "busy",
            CloseReason::Local => "local",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Classifies an I/O error that ended a connection.
    pub fn from_error(e: &std::io::Error) -> CloseReason {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut | UnexpectedEof
            | NotConnected | HostUnreachable | NetworkUnreachable | NetworkDown => {
                CloseReason::Reset
            }
            _ => CloseReason::Error,
        }
    }
}

/// Live counters.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    connected: AtomicU64,
    open: AtomicU64,
    closed: [AtomicU64; 10],
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors_sent: AtomicU64,
    unknown_cmds: AtomicU64,
    accept_errors: AtomicU64,
    late_completions: AtomicU64,
}

/// A consistent-enough copy of the counters, plus engine facts.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StatsSnapshot {
    /// Backend running the ports.
    pub backend: String,
    /// Protocol served.
    pub protocol: String,
    /// Completion ports.
    pub ports: usize,
    /// Worker threads in all.
    pub workers: usize,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Outgoing connections made since start (clients).
    pub connections_connected: u64,
    /// Closed connections by reason.
    pub closed: BTreeMap<String, u64>,
    /// Frames received.
    pub frames_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// ERROR frames sent.
    pub errors_sent: u64,
    /// Frames with an unknown command.
    pub unknown_commands: u64,
    /// Failed accepts (other than cancellation).
    pub accept_errors: u64,
    /// Completions that arrived for a connection already gone (dropped).
    pub late_completions: u64,
    /// Operations in flight in all ports.
    pub outstanding_ops: u64,
    /// Pooled receive buffers lent out in all ports.
    pub bufs_leased: u64,
    /// Completions the kernel dropped for a full completion queue, in all
    /// ports (io_uring's `cq_overflow`; must stay 0).
    pub cq_overflow: u64,
    /// Reaps that found a completion queue full (the rest waited in the
    /// kernel's overflow list, not lost).
    pub cq_full: u64,
    /// Submissions that found a submission queue full.
    pub sq_full: u64,
    /// Seconds since the engine started.
    pub uptime_s: f64,
    /// Process CPU time in seconds, when readable.
    pub cpu_s: Option<f64>,
    /// Process resident memory in bytes, when readable.
    pub rss_bytes: Option<u64>,
}

impl Stats {
    pub(crate) fn opened(&self, accepted: bool) {
        if accepted {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, reason: CloseReason, was_open: bool) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
        if was_open {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn frame_in(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        let _ = bytes;
    }

    pub(crate) fn frame_out(&self, _cmd: u32) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn error_sent(&self, code: u32) {
        self.errors_sent.fetch_add(1, Ordering::Relaxed);
        if code == crate::frame::code::UNKNOWN_COMMAND {
            self.unknown_cmds.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn late(&self) {
        self.late_completions.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) fn fill(&self, s: &mut StatsSnapshot) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.connections_open = l(&self.open);
        s.connections_accepted = l(&self.accepted);
        s.connections_connected = l(&self.connected);
        s.closed = CloseReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), l(&self.closed[r.index()])))
            .collect();
        s.frames_in = l(&self.frames_in);
        s.frames_out = l(&self.frames_out);
        s.bytes_in = l(&self.bytes_in);
        s.bytes_out = l(&self.bytes_out);
        s.errors_sent = l(&self.errors_sent);
        s.unknown_commands = l(&self.unknown_cmds);
        s.accept_errors = l(&self.accept_errors);
        s.late_completions = l(&self.late_completions);
    }
}

// Linux errno values; the Windows codes are mapped by the IOCP backend.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::CloseReason;
    use std::io::Error;

    /// A peer whose link died ends with EHOSTUNREACH (TCP's soft error when
    /// neighbour discovery fails) as often as with ETIMEDOUT: both are a
    /// vanished peer, not a server error (found by the fault tests).
    #[test]
    fn a_vanished_peer_is_a_reset() {
        for errno in [
            libc::ECONNRESET,
            libc::EPIPE,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ENETDOWN,
        ] {
            assert_eq!(
                CloseReason::from_error(&Error::from_raw_os_error(errno)),
                CloseReason::Reset,
                "errno {errno}"
            );
        }
        assert_eq!(
            CloseReason::from_error(&Error::from_raw_os_error(libc::EINVAL)),
            CloseReason::Error
        );
    }
}
