//! Hostile clients at scale, each with the server's RSS
//! and CPU bounded by a number the test asserts (read from /proc/PID of the
//! server process):
//!
//! - length bombs: connections declaring a 4 GiB frame and then sending a
//!   byte a second are refused with ERROR 1 and closed; as many declaring
//!   exactly `--max-frame` (allowed) and trickling their body stay open
//!   without the server allocating the declared size;
//! - slowloris: a crowd of connections that send a partial header and then
//!   a byte every 3 s, beside 200 honest pingpong clients whose p99 is
//!   measured with and without the crowd (alternating phases, medians);
//! - a flood of connection attempts against `--max-conns` (ERROR 5 each;
//!   the connections held are still served; no CPU spin at the limit);
//! - broadcast to 100 recipients that never read (each is dropped with
//!   ERROR 7; memory stays bounded because the buffer is shared; the
//!   readers get everything).
//!
//! The attackers run in child processes of this test binary (the ignored
//! test `hostile::attacker`, configured through `HOSTILE_*` variables), so
//! their descriptors do not count against this process's 20,000 (the
//! integration tests share one process) and a flood can be spread over
//! several processes and source addresses (127.0.0.2, ...).
//!
//! Scale: `CPORT_HOSTILE_FULL=1` runs the numbers (2,000 bombs,
//! 5,000 slowloris, 21,000 flood attempts); without it the tests use a
//! quarter to a fifth of them so that `cargo test` stays quick. The tests of
//! this module run one at a time (a module lock), so that their CPU and
//! latency figures are not each other's noise.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

const ERR_TOO_LARGE: u32 = 1;
const ERR_BUSY: u32 = 5;
const ERR_SLOW_CONSUMER: u32 = 7;

fn full_scale() -> bool {
    std::env::var("CPORT_HOSTILE_FULL").is_ok_and(|v| v == "1")
}

/// `full` under `CPORT_HOSTILE_FULL=1`, else `quick`.
fn scale(full: u64, quick: u64) -> u64 {
    if full_scale() { full } else { quick }
}

/// One hostile test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn closed(v: &Value, reason: &str) -> u64 {
    v["closed"][reason].as_u64().unwrap_or(0)
}

const MIB: u64 = 1024;

// ---------------------------------------------------------------------------
// Server measurements
// ---------------------------------------------------------------------------

/// Samples a process's RSS every 20 ms until stopped; keeps the peak.
struct RssPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    h: Option<JoinHandle<()>>,
}

impl RssPeak {
    fn start(pid: i32) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib_of(pid).unwrap_or(0)));
        let h = {
            let (stop, peak) = (stop.clone(), peak.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = rss_kib_of(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssPeak {
            stop,
            peak,
            h: Some(h),
        }
    }

    /// Peak so far, KiB.
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.h.take() {
            let _ = h.join();
        }
    }
}

/// Server CPU over a window: (CPU used, wall time).
struct CpuWindow {
    cpu0: Duration,
    t0: Instant,
}

impl CpuWindow {
    fn start(srv: &Server) -> CpuWindow {
        CpuWindow {
            cpu0: srv.cpu_time().expect("server CPU time"),
            t0: Instant::now(),
        }
    }

    fn end(&self, srv: &Server) -> (Duration, Duration) {
        (
            srv.cpu_time().expect("server CPU time") - self.cpu0,
            self.t0.elapsed(),
        )
    }
}

fn pct(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------
// Attacker processes
// ---------------------------------------------------------------------------

/// A child process running `hostile::attacker`. Its stdout lines that
/// start with `HOSTILE ` are collected; closing its stdin stops it.
struct Attacker {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    role: String,
}

impl Attacker {
    fn spawn(role: &str, addr: SocketAddr, count: u64, env: &[(&str, String)]) -> Attacker {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "hostile::attacker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("HOSTILE_ROLE", role)
        .env("HOSTILE_ADDR", addr.to_string())
        .env("HOSTILE_COUNT", count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn an attacker process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let readers = vec![
            {
                let lines = lines.clone();
                thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if let Some(i) = line.find("HOSTILE ") {
                            lines.lock().unwrap().push(line[i + 8..].to_string());
                        }
                    }
                })
            },
            {
                let stderr = stderr.clone();
                thread::spawn(move || {
                    let mut s = String::new();
                    let _ = BufReader::new(err).read_to_string(&mut s);
                    stderr.lock().unwrap().push_str(&s);
                })
            },
        ];
        Attacker {
            stdin: child.stdin.take(),
            child: Some(child),
            lines,
            stderr,
            readers,
            role: role.to_string(),
        }
    }

    /// Waits (bounded) for a line starting with `word`; returns the rest.
    fn wait_line(&mut self, word: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(word))
            {
                return l[word.len()..].trim().to_string();
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // One last look: the line may have been read just now.
                thread::sleep(Duration::from_millis(100));
                if let Some(l) = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.starts_with(word))
                {
                    return l[word.len()..].trim().to_string();
                }
                panic!(
                    "{} attacker exited ({status:?}) before `{word}`:\n{}",
                    self.role,
                    tail(&self.stderr.lock().unwrap(), 30)
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{} attacker: no `{word}` within {timeout:?}; lines {:?}",
                self.role,
                self.lines.lock().unwrap()
            );
            thread::sleep(POLL_STEP);
        }
    }

    /// Stops it (closes stdin) and returns its RESULT.
    fn finish(self) -> Value {
        self.finish_within(Duration::from_secs(120))
    }

    /// [`finish`](Self::finish) with a longer deadline for attackers that
    /// end by themselves.
    fn finish_within(mut self, timeout: Duration) -> Value {
        drop(self.stdin.take());
        let r = self.wait_line("RESULT", timeout);
        serde_json::from_str(&r).unwrap_or_else(|e| panic!("bad RESULT {r:?}: {e}"))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        end_child(self.stdin.take(), self.child.take(), &mut self.readers);
    }
}

fn env_str(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Connects `n` sockets to `addr` (from `source` if given), with a deadline.
fn connect_many(addr: SocketAddr, source: Option<SocketAddr>, n: u64) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "connected only {} of {n}",
            v.len()
        );
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(src) = source {
            s.bind(&src.into()).unwrap();
        }
        match s.connect_timeout(&addr.into(), Duration::from_secs(10)) {
            Ok(()) => v.push(TcpStream::from(s)),
            Err(e) => panic!("attacker connect {} of {n}: {e}", v.len()),
        }
    }
    v
}

/// Whether the parent closed our stdin (time to stop).
fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    thread::spawn(move || {
        let mut b = [0u8; 64];
        let mut stdin = std::io::stdin();
        while !matches!(stdin.read(&mut b), Ok(0) | Err(_)) {}
        s.store(true, Ordering::Relaxed);
    });
    stop
}

/// Per-connection state of a trickling attacker.
#[derive(Default, Clone)]
struct Trickle {
    /// Bytes of the stream sent so far.
    sent: usize,
    /// Bytes read back (an ERROR frame, normally).
    got: Vec<u8>,
    /// The server closed or reset the connection.
    closed: bool,
}

/// Reads what is there without blocking; marks EOF/reset.
fn poll_read(s: &mut TcpStream, t: &mut Trickle) {
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                t.closed = true;
                return;
            }
            Ok(n) => {
                if t.got.len() < 4096 {
                    t.got.extend_from_slice(&b[..n]);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => {
                t.closed = true;
                return;
            }
        }
    }
}

/// The error code of an ERROR frame at the start of `got`, if complete.
fn error_code(got: &[u8]) -> Option<u32> {
    if got.len() < 12 || got[4..8] != CMD_ERROR.to_be_bytes() {
        return None;
    }
    Some(u32::from_be_bytes(got[8..12].try_into().unwrap()))
}

/// Runs a trickling attacker: every connection sends `stream[..first]`,
/// then one more byte every `every` (spread over the period), until stdin
/// closes. Reports how many saw an ERROR frame (by code) and a close.
fn trickle(stream: &[u8], first: usize, every: Duration) {
    let addr: SocketAddr = env_str("HOSTILE_ADDR").parse().unwrap();
    let n = env_num("HOSTILE_COUNT", 1);
    let stop = stop_flag();
    let mut socks = connect_many(addr, None, n);
    let mut st = vec![Trickle::default(); socks.len()];
    for (s, t) in socks.iter_mut().zip(st.iter_mut()) {
        s.write_all(&stream[..first]).expect("first bytes");
        t.sent = first;
        s.set_nonblocking(true).unwrap();
    }
    println!("HOSTILE READY {n}");
    let start = Instant::now();
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick += 1;
        let slice = Duration::from_millis(100);
        let due = start + slice * tick as u32;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let elapsed = start.elapsed();
        for (i, (s, t)) in socks.iter_mut().zip(st.iter_mut()).enumerate() {
            // Each connection is read once per `every` at most once a
            // second, so the attacker's own CPU stays small beside the
            // honest clients.
            let spread = (every.as_millis() as u64 / 100).max(1);
            if i as u64 % spread == tick % spread {
                poll_read(s, t);
            }
            if t.closed {
                continue;
            }
            // Byte `first + k` is due at offset + k * every.
            let offset = every.mul_f64(i as f64 / n as f64);
            if elapsed < offset {
                continue;
            }
            let want =
                first + 1 + ((elapsed - offset).as_secs_f64() / every.as_secs_f64()) as usize;
            if want > t.sent && t.sent < stream.len() {
                match s.write(&stream[t.sent..t.sent + 1]) {
                    Ok(_) => t.sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => t.closed = true,
                }
            }
        }
        let done = st.iter().filter(|t| t.closed).count();
        if tick.is_multiple_of(10) {
            println!("HOSTILE STATUS closed={done}");
        }
    }
    let mut codes: HashMap<String, u64> = HashMap::new();
    for t in &st {
        if let Some(c) = error_code(&t.got) {
            *codes.entry(c.to_string()).or_default() += 1;
        }
    }
    let r = json!({
        "connections": n,
        "closed": st.iter().filter(|t| t.closed).count(),
        "error_codes": codes,
        "bytes_sent": st.iter().map(|t| t.sent as u64).sum::<u64>(),
    });
    println!("HOSTILE RESULT {r}");
}

/// Connection attempts in batches, each expecting ERROR 5 and a close.
fn flood() {
    let addr: SocketAddr = env_str("HOSTILE_ADDR").parse().unwrap();
    let n = env_num("HOSTILE_COUNT", 1);
    let source: Option<SocketAddr> = std::env::var("HOSTILE_SOURCE")
        .ok()
        .map(|s| format!("{s}:0").parse().unwrap());
    let threads = env_num("HOSTILE_THREADS", 4);
    let batch = env_num("HOSTILE_BATCH", 250);
    let busy = AtomicU64::new(0);
    let other = Mutex::new(HashMap::<String, u64>::new());
    println!("HOSTILE READY {n}");
    thread::scope(|s| {
        for t in 0..threads {
            let (busy, other) = (&busy, &other);
            let mine = n / threads + u64::from(t < n % threads);
            s.spawn(move || {
                let mut left = mine;
                while left > 0 {
                    let k = left.min(batch);
                    left -= k;
                    let mut socks = connect_many(addr, source, k);
                    for s in socks.iter_mut() {
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        let outcome = match read_frame(s) {
                            Ok((CMD_ERROR, b)) if b.len() >= 4 => {
                                let code = u32::from_be_bytes(b[..4].try_into().unwrap());
                                let mut rest = [0u8; 16];
                                match s.read(&mut rest) {
                                    Ok(0) if code == ERR_BUSY => None,
                                    Err(e) if is_closed_error(&e) && code == ERR_BUSY => None,
                                    Ok(_) => Some(format!("error_{code}_then_data")),
                                    Err(e) => Some(format!("error_{code}_then_{:?}", e.kind())),
                                }
                            }
                            Ok((cmd, _)) => Some(format!("cmd_{cmd}")),
                            Err(e) => Some(format!("{:?}", e.kind())),
                        };
                        match outcome {
                            None => {
                                busy.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(o) => *other.lock().unwrap().entry(o).or_default() += 1,
                        }
                    }
                }
            });
        }
    });
    let r = json!({
        "attempts": n,
        "busy": busy.load(Ordering::Relaxed),
        "other": *other.lock().unwrap(),
    });
    println!("HOSTILE RESULT {r}");
}

/// The attacker process (see the module docs); not a test by itself.
#[test]
#[ignore = "an attacker process started by the hostile tests"]
fn attacker() {
    let role = match std::env::var("HOSTILE_ROLE") {
        Ok(r) => r,
        Err(_) => {
            eprintln!("hostile::attacker runs only as a child of the hostile tests");
            return;
        }
    };
    match role.as_str() {
        "lenbomb" => {
            // A header declaring HOSTILE_DECLARE bytes, then a byte a second.
            let declare = env_num("HOSTILE_DECLARE", u32::MAX as u64) as u32;
            let mut stream = encode_header(declare, CMD_ECHO).to_vec();
            stream.extend(std::iter::repeat_n(b'x', 4096));
            trickle(&stream, 8, Duration::from_secs(1));
        }
        "slowloris" => {
            // 5 of the 8 header bytes, then a byte every 3 s: the header
            // completes (a 64 KiB ECHO) and its body never does.
            let mut stream = encode_header(64 * 1024, CMD_ECHO).to_vec();
            stream.extend(std::iter::repeat_n(b's', 4096));
            trickle(&stream, 5, Duration::from_secs(3));
        }
        "flood" => flood(),
        other => panic!("unknown HOSTILE_ROLE {other}"),
    }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// Length bombs: `n` connections declare a 4 GiB frame, then send a byte a
/// second: each gets ERROR 1 and is closed. `n` more declare exactly
/// `--max-frame` (1 MiB) and trickle the body a byte a second: they stay
/// open, and the server does not allocate the declared megabyte for them
/// (n MiB would show in its RSS).
#[test]
fn length_bombs_are_refused_without_allocating() {
    let _serial = serial();
    let n = scale(2000, 500);
    // The held connections trickle their frames at a byte a second: the
    // frame deadline (`--frame-timeout`) would close them after 10 s, and
    // this test is about what holding them costs (the deadline is
    // `hostile_budget`'s).
    let mut srv = Server::start(&["--frame-timeout", "10m"]);
    let addr = srv.addr();
    let mut st = connect(addr);
    echo_roundtrip(&mut st, b"warm up");
    let base = srv.rss_kib().expect("server RSS");
    let peak = RssPeak::start(srv.pid());
    let cpu = CpuWindow::start(&srv);
    let mut bombs = Attacker::spawn("lenbomb", addr, n, &[]);
    let mut held = Attacker::spawn(
        "lenbomb",
        addr,
        n,
        &[("HOSTILE_DECLARE", DEFAULT_MAX_FRAME.to_string())],
    );
    bombs.wait_line("READY", Duration::from_secs(120));
    held.wait_line("READY", Duration::from_secs(120));
    let v = wait_stats(&mut st, "every 4 GiB bomb refused", |v| {
        closed(v, "frame_too_large") >= n
    });
    assert_eq!(closed(&v, "frame_too_large"), n, "{v}");
    // Let the trickle run: the held connections send a byte a second, the
    // refused ones keep writing into closed sockets.
    thread::sleep(Duration::from_secs(3));
    let v = stats(&mut st);
    let (used, wall) = cpu.end(&srv);
    let grown = peak.peak().saturating_sub(base);
    drop(peak);
    assert_eq!(
        stat_u64(&v, "connections_open"),
        n + 1,
        "the max-frame connections stay open: {v}"
    );
    echo_roundtrip(&mut st, b"served during the bombs");
    let r = bombs.finish();
    assert_eq!(r["closed"], json!(n), "every bomb closed: {r}");
    assert_eq!(
        r["error_codes"],
        json!({ ERR_TOO_LARGE.to_string(): n }),
        "{r}"
    );
    let h = held.finish();
    assert_eq!(h["closed"], json!(0), "held connections were closed: {h}");
    assert_eq!(h["error_codes"], json!({}), "{h}");
    eprintln!(
        "[hostile] length bombs: {n} x 4 GiB refused + {n} x 1 MiB held: server RSS +{grown} KiB \
         (base {base} KiB), CPU {used:?} in {wall:?} ({:.1}%)",
        pct(used, wall)
    );
    // 1 MiB per held connection would be n MiB; the bound is 48 MiB.
    assert!(
        grown < 48 * MIB,
        "server RSS grew by {grown} KiB under {n}+{n} length bombs"
    );
    // Accepting, refusing and trickling stay cheap (debug build: 0.1 ms
    // of CPU per connection measured; the bound is 2 ms per connection).
    assert!(
        used < Duration::from_micros(2000) * (2 * n) as u32,
        "server used {used:?} of CPU for {} hostile connections",
        2 * n
    );
    drop(st);
    let summary = srv.stop_checked_with(libc::SIGTERM, None);
    assert_eq!(get(&summary, "connections_served"), 2 * n + 1);
}

/// p99 round-trip latency (µs) of `conns` honest pingpong clients for
/// `secs`, from `cport stress`'s JSON report; every echo verified.
fn honest_p99(addr: SocketAddr, conns: u64, secs: u64, tag: &str) -> u64 {
    let json =
        std::env::temp_dir().join(format!("cport-hostile-{}-{tag}.json", std::process::id()));
    let _ = std::fs::remove_file(&json);
    let (addr, conns, msgs) = (addr.to_string(), conns.to_string(), (secs * 20).to_string());
    let mut args = vec![
        "stress",
        "--connect",
        &addr,
        "--connections",
        &conns,
        "--mode",
        "interval",
        "--interval",
        "50ms",
        "--messages",
        &msgs,
        "--size",
        "64",
        "--json",
        json.to_str().unwrap(),
    ];
    let backend = test_backend();
    if let Some(b) = &backend {
        args.extend_from_slice(&["--backend", b]);
    }
    let out = run_cport(&args, None, Duration::from_secs(120));
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no stress report ({e}):\n{}", out.dump()));
    let _ = std::fs::remove_file(&json);
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        r["ok"],
        json!(true),
        "honest clients failed:\n{}",
        out.dump()
    );
    assert_eq!(r["messages"]["mismatches"], json!(0), "{r:#}");
    r["latency_us"]["p99"].as_u64().expect("p99")
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Slowloris: a crowd of connections that each sent 5 header bytes and add
/// one every 3 s, beside 200 honest pingpong clients.
///
/// Two servers run side by side, and in each round the crowd attacks one
/// of them (alternating) while 200 honest clients measure each server at
/// the same time, so slow drifts of everything else on a shared 2-core
/// machine weigh on both sides of a round alike. Bursts of other load
/// (other tests and builds; p99s of 30 ms and 900 ms a minute apart were
/// seen here) still hit single phases, and they only ever add latency; so
/// the best phase with the crowd is compared with the best phase without:
/// a crowd that really slowed its server would slow every phase it is in.
/// That best p99 with the crowd stays under twice the best without (both
/// floored at 10 ms, so sub-millisecond jitter cannot fail it); the median
/// of the per-round ratios is reported too. The crowd costs its server
/// bounded memory and little CPU, and none of it is disconnected (a slow
/// sender is not idle).
#[test]
fn slowloris_crowd_does_not_hurt_honest_clients() {
    let _serial = serial();
    let n = scale(5000, 1000);
    let rounds = 4;
    let honest = 200;
    let floor = 10_000u64;
    // The crowd is held on purpose, to measure what it costs: the frame
    // deadline that reaps it is `hostile_budget`'s.
    let args = ["--frame-timeout", "10m"];
    let mut servers = [Server::start(&args), Server::start(&args)];
    let mut st: Vec<TcpStream> = servers.iter().map(|s| connect(s.addr())).collect();
    for s in st.iter_mut() {
        echo_roundtrip(s, b"warm up");
    }
    let bases: Vec<u64> = servers.iter().map(|s| s.rss_kib().expect("RSS")).collect();
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut crowd_cpu, mut crowd_wall, mut grown) = (Duration::ZERO, Duration::ZERO, 0);
    let mut trickled = 0u64;
    for round in 0..rounds {
        let (a, b) = (round as usize % 2, 1 - round as usize % 2); // a gets the crowd
        let peak = RssPeak::start(servers[a].pid());
        let mut crowd = Attacker::spawn("slowloris", servers[a].addr(), n, &[]);
        crowd.wait_line("READY", Duration::from_secs(120));
        wait_stats(&mut st[a], "the crowd to be accepted", |v| {
            stat_u64(v, "connections_open") > n
        });
        // The crowd alone, for 2 s: what it costs its server.
        let in0 = stat_u64(&stats(&mut st[a]), "bytes_in");
        let cpu = CpuWindow::start(&servers[a]);
        thread::sleep(Duration::from_secs(2));
        let (u, w) = cpu.end(&servers[a]);
        trickled += stat_u64(&stats(&mut st[a]), "bytes_in") - in0 - HEADER_LEN as u64;
        crowd_cpu += u;
        crowd_wall += w;
        // Both servers measured at once.
        let (addr_a, addr_b) = (servers[a].addr(), servers[b].addr());
        let (pa, pb) = thread::scope(|sc| {
            let ha = sc.spawn(move || honest_p99(addr_a, honest, 3, &format!("with{round}")));
            let hb = sc.spawn(move || honest_p99(addr_b, honest, 3, &format!("without{round}")));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        with.push(pa);
        without.push(pb);
        ratios.push(pa.max(floor) as f64 / pb.max(floor) as f64);
        grown = grown.max(peak.peak().saturating_sub(bases[a]));
        drop(peak);
        let r = crowd.finish();
        assert_eq!(
            r["closed"],
            json!(0),
            "the server dropped slow senders: {r}"
        );
        wait_stats(&mut st[a], "the crowd to be gone", |v| {
            stat_u64(v, "connections_open") == 1
        });
    }
    let (ma, mb) = (median(&mut without.clone()), median(&mut with.clone()));
    let best_with = with.iter().min().unwrap().max(&floor);
    let best_without = without.iter().min().unwrap().max(&floor);
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    // Median of an even count: the mean of the middle two.
    let mid = sorted.len() / 2;
    let ratio = if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    };
    eprintln!(
        "[hostile] slowloris: honest p99 without {n} slowloris {without:?} us (median {ma}, \
         best {best_without}), with {with:?} us (median {mb}, best {best_with}); with/without \
         per round {ratios:.2?}, median {ratio:.2}; \
         server RSS +{grown} KiB with the crowd; CPU with the crowd alone {:.1}% \
         ({trickled} bytes trickled in {crowd_wall:?})",
        pct(crowd_cpu, crowd_wall)
    );
    assert!(
        trickled as f64 > crowd_wall.as_secs_f64() * n as f64 / 3.0 / 2.0,
        "the crowd did not trickle: {trickled} bytes in {crowd_wall:?}"
    );
    // The latency comparison holds the 2x bound where it is
    // measured alone (the CI stage runs the full scale one test at a time);
    // beside the rest of a parallel `cargo test` the other tests' load is
    // the noise, so there it is reported, not asserted.
    assert!(
        !full_scale() || *best_with < 2 * *best_without,
        "honest p99 with the slowloris crowd (best of {rounds}: {best_with} us) is over twice \
         that without it ({best_without} us); per round {ratios:.2?}; with {with:?} us, \
         without {without:?} us"
    );
    // Per slow connection: a slot, a timer and a few buffered bytes.
    assert!(
        grown < 64 * MIB,
        "server RSS grew by {grown} KiB for {n} slowloris connections"
    );
    // ~n/3 one-byte receives a second; bound: 25% of one core.
    assert!(
        pct(crowd_cpu, crowd_wall) < 25.0,
        "the slowloris crowd cost {:.1}% CPU",
        pct(crowd_cpu, crowd_wall)
    );
    drop(st);
    for s in servers.iter_mut() {
        s.stop_checked_with(libc::SIGTERM, None);
    }
}

/// A flood of connection attempts against `--max-conns 1000`, spread over
/// attacker processes and source addresses (127.0.0.2, ...): with the
/// server at its limit, every attempt gets ERROR 5 and a close; the
/// connections it holds are served throughout; its memory stays bounded, a
/// refused attempt costs little CPU, and at the limit it does not spin.
#[test]
fn connection_flood_against_max_conns_is_refused_cheaply() {
    let _serial = serial();
    let attempts = scale(21_000, 4_200);
    let procs = scale(3, 1);
    let max = 1000u64;
    let mut srv = Server::start(&["--max-conns", "1000"]);
    let addr = srv.addr();
    let mut st = connect(addr);
    let mut held: Vec<TcpStream> = (0..max - 1).map(|_| connect(addr)).collect();
    wait_stats(&mut st, "the server to hold max-conns connections", |v| {
        stat_u64(v, "connections_open") == max
    });
    let mut probe = connect(addr);
    let (code, _) = expect_error(&mut probe, "one over the limit");
    assert_eq!(code, ERR_BUSY);
    drop(probe);
    let base = srv.rss_kib().expect("server RSS");
    let peak = RssPeak::start(srv.pid());
    let cpu = CpuWindow::start(&srv);
    let attackers: Vec<Attacker> = (0..procs)
        .map(|k| {
            let mine = attempts / procs + u64::from(k < attempts % procs);
            Attacker::spawn(
                "flood",
                addr,
                mine,
                &[("HOSTILE_SOURCE", format!("127.0.0.{}", 2 + k))],
            )
        })
        .collect();
    // The held connections are served while the flood runs.
    for (i, c) in held.iter_mut().enumerate().step_by(50) {
        echo_roundtrip(c, format!("held {i} during the flood").as_bytes());
    }
    let (mut busy, mut other) = (0u64, Vec::new());
    for a in attackers {
        let r = a.finish_within(Duration::from_secs(300));
        busy += r["busy"].as_u64().unwrap();
        if r["other"] != json!({}) {
            other.push(r["other"].clone());
        }
    }
    let (used, wall) = cpu.end(&srv);
    let grown = peak.peak().saturating_sub(base);
    drop(peak);
    assert!(
        other.is_empty(),
        "attempts not refused with ERROR 5: {other:?}"
    );
    assert_eq!(busy, attempts);
    let v = wait_stats(&mut st, "every refused connection closed", |v| {
        closed(v, "busy") == attempts + 1
    });
    assert_eq!(stat_u64(&v, "connections_open"), max, "{v}");
    // At the limit and idle: no spinning.
    let idle = CpuWindow::start(&srv);
    thread::sleep(Duration::from_secs(2));
    let (idle_used, idle_wall) = idle.end(&srv);
    eprintln!(
        "[hostile] flood: {attempts} attempts from {procs} processes against --max-conns {max}: \
         all refused with ERROR 5 in {wall:?}; server CPU {used:?} ({:.0} us per attempt), \
         RSS +{grown} KiB; idle at the limit {:.1}% CPU",
        used.as_secs_f64() * 1e6 / attempts as f64,
        pct(idle_used, idle_wall)
    );
    assert!(
        used < Duration::from_millis(2) * attempts as u32,
        "{used:?} of server CPU for {attempts} refused attempts"
    );
    assert!(
        grown < 64 * MIB,
        "server RSS grew by {grown} KiB during the flood"
    );
    assert!(
        idle_used < idle_wall / 10,
        "server used {idle_used:?} CPU in {idle_wall:?} idle at its connection limit"
    );
    for (i, c) in held.iter_mut().enumerate() {
        echo_roundtrip(c, format!("held {i} after the flood").as_bytes());
    }
    drop(held);
    drop(st);
    let summary = srv.stop_checked_with(libc::SIGTERM, None);
    assert_eq!(get(&summary, "connections_served"), max + 1 + attempts);
}

/// Broadcast to 100 recipients that never read, beside 3 that do: each
/// non-reader is dropped with ERROR 7 once its queue passes
/// `--max-send-queue` (4 MiB), the readers get every message in order, and
/// server memory stays bounded: the 100 queues share one buffer per
/// message (4 MiB each copied would be 400 MiB).
#[test]
fn broadcast_to_100_recipients_that_never_read() {
    let _serial = serial();
    let mut srv = Server::start(&[]);
    let addr = srv.addr();
    let deaf: Vec<TcpStream> = (0..100).map(|_| connect_small_rcvbuf(addr)).collect();
    let readers: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    let mut sender = connect(addr);
    drop(settle(addr, 105, 105));
    let base = srv.rss_kib().expect("server RSS");
    let peak = RssPeak::start(srv.pid());
    let cpu = CpuWindow::start(&srv);
    let (n, size) = (200usize, 64 * 1024);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, usize)>();
    let mut handles = Vec::new();
    let mut all_readers = readers;
    all_readers.push(sender.try_clone().unwrap());
    let count = all_readers.len();
    for (who, mut s) in all_readers.into_iter().enumerate() {
        let tx = tx.clone();
        handles.push(thread::spawn(move || {
            for i in 0..n {
                let (cmd, b) = expect_frame(&mut s, "broadcast");
                assert_eq!(cmd, CMD_BROADCAST, "reader {who} frame {i}");
                assert_eq!(b.len(), 8 + size, "reader {who} frame {i}");
                let seq = u32::from_be_bytes(b[8..12].try_into().unwrap()) as usize;
                assert_eq!(seq, i, "reader {who}: out of order");
                let _ = tx.send((who, i + 1));
            }
            s
        }));
    }
    drop(tx);
    let mut done = vec![0usize; count];
    let mut body = vec![b'b'; size];
    for i in 0..n {
        // Stay at most 8 messages ahead of the slowest reader, so only the
        // deaf recipients fall behind.
        while i > done.iter().copied().min().unwrap() + 8 {
            let (who, got) = rx.recv_timeout(DEADLINE).expect("readers stalled");
            done[who] = got;
        }
        body[..4].copy_from_slice(&(i as u32).to_be_bytes());
        write_frame(&mut sender, CMD_BROADCAST, &body).unwrap();
    }
    let mut readers: Vec<TcpStream> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut st = connect(addr);
    let v = wait_stats(&mut st, "the 100 deaf recipients to be dropped", |v| {
        closed(v, "slow_consumer") == 100
    });
    let (used, wall) = cpu.end(&srv);
    let grown = peak.peak().saturating_sub(base);
    drop(peak);
    assert_eq!(stat_u64(&v, "connections_open"), 5, "{v}");
    // Each deaf client's stream ends; the ERROR 7 frame is there when the
    // server could still queue it behind what the client had not read.
    let mut saw_error7 = 0;
    for mut d in deaf {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "a deaf client never saw the end");
            match read_frame(&mut d) {
                Ok((CMD_ERROR, b)) => {
                    assert_eq!(
                        u32::from_be_bytes(b[..4].try_into().unwrap()),
                        ERR_SLOW_CONSUMER
                    );
                    saw_error7 += 1;
                }
                Ok((CMD_BROADCAST, _)) => {}
                Ok((cmd, _)) => panic!("unexpected cmd {cmd}"),
                Err(_) => break,
            }
        }
    }
    eprintln!(
        "[hostile] broadcast: {n} x 64 KiB to 100 deaf + 4 reading recipients: all 100 dropped \
         ({saw_error7} read their ERROR 7), readers got all {n}; server RSS +{grown} KiB, \
         CPU {used:?} in {wall:?}"
    );
    assert!(
        grown < 64 * MIB,
        "server RSS grew by {grown} KiB broadcasting to 100 recipients that never read"
    );
    // 200 messages x 104 recipients, debug build: bound 10 s of CPU.
    assert!(used < Duration::from_secs(10), "server CPU {used:?}");
    for r in readers.iter_mut() {
        echo_roundtrip(r, b"readers still served");
    }
    drop((readers, sender, st));
    srv.stop_checked(106);
}
