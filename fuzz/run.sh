#!/usr/bin/env bash
# Builds every fuzz target (cargo-fuzz, with the nightly) and runs each for a bounded
# time: `bash fuzz/run.sh [seconds]` (default 30 a target; tests/run.sh calls it with
# $KGW_FUZZ_SECONDS). Each run starts from the committed corpus (corpus/<target>, read
# only) plus what earlier runs here found (target/corpus/<target>). Exits non-zero if any
# target found a crash: the input is in artifacts/<target>/, `cargo +nightly fuzz run
# <target> <file>` replays it.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-30}"
targets=(sse_framing ndjson_framing request_policy response_filter policy_loader usage_extraction)

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

# The targets never load the eBPF programs: the loader compiles without them (one build
# fewer, and no nested nightly cargo under the sanitizer's flags).
export AYA_BUILD_SKIP=1
# A failed build's cause, not a backtrace of cargo-fuzz's own error, ends the log.
export RUST_BACKTRACE=0

start=$(date +%s)
mkdir -p target
if ! cargo +nightly fuzz build >target/build.log 2>&1; then
    grep -E -A12 '^(error|warning: [^ ]*: *error)' target/build.log | head -80 >&2 || true
    tail -15 target/build.log >&2
    df -h . >&2
    echo "fuzz: the build failed (log: fuzz/target/build.log)" >&2
    exit 1
fi
echo "fuzz: built in $(($(date +%s) - start)) s; $seconds s a target"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t"
    dict=()
    [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
    log="target/corpus/$t.log"
    if cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
        echo "fuzz: $t: ${runs:-?} runs, $cov"
    else
        tail -40 "$log" >&2
        echo "fuzz: $t FAILED (log: fuzz/$log; input: fuzz/artifacts/$t/)" >&2
        failed+=("$t")
    fi
done
echo "fuzz: done in $(($(date +%s) - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}" >&2
    exit 1
fi
