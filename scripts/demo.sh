#!/usr/bin/env bash
# The demo on an embedded default: builds the test OS images, serves them from a local registry
# on 127.0.0.1, starts the fetcher socket-activated in a scratch directory and shows dnf-image
# inspecting, checking and fetching an image with progress. Everything stays in .scratch/demo
# and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
demo=$PWD/.scratch/demo
rm -rf "$demo"
mkdir -p "$demo/run" "$demo/state"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

say() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }

say "Building the test OS images (base v1, v2, derived) into an OCI layout"
"$BIN/dnfimage-testimage" build --out "$demo/images"

say "Starting a registry on 127.0.0.1 and pushing them"
"$BIN/dnfimage-testimage" registry --dir "$demo/registry" > "$demo/registry.out" &
pids+=($!)
for _ in $(seq 100); do grep -q '^ADDR=' "$demo/registry.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^ADDR=//p' "$demo/registry.out")
"$BIN/dnfimage-testimage" push --oci "$demo/images" --registry "$addr" --repo dnfimage/os
printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$addr" > "$demo/registries.conf"

say "Listening on the fetcher's socket; the service starts on the first call"
export DNFIMAGE_RUNTIME_DIR=$demo/run
systemd-socket-activate -l "$demo/run/org.dnfimage.Fetcher" --fdname=varlink \
  -E DNFIMAGE_STATE_DIR="$demo/state" -E DNFIMAGE_REGISTRIES_CONF="$demo/registries.conf" \
  -E DNFIMAGE_IDLE_TIMEOUT=10 \
  "$BIN/dnfimage-fetcher" 2> "$demo/fetcher.log" &
pids+=($!)
for _ in $(seq 50); do [ -S "$demo/run/org.dnfimage.Fetcher" ] && break; sleep 0.1; done

v1=docker://$addr/dnfimage/os:base-v1
v2=docker://$addr/dnfimage/os:base-v2
cli() { echo "\$ dnf-image $*"; "$BIN/dnf-image" "$@"; }

say "Inspecting v1 (manifest and config only)"
cli image inspect "$v1"
say "Fetching v1 (4 layers at once, verified)"
cli image fetch "$v1"
say "Is there something new? v2 against what was fetched"
cli image check "$v2" --current-digest "$("$BIN/dnf-image" --json image inspect "$v1" | sed -n 's/^  "digest": "\(.*\)",$/\1/p')"
say "Fetching v2: only the changed layers are downloaded"
cli image fetch "$v2"
say "The cache"
cli image list
echo
echo "Demo done. Logs: $demo/fetcher.log"
