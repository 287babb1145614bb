#!/bin/sh
# Builds the toolwarden container image as an OCI image archive, without a
# Docker engine or a registry: a static binary (glibc with crt-static, the one
# target our toolchain has) in a scratch-style image, assembled by
# scripts/oci_image.py with deterministic layers.
#
#   scripts/build-image.sh [OUT.tar]          # default target/image/toolwarden-image.tar
#   IMAGE_REF=registry.example/toolwarden:dev scripts/build-image.sh
#
# Import it on a node with no registry access:
#   ctr -n k8s.io images import target/image/toolwarden-image.tar
# and reference it with imagePullPolicy: IfNotPresent. The Dockerfile builds the
# same image with a Docker engine.
#
# A busybox tool image (static /bin/busybox, its applets, empty proc/ dev/ tmp/), a tool root
# file system a runner pod can mount as an image volume (e2e: TOOLWARDEN_E2E_TOOL_IMAGE):
#   scripts/build-image.sh --busybox-tool [OUT.tar]   # needs busybox-static; default ref
#                                                     # docker.io/toolwarden/busybox-tool:1
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ "${1:-}" = "--busybox-tool" ]; then
    out="${2:-$root/target/image/busybox-tool-image.tar}"
    busybox=$(command -v busybox)
    mkdir -p "$(dirname "$out")"
    exec python3 scripts/oci_image.py --busybox "$busybox" --applets "$("$busybox" --list | tr '\n' ' ')" \
        --ref "${IMAGE_REF:-docker.io/toolwarden/busybox-tool:1}" --version 1 \
        --revision "$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --created "$(git log -1 --format=%ct 2>/dev/null || echo 0)" --out "$out"
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
ref="${IMAGE_REF:-docker.io/toolwarden/toolwarden:$version}"
out="${1:-$root/target/image/toolwarden-image.tar}"
target=x86_64-unknown-linux-gnu

# crt-static links glibc statically; only with an explicit --target does RUSTFLAGS
# leave build scripts and proc macros (host artifacts) alone.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" --bin toolwarden
binary="target/$target/release/toolwarden"
if readelf -l "$binary" | grep -q 'Requesting program interpreter'; then
    echo "error: $binary is dynamically linked" >&2
    exit 1
fi

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Reproducible: every timestamp is the commit's time.
created=$(git log -1 --format=%ct 2>/dev/null || echo 0)
mkdir -p "$(dirname "$out")"
python3 scripts/oci_image.py --binary "$binary" --ref "$ref" --version "$version" \
    --revision "$revision" --created "$created" --out "$out"
