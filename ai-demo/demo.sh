#!/usr/bin/env bash
# The local demo: builds the workspace, then starts the demo LLM server and a real
# kube-gateway in front of it, sends OpenAI and Ollama calls through it, and shows the
# model rewrite and the usage it recorded. Extra arguments go to `ai-demo local`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
. scripts/common.sh
build_bins debug
exec "$bin/ai-demo" local "$@"
