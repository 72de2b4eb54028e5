//! ECHO in the framed protocol, run against several threading models.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::util::*;

/// Checks the summary byte counters of a pure echo workload.
fn assert_echo_bytes(summary: &std::collections::HashMap<String, u64>, total: u64) {
    assert_eq!(
        get(summary, "bytes_in"),
        total,
        "bytes_in; summary {summary:?}"
    );
    assert_eq!(
        get(summary, "bytes_out"),
        total,
        "bytes_out; summary {summary:?}"
    );
}

/// One ECHO frame comes back byte-identical (header included).
pub fn single_echo(args: &[&str]) {
    let mut srv = Server::start(args);
    let mut s = connect(srv.addr());
    let frame = encode_frame(CMD_ECHO, b"hello, completion port \x00\xff\x7f");
    s.write_all(&frame).unwrap();
    let mut got = vec![0u8; frame.len()];
    s.read_exact(&mut got).expect("read echo");
    assert_eq!(
        got, frame,
        "echo must be byte-identical to the request frame"
    );
    drop(s);
    let summary = srv.stop_checked(1);
    assert_echo_bytes(&summary, frame.len() as u64);
}

/// 1000 frames written back-to-back by a writer thread, replies read in order.
pub fn pipelined_1000(args: &[&str]) {
    const N: usize = 1000;
    let mut srv = Server::start(args);
    let mut s = connect(srv.addr());
    let bodies: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let mut b = format!("frame-{i:04}-").into_bytes();
            b.extend(pattern(i as u64, i % 61));
            b
        })
        .collect();
    let total: usize = bodies.iter().map(|b| b.len() + HEADER_LEN).sum();
    let mut w = s.try_clone().unwrap();
    thread::scope(|sc| {
        let bodies = &bodies;
        let writer = sc.spawn(move || {
            for b in bodies {
                write_frame(&mut w, CMD_ECHO, b)?;
            }
            Ok::<(), std::io::Error>(())
        });
        for (i, want) in bodies.iter().enumerate() {
            let (cmd, got) = expect_frame(&mut s, &format!("pipelined reply #{i}"));
            assert_eq!(cmd, CMD_ECHO, "reply #{i} cmd");
            assert_frame_body_eq(
                &got,
                want,
                &format!("pipelined reply #{i} (order must be preserved)"),
            );
        }
        writer.join().unwrap().expect("writer");
    });
    drop(s);
    let summary = srv.stop_checked(1);
    assert_echo_bytes(&summary, total as u64);
}

/// Bodies of edge-case sizes up to exactly the default max frame.
pub fn sizes(args: &[&str]) {
    const SIZES: [usize; 9] = [0, 1, 7, 8, 4095, 4096, 4097, 65536, DEFAULT_MAX_FRAME];
    let mut srv = Server::start(args);
    let mut s = connect(srv.addr());
    let mut total = 0u64;
    for (i, &n) in SIZES.iter().enumerate() {
        let frame = encode_frame(CMD_ECHO, &pattern(1000 + i as u64, n));
        let got = exchange(&mut s, &frame, frame.len());
        assert_frame_body_eq(&got, &frame, &format!("echo of a {n}-byte body"));
        total += frame.len() as u64;
    }
    // The same sizes again in the opposite order on a second connection.
    let mut s2 = connect(srv.addr());
    for (i, &n) in SIZES.iter().enumerate().rev() {
        let frame = encode_frame(CMD_ECHO, &pattern(2000 + i as u64, n));
        let got = exchange(&mut s2, &frame, frame.len());
        assert_frame_body_eq(&got, &frame, &format!("echo of a {n}-byte body (2nd conn)"));
        total += frame.len() as u64;
    }
    drop((s, s2));
    let summary = srv.stop_checked(2);
    assert_echo_bytes(&summary, total);
}

/// A frame written one byte at a time, and frames split at every offset.
pub fn split_writes(args: &[&str]) {
    let mut srv = Server::start(args);
    let mut s = connect(srv.addr());
    let mut total = 0u64;

    let frame = encode_frame(CMD_ECHO, b"byte-by-byte body!!!");
    for b in &frame {
        s.write_all(std::slice::from_ref(b)).unwrap();
        s.flush().unwrap();
        // Pace the bytes so they arrive in separate segments.
        thread::sleep(Duration::from_millis(2));
    }
    let (cmd, got) = expect_frame(&mut s, "byte-by-byte echo");
    assert_eq!(cmd, CMD_ECHO);
    assert_eq!(got, b"byte-by-byte body!!!");
    total += frame.len() as u64;

    // Split a frame at every possible offset (inside the header and body).
    let frame = encode_frame(CMD_ECHO, b"split-me-please");
    for k in 1..frame.len() {
        s.write_all(&frame[..k]).unwrap();
        thread::sleep(Duration::from_millis(3));
        s.write_all(&frame[k..]).unwrap();
        let mut got = vec![0u8; frame.len()];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("reply to a frame split at {k}: {e}"));
        assert_eq!(got, frame, "frame split at offset {k}");
        total += frame.len() as u64;
    }
    drop(s);
    let summary = srv.stop_checked(1);
    assert_echo_bytes(&summary, total);
}

/// Many frames merged in one write, including one straddling sizes.
pub fn merged_writes(args: &[&str]) {
    let mut srv = Server::start(args);
    let mut s = connect(srv.addr());
    let mut rng = Rng::new(42);
    let mut bodies = Vec::new();
    let mut buf = Vec::new();
    for i in 0..300 {
        let n = match i % 50 {
            0 => 4097,
            25 => 0,
            _ => rng.below(300) as usize,
        };
        let b = rng.bytes(n);
        buf.extend(encode_frame(CMD_ECHO, &b));
        bodies.push(b);
    }
    let got = exchange(&mut s, &buf, buf.len());
    assert_frame_body_eq(&got, &buf, "300 merged frames echoed back");
    // And once more, with PINGs interleaved, to check per-frame dispatch.
    let mut buf2 = Vec::new();
    let mut want2 = Vec::new();
    for (i, b) in bodies.iter().take(50).enumerate() {
        let cmd = if i % 2 == 0 { CMD_ECHO } else { CMD_PING };
        let reply = if i % 2 == 0 { CMD_ECHO } else { CMD_PONG };
        buf2.extend(encode_frame(cmd, b));
        want2.extend(encode_frame(reply, b));
    }
    let got2 = exchange(&mut s, &buf2, want2.len());
    assert_frame_body_eq(&got2, &want2, "merged ECHO/PING frames");
    drop(s);
    let summary = srv.stop_checked(1);
    assert_echo_bytes(&summary, (buf.len() + buf2.len()) as u64);
}

/// 50 threads x 200 echoes of random size/content, in small pipelined batches.
pub fn concurrent_50x200(args: &[&str]) {
    const THREADS: u64 = 50;
    const PER_THREAD: usize = 200;
    let mut srv = Server::start(args);
    let addr = srv.addr();
    let total: u64 = thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                sc.spawn(move || {
                    let mut rng = Rng::new(0xC0FFEE + t);
                    let mut s: TcpStream = connect(addr);
                    let mut done = 0usize;
                    let mut bytes = 0u64;
                    while done < PER_THREAD {
                        // Either one big frame alone, or up to 4 small ones
                        // pipelined (keeps in-flight data far below socket
                        // buffer sizes, so no write/write deadlock).
                        let batch: Vec<Vec<u8>> = if rng.below(20) == 0 {
                            let n = 4096 + rng.below(60_000) as usize;
                            vec![rng.bytes(n)]
                        } else {
                            let k = (1 + rng.below(4) as usize).min(PER_THREAD - done);
                            (0..k)
                                .map(|_| {
                                    let n = rng.below(2048) as usize;
                                    rng.bytes(n)
                                })
                                .collect()
                        };
                        for b in &batch {
                            write_frame(&mut s, CMD_ECHO, b).unwrap();
                        }
                        for (j, b) in batch.iter().enumerate() {
                            let (cmd, got) =
                                expect_frame(&mut s, &format!("thread {t} frame {}", done + j));
                            assert_eq!(cmd, CMD_ECHO, "thread {t} frame {}", done + j);
                            assert_frame_body_eq(
                                &got,
                                b,
                                &format!("thread {t} frame {} (per-connection order)", done + j),
                            );
                            bytes += (b.len() + HEADER_LEN) as u64;
                        }
                        done += batch.len();
                    }
                    bytes
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let summary = srv.stop_checked(THREADS);
    assert_echo_bytes(&summary, total);
}

macro_rules! model_tests {
    ($name:ident, $args:expr) => {
        mod $name {
            const ARGS: &[&str] = $args;

            #[test]
            fn single_echo_byte_identical() {
                super::single_echo(ARGS)
            }

            #[test]
            fn pipelined_1000_in_order() {
                super::pipelined_1000(ARGS)
            }

            #[test]
            fn edge_sizes_up_to_max_frame() {
                super::sizes(ARGS)
            }

            #[test]
            fn split_writes_byte_by_byte() {
                super::split_writes(ARGS)
            }

            #[test]
            fn merged_frames_in_one_write() {
                super::merged_writes(ARGS)
            }

            #[test]
            fn concurrent_50_threads_x_200() {
                super::concurrent_50x200(ARGS)
            }
        }
    };
}

// Shared model: one completion port, two workers.
model_tests!(shared, &["--ports", "1", "--workers", "2"]);
// Per-core model: two ports, one worker each.
model_tests!(per_core, &["--ports", "2", "--workers", "2"]);
// Four workers sharing one port.
model_tests!(four_workers_one_port, &["--ports", "1", "--workers", "4"]);

/// No threading flags at all: the defaults must echo too.
#[test]
fn default_config_echo() {
    single_echo(&[]);
}
