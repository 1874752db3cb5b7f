# shellcheck shell=bash
# shellcheck disable=SC2034  # $bin, $venv, $python, $work are for the scripts sourcing this
# Sourced, from the repository's root, by the demos (ai-demo/*.sh), the benchmarks
# (gateway/benches/*.sh) and tests/run.sh: the preamble they share, written once.
#   need_tools HINT TOOL...     stops unless every TOOL is on PATH ("missing TOOL: HINT")
#   build_bins debug|release    the eBPF toolchain (bpf/toolchain.sh), then the binaries;
#                               sets $bin to their directory (honours CARGO_TARGET_DIR)
#   python_venv MODULES [NOTE]  the venv with the official clients ($KGW_VENV or .venv,
#                               tests/e2e/requirements.txt), made when `import MODULES`
#                               fails (saying NOTE first); sets $venv and $python
#   start_work                  $work, a temporary directory, and $pids; on exit, Ctrl-C
#                               included, `cleanup` stops $pids, runs what `at_exit` was
#                               given, and removes $work
#   wait_ports PORT...          until something listens on 127.0.0.1:PORT (10 s at most)
#   nginx_start DIR WORKERS BLOCK...
#                               an nginx of its own in DIR serving the server BLOCKs,
#                               stopped on exit; `canned_server PORT` is a BLOCK that
#                               answers every request with a canned chat completion
#   write_post_lua FILE         a wrk script POSTing $chat_body, the benchmarks' request

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

need_tools() {
    local hint=$1 tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "missing $tool: $hint" >&2; exit 1; }
    done
}

build_bins() {
    local profile=$1 dir=${CARGO_TARGET_DIR:-target}
    bash bpf/toolchain.sh
    if [ "$profile" = release ]; then
        cargo build --quiet --release --bins
    else
        cargo build --quiet --bins
    fi
    [[ $dir == /* ]] || dir=$PWD/$dir
    bin=$dir/$profile
}

python_venv() {
    venv=${KGW_VENV:-.venv}
    if ! "$venv/bin/python" -c "import $1" 2>/dev/null; then
        [ -z "${2:-}" ] || say "$2"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
    fi
    python=$(cd "$venv" && pwd)/bin/python  # not resolved: the symlink would lose the venv
}

start_work() {
    work=$(mktemp -d)
    pids=()
    exit_hooks=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# Runs "$@" on exit, after the processes in $pids were sent SIGTERM.
at_exit() { exit_hooks+=("$(printf '%q ' "$@")"); }

cleanup() {
    set +e
    local p hook
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for hook in "${exit_hooks[@]}"; do eval "$hook"; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$work"
}

wait_ports() {
    local port
    for port in "$@"; do
        for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    done
}

nginx_start() {
    local dir=$1 workers=$2
    shift 2
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
user root;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    $*
}
CONF
    nginx -p "$dir" -c "$dir/nginx.conf"
    at_exit nginx_stop "$dir"
}

nginx_stop() { [ -f "$1/nginx.pid" ] && kill "$(cat "$1/nginx.pid")" 2>/dev/null; }

# An nginx location answering a POST with a file (nginx's static module refuses POST
# with 405; error_page turns that into the file). Streams go out chunked, as an LLM
# server sends them (sub_filter with a pattern that never matches drops the
# Content-Length).
canned_file() { # location file content-type
    echo "location = $1 { types { } default_type \"$3\"; alias $2; error_page 405 =200 \$uri;
        sub_filter_types text/event-stream application/x-ndjson; sub_filter 'zz-never-zz' ''; }"
}

# Exits when one of the ports is taken: the benchmarks listen on fixed ones.
ports_free() { # port...
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is in use (another benchmark running?)" >&2
            exit 1
        fi
    done
}

canned='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gemma2:2b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'

canned_server() {
    echo "server { listen 127.0.0.1:$1; location / { default_type application/json; return 200 '$canned'; } }"
}

chat_body='{"model":"llama3.2:1b","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the platform team, briefly."}],"max_tokens":32}'

write_post_lua() {
    cat >"$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$chat_body'
LUA
}
