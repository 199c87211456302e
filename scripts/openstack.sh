#!/usr/bin/env bash
# An OpenStack control plane (2026.2: Keystone, Glance, Placement, Nova API, conductor and
# scheduler, on their own MariaDB and RabbitMQ, and a Neutron stand-in) inside one network
# namespace, for the end-to-end test through Nova's real API (issue 14, item 1). nova-compute services in
# other namespaces (the lab's cloud VMs) join it with the compute.conf that `up` writes.
#
#   scripts/openstack.sh install
#       Debian packages (mariadb-server, rabbitmq-server, build tools; their system
#       services neither started nor enabled) and a venv cached under
#       /var/cache/vmbeam-openstack/venv-<hash>, with the Nova shim (openstack-shim/).
#   scripts/openstack.sh up [--ns NAME] [--addr A.B.C.D/NN] [--host-addr A.B.C.D/NN]
#                           [--attach NETNS:BRIDGE] [--state-dir DIR]
#       Starts everything inside namespace NAME (default vmbeam-ctl, made with a veth pair
#       if missing) at the address --addr (default 198.18.0.3/24). The veth's other end
#       gets --host-addr in the host's namespace (default: the first address of the
#       subnet, .1 for a /24), or with --attach is put into bridge BRIDGE of namespace
#       NETNS instead (the lab's cloud network: --attach vmbeam-hub:vbr-cloud). Every `up`
#       starts a fresh cloud: the databases come from a snapshot of the initialised
#       ones (made by the first `up`, cached per venv and schema version).
#   scripts/openstack.sh down [--ns NAME] [--state-dir DIR]
#   scripts/openstack.sh status [--ns NAME] [--state-dir DIR]
#   scripts/openstack.sh smoke [--ns NAME] [--state-dir DIR]
#   scripts/openstack.sh compute [--ns NAME] [--state-dir DIR] [--lab BIN] CVM...
#       Starts a nova-compute (VMBeam's driver) in each named cloud VM of the running lab
#       and waits until Nova and Placement have them (scripts/openstack/compute.sh).
#
# State (configs, data, logs, PIDs, openrc, compute.conf) is in
# /var/lib/vmbeam-openstack/<ns>/ unless --state-dir says otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/scripts/openstack
SHIM=$ROOT/openstack-shim
PY=${VMBEAM_OPENSTACK_PYTHON:-/usr/bin/python3}
CACHE=${VMBEAM_OPENSTACK_CACHE:-/var/cache/vmbeam-openstack}
STATE_BASE=${VMBEAM_OPENSTACK_STATE:-/var/lib/vmbeam-openstack}
# Bump when what the first `up` puts into the databases changes (users, endpoints, cells,
# the database layout): the snapshot of an older schema is then not used.
SCHEMA_VERSION=1
REGION=RegionOne
NEUTRON_DESC="OpenStack Networking (Neutron stand-in)"

# Ports, all on the namespace address.
P_KEYSTONE=5000
P_GLANCE=9292
P_PLACEMENT=8778
P_NOVA=8774
P_NEUTRON=9696 # the Neutron stand-in (scripts/openstack/neutron_standin.py), not neutron-server
P_MYSQL=3306
P_AMQP=5672
P_RABBIT_DIST=25672 # Erlang distribution (loopback use only: rabbitmqctl)

APT_PACKAGES=(mariadb-server mariadb-client rabbitmq-server erlang-base iproute2 procps util-linux
  python3-venv python3-dev gcc pkg-config libvirt-dev)

log() { printf 'openstack: %s\n' "$*"; }
die() {
  printf 'openstack: %s\n' "$*" >&2
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The venv's name: a hash of the Python version and the requirement lines (comments and
# blank lines left out, so editing a comment keeps the venv and its snapshot).
venv_key() {
  { "$PY" -c 'import sys; print(sys.version)'; grep -hEv '^[[:space:]]*(#|$)' "$HERE/requirements.txt" "$HERE/constraints.txt"; } |
    sha256sum | cut -c1-16
}
VENV=$CACHE/venv-$(venv_key)

# ---------------------------------------------------------------------------------------
# install

policy=/usr/sbin/policy-rc.d
policy_saved=$policy.vmbeam-openstack-saved
restore_policy() {
  rm -f "$policy"
  if [[ -e $policy_saved ]]; then mv "$policy_saved" "$policy"; fi
}

apt_install() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "Debian packages: all present"
    return
  fi
  log "Debian packages: installing ${missing[*]} (their services are neither started nor enabled)"
  # A policy-rc.d that exits 101 keeps invoke-rc.d (and deb-systemd-invoke) from starting
  # anything during the install; one that was there already is put back afterwards.
  if [[ -e $policy_saved ]]; then restore_policy; fi # left by an interrupted run
  if [[ -e $policy ]]; then mv "$policy" "$policy_saved"; fi
  trap restore_policy EXIT
  printf '#!/bin/sh\n# scripts/openstack.sh install: no service starts during apt-get install\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  [[ -n $(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit) ]] ||
    nice -n 10 apt-get update -q
  local t0
  t0=$(now)
  DEBIAN_FRONTEND=noninteractive nice -n 10 apt-get install -y -q --no-install-recommends "${missing[@]}"
  restore_policy
  trap - EXIT
  # Installed here means enabled by the packages' postinst: turn that off (systemd's
  # symlinks and the sysv links; systemctl edits them even where systemd is not PID 1).
  # The control plane runs its own instances; the system's stay off.
  local pkg svc
  for pkg in mariadb-server:mariadb rabbitmq-server:rabbitmq-server; do
    svc=${pkg#*:}
    if [[ " ${missing[*]} " == *" ${pkg%%:*} "* ]]; then
      if [[ -e /etc/init.d/$svc ]]; then update-rc.d "$svc" disable >/dev/null 2>&1 || true; fi
      systemctl disable "$svc.service" >/dev/null 2>&1 || true
    fi
  done
  if [[ " ${missing[*]} " == *" erlang-base "* ]]; then
    systemctl disable epmd.socket epmd.service >/dev/null 2>&1 || true
  fi
  log "Debian packages: installed in $(since "$t0") s"
}

cmd_install() {
  local start
  start=$(now)
  ((EUID == 0)) || die "run as root"
  apt_install
  if [[ ! -f $VENV/.complete ]]; then
    log "venv: creating $VENV (OpenStack from PyPI; a few minutes, once)"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    # Built at its final path (a venv cannot be moved), marked complete only at the end.
    nice -n 10 "$PY" -m venv "$VENV"
    nice -n 10 "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
    nice -n 10 "$VENV/bin/pip" install -q -r "$HERE/requirements.txt" -c "$HERE/constraints.txt"
    "$VENV/bin/pip" check
    touch "$VENV/.complete"
    log "venv: made in $(since "$start") s (since the start of install)"
    # Venvs of earlier requirements, and the snapshots made with them, are of no further use.
    find "$CACHE" -mindepth 1 -maxdepth 1 \( -name 'venv-*' -o -name 'snapshot-*' \) \
      ! -path "$VENV" ! -name "snapshot-${VENV##*/venv-}-*" -exec rm -rf {} +
  else
    log "venv: reusing $VENV"
  fi
  # The shim, fresh every install: Nova's API then validates its flavor extra spec
  # (entry point nova.api.extra_spec_validators), and the next step's nova-compute can
  # load compute_driver = vmbeam.VMBeamLibvirtDriver from this venv.
  nice -n 10 "$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$SHIM" >/dev/null
  rm -rf "$SHIM/build" "$SHIM"/src/*.egg-info
  log "install: done in $(since "$start") s ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(p + " " + m.version(p) for p in ("nova", "keystone", "glance", "openstack-placement", "python-openstackclient", "gunicorn", "vmbeam-nova")))'))"
}

# ---------------------------------------------------------------------------------------
# options and paths

NS=vmbeam-ctl
ADDR_CIDR=
HOST_CIDR=
ATTACH=
STATE=

parse_opts() {
  while (($#)); do
    case $1 in
    --ns) NS=${2:?--ns needs a name}; shift 2 ;;
    --addr) ADDR_CIDR=${2:?--addr needs A.B.C.D/NN}; shift 2 ;;
    --host-addr) HOST_CIDR=${2:?--host-addr needs A.B.C.D/NN}; shift 2 ;;
    --attach) ATTACH=${2:?--attach needs NETNS:BRIDGE}; shift 2 ;;
    --state-dir) STATE=${2:?--state-dir needs a directory}; shift 2 ;;
    *) die "unknown option $1" ;;
    esac
  done
  [[ $NS =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || die "bad namespace name $NS"
  STATE=${STATE:-$STATE_BASE/$NS}
  ETC=$STATE/etc
  RUN=$STATE/run
  LOGS=$STATE/log
}

valid_cidr() {
  [[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})/([0-9]|[12][0-9]|3[0-2])$ ]] || return 1
  local i
  for i in 1 2 3 4; do ((10#${BASH_REMATCH[i]} <= 255)) || return 1; done
}

# The first host address of A.B.C.D/NN's network, with the same prefix length.
first_host() {
  "$PY" -c 'import ipaddress, sys
i = ipaddress.ip_interface(sys.argv[1])
print(f"{next(i.network.hosts())}/{i.network.prefixlen}")' "$1"
}

inns() { ip netns exec "$NS" "$@"; }
vpy() { inns "$VENV/bin/python" "$HERE/helper.py" "$@"; }

# ---------------------------------------------------------------------------------------
# namespace

host_link() { printf 'os-%s' "${NS:0:12}"; }

ns_up() {
  local hl
  hl=$(host_link)
  if [[ -e /run/netns/$NS && -f $STATE/ns.created ]]; then
    log "namespace $NS (made by an earlier up) exists: reusing it"
  elif [[ -e /run/netns/$NS ]]; then
    log "namespace $NS exists: using it as it is (down leaves it)"
  else
    ip netns add "$NS"
    echo "$hl" >"$STATE/ns.created"
    ip -n "$NS" link set lo up
    ip link add "$hl" type veth peer name ctl0 netns "$NS"
    ip -n "$NS" addr add "$ADDR_CIDR" dev ctl0
    ip -n "$NS" link set ctl0 up
    if [[ -n $ATTACH ]]; then
      local ans=${ATTACH%%:*} abr=${ATTACH#*:}
      ip link set "$hl" netns "$ans"
      ip -n "$ans" link set "$hl" master "$abr" up
      echo "$ans" >"$STATE/ns.attached"
    else
      ip addr add "$HOST_CIDR" dev "$hl"
      ip link set "$hl" up
    fi
  fi
  # Not `ip ... | grep -q`: ip writes a line at a time, and under pipefail its SIGPIPE after
  # grep's early exit (a later line, e.g. ctl0's IPv6 link-local address) failed the check.
  [[ $(ip -n "$NS" -o addr show) == *" inet $ADDR/"* ]] || die "namespace $NS has no address $ADDR"
}

ns_down() {
  [[ -f $STATE/ns.created ]] || return 0
  local hl ans
  hl=$(<"$STATE/ns.created")
  if [[ -f $STATE/ns.attached ]]; then
    ans=$(<"$STATE/ns.attached")
    ip -n "$ans" link del "$hl" 2>/dev/null || true
  else
    ip link del "$hl" 2>/dev/null || true
  fi
  if [[ -e /run/netns/$NS ]]; then ip netns del "$NS"; fi
  rm -f "$STATE/ns.created" "$STATE/ns.attached"
}

# ---------------------------------------------------------------------------------------
# processes: each service is started in its own session (setsid) inside the namespace;
# its PID is its process group, recorded in $RUN/<name>.pid, and stopping it signals the
# group (gunicorn's workers, RabbitMQ's Erlang helpers go with it).

start_svc() {
  local name=$1
  shift
  (
    cd "$STATE"
    exec setsid ip netns exec "$NS" "$@"
  ) >>"$LOGS/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$RUN/$name.pid"
  # setsid forks only when it is already a group leader, which a background job of a
  # non-interactive shell is not; then the PID is the group. Say so if not.
  sleep 0.05
  local pgid
  pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || true
  if [[ -n $pgid && $pgid != "$pid" ]]; then log "warning: $name (pid $pid) is in group $pgid"; fi
}

svc_pid() { [[ -f $RUN/$1.pid ]] && cat "$RUN/$1.pid"; }
alive() { kill -0 "$1" 2>/dev/null; }
group_alive() { pgrep -g "$1" >/dev/null 2>&1; }

# Stops services NAME... at once: SIGTERM to each group, SIGKILL to what is left after
# TIMEOUT seconds.
stop_svcs() {
  local timeout=$1 name pid t t0 left
  shift
  local -A pids=()
  t0=$(now)
  for name in "$@"; do
    pid=$(svc_pid "$name") || continue
    if group_alive "$pid" || alive "$pid"; then
      pids[$name]=$pid
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    else
      rm -f "$RUN/$name.pid"
    fi
  done
  for ((t = 0; t < timeout * 5; t++)); do
    left=0
    for name in "${!pids[@]}"; do
      pid=${pids[$name]}
      if group_alive "$pid" || alive "$pid"; then
        left=1
      else
        log "  $name stopped: $(since "$t0") s"
        rm -f "$RUN/$name.pid"
        unset "pids[$name]"
      fi
    done
    ((left)) || return 0
    sleep 0.2
  done
  for name in "${!pids[@]}"; do
    pid=${pids[$name]}
    log "  $name (pid $pid) did not stop in $timeout s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$RUN/$name.pid"
  done
  sleep 0.5
}
stop_svc() { stop_svcs "${2:-20}" "$1"; }

# In the order they start.
SERVICES=(mariadb epmd rabbitmq keystone neutron glance placement nova-api nova-conductor nova-scheduler)

# ---------------------------------------------------------------------------------------
# configuration

# Secrets: made once with the database snapshot (the database users and Keystone's users
# have them), kept with it.
make_secrets() {
  local k
  {
    for k in DB_ROOT DB_KEYSTONE DB_GLANCE DB_PLACEMENT DB_NOVA RABBIT ADMIN KS_GLANCE KS_PLACEMENT KS_NOVA KS_NEUTRON; do
      printf '%s_PASS=%s\n' "$k" "$(head -c 18 /dev/urandom | base64 | tr '+/' 'xy')"
    done
  } >"$STATE/secrets.env"
  chmod 600 "$STATE/secrets.env"
}

load_secrets() {
  # shellcheck disable=SC1091
  source "$STATE/secrets.env"
}

# A service user's Keystone credentials (the lines every [section] of an OpenStack client
# repeats): service_auth USER PASSWORD.
service_auth() {
  cat <<EOF
auth_url = http://$ADDR:$P_KEYSTONE/v3
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = $1
password = $2
EOF
}

# [keystone_authtoken] of a service API: authtoken USER PASSWORD.
authtoken() {
  printf '[keystone_authtoken]\nwww_authenticate_uri = http://%s:%s/v3\nregion_name = %s\n' \
    "$ADDR" "$P_KEYSTONE" "$REGION"
  service_auth "$1" "$2"
}

# What every Nova service, the computes included, needs to reach the other services.
nova_client_sections() {
  cat <<EOF
[service_user]
send_service_user_token = true
$(service_auth nova "$KS_NOVA_PASS")

[placement]
region_name = $REGION
$(service_auth placement "$KS_PLACEMENT_PASS")

[glance]
region_name = $REGION

[neutron]
# The Neutron stand-in at http://$ADDR:$P_NEUTRON (Keystone's catalog, type network):
# networks, subnets, ports and their bindings (vif_type tap), no dataplane
# (scripts/openstack/README.md).
region_name = $REGION
$(service_auth neutron "$KS_NEUTRON_PASS")
EOF
}

# The *_PASS variables come from secrets.env (load_secrets).
# shellcheck disable=SC2153
write_configs() {
  local A=$ADDR
  mkdir -p "$ETC"/{keystone,glance,placement,nova,neutron,rabbitmq}
  local db="mysql+pymysql"

  cat >"$ETC/my.cnf" <<EOF
[client]
socket = $STATE/mysql/mysqld.sock
user = root

[mysqld]
user = root
datadir = $STATE/mysql/data
socket = $STATE/mysql/mysqld.sock
pid-file = $RUN/mariadb.mysqld.pid
log-error = $LOGS/mariadb.err
bind-address = $A
port = $P_MYSQL
skip-name-resolve
character-set-server = utf8mb4
collation-server = utf8mb4_general_ci
max_connections = 1000
innodb_buffer_pool_size = 256M
innodb_log_file_size = 48M
innodb_flush_log_at_trx_commit = 2
skip-log-bin
EOF

  # RabbitMQ: a node of its own (name, Mnesia base, logs, cookie in its own HOME, no
  # plugins), AMQP on the namespace address, the distribution port on loopback. The
  # user OpenStack's services log in as is created at the first boot of its fresh
  # database (default_user).
  cat >"$ETC/rabbitmq/rabbitmq.conf" <<EOF
listeners.tcp.1 = $A:$P_AMQP
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $P_RABBIT_DIST
distribution.listener.port_range.max = $P_RABBIT_DIST
default_user = openstack
default_pass = $RABBIT_PASS
default_vhost = /
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
loopback_users = none
log.file.level = info
EOF
  echo '[].' >"$ETC/rabbitmq/enabled_plugins"
  : >"$ETC/rabbitmq/rabbitmq-env.conf"

  cat >"$ETC/keystone/keystone.conf" <<EOF
[DEFAULT]
use_stderr = true

[database]
connection = $db://keystone:$DB_KEYSTONE_PASS@$A/keystone?charset=utf8

[token]
provider = fernet

[fernet_tokens]
key_repository = $STATE/keystone/fernet-keys

[fernet_receipts]
key_repository = $STATE/keystone/fernet-keys

[credential]
key_repository = $STATE/keystone/credential-keys
EOF

  cp "$VENV/etc/glance/glance-api-paste.ini" "$ETC/glance/"
  cat >"$ETC/glance/glance-api.conf" <<EOF
[DEFAULT]
use_stderr = true
enabled_backends = fs:file
bind_host = $A
bind_port = $P_GLANCE
public_endpoint = http://$A:$P_GLANCE

[database]
connection = $db://glance:$DB_GLANCE_PASS@$A/glance?charset=utf8

[paste_deploy]
flavor = keystone

$(authtoken glance "$KS_GLANCE_PASS")

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = $STATE/glance/images/

[os_glance_staging_store]
filesystem_store_datadir = $STATE/glance/staging/

[os_glance_tasks_store]
filesystem_store_datadir = $STATE/glance/tasks/

[oslo_concurrency]
lock_path = $STATE/glance/lock
EOF

  cat >"$ETC/placement/placement.conf" <<EOF
[DEFAULT]
use_stderr = true

[placement_database]
connection = $db://placement:$DB_PLACEMENT_PASS@$A/placement?charset=utf8

[api]
auth_strategy = keystone

$(authtoken placement "$KS_PLACEMENT_PASS")
EOF

  # The Neutron stand-in: its state, its token check, and the user it sends Nova's
  # os-server-external-events as (network-vif-plugged; Nova's policy wants the service role).
  cat >"$ETC/neutron/neutron.conf" <<EOF
[DEFAULT]
state_file = $STATE/neutron/state.json

$(authtoken neutron "$KS_NEUTRON_PASS")

[nova]
region_name = $REGION
$(service_auth neutron "$KS_NEUTRON_PASS")
EOF

  # One nova.conf for nova-api, conductor and scheduler; what a compute needs is
  # compute.conf (write_compute_conf).
  cp "$VENV/etc/nova/api-paste.ini" "$ETC/nova/"
  cat >"$ETC/nova/nova.conf" <<EOF
[DEFAULT]
use_stderr = true
host = $NS
my_ip = $A
state_path = $STATE/nova
transport_url = rabbit://openstack:$RABBIT_PASS@$A:$P_AMQP/

[api_database]
connection = $db://nova:$DB_NOVA_PASS@$A/nova_api?charset=utf8

[database]
connection = $db://nova:$DB_NOVA_PASS@$A/nova?charset=utf8

[wsgi]
api_paste_config = $ETC/nova/api-paste.ini

[conductor]
workers = 1

[scheduler]
workers = 1
# Computes that register later are mapped into cell1 without a nova-manage call.
discover_hosts_in_cells_interval = 30

$(authtoken nova "$KS_NOVA_PASS")

$(nova_client_sections)

[oslo_concurrency]
lock_path = $STATE/nova/lock

[oslo_messaging_notifications]
driver = noop
EOF
}

write_compute_conf() {
  local A=$ADDR
  cat >"$STATE/compute.conf" <<EOF
# nova.conf sections a nova-compute needs to join the control plane of namespace $NS
# (written by scripts/openstack.sh up). Add [DEFAULT] host, my_ip, compute_driver,
# state_path, instances_path and [libvirt] per compute; no database access is needed.
# Everything here is at $A: RabbitMQ $P_AMQP, Keystone $P_KEYSTONE, Placement $P_PLACEMENT,
# Glance $P_GLANCE, the Neutron stand-in $P_NEUTRON (vif_type tap: Nova makes the tap device
# through privsep; see scripts/openstack/README.md), Nova API $P_NOVA.
[DEFAULT]
transport_url = rabbit://openstack:$RABBIT_PASS@$A:$P_AMQP/

$(authtoken nova "$KS_NOVA_PASS")

$(nova_client_sections)
EOF
  chmod 600 "$STATE/compute.conf"
}

write_openrc() {
  cat >"$STATE/openrc" <<EOF
# Admin credentials of the control plane in namespace $NS (scripts/openstack.sh up).
export OS_AUTH_URL=http://$ADDR:$P_KEYSTONE/v3
export OS_IDENTITY_API_VERSION=3
export OS_AUTH_TYPE=password
export OS_USERNAME=admin
export OS_PASSWORD=$ADMIN_PASS
export OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_NAME=Default
export OS_PROJECT_DOMAIN_NAME=Default
export OS_REGION_NAME=$REGION
export OS_INTERFACE=public
EOF
  chmod 600 "$STATE/openrc"
}

# ---------------------------------------------------------------------------------------
# services

MYSQLD=$(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd)

start_mariadb() {
  start_svc mariadb "$MYSQLD" --defaults-file="$ETC/my.cnf"
}

wait_mariadb() {
  local t
  for ((t = 0; t < 600; t++)); do
    if inns mariadb-admin --defaults-file="$ETC/my.cnf" --connect-timeout=2 ping >/dev/null 2>&1; then return 0; fi
    alive "$(svc_pid mariadb)" || die "MariaDB exited (see $LOGS/mariadb.err)"
    sleep 0.1
  done
  die "MariaDB did not answer in 60 s (see $LOGS/mariadb.err)"
}

sql() { inns mariadb --defaults-file="$ETC/my.cnf" -N -B -e "$1"; }

start_rabbitmq() {
  mkdir -p "$STATE/rabbitmq/home" "$STATE/rabbitmq/mnesia" "$LOGS/rabbitmq"
  # Our own epmd, in this namespace, so RabbitMQ does not start one we cannot stop.
  start_svc epmd env HOME="$STATE/rabbitmq/home" epmd -address 127.0.0.1 -port 4369
  local t
  for ((t = 0; t < 50; t++)); do
    inns epmd -port 4369 -names >/dev/null 2>&1 && break
    sleep 0.1
  done
  start_svc rabbitmq env HOME="$STATE/rabbitmq/home" \
    RABBITMQ_CONF_ENV_FILE="$ETC/rabbitmq/rabbitmq-env.conf" \
    RABBITMQ_NODENAME=vmbeam-os@localhost \
    RABBITMQ_CONFIG_FILE="$ETC/rabbitmq/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$ETC/rabbitmq/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$STATE/rabbitmq/mnesia" \
    RABBITMQ_LOG_BASE="$LOGS/rabbitmq" \
    RABBITMQ_PID_FILE="$RUN/rabbitmq.beam.pid" \
    RABBITMQ_DIST_PORT=$P_RABBIT_DIST \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    /usr/lib/rabbitmq/bin/rabbitmq-server
}

gunicorn_svc() {
  local name=$1 port=$2 app=$3
  shift 3
  start_svc "$name" env "$@" "$VENV/bin/gunicorn" -c "$HERE/gunicorn_conf.py" \
    --bind "$ADDR:$port" --name "vmbeam-os-$name" "$app"
}

start_keystone() { gunicorn_svc keystone $P_KEYSTONE keystone.wsgi.api:application OS_KEYSTONE_CONFIG_DIR="$ETC/keystone"; }
start_glance() { gunicorn_svc glance $P_GLANCE glance.wsgi.api:application OS_GLANCE_CONFIG_DIR="$ETC/glance"; }
start_placement() { gunicorn_svc placement $P_PLACEMENT placement.wsgi.api:application OS_PLACEMENT_CONFIG_DIR="$ETC/placement"; }
# The stand-in is a module of this directory, not of the venv.
start_neutron() {
  gunicorn_svc neutron $P_NEUTRON neutron_standin:application PYTHONPATH="$HERE" \
    VMBEAM_NEUTRON_STANDIN_CONF="$ETC/neutron/neutron.conf"
}
start_nova_api() { gunicorn_svc nova-api $P_NOVA nova.wsgi.osapi_compute:application OS_NOVA_CONFIG_DIR="$ETC/nova"; }
start_nova_svc() { start_svc "nova-$1" "$VENV/bin/nova-$1" --config-file "$ETC/nova/nova.conf"; }

# ---------------------------------------------------------------------------------------
# the databases: initialised once (slow: every service's schema), then snapshotted

mariadb_version() { "$MYSQLD" --version | sha256sum | cut -c1-8; }
snapshot_dir() { printf '%s/snapshot-%s-s%s-%s' "$CACHE" "${VENV##*/venv-}" "$SCHEMA_VERSION" "$(mariadb_version)"; }

# Runs a command inside the namespace, its output into the init log $INITLOG.
INITLOG=
initrun() {
  local t0
  t0=$(now)
  if ! inns "$@" >>"$INITLOG" 2>&1; then
    tail -n 30 "$INITLOG" >&2
    die "failed: $* (see $INITLOG)"
  fi
  log "  $(basename "$1") $(printf '%s ' "${@:2}" | sed 's/--config-file [^ ]* //; s/--bootstrap-password [^ ]* .*/.../'): $(since "$t0") s"
}

init_keystone() {
  INITLOG=$LOGS/init-keystone.log
  local KC=(--config-file "$ETC/keystone/keystone.conf")
  initrun "$VENV/bin/keystone-manage" "${KC[@]}" db_sync
  initrun "$VENV/bin/keystone-manage" "${KC[@]}" fernet_setup --keystone-user root --keystone-group root
  initrun "$VENV/bin/keystone-manage" "${KC[@]}" credential_setup --keystone-user root --keystone-group root
  initrun "$VENV/bin/keystone-manage" "${KC[@]}" bootstrap --bootstrap-password "$ADMIN_PASS" \
    --bootstrap-admin-url "http://$ADDR:$P_KEYSTONE/v3/" --bootstrap-internal-url "http://$ADDR:$P_KEYSTONE/v3/" \
    --bootstrap-public-url "http://$ADDR:$P_KEYSTONE/v3/" --bootstrap-region-id "$REGION"
}

init_glance_placement() {
  INITLOG=$LOGS/init-glance-placement.log
  initrun "$VENV/bin/glance-manage" --config-file "$ETC/glance/glance-api.conf" db_sync
  initrun "$VENV/bin/placement-manage" --config-file "$ETC/placement/placement.conf" db sync
}

init_nova() {
  INITLOG=$LOGS/init-nova.log
  local NC=(--config-file "$ETC/nova/nova.conf")
  initrun "$VENV/bin/nova-manage" "${NC[@]}" api_db sync
  initrun "$VENV/bin/nova-manage" "${NC[@]}" cell_v2 map_cell0
  initrun "$VENV/bin/nova-manage" "${NC[@]}" cell_v2 create_cell --name cell1
  initrun "$VENV/bin/nova-manage" "${NC[@]}" db sync
}

init_databases() {
  local t0
  t0=$(now)
  log "first up for this venv and schema: initialising the databases (minutes)"
  make_secrets
  load_secrets
  write_configs
  mkdir -p "$STATE/mysql/data" "$STATE/keystone"
  inns mariadb-install-db --defaults-file="$ETC/my.cnf" --auth-root-authentication-method=socket \
    --skip-test-db >>"$LOGS/init-mariadb.log" 2>&1 || die "mariadb-install-db failed (see $LOGS/init-mariadb.log)"
  start_mariadb
  wait_mariadb
  local d u
  for d in keystone glance placement nova_api nova nova_cell0; do
    sql "CREATE DATABASE $d CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;"
  done
  for u in keystone:DB_KEYSTONE_PASS:keystone glance:DB_GLANCE_PASS:glance placement:DB_PLACEMENT_PASS:placement \
    nova:DB_NOVA_PASS:nova_api nova:DB_NOVA_PASS:nova nova:DB_NOVA_PASS:nova_cell0; do
    IFS=: read -r user var db <<<"$u"
    sql "CREATE USER IF NOT EXISTS '$user'@'%' IDENTIFIED BY '${!var}'; GRANT ALL PRIVILEGES ON $db.* TO '$user'@'%';"
  done
  log "  MariaDB ready: $(since "$t0") s"

  # Three independent chains at once (each service's schema is its own database).
  local kpid gpid npid rc=0
  init_keystone &
  kpid=$!
  init_glance_placement &
  gpid=$!
  init_nova &
  npid=$!
  wait "$kpid" || rc=1
  if ((rc == 0)); then
    # Keystone serves the registrations below while the other schemas are made.
    start_keystone
  fi
  wait "$gpid" || rc=1
  wait "$npid" || rc=1
  ((rc == 0)) || die "initialising the databases failed"
  vpy wait-http "http://$ADDR:$P_KEYSTONE/v3" 120 || die "Keystone did not answer (see $LOGS/keystone.log)"
  INITLOG=$LOGS/init-keystone.log
  (
    export ADDR REGION P_GLANCE P_PLACEMENT P_NOVA P_NEUTRON P_KEYSTONE ADMIN_PASS KS_GLANCE_PASS \
      KS_PLACEMENT_PASS KS_NOVA_PASS KS_NEUTRON_PASS NEUTRON_DESC
    initrun "$VENV/bin/python" "$HERE/helper.py" register
  ) || exit 1
  stop_svc keystone
  stop_svc mariadb 60

  # The snapshot: the datadir (MariaDB shut down cleanly), Keystone's keys, the secrets,
  # and the address the URLs in the databases name. Marked complete by the end of up.
  local snap
  snap=$(snapshot_dir)
  rm -rf "$snap" "$snap.tmp"
  mkdir -p "$snap.tmp"
  cp -a "$STATE/mysql/data" "$snap.tmp/mysql-data"
  cp -a "$STATE/keystone" "$snap.tmp/keystone"
  cp -a "$STATE/secrets.env" "$snap.tmp/"
  echo "$ADDR" >"$snap.tmp/addr"
  mv "$snap.tmp" "$snap"
  log "databases initialised in $(since "$t0") s; snapshot $snap"
}

restore_snapshot() {
  local snap=$1
  mkdir -p "$STATE/mysql"
  cp -a "$snap/mysql-data" "$STATE/mysql/data"
  cp -a "$snap/keystone" "$STATE/keystone"
  cp -a "$snap/secrets.env" "$STATE/"
  chmod 600 "$STATE/secrets.env"
}

# The URLs in the snapshot's databases name the address it was made at.
readdress() {
  local old=$1 new=$ADDR
  [[ $old == "$new" ]] && return 0
  log "  snapshot made at $old: rewriting the endpoints and cell mappings to $new"
  sql "UPDATE keystone.endpoint SET url = REPLACE(url, '//$old:', '//$new:');
       UPDATE nova_api.cell_mappings SET
         transport_url = REPLACE(transport_url, '@$old:', '@$new:'),
         database_connection = REPLACE(database_connection, '@$old/', '@$new/');"
}

# ---------------------------------------------------------------------------------------
# up / down / status

all_running() {
  local s
  for s in "${SERVICES[@]}"; do
    alive "$(svc_pid "$s" 2>/dev/null)" || return 1
  done
}

any_recorded() { compgen -G "$RUN/*.pid" >/dev/null; }

cmd_up() {
  parse_opts "$@"
  ((EUID == 0)) || die "run as root"
  ADDR_CIDR=${ADDR_CIDR:-198.18.0.3/24}
  valid_cidr "$ADDR_CIDR" || die "bad --addr $ADDR_CIDR (A.B.C.D/NN)"
  ADDR=${ADDR_CIDR%/*}
  if [[ -z $ATTACH ]]; then
    HOST_CIDR=${HOST_CIDR:-$(first_host "$ADDR_CIDR")}
    valid_cidr "$HOST_CIDR" || die "bad --host-addr $HOST_CIDR"
    [[ ${HOST_CIDR%/*} != "$ADDR" ]] || die "--host-addr equals --addr"
  else
    [[ $ATTACH == *:* ]] || die "--attach takes NETNS:BRIDGE"
    [[ -e /run/netns/${ATTACH%%:*} ]] || die "no namespace ${ATTACH%%:*} to attach to"
    ip -n "${ATTACH%%:*}" link show "${ATTACH#*:}" >/dev/null 2>&1 || die "no bridge ${ATTACH#*:} in ${ATTACH%%:*}"
  fi
  if [[ -d $RUN ]] && any_recorded; then
    if all_running && [[ -f $STATE/openrc ]]; then
      log "already up in $NS (scripts/openstack.sh down --ns $NS first to restart)"
      cat "$STATE/summary" 2>/dev/null || true
      return 0
    fi
    die "a partial control plane is recorded in $STATE: scripts/openstack.sh down --ns $NS first"
  fi
  if [[ -z $ATTACH && ! -e /run/netns/$NS ]]; then
    local where
    where=$(ip -o addr show | awk -v a="${HOST_CIDR%/*}" '{split($4, x, "/"); if (x[1] == a) print $2}')
    [[ -z $where ]] || die "the host already has ${HOST_CIDR%/*} (on $where): choose --host-addr, or --attach NETNS:BRIDGE (the lab: --attach vmbeam-hub:vbr-cloud)"
  fi
  [[ -f $VENV/.complete ]] || cmd_install
  local start t0 snaplock
  start=$(now)

  # A fresh cloud every time: nothing of the last run's data is kept (its logs go to
  # log.prev/).
  mkdir -p "$STATE"
  rm -rf "$STATE/log.prev"
  if [[ -d $LOGS ]]; then mv "$LOGS" "$STATE/log.prev"; fi
  rm -rf "$ETC" "$RUN" "$STATE/mysql" "$STATE/keystone" "$STATE/glance" "$STATE/nova" "$STATE/neutron" \
    "$STATE/rabbitmq" "$STATE/instances" "$STATE/computes" "$STATE/openrc" "$STATE/compute.conf" "$STATE/summary" "$STATE/secrets.env"
  mkdir -p "$ETC" "$RUN" "$LOGS" "$STATE/glance"/{images,staging,tasks,lock} "$STATE/nova/lock" "$STATE/neutron"
  echo "$ADDR" >"$STATE/addr"
  ns_up
  # Nothing may already listen on our ports in this namespace.
  local busy
  busy=$(inns ss -Htln | awk '{print $4}' | grep -E ":($P_KEYSTONE|$P_NEUTRON|$P_GLANCE|$P_PLACEMENT|$P_NOVA|$P_MYSQL|$P_AMQP|4369|$P_RABBIT_DIST)\$" || true)
  [[ -z $busy ]] || die "already listening in $NS: $busy"

  local snap cached=yes snap_old_addr
  snap=$(snapshot_dir)
  # One first up at a time makes the snapshot: another waits here, then restores it.
  mkdir -p "$CACHE"
  exec {snaplock}>"$CACHE/.snapshot.lock"
  flock "$snaplock"
  if [[ ! -f $snap/.complete ]]; then
    cached=no
    rm -rf "$snap"
    t0=$(now)
    init_databases
    load_secrets
  else
    t0=$(now)
    restore_snapshot "$snap"
    load_secrets
    write_configs
    log "snapshot restored in $(since "$t0") s ($snap)"
    exec {snaplock}>&-
  fi
  snap_old_addr=$(<"$snap/addr")

  t0=$(now)
  start_rabbitmq
  start_mariadb
  wait_mariadb
  readdress "$snap_old_addr"
  # Snapshots of schema 1 describe the network service as an empty slot.
  sql "UPDATE keystone.service SET extra = JSON_SET(extra, '\$.description', '$NEUTRON_DESC') WHERE type = 'network';"
  start_keystone
  start_neutron
  start_glance
  start_placement
  start_nova_api
  start_nova_svc conductor
  start_nova_svc scheduler
  write_openrc
  write_compute_conf

  log "waiting for the services"
  vpy wait-amqp "rabbit://openstack:$RABBIT_PASS@$ADDR:$P_AMQP/" 180 || fail_up rabbitmq
  log "  RabbitMQ: $(since "$t0") s"
  local s url
  for s in keystone:$P_KEYSTONE/v3 neutron:$P_NEUTRON/ glance:$P_GLANCE/ placement:$P_PLACEMENT/ nova-api:$P_NOVA/; do
    url=http://$ADDR:${s#*:}
    vpy wait-http "$url" 240 "$(svc_pid "${s%%:*}")" || fail_up "${s%%:*}"
    log "  ${s%%:*} answers at $url: $(since "$t0") s"
  done
  vpy wait-nova-services "mysql+pymysql://nova:$DB_NOVA_PASS@$ADDR/nova" "$NS" 180 \
    "$(svc_pid nova-conductor)" "$(svc_pid nova-scheduler)" || fail_up "nova-conductor or nova-scheduler"
  log "  nova-conductor and nova-scheduler registered: $(since "$t0") s"

  if [[ $cached == no ]]; then
    touch "$snap/.complete"
    find "$CACHE" -mindepth 1 -maxdepth 1 -name 'snapshot-*' ! -path "$snap" -exec rm -rf {} +
    exec {snaplock}>&-
  fi
  local summary
  summary="openstack: up in $NS at $ADDR in $(since "$start") s ($([[ $cached == yes ]] && echo "from the database snapshot" || echo "first up: databases initialised and snapshotted")): keystone :$P_KEYSTONE, neutron stand-in :$P_NEUTRON, glance :$P_GLANCE, placement :$P_PLACEMENT, nova-api :$P_NOVA, conductor, scheduler, rabbitmq :$P_AMQP, mariadb :$P_MYSQL; source $STATE/openrc; computes: $STATE/compute.conf"
  echo "$summary" >"$STATE/summary"
  echo "$summary"
}

fail_up() {
  local s=$1
  log "$s did not come up; the end of its log:"
  local f
  for f in "$LOGS/${s%% *}.log" "$LOGS/${s%% *}.err"; do
    [[ -f $f ]] && tail -n 25 "$f" >&2
  done
  die "up failed ($s); the services started are still running: scripts/openstack.sh down --ns $NS"
}

cmd_down() {
  parse_opts "$@"
  ((EUID == 0)) || die "run as root"
  local start s
  start=$(now)
  if [[ -d $RUN ]]; then
    # The computes first (they report to conductor), then the OpenStack services
    # together, then what they used.
    stop_computes
    stop_svcs 20 nova-scheduler nova-conductor nova-api placement glance neutron keystone
    stop_svcs 60 rabbitmq mariadb
    stop_svcs 10 epmd
  fi
  # Anything else still in a namespace we made is ours too (a forked helper).
  if [[ -f $STATE/ns.created && -e /run/netns/$NS ]]; then
    local left
    left=$(ip netns pids "$NS" | tr '\n' ' ')
    if [[ -n ${left// /} ]]; then
      log "still in $NS: $left: SIGKILL"
      # shellcheck disable=SC2086
      kill -KILL $left 2>/dev/null || true
      sleep 0.5
    fi
  fi
  ns_down
  log "down ($NS) in $(since "$start") s"
}

cmd_status() {
  parse_opts "$@"
  [[ -d $STATE ]] || die "no control plane recorded in $STATE"
  local A s pid rc=0
  A=$(cat "$STATE/addr" 2>/dev/null || true)
  [[ -e /run/netns/$NS ]] || {
    echo "namespace $NS: absent"
    rc=1
  }
  for s in "${SERVICES[@]}"; do
    pid=$(svc_pid "$s" 2>/dev/null || true)
    if [[ -z $pid ]]; then
      printf '%-15s not started\n' "$s"
      rc=1
      continue
    fi
    if ! alive "$pid"; then
      printf '%-15s dead (pid %s)\n' "$s" "$pid"
      rc=1
      continue
    fi
    local answer=
    if [[ -n $A && -e /run/netns/$NS ]]; then
      case $s in
      keystone) answer=$(vpy probe-http "http://$A:$P_KEYSTONE/v3") ;;
      neutron) answer=$(vpy probe-http "http://$A:$P_NEUTRON/") ;;
      glance) answer=$(vpy probe-http "http://$A:$P_GLANCE/") ;;
      placement) answer=$(vpy probe-http "http://$A:$P_PLACEMENT/") ;;
      nova-api) answer=$(vpy probe-http "http://$A:$P_NOVA/") ;;
      mariadb) answer=$(inns mariadb-admin --defaults-file="$ETC/my.cnf" --connect-timeout=2 ping 2>&1 || true) ;;
      rabbitmq)
        load_secrets
        answer=$(vpy probe-amqp "rabbit://openstack:$RABBIT_PASS@$A:$P_AMQP/")
        ;;
      epmd) answer=$(inns epmd -port 4369 -names 2>&1 | tr '\n' ' ') ;;
      nova-conductor | nova-scheduler)
        load_secrets
        answer=$(vpy probe-nova-service "mysql+pymysql://nova:$DB_NOVA_PASS@$A/nova" "$NS" "$s")
        ;;
      esac
    fi
    printf '%-15s running (pid %s) %s\n' "$s" "$pid" "$answer"
    case $answer in *"no answer"* | *"error"* | *"down"*) rc=1 ;; esac
  done
  local c
  while read -r c; do
    pid=$(svc_pid "nova-compute@$c")
    if ! group_alive "$pid"; then
      printf '%-15s dead (pid %s)\n' "compute@$c" "$pid"
      rc=1
      continue
    fi
    load_secrets
    answer=$(vpy probe-nova-service "mysql+pymysql://nova:$DB_NOVA_PASS@$A/nova" "$c" nova-compute)
    printf '%-15s running (pid %s) %s\n' "compute@$c" "$pid" "$answer"
    case $answer in *"no answer"* | *"not registered"* | *"down"*) rc=1 ;; esac
  done < <(recorded_computes)
  return "$rc"
}

# ---------------------------------------------------------------------------------------
# smoke

cmd_smoke() {
  parse_opts "$@"
  [[ -f $STATE/openrc ]] || die "no openrc in $STATE: scripts/openstack.sh up --ns $NS first"
  [[ -f $VENV/.complete ]] || die "no venv: scripts/openstack.sh install"
  local start failed=0 n=0 out
  start=$(now)
  # shellcheck disable=SC1091
  source "$STATE/openrc"
  local OS=$VENV/bin/openstack
  local tmp
  tmp=$(mktemp -d)
  step() { # step NAME CHECK-REGEX-OR-EMPTY COMMAND... (CHECK: extended regex the output must match)
    local name=$1 check=$2 t0 rc=0
    shift 2
    t0=$(now)
    n=$((n + 1))
    out=$("$@" 2>&1) || rc=$?
    if ((rc == 0)) && { [[ -z $check ]] || grep -Eq -- "$check" <<<"$out"; }; then
      printf 'smoke: ok   %-58s %5s s\n' "$name" "$(since "$t0")"
    else
      printf 'smoke: FAIL %-58s %5s s (exit %s)\n' "$name" "$(since "$t0")" "$rc"
      printf '    %s\n' "${out//$'\n'/$'\n'    }"
      failed=$((failed + 1))
    fi
  }
  refused() { # the command must fail, with a message matching $1
    local check=$1
    shift
    local o rc=0
    o=$("$@" 2>&1) || rc=$?
    echo "$o"
    ((rc != 0)) && grep -Eq -- "$check" <<<"$o"
  }
  local suffix=$$
  # The bash -c programs below get their arguments as $0, $1...: single quotes on purpose.
  step "token issue" '^\| expires' "$OS" token issue
  # shellcheck disable=SC2016
  step "endpoint list (identity image placement compute network)" '' bash -c '
    o=$("$0" endpoint list -f value -c "Service Type" -c Interface) || exit 1
    echo "$o"
    for t in identity image placement compute network; do
      for i in public internal admin; do grep -qx "$t $i" <<<"$o" || { echo "missing $t $i"; exit 1; }; done
    done' "$OS"
  # shellcheck disable=SC2016
  step "compute service list (conductor, scheduler up)" '' bash -c '
    o=$("$0" compute service list -f value -c Binary -c State -c Status) || exit 1
    echo "$o"
    grep -qx "nova-conductor enabled up" <<<"$o" && grep -qx "nova-scheduler enabled up" <<<"$o"' "$OS"
  head -c 1048576 /dev/urandom >"$tmp/tiny.raw"
  step "image create (1 MiB raw)" '' "$OS" image create --disk-format raw --container-format bare \
    --file "$tmp/tiny.raw" --private "vmbeam-smoke-$suffix"
  # shellcheck disable=SC2016
  step "image show (active, size and checksum of the file)" '' bash -c '
    o=$("$0" image show "$1" -f value -c status -c checksum -c size | tr "\n" " ") || exit 1
    echo "$o"
    [[ " $o " == *" active "* && " $o " == *" $2 "* && " $o " == *" 1048576 "* ]]' \
    "$OS" "vmbeam-smoke-$suffix" "$(md5sum "$tmp/tiny.raw" | cut -d' ' -f1)"
  step "resource provider list" '' "$OS" resource provider list
  step "flavor create" '' "$OS" flavor create --ram 256 --disk 1 --vcpus 1 --private "vmbeam-smoke-$suffix"
  step "flavor set vmbeam:enabled=true" '' "$OS" --os-compute-api-version 2.86 flavor set \
    --property vmbeam:enabled=true "vmbeam-smoke-$suffix"
  step "flavor show has vmbeam:enabled=true" "'vmbeam:enabled': 'true'" "$OS" flavor show -f value -c properties "vmbeam-smoke-$suffix"
  # Nova validates extra specs of registered namespaces only (microversion >= 2.86); an
  # unknown namespace is let through. So: vmbeam:enabled=maybe refused by the shim's
  # validator, the same value under a namespace nobody registered accepted.
  step "flavor set vmbeam:enabled=maybe is refused (HTTP 400)" '' refused \
    "400.*'maybe' is not a valid boolean-like value" "$OS" --os-compute-api-version 2.86 flavor set \
    --property vmbeam:enabled=maybe "vmbeam-smoke-$suffix"
  step "flavor set vmbeam-unregistered:enabled=maybe is accepted" '' "$OS" --os-compute-api-version 2.86 \
    flavor set --property vmbeam-unregistered:enabled=maybe "vmbeam-smoke-$suffix"
  step "flavor show still has vmbeam:enabled=true" "'vmbeam:enabled': 'true'" "$OS" flavor show -f value \
    -c properties "vmbeam-smoke-$suffix"
  step "flavor delete" '' "$OS" flavor delete "vmbeam-smoke-$suffix"
  step "image delete" '' "$OS" image delete "vmbeam-smoke-$suffix"
  # The Neutron stand-in: what Nova checks for first, then a network with a port.
  # shellcheck disable=SC2016
  step "network extension list (binding, binding-extended)" '' bash -c '
    o=$("$0" extension list --network -f value -c Alias) || exit 1
    echo "$o"
    grep -qx binding <<<"$o" && grep -qx binding-extended <<<"$o"' "$OS"
  step "network create" '' "$OS" network create "vmbeam-smoke-$suffix"
  step "subnet create (198.18.64.0/24, no DHCP)" '' "$OS" subnet create --network "vmbeam-smoke-$suffix" \
    --subnet-range 198.18.64.0/24 --no-dhcp "vmbeam-smoke-$suffix"
  # shellcheck disable=SC2016
  step "port create (fixed IP 198.18.64.2, MAC fa:16:3e:...)" '' bash -c '
    o=$("$0" port create --network "$1" -f value -c fixed_ips -c mac_address "$1" | tr "\n" " ") || exit 1
    echo "$o"
    [[ $o == *"198.18.64.2"* && $o =~ fa:16:3e(:[0-9a-f]{2}){3} ]]' "$OS" "vmbeam-smoke-$suffix"
  # shellcheck disable=SC2016
  step "port show (DOWN, unbound, the default security group)" '' bash -c '
    o=$("$0" port show "$1" -f value -c status -c binding_vif_type -c security_group_ids | tr "\n" " ") || exit 1
    echo "$o"
    [[ $o == *"DOWN"* && $o == *"unbound"* && $o =~ [0-9a-f]{8}- ]]' "$OS" "vmbeam-smoke-$suffix"
  step "network list" "vmbeam-smoke-$suffix" "$OS" network list
  step "port delete" '' "$OS" port delete "vmbeam-smoke-$suffix"
  step "subnet delete" '' "$OS" subnet delete "vmbeam-smoke-$suffix"
  step "network delete" '' "$OS" network delete "vmbeam-smoke-$suffix"
  rm -rf "$tmp"
  if ((failed)); then
    echo "smoke: $failed of $n steps FAILED in $(since "$start") s"
    return 1
  fi
  echo "smoke: all $n steps passed in $(since "$start") s"
}

# ---------------------------------------------------------------------------------------

# shellcheck source=scripts/openstack/compute.sh
source "$HERE/compute.sh"

case ${1:-} in
install) shift; cmd_install "$@" ;;
compute) shift; cmd_compute "$@" ;;
up) shift; cmd_up "$@" ;;
down) shift; cmd_down "$@" ;;
status) shift; cmd_status "$@" ;;
smoke) shift; cmd_smoke "$@" ;;
--venv-path) echo "$VENV" ;;
"" | -h | --help)
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
  ;;
*)
  echo "openstack: unknown command '$1' (install, up, down, status, smoke, compute; --help)" >&2
  exit 2
  ;;
esac
