//! `cport client` against a real server.

use std::time::Duration;

use crate::util::*;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

fn summary_line(out: &CmdOutput) -> &str {
    out.stdout
        .lines()
        .find(|l| l.trim_start().starts_with("summary:"))
        .unwrap_or_else(|| panic!("no stdout line starting with `summary:`\n{}", out.dump()))
}

#[test]
fn client_20_connections_x_3_messages() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let out = run_client(
        &[
            "--connect",
            &addr,
            "--message",
            "hi",
            "--count",
            "3",
            "--interval",
            "100ms",
            "--connections",
            "20",
        ],
        None,
        CLIENT_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "client must exit 0\n{}",
        out.dump()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    let line = summary_line(&out);
    let kv = parse_kv(line.trim_start().trim_start_matches("summary:"));
    for (k, v) in [
        ("sent", 60),
        ("received", 60),
        ("mismatches", 0),
        ("failed", 0),
    ] {
        assert_eq!(kv.get(k).copied(), Some(v), "summary `{k}` in {line:?}");
    }
    let other_lines = out.stdout.lines().filter(|l| !l.trim().is_empty()).count() - 1;
    assert!(
        other_lines >= 60,
        "expected per-message lines (>= 60) before the summary, got {other_lines}\n{}",
        out.dump()
    );
    let summary = srv.stop_checked(20);
    // 60 ECHO frames of "hi": 8-byte header + 2 bytes each, echoed back.
    assert_eq!(get(&summary, "bytes_in"), 600, "{summary:?}");
    assert_eq!(get(&summary, "bytes_out"), 600, "{summary:?}");
}

#[test]
fn client_line_mode_echo_ping_quit() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr().to_string();
    let out = run_client(
        &["--connect", &addr],
        Some(b"hello\n/ping\n/quit\n"),
        CLIENT_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    assert!(
        out.stdout.lines().any(|l| l.contains("hello")),
        "echoed line `hello` must be printed\n{}",
        out.dump()
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.to_lowercase().contains("pong")),
        "/ping must print a line containing `pong`\n{}",
        out.dump()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    srv.stop_checked(1);
}

#[test]
fn client_line_mode_stats_then_eof() {
    let mut srv = Server::start(&["--ports", "1", "--workers", "2"]);
    let addr = srv.addr().to_string();
    let out = run_client(
        &["--connect", &addr],
        Some(b"first line\n/stats\nsecond line\n"),
        CLIENT_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "EOF must exit 0\n{}",
        out.dump()
    );
    for text in ["first line", "second line"] {
        assert!(out.stdout.contains(text), "`{text}` echoed\n{}", out.dump());
    }
    // Find a JSON object in stdout (possibly pretty-printed over many lines).
    let json = out
        .stdout
        .match_indices('{')
        .find_map(|(i, _)| {
            serde_json::Deserializer::from_str(&out.stdout[i..])
                .into_iter::<serde_json::Value>()
                .next()
                .and_then(|r| r.ok())
                .filter(|v| v.get("connections_open").is_some())
        })
        .unwrap_or_else(|| panic!("/stats must print the STATS JSON\n{}", out.dump()));
    for key in STATS_KEYS {
        assert!(json.get(key).is_some(), "STATS JSON lacks `{key}`: {json}");
    }
    assert_eq!(json["connections_open"].as_u64(), Some(1), "{json}");
    assert_eq!(json["workers"].as_u64(), Some(2), "{json}");
    srv.stop_checked(1);
}

#[test]
fn client_connect_to_closed_port_fails_cleanly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let out = run_client(
        &[
            "--connect",
            &addr,
            "--message",
            "hi",
            "--count",
            "1",
            "--interval",
            "10ms",
            "--connections",
            "1",
        ],
        None,
        CLIENT_TIMEOUT,
    );
    let code = out.status.code();
    assert!(
        matches!(code, Some(1) | Some(2)),
        "connecting to a closed port must exit 1 or 2\n{}",
        out.dump()
    );
    assert!(
        !error_lines(&out.stderr).is_empty(),
        "stderr needs a line starting with `error:`\n{}",
        out.dump()
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stdout.contains("panicked"),
        "{}",
        out.dump()
    );
}
