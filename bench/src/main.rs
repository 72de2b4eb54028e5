//! `cport-peer`: one raw echo server, chosen by argument, for `cport bench`
//! to compare cport against. Each is written the way a user of that
//! runtime would write an echo server, and given that runtime's best
//! settings for this kind of machine, so the comparison is fair:
//!
//! - `tokio-mt`: tokio's multi-thread runtime, N workers, a task per
//!   connection.
//! - `tokio-ct`: tokio's current-thread runtime, a task per connection.
//! - `threads`: std blocking sockets, a thread per connection.
//! - `monoio`: monoio (io_uring), one runtime per thread, a listener per
//!   thread with SO_REUSEPORT, ring flags chosen with `--ring`.
//! - `uring`: a hand-written io_uring loop per thread: multishot accept,
//!   multishot recv from a provided-buffer ring, send straight from the
//!   received buffer, SINGLE_ISSUER + DEFER_TASKRUN. The reference for
//!   what io_uring can do with nothing in the way.
//!
//! Every server echoes bytes as they come (no framing), sets TCP_NODELAY on
//! accepted connections, and raises its descriptor limit to the hard limit.
//! It prints `listening on ADDR` once it accepts; it runs until killed.

mod monoio_echo;
mod threads;
mod tokio_echo;
mod uring;

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, ValueEnum};

/// One raw echo server for `cport bench`.
#[derive(Debug, Parser)]
#[command(name = "cport-peer", version, about)]
struct Args {
    /// Which server to run.
    #[arg(value_enum)]
    server: Server,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9300")]
    listen: SocketAddr,
    /// Worker threads (tokio-mt workers; monoio and uring: one ring and
    /// listener per thread). Ignored by tokio-ct and threads [default: cores].
    #[arg(long)]
    workers: Option<usize>,
    /// io_uring setup flags for monoio and uring: none (the kernel's
    /// defaults), coop (COOP_TASKRUN + TASKRUN_FLAG), or defer
    /// (SINGLE_ISSUER + DEFER_TASKRUN).
    #[arg(long, value_enum)]
    ring: Option<Ring>,
    /// Receive buffer per read (tokio, threads, monoio) and size of each
    /// provided buffer (uring).
    #[arg(long, default_value_t = 4096)]
    buf: usize,
    /// Provided buffers in the ring of each uring thread (a power of two,
    /// at most 32768).
    #[arg(long, default_value_t = 4096)]
    ring_bufs: u16,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Server {
    /// tokio multi-thread runtime.
    TokioMt,
    /// tokio current-thread runtime.
    TokioCt,
    /// A thread per connection, std blocking sockets.
    Threads,
    /// monoio on io_uring, thread per core.
    Monoio,
    /// Hand-written io_uring loop, thread per core.
    Uring,
}

/// io_uring setup flags.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Ring {
    /// No setup flags.
    None,
    /// IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG.
    Coop,
    /// IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN.
    Defer,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("cport-peer: error: {e:#}");
        std::process::exit(2);
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    raise_fd_limit();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = a.workers.unwrap_or(cores).max(1);
    let buf = a.buf.clamp(64, 1 << 20);
    match a.server {
        Server::TokioMt => tokio_echo::run(a.listen, Some(workers), buf),
        Server::TokioCt => tokio_echo::run(a.listen, None, buf),
        Server::Threads => threads::run(a.listen, buf),
        // monoio measured best with DEFER_TASKRUN on this kind of machine
        // (see the README's bench section); uring is the reference and
        // always gets the best flags.
        Server::Monoio => monoio_echo::run(a.listen, workers, a.ring.unwrap_or(Ring::Defer), buf),
        Server::Uring => uring::run(
            a.listen,
            workers,
            a.ring.unwrap_or(Ring::Defer),
            buf as u32,
            a.ring_bufs,
        ),
    }
    .with_context(|| format!("{:?} on {}", a.server, a.listen))
}

/// Raises the soft descriptor limit to the hard one: the bench holds
/// 10,000 idle connections against each server.
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A listening socket with SO_REUSEADDR, and SO_REUSEPORT when several
/// threads each bind their own on the same address.
pub(crate) fn listener(
    addr: SocketAddr,
    reuse_port: bool,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Tells the bench (and a person) that the server accepts now.
pub(crate) fn announce(addr: SocketAddr, what: &str) {
    println!("listening on {addr} ({what})");
}
