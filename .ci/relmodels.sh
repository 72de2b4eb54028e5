#!/usr/bin/env bash
# Reliability models: fuzz smoke run of the frame
# decoder, the integration suite's close/cancel/shutdown/scale subset under
# AddressSanitizer (+ LeakSanitizer), the close/cancel/shutdown subset under
# valgrind memcheck, Miri on the pure parts, loom models of the port.
# Installs its own prerequisites; prints each sub-stage's time.
# What each stage proves and its figures: docs/reliability/models.md.
#
# Knobs (environment): RELMODELS_FUZZ_RUNS (default 30000 per target),
# RELMODELS_ONLY (space-separated sub-stages to run, default all:
# fuzz asan valgrind miri loom). The prerequisites are installed and
# checked whatever RELMODELS_ONLY says.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
HOST=x86_64-unknown-linux-gnu
FUZZ_RUNS=${RELMODELS_FUZZ_RUNS:-30000}
ONLY=${RELMODELS_ONLY:-fuzz asan valgrind miri loom}

sub() {
    local name=$1; shift
    case " $ONLY " in *" $name "*) ;; *) echo "--- relmodels/$name: skipped"; return 0 ;; esac
    local s
    s=$(date +%s)
    echo "--- relmodels/$name"
    "$@"
    echo "--- relmodels/$name: $(( $(date +%s) - s ))s"
}

die() { echo "error: relmodels: $*" >&2; exit 1; }

# The nightly toolchain with miri and rust-src, and valgrind: installed
# through the same functions as the CI's first stage (.ci/prereqs.sh).
prereqs() {
    # shellcheck source=.ci/prereqs.sh
    CPORT_PREREQS_LIB=1 source .ci/prereqs.sh
    command -v valgrind >/dev/null || apt_install valgrind
    install_rust_parts
    rustc +nightly --version
    cargo +nightly miri --version || die "Miri does not run; run: rustup component add --toolchain nightly miri rust-src"
    valgrind --version
}

# 1. Fuzz smoke: the same instrumentation `cargo fuzz build` uses (sancov +
# ASan + debug assertions), built with plain cargo so that CI needs no
# cargo-fuzz install. A fixed number of runs from the kept seed corpus, with
# memory limits; new inputs go to a scratch dir, not into the repo.
fuzz() {
    local flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
    flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
    flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
    flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares"
    flags+=" --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Zsanitizer=address"
    (cd fuzz && RUSTFLAGS="$flags" cargo +nightly build --locked --release \
        --target "$HOST" --bins --target-dir target/plain)
    local bin=fuzz/target/plain/$HOST/release scratch=fuzz/target/scratch
    rm -rf "$scratch"
    mkdir -p fuzz/artifacts
    for t in decode_split roundtrip; do
        mkdir -p "$scratch/$t"
        local rc=0
        "$bin/$t" -runs="$FUZZ_RUNS" -seed=1 -rss_limit_mb=256 -malloc_limit_mb=64 \
            -max_len=4096 -print_final_stats=1 -artifact_prefix=fuzz/artifacts/ \
            "$scratch/$t" "fuzz/corpus/$t" >"$scratch/$t.log" 2>&1 || rc=$?
        grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$t.log" || true
        if [ "$rc" -ne 0 ]; then
            tail -n 60 "$scratch/$t.log"
            die "fuzz target $t failed (exit $rc); the input is in fuzz/artifacts/"
        fi
    done
}

# The close/cancel/shutdown/scale subset of tests/it (filters are ORed).
ASAN_FILTERS=(port:: shutdown:: scale:: engine:: bad_input::)

# 2a. AddressSanitizer, with LeakSanitizer on (see docs for why no
# suppression is needed). The cport binary the tests spawn is built with
# the same flags, so servers under test are checked too. Without the
# cluster feature: none of these tests uses it, and its TLS stack is C.
asan() {
    RUSTFLAGS="-Zsanitizer=address" ASAN_OPTIONS="detect_leaks=1" \
        cargo +nightly test --locked --target "$HOST" --target-dir target/asan \
        --no-default-features --test it -- "${ASAN_FILTERS[@]}"
}

# 2b. valgrind memcheck on the close/cancel/shutdown tests, the test
# binary and the servers it spawns (--trace-children), on the poll
# backend: valgrind 3.19 does not release its thread lock around
# io_uring_enter, so a leader asleep in the kernel stops every other thread
# (see docs). Leaks are LSan's job (2a). The debug build of `cargo test` is
# reused.
VALGRIND_FILTERS=(
    port::cancel_
    port::closing_with_operations_in_flight_thousands_of_times
    shutdown::sigterm_with_no_connections
    shutdown::sigterm_with_half_sent_frames_outstanding
    shutdown::sigterm_with_100_idle_connections
)
valgrind_subset() {
    local exe
    # The integration test binary itself, not the `cport` binary cargo
    # also reports (in whichever order it finishes them).
    exe=$(cargo test --locked --test it --no-run --message-format=json 2>/dev/null |
        grep '"kind":\["test"\]' | grep '"name":"it"' |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    test -x "$exe" || die "cannot find the integration test binary"
    CPORT_TEST_BACKEND=poll valgrind --error-exitcode=99 --trace-children=yes \
        --leak-check=no -q "$exe" --test-threads=1 "${VALGRIND_FILTERS[@]}"
}

# 2c. Miri on the pure parts: the frame codec's unit tests, the poll
# backend's buffer pool (raw-pointer chunk accounting over an mmap) and the
# size/duration units.
# The codec's property tests: generating their inputs is what Miri spends
# its time on (minutes per property on this machine); they run natively in
# `cargo test` and the fuzz targets cover the same ground under ASan.
MIRI_SKIP=(
    --skip garbage_never_panics --skip split_at_every_boundary --skip random_chunks
    --skip merged_in_one_feed --skip round_trip_every_encoder_mixed_feeds
)
miri() {
    MIRIFLAGS="-Zmiri-isolation-error=warn-nobacktrace" \
        cargo +nightly miri test --locked --no-default-features --lib -- frame:: pool:: units:: \
        "${MIRI_SKIP[@]}"
}

# 2d. loom models of the port's waiter stack, concurrency limit and kicks.
# `--cfg loom` goes to this crate only (cargo rustc), so the dependencies
# built by `cargo test` are reused.
loom() {
    local exe
    exe=$(cargo rustc --locked --lib --profile test --features loom \
        --message-format=json -- --cfg loom 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    test -x "$exe" || die "the loom build failed; rerun: cargo rustc --lib --profile test --features loom -- --cfg loom"
    "$exe" --test-threads=1 --nocapture loom_
}

# Not a `sub`: whatever RELMODELS_ONLY selects needs these.
s=$(date +%s)
echo "--- relmodels/prereqs"
prereqs
echo "--- relmodels/prereqs: $(( $(date +%s) - s ))s"
sub fuzz fuzz
sub asan asan
sub valgrind valgrind_subset
sub miri miri
sub loom loom
echo "--- relmodels total: $(( $(date +%s) - T0 ))s"
