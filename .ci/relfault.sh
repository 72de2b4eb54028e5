#!/usr/bin/env bash
# Reliability under faults, on both backends:
#   - the 1-minute soak (tests/it/soak.rs),
#   - 5 SIGTERMs under load, 10,000 connections each (tests/it/shutdown_load.rs).
# Long variants (not run here):
#   CPORT_SOAK_SECS=600 cargo test --test it soak -- --ignored --nocapture
#   CPORT_SHUTDOWN_RUNS=50 cargo test --test it shutdown_under_load -- --ignored --nocapture
# CPORT_BIN=/path/to/cport runs the same tests against another server build
# (e.g. AddressSanitizer). See docs/reliability/faults.md.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)

# Prerequisites: iproute2 (ip, tc) for the namespace tests.
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    if command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
    fi
fi
if ! grep -q sch_tbf /proc/modules 2>/dev/null; then
    modprobe sch_tbf 2>/dev/null || true # built in, or the tests say SKIPPED
fi

SOAK_SECS=${CPORT_SOAK_SECS:-60}
RUNS=${CPORT_SHUTDOWN_RUNS:-5}

cargo build --tests --quiet

# run NAME LOG PATTERN CMD...: runs CMD with its output in LOG, prints the
# lines matching PATTERN (the figures), and on failure the end of LOG.
run() {
    local name=$1 log=$2 pattern=$3; shift 3
    local s=$(date +%s)
    echo "--- $name"
    if "$@" >"$log" 2>&1; then
        grep -E "$pattern" "$log" || true
        echo "--- $name: $(( $(date +%s) - s ))s"
    else
        tail -n 80 "$log"
        echo "--- $name: FAILED after $(( $(date +%s) - s ))s (full log: $log)"
        exit 1
    fi
}

# The fault-injection tests (tests/it/fault.rs) run in the default
# `cargo test` and in the poll pass of .ci/run; RELFAULT_FAULT=1 runs them
# here too, per backend, with their figures.
for backend in uring poll; do
    if [ "${RELFAULT_FAULT:-0}" = 1 ]; then
        run "fault injection ($backend)" "/tmp/relfault-fault-$backend.log" '^\[fault\]|SKIPPED' \
            env CPORT_TEST_BACKEND=$backend cargo test --quiet --test it fault:: -- --nocapture
    fi
    run "soak ${SOAK_SECS}s ($backend)" "/tmp/relfault-soak-$backend.log" '^\[soak\] RESULT' \
        env CPORT_SOAK_SECS=$SOAK_SECS CPORT_TEST_BACKEND=$backend \
        cargo test --quiet --test it soak -- --ignored --nocapture
    run "shutdown under load x $RUNS ($backend)" "/tmp/relfault-shutdown-$backend.log" '^\[shutdown\]' \
        env CPORT_SHUTDOWN_RUNS=$RUNS CPORT_TEST_BACKEND=$backend \
        cargo test --quiet --test it shutdown_under_load -- --ignored --nocapture
done

echo "relfault: $(( $(date +%s) - T0 ))s"
