#!/usr/bin/env bash
# Load benchmark, all in one run on the same upstreams (see gateway/benches/README.md):
#   non-streaming chat at 64 connections (wrk): direct, nginx reverse proxy, kube-gateway
#   streaming time to first chunk (ai-demo ttfc): direct, nginx, kube-gateway
# Needs: nginx (Debian nginx-light) and wrk. Run as root or a user that can run nginx.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
TTFC_N=${TTFC_N:-3000}
need_tools "apt-get install nginx-light wrk" nginx wrk
build_bins release
start_work

# Ports: canned 18081, nginx->canned 18082, gateway->canned 18000,
#        demo 18084, nginx->demo 18083, gateway->demo 18001.
# Two nginx instances, as in a real deployment where the LLM and the proxy are separate
# processes: sharing one would let nginx's proxy hop stay inside one worker's event loop.
proxy_to() { # listen upstream-port
    echo "upstream u$2 { server 127.0.0.1:$2; keepalive 128; }
    server { listen 127.0.0.1:$1; location / {
        proxy_pass http://u$2; proxy_http_version 1.1;
        proxy_set_header Connection \"\"; proxy_set_header Host \$host; proxy_buffering off; } }"
}
nginx_start "$work/up" 2 "$(canned_server 18081)"
nginx_start "$work/proxy" 2 "$(proxy_to 18082 18081) $(proxy_to 18083 18084)"
"$bin/ai-demo" serve --listen 127.0.0.1:18084 2>/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --threads 2 --listen 127.0.0.1:18000 --upstream 127.0.0.1:18081 --model gemma2:2b --store none >/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --threads 2 --listen 127.0.0.1:18001 --upstream 127.0.0.1:18084 --model gemma2:2b --store none >/dev/null & pids+=($!)
wait_ports 18081 18082 18083 18084 18000 18001
write_post_lua "$work/post.lua"

# Sanity: the gateway's answer is the canned one with its model; the rewrite happened.
curl -sf 127.0.0.1:18000/v1/chat/completions -d "$chat_body" | grep -q '"usage"'

run_wrk() { # label port
    wrk -t2 -c"$CONNS" -d3s -s "$work/post.lua" "http://127.0.0.1:$2/v1/chat/completions" >/dev/null
    local out
    out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$work/post.lua" "http://127.0.0.1:$2/v1/chat/completions")
    local rps p50 p99 errs
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
    printf '%-22s %12s %10s %10s  %s\n' "$1" "$rps" "$p50" "$p99" "$errs"
}

echo "non-streaming chat, $CONNS connections, $DURATION each (wrk -t2), same canned upstream (nginx return 200, 2 workers)"
echo "proxies: nginx 2 workers (proxy_buffering off, upstream keepalive), kube-gateway 2 threads, model rewrite on"
printf '%-22s %12s %10s %10s\n' "path" "requests/s" "p50" "p99"
run_wrk "direct" 18081
run_wrk "nginx proxy" 18082
run_wrk "kube-gateway" 18000

echo
echo "streaming chat, time to first chunk, one connection, $TTFC_N requests each (demo LLM, no delays)"
"$bin/ai-demo" ttfc --addr 127.0.0.1:18084 --requests "$TTFC_N" --label direct
"$bin/ai-demo" ttfc --addr 127.0.0.1:18083 --requests "$TTFC_N" --label "nginx proxy"
"$bin/ai-demo" ttfc --addr 127.0.0.1:18001 --requests "$TTFC_N" --label kube-gateway
