#!/usr/bin/env bash
# Installs what VMBeam's build, lab and tests need on Debian 12 (as root), if missing.
#
# The QEMU/libvirt stack (VMBEAM_STACK):
#   backports (default)  QEMU 10.0 and libvirt 11.3 from bookworm-backports, the versions of
#                        Debian 13. Only the packages built from the qemu, libvirt and seabios
#                        sources are pinned to bookworm-backports; everything else stays
#                        Debian 12's. QEMU 7.2 loses pages in precopy migrations of dirtying
#                        TCG guests (fixed in QEMU 9.0, commit 03bfc2188f), which breaks the
#                        traditional baselines here; zero-copy does not depend on it.
#   debian12             Debian 12's own QEMU 7.2 and libvirt 9.0 (what KVM hosts on Debian 12
#                        run): the same packages pinned to bookworm and downgraded to its
#                        versions. Running the default again moves them back. VMBeam's
#                        binaries link libvirt.so.0 dynamically and run on either.
set -euo pipefail
STACK=${VMBEAM_STACK:-backports}
PKGS=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
      busybox-static cpio pkg-config iproute2 dbus-daemon util-linux mount kmod fonts-dejavu-core
      gcc python3-venv python3-dev)
SOURCES=/etc/apt/sources.list.d/vmbeam-backports.sources
PIN=/etc/apt/preferences.d/vmbeam-backports
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() { ((updated)) || { apt-get update -qq; updated=1; }; }

case "$STACK" in
  backports)
    if [ ! -e "$SOURCES" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      cat >"$SOURCES" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    cat >"$PIN" <<'EOF'
# VMBeam: QEMU and libvirt (and the seabios QEMU 10 needs), only those, from bookworm-backports:
# QEMU 10.0 / libvirt 11.3, the versions of Debian 13. Written by VMBeam's scripts/setup.sh.
Package: src:qemu src:libvirt src:seabios
Pin: release n=bookworm-backports
Pin-Priority: 990
EOF
    ;;
  debian12)
    cat >"$PIN" <<'EOF'
# VMBeam: Debian 12's own QEMU 7.2 / libvirt 9.0 (VMBEAM_STACK=debian12), also over newer
# ones from bookworm-backports. Written by VMBeam's scripts/setup.sh.
Package: src:qemu src:libvirt src:seabios
Pin: release n=bookworm
Pin-Priority: 1001
EOF
    ;;
  *) echo "setup: VMBEAM_STACK must be backports or debian12, not '$STACK'" >&2; exit 2 ;;
esac

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Bring every installed package of the stack's sources to the chosen stack's version (an
# upgrade to backports, or a downgrade back to Debian 12's), so that QEMU and libvirt always
# match; packages the other stack does not have (libvirt 11 split libvirt-daemon-common and
# -log out) are removed.
want=()
while read -r p src have; do
  case "$src" in qemu|libvirt|seabios) ;; *) continue ;; esac
  apt_update
  cand=$(apt-cache policy "$p" | sed -n 's/^ *Candidate: //p')
  if [ "$STACK" = debian12 ] && [[ $cand == *bpo* ]]; then
    want+=("$p-")
  elif [ -n "$cand" ] && [ "$cand" != "(none)" ] && [ "$cand" != "$have" ]; then
    want+=("$p=$cand")
  fi
done < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${source:Package} ${Version}\n' | awk '$1=="ii" {print $2, $3, $4}')
if ((${#want[@]})); then
  echo "setup: switching to the $STACK stack: ${want[*]}"
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${want[@]}" >/dev/null
  # Files move between packages across the two stacks (libvirt 11 split libvirt-common out of
  # libvirt0): a package removed after the other was unpacked takes shared files with it
  # (seen: /usr/share/libvirt/cpu_map emptied). Reinstall what the stack now has.
  mapfile -t now < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${source:Package}\n' |
    awk '$1=="ii" && ($3=="qemu" || $3=="libvirt" || $3=="seabios") {print $2}')
  apt-get install -y -qq --no-install-recommends --reinstall "${now[@]}" >/dev/null
fi

# libvirtd refuses to start without the libvirt-qemu user (libvirt-daemon-system creates it;
# we do not want that package's system-wide libvirtd here).
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --home-dir /var/lib/libvirt \
  --shell /usr/sbin/nologin -g libvirt-qemu libvirt-qemu
command -v cargo >/dev/null || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
