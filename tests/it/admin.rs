//! The admin endpoint (`--admin`): `/metrics` parsed with a
//! Prometheus text parser and checked against what the test did, `/stats`
//! against STATS, the dashboard's assets and live API, bad HTTP, and the
//! refusal of a public address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

use crate::util::*;

/// Starts a server with `--admin 127.0.0.1:0` (plus `args`) and returns it
/// with the admin address it logged.
fn start_admin(args: &[&str]) -> (Server, SocketAddr) {
    let mut all = vec!["--admin", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let server = Server::start(&all);
    let start = Instant::now();
    loop {
        let text = server.stderr_text();
        if let Some(rest) = text.split("admin endpoint on http://").nth(1) {
            let addr = rest.split('/').next().unwrap_or("");
            return (
                server,
                addr.parse()
                    .unwrap_or_else(|e| panic!("bad admin address {addr:?}: {e}")),
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "server did not log its admin address within {DEADLINE:?}:\n{text}"
        );
        thread::sleep(POLL_STEP);
    }
}

/// A reply: status, headers (lower-case names), body.
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes as a request on a fresh connection (closed after the
/// reply) and parses the reply. Bodies are read to EOF.
fn http_raw(addr: SocketAddr, request: &[u8]) -> Http {
    let mut s = TcpStream::connect(addr).expect("connect to admin");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(request).expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read reply");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = |h: &Vec<(String, String)>| {
        h.iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    };
    let reply_headers: Vec<(String, String)> = headers;
    if chunked(&reply_headers) {
        body = dechunk(&body);
    }
    Http {
        status,
        headers: reply_headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

fn http(addr: SocketAddr, method: &str, path: &str, extra: &str) -> Http {
    http_raw(
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
}

fn get(addr: SocketAddr, path: &str) -> Http {
    let r = http(addr, "GET", path, "");
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r
}

fn scrape(addr: SocketAddr) -> Scrape {
    let r = get(addr, "/metrics");
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "a scraper not asking for OpenMetrics gets classic text: {:?}",
        r.headers
    );
    let text = r.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
}

/// The value of `metric` with the given labels (all must match).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&prometheus_parse::Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one sample of {metric}{labels:?}, found {}",
        found.len()
    );
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric} is not a plain value: {other:?}"),
    }
}

fn counter(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> u64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {metric}{labels:?}"));
    assert!(
        matches!(sample.value, Value::Counter(_)),
        "{metric} must be typed as a counter: {:?}",
        sample.value
    );
    value(s, metric, labels) as u64
}

/// Reads everything the server sends until it closes; returns the count.
fn drain_to_close(s: &mut TcpStream) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) if is_closed_error(&e) => return n,
            Err(e) => panic!("reading until close: {e}"),
        }
    }
}

#[test]
fn metrics_count_what_the_test_did() {
    let (mut server, admin) =
        start_admin(&["--ports", "2", "--workers", "2", "--max-frame", "1000"]);
    let addr = server.addr();
    let (mut sent, mut received) = (0usize, 0usize);

    // A: five ECHOs of 100 bytes, then a clean close.
    let mut a = connect(addr);
    for i in 0..5u8 {
        let body = vec![i; 100];
        write_frame(&mut a, CMD_ECHO, &body).unwrap();
        let (cmd, got) = expect_frame(&mut a, "echo");
        assert_eq!((cmd, got), (CMD_ECHO, body));
        sent += 108;
        received += 108;
    }
    // B: four PINGs of 10 bytes and one unknown command, then a reset.
    let mut b = connect(addr);
    for _ in 0..4 {
        write_frame(&mut b, CMD_PING, b"0123456789").unwrap();
        let (cmd, _) = expect_frame(&mut b, "pong");
        assert_eq!(cmd, CMD_PONG);
        sent += 18;
        received += 18;
    }
    write_frame(&mut b, 77, &[]).unwrap();
    sent += 8;
    let (code, msg) = expect_error(&mut b, "unknown command");
    assert_eq!(code, ERR_UNKNOWN_COMMAND);
    received += 8 + 4 + msg.len();
    // C: a frame over --max-frame: ERROR 1, then the server closes.
    let mut c = connect(addr);
    c.write_all(&encode_header(5000, CMD_ECHO)).unwrap();
    sent += 8;
    received += drain_to_close(&mut c);
    drop(a);
    reset(b);

    // Wait (bounded) until the server has seen all three close.
    let start = Instant::now();
    let s = loop {
        let s = scrape(admin);
        if value(&s, "cport_connections_open", &[]) == 0.0
            && counter(&s, "cport_connections_closed_total", &[("reason", "reset")]) == 1
        {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "connections did not close within {DEADLINE:?}"
        );
        thread::sleep(POLL_STEP);
    };

    assert_eq!(counter(&s, "cport_connections_accepted_total", &[]), 3);
    let closed = |r| counter(&s, "cport_connections_closed_total", &[("reason", r)]);
    assert_eq!(closed("peer_closed"), 1);
    assert_eq!(closed("reset"), 1);
    assert_eq!(closed("frame_too_large"), 1);
    assert_eq!(closed("idle_timeout"), 0);
    let cmd = |m, c| counter(&s, m, &[("command", c)]);
    assert_eq!(cmd("cport_frames_in_total", "echo"), 5);
    assert_eq!(cmd("cport_frame_bytes_in_total", "echo"), 5 * 108);
    assert_eq!(cmd("cport_frames_out_total", "echo"), 5);
    assert_eq!(cmd("cport_frames_in_total", "ping"), 4);
    assert_eq!(cmd("cport_frames_out_total", "pong"), 4);
    assert_eq!(cmd("cport_frame_bytes_out_total", "pong"), 4 * 18);
    assert_eq!(cmd("cport_frames_in_total", "other"), 1);
    assert_eq!(cmd("cport_frames_out_total", "error"), 2);
    assert_eq!(cmd("cport_frames_in_total", "stats"), 0);
    assert_eq!(counter(&s, "cport_bytes_in_total", &[]), sent as u64);
    assert_eq!(counter(&s, "cport_bytes_out_total", &[]), received as u64);
    let err = |k| counter(&s, "cport_errors_total", &[("kind", k)]);
    assert_eq!(err("unknown_command"), 1);
    assert_eq!(err("frame_too_large"), 1);
    assert_eq!(err("reset"), 1);
    assert_eq!(err("accept_failed"), 0);
    assert_eq!(value(&s, "cport_send_queue_bytes", &[]), 0.0);
    // Both workers took completions; each is named.
    let w0 = counter(&s, "cport_completions_total", &[("worker", "p0w0")]);
    let w1 = counter(&s, "cport_completions_total", &[("worker", "p1w0")]);
    assert!(w0 + w1 >= 3 + 5 + 5, "completions p0w0={w0} p1w0={w1}");
    let backend = test_backend().unwrap_or_default();
    let info = s
        .samples
        .iter()
        .find(|x| x.metric == "cport_backend_info")
        .expect("cport_backend_info");
    let used = info.labels.get("backend").unwrap_or("");
    assert!(
        (backend.is_empty() || backend == "auto") && ["uring", "poll"].contains(&used)
            || backend == used,
        "backend {used:?}, asked for {backend:?}"
    );
    assert!(value(&s, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&s, "process_cpu_seconds_total", &[]) >= 0.0);
    // The latency histogram: every receive with a frame was timed.
    let hist = s
        .samples
        .iter()
        .find(|x| x.metric == "cport_request_handling_seconds")
        .expect("cport_request_handling_seconds histogram");
    let Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {:?}", hist.value)
    };
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .expect("+Inf bucket");
    let count = value(&s, "cport_request_handling_seconds_count", &[]);
    assert_eq!(inf.count, count);
    assert!(count >= 10.0, "timed {count} requests, sent 11 frames");
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));

    // OpenMetrics for whoever asks for it (Prometheus does).
    let om = http(
        admin,
        "GET",
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    );
    assert_eq!(om.status, 200);
    assert!(
        om.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(om.text().ends_with("# EOF\n"));
    assert!(om.text().contains("cport_connections_accepted_total 3"));

    server.stop_checked(3);
}

#[test]
fn stats_over_http_is_the_stats_command_document() {
    let (mut server, admin) = start_admin(&[]);
    let mut s = connect(server.addr());
    echo_roundtrip(&mut s, b"hello");
    let by_command = stats(&mut s);
    let by_http: serde_json::Value =
        serde_json::from_slice(&get(admin, "/stats").body).expect("/stats is JSON");
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&by_command), keys(&by_http));
    for k in [
        "connections_accepted",
        "bytes_in",
        "backend",
        "workers",
        "commands",
    ] {
        assert!(by_http.get(k).is_some(), "/stats lacks {k}");
    }
    assert_eq!(by_http["commands"]["echo"]["frames_in"], 1);
    // The STATS request itself was counted before the reply was built.
    assert_eq!(by_command["commands"]["stats"]["frames_in"], 1);
    drop(s);
    server.stop_checked(1);
}

#[test]
fn admin_answers_bad_requests_and_keeps_serving() {
    let (mut server, admin) = start_admin(&[]);
    let r = http(admin, "GET", "/nope", "");
    assert_eq!(r.status, 404);
    let r = http(admin, "POST", "/metrics", "Content-Length: 0\r\n");
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = http(admin, "DELETE", "/", "");
    assert_eq!(r.status, 405);
    let r = http(admin, "GET", "/api/live?samples=abc", "");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = http(admin, "HEAD", "/", "");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "HEAD has no body");

    // Garbage, a huge header, half a request, a connection that says
    // nothing: none of them stops the endpoint.
    for junk in [
        b"\x00\x01\x02 garbage \xff\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000)).into_bytes(),
        b"GET /metrics HTTP/1.1\r\nHost: x".to_vec(),
        b"BREW /pot HTCPCP/1.0\r\n\r\n".to_vec(),
        Vec::new(),
    ] {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // A request whose body never comes holds nothing up.
    let mut stuck = TcpStream::connect(admin).unwrap();
    stuck
        .write_all(b"POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        .unwrap();
    let r = get(admin, "/metrics");
    assert!(r.text().contains("cport_connections_accepted_total"));
    drop(stuck);
    let r = get(admin, "/stats");
    assert!(r.text().contains("connections_accepted"));
    // The data path never noticed.
    let mut s = connect(server.addr());
    echo_roundtrip(&mut s, b"still here");
    drop(s);
    server.stop_checked(1);
}

#[test]
fn admin_refuses_a_public_address_without_admin_public() {
    let out = run_cport(
        &["server", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"],
        None,
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    let err = out.stderr.clone();
    assert!(
        err.contains("not a loopback address") && err.contains("--admin-public"),
        "{err}"
    );
    assert!(
        !err.contains("listening on"),
        "refused before serving: {err}"
    );
    let out = run_cport(&["server", "--admin-public"], None, DEADLINE);
    assert_eq!(out.status.code(), Some(2), "--admin-public needs --admin");
    // With --admin-public it serves (on every address).
    let (mut server, admin) = start_admin(&["--admin-public"]);
    assert!(admin.ip().is_loopback());
    let mut server2 = Server::start(&["--admin", "0.0.0.0:0", "--admin-public"]);
    let start = Instant::now();
    while !server2
        .stderr_text()
        .contains("admin endpoint on http://0.0.0.0:")
    {
        assert!(start.elapsed() < DEADLINE, "{}", server2.stderr_text());
        thread::sleep(POLL_STEP);
    }
    server2.stop_checked(0);
    server.stop_checked(0);
}

#[test]
fn dashboard_is_self_contained_and_its_live_feed_shows_connections() {
    let (mut server, admin) = start_admin(&[]);
    let page = get(admin, "/");
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.header("content-security-policy")
            .is_some_and(|c| c.contains("default-src 'self'")),
        "the page may not load anything from elsewhere: {:?}",
        page.headers
    );
    for asset in ["/", "/dashboard.js", "/dashboard.css"] {
        let text = get(admin, asset).text();
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{asset} refers to an external resource"
        );
    }
    let html = page.text();
    assert!(html.contains("/dashboard.js") && html.contains("/dashboard.css"));

    // A connection of ours shows up as a connect event with our address,
    // and its close as a disconnect with the reason.
    let mut s = connect(server.addr());
    let me = s.local_addr().unwrap().to_string();
    echo_roundtrip(&mut s, b"x");
    let live = |q: &str| -> serde_json::Value {
        serde_json::from_slice(&get(admin, &format!("/api/live?{q}")).body).expect("live JSON")
    };
    let first = live("samples=0&events=0");
    let connect_ev = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "connect" && e["peer"] == me.as_str())
        .unwrap_or_else(|| panic!("no connect event for {me}: {}", first["events"]))
        .clone();
    let seq = connect_ev["seq"].as_u64().unwrap();
    drop(s);
    let start = Instant::now();
    let (samples, gone) = loop {
        let v = live(&format!("samples=0&events={seq}"));
        let evs = v["events"].as_array().unwrap().clone();
        assert!(evs.iter().all(|e| e["seq"].as_u64().unwrap() > seq));
        let samples = v["samples"].as_array().unwrap().len();
        if let Some(e) = evs
            .iter()
            .find(|e| e["kind"] == "disconnect" && e["peer"] == me.as_str())
            && samples >= 2
        {
            break (v["samples"].clone(), e.clone());
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no disconnect event / samples: {v}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(gone["reason"], "peer_closed");
    let samples = samples.as_array().unwrap();
    let last_seq = samples.last().unwrap()["seq"].as_u64().unwrap();
    assert!(
        samples
            .iter()
            .all(|s| s["rss_bytes"].as_u64().unwrap_or(0) > 0)
    );
    // Asking from the last sample on gives only newer ones.
    let newer = live(&format!("samples={last_seq}"));
    assert!(
        newer["samples"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["seq"].as_u64().unwrap() > last_seq)
    );
    server.stop_checked(1);
}
