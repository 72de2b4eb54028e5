#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (run from fuzz/; idempotent).

decode_split input: byte 0 picks the limit (0: (b1b2)%64, 1: b1b2,
2: 1 MiB, 3: u32::MAX, 4: 0), byte 3 = number of split-control bytes,
then the control bytes (len & 0x3F, 0x80 feed_buf, 0x40 no drain),
then the stream.
"""
import os
import struct


def frame(cmd, body=b""):
    return struct.pack(">II", len(body), cmd) + body


def err(code, msg):
    return frame(0xFFFFFFFF, struct.pack(">I", code) + msg.encode())


def ds(sel, b12, ctl, stream):
    return bytes([sel, b12 >> 8, b12 & 0xFF, len(ctl)]) + bytes(ctl) + stream


seeds = {
    "empty": ds(2, 0, [], b""),
    "one_echo": ds(2, 0, [], frame(1, b"hello")),
    "merged_three": ds(2, 0, [], frame(1, b"a") + frame(3, b"ping") + frame(8)),
    "byte_at_a_time": ds(2, 0, [1], frame(1, b"split me") + frame(2, b"x")),
    "feed_buf_mix": ds(1, 300, [0x83, 5, 0xC2, 0x3F], frame(1, bytes(200)) + frame(4, b"pong")),
    "no_drain_then_rest": ds(2, 0, [0x47, 0x41, 0x3F], frame(5, b"file.txt") * 3),
    "too_large_by_one": ds(1, 16, [3], frame(1, b"ok") + struct.pack(">II", 17, 2) + b"zz"),
    "length_bomb_4gib": ds(3, 0, [9, 1], struct.pack(">II", 0xFFFFFFFF, 1) + b"\x01" * 40),
    "max_zero_header_only": ds(4, 0, [], frame(3) + frame(3)),
    "partial_header": ds(2, 0, [2], b"\x00\x00\x00"),
    "error_frame": ds(2, 0, [4], err(1, "frame too large")),
    "small_limit_mod64": ds(0, 10, [7, 0x85], frame(1, bytes(10)) + frame(1, bytes(11))),
}

os.makedirs("corpus/decode_split", exist_ok=True)
for name, data in seeds.items():
    with open(f"corpus/decode_split/{name}", "wb") as f:
        f.write(data)

# roundtrip takes `arbitrary` input: any bytes are valid; a few shapes.
os.makedirs("corpus/roundtrip", exist_ok=True)
rt = {
    "zeros": bytes(64),
    "ascending": bytes(range(256)),
    "frames_like": b"".join(frame(i, bytes([i]) * i) for i in range(1, 12)),
    "mostly_ff": b"\xff" * 48 + b"\x01\x02\x03",
}
for name, data in rt.items():
    with open(f"corpus/roundtrip/{name}", "wb") as f:
        f.write(data)
