#!/usr/bin/env bash
# Unit tests of the OpenStack Nova shim (openstack-shim/) against the real nova package from
# PyPI, in a virtualenv this script makes once and caches:
#   /var/cache/vmbeam-nova/venv-<hash of the Python version and the requirements>
# A second run reuses it (only the shim itself is reinstalled). Needs python3 with venv, the
# Python headers, gcc, pkg-config and libvirt-dev (libvirt-python is built from source), and
# the package index.
#   scripts/test-nova.sh               make/reuse the venv, install the shim, ruff, unit tests
#                                      (under native threading, then under eventlet)
#   scripts/test-nova.sh --venv-path   print where the venv is (or would be); no side effects
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHIM=$ROOT/openstack-shim
# Debian's python3 (what nova-compute runs from on Debian 12; visible in every lab namespace).
PY=${VMBEAM_NOVA_PYTHON:-/usr/bin/python3}
CACHE=${VMBEAM_NOVA_CACHE:-/var/cache/vmbeam-nova}
key=$({ "$PY" -c 'import sys; print(sys.version)'; cat "$SHIM/requirements-test.txt" "$SHIM/constraints-test.txt"; } |
  sha256sum | cut -c1-16)
VENV=$CACHE/venv-$key
if [[ ${1:-} == --venv-path ]]; then
  echo "$VENV"
  exit 0
fi
start=$(date +%s)

if [[ ! -f $VENV/.complete ]]; then
  echo "test-nova: creating $VENV (nova from PyPI; a few minutes, once)"
  for need in gcc pkg-config; do
    command -v "$need" >/dev/null || { echo "test-nova: $need is required (apt install $need)" >&2; exit 1; }
  done
  pkg-config --exists libvirt || { echo "test-nova: libvirt-dev is required" >&2; exit 1; }
  rm -rf "$VENV" "$VENV.tmp"
  mkdir -p "$CACHE"
  # Built at its final path (a venv cannot be moved), marked complete only at the end.
  "$PY" -m venv "$VENV" || { echo "test-nova: $PY -m venv failed (apt install python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q -r "$SHIM/requirements-test.txt" -c "$SHIM/constraints-test.txt"
  touch "$VENV/.complete"
  # Venvs of earlier requirements are of no further use.
  find "$CACHE" -mindepth 1 -maxdepth 1 -name 'venv-*' ! -path "$VENV" -exec rm -rf {} +
  echo "test-nova: venv ready in $(($(date +%s) - start)) s"
else
  echo "test-nova: reusing $VENV"
fi

# The shim itself, fresh every run (no index: its dependencies are in the venv already).
"$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$SHIM" >/dev/null
rm -rf "$SHIM/build" "$SHIM"/src/*.egg-info

echo "test-nova: ruff"
lint=0
"$VENV/bin/ruff" check --no-cache "$SHIM/src" "$SHIM/tests" || lint=$?

echo "test-nova: unit tests (nova $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("nova"))'))"
cd "$SHIM"
# stestr reads openstack-shim/.stestr.conf; the shim is imported from the venv, not from src/.
rc=0
# Both of Nova 34's concurrency modes: native threading (nova-compute's default) and eventlet.
for mode in threading eventlet; do
  echo "test-nova: unit tests under $mode"
  rm -rf .stestr
  disable=$([[ $mode == threading ]] && echo 1 || echo 0)
  OS_NOVA_DISABLE_EVENTLET_PATCHING=$disable PYTHONWARNINGS=ignore::DeprecationWarning \
    "$VENV/bin/stestr" run || { echo "test-nova: unit tests FAILED under $mode"; rc=1; }
done
rm -rf .stestr
((lint == 0)) || { echo "test-nova: ruff found problems"; rc=1; }
echo "test-nova: $([[ $rc == 0 ]] && echo PASSED || echo FAILED) in $(($(date +%s) - start)) s"
exit "$rc"
