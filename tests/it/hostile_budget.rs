//! Budgets a hostile peer cannot get around:
//!
//! - a frame begun must be complete within `--frame-timeout` (plus a second
//!   per KiB of it received): a client that sends a byte now and then no
//!   longer keeps its slot, while an honest client sending a large frame at
//!   a modest rate, or one the server itself stopped reading, is not cut;
//! - one client flooding BROADCASTs is slowed to its budget and to what
//!   its recipients take, instead of getting honest, reading recipients
//!   dropped as slow consumers;
//! - a recipient dropped as a slow consumer gets a stream of whole frames
//!   ending with ERROR 7.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const ERR_IDLE_TIMEOUT: u32 = 6;
const ERR_SLOW_CONSUMER: u32 = 7;

fn closed(v: &Value, reason: &str) -> u64 {
    v["closed"][reason].as_u64().unwrap_or(0)
}

fn errors(v: &Value, kind: &str) -> u64 {
    v["errors"][kind].as_u64().unwrap_or(0)
}

/// STATS on a connection that also receives broadcasts: a thread reads
/// everything as it comes (so the connection never falls behind) and hands
/// over the STATS replies.
struct StatsTap {
    s: TcpStream,
    replies: mpsc::Receiver<Value>,
    reader: Option<thread::JoinHandle<()>>,
}

impl StatsTap {
    fn new(s: TcpStream) -> StatsTap {
        let (tx, replies) = mpsc::channel();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let reader = thread::spawn(move || {
            while let Ok((cmd, body)) = read_frame_from(&mut r) {
                match cmd {
                    CMD_BROADCAST => {}
                    CMD_STATS => {
                        let _ = tx.send(serde_json::from_slice(&body).expect("STATS JSON"));
                    }
                    cmd => panic!("the STATS connection got cmd {cmd:#x}"),
                }
            }
        });
        StatsTap {
            s,
            replies,
            reader: Some(reader),
        }
    }

    fn stats(&mut self) -> Value {
        write_frame(&mut self.s, CMD_STATS, &[]).expect("write STATS");
        self.replies.recv_timeout(DEADLINE).expect("a STATS reply")
    }
}

impl Drop for StatsTap {
    fn drop(&mut self) {
        let _ = self.s.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// One frame from a buffered reader: (cmd, body).
fn read_frame_from<R: Read>(r: &mut R) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
    let cmd = u32::from_be_bytes(h[4..].try_into().unwrap());
    assert!(len <= 16 << 20, "server announced a {len}-byte frame");
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((cmd, body))
}

/// Splits `bytes` into whole frames; panics on a partial one at the end.
fn whole_frames(bytes: &[u8], what: &str) -> Vec<(u32, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(
            bytes.len() - at >= HEADER_LEN,
            "{what}: the stream ends inside a frame header ({} bytes after {} whole frames)",
            bytes.len() - at,
            frames.len()
        );
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let cmd = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        assert!(
            bytes.len() - at - HEADER_LEN >= len,
            "{what}: the stream ends inside a frame (cmd {cmd:#x}, {} of {len} body bytes, after {} whole frames)",
            bytes.len() - at - HEADER_LEN,
            frames.len()
        );
        frames.push((cmd, bytes[at + HEADER_LEN..at + HEADER_LEN + len].to_vec()));
        at += HEADER_LEN + len;
    }
    frames
}

// ---------------------------------------------------------------------------
// The frame deadline
// ---------------------------------------------------------------------------

/// A client that sends one byte of a frame every 700 ms, header first, kept
/// its slot for as long as it liked (the idle timeout is reset by any
/// byte). With `--frame-timeout 2s` it gets ERROR 6 ("frame timeout") and
/// a close about 2 s after its first byte. A client that sends nothing at
/// all is the idle timeout's (60 s here) and stays.
#[test]
fn trickled_frame_is_cut_by_the_frame_deadline() {
    let mut srv = Server::start(&["--frame-timeout", "2s", "--idle-timeout", "60s"]);
    let addr = srv.addr();
    let mut silent = connect(addr);
    echo_roundtrip(&mut silent, b"then silence");
    let mut slow = connect(addr);
    let stream = encode_frame(CMD_ECHO, &[b'x'; 64]);
    slow.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let start = Instant::now();
    let (mut sent, mut got, mut eof) = (0usize, Vec::new(), false);
    // Bounded: 15 s, ~21 bytes of the 72-byte frame.
    while !eof && start.elapsed() < Duration::from_secs(15) {
        if sent < stream.len() && slow.write_all(&stream[sent..sent + 1]).is_ok() {
            sent += 1;
        }
        let mut b = [0u8; 256];
        match slow.read(&mut b) {
            Ok(0) => eof = true,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => eof = true,
        }
    }
    let took = start.elapsed();
    let frames = whole_frames(&got, "the trickling client");
    eprintln!(
        "[hostile_budget] trickle: {sent} bytes sent one per 700 ms; closed={eof} after {took:?}; \
         frames {:?}",
        frames
            .iter()
            .map(|(c, b)| (
                *c,
                String::from_utf8_lossy(b.get(4..).unwrap_or(&[])).into_owned()
            ))
            .collect::<Vec<_>>()
    );
    assert!(
        eof,
        "a client trickling one byte every 700 ms kept its slot for {took:?} ({sent} bytes)"
    );
    assert_eq!(frames.len(), 1, "one ERROR frame, then the close");
    let (cmd, body) = &frames[0];
    assert_eq!(*cmd, CMD_ERROR);
    assert_eq!(
        u32::from_be_bytes(body[..4].try_into().unwrap()),
        ERR_IDLE_TIMEOUT
    );
    assert!(
        String::from_utf8_lossy(&body[4..]).contains("frame timeout"),
        "{:?}",
        String::from_utf8_lossy(&body[4..])
    );
    assert!(sent < stream.len(), "the frame was never complete");
    // 2 s after the first byte (plus 1 s per KiB: nothing here), and not
    // before; the upper bound leaves room for a busy machine.
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(12),
        "closed after {took:?}"
    );
    // Silence is not a frame under way.
    echo_roundtrip(&mut silent, b"still here after silence");
    let mut st = connect(addr);
    let v = wait_stats(&mut st, "the trickler counted", |v| {
        closed(v, "frame_timeout") == 1
    });
    assert_eq!(closed(&v, "idle_timeout"), 0, "{v}");
    assert_eq!(stat_u64(&v, "connections_open"), 2, "{v}");
    drop((silent, slow, st));
    srv.stop_checked(3);
}

/// The deadline grows by a second per KiB received: a 96 KiB frame sent
/// over ~6 s (16 KiB/s, three times the 2 s `--frame-timeout`) is echoed
/// intact; a flat deadline would have cut it.
#[test]
fn large_frame_at_a_modest_rate_is_not_cut() {
    let mut srv = Server::start(&["--frame-timeout", "2s"]);
    let addr = srv.addr();
    let mut c = connect(addr);
    let body = pattern(7, 96 * 1024);
    let wire = encode_frame(CMD_ECHO, &body);
    let mut w = c.try_clone().unwrap();
    let start = Instant::now();
    let writer = thread::spawn(move || {
        for chunk in wire.chunks(4096) {
            w.write_all(chunk).unwrap();
            thread::sleep(Duration::from_millis(250));
        }
    });
    let (cmd, got) = expect_frame(&mut c, "the slow large echo");
    writer.join().unwrap();
    let took = start.elapsed();
    assert_eq!(cmd, CMD_ECHO, "{:?}", String::from_utf8_lossy(&got));
    assert_frame_body_eq(&got, &body, "the slow large echo");
    eprintln!("[hostile_budget] 96 KiB frame over {took:?} with --frame-timeout 2s: echoed");
    assert!(
        took > Duration::from_secs(4),
        "the frame took only {took:?}"
    );
    let v = stats(&mut c);
    assert_eq!(closed(&v, "frame_timeout"), 0, "{v}");
    drop(c);
    srv.stop_checked(1);
}

/// A client whose replies are not read is not read either (backpressure):
/// a frame it began then waits on the server, not the other way round, so
/// the deadline does not count that time. Here the client (4 KiB receive
/// buffer) pipelines 24,000 256-byte ECHOs (6 MiB: more than the kernel
/// buffers take, and over `--max-send-queue 256KiB`; 512-byte receives, so
/// the server stops with part of a frame in hand, which earns well under a
/// second), reads nothing for 4 s (twice `--frame-timeout`), then reads:
/// everything is echoed and nothing is cut.
#[test]
fn frame_held_by_backpressure_is_not_cut() {
    let mut srv = Server::start(&[
        "--frame-timeout",
        "2s",
        "--recv-buf",
        "512",
        "--max-send-queue",
        "256KiB",
    ]);
    let addr = srv.addr();
    let mut c = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        let s = TcpStream::from(s);
        configure(&s);
        s
    };
    let n = 24_000u64;
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| pattern(100 + i, 256)).collect();
    let mut wire = Vec::new();
    for b in &bodies {
        wire.extend_from_slice(&encode_frame(CMD_ECHO, b));
    }
    let mut w = c.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&wire).unwrap());
    thread::sleep(Duration::from_secs(4));
    let v = stats(&mut connect(addr));
    let mut r = BufReader::new(c.try_clone().unwrap());
    for (i, b) in bodies.iter().enumerate() {
        let (cmd, got) = read_frame_from(&mut r).expect("an echo");
        assert_eq!(
            cmd,
            CMD_ECHO,
            "echo {i}: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(80)])
        );
        assert_frame_body_eq(&got, b, &format!("echo {i}"));
    }
    writer.join().unwrap();
    eprintln!(
        "[hostile_budget] held by backpressure: after 4 s unread, server frames_in {} of {n}, \
         send queue {} bytes",
        stat_u64(&v, "frames_in"),
        stat_u64(&v, "send_queue_bytes")
    );
    assert!(
        stat_u64(&v, "frames_in") < n,
        "the server was not holding the client back: {v}"
    );
    let v = stats(&mut c);
    assert_eq!(closed(&v, "frame_timeout"), 0, "{v}");
    drop((c, r));
    srv.stop_checked(2);
}

// ---------------------------------------------------------------------------
// Broadcast budget
// ---------------------------------------------------------------------------

/// What a recipient saw: broadcasts from the flooder in order, or how it
/// ended.
struct Got {
    frames: u64,
    error: Option<u32>,
    done: Duration,
}

/// One flooder sends `n` 1 KiB BROADCASTs as fast as it can (its own copies
/// drained by another thread) while `readers` honest recipients read
/// everything, each pausing `pace` after every 64 frames (as a client that
/// does something with what it reads). Returns what each recipient saw,
/// when the flood was written, and when the last recipient had it all.
fn flood(
    addr: SocketAddr,
    readers: usize,
    n: u64,
    pace: Duration,
) -> (Vec<Got>, Duration, Duration) {
    let mut recipients: Vec<TcpStream> = (0..readers).map(|_| connect(addr)).collect();
    let flooder = connect(addr);
    drop(settle(addr, readers as u64 + 2, readers as u64 + 2));
    let start = Instant::now();
    let deadline = Duration::from_secs(120);
    let read_all = move |s: TcpStream, n: u64| {
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, s);
            let mut got = Got {
                frames: 0,
                error: None,
                done: Duration::ZERO,
            };
            while got.frames < n && start.elapsed() < deadline {
                match read_frame_from(&mut r) {
                    Ok((CMD_BROADCAST, b)) => {
                        let seq = u64::from_be_bytes(b[8..16].try_into().unwrap());
                        assert_eq!(seq, got.frames, "a broadcast out of order or lost");
                        got.frames += 1;
                        if got.frames.is_multiple_of(64) {
                            thread::sleep(pace);
                        }
                    }
                    Ok((CMD_ERROR, b)) => {
                        got.error = Some(u32::from_be_bytes(b[..4].try_into().unwrap()));
                        break;
                    }
                    Ok((cmd, _)) => panic!("unexpected cmd {cmd:#x}"),
                    // Cut without an ERROR frame: counted as dropped.
                    Err(_) => {
                        got.error = Some(0);
                        break;
                    }
                }
            }
            got.done = start.elapsed();
            got
        })
    };
    let own = read_all(flooder.try_clone().unwrap(), n);
    let handles: Vec<_> = recipients
        .iter_mut()
        .map(|s| read_all(s.try_clone().unwrap(), n))
        .collect();
    let mut w = flooder.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut body = vec![b'f'; 1024];
        let mut batch = Vec::with_capacity(64 * (HEADER_LEN + 1024));
        for i in 0..n {
            body[..8].copy_from_slice(&i.to_be_bytes());
            batch.extend_from_slice(&encode_frame(CMD_BROADCAST, &body));
            if batch.len() >= 64 * 1024 || i + 1 == n {
                w.set_write_timeout(Some(deadline)).unwrap();
                if w.write_all(&batch).is_err() {
                    break; // the flooder was dropped: its readers say how
                }
                batch.clear();
            }
        }
        start.elapsed()
    });
    let written = writer.join().unwrap();
    let mut got: Vec<Got> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    got.push(own.join().unwrap());
    let last = got.iter().map(|g| g.done).max().unwrap();
    drop((recipients, flooder));
    (got, written, last)
}

/// 20 reading recipients (each pausing 10 ms every 64 KiB: at most
/// ~6 MB/s) beside one client that writes 6,000 1 KiB BROADCASTs as fast as
/// it can, with the default budget and with none (`--max-broadcast-rate
/// 0`: only the hold on recipients' backlogs): nobody is dropped as a slow
/// consumer, every recipient gets every broadcast in order. (Before the
/// budget, the flood was written in ~0.1 s and recipients were dropped
/// with ERROR 7 once 4 MiB behind.)
#[test]
fn broadcast_flood_does_not_evict_reading_recipients() {
    for args in [&[][..], &["--max-broadcast-rate", "0"][..]] {
        let mut srv = Server::start(args);
        let addr = srv.addr();
        let n = 10_000;
        let (got, written, last) = flood(addr, 20, n, Duration::from_millis(20));
        let mut st = connect(addr);
        let v = stats(&mut st);
        let dropped = got.iter().filter(|g| g.error.is_some()).count();
        eprintln!(
            "[hostile_budget] flood {args:?}: {n} x 1 KiB to 20 readers + the flooder: written in \
             {written:?}, all delivered by {last:?}; dropped {dropped}, slow_consumer closes {}, \
             short {:?}",
            closed(&v, "slow_consumer"),
            got.iter()
                .map(|g| g.frames)
                .filter(|&f| f < n)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            dropped,
            0,
            "recipients dropped: {:?}",
            got.iter().map(|g| g.error).collect::<Vec<_>>()
        );
        assert_eq!(closed(&v, "slow_consumer"), 0, "{v}");
        assert!(
            got.iter().all(|g| g.frames == n),
            "a recipient missed broadcasts"
        );
        drop(st);
        srv.stop_checked(23);
    }
}

/// `--max-broadcast-rate 500 --broadcast-burst 100`: a client writing 2,000
/// BROADCASTs as fast as it can gets them delivered at about 500 a second
/// (after the burst), and its 20 recipients get all of them.
#[test]
fn broadcast_flood_is_held_to_its_budget() {
    let mut srv = Server::start(&["--max-broadcast-rate", "500", "--broadcast-burst", "100"]);
    let addr = srv.addr();
    let n = 2000u64;
    let (got, written, last) = flood(addr, 20, n, Duration::ZERO);
    let rate = (n - 100) as f64 / last.as_secs_f64();
    eprintln!(
        "[hostile_budget] budget 500/s burst 100: {n} broadcasts written in {written:?}, \
         delivered to all by {last:?}: {rate:.0}/s"
    );
    assert!(got.iter().all(|g| g.error.is_none() && g.frames == n));
    // At most the budget (5 % for timing); and not starved (a busy machine
    // may be slower, but not 3x).
    assert!(
        rate <= 525.0,
        "{rate:.0} broadcasts/s over a budget of 500/s"
    );
    assert!(
        rate >= 170.0,
        "{rate:.0} broadcasts/s against a budget of 500/s"
    );
    srv.stop_checked(22);
}

// ---------------------------------------------------------------------------
// Slow consumers get their ERROR 7
// ---------------------------------------------------------------------------

/// 50 recipients that do not read (4 KiB receive buffers) are dropped as
/// slow consumers by a stream of 64 KiB broadcasts (`--max-send-queue
/// 1MiB`); each then reads, and every one sees a stream of whole frames
/// ending with ERROR 7, then the close.
/// `bytes` is whole BROADCAST frames of `size`-byte bodies numbered 0, 1,
/// 2, ... (after the 8-byte sender id), then ERROR 7: nothing cut short.
fn assert_broadcasts_then_error_7(bytes: &[u8], size: usize, who: &str) {
    let frames = whole_frames(bytes, who);
    let (last, rest) = frames.split_last().expect("some frames");
    assert_eq!(last.0, CMD_ERROR, "{who}: the last frame is not an ERROR");
    assert_eq!(
        u32::from_be_bytes(last.1[..4].try_into().unwrap()),
        ERR_SLOW_CONSUMER
    );
    for (k, (cmd, b)) in rest.iter().enumerate() {
        assert_eq!(*cmd, CMD_BROADCAST, "{who} frame {k}");
        assert_eq!(b.len(), 8 + size);
        assert_eq!(b[8..12], (k as u32).to_be_bytes(), "{who}: out of order");
    }
}

#[test]
fn dropped_slow_consumers_get_whole_frames_then_error_7() {
    let mut srv = Server::start(&["--max-send-queue", "1MiB"]);
    let addr = srv.addr();
    let deaf: Vec<TcpStream> = (0..50).map(|_| connect_small_rcvbuf(addr)).collect();
    let mut sender = connect(addr);
    let mut st = StatsTap::new(settle(addr, 52, 52));
    let mut own = BufReader::new(sender.try_clone().unwrap());
    let size = 64 * 1024;
    let mut body = vec![b'd'; size];
    let mut sent = 0u32;
    let start = Instant::now();
    // Broadcast until all 50 have been dropped (bounded in count and time).
    while errors(&st.stats(), "slow_consumer") < 50 {
        assert!(
            sent < 400 && start.elapsed() < DEADLINE,
            "only some deaf recipients were dropped"
        );
        for _ in 0..4 {
            body[..4].copy_from_slice(&sent.to_be_bytes());
            write_frame(&mut sender, CMD_BROADCAST, &body).unwrap();
            let (cmd, b) = read_frame_from(&mut own).expect("the sender's own copy");
            assert_eq!(cmd, CMD_BROADCAST);
            assert_eq!(b[8..12], sent.to_be_bytes());
            sent += 1;
        }
    }
    // Each reads now, all at once.
    let readers: Vec<_> = deaf
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            thread::spawn(move || {
                let mut bytes = Vec::new();
                let mut r = s;
                let _ = r.read_to_end(&mut bytes);
                (i, bytes)
            })
        })
        .collect();
    let mut saw = 0;
    for h in readers {
        let (i, bytes) = h.join().unwrap();
        assert_broadcasts_then_error_7(&bytes, size, &format!("deaf recipient {i}"));
        saw += 1;
    }
    eprintln!(
        "[hostile_budget] 50 deaf recipients dropped after {sent} x 64 KiB broadcasts in {:?}: \
         {saw} of 50 read whole frames ending with ERROR 7",
        start.elapsed()
    );
    let v = loop {
        let v = st.stats();
        if closed(&v, "slow_consumer") == 50 || start.elapsed() > 2 * DEADLINE {
            break v;
        }
        thread::sleep(POLL_STEP);
    };
    assert_eq!(closed(&v, "slow_consumer"), 50, "{v}");
    assert_eq!(stat_u64(&v, "connections_open"), 2, "{v}");
    drop((sender, own, st));
    srv.stop_checked(52);
}

/// 50 recipients that read 4 KiB every 100 ms (4 KiB receive buffers)
/// while a sender broadcasts 64 KiB messages with no budget (`--max-send-queue
/// 256KiB --max-broadcast-rate 0`): each falls behind and is dropped as a
/// slow consumer while sends to it complete piecemeal, so the server's
/// queue often begins with the rest of a frame partly sent when the drop
/// comes. Once all are dropped each reads what is left at full speed:
/// every one sees whole frames, in order, ending with ERROR 7.
#[test]
fn slow_readers_dropped_mid_frame_get_whole_frames_then_error_7() {
    let mut srv = Server::start(&["--max-send-queue", "256KiB", "--max-broadcast-rate", "0"]);
    let addr = srv.addr();
    let slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&addr.into()).unwrap();
            let s = TcpStream::from(s);
            configure(&s);
            s
        })
        .collect();
    let mut sender = connect(addr);
    let mut st = StatsTap::new(settle(addr, 52, 52));
    let start = Instant::now();
    let all_dropped = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = slow
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let all_dropped = all_dropped.clone();
            thread::spawn(move || {
                let mut bytes = Vec::new();
                let mut b = vec![0u8; 4096];
                while !all_dropped.load(Ordering::Relaxed) && start.elapsed() < DEADLINE {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return (i, bytes),
                        Ok(n) => bytes.extend_from_slice(&b[..n]),
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                let _ = s.read_to_end(&mut bytes);
                (i, bytes)
            })
        })
        .collect();
    // The sender writes without waiting (its own copies drained by a
    // thread), so broadcasts wait in the recipients' inboxes while their
    // sends complete piecemeal.
    let own = {
        let mut r = BufReader::new(sender.try_clone().unwrap());
        thread::spawn(move || while read_frame_from(&mut r).is_ok() {})
    };
    let size = 64 * 1024;
    let mut body = vec![b's'; size];
    let mut sent = 0u32;
    while errors(&st.stats(), "slow_consumer") < 50 {
        assert!(
            sent < 4000 && start.elapsed() < DEADLINE,
            "only some slow recipients were dropped"
        );
        for _ in 0..8 {
            body[..4].copy_from_slice(&sent.to_be_bytes());
            write_frame(&mut sender, CMD_BROADCAST, &body).unwrap();
            sent += 1;
        }
    }
    all_dropped.store(true, Ordering::Relaxed);
    let mut cut = Vec::new();
    for h in readers {
        let (i, bytes) = h.join().unwrap();
        let r = std::panic::catch_unwind(|| {
            assert_broadcasts_then_error_7(&bytes, size, &format!("slow recipient {i}"));
        });
        if r.is_err() {
            cut.push((i, bytes.len()));
        }
    }
    eprintln!(
        "[hostile_budget] 50 slow readers dropped after {sent} x 64 KiB broadcasts in {:?}: \
         {} of 50 read whole frames ending with ERROR 7 (not: {cut:?})",
        start.elapsed(),
        50 - cut.len()
    );
    assert!(
        cut.is_empty(),
        "recipients whose stream was not whole frames then ERROR 7: {cut:?}"
    );
    drop((sender, own, st));
    srv.stop_checked(52);
}
