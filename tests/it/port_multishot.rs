//! The multishot receive's contract under churn, on the port alone: every
//! connection's bytes arrive whole and in order, and its end (EOF or reset)
//! is always reported, whatever the pool, cancels and re-arms do.
//!
//! Peers write a few messages and then close (FIN) or reset (RST) at once,
//! while the worker holds some buffers for a while (so the pool runs dry and
//! receives end with ENOBUFS), cancels some receives as backpressure does,
//! and re-arms every receive that ended without the connection's end.

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use cport::buf::RecvBuf;
use cport::op::{Op, OpId, Outcome, Sock};
use cport::port::{CompletionPort, PortConfig};
use socket2::Socket;

use crate::util::test_port_backend;

/// What the worker knows of one connection.
struct Peer {
    /// Dropped once the end is seen, so a long run stays under the
    /// descriptor limit.
    socket: Option<Sock>,
    recv: Option<OpId>,
    cancelled: bool,
    got: Vec<u8>,
    /// EOF (true) or an error (false) was reported.
    ended: Option<bool>,
    /// Receives that ended while the connection went on.
    rearms: u64,
}

impl Peer {
    /// Moves an accepted socket into the port (a registered slot when there
    /// is room) and arms its multishot receive.
    fn armed(p: &CompletionPort, key: u64, s: TcpStream) -> Peer {
        let socket = p.make_direct(Socket::from(s));
        let recv = p
            .submit(
                key,
                Op::RecvMulti {
                    socket: socket.clone(),
                },
            )
            .unwrap();
        Peer {
            socket: Some(socket),
            recv: Some(recv),
            cancelled: false,
            got: Vec::new(),
            ended: None,
            rearms: 0,
        }
    }
}

fn pattern(conn: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 131 + conn * 17) as u8)
        .collect()
}

#[test]
fn multishot_receive_reports_every_end_under_churn() {
    let cfg = PortConfig {
        concurrency: 1,
        // A small pool, so receives run it dry and end with ENOBUFS.
        recv_bufs: 32,
        single_worker: true,
        // Registered-file sockets too, as the engine uses them.
        direct_files: if std::env::var_os("CPORT_EXP_OS").is_some() {
            0
        } else {
            4096
        },
        backend: test_port_backend(),
        ..PortConfig::default()
    };
    let p = CompletionPort::new(&cfg).expect("create port");
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let conns: u64 = std::env::var("CPORT_MULTISHOT_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let batch = 100u64;
    let mut peers: HashMap<u64, Peer> = HashMap::new();
    let mut sent_by: HashMap<u64, (Vec<u8>, bool)> = HashMap::new();
    let mut held: Vec<RecvBuf> = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut k = 0;
    while k < conns {
        // A batch of connections, each with a multishot receive armed.
        let mut clients: Vec<(u64, TcpStream)> = Vec::new();
        for key in k..(k + batch).min(conns) {
            let mut c = TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().unwrap();
            // Every third connection has written and ended before its
            // receive is armed: the first issue finds data and the end.
            if key % 3 == 0 {
                let len = 1 + (next() % 3000) as usize;
                let data = pattern(key, len);
                c.write_all(&data).unwrap();
                let reset = next() % 2 == 0;
                sent_by.insert(key, (data, reset));
                if reset {
                    let s = Socket::from(c);
                    s.set_linger(Some(Duration::ZERO)).unwrap();
                    drop(s);
                } else {
                    drop(c);
                }
                thread::sleep(Duration::from_micros(next() % 200));
                peers.insert(key, Peer::armed(&p, key, s));
                continue;
            }
            peers.insert(key, Peer::armed(&p, key, s));
            clients.push((key, c));
        }
        // The peers write and close or reset, from another thread, while
        // this one handles completions.
        let plan: Vec<(u64, Vec<u8>, bool)> = clients
            .iter()
            .map(|(key, _)| {
                let len = (next() % 20_000) as usize;
                (*key, pattern(*key, len), next() % 2 == 0)
            })
            .collect();
        for (key, data, reset) in &plan {
            sent_by.insert(*key, (data.clone(), *reset));
        }
        let writer = thread::spawn(move || {
            // Half of each connection's bytes, a pause in which every
            // receive sits armed with nothing to read, then the rest.
            let mut clients = clients;
            for ((_, c), (_, data, _)) in clients.iter_mut().zip(&plan) {
                let _ = c.write_all(&data[..data.len() / 2]);
            }
            thread::sleep(Duration::from_millis(30));
            for ((_, mut c), (_, data, reset)) in clients.into_iter().zip(plan) {
                for chunk in data[data.len() / 2..].chunks(1000) {
                    if c.write_all(chunk).is_err() {
                        break;
                    }
                }
                if reset {
                    let s = Socket::from(c);
                    s.set_linger(Some(Duration::ZERO)).unwrap();
                    drop(s);
                } else {
                    drop(c);
                }
            }
        });
        let first = k;
        k = (k + batch).min(conns);
        loop {
            let open = (first..k).filter(|i| peers[i].ended.is_none()).count();
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{open} connection(s) of {first}..{k} never saw their end: {:?}",
                (first..k)
                    .filter(|i| peers[i].ended.is_none())
                    .map(|i| (i, peers[&i].got.len(), sent_by[&i].0.len(), peers[&i].recv))
                    .take(10)
                    .collect::<Vec<_>>()
            );
            out.clear();
            w.get_many(&mut out, 64, Some(Duration::from_millis(20)))
                .unwrap();
            for c in out.drain(..) {
                let peer = peers.get_mut(&c.key).expect("known key");
                let Outcome::ReceivedMulti { result, more } = c.outcome else {
                    panic!("unexpected outcome {:?}", c.outcome);
                };
                if !more {
                    peer.recv = None;
                }
                match result {
                    Ok(buf) if buf.is_empty() => peer.ended = Some(true),
                    Ok(buf) => {
                        peer.got.extend_from_slice(&buf);
                        // Hold a buffer now and then, so the pool runs dry.
                        if next() % 4 == 0 {
                            held.push(buf);
                        }
                        // Stop reading now and then, as backpressure does.
                        if more && next() % 16 == 0 && !peer.cancelled {
                            peer.cancelled = true;
                            let _ = p.cancel(peer.recv.unwrap());
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) && peer.cancelled => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(_) => peer.ended = Some(false),
                }
                if peer.ended.is_some() && peer.recv.is_none() {
                    peer.socket = None;
                }
                if peer.recv.is_none() && peer.ended.is_none() {
                    peer.cancelled = false;
                    peer.rearms += 1;
                    let id = p
                        .submit(
                            c.key,
                            Op::RecvMulti {
                                socket: peer.socket.clone().expect("open"),
                            },
                        )
                        .unwrap();
                    peer.recv = Some(id);
                }
            }
            if held.len() > 24 || next() % 8 == 0 {
                held.clear();
            }
            // A busy worker now and then: completions pile up past the
            // completion queue.
            if next() % 64 == 0 {
                thread::sleep(Duration::from_millis(5));
            }
        }
        writer.join().unwrap();
        held.clear();
        for key in first..k {
            let peer = &peers[&key];
            let (data, reset) = &sent_by[&key];
            if peer.ended == Some(true) {
                assert_eq!(
                    peer.got.len(),
                    data.len(),
                    "connection {key} ended with EOF but lost bytes (reset={reset})"
                );
            }
            assert!(
                data.starts_with(&peer.got),
                "connection {key}: bytes out of order or wrong"
            );
            assert!(
                peer.ended == Some(true) || *reset,
                "connection {key} closed with FIN but saw an error"
            );
        }
    }
    let rearms: u64 = peers.values().map(|p| p.rearms).sum();
    eprintln!("[port_multishot] {conns} connections, {rearms} re-arms, all ends seen");
    assert_eq!(p.outstanding(), 0);
}

/// Data and a reset that reach a socket before its armed multishot receive
/// runs: the receive hands over the data, and then must report the reset.
#[test]
fn multishot_receive_reports_a_reset_that_came_with_the_last_data() {
    let cfg = PortConfig {
        concurrency: 1,
        single_worker: true,
        backend: test_port_backend(),
        ..PortConfig::default()
    };
    let p = CompletionPort::new(&cfg).expect("create port");
    let mut w = p.worker();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut lost = 0;
    let rounds = 50;
    for round in 0..rounds {
        let mut c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        let socket = p.make_direct(Socket::from(s));
        p.submit(
            round,
            Op::RecvMulti {
                socket: socket.clone(),
            },
        )
        .unwrap();
        // Hand the receive to the kernel: nothing to read yet, so it waits.
        let mut out = Vec::new();
        w.get_many(&mut out, 8, Some(Duration::ZERO)).unwrap();
        assert!(out.is_empty());
        // Data, then a reset, from another thread, while the worker stays
        // in user space (task work queued for it waits until it enters
        // the kernel again).
        let writer = thread::spawn(move || {
            c.write_all(b"partial frame").unwrap();
            let c = Socket::from(c);
            c.set_linger(Some(Duration::ZERO)).unwrap();
            drop(c);
        });
        let spin = Instant::now();
        while !writer.is_finished() || spin.elapsed() < Duration::from_millis(5) {
            std::hint::spin_loop();
        }
        writer.join().unwrap();
        let mut got = 0;
        let mut ended = false;
        let deadline = Instant::now() + Duration::from_secs(2);
        while !ended && Instant::now() < deadline {
            out.clear();
            w.get_many(&mut out, 8, Some(Duration::from_millis(50)))
                .unwrap();
            for c in out.drain(..) {
                let Outcome::ReceivedMulti { result, more } = c.outcome else {
                    panic!("unexpected outcome {:?}", c.outcome);
                };
                match result {
                    Ok(b) if !b.is_empty() => got += b.len(),
                    _ => ended = true,
                }
                ended |= !more;
            }
        }
        if !ended {
            lost += 1;
            eprintln!("round {round}: {got} bytes, then no end");
            // Take the receive back so the port can be dropped.
            drop(socket);
        }
    }
    eprintln!("[port_multishot] a reset behind the last data lost in {lost} of {rounds} rounds");
    assert_eq!(lost, 0);
}
