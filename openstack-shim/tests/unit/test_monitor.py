"""Nova's own live-migration loop (LibvirtDriver._live_migration: the
operation thread plus _live_migration_monitor, unchanged) around a migration
that vmbeamd runs."""

from unittest import mock

import fixtures
from nova import exception, objects
from nova.tests.fixtures import libvirt as fakelibvirt

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

    def test_failed_zero_copy_is_nova_s_rollback(self):
        self.vmbeamd.script = fakes.failure_script("MigrationFailed", "migration failed: boom; the guest keeps running on the source")
        inst, guest = self.beam_guest()
        self.assertRaises(exception.MigrationError, self.run_live_migration, inst)
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
