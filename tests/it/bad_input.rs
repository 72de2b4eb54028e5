//! Oversized frames, unknown commands, garbage, resets, half-close, churn.

use std::io::Write;
use std::net::TcpStream;

use crate::util::*;

/// Send a bare header declaring `len`, expect ERROR 1 then close.
fn expect_too_large(s: &mut TcpStream, len: u32, what: &str) {
    s.write_all(&encode_header(len, CMD_ECHO)).unwrap();
    let (code, msg) = expect_error(s, what);
    assert_eq!(
        code, ERR_FRAME_TOO_LARGE,
        "{what}: error code (msg {msg:?})"
    );
    expect_closed(
        s,
        &format!("{what}: connection must be closed after ERROR 1"),
    );
}

#[test]
fn frame_len_max_plus_one_is_fatal_other_connection_unaffected() {
    let mut srv = Server::start(&[]);
    let mut keep = connect(srv.addr());
    echo_roundtrip(&mut keep, b"before");
    let mut bad = connect(srv.addr());
    echo_roundtrip(&mut bad, b"bad connection is fine at first");
    expect_too_large(&mut bad, DEFAULT_MAX_FRAME as u32 + 1, "len = max+1");
    echo_roundtrip(&mut keep, b"after");
    drop(keep);
    srv.stop_checked(2);
}

#[test]
fn frame_len_u32_max_is_fatal_without_allocating() {
    let mut srv = Server::start(&[]);
    let mut keep = connect(srv.addr());
    echo_roundtrip(&mut keep, b"before");
    let peak_before = srv.vm_peak_kib();
    let mut bad = connect(srv.addr());
    expect_too_large(&mut bad, u32::MAX, "len = 0xFFFFFFFF");
    let peak_after = srv.vm_peak_kib();
    if let (Some(b), Some(a)) = (peak_before, peak_after) {
        // Allocating the declared 4 GiB would raise the peak virtual size by
        // at least that much.
        assert!(
            a.saturating_sub(b) < 1024 * 1024,
            "server VmPeak grew from {b} KiB to {a} KiB: it allocated the declared size"
        );
    }
    echo_roundtrip(&mut keep, b"after");
    drop(keep);
    srv.stop_checked(2);
}

#[test]
fn max_frame_64kib_limit() {
    let mut srv = Server::start(&["--max-frame", "64KiB"]);
    let mut ok = connect(srv.addr());
    let frame = encode_frame(CMD_ECHO, &pattern(64, 65536));
    let got = exchange(&mut ok, &frame, frame.len());
    assert_frame_body_eq(&got, &frame, "64 KiB body with --max-frame 64KiB");

    let mut bad = connect(srv.addr());
    expect_too_large(&mut bad, 65537, "64 KiB + 1 with --max-frame 64KiB");

    // A 1 MiB frame, fine by default, is refused too.
    let mut bad2 = connect(srv.addr());
    expect_too_large(&mut bad2, 1 << 20, "1 MiB with --max-frame 64KiB");

    echo_roundtrip(&mut ok, b"first connection still works");
    drop(ok);
    srv.stop_checked(3);
}

#[test]
fn max_frame_plain_number() {
    let mut srv = Server::start(&["--max-frame", "65536"]);
    let mut s = connect(srv.addr());
    let frame = encode_frame(CMD_ECHO, &pattern(1, 65536));
    let got = exchange(&mut s, &frame, frame.len());
    assert_frame_body_eq(&got, &frame, "65536-byte body with --max-frame 65536");
    expect_too_large(&mut s, 65537, "65537 with --max-frame 65536");
    srv.stop_checked(1);
}

#[test]
fn unknown_command_77_then_echo_on_same_connection() {
    let mut srv = Server::start(&[]);
    let mut s = connect(srv.addr());
    for (i, body) in [Vec::new(), b"0123456789".to_vec(), pattern(77, 5000)]
        .into_iter()
        .enumerate()
    {
        write_frame(&mut s, 77, &body).unwrap();
        let (code, msg) = expect_error(&mut s, "cmd 77");
        assert_eq!(code, ERR_UNKNOWN_COMMAND, "cmd 77 #{i}: code (msg {msg:?})");
        assert!(
            msg.to_lowercase().contains("unknown command"),
            "cmd 77: message should say `unknown command`: {msg:?}"
        );
        // The body of the unknown frame must have been skipped exactly.
        echo_roundtrip(&mut s, format!("after unknown #{i}").as_bytes());
    }
    // Unknown command merged with an ECHO in one write.
    let mut buf = encode_frame(77, b"skip me");
    buf.extend(encode_frame(CMD_ECHO, b"merged"));
    s.write_all(&buf).unwrap();
    let (code, _) = expect_error(&mut s, "merged cmd 77");
    assert_eq!(code, ERR_UNKNOWN_COMMAND);
    assert_eq!(
        expect_frame(&mut s, "echo after merged unknown"),
        (CMD_ECHO, b"merged".to_vec())
    );
    drop(s);
    srv.stop_checked(1);
}

#[test]
fn garbage_bytes_with_huge_len_are_rejected_server_keeps_serving() {
    let mut srv = Server::start(&[]);
    let mut keep = connect(srv.addr());
    let mut rng = Rng::new(0xBAD);
    const N: u64 = 20;
    for i in 0..N {
        let n = 8 + rng.below(120) as usize;
        let mut g = rng.bytes(n);
        g[0] |= 0x80; // declared len >= 2 GiB, far above max
        let mut s = connect(srv.addr());
        s.write_all(&g).unwrap();
        match read_frame(&mut s) {
            Ok((cmd, body)) => {
                assert_eq!(cmd, CMD_ERROR, "garbage #{i}: only an ERROR may come back");
                assert!(body.len() >= 4, "garbage #{i}: ERROR body too short");
                let code = u32::from_be_bytes(body[..4].try_into().unwrap());
                assert_eq!(code, ERR_FRAME_TOO_LARGE, "garbage #{i}: error code");
                expect_closed(&mut s, &format!("garbage #{i}: close after ERROR"));
            }
            Err(e) if is_closed_error(&e) => {}
            Err(e) => panic!(
                "garbage #{i}: expected ERROR or close, got {e} ({:?})",
                e.kind()
            ),
        }
        echo_roundtrip(&mut keep, format!("alive after garbage #{i}").as_bytes());
    }
    drop(keep);
    srv.stop_checked(N + 1);
}

#[test]
fn reset_mid_frame_200_times() {
    const N: u64 = 200;
    let mut srv = Server::start(&[]);
    let addr = srv.addr();
    let mut keep = connect(addr);
    let half = encode_frame(CMD_ECHO, &pattern(9, 1000));
    for i in 0..N {
        let mut s = connect(addr);
        // A PING round trip first: the server has certainly accepted the
        // connection and has a receive outstanding when the RST arrives
        // (an RST'd connection still in the accept queue may be lost by
        // the kernel when the queue overflows, which would make the
        // connection count inexact).
        write_frame(&mut s, CMD_PING, b"p").unwrap();
        assert_eq!(expect_frame(&mut s, "PONG"), (CMD_PONG, b"p".to_vec()));
        // Header plus half the body, then RST.
        s.write_all(&half[..HEADER_LEN + 500]).unwrap();
        reset(s);
        if i % 50 == 49 {
            echo_roundtrip(
                &mut keep,
                format!("alive after {} resets", i + 1).as_bytes(),
            );
        }
    }
    // All N reset connections accepted and cleaned up: only `keep` and the
    // stats connection remain open.
    let mut st = settle(addr, N + 2, 2);
    echo_roundtrip(&mut st, b"fresh connection works");
    echo_roundtrip(&mut keep, b"old connection works");
    drop((keep, st));
    srv.stop_checked(N + 2);
}

#[test]
fn half_close_after_frame_gets_echo_then_eof() {
    let mut srv = Server::start(&[]);
    let mut s = connect(srv.addr());
    write_frame(&mut s, CMD_ECHO, b"then I stop writing").unwrap();
    shutdown_write(&s);
    assert_eq!(
        expect_frame(&mut s, "echo after shutdown(Write)"),
        (CMD_ECHO, b"then I stop writing".to_vec())
    );
    expect_closed(&mut s, "EOF after the echo of a half-closed connection");

    // Two frames (the second one large) before the half-close.
    let mut s2 = connect(srv.addr());
    let big = pattern(5, 200_000);
    let mut buf = encode_frame(CMD_ECHO, b"first");
    buf.extend(encode_frame(CMD_ECHO, &big));
    let want = buf.clone();
    let got = {
        let mut w = s2.try_clone().unwrap();
        std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                w.write_all(&buf)?;
                w.shutdown(std::net::Shutdown::Write)
            });
            let got = {
                let mut v = vec![0u8; want.len()];
                std::io::Read::read_exact(&mut s2, &mut v).expect("read both echoes");
                v
            };
            h.join().unwrap().expect("write + shutdown");
            got
        })
    };
    assert_frame_body_eq(&got, &want, "two echoes before EOF");
    expect_closed(&mut s2, "EOF after both echoes");
    srv.stop_checked(2);
}

#[test]
fn connect_and_close_immediately_1000_times() {
    const N: u64 = 1000;
    let mut srv = Server::start(&[]);
    let addr = srv.addr();
    for i in 0..N {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect #{i} failed: {e}"));
        drop(s);
    }
    let mut st = settle(addr, N + 1, 1);
    echo_roundtrip(&mut st, b"server still serves");
    drop(st);
    srv.stop_checked(N + 1);
}

#[test]
fn partial_frame_gets_no_reply_until_complete() {
    let mut srv = Server::start(&[]);
    let mut s = connect(srv.addr());
    let frame = encode_frame(CMD_ECHO, &pattern(11, 300));
    s.write_all(&frame[..HEADER_LEN + 150]).unwrap();
    match read_frame_timeout(&mut s, std::time::Duration::from_millis(300)) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("no reply expected for an incomplete frame, got {other:?}"),
    }
    s.write_all(&frame[HEADER_LEN + 150..]).unwrap();
    assert_eq!(
        expect_frame(&mut s, "echo of the completed frame"),
        (CMD_ECHO, frame[HEADER_LEN..].to_vec())
    );
    drop(s);
    srv.stop_checked(1);
}
