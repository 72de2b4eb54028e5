//! Shared helpers: locating the binary, running a server per test, framing,
//! summary parsing, a tiny PRNG and socket utilities.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Generous deadline for anything we poll for (server start, counters, ...).
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Read/write timeout on every test socket: a hung server fails the test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server gets to exit after SIGTERM/SIGINT before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Interval between polls of a condition.
pub const POLL_STEP: Duration = Duration::from_millis(20);

pub const HEADER_LEN: usize = 8;
pub const CMD_ECHO: u32 = 1;
pub const CMD_BROADCAST: u32 = 2;
pub const CMD_PING: u32 = 3;
pub const CMD_PONG: u32 = 4;
pub const CMD_FILE: u32 = 5;
pub const CMD_STATS: u32 = 8;
pub const CMD_ERROR: u32 = 0xFFFF_FFFF;

pub const ERR_FRAME_TOO_LARGE: u32 = 1;
pub const ERR_UNKNOWN_COMMAND: u32 = 2;

/// Default `--max-frame` of the server (1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// Refuse to allocate more than this for a frame announced by the server.
const READ_FRAME_LIMIT: usize = 16 * 1024 * 1024;

/// Keys every STATS reply must contain.
pub const STATS_KEYS: [&str; 9] = [
    "connections_open",
    "connections_accepted",
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "backend",
    "ports",
    "workers",
];

// ---------------------------------------------------------------------------
// Binary location and plain command runs
// ---------------------------------------------------------------------------

/// Path of the `cport` binary under test.
pub fn cport_bin() -> PathBuf {
    // CPORT_BIN first, so that the same tests can run a binary built
    // another way (e.g. under AddressSanitizer, or a release build).
    if let Some(p) = std::env::var_os("CPORT_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_cport") {
        return PathBuf::from(p);
    }
    panic!(
        "cannot locate the cport binary: CARGO_BIN_EXE_cport is not set at compile time \
         and the CPORT_BIN environment variable is not set; \
         run with CPORT_BIN=/path/to/cport"
    );
}

/// Value of `CPORT_TEST_BACKEND`, if set and non-empty.
pub fn test_backend() -> Option<String> {
    std::env::var("CPORT_TEST_BACKEND")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The library backend `CPORT_TEST_BACKEND` names (`Auto` when unset), for
/// the tests that build ports and engines directly.
pub fn test_port_backend() -> cport::port::BackendKind {
    match test_backend() {
        None => cport::port::BackendKind::Auto,
        Some(b) => b
            .parse()
            .unwrap_or_else(|e| panic!("CPORT_TEST_BACKEND: {e}")),
    }
}

/// Run `cport client <args>`, adding `--backend $CPORT_TEST_BACKEND` if set
/// (see [`run_cport`]).
pub fn run_client(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CmdOutput {
    let mut full = vec!["client"];
    full.extend_from_slice(args);
    let backend = test_backend();
    if let Some(b) = &backend {
        full.extend_from_slice(&["--backend", b.as_str()]);
    }
    run_cport(&full, stdin, timeout)
}

/// Remove ANSI escape sequences (colours) from text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters then one final byte in 0x40..=0x7e.
                for c2 in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c2) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Output of a finished command.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Human-readable dump for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Run `cport <args>` to completion with an optional stdin, killing it (and
/// panicking) if it does not exit within `timeout`.
pub fn run_cport(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CmdOutput {
    run_cport_with(args, stdin, timeout, |_| {})
}

/// [`run_cport`], letting `customize` adjust the command first (e.g. install
/// a `pre_exec` hook).
pub fn run_cport_with(
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
    customize: impl FnOnce(&mut Command),
) -> CmdOutput {
    let mut cmd = Command::new(cport_bin());
    customize(&mut cmd);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("failed to spawn {:?} {:?}: {e}", cport_bin(), args));
    let out_h = spawn_reader(child.stdout.take().expect("stdout"));
    let err_h = spawn_reader(child.stderr.take().expect("stderr"));
    let in_h = stdin.map(|data| {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        thread::spawn(move || {
            // The child may exit before reading everything; ignore EPIPE.
            let _ = w.write_all(&data);
            // Dropping `w` closes the pipe: the child sees EOF.
        })
    });
    let status = wait_deadline(&mut child, timeout);
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out_h.join().unwrap_or_default()).into_owned();
            let stderr = String::from_utf8_lossy(&err_h.join().unwrap_or_default()).into_owned();
            panic!(
                "`cport {}` did not exit within {timeout:?}; killed.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                args.join(" ")
            );
        }
    };
    if let Some(h) = in_h {
        let _ = h.join();
    }
    let stdout = strip_ansi(&String::from_utf8_lossy(
        &out_h.join().expect("stdout reader"),
    ));
    let stderr = strip_ansi(&String::from_utf8_lossy(
        &err_h.join().expect("stderr reader"),
    ));
    CmdOutput {
        status,
        stdout,
        stderr,
    }
}

/// Poll `try_wait` until the child exits or `timeout` passes.
fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("try_wait failed: {e}"),
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Lines of `text` that start with `error:` (after leading whitespace).
pub fn error_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.trim_start().starts_with("error:"))
        .collect()
}

// ---------------------------------------------------------------------------
// Server process guard
// ---------------------------------------------------------------------------

/// A running `cport server`; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pid: i32,
    addrs: Vec<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    args: Vec<String>,
}

fn spawn_line_collector<R: Read + Send + 'static>(
    r: R,
    sink: Arc<Mutex<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = io::BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match io::BufRead::read_until(&mut r, b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    sink.lock().unwrap().push_str(&text);
                }
            }
        }
    })
}

/// Parse every `listening on <ADDR>` occurrence in `text`.
pub fn parse_listen_addrs(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in strip_ansi(text).lines() {
        let mut rest = line;
        while let Some(idx) = rest.find("listening on ") {
            rest = &rest[idx + "listening on ".len()..];
            let token = rest.split_whitespace().next().unwrap_or("");
            let token = token.trim_matches(|c: char| {
                !(c.is_ascii_hexdigit() || c == ':' || c == '.' || c == '[' || c == ']')
            });
            if let Ok(a) = token.parse::<SocketAddr>() {
                out.push(a);
            }
        }
    }
    out
}

impl Server {
    /// Start `cport server <args>`. If `args` has no `--listen`, adds
    /// `--listen 127.0.0.1:0`. Adds `--backend $CPORT_TEST_BACKEND` if set.
    /// Waits (up to 30 s) until one `listening on` line per listener appeared.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(args, true, |_| {})
    }

    /// Like [`start`](Self::start), but `--backend $CPORT_TEST_BACKEND` is
    /// added only if `env_backend`, and `customize` adjusts the command
    /// before it is spawned.
    /// Like [`Server::start`], with the server's descriptor limit (soft and
    /// hard) set to `limit` before it runs, as on a machine where it is low.
    pub fn start_with_fd_limit(args: &[&str], limit: u64) -> Server {
        Server::start_with(args, true, |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // struct on this (child's) stack.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    pub fn start_with(
        args: &[&str],
        env_backend: bool,
        customize: impl FnOnce(&mut Command),
    ) -> Server {
        let mut full: Vec<String> = vec!["server".to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        let mut listeners = args.iter().filter(|a| **a == "--listen").count();
        if listeners == 0 {
            full.push("--listen".into());
            full.push("127.0.0.1:0".into());
            listeners = 1;
        }
        match (env_backend, test_backend()) {
            (false, _) => {}
            (true, Some(b)) => {
                eprintln!("[it] starting cport server with --backend {b}");
                full.push("--backend".into());
                full.push(b);
            }
            (true, None) => eprintln!(
                "[it] starting cport server with the default backend (CPORT_TEST_BACKEND not set)"
            ),
        }
        eprintln!("[it] cport {}", full.join(" "));

        let mut cmd = Command::new(cport_bin());
        cmd.args(&full)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        customize(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {:?}: {e}", cport_bin()));
        let pid = child.id() as i32;
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            spawn_line_collector(child.stderr.take().expect("stderr"), stderr.clone()),
            spawn_line_collector(child.stdout.take().expect("stdout"), stdout.clone()),
        ];
        let mut server = Server {
            child: Some(child),
            pid,
            addrs: Vec::new(),
            stderr,
            stdout,
            readers,
            args: full,
        };

        let start = Instant::now();
        loop {
            let addrs = parse_listen_addrs(&server.stderr_text());
            if addrs.len() >= listeners {
                for a in &addrs {
                    assert_ne!(
                        a.port(),
                        0,
                        "server printed port 0 instead of the bound port:\n{}",
                        server.stderr_text()
                    );
                }
                server.addrs = addrs;
                break;
            }
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                server.child = None;
                server.join_readers();
                panic!(
                    "server exited during start-up with {status:?}; args {:?}\n--- stderr ---\n{}",
                    server.args,
                    server.stderr_text()
                );
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "server did not print {listeners} `listening on` line(s) within {DEADLINE:?}\n--- stderr ---\n{}",
                    server.stderr_text()
                );
            }
            thread::sleep(POLL_STEP);
        }
        server
    }

    /// First listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// All listen addresses, in the order printed.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Everything the server wrote to stderr so far (ANSI stripped).
    pub fn stderr_text(&self) -> String {
        strip_ansi(&self.stderr.lock().unwrap())
    }

    fn join_readers(&mut self) {
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }

    /// Send `sig`, wait up to 10 s for exit (then SIGKILL).
    /// Returns the exit status, the time it took and all of stderr.
    pub fn stop_with(&mut self, sig: i32) -> (ExitStatus, Duration, String) {
        self.stop_within(sig, STOP_GRACE)
    }

    /// [`stop_with`](Self::stop_with) with its own bound on the wait (a
    /// sanitizer build under load may take longer than `STOP_GRACE`).
    pub fn stop_within(&mut self, sig: i32, limit: Duration) -> (ExitStatus, Duration, String) {
        let mut child = self.child.take().expect("server already stopped");
        let start = Instant::now();
        // SAFETY: plain kill(2) on the pid of our own child process.
        unsafe {
            libc::kill(self.pid, sig);
        }
        let status = match wait_deadline(&mut child, limit) {
            Some(s) => s,
            None => {
                eprintln!("[it] server did not exit within {limit:?}; sending SIGKILL");
                let _ = child.kill();
                child.wait().expect("wait after SIGKILL")
            }
        };
        let took = start.elapsed();
        self.join_readers();
        (status, took, self.stderr_text())
    }

    /// SIGTERM the server; returns (exit status, stderr).
    pub fn stop(&mut self) -> (ExitStatus, String) {
        let (status, _, stderr) = self.stop_with(libc::SIGTERM);
        (status, stderr)
    }

    /// Stop with `sig` and check the common shutdown contract: exit code 0,
    /// within 10 s, a `final summary:` with outstanding_ops=0 and
    /// outstanding_bufs=0, and (if given) connections_served == `served`.
    pub fn stop_checked_with(&mut self, sig: i32, served: Option<u64>) -> HashMap<String, u64> {
        let (status, took, stderr) = self.stop_with(sig);
        assert_eq!(
            status.code(),
            Some(0),
            "server must exit with code 0 after signal {sig} (status {status:?}, took {took:?})\n--- stderr ---\n{}",
            tail(&stderr, 60)
        );
        assert!(
            took < STOP_GRACE,
            "server took {took:?} to exit after signal {sig}"
        );
        assert!(
            !stderr.contains("panicked"),
            "server panicked:\n{}",
            tail(&stderr, 60)
        );
        let summary = parse_summary(&stderr);
        assert_eq!(
            get(&summary, "outstanding_ops"),
            0,
            "outstanding_ops must be 0 at exit; summary {summary:?}"
        );
        assert_eq!(
            get(&summary, "outstanding_bufs"),
            0,
            "outstanding_bufs must be 0 at exit; summary {summary:?}"
        );
        if let Some(n) = served {
            assert_eq!(
                get(&summary, "connections_served"),
                n,
                "connections_served must equal the number of connections this test made; summary {summary:?}"
            );
        }
        summary
    }

    /// `stop_checked_with(SIGTERM, Some(served))`.
    pub fn stop_checked(&mut self, served: u64) -> HashMap<String, u64> {
        self.stop_checked_with(libc::SIGTERM, Some(served))
    }

    /// The server's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resident memory of the server process in KiB (Linux /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.pid)
    }

    /// CPU time (user + system) the server process has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_millis(ticks * 1000 / hz))
    }

    /// Peak virtual memory of the server process in KiB (Linux /proc).
    pub fn vm_peak_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmPeak:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGTERM);
            }
            if wait_deadline(&mut child, STOP_GRACE).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.join_readers();
        }
        if thread::panicking() {
            eprintln!(
                "[it] ---- server stderr (args {:?}) ----\n{}\n[it] ---- server stdout ----\n{}",
                self.args,
                tail(&self.stderr_text(), 80),
                tail(&self.stdout.lock().unwrap(), 20)
            );
        }
    }
}

/// Last `n` lines of `s`.
/// Resident memory of process `pid` in KiB (Linux /proc); `None` if gone.
pub fn rss_kib_of(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

/// Parse the key=value pairs following `final summary:` (non-numeric values
/// are skipped). Panics if there is no such line.
pub fn parse_summary(stderr: &str) -> HashMap<String, u64> {
    let clean = strip_ansi(stderr);
    let line = clean
        .lines()
        .rev()
        .find(|l| l.contains("final summary:"))
        .unwrap_or_else(|| {
            panic!(
                "no `final summary:` line in server stderr:\n{}",
                tail(&clean, 60)
            )
        });
    let rest = &line[line.find("final summary:").unwrap() + "final summary:".len()..];
    parse_kv(rest)
}

/// Parse whitespace-separated `key=number` pairs.
pub fn parse_kv(text: &str) -> HashMap<String, u64> {
    let mut map = HashMap::new();
    for tok in text.split_whitespace() {
        if let Some((k, v)) = tok.split_once('=') {
            let v = v.trim_matches(|c: char| !c.is_ascii_digit());
            if let Ok(n) = v.parse::<u64>() {
                map.insert(
                    k.trim_matches(|c: char| c == ',' || c == '"').to_string(),
                    n,
                );
            }
        }
    }
    map
}

/// `map[key]`, panicking with the whole map if missing.
pub fn get(map: &HashMap<String, u64>, key: &str) -> u64 {
    *map.get(key)
        .unwrap_or_else(|| panic!("key `{key}` missing in {map:?}"))
}

// ---------------------------------------------------------------------------
// Sockets and frames
// ---------------------------------------------------------------------------

/// Apply the standard timeouts and TCP_NODELAY.
pub fn configure(s: &TcpStream) {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
}

/// Connect with timeouts set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr} failed: {e}"));
    configure(&s);
    s
}

/// Header + body bytes of one frame.
pub fn encode_frame(cmd: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body.len());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Header with an arbitrary declared length (no body).
pub fn encode_header(len: u32, cmd: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4..].copy_from_slice(&cmd.to_be_bytes());
    h
}

pub fn write_frame(s: &mut TcpStream, cmd: u32, body: &[u8]) -> io::Result<()> {
    s.write_all(&encode_frame(cmd, body))
}

/// Read one frame using the socket's read timeout.
pub fn read_frame(s: &mut TcpStream) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)?;
    let len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
    let cmd = u32::from_be_bytes(h[4..].try_into().unwrap());
    if len > READ_FRAME_LIMIT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("server announced a {len}-byte frame (cmd {cmd:#x})"),
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((cmd, body))
}

/// Read one frame with a specific timeout (restores IO_TIMEOUT afterwards).
pub fn read_frame_timeout(s: &mut TcpStream, t: Duration) -> io::Result<(u32, Vec<u8>)> {
    s.set_read_timeout(Some(t))?;
    let r = read_frame(s);
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    r
}

/// Read one frame or panic with context.
pub fn expect_frame(s: &mut TcpStream, what: &str) -> (u32, Vec<u8>) {
    read_frame(s).unwrap_or_else(|e| panic!("{what}: reading a frame failed: {e} ({:?})", e.kind()))
}

/// Send ECHO and check the reply is byte-identical.
pub fn echo_roundtrip(s: &mut TcpStream, body: &[u8]) {
    write_frame(s, CMD_ECHO, body).expect("write ECHO");
    let (cmd, got) = expect_frame(s, "ECHO reply");
    assert_eq!(cmd, CMD_ECHO, "ECHO reply has cmd {cmd:#x}");
    assert_frame_body_eq(&got, body, "ECHO reply");
}

/// Compare bodies without dumping megabytes into the panic message.
pub fn assert_frame_body_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first_diff = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: body mismatch: got {} bytes, want {} bytes, first difference at offset {first_diff}",
            got.len(),
            want.len()
        );
    }
}

/// Expect an ERROR frame; returns (code, message).
pub fn expect_error(s: &mut TcpStream, what: &str) -> (u32, String) {
    let (cmd, body) = expect_frame(s, what);
    assert_eq!(
        cmd, CMD_ERROR,
        "{what}: expected ERROR frame, got cmd {cmd:#x}"
    );
    assert!(
        body.len() >= 4,
        "{what}: ERROR body must hold a u32 code, got {} bytes",
        body.len()
    );
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    let msg = String::from_utf8(body[4..].to_vec())
        .unwrap_or_else(|_| panic!("{what}: ERROR message is not UTF-8"));
    (code, msg)
}

/// True for the errors that mean "the peer closed/reset the connection".
pub fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// Expect the server to close the connection (EOF or reset) with no more data.
pub fn expect_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: expected EOF, got {n} more bytes: {:?}", &buf[..n]),
        Err(e) if is_closed_error(&e) => {}
        Err(e) => panic!("{what}: expected EOF, got error {e} ({:?})", e.kind()),
    }
}

/// Make close() send RST instead of FIN (SO_LINGER with timeout 0).
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, pointer to a properly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SO_LINGER) failed: {}",
        io::Error::last_os_error()
    );
}

/// Close with RST.
pub fn reset(s: TcpStream) {
    set_linger_zero(&s);
    drop(s);
}

/// Write `data` from a helper thread while reading `expect_len` bytes on this
/// one (avoids deadlocks for big payloads). Returns what was read.
pub fn exchange(s: &mut TcpStream, data: &[u8], expect_len: usize) -> Vec<u8> {
    let mut w = s.try_clone().expect("try_clone");
    thread::scope(|sc| {
        let writer = sc.spawn(move || w.write_all(data));
        let mut got = vec![0u8; expect_len];
        let r = s.read_exact(&mut got);
        let wr = writer.join().expect("writer thread panicked");
        wr.unwrap_or_else(|e| panic!("writing {} bytes failed: {e}", data.len()));
        r.unwrap_or_else(|e| panic!("reading {expect_len} bytes failed: {e} ({:?})", e.kind()));
        got
    })
}

/// Send STATS on `s` and parse the JSON reply.
pub fn stats(s: &mut TcpStream) -> serde_json::Value {
    write_frame(s, CMD_STATS, &[]).expect("write STATS");
    let (cmd, body) = expect_frame(s, "STATS reply");
    assert_eq!(cmd, CMD_STATS, "STATS reply has cmd {cmd:#x}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "STATS body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    assert!(v.is_object(), "STATS JSON must be an object: {v}");
    v
}

/// Numeric field of a STATS reply.
pub fn stat_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("STATS field `{key}` missing or not an unsigned integer: {v}"))
}

/// Poll STATS on `s` until `cond(stats)` holds (30 s deadline, bounded).
pub fn wait_stats<F: Fn(&serde_json::Value) -> bool>(
    s: &mut TcpStream,
    what: &str,
    cond: F,
) -> serde_json::Value {
    let start = Instant::now();
    let mut last;
    loop {
        last = stats(s);
        if cond(&last) {
            return last;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for: {what}; last STATS: {last}");
        }
        thread::sleep(POLL_STEP);
    }
}

/// Open a connection used for STATS and wait until the server has accepted
/// exactly `total` connections (this one included) and has
/// `open` connections open (this one included). Returns the connection.
pub fn settle(addr: SocketAddr, total: u64, open: u64) -> TcpStream {
    let mut s = connect(addr);
    let v = wait_stats(
        &mut s,
        &format!("connections_accepted == {total} and connections_open == {open}"),
        |v| {
            let acc = stat_u64(v, "connections_accepted");
            assert!(
                acc <= total,
                "server accepted {acc} connections, test made only {total}: {v}"
            );
            acc == total && stat_u64(v, "connections_open") == open
        },
    );
    assert_eq!(stat_u64(&v, "connections_accepted"), total);
    s
}

/// A connection whose receive buffer is as small as the kernel allows
/// (4 KiB asked), so a client that does not read backs the server up at
/// once.
pub fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    let s = TcpStream::from(s);
    configure(&s);
    s
}

/// Ends a helper process the test drives through its stdin: closing stdin
/// tells it to finish; it gets 20 s before it is killed; then the threads
/// reading its output are joined.
pub fn end_child(
    stdin: Option<std::process::ChildStdin>,
    child: Option<std::process::Child>,
    readers: &mut Vec<thread::JoinHandle<()>>,
) {
    drop(stdin);
    if let Some(mut c) = child {
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    for h in readers.drain(..) {
        let _ = h.join();
    }
}

/// Graceful shutdown of our write side.
pub fn shutdown_write(s: &TcpStream) {
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

/// Whether this machine can bind an IPv6 loopback socket.
pub fn have_ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

/// xorshift64* — deterministic, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        Rng(x | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A body of `n` bytes whose content depends on `seed` (deterministic).
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    Rng::new(seed).bytes(n)
}

// ---------------------------------------------------------------------------
// A barrier that cannot deadlock the suite
// ---------------------------------------------------------------------------

/// Phase barrier for `n` threads with a deadline; if any participant panics
/// (see [`Gate::guard`]) every waiter panics instead of blocking forever.
pub struct Gate {
    n: usize,
    arrived: std::sync::Mutex<usize>,
    cv: std::sync::Condvar,
    failed: std::sync::atomic::AtomicBool,
    timeout: Duration,
}

/// Marks the gate failed if dropped while panicking.
pub struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0
                .failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.0.cv.notify_all();
        }
    }
}

impl Gate {
    pub fn new(n: usize, timeout: Duration) -> Gate {
        Gate {
            n,
            arrived: std::sync::Mutex::new(0),
            cv: std::sync::Condvar::new(),
            failed: std::sync::atomic::AtomicBool::new(false),
            timeout,
        }
    }

    pub fn guard(&self) -> GateGuard<'_> {
        GateGuard(self)
    }

    /// Wait until all `n` threads reached phase `phase` (1, 2, 3, ...).
    pub fn wait(&self, phase: usize) {
        let start = Instant::now();
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.cv.notify_all();
        while *arrived < self.n * phase {
            if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("another thread failed before phase {phase}");
            }
            let elapsed = start.elapsed();
            if elapsed >= self.timeout {
                self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
                self.cv.notify_all();
                panic!(
                    "phase {phase}: only {} of {} arrivals after {:?}",
                    *arrived,
                    self.n * phase,
                    self.timeout
                );
            }
            let (g, _) = self
                .cv
                .wait_timeout(
                    arrived,
                    (self.timeout - elapsed).min(Duration::from_millis(200)),
                )
                .unwrap();
            arrived = g;
        }
    }
}
