#!/usr/bin/env bash
# What building the eBPF programs needs (see ../shared/MACHINE.md), installed if missing:
# the nightly toolchain's rust-src (the programs build with -Z build-std=core) and
# bpf-linker 0.13, linked against the stable toolchain's own libLLVM (Debian has no
# LLVM 22). Quick when both are there; the first bpf-linker build takes ~4 minutes.
set -euo pipefail
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain nightly
fi
if ! command -v bpf-linker >/dev/null 2>&1; then
    echo "installing bpf-linker 0.13.0 (once, ~4 minutes)" >&2
    sysroot=$(rustc +stable --print sysroot)
    llvm=$(basename "$(ls "$sysroot"/lib/libLLVM-*.so | head -1)" .so)
    RUSTFLAGS="-L $sysroot/lib -l dylib=${llvm#lib} -C link-arg=-Wl,-rpath,$sysroot/lib" \
        cargo +stable install --quiet bpf-linker --version 0.13.0 --no-default-features \
        --features llvm-22,no-llvm-linking
fi
