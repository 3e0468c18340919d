#!/usr/bin/env bash
# Installs dnfimage into DESTDIR (default /): the services' binaries, the CLI, the systemd
# units, the varlink interface descriptions and the default configuration. `make install`
# runs it. It installs what is built and builds nothing: a service binary not built yet is
# skipped with a message.
#
#   DESTDIR     staging root (default: empty, i.e. /)
#   PREFIX      installation prefix (default /usr); units name their binaries under it
#   SYSCONFDIR  configuration directory (default /etc)
#   PROFILE     cargo profile whose binaries to install: release (default) or debug
#   CARGO_TARGET_DIR  cargo's target directory (default: target/ in the repository)
#   DNF_PLUGINDIR     dnf's plugin directory (default: the system python3's dnf.const.PLUGINPATH
#                     with PREFIX for /usr; the plugin is skipped when dnf is not installed)
#
# Layout (PREFIX=/usr):
#   /usr/bin/dnf-image                           the command line
#   /usr/libexec/dnfimage/dnfimage-<service>     the services (FHS: run by systemd, not users)
#   /usr/lib/systemd/system/dnfimage-*           socket, service and timer units (not enabled)
#   /usr/share/varlink/org.dnfimage.*.varlink    the interfaces, as `varlinkctl introspect` shows
#   /usr/share/doc/dnfimage/units.md             what the units allow and why
#   /etc/dnfimage/dnfimage.conf                  the default configuration, never overwritten
#   /usr/share/man/man{5,8}/                     manual pages: dnf-image(8) and one a subcommand,
#                                                the services and units, dnfimage.conf(5)
#   /usr/share/bash-completion/completions/dnf-image, /usr/share/zsh/site-functions/_dnf-image,
#   /usr/share/fish/vendor_completions.d/dnf-image.fish   shell completions
# (pages and completions are made by the built dnfimage-docs from the clap definitions)
#   /usr/lib/python3/dist-packages/dnf-plugins/dnfimage.py   the dnf plugin: `dnf image ...`,
#                                                `dnf upgrade` and `dnf install` on an image host
#
# Enabling is left to the administrator or the package: `systemctl enable --now
# dnfimage-fetcher.socket ...` (the sockets and the timer carry [Install] sections).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr}"
SYSCONFDIR="${SYSCONFDIR:-/etc}"
PROFILE="${PROFILE:-release}"
target="${CARGO_TARGET_DIR:-$root/target}"

case "$PROFILE" in
  release | debug) ;;
  *) echo "install: PROFILE must be release or debug, not '$PROFILE'" >&2; exit 2 ;;
esac
case "$PREFIX" in
  /*) ;;
  *) echo "install: PREFIX must be an absolute path, not '$PREFIX'" >&2; exit 2 ;;
esac
PREFIX="${PREFIX%/}"
bindir="$target/$PROFILE"

SERVICES=(fetcher importer deployer layerer)
libexecdir="$PREFIX/libexec/dnfimage"
unitdir="$PREFIX/lib/systemd/system"
varlinkdir="$PREFIX/share/varlink"
docdir="$PREFIX/share/doc/dnfimage"
mandir="$PREFIX/share/man"
confdir="$SYSCONFDIR/dnfimage"

say() { echo "install: $*" >&2; }

# Installs $1 as $DESTDIR$2 with mode $3.
put() {
  install -D -m "$3" "$1" "$DESTDIR$2"
}

# The units name /usr paths; another PREFIX or SYSCONFDIR is written into the copies.
put_unit() {
  local src="$1" dest="$DESTDIR$unitdir/$(basename "$1")"
  install -d -m 0755 "$(dirname "$dest")"
  sed -e "s|/usr/libexec/dnfimage/|$libexecdir/|g" \
    -e "s|/usr/bin/dnf-image|$PREFIX/bin/dnf-image|g" \
    -e "s|file:/usr/share/|file:$PREFIX/share/|g" \
    -e "s|/etc/dnfimage/|$confdir/|g" \
    "$src" >"$dest.tmp"
  chmod 0644 "$dest.tmp"
  mv "$dest.tmp" "$dest"
}

installed=()
if [ -x "$bindir/dnf-image" ]; then
  put "$bindir/dnf-image" "$PREFIX/bin/dnf-image" 0755
  installed+=("$PREFIX/bin/dnf-image")
else
  say "dnf-image is not built in $bindir; skipping it"
fi
for s in "${SERVICES[@]}"; do
  if [ -x "$bindir/dnfimage-$s" ]; then
    put "$bindir/dnfimage-$s" "$libexecdir/dnfimage-$s" 0755
    installed+=("$libexecdir/dnfimage-$s")
  else
    say "dnfimage-$s is not built in $bindir; skipping it (its units are installed anyway)"
  fi
done

for unit in "$root"/units/dnfimage-*.{socket,service,timer}; do
  put_unit "$unit"
done
for idl in "$root"/interfaces/org.dnfimage.*.varlink; do
  put "$idl" "$varlinkdir/$(basename "$idl")" 0644
done
put "$root/units/README.md" "$docdir/units.md" 0644

if [ -x "$bindir/dnfimage-docs" ]; then
  generated="$(mktemp -d)"
  trap 'rm -rf "$generated"' EXIT
  "$bindir/dnfimage-docs" "$generated"
  for page in "$generated"/man[58]/*; do
    put "$page" "$mandir/$(basename "$(dirname "$page")")/$(basename "$page")" 0644
  done
  put "$generated/completions/bash/dnf-image" "$PREFIX/share/bash-completion/completions/dnf-image" 0644
  put "$generated/completions/zsh/_dnf-image" "$PREFIX/share/zsh/site-functions/_dnf-image" 0644
  put "$generated/completions/fish/dnf-image.fish" \
    "$PREFIX/share/fish/vendor_completions.d/dnf-image.fish" 0644
else
  say "dnfimage-docs is not built in $bindir; skipping the manual pages and shell completions"
fi

# dnf's plugin directory, as the system's dnf names it (Debian: python3/dist-packages, Fedora:
# python3.X/site-packages).
dnf_plugindir="${DNF_PLUGINDIR:-}"
if [ -z "$dnf_plugindir" ] && [ -x /usr/bin/python3 ]; then
  dnf_plugindir="$(/usr/bin/python3 -c 'import dnf.const; print(dnf.const.PLUGINPATH)' 2>/dev/null || true)"
  [ -n "$dnf_plugindir" ] && dnf_plugindir="$PREFIX${dnf_plugindir#/usr}"
fi
if [ -n "$dnf_plugindir" ]; then
  put "$root/dnf-plugin/dnfimage.py" "$dnf_plugindir/dnfimage.py" 0644
else
  say "dnf (python3-dnf) is not installed here; skipping the dnf plugin (set DNF_PLUGINDIR)"
fi

if [ -e "$DESTDIR$confdir/dnfimage.conf" ]; then
  say "$DESTDIR$confdir/dnfimage.conf exists; leaving it as it is"
else
  put "$root/config/dnfimage.conf" "$confdir/dnfimage.conf" 0644
fi

say "installed into ${DESTDIR:-/} (prefix $PREFIX, $PROFILE binaries): ${installed[*]:-no binaries}"
