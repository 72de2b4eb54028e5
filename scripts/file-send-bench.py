#!/usr/bin/env python3
"""FILE throughput, zero-copy (splice) vs copy (read + send), side by side.

Starts `cport server --file-send splice` and `--file-send copy` in turn
(interleaved, ROUNDS times), fetches files of each size over one loopback
connection, and prints medians of MB/s (wall) and server CPU per MiB.

usage: scripts/file-send-bench.py [path/to/cport]   (default target/release/cport)
"""
import os, socket, statistics, struct, subprocess, sys, tempfile, time

CPORT = sys.argv[1] if len(sys.argv) > 1 else "target/release/cport"
SIZES = [(4 << 10, 20000), (64 << 10, 4000), (256 << 10, 1500), (1 << 20, 400), (200 << 20, 4)]  # (size, fetches)
ROUNDS = 3
HZ = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ

def fetch(s, name, size, buf):
    p = name.encode()
    s.sendall(struct.pack(">II", len(p), 5) + p)
    view = memoryview(buf)
    got = 0
    while got < 8 + size:
        n = s.recv_into(view[got:8 + size])
        if n == 0:
            raise SystemExit("server closed the connection")
        got += n
    ln, cmd = struct.unpack(">II", buf[:8])
    assert cmd == 5 and ln == size, (cmd, ln)

def run(mode, d, port):
    srv = subprocess.Popen([CPORT, "server", "--listen", f"127.0.0.1:{port}", "--files", d,
                            "--file-send", mode, "--ports", "1", "--workers", "1", "--log", "warn"])
    try:
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", port)); break
            except OSError:
                time.sleep(0.05)
        out = {}
        buf = bytearray(8 + max(sz for sz, _ in SIZES))
        for size, n in SIZES:
            fetch(s, f"f{size}", size, buf)  # warm the page cache
            c0, t0 = cpu(srv.pid), time.perf_counter()
            for _ in range(n):
                fetch(s, f"f{size}", size, buf)
            wall, used = time.perf_counter() - t0, cpu(srv.pid) - c0
            mib = size * n / (1 << 20)
            out[size] = (mib / wall * 1.048576, used / mib * 1e3)  # MB/s, server CPU ms per MiB
        s.close()
        return out
    finally:
        srv.terminate(); srv.wait()

def main():
    with tempfile.TemporaryDirectory() as d:
        for size, _ in SIZES:
            with open(os.path.join(d, f"f{size}"), "wb") as f:
                f.write(os.urandom(min(size, 1 << 20)) * max(1, size // (1 << 20)))
        res = {"splice": [], "copy": []}
        port = 9700
        for r in range(ROUNDS):
            for mode in ("splice", "copy"):
                port += 1
                res[mode].append(run(mode, d, port))
        print(f"{'size':>10} {'splice MB/s':>12} {'copy MB/s':>10} {'ratio':>6} {'splice CPU ms/MiB':>18} {'copy CPU ms/MiB':>16}")
        for size, _ in SIZES:
            med = lambda m, i: statistics.median(x[size][i] for x in res[m])
            sm, cm = med("splice", 0), med("copy", 0)
            print(f"{size:>10} {sm:>12.0f} {cm:>10.0f} {sm / cm:>6.2f} {med('splice', 1):>18.3f} {med('copy', 1):>16.3f}")

main()
