#!/usr/bin/env python3
"""Server RSS per idle connection: RSS with N idle connections minus RSS
with none, divided by N. Starts `cport server` with the given extra args.

usage: scripts/idle-rss.py [cport] [connections] [-- server args...]
"""
import os, resource, socket, struct, subprocess, sys, time

args = sys.argv[1:]
extra = []
if "--" in args:
    i = args.index("--"); extra = args[i + 1:]; args = args[:i]
CPORT = args[0] if args else "target/release/cport"
N = int(args[1]) if len(args) > 1 else 5000
PORT = 9870
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))

def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) * 1024

srv = subprocess.Popen([CPORT, "server", "--listen", f"127.0.0.1:{PORT}", "--log", "warn"] + extra)
try:
    time.sleep(0.5)
    # One echo first, so lazily initialised paths are not counted.
    s = socket.create_connection(("127.0.0.1", PORT))
    s.sendall(struct.pack(">II", 3, 1) + b"abc"); s.recv(100); s.close()
    time.sleep(0.5)
    base = rss(srv.pid)
    conns = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(N)]
    time.sleep(1.0)
    full = rss(srv.pid)
    print(f"args={' '.join(extra) or '(default)'}: RSS {base / 2**20:.1f} MiB with none, "
          f"{full / 2**20:.1f} MiB with {N} idle: {(full - base) / N:.0f} B per connection")
    for c in conns:
        c.close()
finally:
    srv.terminate(); srv.wait()
