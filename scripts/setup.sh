#!/usr/bin/env bash
# Installs what VMBeam's build, lab and tests need on Debian 12 (as root), if missing.
set -euo pipefail
PKGS=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
      busybox-static cpio pkg-config iproute2 dbus-daemon util-linux mount kmod fonts-dejavu-core
      gcc python3-venv python3-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# libvirtd refuses to start without the libvirt-qemu user (libvirt-daemon-system creates it;
# we do not want that package's system-wide libvirtd here).
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --home-dir /var/lib/libvirt \
  --shell /usr/sbin/nologin -g libvirt-qemu libvirt-qemu
command -v cargo >/dev/null || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
