#!/usr/bin/env bash
# The node agent's idle RSS per attached pod (issue 18: at most 256 KiB a pod), on a
# simulated node (tests/e2e/test_node.py's: network namespaces, kubelet-like cgroups, the
# fake Kubernetes API server, the demo LLM): RSS and threads with N pods none of them
# annotated, with all N attached, and after one request from each (see
# gateway/benches/README.md). As root; needs ip, bpftool, nsenter, curl and cgroup v2.
# Knobs: PODS=20, SETTLE_IDLE=10, SETTLE=15 (seconds of quiet before each reading),
# KGW_BIN and KGW_DEMO_BIN (binaries to measure instead of building the release ones),
# PODS_OUT (keep the agent's log, the smaps of each step and steps.json there).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
[ "$(id -u)" = 0 ] || { echo "pods.sh needs root (network namespaces, cgroups, eBPF)" >&2; exit 1; }
need_tools "apt-get install iproute2 bpftool util-linux curl" ip bpftool nsenter curl
if [ -z "${KGW_BIN:-}" ] || [ -z "${KGW_DEMO_BIN:-}" ]; then
    build_bins release
    KGW_BIN=${KGW_BIN:-$bin/kube-gateway}
    KGW_DEMO_BIN=${KGW_DEMO_BIN:-$bin/ai-demo}
fi
export KGW_BIN KGW_DEMO_BIN
python_venv pytest "Creating the virtualenv (.venv) for the simulated node's Python"
start_work
# pods.py removes what it made, on Ctrl-C and SIGTERM too; should it die first, this
# removes what carries its tag (namespaces <tag>-*, the cgroup directory <tag>).
export KGW_TAG=kgwp$(($$ % 100000))
"$python" gateway/benches/pods.py & py=$!
pids+=("$py")
# On exit, pods.py has its SIGTERM (Ctrl-C reaches the shell only: a background job
# ignores SIGINT); its own teardown first, then the sweep.
sweep() { wait "$py" 2>/dev/null; "$python" gateway/benches/pods.py sweep "$KGW_TAG"; }
at_exit sweep
wait "$py"
