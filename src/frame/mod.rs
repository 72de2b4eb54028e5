//! Sans-I/O wire codec for the `cport` protocol.
//!
//! Every frame is an 8-byte header followed by a body. The header holds the
//! body length (`len: u32`, excluding the header) and then the command
//! (`cmd: u32`), both big-endian:
//!
//! ```text
//! +--------+--------+----------------+
//! | len BE | cmd BE | body (len B)   |
//! +--------+--------+----------------+
//! ```
//!
//! [`Decoder`] turns a byte stream (split and merged arbitrarily by the
//! transport) back into [`Frame`]s without ever trusting the declared length
//! for allocation. Encoding a stream of many frames is just [`encode`]
//! repeated and concatenated.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Size of the frame header in bytes: `len: u32` then `cmd: u32`, both big-endian.
pub const HEADER_LEN: usize = 8;

/// Default maximum body length accepted by a [`Decoder`] (1 MiB).
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// Command numbers carried in the header's `cmd` field.
pub mod cmd {
    /// Echo: the server sends the frame back unchanged.
    pub const ECHO: u32 = 1;
    /// Broadcast: the body is relayed to every other connected client.
    pub const BROADCAST: u32 = 2;
    /// Ping: the peer answers with [`PONG`].
    pub const PING: u32 = 3;
    /// Pong: answer to [`PING`].
    pub const PONG: u32 = 4;
    /// File: request or transfer of a file.
    pub const FILE: u32 = 5;
    /// Stats: request or report of server statistics.
    pub const STATS: u32 = 8;
    /// Error: body is `code: u32` BE (see [`super::code`]) followed by a UTF-8 message.
    pub const ERROR: u32 = 0xFFFF_FFFF;

    /// Human-readable lowercase name of a command, `"unknown"` for unassigned numbers.
    pub fn name(cmd: u32) -> &'static str {
        match cmd {
            ECHO => "echo",
            BROADCAST => "broadcast",
            PING => "ping",
            PONG => "pong",
            FILE => "file",
            STATS => "stats",
            ERROR => "error",
            _ => "unknown",
        }
    }
}

/// Error codes carried in the first 4 bytes of an ERROR frame's body.
pub mod code {
    /// A frame exceeded the receiver's size limit (fatal).
    pub const FRAME_TOO_LARGE: u32 = 1;
    /// The command number is not known to the receiver.
    pub const UNKNOWN_COMMAND: u32 = 2;
    /// The requested resource does not exist.
    pub const NOT_FOUND: u32 = 3;
    /// The request is not allowed.
    pub const FORBIDDEN: u32 = 4;
    /// The server is at capacity (fatal).
    pub const BUSY: u32 = 5;
    /// The connection was idle for too long (fatal).
    pub const IDLE_TIMEOUT: u32 = 6;
    /// The peer did not read its data fast enough (fatal).
    pub const SLOW_CONSUMER: u32 = 7;
    /// The requested file exceeds the transfer limit.
    pub const FILE_TOO_LARGE: u32 = 8;

    /// Whether the sender closes the connection after sending this code.
    pub fn is_fatal(code: u32) -> bool {
        matches!(code, FRAME_TOO_LARGE | BUSY | IDLE_TIMEOUT | SLOW_CONSUMER)
    }

    /// Human-readable snake_case name of a code, `"unknown"` for unassigned numbers.
    pub fn name(code: u32) -> &'static str {
        match code {
            FRAME_TOO_LARGE => "frame_too_large",
            UNKNOWN_COMMAND => "unknown_command",
            NOT_FOUND => "not_found",
            FORBIDDEN => "forbidden",
            BUSY => "busy",
            IDLE_TIMEOUT => "idle_timeout",
            SLOW_CONSUMER => "slow_consumer",
            FILE_TOO_LARGE => "file_too_large",
            _ => "unknown",
        }
    }
}

/// One decoded frame; holds the frame's wire bytes (header + body) so an echo
/// can send them back unchanged, zero-copy.
///
/// Cloning is cheap (a reference-count increment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    cmd: u32,
    wire: Bytes,
}

impl Frame {
    /// Encodes a frame from a command and a body (one allocation, one copy of the body).
    ///
    /// # Panics
    /// If `body` is longer than `u32::MAX` bytes.
    pub fn new(cmd: u32, body: &[u8]) -> Frame {
        let len = body_len_u32(body.len());
        let mut buf = BytesMut::with_capacity(HEADER_LEN + body.len());
        buf.put_slice(&encode_header(cmd, len));
        buf.put_slice(body);
        Frame {
            cmd,
            wire: buf.freeze(),
        }
    }

    /// Encodes a frame from a command and an owned body; the header is
    /// written and the body copied once, into a single contiguous buffer.
    ///
    /// # Panics
    /// If `body` is longer than `u32::MAX` bytes.
    pub fn from_parts(cmd: u32, body: Bytes) -> Frame {
        Frame::new(cmd, &body)
    }

    /// A frame from its complete wire encoding (header + body), without a
    /// copy; `None` unless `wire` is exactly one frame (its header's length
    /// matches what follows).
    pub fn from_wire(wire: Bytes) -> Option<Frame> {
        let header: &[u8; HEADER_LEN] = wire.get(..HEADER_LEN)?.try_into().ok()?;
        let (len, cmd) = parse_header(header);
        (wire.len() - HEADER_LEN == len as usize).then_some(Frame { cmd, wire })
    }

    /// The frame's command number (see [`cmd`]).
    pub fn cmd(&self) -> u32 {
        self.cmd
    }

    /// The body: a cheap slice of [`Frame::wire`] (no copy).
    pub fn body(&self) -> Bytes {
        self.wire.slice(HEADER_LEN..)
    }

    /// Length of the body in bytes.
    pub fn body_len(&self) -> usize {
        self.wire.len() - HEADER_LEN
    }

    /// The complete wire encoding: header followed by body.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// Consumes the frame, returning its wire encoding (header + body).
    pub fn into_wire(self) -> Bytes {
        self.wire
    }

    /// For an ERROR frame, its `(code, message)`; `None` for other commands
    /// or a body shorter than 4 bytes. See [`parse_error`].
    pub fn error_parts(&self) -> Option<(u32, String)> {
        if self.cmd == cmd::ERROR {
            parse_error(&self.wire[HEADER_LEN..])
        } else {
            None
        }
    }
}

/// Converts a body length to the header's `u32`, panicking if it does not fit.
fn body_len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("frame body longer than u32::MAX bytes")
}

/// Encodes a header: `len` (body length) then `cmd`, both big-endian.
///
/// Note the argument order (`cmd`, `len`) differs from the wire order (`len`, `cmd`).
pub fn encode_header(cmd: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4..].copy_from_slice(&cmd.to_be_bytes());
    h
}

/// Encodes one frame to its wire bytes. Concatenating the results of several
/// calls gives a valid stream of frames.
///
/// # Panics
/// If `body` is longer than `u32::MAX` bytes.
pub fn encode(cmd: u32, body: &[u8]) -> Bytes {
    Frame::new(cmd, body).into_wire()
}

/// Builds an ERROR frame whose body is `code` (u32 BE) followed by `message` in UTF-8.
///
/// # Panics
/// If `message` is longer than `u32::MAX - 4` bytes.
pub fn error_frame(code: u32, message: &str) -> Frame {
    let len = body_len_u32(4 + message.len());
    let mut buf = BytesMut::with_capacity(HEADER_LEN + 4 + message.len());
    buf.put_slice(&encode_header(cmd::ERROR, len));
    buf.put_u32(code);
    buf.put_slice(message.as_bytes());
    Frame {
        cmd: cmd::ERROR,
        wire: buf.freeze(),
    }
}

/// Parses an ERROR body into (code, message); None when shorter than 4 bytes.
/// Message decoded lossily.
pub fn parse_error(body: &[u8]) -> Option<(u32, String)> {
    let (code, msg) = body.split_first_chunk::<4>()?;
    Some((
        u32::from_be_bytes(*code),
        String::from_utf8_lossy(msg).into_owned(),
    ))
}

/// Errors detected while decoding a stream.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A header declared a body longer than the decoder's limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared body length.
        len: u32,
        /// The decoder's limit.
        max: u32,
        /// Command number of the offending header.
        cmd: u32,
    },
}

/// Receive state machine: copes with split and merged frames.
///
/// Feed it the bytes received ([`Decoder::feed`]), then call
/// [`Decoder::decode`] until it returns `Ok(None)`.
///
/// Memory: the buffer grows only with bytes actually fed, never with a
/// declared length, and its allocation is released whenever a decode leaves
/// it empty, so an idle connection's decoder holds no capacity.
///
/// Once [`Decoder::decode`] has returned an error the decoder is *poisoned*:
/// its buffer is released, later [`Decoder::feed`] calls discard their data,
/// and every later [`Decoder::decode`] returns the same error. The stream is
/// unrecoverable (frame boundaries are lost); the connection should be closed,
/// typically after sending [`code::FRAME_TOO_LARGE`].
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max: u32,
    error: Option<FrameError>,
}

impl Default for Decoder {
    /// A decoder with [`DEFAULT_MAX_FRAME`] as its limit.
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// Creates a decoder accepting bodies of at most `max_frame` bytes. Allocates nothing.
    pub fn new(max_frame: u32) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            max: max_frame,
            error: None,
        }
    }

    /// The largest body length accepted.
    pub fn max_frame(&self) -> u32 {
        self.max
    }

    /// Appends received bytes (one copy). Ignored once the decoder is poisoned.
    pub fn feed(&mut self, data: &[u8]) {
        if self.error.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Appends an owned receive buffer. When the decoder holds nothing, the
    /// buffer is adopted as is (no copy, its whole capacity then counts in
    /// [`Decoder::capacity`]); otherwise its bytes are appended (zero-copy if
    /// contiguous with the held bytes). Ignored once the decoder is poisoned.
    pub fn feed_buf(&mut self, data: BytesMut) {
        if self.error.is_some() {
            return;
        }
        if self.buf.is_empty() {
            self.buf = data;
        } else {
            self.buf.unsplit(data);
        }
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed,
    /// or `Err` if a header declares a body longer than [`Decoder::max_frame`].
    ///
    /// The length check happens as soon as the 8 header bytes are present,
    /// before any body byte arrives. After an error the decoder is poisoned
    /// and every later call returns the same error.
    pub fn decode(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let Some((header, _)) = self.buf.split_first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (len, cmd) = parse_header(header);
        if len > self.max {
            let err = FrameError::TooLarge {
                len,
                max: self.max,
                cmd,
            };
            self.error = Some(err.clone());
            self.buf = BytesMut::new();
            return Err(err);
        }
        // `len <= max <= u32::MAX`; saturating keeps 16/32-bit targets sound.
        let total = (len as usize).saturating_add(HEADER_LEN);
        if self.buf.len() < total {
            return Ok(None);
        }
        let wire = self.buf.split_to(total).freeze();
        if self.buf.is_empty() {
            // Drop our handle on the allocation: idle decoders hold nothing,
            // and the frame alone keeps its bytes alive.
            self.buf = BytesMut::new();
        }
        Ok(Some(Frame { cmd, wire }))
    }

    /// Number of received bytes held, not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of buffer capacity held (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether a previous [`Decoder::decode`] failed (see the type's docs).
    pub fn is_poisoned(&self) -> bool {
        self.error.is_some()
    }
}

/// Splits a header into `(len, cmd)`.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> (u32, u32) {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let cmd = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    (len, cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_CMDS: [u32; 7] = [
        cmd::ECHO,
        cmd::BROADCAST,
        cmd::PING,
        cmd::PONG,
        cmd::FILE,
        cmd::STATS,
        cmd::ERROR,
    ];

    /// Feeds nothing; decodes every available frame, asserting no error.
    fn drain(d: &mut Decoder, out: &mut Vec<Frame>) {
        while let Some(f) = d.decode().expect("unexpected decode error") {
            out.push(f);
        }
    }

    fn stream_of(frames: &[Frame]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| f.wire().iter().copied())
            .collect()
    }

    #[test]
    fn round_trip_each_cmd() {
        for (i, &c) in ALL_CMDS.iter().enumerate() {
            let body: Vec<u8> = (0..=i as u8 * 7).collect();
            let f = Frame::new(c, &body);
            assert_eq!(f.cmd(), c);
            assert_eq!(&f.body()[..], &body[..]);
            assert_eq!(f.body_len(), body.len());
            assert_eq!(f.wire().len(), HEADER_LEN + body.len());
            assert_eq!(f, Frame::from_parts(c, Bytes::from(body.clone())));
            assert_eq!(f.wire(), &encode(c, &body));

            let mut d = Decoder::default();
            d.feed(f.wire());
            let got = d.decode().unwrap().unwrap();
            assert_eq!(got, f);
            assert_eq!(d.decode().unwrap(), None);
            assert_ne!(cmd::name(c), "unknown");
        }
        assert_eq!(cmd::name(cmd::ECHO), "echo");
        assert_eq!(cmd::name(cmd::BROADCAST), "broadcast");
        assert_eq!(cmd::name(cmd::STATS), "stats");
        assert_eq!(cmd::name(cmd::ERROR), "error");
        assert_eq!(cmd::name(6), "unknown");
    }

    #[test]
    fn empty_body() {
        let f = Frame::new(cmd::PING, b"");
        assert_eq!(f.body_len(), 0);
        assert!(f.body().is_empty());
        assert_eq!(&f.wire()[..], &[0, 0, 0, 0, 0, 0, 0, 3]);
        let mut d = Decoder::new(0);
        d.feed(f.wire());
        assert_eq!(d.decode().unwrap(), Some(f));
        assert_eq!(d.decode().unwrap(), None);
        assert_eq!(d.capacity(), 0);
    }

    #[test]
    fn error_frame_encode_parse() {
        let f = error_frame(code::NOT_FOUND, "no such file: é");
        assert_eq!(f.cmd(), cmd::ERROR);
        assert_eq!(&f.body()[..4], &[0, 0, 0, 3]);
        assert_eq!(
            parse_error(&f.body()),
            Some((code::NOT_FOUND, "no such file: é".to_string()))
        );
        assert_eq!(f.error_parts(), parse_error(&f.body()));
        assert_eq!(Frame::new(cmd::ECHO, &f.body()).error_parts(), None);

        assert_eq!(parse_error(&[0, 0, 1]), None);
        assert_eq!(parse_error(&[0, 0, 0, 7]), Some((7, String::new())));
        // Invalid UTF-8 is decoded lossily.
        assert_eq!(
            parse_error(&[0, 0, 0, 2, b'a', 0xFF]),
            Some((2, "a\u{FFFD}".to_string()))
        );
        let mut d = Decoder::default();
        d.feed(f.wire());
        assert_eq!(d.decode().unwrap().unwrap().error_parts(), f.error_parts());
    }

    #[test]
    fn codes() {
        let fatal = [
            code::FRAME_TOO_LARGE,
            code::BUSY,
            code::IDLE_TIMEOUT,
            code::SLOW_CONSUMER,
        ];
        for c in 0..=9 {
            assert_eq!(code::is_fatal(c), fatal.contains(&c), "code {c}");
        }
        for c in 1..=8 {
            assert_ne!(code::name(c), "unknown");
        }
        assert_eq!(code::name(code::SLOW_CONSUMER), "slow_consumer");
        assert_eq!(code::name(0), "unknown");
        assert_eq!(code::name(9), "unknown");
    }

    #[test]
    fn header_big_endian_layout() {
        assert_eq!(
            encode_header(0x0102_0304, 0x0A0B_0C0D),
            [0x0A, 0x0B, 0x0C, 0x0D, 0x01, 0x02, 0x03, 0x04]
        );
        assert_eq!(
            &encode(cmd::ECHO, b"hi")[..],
            &[0, 0, 0, 2, 0, 0, 0, 1, b'h', b'i']
        );
        assert_eq!(
            &error_frame(code::BUSY, "x").wire()[..],
            &[0, 0, 0, 5, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 5, b'x']
        );
        assert_eq!(parse_header(&[0, 0, 1, 0, 0, 0, 0, 8]), (256, cmd::STATS));
    }

    #[test]
    fn too_large_at_limit_with_header_only() {
        for max in [0, 1, 100, DEFAULT_MAX_FRAME, u32::MAX - 1] {
            // Exactly at max: fine, just waiting for the body.
            // (With max 0 the header alone is a whole, empty frame.)
            let mut d = Decoder::new(max);
            d.feed(&encode_header(cmd::ECHO, max));
            let expected = (max == 0).then(|| Frame::new(cmd::ECHO, b""));
            assert_eq!(d.decode(), Ok(expected));
            assert!(!d.is_poisoned());
            assert!(d.capacity() < 64);

            // max + 1: rejected from the header alone.
            let mut d = Decoder::new(max);
            d.feed(&encode_header(cmd::FILE, max + 1));
            let err = FrameError::TooLarge {
                len: max + 1,
                max,
                cmd: cmd::FILE,
            };
            assert_eq!(d.decode(), Err(err));
            assert!(d.capacity() < 64);
        }
        // 7 header bytes are not enough to judge.
        let mut d = Decoder::new(10);
        d.feed(&encode_header(cmd::ECHO, 11)[..7]);
        assert_eq!(d.decode(), Ok(None));
        d.feed(&[1]);
        assert!(d.decode().is_err());
    }

    #[test]
    fn poisoned_after_error() {
        let mut d = Decoder::new(16);
        let good = encode(cmd::ECHO, b"ok");
        d.feed(&good);
        d.feed(&encode_header(cmd::BROADCAST, 17));
        d.feed(&good);
        assert_eq!(
            d.decode().unwrap().unwrap().body(),
            Bytes::from_static(b"ok")
        );
        let err = d.decode().unwrap_err();
        assert_eq!(
            err.to_string(),
            "frame of 17 bytes exceeds the limit of 16 bytes"
        );
        assert!(d.is_poisoned());
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.capacity(), 0);
        d.feed(&good);
        d.feed_buf(BytesMut::from(&good[..]));
        assert_eq!(d.buffered(), 0);
        for _ in 0..3 {
            assert_eq!(d.decode(), Err(err.clone()));
        }
    }

    #[test]
    fn capacity_zero_after_drain() {
        let mut d = Decoder::default();
        assert_eq!(d.capacity(), 0);
        let frames: Vec<Frame> = (0..10u8).map(|i| Frame::new(cmd::ECHO, &[i; 33])).collect();
        let stream = stream_of(&frames);
        // Leave a partial frame: capacity stays, then finish it.
        d.feed(&stream[..stream.len() - 5]);
        let mut out = Vec::new();
        drain(&mut d, &mut out);
        assert_eq!(out.len(), 9);
        assert_eq!(d.buffered(), 36);
        assert!(d.capacity() > 0);
        d.feed(&stream[stream.len() - 5..]);
        drain(&mut d, &mut out);
        assert_eq!(out, frames);
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.capacity(), 0);

        // Same through feed_buf.
        d.feed_buf(BytesMut::from(&stream[..]));
        out.clear();
        drain(&mut d, &mut out);
        assert_eq!(out, frames);
        assert_eq!(d.capacity(), 0);
    }

    #[test]
    fn huge_declared_length_allocates_only_what_is_fed() {
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        d.feed(&encode_header(cmd::FILE, DEFAULT_MAX_FRAME));
        d.feed(&[0xAB; 10]);
        assert_eq!(d.decode(), Ok(None));
        assert_eq!(d.buffered(), HEADER_LEN + 10);
        assert!(d.capacity() < 1024, "capacity {}", d.capacity());
        for _ in 0..100 {
            d.feed(&[0xAB; 10]);
            assert_eq!(d.decode(), Ok(None));
        }
        assert!(d.capacity() < 4096, "capacity {}", d.capacity());
    }

    #[test]
    fn zero_copy_split_and_body() {
        let mut d = Decoder::default();
        let a = encode(cmd::ECHO, b"first");
        let b = encode(cmd::PONG, b"second");
        let mut both = BytesMut::new();
        both.extend_from_slice(&a);
        both.extend_from_slice(&b);
        d.feed(&both);
        let fa = d.decode().unwrap().unwrap();
        let fb = d.decode().unwrap().unwrap();
        // Both frames are views into the one receive buffer.
        assert_eq!(fa.wire().as_ptr().wrapping_add(a.len()), fb.wire().as_ptr());
        assert_eq!(
            fa.body().as_ptr(),
            fa.wire().as_ptr().wrapping_add(HEADER_LEN)
        );
        assert_eq!(fa.into_wire(), a);
        assert_eq!(fb.into_wire(), b);

        // feed_buf adopts the buffer without copying.
        let buf = BytesMut::from(&a[..]);
        let ptr = buf.as_ptr();
        d.feed_buf(buf);
        let f = d.decode().unwrap().unwrap();
        assert_eq!(f.wire().as_ptr(), ptr);
    }

    #[test]
    fn feed_buf_appends_to_partial() {
        let stream = stream_of(&[
            Frame::new(cmd::ECHO, b"abc"),
            Frame::new(cmd::STATS, b"defgh"),
        ]);
        let mut d = Decoder::default();
        d.feed_buf(BytesMut::from(&stream[..5]));
        assert_eq!(d.decode(), Ok(None));
        d.feed_buf(BytesMut::from(&stream[5..14]));
        d.feed(&stream[14..]);
        let mut out = Vec::new();
        drain(&mut d, &mut out);
        assert_eq!(stream_of(&out), stream);
        assert_eq!(d.capacity(), 0);
    }

    fn frame_strategy(max_body: usize) -> impl Strategy<Value = Frame> {
        (
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..max_body),
        )
            .prop_map(|(c, body)| Frame::new(c, &body))
    }

    proptest! {
        /// (a) Split at every byte boundary into two feeds.
        #[test]
        fn split_at_every_boundary(frames in prop::collection::vec(frame_strategy(60), 0..5)) {
            let stream = stream_of(&frames);
            prop_assert!(stream.len() <= 300);
            for k in 0..=stream.len() {
                let mut d = Decoder::default();
                let mut out = Vec::new();
                d.feed(&stream[..k]);
                drain(&mut d, &mut out);
                d.feed(&stream[k..]);
                drain(&mut d, &mut out);
                prop_assert_eq!(&out, &frames);
                prop_assert_eq!(d.buffered(), 0);
                prop_assert_eq!(d.capacity(), 0);
            }
        }

        /// (b) Random chunk sizes.
        #[test]
        fn random_chunks(
            frames in prop::collection::vec(frame_strategy(2000), 0..8),
            sizes in prop::collection::vec(any::<prop::sample::Index>(), 1..64),
        ) {
            let stream = stream_of(&frames);
            let mut d = Decoder::default();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < stream.len() {
                let n = sizes[i % sizes.len()].index(stream.len() - pos) + 1;
                i += 1;
                d.feed(&stream[pos..pos + n]);
                pos += n;
                drain(&mut d, &mut out);
                prop_assert_eq!(d.buffered() + stream_of(&out).len(), pos);
            }
            prop_assert_eq!(&out, &frames);
            prop_assert_eq!(d.capacity(), 0);
        }

        /// (c) Many frames merged into one feed decode in order.
        #[test]
        fn merged_in_one_feed(frames in prop::collection::vec(frame_strategy(300), 0..100)) {
            let stream = stream_of(&frames);
            let mut d = Decoder::default();
            d.feed(&stream);
            let mut out = Vec::new();
            drain(&mut d, &mut out);
            prop_assert_eq!(&out, &frames);
            prop_assert_eq!(d.decode(), Ok(None));
            prop_assert_eq!(d.capacity(), 0);
        }

        /// (e) Encode → decode round trip through every encoder, fed with
        /// a random mix of `feed` and `feed_buf` at random sizes; ERROR
        /// frames give back their code and message.
        #[test]
        fn round_trip_every_encoder_mixed_feeds(
            items in prop::collection::vec(
                (0u8..4, any::<u32>(), prop::collection::vec(any::<u8>(), 0..300)),
                0..12,
            ),
            pieces in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..32),
        ) {
            let frames: Vec<Frame> = items
                .iter()
                .map(|(kind, c, body)| match kind {
                    0 => Frame::new(*c, body),
                    1 => Frame::from_parts(*c, Bytes::copy_from_slice(body)),
                    2 => {
                        let mut d = Decoder::new(u32::MAX);
                        d.feed(&encode(*c, body));
                        d.decode().unwrap().unwrap()
                    }
                    _ => error_frame(*c, &String::from_utf8_lossy(body)),
                })
                .collect();
            let stream = stream_of(&frames);
            let mut d = Decoder::new(300 + 4 * 300);
            let mut out = Vec::new();
            let (mut pos, mut i) = (0, 0);
            while pos < stream.len() {
                let (by_buf, size) = pieces[i % pieces.len()];
                i += 1;
                let n = size.index(stream.len() - pos) + 1;
                if by_buf {
                    d.feed_buf(BytesMut::from(&stream[pos..pos + n]));
                } else {
                    d.feed(&stream[pos..pos + n]);
                }
                pos += n;
                drain(&mut d, &mut out);
            }
            prop_assert_eq!(&out, &frames);
            prop_assert_eq!(d.buffered(), 0);
            for (f, (kind, c, body)) in out.iter().zip(&items) {
                if *kind == 3 {
                    let msg = String::from_utf8_lossy(body).into_owned();
                    prop_assert_eq!(f.error_parts(), Some((*c, msg)));
                } else {
                    prop_assert_eq!(f.cmd(), *c);
                    prop_assert_eq!(&f.body()[..], &body[..]);
                }
            }
        }

        /// (d) Garbage never panics: frames, need-more, or TooLarge.
        #[test]
        fn garbage_never_panics(
            max in prop_oneof![0u32..64, 0u32..=u32::MAX],
            data in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..4096),
                // Biased towards small declared lengths so frames do appear.
                prop::collection::vec(prop_oneof![3 => Just(0u8), 1 => 0u8..80, 1 => any::<u8>()], 0..4096),
            ],
            sizes in prop::collection::vec(any::<prop::sample::Index>(), 1..16),
        ) {
            let mut d = Decoder::new(max);
            let mut pos = 0;
            let mut i = 0;
            let mut consumed = 0;
            'outer: while pos < data.len() {
                let n = sizes[i % sizes.len()].index(data.len() - pos) + 1;
                i += 1;
                d.feed(&data[pos..pos + n]);
                pos += n;
                loop {
                    match d.decode() {
                        Ok(Some(f)) => {
                            prop_assert!(f.body_len() <= max as usize);
                            prop_assert_eq!(&f.wire()[..], &data[consumed..consumed + f.wire().len()]);
                            consumed += f.wire().len();
                        }
                        Ok(None) => {
                            prop_assert_eq!(consumed + d.buffered(), pos);
                            break;
                        }
                        Err(e) => {
                            let FrameError::TooLarge { len, max: m, .. } = e.clone();
                            prop_assert!(len > max);
                            prop_assert_eq!(m, max);
                            prop_assert!(d.is_poisoned());
                            prop_assert_eq!(d.decode(), Err(e));
                            break 'outer;
                        }
                    }
                }
            }
        }
    }
}
