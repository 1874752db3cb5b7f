#!/usr/bin/env bash
# Instructions a streamed answer costs the gateway, counted by callgrind (valgrind): the
# same for the same binary and input however busy the machine is, where load.sh's CPU
# time moves by a fifth between runs on a shared 2-core host (see gateway/benches/README.md).
# For each of load.sh's streams (1,000 SSE events, 1,000 NDJSON lines, under
# llm-policy.yaml's response rules), the gateway runs under callgrind twice, serving
# FEW and then MANY requests in sequence (curl); (MANY - FEW) / (MANY - FEW requests)
# is the cost of one answer on the request path, start-up taken away.
# Knobs: FEW=20, MANY=220, KGW_BIN_DIR (another build's binaries; default: build this tree's).
# Needs: valgrind, nginx (Debian nginx-light), curl, python3. About 2 minutes a build.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
FEW=${FEW:-20}
MANY=${MANY:-220}
need_tools "apt-get install valgrind nginx-light curl python3" valgrind nginx curl python3
ports_free 18086 18003
if [ -n "${KGW_BIN_DIR:-}" ]; then bin=$KGW_BIN_DIR; else build_bins release; fi
start_work
chmod 755 "$work"
python3 gateway/benches/llm_bodies.py "$work" >/dev/null
# The canned streams of load.sh, chunked as an LLM server sends them.
nginx_start "$work/up" 1 "server { listen 127.0.0.1:18086;
    $(canned_file /v1/chat/completions "$work/stream.sse" text/event-stream)
    $(canned_file /api/chat "$work/stream.ndjson" application/x-ndjson) }"
wait_ports 18086

count() { # path body-file requests -> instructions of the whole run
    local out=$work/callgrind.out
    rm -f "$out"
    # Only the request path: the client connection's task and its upstream connection's
    # (the recorder's work, the tokenizer's calibration among it, is off this path and
    # would be counted at valgrind's pace, not the gateway's).
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        --toggle-collect='*listener::connection*' --toggle-collect='*upstream::Upstream::connect*' \
        "$bin/kube-gateway" run \
        --threads 1 --listen 127.0.0.1:18003 --upstream 127.0.0.1:18086 --store none \
        --spool "$work/spool" --policy gateway/benches/llm-policy.yaml >/dev/null 2>"$work/valgrind.log" &
    local gw=$!
    wait_ports 18003
    for _ in $(seq "$3"); do
        curl -sf "127.0.0.1:18003$1" -H 'content-type: application/json' \
            --data-binary "@$work/$2" >/dev/null
    done
    kill -TERM "$gw"
    wait "$gw" || true
    awk '/^summary:/ {print $2}' "$out"
}

echo "instructions per streamed answer (callgrind; ($MANY - $FEW requests) apart, one serving thread)"
for w in sse ndjson; do
    case $w in
    sse) path=/v1/chat/completions what="1,000 SSE events" ;;
    ndjson) path=/api/chat what="1,000 NDJSON lines" ;;
    esac
    few=$(count "$path" "${w}_request.json" "$FEW")
    many=$(count "$path" "${w}_request.json" "$MANY")
    awk -v a="$few" -v b="$many" -v n=$((MANY - FEW)) -v what="$what" \
        'BEGIN {printf "%-18s %10.0f instructions an answer, %.0f an event\n", what, (b - a) / n, (b - a) / n / 1000}'
done
