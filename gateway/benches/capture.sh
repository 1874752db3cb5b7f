#!/usr/bin/env bash
# eBPF capture cost (root; see gateway/benches/README.md): the same request from the app
# host to the demo LLM on the LLM host, in one run, three ways:
#   direct     - a process outside the captured cgroup, no gateway
#   explicit   - the client pointed at a kube-gateway (--upstream), outside the cgroup
#   ebpf       - a process in the captured cgroup, redirected by connect4 to kube-gateway
# Each request opens a new connection (so the redirect's connect and SO_ORIGINAL_DST
# lookup are in every sample); reported: connect time and whole-request time, p50/p99.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
N=${N:-2000}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, cgroups, eBPF)" >&2; exit 1; }
build_bins release
# shellcheck source=ai-demo/hosts.sh
. ai-demo/hosts.sh
hosts_up "kgwbench$$"

in_ns "$llm" - "$bin/ai-demo" serve --listen 0.0.0.0:11434 >"$work/llm.log" 2>&1 & pids+=($!)
common=(--threads 1 --store none --model gemma2:2b)
RUST_LOG=warn in_ns "$app" "$cg/gateway" "$bin/kube-gateway" run "${common[@]}" \
    --listen 127.0.0.1:15001 --cgroup "$cg/app" >"$work/gw-ebpf.log" 2>&1 & pids+=($!)
RUST_LOG=warn in_ns "$app" "$cg/gateway" "$bin/kube-gateway" run "${common[@]}" \
    --listen 127.0.0.1:15002 --upstream 10.77.0.2:11434 >"$work/gw-explicit.log" 2>&1 & pids+=($!)
for port in 15001 15002; do
    for _ in $(seq 100); do in_ns "$app" - bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && break; sleep 0.1; done
done
for _ in $(seq 100); do in_ns "$app" - bash -c "exec 3<>/dev/tcp/10.77.0.2/11434" 2>/dev/null && break; sleep 0.1; done

cat >"$work/probe.py" <<'EOF2'
import socket, statistics, sys, time
label, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = b'{"model":"llama3.2:1b","prompt":"hello","stream":false}'
req = (b"POST /api/generate HTTP/1.1\r\nHost: 10.77.0.2:11434\r\nContent-Type: application/json\r\n"
       b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
connect, whole = [], []
for i in range(n + 100):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t1 = time.perf_counter()
    s.sendall(req)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    t2 = time.perf_counter()
    s.close()
    assert b" 200 " in data.split(b"\r\n", 1)[0], data[:200]
    if i >= 100:  # warm-up
        connect.append((t1 - t0) * 1e6)
        whole.append((t2 - t0) * 1e6)
q = lambda xs, p: sorted(xs)[int(len(xs) * p) - 1]
print(f"{label:<10} {q(connect, .5):>9.0f} {q(connect, .99):>9.0f} {q(whole, .5):>10.0f} {q(whole, .99):>10.0f}")
EOF2
echo "new connection per request, $N requests each (after 100 warm-up), app host -> LLM host"
printf '%-10s %9s %9s %10s %10s\n' path "conn p50" "conn p99" "req p50" "req p99"
printf '%-10s %9s %9s %10s %10s\n' "" "(us)" "(us)" "(us)" "(us)"
for round in 1 2; do
    in_ns "$app" "$cg/outside" python3 "$work/probe.py" direct 10.77.0.2 11434 "$N"
    in_ns "$app" "$cg/outside" python3 "$work/probe.py" explicit 127.0.0.1 15002 "$N"
    in_ns "$app" "$cg/app" python3 "$work/probe.py" ebpf 10.77.0.2 11434 "$N"
done
