#!/usr/bin/env python3
"""Browser test of the admin dashboard, run by .ci/admin.sh.

Starts `cport server --admin`, loads it with `cport stress`, holds one
connection of its own from 127.0.0.77 (so the test knows the peer address
to look for), then opens the dashboard in headless Chromium and checks,
from the DOM Chromium dumps after running the page's scripts, that

- every chart drew live, non-zero data (each <figure data-chart> carries
  the number of points it drew and their maximum, set by the drawing code);
- the event log lists the test's own connection;
- the page keeps polling: a second load a few seconds later shows newer
  samples, about one a second.

It saves a screenshot to OUT/dashboard.png. Chromium runs headless with a
fresh profile and without background networking (without those flags it
hangs on refused connections); `--virtual-time-budget` lets the page's
timers run, and network waits pause virtual time, so every poll is a
real request to the server.

Exit code 0 on success, 1 on a failed check (with what was seen), 2 when
something needed is missing.
"""

import argparse
import html.parser
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

DEADLINE = 60.0
MARKER_SOURCE = "127.0.0.77"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1400,1000",
]


def log(msg):
    print(f"[browser] {msg}", flush=True)


def fail(msg):
    log(f"FAIL: {msg}")
    sys.exit(1)


def wait_for(what, cond, deadline=DEADLINE, step=0.1):
    start = time.monotonic()
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() - start > deadline:
            fail(f"timed out after {deadline:.0f}s waiting for {what}")
        time.sleep(step)


def http_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


class Dom(html.parser.HTMLParser):
    """Collects the charts' data attributes and the event log entries."""

    def __init__(self):
        super().__init__()
        self.charts = {}
        self.events = []
        self.body = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "figure" and "data-chart" in a:
            self.charts[a["data-chart"]] = a
        elif tag == "li" and "data-kind" in a:
            self.events.append(a)


def chromium(binary, url, profile, *extra, timeout=90):
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        fail(f"chromium exited with {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def load_dom(binary, url, profile, budget_ms):
    out = chromium(binary, url, profile, f"--virtual-time-budget={budget_ms}", "--dump-dom")
    dom = Dom()
    dom.feed(out)
    if not dom.charts:
        fail(f"the dumped page has no charts:\n{out[:3000]}")
    return dom


def marker_connection(addr):
    """A connection from MARKER_SOURCE that echoes one frame and stays open."""
    host, port = addr.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((MARKER_SOURCE, 0))
    s.settimeout(10)
    s.connect((host, int(port)))
    body = b"browser-test marker"
    s.sendall(struct.pack(">II", len(body), 1) + body)
    got = b""
    while len(got) < 8 + len(body):
        chunk = s.recv(4096)
        if not chunk:
            fail("the server closed the marker connection")
        got += chunk
    if got[8:] != body:
        fail(f"marker echo came back as {got!r}")
    return s, "%s:%d" % s.getsockname()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cport", default="target/release/cport")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    p.add_argument("--out", default="target/ci-artifacts")
    p.add_argument("--connections", type=int, default=200)
    args = p.parse_args()
    for exe in (args.cport, args.chromium):
        if not (os.path.exists(exe) or shutil.which(exe)):
            log(f"missing: {exe}")
            sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="cport-browser-")
    procs = []
    marker = None
    try:
        server_log = open(os.path.join(work, "server.log"), "w+")
        server = subprocess.Popen(
            [args.cport, "server", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--log", "info"],
            stdout=subprocess.DEVNULL, stderr=server_log, env={**os.environ, "NO_COLOR": "1"})
        procs.append(server)

        def addrs():
            text = open(server_log.name).read()
            listen = re.search(r"listening on (\S+)", text)
            admin = re.search(r"admin endpoint on http://([^/\s]+)/", text)
            if server.poll() is not None:
                fail(f"server exited with {server.returncode}:\n{text}")
            return listen and admin and (listen.group(1), admin.group(1))

        listen, admin = wait_for("the server's listen and admin addresses", addrs)
        base = f"http://{admin}"
        log(f"server on {listen}, dashboard on {base}/")

        marker, marker_addr = marker_connection(listen)
        log(f"marker connection from {marker_addr}")

        stress = subprocess.Popen(
            [args.cport, "stress", "--connect", listen, "--connections", str(args.connections),
             "--mode", "pingpong", "--size", "256", "--duration", "40s", "--ramp", "100"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "stress.log"), "w"))
        procs.append(stress)

        def loaded():
            live = http_json(f"{base}/api/live?samples=0&events=0")
            busy = [s for s in live["samples"] if s["msgs_in_per_s"] > 0]
            return len(busy) >= 3 and live["stats"]["connections_open"] >= args.connections // 2
        wait_for("three samples under load", loaded)

        profile = os.path.join(work, "profile")
        dom = load_dom(args.chromium, f"{base}/", profile, 5000)
        first_sample = int(dom.body.get("data-last-sample", "0"))
        polls = int(dom.body.get("data-polls", "0"))
        log(f"first load: {polls} polls, last sample {first_sample}, "
            f"{len(dom.events)} events in the log")
        for cid, c in sorted(dom.charts.items()):
            log(f"  chart {cid}: points={c.get('data-points')} max={c.get('data-max')} "
                f"last={c.get('data-last')}")
        if polls < 2:
            fail(f"the page polled {polls} time(s) in 5 s of its time")
        for cid in ["connections", "accepts", "messages", "bytes", "cpu", "rss", "latency"]:
            c = dom.charts.get(cid)
            if c is None:
                fail(f"no chart {cid}")
            if int(c.get("data-points", "0")) < 3:
                fail(f"chart {cid} drew {c.get('data-points')} points")
            if not float(c.get("data-max") or 0) > 0:
                fail(f"chart {cid} shows no non-zero data: {c}")
        if float(dom.charts["connections"]["data-max"]) < args.connections // 2:
            fail(f"connections chart peaks at {dom.charts['connections']['data-max']}")
        mine = [e for e in dom.events
                if e.get("data-kind") == "connect" and e.get("data-peer") == marker_addr]
        if not mine:
            peers = sorted({e.get("data-peer") for e in dom.events})[:20]
            fail(f"the event log does not list {marker_addr}; it has {peers}")
        log(f"event log lists the test's connection {marker_addr}")

        # Live: a later load shows newer samples, about one a second.
        t0 = time.monotonic()
        time.sleep(3)
        dom2 = load_dom(args.chromium, f"{base}/", profile, 3000)
        second_sample = int(dom2.body.get("data-last-sample", "0"))
        elapsed = time.monotonic() - t0
        log(f"second load {elapsed:.1f}s later: last sample {second_sample}")
        if second_sample - first_sample < 2:
            fail(f"samples went from {first_sample} to {second_sample} in {elapsed:.1f}s")
        if not float(dom2.charts["messages"].get("data-last") or 0) > 0:
            fail(f"messages/s is not live: {dom2.charts['messages']}")

        shot = os.path.join(args.out, "dashboard.png")
        if os.path.exists(shot):
            os.remove(shot)
        chromium(args.chromium, f"{base}/", profile, "--virtual-time-budget=4000",
                 f"--screenshot={os.path.abspath(shot)}")
        size = os.path.getsize(shot) if os.path.exists(shot) else 0
        if size < 10_000:
            fail(f"screenshot {shot} is {size} bytes")
        with open(shot, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                fail(f"{shot} is not a PNG")
        log(f"screenshot saved: {shot} ({size} bytes)")
        log("PASS")
    finally:
        if marker is not None:
            marker.close()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
