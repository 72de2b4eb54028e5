//! Every connection's end is seen: under churn (echo, then FIN or reset at
//! any point, mid-frame included) beside heartbeating connections, every
//! connection the peers end is closed by the server at once, never left
//! for the idle timer to find.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::netpath::closed_by;
use crate::util::*;

fn connect_from(i: u64, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let src = SocketAddr::from(([127, 0, 1 + (i % 200) as u8, 2], 0));
    sock.bind(&src.into())?;
    sock.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let s: TcpStream = sock.into();
    configure(&s);
    Ok(s)
}

#[test]
fn churned_connections_are_closed_by_their_end_not_by_the_idle_timer() {
    let secs: u64 = std::env::var("CPORT_RECV_END_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let extra: Vec<String> = std::env::var("CPORT_EXP_ARGS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut args = vec!["--idle-timeout", "5s"];
    if extra.is_empty() {
        args.extend(["--ports", "2", "--workers", "2"]);
    }
    args.extend(extra.iter().map(|s| s.as_str()));
    let mut server = Server::start(&args);
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Heartbeats: 100 connections, a PING each every 500 ms.
    for t in 0..2u64 {
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            let mut conns: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
            let mut rng = Rng::new(t + 100);
            while !stop.load(Ordering::Relaxed) {
                for c in &mut conns {
                    let body = rng.bytes(16);
                    write_frame(c, CMD_PING, &body).unwrap();
                    let (cmd, got) = read_frame(c).unwrap();
                    assert_eq!((cmd, got), (CMD_PONG, body));
                }
                thread::sleep(Duration::from_millis(500));
            }
        }));
    }
    // Churn: connect, echo a few frames, then end with FIN or reset,
    // sometimes in the middle of a frame or before reading the reply.
    for t in 0..4u64 {
        let (stop, made) = (stop.clone(), made.clone());
        threads.push(thread::spawn(move || {
            let mut rng = Rng::new(t + 1);
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                i += 4;
                let Ok(mut s) = connect_from(i, addr) else {
                    continue;
                };
                made.fetch_add(1, Ordering::Relaxed);
                for _ in 0..rng.below(3) {
                    let n = rng.below(6000) as usize;
                    let body = rng.bytes(n);
                    if write_frame(&mut s, CMD_ECHO, &body).is_err() {
                        break;
                    }
                    if rng.below(3) > 0 && read_frame(&mut s).is_err() {
                        break;
                    }
                }
                match rng.below(4) {
                    0 => {
                        let f = encode_frame(CMD_ECHO, &rng.bytes(3000));
                        let cut = rng.below(3000) as usize;
                        let _ = std::io::Write::write_all(&mut s, &f[..cut]);
                        reset(s);
                    }
                    1 => reset(s),
                    2 => {
                        let f = encode_frame(CMD_ECHO, &rng.bytes(3000));
                        let cut = rng.below(3000) as usize;
                        let _ = std::io::Write::write_all(&mut s, &f[..cut]);
                        drop(s);
                    }
                    _ => drop(s),
                }
            }
        }));
    }
    thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    // The heartbeat connections are closed now too: every connection the
    // peers ended must be gone well before the 5 s idle timeout could
    // have closed it.
    let started = Instant::now();
    let mut s = connect(addr);
    let v = wait_stats(&mut s, "only the STATS connection open", |v| {
        stat_u64(v, "connections_open") == 1 || started.elapsed() > Duration::from_secs(4)
    });
    let open = stat_u64(&v, "connections_open");
    drop(s);
    server.stop_checked_with(libc::SIGTERM, None);
    eprintln!(
        "[recv_end] {} churned connections in {secs}s; open after churn: {open}; closed: {}",
        made.load(Ordering::Relaxed),
        v["closed"]
    );
    assert_eq!(
        open,
        1,
        "connections whose peers had ended were still open {:?} later: {v}",
        started.elapsed()
    );
    assert_eq!(
        closed_by(&v, "idle_timeout"),
        0,
        "the idle timer closed connections: {v}"
    );
}
