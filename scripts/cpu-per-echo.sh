#!/usr/bin/env bash
# Server CPU per echo, split into user and system time, for any echo server.
#
# usage: scripts/cpu-per-echo.sh NAME -- SERVER COMMAND WITH PORT IN IT
#   e.g. scripts/cpu-per-echo.sh base -- /tmp/cport-old server --protocol raw --listen 127.0.0.1:PORT
# Starts the server (PORT is replaced by a free-ish port), runs
# `cport stress --raw --mode pingpong` against it (C connections, default
# 100, 512 B, DUR default 5s), and prints the server's user and system
# time over the run divided by the echoes. Run several servers in turn,
# several rounds, and compare medians (docs/PERFORMANCE.md).
set -euo pipefail
NAME=$1; shift; shift
B=${CPORT:-target/release/cport}
P=$((20000 + RANDOM % 20000))
CMD="${*//PORT/$P}"
$CMD >/dev/null 2>&1 &
S=$!
trap 'kill -9 $S 2>/dev/null || true' EXIT
for _ in $(seq 100); do ss -ltn | grep -q ":$P " && break; sleep 0.1; done
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$S/stat)
OUT=$($B stress --raw --connect 127.0.0.1:$P --mode pingpong --connections "${C:-100}" \
    --size 512 --duration "${DUR:-5s}" --quiet --no-server-stats 2>&1)
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$S/stat)
REQ=$(echo "$OUT" | grep -oP '\(\K[0-9]+(?= samples)')
N=$(echo "$OUT" | grep -oP 'throughput\s+\K[0-9]+')
awk -v name="$NAME" -v n="$N" -v r="$REQ" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" \
    'BEGIN{printf "%-14s echoes/s=%7d user=%.2fus sys=%.2fus total=%.2fus per echo\n", name, n, u*1e6/hz/r, s*1e6/hz/r, (u+s)*1e6/hz/r}'
