//! A real network path for fault tests: two network namespaces joined by a
//! veth pair, a rate limit (`tbf`) on one end, a link that can be taken
//! down, and a fault-injecting TCP proxy (the toxiproxy idea: latency,
//! stalls, byte-at-a-time delivery, mid-stream resets).
//!
//! Layout of a [`NetPair`] (names carry `rf<pid>` so that concurrent runs and
//! other test suites never collide):
//!
//! ```text
//!   namespace rf<pid>c<n>  (client)          namespace rf<pid>s<n>  (server)
//!   veth rf<pid>c<n> 10.77.0.1/24  <------>  veth rf<pid>s<n> 10.77.0.2/24
//!   lo (the proxy listens here)              lo (the test's STATS connection)
//! ```
//!
//! The server runs inside the server namespace (its process enters it
//! before exec). The test reaches it two ways: over the veth from the client
//! namespace (the path faults are injected on) and over the server
//! namespace's own loopback (a control path no fault touches, for STATS).
//! Sockets are created by a short-lived thread that entered the namespace
//! ([`NetPair::in_client`]); a socket stays in the namespace it was created
//! in, so the stream can then be used from any thread.
//!
//! Everything is removed on drop, also when the test panics; namespaces
//! left behind by a killed run (its pid gone) are removed by the next one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::util::*;

/// Address of the server end of the veth.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip` with `args`; returns stderr as the error.
fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why this machine cannot run namespace tests, if it cannot (not root, no
/// `ip`/`tc`). Tests print it and return instead of passing silently.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network-namespace tests need root".into());
    }
    for prog in ["ip", "tc"] {
        if Command::new(prog)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Some(format!("network-namespace tests need `{prog}` (iproute2)"));
        }
    }
    None
}

/// Removes `rf<pid>...` namespaces whose creating process is gone (a run
/// that was killed before its guards ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("rf") else {
            continue;
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let tail = &rest[digits.len()..];
        let ours = !digits.is_empty()
            && (tail.starts_with('s') || tail.starts_with('c'))
            && tail[1..].chars().all(|c| c.is_ascii_digit())
            && tail.len() > 1;
        if ours && !std::path::Path::new(&format!("/proc/{digits}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Two namespaces joined by a veth pair; removed on drop.
pub struct NetPair {
    /// Server namespace (and the name of its veth end).
    pub server_ns: String,
    /// Client namespace (and the name of its veth end).
    pub client_ns: String,
}

impl NetPair {
    /// Sets up the pair, or returns why it cannot (the caller skips).
    pub fn new() -> Result<NetPair, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let pair = NetPair {
            server_ns: format!("rf{pid}s{n}"),
            client_ns: format!("rf{pid}c{n}"),
        };
        // From here on, `pair`'s drop removes whatever was created.
        let (s, c) = (pair.server_ns.as_str(), pair.client_ns.as_str());
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", c])?;
        ip(&[
            "link", "add", s, "netns", s, "type", "veth", "peer", "name", c, "netns", c,
        ])?;
        ip(&["-n", s, "addr", "add", "10.77.0.2/24", "dev", s])?;
        ip(&["-n", c, "addr", "add", "10.77.0.1/24", "dev", c])?;
        for ns in [s, c] {
            ip(&["-n", ns, "link", "set", ns, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Like [`new`](Self::new), but prints why and returns `None` when the
    /// machine cannot run the test.
    pub fn or_skip(test: &str) -> Option<NetPair> {
        match NetPair::new() {
            Ok(p) => Some(p),
            Err(why) => {
                eprintln!("[it] SKIPPED {test}: {why}");
                None
            }
        }
    }

    /// Starts `cport server <args>` inside the server namespace, listening
    /// on `0.0.0.0:0` (reachable over the veth and over the namespace's
    /// loopback).
    pub fn start_server(&self, args: &[&str]) -> Server {
        let mut full = vec!["--listen", "0.0.0.0:0"];
        full.extend_from_slice(args);
        let path = std::ffi::CString::new(format!("/run/netns/{}", self.server_ns)).unwrap();
        Server::start_with(&full, true, move |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: open(2), setns(2) and close(2) are async-signal-safe,
            // and `path` was allocated before the fork (the closure owns it).
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let rc = libc::setns(fd, libc::CLONE_NEWNET);
                    let err = io::Error::last_os_error();
                    libc::close(fd);
                    if rc != 0 {
                        return Err(err);
                    }
                    Ok(())
                });
            }
        })
    }

    /// Runs `f` on a thread that entered the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_ns(&self.client_ns, f)
    }

    /// Runs `f` on a thread that entered the server namespace.
    pub fn in_server<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_ns(&self.server_ns, f)
    }

    /// Connects from the client namespace to `port` on the server, over the veth.
    pub fn connect_over_veth(&self, port: u16) -> TcpStream {
        let addr = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, port));
        self.in_client(|| connect(addr))
    }

    /// Connects inside the server namespace over its loopback: a control
    /// path that no fault on the veth touches.
    pub fn connect_control(&self, port: u16) -> TcpStream {
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        self.in_server(|| connect(addr))
    }

    /// Takes the client's end of the veth down: from the server's side the
    /// peer vanishes — no FIN, no RST, nothing comes back.
    pub fn client_link_down(&self) {
        ip(&[
            "-n",
            &self.client_ns,
            "link",
            "set",
            &self.client_ns,
            "down",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Limits what the server sends over the veth to `rate` (a tc rate, e.g.
    /// `32mbit`) with a token-bucket filter.
    pub fn limit_server_egress(&self, rate: &str) {
        run(
            "tc",
            &[
                "-n",
                &self.server_ns,
                "qdisc",
                "add",
                "dev",
                &self.server_ns,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kb",
                "latency",
                "200ms",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end in it (and so its peer).
        for ns in [&self.server_ns, &self.client_ns] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("[it] cleanup: {e}");
            }
        }
    }
}

/// Runs `f` on a new thread that first entered network namespace `ns`.
/// Only that thread changes namespace; it ends when `f` returns.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open namespace {ns}: {e}"));
    thread::scope(|sc| {
        sc.spawn(move || {
            // SAFETY: setns(2) with a namespace descriptor we own; it moves
            // only this thread, which is ours and ends after `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({ns}): {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Polls STATS on `ctl` until `cond` holds or `limit` passes; returns the
/// last STATS and the time it took, or panics.
pub fn wait_stats_for(
    ctl: &mut TcpStream,
    limit: Duration,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    loop {
        let v = stats(ctl);
        if cond(&v) {
            return (v, start.elapsed());
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}; last STATS: {v}");
        }
        thread::sleep(POLL_STEP);
    }
}

/// `closed.<reason>` of a STATS reply.
pub fn closed_by(v: &serde_json::Value, reason: &str) -> u64 {
    v["closed"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("STATS has no closed.{reason}: {v}"))
}

/// Sum of every `closed.*` of a STATS reply.
pub fn closed_total(v: &serde_json::Value) -> u64 {
    v["closed"]
        .as_object()
        .unwrap_or_else(|| panic!("STATS has no `closed` object: {v}"))
        .values()
        .map(|x| x.as_u64().unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------------------
// The fault-injecting proxy
// ---------------------------------------------------------------------------

/// What the proxy does to the bytes it forwards (each direction alike,
/// except `reset_after`, which counts client → server bytes).
#[derive(Debug, Clone, Default)]
pub struct Toxics {
    /// Every chunk is delivered this long after it was read.
    pub latency: Duration,
    /// After every `stall_every` bytes forwarded, pause for `stall_for`.
    pub stall_every: usize,
    /// Length of a stall.
    pub stall_for: Duration,
    /// Write at most this many bytes at a time (1: byte-at-a-time; 0: as read).
    pub slice: usize,
    /// Pause between two slices.
    pub slice_gap: Duration,
    /// Reset both sides (RST) after this many client → server bytes.
    pub reset_after: Option<u64>,
}

/// Counters of a proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub conns: AtomicU64,
    /// Writes made towards the server and towards the client.
    pub writes: AtomicU64,
    /// Bytes forwarded, both directions.
    pub bytes: AtomicU64,
    /// Connections reset by `reset_after`.
    pub resets: AtomicU64,
    /// Stalls made.
    pub stalls: AtomicU64,
}

/// A TCP proxy listening in the client namespace and forwarding to the
/// server over the veth, with [`Toxics`] applied. Stops on drop.
pub struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Counters.
    pub stats: Arc<ProxyStats>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy in `net`'s client namespace towards `server_port`.
    pub fn start(net: &NetPair, server_port: u16, toxics: Toxics) -> Proxy {
        let listener = net.in_client(|| TcpListener::bind("127.0.0.1:0").expect("proxy bind"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ProxyStats::default());
        let threads = Arc::new(Mutex::new(Vec::new()));
        let client_ns = net.client_ns.clone();
        let upstream = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, server_port));
        let acceptor = {
            let (stop, stats, threads) = (stop.clone(), stats.clone(), threads.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let down = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(e) => panic!("proxy accept: {e}"),
                    };
                    down.set_nonblocking(false).unwrap();
                    let up = in_ns(&client_ns, || {
                        TcpStream::connect_timeout(&upstream, IO_TIMEOUT)
                    });
                    let up = match up {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("[proxy] upstream connect failed: {e}");
                            continue;
                        }
                    };
                    for s in [&down, &up] {
                        s.set_nodelay(true).unwrap();
                        // Readers wake up to see `stop`; a writer gives up
                        // on a peer that reads nothing for 5 s.
                        s.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                    }
                    stats.conns.fetch_add(1, Ordering::Relaxed);
                    let link = Arc::new(Link {
                        down: down.try_clone().unwrap(),
                        up: up.try_clone().unwrap(),
                        sent_up: AtomicU64::new(0),
                        reset: AtomicBool::new(false),
                    });
                    let mut t = threads.lock().unwrap();
                    for (from, to, upward) in [
                        (down.try_clone().unwrap(), up.try_clone().unwrap(), true),
                        (up, down, false),
                    ] {
                        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
                        let tox = toxics.clone();
                        let link2 = link.clone();
                        let stats2 = stats.clone();
                        let stop2 = stop.clone();
                        t.push(thread::spawn(move || {
                            reader(from, tx, &tox, upward, &link2, &stats2, &stop2)
                        }));
                        let tox = toxics.clone();
                        let stats2 = stats.clone();
                        t.push(thread::spawn(move || writer(to, rx, &tox, &stats2)));
                    }
                }
            })
        };
        Proxy {
            addr,
            stop,
            stats,
            threads,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect (in the client namespace's loopback).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// The two sockets of one proxied connection.
struct Link {
    down: TcpStream,
    up: TcpStream,
    sent_up: AtomicU64,
    reset: AtomicBool,
}

impl Link {
    /// Aborts both sides: with SO_LINGER 0 the final close sends RST;
    /// SHUT_RD wakes the threads blocked reading, which then drop their
    /// handles (the last one closes the socket).
    fn reset(&self) {
        if self.reset.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in [&self.down, &self.up] {
            set_linger_zero(s);
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

fn reader(
    mut from: TcpStream,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    tox: &Toxics,
    upward: bool,
    link: &Link,
    stats: &ProxyStats,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(_) => break,
        };
        let mut n = n;
        let mut reset_now = false;
        if upward && let Some(limit) = tox.reset_after {
            let before = link.sent_up.fetch_add(n as u64, Ordering::SeqCst);
            if before + n as u64 >= limit {
                n = limit.saturating_sub(before) as usize;
                reset_now = true;
            }
        }
        if n > 0
            && tx
                .send((Instant::now() + tox.latency, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
        if reset_now {
            // Let the writer deliver the bytes before the limit first.
            drop(tx);
            thread::sleep(tox.latency + Duration::from_millis(50));
            stats.resets.fetch_add(1, Ordering::Relaxed);
            link.reset();
            return;
        }
    }
    if link.reset.load(Ordering::SeqCst) {
        return; // no FIN after a reset
    }
    // EOF: pass the half-close on once everything before it is written.
    let _ = tx.send((Instant::now() + tox.latency, Vec::new()));
}

fn writer(
    mut to: TcpStream,
    rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    tox: &Toxics,
    stats: &ProxyStats,
) {
    let mut since_stall = 0usize;
    while let Ok((due, data)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if data.is_empty() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let slice = if tox.slice == 0 {
            data.len()
        } else {
            tox.slice
        };
        for piece in data.chunks(slice) {
            if tox.stall_every > 0 && since_stall >= tox.stall_every {
                since_stall = 0;
                stats.stalls.fetch_add(1, Ordering::Relaxed);
                thread::sleep(tox.stall_for);
            }
            if to.write_all(piece).is_err() {
                return;
            }
            since_stall += piece.len();
            stats.writes.fetch_add(1, Ordering::Relaxed);
            stats.bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
            if !tox.slice_gap.is_zero() {
                thread::sleep(tox.slice_gap);
            }
        }
    }
}
