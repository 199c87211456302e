#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, the Nova shim's tests against the real
# nova package, and the end-to-end tiers on the real lab (libvirtd, QEMU, dbus-daemon,
# vmbeamd, the guest agent, Nova's live-migration loop, `vmbeam bench --quick`) and the
# packages. Needs root on Debian 12.
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
ALL=(format clippy units nova-shim lab zero-copy nova-e2e bench packaging)
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
tier clippy cargo clippy --workspace --all-targets --quiet -- -D warnings
if ! PROFILE=debug scripts/build.sh; then
  SUMMARY+=("  build      FAIL  (nothing else could run)"); failed=1; summary; exit 1
fi
# Unit tests of every crate (and the guest agent's and QEMU backend's process tests), not the
# end-to-end tiers below.
tier units bash -c 'cargo test --workspace --exclude vmbeam-tests --no-fail-fast -- --test-threads=1
  a=$?; cargo test -p vmbeam-tests --lib --no-fail-fast; exit $((a | $?))'
# The Nova shim: its venv (nova from PyPI, cached), ruff and unit tests; the venv is also what
# the nova-e2e tier runs Nova's live-migration loop with on the lab.
tier nova-shim scripts/test-nova.sh
# The end-to-end tiers share one host-wide lab: one test at a time.
e2e() { cargo test -p vmbeam-tests --no-fail-fast --test "$1" -- --test-threads=1; }
tier lab e2e lab
tier zero-copy e2e zero_copy
tier nova-e2e e2e nova_shim
tier bench e2e bench
tier packaging e2e packaging
summary
exit $failed
