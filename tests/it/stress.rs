//! `cport stress` against real servers: a small run of each mode checked
//! through its JSON report, failures counted by reason (refused, connect
//! timeout, too few descriptors, server killed mid-run), Ctrl-C, bad flags.
//!
//! The interval test spreads its 2,000 connections over two worker
//! processes (forced with --worker-procs), the same path the 30,000
//! connection scenario takes past one process's descriptor limit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// Any stress run here finishes well within this, or the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A JSON report path unique to this test process and `name`.
struct JsonFile(PathBuf);

impl JsonFile {
    fn new(name: &str) -> JsonFile {
        let p =
            std::env::temp_dir().join(format!("cport-stress-{}-{name}.json", std::process::id()));
        let _ = std::fs::remove_file(&p);
        JsonFile(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }

    fn read(&self, out: &CmdOutput) -> Value {
        let text = std::fs::read_to_string(&self.0)
            .unwrap_or_else(|e| panic!("no JSON report at {:?}: {e}\n{}", self.0, out.dump()));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("JSON report does not parse: {e}\n{text}"))
    }
}

impl Drop for JsonFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `cport stress <args>`, with `--backend $CPORT_TEST_BACKEND` if set.
fn stress_args(args: &[&str]) -> Vec<String> {
    let mut full = vec!["stress".to_string()];
    full.extend(args.iter().map(|s| s.to_string()));
    if let Some(b) = test_backend() {
        full.push("--backend".into());
        full.push(b);
    }
    full
}

fn run_stress(args: &[&str]) -> CmdOutput {
    let full = stress_args(args);
    let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
    let out = run_cport(&refs, None, RUN_TIMEOUT);
    assert!(
        !out.stderr.contains("panicked") && !out.stdout.contains("panicked"),
        "{}",
        out.dump()
    );
    out
}

fn u(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("`{path}` is not a number in the report: {v:#}"))
}

fn f(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("`{path}` is not a number in the report: {v:#}"))
}

/// Every exchange answered byte for byte, no connection failed.
fn assert_clean(r: &Value, conns: u64) {
    assert_eq!(u(r, "connections.requested"), conns, "{r:#}");
    assert_eq!(u(r, "connections.opened"), conns, "{r:#}");
    assert_eq!(u(r, "connections.failed"), 0, "{r:#}");
    let sent = u(r, "messages.sent");
    assert!(sent > 0, "{r:#}");
    assert_eq!(u(r, "messages.received"), sent, "sent == received: {r:#}");
    assert_eq!(u(r, "messages.mismatches"), 0, "{r:#}");
    assert_eq!(u(r, "messages.lost"), 0, "{r:#}");
    assert_eq!(u(r, "bytes.received"), u(r, "bytes.sent"), "{r:#}");
    assert_eq!(r["ok"], Value::Bool(true), "{r:#}");
    assert_eq!(r["interrupted"], Value::Bool(false), "{r:#}");
    // The latency fields, in order.
    assert_eq!(u(r, "latency_us.count"), sent, "{r:#}");
    let p: Vec<u64> = ["min", "p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| u(r, &format!("latency_us.{k}")))
        .collect();
    assert!(p[0] >= 1, "{r:#}");
    assert!(
        p.windows(2).all(|w| w[0] <= w[1]),
        "percentiles in order: {p:?}"
    );
    assert!(f(r, "throughput.msgs_per_s") > 0.0, "{r:#}");
    assert!(f(r, "throughput.mb_per_s") > 0.0, "{r:#}");
}

#[test]
fn stress_interval_2000_connections_over_two_worker_processes() {
    let mut srv = Server::start(&["--ports", "2", "--workers", "2"]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("interval");
    let out = run_stress(&[
        "--connect",
        &addr,
        "--connections",
        "2000",
        "--messages",
        "2",
        "--interval",
        "200ms",
        "--worker-procs",
        "2",
        "--json",
        json.path(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    let r = json.read(&out);
    assert_clean(&r, 2000);
    assert_eq!(u(&r, "run.procs"), 2, "{r:#}");
    assert_eq!(u(&r, "messages.sent"), 4000, "{r:#}");
    assert_eq!(u(&r, "bytes.sent"), 4000 * (8 + 64), "{r:#}");
    // Sampled through STATS on a control connection of its own.
    let server = &r["server"];
    assert!(u(server, "samples") >= 2, "{r:#}");
    assert!(server["cpu_avg_pct"].is_number(), "{r:#}");
    assert!(u(server, "rss_start_bytes") > 0, "{r:#}");
    assert!(out.stdout.contains("result       ok"), "{}", out.dump());
    // Every stress connection, and the STATS one, was served and closed.
    srv.stop_checked(2001);
}

#[test]
fn stress_pingpong_50_connections_for_1s() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("pingpong");
    let out = run_stress(&[
        "--connect",
        &addr,
        "--connections",
        "50",
        "--mode",
        "pingpong",
        "--size",
        "512",
        "--duration",
        "1s",
        "--server-pid",
        &srv.pid().to_string(),
        "--json",
        json.path(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    let r = json.read(&out);
    assert_clean(&r, 50);
    assert_eq!(
        u(&r, "bytes.sent"),
        u(&r, "messages.sent") * (8 + 512),
        "{r:#}"
    );
    assert!(f(&r, "throughput.window_s") >= 1.0, "{r:#}");
    assert!(
        r["server"]["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("pid")),
        "{r:#}"
    );
    assert!(u(&r["server"], "rss_peak_bytes") > 0, "{r:#}");
    srv.stop_checked(50);
}

#[test]
fn stress_raw_flood_against_a_raw_server() {
    let mut srv = Server::start(&["--protocol", "raw"]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("raw");
    // 1000-byte messages, 4 in flight: echoes come back in pieces that do
    // not line up with messages, and each must still be matched byte for
    // byte.
    let out = run_stress(&[
        "--connect",
        &addr,
        "--raw",
        "--connections",
        "20",
        "--mode",
        "flood",
        "--window",
        "4",
        "--size",
        "1000",
        "--duration",
        "1s",
        "--server-pid",
        &srv.pid().to_string(),
        "--json",
        json.path(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    let r = json.read(&out);
    assert_clean(&r, 20);
    // No frame headers in raw mode.
    assert_eq!(u(&r, "bytes.sent"), u(&r, "messages.sent") * 1000, "{r:#}");
    srv.stop_checked(20);
}

#[test]
fn stress_raw_against_a_framed_server_fails() {
    // The framed server reads the raw bytes as frame headers and answers
    // with errors or closes: the run must say it failed, not pass.
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("raw-vs-framed");
    let out = run_stress(&[
        "--connect",
        &addr,
        "--raw",
        "--connections",
        "5",
        "--mode",
        "pingpong",
        "--size",
        "64",
        "--duration",
        "1s",
        "--reply-timeout",
        "2s",
        "--json",
        json.path(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    let r = json.read(&out);
    assert_eq!(r["ok"], Value::Bool(false), "{r:#}");
    assert!(
        u(&r, "messages.mismatches") + u(&r, "connections.failed") > 0,
        "{r:#}"
    );
    srv.stop();
}

#[test]
fn stress_flood_100_connections_over_two_destinations_and_sources() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"]);
    let a = srv.addrs()[0].to_string();
    let b = srv.addrs()[1].to_string();
    let json = JsonFile::new("flood");
    let out = run_stress(&[
        "--connect",
        &a,
        "--connect",
        &b,
        "--source-range",
        "127.0.0.2-127.0.0.3",
        "--connections",
        "100",
        "--mode",
        "flood",
        "--window",
        "8",
        "--size",
        "4KiB",
        // Long enough that 100 connects on a very busy machine still leave
        // part of the window for the load whose rate is asserted.
        "--duration",
        "3s",
        "--no-server-stats",
        "--json",
        json.path(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    let r = json.read(&out);
    assert_clean(&r, 100);
    assert_eq!(
        u(&r, "bytes.sent"),
        u(&r, "messages.sent") * (8 + 4096),
        "{r:#}"
    );
    assert_eq!(
        r["run"]["sources"].as_array().map(|s| s.len()),
        Some(2),
        "{r:#}"
    );
    assert!(r["server"].is_null(), "not sampled: {r:#}");
    srv.stop_checked(100);
}

#[test]
fn stress_refused_connections_are_counted_by_reason() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let json = JsonFile::new("refused");
    let start = Instant::now();
    let out = run_stress(&[
        "--connect",
        &addr,
        "--connections",
        "20",
        "--mode",
        "pingpong",
        "--duration",
        "30s",
        "--json",
        json.path(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "a run with nothing to connect to must end at once, took {:?}",
        start.elapsed()
    );
    assert!(!error_lines(&out.stderr).is_empty(), "{}", out.dump());
    let r = json.read(&out);
    assert_eq!(u(&r, "connections.failed"), 20, "{r:#}");
    assert_eq!(u(&r, "connections.failed_by_reason.refused"), 20, "{r:#}");
    assert_eq!(u(&r, "connections.opened"), 0, "{r:#}");
    assert_eq!(r["ok"], Value::Bool(false), "{r:#}");
    assert!(out.stdout.contains("refused"), "{}", out.dump());
}

#[test]
fn stress_connect_timeouts_are_counted() {
    // A listener that never accepts, with the smallest backlog, its
    // accept queue filled first: the kernel then drops every SYN, so
    // connects hang — an unreachable server, on loopback.
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    l.listen(0).unwrap();
    let sa = l.local_addr().unwrap().as_socket().unwrap();
    let addr = sa.to_string();
    let mut fillers = Vec::new();
    while let Ok(s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)) {
        fillers.push(s);
        assert!(
            fillers.len() < 16,
            "the accept queue of a backlog-0 listener never filled"
        );
    }
    let json = JsonFile::new("timeout");
    let out = run_stress(&[
        "--connect",
        &addr,
        "--connections",
        "8",
        "--messages",
        "1",
        "--interval",
        "10ms",
        "--connect-timeout",
        "500ms",
        "--reply-timeout",
        "1s",
        "--no-server-stats",
        "--json",
        json.path(),
    ]);
    drop(fillers);
    drop(l);
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    let r = json.read(&out);
    assert_eq!(u(&r, "connections.failed"), 8, "{r:#}");
    assert_eq!(
        u(&r, "connections.failed_by_reason.connect_timeout"),
        8,
        "{r:#}"
    );
    assert_eq!(u(&r, "connections.opened"), 0, "{r:#}");
    assert!(f(&r, "elapsed_s") < 30.0, "{r:#}");
}

#[test]
fn stress_too_few_descriptors_are_counted() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("emfile");
    let full = stress_args(&[
        "--connect",
        &addr,
        "--connections",
        "100",
        "--messages",
        "1",
        "--interval",
        "10ms",
        "--no-server-stats",
        "--json",
        json.path(),
    ]);
    let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
    let out = run_cport_with(&refs, None, RUN_TIMEOUT, |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches only the
        // struct on the child's stack.
        unsafe {
            cmd.pre_exec(|| {
                let l = libc::rlimit {
                    rlim_cur: 48,
                    rlim_max: 48,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    let r = json.read(&out);
    let failed = u(&r, "connections.failed");
    assert!(
        u(&r, "connections.failed_by_reason.no_descriptors") > 0,
        "{r:#}"
    );
    assert_eq!(u(&r, "connections.opened") + failed, 100, "{r:#}");
    // The ones that opened did their work.
    assert_eq!(
        u(&r, "messages.received"),
        u(&r, "connections.opened"),
        "{r:#}"
    );
    assert_eq!(u(&r, "messages.mismatches"), 0, "{r:#}");
    srv.stop();
}

/// A `cport stress` child whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(cport_bin())
            .args(stress_args(args))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cport stress");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
            sink.lock().unwrap().push_str(&text);
        });
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits (bounded) for a stdout line that satisfies `pred`.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        let end = Instant::now() + DEADLINE;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!(
            "no stdout line {what} within {DEADLINE:?}:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits (bounded) for the exit; returns the code and all of stdout
    /// and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "cport stress did not exit within {DEADLINE:?}:\n{}",
                    self.seen.join("\n")
                );
            }
            thread::sleep(POLL_STEP);
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        let stderr = self.stderr.lock().unwrap().clone();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (
            status.code(),
            format!("{}\n--- stderr ---\n{stderr}", self.seen.join("\n")),
        )
    }
}

/// `progress: ... received N ...` with N > 0.
fn has_replies(line: &str) -> bool {
    line.starts_with("progress:")
        && line
            .split_whitespace()
            .skip_while(|w| *w != "received")
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

#[test]
fn stress_server_killed_mid_run_fails_connections_without_hanging() {
    let srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("killed");
    let mut run = Running::start(&[
        "--connect",
        &addr,
        "--connections",
        "200",
        "--mode",
        "pingpong",
        "--duration",
        "60s",
        "--no-server-stats",
        "--json",
        json.path(),
    ]);
    run.wait_line("with replies", has_replies);
    let killed = Instant::now();
    // SAFETY: kill(2) on the server process this test started.
    unsafe {
        libc::kill(srv.pid(), libc::SIGKILL);
    }
    let (code, stdout) = run.finish();
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "the run must end once every connection is gone, not at its 60 s duration"
    );
    let text = std::fs::read_to_string(&json.0).expect("JSON report");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(u(&r, "connections.failed"), 200, "{r:#}");
    let reasons = r["connections"]["failed_by_reason"].as_object().unwrap();
    assert!(
        reasons
            .keys()
            .all(|k| ["closed_by_server", "reset", "broken_pipe"].contains(&k.as_str())),
        "{r:#}"
    );
    assert_eq!(u(&r, "messages.mismatches"), 0, "{r:#}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    drop(srv);
}

#[test]
fn stress_sigint_stops_worker_processes_and_still_reports() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("sigint");
    let mut run = Running::start(&[
        "--connect",
        &addr,
        "--connections",
        "100",
        "--worker-procs",
        "2",
        "--mode",
        "pingpong",
        "--duration",
        "60s",
        "--no-server-stats",
        "--json",
        json.path(),
    ]);
    run.wait_line("with replies", has_replies);
    let sent = Instant::now();
    // SAFETY: kill(2) on the stress process this test started (only the
    // parent: it must stop its workers itself).
    unsafe {
        libc::kill(run.child.id() as i32, libc::SIGINT);
    }
    let (code, stdout) = run.finish();
    assert!(
        sent.elapsed() < Duration::from_secs(20),
        "Ctrl-C must end the run promptly"
    );
    assert_eq!(
        code,
        Some(1),
        "an interrupted run is not a success\n{stdout}"
    );
    assert!(stdout.contains("INTERRUPTED"), "{stdout}");
    let text = std::fs::read_to_string(&json.0).expect("JSON report");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["interrupted"], Value::Bool(true), "{r:#}");
    assert_eq!(u(&r, "run.procs"), 2, "{r:#}");
    assert_eq!(u(&r, "connections.opened"), 100, "{r:#}");
    assert!(u(&r, "messages.received") > 0, "{r:#}");
    assert_eq!(u(&r, "messages.mismatches"), 0, "{r:#}");
    // Both workers stopped and closed their connections.
    srv.stop_checked(100);
}

#[test]
fn stress_bad_flags_exit_2_with_one_error_line() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let cases: &[&[&str]] = &[
        &["--connections", "10"],
        &["--connect", &addr, "--connections", "0"],
        &["--connect", &addr, "--connections", "ten"],
        &["--connect", &addr, "--mode", "storm"],
        &["--connect", &addr, "--size", "12XB"],
        &["--connect", &addr, "--size", "100MiB"],
        &["--connect", &addr, "--interval", "soon"],
        &["--connect", &addr, "--source-range", "127.0.0.9-127.0.0.2"],
        &["--connect", &addr, "--source-range", "::1"],
        &["--connect", &addr, "--worker-procs", "0"],
        &["--connect", &addr, "--raw", "--size", "0"],
        &["--connect", &addr, "--backend", "iocp"],
        &[
            "--connect",
            &addr,
            "--json",
            "/nonexistent-dir/x/report.json",
        ],
        &["--connect", "not-an-address"],
        &["--connect", &addr, "--no-such-flag"],
    ];
    let mut failures = Vec::new();
    for case in cases {
        let mut args = vec!["stress"];
        args.extend_from_slice(case);
        let out = run_cport(&args, None, Duration::from_secs(20));
        let problems: Vec<String> = [
            (out.status.code() != Some(2)).then(|| format!("exit {:?}, want 2", out.status.code())),
            error_lines(&out.stderr)
                .is_empty()
                .then(|| "no `error:` line on stderr".to_string()),
            (out.stderr.contains("panicked")).then(|| "panicked".to_string()),
            (out.stderr.lines().count() >= 30).then(|| "stderr too long".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "cport {}: {}\n{}",
                args.join(" "),
                problems.join("; "),
                out.dump()
            ));
        }
    }
    drop(holder);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn stress_report_html_charts_the_run_over_time() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let json = JsonFile::new("html");
    let html =
        std::env::temp_dir().join(format!("cport-stress-{}-report.html", std::process::id()));
    let text = std::env::temp_dir().join(format!("cport-stress-{}-report.txt", std::process::id()));
    let out = run_stress(&[
        "--connect",
        &addr,
        "--connections",
        "60",
        "--ramp",
        "40",
        "--mode",
        "pingpong",
        "--duration",
        "3s",
        "--json",
        json.path(),
        "--report",
        html.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    let r = json.read(&out);
    assert_clean(&r, 60);
    // About one point a second, on one clock, for the client and the server.
    let tl = r["timeline"].as_array().expect("timeline");
    assert!(tl.len() >= 2, "{r:#}");
    assert!(
        tl.windows(2)
            .all(|w| f(&w[1], "t_s") - f(&w[0], "t_s") >= 0.9),
        "{r:#}"
    );
    assert!(tl.iter().any(|p| f(p, "received_per_s") > 0.0), "{r:#}");
    assert_eq!(u(tl.last().unwrap(), "opened"), 60, "{r:#}");
    let st = r["server"]["timeline"].as_array().expect("server timeline");
    assert!(
        st.len() >= 2 && st.iter().any(|p| p["cpu_pct"].is_number()),
        "{r:#}"
    );
    let binned: u64 = r["latency_bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u(b, "count"))
        .sum();
    let count = u(&r, "latency_us.count");
    assert!(
        binned <= count && binned * 1000 >= count * 998,
        "{binned} of {count}"
    );
    let curve: Vec<u64> = r["latency_curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u(p, "us"))
        .collect();
    assert!(curve.windows(2).all(|w| w[0] <= w[1]), "{curve:?}");
    assert_eq!(*curve.last().unwrap(), u(&r, "latency_us.max"));

    let page = std::fs::read_to_string(&html).expect("HTML report written");
    let _ = std::fs::remove_file(&html);
    assert!(
        page.starts_with("<!DOCTYPE html>"),
        "{}",
        &page[..200.min(page.len())]
    );
    assert_eq!(page.matches("<svg").count(), 6, "six charts");
    assert!(page.contains("Connections during the run") && page.contains("Server CPU"));
    assert!(!page.contains("NaN") && !page.contains("src=\"http"));

    // Any other name keeps the text report.
    let out = run_stress(&[
        "--connect",
        &addr,
        "--connections",
        "5",
        "--mode",
        "pingpong",
        "--duration",
        "500ms",
        "--report",
        text.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    let t = std::fs::read_to_string(&text).expect("text report written");
    let _ = std::fs::remove_file(&text);
    assert!(t.starts_with("cport stress: pingpong mode"), "{t}");
    // 60 + 5 stress connections and their two STATS connections.
    srv.stop_checked(67);
}
