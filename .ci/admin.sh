#!/usr/bin/env bash
# CI stage of the admin endpoint: the dashboard in a real
# headless browser. Installs Debian's chromium (and python3, fonts) if
# missing, builds the release binary, and runs tests/browser/dashboard_test.py,
# which loads a server with `cport stress`, opens the dashboard and checks
# its charts and event log. The screenshot is left in target/ci-artifacts/.
# The /metrics parser test is part of `cargo test` (tests/it/admin.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "prerequisites: $(( $(date +%s) - T0 ))s"

T1=$(date +%s)
cargo build --release --bin cport
echo "release build: $(( $(date +%s) - T1 ))s"

T2=$(date +%s)
python3 tests/browser/dashboard_test.py --cport target/release/cport --out target/ci-artifacts
echo "browser test: $(( $(date +%s) - T2 ))s"
echo "admin stage: $(( $(date +%s) - T0 ))s"
