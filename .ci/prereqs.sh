#!/usr/bin/env bash
# The first stage of CI: installs every tool a later stage needs and checks
# that each one works, so a machine that lacks one fails here, in the first
# minutes, with one line naming what is missing and how to get it, instead
# of after twenty minutes of tests.
#
#   bash .ci/prereqs.sh            # install what is missing, then check
#   bash .ci/prereqs.sh --check    # check only; install nothing
#
# Each stage script also installs what it needs itself (so it runs alone),
# through the same functions: source this file with CPORT_PREREQS_LIB=1.
#
# What is needed, and by whom:
#   rustfmt, clippy (stable)               fmt, clippy
#   nightly + miri + rust-src              relmodels (fuzz, ASan, Miri)
#   valgrind                               relmodels
#   x86_64-pc-windows-gnu target, mingw    win (cross build, the Wine shim)
#   wine64                                 win (runs the Windows suite)
#   chromium, fonts, python3               admin (dashboard in a browser)
#   python3                                bench (checks the smoke's output)
#   iproute2 (ip, tc)                      relfault (namespace tests)
#   nats-server                            cluster tests
#   openssl                                TLS tests (certificates, s_client)
set -euo pipefail

WIN_TARGET=x86_64-pc-windows-gnu

prereq_die() {
    echo "error: prerequisites: $*" >&2
    exit 1
}

# apt_install PKG...: installs Debian packages, updating the package lists
# first when they are missing or stale (a fresh machine has none).
apt_install() {
    command -v apt-get >/dev/null ||
        prereq_die "apt-get is not available to install: $*; install them by hand"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
    echo "installing: $*"
    if ! "${apt[@]}" install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        "${apt[@]}" update >/dev/null ||
            prereq_die "apt-get update failed; cannot install: $*"
        "${apt[@]}" install -y --no-install-recommends "$@" >/dev/null ||
            prereq_die "apt-get could not install: $*"
    fi
}

find_wine() {
    command -v wine64 || { [ -x /usr/lib/wine/wine64 ] && echo /usr/lib/wine/wine64; } ||
        command -v wine || true
}

# The Debian packages whose command is missing.
missing_packages() {
    local pkgs=()
    command -v valgrind >/dev/null || pkgs+=(valgrind)
    [ -n "$(find_wine)" ] || pkgs+=(wine64)
    command -v x86_64-w64-mingw32-gcc >/dev/null || pkgs+=(gcc-mingw-w64-x86-64)
    command -v chromium >/dev/null || pkgs+=(chromium)
    [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || pkgs+=(fonts-dejavu-core)
    command -v python3 >/dev/null || pkgs+=(python3)
    { command -v ip >/dev/null && command -v tc >/dev/null; } || pkgs+=(iproute2)
    command -v nats-server >/dev/null || pkgs+=(nats-server)
    command -v openssl >/dev/null || pkgs+=(openssl)
    echo "${pkgs[@]}"
}

install_rust_parts() {
    command -v rustup >/dev/null ||
        prereq_die "rustup is not installed; CI needs it to add the nightly toolchain, Miri and the Windows target"
    rustup component add rustfmt clippy >/dev/null 2>&1 ||
        prereq_die "cannot add rustfmt and clippy to the stable toolchain; run: rustup component add rustfmt clippy"
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "installing: the nightly toolchain"
        rustup toolchain install nightly --profile minimal >/dev/null ||
            prereq_die "cannot install the nightly toolchain (needed for -Zsanitizer, Miri and libFuzzer); run: rustup toolchain install nightly --profile minimal"
    fi
    if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^miri' ||
        ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
        echo "installing: miri and rust-src for nightly"
        rustup component add --toolchain nightly miri rust-src >/dev/null ||
            prereq_die "cannot add miri and rust-src to nightly; run: rustup component add --toolchain nightly miri rust-src"
    fi
    if ! rustup target list --installed 2>/dev/null | grep -qx "$WIN_TARGET"; then
        echo "installing: the $WIN_TARGET target"
        rustup target add "$WIN_TARGET" >/dev/null ||
            prereq_die "cannot add the $WIN_TARGET target; run: rustup target add $WIN_TARGET"
    fi
}

# check: every tool runs. Prints one line per tool; the first one missing
# ends the script with what to do.
check_all() {
    local wine
    cargo --version
    cargo fmt --version >/dev/null 2>&1 || prereq_die "rustfmt is missing; run: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || prereq_die "clippy is missing; run: rustup component add clippy"
    rustc +nightly --version >/dev/null 2>&1 ||
        prereq_die "the nightly toolchain is missing; run: rustup toolchain install nightly --profile minimal"
    echo "nightly: $(rustc +nightly --version)"
    cargo +nightly miri --version >/dev/null 2>&1 ||
        prereq_die "Miri is missing from nightly; run: rustup component add --toolchain nightly miri rust-src"
    rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' ||
        prereq_die "rust-src is missing from nightly; run: rustup component add --toolchain nightly rust-src"
    echo "miri: $(cargo +nightly miri --version 2>/dev/null)"
    rustup target list --installed 2>/dev/null | grep -qx "$WIN_TARGET" ||
        prereq_die "the $WIN_TARGET target is missing; run: rustup target add $WIN_TARGET"
    command -v valgrind >/dev/null || prereq_die "valgrind is missing; run: apt-get install valgrind"
    echo "valgrind: $(valgrind --version)"
    command -v x86_64-w64-mingw32-gcc >/dev/null ||
        prereq_die "the mingw cross compiler is missing; run: apt-get install gcc-mingw-w64-x86-64"
    wine=$(find_wine)
    [ -n "$wine" ] || prereq_die "Wine is missing; run: apt-get install wine64"
    echo "wine: $wine"
    command -v chromium >/dev/null || prereq_die "chromium is missing; run: apt-get install chromium"
    echo "chromium: $(chromium --version 2>/dev/null || echo present)"
    command -v python3 >/dev/null || prereq_die "python3 is missing; run: apt-get install python3"
    { command -v ip >/dev/null && command -v tc >/dev/null; } ||
        prereq_die "ip or tc is missing; run: apt-get install iproute2"
    command -v nats-server >/dev/null || prereq_die "nats-server is missing; run: apt-get install nats-server"
    echo "nats-server: $(nats-server --version 2>/dev/null)"
    command -v openssl >/dev/null || prereq_die "openssl is missing; run: apt-get install openssl"
    echo "openssl: $(openssl version)"
}

if [ "${CPORT_PREREQS_LIB:-0}" != 1 ]; then
    if [ "${1:-}" != "--check" ]; then
        pkgs=$(missing_packages)
        # shellcheck disable=SC2086
        [ -z "$pkgs" ] || apt_install $pkgs
        install_rust_parts
    fi
    check_all
    echo "prerequisites: all present"
fi
