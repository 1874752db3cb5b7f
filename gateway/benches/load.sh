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
cargo build --quiet --release --workspace --bins
bin=target/release

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Ports: canned 18081, nginx->canned 18082, gateway->canned 18000,
#        demo 18084, nginx->demo 18083, gateway->demo 18001.
canned='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gemma2:2b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'
mkdir -p "$work/tmp"
cat > "$work/nginx.conf" <<CONF
user root;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/tmp/body;
    proxy_temp_path $work/tmp/proxy;
    fastcgi_temp_path $work/tmp/fcgi;
    uwsgi_temp_path $work/tmp/uwsgi;
    scgi_temp_path $work/tmp/scgi;
    keepalive_requests 1000000;
    upstream canned { server 127.0.0.1:18081; keepalive 128; }
    upstream demo { server 127.0.0.1:18084; keepalive 128; }
    server {
        listen 127.0.0.1:18081;
        location / { default_type application/json; return 200 '$canned'; }
    }
    server {
        listen 127.0.0.1:18082;
        location / {
            proxy_pass http://canned; proxy_http_version 1.1;
            proxy_set_header Connection ""; proxy_set_header Host \$host; proxy_buffering off;
        }
    }
    server {
        listen 127.0.0.1:18083;
        location / {
            proxy_pass http://demo; proxy_http_version 1.1;
            proxy_set_header Connection ""; proxy_set_header Host \$host; proxy_buffering off;
        }
    }
}
CONF
nginx -p "$work" -c "$work/nginx.conf"
"$bin/ai-demo" serve --listen 127.0.0.1:18084 2>/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --listen 127.0.0.1:18000 --upstream 127.0.0.1:18081 --model gemma2:2b >/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --listen 127.0.0.1:18001 --upstream 127.0.0.1:18084 --model gemma2:2b >/dev/null & pids+=($!)
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

echo "non-streaming chat, $CONNS connections, $DURATION each (wrk -t2), same canned upstream (nginx return 200)"
printf '%-22s %12s %10s %10s\n' "path" "requests/s" "p50" "p99"
run_wrk "direct" 18081
run_wrk "nginx proxy" 18082
run_wrk "kube-gateway" 18000

echo
echo "streaming chat, time to first chunk, one connection, $TTFC_N requests each (demo LLM, no delays)"
"$bin/ai-demo" ttfc --addr 127.0.0.1:18084 --requests "$TTFC_N" --label direct
"$bin/ai-demo" ttfc --addr 127.0.0.1:18083 --requests "$TTFC_N" --label "nginx proxy"
"$bin/ai-demo" ttfc --addr 127.0.0.1:18001 --requests "$TTFC_N" --label kube-gateway
