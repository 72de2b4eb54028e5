#!/usr/bin/env bash
# Windows CI: builds cport for x86_64-pc-windows-gnu, lints it, and runs the
# Windows suite (tests/win) and a smoke test of the real cport.exe under
# Wine, on the IOCP backend. Installs what it needs (apt-get, rustup);
# idempotent; prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
TARGET=x86_64-pc-windows-gnu
OUT=target/$TARGET/debug
# No debug info: the cross build and its link are much quicker without it,
# and panics still name the test and the assertion.
export CARGO_PROFILE_DEV_DEBUG=0
step() {
    local name=$1; shift
    local s=$(date +%s)
    echo "--- win: $name"
    "$@"
    echo "--- win: $name: $(( $(date +%s) - s ))s"
}

find_wine() {
    command -v wine64 || { [ -x /usr/lib/wine/wine64 ] && echo /usr/lib/wine/wine64; } || command -v wine || true
}

prerequisites() {
    local pkgs=()
    [ -n "$(find_wine)" ] || pkgs+=(wine64)
    command -v x86_64-w64-mingw32-gcc >/dev/null || pkgs+=(gcc-mingw-w64-x86-64)
    if [ ${#pkgs[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
        # A fresh machine may have no package lists yet.
        "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" >/dev/null \
            || { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
    fi
    rustup target add "$TARGET" >/dev/null 2>&1 || rustup target add "$TARGET"
    rustup component add clippy >/dev/null 2>&1 || true
    echo "wine: $(find_wine) ($("$(find_wine)" --version 2>/dev/null || echo '?'))"
}

# Wine 8.0 has no bcryptprimitives.dll, whose ProcessPrng Rust's std
# imports: put a small one beside every .exe we run (see the C file).
shim() {
    mkdir -p "$OUT/deps"
    x86_64-w64-mingw32-gcc -shared -O2 -o "$OUT/bcryptprimitives.dll" \
        .ci/wine/processprng.c -ladvapi32
    cp "$OUT/bcryptprimitives.dll" "$OUT/deps/"
}

WINE=""
wine_env() {
    WINE=$(find_wine)
    export WINEPREFIX="$PWD/target/$TARGET/wine-prefix"
    export WINEDEBUG=-all
    # No Mono/Gecko install dialogs: console programs need neither.
    export WINEDLLOVERRIDES="mscoree,mshtml="
    export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$WINE"
    # Create the prefix once (the first start of Wine takes a while).
    "$WINE" "$OUT/cport.exe" --version
}

wine_tests() {
    cargo test --target "$TARGET" --test win -- --test-threads 2 --nocapture
}

# The real binary: a server on IOCP, the client CLI against it (ConnectEx
# on its own port), then Ctrl-C (Wine turns SIGINT into CTRL_C_EVENT) and
# the final summary must show nothing outstanding.
smoke() {
    local log=target/$TARGET/smoke-server.log
    "$WINE" "$OUT/cport.exe" server --listen 127.0.0.1:0 --log info >"$log" 2>&1 &
    local launcher=$! addr="" i
    for i in $(seq 1 300); do
        addr=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$log" | head -1 | sed 's/listening on //' || true)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "server did not start:"; cat "$log"; kill "$launcher" 2>/dev/null || true; return 1
    fi
    grep -q 'backend iocp' "$log" || { echo "server not on iocp:"; cat "$log"; return 1; }
    timeout 120 "$WINE" "$OUT/cport.exe" client --connect "$addr" --message hi \
        --count 3 --interval 50ms --connections 50 --quiet
    # Wine runs the program as a child of the launcher: signal that one.
    local pid
    pid=$(pgrep -P "$launcher" | head -1 || true)
    kill -INT "${pid:-$launcher}"
    for i in $(seq 1 300); do
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$launcher" 2>/dev/null; then
        echo "server did not exit after Ctrl-C:"; cat "$log"; kill -KILL "${pid:-$launcher}" "$launcher" 2>/dev/null || true; return 1
    fi
    wait "$launcher" || { echo "server exited with $?:"; cat "$log"; return 1; }
    grep 'final summary' "$log"
    grep -q 'outstanding_ops=0 outstanding_bufs=0 connections_left=0' "$log" \
        || { echo "server left work outstanding:"; cat "$log"; return 1; }
    grep -q 'connections_served=50' "$log" \
        || { echo "server did not serve the 50 client connections:"; cat "$log"; return 1; }
}

step prerequisites prerequisites
step clippy cargo clippy --target "$TARGET" --all-targets -- -D warnings
step build cargo build --target "$TARGET" --bin cport --test win
step shim shim
step wine-prefix wine_env
step wine-tests wine_tests
step wine-smoke smoke
echo "--- win: total: $(( $(date +%s) - T0 ))s"
