"""The migration operation goes through vmbeamd exactly when the guest is
beam-enabled and vmbeamd proves the destination co-located; otherwise it is
the parent's (LibvirtDriver's) code path, untouched. Abort maps to the job's
Cancel; force-complete is harmless."""

import threading
from unittest import mock

import fixtures
from lxml import etree
from nova import exception
from nova.tests.fixtures import libvirt as fakelibvirt
from oslo_utils.fixture import uuidsentinel as uuids

from vmbeam_nova import bus

from . import base, fakes

BEAM = {"vmbeam:enabled": "true"}
PROVEN = (True, "cvm2", "cvm2 shares the beam pool (proven)")


class LiveMigrationTest(base.DriverTestCase):
    def setUp(self):
        super().setUp()
        # The parent's path ends in libvirt's migrateToURI3 (fakelibvirt's
        # raises); record it instead, as Nova's own tests do.
        self.migrate_to_uri3 = self.useFixture(
            fixtures.MockPatchObject(fakelibvirt.Domain, "migrateToURI3")
        ).mock

    def operation(self, inst, guest, md=None):
        return self.drvr._live_migration_operation(
            self.context, inst, base.DEST, False, md or self.migrate_data(), guest, []
        )

    def test_co_located_beam_guest_goes_through_vmbeamd(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_not_called()
        (job,) = self.vmbeamd.jobs.values()
        self.assertEqual(guest.name, job.domain)
        self.assertEqual(base.DEST_URI, job.dest)
        # Nova's flags (LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE) as options,
        # and Nova's destination XML as both the domain and the persistent XML.
        dest_xml = job.options.pop("dest-xml")
        self.assertEqual(dest_xml, job.options.pop("persist-xml"))
        self.assertEqual(
            {"mode": "zero-copy", "live": True, "persistent": True, "undefine-source": True, "tls": False},
            job.options,
        )
        self.assertIn("<uuid>%s</uuid>" % inst.uuid, dest_xml)
        self.assertIn("<source type=\"file\"/>", dest_xml)
        self.assertEqual("completed", job.phase)
        self.assertFalse(guest.is_active())
        log = self.log()
        self.assertIn("zero-copy live migration to %s through vmbeamd (job %s): vmbeamd: cvm2 shares the beam pool (proven)" % (base.DEST_URI, job.path), log)
        self.assertIn("vmbeamd chose zero-copy", log)
        self.assertIn("zero-copy live migration to %s completed: 713 ms total, 19 ms downtime, 456704 bytes" % base.DEST_URI, log)
        self.assertNotIn(uuids.instance, self.drvr._vmbeam_migrations)

    def test_target_connect_addr_gives_the_uri_and_the_migrate_uri(self):
        uri = "qemu+tcp://198.18.0.12/system"
        self.vmbeamd.colocation[uri] = PROVEN
        inst, guest = self.beam_guest()
        self.operation(inst, guest, self.migrate_data(target_connect_addr="198.18.0.12"))
        (job,) = self.vmbeamd.jobs.values()
        self.assertEqual(uri, job.dest)
        self.assertEqual("tcp://198.18.0.12", job.options["migrate-uri"])

    def test_native_tls_is_asked_of_vmbeamd(self):
        self.flags(live_migration_with_native_tls=True, group="libvirt")
        self.drvr._parse_migration_flags()
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        (job,) = self.vmbeamd.jobs.values()
        self.assertIs(True, job.options["tls"])
        self.assertEqual("completed", job.phase)
        self.migrate_to_uri3.assert_not_called()

    def test_not_co_located_runs_the_parent(self):
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertEqual(base.DEST_URI, self.migrate_to_uri3.call_args[0][0])
        self.assertEqual({}, self.vmbeamd.jobs)
        self.assertIn(
            "runs as Nova's own libvirt migration: vmbeamd says %s is not co-located: no answer" % base.DEST_URI,
            self.log(),
        )

    def parent_params(self):
        """migrateToURI3's params of the parent's migration."""
        args, kwargs = self.migrate_to_uri3.call_args
        return kwargs.get("params", args[1] if len(args) > 1 else None)

    def test_nova_s_own_migration_keeps_the_beam_memory_backing_with_a_default_nova_conf(self):
        inst, guest = self.beam_guest()
        # The destination's check_can_live_migrate_destination with
        # [libvirt] file_backed_memory = 0 (the default).
        self.operation(inst, guest, self.migrate_data(dst_wants_file_backed_memory=False))
        params = self.parent_params()
        dest_xml = params["destination_xml"]
        self.assertEqual(dest_xml, params["persistent_xml"])
        mb = etree.fromstring(dest_xml.encode()).find("./memoryBacking")
        self.assertEqual("file", mb.find("source").get("type"))
        self.assertEqual("shared", mb.find("access").get("mode"))
        self.assertIn("keeps the beam-enabled guest's memory backing", self.log())

    def test_nova_s_own_migration_never_gives_a_beam_guest_discard_or_immediate_allocation(self):
        inst, guest = self.beam_guest()
        # With [libvirt] file_backed_memory on the destination, Nova adds both.
        self.operation(inst, guest, self.migrate_data(dst_wants_file_backed_memory=True))
        mb = etree.fromstring(self.parent_params()["destination_xml"].encode()).find("./memoryBacking")
        self.assertIsNone(mb.find("discard"))
        self.assertIsNone(mb.find("allocation"))
        self.assertEqual("file", mb.find("source").get("type"))

    def test_nova_s_own_migration_of_a_plain_guest_is_nova_s_xml(self):
        inst = base.make_instance()
        guest, _ = self.running_guest(inst)
        self.operation(inst, guest, self.migrate_data(dst_wants_file_backed_memory=False))
        mb = etree.fromstring(self.parent_params()["destination_xml"].encode()).find("./memoryBacking")
        self.assertTrue(mb is None or mb.find("source") is None)
        self.assertNotIn("keeps the beam-enabled guest's memory backing", self.log())

    def test_plain_guest_runs_the_parent_without_asking_vmbeamd(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst = base.make_instance()
        guest, _ = self.running_guest(inst)
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertEqual([], self.vmbeamd.methods("CoLocation"))
        self.assertIn("the guest is not beam-enabled (no VMBeam metadata)", self.log())

    def test_block_migration_and_tunnelling_run_the_parent(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst, guest = self.beam_guest()
        self.operation(inst, guest, self.migrate_data(block_migration=True))
        self.assertIn("block migration copies the disks; vmbeamd moves only memory", self.log())
        self.flags(live_migration_tunnelled=True, group="libvirt")
        self.drvr._parse_migration_flags()
        self.operation(inst, guest)
        self.assertIn("tunnelled migration", self.log())
        self.assertEqual(2, self.migrate_to_uri3.call_count)
        self.assertEqual({}, self.vmbeamd.jobs)

    def test_switched_off_on_the_host(self):
        self.flags(live_migration="off", group="vmbeam")
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertIn("[vmbeam] live_migration is off", self.log())

    def test_nova_s_destination_xml_goes_to_vmbeamd_with_the_memory_kept(self):
        # A VNC listen address Nova rewrites for the destination: vmbeamd gets
        # Nova's XML (and checks it keeps what zero-copy needs), with the
        # source's file memory backing that Nova's rewrite drops when the
        # destination has no [libvirt] file_backed_memory.
        self.flags(server_listen="192.0.2.1", group="vnc")
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst, guest = self.beam_guest()
        self.operation(inst, guest, self.migrate_data(graphics_listen_addr_vnc="192.0.2.2"))
        self.migrate_to_uri3.assert_not_called()
        (job,) = self.vmbeamd.jobs.values()
        dest_xml = job.options["dest-xml"]
        self.assertIn("192.0.2.2", dest_xml)
        self.assertNotIn("192.0.2.1", dest_xml)
        self.assertIn("<memoryBacking>", dest_xml)
        self.assertIn("<access mode=\"shared\"/>", dest_xml)
        self.assertEqual("completed", job.phase)

    def test_vmbeamd_absent_runs_the_parent(self):
        inst, guest = self.beam_guest(follow_domain=False)
        self.vmbeamd.stop()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertIn("vmbeamd is not reachable on this host", self.log())

    def test_no_system_bus_runs_the_parent(self):
        inst, guest = self.beam_guest(follow_domain=False)
        self.useFixture(fixtures.EnvironmentVariable("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus"))
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertIn("vmbeamd is not reachable on this host: cannot reach the system bus", self.log())

    def test_refusal_at_migrate_runs_the_parent(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        self.vmbeamd.migrate_error = ("ZeroCopyRefused", "the destination's pool file identity differs")
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertIn("vmbeamd refused it (ZeroCopyRefused: the destination's pool file identity differs)", self.log())

    def test_ticket_refused_by_the_destination_runs_the_parent(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        self.vmbeamd.script = fakes.failure_script("TicketRefused", "ticket expired")
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_called_once()
        self.assertIn("was refused (TicketRefused: ticket expired); the guest runs on here untouched", self.log())

    def test_busy_is_nova_s_rollback_with_the_guest_here(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        self.vmbeamd.migrate_error = ("Busy", "a migration of instance-00000001 is already running")
        inst, guest = self.beam_guest()
        # Returns: Nova's monitor rolls back (raising would put the instance in ERROR).
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_not_called()
        self.assertTrue(guest.is_active())
        self.assertIn("already running (Busy); the guest runs on here, Nova rolls the migration back", self.log())

    def test_failed_migration_is_nova_s_rollback_not_a_retry(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        self.vmbeamd.script = fakes.failure_script(
            "MigrationFailed", "migration failed: unable to connect; the guest keeps running on the source"
        )
        inst, guest = self.beam_guest()
        self.operation(inst, guest)
        self.migrate_to_uri3.assert_not_called()
        self.assertTrue(guest.is_active())
        self.assertIn(
            "failed: vmbeamd: migration failed: unable to connect; the guest keeps running on the source "
            "(MigrationFailed); the guest runs on here, Nova rolls the migration back",
            self.log(),
        )

    def test_failed_migration_with_the_guest_gone_from_here_is_an_error(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        self.vmbeamd.script = fakes.failure_script("MigrationFailed", "migration failed: confirm lost")
        inst, guest = self.beam_guest()

        def gone(job, phase):
            if phase == "migrating":
                guest._domain.destroy()
                job.on_phase = None

        self.vmbeamd.on_phase = gone
        # Too late to roll back: Nova's compute manager puts the instance in ERROR.
        e = self.assertRaises(exception.MigrationError, self.operation, inst, guest)
        self.assertIn("confirm lost (MigrationFailed)", str(e))
        self.migrate_to_uri3.assert_not_called()

    def test_lost_vmbeamd_mid_job_waits_for_libvirt_and_fails_if_the_guest_stayed(self):
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        inst, guest = self.beam_guest()

        def vanish(job, phase):
            if phase == "migrating":
                self.vmbeamd._stop.set()  # the daemon dies: nobody answers
                job.on_phase = None

        self.vmbeamd.on_phase = vanish
        self.flags(dbus_timeout=1.0, group="vmbeam")
        self.operation(inst, guest)
        self.assertIn(
            "lost contact with vmbeamd and the guest still runs on the source; the guest runs on here, "
            "Nova rolls the migration back",
            self.log(),
        )
        self.assertTrue(guest.is_active())
        self.migrate_to_uri3.assert_not_called()


class AbortAndForceCompleteTest(base.DriverTestCase):
    def setUp(self):
        super().setUp()
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        self.migrate_to_uri3 = self.useFixture(
            fixtures.MockPatchObject(fakelibvirt.Domain, "migrateToURI3")
        ).mock
        self.abort_job = self.useFixture(fixtures.MockPatchObject(fakelibvirt.Domain, "abortJob")).mock
        self.inst = base.make_instance(extra_specs=BEAM)
        self.guest, _ = self.running_guest(self.inst)
        self.drvr.active_migrations[self.inst.uuid] = []

    def run_with(self, at_phase, action):
        """Runs the operation; `action` runs in a thread of its own (as an
        API request to nova-compute would) when the job enters `at_phase`."""
        started = []

        def on_phase(job, phase):
            if phase == at_phase and not started:
                t = threading.Thread(target=action)
                started.append(t)
                t.start()

        self.vmbeamd.on_phase = on_phase
        try:
            return self.drvr._live_migration_operation(
                self.context, self.inst, base.DEST, False, self.migrate_data(), self.guest, []
            )
        finally:
            for t in started:
                t.join(10)
            self.assertEqual(1, len(started), "the job never reached %s" % at_phase)

    def test_abort_while_migrating_is_cancel(self):
        self.run_with("migrating", lambda: self.drvr.live_migration_abort(self.inst))
        (job,) = self.vmbeamd.jobs.values()
        self.assertEqual(["migrating"], job.cancels)
        self.assertEqual("cancelled", job.phase)
        self.assertTrue(self.guest.is_active())
        self.assertIn("live migration to %s cancelled: vmbeamd: " % base.DEST_URI, self.log())
        self.abort_job.assert_not_called()
        self.migrate_to_uri3.assert_not_called()
        self.assertIn("abort: vmbeamd's job %s cancelled" % job.path, self.log())

    def test_abort_while_planning_is_delivered_once_libvirt_s_job_runs(self):
        self.run_with("planning", lambda: self.drvr.live_migration_abort(self.inst))
        (job,) = self.vmbeamd.jobs.values()
        # Refused while planning (no libvirt job yet, as vmbeamd does), sent
        # again by the migration thread once it migrates.
        self.assertEqual(["planning", "migrating"], job.cancels)
        self.assertEqual("cancelled", job.phase)
        self.migrate_to_uri3.assert_not_called()
        self.assertIn("cannot be cancelled yet", self.log())

    def test_abort_with_vmbeamd_gone_aborts_libvirt_s_job(self):
        def libvirt_abort(*a):
            # libvirt's job ends; vmbeamd (still running its job) sees it fail.
            (job,) = self.vmbeamd.jobs.values()
            job.script = [{"Phase": "cleaning-up"}, {"Phase": "failed", "Error": "operation aborted", "ErrorName": bus.ERROR_PREFIX + "MigrationFailed"}]

        self.abort_job.side_effect = libvirt_abort
        gone = bus.VMBeamUnavailable("org.freedesktop.DBus.Error.NoServer", "gone")

        def abort_without_daemon():
            with mock.patch.object(bus.VMBeamClient, "connect", side_effect=gone):
                self.drvr.live_migration_abort(self.inst)

        self.run_with("migrating", abort_without_daemon)
        self.assertTrue(self.guest.is_active())
        self.abort_job.assert_called_once()
        self.assertIn("vmbeamd is unreachable (gone): aborting libvirt's job of the migration directly", self.log())
        self.migrate_to_uri3.assert_not_called()

    def test_abort_of_a_parent_migration_is_the_parent_s(self):
        self.vmbeamd.colocation.clear()

        def parent_migrates(*a, **kw):
            self.drvr.live_migration_abort(self.inst)

        self.migrate_to_uri3.side_effect = parent_migrates
        self.drvr._live_migration_operation(
            self.context, self.inst, base.DEST, False, self.migrate_data(), self.guest, []
        )
        self.abort_job.assert_called_once()

    def test_abort_without_any_migration_is_the_parent_s(self):
        self.drvr.live_migration_abort(self.inst)
        self.abort_job.assert_called_once()

    def test_force_complete_of_a_zero_copy_migration_is_harmless(self):
        self.run_with("migrating", lambda: self.drvr.live_migration_force_complete(self.inst))
        # Nothing queued for Nova's monitor (it would pause the guest or
        # switch to post-copy), and the migration completed.
        self.assertEqual([], list(self.drvr.active_migrations[self.inst.uuid]))
        (job,) = self.vmbeamd.jobs.values()
        self.assertEqual("completed", job.phase)
        self.assertIn("force-complete of the zero-copy migration %s (" % job.path, self.log())
        self.assertIn("nothing to do, it copies no memory", self.log())

    def test_force_complete_of_a_parent_migration_is_the_parent_s(self):
        self.vmbeamd.colocation.clear()
        self.migrate_to_uri3.side_effect = lambda *a, **kw: self.drvr.live_migration_force_complete(self.inst)
        self.drvr._live_migration_operation(
            self.context, self.inst, base.DEST, False, self.migrate_data(), self.guest, []
        )
        self.assertEqual(["force-complete"], list(self.drvr.active_migrations[self.inst.uuid]))

    def force_while_deciding(self):
        """Runs the operation with a force-complete arriving (from another
        thread, as an API request) while vmbeamd is asked about co-location."""
        real = bus.VMBeamClient.co_location

        def slow_co_location(client, uri):
            t = threading.Thread(target=self.drvr.live_migration_force_complete, args=(self.inst,))
            t.start()
            t.join(10)
            return real(client, uri)

        with mock.patch.object(bus.VMBeamClient, "co_location", slow_co_location):
            self.drvr._live_migration_operation(
                self.context, self.inst, base.DEST, False, self.migrate_data(), self.guest, []
            )

    def test_force_complete_while_deciding_a_zero_copy_migration_is_harmless(self):
        self.force_while_deciding()
        self.assertEqual([], list(self.drvr.active_migrations[self.inst.uuid]))
        (job,) = self.vmbeamd.jobs.values()
        self.assertEqual("completed", job.phase)
        log = self.log()
        self.assertIn("force-complete while the live migration's route is being decided", log)
        self.assertIn("force-complete of the zero-copy migration %s" % job.path, log)

    def test_force_complete_while_deciding_goes_to_nova_s_own_migration(self):
        self.vmbeamd.colocation.clear()
        self.force_while_deciding()
        # Kept, then handed to Nova's run_tasks for the copying migration.
        self.assertEqual(["force-complete"], list(self.drvr.active_migrations[self.inst.uuid]))
        self.migrate_to_uri3.assert_called_once()
        self.assertEqual({}, self.vmbeamd.jobs)
        self.assertIn("now goes to Nova's own migration", self.log())

