"""Test doubles for the unit tests: a private dbus-daemon standing in for the
system bus, and a fake vmbeamd serving VMBeam's D-Bus contract on it
(bus-api/src/lib.rs) so that the driver's real D-Bus client is exercised over
a real bus. The real vmbeamd is exercised by the integration test on the lab.
"""

import os
import shutil
import subprocess
import tempfile
import threading

import fixtures
from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from vmbeam_nova import bus

from . import contract

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus(fixtures.Fixture):
    """A dbus-daemon of the test's own, exported as the system bus."""

    def _setUp(self):
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise RuntimeError("dbus-daemon is required (apt-get install dbus-daemon)")
        d = tempfile.mkdtemp(prefix="vmbeam-nova-bus-")
        self.addCleanup(shutil.rmtree, d, True)
        conf = os.path.join(d, "bus.conf")
        with open(conf, "w") as f:
            f.write(BUS_CONFIG.format(path=os.path.join(d, "bus")))
        self.proc = subprocess.Popen(
            [daemon, "--config-file=" + conf, "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.addCleanup(self._stop)
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("dbus-daemon did not start")
        self.useFixture(fixtures.EnvironmentVariable("DBUS_SYSTEM_BUS_ADDRESS", self.address))

    def _stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class FakeJob:
    """A vmbeamd job whose phases advance by one at each read of its
    properties (deterministic, whatever the scheduling)."""

    def __init__(self, path, domain, dest, options, script, on_phase):
        self.path = path
        self.domain = domain
        self.dest = dest
        self.options = options
        self.script = list(script)
        self.on_phase = on_phase
        self.props = {
            "Domain": ("s", domain),
            "Destination": ("s", dest),
            "Phase": ("s", "queued"),
            "Progress": ("u", 0),
            "BytesTransferred": ("t", 0),
            "Downtime": ("t", 0),
            "TotalTime": ("t", 0),
            "Mode": ("s", ""),
            "ModeReason": ("s", ""),
            "Error": ("s", ""),
            "ErrorName": ("s", ""),
            "Timeline": ("a(st)", []),
        }
        self.cancels = []

    @property
    def phase(self):
        return self.props["Phase"][1]

    def set(self, **kw):
        sigs = {k: v[0] for k, v in self.props.items()}
        for k, v in kw.items():
            self.props[k] = (sigs[k], v)
        if "Phase" in kw and self.on_phase is not None:
            self.on_phase(self, kw["Phase"])

    def advance(self):
        if self.phase in bus.FINAL_PHASES or not self.script:
            return
        step = self.script.pop(0)
        self.set(**step)


def success_script(mode="zero-copy", migrating_reads=2):
    reason = "cvm2 shares the beam pool (proven)"
    migrating = [
        {"Phase": "migrating", "Progress": 20 + 60 * i // migrating_reads, "BytesTransferred": 4096 * i}
        for i in range(migrating_reads)
    ]
    return [
        {"Phase": "planning", "Progress": 1},
        {"Phase": "proving-colocation", "Progress": 5},
        {"Phase": "issuing-ticket", "Progress": 10, "Mode": mode, "ModeReason": reason},
        *migrating,
        {"Phase": "confirming", "Progress": 95},
        {
            "Phase": "completed",
            "Progress": 100,
            "BytesTransferred": 456704,
            "Downtime": 19,
            "TotalTime": 713,
        },
    ]


def failure_script(error_name, error, at="migrating"):
    steps = [
        {"Phase": "planning", "Progress": 1},
        {"Phase": "proving-colocation", "Progress": 5},
        {"Phase": "issuing-ticket", "Progress": 10, "Mode": "zero-copy", "ModeReason": "proven"},
        {"Phase": "migrating", "Progress": 20},
    ]
    steps = steps[: [s["Phase"] for s in steps].index(at) + 1]
    steps.append({"Phase": "cleaning-up"})
    steps.append(
        {"Phase": "failed", "Error": error, "ErrorName": bus.ERROR_PREFIX + error_name}
    )
    return steps


class FakeVMBeamd(fixtures.Fixture):
    """vmbeamd's D-Bus face on the private bus.

    colocation: dest URI -> (ok, host, reason) for CoLocation;
    migrate_error: (error short name, text) Migrate answers with;
    script: the phases of the next job; on_phase(job, phase) is called at each
    phase change (the tests make the fake libvirt domain follow the job).
    """

    def __init__(self, host_id="cvm1", cloud="acme-virtual-iaas", pool="/var/lib/vmbeam/pool"):
        super().__init__()
        self.host_id = host_id
        self.cloud = cloud
        self.pool = pool
        self.colocation = {}
        self.migrate_error = None
        self.script = success_script()
        self.on_phase = None
        self.jobs = {}
        self.calls = []
        self.cancel_refused_in = ("queued", "planning", "proving-colocation", "issuing-ticket")
        #: Exceptions raised while answering (checked at clean-up).
        self.crashes = []

    def _setUp(self):
        self.conn = open_dbus_connection(bus="SYSTEM")
        reply = self.conn.send_and_get_reply(message_bus.RequestName(bus.BUS_NAME), timeout=5)
        if reply.body[0] != 1:
            raise RuntimeError("could not own %s" % bus.BUS_NAME)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.addCleanup(self._shutdown)

    def _shutdown(self):
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._thread.join(10)
            self.conn.close()
        if self.crashes:
            raise AssertionError("the fake vmbeamd failed answering: %r" % self.crashes)

    def hang(self):
        """vmbeamd keeps its name but answers nothing any more."""
        self._stop.set()
        self._thread.join(10)

    def stop(self):
        """vmbeamd goes away (its name leaves the bus)."""
        self._shutdown()

    def methods(self, name):
        return [c for c in self.calls if c[0] == name]

    def _serve(self):
        while not self._stop.is_set():
            try:
                msg = self.conn.receive(timeout=0.05)
            except TimeoutError:
                continue
            except OSError:
                return
            if msg.header.message_type != MessageType.method_call:
                continue
            try:
                reply = self._handle(msg)
            except _Err as e:
                reply = new_error(msg, e.name, "s", (e.text,))
            except Exception as e:  # a bug in the test or its doubles: shown, not hung on
                self.crashes.append(e)
                reply = new_error(msg, "org.freedesktop.DBus.Error.Failed", "s", ("fake vmbeamd: %r" % e,))
            self.conn.send(reply)

    def _handle(self, msg):
        f = msg.header.fields
        path = f.get(HeaderFields.path)
        iface = f.get(HeaderFields.interface)
        member = f.get(HeaderFields.member)
        body = msg.body
        self.calls.append((member, path, body))
        # Held to vmbeamd's contract: a call the real daemon would not accept fails here.
        contract.check_call(iface, member, f.get(HeaderFields.signature, ""))
        if path == bus.MANAGER_PATH and iface == bus.MANAGER_IFACE:
            return self._manager(msg, member, body)
        if path == bus.MANAGER_PATH and iface == bus.PROPS_IFACE and member == "Get":
            piface, prop = body
            contract.check_property(piface, prop)
            value = {"HostId": self.host_id, "Cloud": self.cloud, "PoolDir": self.pool}.get(prop)
            if value is None:
                raise _Err("org.freedesktop.DBus.Error.UnknownProperty", prop)
            return new_method_return(msg, "v", (("s", value),))
        job = self.jobs.get(path)
        if job is None:
            raise _Err("org.freedesktop.DBus.Error.UnknownObject", "no object at %s" % path)
        if iface == bus.PROPS_IFACE and member == "GetAll":
            job.advance()
            return new_method_return(msg, "a{sv}", (dict(job.props),))
        if iface == bus.JOB_IFACE and member == "Cancel":
            job.cancels.append(job.phase)
            if job.phase in bus.FINAL_PHASES:
                raise _Err(bus.ERROR_PREFIX + "InvalidArgs", "the job has already ended")
            if job.phase in self.cancel_refused_in:
                # vmbeamd: libvirt's job abort fails while there is no job yet.
                raise _Err(
                    bus.ERROR_PREFIX + "Libvirt",
                    "Requested operation is not valid: no job is active on the domain",
                )
            job.script = [
                {"Phase": "cleaning-up"},
                {
                    "Phase": "cancelled",
                    "Error": "cancelled: operation aborted; the guest keeps running on the source",
                    "ErrorName": bus.ERROR_PREFIX + "MigrationFailed",
                },
            ]
            return new_method_return(msg)
        raise _Err("org.freedesktop.DBus.Error.UnknownMethod", member)

    def _manager(self, msg, member, body):
        if member == "CoLocation":
            (uri,) = body
            ok, host, why = self.colocation.get(
                uri, (False, "", "no answer from a vmbeamd through the pool: not shared")
            )
            return new_method_return(msg, "bss", (ok, host, why))
        if member == "Status":
            st = (self.host_id, self.cloud, self.pool, "uuid", [], [])
            return new_method_return(msg, "(ssssa(sxs)a(ssssus))", (st,))
        if member == "Migrate":
            domain, dest, options = body
            if self.migrate_error is not None:
                name, text = self.migrate_error
                raise _Err(bus.ERROR_PREFIX + name, text)
            path = "%s/%d" % (bus.JOBS_PATH, len(self.jobs) + 1)
            opts = {k: v[1] for k, v in options.items()}
            self.jobs[path] = FakeJob(path, domain, dest, opts, self.script, self.on_phase)
            return new_method_return(msg, "o", (path,))
        raise _Err("org.freedesktop.DBus.Error.UnknownMethod", member)


class _Err(Exception):
    def __init__(self, name, text):
        super().__init__(text)
        self.name = name
        self.text = text
