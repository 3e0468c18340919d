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
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; pkill -TERM -P "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
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

say "A scratch sysroot (ostree admin init-fs + os-init), like a freshly installed disk"
mkdir -p "$demo/sysroot"
ostree admin init-fs --modern "$demo/sysroot" >/dev/null
ostree admin os-init default --sysroot="$demo/sysroot" >/dev/null
chattr_clean() { chattr -R -i "$demo/sysroot/ostree/deploy" 2>/dev/null || true; }
trap 'cleanup; chattr_clean' EXIT

say "Listening on the services' sockets; each service starts on its first call and exits when idle"
export DNFIMAGE_RUNTIME_DIR=$demo/run
activate() { # service, extra env...
  local name=$1; shift
  local iface=org.dnfimage.${name^}
  # Like a .socket unit: listen again after the service exits on idle.
  ( while :; do
      systemd-socket-activate -l "$demo/run/$iface" --fdname=varlink -E DNFIMAGE_IDLE_TIMEOUT=10 "$@" \
        "$BIN/dnfimage-$name" 2>> "$demo/$name.log" || sleep 0.2
    done ) &
  pids+=($!)
}
activate fetcher -E DNFIMAGE_STATE_DIR="$demo/state" -E DNFIMAGE_REGISTRIES_CONF="$demo/registries.conf"
activate importer -E DNFIMAGE_SYSROOT="$demo/sysroot"
activate deployer -E DNFIMAGE_SYSROOT="$demo/sysroot"

# A signed package repository on 127.0.0.1 for client-side layering.
"$BIN/dnfimage-testimage" rpms --serve > "$demo/rpms.out" &
pids+=($!)
for _ in $(seq 100); do grep -q '^URL=' "$demo/rpms.out" 2>/dev/null && break; sleep 0.1; done
mkdir -p "$demo/repos.d"
printf '[dnfimage-demo]\nname=dnfimage demo packages\nbaseurl=%s\nenabled=1\ngpgcheck=1\n' \
  "$(sed -n 's/^URL=//p' "$demo/rpms.out")" > "$demo/repos.d/demo.repo"
activate layerer -E DNFIMAGE_SYSROOT="$demo/sysroot" -E DNFIMAGE_STATE_DIR="$demo/state" \
  -E DNFIMAGE_REPOS_DIR="$demo/repos.d" -E DNFIMAGE_GPG_KEY_DIR="$(sed -n 's/^KEYS=//p' "$demo/rpms.out")"
for s in Fetcher Importer Deployer Layerer; do
  for _ in $(seq 50); do [ -S "$demo/run/org.dnfimage.$s" ] && break; sleep 0.1; done
done

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

"$BIN/dnfimage-testimage" push --oci "$demo/images" --registry "$addr" --repo dnfimage/os --tag base-v1 >/dev/null
skopeo copy -q --dest-tls-verify=false "oci:$demo/images:base-v1" "docker://$addr/dnfimage/os:latest"
latest=docker://$addr/dnfimage/os:latest
say "Rebase the scratch host onto dnfimage/os:latest (v1): fetch → import → deploy"
cli --sysroot "$demo/sysroot" rebase "$latest"
cli --sysroot "$demo/sysroot" status

say "v2 is published as latest: what would an upgrade download?"
skopeo copy -q --dest-tls-verify=false "oci:$demo/images:base-v2" "docker://$addr/dnfimage/os:latest"
cli --sysroot "$demo/sysroot" upgrade --check
say "Upgrade"
cli --sysroot "$demo/sysroot" upgrade
cli --sysroot "$demo/sysroot" status
say "Upgrade again: nothing to do (exit 77 with --unchanged-exit-77)"
cli --sysroot "$demo/sysroot" upgrade --unchanged-exit-77 || echo "exit code $?"
say "Rollback: v1 boots next again"
cli --sysroot "$demo/sysroot" rollback
cli --sysroot "$demo/sysroot" status --booted

say "Layer a package on this machine only (its dependency comes along)"
cli --sysroot "$demo/sysroot" install dnfimage-hello
cli --sysroot "$demo/sysroot" status --booted
say "Reset: back to the image as built"
cli --sysroot "$demo/sysroot" reset
cli --sysroot "$demo/sysroot" status --booted
echo
echo "Demo done. Logs: $demo/*.log"
