//! Graceful shutdown on SIGTERM/SIGINT with idle and busy connections, and
//! close races with operations in flight.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

fn idle_connections_then_signal(sig: i32) {
    const N: u64 = 100;
    let mut srv = Server::start(&[]);
    let mut conns = Vec::new();
    for i in 0..N {
        let mut s = connect(srv.addr());
        // One PING each proves the server accepted the connection; after it
        // the connection sits idle with a receive outstanding.
        let body = (i as u32).to_be_bytes();
        write_frame(&mut s, CMD_PING, &body).unwrap();
        assert_eq!(
            expect_frame(&mut s, &format!("PONG #{i}")),
            (CMD_PONG, body.to_vec())
        );
        conns.push(s);
    }
    let summary = srv.stop_checked_with(sig, Some(N));
    assert_eq!(get(&summary, "bytes_in"), N * 12, "{summary:?}");
    assert_eq!(get(&summary, "bytes_out"), N * 12, "{summary:?}");
    for (i, s) in conns.iter_mut().enumerate() {
        expect_closed(s, &format!("idle connection #{i} after server exit"));
    }
}

#[test]
fn sigterm_with_100_idle_connections() {
    idle_connections_then_signal(libc::SIGTERM);
}

#[test]
fn sigint_with_100_idle_connections() {
    idle_connections_then_signal(libc::SIGINT);
}

#[test]
fn sigterm_while_20_connections_echo() {
    const THREADS: u64 = 20;
    const MAX_ITERS: u64 = 1_000_000;
    let mut srv = Server::start(&["--ports", "2", "--workers", "2"]);
    let addr = srv.addr();
    let rounds = AtomicU64::new(0);
    let stop_flag = AtomicBool::new(false);
    thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let rounds = &rounds;
                let stop_flag = &stop_flag;
                sc.spawn(move || -> Result<u64, String> {
                    let mut rng = Rng::new(100 + t);
                    let mut s = connect(addr);
                    let start = Instant::now();
                    for i in 0..MAX_ITERS {
                        if start.elapsed() > Duration::from_secs(90) {
                            return Err(format!("thread {t}: server never closed the connection"));
                        }
                        if stop_flag.load(Ordering::Relaxed) {
                            return Err(format!("thread {t}: aborted"));
                        }
                        let n = rng.below(4096) as usize;
                        let body = rng.bytes(n);
                        if let Err(e) = write_frame(&mut s, CMD_ECHO, &body) {
                            if is_closed_error(&e) {
                                return Ok(i);
                            }
                            return Err(format!("thread {t}: write error {e} ({:?})", e.kind()));
                        }
                        match read_frame(&mut s) {
                            Ok((cmd, got)) => {
                                if cmd != CMD_ECHO || got != body {
                                    return Err(format!(
                                        "thread {t}: bad echo at {i} (cmd {cmd:#x}, {} vs {} bytes)",
                                        got.len(),
                                        body.len()
                                    ));
                                }
                                rounds.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if is_closed_error(&e) => return Ok(i),
                            Err(e) => {
                                return Err(format!(
                                    "thread {t}: read error {e} ({:?}) — client hung instead of seeing EOF/reset",
                                    e.kind()
                                ));
                            }
                        }
                    }
                    Err(format!("thread {t}: {MAX_ITERS} echoes without shutdown"))
                })
            })
            .collect();

        // Wait until every connection is busy echoing.
        let start = Instant::now();
        while rounds.load(Ordering::Relaxed) < THREADS * 20 {
            if start.elapsed() > DEADLINE {
                stop_flag.store(true, Ordering::Relaxed);
                panic!(
                    "echo threads made no progress: {} rounds",
                    rounds.load(Ordering::Relaxed)
                );
            }
            thread::sleep(POLL_STEP);
        }
        let summary = srv.stop_checked_with(libc::SIGTERM, Some(THREADS));
        assert!(
            get(&summary, "bytes_out") <= get(&summary, "bytes_in"),
            "echo server cannot send more than it received: {summary:?}"
        );
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(errors.is_empty(), "client threads failed: {errors:#?}");
    });
}

/// 3000 connections that send nothing, part of a header, a header, part of
/// a body or a whole frame, and close at once (half RST, half FIN); half of
/// them first do a PING round trip so the server surely has operations in
/// flight on them.
///
/// Connection counting: a connection that sends RST before the server
/// accepted it can be dropped by the kernel when the accept queue overflowed
/// (its final ACK was discarded), so the server never sees it. Only
/// connections that did a PING or closed with FIN are certain to be accepted;
/// the exact number must lie between that and the total.
#[test]
fn close_with_operations_in_flight_3000_times() {
    const THREADS: u64 = 8;
    const TOTAL: u64 = 3000;
    const _: () = assert!(TOTAL.is_multiple_of(THREADS));
    let mut srv = Server::start(&["--ports", "2", "--workers", "2"]);
    let addr = srv.addr();
    let certain = AtomicU64::new(0);
    let bytes_sent = AtomicU64::new(0);
    thread::scope(|sc| {
        for t in 0..THREADS {
            let certain = &certain;
            let bytes_sent = &bytes_sent;
            sc.spawn(move || {
                let mut rng = Rng::new(0x5EED + t);
                let mine = TOTAL / THREADS;
                for i in 0..mine {
                    let mut s = connect(addr);
                    let pinged = rng.below(2) == 0;
                    if pinged {
                        write_frame(&mut s, CMD_PING, b"ping").unwrap();
                        let (cmd, body) =
                            expect_frame(&mut s, &format!("thread {t} conn {i} PONG"));
                        assert_eq!((cmd, body.as_slice()), (CMD_PONG, &b"ping"[..]));
                        bytes_sent.fetch_add(12, Ordering::Relaxed);
                    }
                    let n = 16 + rng.below(3000) as usize;
                    let frame = encode_frame(CMD_ECHO, &rng.bytes(n));
                    let data: &[u8] = match rng.below(5) {
                        0 => &[],                          // nothing at all
                        1 => &frame[..HEADER_LEN],         // header only
                        2 => &frame[..HEADER_LEN + n / 2], // partial body
                        3 => &frame[..3],                  // partial header
                        _ => &frame,                       // a full frame, reply unread
                    };
                    if let Err(e) = s.write_all(data) {
                        panic!("thread {t} conn {i}: write failed: {e}");
                    }
                    bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                    let rst = rng.below(2) == 0;
                    if pinged || !rst {
                        certain.fetch_add(1, Ordering::Relaxed);
                    }
                    if rst {
                        reset(s);
                    } else {
                        drop(s);
                    }
                }
            });
        }
    });
    let certain = certain.load(Ordering::Relaxed);
    assert!(
        certain > TOTAL / 2,
        "PRNG mix: only {certain} certain connections"
    );
    // Wait until the server has accepted at least every certain connection
    // (+ this one) and cleaned up all of them: only the stats conn is open.
    let mut st = connect(addr);
    let last = wait_stats(
        &mut st,
        &format!(
            "connections_accepted >= {} and connections_open == 1",
            certain + 1
        ),
        |v| {
            let acc = stat_u64(v, "connections_accepted");
            assert!(
                acc <= TOTAL + 1,
                "accepted {acc} > {} connections made: {v}",
                TOTAL + 1
            );
            acc > certain && stat_u64(v, "connections_open") == 1
        },
    );
    echo_roundtrip(&mut st, b"fresh connection after the storm");
    drop(st);
    let accepted = stat_u64(&last, "connections_accepted");
    eprintln!("[it] storm: {certain} certain, {accepted} accepted of {TOTAL}");
    let summary = srv.stop_checked_with(libc::SIGTERM, None);
    let served = get(&summary, "connections_served");
    assert!(
        (accepted..=TOTAL + 1).contains(&served),
        "connections_served {served} must be between {accepted} (seen in STATS) and {}; {summary:?}",
        TOTAL + 1
    );
    assert!(
        get(&summary, "bytes_in") <= bytes_sent.load(Ordering::Relaxed) + 64 * 1024,
        "bytes_in larger than what was sent; {summary:?}"
    );
}

#[test]
fn sigterm_with_half_sent_frames_outstanding() {
    // Connections stuck mid-frame (server has a receive outstanding with a
    // partial buffer) when the signal arrives.
    const N: u64 = 50;
    let mut srv = Server::start(&[]);
    let mut conns = Vec::new();
    for i in 0..N {
        let mut s = connect(srv.addr());
        echo_roundtrip(&mut s, b"accepted");
        let frame = encode_frame(CMD_ECHO, &pattern(i, 2000));
        s.write_all(&frame[..HEADER_LEN + (i as usize * 37) % 2000])
            .unwrap();
        conns.push(s);
    }
    srv.stop_checked_with(libc::SIGTERM, Some(N));
    for (i, s) in conns.iter_mut().enumerate() {
        expect_closed(s, &format!("half-sent connection #{i} after server exit"));
    }
}

#[test]
fn sigterm_with_no_connections() {
    let mut srv = Server::start(&[]);
    let (status, stderr) = srv.stop();
    assert_eq!(status.code(), Some(0), "exit code after SIGTERM\n{stderr}");
    let summary = parse_summary(&stderr);
    for key in [
        "connections_served",
        "bytes_in",
        "bytes_out",
        "outstanding_ops",
        "outstanding_bufs",
    ] {
        assert_eq!(
            get(&summary, key),
            0,
            "`{key}` of an unused server; {summary:?}"
        );
    }
}
