#!/usr/bin/env bash
# Runs a command while the machine is kept busy, as shared machines are: stress-ng loads
# every core (CPU workers at nice 0, plus a little memory churn) for as long as the command
# runs, then is stopped by its PID. Not part of CI; used to check that the suite passes on a
# loaded machine:
#   scripts/busy.sh scripts/test.sh
#   VMBEAM_BUSY_WORKERS=4 scripts/busy.sh scripts/test.sh zero-copy
set -uo pipefail
command -v stress-ng >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends stress-ng >/dev/null
}
workers=${VMBEAM_BUSY_WORKERS:-$(nproc)}
stress-ng --cpu "$workers" --vm 1 --vm-bytes 256M --quiet &
load=$!
trap 'kill "$load" 2>/dev/null; wait "$load" 2>/dev/null' EXIT
echo "busy.sh: stress-ng ($workers CPU workers, 1 VM worker), pid $load"
"$@"
