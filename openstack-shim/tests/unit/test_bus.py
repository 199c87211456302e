"""The jeepney client against a bus: typed errors, variants, unavailability."""

import fixtures
import testtools

from vmbeam_nova import bus

from . import fakes


class BusClientTest(testtools.TestCase):
    def setUp(self):
        super().setUp()
        self.bus = self.useFixture(fakes.PrivateBus())

    def test_calls_and_typed_errors(self):
        d = self.useFixture(fakes.FakeVMBeamd(host_id="cvm3", cloud="c1", pool="/p"))
        d.colocation["qemu+tcp://x/system"] = (True, "x", "x shares the beam pool (proven)")
        with bus.VMBeamClient.connect(timeout=5) as c:
            self.assertEqual(("cvm3", "c1", "/p"), c.identity())
            self.assertEqual((True, "x", "x shares the beam pool (proven)"), c.co_location("qemu+tcp://x/system"))
            self.assertFalse(c.co_location("qemu+tcp://y/system")[0])
            path = c.migrate("web1", "qemu+tcp://x/system", {"mode": "zero-copy", "live": True, "timeout": 30})
            self.assertEqual(bus.JOBS_PATH + "/1", path)
            self.assertEqual({"mode": "zero-copy", "live": True, "timeout": 30}, d.jobs[path].options)
            props = c.job(path)
            self.assertEqual("planning", props["Phase"])
            self.assertEqual(1, props["Progress"])
            e = self.assertRaises(bus.VMBeamError, c.cancel, path)
            self.assertEqual("Libvirt", e.short)
            self.assertNotIsInstance(e, bus.VMBeamUnavailable)
            d.migrate_error = ("NotBeamEnabled", "web2 is not beam-enabled")
            e = self.assertRaises(bus.VMBeamError, c.migrate, "web2", "qemu+tcp://x/system", {})
            self.assertEqual("org.vmbeam.VMBeam1.Error.NotBeamEnabled", e.name)
            self.assertEqual("web2 is not beam-enabled", e.text)
            self.assertRaises(ValueError, c.migrate, "web1", "u", {"timeout": -1})

    def test_no_daemon_is_unavailable(self):
        with bus.VMBeamClient.connect(timeout=5) as c:
            e = self.assertRaises(bus.VMBeamUnavailable, c.co_location, "qemu+tcp://x/system")
        self.assertEqual("org.freedesktop.DBus.Error.ServiceUnknown", e.name)

    def test_no_bus_is_unavailable(self):
        self.useFixture(fixtures.EnvironmentVariable("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus"))
        e = self.assertRaises(bus.VMBeamUnavailable, bus.VMBeamClient.connect)
        self.assertIn("cannot reach the system bus", e.text)

    def test_a_hung_daemon_is_unavailable_after_the_timeout(self):
        d = self.useFixture(fakes.FakeVMBeamd())
        d.hang()
        with bus.VMBeamClient.connect(timeout=0.5) as c:
            e = self.assertRaises(bus.VMBeamUnavailable, c.co_location, "qemu+tcp://x/system")
        self.assertIn("did not answer", e.text)
