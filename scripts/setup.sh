#!/usr/bin/env bash
# Installs everything dnfimage needs to build, test and run its demo on Debian bookworm (as
# root). Idempotent and quick when all is there already: `make` targets call it first.
set -euo pipefail

APT_PACKAGES=(
  # Building: libostree for the ostree/ostree-ext crates, and their C dependencies.
  build-essential pkg-config libostree-dev libglib2.0-dev libssl-dev libzstd-dev
  # Real parts the services drive and the tests start.
  ostree skopeo docker-registry
  # htpasswd: the test registry that requires credentials (testimage's Registry::start_with_auth).
  apache2-utils
  # dnf and its Python API: the layerer resolves with dnf, the dnf plugin (dnf-plugin/) runs in it.
  rpm dnf python3-dnf createrepo-c bubblewrap
  # Layering: rpm-signing keys for the test packages, the rpmdb WAL checkpoint.
  gnupg sqlite3
  systemd util-linux e2fsprogs
  # systemd-nspawn: the units under systemd as PID 1 (integration/tests/units.rs).
  systemd-container
  # grub-syslinux2cfg: how GRUB reads the boot menu libostree keeps (tests/deployer.rs).
  grub-common
  # etcd (3.4) and etcdctl: the fleet tests' coordination store (integration/tests/fleet.rs).
  etcd-server etcd-client
  # The test image factory copies a static busybox into its images.
  busybox-static
  python3 python3-pip
  # The generated manual pages are rendered by the test that checks them (docs/tests).
  groff-base man-db
)
PIP_PACKAGES=(varlink jsonschema)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: these packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for p in "${PIP_PACKAGES[@]}"; do
  python3 -c "import $p" 2>/dev/null && continue
  echo "setup: pip install $p" >&2
  python3 -m pip install -q --root-user-action=ignore "$p" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "$p"
done

command -v cargo >/dev/null || { echo "setup: cargo (the Rust toolchain) is required" >&2; exit 1; }
