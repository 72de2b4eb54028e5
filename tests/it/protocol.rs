//! PING, STATS, unimplemented commands, listeners (IPv6, several).

use crate::util::*;

#[test]
fn ping_gets_pong_with_same_body() {
    let mut srv = Server::start(&[]);
    let mut s = connect(srv.addr());
    let mut total = 0u64;
    for body in [
        Vec::new(),
        b"hello".to_vec(),
        pattern(3, 1000),
        pattern(4, 70_000),
    ] {
        let frame = encode_frame(CMD_PING, &body);
        let got = exchange(&mut s, &frame, frame.len());
        let want = encode_frame(CMD_PONG, &body);
        assert_frame_body_eq(&got, &want, &format!("PONG for a {}-byte PING", body.len()));
        total += frame.len() as u64;
    }
    drop(s);
    let summary = srv.stop_checked(1);
    assert_eq!(get(&summary, "bytes_in"), total, "{summary:?}");
    assert_eq!(get(&summary, "bytes_out"), total, "{summary:?}");
}

fn check_backend_field(v: &serde_json::Value) {
    let backend = v
        .get("backend")
        .and_then(|b| b.as_str())
        .unwrap_or_else(|| panic!("STATS `backend` must be a string: {v}"));
    match test_backend() {
        Some(b) if b != "auto" => assert_eq!(backend, b, "STATS backend vs --backend {b}"),
        _ => assert!(
            backend == "uring" || backend == "poll",
            "STATS backend must name the backend in use (uring|poll), got {backend:?}"
        ),
    }
}

#[test]
fn stats_json_has_keys_and_counters_grow() {
    const K: u64 = 10;
    const N: usize = 100;
    let mut srv = Server::start(&["--ports", "2", "--workers", "2"]);
    let mut s = connect(srv.addr());
    let a = stats(&mut s);
    for key in STATS_KEYS {
        assert!(a.get(key).is_some(), "STATS lacks key `{key}`: {a}");
    }
    for key in [
        "connections_open",
        "connections_accepted",
        "frames_in",
        "frames_out",
        "bytes_in",
        "bytes_out",
    ] {
        stat_u64(&a, key);
    }
    assert_eq!(stat_u64(&a, "ports"), 2, "ports: {a}");
    assert_eq!(stat_u64(&a, "workers"), 2, "workers: {a}");
    assert_eq!(
        stat_u64(&a, "connections_open"),
        1,
        "only this connection: {a}"
    );
    assert_eq!(
        stat_u64(&a, "connections_accepted"),
        1,
        "only this connection: {a}"
    );
    assert!(
        stat_u64(&a, "frames_in") <= 1,
        "no frames before STATS: {a}"
    );
    assert!(stat_u64(&a, "bytes_in") <= 8, "no bytes before STATS: {a}");
    check_backend_field(&a);

    for i in 0..K {
        echo_roundtrip(&mut s, &pattern(i, N));
    }
    let b = stats(&mut s);
    let d = |k: &str| {
        let (x, y) = (stat_u64(&a, k), stat_u64(&b, k));
        assert!(y >= x, "counter `{k}` went backwards: before {a} after {b}");
        y - x
    };
    // Whether a STATS request counts itself or not, the delta between two
    // STATS requests covers exactly the K echoes plus one STATS frame.
    assert_eq!(
        d("frames_in"),
        K + 1,
        "frames_in delta; before {a} after {b}"
    );
    assert_eq!(
        d("bytes_in"),
        K * (N as u64 + 8) + 8,
        "bytes_in delta (wire bytes, headers included); before {a} after {b}"
    );
    assert!(
        (K..=K + 1).contains(&d("frames_out")),
        "frames_out delta must be {K} or {}; before {a} after {b}",
        K + 1
    );
    assert!(
        d("bytes_out") >= K * (N as u64 + 8),
        "bytes_out delta too small; before {a} after {b}"
    );
    assert_eq!(stat_u64(&b, "connections_open"), 1, "{b}");
    assert_eq!(stat_u64(&b, "connections_accepted"), 1, "{b}");
    drop(s);
    srv.stop_checked(1);
}

#[test]
fn stats_reports_workers_and_ports_shared_model() {
    let mut srv = Server::start(&["--ports", "1", "--workers", "4"]);
    let mut s = connect(srv.addr());
    let v = stats(&mut s);
    assert_eq!(stat_u64(&v, "ports"), 1, "{v}");
    assert_eq!(stat_u64(&v, "workers"), 4, "{v}");
    check_backend_field(&v);
    drop(s);
    srv.stop_checked(1);
}

#[test]
fn ipv6_listener_works() {
    if !have_ipv6_loopback() {
        eprintln!("SKIPPED ipv6_listener_works: this machine cannot bind [::1]");
        return;
    }
    let mut srv = Server::start(&["--listen", "[::1]:0"]);
    let addr = srv.addr();
    assert!(
        addr.is_ipv6(),
        "listener address should be IPv6, got {addr}"
    );
    assert!(addr.ip().is_loopback(), "{addr}");
    let mut s = connect(addr);
    echo_roundtrip(&mut s, b"over ipv6");
    write_frame(&mut s, CMD_PING, b"v6").unwrap();
    assert_eq!(
        expect_frame(&mut s, "PONG over v6"),
        (CMD_PONG, b"v6".to_vec())
    );
    drop(s);
    srv.stop_checked(1);
}

#[test]
fn two_listen_addresses_both_serve() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"]);
    let addrs = srv.addrs().to_vec();
    assert_eq!(
        addrs.len(),
        2,
        "two `listening on` lines expected: {addrs:?}"
    );
    assert_ne!(addrs[0], addrs[1], "the two listeners must differ");
    let mut conns: Vec<_> = addrs.iter().map(|a| connect(*a)).collect();
    for round in 0..3 {
        for (i, s) in conns.iter_mut().enumerate() {
            echo_roundtrip(s, format!("listener {i} round {round}").as_bytes());
        }
    }
    drop(conns);
    srv.stop_checked(2);
}

#[test]
fn ipv4_and_ipv6_listeners_together() {
    if !have_ipv6_loopback() {
        eprintln!("SKIPPED ipv4_and_ipv6_listeners_together: no [::1]");
        return;
    }
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--listen", "[::1]:0"]);
    let addrs = srv.addrs().to_vec();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert_eq!(
        addrs.iter().filter(|a| a.is_ipv6()).count(),
        1,
        "one IPv6 and one IPv4 listener expected: {addrs:?}"
    );
    for a in &addrs {
        let mut s = connect(*a);
        echo_roundtrip(&mut s, a.to_string().as_bytes());
    }
    srv.stop_checked(2);
}
