//! FILE under attack: requests that must not block a worker (a FIFO, a
//! socket file, a device inside the files directory), a symlink loop that
//! must be told apart from an escape, and a file truncated while it is
//! being sent, which must never fill the promised length with bytes that
//! were not in the file.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

const ERR_NOT_FOUND: u32 = 3;
const ERR_FORBIDDEN: u32 = 4;

/// A files directory for one test, removed at the end.
struct FilesDir(PathBuf);

impl FilesDir {
    fn new(name: &str) -> FilesDir {
        let dir = std::env::temp_dir().join(format!("cport-hf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        FilesDir(dir)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for FilesDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo reads it only.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {p:?}"
    );
}

/// Opens every FIFO in `fifos` for writing and closes it at once: a
/// server worker blocked opening one of them for reading (the old
/// behaviour) is released, so the server can still be stopped.
fn release_fifo_readers(fifos: &[PathBuf]) {
    for f in fifos {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(f);
    }
}

/// Sends FILE `path` and expects ERROR `want` within `t`; returns the message.
fn file_error_within(s: &mut TcpStream, path: &str, want: u32, t: Duration) -> String {
    write_frame(s, CMD_FILE, path.as_bytes()).unwrap();
    let (cmd, body) = read_frame_timeout(s, t)
        .unwrap_or_else(|e| panic!("FILE {path:?}: no reply within {t:?}: {e}"));
    assert_eq!(cmd, CMD_ERROR, "FILE {path:?} must be refused");
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    let msg = String::from_utf8_lossy(&body[4..]).into_owned();
    assert_eq!(code, want, "FILE {path:?}: {msg}");
    msg
}

/// FILE on a FIFO, a socket file, a symlink to a FIFO and a character
/// device, all inside the files directory: each is refused at once with
/// ERROR 4, and never blocks a worker. Four FIFO requests per worker are in
/// flight at once on separate connections while a fresh client must get
/// PING, ECHO and a real file answered.
#[test]
fn special_files_are_refused_without_blocking_a_worker() {
    let dir = FilesDir::new("special");
    std::fs::write(dir.join("real.txt"), b"a regular file").unwrap();
    let fifos: Vec<PathBuf> = (0..8).map(|i| dir.join(&format!("fifo{i}"))).collect();
    for f in &fifos {
        mkfifo(f);
    }
    std::os::unix::fs::symlink("fifo0", dir.join("to-fifo")).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    // A device node inside the root (creating one needs privileges; the
    // FIFO and socket cases stand without it).
    let dev = dir.join("null");
    let dev_c = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mknod reads it only.
    let have_dev =
        unsafe { libc::mknod(dev_c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;

    let mut srv = Server::start(&["--files", dir.path(), "--workers", "2"]);
    let addr = srv.addr();
    let t = Duration::from_secs(5);
    // All FIFO requests at once, one connection each, before reading any
    // reply: with the old blocking open, each takes a worker for good.
    let mut attackers: Vec<TcpStream> = fifos
        .iter()
        .map(|f| {
            let mut s = connect(addr);
            let name = f.file_name().unwrap().to_str().unwrap();
            write_frame(&mut s, CMD_FILE, name.as_bytes()).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let mut honest = connect(addr);
    write_frame(&mut honest, CMD_PING, b"still there?").unwrap();
    let pong = read_frame_timeout(&mut honest, t);
    if pong.is_err() {
        release_fifo_readers(&fifos);
    }
    let (cmd, body) = pong.unwrap_or_else(|e| {
        panic!("PING not answered within {t:?} while FIFOs were requested: {e}")
    });
    assert_eq!((cmd, &body[..]), (CMD_PONG, &b"still there?"[..]));
    echo_roundtrip(&mut honest, b"echo beside the FIFOs");
    write_frame(&mut honest, CMD_FILE, b"real.txt").unwrap();
    let (cmd, body) = read_frame_timeout(&mut honest, t).expect("FILE real.txt");
    assert_eq!((cmd, &body[..]), (CMD_FILE, &b"a regular file"[..]));
    eprintln!(
        "[special] honest client served {:?} after the FIFO requests",
        started.elapsed()
    );

    for (s, f) in attackers.iter_mut().zip(&fifos) {
        let (cmd, body) = read_frame_timeout(s, t)
            .unwrap_or_else(|e| panic!("FILE {f:?}: no reply within {t:?}: {e}"));
        assert_eq!(cmd, CMD_ERROR, "FILE {f:?}");
        let code = u32::from_be_bytes(body[..4].try_into().unwrap());
        let msg = String::from_utf8_lossy(&body[4..]).into_owned();
        assert_eq!(code, ERR_FORBIDDEN, "FILE {f:?}: {msg}");
        assert!(
            msg.contains("FIFO"),
            "the message says what the path is: {msg}"
        );
    }
    let msg = file_error_within(&mut honest, "to-fifo", ERR_FORBIDDEN, t);
    assert!(msg.contains("FIFO"), "{msg}");
    let msg = file_error_within(&mut honest, "sock", ERR_FORBIDDEN, t);
    assert!(msg.contains("socket"), "{msg}");
    if have_dev {
        let msg = file_error_within(&mut honest, "null", ERR_FORBIDDEN, t);
        assert!(msg.contains("device"), "{msg}");
    } else {
        eprintln!("[special] no privilege to create a device node; device case not run");
    }
    // The connections stay usable after the refusals.
    echo_roundtrip(&mut honest, b"after the refusals");
    for s in &mut attackers {
        echo_roundtrip(s, b"attacker still served");
    }
    let n = attackers.len() as u64 + 1;
    drop(attackers);
    drop(honest);
    srv.stop_checked(n);
}

/// A symlink loop inside the files directory is "not found" with a message
/// that says it is a loop, not "leads outside the files directory"; an
/// escape is still ERROR 4 with its own message.
#[test]
fn symlink_loop_is_not_reported_as_an_escape() {
    let dir = FilesDir::new("loop");
    std::os::unix::fs::symlink("b", dir.join("a")).unwrap();
    std::os::unix::fs::symlink("a", dir.join("b")).unwrap();
    std::os::unix::fs::symlink("self", dir.join("self")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("escape")).unwrap();
    let mut srv = Server::start(&["--files", dir.path()]);
    let mut s = connect(srv.addr());
    let t = Duration::from_secs(10);
    for path in ["a", "self", "a/x"] {
        let msg = file_error_within(&mut s, path, ERR_NOT_FOUND, t);
        assert!(msg.contains("loop"), "FILE {path:?}: {msg}");
        assert!(!msg.contains("outside"), "FILE {path:?}: {msg}");
    }
    let msg = file_error_within(&mut s, "escape", ERR_FORBIDDEN, t);
    assert!(msg.contains("outside"), "{msg}");
    echo_roundtrip(&mut s, b"still usable");
    drop(s);
    srv.stop_checked(1);
}

/// How a truncated-file reply ended on the client side.
struct TruncatedReply {
    /// Body bytes received after the header.
    received: usize,
    /// Offset of the first byte that differs from the file's content, if any.
    first_bad: Option<usize>,
    /// Zero bytes received where the file had none.
    zeros: usize,
}

/// Requests `name` (a `size`-byte file of content `content`), reads the
/// header and `before` bytes, truncates the file to `keep` bytes, then
/// reads to EOF or reset.
fn fetch_while_truncating(
    srv: &Server,
    path: &Path,
    name: &str,
    content: &[u8],
    before: usize,
    keep: u64,
) -> TruncatedReply {
    let mut s = connect(srv.addr());
    write_frame(&mut s, CMD_FILE, name.as_bytes()).unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
    let cmd = u32::from_be_bytes(h[4..].try_into().unwrap());
    assert_eq!((cmd, len), (CMD_FILE, content.len()), "FILE {name} header");
    let mut got = vec![0u8; before];
    s.read_exact(&mut got).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(keep)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                assert!(
                    got.len() <= content.len(),
                    "more bytes than the header announced"
                );
            }
            Err(e) if is_closed_error(&e) => break,
            Err(e) => panic!(
                "reading the truncated reply: {e} after {} bytes: the server neither \
                 finished nor closed",
                got.len()
            ),
        }
        assert!(
            Instant::now() < deadline,
            "the truncated reply neither ended nor closed within 20 s"
        );
    }
    let first_bad = got.iter().zip(content).position(|(a, b)| a != b);
    let zeros = got
        .iter()
        .zip(content)
        .filter(|(a, b)| **a == 0 && **b != 0)
        .count();
    TruncatedReply {
        received: got.len(),
        first_bad,
        zeros,
    }
}

/// A 64 MiB file truncated to 100 KiB while it is being sent, with the
/// default file-send mode and with `--file-send copy`: the client receives
/// only bytes that were in the file (every one equal to the file's
/// content), then the connection closes; it never receives invented bytes
/// (zeros) to fill the announced length. The server counts the cut reply
/// (`file_truncated`). (`--file-send splice` cannot promise this: the
/// socket holds references to the page cache, which truncate(2) zeroes in
/// place; see docs/DESIGN.md.)
#[test]
fn truncated_file_never_sends_bytes_that_were_not_in_it() {
    let dir = FilesDir::new("trunc");
    let size = 64usize << 20;
    // No zero byte anywhere, so an invented zero cannot pass for content.
    let content: Vec<u8> = pattern(21, size).into_iter().map(|b| b | 1).collect();
    for mode in ["default", "copy"] {
        let path = dir.join(&format!("big-{mode}.bin"));
        std::fs::write(&path, &content).unwrap();
        let mut args = vec!["--files", dir.path()];
        if mode != "default" {
            args.extend(["--file-send", mode]);
        }
        let mut srv = Server::start(&args);
        let name = format!("big-{mode}.bin");
        let r = fetch_while_truncating(&srv, &path, &name, &content, 64 << 10, 100 << 10);
        eprintln!(
            "[truncate] {mode}: {} bytes received after the truncation to 100 KiB; \
             first difference at {:?}; {} invented zero bytes",
            r.received, r.first_bad, r.zeros
        );
        assert!(
            r.first_bad.is_none(),
            "{mode}: {} bytes received, byte {} differs from the file ({} zero bytes \
             that were never in it)",
            r.received,
            r.first_bad.unwrap(),
            r.zeros
        );
        assert!(
            r.received < size,
            "{mode}: the whole 64 MiB arrived although the file was cut to 100 KiB"
        );
        let mut st = connect(srv.addr());
        let v = wait_stats(&mut st, "the cut reply to be counted", |v| {
            stat_u64(v, "file_truncated") >= 1
        });
        assert_eq!(stat_u64(&v, "file_truncated"), 1, "{v}");
        echo_roundtrip(&mut st, b"served after the truncation");
        drop(st);
        srv.stop_checked(2);
    }
}

fn set_rcvbuf(s: &TcpStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads a c_int from our stack on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// 200 clients pipeline 32 FILE requests each for a 2 MiB file and never
/// read, against a server whose descriptor limit is 1,024, with the default
/// file-send mode and with `--file-send splice` (a pipe per reply): the
/// server neither runs out of descriptors (no failed accept) nor stops
/// answering: 20 fresh clients each get the file, PING and ECHO. Each
/// non-reading client holds at most one file reply; the replies in
/// progress are bounded server-wide (`file_replies` never over the bound
/// the server logs); over the bound, FILE requests wait and the replies
/// nobody reads are dropped after 3 s so that they do.
#[test]
fn unread_file_replies_do_not_exhaust_descriptors() {
    let dir = FilesDir::new("unread");
    let content = pattern(33, 2 << 20);
    std::fs::write(dir.join("big.bin"), &content).unwrap();
    let limit = 1024;
    let attackers_n = 200;
    let honest_n = 20;
    for mode in ["default", "splice"] {
        let mut args = vec!["--files", dir.path()];
        if mode != "default" {
            args.extend(["--file-send", mode]);
        }
        let mut srv = Server::start_with_fd_limit(&args, limit);
        let addr = srv.addr();
        let pid = srv.pid();
        let bound: Option<u64> = srv
            .stderr_text()
            .split("max ")
            .find_map(|t| t.strip_suffix_word("file replies"));
        let mut reqs = Vec::new();
        for _ in 0..32 {
            reqs.extend(encode_frame(CMD_FILE, b"big.bin"));
        }
        let base = open_fds(pid);
        let t0 = Instant::now();
        let attackers: Vec<TcpStream> = (0..attackers_n)
            .map(|_| {
                let mut s = connect(addr);
                set_rcvbuf(&s, 4096);
                s.write_all(&reqs).unwrap();
                s
            })
            .collect();
        // Until the server's descriptor count stops growing (at most 10 s).
        let mut peak = open_fds(pid);
        let mut last_change = Instant::now();
        while last_change.elapsed() < Duration::from_secs(1)
            && t0.elapsed() < Duration::from_secs(10)
        {
            thread::sleep(Duration::from_millis(50));
            let n = open_fds(pid);
            if n > peak {
                peak = n;
                last_change = Instant::now();
            }
        }
        eprintln!(
            "[unread] {mode}: {attackers_n} non-reading clients: {peak} descriptors \
             (limit {limit}) after {:?}",
            t0.elapsed()
        );
        // Fresh honest clients, all at once.
        let t1 = Instant::now();
        let honest: Vec<_> = (0..honest_n)
            .map(|i| {
                let content = content.clone();
                thread::spawn(move || {
                    let mut s = connect(addr);
                    write_frame(&mut s, CMD_FILE, b"big.bin").unwrap();
                    let (cmd, body) = read_frame(&mut s)
                        .unwrap_or_else(|e| panic!("honest client {i}: FILE: {e}"));
                    assert_eq!(cmd, CMD_FILE, "honest client {i}");
                    assert_frame_body_eq(&body, &content, "honest FILE");
                    write_frame(&mut s, CMD_PING, b"ping").unwrap();
                    let (cmd, _) = read_frame(&mut s)
                        .unwrap_or_else(|e| panic!("honest client {i}: PING: {e}"));
                    assert_eq!(cmd, CMD_PONG);
                    echo_roundtrip(&mut s, format!("honest {i}").as_bytes());
                    t1.elapsed()
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        let mut failed = Vec::new();
        for h in honest {
            match h.join() {
                Ok(t) => slowest = slowest.max(t),
                Err(e) => failed.push(
                    e.downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "panic".into()),
                ),
            }
        }
        let during = open_fds(pid);
        let mut st = connect(addr);
        let v = stats(&mut st);
        eprintln!(
            "[unread] {mode}: {} of {honest_n} honest clients served (slowest {slowest:?}); \
             {during} descriptors; bound {bound:?}; STATS file_replies={} waiting={} \
             accept_errors={} closed={}",
            honest_n - failed.len(),
            v["file_replies"],
            v["file_replies_waiting"],
            v["accept_errors"],
            v["closed"]
        );
        // What the bound allows: a descriptor per connection (none in
        // registered-file slots), a descriptor per reply, three when
        // spliced (file and pipe), beside those the server had before.
        let cost = if mode == "splice" { 3 } else { 1 };
        let conns = (attackers_n + honest_n + 1) as u64;
        let allowed = base as u64 + conns + bound.unwrap_or(0) * cost + 16;
        assert!(
            (peak as u64) <= allowed && peak < limit as usize,
            "{mode}: {peak} descriptors open (limit {limit}, {base} before the attack, \
             bound on file replies {bound:?}): unread FILE replies pinned descriptors"
        );
        assert!(
            failed.is_empty(),
            "{mode}: honest clients failed: {failed:?}"
        );
        assert_eq!(
            stat_u64(&v, "accept_errors"),
            0,
            "{mode}: accept failed (out of descriptors?): {v}"
        );
        let bound = bound.expect("the server logs its bound on file replies");
        assert!(
            stat_u64(&v, "file_replies") <= bound,
            "{mode}: more file replies in progress than the bound {bound}: {v}"
        );
        // Once the attackers are gone, every place is free again (none
        // leaked), and FILE is served at once.
        drop(attackers);
        wait_stats(&mut st, "every file reply place to be free", |v| {
            stat_u64(v, "file_replies") == 0 && stat_u64(v, "file_replies_waiting") == 0
        });
        write_frame(&mut st, CMD_FILE, b"big.bin").unwrap();
        let (cmd, body) =
            read_frame_timeout(&mut st, Duration::from_secs(10)).expect("FILE after the attack");
        assert_eq!(cmd, CMD_FILE);
        assert_frame_body_eq(&body, &content, "FILE after the attack");
        drop(st);
        srv.stop_checked_with(libc::SIGTERM, None);
    }
}

trait StripWord {
    fn strip_suffix_word(&self, word: &str) -> Option<u64>;
}

impl StripWord for str {
    /// "1024 file replies ..." -> Some(1024) when followed by `word`.
    fn strip_suffix_word(&self, word: &str) -> Option<u64> {
        let (n, rest) = self.split_once(' ')?;
        rest.starts_with(word).then(|| n.parse().ok()).flatten()
    }
}

/// Over `--max-file-replies`, a FILE request waits (no ERROR, its
/// connection not read) and is answered as soon as a place frees; others
/// are served meanwhile.
#[test]
fn file_request_over_the_bound_waits_for_a_place() {
    let dir = FilesDir::new("bound");
    // Larger than what the socket buffers take: the reply holds its place
    // until the client reads.
    let big = pattern(41, 32 << 20);
    std::fs::write(dir.join("big.bin"), &big).unwrap();
    std::fs::write(dir.join("small.txt"), b"small").unwrap();
    let mut srv = Server::start(&["--files", dir.path(), "--max-file-replies", "1"]);
    let addr = srv.addr();
    // A takes the only place with a reply it does not read yet.
    let mut a = connect(addr);
    write_frame(&mut a, CMD_FILE, b"big.bin").unwrap();
    let mut st = connect(addr);
    wait_stats(&mut st, "A's reply to hold the place", |v| {
        stat_u64(v, "file_replies") == 1
    });
    // B waits for it.
    let mut b = connect(addr);
    write_frame(&mut b, CMD_FILE, b"small.txt").unwrap();
    wait_stats(&mut st, "B to wait for a place", |v| {
        stat_u64(v, "file_replies_waiting") == 1
    });
    assert!(
        read_frame_timeout(&mut b, Duration::from_millis(300)).is_err(),
        "B was answered while the only place was taken"
    );
    echo_roundtrip(&mut st, b"others are served meanwhile");
    // A reads its reply: the place frees and B is answered. (On a slow
    // machine A may have been stalled for the 3 s after which a reply
    // nobody reads is dropped while others wait: then A's reply is cut
    // short, never wrong, and B is answered all the same.)
    let mut h = [0u8; HEADER_LEN];
    a.read_exact(&mut h).unwrap();
    let mut got = Vec::with_capacity(big.len());
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < big.len() {
        match a.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_closed_error(&e) => break,
            Err(e) => panic!("reading A's file: {e}"),
        }
    }
    assert_frame_body_eq(&got, &big[..got.len()], "A's file");
    let (cmd, body) = read_frame_timeout(&mut b, Duration::from_secs(10)).expect("B's file");
    assert_eq!((cmd, &body[..]), (CMD_FILE, &b"small"[..]));
    echo_roundtrip(&mut b, b"B after its file");
    let v = stats(&mut st);
    eprintln!(
        "[bound] A received {} of {} bytes; closed {}",
        got.len(),
        big.len(),
        v["closed"]
    );
    if got.len() < big.len() {
        assert_eq!(stat_u64(&v["closed"], "slow_consumer"), 1, "{v}");
    }
    assert_eq!(stat_u64(&v, "file_replies"), 0, "{v}");
    assert_eq!(stat_u64(&v, "errors_sent"), 0, "no ERROR for a wait: {v}");
    drop((a, b, st));
    srv.stop_checked(3);
}

/// A client that reads its file slowly (16 KiB every 50 ms for 5 s, slower
/// than a 1 MiB chunk in 3 s) keeps its place while another FILE request
/// waits: only replies that make no progress are dropped. The waiting
/// request is answered once the slow reply is done.
#[test]
fn slow_reader_keeps_its_file_place_while_others_wait() {
    let dir = FilesDir::new("slow");
    let big = pattern(43, 24 << 20);
    std::fs::write(dir.join("big.bin"), &big).unwrap();
    std::fs::write(dir.join("small.txt"), b"small").unwrap();
    let mut srv = Server::start(&["--files", dir.path(), "--max-file-replies", "1"]);
    let addr = srv.addr();
    let mut a = connect(addr);
    set_rcvbuf(&a, 16 << 10);
    write_frame(&mut a, CMD_FILE, b"big.bin").unwrap();
    let mut st = connect(addr);
    wait_stats(&mut st, "A's reply to hold the place", |v| {
        stat_u64(v, "file_replies") == 1
    });
    let mut b = connect(addr);
    write_frame(&mut b, CMD_FILE, b"small.txt").unwrap();
    wait_stats(&mut st, "B to wait for a place", |v| {
        stat_u64(v, "file_replies_waiting") == 1
    });
    let t0 = Instant::now();
    let mut h = [0u8; HEADER_LEN];
    a.read_exact(&mut h).unwrap();
    let mut got = Vec::with_capacity(big.len());
    let mut buf = vec![0u8; 16 << 10];
    while got.len() < big.len() && t0.elapsed() < Duration::from_secs(30) {
        let slow = t0.elapsed() < Duration::from_secs(5);
        if !slow && buf.len() < 1 << 20 {
            buf.resize(1 << 20, 0);
        }
        let want = (big.len() - got.len()).min(buf.len());
        match a.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_closed_error(&e) => break,
            Err(e) => panic!("reading A's file: {e}"),
        }
        if slow {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let took = t0.elapsed();
    eprintln!("[slow] A read {} bytes in {took:?}", got.len());
    assert_frame_body_eq(&got, &big, "the slow reader's file (dropped?)");
    let (cmd, body) = read_frame_timeout(&mut b, Duration::from_secs(10)).expect("B's file");
    assert_eq!((cmd, &body[..]), (CMD_FILE, &b"small"[..]));
    let v = stats(&mut st);
    assert_eq!(stat_u64(&v["closed"], "slow_consumer"), 0, "{v}");
    drop((a, b, st));
    srv.stop_checked(3);
}
