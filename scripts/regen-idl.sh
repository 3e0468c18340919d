#!/usr/bin/env bash
# Regenerates interfaces/org.dnfimage.<Service>.varlink from what the built service serves
# (canonical form). Run after changing a service's methods or types:
#   cargo build --workspace && scripts/regen-idl.sh fetcher
# The integration suites fail while a committed description and its service disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
service=${1:?usage: regen-idl.sh fetcher|importer|deployer|layerer}
iface=org.dnfimage.${service^}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
case $service in
  fetcher) extra=(--state-dir "$dir/state") ;;
  # The importer opens the sysroot's repository before it listens.
  *) mkdir "$dir/sysroot" && ostree admin init-fs --modern "$dir/sysroot" >/dev/null
     extra=(--sysroot "$dir/sysroot") ;;
esac
"target/debug/dnfimage-$service" --runtime-dir "$dir" --idle-timeout 0 "${extra[@]}" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$dir/$iface" ] && break; sleep 0.05; done
python3 - "$dir/$iface" "$iface" >"$dir/raw" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"method": "org.varlink.service.GetInterfaceDescription",
                      "parameters": {"interface": sys.argv[2]}}).encode() + b"\0")
buf = b""
while not buf.endswith(b"\0"):
    buf += s.recv(65536)
print(json.loads(buf[:-1])["parameters"]["description"], end="")
PY
cargo run -q -p dnfimage-interfaces --example canonical-idl <"$dir/raw" >"interfaces/$iface.varlink"
git --no-pager diff --stat -- "interfaces/$iface.varlink"
