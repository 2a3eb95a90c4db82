#!/usr/bin/env bash
# Builds the krun-only image FROM scratch offline, from a krun binary already built on this
# machine, and checks that the binary runs inside it (`krun --version`).
#
#   golden-image/build-local.sh [KRUN_BINARY] [OCI_ARCHIVE]
#
# KRUN_BINARY defaults to target/release/krun, else target/debug/krun (CARGO_TARGET_DIR is
# honoured). A static binary is copied alone; a glibc-linked one (the usual host build) comes
# with the loader and the libraries ldd names, so the image still needs nothing else. With
# OCI_ARCHIVE the image is also written there (`podman load -i` / `skopeo copy` it).
# buildah runs rootful with the vfs driver and its own storage under a temporary directory,
# removed at exit: nothing is left in /var/lib/containers.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
target="${CARGO_TARGET_DIR:-$here/../target}"
binary="${1:-}"
if [ -z "$binary" ]; then
  for candidate in "$target/release/krun" "$target/debug/krun"; do
    [ -x "$candidate" ] && { binary="$candidate"; break; }
  done
fi
[ -n "$binary" ] && [ -x "$binary" ] \
  || { echo "build-local: no krun binary: run 'cargo build -p krun' or pass its path" >&2; exit 1; }
command -v buildah >/dev/null \
  || { echo "build-local: buildah is missing: run scripts/install-prereqs.sh (apt-get install buildah)" >&2; exit 1; }

work="$(mktemp -d)"
bah=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
container=""
cleanup() {
  [ -n "$container" ] && "${bah[@]}" rm "$container" >/dev/null 2>&1
  # vfs layers may carry read-only directories; make them removable first.
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/ctx/rootfs"
cp "$binary" "$work/ctx/rootfs/krun"
# Debug info is most of a debug build's size and none of its behaviour.
strip "$work/ctx/rootfs/krun" 2>/dev/null || true
if ldd "$work/ctx/rootfs/krun" >/dev/null 2>&1; then
  echo "build-local: $binary is dynamically linked; adding its loader and libraries"
  for lib in $(ldd "$work/ctx/rootfs/krun" | grep -o '/[^ ]*'); do
    mkdir -p "$work/ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$work/ctx/rootfs$lib"
  done
else
  echo "build-local: $binary is static"
fi
cp "$here/local.Dockerfile" "$work/ctx/Dockerfile"

tag="localhost/krun:local"
echo "build-local: buildah bud (FROM scratch, vfs, chroot isolation, SOURCE_DATE_EPOCH timestamps)"
"${bah[@]}" bud --quiet --isolation chroot --timestamp "${SOURCE_DATE_EPOCH:-0}" \
  -t "$tag" "$work/ctx" >/dev/null
size="$("${bah[@]}" images --format '{{.Size}}' "$tag")"
container="$("${bah[@]}" from --quiet "$tag")"
version="$("${bah[@]}" run --isolation chroot "$container" -- /krun --version)"
echo "build-local: image $tag ($size): $version"
case "$version" in
  krun\ *) ;;
  *) echo "build-local: unexpected --version output: $version" >&2; exit 1 ;;
esac
if [ -n "${2:-}" ]; then
  "${bah[@]}" push --quiet "$tag" "oci-archive:$2:$tag"
  echo "build-local: wrote $2"
fi
