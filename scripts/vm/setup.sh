#!/usr/bin/env bash
# Installs what the VM suite (integration/tests/vm.rs) and examples/ need, as root. Idempotent.
#
# qemu-system-x86 is installed here, not in scripts/setup.sh: these machines come with
# qemu-utils 10 from bookworm-backports, whose `Breaks: qemu-system-common (<< 8.0)` rejects
# bookworm's qemu-system-x86 7.2, and no backports source is configured. Installing it replaces
# qemu-utils by bookworm's 7.2 (qemu-img 7.2 does all the suite needs), which `apt-get -y`
# allows only with --allow-downgrades.
set -euo pipefail
PACKAGES=(mmdebstrap ovmf grub-efi-amd64-bin mtools dosfstools genisoimage gdisk e2fsprogs socat
  buildah uidmap fuse-overlayfs)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86 qemu-utils/bookworm)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "vm/setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
