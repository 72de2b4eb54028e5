#!/usr/bin/env bash
# CI stage `bench`: builds the workspace (cport and the peer servers of
# bench/) and runs a `cport bench --quick` smoke: tokio, the hand-written
# io_uring loop and cport, one round, short windows; then checks that the
# table, the JSON and the SVG chart are there and make sense. Debug
# binaries: this checks that the bench works, not how fast anything is.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)

if ! command -v python3 >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq python3) >/dev/null
fi

cargo build --workspace --bins
BIN=target/debug
test -x "$BIN/cport-peer" || { echo "bench: cport-peer was not built"; exit 1; }

OUT=$(mktemp -d "${TMPDIR:-/tmp}/cport-bench-ci.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

# io_uring may be blocked where CI runs (seccomp): then the uring servers
# cannot start, and the smoke runs the epoll ones instead.
SERVERS=tokio-mt,tokio-ct,threads,uring-ref,cport-raw,cport-framed
"$BIN/cport" server --backend uring --listen 127.0.0.1:0 --log error >"$OUT/probe.log" 2>&1 &
PROBE=$!
sleep 1
if kill -0 "$PROBE" 2>/dev/null; then
    kill "$PROBE"; wait "$PROBE" 2>/dev/null || true
else
    echo "bench: io_uring unavailable here ($(tail -1 "$OUT/probe.log")); smoke on epoll"
    SERVERS=tokio-mt,threads,cport-raw-poll,cport-framed-poll
fi

"$BIN/cport" bench --quick --servers "$SERVERS" \
    --json "$OUT/bench.json" --chart "$OUT/bench.svg" | tee "$OUT/table.md"

python3 - "$OUT" "$SERVERS" <<'PY'
import json, sys
out, servers = sys.argv[1], sys.argv[2].split(",")
r = json.load(open(f"{out}/bench.json"))
table = open(f"{out}/table.md").read()
svg = open(f"{out}/bench.svg").read()
assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>"), "chart is not an SVG"
assert "NaN" not in svg, "NaN in the chart"
assert [s["name"] for s in r["servers"]] == servers, r["servers"]
assert len(r["rows"]) == len(servers) * len(r["loads"]), "missing rows"
bad = [m for m in r["measurements"] if m["errors"]]
assert not bad, f"measurements with errors: {bad}"
for row in r["rows"]:
    assert f"| {row['load']} | {row['server']} |" in table, f"row not in the table: {row}"
    med = row["median"]
    if row["load"].startswith("idle"):
        assert med["rss_per_conn"] is not None, row
    else:
        assert med["req_per_s"] and med["req_per_s"] > 0, row
        assert med["cpu_us_per_req"] and med["cpu_us_per_req"] > 0, row
print(f"bench smoke: {len(r['measurements'])} measurements of {len(servers)} servers, all clean")
PY
echo "bench: $(( $(date +%s) - T0 ))s"
