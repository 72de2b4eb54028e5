//! Command-line handling: bad values, address in use, help.

use std::time::Duration;

use crate::util::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Exit code 2, an `error:` line, no panic, short stderr.
fn assert_usage_error(out: &CmdOutput, what: &str) -> Result<(), String> {
    let mut problems = Vec::new();
    if out.status.code() != Some(2) {
        problems.push(format!("exit code {:?}, want 2", out.status.code()));
    }
    if error_lines(&out.stderr).is_empty() {
        problems.push("no stderr line starting with `error:`".to_string());
    }
    if out.stderr.contains("panicked") || out.stdout.contains("panicked") {
        problems.push("output contains `panicked`".to_string());
    }
    let n = out.stderr.lines().count();
    if n >= 30 {
        problems.push(format!("stderr has {n} lines, want < 30"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: {}\n{}", problems.join("; "), out.dump()))
    }
}

#[test]
fn bad_flag_values_exit_2_with_error_line() {
    let cases: &[&[&str]] = &[
        &["--workers", "0"],
        &["--workers", "abc"],
        &["--workers", "-1"],
        &["--ports", "zero"],
        &["--max-frame", "12XB"],
        &["--max-frame", ""],
        &["--protocol", "foo"],
        &["--backend", "bogus"],
        &["--backend", "iocp"],
        &["--listen", "not-an-address"],
        &["--listen", "127.0.0.1:99999"],
        &["--idle-timeout", "xyz"],
        &["--no-such-flag"],
    ];
    let mut failures = Vec::new();
    for case in cases {
        let mut args = vec!["server", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(case);
        let out = run_cport(&args, None, CLI_TIMEOUT);
        if let Err(e) = assert_usage_error(&out, &format!("cport {}", args.join(" "))) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad command lines were not rejected properly:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn listen_address_in_use_exits_2() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let mut args = vec!["server", "--listen", addr.as_str()];
    let backend = test_backend();
    if let Some(b) = &backend {
        args.extend_from_slice(&["--backend", b.as_str()]);
    }
    let out = run_cport(&args, None, CLI_TIMEOUT);
    drop(holder);
    if let Err(e) = assert_usage_error(&out, "listen address in use") {
        panic!("{e}");
    }
    assert!(
        out.stderr.contains(&addr),
        "the error should mention the address {addr}\n{}",
        out.dump()
    );
}

#[test]
fn help_exits_0() {
    let top = run_cport(&["--help"], None, CLI_TIMEOUT);
    assert_eq!(top.status.code(), Some(0), "{}", top.dump());
    for sub in ["server", "client"] {
        assert!(
            top.stdout.contains(sub),
            "`cport --help` should list `{sub}`\n{}",
            top.dump()
        );
    }

    let server = run_cport(&["server", "--help"], None, CLI_TIMEOUT);
    assert_eq!(server.status.code(), Some(0), "{}", server.dump());
    for flag in [
        "--listen",
        "--protocol",
        "--workers",
        "--ports",
        "--backend",
        "--max-frame",
        "--log",
    ] {
        assert!(
            server.stdout.contains(flag),
            "`cport server --help` should document {flag}\n{}",
            server.dump()
        );
    }

    let client = run_cport(&["client", "--help"], None, CLI_TIMEOUT);
    assert_eq!(client.status.code(), Some(0), "{}", client.dump());
    for flag in [
        "--connect",
        "--message",
        "--count",
        "--interval",
        "--connections",
        "--backend",
    ] {
        assert!(
            client.stdout.contains(flag),
            "`cport client --help` should document {flag}\n{}",
            client.dump()
        );
    }
}

#[test]
fn iocp_backend_is_refused_on_linux_with_a_clear_message() {
    for sub in [
        &["server", "--listen", "127.0.0.1:0"][..],
        &["client", "--connect", "127.0.0.1:9", "--message", "x"][..],
    ] {
        let mut args = sub.to_vec();
        args.extend_from_slice(&["--backend", "iocp"]);
        let out = run_cport(&args, None, CLI_TIMEOUT);
        if let Err(e) = assert_usage_error(&out, &format!("cport {}", args.join(" "))) {
            panic!("{e}");
        }
        let line = error_lines(&out.stderr)[0].to_string();
        assert!(
            line.contains("iocp") && line.contains("Windows"),
            "the error says iocp is the Windows backend: {line:?}"
        );
    }
}
