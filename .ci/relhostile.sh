#!/usr/bin/env bash
# relhostile: hostile clients at full
# scale, tiny io_uring rings, and 100,000 cancellation races, on the
# io_uring and epoll backends (ring limits apply to io_uring only; the
# tests say SKIPPED on poll). Installs what it needs; prints the figures
# measured and how long it took.
#
#   bash .ci/relhostile.sh
#
# The same tests run at a smaller scale in plain `cargo test`:
# 500 + 500 length bombs, 1,000 slowloris (3 rounds), 4,200 flood attempts
# from one process, 10,000 cancellation races, and the mixed attack for 8 s
# instead of 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "error: relhostile: cargo is not on PATH nor in ~/.cargo/bin; install a Rust toolchain (rustup) first" >&2
        exit 1
    fi
fi
# Attackers bind 127.0.0.2-4 (all of 127/8 is loopback on Linux) and the
# tests hold thousands of sockets: raise the soft descriptor limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --test it --no-run

LOG=$(mktemp /tmp/relhostile.XXXXXX)
trap 'rm -f "$LOG"' EXIT
for backend in uring poll; do
    s=$(date +%s)
    echo "=== relhostile: $backend"
    # One test at a time: the latency and CPU figures are not each other's noise.
    CPORT_TEST_BACKEND=$backend CPORT_HOSTILE_FULL=1 CPORT_CANCEL_LOOPS=100000 \
        cargo test --test it -- hostile:: ring_limits:: cancel_race \
        --test-threads 1 --nocapture >"$LOG" 2>&1 || { tail -n 80 "$LOG"; exit 1; }
    # (libtest may print "test NAME ... " on the same line as a figure.)
    grep -oE '\[(hostile|ring_limits)\].*|CANCEL_RACE.*|SKIPPED.*|test result.*' "$LOG" || true
    echo "=== relhostile: $backend: $(( $(date +%s) - s ))s"
done
# The mixed attack: every hostile pattern at once for 30 s beside 20
# verifying honest clients (docs/reliability/hostile.md, "Mixed attack").
for backend in uring poll; do
    s=$(date +%s)
    echo "=== relhostile: mixed attack, $backend"
    rc=0
    CPORT_TEST_BACKEND=$backend CPORT_MIXED_SECS=30 \
        cargo test --test it -- hostile_mixed:: \
        --test-threads 1 --nocapture >"$LOG" 2>&1 || rc=$?
    # The figures line first, pass or fail (on failure it is far from the end).
    grep -oE '\[hostile_mixed\].*|worker_stalls: not reported.*|test result.*' "$LOG" || true
    if [ "$rc" -ne 0 ]; then
        grep -A 40 'failed assertion' "$LOG" | head -n 60 || true
        tail -n 80 "$LOG"
        exit 1
    fi
    echo "=== relhostile: mixed attack, $backend: $(( $(date +%s) - s ))s"
done
echo "=== relhostile total: $(( $(date +%s) - T0 ))s"
