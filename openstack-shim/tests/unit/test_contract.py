"""The shim against vmbeamd's checked-in D-Bus contract."""

import testtools

from vmbeam_nova import bus

from . import contract


class ContractTest(testtools.TestCase):
    def test_names_match(self):
        self.assertIn(bus.MANAGER_IFACE, contract.CONTRACT)
        self.assertIn(bus.JOB_IFACE, contract.CONTRACT)

    def test_every_call_the_client_makes_is_in_the_contract(self):
        calls = []

        class Recorder(bus.VMBeamClient):
            def _call(self, path, iface, method, signature=None, body=(), timeout=None):
                calls.append((iface, method, signature or ""))
                if method == "Status":
                    return (("h", "c", "/p", "u", [], []),)
                if method == "CoLocation":
                    return (True, "h", "why")
                if method == "GetAll":
                    return ({"Phase": ("s", "migrating"), "Mode": ("s", "zero-copy")},)
                if method == "Get":
                    return (("s", "x"),)
                if method == "Migrate":
                    return ("/org/vmbeam/VMBeam1/jobs/1",)
                return ()

        c = Recorder(None, 1)
        c.identity()
        c.co_location("qemu+tcp://x/system")
        c.migrate("d", "qemu+tcp://x/system", {"mode": "zero-copy", "live": True})
        c.status()
        props = c.job("/org/vmbeam/VMBeam1/jobs/1")
        c.cancel("/org/vmbeam/VMBeam1/jobs/1")
        for iface, method, sig in calls:
            contract.check_call(iface, method, sig)
        self.assertEqual(bus.Phase.MIGRATING, props["Phase"])
        self.assertEqual(bus.Mode.ZERO_COPY, props["Mode"])
        self.assertEqual("zero-copy", str(props["Mode"]))
        for name in ("HostId", "Cloud", "PoolDir"):
            contract.check_property(bus.MANAGER_IFACE, name)

    def test_job_properties_the_driver_reads_exist(self):
        for name in ("Phase", "Progress", "Mode", "ModeReason", "Error", "ErrorName",
                     "BytesTransferred", "Downtime", "TotalTime"):
            contract.check_property(bus.JOB_IFACE, name)

    def test_phases_are_the_daemons(self):
        # vmbeam_core::job::Phase::ALL, in order (a new phase must be added here too).
        self.assertEqual(
            ["queued", "planning", "proving-colocation", "issuing-ticket", "preparing", "migrating",
             "switching", "confirming", "cleaning-up", "completed", "failed", "cancelled"],
            [p.value for p in bus.Phase],
        )

    def test_an_unknown_phase_is_an_error_not_a_string(self):
        class Odd(bus.VMBeamClient):
            def _call(self, *a, **k):
                return ({"Phase": ("s", "teleporting")},)

        e = self.assertRaises(bus.VMBeamError, Odd(None, 1).job, "/j")
        self.assertIn("teleporting", e.text)
