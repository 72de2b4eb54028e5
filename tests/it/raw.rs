//! `--protocol raw`: bytes are echoed exactly as they come, no framing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;

use crate::util::*;

fn read_n(s: &mut TcpStream, n: usize, what: &str) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("{what}: reading {n} bytes failed: {e} ({:?})", e.kind()));
    v
}

#[test]
fn raw_bytes_echo_back() {
    let mut srv = Server::start(&["--protocol", "raw"]);
    let mut s = connect(srv.addr());
    let mut total = 0u64;
    // Bytes that would be a fatal oversized frame header in framed mode
    // must simply be echoed in raw mode.
    let header_like = encode_header(u32::MAX, CMD_ERROR);
    s.write_all(&header_like).unwrap();
    assert_eq!(read_n(&mut s, 8, "header-like bytes"), header_like);
    total += 8;
    for (i, n) in [1usize, 3, 100, 4096, 10_000].into_iter().enumerate() {
        let data = pattern(i as u64, n);
        let got = exchange(&mut s, &data, n);
        assert_frame_body_eq(&got, &data, &format!("raw chunk of {n} bytes"));
        total += n as u64;
    }
    drop(s);
    let summary = srv.stop_checked(1);
    assert_eq!(get(&summary, "bytes_in"), total, "{summary:?}");
    assert_eq!(get(&summary, "bytes_out"), total, "{summary:?}");
}

#[test]
fn raw_lines_like_netcat_then_eof() {
    let mut srv = Server::start(&["--protocol", "raw"]);
    let mut s = connect(srv.addr());
    let lines = [
        "hello\n",
        "world\n",
        "\n",
        "a somewhat longer line, like a person would type\n",
    ];
    let mut total = 0u64;
    for line in lines {
        s.write_all(line.as_bytes()).unwrap();
        let got = read_n(&mut s, line.len(), "line echo");
        assert_eq!(String::from_utf8_lossy(&got), line);
        total += line.len() as u64;
    }
    // Like `nc -N`: half-close after the last line; the server closes too.
    s.write_all(b"bye\n").unwrap();
    shutdown_write(&s);
    assert_eq!(read_n(&mut s, 4, "last line"), b"bye\n");
    total += 4;
    expect_closed(&mut s, "raw connection after client half-close");
    let summary = srv.stop_checked(1);
    assert_eq!(get(&summary, "bytes_in"), total, "{summary:?}");
    assert_eq!(get(&summary, "bytes_out"), total, "{summary:?}");
}

#[test]
fn raw_one_mib_streamed_with_concurrent_reader() {
    const TOTAL: usize = 1 << 20;
    let mut srv = Server::start(&["--protocol", "raw"]);
    let mut s = connect(srv.addr());
    let data = pattern(0xAB, TOTAL);
    let mut w = s.try_clone().unwrap();
    let got = thread::scope(|sc| {
        let data = &data;
        let writer = sc.spawn(move || {
            let mut rng = Rng::new(7);
            let mut off = 0;
            let mut writes = 0;
            while off < TOTAL && writes < 1_000_000 {
                let n = (1 + rng.below(65536) as usize).min(TOTAL - off);
                w.write_all(&data[off..off + n])?;
                off += n;
                writes += 1;
            }
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0u8; 64 * 1024];
        let mut reads = 0;
        while got.len() < TOTAL && reads < 10_000_000 {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("raw stream read failed after {} bytes: {e}", got.len()),
            }
            reads += 1;
        }
        writer.join().unwrap().expect("writer");
        got
    });
    assert_frame_body_eq(&got, &data, "1 MiB raw stream");
    expect_closed(&mut s, "raw connection after 1 MiB and half-close");
    let summary = srv.stop_checked(1);
    assert_eq!(get(&summary, "bytes_in"), TOTAL as u64, "{summary:?}");
    assert_eq!(get(&summary, "bytes_out"), TOTAL as u64, "{summary:?}");
}
