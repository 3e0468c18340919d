#!/usr/bin/env bash
# Builds the derived example images with buildah, offline, from a base in an OCI layout:
#
#   examples/derived/build.sh oci:/abs/path/oci:v1 OUT
#
# writes OUT/oci:firewall and OUT/oci:tool. Each Containerfile ends with `RUN dnfimage-lint`
# (shipped in the base image), so a build that leaves /var content, /opt or caches fails.
# buildah 1.28 here: chroot isolation (crun fails on hybrid cgroups), `unshare --net` for no
# network in RUN, storage in a scratch directory removed at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
base="${1:?usage: build.sh BASE-REFERENCE OUT}"
out="${2:?usage: build.sh BASE-REFERENCE OUT}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
store="$(mktemp -d "$out/.buildah.XXXXXX")"
storage=(--root "$store/root" --runroot "$store/runroot" --storage-driver overlay)
b() { buildah "${storage[@]}" "$@"; }
cleanup() {
  b rm --all >/dev/null 2>&1 || true
  b rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$store"
}
trap cleanup EXIT

for name in ${DERIVED:-firewall tool}; do
  ctx="$store/ctx-$name"
  cp -a "$here/$name" "$ctx"
  if [ "$name" = tool ]; then
    cp "$(command -v busybox)" "$ctx/busybox"
  fi
  echo "derived: building $name from $base" >&2
  unshare --net buildah "${storage[@]}" bud --isolation chroot --no-hosts --dns none --pull=never \
    --timestamp 0 --identity-label=false --build-arg "BASE=$base" \
    -f "$ctx/Containerfile" -t "localhost/dnfimage-$name" "$ctx"
  b push "localhost/dnfimage-$name" "oci:$out/oci:$name"
done
echo "derived: done: $out/oci:firewall $out/oci:tool" >&2
