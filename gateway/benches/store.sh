#!/usr/bin/env bash
# The usage store's cost under load (see gateway/benches/README.md; COMPARE=metrics
# compares metrics and tracing off and on instead): the same gateway
# with --store none, sqlite:// and postgres://, non-streaming chat at 64 connections
# (wrk) against a canned upstream, rounds interleaved; then each gateway is stopped
# (SIGTERM) and its store is counted against the requests wrk completed.
# Needs: nginx (Debian nginx-light), wrk, and for PostgreSQL root and the server package.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-3}
need_tools "apt-get install nginx-light wrk" nginx wrk
build_bins release
start_work
chmod 755 "$work"
gw_pids=()

# The canned upstream, and an OTLP/HTTP sink for COMPARE=metrics (an empty body is an
# empty export response).
nginx_start "$work/up" 2 "$(canned_server 18081)" "server { listen 127.0.0.1:18089; location / { return 200; } }"

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
    at_exit bash tests/postgres.sh stop "$KGW_PG_DIR"
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
        --spool "$work/spool-$i" ${extra[$i]} >/dev/null & gw_pids+=($!) pids+=($!)
done
wait_ports 18081
for i in "${!stores[@]}"; do wait_ports $((18100 + i)); done
write_post_lua "$work/post.lua"

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
