//! Fuzzes encode → decode: frames built by every encoder (`Frame::new`,
//! `Frame::from_parts`, `encode`, `error_frame`) and concatenated decode
//! back to themselves whatever the split; a limit one byte below the
//! largest body stops exactly at the first frame over it.
#![no_main]

use bytes::Bytes;
use cport::frame::{self, Decoder, Frame, FrameError};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    frames: Vec<(u8, u32, Vec<u8>)>,
    splits: Vec<u8>,
    slack: u8,
}

fn build(kind: u8, cmd: u32, body: &[u8]) -> Frame {
    match kind % 4 {
        0 => Frame::new(cmd, body),
        1 => Frame::from_parts(cmd, Bytes::copy_from_slice(body)),
        2 => {
            let wire = frame::encode(cmd, body);
            let mut d = Decoder::new(u32::MAX);
            d.feed(&wire);
            let f = d.decode().expect("own encoding rejected").expect("incomplete");
            assert_eq!(d.buffered(), 0);
            f
        }
        _ => {
            let msg = String::from_utf8_lossy(body);
            let f = frame::error_frame(cmd, &msg);
            assert_eq!(f.error_parts(), Some((cmd, msg.into_owned())));
            f
        }
    }
}

fn decode_split(stream: &[u8], max: u32, splits: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < stream.len() {
        let n = match splits.get(i % splits.len().max(1)) {
            Some(&s) if s > 0 => usize::from(s),
            _ => stream.len() - pos,
        };
        i += 1;
        let end = (pos + n).min(stream.len());
        d.feed(&stream[pos..end]);
        pos = end;
        loop {
            match d.decode() {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    assert_eq!(d.buffered(), 0, "a complete stream left bytes behind");
    (out, None)
}

fuzz_target!(|input: Input| {
    let frames: Vec<Frame> = input
        .frames
        .iter()
        .map(|(k, c, b)| build(*k, *c, b))
        .collect();
    for (f, (kind, cmd, body)) in frames.iter().zip(&input.frames) {
        assert_eq!(f.wire().len(), frame::HEADER_LEN + f.body_len());
        assert_eq!(&f.body()[..], &f.wire()[frame::HEADER_LEN..]);
        if kind % 4 == 3 {
            assert_eq!(f.cmd(), frame::cmd::ERROR);
            assert_eq!(f.body()[..4], cmd.to_be_bytes());
        } else {
            assert_eq!(f.cmd(), *cmd);
            assert_eq!(&f.body()[..], &body[..]);
        }
    }
    let stream: Vec<u8> = frames.iter().flat_map(|f| f.wire().iter().copied()).collect();
    let largest = frames.iter().map(|f| f.body_len() as u32).max().unwrap_or(0);

    let max = largest.saturating_add(u32::from(input.slack));
    let (got, err) = decode_split(&stream, max, &input.splits);
    assert_eq!(err, None);
    assert_eq!(got, frames);

    if largest > 0 {
        let max = largest - 1;
        let (got, err) = decode_split(&stream, max, &input.splits);
        let first_over = frames.iter().position(|f| f.body_len() as u32 > max).unwrap();
        assert_eq!(got, frames[..first_over]);
        let f = &frames[first_over];
        assert_eq!(
            err,
            Some(FrameError::TooLarge { len: f.body_len() as u32, max, cmd: f.cmd() })
        );
    }
});
