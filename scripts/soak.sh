#!/usr/bin/env bash
# The soak benchmark (tests/tests/faults.rs, `soak`): a few hundred zero-copy migrations of a
# dirtying guest back and forth with a fault of the matrix injected at a random phase every N
# migrations. Not part of the suite. Knobs: VMBEAM_SOAK_MIGRATIONS (300),
# VMBEAM_SOAK_FAULT_EVERY (10), VMBEAM_SOAK_SEED (the time). Prints the report (Markdown).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null || { echo "soak.sh: setup failed" >&2; exit 1; }
PROFILE=debug scripts/build.sh >/dev/null || { echo "soak.sh: build failed" >&2; exit 1; }
exec cargo test -p vmbeam-tests --features e2e --test faults -- --ignored --exact soak --nocapture --test-threads=1
