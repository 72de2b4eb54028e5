//! Ring limits (issue 9, item 5): an io_uring server whose rings are tiny
//! (8 submission / 16 completion entries) carries thousands of connections.
//! Its submission queue is full most of the time and its completion queue
//! overflows into the kernel's list on nearly every reap; the test checks
//! that this costs only syscalls: no completion is lost (every echo comes
//! back byte for byte, nothing is outstanding at shutdown, the kernel's
//! `cq_overflow` drop counter stays 0) and nothing stalls for a second.
//!
//! The rings are set with `PortConfig::{entries, cq_entries}` for the
//! in-process server and with `CPORT_RING_ENTRIES=8:16` for the `cport
//! stress` client process, so both sides run tiny rings. uring only: the
//! poll backend has no rings (the test says so and returns).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cport::port::{BackendKind, PortConfig};
use cport::server::{Engine, EngineConfig, Services};
use serde_json::Value;

use crate::util::*;

const SQ: u32 = 8;
const CQ: u32 = 16;

/// Connections pushed through the tiny rings (`CPORT_RING_CONNS` to change).
fn connections() -> u64 {
    std::env::var("CPORT_RING_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// A framed echo server on one port with tiny rings, or `None` (with a
/// SKIPPED line) where io_uring is not the backend under test.
fn tiny_ring_server(workers: usize) -> Option<Engine> {
    if test_backend().as_deref() == Some("poll") {
        eprintln!("SKIPPED ring limits: the poll backend has no rings");
        return None;
    }
    let cfg = EngineConfig {
        workers,
        ports: 1,
        port: PortConfig {
            backend: BackendKind::Uring,
            entries: SQ,
            cq_entries: CQ,
            recv_bufs: 4096,
            ..PortConfig::default()
        },
        ..EngineConfig::default()
    };
    match Engine::start(cfg, Arc::new(Services::new())) {
        Ok(e) => Some(e),
        Err(e) if test_backend().is_none() => {
            eprintln!("SKIPPED ring limits: io_uring is unavailable here ({e})");
            None
        }
        Err(e) => panic!("cannot start a tiny-ring io_uring engine: {e}"),
    }
}

/// `cport stress` against `addr`, on tiny rings too: every connection sends
/// 4 messages 1 s apart, connects paced at 1,000/s, so the offered load
/// stays well below what a debug build serves and a round trip over 1 s
/// means a stall, not a queue (pingpong at saturation measures queueing).
fn stress(addr: SocketAddr, conns: u64, json: &std::path::Path) -> CmdOutput {
    let conns = conns.to_string();
    let addr = addr.to_string();
    let args = [
        "stress",
        "--connect",
        &addr,
        "--connections",
        &conns,
        "--ramp",
        "1000",
        "--mode",
        "interval",
        "--messages",
        "4",
        "--interval",
        "1s",
        "--size",
        "100",
        "--backend",
        "uring",
        "--json",
        json.to_str().unwrap(),
    ];
    run_cport_with(&args, None, Duration::from_secs(120), |cmd| {
        cmd.env("CPORT_RING_ENTRIES", format!("{SQ}:{CQ}"));
    })
}

fn num(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("`{path}` is not a number in {v:#}"))
}

#[test]
fn thousands_of_connections_through_8_sq_16_cq_rings() {
    for workers in [1usize, 2] {
        let Some(mut engine) = tiny_ring_server(workers) else {
            return;
        };
        let addr = engine.listen("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
        let conns = connections();
        let json = std::env::temp_dir().join(format!(
            "cport-ring-limits-{}-{workers}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&json);
        let done = AtomicBool::new(false);
        let (out, longest_gap) = thread::scope(|s| {
            let h = engine.handle();
            let done = &done;
            // Server-side stall watchdog: the longest time the count of
            // received frames stood still between two advances.
            let watch = s.spawn(move || {
                let mut last = h.stats().frames_in;
                let mut changed = Instant::now();
                let mut longest = Duration::ZERO;
                let mut started = false;
                while !done.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(20));
                    let now = h.stats().frames_in;
                    if now != last {
                        if started {
                            longest = longest.max(changed.elapsed());
                        }
                        started = true;
                        last = now;
                        changed = Instant::now();
                    }
                }
                longest
            });
            let out = stress(addr, conns, &json);
            done.store(true, Ordering::Relaxed);
            (out, watch.join().unwrap())
        });
        let text = std::fs::read_to_string(&json)
            .unwrap_or_else(|e| panic!("no stress report ({e}):\n{}", out.dump()));
        let _ = std::fs::remove_file(&json);
        let r: Value = serde_json::from_str(&text).unwrap();
        let st = engine.stats();
        eprintln!(
            "[ring_limits] workers={workers} conns={conns}: messages={} p99={}us max={}us \
             server stall max={longest_gap:?} cq_full={} sq_full={} cq_overflow={}",
            num(&r, "messages.received"),
            num(&r, "latency_us.p99"),
            num(&r, "latency_us.max"),
            st.cq_full,
            st.sq_full,
            st.cq_overflow
        );
        assert_eq!(num(&r, "connections.opened"), conns, "{}", out.dump());
        assert_eq!(num(&r, "connections.failed"), 0, "{}", out.dump());
        assert_eq!(num(&r, "messages.mismatches"), 0, "{r:#}");
        assert_eq!(num(&r, "messages.lost"), 0, "{r:#}");
        assert_eq!(
            num(&r, "messages.received"),
            4 * conns,
            "every message came back: {r:#}"
        );
        assert_eq!(r["ok"], Value::Bool(true), "{}", out.dump());
        assert!(
            num(&r, "latency_us.max") < 1_000_000,
            "a round trip took over 1 s through tiny rings: {r:#}"
        );
        assert!(
            longest_gap < Duration::from_secs(1),
            "the server received no frame for {longest_gap:?}"
        );
        assert_eq!(st.cq_overflow, 0, "the kernel dropped completions: {st:?}");
        assert!(
            st.cq_full > 0 && st.sq_full > 0,
            "the rings never filled: the tiny sizes did not apply ({st:?})"
        );
        let summary = engine.shutdown(Duration::from_secs(2));
        assert_eq!(summary.outstanding_ops, 0, "{summary:?}");
        assert_eq!(summary.outstanding_bufs, 0, "{summary:?}");
        assert_eq!(summary.connections_left, 0, "{summary:?}");
        // (+1: `cport stress` reads the server's figures over a STATS connection.)
        assert_eq!(summary.connections_served, conns + 1, "{summary:?}");
    }
}

/// A bad `CPORT_RING_ENTRIES` is a clear start-up error, not a panic.
#[test]
fn a_bad_ring_size_is_a_clear_error() {
    if test_backend().as_deref() == Some("poll") {
        eprintln!("SKIPPED a_bad_ring_size_is_a_clear_error: poll has no rings");
        return;
    }
    let out = run_cport_with(
        &["server", "--listen", "127.0.0.1:0", "--backend", "uring"],
        None,
        Duration::from_secs(30),
        |cmd| {
            cmd.env("CPORT_RING_ENTRIES", "8:lots");
        },
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("CPORT_RING_ENTRIES"), "{}", out.dump());
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
}
