#!/usr/bin/env bash
# Load benchmark, all in one run on the same upstreams (see gateway/benches/README.md):
#   non-streaming chat at 64 connections (wrk): direct, nginx reverse proxy, kube-gateway
#   streaming time to first chunk (ai-demo ttfc): direct, nginx, kube-gateway
# Needs: nginx (Debian nginx-light) and wrk. Run as root or a user that can run nginx.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
TTFC_N=${TTFC_N:-3000}
for tool in nginx wrk; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx-light wrk" >&2; exit 1; }
done
cargo build --quiet --release --bins
bin=target/release

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for d in up proxy; do
        [ -f "$work/$d/nginx.pid" ] && kill "$(cat "$work/$d/nginx.pid")" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Ports: canned 18081, nginx->canned 18082, gateway->canned 18000,
#        demo 18084, nginx->demo 18083, gateway->demo 18001.
canned='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gemma2:2b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'
mkdir -p "$work/up" "$work/proxy"
# Two nginx instances, as in a real deployment where the LLM and the proxy are separate
# processes: sharing one would let nginx's proxy hop stay inside one worker's event loop.
nginx_conf() { # dir workers servers...
    local dir=$1 workers=$2; shift 2
    cat > "$dir/nginx.conf" <<CONF
user root;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    $*
}
CONF
    nginx -p "$dir" -c "$dir/nginx.conf"
}
proxy_to() { # listen upstream-port
    echo "upstream u$2 { server 127.0.0.1:$2; keepalive 128; }
    server { listen 127.0.0.1:$1; location / {
        proxy_pass http://u$2; proxy_http_version 1.1;
        proxy_set_header Connection \"\"; proxy_set_header Host \$host; proxy_buffering off; } }"
}
nginx_conf "$work/up" 2 "server { listen 127.0.0.1:18081; location / { default_type application/json; return 200 '$canned'; } }"
nginx_conf "$work/proxy" 2 "$(proxy_to 18082 18081) $(proxy_to 18083 18084)"
"$bin/ai-demo" serve --listen 127.0.0.1:18084 2>/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --threads 2 --listen 127.0.0.1:18000 --upstream 127.0.0.1:18081 --model gemma2:2b --store none >/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --threads 2 --listen 127.0.0.1:18001 --upstream 127.0.0.1:18084 --model gemma2:2b --store none >/dev/null & pids+=($!)
for port in 18081 18082 18083 18084 18000 18001; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"llama3.2:1b","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the platform team, briefly."}],"max_tokens":32}'
LUA

# Sanity: the gateway's answer is the canned one with its model; the rewrite happened.
curl -sf 127.0.0.1:18000/v1/chat/completions -d @<(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$work/post.lua") | grep -q '"usage"'

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
