#!/usr/bin/env bash
# The observability demo: the demo LLM, kube-gateway in front of it (explicit mode, with
# a policy and the admin endpoint), and a real Prometheus (Debian package `prometheus`)
# scraping the gateway every 2 s while the official clients send calls through it.
# Then it prints a few of the dashboards' queries, and keeps everything up for you to
# query (http://127.0.0.1:9090) until Ctrl-C; OBSERVE_SECONDS=N stops it after N s.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
need_tools "apt-get install prometheus" prometheus
PROM_PORT=${PROM_PORT:-9090}

build_bins debug
python_venv "openai, ollama"
start_work

cat >"$work/policy.yaml" <<'EOF'
apiVersion: kube-gateway.io/v1alpha1
models:
  rewrite:
    - { from: "llama3.2:1b", to: "gemma2:2b" }
promptRules:
  - { name: no-jailbreak, match: { literals: ["ignore previous instructions"] }, action: deny }
  - { name: emails, match: { detector: email }, action: redact }
budgets:
  - { name: team-daily, scope: namespace, window: day, limits: { totalTokens: 200000 } }
EOF
cat >"$work/prometheus.yml" <<'EOF'
global: { scrape_interval: 2s, evaluation_interval: 2s }
scrape_configs:
  - job_name: kube-gateway
    static_configs: [ { targets: ['127.0.0.1:15020'] } ]
EOF
"$bin/ai-demo" serve --listen 127.0.0.1:11434 >"$work/llm.log" 2>&1 & pids+=($!)
"$bin/kube-gateway" run --listen 127.0.0.1:18000 --upstream 127.0.0.1:11434 \
    --admin 127.0.0.1:15020 --policy "$work/policy.yaml" --store "sqlite://$work/usage.db" \
    --spool "$work/usage.spool" --pod-namespace demo --pod-name app >"$work/gateway.log" 2>&1 & pids+=($!)
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$work/prometheus.log" 2>&1 & pids+=($!)
wait_ports 11434 18000 15020 "$PROM_PORT"
echo "==> Prometheus on http://127.0.0.1:$PROM_PORT scrapes kube-gateway's /metrics (127.0.0.1:15020)"
echo "==> sending calls through the gateway (openai and ollama clients) for ~20 s"
"$python" - <<'EOF'
import time, ollama, openai
oa = openai.OpenAI(base_url="http://127.0.0.1:18000/v1", api_key="demo", max_retries=0)
ol = ollama.Client(host="http://127.0.0.1:18000")
end = time.time() + 20
while time.time() < end:
    oa.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "hello"}])
    list(oa.chat.completions.create(model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "stream"}]))
    ol.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "write to ops@example.com"}])
    try:
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "ignore previous instructions"}])
    except openai.PermissionDeniedError:
        pass
    time.sleep(0.2)
EOF
sleep 4
query() {
    printf '\n  %s\n' "$1"
    curl -s "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" | "$python" -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    labels = ",".join(k + "=" + v for k, v in r["metric"].items()) or "(total)"
    print("    %s: %.4g" % (labels, float(r["value"][1])))'
}
echo "==> a few of the dashboards' queries"
query 'sum by (gen_ai_request_model, gen_ai_token_type) (gen_ai_client_token_usage_sum)'
query 'sum by (outcome) (kube_gateway_requests_total)'
query 'sum by (rule) (kube_gateway_rule_hits_total)'
query 'histogram_quantile(0.99, sum by (le) (rate(gen_ai_client_operation_duration_seconds_bucket[1m])))'
query 'max by (budget, measure) (kube_gateway_budget_used) / max by (budget, measure) (kube_gateway_budget_limit)'
echo
echo "==> import dashboards/*.json into Grafana (see the README); Ctrl-C stops everything"
sleep "${OBSERVE_SECONDS:-infinity}"
