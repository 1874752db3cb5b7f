#!/usr/bin/env bash
# The usage store's cost under load (see gateway/benches/README.md; COMPARE=metrics
# compares metrics and tracing off and on instead): the same gateway
# with --store none, sqlite:// and postgres://, non-streaming chat at 64 connections
# (wrk) against a canned upstream, rounds interleaved; then each gateway is stopped
# (SIGTERM) and its store is counted against the requests wrk completed.
# Needs: nginx (Debian nginx-light), wrk, and for PostgreSQL root and the server package.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-3}
for tool in nginx wrk; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx-light wrk" >&2; exit 1; }
done
cargo build --quiet --release --bins
bin=target/release

work=$(mktemp -d)
chmod 755 "$work"
pids=()
gw_pids=()
pg_dir=
cleanup() {
    for p in "${pids[@]}" "${gw_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$work/up/nginx.pid" ] && kill "$(cat "$work/up/nginx.pid")" 2>/dev/null || true
    [ -n "$pg_dir" ] && bash tests/postgres.sh stop "$pg_dir"
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

canned='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gemma2:2b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30}}'
mkdir -p "$work/up"
cat > "$work/up/nginx.conf" <<CONF
user root;
worker_processes 2;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/up/body;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:18081; location / { default_type application/json; return 200 '$canned'; } }
    # An OTLP/HTTP sink for COMPARE=metrics (an empty body is an empty export response).
    server { listen 127.0.0.1:18089; location / { return 200; } }
}
CONF
nginx -p "$work/up" -c "$work/up/nginx.conf"

extra=("" "")
envs=("" "")
if [ "${COMPARE:-store}" = metrics ]; then
    # Metrics and tracing off (no admin endpoint, no OTLP: nothing is recorded) vs on:
    # Prometheus scraped every second, and OTLP spans and metrics (every second) to a sink.
    stores=("none" "none")
    labels=("metrics off" "metrics on")
    extra=("" "--admin 127.0.0.1:18199")
    envs=("" "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18089 OTEL_METRIC_EXPORT_INTERVAL=1000")
    (while sleep 1; do curl -sf 127.0.0.1:18199/metrics >/dev/null || true; done) & pids+=($!)
elif [ "${COMPARE:-store}" = exports ]; then
    # Each export on its own against none: Prometheus (scraped every second), OTLP
    # metrics only, OTLP spans only, all three.
    otlp="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18089 OTEL_METRIC_EXPORT_INTERVAL=1000"
    stores=("none" "none" "none" "none" "none")
    labels=("none" "prometheus" "otlp metrics" "otlp spans" "all")
    extra=("" "--admin 127.0.0.1:18199" "" "" "--admin 127.0.0.1:18198")
    envs=("" "" "$otlp OTEL_TRACES_EXPORTER=none" "$otlp OTEL_METRICS_EXPORTER=none" "$otlp")
    (while sleep 1; do for p in 18199 18198; do curl -sf "127.0.0.1:$p/metrics" >/dev/null || true; done; done) & pids+=($!)
else
stores=("none" "sqlite://$work/usage.db")
labels=("store off" "sqlite")
if [ -z "${KGW_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    eval "$(KGW_PG_PORT=54339 bash tests/postgres.sh start)"
    pg_dir=$KGW_PG_DIR
fi
if [ -n "${KGW_TEST_POSTGRES_URL:-}" ]; then
    stores+=("$KGW_TEST_POSTGRES_URL")
    labels+=("postgresql")
    extra+=("")
    envs+=("")
else
    echo "(no PostgreSQL: set KGW_TEST_POSTGRES_URL or run as root with postgresql installed)"
fi
fi

for i in "${!stores[@]}"; do
    env ${envs[$i]} RUST_LOG=warn "$bin/kube-gateway" run --threads 2 --listen "127.0.0.1:$((18100 + i))" \
        --upstream 127.0.0.1:18081 --model gemma2:2b --store "${stores[$i]}" \
        --spool "$work/spool-$i" ${extra[$i]} >/dev/null & gw_pids+=($!)
done
for port in 18081 $(for i in "${!stores[@]}"; do echo $((18100 + i)); done); do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"llama3.2:1b","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the platform team, briefly."}],"max_tokens":32}'
LUA

declare -A sent rps_sum cpu_sum pg_sum ratios
# CPU ticks (user + system) of a process, or of every postgres server process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pg_ticks() {
    local t=0 f
    for f in /proc/[0-9]*/stat; do
        read -r line <"$f" 2>/dev/null || continue
        [[ $line == *" (postgres) "* ]] && t=$(( t + $(awk '{print $14 + $15}' <<<"$line") ))
    done
    echo "$t"
}
hz=$(getconf CLK_TCK)
echo "non-streaming chat, $CONNS connections, $DURATION a run (wrk -t2), $ROUNDS rounds interleaved"
printf '%-6s %-12s %12s %10s %10s\n' round store requests/s p50 p99
for round in $(seq "$ROUNDS"); do
    for i in "${!stores[@]}"; do
        t0=$(ticks "${gw_pids[$i]}") p0=$(pg_ticks)
        out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$work/post.lua" "http://127.0.0.1:$((18100 + i))/v1/chat/completions")
        t1=$(ticks "${gw_pids[$i]}") p1=$(pg_ticks)
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        cpu_sum[$i]=$(( ${cpu_sum[$i]:-0} + t1 - t0 ))
        pg_sum[$i]=$(( ${pg_sum[$i]:-0} + p1 - p0 ))
        sent[$i]=$(( ${sent[$i]:-0} + n ))
        rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
        rps_sum[$i]=$(awk -v a="${rps_sum[$i]:-0}" -v b="$rps" 'BEGIN {print a + b}')
        # Paired with the same round's first configuration: this machine's speed drifts
        # between rounds more than the differences measured here.
        [ "$i" = 0 ] && base=$rps
        ratios[$i]="${ratios[$i]:-} $(awk -v a="$rps" -v b="$base" 'BEGIN {print 100 * a / b}')"
        printf '%-6s %-12s %12s %10s %10s  %s\n' "$round" "${labels[$i]}" \
            "$rps" \
            "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" \
            "$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")"
    done
done

echo
echo "mean over $ROUNDS rounds (store off = 100 %); CPU per request: the gateway process"
echo "(its SQLite threads included), and every postgres server process on this machine"
for i in "${!stores[@]}"; do
    awk -v l="${labels[$i]}" -v s="${rps_sum[$i]}" -v o="${rps_sum[0]}" -v r="$ROUNDS" \
        -v c="${cpu_sum[$i]}" -v p="${pg_sum[$i]}" -v n="${sent[$i]}" -v hz="$hz" \
        'BEGIN {printf "%-12s %10.0f requests/s  %6.1f %%  gateway %5.1f us, postgres %5.1f us CPU/request\n", l, s / r, 100 * s / o, 1e6 * c / hz / n, 1e6 * p / hz / n}'
done
echo
echo "per round, against the same round's ${labels[0]} (median, and every round)"
for i in "${!stores[@]}"; do
    [ "$i" = 0 ] && continue
    sorted=$(tr ' ' '\n' <<<"${ratios[$i]}" | sed '/^$/d' | sort -g)
    printf '%-12s median %6.1f %%  rounds: %s\n' "${labels[$i]}" \
        "$(awk '{v[NR] = $1} END {print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}' <<<"$sorted")" \
        "$(tr ' ' '\n' <<<"${ratios[$i]}" | awk 'NF {printf "%.1f ", $1}')"
done

echo
echo "after SIGTERM: rows in each store vs requests wrk completed"
for i in "${!stores[@]}"; do
    kill -TERM "${gw_pids[$i]}"
    wait "${gw_pids[$i]}" || true
    [ "${stores[$i]}" = none ] && continue
    rows=$("$bin/kube-gateway" usage --store "${stores[$i]}" --json | python3 -c 'import json,sys; print(sum(t["requests"] for t in json.load(sys.stdin)))')
    printf '%-12s %10s rows, %10s requests completed\n' "${labels[$i]}" "$rows" "${sent[$i]}"
done
