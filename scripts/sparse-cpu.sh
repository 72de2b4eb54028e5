#!/usr/bin/env bash
# Server CPU under sparse traffic: many connections, each echoing one small
# message now and then (the seeds' 30,000-connection scenario, steady part).
#
# usage: scripts/sparse-cpu.sh NAME -- SERVER COMMAND WITH PORT IN IT
#   e.g. scripts/sparse-cpu.sh cport -- target/release/cport server --protocol raw --listen 127.0.0.1:PORT
#        scripts/sparse-cpu.sh tokio -- target/release/cport-peer tokio-mt --listen 127.0.0.1:PORT
# Starts the server, runs `cport stress --raw --mode interval` against it
# (C connections, default 15000, ramped at 1,000/s, each sending M messages,
# default 25, every IV, default 1.5s: 10,000 messages/s once all are open),
# samples the server's CPU once a second, and prints its CPU over the window
# where every connection is open and sending (ramp end + 2 s until the first
# connections finish). The ramp is left out: it measures TCP set-up, not
# the steady state. Run several servers in turn, several rounds, and compare
# medians (docs/PERFORMANCE.md).
set -euo pipefail
NAME=$1; shift; shift
B=${CPORT:-target/release/cport}
C=${C:-15000} M=${M:-25} IV=${IV:-1.5}
P=$((20000 + RANDOM % 20000))
CMD="${*//PORT/$P}"
$CMD >/dev/null 2>&1 &
S=$!
SAMPLES=$(mktemp)
trap 'kill -9 $S 2>/dev/null || true; rm -f "$SAMPLES"' EXIT
for _ in $(seq 100); do ss -ltn | grep -q ":$P " && break; sleep 0.1; done
(while kill -0 "$S" 2>/dev/null; do
    read -r u s < <(awk '{print $14, $15}' "/proc/$S/stat")
    echo "$(date +%s.%N) $u $s"
    sleep 1
done) >"$SAMPLES" 2>/dev/null &
T0=$(date +%s.%N)
OUT=$($B stress --raw --connect 127.0.0.1:$P --mode interval --connections "$C" \
    --messages "$M" --interval "${IV}s" --ramp 1000 --quiet --no-server-stats 2>&1)
echo "$OUT" | grep -q "result *ok" || { echo "$NAME: the stress run failed:"; echo "$OUT"; exit 1; }
awk -v name="$NAME" -v t0="$T0" -v c="$C" -v m="$M" -v iv="$IV" -v hz="$(getconf CLK_TCK)" '
    { t = $1 - t0; if (t >= c / 1000 + 2 && t <= iv * m - 2) { if (!n++) { a = $0 } ; b = $0 } }
    END {
        if (n < 2) { print name ": no samples in the steady window"; exit 1 }
        split(a, x); split(b, y); dt = y[1] - x[1]; rate = c / iv
        u = (y[2] - x[2]) / hz; s = (y[3] - x[3]) / hz
        printf "%-12s %d conns, %d msg/s, %.0f s window: server CPU %.1f%% of a core (user %.1f%%, sys %.1f%%), %.1f us/msg\n",
            name, c, rate, dt, 100 * (u + s) / dt, 100 * u / dt, 100 * s / dt, 1e6 * (u + s) / dt / rate
    }' "$SAMPLES"
