#!/usr/bin/env bash
# The transparent demo (root): an "LLM host" and an "app host" as network namespaces
# joined by a veth pair, the demo LLM server on the LLM host, the app in a cgroup of its
# own, kube-gateway attached to that cgroup with eBPF. The app is the official `ollama`
# Python client, unmodified, calling the LLM host's address; the gateway rewrites its
# model, redacts an email from its prompt, and stops it at its budget. Everything it
# creates is removed at the end, Ctrl-C included. Without root it says what it needs and
# runs the explicit-mode demo (ai-demo/demo.sh) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
. scripts/common.sh

if [ "$(id -u)" != 0 ]; then
    cat >&2 <<'EOF'
The transparent demo needs root: it creates network namespaces, a cgroup, and loads
eBPF programs (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Run it with sudo.
Running the explicit-mode demo instead (the client is pointed at the gateway):
EOF
    exec bash ai-demo/demo.sh "$@"
fi
need_tools "apt-get install iproute2 util-linux python3-venv" ip nsenter python3

say "building (the eBPF programs, the gateway, the demo LLM)"
build_bins debug
python_venv ollama "installing the official ollama Python client into ${KGW_VENV:-.venv}"

# shellcheck source=ai-demo/hosts.sh
. ai-demo/hosts.sh
trap 'cleanup; echo "(removed the namespaces, cgroups and files the demo created)"' EXIT

say "network: app host 10.77.0.1 <-> LLM host 10.77.0.2, a cgroup for the app"
hosts_up "kgwdemo$$"

say "the LLM host serves the demo LLM on 10.77.0.2:11434 (Ollama and OpenAI APIs)"
in_ns "$llm" - "$bin/ai-demo" serve --listen 0.0.0.0:11434 >"$work/llm.log" 2>&1 & pids+=($!)

cat >"$work/policy.yaml" <<'EOF'
apiVersion: kube-gateway.io/v1alpha1
models:
  rewrite:
    - { from: "llama3.2:1b", to: "gemma2:2b" }
promptRules:
  - name: emails
    match: { detector: email }
    action: redact
budgets:
  - { name: app-daily, scope: pod, window: day, limits: { requests: 3 } }
EOF
say "kube-gateway on the app host, attached to the app's cgroup ($cg/app) with eBPF"
echo "    policy: llama3.2:1b -> gemma2:2b, redact emails, 3 requests a day for this pod"
in_ns "$app" "$cg/gateway" "$bin/kube-gateway" run --threads 1 --listen 127.0.0.1:15001 \
    --cgroup "$cg/app" --netflush --policy "$work/policy.yaml" \
    --store "sqlite://$work/usage.db" --spool "$work/usage.spool" \
    --pod-namespace demo --pod-name app >"$work/gateway.log" 2>&1 & pids+=($!)
wait_ready "$work/gateway.log"
grep -o 'eBPF capture attached.*' "$work/gateway.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/    /'

say "the app: the official ollama client, unmodified, talking to http://10.77.0.2:11434"
cat >"$work/app.py" <<'EOF'
import ollama
client = ollama.Client(host="http://10.77.0.2:11434", timeout=10)
def ask(prompt):
    return client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": prompt}])
r = ask("Hello there")
print(f"    asked for llama3.2:1b, the LLM answered as {r.model}: {r.message.content[:60]}...")
r = ask("Please email the report to jane.doe@example.com")
print(f"    a prompt with an email went through ({r.eval_count} tokens back)")
ask("One more question")
try:
    ask("And a fourth")
    print("    the fourth request was allowed (unexpected)")
except ollama.ResponseError as e:
    print(f"    the fourth request: HTTP {e.status_code}: {e.error}")
EOF
in_ns "$app" "$cg/app" "$python" "$work/app.py"

say "what the LLM host received (its own log of requests)"
in_ns "$llm" - "$python" - <<'EOF'
import json, urllib.request
for r in json.load(urllib.request.urlopen("http://127.0.0.1:11434/demo/requests")):
    if r["path"] == "/api/chat":
        prompt = json.loads(r["body"])["messages"][-1]["content"]
        print(f"    model={r['model']:<10} prompt={prompt!r}")
EOF

say "the usage the gateway stored, and the budget"
# SIGTERM to the gateway itself (the background job is the shell that entered the
# namespace), then wait until it has flushed its last rows and exited.
for p in $(cat "$cg/gateway/cgroup.procs"); do kill -TERM "$p" 2>/dev/null || true; done
for _ in $(seq 300); do [ -z "$(cat "$cg/gateway/cgroup.procs")" ] && break; sleep 0.1; done
wait "${pids[1]}" || true
usage=$("$bin/kube-gateway" usage --store "sqlite://$work/usage.db" --policy "$work/policy.yaml")
sed 's/^/    /' <<<"$usage"
# Anything that went wrong on the gateway's side shows here rather than vanishing with
# the demo's files.
warnings=$(sed 's/\x1b\[[0-9;]*m//g' "$work/gateway.log" | grep -E '^\S+ +(WARN|ERROR) ' || true)
if [ -n "$warnings" ]; then
    say "what the gateway warned about"
    sed 's/^/    /' <<<"$warnings"
fi
# The demo is also CI's check of the whole path: the four requests must be in the store.
if ! grep -qE '^TOTAL +4 ' <<<"$usage"; then
    echo "the store does not hold the demo's 4 requests; the gateway's log ends:" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$work/gateway.log" | tail -15 >&2
    exit 1
fi
