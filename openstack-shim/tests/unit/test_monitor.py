"""Nova's own live-migration loop (LibvirtDriver._live_migration: the
operation thread plus _live_migration_monitor, unchanged) around a migration
that vmbeamd runs."""

from unittest import mock

import fixtures
from nova import objects
from nova.tests.fixtures import libvirt as fakelibvirt
from nova.virt.libvirt import migration as libvirt_migrate

from . import base, fakes
from .test_live_migration import PROVEN


class NovaMonitorTest(base.DriverTestCase):
    def setUp(self):
        super().setUp()
        self.migrate_to_uri3 = self.useFixture(
            fixtures.MockPatchObject(fakelibvirt.Domain, "migrateToURI3")
        ).mock
        self.vmbeamd.colocation[base.DEST_URI] = PROVEN
        # No database here: the records the monitor saves are recorded.
        self.save = self.useFixture(fixtures.MockPatchObject(objects.Migration, "save")).mock
        self.instance_save = self.useFixture(fixtures.MockPatchObject(objects.Instance, "save")).mock
        self.post = mock.Mock()
        self.recover = mock.Mock()

    def run_live_migration(self, inst):
        migration = objects.Migration(context=self.context, id=1, status="running")
        md = self.migrate_data(migration=migration)
        self.drvr.live_migration(self.context, inst, base.DEST, self.post, self.recover, False, md)
        return md

    def test_completed_zero_copy_is_nova_s_completed_migration(self):
        # Long enough in "migrating" for the monitor's 0.5 s polls to see
        # libvirt's job running.
        self.vmbeamd.script = fakes.success_script(migrating_reads=10)
        inst, guest = self.beam_guest()
        md = self.run_live_migration(inst)
        self.post.assert_called_once_with(self.context, inst, base.DEST, False, md)
        self.recover.assert_not_called()
        self.migrate_to_uri3.assert_not_called()
        # The monitor saw the running job and saved its statistics into the
        # migration record (what GET /servers/{id}/migrations shows).
        self.save.assert_called()
        self.instance_save.assert_called()
        log = self.log()
        self.assertIn("Migration operation has completed", log)
        self.assertIn("zero-copy live migration to %s completed" % base.DEST_URI, log)
        self.assertNotIn(inst.uuid, self.drvr.active_migrations)

    def test_the_record_of_a_zero_copy_migration_shows_its_memory_moved_and_bytes_sent(self):
        # Ends between two of the monitor's samples, as a sub-second job does.
        self.vmbeamd.script = fakes.success_script(migrating_reads=1)
        inst, guest = self.beam_guest()
        md = self.run_live_migration(inst)
        m = md.migration
        # The guest's 512 MiB moved; 456704 bytes crossed the network.
        self.assertEqual(512 << 20, m.memory_total)
        self.assertEqual(456704, m.memory_processed)
        self.assertEqual(0, m.memory_remaining)
        self.assertEqual(100, inst.progress)
        self.save.assert_called()
        self.post.assert_called_once()
        self.assertIn("migration record: %d bytes of memory moved, 456704 bytes sent" % (512 << 20), self.log())

    def test_the_record_is_written_when_libvirt_reports_completion_before_vmbeamd_settles(self):
        # libvirt reports a job complete once the domain is gone from the
        # source (Guest.get_job_info), while vmbeamd still settles its job.
        script = fakes.success_script(migrating_reads=1)
        confirming = script.index(next(st for st in script if st["Phase"] == "confirming"))
        script[confirming:confirming + 1] = [{"Phase": "confirming", "Progress": 95}] * 15
        self.vmbeamd.script = script
        inst, guest = self.beam_guest()
        dom = getattr(guest._domain, "_obj", guest._domain)
        follow = self.vmbeamd.on_phase

        def gone_at_confirm(job, phase):
            follow(job, phase)
            if phase == "confirming":
                dom._job_type = fakelibvirt.VIR_DOMAIN_JOB_COMPLETED

        self.vmbeamd.on_phase = gone_at_confirm
        md = self.run_live_migration(inst)
        self.post.assert_called_once()
        self.assertEqual(512 << 20, md.migration.memory_total)
        self.assertEqual(456704, md.migration.memory_processed)
        log = self.log()
        self.assertLess(
            log.index("zero-copy live migration to %s completed" % base.DEST_URI),
            log.index("migration record:"),
        )

    def test_nova_s_downtime_steps_reach_the_zero_copy_job(self):
        set_downtime = self.useFixture(
            fixtures.MockPatchObject(fakelibvirt.Domain, "migrateSetMaxDowntime")
        ).mock
        self.vmbeamd.script = fakes.success_script(migrating_reads=10)
        inst, guest = self.beam_guest()
        self.run_live_migration(inst)
        data_gb = self.drvr._live_migration_data_gb(inst, [])
        first = list(libvirt_migrate.downtime_steps(data_gb))[0][1]
        # Honoured as on any libvirt job: Nova's first step, within what a
        # zero-copy switchover needs (device state and ROMs).
        set_downtime.assert_called_with(first)
        self.post.assert_called_once()

    def test_force_complete_timeout_action_cancels_a_stuck_zero_copy_job_once(self):
        # 1 s per GiB, at least 2 GiB: Nova's completion timeout is 2 s.
        self.flags(live_migration_completion_timeout=1, live_migration_timeout_action="force_complete", group="libvirt")
        stuck = fakes.success_script(migrating_reads=100000)
        self.vmbeamd.script = stuck
        inst, guest = self.beam_guest()
        self.run_live_migration(inst)
        (job,) = self.vmbeamd.jobs.values()
        self.assertEqual("cancelled", job.phase)
        self.assertEqual(["migrating"], job.cancels)
        self.recover.assert_called_once()
        self.post.assert_not_called()
        self.assertTrue(guest.is_active())
        log = self.log()
        self.assertEqual(1, log.count("has outlived Nova's completion timeout"), log)
        # Nothing queued for Nova's run_tasks (it would pause the guest).
        self.assertNotIn("force-complete", log.replace("force-complete of", ""))

    def test_failed_zero_copy_is_nova_s_rollback(self):
        self.vmbeamd.script = fakes.failure_script("MigrationFailed", "migration failed: boom; the guest keeps running on the source")
        inst, guest = self.beam_guest()
        # Nova's rollback, and no exception: Nova 34's _live_migration re-raises what the
        # operation raised, and the compute manager would put the instance in ERROR.
        self.run_live_migration(inst)
        self.post.assert_not_called()
        self.recover.assert_called_once()
        self.assertTrue(guest.is_active())
        self.assertIn("Migration operation has aborted", self.log())

    def test_fallback_is_nova_s_migration_in_nova_s_loop(self):
        self.vmbeamd.colocation.clear()
        inst, guest = self.beam_guest()
        dom = guest._domain

        def libvirt_migrates(*a, **kw):
            dom.destroy()  # libvirt moved the guest away

        self.migrate_to_uri3.side_effect = libvirt_migrates
        self.run_live_migration(inst)
        self.migrate_to_uri3.assert_called_once()
        self.post.assert_called_once()
        self.recover.assert_not_called()
        self.assertEqual({}, self.vmbeamd.jobs)
