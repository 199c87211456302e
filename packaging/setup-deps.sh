#!/usr/bin/env bash
# Installs the Debian packages VMBeam's packaging needs, if missing (as root, on Debian 12).
#   packaging/setup-deps.sh build   what scripts/package.sh needs (dpkg-dev, debhelper, rpm)
#   packaging/setup-deps.sh test    and what tests/tests/packaging.rs needs (lintian, rpmlint,
#                                   debootstrap)
set -euo pipefail
pkgs=(dpkg-dev debhelper rpm)
[ "${1:-build}" = test ] && pkgs+=(lintian rpmlint debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "packaging: missing ${missing[*]}; install them (Debian packages) and retry" >&2
  exit 1
fi
echo "packaging: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
