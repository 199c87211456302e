"""VMBeamLibvirtDriver: Nova's LibvirtDriver, plus

- beam-enabled guests (``_get_guest_config``) when the flavor, the image or the
  host's configuration asks for it;
- live migrations run by vmbeamd (``_live_migration_operation``) when the
  guest is beam-enabled and vmbeamd proves the destination co-located, so only
  device state crosses the network; otherwise the parent's code path,
  untouched;
- abort mapped to the vmbeamd job's ``Cancel`` and a harmless force-complete
  while vmbeamd runs the migration (or decides whether it can: the request is
  kept and handed to the parent if the parent's migration runs after all);
- ``live_migration_timeout_action = force_complete`` on a zero-copy job that
  outlives Nova's completion timeout: there is no memory left to force, so
  the job is cancelled (logged once) and the guest stays on the source;
- a zero-copy migration's record ends with the guest's memory as its total,
  the bytes that crossed the network as processed and nothing remaining
  (``openstack server migration show``), even when it ended between two of
  the monitor's samples.

Nova's downtime steps (``live_migration_downtime*``) reach vmbeamd's job
unchanged, as they would reach any libvirt job: they bound when QEMU may
switch over, and with the guest's RAM shared what is left to send then is
the device state and a few hundred KiB of ROM, within Nova's first step (50 ms
with the defaults). vmbeamd sets no downtime of its own.

vmbeamd runs the migration as libvirt's own job (``migrateToURI3`` on the
source), so Nova's monitor (``_live_migration_monitor``, unchanged) sees it as
any other: job statistics for ``GET /servers/{id}/migrations``, then the
domain gone from the source, then ``post_method``; or the domain still here
and ``recover_method``.

Written against Nova's private driver methods: see pyproject.toml for the
Nova releases it is tested with.
"""

import copy
import dataclasses
import functools
import threading
import time

import nova.conf
from lxml import etree
from nova import exception, objects
from nova.console import serial as serial_console
from nova.network import model as network_model
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import guest as libvirt_guest
from nova.virt.libvirt import migration as libvirt_migrate
from oslo_log import log as logging
from oslo_utils import units

from vmbeam_nova import bus, guest_config
from vmbeam_nova import conf as vmbeam_conf

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF
vmbeam_conf.register_opts(CONF)

# The libvirt module the parent driver uses (Nova's tests swap in fakelibvirt).
def _libvirt():
    return libvirt_driver.libvirt


#: vmbeamd errors at Migrate after which the parent's migration is the right
#: thing: nothing has happened to the guest and another path can move it.
_FALL_BACK_AT_START = ("ZeroCopyRefused", "NotBeamEnabled", "NotAuthorized")
#: Job errors after which the guest provably still runs on the source,
#: untouched (the destination refused before anything ran there).
_FALL_BACK_AFTER_JOB = ("ZeroCopyRefused", "TicketRefused")


@dataclasses.dataclass
class _Plan:
    dest_uri: str
    migrate_uri: str
    flags: int
    reason: str
    #: Nova's domain XML for the destination (ports, listen addresses, volumes
    #: rewritten), with the source's memory backing kept: vmbeamd carries its
    #: ticket in it.
    dest_xml: str = None


class _Migration:
    """The shim's record of one live migration of one instance."""

    def __init__(self):
        self.lock = threading.Lock()
        #: None while deciding, then "vmbeam" or "libvirt" (the parent's path).
        self.route = None
        self.path = None
        self.phase = None
        self.cancel_requested = False
        self.cancel_delivered = False
        self.cancel_sending = False
        #: A force-complete arrived before the route was known.
        self.force_requested = False
        #: The completion-timeout action has been taken (it is taken once).
        self.timeout_acted = False


def with_memory_backing_of(new, old):
    """``new`` (a domain XML) with ``old``'s <memoryBacking> in place of its
    own (or none, if ``old`` has none)."""
    parser = etree.XMLParser(remove_blank_text=False)
    n = etree.fromstring(new.encode() if isinstance(new, str) else new, parser)
    o = etree.fromstring(old.encode() if isinstance(old, str) else old, parser)
    kept = o.find("./memoryBacking")
    mine = n.find("./memoryBacking")
    if mine is not None:
        n.remove(mine)
    if kept is not None:
        anchor = n.find("./currentMemory")
        if anchor is None:
            anchor = n.find("./memory")
        if anchor is not None:
            anchor.addnext(copy.deepcopy(kept))
        else:
            n.insert(0, copy.deepcopy(kept))
    return etree.tostring(n, encoding="unicode")


class _BeamFallbackGuest(libvirt_guest.Guest):
    """A beam-enabled guest as the parent's ``_live_migration_operation``
    sees it when Nova's own migration moves it (the destination is not
    co-located): Nova's destination XML with the guest's own memory backing
    (a shared file) put back. Nova's ``_update_memory_backing_xml`` strips the
    file backing unless the destination sets ``[libvirt] file_backed_memory``,
    and libvirt then refuses the migration ("Target memoryBacking source
    'none' doesn't match source memoryBacking source 'file'"); with that
    setting it adds ``<discard/>`` and immediate allocation, which must never
    reach a pool file. The destination's vmbeamd gives the arriving guest a
    fresh private pool file of its own (a copying migration), so the guest
    stays beam-enabled there."""

    def __init__(self, guest, source_xml):
        super().__init__(guest._domain)
        self._vmbeam_source_xml = source_xml

    def migrate(self, destination, *args, destination_xml=None, **kwargs):
        if destination_xml:
            destination_xml = with_memory_backing_of(destination_xml,
                                                     self._vmbeam_source_xml)
        return super().migrate(destination, *args,
                               destination_xml=destination_xml, **kwargs)


class VMBeamLibvirtDriver(libvirt_driver.LibvirtDriver):
    """compute_driver = vmbeam.VMBeamLibvirtDriver"""

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self._vmbeam_migrations = {}
        #: instance uuid -> the figures of its completed zero-copy migration,
        #: for the migration record (see _vmbeam_post).
        self._vmbeam_results = {}
        #: Which instance's migration the running thread monitors (Nova's
        #: _live_migration_monitor calls live_migration_force_complete as its
        #: completion-timeout action; an API request comes from elsewhere).
        #: Green-thread local under eventlet, as threading is patched there.
        self._vmbeam_local = threading.local()

    # -- vmbeamd ----------------------------------------------------------

    @staticmethod
    def _vmbeam():
        return bus.VMBeamClient.connect(timeout=CONF.vmbeam.dbus_timeout)

    def _vmbeam_identity(self):
        """(BeamIdentity, where it came from)."""
        try:
            with self._vmbeam() as c:
                host, cloud, pool = c.identity()
            return guest_config.BeamIdentity(host, cloud, pool), "vmbeamd"
        except bus.VMBeamError as e:
            path = CONF.vmbeam.identity_file
            try:
                return guest_config.read_identity_file(path), path
            except (OSError, ValueError) as e2:
                raise RuntimeError(
                    "vmbeamd cannot be asked (%s) and %s cannot be read (%s)"
                    % (e.text, path, e2)
                ) from e2

    # -- spawn: beam-enabled guests -----------------------------------------

    def _get_guest_config(self, instance, network_info, image_meta, disk_info,
                          *args, **kwargs):
        guest = super()._get_guest_config(
            instance, network_info, image_meta, disk_info, *args, **kwargs)
        wanted, why = guest_config.beam_requested(
            instance, CONF.vmbeam.enable_all)
        if not wanted:
            LOG.info("VMBeam: guest is not beam-enabled: %s", why,
                     instance=instance)
            return guest
        try:
            identity, source = self._vmbeam_identity()
            out, changes = guest_config.beam_enable(
                guest, identity, CONF.vmbeam.qmp_dir,
                generation=self._vmbeam_existing_generation(instance))
        except (RuntimeError, guest_config.CannotEnable) as e:
            LOG.warning("VMBeam: guest is not beam-enabled although %s: %s; "
                        "its live migrations will copy its memory", why, e,
                        instance=instance)
            return guest
        LOG.info("VMBeam: guest is beam-enabled (%s; this host from %s): %s",
                 why, source, "; ".join(changes), instance=instance)
        return out

    def _vmbeam_existing_generation(self, instance):
        """The generation of a domain already defined here (hard reboot,
        rebuild), as ``vmbeam enable`` keeps it; 0 for a new guest."""
        try:
            xml = self._host.get_guest(instance).get_xml_desc()
        except Exception:
            return 0
        try:
            meta = guest_config.metadata_of_domain_xml(xml)
        except (etree.XMLSyntaxError, ValueError):
            return 0
        return meta.generation if meta is not None else 0

    # -- live migration ---------------------------------------------------

    def _live_migration_operation(self, context, instance, dest,
                                  block_migration, migrate_data, guest,
                                  device_names):
        rec = _Migration()
        self._vmbeam_migrations[instance.uuid] = rec
        try:
            plan, reason = self._vmbeam_plan(instance, dest, migrate_data,
                                             guest)
            if plan is not None:
                done = self._vmbeam_migrate(instance, guest, migrate_data,
                                            plan, rec)
                if done:
                    return
            else:
                LOG.info("VMBeam: live migration to %s runs as Nova's own "
                         "libvirt migration: %s", dest, reason,
                         instance=instance)
            with rec.lock:
                rec.route = "libvirt"
                cancelled = rec.cancel_requested
                forced = rec.force_requested
            if cancelled:
                self._vmbeam_ended_here(
                    guest, instance, dest,
                    "live migration aborted before it started",
                    cancelled=True)
                return
            if forced:
                LOG.info("VMBeam: the force-complete requested while the "
                         "route was decided now goes to Nova's own "
                         "migration", instance=instance)
                super().live_migration_force_complete(instance)
            guest = self._vmbeam_fallback_guest(guest, instance)
            return super()._live_migration_operation(
                context, instance, dest, block_migration, migrate_data,
                guest, device_names)
        finally:
            if self._vmbeam_migrations.get(instance.uuid) is rec:
                del self._vmbeam_migrations[instance.uuid]

    @staticmethod
    def _vmbeam_fallback_guest(guest, instance):
        """``guest``, or for a beam-enabled guest one whose migration keeps
        its memory backing (see _BeamFallbackGuest)."""
        try:
            xml = guest.get_xml_desc(dump_migratable=True)
        except Exception:
            return guest
        try:
            if guest_config.metadata_of_domain_xml(xml) is None:
                return guest
        except (etree.XMLSyntaxError, ValueError):
            return guest
        LOG.info("VMBeam: Nova's own migration keeps the beam-enabled "
                 "guest's memory backing (a shared file) in the destination "
                 "XML; the destination gives it a fresh pool file",
                 instance=instance)
        return _BeamFallbackGuest(guest, xml)

    def _migration_flags(self, migrate_data):
        if migrate_data.block_migration:
            return self._block_migration_flags
        return self._live_migration_flags

    def _vmbeam_plan(self, instance, dest, migrate_data, guest):
        """(a _Plan, reason) for a zero-copy migration, or (None, reason)."""
        lv = _libvirt()
        if CONF.vmbeam.live_migration == "off":
            return None, "[vmbeam] live_migration is off"
        if CONF.libvirt.virt_type not in ("kvm", "qemu"):
            return None, ("virt_type %s: vmbeamd drives QEMU only"
                          % CONF.libvirt.virt_type)
        if migrate_data.block_migration:
            return None, ("block migration copies the disks; vmbeamd moves "
                          "only memory")
        flags = self._migration_flags(migrate_data)
        if flags & lv.VIR_MIGRATE_TUNNELLED:
            return None, ("tunnelled migration ([libvirt] "
                          "live_migration_tunnelled) is not what vmbeamd runs")
        try:
            xml = guest.get_xml_desc()
        except lv.libvirtError as e:
            return None, "cannot read the domain XML: %s" % e
        meta = guest_config.metadata_of_domain_xml(xml)
        if meta is None:
            return None, "the guest is not beam-enabled (no VMBeam metadata)"
        if guest_config.private_qmp_of_domain_xml(xml, guest.uuid) is None:
            return None, ("the guest is not beam-enabled (no private QMP "
                          "monitor; it was started before it was enabled?)")
        # Where to, exactly as the parent computes it.
        uri_dest = dest
        migrate_uri = None
        if ('target_connect_addr' in migrate_data and
                migrate_data.target_connect_addr is not None):
            uri_dest = migrate_data.target_connect_addr
            migrate_uri = self._migrate_uri(uri_dest)
        dest_uri = self._live_migration_uri(uri_dest)
        dest_xml, why = self._vmbeam_destination_xml(instance, guest,
                                                     migrate_data)
        if dest_xml is None:
            return None, why
        try:
            with self._vmbeam() as c:
                ok, host, why = c.co_location(dest_uri)
        except bus.VMBeamUnavailable as e:
            return None, "vmbeamd is not reachable on this host: %s" % e.text
        except bus.VMBeamError as e:
            return None, ("vmbeamd cannot tell whether %s is co-located: %s"
                          % (dest_uri, e.text))
        if not ok:
            return None, ("vmbeamd says %s is not co-located: %s"
                          % (dest_uri, why))
        return _Plan(dest_uri, migrate_uri, flags,
                     "vmbeamd: %s" % why, dest_xml), None

    def _vmbeam_destination_xml(self, instance, guest, migrate_data):
        """(Nova's domain XML for the destination, None), or (None, why it
        cannot be had). It is what the parent would send
        (nova.virt.libvirt.migration.get_updated_guest_xml: interfaces for the
        destination's ports, graphics and serial listen addresses, volumes),
        with the source's memory backing put back: Nova drops the file backing
        unless the destination sets [libvirt] file_backed_memory, and a
        zero-copy migration keeps the guest's memory as it is. vmbeamd checks
        it keeps everything else zero-copy needs and names what it does not."""
        get_vif_config = None
        if 'vifs' in migrate_data and migrate_data.vifs:
            direct = [
                v for v in migrate_data.vifs
                if 'source_vif' in v and v.source_vif and
                v.source_vif['vnic_type'] in
                network_model.VNIC_TYPES_DIRECT_PASSTHROUGH]
            if direct:
                return None, ("direct passthrough ports must be detached "
                              "first: Nova's own migration does that")
            get_vif_config = functools.partial(
                self.vif_driver.get_config,
                instance=instance,
                image_meta=instance.image_meta,
                flavor=instance.flavor,
                virt_type=CONF.libvirt.virt_type,
            )
        new_resources = None
        if isinstance(instance, objects.Instance):
            new_resources = self._sorted_migrating_resources(
                instance, instance.flavor)
        try:
            new = libvirt_migrate.get_updated_guest_xml(
                instance, guest, migrate_data, self._get_volume_config,
                get_vif_config=get_vif_config, new_resources=new_resources)
            old = guest.get_xml_desc(dump_migratable=True)
        except Exception as e:
            return None, ("Nova's destination XML cannot be computed here: %r"
                          % e)
        return with_memory_backing_of(new, old), None

    def _vmbeam_migrate(self, instance, guest, migrate_data, plan, rec):
        """Runs the migration through vmbeamd. True: done (migrated); False:
        vmbeamd refused before touching the guest and the caller runs the
        parent's migration; raises when the migration failed."""
        lv = _libvirt()
        if not migrate_data.serial_listen_addr:
            # As the parent: the destination may have no serial console.
            self._verify_serial_console_is_disabled()
        flags = plan.flags
        options = {
            "mode": "zero-copy",
            "live": bool(flags & lv.VIR_MIGRATE_LIVE),
            "persistent": bool(flags & lv.VIR_MIGRATE_PERSIST_DEST),
            "undefine-source": bool(flags & lv.VIR_MIGRATE_UNDEFINE_SOURCE),
            # [libvirt] live_migration_with_native_tls: the device state
            # goes over QEMU's TLS as Nova's own migration would.
            "tls": bool(flags & lv.VIR_MIGRATE_TLS),
        }
        if plan.migrate_uri:
            options["migrate-uri"] = plan.migrate_uri
        if plan.dest_xml:
            # As the parent passes its new XML as both (VIR_MIGRATE_PARAM_DEST_XML
            # and, persisting, VIR_MIGRATE_PARAM_PERSIST_XML).
            options["dest-xml"] = plan.dest_xml
            if options["persistent"]:
                options["persist-xml"] = plan.dest_xml
        serial_ports = []
        if CONF.serial_console.enabled:
            serial_ports = list(self._get_serial_ports_from_guest(guest))
        try:
            client = self._vmbeam()
        except bus.VMBeamUnavailable as e:
            LOG.info("VMBeam: live migration to %s runs as Nova's own libvirt "
                     "migration: vmbeamd went away (%s)", plan.dest_uri,
                     e.text, instance=instance)
            return False
        with client:
            refused = None
            with rec.lock:
                cancelled = rec.cancel_requested
                if not cancelled:
                    try:
                        rec.path = client.migrate(guest.name, plan.dest_uri,
                                                  options)
                        rec.route = "vmbeam"
                        forced = rec.force_requested
                    except bus.VMBeamError as e:
                        if (isinstance(e, bus.VMBeamUnavailable) or
                                e.short in _FALL_BACK_AT_START):
                            LOG.info("VMBeam: live migration to %s runs as "
                                     "Nova's own libvirt migration: vmbeamd "
                                     "refused it (%s: %s)", plan.dest_uri,
                                     e.short, e.text, instance=instance)
                            return False
                        refused = "vmbeamd: %s (%s)" % (e.text, e.short)
            if cancelled:
                return self._vmbeam_ended_here(
                    guest, instance, plan.dest_uri,
                    "live migration aborted before it started",
                    cancelled=True)
            if refused:
                return self._vmbeam_ended_here(guest, instance, plan.dest_uri,
                                               refused)
            LOG.info("VMBeam: zero-copy live migration to %s through vmbeamd "
                     "(job %s): %s", plan.dest_uri, rec.path, plan.reason,
                     instance=instance)
            if forced:
                self._vmbeam_log_force_complete(rec, instance)
            props = self._vmbeam_follow(client, rec, instance, guest)
        if props is None:
            # Lost vmbeamd; libvirt's job has ended (see _vmbeam_follow).
            if self._still_here(guest):
                return self._vmbeam_ended_here(
                    guest, instance, plan.dest_uri,
                    "lost contact with vmbeamd and the guest still runs on "
                    "the source")
            LOG.info("VMBeam: lost contact with vmbeamd; libvirt's job ended "
                     "with the guest gone from the source", instance=instance)
            return True
        phase = props.get("Phase")
        if phase == "completed":
            LOG.info("VMBeam: %s live migration to %s completed: %s ms total, "
                     "%s ms downtime, %s bytes on the wire",
                     props.get("Mode"), plan.dest_uri, props.get("TotalTime"),
                     props.get("Downtime"), props.get("BytesTransferred"),
                     instance=instance)
            for hostname, port in serial_ports:
                serial_console.release_port(host=hostname, port=port)
            self._vmbeam_results[instance.uuid] = (
                instance.flavor.memory_mb * units.Mi,
                int(props.get("BytesTransferred") or 0))
            return True
        name = props.get("ErrorName") or ""
        error = props.get("Error") or phase
        short = name.rsplit(".", 1)[-1]
        with rec.lock:
            cancelled = rec.cancel_requested
        if (not cancelled and short in _FALL_BACK_AFTER_JOB and
                self._still_here(guest)):
            LOG.info("VMBeam: vmbeamd's zero-copy migration to %s was refused "
                     "(%s: %s); the guest runs on here untouched, so Nova's "
                     "own libvirt migration moves it", plan.dest_uri, short,
                     error, instance=instance)
            with rec.lock:
                rec.path = None
                rec.route = None
            return False
        return self._vmbeam_ended_here(
            guest, instance, plan.dest_uri,
            "vmbeamd: %s (%s)" % (error, short or phase),
            cancelled=cancelled)

    def _vmbeam_ended_here(self, guest, instance, dest_uri, reason,
                           cancelled=False):
        """A live migration that did not happen. With the guest still
        running here, it is Nova's rollback, not an error: Nova's monitor sees
        libvirt's job end (cancelled or failed), or none with the operation
        done and the guest here, and rolls back (the migration ``cancelled``
        or ``error``, the instance ACTIVE on this host), so the operation
        returns. Nova 34's ``_live_migration`` re-raises what the operation
        raises (``future.result()``) and the compute manager then puts the
        instance in ERROR "as its almost certainly too late to rollback"; it
        is raised only when the guest is gone from here."""
        if self._still_here(guest):
            log = LOG.warning if cancelled else LOG.error
            log("VMBeam: live migration to %s %s: %s; the guest "
                "runs on here, Nova rolls the migration back",
                dest_uri, "cancelled" if cancelled else "failed", reason,
                instance=instance)
            return True
        raise exception.MigrationError(reason=reason)

    @staticmethod
    def _still_here(guest):
        try:
            return guest.is_active()
        except Exception:
            return False

    def _vmbeam_follow(self, client, rec, instance, guest):
        """Reads the job until it ends (as ``vmbeam migrate`` does: fresh
        property reads, no cache). Returns its properties, or None after
        losing vmbeamd, once libvirt's job has ended."""
        last_phase = None
        mode_logged = False
        while True:
            try:
                props = client.job(rec.path)
            except bus.VMBeamError as e:
                LOG.warning("VMBeam: lost contact with vmbeamd while following "
                            "%s (%s); watching libvirt's job instead",
                            rec.path, e.text, instance=instance)
                self._wait_for_libvirt_job(guest)
                return None
            phase = props.get("Phase", "")
            if phase != last_phase:
                LOG.debug("VMBeam: job %s: %s, %s%%", rec.path, phase,
                          props.get("Progress"), instance=instance)
                last_phase = phase
            if props.get("Mode") and not mode_logged:
                LOG.info("VMBeam: vmbeamd chose %s: %s", props.get("Mode"),
                         props.get("ModeReason"), instance=instance)
                mode_logged = True
            with rec.lock:
                rec.phase = phase
                pending = rec.cancel_requested and not rec.cancel_delivered
            if phase in bus.FINAL_PHASES:
                return props
            if pending and phase == "migrating":
                self._vmbeam_cancel(rec, instance, client)
            time.sleep(CONF.vmbeam.poll_interval)

    def _wait_for_libvirt_job(self, guest):
        lv = _libvirt()
        while True:
            info = guest.get_job_info()
            if info.type != lv.VIR_DOMAIN_JOB_UNBOUNDED:
                return
            time.sleep(0.5)

    def _vmbeam_cancel(self, rec, instance, client=None):
        with rec.lock:
            if rec.cancel_sending or rec.cancel_delivered:
                return
            rec.cancel_sending = True
            path = rec.path
        try:
            self._vmbeam_send_cancel(rec, instance, path, client)
        finally:
            with rec.lock:
                rec.cancel_sending = False

    def _vmbeam_send_cancel(self, rec, instance, path, client):
        try:
            if client is None:
                with self._vmbeam() as c:
                    c.cancel(path)
            else:
                client.cancel(path)
        except bus.VMBeamUnavailable as e:
            LOG.warning("VMBeam: vmbeamd is unreachable (%s): aborting "
                        "libvirt's job of the migration directly", e.text,
                        instance=instance)
            super().live_migration_abort(instance)
        except bus.VMBeamError as e:
            if e.short == "InvalidArgs":
                LOG.info("VMBeam: abort: vmbeamd's job %s has already ended "
                         "(%s)", path, e.text, instance=instance)
            else:
                # Planning, before libvirt's job exists: the migration thread
                # sends Cancel again once the job migrates.
                LOG.info("VMBeam: abort: vmbeamd's job %s cannot be cancelled "
                         "yet (%s); it will be as soon as it migrates",
                         path, e.text, instance=instance)
                return
        else:
            LOG.info("VMBeam: abort: vmbeamd's job %s cancelled (libvirt's "
                     "job abort; the guest stays on the source)", path,
                     instance=instance)
        with rec.lock:
            rec.cancel_delivered = True

    def live_migration_abort(self, instance):
        rec = self._vmbeam_migrations.get(instance.uuid)
        if rec is None:
            return super().live_migration_abort(instance)
        with rec.lock:
            route = rec.route
            rec.cancel_requested = True
            path = rec.path
        if route == "libvirt":
            return super().live_migration_abort(instance)
        if path is None:
            LOG.info("VMBeam: abort requested before the migration started: "
                     "it will not start", instance=instance)
            return
        self._vmbeam_cancel(rec, instance)

    def _live_migration_monitor(self, context, instance, guest, dest,
                                post_method, recover_method, block_migration,
                                migrate_data, future, disk_paths):
        """Nova's monitor, unchanged, knowing which instance it watches (see
        live_migration_force_complete) and with the zero-copy figures put in
        the migration record before ``post_method``."""
        def post(context, instance, dest, block_migration, migrate_data):
            self._vmbeam_wait_for_operation(instance, future)
            self._vmbeam_save_stats(instance, migrate_data)
            return post_method(context, instance, dest, block_migration,
                               migrate_data)

        self._vmbeam_local.monitoring = instance.uuid
        try:
            return super()._live_migration_monitor(
                context, instance, guest, dest, post, recover_method,
                block_migration, migrate_data, future, disk_paths)
        finally:
            self._vmbeam_local.monitoring = None
            self._vmbeam_results.pop(instance.uuid, None)

    def _vmbeam_wait_for_operation(self, instance, future):
        """Before Nova's post-migration steps on a zero-copy route, the
        operation thread's end: libvirt reports the job complete as soon as
        the domain is gone from here (Guest.get_job_info), while vmbeamd's job
        still settles (the pool file handed to the destination) and the
        thread still records the job's figures."""
        rec = self._vmbeam_migrations.get(instance.uuid)
        if rec is None or rec.route != "vmbeam":
            return
        try:
            future.result(timeout=CONF.vmbeam.dbus_timeout)
        except Exception as e:
            # The monitor raises the operation's own error itself, after
            # post_method; a timeout leaves the record without the figures.
            LOG.debug("VMBeam: the zero-copy operation had not ended "
                      "cleanly when Nova's post-migration began: %r", e,
                      instance=instance)

    def _vmbeam_save_stats(self, instance, migrate_data):
        """The record of a completed zero-copy migration: the guest's memory
        as the total (it all moved), the bytes that crossed the network as
        processed, none remaining. The monitor's own samples, if it took any,
        count only what QEMU sends (x-ignore-shared leaves the guest's RAM
        out: a few MiB for any guest), and a sub-second job often ends
        between two samples, leaving the record empty."""
        figures = self._vmbeam_results.pop(instance.uuid, None)
        migration = migrate_data.migration if 'migration' in migrate_data \
            else None
        if figures is None or migration is None:
            return
        total, sent = figures
        info = libvirt_guest.JobInfo(
            type=_libvirt().VIR_DOMAIN_JOB_COMPLETED, memory_total=total,
            memory_processed=sent, memory_remaining=0)
        libvirt_migrate.save_stats(instance, migration, info, 0)
        LOG.info("VMBeam: migration record: %d bytes of memory moved, %d "
                 "bytes sent", total, sent, instance=instance)

    def _vmbeam_log_force_complete(self, rec, instance):
        LOG.info("VMBeam: force-complete of the zero-copy migration %s "
                 "(%s): nothing to do, it copies no memory and its "
                 "downtime is the device state's; the guest is neither "
                 "paused nor switched to post-copy", rec.path, rec.phase,
                 instance=instance)

    def live_migration_force_complete(self, instance):
        rec = self._vmbeam_migrations.get(instance.uuid)
        if rec is None:
            return super().live_migration_force_complete(instance)
        timeout_action = (
            getattr(self._vmbeam_local, "monitoring", None) == instance.uuid)
        with rec.lock:
            route = rec.route
            if route is None:
                rec.force_requested = True
            if route != "libvirt" and timeout_action:
                first = not rec.timeout_acted
                rec.timeout_acted = True
        if route == "libvirt":
            return super().live_migration_force_complete(instance)
        if instance.uuid not in self.active_migrations:
            raise exception.NoActiveMigrationForInstance(
                instance_id=instance.uuid)
        if timeout_action:
            # Nova's completion timeout, with [libvirt]
            # live_migration_timeout_action = force_complete, on every 0.5 s
            # poll from then on. A zero-copy job that long is stuck: forcing
            # cannot help it (there is no memory to copy), waiting for ever
            # is worse; it is cancelled, once, and the guest stays here.
            if first:
                LOG.warning("VMBeam: the zero-copy migration %s (%s) has "
                            "outlived Nova's completion timeout; with "
                            "live_migration_timeout_action = force_complete "
                            "it is cancelled (there is no memory to force "
                            "across) and the guest stays on the source",
                            rec.path, rec.phase, instance=instance)
                self.live_migration_abort(instance)
            return
        if route is None:
            LOG.info("VMBeam: force-complete while the live migration's "
                     "route is being decided: a zero-copy migration will "
                     "ignore it, Nova's own migration will get it",
                     instance=instance)
            return
        self._vmbeam_log_force_complete(rec, instance)
