#!/usr/bin/env python3
"""What the admin endpoint costs the data path: pingpong with and without it.

Runs `cport stress --mode pingpong` against a fresh server started
(a) without --admin, and (b) with --admin while a poller does what an
open dashboard does: GET /api/live every second, asking only for what is
new. Runs are interleaved (a b b a a b ...) and the medians are printed:
round trips/s, latency p50/p99, and the server's CPU per 1,000 round
trips (read from /proc, so the admin thread and the poller's requests
are included).

usage: scripts/admin-overhead.py [cport] [runs] [-- stress args...]
default stress args: --connections 100 --size 512 --duration 8s
"""
import json, os, socket, statistics, subprocess, sys, tempfile, threading, time, urllib.request

args = sys.argv[1:]
stress_extra = []
if "--" in args:
    i = args.index("--"); stress_extra = args[i + 1:]; args = args[:i]
CPORT = args[0] if len(args) > 0 else "target/release/cport"
RUNS = int(args[1]) if len(args) > 1 else 3
STRESS = stress_extra or ["--connections", "100", "--size", "512", "--duration", "8s"]
HZ = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def wait_port(port, deadline=30):
    start = time.time()
    while time.time() - start < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close(); return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def poller(admin, stop, count):
    seq = {"samples": 0, "events": 0}
    while not stop.wait(1.0):
        url = f"http://127.0.0.1:{admin}/api/live?samples={seq['samples']}&events={seq['events']}"
        with urllib.request.urlopen(url, timeout=5) as r:
            live = json.load(r)
        for k in ("samples", "events"):
            if live[k]:
                seq[k] = max(x["seq"] for x in live[k])
        count[0] += 1


def run(with_admin):
    port = free_port()
    cmd = [CPORT, "server", "--listen", f"127.0.0.1:{port}", "--log", "warn"]
    admin = None
    if with_admin:
        admin = free_port()
        cmd += ["--admin", f"127.0.0.1:{admin}"]
    srv = subprocess.Popen(cmd)
    stop, polls = threading.Event(), [0]
    try:
        wait_port(port)
        t = None
        if admin:
            wait_port(admin)
            t = threading.Thread(target=poller, args=(admin, stop, polls)); t.start()
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        c0 = cpu(srv.pid)
        subprocess.run([CPORT, "stress", "--connect", f"127.0.0.1:{port}", "--mode", "pingpong",
                        "--quiet", "--no-server-stats", "--json", out] + STRESS,
                       check=True, stdout=subprocess.DEVNULL)
        c1 = cpu(srv.pid)
        stop.set()
        if t:
            t.join()
        r = json.load(open(out)); os.unlink(out)
        rt = r["messages"]["received"]
        return {
            "rt_per_s": r["throughput"]["msgs_per_s"],
            "p50_us": r["latency_us"]["p50"],
            "p99_us": r["latency_us"]["p99"],
            "cpu_ms_per_1k": (c1 - c0) * 1e6 / max(rt, 1),
            "polls": polls[0],
        }
    finally:
        stop.set()
        srv.terminate(); srv.wait()


results = {False: [], True: []}
for i in range(RUNS):
    # Alternate which goes first, so neither always runs on a warmer machine.
    for with_admin in ((False, True) if i % 2 == 0 else (True, False)):
        r = run(with_admin)
        results[with_admin].append(r)
        print(f"run {i + 1} {'admin+poller' if with_admin else 'no admin    '}: "
              f"{r['rt_per_s']:.0f} rt/s  p50 {r['p50_us']} us  p99 {r['p99_us']} us  "
              f"server cpu {r['cpu_ms_per_1k']:.1f} ms/1k rt  polls {r['polls']}", flush=True)

print(f"\nmedians of {RUNS} interleaved runs, stress {' '.join(STRESS)}:")
print("| server | round trips/s | p50 µs | p99 µs | server CPU ms per 1k round trips |")
print("|---|---|---|---|---|")
for with_admin in (False, True):
    rs = results[with_admin]
    med = lambda k: statistics.median(x[k] for x in rs)
    name = "--admin, /api/live polled 1/s" if with_admin else "no --admin"
    print(f"| {name} | {med('rt_per_s'):.0f} | {med('p50_us'):.0f} | {med('p99_us'):.0f} | "
          f"{med('cpu_ms_per_1k'):.2f} |")
