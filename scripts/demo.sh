#!/usr/bin/env bash
# The main job: a lab of two cloud VMs (each with its own libvirtd, system bus and vmbeamd),
# a guest that fills and dirties its memory, moved between them by a zero-copy migration and
# back by a traditional one, its memory checked after each, the outcome printed, the lab
# taken down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
L=$PWD/target/release/vmbeam-lab
MEM=${VMBEAM_DEMO_MEMORY:-1024}
RATE=${VMBEAM_DEMO_DIRTY_RATE:-5000}
trap '$L down >/dev/null 2>&1 || true' EXIT
$L up --cloud-vms 2
$L guest create web1 --memory "$MEM" --dirty-rate "$RATE" --on cvm1
$L guest check web1
echo
echo "== zero-copy: cvm1 -> cvm2 (vmbeam migrate --zero-copy, run on cvm1)"
$L exec cvm1 vmbeam migrate --zero-copy --live --persistent --undefinesource --verbose \
   web1 qemu+tcp://198.18.0.12/system | tee /tmp/vmbeam-demo-zc.txt
$L guest check web1
echo
echo "== traditional: cvm2 -> cvm1 (vmbeam migrate --no-zero-copy, run on cvm2)"
$L exec cvm2 vmbeam migrate --no-zero-copy --live --persistent --undefinesource --verbose \
   web1 qemu+tcp://198.18.0.11/system | tee /tmp/vmbeam-demo-tr.txt
$L guest check web1
echo
$L status
echo
field() { grep -m1 "$1:" "$2" | sed 's/^[^:]*: *//'; }
printf '%-16s %-14s %-14s\n' "" "zero-copy" "traditional"
for f in "total time" "downtime"; do
  printf '%-16s %-14s %-14s\n' "$f" "$(field "$f" /tmp/vmbeam-demo-zc.txt | cut -d' ' -f1-2)" \
    "$(field "$f" /tmp/vmbeam-demo-tr.txt | cut -d' ' -f1-2)"
done
human() { field "bytes on wire" "$1" | sed -n 's/.*(\(.*\))/\1/p'; }
printf '%-16s %-14s %-14s\n' "bytes on wire" "$(human /tmp/vmbeam-demo-zc.txt)" "$(human /tmp/vmbeam-demo-tr.txt)"
rm -f /tmp/vmbeam-demo-zc.txt /tmp/vmbeam-demo-tr.txt
$L down
trap - EXIT
