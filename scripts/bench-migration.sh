#!/usr/bin/env bash
# Benchmark (prints figures; asserts nothing): zero-copy next to traditional migration of the
# same guests on the lab. Sizes and dirty rates as the engine issue asks: 160 MiB (the smallest lab guest), 1 GiB and
# 4 GiB idle guests, and a 2 GiB guest dirtying 0, 10,000 and 100,000 pages/s. Zero-copy runs
# RUNS times (median reported), traditional once (it is the slow one). Quick mode (QUICK=1)
# uses 160 MiB / 512 MiB and one dirty rate.
set -euo pipefail
cd "$(dirname "$0")/.."
L=$PWD/target/release/vmbeam-lab
[ -x "$L" ] || { echo "build first: scripts/build.sh" >&2; exit 4; }
RUNS=${RUNS:-3}
if [ "${QUICK:-0}" = 1 ]; then
  CASES=("160 0" "512 0" "512 10000")
else
  CASES=("160 0" "1024 0" "4096 0" "2048 0" "2048 10000" "2048 100000")
fi
trap '$L down >/dev/null 2>&1 || true' EXIT
$L down >/dev/null 2>&1 || true
$L up --cloud-vms 2 >/dev/null
accel=$($L status | sed -n 's/^accelerator: \([a-z]*\).*/\1/p')
field() { sed -n "s/^ *$1: *//p" | head -1; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }
echo "# VMBeam migration benchmark: $(date -u +%FT%TZ), $(nproc) cores, accel=$accel, host $(uname -r)"
printf '%-8s %-7s | %-9s %-9s %-10s | %-9s %-9s %-12s | %s\n' \
  "mem MiB" "dirty/s" "zc total" "zc down" "zc bytes" "tr total" "tr down" "tr bytes" "zc timeline (median run)"
n=0
for c in "${CASES[@]}"; do
  set -- $c; mem=$1; rate=$2; n=$((n+1)); g="bench$n"
  $L guest create "$g" --memory "$mem" --dirty-rate "$rate" --on cvm1 >/dev/null
  tot=(); down=(); bytes=(); tl=()
  from=1; to=2
  for r in $(seq "$RUNS"); do
    out=$($L exec cvm$from vmbeam migrate --zero-copy --live --persistent --undefinesource --verbose \
          "$g" "qemu+tcp://198.18.0.1$to/system" 2>/dev/null)
    tot+=("$(echo "$out" | field 'total time' | cut -d' ' -f1)")
    down+=("$(echo "$out" | field 'downtime' | cut -d' ' -f1)")
    bytes+=("$(echo "$out" | field 'bytes on wire' | cut -d' ' -f1)")
    tl+=("$(echo "$out" | field 'timeline (ms)')")
    t=$from; from=$to; to=$t
  done
  $L guest check "$g" >/dev/null
  mt=$(printf '%s\n' "${tot[@]}" | median); md=$(printf '%s\n' "${down[@]}" | median)
  mb=$(printf '%s\n' "${bytes[@]}" | median)
  tline=${tl[$((RUNS/2))]}
  # A copying migration may never converge under a high dirty rate: like virsh --timeout, the
  # guest is suspended after TR_TIMEOUT seconds so it completes (its downtime shows that).
  out=$($L exec cvm$from vmbeam migrate --no-zero-copy --live --persistent --undefinesource \
        --timeout "${TR_TIMEOUT:-60}" "$g" "qemu+tcp://198.18.0.1$to/system")
  tt=$(echo "$out" | field 'total time' | cut -d' ' -f1)
  td=$(echo "$out" | field 'downtime' | cut -d' ' -f1)
  tb=$(echo "$out" | field 'bytes on wire' | cut -d' ' -f1)
  $L guest check "$g" >/dev/null
  printf '%-8s %-7s | %-9s %-9s %-10s | %-9s %-9s %-12s | %s\n' "$mem" "$rate" "${mt}ms" "${md}ms" "$mb" "${tt}ms" "${td}ms" "$tb" "$tline"
  $L guest destroy "$g" >/dev/null
done
$L down >/dev/null
trap - EXIT
