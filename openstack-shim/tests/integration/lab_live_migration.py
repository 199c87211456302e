"""The shim on the real lab (run by tests/tests/nova_shim.rs inside cloud VM 1, with the
venv of scripts/test-nova.sh): Nova's own live-migration entry point
(``LibvirtDriver.live_migration``: the operation thread plus the real
``_live_migration_monitor``) of VMBeamLibvirtDriver, against the cloud VM's real
libvirtd and vmbeamd, moves a running beam-enabled lab guest to cloud VM 2.

What stands in for the rest of Nova: no database (the migration and instance
records the monitor saves are recorded instead) and ``post_method`` /
``recover_method`` record their call; ``post_method`` marks the migration
completed, as nova.compute.manager's ``_post_live_migration`` does.

Runs under Nova 34's native threading or eventlet, as nova-compute does: chosen by
``OS_NOVA_DISABLE_EVENTLET_PATCHING`` (1: native threading; 0: eventlet; unset: eventlet).

Checks what it can from here and prints one JSON line (prefix ``RESULT ``) for
the Rust test; exit status 0 only when every check passed.
"""

from nova import monkey_patch

monkey_patch.patch()  # as nova-compute does, before anything else (see above)

import argparse  # noqa: E402
import json  # noqa: E402
import logging as std_logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import libvirt  # noqa: E402
import nova.conf  # noqa: E402
from lxml import etree  # noqa: E402
from nova import context, objects  # noqa: E402
from nova.virt import fake  # noqa: E402
from oslo_log import log as logging  # noqa: E402

from vmbeam_nova import bus  # noqa: E402
from vmbeam_nova.driver import VMBeamLibvirtDriver  # noqa: E402

CONF = nova.conf.CONF
objects.register_all()


class Recorder(std_logging.Handler):
    def __init__(self):
        super().__init__(std_logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append("%s %s: %s" % (record.levelname, record.name, record.getMessage()))


def make_instance(uuid, memory_mb):
    flavor = objects.Flavor(
        id=2, flavorid="2", name="m1.beam", memory_mb=memory_mb, vcpus=1, root_gb=0,
        ephemeral_gb=0, swap=0, rxtx_factor=1.0, vcpu_weight=None,
        extra_specs={"vmbeam:enabled": "true"},
    )
    return objects.Instance(
        id=1, uuid=uuid, display_name="lab-guest", project_id="lab", user_id="lab",
        flavor=flavor, old_flavor=None, new_flavor=None, memory_mb=memory_mb, vcpus=1,
        root_gb=0, ephemeral_gb=0, system_metadata={}, image_ref="",
        pci_devices=objects.PciDeviceList(), numa_topology=None, resources=None,
        migration_context=None, vm_state="active", task_state="migrating",
        host="cvm1", node="cvm1", os_type="linux", vcpu_model=None,
        kernel_id=None, ramdisk_id=None, config_drive=None, trusted_certs=None,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uuid", required=True, help="the lab guest's domain UUID")
    ap.add_argument("--memory-mb", type=int, required=True)
    ap.add_argument("--source-uri", required=True, help="this cloud VM's libvirtd")
    ap.add_argument("--source-host", default="cvm1", help="this cloud VM's Nova host name")
    ap.add_argument("--dest-host", required=True, help="the destination's Nova host name")
    ap.add_argument("--dest-addr", required=True,
                    help="its live_migration_inbound_addr (target_connect_addr)")
    ap.add_argument("--expect", choices=("zero-copy", "nova"), default="zero-copy",
                    help="zero-copy through vmbeamd, or Nova's own migration (the"
                    " destination is not co-located)")
    args = ap.parse_args()

    logging.register_options(CONF)
    CONF([], project="nova", default_config_files=[])
    CONF.set_override("debug", False)
    logging.setup(CONF, "nova")
    rec = Recorder()
    std_logging.getLogger().addHandler(rec)

    # What a nova-compute of this cloud VM has in nova.conf.
    CONF.set_override("compute_driver", "vmbeam.VMBeamLibvirtDriver")
    CONF.set_override("connection_uri", args.source_uri, group="libvirt")
    probe = libvirt.open(args.source_uri)
    dom = probe.lookupByUUIDString(args.uuid)
    domain_type = etree.fromstring(dom.XMLDesc(0).encode()).get("type")
    name = dom.name()
    # kvm, or qemu (TCG); VMBEAM_TEST_VIRT_TYPE only for trying this script on test:///default.
    CONF.set_override("virt_type", os.environ.get("VMBEAM_TEST_VIRT_TYPE", domain_type), group="libvirt")

    drv = VMBeamLibvirtDriver(fake.FakeVirtAPI(), False)
    # The parts of init_host a live migration needs: libvirt's event loop and
    # the migration flags from nova.conf.
    drv._host.initialize()
    drv._parse_migration_flags()

    ctx = context.get_admin_context()
    instance = make_instance(args.uuid, args.memory_mb)
    saved = {"migration": [], "instance": []}

    def migration_save(self):
        saved["migration"].append(
            {k: getattr(self, k) for k in ("status", "memory_total", "memory_processed",
                                           "memory_remaining") if self.obj_attr_is_set(k)})
        self.obj_reset_changes()

    def instance_save(self, *a, **kw):
        saved["instance"].append({"progress": self.progress if self.obj_attr_is_set("progress") else None})
        self.obj_reset_changes()

    objects.Migration.save = migration_save
    objects.Instance.save = instance_save

    migration = objects.Migration(context=ctx, id=1, uuid=args.uuid, status="running",
                                  migration_type="live-migration", source_compute=args.source_host,
                                  dest_compute=args.dest_host, instance_uuid=args.uuid)
    md = objects.LibvirtLiveMigrateData(
        graphics_listen_addr_vnc=CONF.vnc.server_listen,
        graphics_listen_addr_spice=CONF.spice.server_listen,
        serial_listen_addr=None, serial_listen_ports=[], target_connect_addr=args.dest_addr,
        bdms=[], block_migration=False, is_shared_instance_path=True,
        is_shared_block_storage=True, migration=migration,
        # What the destination's check_can_live_migrate_destination reports
        # with [libvirt] file_backed_memory = 0 (the default).
        dst_wants_file_backed_memory=False,
    )
    calls = {"post": [], "recover": []}

    def post_method(c, inst, dest, block_migration, migrate_data):
        calls["post"].append(dest)
        # nova.compute.manager._post_live_migration, in the end.
        migrate_data.migration.status = "completed"
        migrate_data.migration.save()

    def recover_method(c, inst, dest, migrate_data, migration_status="error"):
        calls["recover"].append(migration_status)
        migrate_data.migration.status = migration_status
        migrate_data.migration.save()

    t0 = time.monotonic()
    error = None
    try:
        drv.live_migration(ctx, instance, args.dest_host, post_method, recover_method, False, md)
    except Exception as e:  # reported, and a failed check below
        error = "%s: %s" % (type(e).__name__, e)
    elapsed = time.monotonic() - t0

    # Where the guest is now, asked of both libvirtds.
    dest_uri = "qemu+tcp://%s/system" % args.dest_addr
    on_source = args.uuid in [d.UUIDString() for d in libvirt.open(args.source_uri).listAllDomains()]
    dest_backing = None
    try:
        dest_dom = libvirt.open(dest_uri).lookupByUUIDString(args.uuid)
        on_dest = bool(dest_dom.isActive())
        mb = etree.fromstring(dest_dom.XMLDesc(0).encode()).find("./memoryBacking")
        if mb is not None:
            dest_backing = {
                "source": mb.find("source").get("type") if mb.find("source") is not None else None,
                "access": mb.find("access").get("mode") if mb.find("access") is not None else None,
                "discard": mb.find("discard") is not None,
            }
    except libvirt.libvirtError:
        on_dest = False

    # The job vmbeamd ran, from vmbeamd itself.
    job = {}
    paths = [ln.split("(job ", 1)[1].split(")", 1)[0]
             for ln in rec.lines if "through vmbeamd (job " in ln]
    if paths:
        with bus.VMBeamClient.connect(timeout=10) as c:
            job = c.job(paths[-1])
            job = {k: job.get(k) for k in ("Phase", "Mode", "ModeReason", "BytesTransferred",
                                           "Downtime", "TotalTime", "Domain", "Destination")}

    common = {
        "no exception from live_migration": error is None,
        "post_method called once, recover_method never": calls == {"post": [args.dest_host], "recover": []},
        "the migration record saved as completed": bool(saved["migration"]) and saved["migration"][-1].get("status") == "completed",
        "Nova's monitor saw the operation complete": any("Migration operation has completed" in ln for ln in rec.lines),
        "the guest is gone from the source": not on_source,
        "the guest runs on the destination": on_dest,
    }
    if args.expect == "zero-copy":
        checks = dict(common, **{
            "the shim chose vmbeamd, saying why at INFO": any(
                ln.startswith("INFO vmbeam_nova.driver") and "zero-copy live migration to %s through vmbeamd" % dest_uri in ln
                and "shares the beam pool (proven)" in ln for ln in rec.lines),
            "vmbeamd's job completed zero-copy": job.get("Phase") == "completed" and job.get("Mode") == "zero-copy",
            "the job is this guest's, to that destination": (job.get("Domain"), job.get("Destination")) == (name, dest_uri),
            # 256 MiB of guest memory; zero-copy sends device state only.
            "less than 16 MiB on the wire": job.get("BytesTransferred") is not None and job["BytesTransferred"] < 16 << 20,
            # What `openstack server migration show` reads at the end.
            "the record shows the guest's memory moved and the bytes sent": bool(saved["migration"]) and any(
                s.get("memory_total") == args.memory_mb << 20 and s.get("memory_remaining") == 0
                and s.get("memory_processed") == job.get("BytesTransferred") for s in saved["migration"]),
        })
    else:
        checks = dict(common, **{
            "the shim chose Nova's own migration, saying why at INFO": any(
                ln.startswith("INFO vmbeam_nova.driver") and "runs as Nova's own libvirt migration: vmbeamd says %s is not co-located" % dest_uri in ln
                for ln in rec.lines),
            "no vmbeamd job": not paths,
            # With a default nova.conf (no file_backed_memory) Nova's XML would drop it.
            "the guest keeps its shared file memory on the destination": dest_backing == {
                "source": "file", "access": "shared", "discard": False},
        })
    result = {
        "ok": all(checks.values()),
        "failed": [k for k, v in checks.items() if not v],
        "error": error,
        "elapsed_s": round(elapsed, 3),
        "virt_type": domain_type,
        "concurrency": "eventlet" if monkey_patch.is_patched() else "threading",
        "domain": name,
        "job": job,
        "dest_memory_backing": dest_backing,
        "migration_saves": saved["migration"],
        "instance_saves": len(saved["instance"]),
        "shim_log": [ln for ln in rec.lines if "vmbeam" in ln or "Migration operation" in ln],
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Under native threading, Host's connection-event thread (a pool worker that waits
    # for events for ever) would keep the interpreter from exiting; nova-compute ends it
    # by stopping its service, which this harness has none of.
    os._exit(rc)
