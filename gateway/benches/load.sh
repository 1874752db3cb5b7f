#!/usr/bin/env bash
# Load benchmark, all in one run on the same upstreams (see gateway/benches/README.md).
# Workloads (wrk, then a time-to-first-byte probe), each direct, through nginx as a
# reverse proxy, and through kube-gateway:
#   tiny    (c) the 180-byte chat request; the gateway rewrites its model (no policy)
#   big     (a) a 64 KiB chat request (50 messages, 8 tools), non-streaming; the gateway
#               runs gateway/benches/llm-policy.yaml (prompt and response rules, rewrite)
#   sse     (b) a streamed answer of 1,000 SSE events (OpenAI), same policy
#   ndjson  (b) a streamed answer of 1,000 NDJSON lines (Ollama), same policy
# then streaming time to first chunk against the demo LLM (ai-demo ttfc).
# Knobs: DURATION=10s (a wrk run; each is preceded by a 3 s warm-up), CONNS=64,
# TTFB_N=500 (probe requests a path and workload), TTFC_N=3000,
# WORKLOADS="tiny big sse ndjson" (a subset runs only those), TTFC=1 (0 skips it),
# ACCESS_LOG=1 (0: the gateways' access log off; nginx's is always off),
# KGW_BIN_DIR (the directory of another build's binaries; default: build this tree).
# About 3.5 minutes with the defaults.
# Needs: nginx (Debian nginx-light), wrk, python3. Run as root or a user that can run nginx.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
TTFB_N=${TTFB_N:-500}
TTFC_N=${TTFC_N:-3000}
WORKLOADS=${WORKLOADS:-tiny big sse ndjson}
TTFC=${TTFC:-1}
need_tools "apt-get install nginx-light wrk python3" nginx wrk python3

# Ports: canned upstreams 18081 (tiny), 18085 (big's answer), 18086 (streams: SSE at
#        /v1/chat/completions, NDJSON at /api/chat), demo LLM 18084;
#        nginx -> 18082, 18087, 18088, 18083; kube-gateway -> 18000, 18002, 18003, 18001.
ports=(18081 18085 18086 18084 18082 18087 18088 18083 18000 18002 18003 18001)
ports_free "${ports[@]}"

# KGW_BIN_DIR: measure another build's kube-gateway and ai-demo (say, an earlier commit's
# release build in a git worktree) with this script; none: build this tree's.
if [ -n "${KGW_BIN_DIR:-}" ]; then bin=$KGW_BIN_DIR; else build_bins release; fi
start_work
chmod 755 "$work"
python3 gateway/benches/llm_bodies.py "$work"
printf '%s' "$chat_body" >"$work/tiny_request.json"

# Two nginx instances, as in a real deployment where the LLM and the proxy are separate
# processes: sharing one would let nginx's proxy hop stay inside one worker's event loop.
proxy_to() { # listen upstream-port
    echo "upstream u$2 { server 127.0.0.1:$2; keepalive 128; }
    server { listen 127.0.0.1:$1; location / {
        proxy_pass http://u$2; proxy_http_version 1.1;
        proxy_set_header Connection \"\"; proxy_set_header Host \$host; proxy_buffering off; } }"
}
nginx_start "$work/up" 2 "$(canned_server 18081)" \
    "server { listen 127.0.0.1:18085; $(canned_file /v1/chat/completions "$work/big_answer.json" application/json) }" \
    "server { listen 127.0.0.1:18086;
        $(canned_file /v1/chat/completions "$work/stream.sse" "text/event-stream; charset=utf-8")
        $(canned_file /api/chat "$work/stream.ndjson" application/x-ndjson) }"
# The proxy keeps a 64 KiB request body in memory, as the gateway does (nginx's default
# buffer, 16 KiB, would write it to a temporary file).
nginx_start "$work/proxy" 2 "client_body_buffer_size 128k;" \
    "$(proxy_to 18082 18081) $(proxy_to 18083 18084) $(proxy_to 18087 18085) $(proxy_to 18088 18086)"
"$bin/ai-demo" serve --listen 127.0.0.1:18084 2>/dev/null & pids+=($!)
# The gateway's log as it ships: the access log on (RUST_LOG unset, i.e. info), stdout
# to a file as a container runtime collects it. ACCESS_LOG=0 turns it off (RUST_LOG=warn).
gateway() { # listen upstream flags...
    local listen=$1 upstream=$2
    shift 2
    if [ "${ACCESS_LOG:-1}" = 0 ]; then local -x RUST_LOG=warn; else unset RUST_LOG; fi
    "$bin/kube-gateway" run --threads 2 --listen "127.0.0.1:$listen" \
        --upstream "127.0.0.1:$upstream" --store none --spool "$work/spool-$listen" "$@" \
        >"$work/gateway-$listen.log" &
    pids+=($!)
}
policy=gateway/benches/llm-policy.yaml
gateway 18000 18081 --model gemma2:2b; gw_tiny=$!
gateway 18001 18084 --model gemma2:2b
gateway 18002 18085 --policy "$policy"; gw_big=$!
gateway 18003 18086 --policy "$policy"; gw_stream=$!
wait_ports "${ports[@]}"
nginx_pids=("$(cat "$work/proxy/nginx.pid")")
mapfile -t -O 1 nginx_pids < <(ps -o pid= --ppid "${nginx_pids[0]}" | tr -d ' ')

# Sanity: each workload's answer through the gateway is the canned one, the policy's
# prompt rules let the requests pass and its response rules masked the streams.
post() { curl -sf "127.0.0.1:$1$2" -H 'content-type: application/json' --data-binary "@$work/$3"; }
grep -q '"usage"' <<<"$(post 18000 /v1/chat/completions tiny_request.json)"
grep -q chatcmpl-bench-big <<<"$(post 18002 /v1/chat/completions big_request.json)"
masked() { # what answer count-field
    grep -q '\*\*\*\*' <<<"$2" && grep -q "$3" <<<"$2" && ! grep -q darn <<<"$2" && return
    echo "$1 through the gateway is not the masked stream" >&2
    exit 1
}
masked SSE "$(post 18003 /v1/chat/completions sse_request.json)" '"completion_tokens":1000'
masked NDJSON "$(post 18003 /api/chat ndjson_request.json)" '"eval_count":1000'

hz=$(getconf CLK_TCK)
ticks() { # pid... -> user + system CPU ticks, summed
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}
lua() { # body-file -> a wrk script POSTing it
    cat >"$work/$1.lua" <<LUA
local f = assert(io.open("$work/$1", "rb"))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = f:read("*a")
f:close()
LUA
    echo "$work/$1.lua"
}

declare -A rps p50 p99 cpu ttfb50 ttfb99 errs
measure() { # key port path body-file pid... (no pid: direct, no CPU)
    local key=$1 port=$2 path=$3 body=$4
    shift 4
    local script url out t0 t1 n
    script=$(lua "$body")
    url="http://127.0.0.1:$port$path"
    wrk -t2 -c"$CONNS" -d3s --timeout 10s -s "$script" "$url" >/dev/null
    t0=$( (($#)) && ticks "$@" || echo 0)
    out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --timeout 10s --latency -s "$script" "$url")
    t1=$( (($#)) && ticks "$@" || echo 0)
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    rps[$key]=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p50[$key]=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99[$key]=$(awk '$1=="99%" {print $2}' <<<"$out")
    errs[$key]=$(awk '/Non-2xx|Socket errors/ {printf "%s; ", $0}' <<<"$out")
    cpu[$key]=-
    (($#)) && cpu[$key]=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$n" 'BEGIN {printf "%.1f", 1e6 * d / hz / n}')
    out=$("$bin/ai-demo" ttfc --addr "127.0.0.1:$port" --path "$path" --body-file "$work/$body" \
        --requests "$TTFB_N" --warmup $((TTFB_N / 10 + 1)) --label "$key")
    ttfb50[$key]=$(sed -n 's/.* p50=\([0-9.]*\)us.*/\1/p' <<<"$out")
    ttfb99[$key]=$(sed -n 's/.* p99=\([0-9.]*\)us.*/\1/p' <<<"$out")
}

table() { # workload stream-or-body-bytes what-the-bytes-are
    local w=$1 bytes=$2 what=$3 label key ratio
    printf '%-14s %11s %9s %9s %11s %8s %10s %10s %10s %10s\n' path requests/s p50 p99 \
        "CPU us/req" "x nginx" "TTFB p50" "TTFB p99" "+direct" "+nginx"
    for label in direct nginx kube-gateway; do
        key=$w/$label
        ratio=-
        [ "$label" = direct ] || ratio=$(awk -v a="${cpu[$key]}" -v b="${cpu[$w/nginx]}" 'BEGIN {printf "%.2f", a / b}')
        printf '%-14s %11s %9s %9s %11s %8s %8sus %8sus %10s %10s\n' "$label" "${rps[$key]}" \
            "${p50[$key]}" "${p99[$key]}" "${cpu[$key]}" "$ratio" "${ttfb50[$key]}" "${ttfb99[$key]}" \
            "$([ "$label" = direct ] || awk -v a="${ttfb50[$key]}" -v b="${ttfb50[$w/direct]}" 'BEGIN {printf "%+.1fus", a - b}')" \
            "$([ "$label" = kube-gateway ] && awk -v a="${ttfb50[$key]}" -v b="${ttfb50[$w/nginx]}" 'BEGIN {printf "%+.1fus", a - b}' || echo -)"
        [ -z "${errs[$key]}" ] || echo "    $label: ${errs[$key]}"
    done
    [ "$bytes" = 0 ] && return
    # MB/s = bytes per microsecond. The marginal figure takes away the tiny request's
    # CPU per request (the fixed cost of a request), leaving the per-byte work.
    for label in nginx kube-gateway; do
        key=$w/$label
        awk -v l="$label" -v b="$bytes" -v c="${cpu[$key]}" -v t="${cpu[tiny/$label]:-}" -v what="$what" 'BEGIN {
            printf "%-14s %s: %.0f MB/s per core", l, what, b / c
            if (t != "" && t != "-" && c > t) printf ", %.0f MB/s per core beyond the tiny request'"'"'s %.1f us", b / (c - t), t
            printf "\n" }'
    done
}

goal() { # workload max-ratio
    awk -v a="${cpu[$1/kube-gateway]}" -v b="${cpu[$1/nginx]}" -v g="$2" 'BEGIN {
        r = a / b; printf "goal: kube-gateway CPU per request at most %sx nginx'"'"'s: %.2fx, %s\n", g, r, r <= g ? "met" : "NOT met" }'
}

run() { # workload path body-file gateway-port nginx-port upstream-port gateway-pid
    measure "$1/direct" "$6" "$2" "$3"
    measure "$1/nginx" "$5" "$2" "$3" "${nginx_pids[@]}"
    measure "$1/kube-gateway" "$4" "$2" "$3" "$7"
}

echo "$CONNS connections, $DURATION a wrk run (-t2, --timeout 10s, after a 3 s warm-up); TTFB: ai-demo ttfc, one"
echo "keep-alive connection, $TTFB_N requests in sequence, time from sending a request to the"
echo "first body byte. CPU per request: user + system time of the proxy's processes (all nginx"
echo "workers; the gateway process) over the wrk run, / requests completed."
echo "proxies: nginx 2 workers (proxy_buffering off, upstream keepalive), kube-gateway 2 threads,"
echo "--store none (no usage rows; store.sh measures the store)"
for w in $WORKLOADS; do
    echo
    case $w in
    tiny)
        echo "(c) tiny: the 180-byte chat request, non-streaming; canned answer (nginx return 200);"
        echo "    kube-gateway: --model rewrite, no policy"
        run tiny /v1/chat/completions tiny_request.json 18000 18082 18081 "$gw_tiny"
        table tiny 0 ""
        goal tiny 1.3
        ;;
    big)
        echo "(a) big: a $(stat -c %s "$work/big_request.json")-byte chat request (50 messages, 8 tools), non-streaming;"
        echo "    canned $(stat -c %s "$work/big_answer.json")-byte answer; kube-gateway: $policy (prompt rules, rewrite, response rules)"
        run big /v1/chat/completions big_request.json 18002 18087 18085 "$gw_big"
        table big "$(stat -c %s "$work/big_request.json")" "request body"
        goal big 1.5
        ;;
    sse)
        echo "(b) sse: a streamed answer of 1,000 SSE chunks ($(stat -c %s "$work/stream.sse") bytes, chunked) to a short"
        echo "    OpenAI chat request; kube-gateway: $policy (response rules mask 10 words)"
        run sse /v1/chat/completions sse_request.json 18003 18088 18086 "$gw_stream"
        table sse "$(stat -c %s "$work/stream.sse")" "stream body"
        goal sse 1.5
        ;;
    ndjson)
        echo "(b) ndjson: a streamed answer of 1,000 NDJSON lines ($(stat -c %s "$work/stream.ndjson") bytes, chunked) to a"
        echo "    short Ollama /api/chat request; kube-gateway: $policy (response rules mask 10 words)"
        run ndjson /api/chat ndjson_request.json 18003 18088 18086 "$gw_stream"
        table ndjson "$(stat -c %s "$work/stream.ndjson")" "stream body"
        goal ndjson 1.5
        ;;
    *) echo "unknown workload $w (tiny, big, sse, ndjson)" >&2; exit 1 ;;
    esac
done

[ "$TTFC" = 0 ] && exit 0
echo
echo "streaming chat, time to first chunk, one connection, $TTFC_N requests each (demo LLM, no delays)"
"$bin/ai-demo" ttfc --addr 127.0.0.1:18084 --requests "$TTFC_N" --label direct
"$bin/ai-demo" ttfc --addr 127.0.0.1:18083 --requests "$TTFC_N" --label "nginx proxy"
"$bin/ai-demo" ttfc --addr 127.0.0.1:18001 --requests "$TTFC_N" --label kube-gateway
