#!/usr/bin/env bash
# Memory and time under hostile answers (issue 17's measurements), on the release build:
#   idle RSS; one 64 MB SSE event and one 64 MB NDJSON line (peak and after);
#   a 20 MB one-word answer without usage (peak, and how late the records of 100
#   ordinary requests behind it are logged); 1,000 keep-alive connections idle after a
#   request each (with all open, and after they close); 200 live streams at once.
# Peaks are VmHWM, reset before each step (/proc/PID/clear_refs). KGW_BIN: another
# kube-gateway binary to measure (e.g. an older build), default the release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
MB=${MB:-64}
WORD_MB=${WORD_MB:-20}
if [ -z "${KGW_BIN:-}" ]; then
    build_bins release
    KGW_BIN=$bin/kube-gateway
fi
start_work
py=gateway/benches/hostile.py
python3 "$py" upstream 18401 & pids+=($!)
RUST_LOG=info ${KGW_ENV:-} "$KGW_BIN" --log-format json run --listen 127.0.0.1:18400 --upstream 127.0.0.1:18401 \
    --store "sqlite://$work/usage.db" --spool "$work/spool" >"$work/log" 2>&1 & gw=$!
pids+=("$gw")
wait_ports 18401 18400
sleep 2

kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$gw/status"; }
mib() { echo "$(( $(kib "$1") / 1024 ))"; }
reset_peak() { echo 5 >"/proc/$gw/clear_refs"; }
after() { sleep "${SETTLE:-3}"; echo "$(mib VmRSS)"; }
printf '%-44s %10s %10s\n' "step" "peak MiB" "after MiB"
printf '%-44s %10s %10s\n' "idle" "-" "$(mib VmRSS)"
step() { # label path model
    reset_peak
    python3 "$py" get 18400 "$2" "$3" >"$work/out"
    printf '%-44s %10s %10s   %s\n' "$1" "$(mib VmHWM)" "$(after)" "$(cat "$work/out")"
}
step "one ${MB} MB SSE event" /v1/chat/completions "sseline-$MB"
step "one ${MB} MB NDJSON line" /api/chat "ndjsonline-$MB"
# An ordinary answer without usage first: it builds the tokenizer (its tables stay, a
# one-time cost), so the next step shows what the one-word answer itself costs.
step "a small answer without usage (tokenizer built)" /v1/chat/completions "oneword-0.05"
reset_peak
python3 "$py" behind 18400 "oneword-$WORD_MB" 100 "$work/log" >"$work/out"
printf '%-44s %10s %10s\n' "${WORD_MB} MB one-word answer, no usage, +100" "$(mib VmHWM)" "$(after)"
echo "    $(cat "$work/out")"
reset_peak
python3 "$py" idle 18400 1000 4 &
burst=$!
sleep 3
during=$(mib VmRSS)
wait "$burst"
printf '%-44s %10s %10s   (RSS with all open: %s MiB)\n' "1,000 idle keep-alive connections" "$(mib VmHWM)" "$(after)" "$during"
sleep 2
reset_peak
python3 "$py" streams 18400 200 8 &
streaming=$!
sleep 5
during=$(mib VmRSS)
wait "$streaming"
printf '%-44s %10s %10s   (RSS with all flowing: %s MiB)\n' "200 live streams at once" "$(mib VmHWM)" "$(after)" "$during"
rows=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from usage_events').fetchone()[0])" "$work/usage.db" 2>/dev/null || echo "?")
echo "usage rows: $rows (expected 1,304: every request has its row)"
