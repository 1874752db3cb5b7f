#!/usr/bin/env bash
# Every check kube-gateway has: format, lints, Rust unit and integration tests, and the
# end-to-end tests with the official Python clients (in a venv this script sets up).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
. scripts/common.sh

# PostgreSQL for the store tests: a private throw-away cluster, when this machine can
# start one (root and the server package; CI installs it). Otherwise those parts skip.
if [ -z "${KGW_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    # Assigned first: a cluster that fails to start stops the script here (set -e).
    pg_env=$(bash tests/postgres.sh start)
    eval "$pg_env"
    trap 'bash tests/postgres.sh stop "$KGW_PG_DIR"' EXIT
fi

bash bpf/toolchain.sh
# bpf/ebpf builds for the kernel only (bpf/loader's build script does it), not the host.
host=(--workspace --exclude kube-gateway-bpf-ebpf)
cargo fmt --all --check
# The gateway crate's modules import each other in one direction only.
python3 tests/lint/module_cycles.py gateway/src
cargo clippy "${host[@]}" --all-targets --quiet -- -D warnings
# The dependency policy (deny.toml): licenses, duplicate versions (warnings), crates.io
# only. Not `advisories`: its database is on a git host these machines cannot reach.
if command -v cargo-deny >/dev/null; then
    cargo deny check --hide-inclusion-graph licenses bans sources
elif [ "${CI:-}" = true ]; then
    echo "cargo-deny is missing: .ci/run installs it" >&2
    exit 1
else
    echo "(no cargo-deny: the dependency policy check skips; .ci/run shows how to install it)"
fi
# The eBPF programs, linted for the target they are built for (with the nightly).
cargo +nightly clippy --quiet -p kube-gateway-bpf-ebpf --target bpfel-unknown-none \
    -Z build-std=core --target-dir target/bpf-clippy -- -D warnings
cargo build "${host[@]}" --all-targets --quiet
cargo test "${host[@]}"
# The fuzz targets (fuzz/, cargo-fuzz with the nightly), each for a bounded time so that
# they keep building and a regression of theirs shows; KGW_FUZZ_SECONDS=0 skips them.
fuzz_seconds="${KGW_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" = 0 ]; then
    echo "(KGW_FUZZ_SECONDS=0: the fuzz targets skip)"
elif cargo +nightly fuzz --version >/dev/null 2>&1; then
    bash fuzz/run.sh "$fuzz_seconds"
elif [ "${CI:-}" = true ]; then
    echo "cargo-fuzz is missing: .ci/run installs it" >&2
    exit 1
else
    echo "(no cargo-fuzz: the fuzz targets skip; cargo install cargo-fuzz --locked)"
fi

python_venv "openai, ollama, pytest, kubernetes"
# -rs prints why a privileged test skipped (never in CI: there they must run).
"$python" -m pytest -q -rs -p no:cacheprovider tests/e2e tests/k8s tests/deploy
