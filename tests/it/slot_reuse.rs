//! Completion vs close on a reused connection slot, on the real engine.
//!
//! Connections open and close one after the other, so they keep reusing
//! the same few slots of the port's table, while another thread posts to
//! every recent id, closed ones included. A post is accepted only while its
//! connection is in the table, but may be dispatched after the connection
//! closed and its slot went to the next one: the generation check must
//! drop it (counted as a late completion), never hand it to the slot's new
//! owner. Each value carries the id it was meant for, and the handler
//! checks it against the connection it runs for.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cport::frame::{Frame, HEADER_LEN};
use cport::server::{ConnId, Ctx, Engine, EngineConfig, Handler};

#[derive(Default)]
struct Checker {
    ids: Mutex<Vec<ConnId>>,
    delivered: AtomicU64,
    misdelivered: AtomicU64,
}

impl Handler for Checker {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.ids.lock().unwrap().push(ctx.id());
    }
    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        ctx.send_frame(frame);
    }
    fn on_posted(&self, ctx: &mut Ctx<'_>, value: u64) {
        if value == ctx.id().raw() {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misdelivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn posts_to_closed_connections_never_reach_the_slot_s_next_owner() {
    const ROUNDS: usize = 1000;
    let handler = Arc::new(Checker::default());
    let mut cfg = EngineConfig {
        ports: 1,
        workers: 2,
        ..EngineConfig::default()
    };
    cfg.port.backend = crate::util::test_port_backend();
    let mut engine = Engine::start(cfg, handler.clone()).unwrap();
    let addr = engine.listen("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let stop = AtomicBool::new(false);
    let accepted_posts = thread::scope(|sc| {
        let poster = sc.spawn(|| {
            let h = engine.handle();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut accepted = 0u64;
            for _ in 0..10_000_000u64 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let recent: Vec<ConnId> = {
                    let ids = handler.ids.lock().unwrap();
                    ids[ids.len().saturating_sub(8)..].to_vec()
                };
                for id in recent {
                    accepted += u64::from(h.post(id, id.raw()));
                }
                thread::yield_now();
            }
            accepted
        });
        let echo = Frame::new(1, b"x");
        for i in 0..ROUNDS {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(echo.wire()).unwrap();
            let mut back = [0u8; HEADER_LEN + 1];
            s.read_exact(&mut back)
                .unwrap_or_else(|e| panic!("echo on connection #{i}: {e}"));
            assert_eq!(&back[..], &echo.wire()[..]);
        }
        // One connection stays open until a post reaches it, so the check
        // below is never vacuous, however the threads were scheduled.
        let mut last = TcpStream::connect(addr).unwrap();
        last.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        last.write_all(echo.wire()).unwrap();
        let mut back = [0u8; HEADER_LEN + 1];
        last.read_exact(&mut back).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while handler.delivered.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no post was delivered in 30 s");
            thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        drop(last);
        poster.join().unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.stats().connections_open > 0 {
        assert!(Instant::now() < deadline, "connections did not close");
        thread::sleep(Duration::from_millis(10));
    }
    let stats = engine.stats();
    let summary = engine.shutdown(Duration::from_secs(1));
    let ids = handler.ids.lock().unwrap();
    let slots: std::collections::BTreeSet<u64> =
        ids.iter().map(|id| id.raw() & 0xFFFF_FFFF).collect();
    let delivered = handler.delivered.load(Ordering::Relaxed);
    let misdelivered = handler.misdelivered.load(Ordering::Relaxed);
    eprintln!(
        "[it] {} connections over {} slots; posts accepted {accepted_posts}, delivered {delivered}, \
         dropped as late {}, misdelivered {misdelivered}",
        ids.len(),
        slots.len(),
        stats.late_completions
    );
    assert_eq!(ids.len(), ROUNDS + 1);
    // The slots really were reused, many times each.
    assert!(slots.len() * 10 <= ROUNDS, "{} slots", slots.len());
    assert_eq!(misdelivered, 0, "a post reached the slot's next owner");
    // Every accepted post was delivered or dropped as late, none lost.
    assert!(delivered <= accepted_posts);
    assert_eq!(summary.outstanding_ops, 0);
}
