#!/usr/bin/env bash
# The whole test suite: formatting, lints and unused dependencies, unit tests, the QEMU
# backend's tests against real QEMU processes, the Nova shim's tests against the real nova
# package, and the end-to-end tiers on the real lab (libvirtd, QEMU, dbus-daemon, vmbeamd, the
# guest agent, Nova's live-migration loop, Nova's API with its services, `vmbeam-lab bench
# --quick`) and the packages.
# Needs root on Debian 12.
#
# The tiers follow crosvm's policy: `cargo test --workspace` alone is the unit tier (no root,
# no QEMU, no lab). The rest is behind cargo features that only the tiers below turn on:
# vmbeam-qemu's `qemu-tests` (real QEMU processes), vmbeam-lab's and vmbeam-bench's
# `root-tests` (unit tests that need root: the guest image's build and boot, setns), and
# vmbeam-tests' `e2e` (the lab and the packages).
#
# Every tier runs even when an earlier one fails (only a failed setup or build stops the
# rest: nothing after it could run); the script ends with one summary of every tier, its
# time and what failed, and exits 1 if anything failed.
#   scripts/test.sh                  everything
#   scripts/test.sh TIER...          only these tiers (names as in the summary)
#   VMBEAM_STACK=debian12 scripts/test.sh zero-copy lab
#                                    Debian 12's own QEMU 7.2 / libvirt 9.0 (scripts/setup.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(format clippy units qemu root-units nova-shim lab zero-copy faults nested nova-e2e openstack bench packaging)
want=("$@")
((${#want[@]})) || want=("${ALL[@]}")
for t in "${want[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "test.sh: unknown tier '$t' (tiers: ${ALL[*]})" >&2; exit 2; }
done

LOG_DIR=${VMBEAM_TEST_LOGS:-target/test-logs}
mkdir -p "$LOG_DIR"
T_START=$(date +%s)
declare -a SUMMARY=()
failed=0

# Runs one tier: its output goes to the terminal and to $LOG_DIR/<tier>.log; for cargo
# tiers the names of failed tests are collected for the summary.
tier() {
  local name=$1; shift
  if [[ " ${ALL[*]} " != *" $name "* ]]; then
    # A tier missing from ALL would never run by default: say so, never skip it silently.
    SUMMARY+=("$(printf '  %-10s FAIL  (not in test.sh'"'"'s ALL list)' "$name")"); failed=1; return 0
  fi
  [[ " ${want[*]} " == *" $name "* ]] || return 0
  local log=$LOG_DIR/$name.log t0 rc
  t0=$(date +%s)
  echo
  echo "=== tier $name: $*"
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  if ((rc == 0)); then
    SUMMARY+=("$(printf '  %-10s pass  %5ss' "$name" "$dt")")
  else
    failed=1
    local which
    # cargo's closing "failures:" list (robust to output interleaved with "test X ... FAILED")
    which=$(awk '/^failures:$/{f=1;next} /^test result/{f=0} f && /^    [A-Za-z0-9_:]+$/{sub(/^ +/,""); print}' "$log" |
      sort -u | head -20 | paste -sd' ' -)
    SUMMARY+=("$(printf '  %-10s FAIL  %5ss  %s' "$name" "$dt" "${which:-(exit $rc; see $log)}")")
  fi
  return 0
}

summary() {
  echo
  echo "=== summary ($(qemu-system-x86_64 --version 2>/dev/null | head -1 | sed 's/ (.*//'), libvirt $(libvirtd --version 2>/dev/null | awk '{print $NF}'), $(( $(date +%s) - T_START ))s in all; logs in $LOG_DIR)"
  printf '%s\n' "${SUMMARY[@]}"
  if ((failed)); then echo "=== FAILED"; else echo "=== all tiers passed"; fi
}

if ! scripts/setup.sh; then
  echo "test.sh: setup failed" >&2; exit 1
fi
tier format cargo fmt --all --check
# Every target with every feature, so the feature-gated QEMU and end-to-end tests are linted;
# then unused dependencies (cargo-machete, installed into ~/.cargo/bin on first use).
tier clippy bash -c 'cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
  a=$?
  command -v cargo-machete >/dev/null || cargo install --quiet --locked cargo-machete --version 0.9.2
  cargo machete; exit $((a | $?))'
if ! PROFILE=debug scripts/build.sh; then
  SUMMARY+=("  build      FAIL  (nothing else could run)"); failed=1; summary; exit 1
fi
# Unit tests of every crate (and the guest agent's process tests): plain `cargo test`, nothing
# needs root or starts QEMU.
tier units cargo test --workspace --no-fail-fast -- --test-threads=1
# The QEMU backend against real QEMU processes (a private QEMU per test in a temp directory,
# TCG; no root, no lab).
tier qemu cargo test -p vmbeam-qemu --features qemu-tests --no-fail-fast --test qemu -- --test-threads=1
# Unit tests that need root but no lab: the guest image built (apt-get download into
# /var/cache/vmbeam-lab) and booted under QEMU with the static agent, and the bench's web
# clients entering a network namespace.
tier root-units cargo test -p vmbeam-lab -p vmbeam-bench --features vmbeam-lab/root-tests,vmbeam-bench/root-tests \
  --no-fail-fast --lib -- --test-threads=1 image::tests::boot webload::tests
# The Nova shim: its venv (nova from PyPI, cached), ruff and unit tests; the venv is also what
# the nova-e2e tier runs Nova's live-migration loop with on the lab.
tier nova-shim scripts/test-nova.sh
# The end-to-end tiers share one host-wide lab: one test at a time.
e2e() { cargo test -p vmbeam-tests --features e2e --no-fail-fast --test "$1" -- --test-threads=1; }
tier lab e2e lab
tier zero-copy e2e zero_copy
# One cell of the fault matrix per fault (kill -9 of either side's QEMU, libvirtd, vmbeamd; the
# link cut; domjobabort), each at the phase most likely to break; the whole matrix is
# scripts/fault-matrix.sh.
tier faults e2e faults
# The paper's topology: cloud VMs that are real QEMU VMs (TCG; KVM where the boot probe
# allows) under a private host libvirtd, vmbeam-host on the host sharing and releasing each
# guest's RAM device; a guest moved zero-copy between them by `vmbeam migrate` inside the
# source cloud VM, a destination killed mid-migration, a cloud VM of another virtual IaaS cloud.
tier nested e2e nested
tier nova-e2e e2e nova_shim
# OpenStack through Nova's real API: the control plane of scripts/openstack.sh (Keystone,
# Glance, Placement, Nova's services, MariaDB, RabbitMQ, the Neutron stand-in; its Debian
# packages and venv installed on first use, then cached) and a nova-compute in each of three
# cloud VMs; `openstack server migrate --live-migration` and os-migrateLive.
openstack_api() { scripts/openstack.sh install && e2e nova_api; }
tier openstack openstack_api
tier bench e2e bench
tier packaging e2e packaging
summary
exit $failed
