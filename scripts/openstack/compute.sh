# shellcheck shell=bash
# nova-compute inside the lab's cloud VMs (sourced by scripts/openstack.sh).
#
#   scripts/openstack.sh compute [--ns NAME] [--state-dir DIR] [--lab BIN] CVM...
#
# Starts one nova-compute in each named cloud VM of the running lab (`vmbeam-lab up`), in
# the cloud VM's own namespaces (`vmbeam-lab exec`): its libvirtd (qemu:///system), its
# system bus and vmbeamd, its /run. Each gets a nova.conf of its own,
# <state>/computes/<cvm>/nova.conf: the control plane's compute.conf plus this host's
# name (the cloud VM's), address, the VMBeam driver, and Nova's instances directory
# shared by all computes (<state>/instances: every cloud VM sees the host's file system
# outside its private directories, as computes on shared instance storage do). Then it
# waits until each is registered and up, maps them into cell1 and waits for their
# resource providers in Placement. Idempotent: a compute already running is left.
# `down` stops them before the control plane.

# The vmbeam-lab binary: --lab, else on PATH, else this checkout's debug build.
lab_bin() {
  if [[ -n ${LAB_BIN:-} ]]; then
    printf '%s' "$LAB_BIN"
  elif command -v vmbeam-lab >/dev/null; then
    command -v vmbeam-lab
  else
    printf '%s' "$ROOT/target/debug/vmbeam-lab"
  fi
}

# "NAME ADDR" of cloud VM $1 from the lab's state, or nothing.
lab_cvm() {
  "$PY" - "$1" <<'EOF'
import json, sys
try:
    with open("/run/vmbeam-lab/state.json") as f:
        st = json.load(f)
except FileNotFoundError:
    sys.exit(0)
for c in st.get("cloud_vms", []):
    if c["name"] == sys.argv[1]:
        print(c["name"], c["addr"])
EOF
}

# Cloud VM names with a recorded nova-compute.
recorded_computes() {
  local f
  for f in "$RUN"/nova-compute@*.pid; do
    [[ -e $f ]] || continue
    f=${f##*/nova-compute@}
    printf '%s\n' "${f%.pid}"
  done
}

stop_computes() {
  local names=() c
  while read -r c; do names+=("nova-compute@$c"); done < <(recorded_computes)
  ((${#names[@]} == 0)) || stop_svcs 30 "${names[@]}"
}

write_nova_compute_conf() {
  local cvm=$1 addr=$2 conf=$3
  {
    cat "$STATE/compute.conf"
    cat <<EOF

# This compute: cloud VM $cvm of the VMBeam lab (scripts/openstack.sh compute).
[DEFAULT]
host = $cvm
my_ip = $addr
compute_driver = vmbeam.VMBeamLibvirtDriver
# Inside the cloud VM: its private /run (gone with the lab).
state_path = /run/nova
# Shared by every compute (the host's file system), as on NFS or CephFS instance storage:
# Nova then live-migrates without copying disks.
instances_path = $STATE/instances
use_stderr = true
# Nova's periodic tasks at their defaults, but no image cache ageing during tests.
remove_unused_base_images = false

[oslo_concurrency]
lock_path = /run/nova/lock

[libvirt]
# TCG: the lab's cloud VMs run their guests under TCG (the boot probe's verdict here).
virt_type = qemu
cpu_mode = none
live_migration_scheme = tcp
live_migration_inbound_addr = $addr

[vnc]
# Per host, as in a real cloud: Nova rewrites the listen address in the destination's XML.
server_listen = $addr
server_proxyclient_address = $addr

[vmbeam]
live_migration = auto

# oslo.privsep: nova-compute runs as root here; its helper needs no sudo or rootwrap.
[nova_sys_admin]
helper_command = $VENV/bin/privsep-helper --config-file $conf --privsep_context nova.privsep.sys_admin_pctxt
EOF
  } >"$conf.tmp"
  chmod 600 "$conf.tmp"
  mv "$conf.tmp" "$conf"
}

cmd_compute() {
  local cvms=() args=()
  while (($#)); do
    case $1 in
    --lab) LAB_BIN=${2:?--lab needs the vmbeam-lab binary}; shift 2 ;;
    --ns | --state-dir) args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    -*) die "unknown option $1" ;;
    *) cvms+=("$1"); shift ;;
    esac
  done
  parse_opts "${args[@]}"
  ((EUID == 0)) || die "run as root"
  ((${#cvms[@]})) || die "name the cloud VMs to run nova-compute in (e.g. cvm1 cvm2)"
  [[ -f $STATE/compute.conf && -f $STATE/addr ]] || die "no control plane in $STATE: scripts/openstack.sh up --ns $NS first"
  local lab c line start
  lab=$(lab_bin)
  [[ -x $lab ]] || die "no vmbeam-lab binary ($lab): build it (cargo build -p vmbeam-lab-cli) or pass --lab"
  local -A addr=()
  for c in "${cvms[@]}"; do
    [[ $c =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || die "bad cloud VM name $c"
    line=$(lab_cvm "$c")
    [[ -n $line ]] || die "no cloud VM $c in the running lab (vmbeam-lab status)"
    addr[$c]=${line#* }
  done
  load_secrets
  start=$(now)
  mkdir -p "$STATE/instances" "$LOGS" "$RUN"
  local pids=()
  for c in "${cvms[@]}"; do
    local dir=$STATE/computes/$c name="nova-compute@$c" pid
    mkdir -p "$dir"
    pid=$(svc_pid "$name" 2>/dev/null || true)
    if [[ -n $pid ]] && group_alive "$pid"; then
      log "$name is running (pid $pid): left as it is"
      pids+=("$pid")
      continue
    fi
    write_nova_compute_conf "$c" "${addr[$c]}" "$dir/nova.conf"
    (
      cd "$dir" || exit
      exec setsid "$lab" exec "$c" sh -c 'mkdir -p /run/nova/lock && exec "$@"' nova-compute \
        "$VENV/bin/nova-compute" --config-file "$dir/nova.conf"
    ) >>"$LOGS/$name.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$RUN/$name.pid"
    pids+=("$pid")
    log "$name started (pid $pid, log $LOGS/$name.log)"
  done
  local A db
  A=$(<"$STATE/addr")
  db="mysql+pymysql://nova:$DB_NOVA_PASS@$A/nova"
  for c in "${cvms[@]}"; do
    vpy wait-nova-compute "$db" "$c" 300 "$(svc_pid "nova-compute@$c")" ||
      die "nova-compute@$c did not register (log: $LOGS/nova-compute@$c.log)"
  done
  inns "$VENV/bin/nova-manage" --config-file "$ETC/nova/nova.conf" cell_v2 discover_hosts >/dev/null
  vpy wait-providers "mysql+pymysql://placement:$DB_PLACEMENT_PASS@$A/placement" \
    "$(IFS=,; echo "${cvms[*]}")" 300 ||
    die "the computes' resource providers did not appear in Placement"
  log "compute: ${cvms[*]} up and mapped in $(since "$start") s"
}
