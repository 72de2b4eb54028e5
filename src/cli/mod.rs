//! Command line: flags in, a configuration out, a library call; no logic
//! the library should own.

mod bench;
mod client;
#[cfg(feature = "cluster")]
mod cluster;
mod server;
mod stress;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use cport::port::BackendKind;

/// cport: a completion-port network server and toolkit.
#[derive(Debug, Parser)]
#[command(name = "cport", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (framed protocol: echo, ping, stats; or raw echo).
    Server(Box<server::ServerArgs>),
    /// Run the ordinary client: interactive, line mode, or N messages every T.
    Client(client::ClientArgs),
    /// Load a server with thousands of connections and report what it did.
    Stress(stress::StressArgs),
    /// Compare cport with tokio, thread-per-connection and io_uring servers
    /// under the same loads, side by side.
    Bench(bench::BenchArgs),
    /// One worker process of `cport stress` (started by it, not by hand).
    #[command(hide = true)]
    StressWorker(stress::WorkerArgs),
}

/// Runs the command line; returns the process exit code.
pub(crate) fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints "error: ..." plus usage and uses exit code 2 for
            // bad input, 0 for --help/--version.
            let _ = e.print();
            return e.exit_code();
        }
    };
    let result = match cli.command {
        Command::Server(a) => server::run(*a),
        Command::Client(a) => client::run(a),
        Command::Stress(a) => stress::run_stress(a),
        Command::Bench(a) => bench::run(a),
        Command::StressWorker(a) => stress::run_stress_worker(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

/// `--backend`, shared by the subcommands that run completion ports.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum BackendArg {
    /// io_uring if this machine allows it, else poll (the choice is
    /// logged); IOCP on Windows.
    Auto,
    /// Linux io_uring (an error if it is unavailable).
    Uring,
    /// epoll readiness turned into completions (works where io_uring is blocked).
    Poll,
    /// Windows I/O completion ports.
    Iocp,
}

impl BackendArg {
    /// The library's backend for this flag value, or why it cannot run here.
    pub(crate) fn kind(self) -> anyhow::Result<BackendKind> {
        match self {
            BackendArg::Auto => Ok(BackendKind::Auto),
            BackendArg::Uring | BackendArg::Poll if cfg!(windows) => anyhow::bail!(
                "backends 'uring' and 'poll' are Linux backends and do not run on Windows (use --backend auto or iocp)"
            ),
            BackendArg::Uring => Ok(BackendKind::Uring),
            BackendArg::Poll => Ok(BackendKind::Poll),
            BackendArg::Iocp if cfg!(windows) => Ok(BackendKind::Iocp),
            BackendArg::Iocp => anyhow::bail!(
                "backend 'iocp' is the Windows backend and does not run on Linux (use --backend auto, uring or poll)"
            ),
        }
    }
}

/// Context for a failure to start the completion ports.
pub(crate) fn start_failure(backend: BackendKind) -> String {
    match backend {
        BackendKind::Uring => {
            "cannot start the completion ports on io_uring (it may be blocked by a \
             seccomp profile or kernel.io_uring_disabled; --backend auto falls back to poll)"
                .to_string()
        }
        b => format!("cannot start the completion ports (backend {b})"),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    cport::units::parse_duration(s)
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    cport::units::parse_size(s)
}

/// An address as `IP:PORT` or `host:port` (resolved once, first result).
pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{s}': {e} (write IP:PORT, e.g. 127.0.0.1:9000)"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// Sets up logging to stderr at `level` (RUST_LOG, if set, wins).
pub(crate) fn init_logging(level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::try_new(format!("cport={level}")).map_err(|_| {
            anyhow::anyhow!("bad --log level '{level}' (use error, warn, info, debug or trace)")
        })?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}
