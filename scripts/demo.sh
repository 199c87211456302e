#!/usr/bin/env bash
# The main job: a lab of two cloud VMs, a guest dirtying memory, migrated between them,
# its memory checked, the outcome printed, the lab taken down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
V=target/release/vmbeam
trap '$V lab down >/dev/null 2>&1 || true' EXIT
$V lab up --cloud-vms 2
$V lab guest create web1 --memory 512 --dirty-rate 5000 --on cvm1
$V lab guest check web1
$V -c qemu+tcp://198.18.0.11/system migrate --live --persistent --undefinesource --verbose --no-zero-copy \
   web1 qemu+tcp://198.18.0.12/system tcp://198.18.0.12
$V lab guest check web1
$V lab status
$V lab down
trap - EXIT
