#!/usr/bin/env bash
# Builds the example base OS, a bootable Debian bookworm in ostree layout with dnfimage in it,
# as chunked OCI images: OUT/oci:v1 and OUT/oci:v2 (v2 adds /usr/share/dnfimage-os/v2 and says
# VERSION="2" in os-release). Run as root from anywhere:
#
#   examples/base/build.sh OUT
#
#   PROFILE      cargo profile of the dnfimage binaries put in the image (default debug; they
#                are built first with `cargo build`, and stripped in the image)
#   CACHE        where the mmdebstrap result is kept, keyed by the hash of mmdebstrap.args
#                (default target/vm/cache in the repository; CI starts without it)
#
# Steps: mmdebstrap (cached) → dnfimage installed with scripts/install.sh, sockets enabled →
# kernel modules trimmed to what a VM needs → dracut initramfs with the ostree module → ostree
# layout (/usr/etc, empty /var, kernel and initramfs in /usr/lib/modules/$KVER) → ostree commit
# --bootable → `dnfimage-vmimage encapsulate` (one layer per component).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
PROFILE="${PROFILE:-debug}"
target="${CARGO_TARGET_DIR:-$repo_root/target}"
CACHE="${CACHE:-$target/vm/cache}"
say() { echo "base: $(date +%T) $*" >&2; }

# 1. The binaries.
cargo_flags=()
[ "$PROFILE" = release ] && cargo_flags+=(--release)
pkgs=(-p dnf-image -p dnfimage-fetcher -p dnfimage-importer -p dnfimage-deployer -p dnfimage-vmimage)
if [ -e "$repo_root/services/layerer/src/lib.rs" ]; then pkgs+=(-p dnfimage-layerer); fi
say "cargo build ${pkgs[*]}"
(cd "$repo_root" && cargo build -q "${cargo_flags[@]}" "${pkgs[@]}")
vmimage="$target/$PROFILE/dnfimage-vmimage"

# 2. The Debian root, cached by the hash of its arguments.
mkdir -p "$CACHE"
key="$(sha256sum "$here/mmdebstrap.args" | cut -c1-16)"
tarball="$CACHE/rootfs-$key.tar"
if [ ! -e "$tarball" ]; then
  say "mmdebstrap (not cached: $tarball)"
  mapfile -t args < <(grep -v '^#' "$here/mmdebstrap.args" | sed '/^$/d')
  mmdebstrap --quiet --format=tar "${args[@]}" "$tarball.partial.tar"
  mv "$tarball.partial.tar" "$tarball"
else
  say "mmdebstrap result cached: $tarball"
fi

work="$(mktemp -d "$out/.work.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
root="$work/root"
mkdir "$root"
tar --numeric-owner -xpf "$tarball" -C "$root"
kver="$(ls "$root/lib/modules" | head -n1)"
say "root unpacked; kernel $kver"

# 3. dnfimage: binaries, units, IDL, config; sockets enabled; the lint step for derived images.
DESTDIR="$root" PROFILE="$PROFILE" CARGO_TARGET_DIR="$target" "$repo_root/scripts/install.sh"
strip --strip-debug "$root"/usr/bin/dnf-image "$root"/usr/libexec/dnfimage/* 2>/dev/null || true
install -m 0755 "$repo_root/examples/lint/dnfimage-lint" "$root/usr/bin/dnfimage-lint"
mkdir -p "$root/etc/systemd/system/sockets.target.wants"
for s in "$root"/usr/lib/systemd/system/dnfimage-*.socket; do
  ln -sf "/usr/lib/systemd/system/$(basename "$s")" "$root/etc/systemd/system/sockets.target.wants/"
done

# An rpm database where Fedora keeps it, so the image is a base for client-side layering
# (Debian's rpm would use ~/.rpmdb).
mkdir -p "$root/usr/lib/sysimage/rpm" "$root/etc/rpm"
echo '%_dbpath /usr/lib/sysimage/rpm' >"$root/etc/rpm/macros.dbpath"
chroot "$root" rpm --initdb
rm -f "$root/usr/lib/sysimage/rpm/.rpm.lock"

# 4. System configuration.
echo dnfimage-os >"$root/etc/hostname"
: >"$root/etc/machine-id"
rm -f "$root"/etc/ssh/ssh_host_*            # each machine makes its own (cloud-init, sshd)
cat >"$root/etc/fstab" <<'FSTAB'
LABEL=dnfimage-boot /boot ext4 defaults 0 2
FSTAB
mkdir -p "$root/etc/cloud/cloud.cfg.d"
cat >"$root/etc/cloud/cloud.cfg.d/90-dnfimage.cfg" <<'CLOUD'
# Local seeds only (a cidata volume): no network probing for cloud metadata services.
datasource_list: [ NoCloud, None ]
# The image has no locale data: C.UTF-8 is built in.
locale: C.UTF-8
CLOUD
# The directories /var holds on an ostree host, made at boot (the image ships no /var content).
cat >"$root/usr/lib/tmpfiles.d/dnfimage-os.conf" <<'TMPF'
d /var/home 0755 root root -
d /var/roothome 0700 root root -
d /var/opt 0755 root root -
d /var/srv 0755 root root -
d /var/mnt 0755 root root -
d /var/usrlocal 0755 root root -
d /var/lib/dnfimage 0755 root root -
TMPF

# 5. Kernel modules a VM does not need go; then the initramfs, with ostree's dracut module.
mods="$root/usr/lib/modules/$kver/kernel"
rm -rf "$mods"/drivers/{gpu,media,infiniband,net/wireless,net/ethernet,staging,bluetooth,iio,isdn,hwmon,scsi/qla2xxx,scsi/lpfc,scsi/mpt3sas,video,usb/gadget} \
  "$mods"/sound "$mods"/net/{bluetooth,mac80211,wireless}
chroot "$root" depmod "$kver"
unshare --mount --fork bash -euc '
  root="$1"; kver="$2"
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs tmpfs "$root/tmp"
  chroot "$root" dracut --quiet --force --no-hostonly --add ostree \
    --omit "plymouth i18n nfs iscsi lvm dm mdraid multipath crypt btrfs nvdimm fcoe" \
    --kver "$kver" "/usr/lib/modules/$kver/initramfs.img"
' _ "$root" "$kver"
say "initramfs: $(du -h "$root/usr/lib/modules/$kver/initramfs.img" | cut -f1)"

# 6. ostree layout.
cp "$root/boot/vmlinuz-$kver" "$root/usr/lib/modules/$kver/vmlinuz"
rm -rf "$root"/boot/* "$root"/var/* "$root"/tmp/* "$root"/run/* "$root"/dev/* "$root"/proc/* "$root"/sys/*
rm -rf "$root"/var "$root"/home "$root"/root "$root"/opt "$root"/srv "$root"/mnt "$root"/media "$root"/usr/local
mkdir "$root/var" "$root/sysroot"
ln -s var/home "$root/home"
ln -s var/roothome "$root/root"
ln -s var/opt "$root/opt"
ln -s var/srv "$root/srv"
ln -s var/mnt "$root/mnt"
ln -s run/media "$root/media"
ln -s ../var/usrlocal "$root/usr/local"
ln -s sysroot/ostree "$root/ostree"
mv "$root/etc" "$root/usr/etc"
rm -rf "$root"/usr/share/doc/* "$root"/var/cache/* 2>/dev/null || true
find "$root" -name '__pycache__' -prune -exec rm -rf {} +

# The base passes the lint step its derived images end with.
"$repo_root/examples/lint/dnfimage-lint" "$root"

# 7. Commit v1 and v2 and encapsulate them.
repo="$work/repo"
ostree --repo="$repo" init --mode=bare
commit() {
  local version="$1"
  sed -i -e '/^VERSION=/d' -e '/^VERSION_ID=/d' -e '/^IMAGE_VERSION=/d' "$root/usr/lib/os-release"
  printf 'VERSION="%s (dnfimage example)"\nIMAGE_VERSION=%s\n' "$version" "$version" >>"$root/usr/lib/os-release"
  ostree --repo="$repo" commit --branch="dnfimage-os/v$version" --tree=dir="$root" --bootable \
    --no-xattrs --add-metadata-string=version="$version" --subject="dnfimage example OS $version" >/dev/null
  say "committed v$version; encapsulating"
  "$vmimage" encapsulate --repo "$repo" --rev "dnfimage-os/v$version" --oci "$out/oci:v$version" \
    --version "$version"
}
mkdir -p "$root/usr/share/dnfimage-os"
echo 1 >"$root/usr/share/dnfimage-os/version"
commit 1
echo 2 >"$root/usr/share/dnfimage-os/version"
echo "This file is new in version 2." >"$root/usr/share/dnfimage-os/v2"
commit 2
say "done: $out/oci:v1 $out/oci:v2 ($(du -sh "$out/oci" | cut -f1))"
