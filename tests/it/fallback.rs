//! The fallback from io_uring to poll, for real: `cport` runs in a child
//! process whose seccomp filter makes `io_uring_setup` fail with EPERM, as
//! Docker's default profile does.
//!
//! The filter is installed in the child between fork and exec
//! (`Command::pre_exec`): `PR_SET_NO_NEW_PRIVS`, then a BPF program that
//! checks the architecture, returns `SECCOMP_RET_ERRNO | EPERM` for
//! `io_uring_setup` and allows every other system call.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use cport::port::{BackendKind, CompletionPort, PortConfig};

use crate::util::*;

/// The audit architecture the filter expects (`AUDIT_ARCH_*` from
/// linux/audit.h: ELF machine | 64-bit | little-endian), if we know it.
const AUDIT_ARCH: Option<u32> = if cfg!(target_arch = "x86_64") {
    Some(0xC000_003E)
} else if cfg!(target_arch = "aarch64") {
    Some(0xC000_00B7)
} else {
    None
};

/// Offsets of `nr` and `arch` in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The BPF program: `io_uring_setup` of our architecture fails with EPERM,
/// anything else (any other call, any other architecture) is allowed.
fn no_io_uring_filter(arch: u32) -> [libc::sock_filter; 6] {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    [
        /* 0 */ stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH),
        /* 1 */ jump(BPF_JMP | BPF_JEQ | BPF_K, arch, 0, 3), // else allow (5)
        /* 2 */ stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR),
        /* 3 */
        jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            libc::SYS_io_uring_setup as u32,
            0,
            1,
        ),
        /* 4 */
        stmt(
            BPF_RET | BPF_K,
            libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
        ),
        /* 5 */ stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Makes the child install the filter before it execs `cport`.
fn block_io_uring(cmd: &mut Command, arch: u32) {
    let mut filter = no_io_uring_filter(arch);
    // SAFETY: the hook runs in the forked child before exec and calls only
    // prctl(2), which is async-signal-safe, and reads errno; it allocates
    // nothing. `prog` points into `filter`, owned by the closure, for the
    // duration of the call (the kernel copies the program).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The filter's architecture, or `None` (with a note) where this test
/// cannot build one.
fn arch_or_skip(test: &str) -> Option<u32> {
    if AUDIT_ARCH.is_none() {
        eprintln!(
            "[it] SKIPPED {test}: no seccomp audit-arch constant for this target architecture"
        );
    }
    AUDIT_ARCH
}

/// Whether io_uring works for this (unfiltered) test process; if not, the
/// fallback below happens anyway and the test proves less: say so.
fn note_if_uring_unavailable(test: &str) {
    let cfg = PortConfig {
        backend: BackendKind::Uring,
        recv_bufs: 16,
        ..PortConfig::default()
    };
    if let Err(e) = CompletionPort::new(&cfg) {
        eprintln!(
            "[it] NOTE {test}: io_uring is unavailable on this machine even without the filter \
             ({e}); the test still checks the fallback but cannot show the filter caused it"
        );
    }
}

#[test]
fn auto_falls_back_to_poll_when_seccomp_blocks_io_uring() {
    let test = "auto_falls_back_to_poll_when_seccomp_blocks_io_uring";
    let Some(arch) = arch_or_skip(test) else {
        return;
    };
    note_if_uring_unavailable(test);
    let mut srv = Server::start_with(
        &["--backend", "auto", "--ports", "2", "--workers", "2"],
        false,
        |cmd| block_io_uring(cmd, arch),
    );
    let log = srv.stderr_text();
    let choice = log
        .lines()
        .find(|l| l.contains("completion backend:"))
        .unwrap_or_else(|| panic!("no log line saying which backend runs:\n{log}"));
    eprintln!("[it] under the filter: {choice}");
    assert!(
        choice.contains("completion backend: poll") && choice.contains("io_uring"),
        "the log line must say poll runs and why (io_uring unavailable): {choice:?}"
    );
    assert!(
        choice.contains("Operation not permitted"),
        "the reason should be the EPERM from io_uring_setup: {choice:?}"
    );
    assert_eq!(
        log.matches("completion backend:").count(),
        1,
        "one line about the choice, not one per port:\n{log}"
    );
    let listening = log
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("listening line");
    assert!(
        listening.contains("backend poll"),
        "the listening line names the backend: {listening:?}"
    );

    // It serves: several connections, echo byte for byte, over both ports.
    let mut conns: Vec<_> = (0..8).map(|_| connect(srv.addr())).collect();
    for round in 0..20u64 {
        for (i, c) in conns.iter_mut().enumerate() {
            let body = pattern(round * 100 + i as u64, 1 + (round as usize * 997) % 20_000);
            echo_roundtrip(c, &body);
        }
    }
    let v = stats(&mut conns[0]);
    assert_eq!(
        v.get("backend").and_then(|b| b.as_str()),
        Some("poll"),
        "STATS must report the poll backend: {v}"
    );
    // The client falls back as well, under the same filter.
    let addr = srv.addr().to_string();
    let out = run_cport_with(
        &[
            "client",
            "--backend",
            "auto",
            "--connect",
            &addr,
            "--message",
            "over poll",
            "--count",
            "5",
            "--interval",
            "10ms",
            "--connections",
            "10",
            "--quiet",
        ],
        None,
        Duration::from_secs(60),
        |cmd| block_io_uring(cmd, arch),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "client under the filter\n{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("completion backend: poll"),
        "the client logs its fallback too\n{}",
        out.dump()
    );
    assert!(
        out.stdout.contains("received=50"),
        "every echo came back\n{}",
        out.dump()
    );
    drop(conns);
    let (status, stderr) = srv.stop();
    assert_eq!(status.code(), Some(0), "{}", tail(&stderr, 40));
    let summary_line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("final summary:"))
        .unwrap_or_else(|| panic!("no final summary:\n{}", tail(&stderr, 40)));
    assert!(
        summary_line.contains("backend=poll"),
        "the final summary names the backend: {summary_line:?}"
    );
    let summary = parse_summary(&stderr);
    assert_eq!(get(&summary, "outstanding_ops"), 0);
    assert_eq!(get(&summary, "outstanding_bufs"), 0);
    assert_eq!(get(&summary, "connections_served"), 8 + 10);
}

#[test]
fn explicit_uring_under_seccomp_exits_2_with_a_clear_error() {
    let test = "explicit_uring_under_seccomp_exits_2_with_a_clear_error";
    let Some(arch) = arch_or_skip(test) else {
        return;
    };
    note_if_uring_unavailable(test);
    let out = run_cport_with(
        &["server", "--listen", "127.0.0.1:0", "--backend", "uring"],
        None,
        Duration::from_secs(30),
        |cmd| block_io_uring(cmd, arch),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unavailable explicit backend is a start-up error\n{}",
        out.dump()
    );
    assert!(
        !out.stderr.contains("panicked"),
        "no panic trace\n{}",
        out.dump()
    );
    let errors = error_lines(&out.stderr);
    eprintln!("[it] under the filter: {}", out.stderr.trim());
    assert_eq!(errors.len(), 1, "one `error:` line\n{}", out.dump());
    assert!(
        errors[0].contains("io_uring") && errors[0].contains("Operation not permitted"),
        "the error says io_uring is unavailable and why: {:?}",
        errors[0]
    );
    assert!(
        !out.stderr.contains("listening on"),
        "the server must not start on another backend\n{}",
        out.dump()
    );
}
