"""Live migration through Nova's real API (run by tests/tests/nova_api.rs in the host's
namespace, with the venv of scripts/openstack.sh and its ``openrc`` in the environment).

The cloud: the control plane of ``scripts/openstack.sh up`` on the lab's cloud network and
one nova-compute (VMBeam's driver) in each lab cloud VM (``scripts/openstack.sh compute``):
cvm1 and cvm2 share the beam pool (co-located), cvm3 has a pool of its own.

What it does, each step through the API an admin uses:
- images: the lab guest's kernel (aki) and initramfs (ari) and a 1 MiB root disk whose
  ``kernel_id``, ``ramdisk_id``, ``os_command_line`` and ``hw_qemu_guest_agent=yes`` make
  Nova boot the lab guest with its agent on Nova's guest-agent channel; a flavor with
  ``vmbeam:enabled=true``;
- a tenant network, IPv4 subnet and port for the guest with one NIC;
- per case: boot (or reuse) a server on a named compute, wait for ACTIVE and for the
  agent's READY in Nova's console log, live-migrate it with ``openstack server migrate
  --live-migration --host`` (the CLI) or the raw ``os-migrateLive`` action, wait until Nova
  says it is done, then check: ACTIVE on the expected host, the migration record
  ``completed`` with the right source and destination, Placement allocations on the
  destination's resource provider only, the way it moved (the source compute's log:
  VMBeam's zero-copy line, or Nova's own migration), the figures Nova recorded, and the
  guest agent's memory check (``vmbeam-lab guest check``) on the destination.

Prints one ``RESULT <json>`` line; exit status 0 only when every check passed.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse

import openstack
import pymysql

MIGRATE_MICROVERSION = "2.30"  # os-migrateLive with host and block_migration "auto"
LIST_MICROVERSION = "2.80"


class Failed(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Harness:
    def __init__(self, args):
        self.args = args
        self.conn = openstack.connect()
        self.failed = []
        self.result = {"cases": []}

    # ---- set-up -------------------------------------------------------------------

    def upload(self, name, path, disk_format, container_format, **props):
        for img in self.conn.image.images(name=name):
            self.conn.image.delete_image(img)
        body = {
            "name": name,
            "disk_format": disk_format,
            "container_format": container_format,
            "visibility": "public",
            **props,
        }
        r = self.conn.image.post("/images", json=body)
        r.raise_for_status()
        image_id = r.json()["id"]
        with open(path, "rb") as f:
            r = self.conn.image.put(
                f"/images/{image_id}/file",
                data=f,
                headers={"Content-Type": "application/octet-stream"},
            )
        r.raise_for_status()
        img = self.conn.image.get_image(image_id)
        if img.status != "active":
            raise Failed(f"image {name} is {img.status} after its upload")
        return image_id

    def set_up(self):
        a = self.args
        t0 = time.monotonic()
        kernel = self.upload("vmbeam-lab-kernel", a.kernel, "aki", "aki")
        ramdisk = self.upload("vmbeam-lab-initrd", a.initrd, "ari", "ari")
        root = os.path.join(a.work, "root.raw")
        with open(root, "wb") as f:
            f.truncate(1 << 20)
        self.image = self.upload(
            "vmbeam-lab-guest", root, "raw", "bare",
            kernel_id=kernel, ramdisk_id=ramdisk, os_command_line=a.cmdline,
            hw_qemu_guest_agent="yes",
        )
        fl = self.conn.compute.find_flavor("vmbeam-lab")
        if fl is not None:
            self.conn.compute.delete_flavor(fl)
        # disk 0: the root disk keeps the image's 1 MiB (Nova never resizes or inspects
        # it; a zero-disk flavor is the admin's to boot from an image).
        fl = self.conn.compute.create_flavor(
            name="vmbeam-lab", ram=a.memory_mb, vcpus=1, disk=0)
        self.conn.compute.create_flavor_extra_specs(fl, {"vmbeam:enabled": "true"})
        self.flavor = fl.id
        self.result["set_up_s"] = round(time.monotonic() - t0, 1)
        log(f"images and flavor ready in {self.result['set_up_s']} s")

    def port(self):
        """A port on a fresh tenant network (the Neutron of scripts/openstack.sh)."""
        net = self.conn.network.create_network(name="vmbeam-guests")
        self.conn.network.create_subnet(network_id=net.id, ip_version=4,
                                        cidr="198.19.100.0/24", name="vmbeam-guests-v4")
        port = self.conn.network.create_port(network_id=net.id, name="beam-port1")
        log(f"port {port.id} on network {net.id} ({port.fixed_ips[0]['ip_address']})")
        return port.id

    # ---- servers ------------------------------------------------------------------

    def boot(self, name, host, networks="none"):
        t0 = time.monotonic()
        s = self.conn.compute.create_server(
            name=name, flavor_id=self.flavor, image_id=self.image,
            networks=networks, availability_zone=f"nova:{host}")
        s = self.conn.compute.wait_for_server(s, status="ACTIVE", failures=["ERROR"],
                                              interval=2, wait=600)
        console = os.path.join(self.args.instances, s.id, "console.log")
        deadline = time.monotonic() + 600
        while True:
            try:
                with open(console, "rb") as f:
                    if b"VMBEAM-AGENT READY" in f.read():
                        break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise Failed(f"{name}: no VMBEAM-AGENT READY in {console} within 600 s")
            time.sleep(1)
        log(f"{name} ({s.id}, {s.instance_name}) ACTIVE on {s.compute_host}, "
            f"agent ready in {time.monotonic() - t0:.1f} s")
        return s

    def server(self, s):
        return self.conn.compute.get_server(s.id)

    def check_memory(self, s, where):
        r = subprocess.run([self.args.lab, "guest", "check", s.instance_name],
                           capture_output=True, text=True, timeout=300)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or not out.startswith(f"PASS {s.instance_name} on {where}"):
            raise Failed(f"memory check of {s.name} on {where}: {out}")
        return out

    # ---- checks -------------------------------------------------------------------

    def db(self, url):
        u = urllib.parse.urlparse(url.replace("mysql+pymysql://", "mysql://"))
        return pymysql.connect(host=u.hostname, port=u.port or 3306,
                               user=urllib.parse.unquote(u.username),
                               password=urllib.parse.unquote(u.password),
                               database=u.path.lstrip("/"), connect_timeout=5)

    def migration_record(self, server_id):
        """Nova's own record of the server's last live migration (cell1's migrations
        table: the API shows memory figures of in-progress migrations only)."""
        conn = self.db(self.args.nova_db)
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(
                    "SELECT id, uuid, status, source_compute, dest_compute, migration_type,"
                    " memory_total, memory_processed, memory_remaining FROM migrations"
                    " WHERE instance_uuid = %s AND deleted = 0 ORDER BY id DESC LIMIT 1",
                    (server_id,))
                return cur.fetchone()
        finally:
            conn.close()

    def allocations(self, server_id):
        r = self.conn.placement.get(f"/allocations/{server_id}")
        r.raise_for_status()
        names = {}
        rps = self.conn.placement.get("/resource_providers")
        rps.raise_for_status()
        for rp in rps.json()["resource_providers"]:
            names[rp["uuid"]] = rp["name"]
        return {names.get(k, k): v["resources"]
                for k, v in r.json()["allocations"].items()}

    def shim_lines(self, host, server_id, since):
        """VMBeam's log lines about this server in compute `host`'s log, from byte
        offset `since`."""
        path = os.path.join(self.args.logs, f"nova-compute@{host}.log")
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [ln for ln in text.splitlines() if "VMBeam:" in ln and server_id in ln]

    def log_size(self, host):
        try:
            return os.path.getsize(os.path.join(self.args.logs, f"nova-compute@{host}.log"))
        except FileNotFoundError:
            return 0

    # ---- the migration ------------------------------------------------------------

    def live_migrate(self, s, dest, via):
        if via == "cli":
            cmd = ["openstack", "--os-compute-api-version", MIGRATE_MICROVERSION,
                   "server", "migrate", "--live-migration", "--host", dest, s.id]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise Failed(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        else:
            r = self.conn.compute.post(
                f"/servers/{s.id}/action",
                json={"os-migrateLive": {"host": dest, "block_migration": "auto"}},
                microversion=MIGRATE_MICROVERSION)
            if r.status_code != 202:
                raise Failed(f"os-migrateLive: HTTP {r.status_code}: {r.text}")

    def wait_moved(self, s, dest, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            cur = self.server(s)
            rec = self.migration_record(s.id)
            if (cur.status == "ACTIVE" and cur.task_state is None and rec
                    and rec["status"] in ("completed", "error", "failed", "cancelled")):
                return cur, rec
            if cur.status == "ERROR":
                raise Failed(f"{s.name} went to ERROR: {cur.fault}")
            if time.monotonic() > deadline:
                raise Failed(f"{s.name} not settled after {timeout} s: status {cur.status}, "
                             f"task {cur.task_state}, migration {rec and rec['status']}")
            time.sleep(1)

    def record(self, title, s, source, dest, via, expect, body):
        """Runs one case's `body(c)` and records it in the result, failed or not."""
        log(f"case: {title}")
        c = {"title": title, "server": s.name, "source": source, "dest": dest,
             "via": via, "expect": expect}
        self.result["cases"].append(c)
        try:
            body(c)
            c["ok"] = True
        except Failed as e:
            c["ok"] = False
            c["error"] = str(e)
            self.failed.append(title)
            log(f"  FAILED: {e}")
        return c["ok"]

    def case(self, title, s, source, dest, via, expect):
        def body(c):
            offset = self.log_size(source)
            t0 = time.monotonic()
            self.live_migrate(s, dest, via)
            cur, rec = self.wait_moved(s, dest)
            c["elapsed_s"] = round(time.monotonic() - t0, 2)
            c["migration"] = {k: rec[k] for k in (
                "status", "source_compute", "dest_compute", "migration_type",
                "memory_total", "memory_processed", "memory_remaining")}
            c["host"] = cur.compute_host
            if rec["status"] != "completed":
                raise Failed(f"migration {rec['uuid']} ended {rec['status']}")
            if (rec["source_compute"], rec["dest_compute"]) != (source, dest):
                raise Failed(f"migration record says {rec['source_compute']} -> "
                             f"{rec['dest_compute']}")
            if cur.compute_host != dest:
                raise Failed(f"ACTIVE on {cur.compute_host}, not {dest}")
            alloc = self.allocations(s.id)
            c["allocations"] = alloc
            if list(alloc) != [dest]:
                raise Failed(f"Placement allocations on {sorted(alloc)}, want [{dest}]")
            lines = self.shim_lines(source, s.id, offset)
            c["shim_log"] = [ln.split("VMBeam:", 1)[1].strip() for ln in lines]
            done = [ln for ln in lines if re.search(r"VMBeam: zero-copy live migration to "
                                                    r"\S+ completed", ln)]
            own = [ln for ln in lines if "runs as Nova's own" in ln]
            if expect == "zero-copy":
                if not done:
                    raise Failed(f"no zero-copy completion in {source}'s log: {c['shim_log']}")
                m = re.search(r"(\d+) ms total, (\d+) ms downtime, (\d+) bytes", done[-1])
                if m:
                    c["total_ms"], c["downtime_ms"], c["bytes"] = map(int, m.groups())
                if (rec["memory_total"] or 0) != self.args.memory_mb << 20:
                    raise Failed(f"Nova's record: memory_total {rec['memory_total']}, "
                                 f"want the flavor's {self.args.memory_mb} MiB")
                if (rec["memory_processed"] or 0) >= 16 << 20:
                    raise Failed(f"Nova's record: {rec['memory_processed']} bytes processed "
                                 "for a zero-copy migration")
            else:
                if done or not own:
                    raise Failed(f"expected Nova's own migration: {c['shim_log']}")
            listed = json.loads(self.cli(
                "--os-compute-api-version", LIST_MICROVERSION, "server", "migration", "list",
                "--server", s.id, "-f", "json"))
            mine = [m for m in listed if m.get("UUID") == rec["uuid"]]
            if not mine or mine[0].get("Status") != "completed":
                raise Failed(f"openstack server migration list: {listed}")
            c["listed"] = mine[0]
            c["check"] = self.check_memory(cur, dest)
            log(f"  ok in {c['elapsed_s']} s: {c.get('bytes', '-')} bytes, "
                f"{c.get('downtime_ms', '-')} ms downtime; {c['check']}")

        return self.record(title, s, source, dest, via, expect, body)

    # ---- abort and force-complete while vmbeamd holds the job ----------------------

    def hold(self, cvm, point, ms):
        """vmbeamd's fault-injection hold at `point` in cloud VM `cvm` (dbus-service's
        fault.rs): the job waits there until the file goes or `ms` pass."""
        path = f"/run/vmbeam/fault-hold-{point}-ms"
        cmd = f"echo {ms} > {path}" if ms else f"rm -f {path}"
        subprocess.run([self.args.lab, "exec", cvm, "sh", "-c", cmd], check=True,
                       timeout=60)

    def running_migration(self, s, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.conn.compute.get(f"/servers/{s.id}/migrations",
                                      microversion=LIST_MICROVERSION)
            r.raise_for_status()
            ms = [m for m in r.json()["migrations"] if m["status"] == "running"]
            if ms:
                return ms[0]
            time.sleep(0.5)
        raise Failed(f"no running migration of {s.name} within {timeout} s")

    def cli(self, *args):
        cmd = ["openstack", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise Failed(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def abort_case(self, s, source, dest):
        def body(c):
            # The destination's QEMU is up and waiting for the stream: libvirt's job runs.
            self.hold(dest, "started", 60000)
            try:
                self.live_migrate(s, dest, "api")
                m = self.running_migration(s)
                # Nova's list shows the job while it runs (progress figures included).
                c["in_progress"] = {k: m.get(k) for k in (
                    "status", "memory_total_bytes", "memory_processed_bytes",
                    "memory_remaining_bytes")}
                # ... and `migration show` of the running migration, by its UUID: with a
                # numeric ID, python-openstackclient 10.3.1 passes server and migration to
                # openstacksdk 4.22's get_server_migration in the wrong order (404).
                shown = json.loads(self.cli(
                    "--os-compute-api-version", LIST_MICROVERSION, "server", "migration",
                    "show", s.id, m["uuid"], "-f", "json"))
                c["shown"] = shown
                if str(shown.get("Status", shown.get("status"))) != "running":
                    raise Failed(f"migration show: {shown}")
                self.cli("--os-compute-api-version", "2.24", "server", "migration", "abort",
                         s.id, str(m["id"]))
            finally:
                self.hold(dest, "started", 0)
            cur, rec = self.wait_moved(s, source)
            c["migration"] = {"status": rec["status"]}
            c["host"] = cur.compute_host
            if rec["status"] not in ("cancelled", "error", "failed"):
                raise Failed(f"the aborted migration ended {rec['status']}")
            if cur.compute_host != source:
                raise Failed(f"after abort: ACTIVE on {cur.compute_host}, not {source}")
            alloc = self.allocations(s.id)
            if list(alloc) != [source]:
                raise Failed(f"after abort: Placement allocations on {sorted(alloc)}")
            c["check"] = self.check_memory(cur, source)
            log(f"  ok: migration {rec['status']}, still on {source}; {c['check']}")

        return self.record("migration abort during a zero-copy job", s, source, dest,
                           "cli", "stays", body)

    def force_complete_case(self, s, source, dest):
        def body(c):
            offset = self.log_size(source)
            self.hold(source, "planning", 60000)
            try:
                self.live_migrate(s, dest, "api")
                m = self.running_migration(s)
                self.cli("--os-compute-api-version", "2.22", "server", "migration",
                         "force", "complete", s.id, str(m["id"]))
                time.sleep(2)
            finally:
                self.hold(source, "planning", 0)
            cur, rec = self.wait_moved(s, dest)
            c["migration"] = {"status": rec["status"]}
            c["host"] = cur.compute_host
            if rec["status"] != "completed" or cur.compute_host != dest:
                raise Failed(f"migration {rec['status']}, server on {cur.compute_host}")
            lines = self.shim_lines(source, s.id, offset)
            c["shim_log"] = [ln.split("VMBeam:", 1)[1].strip() for ln in lines]
            if not any("zero-copy live migration to" in ln and "completed" in ln
                       for ln in lines):
                raise Failed(f"not zero-copy: {c['shim_log']}")
            c["check"] = self.check_memory(cur, dest)
            log(f"  ok: zero-copy despite the force-complete; {c['check']}")

        return self.record("force-complete while vmbeamd plans the zero-copy job", s,
                           source, dest, "api", "zero-copy", body)

    def run(self):
        self.set_up()
        g1 = self.boot("beam-nonic", "cvm1")
        self.result["boot_check"] = self.check_memory(g1, "cvm1")
        self.case("no NIC, co-located, openstack server migrate --live-migration",
                  g1, "cvm1", "cvm2", "cli", "zero-copy")
        self.case("no NIC, back, raw os-migrateLive", g1, "cvm2", "cvm1", "api", "zero-copy")
        # A guest with one Neutron port: Nova rewrites its interface (and listen addresses)
        # in the destination's XML, which zero-copy must accept.
        port = self.port()
        g2 = self.boot("beam-port", "cvm1", networks=[{"port": port}])
        self.result["port_boot_check"] = self.check_memory(g2, "cvm1")
        self.case("one port, co-located, os-migrateLive", g2, "cvm1", "cvm2", "api",
                  "zero-copy")
        self.case("one port, back, openstack server migrate --live-migration", g2, "cvm2",
                  "cvm1", "cli", "zero-copy")
        self.abort_case(g1, "cvm1", "cvm2")
        self.force_complete_case(g1, "cvm1", "cvm2")
        self.case("back to cvm1", g1, "cvm2", "cvm1", "cli", "zero-copy")
        self.case("not co-located (own pool), default nova.conf: Nova's own migration",
                  g1, "cvm1", "cvm3", "cli", "nova")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lab", required=True, help="the vmbeam-lab binary")
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--cmdline", required=True)
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--instances", required=True, help="Nova's shared instances_path")
    p.add_argument("--logs", required=True, help="where nova-compute@CVM.log are")
    p.add_argument("--nova-db", required=True, help="cell1's database URL")
    p.add_argument("--work", required=True, help="a scratch directory")
    h = Harness(p.parse_args())
    try:
        h.run()
    except Exception as e:  # noqa: BLE001
        h.failed.append("set-up")
        h.result["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {h.result['error']}")
    h.result["failed"] = h.failed
    h.result["ok"] = not h.failed
    print("RESULT " + json.dumps(h.result, default=str), flush=True)
    return 0 if h.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
