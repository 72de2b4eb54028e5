//! `cport server`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use cport::admin::{Admin, AdminError};
use cport::port::sys;
use cport::server::{Engine, EngineConfig, Protocol, Services, StatsSnapshot};

use super::{BackendArg, init_logging, parse_addr, parse_duration, parse_size};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ProtocolArg {
    /// Length-prefixed frames: ECHO, PING, STATS (the README's "Wire protocol").
    Framed,
    /// Plain echo of whatever bytes arrive (works with nc and generic benchmarks).
    Raw,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum FileSendArg {
    /// Copy small files, splice large ones (zero-copy: see splice).
    Auto,
    /// Always zero-copy; a file truncated while being sent can then
    /// deliver zeros to the client, so only for files replaced by rename.
    Splice,
    /// Always read into memory and send: a truncated file ends its reply
    /// with a close, never with bytes that were not in it.
    Copy,
}

#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// Address to listen on; repeat for several (IPv4 or IPv6, e.g. [::1]:9000).
    #[arg(long = "listen", value_name = "ADDR", value_parser = parse_addr, default_value = "0.0.0.0:9000")]
    listen: Vec<SocketAddr>,
    /// Wire protocol.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Framed)]
    protocol: ProtocolArg,
    /// Worker threads in all, spread evenly over the ports [default: cores].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Completion ports (1: the classic IOCP articles' shared model, all workers on one port;
    /// = workers: one port per worker) [default: one per worker, at most 64].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    ports: Option<u16>,
    /// Completion backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Connection limit; over it new connections get ERROR 5 [default: the
    /// descriptor limit minus a reserve and, with --files, the descriptors
    /// of --max-file-replies; plus the registered-file slots].
    #[arg(long, value_name = "N")]
    max_conns: Option<usize>,
    /// Largest frame body accepted (e.g. 65536, 64KiB, 1MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1MiB")]
    max_frame: u64,
    /// Per-connection send queue limit; over it the connection is not read.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4MiB")]
    max_send_queue: u64,
    /// Size of each pooled receive buffer.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4KiB")]
    recv_buf: u64,
    /// Pooled receive buffers in all, split over the ports (at least 1024 each).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    recv_bufs: u32,
    /// Close connections that send nothing for this long, with ERROR 6 (0: never).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s")]
    idle_timeout: Duration,
    /// A frame begun must be complete within this, plus 1 s per KiB of it
    /// received (a peer sending at 1 KiB/s or faster is never cut); else
    /// ERROR 6 and close (0: never). A byte now and then does not keep a slot.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    frame_timeout: Duration,
    /// BROADCASTs a second one connection may make, after --broadcast-burst;
    /// over it the connection is not read until its budget refills (0: no limit).
    #[arg(long, value_name = "N", default_value_t = cport::server::DEFAULT_BROADCAST_RATE)]
    max_broadcast_rate: u32,
    /// BROADCASTs one connection may make at once before --max-broadcast-rate applies.
    #[arg(long, value_name = "N", default_value_t = cport::server::DEFAULT_BROADCAST_RATE,
          value_parser = clap::value_parser!(u32).range(1..))]
    broadcast_burst: u32,
    /// TCP keepalive idle time (SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT, TCP_USER_TIMEOUT; 0: off).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    keepalive: Duration,
    /// Serve files beneath this directory with the FILE command.
    #[arg(long, value_name = "DIR")]
    files: Option<std::path::PathBuf>,
    /// FILE replies in progress at once over all connections (each holds an
    /// open file, and a pipe while spliced); over it a FILE request waits,
    /// its connection not read, until one ends [default: a quarter of the
    /// descriptor limit's room, at most 1024].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_file_replies: Option<u64>,
    /// How FILE sends: copy (read + send), zero-copy (splice: only for files
    /// never truncated while served), or auto (copy below 1 MiB, else splice).
    #[arg(long, value_enum, default_value_t = FileSendArg::Copy)]
    file_send: FileSendArg,
    /// Hold accepted connections in io_uring's registered-file table (direct
    /// descriptors), so the server holds more connections than its
    /// descriptor limit: up to that limit per port, plus ordinary ones.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    direct_sockets: OnOff,
    /// Cap on bytes queued for sending over all connections.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1GiB")]
    max_queued_total: u64,
    /// On shutdown, how long connections may flush their queues.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s")]
    shutdown_grace: Duration,
    /// How often to log a one-line summary at info, skipped while nothing
    /// happens (0: never; otherwise at least 100ms).
    #[arg(long, value_name = "DUR", value_parser = parse_summary_every, default_value = "5s")]
    summary_every: Duration,
    /// Serve /metrics (Prometheus), /stats (JSON) and a live dashboard at /
    /// on this address, e.g. 127.0.0.1:9100 (off by default; loopback only
    /// unless --admin-public).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    admin: Option<SocketAddr>,
    /// Allow --admin on an address other hosts can reach.
    #[arg(long, requires = "admin")]
    admin_public: bool,
    /// Log level.
    #[arg(long, default_value = "info", value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log: String,
    #[cfg(feature = "cluster")]
    #[command(flatten)]
    cluster: super::cluster::ClusterArgs,
}

pub(crate) fn run(a: ServerArgs) -> anyhow::Result<i32> {
    init_logging(&a.log)?;
    let backend = a.backend.kind()?;
    if a.max_frame > u32::MAX as u64 {
        bail!(
            "--max-frame {} is over the protocol's 4 GiB - 1 limit",
            a.max_frame
        );
    }
    // The default is the per-core model: on this kind of machine it used
    // less CPU at every load measured (docs/DESIGN.md, "Which model").
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = match (a.workers, a.ports) {
        (Some(w), _) => w as usize,
        (None, Some(p)) => cores.max(p as usize),
        (None, None) => cores,
    };
    let ports = a.ports.map_or(workers.min(64), |p| p as usize);
    if workers < ports {
        bail!(
            "--workers {workers} is less than --ports {ports}: every port needs at least one worker"
        );
    }
    if let Some(addr) = a.admin {
        // Before anything starts: a refused address is a bad flag.
        cport::admin::check_addr(addr, a.admin_public).map_err(|e| admin_error(addr, e))?;
    }
    // Memory a burst made the allocator take goes back once the burst is
    // over (see docs/reliability/hostile.md).
    sys::limit_heap_retention();
    let fd_limit = sys::raise_fd_limit().unwrap_or(1024);
    let budget = FdBudget::new(
        fd_limit,
        a.files.is_some(),
        matches!(a.file_send, FileSendArg::Copy),
        a.max_conns,
        a.max_file_replies,
    );
    let mut cfg = EngineConfig {
        workers,
        ports,
        protocol: match a.protocol {
            ProtocolArg::Framed => Protocol::Framed,
            ProtocolArg::Raw => Protocol::Raw,
        },
        max_frame: a.max_frame as u32,
        max_send_queue: a.max_send_queue as usize,
        max_conns: budget.conns,
        max_file_replies: budget.file_replies,
        // A file reply's progress must be visible for its stall check
        // (docs/DESIGN.md): at most 512 KiB unsent in each socket.
        notsent_lowat: a.files.is_some().then_some(512 << 10),
        idle_timeout: (!a.idle_timeout.is_zero()).then_some(a.idle_timeout),
        frame_timeout: (!a.frame_timeout.is_zero()).then_some(a.frame_timeout),
        max_broadcast_rate: a.max_broadcast_rate,
        broadcast_burst: a.broadcast_burst,
        keepalive: (!a.keepalive.is_zero()).then_some(a.keepalive.max(Duration::from_secs(1))),
        max_queued_total: a.max_queued_total as usize,
        file_copy_below: match a.file_send {
            FileSendArg::Auto => cport::server::DEFAULT_FILE_COPY_BELOW,
            FileSendArg::Splice => 0,
            FileSendArg::Copy => usize::MAX,
        },
        ..EngineConfig::default()
    };
    cfg.port.backend = backend;
    cfg.port.recv_buf_size = a.recv_buf.clamp(512, 1 << 20) as u32;
    cfg.port.recv_bufs = (a.recv_bufs / ports as u32).max(1024);
    if a.direct_sockets == OnOff::On {
        cfg.port.direct_files = fd_limit.min(u32::MAX as u64) as u32;
    }
    let services = match &a.files {
        Some(dir) => Services::with_files(dir).with_context(|| {
            format!(
                "cannot serve files from {} (give an existing directory to --files)",
                dir.display()
            )
        })?,
        None => Services::new(),
    };
    #[cfg(feature = "cluster")]
    let cluster = match a.cluster.config(&a.listen, a.max_frame as u32)? {
        Some(c) => Some(Arc::new(
            cport::cluster::Cluster::start(c).context("--cluster")?,
        )),
        None => None,
    };
    #[cfg(feature = "cluster")]
    let services = match &cluster {
        Some(c) => services.with_cluster(c.clone()),
        None => services,
    };
    // The handler goes in before anything listens: a SIGTERM that comes
    // as soon as the first connection is served must shut down cleanly,
    // not kill the process.
    let (tx, rx) = mpsc::channel();
    let mut signals = 0u32;
    ctrlc::set_handler(move || {
        signals += 1;
        if signals > 1 {
            eprintln!("second interrupt: exiting without waiting");
            std::process::exit(130);
        }
        let _ = tx.send(());
    })
    .context("cannot install the signal handler")?;

    let mut engine = Engine::start(cfg.clone(), Arc::new(services))
        .with_context(|| super::start_failure(backend))?;
    let max_conns = match a.max_conns {
        Some(n) => n,
        None => budget.conns + engine.direct_capacity(),
    };
    engine.set_max_conns(max_conns);
    for addr in &a.listen {
        let bound = engine.listen(*addr, 4096).with_context(|| {
            format!(
                "cannot listen on {addr} (is another server using it? pick another with --listen)"
            )
        })?;
        tracing::info!(
            "listening on {bound} ({}, backend {}, {} port(s) x {} worker(s), max {} connections, {} in registered-file slots{})",
            cfg.protocol.name(),
            engine.backend(),
            ports,
            workers,
            max_conns,
            engine.direct_capacity(),
            if a.files.is_some() {
                format!(", max {} file replies in progress", budget.file_replies)
            } else {
                String::new()
            }
        );
    }

    let admin = match a.admin {
        Some(addr) => {
            let admin = Admin::start(addr, a.admin_public, engine.observer())
                .map_err(|e| admin_error(addr, e))?;
            tracing::info!(
                "admin endpoint on http://{}/ (/metrics, /stats)",
                admin.local_addr()
            );
            Some(admin)
        }
        None => None,
    };

    let serve = || {
        let mut last = (Instant::now(), engine.stats());
        if a.summary_every.is_zero() {
            let _ = rx.recv();
            return;
        }
        loop {
            match rx.recv_timeout(a.summary_every) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = (Instant::now(), engine.stats());
                    // A line per interval only while something happens.
                    if changed(&last.1, &now.1) {
                        log_rates(&last, &now);
                    }
                    last = now;
                }
            }
        }
    };
    #[cfg(feature = "cluster")]
    match &cluster {
        // Messages from other nodes are handed to the engine by a thread
        // of their own, which borrows it until the cluster stops.
        Some(c) => {
            c.attach(&engine.observer());
            std::thread::scope(|s| {
                let engine = &engine;
                std::thread::Builder::new()
                    .name("cport-deliver".into())
                    .spawn_scoped(s, move || c.run_delivery(engine.handle()))
                    .context("cannot start the cluster delivery thread")?;
                serve();
                c.stop();
                anyhow::Ok(())
            })?;
        }
        None => serve(),
    }
    #[cfg(not(feature = "cluster"))]
    serve();
    if let Some(admin) = admin {
        admin.stop();
    }
    tracing::info!(
        "shutting down: no new connections; flushing for up to {:?}",
        a.shutdown_grace
    );
    let summary = engine.shutdown(a.shutdown_grace);
    // The server's most important line: printed whatever --log says.
    if tracing::enabled!(tracing::Level::INFO) {
        tracing::info!("final summary: {summary}");
    } else {
        eprintln!("final summary: {summary}");
    }
    if summary.outstanding_ops != 0 || summary.outstanding_bufs != 0 {
        tracing::error!("operations or buffers were still outstanding at exit");
    }
    Ok(0)
}

fn admin_error(addr: SocketAddr, e: AdminError) -> anyhow::Error {
    match e {
        AdminError::NotLoopback(_) => anyhow::anyhow!(
            "--admin {addr}: {e}; use a loopback address such as 127.0.0.1:9100, or add --admin-public to serve it anyway"
        ),
        AdminError::Bind { .. } => {
            anyhow::anyhow!("--admin: {e} (is another program using it? pick another port)")
        }
    }
}

/// How the descriptor limit is shared between connections and FILE
/// replies, so that neither can make the other's `accept` or `open` fail
/// with EMFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FdBudget {
    /// Connections holding an ordinary descriptor (`--max-conns` before
    /// the registered-file slots are added).
    conns: usize,
    /// FILE replies in progress at once (`--max-file-replies`).
    file_replies: usize,
}

impl FdBudget {
    /// A reserve for listeners, the ports and the files directory (64, or
    /// a quarter of a small limit) comes off first. Without `--files`,
    /// connections get the rest. With it, a file reply costs one
    /// descriptor when copied and three when spliced (file and pipe); file
    /// replies get a quarter of the rest, at most 1024 (each copied reply
    /// in flight also holds a buffer of up to 1 MiB), and connections what
    /// remains. An explicit `--max-conns` leaves file replies what it does
    /// not take (at least 16).
    fn new(
        fd_limit: u64,
        files: bool,
        copy: bool,
        max_conns: Option<usize>,
        max_file_replies: Option<u64>,
    ) -> FdBudget {
        let room = fd_limit.saturating_sub(64.min(fd_limit / 4)).max(1);
        let cost = if copy { 1 } else { 3 };
        let file_replies = match (max_file_replies, max_conns, files) {
            (Some(n), _, _) => n,
            (None, _, false) => 1024,
            (None, None, true) => (room / 4 / cost).clamp(1, 1024),
            (None, Some(c), true) => (room.saturating_sub(c as u64) / cost).clamp(16, 1024),
        };
        let conns = match max_conns {
            Some(c) => c as u64,
            None if files => room.saturating_sub(file_replies * cost).max(1),
            None => room,
        };
        FdBudget {
            conns: conns as usize,
            file_replies: file_replies as usize,
        }
    }
}

/// The shortest `--summary-every` other than 0 (off): shorter would spend
/// the server's time writing its log.
const SUMMARY_EVERY_MIN: Duration = Duration::from_millis(100);

fn parse_summary_every(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !d.is_zero() && d < SUMMARY_EVERY_MIN {
        return Err(format!(
            "{d:?} is too short: use 0 to turn the summary line off, or at least 100ms"
        ));
    }
    Ok(d)
}

/// Whether anything happened between two snapshots: traffic, connections
/// opened or closed, errors.
fn changed(a: &StatsSnapshot, b: &StatsSnapshot) -> bool {
    a.frames_in != b.frames_in
        || a.frames_out != b.frames_out
        || a.bytes_in != b.bytes_in
        || a.bytes_out != b.bytes_out
        || a.connections_open != b.connections_open
        || a.connections_accepted != b.connections_accepted
        || a.closed != b.closed
        || a.errors != b.errors
        || a.worker_stalls != b.worker_stalls
}

fn log_rates(a: &(Instant, StatsSnapshot), b: &(Instant, StatsSnapshot)) {
    let dt = b.0.duration_since(a.0).as_secs_f64().max(1e-3);
    let rate = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / dt;
    let cpu = match (a.1.cpu_s, b.1.cpu_s) {
        (Some(x), Some(y)) => format!("{:.1}%", (y - x) / dt * 100.0),
        _ => "n/a".into(),
    };
    tracing::info!(
        "connections={} accepted={} msgs/s={:.0} in={:.2}MB/s out={:.2}MB/s cpu={} rss={:.1}MiB",
        b.1.connections_open,
        b.1.connections_accepted,
        rate(a.1.frames_in, b.1.frames_in),
        rate(a.1.bytes_in, b.1.bytes_in) / 1e6,
        rate(a.1.bytes_out, b.1.bytes_out) / 1e6,
        cpu,
        b.1.rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64,
    );
    if let Some(c) = &b.1.cluster {
        let p = a.1.cluster.as_ref().map_or(0, |x| x.published);
        let r = a.1.cluster.as_ref().map_or(0, |x| x.received);
        let dropped: u64 = c.dropped.values().sum();
        tracing::info!(
            "cluster: {}{} node={} published/s={:.0} received/s={:.0} dropped={} queue_out={} queue_in={} nodes={}",
            c.state,
            c.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            c.node_name,
            rate(p, c.published),
            rate(r, c.received),
            dropped,
            c.queue_out,
            c.queue_in,
            c.nodes.len(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::FdBudget;

    #[test]
    fn file_replies_and_connections_share_the_descriptor_limit() {
        // Without --files, connections take all but the reserve.
        let b = FdBudget::new(1024, false, true, None, None);
        assert_eq!(b.conns, 960);
        // Copy: a reply costs a descriptor; a quarter of the room.
        let b = FdBudget::new(1024, true, true, None, None);
        assert_eq!((b.conns, b.file_replies), (720, 240));
        // Splice: three descriptors a reply.
        let b = FdBudget::new(1024, true, false, None, None);
        assert_eq!((b.conns, b.file_replies), (720, 80));
        // At most 1024 replies at a large limit.
        let b = FdBudget::new(20_000, true, true, None, None);
        assert_eq!((b.conns, b.file_replies), (19_936 - 1024, 1024));
        for limit in [64, 256, 1024, 4096, 20_000, 1 << 20] {
            for copy in [true, false] {
                let b = FdBudget::new(limit, true, copy, None, None);
                let cost = if copy { 1 } else { 3 };
                assert!(
                    b.conns as u64 + b.file_replies as u64 * cost <= limit,
                    "{limit} {copy}: {b:?}"
                );
                assert!(b.conns >= 1 && b.file_replies >= 1, "{b:?}");
            }
        }
        // Explicit values are kept.
        let b = FdBudget::new(1024, true, true, Some(100), None);
        assert_eq!((b.conns, b.file_replies), (100, 860));
        let b = FdBudget::new(1024, true, true, None, Some(7));
        assert_eq!((b.conns, b.file_replies), (953, 7));
    }
}
