//! What a stress connection sends: ECHO frames whose bodies are a keyed
//! pseudo-random stream, unique per (run seed, connection, message), so an
//! echo that comes back on the wrong connection, out of order, truncated or
//! with one byte changed is caught. Nothing is kept per message: the
//! expected body is generated again, word by word, to check the echo.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{self, cmd};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: a bijection that spreads every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The word stream of one message.
struct Stream(u64);

impl Stream {
    fn new(seed: u64, conn: u64, seq: u64) -> Stream {
        Stream(mix(seed
            ^ mix(conn.wrapping_add(GOLDEN))
            ^ mix(seq ^ 0xD1B5_4A32_D192_ED03).rotate_left(17)))
    }

    fn next(&mut self) -> [u8; 8] {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0).to_le_bytes()
    }
}

/// The wire bytes (header + `size`-byte body) of message `seq` (0-based)
/// of connection `conn`.
pub(crate) fn echo_frame(seed: u64, conn: u64, seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(frame::HEADER_LEN + size);
    b.put_slice(&frame::encode_header(cmd::ECHO, size as u32));
    put_body(&mut b, seed, conn, seq, size);
    b.freeze()
}

/// The same message without a header, for raw echo.
pub(crate) fn echo_body(seed: u64, conn: u64, seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    put_body(&mut b, seed, conn, seq, size);
    b.freeze()
}

fn put_body(b: &mut BytesMut, seed: u64, conn: u64, seq: u64, size: usize) {
    let mut s = Stream::new(seed, conn, seq);
    let mut left = size;
    while left >= 8 {
        b.put_slice(&s.next());
        left -= 8;
    }
    if left > 0 {
        b.put_slice(&s.next()[..left]);
    }
}

/// Whether `body` is exactly the body of message `seq` of connection `conn`
/// (the caller checks the length).
pub(crate) fn verify(seed: u64, conn: u64, seq: u64, body: &[u8]) -> bool {
    let mut s = Stream::new(seed, conn, seq);
    let mut words = body.chunks_exact(8);
    for w in &mut words {
        if w != s.next() {
            return false;
        }
    }
    let rest = words.remainder();
    rest.is_empty() || rest == &s.next()[..rest.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_verify_and_differ() {
        for size in [0usize, 1, 7, 8, 9, 64, 4096] {
            let f = echo_frame(1, 5, 2, size);
            assert_eq!(f.len(), frame::HEADER_LEN + size);
            assert_eq!(
                frame::parse_header(f[..8].try_into().unwrap()),
                (size as u32, cmd::ECHO)
            );
            let body = &f[frame::HEADER_LEN..];
            assert!(verify(1, 5, 2, body), "size {size}");
            assert_eq!(echo_body(1, 5, 2, size), body, "raw body, size {size}");
            if size >= 4 {
                assert!(!verify(1, 5, 3, body), "another message, size {size}");
                assert!(!verify(1, 6, 2, body), "another connection, size {size}");
                assert!(!verify(2, 5, 2, body), "another seed, size {size}");
                let mut bad = body.to_vec();
                bad[size - 1] ^= 1;
                assert!(!verify(1, 5, 2, &bad), "flipped last byte, size {size}");
            }
        }
    }
}
