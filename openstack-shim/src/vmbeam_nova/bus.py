"""A small client for vmbeamd's D-Bus API (system bus, ``org.vmbeam.VMBeam1``).

Built on jeepney: pure Python, no C library or GLib main loop, plain blocking
sockets. Under nova-compute's eventlet monkey patching those sockets (and the
``selectors`` module jeepney waits with) are green, so a long call yields to
the other green threads; in Nova's native-threading mode they are ordinary
blocking calls in the migration's own thread. One connection per operation:
a jeepney connection is not shared between threads.

The contract is the introspection XML vmbeamd is held to,
bus-api/org.vmbeam.VMBeam1.xml (the unit tests hold this client and the fake
daemon to it): ``Manager`` (Migrate, CoLocation, Status, HostId, Cloud,
PoolDir) and one ``Job`` object per migration (Phase, Progress, Mode,
ModeReason, Error, ErrorName, ..., Cancel). Errors arrive typed as
``org.vmbeam.VMBeam1.Error.*``; phases and modes are parsed into the enums
below, not compared as free text.
"""

import enum

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

BUS_NAME = "org.vmbeam.VMBeam1"
MANAGER_PATH = "/org/vmbeam/VMBeam1"
JOBS_PATH = "/org/vmbeam/VMBeam1/jobs"
MANAGER_IFACE = "org.vmbeam.VMBeam1.Manager"
JOB_IFACE = "org.vmbeam.VMBeam1.Job"
ERROR_PREFIX = "org.vmbeam.VMBeam1.Error."
PROPS_IFACE = "org.freedesktop.DBus.Properties"



class _WireEnum(str, enum.Enum):
    """An enum whose members are their wire names (and print as them)."""

    def __str__(self):
        return self.value


class Phase(_WireEnum):
    """A job's phase (vmbeam_core::job::Phase), in the order a job goes."""

    QUEUED = "queued"
    PLANNING = "planning"
    PROVING_COLOCATION = "proving-colocation"
    ISSUING_TICKET = "issuing-ticket"
    PREPARING = "preparing"
    MIGRATING = "migrating"
    SWITCHING = "switching"
    CONFIRMING = "confirming"
    CLEANING_UP = "cleaning-up"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Mode(_WireEnum):
    """How vmbeamd moves the memory (vmbeam_core::plan::MigrationMode)."""

    ZERO_COPY = "zero-copy"
    TRADITIONAL = "traditional"


#: Job phases after which nothing changes any more.
FINAL_PHASES = (Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED)

#: Bus errors that mean "no vmbeamd here" rather than "vmbeamd said no".
_UNAVAILABLE = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoServer",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.TimedOut",
)


class VMBeamError(Exception):
    """vmbeamd (or the bus on its behalf) answered with an error."""

    def __init__(self, name, text):
        super().__init__("%s: %s" % (name, text))
        self.name = name
        self.text = text

    @property
    def short(self):
        """The last part of the error name (``ZeroCopyRefused``, ``Busy``...)."""
        return self.name.rsplit(".", 1)[-1]


class VMBeamUnavailable(VMBeamError):
    """No vmbeamd to talk to: no system bus, no such name, no reply in time."""


def _variant(value):
    """A Python value as a D-Bus variant (jeepney's (signature, value))."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("vmbeamd's integer options are unsigned: %r" % value)
        return ("u", value)
    if isinstance(value, str):
        return ("s", value)
    raise TypeError("no D-Bus mapping for %r" % (value,))


def _unvariant(v):
    sig, value = v
    return value


class VMBeamClient:
    """One connection to vmbeamd. Use as a context manager."""

    def __init__(self, connection, timeout):
        self._conn = connection
        self.timeout = timeout

    @classmethod
    def connect(cls, timeout=30.0, bus="SYSTEM"):
        """Opens the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` if set)."""
        try:
            conn = open_dbus_connection(bus=bus)
        except (OSError, KeyError, ValueError) as e:
            raise VMBeamUnavailable(
                "org.freedesktop.DBus.Error.NoServer",
                "cannot reach the system bus: %s" % e,
            ) from e
        except Exception as e:  # jeepney's AuthenticationError and friends
            raise VMBeamUnavailable(
                "org.freedesktop.DBus.Error.NoServer",
                "cannot open the system bus: %s" % e,
            ) from e
        return cls(conn, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self._conn.close()
        except OSError:
            pass

    def _call(self, path, iface, method, signature=None, body=(), timeout=None):
        addr = DBusAddress(path, bus_name=BUS_NAME, interface=iface)
        msg = new_method_call(addr, method, signature, body)
        try:
            reply = self._conn.send_and_get_reply(
                msg, timeout=self.timeout if timeout is None else timeout
            )
        except TimeoutError as e:
            raise VMBeamUnavailable(
                "org.freedesktop.DBus.Error.TimedOut",
                "vmbeamd did not answer %s.%s within %s s"
                % (iface, method, self.timeout if timeout is None else timeout),
            ) from e
        except (OSError, EOFError) as e:
            raise VMBeamUnavailable(
                "org.freedesktop.DBus.Error.Disconnected",
                "lost the system bus during %s.%s: %s" % (iface, method, e),
            ) from e
        if reply.header.message_type == MessageType.error:
            name = reply.header.fields.get(HeaderFields.error_name, "unknown")
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            if name.startswith(ERROR_PREFIX):
                raise VMBeamError(name, text)
            if name in _UNAVAILABLE:
                raise VMBeamUnavailable(name, text)
            raise VMBeamError(name, text)
        return reply.body

    # The manager.

    def co_location(self, dest_uri):
        """``CoLocation``: (co-located, destination host id, reason)."""
        ok, host, reason = self._call(
            MANAGER_PATH, MANAGER_IFACE, "CoLocation", "s", (dest_uri,)
        )
        return bool(ok), host, reason

    def migrate(self, domain, dest_uri, options):
        """``Migrate``: starts the job and returns its object path at once."""
        opts = {k: _variant(v) for k, v in options.items()}
        (path,) = self._call(
            MANAGER_PATH, MANAGER_IFACE, "Migrate", "ssa{sv}", (domain, dest_uri, opts)
        )
        return path

    def status(self):
        """``Status``: the daemon's view as a dict (host, cloud, pool,
        libvirt_host_uuid, pool_files, jobs)."""
        ((host, cloud, pool, uuid, files, jobs),) = self._call(
            MANAGER_PATH, MANAGER_IFACE, "Status")
        return {"host": host, "cloud": cloud, "pool": pool,
                "libvirt_host_uuid": uuid, "pool_files": list(files),
                "jobs": list(jobs)}

    def manager_property(self, name):
        (v,) = self._call(
            MANAGER_PATH, PROPS_IFACE, "Get", "ss", (MANAGER_IFACE, name)
        )
        return _unvariant(v)

    def identity(self):
        """(host id, cloud, pool directory) as this host's vmbeamd knows them."""
        host = self.manager_property("HostId")
        cloud = self.manager_property("Cloud")
        pool = self.manager_property("PoolDir")
        return host, cloud, pool

    # Jobs.

    def job(self, path):
        """All properties of a job, read fresh (no cache), as a dict; ``Phase``
        is a :class:`Phase` and ``Mode`` a :class:`Mode` (or None)."""
        (props,) = self._call(path, PROPS_IFACE, "GetAll", "s", (JOB_IFACE,))
        props = {k: _unvariant(v) for k, v in props.items()}
        try:
            if "Phase" in props:
                props["Phase"] = Phase(props["Phase"])
            if "Mode" in props:
                props["Mode"] = Mode(props["Mode"]) if props["Mode"] else None
        except ValueError as e:
            raise VMBeamError(ERROR_PREFIX + "Failed",
                              "job %s: %s (a newer vmbeamd?)" % (path, e)) from e
        return props

    def cancel(self, path):
        """``Job.Cancel``: libvirt's job abort; the guest stays on the source."""
        self._call(path, JOB_IFACE, "Cancel")
