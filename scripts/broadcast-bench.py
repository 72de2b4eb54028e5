#!/usr/bin/env python3
"""Broadcast deliveries per second to N clients.

Starts `cport server`, connects N clients (default 1,000), has S of them
send M broadcasts each, and counts the frames every client receives
(reading with epoll). Prints deliveries/s from the first send to the
last delivery, and the server's CPU time.

usage: scripts/broadcast-bench.py [cport] [clients] [senders] [msgs] [body_bytes] [-- server args...]
"""
import os, select, socket, struct, subprocess, sys, time

args = sys.argv[1:]
extra = []
if "--" in args:
    i = args.index("--"); extra = args[i + 1:]; args = args[:i]
CPORT = args[0] if len(args) > 0 else "target/release/cport"
N = int(args[1]) if len(args) > 1 else 1000
S = int(args[2]) if len(args) > 2 else 10
M = int(args[3]) if len(args) > 3 else 100
BODY = int(args[4]) if len(args) > 4 else 64
HZ = os.sysconf("SC_CLK_TCK")
PORT = 9801

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ

srv = subprocess.Popen([CPORT, "server", "--listen", f"127.0.0.1:{PORT}", "--log", "warn"] + extra)
try:
    time.sleep(0.5)
    clients = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(N)]
    time.sleep(1.0)  # let the server register every connection
    frame = 8 + 8 + BODY
    want = S * M * frame
    got = {c.fileno(): 0 for c in clients}
    ep = select.epoll()
    for c in clients:
        c.setblocking(False)
        ep.register(c.fileno(), select.EPOLLIN)
    by_fd = {c.fileno(): c for c in clients}
    msg = struct.pack(">II", BODY, 2) + b"x" * BODY
    c0, t0 = cpu(srv.pid), time.perf_counter()
    for _ in range(M):
        for s in clients[:S]:
            s.setblocking(True); s.sendall(msg); s.setblocking(False)
    done = 0
    deadline = time.time() + 120
    while done < N and time.time() < deadline:
        for fd, _ in ep.poll(1.0):
            try:
                d = by_fd[fd].recv(1 << 20)
            except BlockingIOError:
                continue
            before = got[fd]
            got[fd] += len(d)
            if before < want <= got[fd]:
                done += 1
    wall, used = time.perf_counter() - t0, cpu(srv.pid) - c0
    delivered = sum(min(v, want) for v in got.values()) // frame
    print(f"clients={N} senders={S} msgs/sender={M} body={BODY}B: {delivered} deliveries "
          f"({done}/{N} clients complete) in {wall:.2f}s = {delivered / wall:,.0f} deliveries/s; "
          f"server CPU {used:.2f}s ({used / max(delivered, 1) * 1e6:.2f} us/delivery)")
finally:
    srv.terminate(); srv.wait()
