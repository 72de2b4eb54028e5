//! Mixed attack: every hostile pattern at once, beside 20 honest clients.
//!
//! One `cport server` (framed; `--files` holding a 1 MiB file, a 16 MiB
//! file that this test truncates and rewrites while it is being sent, a
//! FIFO and a symlink loop; descriptor limit 1,024 as on a machine with
//! default limits) is attacked for `CPORT_MIXED_SECS` seconds (default 8;
//! the hostile CI stage runs 30), all at once, by:
//!
//! - `garbage`: connections that send random bytes or frames with unknown
//!   commands, then half-close or reset;
//! - `bombs`: headers declaring 4 GiB, 2 GiB or `--max-frame` + 1 bytes;
//! - `slowloris`: 40 connections sending one byte of a frame a second;
//! - `pipeline`: 4 connections writing 64 KiB ECHOs and never reading;
//! - `unread_file`: up to 600 connections (ramped over the first third of
//!   the run) each pipelining 4 FILE requests for the 1 MiB file, never
//!   reading; reopened when the server closes them;
//! - `files`: one client fetching the 16 MiB file (truncated to 100 KiB and
//!   rewritten every second) and the 1 MiB file, checking every byte against
//!   what the file held, and asking for the symlink loop, a missing file
//!   and a path with `..`;
//! - `fifo`: one FILE request for the FIFO a second, each on its own
//!   connection;
//! - `churn`: connect, nothing / a PING / half a header, then reset
//!   (SO_LINGER 0);
//! - `stats`: one connection pipelining STATS 32 at a time;
//! - `broadcast`: one sender writing bursts of 500 1 KiB BROADCASTs as fast
//!   as the socket takes them, every 1.5 s (10,000 in 30 s).
//!
//! Beside them 20 honest clients send ECHO and PING with random bodies,
//! verify every reply byte for byte, check every broadcast they receive
//! (content, and no gap in the sender's sequence), and record each round
//! trip's latency. The attackers connect from 127.0.0.2-9; they are few
//! threads, at a lower scheduling priority, asleep in I/O or timers most
//! of the time, so that the honest clients are not starved by this
//! process.
//!
//! Asserts, all collected before failing (the failure lists every one):
//! no honest reply lost, late (5 s) or wrong, no broadcast lost or wrong;
//! honest p99 under 250 ms; the server's descriptors (counted in
//! /proc/PID/fd every 50 ms) stay below its limit; no FILE reply carries a
//! byte that was never in the file at that offset; `worker_stalls` in STATS
//! is 0 (skipped, saying so, if the server does not report it); SIGTERM
//! ends the server within 10 s with exit code 0 and a final summary with
//! nothing outstanding.
//!
//! The attack connections (slowloris, pipelining, unread FILE, pending
//! FIFO requests) stay open across the SIGTERM.
//!
//! `CPORT_MIXED_SKIP=fifo,unread_file` leaves attacks out, to tell which
//! one a failure comes from; the figures line names what was left out.

use std::collections::HashSet;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

const HONEST: usize = 20;
const SERVER_FD_LIMIT: u64 = 1024;
const P99_LIMIT: Duration = Duration::from_millis(250);
/// An honest reply later than this counts as lost.
const HONEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect and I/O timeout of the attackers.
const ATTACK_TIMEOUT: Duration = Duration::from_secs(3);

const SLOWLORIS: usize = 40;
const PIPELINERS: usize = 4;
const PIPELINE_FRAME: usize = 64 * 1024;
const UNREAD_FILE_CONNS: usize = 600;
const UNREAD_FILE_REQS: usize = 4;
const FIFO_MAX: u64 = 64;
const STATS_WINDOW: usize = 32;
const BCAST_BURST: u64 = 500;
const BCAST_EVERY: Duration = Duration::from_millis(1500);
/// Broadcast payload size (the server prefixes the 8-byte sender id).
const BCAST_LEN: usize = 1024;
const BCAST_MAGIC: &[u8; 8] = b"cportMIX";

const SMALL_LEN: usize = 1 << 20;
const BIG_LEN: usize = 16 << 20;
const TRUNC_TO: usize = 100 << 10;

const ERR_NOT_FOUND: u32 = 3;
const ERR_FORBIDDEN: u32 = 4;

const ATTACKS: [&str; 10] = [
    "garbage",
    "bombs",
    "slowloris",
    "pipeline",
    "unread_file",
    "files",
    "fifo",
    "churn",
    "stats",
    "broadcast",
];

fn mixed_secs() -> u64 {
    std::env::var("CPORT_MIXED_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(8)
}

fn skipped() -> HashSet<String> {
    let v = std::env::var("CPORT_MIXED_SKIP").unwrap_or_default();
    let set: HashSet<String> = v
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &set {
        assert!(
            ATTACKS.contains(&s.as_str()),
            "CPORT_MIXED_SKIP: unknown attack {s:?}; known: {ATTACKS:?}"
        );
    }
    set
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Counts {
    connect_failed: AtomicU64,
    garbage: AtomicU64,
    bombs: AtomicU64,
    bombs_refused: AtomicU64,
    slowloris_opened: AtomicU64,
    slowloris_closed: AtomicU64,
    pipelined_bytes: AtomicU64,
    pipeline_closed: AtomicU64,
    unread_opened: AtomicU64,
    unread_closed: AtomicU64,
    file_complete: AtomicU64,
    file_aborted: AtomicU64,
    file_invented: AtomicU64,
    file_refused_existing: AtomicU64,
    file_wrong_error: AtomicU64,
    file_unanswered: AtomicU64,
    truncations: AtomicU64,
    fifo_sent: AtomicU64,
    fifo_refused: AtomicU64,
    fifo_other: AtomicU64,
    fifo_unanswered: AtomicU64,
    churn: AtomicU64,
    churn_pongs: AtomicU64,
    churn_noreply: AtomicU64,
    stats_replies: AtomicU64,
    stats_batch_max_us: AtomicU64,
    stats_errors: AtomicU64,
    bcast_sent: AtomicU64,
    bcast_back: AtomicU64,
    bcast_sender_lost: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn val(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct Ctx {
    addr: SocketAddr,
    secs: u64,
    start: Instant,
    stop: AtomicBool,
    skip: HashSet<String>,
    c: Counts,
    /// First examples of what went wrong or looked odd, for the report.
    notes: Mutex<Vec<String>>,
}

impl Ctx {
    fn on(&self, attack: &str) -> bool {
        !self.skip.contains(attack)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, waking early when the run stops.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopped() {
            let now = Instant::now();
            if now >= end {
                return;
            }
            thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// Keeps the first few notes of each kind (`key` is the kind).
    fn note(&self, key: &str, text: String) {
        let mut n = self.notes.lock().unwrap();
        if n.iter().filter(|l| l.starts_with(key)).count() < 3 {
            n.push(format!("{key}: {text}"));
        }
    }
}

/// Attacker threads run at a lower priority than the honest clients: on a
/// 2-core machine they must not be the reason an honest reply is late.
fn lower_priority() {
    // SAFETY: setpriority(2) on this thread's own id; no memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 5);
    }
}

/// Connects from 127.0.0.`src` with the attackers' timeouts.
fn attack_connect(addr: SocketAddr, src: u8, rcvbuf: Option<usize>) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((Ipv4Addr::new(127, 0, 0, src), 0)).into())?;
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    s.connect_timeout(&addr.into(), ATTACK_TIMEOUT)?;
    let s = TcpStream::from(s);
    s.set_read_timeout(Some(ATTACK_TIMEOUT))?;
    s.set_write_timeout(Some(ATTACK_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads one frame (header, then a body of at most 32 MiB).
fn read_frame_from<R: Read>(r: &mut R) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
    let cmd = u32::from_be_bytes(h[4..].try_into().unwrap());
    if len > 32 << 20 {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("server announced a {len}-byte frame (cmd {cmd:#x})"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((cmd, body))
}

/// Reads frames until one that is not a BROADCAST (every connection
/// receives the broadcast flood).
fn read_reply<R: Read>(r: &mut R) -> io::Result<(u32, Vec<u8>)> {
    loop {
        let (cmd, body) = read_frame_from(r)?;
        if cmd != CMD_BROADCAST {
            return Ok((cmd, body));
        }
    }
}

/// An ERROR body (or any other frame's start) for a note.
fn describe_error(body: &[u8]) -> String {
    if body.len() < 4 {
        return format!("with a {}-byte body", body.len());
    }
    let msg = String::from_utf8_lossy(&body[4..body.len().min(124)]);
    format!(
        "{} {msg:?}",
        u32::from_be_bytes(body[..4].try_into().unwrap())
    )
}

/// Peer closed or reset, seen without reading (data may still be queued).
fn peer_gone(socks: &[&TcpStream]) -> Vec<bool> {
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
    // lives across the call; timeout 0 never blocks.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if rc < 0 {
        return vec![false; socks.len()];
    }
    fds.iter()
        .map(|p| p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
        .collect()
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

struct MixFiles {
    dir: PathBuf,
    small: Vec<u8>,
    big: Vec<u8>,
}

impl MixFiles {
    fn create() -> MixFiles {
        let dir = std::env::temp_dir().join(format!("cport-it-mixed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let small = pattern(0x5A11, SMALL_LEN);
        let big = pattern(0xB16, BIG_LEN);
        std::fs::write(dir.join("normal.bin"), &small).unwrap();
        std::fs::write(dir.join("big.bin"), &big).unwrap();
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
        assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
        std::os::unix::fs::symlink("loop2", dir.join("loop")).unwrap();
        std::os::unix::fs::symlink("loop", dir.join("loop2")).unwrap();
        MixFiles { dir, small, big }
    }

    fn path(&self) -> &str {
        self.dir.to_str().unwrap()
    }
}

impl Drop for MixFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Truncates the big file to 100 KiB and writes it back, once a second.
fn truncator(ctx: &Ctx, path: &Path, big: &[u8]) {
    lower_priority();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    while !ctx.stopped() {
        f.set_len(TRUNC_TO as u64).unwrap();
        inc(&ctx.c.truncations);
        ctx.sleep(Duration::from_millis(150));
        // Sequential writes from the cut: the file never has a hole, so
        // every byte it holds at offset i is big[i].
        for (i, chunk) in big[TRUNC_TO..].chunks(1 << 20).enumerate() {
            f.write_all_at(chunk, (TRUNC_TO + i * (1 << 20)) as u64)
                .unwrap();
        }
        ctx.sleep(Duration::from_millis(850));
    }
}

enum Fetch {
    Complete,
    /// Closed before the announced length (every byte before it right).
    Aborted,
    Invented {
        offset: usize,
        announced: usize,
        /// Up to 16 bytes received from `offset`, and what the file held.
        got: Vec<u8>,
        want: Vec<u8>,
    },
    Error(u32, String),
    Unanswered(String),
    Other(String),
}

/// FILE `name`, checking every byte against `content` (what the file holds
/// at each offset whenever it holds that offset). With `pace`, reads 64 KiB
/// at a time and sleeps `pace` after each read, as a slow client does (so
/// that a reply spans a truncation).
fn fetch(s: &mut TcpStream, name: &str, content: &[u8], pace: Option<Duration>) -> Fetch {
    if let Err(e) = write_frame(s, CMD_FILE, name.as_bytes()) {
        return Fetch::Other(format!("write: {e}"));
    }
    let mut h = [0u8; HEADER_LEN];
    let (len, cmd) = loop {
        if let Err(e) = s.read_exact(&mut h) {
            return if timed_out(&e) {
                Fetch::Unanswered(format!("no reply header in {ATTACK_TIMEOUT:?}"))
            } else {
                Fetch::Other(format!("reading the header: {e}"))
            };
        }
        let len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
        let cmd = u32::from_be_bytes(h[4..].try_into().unwrap());
        if cmd != CMD_BROADCAST {
            break (len, cmd);
        }
        // A broadcast ahead of the reply: skip it.
        let mut skip = vec![0u8; len.min(1 << 20)];
        if let Err(e) = s.read_exact(&mut skip) {
            return Fetch::Other(format!("reading a broadcast: {e}"));
        }
    };
    if cmd == CMD_ERROR {
        let mut b = vec![0u8; len.min(4096)];
        if s.read_exact(&mut b).is_err() || b.len() < 4 {
            return Fetch::Other("short ERROR frame".into());
        }
        let code = u32::from_be_bytes(b[..4].try_into().unwrap());
        return Fetch::Error(code, String::from_utf8_lossy(&b[4..]).into_owned());
    }
    if cmd != CMD_FILE {
        return Fetch::Other(format!("reply has cmd {cmd:#x}"));
    }
    if len > content.len() {
        return Fetch::Other(format!(
            "announced {len} bytes; the file never held more than {}",
            content.len()
        ));
    }
    let mut buf = vec![
        0u8;
        if pace.is_some() {
            64 * 1024
        } else {
            256 * 1024
        }
    ];
    let mut off = 0;
    while off < len {
        if let Some(p) = pace {
            thread::sleep(p);
        }
        let want = (len - off).min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => return Fetch::Aborted,
            Ok(n) => {
                if buf[..n] != content[off..off + n] {
                    let first = buf[..n]
                        .iter()
                        .zip(&content[off..off + n])
                        .position(|(a, b)| a != b)
                        .unwrap();
                    let end = (first + 16).min(n);
                    return Fetch::Invented {
                        offset: off + first,
                        announced: len,
                        got: buf[first..end].to_vec(),
                        want: content[off + first..off + end].to_vec(),
                    };
                }
                off += n;
            }
            Err(e) if timed_out(&e) => {
                return Fetch::Unanswered(format!("stalled at {off} of {len} bytes"));
            }
            Err(e) if is_closed_error(&e) => return Fetch::Aborted,
            Err(e) => return Fetch::Other(format!("read at {off}: {e}")),
        }
    }
    Fetch::Complete
}

/// FILE `name`, expecting ERROR `want` (any code if None).
fn file_error(ctx: &Ctx, s: &mut TcpStream, name: &str, want: Option<u32>) -> bool {
    match fetch(s, name, &[], None) {
        Fetch::Error(code, msg) => {
            if want.is_some_and(|w| w != code) {
                inc(&ctx.c.file_wrong_error);
                ctx.note(
                    "file_wrong_error",
                    format!("FILE {name:?}: ERROR {code} {msg:?}"),
                );
            } else {
                ctx.note(
                    "file_error_seen",
                    format!("FILE {name:?}: ERROR {code} {msg:?}"),
                );
            }
            true
        }
        Fetch::Unanswered(e) => {
            inc(&ctx.c.file_unanswered);
            ctx.note("file_unanswered", format!("FILE {name:?}: {e}"));
            false
        }
        Fetch::Complete | Fetch::Aborted | Fetch::Invented { .. } => {
            inc(&ctx.c.file_wrong_error);
            ctx.note("file_wrong_error", format!("FILE {name:?}: not refused"));
            false
        }
        Fetch::Other(e) => {
            inc(&ctx.c.file_wrong_error);
            ctx.note("file_wrong_error", format!("FILE {name:?}: {e}"));
            false
        }
    }
}

/// Fetches the truncated and the normal file, checking every byte, and asks
/// for the symlink loop, a missing file and a path with `..`.
fn file_abuse(ctx: &Ctx, files: &MixFiles) {
    lower_priority();
    let mut conn: Option<TcpStream> = None;
    let mut k = 0u64;
    while !ctx.stopped() {
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match attack_connect(ctx.addr, 6, Some(64 * 1024)) {
                Ok(s) => conn.insert(s),
                Err(_) => {
                    inc(&ctx.c.connect_failed);
                    ctx.sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        k += 1;
        let keep = match k % 6 {
            0..=2 => {
                let (name, content, pace) = if k % 6 == 2 {
                    ("normal.bin", &files.small, None)
                } else {
                    ("big.bin", &files.big, Some(Duration::from_millis(4)))
                };
                match fetch(s, name, content, pace) {
                    Fetch::Complete => {
                        inc(&ctx.c.file_complete);
                        true
                    }
                    Fetch::Aborted => {
                        inc(&ctx.c.file_aborted);
                        false
                    }
                    Fetch::Invented {
                        offset,
                        announced,
                        got,
                        want,
                    } => {
                        inc(&ctx.c.file_invented);
                        ctx.note(
                            "file_invented",
                            format!(
                                "FILE {name}: byte {offset} of a {announced}-byte reply was never at that offset of the file \
                                 (got {}, the file holds {}; it was cut to {TRUNC_TO} bytes {} times so far)",
                                hex(&got),
                                hex(&want),
                                val(&ctx.c.truncations)
                            ),
                        );
                        false
                    }
                    Fetch::Error(code, msg) => {
                        if code == ERR_NOT_FOUND {
                            inc(&ctx.c.file_refused_existing);
                        } else {
                            inc(&ctx.c.file_wrong_error);
                        }
                        ctx.note("file_refused", format!("FILE {name}: ERROR {code} {msg:?}"));
                        true
                    }
                    Fetch::Unanswered(e) => {
                        inc(&ctx.c.file_unanswered);
                        ctx.note("file_unanswered", format!("FILE {name}: {e}"));
                        false
                    }
                    Fetch::Other(e) => {
                        inc(&ctx.c.file_wrong_error);
                        ctx.note("file_wrong_error", format!("FILE {name}: {e}"));
                        false
                    }
                }
            }
            3 => file_error(ctx, s, "loop", None),
            4 => file_error(ctx, s, "missing.bin", Some(ERR_NOT_FOUND)),
            _ => file_error(ctx, s, "../normal.bin", Some(ERR_FORBIDDEN)),
        };
        if !keep {
            conn = None;
        }
        ctx.sleep(Duration::from_millis(50));
    }
}

/// One FILE request for the FIFO a second, each on its own connection;
/// unanswered ones stay open. Returns them.
fn fifo_abuse(ctx: &Ctx) -> Vec<TcpStream> {
    lower_priority();
    let mut pending = Vec::new();
    ctx.sleep(Duration::from_secs(1));
    while !ctx.stopped() && val(&ctx.c.fifo_sent) < FIFO_MAX {
        let Ok(mut s) = attack_connect(ctx.addr, 7, None) else {
            inc(&ctx.c.connect_failed);
            ctx.sleep(Duration::from_secs(1));
            continue;
        };
        inc(&ctx.c.fifo_sent);
        let _ = write_frame(&mut s, CMD_FILE, b"fifo");
        match read_reply(&mut s) {
            Ok((CMD_ERROR, b)) if b.len() >= 4 && b[..4] == ERR_FORBIDDEN.to_be_bytes() => {
                inc(&ctx.c.fifo_refused);
            }
            Ok((cmd, b)) => {
                inc(&ctx.c.fifo_other);
                ctx.note(
                    "fifo_other",
                    format!("FILE fifo: cmd {cmd:#x} {}", describe_error(&b)),
                );
            }
            Err(e) if timed_out(&e) => {
                inc(&ctx.c.fifo_unanswered);
                pending.push(s);
            }
            Err(e) => {
                inc(&ctx.c.fifo_other);
                ctx.note("fifo_other", format!("FILE fifo: {e}"));
            }
        }
        ctx.sleep(Duration::from_secs(1));
    }
    pending
}

// ---------------------------------------------------------------------------
// Garbage and length bombs
// ---------------------------------------------------------------------------

const UNKNOWN_CMDS: [u32; 6] = [0, 6, 7, 9, 0x1234, 0xFFFF_FFFE];

fn garbage_once(ctx: &Ctx, rng: &mut Rng) {
    let Ok(mut s) = attack_connect(ctx.addr, 2, None) else {
        inc(&ctx.c.connect_failed);
        return;
    };
    let mut data = Vec::new();
    if rng.below(2) == 0 {
        let n = 8 + rng.below(4096) as usize;
        data = rng.bytes(n);
    } else {
        for _ in 0..1 + rng.below(8) {
            let n = rng.below(200) as usize;
            let cmd = UNKNOWN_CMDS[rng.below(UNKNOWN_CMDS.len() as u64) as usize];
            data.extend_from_slice(&encode_frame(cmd, &rng.bytes(n)));
        }
        let tail = rng.below(8) as usize;
        data.extend_from_slice(&rng.bytes(tail));
    }
    let _ = s.write_all(&data);
    inc(&ctx.c.garbage);
    if rng.below(2) == 0 {
        reset(s);
    } else {
        let _ = s.shutdown(Shutdown::Write);
        let mut b = [0u8; 4096];
        let t0 = Instant::now();
        while t0.elapsed() < ATTACK_TIMEOUT {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

fn bomb_once(ctx: &Ctx, rng: &mut Rng) {
    let Ok(mut s) = attack_connect(ctx.addr, 2, None) else {
        inc(&ctx.c.connect_failed);
        return;
    };
    let lens = [u32::MAX, 0x8000_0000, DEFAULT_MAX_FRAME as u32 + 1];
    let cmds = [CMD_ECHO, CMD_PING, CMD_BROADCAST, CMD_FILE];
    let len = lens[rng.below(3) as usize];
    let cmd = cmds[rng.below(4) as usize];
    let mut data = encode_header(len, cmd).to_vec();
    let extra = rng.below(64) as usize;
    data.extend_from_slice(&rng.bytes(extra));
    let _ = s.write_all(&data);
    inc(&ctx.c.bombs);
    let refused = match read_reply(&mut s) {
        Ok((CMD_ERROR, b)) if b.len() >= 4 && b[..4] == 1u32.to_be_bytes() => {
            let mut rest = [0u8; 64];
            match s.read(&mut rest) {
                Ok(0) => true,
                Err(e) => is_closed_error(&e),
                Ok(_) => false,
            }
        }
        Ok((c, b)) => {
            ctx.note(
                "bomb_other",
                format!("{len}-byte header: cmd {c:#x} {}", describe_error(&b)),
            );
            false
        }
        Err(e) if timed_out(&e) => {
            ctx.note(
                "bomb_other",
                format!("{len}-byte header: no reply within {ATTACK_TIMEOUT:?}"),
            );
            false
        }
        Err(e) => {
            ctx.note("bomb_other", format!("{len}-byte header: {e}"));
            false
        }
    };
    if refused {
        inc(&ctx.c.bombs_refused);
    }
}

fn garbage_and_bombs(ctx: &Ctx) {
    lower_priority();
    let mut rng = Rng::new(0x06A7_BA6E);
    let mut i = 0u64;
    while !ctx.stopped() {
        i += 1;
        if ctx.on("garbage") && (i.is_multiple_of(2) || !ctx.on("bombs")) {
            garbage_once(ctx, &mut rng);
        } else {
            bomb_once(ctx, &mut rng);
        }
        ctx.sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Connections held open: slowloris, pipelining, unread FILE replies
// ---------------------------------------------------------------------------

struct Trickler {
    s: TcpStream,
    sent: usize,
}

/// Opens, feeds and reopens the held connections every 100 ms. Returns
/// them at the end, to be closed after the server's SIGTERM.
fn holder(ctx: &Ctx) -> Vec<TcpStream> {
    lower_priority();
    let slow_on = ctx.on("slowloris");
    let pipe_on = ctx.on("pipeline");
    let unread_on = ctx.on("unread_file");
    let slow_frame = encode_frame(CMD_ECHO, &[0x5A; 100]);
    let pipe_frame = encode_frame(CMD_ECHO, &pattern(0x919E, PIPELINE_FRAME));
    let mut file_reqs = Vec::new();
    for _ in 0..UNREAD_FILE_REQS {
        file_reqs.extend_from_slice(&encode_frame(CMD_FILE, b"normal.bin"));
    }
    let mut slow: Vec<Option<Trickler>> = (0..SLOWLORIS).map(|_| None).collect();
    let mut pipe: Vec<Option<(TcpStream, usize)>> = (0..PIPELINERS).map(|_| None).collect();
    let mut unread: Vec<Option<TcpStream>> = Vec::new();
    let ramp = Duration::from_secs(ctx.secs).div_f64(3.0);
    let mut tick = 0u64;
    while !ctx.stopped() {
        tick += 1;
        let second = tick.is_multiple_of(10);
        // Slowloris: one byte a second each, spread over the second.
        if slow_on {
            for (i, slot) in slow.iter_mut().enumerate() {
                if slot.is_none() && (second || tick == 1) {
                    match attack_connect(ctx.addr, 3, None) {
                        Ok(mut s) => {
                            let _ = s.write_all(&slow_frame[..3]);
                            let _ = s.set_nonblocking(true);
                            inc(&ctx.c.slowloris_opened);
                            *slot = Some(Trickler { s, sent: 3 });
                        }
                        Err(_) => inc(&ctx.c.connect_failed),
                    }
                    continue;
                }
                let Some(t) = slot.as_mut() else { continue };
                if !(tick as usize + i).is_multiple_of(10) {
                    continue;
                }
                // Read what came (broadcasts): a slowloris attacker wants
                // to keep its slot, not to be dropped as a slow consumer.
                let mut b = [0u8; 16 * 1024];
                let gone = loop {
                    match t.s.read(&mut b) {
                        Ok(0) => break true,
                        Ok(_) => {}
                        Err(e) => break e.kind() != ErrorKind::WouldBlock,
                    }
                };
                let at = t.sent % slow_frame.len();
                let gone = gone
                    || match t.s.write(&slow_frame[at..at + 1]) {
                        Ok(_) => {
                            t.sent += 1;
                            false
                        }
                        Err(e) => e.kind() != ErrorKind::WouldBlock,
                    };
                if gone {
                    inc(&ctx.c.slowloris_closed);
                    *slot = None;
                }
            }
        }
        // Pipelining without reading: write until the socket is full.
        if pipe_on {
            for slot in pipe.iter_mut() {
                if slot.is_none() {
                    match attack_connect(ctx.addr, 3, None) {
                        Ok(s) => {
                            let _ = s.set_nonblocking(true);
                            *slot = Some((s, 0));
                        }
                        Err(_) => {
                            inc(&ctx.c.connect_failed);
                            continue;
                        }
                    }
                }
                let Some((s, at)) = slot.as_mut() else {
                    continue;
                };
                let mut budget = 1 << 20;
                let mut gone = false;
                while budget > 0 {
                    match s.write(&pipe_frame[*at..]) {
                        Ok(n) => {
                            ctx.c.pipelined_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            *at = (*at + n) % pipe_frame.len();
                            budget -= n.min(budget);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            gone = true;
                            break;
                        }
                    }
                }
                if gone || (second && peer_gone(&[&*s])[0]) {
                    inc(&ctx.c.pipeline_closed);
                    *slot = None;
                }
            }
        }
        // Unread FILE replies: ramp up over the first third of the run.
        if unread_on {
            let target = ((UNREAD_FILE_CONNS as f64)
                * (ctx.start.elapsed().as_secs_f64() / ramp.as_secs_f64()).min(1.0))
                as usize;
            if second {
                let live: Vec<usize> = (0..unread.len()).filter(|&i| unread[i].is_some()).collect();
                let socks: Vec<&TcpStream> =
                    live.iter().map(|&i| unread[i].as_ref().unwrap()).collect();
                let gone = peer_gone(&socks);
                for (k, &i) in live.iter().enumerate() {
                    if gone[k] {
                        inc(&ctx.c.unread_closed);
                        unread[i] = None;
                    }
                }
            }
            let mut opened = 0;
            for i in 0..target {
                if opened >= 40 {
                    break;
                }
                if i < unread.len() && unread[i].is_some() {
                    continue;
                }
                // Small receive buffers: the replies wait in the server.
                match attack_connect(ctx.addr, 5, Some(16 * 1024)) {
                    Ok(mut s) => {
                        let _ = s.write_all(&file_reqs);
                        let _ = s.set_nonblocking(true);
                        inc(&ctx.c.unread_opened);
                        opened += 1;
                        if i < unread.len() {
                            unread[i] = Some(s);
                        } else {
                            unread.push(Some(s));
                        }
                    }
                    Err(_) => {
                        inc(&ctx.c.connect_failed);
                        break;
                    }
                }
            }
        }
        ctx.sleep(Duration::from_millis(100));
    }
    let mut all: Vec<TcpStream> = slow.into_iter().flatten().map(|t| t.s).collect();
    all.extend(pipe.into_iter().flatten().map(|(s, _)| s));
    all.extend(unread.into_iter().flatten());
    all
}

// ---------------------------------------------------------------------------
// Churn, STATS flood, broadcast flood
// ---------------------------------------------------------------------------

fn churn(ctx: &Ctx) {
    lower_priority();
    let mut rng = Rng::new(0xC4_0412);
    while !ctx.stopped() {
        let Ok(mut s) = attack_connect(ctx.addr, 4, None) else {
            inc(&ctx.c.connect_failed);
            ctx.sleep(Duration::from_millis(50));
            continue;
        };
        match rng.below(3) {
            0 => {}
            1 => {
                let _ = write_frame(&mut s, CMD_PING, b"churn");
                let pong = matches!(read_reply(&mut s), Ok((CMD_PONG, b)) if b == b"churn");
                if pong {
                    inc(&ctx.c.churn_pongs);
                } else {
                    inc(&ctx.c.churn_noreply);
                }
            }
            _ => {
                let _ = s.write_all(&encode_header(100, CMD_ECHO)[..5]);
            }
        }
        reset(s);
        inc(&ctx.c.churn);
        ctx.sleep(Duration::from_millis(5));
    }
}

fn stats_flood(ctx: &Ctx) {
    lower_priority();
    let batch: Vec<u8> = (0..STATS_WINDOW)
        .flat_map(|_| encode_frame(CMD_STATS, &[]))
        .collect();
    while !ctx.stopped() {
        let Ok(s) = attack_connect(ctx.addr, 8, None) else {
            inc(&ctx.c.connect_failed);
            ctx.sleep(Duration::from_millis(100));
            continue;
        };
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::with_capacity(256 * 1024, s);
        'conn: while !ctx.stopped() {
            let t0 = Instant::now();
            if w.write_all(&batch).is_err() {
                inc(&ctx.c.stats_errors);
                break;
            }
            let mut got = 0;
            while got < STATS_WINDOW {
                match read_frame_from(&mut r) {
                    Ok((CMD_STATS, _)) => got += 1,
                    Ok((CMD_BROADCAST, _)) => {}
                    Ok((c, b)) => {
                        inc(&ctx.c.stats_errors);
                        ctx.note("stats", format!("cmd {c:#x} {}", describe_error(&b)));
                        break 'conn;
                    }
                    Err(e) => {
                        inc(&ctx.c.stats_errors);
                        if timed_out(&e) {
                            ctx.note("stats", format!("no reply within {ATTACK_TIMEOUT:?}"));
                        } else {
                            ctx.note("stats", format!("{e}"));
                        }
                        break 'conn;
                    }
                }
            }
            ctx.c
                .stats_replies
                .fetch_add(STATS_WINDOW as u64, Ordering::Relaxed);
            ctx.c
                .stats_batch_max_us
                .fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(2));
        }
        ctx.sleep(Duration::from_millis(100));
    }
}

/// Broadcast payload number `seq`: magic, seq, then bytes derived from seq.
fn bcast_payload(seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BCAST_LEN);
    v.extend_from_slice(BCAST_MAGIC);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend((0..BCAST_LEN - 16).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)));
    v
}

/// `write_all` that waits out a server applying backpressure (a write
/// timeout is not an error) until the run stops.
fn write_while_running(ctx: &Ctx, w: &mut impl Write, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if timed_out(&e) && !ctx.stopped() => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn broadcast_flood(ctx: &Ctx) {
    lower_priority();
    let mut seq = 0u64;
    while !ctx.stopped() {
        let Ok(s) = attack_connect(ctx.addr, 9, None) else {
            inc(&ctx.c.connect_failed);
            ctx.sleep(Duration::from_millis(100));
            continue;
        };
        let r = s.try_clone().unwrap();
        thread::scope(|sc| {
            // The sender gets its own broadcasts back: read them, or it
            // is a slow consumer itself.
            sc.spawn(|| {
                lower_priority();
                let mut r = BufReader::with_capacity(256 * 1024, r);
                loop {
                    match read_frame_from(&mut r) {
                        Ok((CMD_BROADCAST, _)) => inc(&ctx.c.bcast_back),
                        Ok((c, b)) => {
                            inc(&ctx.c.bcast_sender_lost);
                            ctx.note(
                                "broadcast_sender",
                                format!("cmd {c:#x} {}", describe_error(&b)),
                            );
                            return;
                        }
                        Err(e) if timed_out(&e) && !ctx.stopped() => {}
                        Err(_) => return,
                    }
                }
            });
            let mut w = &s;
            while !ctx.stopped() {
                let mut burst = Vec::with_capacity(BCAST_BURST as usize * (BCAST_LEN + 8));
                for i in 0..BCAST_BURST {
                    burst.extend_from_slice(&encode_frame(CMD_BROADCAST, &bcast_payload(seq + i)));
                }
                if let Err(e) = write_while_running(ctx, &mut w, &burst) {
                    ctx.note("broadcast_sender", format!("write: {e}"));
                    break;
                }
                seq += BCAST_BURST;
                ctx.c.bcast_sent.fetch_add(BCAST_BURST, Ordering::Relaxed);
                ctx.sleep(BCAST_EVERY);
            }
            let _ = s.shutdown(Shutdown::Both);
        });
    }
}

// ---------------------------------------------------------------------------
// Honest clients
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Honest {
    lat_us: Vec<u64>,
    ok: u64,
    failed: u64,
    first_failures: Vec<String>,
    broadcasts: u64,
    foreign: u64,
}

struct HConn {
    w: TcpStream,
    r: BufReader<TcpStream>,
    /// (sender id, last sequence number) of the last flood broadcast seen.
    last_bcast: Option<(u64, u64)>,
}

fn honest_connect(addr: SocketAddr) -> io::Result<HConn> {
    let s = TcpStream::connect_timeout(&addr, HONEST_TIMEOUT)?;
    s.set_read_timeout(Some(HONEST_TIMEOUT))?;
    s.set_write_timeout(Some(HONEST_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(HConn {
        w: s.try_clone()?,
        r: BufReader::with_capacity(256 * 1024, s),
        last_bcast: None,
    })
}

fn check_broadcast(c: &mut HConn, b: &[u8], out: &mut Honest) -> Result<(), String> {
    if b.len() < 24 || &b[8..16] != BCAST_MAGIC {
        out.foreign += 1;
        return Ok(());
    }
    out.broadcasts += 1;
    let sender = u64::from_be_bytes(b[..8].try_into().unwrap());
    let seq = u64::from_be_bytes(b[16..24].try_into().unwrap());
    if b[8..] != bcast_payload(seq)[..] {
        return Err(format!(
            "broadcast #{seq} corrupted ({} bytes, want {})",
            b.len(),
            8 + BCAST_LEN
        ));
    }
    if let Some((last_sender, last)) = c.last_bcast
        && last_sender == sender
        && seq != last + 1
    {
        return Err(format!(
            "broadcast #{seq} arrived after #{last} (sender {sender}): lost or out of order"
        ));
    }
    c.last_bcast = Some((sender, seq));
    Ok(())
}

fn round_trip(
    c: &mut HConn,
    cmd: u32,
    want: u32,
    body: &[u8],
    out: &mut Honest,
) -> Result<(), String> {
    c.w.write_all(&encode_frame(cmd, body))
        .map_err(|e| format!("write: {e} ({:?})", e.kind()))?;
    loop {
        let (rc, rb) = read_frame_from(&mut c.r).map_err(|e| {
            if timed_out(&e) {
                format!("no reply within {HONEST_TIMEOUT:?}")
            } else {
                format!("read: {e} ({:?})", e.kind())
            }
        })?;
        match rc {
            CMD_BROADCAST => check_broadcast(c, &rb, out)?,
            CMD_ERROR => return Err(format!("got ERROR {}", describe_error(&rb))),
            _ if rc != want => return Err(format!("reply has cmd {rc:#x}, want {want:#x}")),
            _ if rb != body => {
                let at = rb.iter().zip(body).position(|(a, b)| a != b);
                return Err(format!(
                    "reply body differs: {} bytes for {} sent, first difference at {:?}",
                    rb.len(),
                    body.len(),
                    at
                ));
            }
            _ => return Ok(()),
        }
    }
}

fn honest_client(ctx: &Ctx, id: usize, first: HConn) -> Honest {
    let mut rng = Rng::new(0x4D49_5845 + id as u64);
    let mut conn = Some(first);
    let mut out = Honest::default();
    // `at`: when the failed request was sent (or the reconnect tried).
    let fail = |out: &mut Honest, at: Instant, what: String| {
        out.failed += 1;
        if out.first_failures.len() < 3 {
            out.first_failures.push(format!(
                "honest #{id}, sent at {:.1}s: {what}",
                at.saturating_duration_since(ctx.start).as_secs_f64()
            ));
        }
    };
    while !ctx.stopped() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match honest_connect(ctx.addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    fail(&mut out, Instant::now(), format!("reconnect: {e}"));
                    ctx.sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let ping = rng.below(2) == 0;
        let n = if rng.below(10) == 0 {
            rng.below(16 * 1024)
        } else {
            rng.below(1024)
        } as usize;
        let body = rng.bytes(n);
        let (cmd, want, name) = if ping {
            (CMD_PING, CMD_PONG, "PING")
        } else {
            (CMD_ECHO, CMD_ECHO, "ECHO")
        };
        let t0 = Instant::now();
        match round_trip(c, cmd, want, &body, &mut out) {
            Ok(()) => {
                out.lat_us.push(t0.elapsed().as_micros() as u64);
                out.ok += 1;
            }
            Err(e) => {
                fail(&mut out, t0, format!("{name} of {n} bytes: {e}"));
                conn = None;
            }
        }
        thread::sleep(Duration::from_millis(2 + rng.below(9)));
    }
    out
}

// ---------------------------------------------------------------------------
// Server measurements
// ---------------------------------------------------------------------------

fn fd_count(pid: i32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

fn fd_soft_limit(pid: i32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples the server's descriptors and RSS every 50 ms: (fd peak, RSS peak KiB).
fn sampler(ctx: &Ctx, pid: i32) -> (u64, u64) {
    let (mut fds, mut rss) = (0, 0);
    while !ctx.stopped() {
        fds = fds.max(fd_count(pid).unwrap_or(0));
        rss = rss.max(rss_kib_of(pid).unwrap_or(0));
        thread::sleep(Duration::from_millis(50));
    }
    (fds, rss)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(us: u64) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

/// STATS on a fresh connection (broadcasts skipped), within 5 s.
fn final_stats(addr: SocketAddr) -> Result<serde_json::Value, String> {
    let mut c = honest_connect(addr).map_err(|e| format!("connect: {e}"))?;
    c.w.write_all(&encode_frame(CMD_STATS, &[]))
        .map_err(|e| format!("write: {e}"))?;
    loop {
        match read_frame_from(&mut c.r) {
            Ok((CMD_STATS, b)) => {
                return serde_json::from_slice(&b).map_err(|e| format!("STATS is not JSON: {e}"));
            }
            Ok((CMD_BROADCAST, _)) => {}
            Ok((cmd, b)) => return Err(format!("cmd {cmd:#x} {}", describe_error(&b))),
            Err(e) if timed_out(&e) => return Err(format!("no reply within {HONEST_TIMEOUT:?}")),
            Err(e) => return Err(format!("{e} ({:?})", e.kind())),
        }
    }
}

/// `worker_stalls` as a number (a number, or the sum of an object's or an
/// array's numbers), None if STATS does not have it.
fn worker_stalls(v: &serde_json::Value) -> Option<u64> {
    fn sum(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
            serde_json::Value::Object(m) => m.values().map(sum).sum(),
            serde_json::Value::Array(a) => a.iter().map(sum).sum(),
            _ => 0,
        }
    }
    v.get("worker_stalls").map(sum)
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn mixed_attack_beside_20_honest_clients() {
    let secs = mixed_secs();
    let skip = skipped();
    let files = MixFiles::create();
    let mut srv = Server::start_with_fd_limit(&["--files", files.path()], SERVER_FD_LIMIT);
    let addr = srv.addr();
    let pid = srv.pid();
    let limit = fd_soft_limit(pid).expect("server descriptor limit from /proc");
    let rss_start = rss_kib_of(pid).unwrap_or(0);
    let backend = test_backend().unwrap_or_else(|| "default".into());

    let mut first: Vec<HConn> = Vec::new();
    for i in 0..HONEST {
        let mut c = honest_connect(addr).unwrap_or_else(|e| panic!("honest #{i}: {e}"));
        let mut out = Honest::default();
        round_trip(&mut c, CMD_PING, CMD_PONG, b"hello", &mut out)
            .unwrap_or_else(|e| panic!("honest #{i} before the attack: {e}"));
        first.push(c);
    }

    let ctx = Ctx {
        addr,
        secs,
        start: Instant::now(),
        stop: AtomicBool::new(false),
        skip: skip.clone(),
        c: Counts::default(),
        notes: Mutex::new(Vec::new()),
    };
    let big_path = files.dir.join("big.bin");
    let (honest, (fd_peak, rss_peak), held) = thread::scope(|sc| {
        let ctx = &ctx;
        let sampler = sc.spawn(move || sampler(ctx, pid));
        let honest: Vec<_> = first
            .into_iter()
            .enumerate()
            .map(|(i, c)| sc.spawn(move || honest_client(ctx, i, c)))
            .collect();
        let mut attackers = Vec::new();
        if ctx.on("garbage") || ctx.on("bombs") {
            attackers.push(sc.spawn(move || garbage_and_bombs(ctx)));
        }
        if ctx.on("files") {
            let files = &files;
            let big_path = &big_path;
            attackers.push(sc.spawn(move || truncator(ctx, big_path, &files.big)));
            attackers.push(sc.spawn(move || file_abuse(ctx, files)));
        }
        if ctx.on("churn") {
            attackers.push(sc.spawn(move || churn(ctx)));
        }
        if ctx.on("stats") {
            attackers.push(sc.spawn(move || stats_flood(ctx)));
        }
        if ctx.on("broadcast") {
            attackers.push(sc.spawn(move || broadcast_flood(ctx)));
        }
        let holder = sc.spawn(move || holder(ctx));
        let fifo = ctx.on("fifo").then(|| sc.spawn(move || fifo_abuse(ctx)));

        let run = Duration::from_secs(secs);
        while ctx.start.elapsed() < run {
            thread::sleep(Duration::from_millis(100));
        }
        ctx.stop.store(true, Ordering::Relaxed);
        let honest: Vec<Honest> = honest.into_iter().map(|h| h.join().unwrap()).collect();
        for a in attackers {
            a.join().unwrap();
        }
        let mut held = holder.join().unwrap();
        if let Some(f) = fifo {
            held.extend(f.join().unwrap());
        }
        (honest, sampler.join().unwrap(), held)
    });

    let mut failures: Vec<String> = Vec::new();

    // Honest clients: nothing lost, late or wrong; p99.
    let mut lat: Vec<u64> = honest
        .iter()
        .flat_map(|h| h.lat_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let ok: u64 = honest.iter().map(|h| h.ok).sum();
    let failed: u64 = honest.iter().map(|h| h.failed).sum();
    let broadcasts: u64 = honest.iter().map(|h| h.broadcasts).sum();
    let foreign: u64 = honest.iter().map(|h| h.foreign).sum();
    let (p50, p99, max) = (
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
    );
    if failed > 0 {
        let examples: Vec<&String> = honest
            .iter()
            .flat_map(|h| &h.first_failures)
            .take(8)
            .collect();
        failures.push(format!(
            "{failed} honest requests lost or wrong ({ok} good); first: {examples:#?}"
        ));
    }
    if ok == 0 {
        failures.push("no honest request was answered".into());
    }
    if Duration::from_micros(p99) >= P99_LIMIT {
        failures.push(format!(
            "honest p99 {} is not under {P99_LIMIT:?} (p50 {}, max {})",
            ms(p99),
            ms(p50),
            ms(max)
        ));
    }

    // Descriptors below the limit.
    let fd_end = fd_count(pid).unwrap_or(0);
    let fd_peak = fd_peak.max(fd_end);
    if fd_peak >= limit {
        failures.push(format!(
            "server descriptors reached {fd_peak} of its limit {limit}"
        ));
    }

    // FILE replies carry only bytes the file held.
    let c = &ctx.c;
    if val(&c.file_invented) > 0 {
        failures.push(format!(
            "{} FILE replies carried bytes that were never in the file",
            val(&c.file_invented)
        ));
    }

    // Worker stalls, from STATS.
    let stalls = match final_stats(addr) {
        Ok(v) => match worker_stalls(&v) {
            Some(n) => {
                // A worker descheduled for 100 ms by the other tests of a
                // parallel `cargo test` counts as a stall too, so the bound
                // is asserted where the test runs alone (the hostile CI
                // stage sets CPORT_MIXED_SECS and runs one test at a time).
                if n > 0 && std::env::var_os("CPORT_MIXED_SECS").is_some() {
                    failures.push(format!("STATS reports {n} worker stalls over 100 ms"));
                } else if n > 0 {
                    println!(
                        "note: {n} worker stall(s) over 100 ms, not asserted beside other tests \
                         (CPORT_MIXED_SECS asserts it)"
                    );
                }
                n.to_string()
            }
            None => {
                println!("worker_stalls: not reported by this server");
                "not-reported".into()
            }
        },
        Err(e) => {
            failures.push(format!("STATS after the attack: {e}"));
            "unreadable".into()
        }
    };

    // SIGTERM with the attack connections still open.
    let (status, took, stderr) = srv.stop_within(libc::SIGTERM, STOP_GRACE);
    drop(held);
    if status.code() != Some(0) || took >= STOP_GRACE {
        failures.push(format!(
            "SIGTERM: server exited with {status:?} after {took:?} (want code 0 within {STOP_GRACE:?})"
        ));
    }
    if stderr.contains("panicked") {
        failures.push(format!("server panicked:\n{}", tail(&stderr, 30)));
    }
    let summary = if stderr.contains("final summary:") {
        let s = parse_summary(&stderr);
        for key in ["outstanding_ops", "outstanding_bufs"] {
            match s.get(key) {
                Some(0) => {}
                other => failures.push(format!("final summary: {key} = {other:?}, want 0")),
            }
        }
        format!(
            "served={}",
            s.get("connections_served").copied().unwrap_or(0)
        )
    } else {
        failures.push(format!(
            "no final summary line after SIGTERM; stderr tail:\n{}",
            tail(&stderr, 10)
        ));
        "none".into()
    };

    // Slow-consumer drops the server logged with less than its per-connection
    // limit queued: dropped for the total over all connections.
    let (mut drops, mut by_total) = (0u64, 0u64);
    for line in stderr
        .lines()
        .filter(|l| l.contains("slow consumer dropped"))
    {
        drops += 1;
        let kv = parse_kv(line);
        if let (Some(q), Some(f), Some(l)) = (kv.get("queued"), kv.get("frame"), kv.get("limit"))
            && q + f <= *l
        {
            by_total += 1;
            ctx.note("slow_consumer_under_limit", line.trim().to_string());
        }
    }
    let skipped = if skip.is_empty() {
        "none".to_string()
    } else {
        let mut v: Vec<&String> = skip.iter().collect();
        v.sort();
        v.into_iter().cloned().collect::<Vec<_>>().join(",")
    };
    println!(
        "[hostile_mixed] backend={backend} secs={secs} skipped={skipped} \
         honest: requests={} ok={ok} failed={failed} p50={} p99={} max={} broadcasts_checked={broadcasts} foreign={foreign} | \
         garbage={} bombs={} refused={} | slowloris={} closed={} | pipelined={}MiB closed={} | \
         unread_file={} closed={} | file: complete={} aborted={} invented={} refused_existing={} wrong_error={} unanswered={} truncations={} | \
         fifo: sent={} refused={} other={} unanswered={} | churn={} pongs={} noreply={} | \
         stats={} batch_max={} errors={} | broadcast: sent={} back={} sender_dropped={} | \
         connect_failed={} | slow_consumer_drops={drops} under_own_limit={by_total} | fds_peak={fd_peak}/{limit} rss_start={}MiB rss_peak={}MiB | worker_stalls={stalls} | sigterm={took:.2?} summary={summary}",
        ok + failed,
        ms(p50),
        ms(p99),
        ms(max),
        val(&c.garbage),
        val(&c.bombs),
        val(&c.bombs_refused),
        val(&c.slowloris_opened),
        val(&c.slowloris_closed),
        val(&c.pipelined_bytes) >> 20,
        val(&c.pipeline_closed),
        val(&c.unread_opened),
        val(&c.unread_closed),
        val(&c.file_complete),
        val(&c.file_aborted),
        val(&c.file_invented),
        val(&c.file_refused_existing),
        val(&c.file_wrong_error),
        val(&c.file_unanswered),
        val(&c.truncations),
        val(&c.fifo_sent),
        val(&c.fifo_refused),
        val(&c.fifo_other),
        val(&c.fifo_unanswered),
        val(&c.churn),
        val(&c.churn_pongs),
        val(&c.churn_noreply),
        val(&c.stats_replies),
        ms(val(&c.stats_batch_max_us)),
        val(&c.stats_errors),
        val(&c.bcast_sent),
        val(&c.bcast_back),
        val(&c.bcast_sender_lost),
        val(&c.connect_failed),
        rss_start / 1024,
        rss_peak / 1024,
    );
    let notes = ctx.notes.lock().unwrap();
    for n in notes.iter() {
        println!("[hostile_mixed] note: {n}");
    }
    assert!(
        failures.is_empty(),
        "mixed attack on backend {backend}: {} failed assertion(s):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}
