//! The completion port's contract, tested on the library directly.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cport::op::{Op, Outcome, Sock};
use cport::port::{BackendKind, CompletionPort, PortConfig};
use socket2::Socket;

use crate::util::test_port_backend;

/// A port on the backend `CPORT_TEST_BACKEND` names (default: auto).
fn port(concurrency: usize) -> CompletionPort {
    port_with(concurrency, 256, test_port_backend())
}

fn port_with(concurrency: usize, recv_bufs: u32, backend: BackendKind) -> CompletionPort {
    let cfg = PortConfig {
        concurrency,
        recv_bufs,
        backend,
        ..PortConfig::default()
    };
    let p = CompletionPort::new(&cfg).expect("create port");
    if backend != BackendKind::Auto {
        assert_eq!(
            p.backend(),
            backend.name(),
            "the port runs the backend asked for"
        );
    }
    p
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn posted_completions_reach_exactly_one_worker_each() {
    let p = port(4);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let total = 4000u64;
    let got = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (p, seen, got) = (p.clone(), seen.clone(), got.clone());
        workers.push(thread::spawn(move || {
            let mut w = p.worker();
            let mut batch = Vec::new();
            while got.load(Ordering::SeqCst) < total as usize {
                batch.clear();
                w.get_many(&mut batch, 8, Some(Duration::from_millis(50)))
                    .unwrap();
                for c in batch.drain(..) {
                    let Outcome::Posted(v) = c.outcome else {
                        panic!("not posted")
                    };
                    assert_eq!(c.key, v * 3);
                    seen.lock().unwrap().push(v);
                    got.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let mut posters = Vec::new();
    for t in 0..4u64 {
        let p = p.clone();
        posters.push(thread::spawn(move || {
            for i in 0..total / 4 {
                let v = t * (total / 4) + i;
                p.post(v * 3, v);
            }
        }));
    }
    for t in posters {
        t.join().unwrap();
    }
    for t in workers {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), total as usize);
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        total as usize,
        "a completion was delivered twice"
    );
}

#[test]
fn get_times_out_with_nothing_to_do() {
    let p = port(2);
    let mut w = p.worker();
    let start = Instant::now();
    let got = w.get(Some(Duration::from_millis(100))).unwrap();
    assert!(got.is_none());
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn the_last_worker_to_wait_is_woken_first() {
    let p = port(8);
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    for name in 0..3usize {
        let (pw, tx) = (p.clone(), tx.clone());
        threads.push(thread::spawn(move || {
            let mut w = pw.worker();
            loop {
                if let Some(c) = w.get(Some(Duration::from_secs(30))).unwrap() {
                    let Outcome::Posted(v) = c.outcome else {
                        panic!()
                    };
                    tx.send((name, v)).unwrap();
                    if v == u64::MAX {
                        return;
                    }
                }
            }
        }));
        // Start them one after the other so the waiting order is known.
        wait_until("worker to become idle", || p.idle_workers() == name + 1);
    }
    // Worker 0 leads (waits in the kernel); 1 and 2 are stacked, 2 on top.
    p.post(1, 7);
    let (who, v) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(
        (who, v),
        (2, 7),
        "LIFO: the most recently idle worker takes the work"
    );
    for _ in 0..3 {
        p.post(1, u64::MAX);
    }
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn concurrency_limit_holds_back_ready_work() {
    let p = port(1);
    p.post(1, 1);
    p.post(1, 2);
    let mut a = p.worker();
    let first = a
        .get(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("a gets work");
    assert!(matches!(first.outcome, Outcome::Posted(1)));
    assert_eq!(p.running_workers(), 1);
    // While `a` runs, `b` must not get the second completion, although it is ready.
    let p2 = p.clone();
    let b = thread::spawn(move || {
        let mut b = p2.worker();
        b.get(Some(Duration::from_millis(300))).unwrap().is_some()
    });
    assert!(!b.join().unwrap(), "concurrency limit 1 was exceeded");
    assert_eq!(p.queued(), 1);
    // When `a` comes back it takes the next one itself.
    let second = a
        .get(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("second");
    assert!(matches!(second.outcome, Outcome::Posted(2)));
}

#[test]
fn a_submission_from_a_non_worker_thread_is_carried_out() {
    let p = port(2);
    let p2 = p.clone();
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let mut w = p2.worker();
        let c = w.get(Some(Duration::from_secs(30))).unwrap();
        tx.send(c.map(|c| (c.key, matches!(c.outcome, Outcome::Timer(Ok(()))))))
            .unwrap();
    });
    wait_until("worker idle", || p.idle_workers() == 1);
    p.submit(
        42,
        Op::Timeout {
            after: Duration::from_millis(20),
        },
    )
    .unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        Some((42, true))
    );
    worker.join().unwrap();
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn cancel_completes_the_target_exactly_once() {
    let p = port(1);
    let mut w = p.worker();
    let id = p
        .submit(
            5,
            Op::Timeout {
                after: Duration::from_secs(60),
            },
        )
        .unwrap();
    p.cancel(id).unwrap();
    let c = w
        .get(Some(Duration::from_secs(30)))
        .unwrap()
        .expect("cancelled timer completes");
    assert_eq!(c.op, Some(id));
    match c.outcome {
        Outcome::Timer(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::Interrupted),
        o => panic!("unexpected {o:?}"),
    }
    // A stale id is harmless.
    p.cancel(id).unwrap();
    assert!(w.get(Some(Duration::from_millis(100))).unwrap().is_none());
    assert_eq!(p.outstanding(), 0);
}

fn pair(listener: &TcpListener) -> (TcpStream, Socket) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, Socket::from(server))
}

#[test]
fn multishot_accept_stays_armed() {
    let p = port(1);
    let mut w = p.worker();
    let listener = Arc::new(Socket::from(TcpListener::bind("127.0.0.1:0").unwrap()));
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let id = p
        .submit(
            9,
            Op::Accept {
                listener: listener.clone(),
            },
        )
        .unwrap();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(TcpStream::connect(addr).unwrap());
    }
    let mut accepted = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted < 20 && Instant::now() < deadline {
        if let Some(c) = w.get(Some(Duration::from_millis(100))).unwrap() {
            match c.outcome {
                Outcome::Accepted { result, more } => {
                    let s = result.unwrap();
                    assert!(more, "multishot accept ended early");
                    assert_eq!(s.peer_addr().unwrap().as_socket().unwrap().ip(), addr.ip());
                    accepted += 1;
                }
                o => panic!("unexpected {o:?}"),
            }
        }
    }
    assert_eq!(accepted, 20);
    p.cancel(id).unwrap();
    let c = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    assert!(matches!(c.outcome, Outcome::Accepted { more: false, .. }));
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn recv_hands_back_a_pooled_buffer_and_eof() {
    let p = port(1);
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, server) = pair(&l);
    let server = Arc::new(server);
    p.submit(
        1,
        Op::Recv {
            socket: Sock::Os(server.clone()),
        },
    )
    .unwrap();
    // Nothing arrived yet: no buffer is taken from the pool.
    assert!(w.get(Some(Duration::from_millis(50))).unwrap().is_none());
    assert_eq!(p.bufs_leased(), 0);
    client.write_all(b"hello").unwrap();
    let c = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    let Outcome::Received(Ok(buf)) = c.outcome else {
        panic!()
    };
    assert_eq!(&buf[..], b"hello");
    assert_eq!(p.bufs_leased(), 1);
    drop(buf);
    assert_eq!(p.bufs_leased(), 0);
    p.submit(
        1,
        Op::Recv {
            socket: Sock::Os(server.clone()),
        },
    )
    .unwrap();
    drop(client);
    let c = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    let Outcome::Received(Ok(buf)) = c.outcome else {
        panic!()
    };
    assert!(buf.is_empty(), "EOF is an empty buffer");
}

#[test]
fn gathered_send_and_partial_progress() {
    let p = port(1);
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, server) = pair(&l);
    let server = Arc::new(server);
    let bufs: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    let expect: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
    p.submit(
        3,
        Op::Send {
            socket: Sock::Os(server),
            bufs,
        },
    )
    .unwrap();
    let c = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    let Outcome::Sent { result, bufs } = c.outcome else {
        panic!()
    };
    assert_eq!(result.unwrap(), 10_000);
    assert_eq!(bufs.len(), 10, "the buffers come back with the completion");
    let mut got = vec![0u8; 10_000];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, expect);
}

/// Closes connections with a receive and a large send in flight, thousands
/// of times; every operation must come back and every buffer return to the
/// pool (nothing freed while the kernel owns it: run under ASan/valgrind in
/// the reliability suite).
#[test]
fn closing_with_operations_in_flight_thousands_of_times() {
    let p = port(2);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let stop = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(3));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (p, stop, completed, barrier) =
            (p.clone(), stop.clone(), completed.clone(), barrier.clone());
        workers.push(thread::spawn(move || {
            let mut w = p.worker();
            barrier.wait();
            let mut batch = Vec::new();
            // Reaped completions may still wait in the ready queue after
            // the last operation left the backend (outstanding() == 0).
            while stop.load(Ordering::SeqCst) == 0 || p.outstanding() > 0 || p.queued() > 0 {
                batch.clear();
                w.get_many(&mut batch, 16, Some(Duration::from_millis(20)))
                    .unwrap();
                completed.fetch_add(batch.len(), Ordering::SeqCst);
            }
        }));
    }
    barrier.wait();
    let big = Bytes::from(vec![7u8; 256 * 1024]);
    let rounds = 3000;
    let mut submitted = 0;
    for i in 0..rounds {
        let (client, server) = pair(&l);
        let server = Arc::new(server);
        p.submit(
            i,
            Op::Recv {
                socket: Sock::Os(server.clone()),
            },
        )
        .unwrap();
        p.submit(
            i,
            Op::Send {
                socket: Sock::Os(server.clone()),
                bufs: vec![big.clone()],
            },
        )
        .unwrap();
        submitted += 2;
        if i % 2 == 0 {
            // Reset from the peer side...
            let s = Socket::from(client);
            s.set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        } else {
            drop(client);
        }
        // ...and the server side shut while its operations are in flight.
        let _ = server.shutdown(std::net::Shutdown::Both);
        drop(server);
    }
    wait_until("all operations to complete", || p.outstanding() == 0);
    stop.store(1, Ordering::SeqCst);
    for t in workers {
        t.join().unwrap();
    }
    assert_eq!(completed.load(Ordering::SeqCst), submitted);
    assert_eq!(p.bufs_leased(), 0);
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn cancel_ends_a_waiting_receive_without_taking_a_buffer() {
    let p = port(1);
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, server) = pair(&l);
    let server = Arc::new(server);
    let id = p
        .submit(
            4,
            Op::Recv {
                socket: Sock::Os(server.clone()),
            },
        )
        .unwrap();
    assert!(w.get(Some(Duration::from_millis(50))).unwrap().is_none());
    p.cancel(id).unwrap();
    let c = w
        .get(Some(Duration::from_secs(30)))
        .unwrap()
        .expect("the cancelled receive completes");
    assert_eq!((c.key, c.op), (4, Some(id)));
    match c.outcome {
        Outcome::Received(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECANCELED)),
        o => panic!("unexpected {o:?}"),
    }
    assert_eq!(p.outstanding(), 0);
    assert_eq!(p.bufs_leased(), 0);
    // Exactly once: nothing else comes for it.
    assert!(w.get(Some(Duration::from_millis(100))).unwrap().is_none());
    // The socket is still usable.
    p.submit(
        4,
        Op::Recv {
            socket: Sock::Os(server),
        },
    )
    .unwrap();
    client.write_all(b"after").unwrap();
    let c = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    let Outcome::Received(Ok(buf)) = c.outcome else {
        panic!("receive after cancel")
    };
    assert_eq!(&buf[..], b"after");
}

#[test]
fn an_empty_pool_fails_a_readable_receive_with_enobufs() {
    let p = port_with(1, 2, test_port_backend());
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut conns: Vec<(TcpStream, Arc<Socket>)> = (0..3)
        .map(|_| {
            let (c, s) = pair(&l);
            (c, Arc::new(s))
        })
        .collect();
    let mut held = Vec::new();
    for (i, (c, s)) in conns.iter_mut().enumerate().take(2) {
        c.write_all(b"x").unwrap();
        p.submit(
            i as u64,
            Op::Recv {
                socket: Sock::Os(s.clone()),
            },
        )
        .unwrap();
        let got = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
        let Outcome::Received(Ok(buf)) = got.outcome else {
            panic!("receive {i}: {:?}", got.outcome)
        };
        held.push(buf);
    }
    assert_eq!(p.bufs_leased(), 2, "both pooled buffers are lent out");
    conns[2].0.write_all(b"third").unwrap();
    p.submit(
        2,
        Op::Recv {
            socket: Sock::Os(conns[2].1.clone()),
        },
    )
    .unwrap();
    let got = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    match got.outcome {
        Outcome::Received(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS)),
        o => panic!("with the pool empty a receive must fail with ENOBUFS, got {o:?}"),
    }
    drop(held.pop());
    p.submit(
        2,
        Op::Recv {
            socket: Sock::Os(conns[2].1.clone()),
        },
    )
    .unwrap();
    let got = w.get(Some(Duration::from_secs(30))).unwrap().unwrap();
    let Outcome::Received(Ok(buf)) = got.outcome else {
        panic!("receive after a buffer came back: {:?}", got.outcome)
    };
    assert_eq!(&buf[..], b"third", "no byte was lost by the failed receive");
    drop(buf);
    drop(held);
    assert_eq!(p.bufs_leased(), 0);
    assert_eq!(p.outstanding(), 0);
}

/// Byte `i` of the stream the full-socket test sends.
fn stream_byte(i: usize) -> u8 {
    (i % 251) as u8
}

#[test]
fn a_send_into_a_full_socket_waits_for_room() {
    let p = port(1);
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&l);
    let server = Arc::new(server);
    let chunk = 1 << 20;
    let mut sent = 0usize;
    let mut waiting = None;
    // The peer does not read: sends complete (fully or partly) until the
    // socket's buffers are full; then one must wait instead of completing.
    for _ in 0..64 {
        let bufs = vec![Bytes::from(
            (sent..sent + chunk).map(stream_byte).collect::<Vec<u8>>(),
        )];
        let id = p
            .submit(
                8,
                Op::Send {
                    socket: Sock::Os(server.clone()),
                    bufs,
                },
            )
            .unwrap();
        match w.get(Some(Duration::from_millis(300))).unwrap() {
            Some(c) => {
                let Outcome::Sent { result, bufs } = c.outcome else {
                    panic!("unexpected {:?}", c.outcome)
                };
                assert_eq!(bufs.len(), 1);
                let n = result.expect("send into a live socket");
                assert!(n > 0 && n <= chunk);
                sent += n;
            }
            None => {
                waiting = Some(id);
                break;
            }
        }
    }
    let id = waiting.expect("64 MiB never filled a loopback socket that nobody reads");
    assert_eq!(p.outstanding(), 1, "the blocked send is still in flight");
    // Now read everything: the waiting send must complete once there is room.
    let reader = thread::spawn(move || {
        let mut client = client;
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).map(|_| got)
    });
    let c = w
        .get(Some(Duration::from_secs(30)))
        .unwrap()
        .expect("the waiting send completes once the peer reads");
    assert_eq!(c.op, Some(id));
    let Outcome::Sent { result, .. } = c.outcome else {
        panic!("unexpected {:?}", c.outcome)
    };
    let n = result.expect("send after room appeared");
    assert!(n > 0);
    sent += n;
    server.shutdown(std::net::Shutdown::Write).unwrap();
    let got = reader.join().unwrap().expect("read the stream");
    assert_eq!(
        got.len(),
        sent,
        "the peer reads exactly what was reported sent"
    );
    let bad = got
        .iter()
        .enumerate()
        .position(|(i, b)| *b != stream_byte(i));
    assert_eq!(bad, None, "stream corrupted at this offset");
    assert_eq!(p.outstanding(), 0);
}

/// A worker's submission is handed over when it next waits, even while
/// another worker leads with a long timeout (io_uring: the SQE reaches the
/// kernel; poll: the sleeping leader is woken).
#[test]
fn a_worker_submission_reaches_a_sleeping_leader() {
    let p = port(2);
    let (tx, rx) = mpsc::channel();
    let leader = {
        let (p, tx) = (p.clone(), tx.clone());
        thread::spawn(move || {
            let mut w = p.worker();
            let c = w.get(Some(Duration::from_secs(30))).unwrap();
            tx.send(c.map(|c| c.key)).unwrap();
        })
    };
    wait_until("the first worker to lead", || p.idle_workers() == 1);
    let mut me = p.worker();
    let start = Instant::now();
    p.submit(
        77,
        Op::Timeout {
            after: Duration::from_millis(10),
        },
    )
    .unwrap();
    // This worker becomes a follower (a leader exists) and flushes.
    let mine = me.get(Some(Duration::from_millis(1500))).unwrap();
    let got = match mine {
        Some(c) => Some(c.key),
        None => rx.recv_timeout(Duration::from_secs(30)).unwrap(),
    };
    assert_eq!(got, Some(77));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the timer waited for the leader's own timeout ({:?})",
        start.elapsed()
    );
    drop(me);
    p.post(1, 1);
    leader.join().unwrap();
}

#[test]
fn poll_backend_allows_one_op_per_socket_side() {
    let p = port_with(1, 16, BackendKind::Poll);
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_client, server) = pair(&l);
    let server = Arc::new(server);
    let recv = p
        .submit(
            1,
            Op::Recv {
                socket: Sock::Os(server.clone()),
            },
        )
        .unwrap();
    let e = p
        .submit(
            1,
            Op::Recv {
                socket: Sock::Os(server.clone()),
            },
        )
        .expect_err("a second receive on one socket is refused");
    assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "{e}");
    let listener = Arc::new(Socket::from(TcpListener::bind("127.0.0.1:0").unwrap()));
    let accept = p
        .submit(
            2,
            Op::Accept {
                listener: listener.clone(),
            },
        )
        .unwrap();
    assert!(p.submit(2, Op::Accept { listener }).is_err());
    // The write side is independent of the read side.
    let send = p
        .submit(
            1,
            Op::Send {
                socket: Sock::Os(server.clone()),
                bufs: vec![Bytes::from_static(b"x")],
            },
        )
        .unwrap();
    assert_eq!(p.outstanding(), 3, "refused submissions are not in flight");
    p.cancel(recv).unwrap();
    p.cancel(accept).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let c = w
            .get(Some(Duration::from_secs(30)))
            .unwrap()
            .expect("completion");
        seen.push(c.op.unwrap());
    }
    seen.sort_by_key(|id| id.raw());
    let mut want = vec![recv, accept, send];
    want.sort_by_key(|id| id.raw());
    assert_eq!(seen, want, "each op completes exactly once");
    assert_eq!(p.outstanding(), 0);
}

/// Posts from several threads while the only worker leads with a long
/// timeout: a post that finds it waiting in the kernel must wake it, every
/// time, or it sleeps out its whole timeout.
#[test]
fn posts_always_wake_a_leader_with_a_long_timeout() {
    let p = port(1);
    let total = 40_000u64;
    let posters = 4u64;
    let got = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (p, got) = (p.clone(), got.clone());
        thread::spawn(move || {
            let mut w = p.worker();
            let mut batch = Vec::new();
            while got.load(Ordering::SeqCst) < total as usize {
                batch.clear();
                let n = w
                    .get_many(&mut batch, 4, Some(Duration::from_secs(60)))
                    .unwrap();
                got.fetch_add(n, Ordering::SeqCst);
            }
        })
    };
    let start = Instant::now();
    let threads: Vec<_> = (0..posters)
        .map(|t| {
            let p = p.clone();
            thread::spawn(move || {
                for i in 0..total / posters {
                    p.post(t, i);
                    // Let the leader go back to sleep now and then, so that
                    // posts keep landing on a leader inside its wait.
                    if (i + t) % 3 == 0 {
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_until("every post to be taken", || {
        got.load(Ordering::SeqCst) == total as usize
    });
    worker.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "posts took {:?}: a wake-up was lost",
        start.elapsed()
    );
}
