//! 5,000 concurrent connections against one per-core-model server.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

const THREADS: usize = 8;
const PER_THREAD: usize = 625;
const CONNS: u64 = (THREADS * PER_THREAD) as u64;
const ROUNDS: usize = 3;

fn body(t: usize, c: usize, r: usize) -> Vec<u8> {
    let mut b = format!("t{t}-c{c}-r{r}:").into_bytes();
    let seed = ((t * PER_THREAD + c) * ROUNDS + r) as u64;
    b.extend(pattern(seed, 16 + (c * 7 + r * 13) % 100));
    b
}

/// STATS on `s`, counting the request bytes we send (8 per request).
fn counted_stats(s: &mut TcpStream, sent: &AtomicU64) -> serde_json::Value {
    sent.fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
    stats(s)
}

#[test]
fn five_thousand_concurrent_connections() {
    let mut srv = Server::start(&["--ports", "2", "--workers", "2"]);
    let addr = srv.addr();
    let gate = Gate::new(THREADS, Duration::from_secs(180));
    let bytes_sent = AtomicU64::new(0);
    let echo_bytes = AtomicU64::new(0);
    thread::scope(|sc| {
        for t in 0..THREADS {
            let gate = &gate;
            let bytes_sent = &bytes_sent;
            let echo_bytes = &echo_bytes;
            sc.spawn(move || {
                let _guard = gate.guard();
                let mut socks: Vec<TcpStream> = (0..PER_THREAD).map(|_| connect(addr)).collect();
                gate.wait(1); // all 5,000 connected at once
                for r in 0..ROUNDS {
                    let bodies: Vec<Vec<u8>> = (0..PER_THREAD).map(|c| body(t, c, r)).collect();
                    for (c, s) in socks.iter_mut().enumerate() {
                        write_frame(s, CMD_ECHO, &bodies[c])
                            .unwrap_or_else(|e| panic!("t{t} c{c} r{r}: write: {e}"));
                    }
                    for (c, s) in socks.iter_mut().enumerate() {
                        let (cmd, got) = expect_frame(s, &format!("t{t} c{c} r{r}"));
                        assert_eq!(cmd, CMD_ECHO, "t{t} c{c} r{r}");
                        assert_frame_body_eq(&got, &bodies[c], &format!("t{t} c{c} r{r}"));
                        let n = (HEADER_LEN + got.len()) as u64;
                        echo_bytes.fetch_add(n, Ordering::Relaxed);
                        bytes_sent.fetch_add(n, Ordering::Relaxed);
                    }
                    if r == 0 {
                        // Every connection completed a round trip, so the
                        // server has accepted all of them and none is closed.
                        gate.wait(2);
                        if t == 0 {
                            let v = counted_stats(&mut socks[0], bytes_sent);
                            assert_eq!(
                                stat_u64(&v, "connections_open"),
                                CONNS,
                                "all connections open at once: {v}"
                            );
                            assert_eq!(stat_u64(&v, "connections_accepted"), CONNS, "{v}");
                        }
                        gate.wait(3);
                    }
                }
                // Release everything except thread 0's first socket.
                socks.truncate(usize::from(t == 0));
                gate.wait(4);
                if t == 0 {
                    let s = &mut socks[0];
                    let start = Instant::now();
                    loop {
                        let v = counted_stats(s, bytes_sent);
                        assert_eq!(stat_u64(&v, "connections_accepted"), CONNS, "{v}");
                        if stat_u64(&v, "connections_open") == 1 {
                            break;
                        }
                        assert!(
                            start.elapsed() < DEADLINE,
                            "server did not notice 4,999 closes within {DEADLINE:?}: {v}"
                        );
                        thread::sleep(POLL_STEP);
                    }
                }
            });
        }
    });
    let summary = srv.stop_checked(CONNS);
    let sent = bytes_sent.load(Ordering::Relaxed);
    let echoed = echo_bytes.load(Ordering::Relaxed);
    assert_eq!(
        get(&summary, "bytes_in"),
        sent,
        "bytes_in = echo frames + STATS requests; {summary:?}"
    );
    assert!(
        get(&summary, "bytes_out") > echoed,
        "bytes_out = echo frames + STATS replies; {summary:?}"
    );
}
