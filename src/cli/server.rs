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
    /// Length-prefixed frames: ECHO, PING, STATS (SPEC section 3).
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
    /// Copy small files, splice large ones.
    Auto,
    /// Always zero-copy.
    Splice,
    /// Always read into memory and send.
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
    /// Completion ports (1: the seeds' shared model, all workers on one port;
    /// = workers: one port per worker) [default: one per worker, at most 64].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    ports: Option<u16>,
    /// Completion backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Connection limit; over it new connections get ERROR 5 [default: descriptor limit minus 64].
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
    /// TCP keepalive idle time (SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT, TCP_USER_TIMEOUT; 0: off).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    keepalive: Duration,
    /// Serve files beneath this directory with the FILE command.
    #[arg(long, value_name = "DIR")]
    files: Option<std::path::PathBuf>,
    /// How FILE sends: zero-copy (splice), copy (read + send), or auto (copy below 1 MiB).
    #[arg(long, value_enum, default_value_t = FileSendArg::Auto)]
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
    let mut cfg = EngineConfig {
        workers,
        ports,
        protocol: match a.protocol {
            ProtocolArg::Framed => Protocol::Framed,
            ProtocolArg::Raw => Protocol::Raw,
        },
        max_frame: a.max_frame as u32,
        max_send_queue: a.max_send_queue as usize,
        max_conns: a.max_conns.unwrap_or(default_max_conns(fd_limit)),
        idle_timeout: (!a.idle_timeout.is_zero()).then_some(a.idle_timeout),
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
        None => default_max_conns(fd_limit) + engine.direct_capacity(),
    };
    engine.set_max_conns(max_conns);
    for addr in &a.listen {
        let bound = engine.listen(*addr, 4096).with_context(|| {
            format!(
                "cannot listen on {addr} (is another server using it? pick another with --listen)"
            )
        })?;
        tracing::info!(
            "listening on {bound} ({}, backend {}, {} port(s) x {} worker(s), max {} connections, {} in registered-file slots)",
            cfg.protocol.name(),
            engine.backend(),
            ports,
            workers,
            max_conns,
            engine.direct_capacity()
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

    let mut last = (Instant::now(), engine.stats());
    if a.summary_every.is_zero() {
        let _ = rx.recv();
    } else {
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
    }
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

/// What the descriptor limit allows, minus a reserve for listeners, the
/// ports and files (64, or a quarter of a small limit).
fn default_max_conns(fd_limit: u64) -> usize {
    fd_limit.saturating_sub(64.min(fd_limit / 4)).max(1) as usize
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
}
