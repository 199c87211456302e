# VMBeam maintainer-script functions, shared by the Debian maintainer scripts and the RPM
# scriptlets: scripts/package.sh pastes the variables below and the functions a script names
# into it (scripts must stand alone: in postrm the package's files are already gone).
# @INVOKE@ becomes deb-systemd-invoke (Debian: honours policy-rc.d) or systemctl (RPM).
#
# Rules they follow: they work with and without systemd running (and in a chroot), they never
# start a service that was not running, and they never fail because a service is absent.

VMBEAM_CONF=/etc/vmbeam/vmbeam.conf
VMBEAM_KEY=/etc/vmbeam/cloud.key
VMBEAM_POOL=/var/lib/vmbeam/pool

# The host name as a VMBeam host id: [A-Za-z0-9._-], starting alphanumeric, at most 64.
vmbeam_host_id() {
    id=$(uname -n 2>/dev/null | tr -c 'A-Za-z0-9._-' '-' | sed 's/^[^A-Za-z0-9]*//; s/-*$//' | cut -c1-64)
    echo "${id:-localhost}"
}

# First configuration: fill the shipped host_id placeholder with the host name, and create
# the cloud key if it does not exist. Both leave an admin's file alone.
vmbeam_configure() {
    if [ -f "$VMBEAM_CONF" ] && grep -q '^host_id = "@HOSTNAME@"' "$VMBEAM_CONF"; then
        id=$(vmbeam_host_id)
        sed -i "s/^host_id = \"@HOSTNAME@\"/host_id = \"$id\"/" "$VMBEAM_CONF"
        echo "vmbeam: host_id set to \"$id\" in $VMBEAM_CONF"
    fi
    if [ ! -e "$VMBEAM_KEY" ] && grep -q "^key_file = \"$VMBEAM_KEY\"" "$VMBEAM_CONF" 2>/dev/null; then
        old_umask=$(umask)
        umask 077 # the key file is created 0600
        tmp="$VMBEAM_KEY.new.$$"
        # 32 random bytes as 64 hex digits.
        od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp"
        echo >>"$tmp"
        mv -f "$tmp" "$VMBEAM_KEY"
        umask "$old_umask"
        echo "vmbeam: generated a new cloud key in $VMBEAM_KEY. Every cloud VM of one virtual" \
            "IaaS cloud needs the same key: copy one cloud VM's key to all the others."
    fi
}

# libvirt caches which hook programs exist and looks again on SIGHUP (reload): make running
# libvirt daemons (monolithic libvirtd; modular virtqemud, virtxend) notice the VMBeam hook.
vmbeam_reload_libvirt() {
    if [ -d /run/systemd/system ]; then
        for unit in libvirtd.service virtqemud.service virtxend.service; do
            if systemctl --quiet is-active "$unit" 2>/dev/null; then
                @INVOKE@ reload "$unit" >/dev/null 2>&1 ||
                    echo "vmbeam: could not reload $unit; restart it so that libvirt runs the VMBeam hook" >&2
            fi
        done
    else
        # No systemd: the daemons' pid files, checked against the process name (a stale pid
        # file must not make us signal another process); policy-rc.d may forbid it (chroots).
        for daemon in libvirtd virtqemud virtxend; do
            pid=$(cat "/run/$daemon.pid" 2>/dev/null) || continue
            [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$daemon" ] || continue
            if command -v policy-rc.d >/dev/null 2>&1; then
                rc=0
                policy-rc.d "$daemon" reload >/dev/null 2>&1 || rc=$?
                [ "$rc" != 101 ] || continue
            fi
            kill -HUP "$pid" 2>/dev/null ||
                echo "vmbeam: could not signal $daemon ($pid); restart it so that libvirt runs the VMBeam hook" >&2
        done
    fi
}

# Without systemd, vmbeamd may still run (started by D-Bus activation): stop it on removal.
# Processes are matched by executable file (device and inode, `-ef`), not by name, so a
# vmbeamd of another root (the host, seen from a chroot) is never touched.
vmbeam_stop_without_systemd() {
    [ ! -d /run/systemd/system ] || return 0
    pids=
    for p in /proc/[0-9]*; do
        # shellcheck disable=SC3013 # -ef: dash and bash, /bin/sh on Debian and RPM distributions, have it
        if [ "$p/exe" -ef /usr/sbin/vmbeamd ]; then
            pids="$pids ${p#/proc/}"
        fi
    done
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086 # a list of pids
    kill -TERM $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        alive=
        for pid in $pids; do
            if kill -0 "$pid" 2>/dev/null; then alive="$alive $pid"; fi
        done
        [ -n "$alive" ] || return 0
        sleep 1
    done
    # shellcheck disable=SC2086
    kill -KILL $alive 2>/dev/null || true
}

# Purge: the configuration, the key and runtime state go; the beam pool stays if anything is
# in it or mounted on it (guest memory, possibly of other cloud VMs' guests).
vmbeam_purge() {
    rm -f "$VMBEAM_KEY" "$VMBEAM_KEY".new.* "$VMBEAM_CONF" "$VMBEAM_CONF".dpkg-* "$VMBEAM_CONF".rpm*
    rmdir /etc/vmbeam 2>/dev/null || true
    rm -rf /run/vmbeam
    if [ -d "$VMBEAM_POOL" ]; then
        if { command -v mountpoint >/dev/null 2>&1 && mountpoint -q "$VMBEAM_POOL"; } ||
            [ -n "$(ls -A "$VMBEAM_POOL" 2>/dev/null)" ]; then
            echo "vmbeam: keeping $VMBEAM_POOL: it is in use (guest memory); remove it yourself once no guest needs it" >&2
        else
            rmdir "$VMBEAM_POOL"
        fi
    fi
    if [ -d /var/lib/vmbeam ]; then
        find /var/lib/vmbeam -mindepth 1 -maxdepth 1 ! -name pool -exec rm -rf {} +
        rmdir /var/lib/vmbeam 2>/dev/null || true
    fi
}
