#!/usr/bin/env bash
# Soak: mixed traffic at a moderate rate against the demo LLM and a kube-gateway with a
# SQLite store (see gateway/benches/README.md). The gateway's RSS, open fds and threads
# (there is no task gauge) are sampled every 10 s; after the warm-up they must be flat,
# and every request the driver sent must have its row. Exits 1 otherwise.
# Knobs: SOAK_SECONDS=1200, SOAK_RATE=30 (requests/s), WARMUP_SECONDS=120 (left out of
# the fits), TOKEN_DELAY_MS=10 (the demo LLM's pace; streams last 0.2-0.5 s),
# MAX_RSS_MIB_H=16, MAX_FDS_H=60, MAX_THREADS_H=10 (slope limits, per hour),
# SOAK_OUT (where samples.csv, summary.json, usage.db and gateway.log stay; default a new
# directory under /tmp).
# Needs: python3 (the driver runs in the repository's virtualenv, made if missing), curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
SOAK_SECONDS=${SOAK_SECONDS:-1200}
SOAK_RATE=${SOAK_RATE:-30}
WARMUP_SECONDS=${WARMUP_SECONDS:-120}
TOKEN_DELAY_MS=${TOKEN_DELAY_MS:-10}
MAX_RSS_MIB_H=${MAX_RSS_MIB_H:-16}
MAX_FDS_H=${MAX_FDS_H:-60}
MAX_THREADS_H=${MAX_THREADS_H:-10}
out=${SOAK_OUT:-/tmp/kube-gateway-soak-$(date +%Y%m%d-%H%M%S)}
need_tools "apt-get install python3 curl" python3 curl
ports_free 18301 18302 18303
build_bins release
python_venv httpx "Creating the virtualenv with the official clients (.venv)"
start_work
mkdir -p "$out"
rm -f "$out/usage.db" "$out/usage.db-"* "$out/usage.spool"

"$bin/ai-demo" serve --listen 127.0.0.1:18303 --first-token-delay-ms 20 \
    --token-delay-ms "$TOKEN_DELAY_MS" 2>/dev/null & pids+=($!)
RUST_LOG=warn "$bin/kube-gateway" run --threads 2 --listen 127.0.0.1:18301 \
    --upstream 127.0.0.1:18303 --admin 127.0.0.1:18302 --policy gateway/benches/soak-policy.yaml \
    --store "sqlite://$out/usage.db" --spool "$out/usage.spool" >"$out/gateway.log" 2>&1 & gw=$!
pids+=("$gw")
wait_ports 18301 18302 18303
for _ in $(seq 100); do curl -sf 127.0.0.1:18302/readyz >/dev/null && break; sleep 0.1; done
curl -sf 127.0.0.1:18302/readyz >/dev/null || { echo "the gateway is not ready" >&2; exit 1; }

echo "soak: $SOAK_SECONDS s at $SOAK_RATE requests/s against the demo LLM (${TOKEN_DELAY_MS} ms a token),"
echo "kube-gateway --threads 2, SQLite store, gateway/benches/soak-policy.yaml; output in $out"
"$python" gateway/benches/soak.py drive --gateway 127.0.0.1:18301 --admin 127.0.0.1:18302 \
    --pid "$gw" --seconds "$SOAK_SECONDS" --rate "$SOAK_RATE" \
    --samples "$out/samples.csv" --summary "$out/summary.json"

# SIGTERM writes every remaining row before the gateway exits.
kill -TERM "$gw"
wait "$gw" || true
if [ -s "$out/gateway.log" ]; then
    echo "gateway log, warnings and errors by message (the demo's resets make some):"
    sed 's/\x1b\[[0-9;]*m//g; s/^[^ ]* *//' "$out/gateway.log" | sort | uniq -c | sort -rn | head -n 10
fi
echo
"$python" gateway/benches/soak.py report --samples "$out/samples.csv" --summary "$out/summary.json" \
    --db "$out/usage.db" --warmup "$WARMUP_SECONDS" \
    --max-rss-mib-h "$MAX_RSS_MIB_H" --max-fds-h "$MAX_FDS_H" --max-threads-h "$MAX_THREADS_H"
