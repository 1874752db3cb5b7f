#!/usr/bin/env bash
# Builds the kube-gateway image without Docker: a static musl binary, then buildah
# `from scratch` (vfs storage, as root), and proves it by running `kube-gateway
# --version` from the committed image. The same image as deploy/Dockerfile.
#
#   sudo bash deploy/build-image.sh                  # -> localhost/kube-gateway:<version>
#   IMAGE=registry.example/kube-gateway:0.1.0 ARCHIVE=/tmp/kgw.tar sudo -E bash deploy/build-image.sh
#
# ARCHIVE (optional): also write the image as a docker-archive tarball (for
# `kind load image-archive`, `docker load`, `podman load`).
# The binary is built with Cargo.toml's `image` profile (release + fat LTO, no debug info
# or symbols, cold crates optimized for size): docs/deploy.md has its size, and
# docs/performance.md its speed against the release profile.
# Needs: root, buildah (Debian `buildah`), musl-gcc (Debian `musl-tools`), rustup.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE=${IMAGE:-localhost/kube-gateway:$VERSION}
TARGET=x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN="$TARGET_DIR/$TARGET/image/kube-gateway"
STORAGE=(--storage-driver vfs)

say() { echo "build-image: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "needs root (buildah with vfs storage)"; exit 1; }
for tool in buildah musl-gcc rustup; do
    command -v "$tool" >/dev/null || { say "needs $tool (Debian: buildah, musl-tools; rustup)"; exit 1; }
done
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
bash bpf/toolchain.sh

say "building $BIN (static, musl, the image profile; about 10 minutes on 2 cores)"
CC_x86_64_unknown_linux_musl=musl-gcc \
    nice -n 19 cargo build --profile image --locked --target "$TARGET" -p kube-gateway --bin kube-gateway
if readelf -l "$BIN" | grep -q 'Requesting program interpreter'; then
    say "$BIN is dynamically linked: it would not run on an empty base"; exit 1
fi

say "assembling $IMAGE from scratch"
ctr=$(buildah "${STORAGE[@]}" from scratch)
trap 'buildah "${STORAGE[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah "${STORAGE[@]}" copy --chmod 0755 "$ctr" "$BIN" /kube-gateway >/dev/null
buildah "${STORAGE[@]}" config --entrypoint '["/kube-gateway"]' --cmd '' --user 0:0 \
    --label org.opencontainers.image.title=kube-gateway \
    --label org.opencontainers.image.version="$VERSION" \
    --label org.opencontainers.image.source=deploy/build-image.sh "$ctr"
buildah "${STORAGE[@]}" commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
trap - EXIT

# The proof: `kube-gateway --version` run from the committed image. Chroot isolation:
# it needs no OCI runtime (crun refuses hosts with hybrid cgroups, as this project's
# machines have), and the image's root filesystem is all the process sees.
say "checking: kube-gateway --version from $IMAGE"
check=$(buildah "${STORAGE[@]}" from "$IMAGE")
trap 'buildah "${STORAGE[@]}" rm "$check" >/dev/null 2>&1 || true' EXIT
buildah "${STORAGE[@]}" run --isolation chroot "$check" -- /kube-gateway --version
mnt=$(buildah "${STORAGE[@]}" mount "$check")
size_bin=$(stat -c %s "$mnt/kube-gateway")
size_gz=$(gzip -c "$mnt/kube-gateway" | wc -c)
buildah "${STORAGE[@]}" umount "$check" >/dev/null
size=$(buildah "${STORAGE[@]}" images --format '{{.Size}}' "$IMAGE")
say "image $IMAGE: $size uncompressed (one layer: the binary, $size_bin bytes; $size_gz bytes gzipped, about what a registry stores and a node pulls)"
if [ -n "${ARCHIVE:-}" ]; then
    rm -f "$ARCHIVE"
    buildah "${STORAGE[@]}" push --quiet "$IMAGE" "docker-archive:$ARCHIVE:$IMAGE"
    say "wrote $ARCHIVE ($(stat -c %s "$ARCHIVE") bytes)"
fi
