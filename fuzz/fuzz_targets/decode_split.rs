//! Fuzzes the frame decoder with a stream fed in pieces whose sizes, feed
//! method (`feed` or `feed_buf`) and draining pattern the input chooses.
//!
//! Input layout: byte 0 picks the decoder's limit (bytes 1..=2 refine it),
//! byte 3 is the number `n` of split-control bytes that follow, and the rest
//! is the byte stream. Each control byte `c` (cycled) says: `c & 0x3F` bytes
//! in this piece (`0x3F`: all the rest), `c & 0x80` feed it with `feed_buf`,
//! `c & 0x40` do not drain the decoder after it.
//!
//! Invariants: the frames decoded equal a one-shot reference parse of the
//! whole stream (independent of the decoder's code), and so does the error,
//! whatever the split; no frame is above the limit; the decoder's buffer
//! holds exactly the bytes fed and not yet returned, holds no capacity when
//! empty, and never grows with a declared length; a poisoned decoder keeps
//! returning its error and discards input.
#![no_main]

use bytes::BytesMut;
use cport::frame::{DEFAULT_MAX_FRAME, Decoder, Frame, FrameError, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// What a straightforward one-shot parse of `stream` gives.
struct Reference<'a> {
    frames: Vec<(u32, &'a [u8])>,
    error: Option<FrameError>,
    leftover: usize,
}

fn reference(stream: &[u8], max: u32) -> Reference<'_> {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = &stream[pos..];
        if rest.len() < HEADER_LEN {
            return Reference { frames, error: None, leftover: rest.len() };
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let cmd = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > max {
            let error = Some(FrameError::TooLarge { len, max, cmd });
            return Reference { frames, error, leftover: 0 };
        }
        let total = HEADER_LEN + len as usize;
        if rest.len() < total {
            return Reference { frames, error: None, leftover: rest.len() };
        }
        frames.push((cmd, &rest[..total]));
        pos += total;
    }
}

fn pick_max(data: &[u8]) -> u32 {
    let a = *data.first().unwrap_or(&0);
    let b = u16::from_be_bytes([*data.get(1).unwrap_or(&0), *data.get(2).unwrap_or(&0)]);
    match a % 5 {
        0 => u32::from(b % 64),
        1 => u32::from(b),
        2 => DEFAULT_MAX_FRAME,
        3 => u32::MAX,
        _ => 0,
    }
}

/// Drains `d`, checking each frame; returns the error that stopped it, if any.
fn drain(
    d: &mut Decoder,
    max: u32,
    out: &mut Vec<Frame>,
    consumed: &mut usize,
    fed: usize,
) -> Option<FrameError> {
    loop {
        match d.decode() {
            Ok(Some(f)) => {
                assert!(f.body_len() <= max as usize, "frame above the limit");
                assert_eq!(f.wire().len(), HEADER_LEN + f.body_len());
                *consumed += f.wire().len();
                out.push(f);
            }
            Ok(None) => {
                assert!(!d.is_poisoned());
                assert_eq!(*consumed + d.buffered(), fed, "bytes lost or invented");
                if d.buffered() == 0 {
                    assert_eq!(d.capacity(), 0, "an empty decoder holds capacity");
                }
                return None;
            }
            Err(e) => {
                assert!(d.is_poisoned());
                assert_eq!(d.buffered(), 0);
                assert_eq!(d.capacity(), 0);
                return Some(e);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let max = pick_max(data);
    let n = usize::from(*data.get(3).unwrap_or(&0) % 32);
    let ctl_end = (4 + n).min(data.len());
    let ctl = data.get(4..ctl_end).unwrap_or(&[]);
    let stream = data.get(ctl_end..).unwrap_or(&[]);
    let want = reference(stream, max);

    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let (mut pos, mut consumed, mut i) = (0usize, 0usize, 0usize);
    let mut error = None;
    // Bounded: every piece but empty ones advances, and at most 64 pieces
    // in a row may be empty.
    let mut empties = 0;
    while pos < stream.len() && error.is_none() {
        let c = if ctl.is_empty() { 0x3F } else { ctl[i % ctl.len()] };
        i += 1;
        let mut len = usize::from(c & 0x3F);
        if len == 0x3F || empties >= 64 {
            len = stream.len() - pos;
        }
        empties = if len == 0 { empties + 1 } else { 0 };
        let piece = &stream[pos..(pos + len).min(stream.len())];
        pos += piece.len();
        if c & 0x80 != 0 {
            d.feed_buf(BytesMut::from(piece));
        } else {
            d.feed(piece);
        }
        // The buffer never grows with a declared length, only with input.
        assert!(d.capacity() <= 4 * pos + 64, "capacity {} after {pos} bytes", d.capacity());
        if c & 0x40 == 0 || pos == stream.len() {
            error = drain(&mut d, max, &mut out, &mut consumed, pos);
        }
    }
    if stream.is_empty() {
        error = drain(&mut d, max, &mut out, &mut consumed, 0);
    }

    let got: Vec<(u32, &[u8])> = out.iter().map(|f| (f.cmd(), &f.wire()[..])).collect();
    assert_eq!(got, want.frames, "frames differ from the one-shot parse");
    assert_eq!(error, want.error, "error differs from the one-shot parse");
    match &error {
        Some(e) => {
            // Poisoned: input is discarded and the error repeats.
            d.feed(&stream[..stream.len().min(16)]);
            assert_eq!(d.buffered(), 0);
            assert_eq!(d.decode().as_ref(), Err(e));
        }
        None => {
            assert_eq!(d.buffered(), want.leftover);
            assert_eq!(d.decode(), Ok(None));
        }
    }

    // The same stream in one piece gives the same result.
    let mut one = Decoder::new(max);
    one.feed(stream);
    let mut out1 = Vec::new();
    let mut consumed1 = 0;
    let error1 = drain(&mut one, max, &mut out1, &mut consumed1, stream.len());
    assert_eq!(out1, out);
    assert_eq!(error1, error);
});
