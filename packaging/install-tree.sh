#!/usr/bin/env bash
# Lays out every file VMBeam's packages install, under DESTDIR: the one place the file list
# lives (debian/rules copies the result into the .deb, the RPM spec into its buildroot).
#
#   packaging/install-tree.sh deb|rpm DESTDIR BINDIR GENDIR
#
# BINDIR holds the release binaries (vmbeamd, vmbeam, vmbeam-hook), GENDIR what
# packaging/gen wrote (man/, completions/). The two flavours differ only where Debian and
# the RPM distributions put things differently (systemd units, zsh completions).
set -euo pipefail
flavor=$1 dest=$2 bin=$3 gen=$4
files=$(cd "$(dirname "$0")/files" && pwd)
case "$flavor" in
  # Debian policy wants absolute symlinks between top-level directories, rpmlint relative ones.
  deb) unitdir=/lib/systemd/system zshdir=/usr/share/zsh/vendor-completions hook=/usr/libexec/vmbeam/vmbeam-hook ;;
  rpm) unitdir=/usr/lib/systemd/system zshdir=/usr/share/zsh/site-functions hook=../../../../usr/libexec/vmbeam/vmbeam-hook ;;
  *) echo "install-tree.sh: flavour must be deb or rpm, not '$flavor'" >&2; exit 2 ;;
esac
for b in vmbeamd vmbeam vmbeam-hook; do
  [ -x "$bin/$b" ] || { echo "install-tree.sh: $bin/$b is missing (build it first)" >&2; exit 1; }
done

i() { install -D -m "$1" "$2" "$dest$3"; }

# Programs. The hook lives in /usr/libexec and libvirt's QEMU hook directory holds a symlink
# to it: a binary is not configuration, so it must not be a conffile. Not libxl.d: vmbeamd
# has only the QEMU backend, and the hook does not say which driver called it, so a libxl
# domain would be handed to QEMU's code (xen-driver-ext/ is the placeholder). Not vmbeam-lab
# either: the lab and the bench are development tools, not the product.
i 0755 "$bin/vmbeamd" /usr/sbin/vmbeamd
i 0755 "$bin/vmbeam" /usr/bin/vmbeam
i 0755 "$bin/vmbeam-hook" /usr/libexec/vmbeam/vmbeam-hook
install -d -m 0755 "$dest/etc/libvirt/hooks/qemu.d"
ln -sfn "$hook" "$dest/etc/libvirt/hooks/qemu.d/vmbeam"

# Configuration (conffile / %config(noreplace)). The key is not shipped: the maintainer
# scripts generate it once, and nothing ever replaces it.
i 0644 "$files/vmbeam.conf" /etc/vmbeam/vmbeam.conf

# Service, D-Bus, polkit.
i 0644 "$files/vmbeamd.service" "$unitdir/vmbeamd.service"
i 0644 "$files/org.vmbeam.VMBeam1.conf" /usr/share/dbus-1/system.d/org.vmbeam.VMBeam1.conf
i 0644 "$files/org.vmbeam.VMBeam1.service" /usr/share/dbus-1/system-services/org.vmbeam.VMBeam1.service
i 0644 "$files/org.vmbeam.VMBeam1.policy" /usr/share/polkit-1/actions/org.vmbeam.VMBeam1.policy

# State: the default beam pool directory (it may become a mount point; purge keeps its contents).
install -d -m 0755 "$dest/var/lib/vmbeam" "$dest/var/lib/vmbeam/pool"

# Manual pages and completions (generated from the clap definitions by packaging/gen).
for m in "$gen"/man/*.1; do i 0644 "$m" "/usr/share/man/man1/$(basename "$m")"; done
i 0644 "$gen/man/vmbeamd.8" /usr/share/man/man8/vmbeamd.8
i 0644 "$gen/completions/vmbeam.bash" /usr/share/bash-completion/completions/vmbeam
i 0644 "$gen/completions/_vmbeam" "$zshdir/_vmbeam"
i 0644 "$gen/completions/vmbeam.fish" /usr/share/fish/vendor_completions.d/vmbeam.fish

if [ "$flavor" = rpm ]; then
  # RPM distributions leave services disabled unless a preset says otherwise; an admin's
  # own preset in /etc/systemd/system-preset/ overrides this one.
  i 0644 "$files/90-vmbeam.preset" /usr/lib/systemd/system-preset/90-vmbeam.preset
fi
