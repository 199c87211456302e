#!/usr/bin/env bash
# The whole fault matrix (every fault at every phase of a zero-copy migration; see
# tests/tests/faults.rs), about 45 s a cell, 56 cells: not part of the suite, which runs one
# cell per fault. Prints the cell-by-cell table (Markdown) at the end and into
# target/fault-matrix-<date>.md. One cell: VMBEAM_FAULT_CELL=KillDestQemu@Confirm.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null || { echo "fault-matrix.sh: setup failed" >&2; exit 1; }
PROFILE=debug scripts/build.sh >/dev/null || { echo "fault-matrix.sh: build failed" >&2; exit 1; }
out="target/fault-matrix-$(date -u +%Y-%m-%d).md"
VMBEAM_FAULT_MATRIX=${VMBEAM_FAULT_MATRIX:-full} cargo test -p vmbeam-tests --features e2e \
  --test faults -- --test-threads=1 --nocapture 2>&1 | tee target/fault-matrix.log
rc=${PIPESTATUS[0]}
# The last table printed is the whole run's.
awk '/^\| fault \|/{buf=""} /^\|/{buf=buf $0 "\n"} END{printf "%s", buf}' target/fault-matrix.log > "$out"
echo "table: $out"
exit "$rc"
